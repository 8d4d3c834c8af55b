//! Arrays in device (GPU) memory on a worker, for the stores whose name holds `device`
//! (`dist_device_sync`, as MXNet picks its device communicator by that word).
//!
//! As MXNet's `CommDevice` under `KVStoreDist`: a push sums a key's GPU values on a GPU first
//! (through the linked device backend, [`NDArray::sum_on_device`]), so one array per key is
//! copied to the host and sent instead of every value; a pull receives each key once into
//! host memory, copies it to one of the key's GPU outputs and from there to the others, GPU
//! to GPU. Values and outputs in host memory are used as they are; a backend that does not
//! sum on its devices, or a key with host and GPU values mixed, is summed on the host as
//! `dist_sync` does. Every value and output is checked against its key before any copy.

use kvstore_base::{Context, Error, Key, KeyedOuts, KeyedValues, NDArray, Result};

use super::DistStore;

/// A staged array: the caller's own, or one made here.
enum Staged<'a> {
    Caller(&'a NDArray),
    Made(usize),
}

impl DistStore {
    /// Runs `call` with `values` in host memory: each key's GPU values summed on a GPU and
    /// copied to the host as one value, other device values copied one by one.
    pub(super) fn with_device_sums<R>(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        call: impl FnOnce(&KeyedValues<'_>) -> Result<R>,
    ) -> Result<R> {
        if values.values().iter().all(|v| v.device().is_none()) {
            return call(values);
        }
        let (keys, staged, made) = self.sums_on_host(operation, values)?;
        let arrays = staged
            .iter()
            .map(|s| match s {
                Staged::Caller(a) => *a,
                Staged::Made(i) => &made[*i],
            })
            .collect();
        call(&KeyedValues::new(operation, keys, arrays)?)
    }

    /// The host arrays [`with_device_sums`](DistStore::with_device_sums) sends for `values`
    /// (checked against their keys first): keys, where each array is, arrays made here.
    fn sums_on_host<'a>(
        &self,
        operation: &'static str,
        values: &KeyedValues<'a>,
    ) -> Result<(Vec<Key>, Vec<Staged<'a>>, Vec<NDArray>)> {
        self.check_values(operation, values)?;
        let mut keys = Vec::with_capacity(values.len());
        let mut staged = Vec::with_capacity(values.len());
        let mut made = Vec::new();
        for group in values.groups() {
            let arrays: Vec<&'a NDArray> = group
                .positions
                .iter()
                .map(|&p| values.values()[p])
                .collect();
            if arrays.len() > 1 {
                if let Some(sum) =
                    NDArray::sum_on_device(&arrays).map_err(self.at(operation, &group.key))?
                {
                    let host = sum
                        .to_context(Context::Cpu)
                        .map_err(self.at(operation, &group.key))?;
                    keys.push(group.key);
                    staged.push(Staged::Made(made.len()));
                    made.push(host);
                    continue;
                }
            }
            for array in arrays {
                keys.push(group.key.clone());
                match array.device() {
                    None => staged.push(Staged::Caller(array)),
                    Some(_) => {
                        let host = array
                            .to_context(Context::Cpu)
                            .map_err(self.at(operation, &group.key))?;
                        staged.push(Staged::Made(made.len()));
                        made.push(host);
                    }
                }
            }
        }
        Ok((keys, staged, made))
    }

    /// An in-place pushpull with arrays in GPU memory: each key's values summed (on a GPU)
    /// into host arrays of its own, then the results written over them as a pushpull's
    /// outputs.
    pub(super) fn pushpull_in_place_on_devices(
        &self,
        values: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        let operation = "pushpull";
        let (keys, sums) = {
            let view = KeyedValues::new(
                operation,
                values.keys().to_vec(),
                values.outs().iter().map(|o| &**o).collect(),
            )?;
            let (keys, staged, made) = self.sums_on_host(operation, &view)?;
            // Arrays made here are numbered in the order of `staged`.
            let mut made = made.into_iter();
            let sums: Vec<NDArray> = staged
                .into_iter()
                .map(|s| match s {
                    Staged::Caller(a) => a.clone(),
                    Staged::Made(_) => made.next().expect("one per made entry"),
                })
                .collect();
            (keys, sums)
        };
        let sums = KeyedValues::new(operation, keys, sums.iter().collect())?;
        self.with_device_outs(operation, values, |outs| {
            self.push_keys(operation, &sums, Some(outs), priority)
        })
    }

