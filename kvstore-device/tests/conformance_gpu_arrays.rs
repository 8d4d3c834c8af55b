//! The conformance suite on the `device` store with its float32 arrays handed over in GPU
//! memory (`tests/gpu/on_gpu.rs`): the GPU path through `KVStoreBase`, on a real GPU. Without
//! a GPU every check is reported ignored with the reason; `tests/gpu_emulated.rs` runs the
//! same on emulated GPUs.

#[path = "gpu/on_gpu.rs"]
mod on_gpu;

use kvstore_device::probe;
use libtest_mimic::Arguments;

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let gpus = probe()
        .map(|info| info.devices.len())
        .map_err(|e| e.to_string());
    let trials = on_gpu::device_trials("device_gpu_arrays", gpus);
    libtest_mimic::run(&args, trials).exit_code()
}
