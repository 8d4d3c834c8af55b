//! MXNet's row-sparse requests (`RequestType::kRowSparsePushPull`), served as MXNet 1.9.1's
//! `DataHandleRowSparse` serves them, without its silent corruptions.
//!
//! A request's first key is the key's own ps-lite key (the *master* key); each further key is
//! the master key plus the id of a row, counted from this server's first row of the key (a big
//! key is cut across the servers by rows). A push carries the rows' elements, row after row,
//! and lengths `[0, row bytes, row bytes, ...]`; the answer to a pull carries the rows asked
//! for, and lengths `[0, row elements, ...]` (MXNet's server counts them in elements there,
//! not bytes; this server answers alike, for MXNet's workers).
//!
//! - The first push of a key (`init`) must carry every row, `0, 1, ..., n - 1`: the server
//!   keeps a `(n, row length)` value. MXNet's keeps the rows it got as rows `0, 1, ...`
//!   whatever their ids, so that a partial value reads wrong rows later; this server refuses
//!   it, naming the key.
//! - Later pushes are summed over a round's workers by rows (the union of their rows); the
//!   optimizer steps the value with that row-sparse sum, or, when none was set, the sum
//!   replaces the value and the rows no one pushed become zeros (MXNet's server then reads
//!   its sparse sum as if it held every row, and answers later pulls with wrong rows).
//! - A push of no rows counts as the worker's push of the round (sync mode), or is answered at
//!   once (async mode).
//! - A pull of rows it cannot serve (a key never initialised, a dense key, a row past the
//!   key's) is answered with no rows, as a dense pull of a key never initialised is: the worker
//!   then fails its pull, naming this server (MXNet's server aborts).

use kvstore_base::{DType, NDArray};

use super::{node_name, reply, take_values, Message, Pushed, Server, Slot, VanError};

/// The master key and the row ids of a row-sparse request's keys, checked: the ids strictly
/// increasing, as MXNet's workers send them.
fn row_ids(keys: &[u8]) -> Result<(u64, Vec<usize>), String> {
    if keys.is_empty() || !keys.len().is_multiple_of(8) {
        return Err(format!(
            "a row-sparse request with {} bytes of keys",
            keys.len()
        ));
    }
    let mut keys = keys
        .chunks_exact(8)
        .map(|k| u64::from_le_bytes(k.try_into().expect("8 bytes")));
    let master = keys.next().expect("checked: not empty");
    let mut ids = Vec::with_capacity(keys.len());
    for key in keys {
        let id = key
            .checked_sub(master)
            .and_then(|id| usize::try_from(id).ok())
            .filter(|&id| ids.last().is_none_or(|&last| id > last))
            .ok_or_else(|| {
                format!(
                    "row-sparse keys of master key {master}: key {key} is not the next row \
                     (row keys follow their master key, in increasing order)"
                )
            })?;
        ids.push(id);
    }
    Ok((master, ids))
}

/// The sum of a complete round's rows in `dtype` (the key's, or float32 for a half type under
/// multi-precision), added in arrival order, as a row-sparse array of the value's shape.
pub(super) fn round_sum(slot: &Slot, dtype: DType) -> Result<NDArray, String> {
    let mut sum: Option<NDArray> = None;
    for (_, pushed) in &slot.held {
        let Pushed::Rows(rows) = pushed else {
            return Err("a dense push in a round of a row-sparse key".into());
        };
        let cast;
        let rows = match rows.dtype() == dtype {
            true => rows,
            false => {
                cast = rows.astype(dtype);
                &cast
            }
        };
        match &mut sum {
            None => sum = Some(rows.clone()),
            Some(sum) => sum.add_assign(rows).map_err(|e| e.to_string())?,
        }
    }
    sum.ok_or_else(|| "a round without pushes".into())
}

