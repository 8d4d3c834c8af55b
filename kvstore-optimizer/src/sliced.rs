//! State files of keys held in slices: a distributed store's servers each keep the optimizer
//! state of their slice of a key (a contiguous range of its flattened elements). [`join`]
//! assembles the servers' state files ([`Updater::save_states`](crate::Updater::save_states))
//! into the file a single store would write for whole keys, and [`split`] cuts such a file
//! into one file per server, so that a checkpoint moves between a `local` store and a
//! distributed one, or between jobs with other numbers of servers.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use kvstore_base::{DType, Error, Key, NDArray, Result};

use crate::state_file::{self, Saved, SavedKey};

/// Where a key lives: its shape and, for each slice, the file (server) that holds it and the
/// range of the flattened elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlices {
    /// The key.
    pub key: Key,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its element type (the states' too, or float32 with a master copy of the weight).
    pub dtype: DType,
    /// `(file index, element range)` of each slice, in element order, covering the key.
    pub slices: Vec<(usize, Range<usize>)>,
    /// Elements per row when the slices hold whole rows that the servers keep as
    /// `[rows, row_len]` arrays (a distributed store's row-sparse keys, and its dense keys
    /// placed in whole rows); `None` for flat slices. [`split`] cuts states to the slices'
    /// shapes.
    pub row_len: Option<usize>,
}

/// Joins the state files of the servers (`files[i]` from server `i`) into one file of whole
/// keys, for the keys of `layout`. Keys without state on every server are left out; with
/// `with_optimizer`, the file holds the optimizer of the server with the most updates (when
/// the servers' files hold theirs) and the keys' update counts, as
/// [`Updater::save_states`](crate::Updater::save_states) with `dump_optimizer`. Run-time
/// values an optimizer keeps for all its keys (nadam's momentum-schedule product, lars' last
/// learning rate) are that server's, and [`split`] gives them to every server.
///
/// # Errors
/// A file that is not a state file; a server's state of a key that `layout` does not know; a
/// key with state on some of its servers only, whose slices hold other numbers of arrays or
/// come from different steps (other update counts: a save while pushes were in flight), or
/// whose slices' states do not match their ranges.
pub fn join(files: &[Vec<u8>], layout: &[KeySlices], with_optimizer: bool) -> Result<Vec<u8>> {
    let saved: Vec<Saved> = files
        .iter()
        .map(|f| state_file::decode(f))
        .collect::<Result<_>>()?;
    let known: HashSet<&Key> = layout.iter().map(|e| &e.key).collect();
    for (server, file) in saved.iter().enumerate() {
        if let Some(k) = file.keys.iter().find(|k| !known.contains(&k.key)) {
            return Err(Error::InvalidArgument(format!(
                "server {server} holds optimizer state of key {}, which this worker did not init: \
                 save on a worker that initialised every key",
                k.key
            )));
        }
    }
    let most_updated = saved
        .iter()
        .enumerate()
        .max_by_key(|(i, s)| {
            let most = s.keys.iter().filter_map(|k| k.count).max().unwrap_or(0);
            (most, std::cmp::Reverse(*i))
        })
        .map(|(i, _)| i);
    let optimizer = most_updated
        .filter(|_| with_optimizer)
        .and_then(|i| saved[i].optimizer.clone());
    // Each server's keys, by key.
    let by_key: Vec<HashMap<&Key, &SavedKey>> = saved
        .iter()
        .map(|s| {
            let mut keys = HashMap::with_capacity(s.keys.len());
            for k in &s.keys {
                keys.entry(&k.key).or_insert(k); // the first, as a scan finds it
            }
            keys
        })
        .collect();
    let mut keys = Vec::with_capacity(layout.len());
    for entry in layout {
        let parts: Vec<Option<&SavedKey>> = entry
            .slices
            .iter()
            .map(|(file, _)| by_key.get(*file).and_then(|k| k.get(&entry.key).copied()))
            .collect();
        if parts.iter().all(Option::is_none) {
            continue;
        }
        let Some(parts) = parts.into_iter().collect::<Option<Vec<&SavedKey>>>() else {
            return Err(inconsistent(
                &entry.key,
                "has state on some of its servers only",
            ));
        };
        let first = parts[0];
        if parts.iter().any(|p| p.arrays.len() != first.arrays.len()) {
            return Err(inconsistent(&entry.key, "has slices of other optimizers"));
        }
        if parts.iter().any(|p| p.count != first.count) {
            return Err(inconsistent(
                &entry.key,
                "has slices of different steps (a push in flight: save after a barrier; or an \
                 update that failed on some servers)",
            ));
        }
        let arrays = (0..first.arrays.len())
            .map(|a| {
                let slices: Vec<&NDArray> = parts
                    .iter()
                    .map(|p| p.arrays.get(a))
                    .collect::<Option<_>>()
                    .ok_or_else(|| inconsistent(&entry.key, "has slices of other optimizers"))?;
                concat(entry, &slices)
            })
            .collect::<Result<Vec<_>>>()?;
        let master = match parts
            .iter()
            .map(|p| p.master.as_ref())
            .collect::<Option<Vec<_>>>()
        {
            Some(masters) => Some(concat(entry, &masters)?),
            None if parts.iter().all(|p| p.master.is_none()) => None,
            None => {
                return Err(inconsistent(
                    &entry.key,
                    "has a master weight on some servers",
                ))
            }
        };
        keys.push(SavedKey {
            key: entry.key.clone(),
            count: first.count.filter(|_| with_optimizer),
            master,
            arrays,
        });
    }
    state_file::encode(&Saved { optimizer, keys })
}

