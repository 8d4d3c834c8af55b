//! The GPU checks of `tests/gpu/cases.rs` and the conformance suite of the `nccl` store, run
//! on any machine against an emulated CUDA driver, NCCL and (where no real one is found) NVRTC:
//! `tests/emulated_driver/driver.cpp`, with the crate's kernels compiled in as C++.
//!
//! This runs the host side of the GPU code (the stores' reduction, optimizer, compression,
//! row-sparse, batch and NCCL paths, cudarc's streams, events and frees) for real: every
//! stream is a queue that runs only when something waits for it, so work that is not ordered
//! after what it reads sees stale data; every copy and kernel argument is checked against the
//! live allocations and its GPU; freed and new memory is poisoned; NCCL collectives must be
//! joined by every rank with the same arguments. A fault aborts the run with the driver's
//! message. It does not stand in for a GPU: timing, memory bandwidth, real concurrency and
//! NVRTC's code generation are only checked by `tests/gpu.rs` on one.
//!
//! The binary builds the driver (with `$CXX`, else `c++`; without one every check is ignored
//! with the reason) and runs itself twice with the driver first on `LD_LIBRARY_PATH`: with one
//! emulated GPU (several buffers on it stand in for several devices) and with three (peer
//! copies, NCCL across GPUs, peer access; every grid's threads run last to first, so a kernel
//! whose threads depend on each other's order shows; the last GPU has no peer access; the
//! driver refuses machine code, so the kernels are loaded as PTX). Check
//! names start with `emulated_1gpu::` or `emulated_3gpu::`. Checks a GPU cannot run are in
//! `faults::` (`tests/emulated_driver/faults.rs`): the GPU out of memory at each allocation
//! of a push or a row-sparse pull in turn, which must change nothing.
//!
//! With `KVSTORE_EMULATED_DRIVER_DIR=<folder>` the driver is built into that folder and left
//! there, to run any program on emulated GPUs:
//! `LD_LIBRARY_PATH=<folder> KVSTORE_EMULATED_GPUS=2 cargo run -p kvstore-device --example
//! gpu_bandwidth` (with `KVSTORE_GPU_BANDWIDTH_UNIT=4096` to shrink its arrays).

#[path = "gpu/cases.rs"]
mod cases;
#[path = "emulated_driver/copies.rs"]
mod copies;
#[path = "emulated_driver/mod.rs"]
mod emulated_driver;
#[allow(dead_code)]
#[path = "kernel_source/emulator.rs"]
mod emulator;
#[path = "emulated_driver/faults.rs"]
mod faults;
#[path = "gpu/on_gpu.rs"]
mod on_gpu;

use std::process::{Command, ExitCode};
use std::sync::Arc;

use kvstore_device as _; // links the crate, whose registration provides `nccl`
use kvstore_device::probe;
use libtest_mimic::{Arguments, Trial};

/// Set in the runs under the emulated driver: the number of emulated GPUs.
const CHILD: &str = "KVSTORE_EMULATED_GPUS";

/// The GPU counts the checks run with.
const GPU_COUNTS: [usize; 2] = [1, 3];

/// Every check of one run with `gpus` emulated GPUs, named `emulated_<gpus>gpu::...`.
fn trials(gpus: usize) -> Vec<Trial> {
    let prefix = format!("emulated_{gpus}gpu");
    let info = probe().map_err(|e| e.to_string()).and_then(|info| {
        match info
            .devices
            .iter()
            .find(|d| !d.name.starts_with("Emulated GPU"))
        {
            Some(d) => Err(format!(
                "a real GPU was found instead of the emulated driver: {}",
                d.name
            )),
            None if info.devices.len() != gpus => Err(format!(
                "{} GPU(s) found, {gpus} emulated",
                info.devices.len()
            )),
            None => Ok(info),
        }
    });
    let mut trials: Vec<Trial> = cases::TESTS
        .iter()
        .map(|&(name, _, run)| {
            let info = info.clone();
            Trial::test(format!("{prefix}::{name}"), move || match &info {
                Ok(i) => run(i),
                Err(e) => Err(cases::fail(e)),
            })
        })
        .collect();
    trials.extend(kvstore_test::trials(
        &format!("{prefix}::conformance_nccl"),
        Arc::new(|| kvstore_base::create("nccl")),
    ));
    // The suite again on `device`, its float32 arrays handed to the store in GPU memory. (Not
    // on `nccl`: its one value per GPU of one fixed set, MXNet's rule, does not fit the
    // suite's several values per key on few GPUs; `tests/gpu/cases.rs` covers its GPU path.)
    trials.extend(on_gpu::device_trials(
        &format!("{prefix}::conformance_device_gpu_arrays"),
        Ok(gpus),
    ));
    trials.extend(faults::trials(&prefix));
    trials.extend(copies::trials(&prefix));
    trials.push(Trial::test(
        format!("{prefix}::kernels_load_as_machine_code_else_as_ptx"),
        kernels_load_as_machine_code_else_as_ptx,
    ));
    trials
}

