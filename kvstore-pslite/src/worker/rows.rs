//! Row-sparse keys on the worker, as MXNet 1.9.1's `KVStoreDist` sends them
//! (`kRowSparsePushPull`, laid out by `EncodeRowSparseKey`, [`encoding::place_rows`]).
//!
//! A key initialised with a row-sparse value is kept by rows. Each message to a server carries
//! the key's master key on that server, then one key per row (the master key plus the row's id
//! counted from the server's first row of the key); a push carries the rows' elements and
//! lengths `[0, row bytes, ...]`, every server getting one (with no rows when the push has
//! none of its rows, as MXNet sends it, so that every server's round counts this worker).
//!
//! - `init` sends every row, zeros for the rows the value does not hold (MXNet's worker sends
//!   the rows it holds, and MXNet's server keeps them as its first rows).
//! - A push sums the worker's values by rows (a dense value counts as every row) and needs an
//!   optimizer set on this worker: without one MXNet's server replaces the value by the rows'
//!   sum and then reads it as if it held every row, answering later pulls with wrong rows.
//! - `row_sparse_pull` asks each server for its rows among the unique, sorted ids; a `pull`
//!   asks for every row.
//! - Refused, naming the key, as MXNet refuses them or fails on them: compression (MXNet:
//!   "Gradient compression for row sparse storage type is not supported"), `pushpull`, a
//!   row-sparse push to a dense key, a key with more servers than rows to cut it into.

use std::collections::HashMap;

use kvstore_base::{Error, Key, KeyedOuts, NDArray, Result, StorageType};

use super::{Entry, Payload, PsLiteStore, Request};
use crate::encoding::{self, Slice};
use crate::van::Message;

/// One server's row-sparse message for a key: its keys (the master key, then a key per row),
/// and for a push the rows' bytes and MXNet's lengths.
#[derive(Debug)]
pub(super) struct RowsMessage {
    pub(super) keys: Vec<u8>,
    pub(super) vals: Vec<u8>,
    pub(super) lens: Vec<u8>,
}

impl Entry {
    /// The bytes of one row of a row-sparse key.
    fn row_bytes(&self) -> usize {
        self.row_len.expect("a row-sparse entry") * self.dtype.size_of()
    }

    /// Every row id of a row-sparse key.
    pub(super) fn every_row(&self) -> Vec<i64> {
        (0..self.shape[0] as i64).collect()
    }

    /// The messages, one per slice, for rows `ids` (sorted, unique) of this row-sparse key; with
    /// `rows` (their bytes, in the order of `ids`), a push's.
    pub(super) fn row_messages(&self, ids: &[i64], rows: Option<&[u8]>) -> Vec<RowsMessage> {
        let row_bytes = self.row_bytes();
        let row_len = self.row_len.expect("a row-sparse entry").max(1);
        let mut next = 0;
        self.slices
            .iter()
            .map(|slice| {
                let first = (slice.elements.start / row_len) as i64;
                let end = (slice.elements.end / row_len) as i64;
                let start = next;
                while next < ids.len() && ids[next] < end {
                    next += 1;
                }
                let own = &ids[start..next];
                let mut keys = Vec::with_capacity(8 * (own.len() + 1));
                keys.extend_from_slice(&slice.ps_key.to_le_bytes());
                for &id in own {
                    let key = slice.ps_key.wrapping_add((id - first) as u64);
                    keys.extend_from_slice(&key.to_le_bytes());
                }
                let (vals, lens) = match rows {
                    None => (Vec::new(), Vec::new()),
                    Some(rows) => {
                        let vals = rows[start * row_bytes..next * row_bytes].to_vec();
                        let mut lens = vec![0u8; 4];
                        let len = (row_bytes as i32).to_le_bytes();
                        for _ in own {
                            lens.extend_from_slice(&len);
                        }
                        (vals, lens)
                    }
                };
                RowsMessage { keys, vals, lens }
            })
            .collect()
    }

    /// `init`'s messages: every row of `value` (zeros where a row-sparse value holds none).
    pub(super) fn init_rows(&self, value: &NDArray) -> Result<Vec<RowsMessage>> {
        let dense = on_host(value)?.to_dense();
        let bytes = dense
            .as_bytes()
            .expect("a dense host array in standard layout");
        Ok(self.row_messages(&self.every_row(), Some(bytes)))
    }

    /// The sum of a worker's values of this row-sparse key, by rows (a dense value counts as
    /// every row): its row ids and their bytes.
    pub(super) fn summed_rows(&self, values: &[&NDArray]) -> Result<(Vec<i64>, Vec<u8>)> {
        let mut sum: Option<NDArray> = None;
        for value in values {
            let value = on_host(value)?;
            let rows = match value.storage_type() {
                StorageType::RowSparse => value,
                _ => value.retain_rows(&self.every_row())?,
            };
            match &mut sum {
                None => sum = Some(rows),
                Some(sum) => sum.add_assign(&rows)?,
            }
        }
        let sum = sum.ok_or_else(|| Error::InvalidArgument("no value to push".into()))?;
        let rows = sum.as_row_sparse().expect("a sum of row-sparse arrays");
        Ok((rows.indices().to_vec(), rows.rows_bytes().to_vec()))
    }
}