/// Cuts a state file of whole keys into `files` files, one per server, each holding the
/// slices `layout` places on it (and the optimizer, when the file holds it).
///
/// # Errors
/// A file that is not a state file; a key of the file that `layout` does not know, or whose
/// states do not have its shape and dtype (float32 with a master copy of the weight), or
/// not the saved optimizer's number of arrays (or, without a saved optimizer, not the same
/// number as the other keys'). Nothing is cut then.
pub fn split(bytes: &[u8], layout: &[KeySlices], files: usize) -> Result<Vec<Vec<u8>>> {
    for entry in layout {
        check_layout(entry)?;
    }
    let saved = state_file::decode(bytes)?;
    let state_len = match &saved.optimizer {
        Some(o) => Some(
            crate::create(&o.spec)
                .map_err(|e| {
                    Error::InvalidArgument(format!(
                        "the state file's optimizer cannot be rebuilt: {e}"
                    ))
                })?
                .state_len(),
        ),
        None => saved
            .keys
            .iter()
            .find(|k| !k.arrays.is_empty())
            .map(|k| k.arrays.len()),
    };
    let mut out: Vec<Saved> = (0..files)
        .map(|_| Saved {
            optimizer: saved.optimizer.clone(),
            keys: Vec::new(),
        })
        .collect();
    let mut entries: HashMap<&Key, &KeySlices> = HashMap::with_capacity(layout.len());
    for e in layout {
        entries.entry(&e.key).or_insert(e);
    }
    for key in &saved.keys {
        let Some(entry) = entries.get(&key.key).copied() else {
            return Err(Error::InvalidArgument(format!(
                "the state file holds key {}, which this store does not have (init it first)",
                key.key
            )));
        };
        check_whole(entry, key, state_len)?;
        for (file, range) in &entry.slices {
            let target = out.get_mut(*file).ok_or_else(|| {
                Error::InvalidArgument(format!("key {}: no server {file}", key.key))
            })?;
            target.keys.push(SavedKey {
                key: key.key.clone(),
                count: key.count,
                master: key
                    .master
                    .as_ref()
                    .map(|m| slice(entry, m, range.clone()))
                    .transpose()?,
                arrays: key
                    .arrays
                    .iter()
                    .map(|a| slice(entry, a, range.clone()))
                    .collect::<Result<_>>()?,
            });
        }
    }
    out.iter().map(state_file::encode).collect()
}

/// Checks a saved key's states against the key: dtype, and the number of arrays.
fn check_whole(entry: &KeySlices, key: &SavedKey, state_len: Option<usize>) -> Result<()> {
    let bad = |what: String| {
        Error::InvalidArgument(format!(
            "the state file cannot be loaded: key {} {what}",
            entry.key
        ))
    };
    if let Some(n) = state_len {
        if !key.arrays.is_empty() && key.arrays.len() != n {
            return Err(bad(format!(
                "has {} state arrays, the optimizer keeps {n}",
                key.arrays.len()
            )));
        }
    }
    let dtype = match &key.master {
        Some(_) if !matches!(entry.dtype, DType::F16 | DType::BF16) => {
            return Err(bad(format!(
                "has a master copy of its weight, which only half-precision weights have (the \
                 key's is {})",
                entry.dtype
            )))
        }
        Some(_) => DType::F32,
        None => entry.dtype,
    };
    if let Some(a) = key
        .arrays
        .iter()
        .chain(&key.master)
        .find(|a| a.dtype() != dtype)
    {
        return Err(bad(format!(
            "has a {} state where the key (a {} weight) needs {dtype}",
            a.dtype(),
            entry.dtype
        )));
    }
    Ok(())
}