    /// Runs `call` with `outs` (checked by the caller) in host memory: one host array per key
    /// for its GPU outputs of one dtype, which, once `call` succeeded, is copied to the first
    /// of them and from there to the others, GPU to GPU. Outputs that share their memory with
    /// clones get their own before `call` (the only allocations): nothing is sent or written
    /// when a GPU runs out of memory, nor when `call` fails.
    pub(super) fn with_device_outs<R>(
        &self,
        operation: &'static str,
        outs: &mut KeyedOuts<'_>,
        call: impl FnOnce(&mut KeyedOuts<'_>) -> Result<R>,
    ) -> Result<R> {
        if outs.outs().iter().all(|o| o.device().is_none()) {
            return call(outs);
        }
        // For each output: the index of its host stand-in in `received`, and for the GPU
        // outputs whose key already has one of their dtype, the output to copy from.
        let mut received: Vec<NDArray> = Vec::new();
        let mut received_keys = Vec::new();
        let mut plan: Vec<Plan> = Vec::with_capacity(outs.len());
        for (i, (key, out)) in outs.keys().iter().zip(outs.outs()).enumerate() {
            if out.device().is_none() {
                plan.push(Plan::Host);
                continue;
            }
            let first = (0..i).find(|&j| {
                outs.keys()[j] == *key
                    && matches!(plan[j], Plan::Received(_))
                    && outs.outs()[j].dtype() == out.dtype()
            });
            match first {
                Some(j) => plan.push(Plan::CopyOf(j)),
                None => {
                    plan.push(Plan::Received(received.len()));
                    received.push(NDArray::zeros(out.shape(), out.dtype()));
                    received_keys.push(key.clone());
                }
            }
        }
        for (out, p) in outs.outs_mut().iter_mut().zip(&plan) {
            if !matches!(p, Plan::Host) {
                out.device_mut().map_err(device_copy)?;
            }
        }
        let out_keys = outs.keys().to_vec();
        let result = {
            let mut keys = Vec::with_capacity(outs.len());
            let mut staged: Vec<&mut NDArray> = Vec::with_capacity(outs.len());
            let mut spare = received.iter_mut();
            let mut received_keys = received_keys.iter();
            for ((key, out), p) in out_keys.iter().zip(outs.outs_mut()).zip(&plan) {
                match p {
                    Plan::Host => {
                        keys.push(key.clone());
                        staged.push(&mut **out);
                    }
                    Plan::Received(_) => {
                        keys.push(received_keys.next().expect("one per stand-in").clone());
                        staged.push(spare.next().expect("one per stand-in"));
                    }
                    Plan::CopyOf(_) => {}
                }
            }
            call(&mut KeyedOuts::new(operation, keys, staged)?)?
        };
        let outs = outs.outs_mut();
        for i in 0..outs.len() {
            match plan[i] {
                Plan::Host => {}
                Plan::Received(r) => outs[i].assign(&received[r]).map_err(device_copy)?,
                Plan::CopyOf(j) => {
                    let (head, tail) = outs.split_at_mut(i);
                    tail[0].assign(head[j]).map_err(device_copy)?;
                }
            }
        }
        Ok(result)
    }
}

/// Where an output's result comes from.
enum Plan {
    /// A host output: written by the call itself.
    Host,
    /// The first GPU output of its key and dtype: from the host stand-in of this index.
    Received(usize),
    /// Another GPU output of the key: from the GPU output of this index.
    CopyOf(usize),
}

fn device_copy(e: Error) -> Error {
    match e {
        Error::Device(m) => Error::Device(format!("writing a pulled value to the GPU: {m}")),
        e => e,
    }
}