impl Server {
    /// A row-sparse request of `dtype`: a pull of rows, the first push of a key (every row), or
    /// a push of some rows.
    pub(super) fn row_sparse(
        &mut self,
        mut request: Message,
        dtype: DType,
    ) -> Result<(), VanError> {
        let sender = request.sender;
        let bad = |what: String| VanError(format!("{}: {what}", node_name(sender)));
        let keys = request.data.first().map_or(&[][..], |k| k.as_slice());
        let (master, ids) = row_ids(keys).map_err(bad)?;
        if !request.meta.push {
            return self.answer_rows(&request, master, &ids);
        }
        if request.meta.pull {
            return Err(bad(format!(
                "a row-sparse pushpull of {} (MXNet's workers push rows and pull them apart)",
                self.describe_key(master)
            )));
        }
        let lens = request.data.get(2).map_or(&[][..], |l| l.as_slice());
        if !lens.len().is_multiple_of(4) {
            return Err(bad(format!(
                "a row-sparse push to {} with {} bytes of lengths",
                self.describe_key(master),
                lens.len()
            )));
        }
        let lens: Vec<i32> = lens
            .chunks_exact(4)
            .map(|l| i32::from_le_bytes(l.try_into().expect("4 bytes")))
            .collect();
        let vals = take_values(&mut request);
        let row_bytes = match lens.get(1) {
            Some(&len) => usize::try_from(len).unwrap_or(0),
            None => 0,
        };
        let lens_ok = lens.len() == ids.len() + 1
            && lens[0] == 0
            && lens[1..]
                .iter()
                .all(|&l| usize::try_from(l) == Ok(row_bytes))
            && row_bytes.is_multiple_of(dtype.size_of())
            && (ids.is_empty() || row_bytes > 0)
            && row_bytes.checked_mul(ids.len()) == Some(vals.len());
        if !lens_ok {
            return Err(bad(format!(
                "a row-sparse push to {} of {} rows in {} bytes with lengths {lens:?} \
                 (expected [0, then each row's bytes])",
                self.describe_key(master),
                ids.len(),
                vals.len()
            )));
        }
        let row_len = row_bytes / dtype.size_of();
        let Some(slot) = self.slots.get(&master) else {
            // The key's first push: every row, in order, is its value.
            if ids.is_empty() || ids.iter().enumerate().any(|(i, &id)| i != id) {
                return Err(bad(format!(
                    "the first push of row-sparse {} carries rows {} of its value: a \
                     row-sparse init must carry every row (0, 1, 2, ...; MXNet's servers would \
                     keep a partial one as its first rows)",
                    self.describe_key(master),
                    describe(&ids)
                )));
            }
            let stored = NDArray::from_bytes(&[ids.len(), row_len], dtype, &vals)
                .map_err(|e| bad(e.to_string()))?;
            reply(&self.van, &request, None)?;
            self.slots
                .insert(master, Slot::new(dtype, stored, Some(row_len)));
            return Ok(());
        };
        let shape = slot.stored.shape().to_vec();
        let fits = slot.row_len.is_some_and(|n| ids.is_empty() || n == row_len)
            && slot.dtype == dtype
            && ids.last().is_none_or(|&id| id < shape[0]);
        if !fits {
            return Err(bad(format!(
                "a row-sparse push of rows {} of {row_len} {dtype} elements to {}, which \
                 holds {shape:?} {}{}",
                describe(&ids),
                self.describe_key(master),
                slot.dtype,
                match slot.row_len {
                    Some(_) => "",
                    None => " (a dense key)",
                }
            )));
        }
        let rows = NDArray::from_bytes(&[ids.len(), shape[1]], dtype, &vals)
            .and_then(|rows| {
                NDArray::row_sparse_from(&shape, ids.iter().map(|&id| id as i64).collect(), rows)
            })
            .map_err(|e| bad(e.to_string()))?;
        if ids.is_empty() && !self.sync {
            // Nothing to apply.
            return reply(&self.van, &request, None);
        }
        self.take_push(master, request, Pushed::Rows(rows))
    }