/// The slices of one state array, joined into an array of the key's shape; for a key kept by
/// rows, a state of one value (or more) per row (groupadagrad's history), joined by rows.
fn concat(entry: &KeySlices, slices: &[&NDArray]) -> Result<NDArray> {
    let dtype = slices[0].dtype();
    let per_row = per_row_width(entry, slices[0]);
    let mut bytes = Vec::new();
    for ((_, range), s) in entry.slices.iter().zip(slices) {
        let expected = match per_row {
            Some((len, width)) => range.len() / len * width,
            None => range.len(),
        };
        let part = s
            .as_bytes()
            .filter(|_| s.dtype() == dtype && s.size() == expected)
            .ok_or_else(|| {
                inconsistent(
                    &entry.key,
                    &format!(
                        "has a slice of {} {} elements where {expected} {dtype} were expected",
                        s.size(),
                        s.dtype(),
                    ),
                )
            })?;
        bytes.extend_from_slice(part);
    }
    match per_row {
        Some((_, width)) => NDArray::from_bytes(&[entry.shape[0], width], dtype, &bytes),
        None => NDArray::from_bytes(&entry.shape, dtype, &bytes),
    }
}

/// Checks that a key's slices cover its elements once, in order, and (kept by rows) in whole
/// rows: what [`split`] cuts states by.
fn check_layout(entry: &KeySlices) -> Result<()> {
    let size: usize = entry.shape.iter().product();
    let bad = |what: String| {
        Err(Error::InvalidArgument(format!(
            "key {}: the layout of its slices {what} (slices {:?}, {size} elements)",
            entry.key, entry.slices
        )))
    };
    let mut next = 0;
    for (_, range) in &entry.slices {
        if range.start != next || range.end < range.start {
            return bad(format!(
                "does not cover its elements in order (a slice starts at {} where {next} was \
                 expected, or ends before it starts)",
                range.start
            ));
        }
        if let Some(len) = kept_by_rows(entry) {
            if range.start % len != 0 || range.end % len != 0 {
                return bad(format!("cuts a row of {len} elements"));
            }
        }
        next = range.end;
    }
    if next != size {
        return bad(format!("covers {next} elements"));
    }
    Ok(())
}

/// The row length of a key whose slices are kept as rows (a 0-d key has no rows, whatever
/// its layout says).
fn kept_by_rows(entry: &KeySlices) -> Option<usize> {
    entry
        .row_len
        .filter(|&len| len > 0 && !entry.shape.is_empty())
}

/// For a key kept by rows, the row length and the width of a server's state `slice` that
/// holds a value (or several) per row instead of one per element of the weight; `None` for
/// a weight-sized state or a key kept flat.
fn per_row_width(entry: &KeySlices, slice: &NDArray) -> Option<(usize, usize)> {
    let len = kept_by_rows(entry)?;
    let width = slice.shape().get(1..)?.iter().product::<usize>();
    (slice.ndim() == 2 && width != len).then_some((len, width))
}

/// The elements `range` of a state array of the key's shape, flattened (or as rows, for a key
/// kept by rows, whose per-row states are cut by rows too).
fn slice(entry: &KeySlices, array: &NDArray, range: Range<usize>) -> Result<NDArray> {
    let size = array.dtype().size_of();
    let rows = kept_by_rows(entry).map(|len| (range.start / len..range.end / len, len));
    // A state of one value (or more) per row, kept by rows on the servers.
    if let (Some((rows, _)), Some(bytes)) = (&rows, array.as_bytes()) {
        let shape = array.shape();
        if shape.len() == 2 && shape != entry.shape.as_slice() && shape[0] == entry.shape[0] {
            let width = shape[1];
            return NDArray::from_bytes(
                &[rows.len(), width],
                array.dtype(),
                &bytes[rows.start * width * size..rows.end * width * size],
            );
        }
    }
    let bytes = array
        .as_bytes()
        .filter(|_| array.shape() == entry.shape.as_slice())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "key {}: the state file holds a state of shape {:?}, the key's is {:?}: a \
                 state not of the weight's shape (e.g. groupadagrad's history, one value per \
                 row) can only be cut into the servers' slices of a key they keep by rows",
                entry.key,
                array.shape(),
                entry.shape
            ))
        })?;
    let shape = match rows {
        Some((rows, len)) => vec![rows.len(), len],
        None => vec![range.len()],
    };
    NDArray::from_bytes(
        &shape,
        array.dtype(),
        &bytes[range.start * size..range.end * size],
    )
}

