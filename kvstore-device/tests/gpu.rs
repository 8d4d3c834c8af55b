//! GPU tests of the `device` and `nccl` stores on a real GPU: the checks of `tests/gpu/cases.rs`
//! (GPU results compared with the `local` store on the same data; tolerances stated there).
//!
//! Every test calls [`kvstore_device::probe`] first; without a CUDA driver, a GPU or NVRTC
//! (or NCCL, for the `nccl` tests) it is reported as *ignored* with the reason, e.g.
//! `[no CUDA driver: libcuda.so.1 not found ...]` (a `libtest-mimic` harness: plain `#[test]`s
//! cannot be ignored at run time). `tests/gpu_emulated.rs` runs the same checks on any machine,
//! against an emulated driver.

#[path = "gpu/cases.rs"]
mod cases;

use kvstore_device::probe;
use libtest_mimic::{Arguments, Trial};

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let info = probe().map_err(|e| e.to_string());
    let trials = cases::TESTS
        .iter()
        .map(|&(name, needs_nccl, run)| {
            let skip = match &info {
                Err(e) => Some(e.clone()),
                Ok(i) if !i.nvrtc => Some("no NVRTC: libnvrtc not found".to_string()),
                Ok(i) if needs_nccl && !i.nccl => Some("no NCCL: libnccl not found".to_string()),
                Ok(_) => None,
            };
            let info = info.clone();
            let trial = Trial::test(name, move || match &info {
                Ok(i) => run(i),
                Err(e) => Err(cases::fail(e)),
            });
            match skip {
                Some(reason) => trial.with_kind(reason).with_ignored_flag(true),
                None => trial,
            }
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
