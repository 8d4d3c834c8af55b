//! Arrays in device (GPU) memory on a worker, for the stores whose name holds `device`
//! (`dist_device_sync`, as MXNet picks its device communicator by that word).
//!
//! As MXNet's `CommDevice` under `KVStoreDist`: a push sums a key's GPU values on a GPU first
//! ([`kvstore_base::HostSums`], through the linked device backend), so one array per key is
//! copied to the host and sent instead of every value; a pull receives each key once into
//! host memory, copies it to one of the key's GPU outputs and from there to the others, GPU
//! to GPU ([`kvstore_base::with_outs_fanned_out`]). Values and outputs in host memory are
//! used as they are; a backend that does not sum on its devices, or a key with host and GPU
//! values mixed, is summed on the host as `dist_sync` does. Pushed values and pulled outputs
//! are checked against their keys before any copy (init and broadcast values are copied to
//! the host first, then checked by the host path).

use kvstore_base::{with_in_place_sums_on_host, KeyedOuts, Result};

use super::DistStore;

impl DistStore {
    /// An in-place pushpull with arrays in GPU memory: each key's values summed (on a GPU)
    /// into host arrays of their own, then the results written over them as a pushpull's
    /// outputs.
    pub(super) fn pushpull_in_place_on_devices(
        &self,
        values: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        let operation = "pushpull";
        with_in_place_sums_on_host(
            &self.name,
            operation,
            values,
            |view| self.check_values(operation, view),
            |sums, outs| self.push_keys(operation, sums, Some(outs), priority),
        )
    }
}
