//! Bandwidth of the `device` store's GPU path, as a fraction of a device-to-device copy
//! measured in the same run:
//!
//! - the reduction of 8 GPU buffers of 64 MiB (spread over the visible GPUs; one GPU holds
//!   all 8 when it is alone), counted as 8 x 64 MiB read;
//! - one sgd (momentum) and one adam step on 256 MiB of weights (each kernel reads and
//!   writes weight and states and reads the gradient);
//! - gradient compression on 256 MiB of float32: 2-bit and 1-bit quantisation (reads the
//!   gradient and the residual, writes the residual and the codes) and dequantisation
//!   (reads the codes, writes 256 MiB), as GB/s of float32 input (256 MiB / time);
//! - the reduction of 8 x 64 MiB with 2-bit compression (each value quantised on its GPU,
//!   the codes copied to the merge GPU, dequantised and summed there), as GB/s of float32
//!   input (8 x 64 MiB / time).
//!
//! Prints `no GPU: <reason>` and exits 0 without a GPU.
//!
//! `cargo run --release -p kvstore-device --example gpu_bandwidth`

use std::time::Instant;

use kvstore_base::{CompressionParams, Error, KVStoreBase, NDArray, OptimizerSpec, Result};
use kvstore_compression::Codec;
use kvstore_device::gpu::Runtime;
use kvstore_device::{gpu_codec, probe, DeviceArray, DeviceStore, Engine, PackedArray};
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

    // Gradient compression on 256 MiB: the codec kernels alone.
    let sync = || -> Result<()> {
        Runtime::get()?
            .gpu(0)?
            .stream
            .synchronize()
            .map_err(|e| Error::Device(format!("synchronize: {e}")))
    };
    let pattern: Vec<f32> = (0..n_copy)
        .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 512.0)
        .collect();
    let grad = DeviceArray::from_host(&NDArray::from_vec(&[n_copy], pattern)?, 0)?;
    for codec in [Codec::two_bit(0.5), Codec::one_bit(0.0)] {
        let mut residual = DeviceArray::zeros(&[n_copy], 0)?;
        let mut packed = PackedArray::zeros(&codec, n_copy, 0)?;
        let mut out = DeviceArray::zeros(&[n_copy], 0)?;
        let tq = best_of(10, || {
            gpu_codec::quantize(&codec, &grad, &mut residual, &mut packed)?;
            sync()
        })?;
        let td = best_of(10, || {
            gpu_codec::dequantize(&codec, &packed, &mut out)?;
            sync()
        })?;
        let input = (256 * MIB) as f64;
        println!(
            "{} on 256 MiB: quantise {:.2} ms = {:.1} GB/s of float32 input, dequantise {:.2} ms \
             = {:.1} GB/s of float32 output",
            codec.kind(),
            tq * 1e3,
            input / tq / 1e9,
            td * 1e3,
            input / td / 1e9
        );
    }

    // A compressed push of 8 x 64 MiB through the store.
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    store.init_gpu("g", &NDArray::zeros(&[n], kvstore_base::DType::F32))?;
    store.set_gradient_compression(&CompressionParams::from([(
        "type".to_string(),
        "2bit".to_string(),
    )]))?;
    let t = best_of(10, || store.push_gpu("g", &refs))?;
    let gbs = (8 * 64 * MIB) as f64 / t / 1e9;
    println!(
        "reduce 8 x 64 MiB with 2-bit compression: {:.2} ms, {gbs:.1} GB/s of float32 input",
        t * 1e3
    );
    Ok(())
}