fn inconsistent(key: &Key, what: &str) -> Error {
    Error::InvalidArgument(format!(
        "the servers' optimizer states of key {key} cannot be joined: it {what}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Updater;
    use kvstore_base::{DType, OptimizerSpec};

    /// Key 1 of shape [2, 3] in two slices (servers 0 and 1), key 2 of 4 elements on server 1.
    fn layout() -> Vec<KeySlices> {
        vec![
            KeySlices {
                key: Key::from(1),
                shape: vec![2, 3],
                dtype: DType::F32,
                slices: vec![(0, 0..4), (1, 4..6)],
                row_len: None,
            },
            KeySlices {
                key: Key::from(2),
                shape: vec![4],
                dtype: DType::F32,
                slices: vec![(1, 0..4)],
                row_len: None,
            },
        ]
    }

    /// An sgd-with-momentum updater that stepped keys 1 and 2 `rounds` times.
    fn whole(rounds: usize) -> Updater {
        let spec = OptimizerSpec::new("sgd")
            .with("learning_rate", 0.1)
            .with("momentum", 0.9);
        let mut u = Updater::from_spec(&spec).unwrap();
        let mut w1 = NDArray::from_vec(&[2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let mut w2 = NDArray::ones(&[4], DType::F32);
        for r in 0..rounds {
            let g1 = NDArray::full(&[2, 3], r as f64 + 0.5, DType::F32);
            u.update(&Key::from(1), &g1, &mut w1).unwrap();
            u.update(&Key::from(2), &NDArray::ones(&[4], DType::F32), &mut w2)
                .unwrap();
        }
        u
    }

    #[test]
    fn split_then_join_gives_the_file_back() {
        let file = whole(3).save_states(true).unwrap();
        let parts = split(&file, &layout(), 2).unwrap();
        assert_eq!(parts.len(), 2);
        // Server 0 holds 4 elements of key 1's momentum and nothing of key 2.
        let mut server0 = Updater::from_spec(&OptimizerSpec::new("sgd")).unwrap();
        server0.load_states(&parts[0]).unwrap();
        assert_eq!(
            server0.state_arrays(&Key::from(1)).unwrap()[0].shape(),
            &[4]
        );
        assert!(server0.state_arrays(&Key::from(2)).is_none());
        let joined = join(&parts, &layout(), true).unwrap();
        let (mut a, mut b) = (
            Updater::from_spec(&OptimizerSpec::new("sgd")).unwrap(),
            Updater::from_spec(&OptimizerSpec::new("sgd")).unwrap(),
        );
        a.load_states(&file).unwrap();
        b.load_states(&joined).unwrap();
        for key in [Key::from(1), Key::from(2)] {
            assert_eq!(a.state_arrays(&key), b.state_arrays(&key), "key {key}");
            assert_eq!(a.update_count(&key), b.update_count(&key));
        }
        assert_eq!(a.optimizer().base().spec(), b.optimizer().base().spec());
    }

    #[test]
    fn slices_of_whole_rows_are_cut_as_rows() {
        // Key 1 ([2, 3]) kept by rows: row 0 on server 0, row 1 on server 1.
        let mut rows = layout();
        rows[0].slices = vec![(0, 0..3), (1, 3..6)];
        rows[0].row_len = Some(3);
        let file = whole(2).save_states(true).unwrap();
        let parts = split(&file, &rows, 2).unwrap();
        let mut server1 = Updater::from_spec(&OptimizerSpec::new("sgd")).unwrap();
        server1.load_states(&parts[1]).unwrap();
        let momentum = &server1.state_arrays(&Key::from(1)).unwrap()[0];
        assert_eq!(momentum.shape(), &[1, 3]);
        // The slice's states fit a weight of the slice's shape and update it.
        let mut w = NDArray::ones(&[1, 3], DType::F32);
        server1
            .update(&Key::from(1), &NDArray::ones(&[1, 3], DType::F32), &mut w)
            .unwrap();
        let joined = join(&parts, &rows, true).unwrap();
        let mut back = Updater::from_spec(&OptimizerSpec::new("sgd")).unwrap();
        back.load_states(&joined).unwrap();
        assert_eq!(
            back.state_arrays(&Key::from(1)),
            whole(2).state_arrays(&Key::from(1))
        );
    }

    #[test]
    fn per_row_states_of_keys_kept_by_rows_are_cut_and_joined_by_rows() {
        // groupadagrad keeps one history value per row: (2, 1) for the (2, 3) weight.
        let mut u = Updater::from_spec(&OptimizerSpec::new("groupadagrad")).unwrap();
        let mut w = NDArray::ones(&[2, 3], DType::F32);
        let g = NDArray::from_vec(&[2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        u.update(&Key::from(1), &g, &mut w).unwrap();
        let file = u.save_states(true).unwrap();
        let rows = vec![KeySlices {
            key: Key::from(1),
            shape: vec![2, 3],
            dtype: DType::F32,
            slices: vec![(0, 0..3), (1, 3..6)],
            row_len: Some(3),
        }];
        let parts = split(&file, &rows, 2).unwrap();
        let mut server1 = Updater::from_spec(&OptimizerSpec::new("groupadagrad")).unwrap();
        server1.load_states(&parts[1]).unwrap();
        let history = &server1.state_arrays(&Key::from(1)).unwrap()[0];
        assert_eq!(history.shape(), &[1, 1]);
        // Row 1's slice updates as the whole key's row 1 does.
        let mut w1 = NDArray::ones(&[1, 3], DType::F32);
        server1
            .update(&Key::from(1), &NDArray::ones(&[1, 3], DType::F32), &mut w1)
            .unwrap();
        let joined = join(&parts, &rows, true).unwrap();
        let mut back = Updater::from_spec(&OptimizerSpec::new("groupadagrad")).unwrap();
        back.load_states(&joined).unwrap();
        assert_eq!(
            back.state_arrays(&Key::from(1)),
            u.state_arrays(&Key::from(1))
        );
    }

    #[test]
    fn keys_the_layout_does_not_know_and_partial_states_are_refused() {
        let file = whole(1).save_states(false).unwrap();
        let err = split(&file, &layout()[..1], 2).unwrap_err().to_string();
        assert!(
            err.contains("key 2") && err.contains("init it first"),
            "{err}"
        );
        // Key 1's slice on server 1 is missing.
        let parts = split(&file, &layout(), 2).unwrap();
        let empty = Updater::from_spec(&OptimizerSpec::new("sgd"))
            .unwrap()
            .save_states(false)
            .unwrap();
        let err = join(&[parts[0].clone(), empty], &layout(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key 1") && err.contains("some of its servers"),
            "{err}"
        );
        // Layouts that do not cut the key into its elements once, in order, are refused
        // before anything is cut (they panicked or cut wrongly).
        for (slices, row_len, what) in [
            (vec![(0, 0..10)], None, "covers 10"),
            (vec![(0, 0..4), (1, 3..6)], None, "in order"),
            (vec![(0, 0..4)], None, "covers 4"),
            (vec![(0, 0..4), (1, 4..6)], Some(3), "cuts a row"),
        ] {
            let mut bad = layout();
            bad[0].slices = slices;
            bad[0].row_len = row_len;
            let err = split(&file, &bad, 2).unwrap_err().to_string();
            assert!(err.contains("key 1") && err.contains(what), "{err}");
        }
        // A state of another dtype than the key's.
        let mut wide = layout();
        wide[1].dtype = DType::F64;
        let err = split(&file, &wide, 2).unwrap_err().to_string();
        assert!(err.contains("key 2") && err.contains("float64"), "{err}");
        // Slices of different steps.
        let (one, two) = (
            split(&whole(1).save_states(true).unwrap(), &layout(), 2).unwrap(),
            split(&whole(2).save_states(true).unwrap(), &layout(), 2).unwrap(),
        );
        let err = join(&[one[0].clone(), two[1].clone()], &layout(), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("different steps"), "{err}");
        // A server's key that the layout does not know.
        let err = join(&two, &layout()[..1], true).unwrap_err().to_string();
        assert!(
            err.contains("key 2") && err.contains("did not init"),
            "{err}"
        );
    }
}