impl PsLiteStore {
    /// The slices of a row-sparse key of `shape` (`EncodeRowSparseKey`'s layout); refused when
    /// a cut would leave a server no row (MXNet's servers abort on an init of no rows).
    pub(super) fn row_layout(&self, id: i32, shape: &[usize]) -> Result<Vec<Slice>> {
        let rows = shape[0];
        let row_len = shape[1..].iter().product();
        let slices = encoding::place_rows(id, rows, row_len, self.num_servers, self.bigarray_bound)
            .map_err(Error::InvalidArgument)?;
        if slices.iter().any(|s| s.elements.is_empty()) {
            return Err(Error::InvalidArgument(format!(
                "a row-sparse key of {rows} rows cut across {} servers leaves a server no row \
                 (MXNet's servers abort on an init of no rows)",
                self.num_servers
            )));
        }
        Ok(slices)
    }

    /// `row_sparse_pull`: for each output, the unique sorted ids of its row-id array, asked of
    /// every server holding some of the key (each server's message holds its own rows), and
    /// written into the output as a row-sparse array holding those rows.
    pub(super) fn pull_rows(
        &self,
        outs: &mut KeyedOuts<'_>,
        row_ids: &[&NDArray],
        priority: i32,
    ) -> Result<()> {
        let operation = "row_sparse_pull";
        Error::check_row_id_count(outs.len(), row_ids.len())?;
        let owned: Vec<Key> = outs.keys().to_vec();
        let keys: Vec<&Key> = owned.iter().collect();
        let entries = self.entries(operation, &keys)?;
        let mut wanted = Vec::with_capacity(entries.len());
        for (i, (entry, out)) in entries.iter().zip(outs.outs()).enumerate() {
            let at = |e: Error| e.at_key(&self.name, operation, keys[i].clone());
            if entry.row_len.is_none() {
                return Err(at(Error::InvalidArgument(
                    "row_sparse_pull needs a row-sparse key; this one was initialised dense \
                     (use pull)"
                        .into(),
                )));
            }
            if out.storage_type() != StorageType::RowSparse {
                return Err(at(Error::InvalidArgument(format!(
                    "output {i} must be row-sparse for row_sparse_pull"
                ))));
            }
            entry.check_shape(out, &format!("output {i}")).map_err(at)?;
            wanted.push(row_ids[i].unique_row_ids(entry.shape[0]).map_err(at)?);
        }
        let messages: Vec<Vec<RowsMessage>> = entries
            .iter()
            .zip(&wanted)
            .map(|(entry, ids)| entry.row_messages(ids, None))
            .collect();
        let requests: Vec<Request<'_>> = keys
            .iter()
            .zip(&entries)
            .zip(&messages)
            .map(|((&key, entry), messages)| Request {
                key,
                entry,
                payload: Payload::RowPull(messages),
            })
            .collect();
        let answers = self.exchange(operation, &requests, true, priority)?;
        // Every answer checked before any output is written.
        let mut pulled = Vec::with_capacity(entries.len());
        for (i, ((entry, ids), answers)) in entries.iter().zip(&wanted).zip(&answers).enumerate() {
            let rows = self
                .answered_rows(entry, &messages[i], answers)
                .and_then(|bytes| {
                    let mut shape = entry.shape.clone();
                    shape[0] = ids.len();
                    let rows = NDArray::from_bytes(&shape, entry.dtype, &bytes)?;
                    NDArray::row_sparse_from(&entry.shape, ids.clone(), rows)
                })
                .map_err(|e| e.at_key(&self.name, operation, keys[i].clone()))?;
            pulled.push(rows);
        }
        for ((i, out), rows) in outs.outs_mut().iter_mut().enumerate().zip(&pulled) {
            out.assign(rows)
                .map_err(|e| e.at_key(&self.name, operation, keys[i].clone()))?;
        }
        Ok(())
    }

    /// The rows the servers answered to `messages` (a pull of rows), in order, checked: each
    /// answer echoes its request's keys and carries a row per key after the first.
    fn answered_rows(
        &self,
        entry: &Entry,
        messages: &[RowsMessage],
        answers: &[Message],
    ) -> Result<Vec<u8>> {
        let row_bytes = entry.row_bytes();
        let mut bytes = Vec::new();
        for (message, answer) in messages.iter().zip(answers) {
            let keys = answer.data.first().map_or(&[][..], |k| k.as_slice());
            let vals = answer.data.get(1).map_or(&[][..], |v| v.as_slice());
            let rows = message.keys.len() / 8 - 1;
            if keys != message.keys || vals.len() != rows * row_bytes {
                return Err(Error::Backend {
                    store: self.name.clone(),
                    source: format!(
                        "{} answered {} bytes for {rows} rows of {row_bytes} bytes",
                        crate::van::node_name(answer.sender),
                        vals.len()
                    )
                    .into(),
                });
            }
            bytes.extend_from_slice(vals);
        }
        Ok(bytes)
    }
}

