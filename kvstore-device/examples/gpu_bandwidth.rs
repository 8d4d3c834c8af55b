//! Bandwidth of the `device` store's GPU path, as a fraction of a device-to-device copy
//! measured in the same run (the ceiling: `cuMemcpyDtoD` of 256 MiB, read + write counted).
//! Every figure counts the bytes the GPU must read and write, and is the best of several
//! rounds:
//!
//! - the reduction of 8 buffers of 64 MiB: the kernel alone ([`DeviceArray::sum_from`], on
//!   gpu(0), timed with CUDA events) and a whole `push_gpu` call (wall clock, launch and wait
//!   included; the buffers spread over the visible GPUs, all on one when it is alone): 8 x 64
//!   MiB read, 64 MiB written into the stored value;
//! - one sgd (momentum) and one adam step on 256 MiB of weights through `push_gpu` (wall
//!   clock): the gradient read, the weight and the states read and written;
//! - one lazy sgd (momentum) and one lazy adam step through `push_gpu_row_sparse` on an
//!   embedding of 256 MiB (rows of 64 float32) storing every row, with a gradient of 1 % of
//!   its rows (spread over the table): the gradient's rows read, those rows of the weight and
//!   the states read and written (wall clock, against the dense step on 256 MiB above);
//! - 256 keys of 256 KiB pushed one call per key and as one `push_gpu_batch`;
//! - gradient compression on 256 MiB of float32, the kernels alone (CUDA events): 2-bit and
//!   1-bit quantisation and dequantisation, as GB/s of float32 input (256 MiB / time);
//! - a push of 8 x 64 MiB with 2-bit compression (each value quantised on its GPU, the codes
//!   copied to the merge GPU, dequantised and summed there), as GB/s of float32 input;
//! - 64 MiB copied from a GPU to the host and back through `NDArray::to_context` (staged
//!   through the GPU's page-locked buffer), beside one copy into page-locked memory (the
//!   bound);
//! - a pushpull of 4 x 64 MiB on `dist_sync` (each value and output staged through the host)
//!   and on `dist_device_sync` (summed on a GPU, one array per key each way), one worker and
//!   one server in this process: with values and outputs in host memory (the network's
//!   part), then in GPU memory.
//!
//! Prints `no GPU: <reason>` and exits 0 without a GPU. `KVSTORE_GPU_BANDWIDTH_UNIT=<bytes>`
//! (default 1048576) replaces the MiB of every size above, for a quick run on a small GPU or
//! on the emulated driver of the crate's tests (whose figures mean nothing).
//!
//! `cargo run --release -p kvstore-device --example gpu_bandwidth`

use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use kvstore_base::{
    CompressionParams, DType, Error, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec, Result,
};
use kvstore_compression::Codec;
use kvstore_device::gpu::Runtime;
use kvstore_device::{gpu_codec, probe, DeviceArray, DeviceStore, Engine, PackedArray};
use kvstore_local::reduce::ReduceConfig;

const ROUNDS: usize = 5;

/// The unit of every size: a MiB, unless `KVSTORE_GPU_BANDWIDTH_UNIT` gives another number of
/// bytes (a multiple of 64, so that the arrays keep whole codec words).
fn unit() -> Result<usize> {
    match std::env::var("KVSTORE_GPU_BANDWIDTH_UNIT") {
        Err(_) => Ok(1 << 20),
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 && n % 64 == 0 => Ok(n),
            _ => Err(Error::InvalidArgument(format!(
                "KVSTORE_GPU_BANDWIDTH_UNIT={v}: expected a positive multiple of 64 bytes"
            ))),
        },
    }
}

/// Seconds per call of `f` (which only queues work on gpu(0)), timed on the GPU with CUDA
/// events around `reps` calls; the best of [`ROUNDS`] rounds after a warm-up.
fn gpu_time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let cuda = |e: cudarc::driver::DriverError| Error::Device(format!("CUDA event: {e}"));
    let stream = &Runtime::get()?.gpu(0)?.stream;
    f()?;
    stream.synchronize().map_err(cuda)?;
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let start = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda)?;
        for _ in 0..reps {
            f()?;
        }
        let end = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda)?;
        let ms = start.elapsed_ms(&end).map_err(cuda)?;
        best = best.min(f64::from(ms) / 1e3 / reps as f64);
    }
    Ok(best)
}

