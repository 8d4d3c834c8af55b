//! The conformance suite on the `device` store with its float32 arrays handed over in GPU
//! memory (`tests/gpu/on_gpu.rs`): the GPU path through `KVStoreBase`, on a real GPU. Without
//! a GPU every check is reported ignored with the reason; `tests/gpu_emulated.rs` runs the
//! same on emulated GPUs.

#[path = "gpu/on_gpu.rs"]
mod on_gpu;

use std::sync::Arc;

use kvstore_base::{create, Error, KVStoreBase};
use kvstore_device::probe;
use libtest_mimic::Arguments;

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let gpus = probe().map(|info| info.devices.len());
    let trials = kvstore_test::trials(
        "device_gpu_arrays",
        Arc::new(move || match &gpus {
            Ok(gpus) => {
                Ok(Box::new(on_gpu::OnGpu::new(create("device")?, *gpus)) as Box<dyn KVStoreBase>)
            }
            Err(e) => Err(Error::Device(e.to_string())),
        }),
    );
    libtest_mimic::run(&args, trials).exit_code()
}
