//! Bandwidth of the `device` store's GPU path, as a fraction of a device-to-device copy
//! measured in the same run:
//!
//! - the reduction of 8 GPU buffers of 64 MiB (spread over the visible GPUs; one GPU holds
//!   all 8 when it is alone), counted as 8 x 64 MiB read;
//! - one sgd (momentum) and one adam step on 256 MiB of weights (each kernel reads and
//!   writes weight and states and reads the gradient).
//!
//! Prints `no GPU: <reason>` and exits 0 without a GPU.
//!
//! `cargo run --release -p kvstore-device --example gpu_bandwidth`

use std::time::Instant;

use kvstore_base::{KVStoreBase, NDArray, OptimizerSpec, Result};
use kvstore_device::{probe, DeviceArray, DeviceStore, Engine};
use kvstore_local::reduce::ReduceConfig;

const MIB: usize = 1 << 20;

fn best_of(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up: placement, buffers, kernel load
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> Result<()> {
    let info = match probe() {
        Ok(info) => info,
        Err(e) => {
            println!("no GPU: {e}");
            return Ok(());
        }
    };
    let ngpu = info.devices.len();
    println!(
        "{ngpu} GPU(s): {}",
        info.devices
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Reference: a 256 MiB copy on gpu(0) (read + write = 512 MiB moved).
    let n_copy = 256 * MIB / 4;
    let src = DeviceArray::zeros(&[n_copy], 0)?;
    let mut dst = DeviceArray::zeros(&[n_copy], 0)?;
    let t_copy = best_of(10, || {
        dst.copy_from(&src)?;
        dst.to_host().map(drop) // waits; includes a D2H of 256 MiB, subtracted below
    })?;
    let t_d2h = best_of(5, || dst.to_host().map(drop))?;
    let copy_gbs = (2 * 256 * MIB) as f64 / (t_copy - t_d2h).max(1e-9) / 1e9;
    println!("device-to-device copy: {copy_gbs:.1} GB/s (read + write)");

    // Reduction: 8 buffers of 64 MiB.
    let n = 64 * MIB / 4;
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    store.init_gpu("g", &NDArray::zeros(&[n], kvstore_base::DType::F32))?;
    let values: Vec<DeviceArray> = (0..8)
        .map(|i| DeviceArray::zeros(&[n], info.devices[i % ngpu].ordinal))
        .collect::<Result<_>>()?;
    let refs: Vec<&DeviceArray> = values.iter().collect();
    let t = best_of(10, || store.push_gpu("g", &refs))?;
    let gbs = (8 * 64 * MIB) as f64 / t / 1e9;
    println!(
        "reduce 8 x 64 MiB: {:.2} ms, {gbs:.1} GB/s read = {:.2} of the copy",
        t * 1e3,
        gbs / copy_gbs
    );

    // Optimizers on 256 MiB.
    for spec in [
        OptimizerSpec::new("sgd").with("momentum", 0.9),
        OptimizerSpec::new("adam"),
    ] {
        let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
        store.init_gpu("w", &NDArray::zeros(&[n_copy], kvstore_base::DType::F32))?;
        store.set_optimizer(&spec)?;
        let grad = DeviceArray::zeros(&[n_copy], 0)?;
        let t = best_of(10, || store.push_gpu("w", &[&grad]))?;
        // A push of one value copies it to the merge buffer (read + write), then the kernel
        // reads grad, weight and states and writes weight and states.
        let states = if spec.name == "adam" { 2 } else { 1 };
        let moved = (2 + 1 + 2 * (1 + states)) * 256 * MIB;
        let gbs = moved as f64 / t / 1e9;
        println!(
            "{} on 256 MiB: {:.2} ms, {gbs:.1} GB/s moved = {:.2} of the copy",
            spec.name,
            t * 1e3,
            gbs / copy_gbs
        );
    }
    Ok(())
}