/// Seconds of one call of `f` (which waits for its work), wall clock: the best of `reps`
/// after a warm-up (placement, buffers).
fn wall_time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// `bytes` moved in `secs`, in GB/s.
fn gbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() -> Result<()> {
    let info = match probe() {
        Ok(info) => info,
        Err(e) => {
            println!("no GPU: {e}");
            return Ok(());
        }
    };
    let mib = unit()?;
    if mib != 1 << 20 {
        println!("(every \"MiB\" below is {mib} bytes: KVSTORE_GPU_BANDWIDTH_UNIT)");
    }
    let ngpu = info.devices.len();
    println!(
        "{ngpu} GPU(s): {}",
        info.devices
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let runtime = kvstore_device::gpu::Runtime::get()?;
    println!(
        "kernels loaded as {} (NVRTC {})",
        runtime.gpu(0)?.kernels_loaded_as(),
        kvstore_device::gpu::nvrtc_version()
            .map_or("version unknown".into(), |(major, minor)| format!(
                "{major}.{minor}"
            ))
    );

    // The ceiling: a 256 MiB copy on gpu(0) (read + write = 512 MiB moved).
    let n_copy = 256 * mib / 4;
    let src = DeviceArray::zeros(&[n_copy], 0)?;
    let mut dst = DeviceArray::zeros(&[n_copy], 0)?;
    let t_copy = gpu_time(20, || dst.copy_from(&src))?;
    let copy_gbs = gbs(2 * 256 * mib, t_copy);
    println!(
        "device-to-device copy of 256 MiB: {:.3} ms, {copy_gbs:.0} GB/s (read + write)",
        t_copy * 1e3
    );
    let report = |what: &str, secs: f64, bytes: usize| {
        let rate = gbs(bytes, secs);
        println!(
            "{what}: {:.3} ms, {rate:.0} GB/s = {:.0} % of the copy",
            secs * 1e3,
            100.0 * rate / copy_gbs
        );
    };

    // Reduction: 8 buffers of 64 MiB (8 read, 1 written).
    let n = 64 * mib / 4;
    let moved = 9 * 64 * mib;
    let on_gpu0: Vec<DeviceArray> = (0..8)
        .map(|_| DeviceArray::zeros(&[n], 0))
        .collect::<Result<_>>()?;
    let refs0: Vec<&DeviceArray> = on_gpu0.iter().collect();
    let mut sum = DeviceArray::zeros(&[n], 0)?;
    let t = gpu_time(10, || sum.sum_from(&refs0))?;
    report("reduce 8 x 64 MiB, kernel", t, moved);
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    store.init_gpu("g", &NDArray::zeros(&[n], DType::F32))?;
    let values: Vec<DeviceArray> = (0..8)
        .map(|i| DeviceArray::zeros(&[n], info.devices[i % ngpu].ordinal))
        .collect::<Result<_>>()?;
    let refs: Vec<&DeviceArray> = values.iter().collect();
    let t = wall_time(20, || store.push_gpu("g", &refs))?;
    report(
        &format!("reduce 8 x 64 MiB, push_gpu on {ngpu} GPU(s)"),
        t,
        moved,
    );

    // Optimizers on 256 MiB: one value, which is the gradient as it is.
    for spec in [
        OptimizerSpec::new("sgd").with("momentum", 0.9),
        OptimizerSpec::new("adam"),
    ] {
        let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
        store.init_gpu("w", &NDArray::zeros(&[n_copy], DType::F32))?;
        store.set_optimizer(&spec)?;
        let grad = DeviceArray::zeros(&[n_copy], 0)?;
        let t = wall_time(20, || store.push_gpu("w", &[&grad]))?;
        // The gradient read; the weight and the states read and written.
        let states = if spec.name == "adam" { 2 } else { 1 };
        let moved = (1 + 2 * (1 + states)) * 256 * mib;
        report(&format!("{} on 256 MiB, push_gpu", spec.name), t, moved);
    }

    // Lazy row steps on an embedding of 256 MiB storing every row, 1 % of its rows pushed.
    let row_len = 64;
    let rows = n_copy / row_len;
    let picked: Vec<i64> = (0..rows as i64).step_by(100).collect();
    let table = NDArray::zeros(&[rows, row_len], DType::F32);
    let every_row = NDArray::row_sparse_from(&[rows, row_len], (0..rows as i64).collect(), table)?;
    let grad_rows = NDArray::full(&[picked.len(), row_len], 0.5, DType::F32);
    let grad = NDArray::row_sparse(&[rows, row_len], picked.clone(), &grad_rows)?;
    let grad = kvstore_device::DeviceRowSparse::from_host(&grad, 0)?;
    for spec in [
        OptimizerSpec::new("sgd").with("momentum", 0.9),
        OptimizerSpec::new("adam"),
    ] {
        let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
        store.init_gpu("e", &every_row)?;
        store.set_optimizer(&spec)?;
        let t = wall_time(20, || store.push_gpu_row_sparse("e", &[&grad]))?;
        let states = if spec.name == "adam" { 2 } else { 1 };
        let moved = (1 + 2 * (1 + states)) * picked.len() * row_len * 4;
        report(
            &format!(
                "lazy {} on 1 % of the rows of a 256 MiB embedding ({} of {rows} rows), \
                 push_gpu_row_sparse",
                spec.name,
                picked.len()
            ),
            t,
            moved,
        );
    }

    // Many small keys: 256 keys of 256 KiB, 2 values each, one call per key against one
    // batch (one wait per GPU instead of one per key).
    let (keys, small) = (256usize, mib / 16);
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    for k in 0..keys {
        store.init_gpu(k as i64, &NDArray::zeros(&[small], DType::F32))?;
    }
    let grads: Vec<[DeviceArray; 2]> = (0..keys)
        .map(|_| {
            Ok([
                DeviceArray::zeros(&[small], 0)?,
                DeviceArray::zeros(&[small], 0)?,
            ])
        })
        .collect::<Result<_>>()?;
    let grad_refs: Vec<[&DeviceArray; 2]> = grads.iter().map(|[a, b]| [a, b]).collect();
    let t_each = wall_time(5, || {
        for (k, g) in grad_refs.iter().enumerate() {
            store.push_gpu(k as i64, g)?;
        }
        Ok(())
    })?;
    let batch: Vec<(kvstore_base::Key, &[&DeviceArray])> = grad_refs
        .iter()
        .enumerate()
        .map(|(k, g)| ((k as i64).into(), &g[..]))
        .collect();
    let t_batch = wall_time(5, || store.push_gpu_batch(&batch))?;
    println!(
        "{keys} keys of 256 KiB, 2 values each: {:.3} ms as one push_gpu per key, {:.3} ms as \
         one push_gpu_batch ({:.1} us per key)",
        t_each * 1e3,
        t_batch * 1e3,
        t_batch * 1e6 / keys as f64
    );

    // Gradient compression on 256 MiB: the codec kernels alone.
    let pattern: Vec<f32> = (0..n_copy)
        .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 512.0)
        .collect();
    let grad = DeviceArray::from_host(&NDArray::from_vec(&[n_copy], pattern)?, 0)?;
    for codec in [Codec::two_bit(0.5), Codec::one_bit(0.0)] {
        let mut residual = DeviceArray::zeros(&[n_copy], 0)?;
        let mut packed = PackedArray::zeros(&codec, n_copy, 0)?;
        let mut out = DeviceArray::zeros(&[n_copy], 0)?;
        let tq = gpu_time(10, || {
            gpu_codec::quantize(&codec, &grad, &mut residual, &mut packed)
        })?;
        let td = gpu_time(10, || gpu_codec::dequantize(&codec, &packed, &mut out))?;
        println!(
            "{} on 256 MiB: quantise {:.3} ms = {:.0} GB/s of float32 input, dequantise \
             {:.3} ms = {:.0} GB/s of float32 output",
            codec.kind(),
            tq * 1e3,
            gbs(256 * mib, tq),
            td * 1e3,
            gbs(256 * mib, td)
        );
    }

    // A compressed push of 8 x 64 MiB through the store.
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    store.init_gpu("g", &NDArray::zeros(&[n], DType::F32))?;
    store.set_gradient_compression(&CompressionParams::from([(
        "type".to_string(),
        "2bit".to_string(),
    )]))?;
    let t = wall_time(10, || store.push_gpu("g", &refs))?;
    println!(
        "push 8 x 64 MiB with 2-bit compression: {:.3} ms, {:.0} GB/s of float32 input",
        t * 1e3,
        gbs(8 * 64 * mib, t)
    );

    // dist_device_sync beside dist_sync, values and outputs in GPU memory: one worker, one
    // server, both in this process.
    let values = (0..4)
        .map(|i| {
            NDArray::full(&[n], 1.0, DType::F32)
                .to_context(kvstore_base::Context::Gpu(info.devices[i % ngpu].ordinal))
        })
        .collect::<Result<Vec<_>>>()?;
    // What staging through the host costs: 64 MiB each way through `NDArray::to_context`
    // (pageable host memory, as the dist stores stage GPU values), beside raw copies into
    // page-locked host memory (the bound), and the same pushpull with host values.
    let t_down = wall_time(5, || {
        values[0].to_context(kvstore_base::Context::Cpu).map(drop)
    })?;
    let on_host = values[0].to_context(kvstore_base::Context::Cpu)?;
    let t_up = wall_time(5, || {
        on_host.to_context(kvstore_base::Context::Gpu(0)).map(drop)
    })?;
    let cuda = |e: cudarc::driver::DriverError| Error::Device(format!("pinned copy: {e}"));
    let stream = &runtime.gpu(0)?.stream;
    let device_buffer = stream.alloc_zeros::<f32>(n).map_err(cuda)?;
    // SAFETY: page-locked memory for plain float32 copies; no flags (read by the CPU).
    let mut pinned =
        unsafe { stream.context().alloc_pinned_with_flags::<f32>(n, 0) }.map_err(cuda)?;
    let t_pinned = wall_time(5, || {
        stream
            .memcpy_dtoh(&device_buffer, &mut pinned)
            .map_err(cuda)?;
        stream.synchronize().map_err(cuda)
    })?;
    println!(
        "64 MiB GPU -> host: to_context {:.3} ms ({:.1} GB/s), into page-locked memory {:.3} ms \
         ({:.1} GB/s); host -> GPU: to_context {:.3} ms ({:.1} GB/s)",
        t_down * 1e3,
        gbs(64 * mib, t_down),
        t_pinned * 1e3,
        gbs(64 * mib, t_pinned),
        t_up * 1e3,
        gbs(64 * mib, t_up)
    );
    let host_values: Vec<NDArray> = (0..4)
        .map(|_| NDArray::full(&[n], 1.0, DType::F32))
        .collect();
    for (memory, arrays) in [("host", &host_values), ("GPU", &values)] {
        for name in ["dist_sync", "dist_device_sync"] {
            let cluster =
                kvstore_dist::LocalCluster::start(1, 1, std::time::Duration::from_secs(60))?;
            let kv = cluster.create_worker(name)?;
            kv.init(0, &NDArray::zeros(&[n], DType::F32))?;
            let mut outs = arrays.clone();
            let t = wall_time(5, || kv.pushpull(0, &arrays[..], &mut outs[..]))?;
            println!(
                "{name}: pushpull of 4 x 64 MiB in {memory} memory into 4 {memory} outputs: \
                 {:.3} ms",
                t * 1e3
            );
            drop(kv);
            cluster.finish()?;
        }
    }
    Ok(())
}
