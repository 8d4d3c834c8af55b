//! Checks of the CUDA kernel source that need no GPU:
//!
//! - `nvrtc::*`: every kernel ([`kvstore_device::gpu::kernel_source`]) compiles with NVRTC,
//!   with the options the runtime uses, and the PTX has every entry point, no fused
//!   multiply-add and no local memory (no spills, no arrays on the stack); the machine code
//!   for sm_90 and sm_80 names every entry point. Needs `libnvrtc`
//!   on the loader path (it is ignored, with the reason, otherwise); no driver, no GPU.
//! - `emulated::*`: the kernels compiled as C++ by the host's compiler (`$CXX`, else `c++`;
//!   ignored with the reason when there is none), with definitions of CUDA's thread indices
//!   and `float4`, and run over every block and thread of a small grid, one after the other
//!   (each thread's work is independent of the others'), for lengths around the vector and
//!   word sizes, aligned buffers (the `float4` paths) and misaligned ones (the scalar paths),
//!   grids smaller than the work (the grid-stride loops) and larger, and special values (NaN,
//!   infinities, signed zeros, denormals, huge values). Compiled with `-ffp-contract=off`, as
//!   NVRTC with `--fmad=false`. Every output must equal the CPU's bit for bit (two NaNs count
//!   as equal):
//!   - the compression kernels ([`COMPRESSION_KERNELS`](kvstore_device::gpu_codec::COMPRESSION_KERNELS)):
//!     residuals, packed words and dequantised values against
//!     [`kvstore_compression::Codec`], over several rounds (the residual carried), at
//!     several thresholds (`kernel_source/codec.rs`);
//!   - the row kernels ([`ROW_KERNELS`](kvstore_device::sparse::ROW_KERNELS)): the gather
//!     of a row-sparse pull against `NDArray::retain_rows`, the scatter of a row-sparse push
//!     against a push of the same values to `local` (`kernel_source/rows.rs`);
//!   - the reduction kernel, launched as [`sum_launches`](kvstore_device::gpu::sum_launches)
//!     plans it, against a push of 1 to 20 values to the `local` store, and the `sgd` and
//!     `adam` kernels against `local` with the same optimizer over several steps
//!     (`kernel_source/math.rs`).
//!
//! This checks the kernels' logic and arithmetic, not the GPU: the GPU run is in
//! `tests/gpu.rs`.

#[path = "kernel_source/codec.rs"]
mod codec;
#[path = "kernel_source/emulator.rs"]
mod emulator;
#[path = "kernel_source/math.rs"]
mod math;
#[path = "kernel_source/rows.rs"]
mod rows;

use std::path::{Path, PathBuf};

use kvstore_device::gpu::{compile_kernels, compile_kernels_for, kernel_source};
use kvstore_device::gpu_codec::COMPRESSION_KERNELS;
use libtest_mimic::{Arguments, Failed, Trial};

/// A check that runs `check` on a built emulator: ignored with the reason when there is no
/// compiler, failed with the compiler's log when the source does not compile.
fn emulated_trial(
    name: String,
    built: &Result<PathBuf, Result<String, String>>,
    check: impl FnOnce(&Path) -> Result<(), Failed> + Send + 'static,
) -> Trial {
    let built = built.clone();
    let ignored = match &built {
        Err(Ok(reason)) => Some(reason.clone()),
        _ => None,
    };
    let trial = Trial::test(name, move || match &built {
        Ok(exe) => check(exe),
        Err(Ok(reason)) => Err(reason.clone().into()),
        Err(Err(log)) => Err(log.clone().into()),
    });
    match ignored {
        Some(reason) => trial.with_kind(reason).with_ignored_flag(true),
        None => trial,
    }
}

/// NVRTC compiles every kernel, and the PTX has every entry point and no fused multiply-add.
fn nvrtc_compiles() -> Result<(), Failed> {
    let ptx = compile_kernels()?;
    for entry in ENTRIES {
        if !ptx.contains(&format!(".entry {entry}(")) {
            return Err(format!("the PTX has no entry {entry}").into());
        }
    }
    // No fused multiply-add anywhere: each operation rounds as on the CPU.
    if ptx.contains("fma.") {
        return Err("the PTX contains fma instructions".into());
    }
    // No local memory: a spill or an array on the stack would cost memory bandwidth.
    if ptx.contains(".local") {
        return Err("the PTX uses local memory".into());
    }
    Ok(())
}

/// The kernel entry points.
const ENTRIES: [&str; 11] = [
    "sum_sources",
    "gather_rows",
    "scatter_rows",
    "sgd_rows_update",
    "adam_rows_update",
    "sgd_update",
    "adam_update",
    "quantize_2bit",
    "quantize_1bit",
    "dequantize_2bit",
    "dequantize_1bit",
];

/// NVRTC compiles every kernel to machine code for an H100/H200 (sm_90) and an A100 (sm_80),
/// as the runtime loads them: an ELF whose string table names every entry point.
fn nvrtc_compiles_machine_code() -> Result<(), Failed> {
    for capability in [(9, 0), (8, 0)] {
        let cubin = compile_kernels_for(capability)?;
        if !cubin.starts_with(b"\x7fELF") {
            return Err(format!(
                "the sm_{}{} image is not an ELF",
                capability.0, capability.1
            )
            .into());
        }
        for entry in ENTRIES {
            let name = format!("\0{entry}\0");
            if !cubin.windows(name.len()).any(|w| w == name.as_bytes()) {
                return Err(format!(
                    "the sm_{}{} cubin has no {entry}",
                    capability.0, capability.1
                )
                .into());
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let mut trials = Vec::new();

    assert!(kernel_source().contains(COMPRESSION_KERNELS));
    let nvrtc = compile_kernels().err().map(|e| e.to_string());
    let nvrtc_missing = nvrtc.as_deref().filter(|e| e.contains("no NVRTC"));
    for trial in [
        Trial::test("nvrtc::every_kernel_compiles_without_fma", nvrtc_compiles),
        Trial::test(
            "nvrtc::every_kernel_compiles_to_machine_code",
            nvrtc_compiles_machine_code,
        ),
    ] {
        trials.push(match nvrtc_missing {
            Some(reason) => trial.with_kind(reason.to_string()).with_ignored_flag(true),
            None => trial,
        });
    }

    trials.extend(codec::trials());
    trials.extend(math::trials());
    trials.extend(rows::trials());
    libtest_mimic::run(&args, trials).exit_code()
}