    /// Answers a pull of rows `ids` of `master`: the request's keys, the rows' elements, and
    /// lengths `[0, row elements, ...]`. No rows asked, or rows this server cannot give: no
    /// elements, lengths all zero.
    fn answer_rows(&self, request: &Message, master: u64, ids: &[usize]) -> Result<(), VanError> {
        let keys = request.data.first().map_or(&[][..], |k| k.as_slice());
        let mut lens = vec![0u8; 4 * (ids.len() + 1)];
        let mut vals = Vec::new();
        match self.rows_of(master, ids) {
            Err(why) => log::warn!(
                "pslite server: {} asked for {why}: answered with no rows",
                node_name(request.sender)
            ),
            Ok(None) => {}
            Ok(Some((slot, row_len))) => {
                let bytes = slot.stored.as_bytes().expect("contiguous");
                let row_bytes = row_len * slot.dtype.size_of();
                vals.reserve(ids.len() * row_bytes);
                for &id in ids {
                    vals.extend_from_slice(&bytes[id * row_bytes..(id + 1) * row_bytes]);
                }
                let count = i32::try_from(row_len).unwrap_or(i32::MAX).to_le_bytes();
                for len in lens.chunks_exact_mut(4).skip(1) {
                    len.copy_from_slice(&count);
                }
            }
        }
        self.van.send(
            request.sender,
            &super::answer(request, true),
            &[keys, &vals, &lens],
        )
    }

    /// The key of `master` and its row length when it can give rows `ids` (`None` when none
    /// are asked), or what it cannot give.
    fn rows_of(&self, master: u64, ids: &[usize]) -> Result<Option<(&Slot, usize)>, String> {
        let Some(&last) = ids.last() else {
            return Ok(None);
        };
        let what = || self.describe_key(master);
        let slot = self
            .slots
            .get(&master)
            .ok_or_else(|| format!("rows of {}, never initialised", what()))?;
        let row_len = slot
            .row_len
            .ok_or_else(|| format!("rows of {}, a dense key", what()))?;
        let rows = slot.stored.shape()[0];
        if last >= rows {
            return Err(format!("row {last} of {}, which holds {rows} rows", what()));
        }
        Ok(Some((slot, row_len)))
    }

    /// `ps_key` as MXNet's key on this server, for messages: "key K (ps-lite key P)".
    pub(super) fn describe_key(&self, ps_key: u64) -> String {
        key_name(ps_key, self.range_begin)
    }
}

/// `ps_key` as MXNet's key on a server whose range starts at `range_begin`, for messages:
/// "key K (ps-lite key P)".
pub(super) fn key_name(ps_key: u64, range_begin: u64) -> String {
    format!(
        "key {} (ps-lite key {ps_key})",
        ps_key.wrapping_sub(range_begin) as i64
    )
}

/// Row ids for a message: the first few, and how many.
fn describe(ids: &[usize]) -> String {
    const SHOWN: usize = 8;
    match ids.len() {
        0 => "[] (none)".into(),
        n if n <= SHOWN => format!("{ids:?}"),
        n => format!("{:?}... ({n} rows)", &ids[..SHOWN]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(keys: &[u64]) -> Vec<u8> {
        keys.iter().flat_map(|k| k.to_le_bytes()).collect()
    }

    #[test]
    fn row_ids_count_from_the_master_key() {
        assert_eq!(row_ids(&keys(&[6, 7, 8])), Ok((6, vec![1, 2])));
        assert_eq!(row_ids(&keys(&[6])), Ok((6, vec![])));
        assert_eq!(row_ids(&keys(&[100, 100, 105])), Ok((100, vec![0, 5])));
    }

    #[test]
    fn row_ids_refuse_keys_out_of_order_or_below_the_master() {
        for bad in [&[6, 5][..], &[6, 8, 7], &[6, 7, 7]] {
            let e = row_ids(&keys(bad)).unwrap_err();
            assert!(e.contains("not the next row"), "{bad:?}: {e}");
        }
        assert!(row_ids(&[]).is_err());
        assert!(row_ids(&[0; 12]).is_err());
    }

    #[test]
    fn describe_shortens_long_lists() {
        assert_eq!(describe(&[1, 3]), "[1, 3]");
        assert!(describe(&(0..20).collect::<Vec<_>>()).ends_with("(20 rows)"));
    }
}
