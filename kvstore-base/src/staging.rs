//! Arrays in device memory staged through host memory, for stores that work on the host (and
//! for the host side of stores that do not): copies of values, outputs written back after the
//! call, and, for stores that send one array per key (the distributed ones), each key's
//! device values summed on a device first ([`HostSums`]) and each key's result copied to
//! one device output and from there to the others ([`with_outs_fanned_out`]), as MXNet's
//! device communicator does around a parameter server.

use std::collections::hash_map::{Entry, HashMap};

use crate::{Context, DType, Error, Key, KeyedOuts, KeyedValues, NDArray, Result, StorageType};

/// Runs `call` with `values`, those in device memory replaced by copies in host memory (the
/// others as they are): how a store that works on host memory takes device arrays.
///
/// # Errors
/// A failed copy from a device, or `call`'s error.
pub fn with_values_on_host<R>(
    values: &KeyedValues<'_>,
    call: impl FnOnce(&KeyedValues<'_>) -> Result<R>,
) -> Result<R> {
    if !values.any_on_device() {
        return call(values);
    }
    with_arrays_on_host(values.values(), |staged| {
        call(&KeyedValues::new(
            "stage",
            values.keys().to_vec(),
            staged.to_vec(),
        )?)
    })
}

/// Runs `call` with `arrays`, those in device memory replaced by copies in host memory (row
/// ids, for instance).
///
/// # Errors
/// A failed copy from a device, or `call`'s error.
pub fn with_arrays_on_host<R>(
    arrays: &[&NDArray],
    call: impl FnOnce(&[&NDArray]) -> Result<R>,
) -> Result<R> {
    let copies = arrays
        .iter()
        .map(|a| {
            a.in_device_memory()
                .then(|| a.to_context(Context::Cpu))
                .transpose()
        })
        .collect::<Result<Vec<Option<NDArray>>>>()?;
    let staged: Vec<&NDArray> = arrays
        .iter()
        .zip(&copies)
        .map(|(a, copy)| copy.as_ref().unwrap_or(a))
        .collect();
    call(&staged)
}

/// Runs `call` with `outs`, those in device memory replaced by copies in host memory; once
/// `call` succeeded, the copies are written back into them (nothing is written when it
/// fails; dense outputs sharing memory with clones get their own before `call`, and
/// row-sparse ones get new device memory for their results before any output is written, so
/// that a device out of memory writes nothing). For calls that read their outputs (an
/// in-place pushpull); see [`with_written_outs_on_host`] for those that only write them.
///
/// # Errors
/// A failed copy to or from a device, or `call`'s error.
pub fn with_outs_on_host<R>(
    outs: &mut KeyedOuts<'_>,
    call: impl FnOnce(&mut KeyedOuts<'_>) -> Result<R>,
) -> Result<R> {
    stage_outs(outs, true, call)
}

/// [`with_outs_on_host`] for a call that only writes its outputs (a pull, a pushpull, a
/// broadcast): dense outputs in device memory are replaced by zeros in host memory, not by
/// copies, so nothing is copied from the device. Row-sparse ones are copied all the same: a
/// pull skips them (`ignore_sparse`), and what is written back must then be what they held.
///
/// # Errors
/// A failed copy to a device, or `call`'s error.
pub fn with_written_outs_on_host<R>(
    outs: &mut KeyedOuts<'_>,
    call: impl FnOnce(&mut KeyedOuts<'_>) -> Result<R>,
) -> Result<R> {
    stage_outs(outs, false, call)
}

/// Stages the device outputs of `outs` in host memory (copies of them when `read`, and of
/// row-sparse ones always; else zeros) for `call`, and writes them back once it succeeded.
pub(crate) fn stage_outs<R>(
    outs: &mut KeyedOuts<'_>,
    read: bool,
    call: impl FnOnce(&mut KeyedOuts<'_>) -> Result<R>,
) -> Result<R> {
    if !outs.any_on_device() {
        return call(outs);
    }
    // A row-sparse device output gets new memory when written back, which may fail: then
    // host outputs are staged too, so that nothing is written before that succeeded.
    let stage_host = outs.outs().iter().any(|o| o.device_row_sparse().is_some());
    let mut copies = outs
        .outs()
        .iter()
        .map(|o| match (o.in_device_memory(), read, o.storage_type()) {
            (false, _, _) if stage_host => Ok(Some((**o).clone())),
            (false, _, _) => Ok(None),
            (true, true, _) | (true, false, StorageType::RowSparse) => {
                o.to_context(Context::Cpu).map(Some)
            }
            (true, false, StorageType::Dense) => Ok(Some(o.zeros_on_host_like())),
        })
        .collect::<Result<Vec<Option<NDArray>>>>()?;
    // Dense outputs that share their memory with clones get their own before the call: a
    // device out of memory then fails the call before anything is done or written.
    for (out, copy) in outs.outs_mut().iter_mut().zip(&copies) {
        if copy.is_some() {
            out.device_mut().map_err(unshare_failed)?;
        }
    }
    let keys = outs.keys().to_vec();
    let result = {
        let staged = outs
            .outs_mut()
            .iter_mut()
            .zip(copies.iter_mut())
            .map(|(o, copy)| match copy {
                Some(copy) => copy,
                None => &mut **o,
            })
            .collect();
        call(&mut KeyedOuts::new("stage", keys, staged)?)?
    };
    let results: Vec<Option<&NDArray>> = copies.iter().map(Option::as_ref).collect();
    write_back(outs.outs_mut(), &results)?;
    Ok(result)
}

/// Writes `results[i]` (when there is one) into `outs[i]`: first new device memory for every
/// row-sparse output in device memory (uploaded before anything is written, so that a device
/// out of memory writes nothing), then every output.
fn write_back(outs: &mut [&mut NDArray], results: &[Option<&NDArray>]) -> Result<()> {
    let fresh = outs
        .iter()
        .zip(results)
        .map(|(out, result)| match result {
            Some(result) => out.row_sparse_replacement(result).map_err(copy_back),
            None => Ok(None),
        })
        .collect::<Result<Vec<Option<NDArray>>>>()?;
    for ((out, result), fresh) in outs.iter_mut().zip(results).zip(fresh) {
        match (fresh, result) {
            (Some(fresh), _) => **out = fresh,
            (None, Some(result)) => out.assign(result).map_err(copy_back)?,
            (None, None) => {}
        }
    }
    Ok(())
}

/// A call's values in host memory for a store that sends one array per key: each key's
/// values in device memory summed on a device ([`NDArray::sum_on_device`]) and copied to the
/// host as one array, other device values copied one by one, host values as they are.
/// Where the backend does not sum on its devices, or a key mixes host and device values,
/// every device value is copied (the store sums them on the host).
#[derive(Debug)]
pub struct HostSums<'a> {
    keys: Vec<Key>,
    staged: Vec<Staged<'a>>,
    made: Vec<NDArray>,
}

/// Where a staged array is.
#[derive(Debug)]
enum Staged<'a> {
    /// The caller's own (in host memory).
    Caller(&'a NDArray),
    /// Made here: index into `made`, in order.
    Made(usize),
}

impl<'a> HostSums<'a> {
    /// Stages `values` (whose shapes and dtypes the caller has checked: the values of a key
    /// are summed); errors name `store`, `operation` and the key.
    ///
    /// # Errors
    /// A device that fails (out of memory, a failed copy).
    pub fn of(store: &str, operation: &'static str, values: &KeyedValues<'a>) -> Result<Self> {
        let at = |key: &Key| {
            let key = key.clone();
            move |e: Error| e.at_key(store, operation, key)
        };
        let mut sums = HostSums {
            keys: Vec::with_capacity(values.len()),
            staged: Vec::with_capacity(values.len()),
            made: Vec::new(),
        };
        for group in values.groups() {
            let arrays: Vec<&'a NDArray> = group
                .positions
                .iter()
                .map(|&p| values.values()[p])
                .collect();
            if arrays.len() > 1 {
                if let Some(sum) = NDArray::sum_on_device(&arrays).map_err(at(&group.key))? {
                    let host = sum.to_context(Context::Cpu).map_err(at(&group.key))?;
                    sums.push_made(group.key, host);
                    continue;
                }
            }
            for array in arrays {
                match array.in_device_memory() {
                    false => {
                        sums.keys.push(group.key.clone());
                        sums.staged.push(Staged::Caller(array));
                    }
                    true => {
                        let host = array.to_context(Context::Cpu).map_err(at(&group.key))?;
                        sums.push_made(group.key.clone(), host);
                    }
                }
            }
        }
        Ok(sums)
    }

    fn push_made(&mut self, key: Key, array: NDArray) {
        self.keys.push(key);
        self.staged.push(Staged::Made(self.made.len()));
        self.made.push(array);
    }

    /// The staged values, all in host memory.
    ///
    /// # Errors
    /// None in practice (the keys and arrays are paired as in the call).
    pub fn values(&self, operation: &'static str) -> Result<KeyedValues<'_>> {
        let arrays = self
            .staged
            .iter()
            .map(|s| match s {
                Staged::Caller(a) => *a,
                Staged::Made(i) => &self.made[*i],
            })
            .collect();
        KeyedValues::new(operation, self.keys.clone(), arrays)
    }

    /// The staged values as arrays of their own (the caller's host arrays copied), for a call
    /// that then overwrites the values (an in-place pushpull).
    pub fn into_owned(self) -> (Vec<Key>, Vec<NDArray>) {
        let mut made = self.made.into_iter();
        let arrays = self
            .staged
            .into_iter()
            .map(|s| match s {
                Staged::Caller(a) => a.clone(),
                Staged::Made(_) => made.next().expect("made in the order staged"),
            })
            .collect();
        (self.keys, arrays)
    }
}

/// Runs `call` with `values` as [`HostSums`] stages them (once `check` accepted them: the
/// store's checks of shapes and dtypes), unless every value is in host memory already (then
/// `call` checks them itself).
///
/// # Errors
/// `check`'s error, as [`HostSums::of`], or `call`'s error.
pub fn with_values_summed_on_host<R>(
    store: &str,
    operation: &'static str,
    values: &KeyedValues<'_>,
    check: impl FnOnce(&KeyedValues<'_>) -> Result<()>,
    call: impl FnOnce(&KeyedValues<'_>) -> Result<R>,
) -> Result<R> {
    if !values.any_on_device() {
        return call(values);
    }
    check(values)?;
    let sums = HostSums::of(store, operation, values)?;
    call(&sums.values(operation)?)
}

/// An in-place pushpull for a store that sends and receives one array per key: `check` sees
/// the values first, then each key's values are summed ([`HostSums`]) into host arrays of
/// their own, and `call(sums, outs)` writes the results over the values as
/// [`with_outs_fanned_out`] does.
///
/// # Errors
/// `check`'s error, a device that fails, or `call`'s error.
pub fn with_in_place_sums_on_host<R>(
    store: &str,
    operation: &'static str,
    values: &mut KeyedOuts<'_>,
    check: impl FnOnce(&KeyedValues<'_>) -> Result<()>,
    call: impl FnOnce(&KeyedValues<'_>, &mut KeyedOuts<'_>) -> Result<R>,
) -> Result<R> {
    let (keys, sums) = {
        let view = KeyedValues::new(
            operation,
            values.keys().to_vec(),
            values.outs().iter().map(|o| &**o).collect(),
        )?;
        check(&view)?;
        HostSums::of(store, operation, &view)?.into_owned()
    };
    let sums = KeyedValues::new(operation, keys, sums.iter().collect())?;
    with_outs_fanned_out(operation, values, |outs| call(&sums, outs))
}

/// Where an output's result comes from, in [`with_outs_fanned_out`].
enum Plan {
    /// A host output: written by the call itself.
    Host,
    /// The first device output of its key and dtype: from the host stand-in of this index.
    Received(usize),
    /// Another device output of the key: from the device output of this index.
    CopyOf(usize),
}

/// Runs `call` with `outs` (checked by the caller) in host memory, for a store that receives
/// one array per key: one host stand-in per key for its dense device outputs of one dtype,
/// which, once `call` succeeded, is copied to the first of them and from there to the others,
/// device to device; row-sparse device outputs get a host copy each (a pull skips them), and
/// new device memory for their results before any output is written (host outputs are then
/// staged too). Dense outputs that share their memory with clones get their own before
/// `call`: nothing is written when a device runs out of memory, nor when `call` fails.
///
/// # Errors
/// A device that fails, or `call`'s error.
pub fn with_outs_fanned_out<R>(
    operation: &'static str,
    outs: &mut KeyedOuts<'_>,
    call: impl FnOnce(&mut KeyedOuts<'_>) -> Result<R>,
) -> Result<R> {
    if !outs.any_on_device() {
        return call(outs);
    }
    let mut received: Vec<NDArray> = Vec::new();
    let mut plan: Vec<Plan> = Vec::with_capacity(outs.len());
    // The first dense device output of each key and dtype receives; the others copy it.
    // Row-sparse ones receive each into a host copy of their own (a pull skips them, and
    // what is written back must then be what they held).
    // New memory for row-sparse outputs may fail at the write-back: then host outputs are
    // staged too (copies), so that nothing is written before that succeeded.
    let stage_host = outs.outs().iter().any(|o| o.device_row_sparse().is_some());
    let mut receivers: HashMap<(&Key, DType), usize> = HashMap::new();
    for (i, (key, out)) in outs.keys().iter().zip(outs.outs()).enumerate() {
        if !out.in_device_memory() {
            if stage_host {
                plan.push(Plan::Received(received.len()));
                received.push((**out).clone());
            } else {
                plan.push(Plan::Host);
            }
            continue;
        }
        if out.storage_type() == StorageType::RowSparse {
            plan.push(Plan::Received(received.len()));
            received.push(out.to_context(Context::Cpu)?);
            continue;
        }
        match receivers.entry((key, out.dtype())) {
            Entry::Occupied(first) => plan.push(Plan::CopyOf(*first.get())),
            Entry::Vacant(slot) => {
                slot.insert(i);
                plan.push(Plan::Received(received.len()));
                received.push(out.zeros_on_host_like());
            }
        }
    }
    for (out, p) in outs.outs_mut().iter_mut().zip(&plan) {
        if !matches!(p, Plan::Host) {
            out.device_mut().map_err(unshare_failed)?;
        }
    }
    let out_keys = outs.keys().to_vec();
    let result = {
        let mut keys = Vec::with_capacity(outs.len());
        let mut staged: Vec<&mut NDArray> = Vec::with_capacity(outs.len());
        // Stand-ins were made in output order: each `Received` output takes the next one.
        let mut spare = received.iter_mut();
        for ((key, out), p) in out_keys.iter().zip(outs.outs_mut()).zip(&plan) {
            let array: &mut NDArray = match p {
                Plan::Host => out,
                Plan::Received(_) => spare.next().expect("one per stand-in"),
                Plan::CopyOf(_) => continue,
            };
            keys.push(key.clone());
            staged.push(array);
        }
        call(&mut KeyedOuts::new(operation, keys, staged)?)?
    };
    let outs = outs.outs_mut();
    // The received results first (row-sparse outputs get their new memory before any output
    // is written), then the copies of them.
    let results: Vec<Option<&NDArray>> = plan
        .iter()
        .map(|p| match p {
            Plan::Received(r) => Some(&received[*r]),
            Plan::Host | Plan::CopyOf(_) => None,
        })
        .collect();
    write_back(outs, &results)?;
    for (i, p) in plan.iter().enumerate() {
        if let Plan::CopyOf(j) = *p {
            let (head, tail) = outs.split_at_mut(i);
            tail[0].assign(head[j]).map_err(copy_back)?;
        }
    }
    Ok(result)
}

/// [`with_outs_fanned_out`] for a store that works on host memory and is given every output
/// of a call that writes each key's result into all of its outputs (a pull, a pushpull, a
/// broadcast): one host stand-in per key for its dense device outputs (uploaded once, then
/// copied device to device) instead of one each. The store sees only the first of those
/// outputs, so the others are checked here first to have its shape (errors naming `store`,
/// the operation, the key and the output).
///
/// # Errors
/// [`Error::ShapeMismatch`] (at the key) for a device output of another shape than its key's
/// first one of its dtype; else as [`with_outs_fanned_out`].
pub(crate) fn with_written_outs_fanned_out<R>(
    store: &str,
    operation: &'static str,
    outs: &mut KeyedOuts<'_>,
    call: impl FnOnce(&mut KeyedOuts<'_>) -> Result<R>,
) -> Result<R> {
    let mut firsts: HashMap<(&Key, DType), &NDArray> = HashMap::new();
    for (i, (key, out)) in outs.keys().iter().zip(outs.outs()).enumerate() {
        if !out.in_device_memory() || out.storage_type() != StorageType::Dense {
            continue;
        }
        match firsts.entry((key, out.dtype())) {
            Entry::Occupied(first) => first
                .get()
                .check_shape_of(out, &format!("output {i}"))
                .map_err(|e| e.at_key(store, operation, key.clone()))?,
            Entry::Vacant(slot) => {
                slot.insert(out);
            }
        }
    }
    with_outs_fanned_out(operation, outs, call)
}

/// The error of an output shared with clones that could not get memory of its own (before
/// the call: nothing was done).
fn unshare_failed(e: Error) -> Error {
    match e {
        Error::Device(m) => Error::Device(format!(
            "an output shared with its clones needs device memory of its own before the call \
             (nothing was done): {m}"
        )),
        e => e,
    }
}

/// The error of a result that could not be written into a device output.
fn copy_back(e: Error) -> Error {
    match e {
        Error::Device(m) => Error::Device(format!("writing a received value to a device: {m}")),
        e => e,
    }
}