/// `value` in host memory (a copy of one in device memory).
fn on_host(value: &NDArray) -> Result<NDArray> {
    match value.in_device_memory() {
        true => value.to_context(kvstore_base::Context::Cpu),
        false => Ok(value.clone()),
    }
}

/// The row-sparse keys of `entries`, by key, with the messages of a pull of every row.
pub(super) fn whole_pulls(entries: &[(Key, Entry)]) -> HashMap<Key, Vec<RowsMessage>> {
    entries
        .iter()
        .filter(|(_, entry)| entry.row_len.is_some())
        .map(|(key, entry)| (key.clone(), entry.row_messages(&entry.every_row(), None)))
        .collect()
}

#[cfg(test)]
mod tests {
    use kvstore_base::DType;

    use super::*;
    use crate::encoding::Slice;

    /// A key of 4 rows of 2 float32 elements, rows 0-1 on server 0 (master key 100) and rows
    /// 2-3 on server 1 (master key 200).
    fn split_entry() -> Entry {
        Entry {
            id: 100,
            shape: vec![4, 2],
            dtype: DType::F32,
            slices: vec![
                Slice {
                    server: 0,
                    ps_key: 100,
                    elements: 0..4,
                },
                Slice {
                    server: 1,
                    ps_key: 200,
                    elements: 4..8,
                },
            ],
            packed: None,
            row_len: Some(2),
        }
    }

    fn u64s(bytes: &[u8]) -> Vec<u64> {
        bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn i32s(bytes: &[u8]) -> Vec<i32> {
        bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn a_push_sends_each_server_its_rows_counted_from_its_first() {
        let entry = split_entry();
        let rows: Vec<u8> = (0..6u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let messages = entry.row_messages(&[1, 2, 3], Some(&rows));
        assert_eq!(u64s(&messages[0].keys), [100, 101]);
        assert_eq!(messages[0].vals, rows[..8]);
        assert_eq!(i32s(&messages[0].lens), [0, 8]);
        assert_eq!(u64s(&messages[1].keys), [200, 200, 201]);
        assert_eq!(messages[1].vals, rows[8..]);
        assert_eq!(i32s(&messages[1].lens), [0, 8, 8]);
    }

    #[test]
    fn a_server_without_rows_gets_its_master_key_alone() {
        let entry = split_entry();
        let rows = vec![0u8; 8];
        let push = entry.row_messages(&[3], Some(&rows));
        assert_eq!(u64s(&push[0].keys), [100]);
        assert!(push[0].vals.is_empty());
        assert_eq!(i32s(&push[0].lens), [0]);
        let pull = entry.row_messages(&[0], None);
        assert_eq!(u64s(&pull[0].keys), [100, 100]);
        assert_eq!(u64s(&pull[1].keys), [200]);
        assert!(pull.iter().all(|m| m.vals.is_empty() && m.lens.is_empty()));
    }

    #[test]
    fn init_sends_every_row_with_zeros_for_the_missing() {
        let entry = split_entry();
        let value =
            NDArray::row_sparse(&[4, 2], vec![2], &NDArray::ones(&[1, 2], DType::F32)).unwrap();
        let messages = entry.init_rows(&value).unwrap();
        assert_eq!(u64s(&messages[0].keys), [100, 100, 101]);
        assert_eq!(u64s(&messages[1].keys), [200, 200, 201]);
        assert_eq!(messages[0].vals, vec![0u8; 16]);
        let one = 1f32.to_le_bytes();
        assert_eq!(messages[1].vals[..8], [one, one].concat());
        assert_eq!(messages[1].vals[8..], [0u8; 8]);
    }

    #[test]
    fn a_workers_values_are_summed_by_rows() {
        let entry = split_entry();
        let a = NDArray::row_sparse(&[4, 2], vec![1], &NDArray::ones(&[1, 2], DType::F32)).unwrap();
        let b =
            NDArray::row_sparse(&[4, 2], vec![1, 3], &NDArray::ones(&[2, 2], DType::F32)).unwrap();
        let (ids, bytes) = entry.summed_rows(&[&a, &b]).unwrap();
        assert_eq!(ids, [1, 3]);
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(values, [2.0, 2.0, 1.0, 1.0]);
        // A dense value counts as every row.
        let dense = NDArray::ones(&[4, 2], DType::F32);
        assert_eq!(entry.summed_rows(&[&dense]).unwrap().0, [0, 1, 2, 3]);
    }
}
