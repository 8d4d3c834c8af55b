//! Row-sparse keys on the worker: a push of row-sparse values sends the rows of their sum,
//! part by part; `row_sparse_pull` asks each part for its own rows (see
//! [`protocol`](crate::protocol#row-sparse-keys)).

use std::ops::Range;

use kvstore_base::{Error, Key, KeyedOuts, NDArray, Result, StorageType};

use super::keys::{KeyMeta, Part};
use super::DistStore;
use crate::protocol::{self, RowRequest};
use crate::transport::Outgoing;

/// Logs a row-sparse `operation` of `values` to `key` (MXNet's
/// `MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE`): each value's rows.
pub(super) fn log_rows(rank: u32, operation: &str, key: &Key, values: &[&NDArray]) {
    let rows: Vec<&[i64]> = values
        .iter()
        .filter_map(|v| v.as_row_sparse().map(|r| r.indices()))
        .collect();
    log::info!("worker rank {rank} {operation} of key {key}: rows {rows:?}");
}

/// The rows of the sum of row-sparse `values` (MXNet's order, the union of their rows), as
/// one [`protocol::RowsPush`] per part of `meta` (a key kept by rows); a part without rows
/// gets an empty push, which still counts as this worker's push of the round.
pub(super) fn rows_payload(meta: &KeyMeta, values: &[&NDArray]) -> Result<Vec<Vec<u8>>> {
    let row_len = meta.row_len.expect("a key kept by rows");
    let summed;
    let sum = match values {
        [single] => *single,
        _ => {
            let mut sum = values[0].clone();
            for v in &values[1..] {
                sum.add_assign(v)?;
            }
            summed = sum;
            &summed
        }
    };
    let sparse = sum
        .as_row_sparse()
        .expect("a sum of row-sparse values is row-sparse");
    let data = sparse.rows_bytes();
    let row_bytes = row_len * meta.dtype.size_of();
    let ids = sparse.indices();
    Ok(meta
        .parts
        .iter()
        .map(|p| {
            let (own, first) = ids_in_part(ids, p, row_len);
            protocol::RowsPush::encode(
                ids[own.clone()].iter().map(|&id| (id - first) as u64),
                &data[own.start * row_bytes..own.end * row_bytes],
            )
        })
        .collect())
}

/// Where the rows part `p` holds (of `row_len` elements each) stand in the sorted `ids`, and
/// the part's first row.
fn ids_in_part(ids: &[i64], p: &Part, row_len: usize) -> (Range<usize>, i64) {
    let (first, end) = ((p.start / row_len) as i64, (p.end / row_len) as i64);
    let own = ids.partition_point(|&id| id < first)..ids.partition_point(|&id| id < end);
    (own, first)
}

impl DistStore {
    /// `row_sparse_pull` of host outputs: every key checked, then each part asked for its
    /// own rows, the answers joined into each output (cast to its dtype).
    pub(super) fn pull_rows(&self, outs: &mut KeyedOuts<'_>, row_ids: &[&NDArray]) -> Result<()> {
        let operation = "row_sparse_pull";
        Error::check_row_id_count(outs.len(), row_ids.len())?;
        let keys: Vec<&Key> = outs.keys().iter().collect();
        let metas = self.metas(operation, &keys)?;
        // Check everything, then ask every part for the rows it holds.
        let mut requests = Vec::with_capacity(metas.len());
        for (i, (meta, out)) in metas.iter().zip(outs.outs()).enumerate() {
            let at = self.at(operation, &meta.key);
            let ids = (|| {
                if !meta.row_sparse {
                    return Err(Error::InvalidArgument(
                        "row_sparse_pull needs a row-sparse stored value; this key is dense (use pull)"
                            .into(),
                    ));
                }
                if out.storage_type() != StorageType::RowSparse {
                    return Err(Error::InvalidArgument(format!(
                        "output {i} must be row-sparse for row_sparse_pull"
                    )));
                }
                meta.check_out(out, &format!("output {i}"))?;
                row_ids[i].unique_row_ids(meta.shape[0])
            })()
            .map_err(at)?;
            if self.row_sparse_verbose {
                log::info!(
                    "worker rank {} row_sparse_pull of key {}: rows {ids:?}",
                    self.rank,
                    meta.key
                );
            }
            requests.push(ids);
        }
        let mut pending = Vec::new();
        for (i, (meta, ids)) in metas.iter().zip(&requests).enumerate() {
            for (part, p) in meta.parts.iter().enumerate() {
                // The part holds whole rows: it is asked for its own. Every part is asked, as
                // MXNet asks every server: the request waits for this worker's round there,
                // and reports a round that failed.
                let own = match meta.row_len {
                    Some(len) => &ids[ids_in_part(ids, p, len).0],
                    None => &ids[..], // rows without elements
                };
                let request = RowRequest {
                    part_start: p.start as u64,
                    row_len: meta.row_len.unwrap_or(0) as u64,
                    rows: own.to_vec(),
                };
                let what = format!("{operation} of key {}", meta.key);
                let sent = self
                    .send(
                        meta,
                        (part, 0),
                        Outgoing::new(protocol::CMD_ROW_SPARSE_PULL, &request.encode()),
                        &what,
                        true,
                    )
                    .map_err(self.transport_at(operation, &meta.key))?;
                pending.push((i, meta, part, sent));
            }
        }
        let mut answers: Vec<Vec<Vec<u8>>> = metas
            .iter()
            .map(|m| vec![Vec::new(); m.parts.len()])
            .collect();
        let mut first_error = None;
        for (i, meta, part, p) in pending {
            match p.wait() {
                Ok(r) => {
                    answers[i][part] = r.payload.into_vec();
                }
                Err(e) => {
                    if first_error.is_none() {
                        first_error = Some(self.transport_at(operation, &meta.key)(e));
                    }
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let mut results = Vec::with_capacity(metas.len());
        for ((meta, ids), mut parts) in metas.iter().zip(&requests).zip(answers) {
            // A row-sparse key is placed by whole rows, and the ids are sorted: the parts'
            // answers, in part order, are the rows in id order.
            let row_len = meta.row_len.unwrap_or(0);
            let expected = ids.len() * row_len * meta.dtype.size_of();
            let rows = match parts.len() {
                1 => parts.pop().expect("one part"),
                _ => {
                    let joined = parts.concat();
                    parts.into_iter().for_each(|p| meta.give_buffer(p));
                    joined
                }
            };
            if rows.len() != expected {
                return Err(self.at(operation, &meta.key)(Error::InvalidArgument(
                    format!(
                        "the servers answered {} bytes for {} rows of {row_len} {} elements",
                        rows.len(),
                        ids.len(),
                        meta.dtype
                    ),
                )));
            }
            let mut row_shape = meta.shape.clone();
            row_shape[0] = ids.len();
            let at = self.at(operation, &meta.key);
            let result = NDArray::from_bytes(&row_shape, meta.dtype, &rows)
                .and_then(|r| NDArray::row_sparse_from(&meta.shape, ids.clone(), r))
                .map_err(at)?;
            meta.give_buffer(rows);
            results.push(result);
        }
        for (out, result) in outs.outs_mut().iter_mut().zip(results) {
            let dtype = out.dtype();
            **out = if result.dtype() == dtype {
                result
            } else {
                result.astype(dtype)
            };
        }
        Ok(())
    }
}