/// Every GPU's kernels are its architecture's machine code, or PTX where the driver refuses
/// machine code (the run with several GPUs sets `KVSTORE_EMULATED_REJECT_CUBIN`, so every
/// other check of that run goes through the PTX fallback).
fn kernels_load_as_machine_code_else_as_ptx() -> Result<(), libtest_mimic::Failed> {
    let runtime = kvstore_device::gpu::Runtime::get()?;
    let expected = match std::env::var("KVSTORE_EMULATED_REJECT_CUBIN").as_deref() {
        Ok("1") => "PTX",
        _ => "sm_90 machine code",
    };
    for ordinal in 0..runtime.len() {
        let loaded_as = runtime.gpu(ordinal)?.kernels_loaded_as();
        if loaded_as != expected {
            return Err(
                format!("gpu({ordinal}): kernels loaded as {loaded_as}, not {expected}").into(),
            );
        }
    }
    Ok(())
}

/// The checks, all ignored with `reason` (or all failing with it when `fail` is set), for a
/// machine where the driver cannot be built.
fn unavailable(reason: &str, fail: bool) -> Vec<Trial> {
    GPU_COUNTS
        .iter()
        .flat_map(|gpus| {
            cases::TESTS
                .iter()
                .map(move |&(name, _, _)| format!("emulated_{gpus}gpu::{name}"))
        })
        .map(|name| {
            let reason = reason.to_string();
            if fail {
                Trial::test(name, move || Err(reason.into()))
            } else {
                Trial::test(name, || Ok(()))
                    .with_kind(reason)
                    .with_ignored_flag(true)
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    if let Some(gpus) = std::env::var(CHILD).ok().and_then(|n| n.parse().ok()) {
        return libtest_mimic::run(&args, trials(gpus)).exit_code();
    }
    let dir = match emulated_driver::build() {
        Ok(dir) => dir,
        Err(Ok(reason)) => {
            return libtest_mimic::run(&args, unavailable(&reason, false)).exit_code()
        }
        Err(Err(log)) => return libtest_mimic::run(&args, unavailable(&log, true)).exit_code(),
    };
    let library_path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(rest) if !rest.is_empty() => format!("{}:{rest}", dir.display()),
        _ => dir.display().to_string(),
    };
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut failed = Vec::new();
    for gpus in GPU_COUNTS {
        println!("\nchecks against the emulated driver with {gpus} GPU(s):");
        let status = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env(CHILD, gpus.to_string())
            // The run on several GPUs also runs every grid's threads last to first.
            .env("KVSTORE_EMULATED_REVERSE", if gpus > 1 { "1" } else { "0" })
            // ... and its last GPU has no peer access (a GPU across a slow link).
            .env("KVSTORE_EMULATED_NO_PEER_ACCESS", (gpus - 1).to_string())
            // ... and its driver refuses machine code: the kernels are loaded as PTX.
            .env(
                "KVSTORE_EMULATED_REJECT_CUBIN",
                if gpus > 1 { "1" } else { "0" },
            )
            .env("LD_LIBRARY_PATH", &library_path)
            .env_remove("KVSTORE_DEVICE_DISABLE")
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) if s.code().is_none() => failed.push(format!(
                "the run with {gpus} emulated GPU(s) was killed ({s}): a fault the emulated \
                 driver found aborts the run; add `-- --test-threads=1` to see during which check"
            )),
            Ok(s) => failed.push(format!("the run with {gpus} emulated GPU(s) failed ({s})")),
            Err(e) => failed.push(format!(
                "the run with {gpus} emulated GPU(s) did not start: {e}"
            )),
        }
    }
    match std::env::var_os(emulated_driver::KEEP) {
        Some(_) => println!("the emulated driver is left in {}", dir.display()),
        None => {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("{}", failed.join("\n"));
        ExitCode::FAILURE
    }
}
