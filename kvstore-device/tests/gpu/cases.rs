//! The GPU checks of the `device` and `nccl` stores, shared by `tests/gpu.rs` (a real GPU)
//! and `tests/gpu_emulated.rs` (the emulated driver): GPU results compared with the `local`
//! store on the same data.
//!
//! Tolerances: sums are exact (compared with `==`: the kernel adds in the CPU store's order);
//! optimizer steps within 1e-6 relative (|gpu - cpu| <= 1e-6 * max(1, |cpu|)), although the
//! CPU emulation of the kernels (`tests/kernel_source.rs`) finds them bit-identical; row-sparse
//! pulls hold the same row numbers and values as `local`'s. Gradient compression is
//! compared bit for bit: the GPU codec with `kvstore_compression::Codec` (packed bytes,
//! residuals, dequantised values, over rounds), and compressed GPU pushes with the same pushes
//! of CPU values. With one GPU, several buffers on it stand in for several devices; with more,
//! values are spread over every GPU.

use kvstore_base::{
    create, CompressionParams, DType, KVStoreBase, KVStoreExt, Key, NDArray, OptimizerSpec,
};
use kvstore_compression::Codec;
use kvstore_device::{
    gpu_codec, DeviceArray, DeviceRowSparse, DeviceStore, Engine, GpuInfo, PackedArray,
};
use kvstore_local::reduce::ReduceConfig;
use kvstore_test as _; // links `teststore`, which some checks create by name
use libtest_mimic::Failed;

#[path = "dist.rs"]
pub mod dist;

/// What a check returns.
pub type TestResult = Result<(), Failed>;

/// A failure with `msg`.
pub fn fail(msg: impl std::fmt::Display) -> Failed {
    msg.to_string().into()
}

/// The GPU ordinal of value `i` of `n`: spread round-robin over the GPUs.
pub fn dev(info: &GpuInfo, i: usize) -> usize {
    info.devices[i % info.devices.len()].ordinal
}

/// Integer-valued data for value `i`.
pub fn data(n: usize, i: usize) -> Vec<f32> {
    (0..n)
        .map(|j| ((j * 7 + i * 13) % 31) as f32 - 15.0)
        .collect()
}

/// Small non-integer data for optimizer tests.
pub fn fdata(n: usize, i: usize) -> Vec<f32> {
    (0..n)
        .map(|j| (((j * 7 + i * 13) % 97) as f32 - 48.0) / 64.0)
        .collect()
}

pub fn host(shape: &[usize], v: Vec<f32>) -> NDArray {
    NDArray::from_vec(shape, v).expect("shape matches")
}

/// Whether every element of `gpu` is within `rel` of `cpu` (relative, absolute below 1); a NaN
/// matches only a NaN, and an infinity only itself (an emulated GPU fills fresh memory with
/// NaN, so that a read of memory never written shows here).
pub fn close(gpu: &[f32], cpu: &[f32], rel: f32, what: &str) -> TestResult {
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let near = g == c || (g - c).abs() <= rel * c.abs().max(1.0) || g.is_nan() && c.is_nan();
        if !near {
            return Err(fail(format!("{what}: element {i}: gpu {g} vs cpu {c}")));
        }
    }
    if gpu.len() != cpu.len() {
        return Err(fail(format!(
            "{what}: {} vs {} elements",
            gpu.len(),
            cpu.len()
        )));
    }
    Ok(())
}

/// Pushes `rounds` pushes of `n_values` values to one key on `store` (GPU) and on `local`
/// (CPU), with `spec` set on both when given, and compares the pulled values.
fn compare_with_local(
    info: &GpuInfo,
    engine: Engine,
    n_values: usize,
    len: usize,
    spec: Option<OptimizerSpec>,
    rounds: usize,
    rel: f32,
) -> TestResult {
    let shape = [len];
    let name = if engine == Engine::Nccl {
        "nccl"
    } else {
        "device"
    };
    let store = DeviceStore::new(name, engine, ReduceConfig::default());
    let local = create("local")?;
    let init = if spec.is_some() {
        fdata(len, 99)
    } else {
        vec![0.0; len]
    };
    store.init_gpu("w", &host(&shape, init.clone()))?;
    local.init("w", &host(&shape, init))?;
    if let Some(spec) = &spec {
        store.set_optimizer(spec)?;
        local.set_optimizer(spec)?;
    }
    for round in 0..rounds {
        let gen = if spec.is_some() { fdata } else { data };
        let hosts: Vec<NDArray> = (0..n_values)
            .map(|i| host(&shape, gen(len, i + round)))
            .collect();
        let gpus: Vec<DeviceArray> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| DeviceArray::from_host(h, dev(info, i)))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&DeviceArray> = gpus.iter().collect();
        store.push_gpu("w", &refs)?;
        local.push("w", &hosts[..])?;
    }
    let mut outs: Vec<DeviceArray> = (0..n_values.min(info.devices.len().max(2)))
        .map(|i| DeviceArray::zeros(&shape, dev(info, i)))
        .collect::<Result<_, _>>()?;
    let mut out_refs: Vec<&mut DeviceArray> = outs.iter_mut().collect();
    store.pull_gpu("w", &mut out_refs)?;
    let mut cpu = NDArray::zeros(&shape, DType::F32);
    local.pull("w", &mut cpu)?;
    let cpu = cpu.to_vec::<f32>()?;
    for (i, o) in outs.iter().enumerate() {
        let got = o.to_host()?.to_vec::<f32>()?;
        if rel == 0.0 {
            if got != cpu {
                return Err(fail(format!(
                    "output {i} differs from local: {:?} vs {:?}",
                    &got[..4.min(len)],
                    &cpu[..4.min(len)]
                )));
            }
        } else {
            close(&got, &cpu, rel, &format!("output {i}"))?;
        }
    }
    Ok(())
}

/// The values of several keys, per key: on the host, and their copies on the GPUs.
pub type KeyValues = (Vec<Vec<NDArray>>, Vec<Vec<DeviceArray>>);

/// For each key of length `lens[k]`, `count` values (`fdata` with seed `seed(k, i)`), value `i`
/// on GPU `dev(info, i)`.
pub fn key_values(
    info: &GpuInfo,
    lens: &[usize],
    count: usize,
    seed: impl Fn(usize, usize) -> usize,
) -> Result<KeyValues, Failed> {
    let hosts: Vec<Vec<NDArray>> = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..count)
                .map(|i| host(&[n], fdata(n, seed(k, i))))
                .collect()
        })
        .collect();
    let gpus = hosts
        .iter()
        .map(|hs| {
            hs.iter()
                .enumerate()
                .map(|(i, h)| DeviceArray::from_host(h, dev(info, i)))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((hosts, gpus))
}

/// One GPU check.
pub type GpuTest = fn(&GpuInfo) -> TestResult;

/// Every GPU check: its name, whether it needs NCCL, and the check.
pub const TESTS: &[(&str, bool, GpuTest)] = &[
    ("device::sum_of_one_value_is_the_value", false, |i| {
        compare_with_local(i, Engine::Device, 1, 1000, None, 1, 0.0)
    }),
    ("device::sum_of_8_values_equals_local_exactly", false, |i| {
        compare_with_local(i, Engine::Device, 8, 100_003, None, 2, 0.0)
    }),
    (
        "device::sum_of_5_values_odd_group_equals_local",
        false,
        |i| compare_with_local(i, Engine::Device, 5, 4097, None, 1, 0.0),
    ),
    ("device::sgd_momentum_steps_match_local", false, |i| {
        compare_with_local(
            i,
            Engine::Device,
            4,
            10_000,
            Some(
                OptimizerSpec::new("sgd")
                    .with("learning_rate", 0.1)
                    .with("momentum", 0.9)
                    .with("wd", 0.01)
                    .with("rescale_grad", 0.5),
            ),
            3,
            1e-6,
        )
    }),
    (
        "device::sgd_clipped_without_momentum_matches_local",
        false,
        |i| {
            compare_with_local(
                i,
                Engine::Device,
                2,
                10_000,
                Some(
                    OptimizerSpec::new("sgd")
                        .with("learning_rate", 0.1)
                        .with("clip_gradient", 0.25),
                ),
                3,
                1e-6,
            )
        },
    ),
    ("device::adam_steps_match_local", false, |i| {
        compare_with_local(
            i,
            Engine::Device,
            4,
            10_000,
            Some(
                OptimizerSpec::new("adam")
                    .with("learning_rate", 0.01)
                    .with("wd", 0.1)
                    .with("clip_gradient", 0.5),
            ),
            3,
            1e-6,
        )
    }),
    (
        "device::sum_of_12_values_two_launches_equals_local",
        false,
        |i| compare_with_local(i, Engine::Device, 12, 70_001, None, 2, 0.0),
    ),
    (
        "device::sgd_on_one_value_read_in_place_matches_local",
        false,
        |i| {
            compare_with_local(
                i,
                Engine::Device,
                1,
                10_001,
                Some(
                    OptimizerSpec::new("sgd")
                        .with("momentum", 0.9)
                        .with("wd", 0.01),
                ),
                3,
                1e-6,
            )
        },
    ),
    ("device::adam_on_9_values_matches_local", false, |i| {
        compare_with_local(
            i,
            Engine::Device,
            9,
            10_003,
            Some(OptimizerSpec::new("adam").with("learning_rate", 0.01)),
            2,
            1e-6,
        )
    }),
    (
        "device::row_sparse_push_and_pull_match_local",
        false,
        row_sparse_matches_local,
    ),
    (
        "device::row_sparse_errors_leave_the_key_as_it_was",
        false,
        row_sparse_errors,
    ),
    (
        "device::optimizers_on_row_sparse_gpu_keys_match_local",
        false,
        row_sparse_optimizers_match_local,
    ),
    (
        "device::a_row_sparse_gpu_key_storing_every_row_after_a_push_takes_an_optimizer",
        false,
        row_sparse_optimizer_after_a_full_push,
    ),
    (
        "ndarray::calls_that_skip_row_sparse_gpu_outputs_leave_them_as_they_were",
        false,
        skipped_row_sparse_gpu_outputs,
    ),
    (
        "device::row_sparse_gradients_of_a_dense_gpu_weight_match_local",
        false,
        row_sparse_gradients_of_a_dense_weight,
    ),
    (
        "device::a_custom_updater_gets_the_stored_rows_of_a_row_sparse_gpu_key",
        false,
        row_sparse_custom_updater,
    ),
    (
        "device::placement_balances_keys_across_gpus",
        false,
        placement,
    ),
    ("device::gpu_errors_leave_the_store_usable", false, errors),
    (
        "device::random_operations_match_local",
        false,
        random_operations,
    ),
    (
        "device::a_new_optimizer_starts_fresh_as_local",
        false,
        new_optimizer_starts_fresh,
    ),
    (
        "device::batch_push_and_pull_match_local",
        false,
        batch_matches_local,
    ),
    (
        "device::sum_from_equals_local_and_checks_its_inputs",
        false,
        sum_from,
    ),
    ("device::host_round_trip_is_exact", false, round_trip),
    (
        "compression::gpu_codec_2bit_matches_cpu_codec",
        false,
        |i| codec_matches_cpu(i, Codec::two_bit(0.5)),
    ),
    (
        "compression::gpu_codec_2bit_small_threshold_matches",
        false,
        |i| codec_matches_cpu(i, Codec::two_bit(0.1)),
    ),
    (
        "compression::gpu_codec_1bit_matches_cpu_codec",
        false,
        |i| codec_matches_cpu(i, Codec::one_bit(0.0)),
    ),
    (
        "compression::gpu_codec_1bit_negative_threshold_matches",
        false,
        |i| codec_matches_cpu(i, Codec::one_bit(-0.5)),
    ),
    (
        "compression::device_push_2bit_equals_cpu_values",
        false,
        |i| compressed_push_equals_cpu_values(i, "2bit", "0.5", 3, 10_007, None, 5, false),
    ),
    (
        "compression::device_push_2bit_4_values_t0.1_equals_cpu_values",
        false,
        |i| compressed_push_equals_cpu_values(i, "2bit", "0.1", 4, 4097, None, 5, false),
    ),
    ("compression::device_one_value_is_compressed", false, |i| {
        compressed_push_equals_cpu_values(i, "2bit", "0.5", 1, 1000, None, 3, false)
    }),
    (
        "compression::device_pushpull_1bit_equals_cpu_values",
        false,
        |i| compressed_push_equals_cpu_values(i, "1bit", "0", 2, 100_003, None, 4, true),
    ),
    (
        "compression::device_push_with_sgd_matches_cpu_values",
        false,
        |i| {
            compressed_push_equals_cpu_values(
                i,
                "2bit",
                "0.5",
                3,
                10_000,
                Some(
                    OptimizerSpec::new("sgd")
                        .with("learning_rate", 0.1)
                        .with("momentum", 0.9)
                        .with("wd", 0.01),
                ),
                4,
                false,
            )
        },
    ),
    (
        "dist_device_sync::gpu_values_sum_as_dist_sync_sums_host_values",
        false,
        dist::sums_as_dist_sync,
    ),
    (
        "byteps::gpu_values_sum_as_host_values_do",
        false,
        dist::byteps_sums_as_on_host,
    ),
    (
        "horovod::gpu_values_sum_as_host_values_do",
        false,
        dist::horovod_sums_as_on_host,
    ),
    ("nccl::sum_across_gpus_equals_local_exactly", true, |i| {
        let n = i.devices.len();
        compare_with_local(i, Engine::Nccl, n, 100_003, None, 2, 0.0)
    }),
    (
        "device::a_push_enables_peer_access_where_the_driver_allows",
        false,
        peer_access_follows_the_driver,
    ),
    (
        "ndarray::gpu_arrays_round_trip_and_copy_on_write",
        false,
        gpu_ndarrays_round_trip,
    ),
    (
        "ndarray::large_gpu_arrays_round_trip_through_the_staging_buffer",
        false,
        large_gpu_ndarrays_round_trip,
    ),
    (
        "ndarray::gpu_arrays_through_create_match_host_arrays",
        false,
        gpu_ndarrays_through_stores,
    ),
    (
        "ndarray::gpu_row_sparse_arrays_through_every_store",
        false,
        gpu_row_sparse_ndarrays_through_stores,
    ),
    (
        "ndarray::device_store_reduces_gpu_arrays_on_the_gpu",
        false,
        |i| device_store_takes_gpu_ndarrays(i, Engine::Device),
    ),
    (
        "ndarray::nccl_store_reduces_gpu_arrays_through_nccl",
        true,
        |i| device_store_takes_gpu_ndarrays(i, Engine::Nccl),
    ),
    (
        "ndarray::a_host_key_moved_to_a_gpu_keeps_its_optimizer_state",
        false,
        a_host_key_moved_to_a_gpu_keeps_its_optimizer_state,
    ),
    (
        "ndarray::refused_calls_on_gpu_arrays_change_nothing",
        false,
        refused_gpu_ndarray_calls_change_nothing,
    ),
    (
        "ndarray::state_files_with_their_optimizer_reach_gpu_keys",
        false,
        state_file_optimizer_reaches_gpu_keys,
    ),
    (
        "nccl::batches_and_all_reduce_pushpull_match_local",
        true,
        nccl_batches_match_local,
    ),
    ("nccl::sgd_after_reduce_matches_local", true, |i| {
        let n = i.devices.len();
        compare_with_local(
            i,
            Engine::Nccl,
            n,
            10_000,
            Some(OptimizerSpec::new("sgd").with("momentum", 0.9)),
            3,
            1e-6,
        )
    }),
];

/// Gradients for compression tests: `scale * [-1.5, 1.5)`-ish values of round `round`, with
/// values at the threshold, signed zeros, infinities, NaN and denormals mixed in.
fn cdata(n: usize, i: usize, round: usize, t: f32) -> Vec<f32> {
    let scale = if t > 0.0 { t } else { 1.0 };
    let specials = [
        t,
        -t,
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-45,
        -1e-45,
    ];
    (0..n)
        .map(|j| {
            if (j * 13 + round * 5 + i).is_multiple_of(101) {
                specials[(j + round) % specials.len()]
            } else {
                (((j * 7 + i * 13 + round * 29) % 97) as f32 - 48.0) / 32.0 * scale
            }
        })
        .collect()
}

/// Equal bit patterns, or both NaN (which NaN a residual holds is not specified).
fn same_bits(gpu: &[f32], cpu: &[f32], what: &str) -> TestResult {
    if gpu.len() != cpu.len() {
        return Err(fail(format!(
            "{what}: {} vs {} elements",
            gpu.len(),
            cpu.len()
        )));
    }
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        if g.to_bits() != c.to_bits() && !(g.is_nan() && c.is_nan()) {
            return Err(fail(format!("{what}: element {i}: gpu {g:e} vs cpu {c:e}")));
        }
    }
    Ok(())
}

/// The GPU codec against the CPU codec over 5 rounds (residual carried): packed bytes,
/// residuals, dequantised and dequantised-added values; and CPU-packed bytes dequantised on
/// the GPU.
fn codec_matches_cpu(info: &GpuInfo, codec: Codec) -> TestResult {
    let t = codec.threshold();
    let ordinal = dev(info, 0);
    for n in [1usize, 15, 16, 17, 33, 1000, 100_003] {
        let mut cpu_residual = vec![0.0f32; n];
        let mut cpu_packed = vec![0u8; codec.compressed_len(n)];
        let mut residual = DeviceArray::zeros(&[n], ordinal)?;
        let mut packed = PackedArray::zeros(&codec, n, ordinal)?;
        for round in 0..5 {
            let what = format!("{} t={t} n={n} round {round}", codec.kind());
            let g = cdata(n, 0, round, t);
            let grad = DeviceArray::from_host(&host(&[n], g.clone()), ordinal)?;
            gpu_codec::quantize(&codec, &grad, &mut residual, &mut packed)?;
            codec.quantize(&g, &mut cpu_residual, &mut cpu_packed)?;
            if packed.to_host()? != cpu_packed {
                return Err(fail(format!("{what}: packed bytes differ")));
            }
            same_bits(
                &residual.to_host()?.to_vec::<f32>()?,
                &cpu_residual,
                &format!("{what}: residual"),
            )?;
            let mut cpu_out = vec![0.0f32; n];
            codec.dequantize(&cpu_packed, &mut cpu_out)?;
            let mut out = DeviceArray::zeros(&[n], ordinal)?;
            gpu_codec::dequantize(&codec, &packed, &mut out)?;
            same_bits(
                &out.to_host()?.to_vec::<f32>()?,
                &cpu_out,
                &format!("{what}: dequantised"),
            )?;
            let base = fdata(n, round + 1);
            let mut cpu_sum = base.clone();
            codec.dequantize_add(&cpu_packed, &mut cpu_sum)?;
            let mut sum = DeviceArray::from_host(&host(&[n], base), ordinal)?;
            let uploaded = PackedArray::from_host(&codec, &cpu_packed, n, ordinal)?;
            gpu_codec::dequantize_add(&codec, &uploaded, &mut sum)?;
            same_bits(
                &sum.to_host()?.to_vec::<f32>()?,
                &cpu_sum,
                &format!("{what}: dequantised and added"),
            )?;
        }
    }
    Ok(())
}

/// `rounds` compressed pushes (or pushpulls) of `n_values` values to a GPU key and the same
/// pushes of CPU values to a CPU key of another store: the pulled values are equal bit for
/// bit (within 1e-6 relative with an optimizer, as the optimizer tests).
#[allow(clippy::too_many_arguments)]
fn compressed_push_equals_cpu_values(
    info: &GpuInfo,
    kind: &str,
    threshold: &str,
    n_values: usize,
    len: usize,
    spec: Option<OptimizerSpec>,
    rounds: usize,
    pushpull: bool,
) -> TestResult {
    let shape = [len];
    let params = CompressionParams::from([
        ("type".to_string(), kind.to_string()),
        ("threshold".to_string(), threshold.to_string()),
    ]);
    let gpu_store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let cpu_store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let init = fdata(len, 99);
    gpu_store.init_gpu("w", &host(&shape, init.clone()))?;
    cpu_store.init("w", &host(&shape, init))?;
    for s in [&gpu_store, &cpu_store] {
        s.set_gradient_compression(&params)?;
        if let Some(spec) = &spec {
            s.set_optimizer(spec)?;
        }
    }
    let t = gpu_store
        .gradient_compression()
        .map(|c| c.threshold())
        .unwrap_or(0.5);
    for round in 0..rounds {
        let hosts: Vec<NDArray> = (0..n_values)
            .map(|i| host(&shape, cdata(len, i, round, t)))
            .collect();
        let gpus: Vec<DeviceArray> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| DeviceArray::from_host(h, dev(info, i)))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&DeviceArray> = gpus.iter().collect();
        let mut out = DeviceArray::zeros(&shape, dev(info, 1))?;
        let mut cpu = NDArray::zeros(&shape, DType::F32);
        if pushpull {
            gpu_store.pushpull_gpu("w", &refs, &mut [&mut out])?;
            cpu_store.pushpull("w", &hosts[..], &mut cpu)?;
        } else {
            gpu_store.push_gpu("w", &refs)?;
            gpu_store.pull_gpu("w", &mut [&mut out])?;
            cpu_store.push("w", &hosts[..])?;
            cpu_store.pull("w", &mut cpu)?;
        }
        let got = out.to_host()?.to_vec::<f32>()?;
        let want = cpu.to_vec::<f32>()?;
        let what = format!("{kind} t={threshold} {n_values} values round {round}");
        if spec.is_some() {
            close(&got, &want, 1e-6, &what)?;
        } else {
            same_bits(&got, &want, &what)?;
        }
        // The inputs are only read.
        for (g, h) in gpus.iter().zip(&hosts) {
            same_bits(
                &g.to_host()?.to_vec::<f32>()?,
                &h.to_vec::<f32>()?,
                "a pushed value",
            )?;
        }
    }
    Ok(())
}

fn round_trip(_: &GpuInfo) -> TestResult {
    let h = host(&[3, 5], fdata(15, 1));
    let d = DeviceArray::from_host(&h, 0)?;
    if d.to_host()? != h {
        return Err(fail("the host -> GPU -> host copy changed the data"));
    }
    Ok(())
}

fn placement(info: &GpuInfo) -> TestResult {
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let sizes = [4000usize, 3000, 2000, 1000];
    for (k, &n) in sizes.iter().enumerate() {
        store.init_gpu(k as i64, &host(&[n], vec![1.0; n]))?;
    }
    let ngpu = info.devices.len();
    // A single value first (MXNet takes it as its own sum): its key alone is placed, on the
    // value's GPU, the last one.
    let last = dev(info, ngpu - 1);
    store.push_gpu(3i64, &[&DeviceArray::zeros(&[1000], last)?])?;
    let placed = store.merge_devices();
    if placed.len() != 1 || placed.get(&Key::from(3i64)) != Some(&last) {
        return Err(fail(format!(
            "a push of one value places its key alone on its GPU ({last}): {placed:?}"
        )));
    }
    let values: Vec<DeviceArray> = (0..ngpu.max(2))
        .map(|i| DeviceArray::zeros(&[4000], dev(info, i)))
        .collect::<Result<_, _>>()?;
    store.push_gpu(0i64, &values.iter().collect::<Vec<_>>())?;
    let placed = store.merge_devices();
    if placed.len() != sizes.len() {
        return Err(fail(format!(
            "every known key is placed at the first push of several values: {placed:?}"
        )));
    }
    // A compressed push reduces even a single value (MXNet's `ReduceCompressed`): every key
    // is placed, on the one GPU of that push.
    let compressed = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    for (k, &n) in sizes.iter().enumerate() {
        compressed.init_gpu(k as i64, &host(&[n], vec![1.0; n]))?;
    }
    compressed.set_gradient_compression(&kvstore_base::CompressionParams::from([(
        "type".to_string(),
        "2bit".to_string(),
    )]))?;
    compressed.push_gpu(3i64, &[&DeviceArray::zeros(&[1000], last)?])?;
    let on_last = compressed.merge_devices();
    if on_last.len() != sizes.len() || on_last.values().any(|&d| d != last) {
        return Err(fail(format!(
            "a compressed push of one value places every key on its GPU ({last}): {on_last:?}"
        )));
    }
    // The others across the GPUs, the last one holding key 3 already.
    let mut totals = vec![0usize; ngpu];
    totals[ngpu - 1] = sizes[3];
    let devs: Vec<usize> = info.devices.iter().map(|d| d.ordinal).collect();
    let mut expected = kvstore_device::placement::place(&sizes[..3], &devs, &mut totals);
    expected.push(last);
    for (k, want) in expected.iter().enumerate() {
        if placed[&(k as i64).into()] != *want {
            return Err(fail(format!(
                "key {k} placed on {:?}, expected {want}",
                placed[&(k as i64).into()]
            )));
        }
    }
    Ok(())
}

/// A seeded random sequence of 300 operations on six keys of various sizes (pushes of 1 to 12
/// values, batches of several keys with repeats, pulls and batch pulls into 1 to 3 outputs, a
/// change of optimizer now and then), each done on the GPU store and on `local`, every pulled
/// value compared.
fn random_operations(info: &GpuInfo) -> TestResult {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |below: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % below as u64) as usize
    };
    let sizes = [1usize, 3, 4, 17, 4097, 65_537];
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let local = create("local")?;
    for (k, &n) in sizes.iter().enumerate() {
        store.init_gpu(k as i64, &host(&[n], fdata(n, k)))?;
        local.init(k as i64, &host(&[n], fdata(n, k)))?;
    }
    let optimizers = [
        None,
        Some(
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.05)
                .with("momentum", 0.9),
        ),
        Some(
            OptimizerSpec::new("adam")
                .with("learning_rate", 0.01)
                .with("wd", 0.01),
        ),
    ];
    let mut optimizer = 0;
    let mut pulls = 0;
    for step in 0..300 {
        match next(10) {
            0 => {
                // Optimizers cannot be unset: move forward only.
                if optimizer + 1 < optimizers.len() {
                    optimizer += 1;
                    let spec = optimizers[optimizer].as_ref().expect("set");
                    store.set_optimizer(spec)?;
                    local.set_optimizer(spec)?;
                }
            }
            1..=3 => {
                let k = next(sizes.len());
                let count = 1 + next(12);
                let hosts: Vec<NDArray> = (0..count)
                    .map(|i| host(&[sizes[k]], fdata(sizes[k], step * 13 + i)))
                    .collect();
                let gpus: Vec<DeviceArray> = hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| DeviceArray::from_host(h, dev(info, i + step)))
                    .collect::<Result<_, _>>()?;
                store.push_gpu(k as i64, &gpus.iter().collect::<Vec<_>>())?;
                local.push(k as i64, &hosts[..])?;
            }
            4..=5 => {
                let keys: Vec<usize> = (0..1 + next(5)).map(|_| next(sizes.len())).collect();
                let hosts: Vec<NDArray> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| host(&[sizes[k]], fdata(sizes[k], step * 7 + i)))
                    .collect();
                let gpus: Vec<DeviceArray> = hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| DeviceArray::from_host(h, dev(info, i)))
                    .collect::<Result<_, _>>()?;
                let refs: Vec<[&DeviceArray; 1]> = gpus.iter().map(|g| [g]).collect();
                let batch: Vec<(kvstore_base::Key, &[&DeviceArray])> = keys
                    .iter()
                    .zip(&refs)
                    .map(|(&k, r)| ((k as i64).into(), &r[..]))
                    .collect();
                store.push_gpu_batch(&batch)?;
                // local: each key once, its values in the order listed.
                let mut distinct = keys.clone();
                distinct.sort_unstable();
                distinct.dedup();
                for k in distinct {
                    let values: Vec<NDArray> = keys
                        .iter()
                        .zip(&hosts)
                        .filter(|(&key, _)| key == k)
                        .map(|(_, h)| h.clone())
                        .collect();
                    local.push(k as i64, &values[..])?;
                }
            }
            _ => {
                let k = next(sizes.len());
                let n = sizes[k];
                let mut outs: Vec<DeviceArray> = (0..1 + next(3))
                    .map(|i| DeviceArray::zeros(&[n], dev(info, i + step)))
                    .collect::<Result<_, _>>()?;
                if next(2) == 0 {
                    store.pull_gpu(k as i64, &mut outs.iter_mut().collect::<Vec<_>>())?;
                } else {
                    let mut refs: Vec<&mut DeviceArray> = outs.iter_mut().collect();
                    store.pull_gpu_batch(&mut [((k as i64).into(), &mut refs[..])])?;
                }
                let mut want = NDArray::zeros(&[n], DType::F32);
                local.pull(k as i64, &mut want)?;
                let want = want.to_vec::<f32>()?;
                for (i, o) in outs.iter().enumerate() {
                    close(
                        &o.to_host()?.to_vec::<f32>()?,
                        &want,
                        1e-6,
                        &format!("step {step}, key {k}, output {i}"),
                    )?;
                }
                pulls += 1;
            }
        }
    }
    if pulls < 50 {
        return Err(fail(format!("only {pulls} pulls were compared")));
    }
    Ok(())
}

/// adam for two pushes, then sgd with momentum, then adam again: each new optimizer starts
/// with fresh states and counts on the GPU as on `local`.
fn new_optimizer_starts_fresh(_: &GpuInfo) -> TestResult {
    let n = 4099;
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let local = create("local")?;
    store.init_gpu("w", &host(&[n], fdata(n, 5)))?;
    local.init("w", &host(&[n], fdata(n, 5)))?;
    let adam = OptimizerSpec::new("adam").with("learning_rate", 0.01);
    let sgd = OptimizerSpec::new("sgd").with("momentum", 0.9);
    let plan = [&adam, &adam, &sgd, &sgd, &adam];
    for (round, spec) in plan.iter().enumerate() {
        if round == 0 || !std::ptr::eq(*spec, plan[round - 1]) {
            store.set_optimizer(spec)?;
            local.set_optimizer(spec)?;
        }
        let g = host(&[n], fdata(n, round));
        store.push_gpu("w", &[&DeviceArray::from_host(&g, 0)?])?;
        local.push("w", &g)?;
        let mut out = DeviceArray::zeros(&[n], 0)?;
        store.pull_gpu("w", &mut [&mut out])?;
        let mut want = NDArray::zeros(&[n], DType::F32);
        local.pull("w", &mut want)?;
        close(
            &out.to_host()?.to_vec::<f32>()?,
            &want.to_vec::<f32>()?,
            1e-6,
            &format!("round {round} ({})", spec.name),
        )?;
    }
    Ok(())
}

/// Five keys pushed and pulled in batches (keys out of order, one listed twice), with sgd,
/// against the same pushes to `local`; then a batch with one bad key changes nothing.
fn batch_matches_local(info: &GpuInfo) -> TestResult {
    let spec = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9);
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let local = create("local")?;
    let sizes = [1000usize, 3, 70_001, 4097, 16];
    for (k, &n) in sizes.iter().enumerate() {
        store.init_gpu(k as i64, &host(&[n], fdata(n, k)))?;
        local.init(k as i64, &host(&[n], fdata(n, k)))?;
    }
    store.set_optimizer(&spec)?;
    local.set_optimizer(&spec)?;
    // Key 2 twice: its values are pushed together, as three values.
    let order = [3i64, 2, 0, 4, 1, 2];
    for round in 0..2 {
        let hosts: Vec<Vec<NDArray>> = order
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let n = sizes[k as usize];
                let count = if i == 1 { 2 } else { 1 };
                (0..count)
                    .map(|j| host(&[n], fdata(n, 7 * i + j + round)))
                    .collect()
            })
            .collect();
        let gpus: Vec<Vec<DeviceArray>> = hosts
            .iter()
            .map(|hs| {
                hs.iter()
                    .enumerate()
                    .map(|(j, h)| DeviceArray::from_host(h, dev(info, j)))
                    .collect::<Result<_, _>>()
            })
            .collect::<Result<_, _>>()?;
        let refs: Vec<Vec<&DeviceArray>> = gpus.iter().map(|g| g.iter().collect()).collect();
        let batch: Vec<(kvstore_base::Key, &[&DeviceArray])> = order
            .iter()
            .zip(&refs)
            .map(|(&k, r)| (k.into(), r.as_slice()))
            .collect();
        store.push_gpu_batch(&batch)?;
        for (k, _) in sizes.iter().enumerate() {
            let values: Vec<NDArray> = order
                .iter()
                .zip(&hosts)
                .filter(|(&key, _)| key == k as i64)
                .flat_map(|(_, hs)| hs.iter().cloned())
                .collect();
            local.push(k as i64, &values[..])?;
        }
    }
    let mut outs: Vec<DeviceArray> = sizes
        .iter()
        .map(|&n| DeviceArray::zeros(&[n], 0))
        .collect::<Result<_, _>>()?;
    {
        let mut refs: Vec<[&mut DeviceArray; 1]> = outs.iter_mut().map(|o| [o]).collect();
        let mut batch: Vec<(kvstore_base::Key, &mut [&mut DeviceArray])> = refs
            .iter_mut()
            .enumerate()
            .map(|(k, r)| ((k as i64).into(), r.as_mut_slice()))
            .collect();
        store.pull_gpu_batch(&mut batch)?;
    }
    for (k, o) in outs.iter().enumerate() {
        let mut want = NDArray::zeros(&[sizes[k]], DType::F32);
        local.pull(k as i64, &mut want)?;
        close(
            &o.to_host()?.to_vec::<f32>()?,
            &want.to_vec::<f32>()?,
            1e-6,
            &format!("key {k}"),
        )?;
    }
    let before = outs[0].to_host()?;
    let good = DeviceArray::zeros(&[sizes[0]], 0)?;
    let bad = DeviceArray::zeros(&[sizes[1] + 1], 0)?;
    let err = store
        .push_gpu_batch(&[(0i64.into(), &[&good][..]), (1i64.into(), &[&bad][..])])
        .expect_err("a bad key in a batch");
    if !err.to_string().contains("key 1") {
        return Err(fail(format!("the error does not name key 1: {err}")));
    }
    let mut after = DeviceArray::zeros(&[sizes[0]], 0)?;
    store.pull_gpu(0i64, &mut [&mut after])?;
    if after.to_host()? != before {
        return Err(fail("a batch with a bad key changed another key"));
    }
    Ok(())
}

fn sum_from(_: &GpuInfo) -> TestResult {
    let n = 10_007;
    let hosts: Vec<NDArray> = (0..11).map(|i| host(&[n], fdata(n, i))).collect();
    let gpus: Vec<DeviceArray> = hosts
        .iter()
        .map(|h| DeviceArray::from_host(h, 0))
        .collect::<Result<_, _>>()?;
    let mut sum = DeviceArray::zeros(&[n], 0)?;
    sum.sum_from(&gpus.iter().collect::<Vec<_>>())?;
    let local = create("local")?;
    local.init("s", &NDArray::zeros(&[n], DType::F32))?;
    local.push("s", &hosts[..])?;
    let mut want = NDArray::zeros(&[n], DType::F32);
    local.pull("s", &mut want)?;
    if sum.to_host()?.to_vec::<f32>()? != want.to_vec::<f32>()? {
        return Err(fail("the sum of 11 arrays differs from local's"));
    }
    let other_shape = DeviceArray::zeros(&[n + 1], 0)?;
    if sum.sum_from(&[]).is_ok() || sum.sum_from(&[&gpus[0], &other_shape]).is_ok() {
        return Err(fail("a sum of no array or of another shape was accepted"));
    }
    Ok(())
}

fn errors(_: &GpuInfo) -> TestResult {
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    store.init_gpu("w", &host(&[4], vec![1.0; 4]))?;
    let wrong = DeviceArray::zeros(&[5], 0)?;
    if store.push_gpu("w", &[&wrong]).is_err() && store.push_gpu("nope", &[&wrong]).is_err() {
        let ok = DeviceArray::from_host(&host(&[4], vec![2.0; 4]), 0)?;
        store.push_gpu("w", &[&ok, &ok])?;
        let mut out = DeviceArray::zeros(&[4], 0)?;
        store.pull_gpu("w", &mut [&mut out])?;
        if out.to_host()?.to_vec::<f32>()? != vec![4.0; 4] {
            return Err(fail("a rejected push changed the store"));
        }
        // An error of the GPU part of a pushpull names the pushpull.
        store.set_updater(Box::new(|_, _, _| {
            Err(kvstore_base::Error::InvalidArgument("refused".into()))
        }))?;
        let value = NDArray::ones(&[4], DType::F32).to_context(kvstore_base::Context::Gpu(0))?;
        let mut pulled = value.clone();
        let err = store
            .pushpull("w", &value, &mut pulled)
            .unwrap_err()
            .to_string();
        if !(err.contains("pushpull of key \"w\"") && err.contains("refused")) {
            return Err(fail(format!("a failing updater in a pushpull: {err}")));
        }
        return Ok(());
    }
    Err(fail("a rejected push was accepted"))
}

/// A row-sparse `[rows, 7]` array holding `ids`, integer-valued data from `seed`.
pub fn rsp(rows: usize, ids: &[i64], seed: usize) -> Result<NDArray, Failed> {
    let data = data(ids.len() * 7, seed);
    let rows_array = NDArray::from_vec(&[ids.len(), 7], data)?;
    Ok(NDArray::row_sparse(&[rows, 7], ids.to_vec(), &rows_array)?)
}

/// Row-sparse pulls of `ids` from both stores into outputs on every GPU (two at least),
/// compared with `local`'s: the same indices, the same values.
fn compare_row_sparse_pull(
    info: &GpuInfo,
    store: &DeviceStore,
    local: &dyn KVStoreBase,
    ids: &NDArray,
    what: &str,
) -> TestResult {
    let shape = [50, 7];
    let mut outs: Vec<DeviceRowSparse> = (0..info.devices.len().max(2))
        .map(|i| DeviceRowSparse::zeros(&shape, dev(info, i)))
        .collect::<Result<_, _>>()?;
    let mut refs: Vec<&mut DeviceRowSparse> = outs.iter_mut().collect();
    let row_ids = vec![ids; refs.len()];
    store.row_sparse_pull_gpu("e", &mut refs, &row_ids)?;
    let mut want = rsp(50, &[], 0)?;
    local.row_sparse_pull("e", &mut want, ids)?;
    for (i, o) in outs.iter().enumerate() {
        let got = o.to_host()?;
        let (g, w) = (
            got.as_row_sparse().expect("row-sparse"),
            want.as_row_sparse().expect("row-sparse"),
        );
        if g.indices() != w.indices() || got.to_vec::<f32>()? != want.to_vec::<f32>()? {
            return Err(fail(format!(
                "{what}: output {i} holds rows {:?}, local {:?}, or other values",
                g.indices(),
                w.indices()
            )));
        }
    }
    Ok(())
}

fn row_sparse_matches_local(info: &GpuInfo) -> TestResult {
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let local = create("local")?;
    let init = rsp(50, &[0, 3, 10], 1)?;
    store.init_gpu("e", &init)?;
    local.init("e", &init)?;
    let ids = NDArray::from_vec(&[5], vec![3i64, 4, 3, 49, 0])?;
    compare_row_sparse_pull(info, &store, &*local, &ids, "before any push")?;
    let row_sets: [&[i64]; 4] = [&[1, 3, 5, 49], &[], &[0, 3, 4, 20, 21], &[49]];
    for round in 0..2 {
        let hosts: Vec<NDArray> = row_sets
            .iter()
            .enumerate()
            .map(|(i, ids)| rsp(50, ids, i + round))
            .collect::<Result<_, _>>()?;
        let gpus: Vec<DeviceRowSparse> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| DeviceRowSparse::from_host(h, dev(info, i)))
            .collect::<Result<_, _>>()?;
        store.push_gpu_row_sparse("e", &gpus.iter().collect::<Vec<_>>())?;
        local.push("e", &hosts[..])?;
        let all = NDArray::from_vec(&[50], (0..50i64).rev().collect())?;
        compare_row_sparse_pull(info, &store, &*local, &all, &format!("round {round}"))?;
        compare_row_sparse_pull(info, &store, &*local, &ids, &format!("round {round}"))?;
        let mut dense = DeviceArray::zeros(&[50, 7], 0)?;
        store.pull_gpu("e", &mut [&mut dense])?;
        let mut want = NDArray::zeros(&[50, 7], DType::F32);
        local.pull("e", &mut want)?;
        if dense.to_host()?.to_vec::<f32>()? != want.to_vec::<f32>()? {
            return Err(fail(format!(
                "round {round}: a dense pull differs from local"
            )));
        }
    }
    Ok(())
}

fn row_sparse_errors(_: &GpuInfo) -> TestResult {
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let init = rsp(50, &[2], 3)?;
    store.init_gpu("e", &init)?;
    store.init_gpu("w", &host(&[50, 7], vec![0.0; 350]))?;
    let value = DeviceRowSparse::from_host(&rsp(50, &[1], 4)?, 0)?;
    let dense = DeviceArray::zeros(&[50, 7], 0)?;
    let wrong = DeviceRowSparse::zeros(&[49, 7], 0)?;
    let refused = [
        store.push_gpu("e", &[&dense]).is_err(),
        {
            // MXNet's NCCL store takes no sparse values, a dense key's gradients included.
            let nccl = DeviceStore::new("nccl", Engine::Nccl, ReduceConfig::default());
            nccl.init_gpu("w", &host(&[50, 7], vec![0.0; 350]))?;
            let refused = nccl
                .push_gpu_row_sparse("w", &[&value])
                .unwrap_err()
                .to_string();
            refused.contains("does not support sparse")
        },
        store.push_gpu_row_sparse("e", &[&wrong]).is_err(),
        store
            .row_sparse_pull_gpu(
                "e",
                &mut [&mut DeviceRowSparse::zeros(&[50, 7], 0)?],
                &[&NDArray::from_vec(&[1], vec![50i64])?],
            )
            .is_err(),
        {
            let sgd = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
            sgd.init_gpu("e", &init)?;
            sgd.set_optimizer(&OptimizerSpec::new("sgd"))?;
            sgd.push_gpu_row_sparse("e", &[&value]).is_err()
        },
    ];
    if let Some(i) = refused.iter().position(|r| !r) {
        return Err(fail(format!("bad call {i} was accepted")));
    }
    let mut out = DeviceRowSparse::zeros(&[50, 7], 0)?;
    let ids = NDArray::from_vec(&[2], vec![1i64, 2])?;
    store.row_sparse_pull_gpu("e", &mut [&mut out], &[&ids])?;
    if out.to_host()? != init.retain_rows(&[1, 2])? {
        return Err(fail("a refused call changed the key"));
    }
    Ok(())
}

/// Optimizer results against the CPU's: bit for bit on the emulated driver (where the kernels'
/// own source runs as C++), within 1e-6 relative on a GPU (see the module's tolerances).
fn optimizer_results_match(info: &GpuInfo, gpu: &[f32], cpu: &[f32], what: &str) -> TestResult {
    if info
        .devices
        .iter()
        .all(|d| d.name.starts_with("Emulated GPU"))
    {
        same_bits(gpu, cpu, what)
    } else {
        close(gpu, cpu, 1e-6, what)
    }
}

/// The rows `ids` of the key `e` of both stores: the same row numbers, values as
/// [`optimizer_results_match`] compares them.
fn compare_updated_rows(
    info: &GpuInfo,
    store: &DeviceStore,
    local: &dyn KVStoreBase,
    ids: &NDArray,
    what: &str,
) -> TestResult {
    let mut out = DeviceRowSparse::zeros(&[50, 7], 0)?;
    store.row_sparse_pull_gpu("e", &mut [&mut out], &[ids])?;
    let got = out.to_host()?;
    let mut want = rsp(50, &[], 0)?;
    local.row_sparse_pull("e", &mut want, ids)?;
    let (g, w) = (
        got.as_row_sparse().expect("row-sparse"),
        want.as_row_sparse().expect("row-sparse"),
    );
    if g.indices() != w.indices() {
        return Err(fail(format!(
            "{what}: rows {:?}, local {:?}",
            g.indices(),
            w.indices()
        )));
    }
    optimizer_results_match(info, &got.to_vec::<f32>()?, &want.to_vec::<f32>()?, what)
}

/// Optimizers on a row-sparse GPU key storing every row (an embedding), against `local` with
/// the same pushes: `sgd` with and without momentum and `adam` run by the lazy row kernels,
/// `adam` with `lazy_update` false and `adagrad` by the host updater. Pushes of three values
/// (one without rows), of one value, of two; rows no gradient holds keep their value (the
/// lazy update; `local` is the reference). Then the optimizer states: saved by the device
/// store with its optimizer, loaded by a fresh `local` store and by a fresh device store
/// holding the same weight (twice: the second from the first resumed one), the next update of
/// each equals the first `local`'s (momentum, moments and update counts handed over both ways).
fn row_sparse_optimizers_match_local(info: &GpuInfo) -> TestResult {
    let specs = [
        OptimizerSpec::new("sgd")
            .with("learning_rate", 0.1)
            .with("momentum", 0.9)
            .with("wd", 0.01),
        OptimizerSpec::new("sgd")
            .with("learning_rate", 0.05)
            .with("clip_gradient", 0.3),
        OptimizerSpec::new("adam")
            .with("learning_rate", 0.01)
            .with("wd", 0.1),
        OptimizerSpec::new("adam").with("lazy_update", false),
        OptimizerSpec::new("adagrad").with("learning_rate", 0.1),
    ];
    let every: Vec<i64> = (0..50).collect();
    let all = NDArray::from_vec(&[50], every.clone())?;
    let rounds: [&[&[i64]]; 3] = [
        &[&[1, 3, 5, 49], &[], &[0, 3, 4, 20, 21]],
        &[&[7, 8, 9]],
        &[&[3, 30], &[30, 31, 49]],
    ];
    let grads = |round: usize, sets: &[&[i64]]| -> Result<Vec<NDArray>, Failed> {
        sets.iter()
            .enumerate()
            .map(|(i, ids)| {
                let rows = fdata(ids.len() * 7, i + 3 * round);
                let rows = NDArray::from_vec(&[ids.len(), 7], rows)?;
                Ok(NDArray::row_sparse(&[50, 7], ids.to_vec(), &rows)?)
            })
            .collect()
    };
    for spec in specs {
        let what = |step: &str| format!("{} {:?}: {step}", spec.name, spec.params);
        let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
        let local = create("local")?;
        let weight = NDArray::from_vec(&[50, 7], fdata(350, 11))?;
        let init = NDArray::row_sparse(&[50, 7], every.clone(), &weight)?;
        store.init_gpu("e", &init)?;
        local.init("e", &init)?;
        store.set_optimizer(&spec)?;
        local.set_optimizer(&spec)?;
        for (round, sets) in rounds.iter().enumerate() {
            let hosts = grads(round, sets)?;
            let gpus: Vec<DeviceRowSparse> = hosts
                .iter()
                .enumerate()
                .map(|(i, h)| DeviceRowSparse::from_host(h, dev(info, i + round)))
                .collect::<Result<_, _>>()?;
            store.push_gpu_row_sparse("e", &gpus.iter().collect::<Vec<_>>())?;
            local.push("e", &hosts[..])?;
            compare_updated_rows(
                info,
                &store,
                &*local,
                &all,
                &what(&format!("round {round}")),
            )?;
        }
        // The states: the device store's file resumes a `local` store where the first is.
        let path = std::env::temp_dir().join(format!(
            "kvstore-gpu-row-states-{}-{}",
            std::process::id(),
            spec.name
        ));
        let mut now = rsp(50, &[], 0)?;
        local.row_sparse_pull("e", &mut now, &all)?;
        store.save_optimizer_states(&path, true)?;
        let resumed = create("local")?;
        resumed.init("e", &now)?;
        resumed.set_optimizer(&spec)?;
        let loaded = resumed.load_optimizer_states(&path);
        let _ = std::fs::remove_file(&path);
        loaded?;
        let next = grads(3, &[&[3, 4, 5, 30]])?;
        resumed.push("e", &next[..])?;
        let mut b = rsp(50, &[], 0)?;
        resumed.row_sparse_pull("e", &mut b, &all)?;
        // And device stores, each resumed from the previous one's file (the second from a
        // store that loaded states, then updated).
        let mut from = store;
        for generation in 0..2 {
            let mut now = rsp(50, &[], 0)?;
            local.row_sparse_pull("e", &mut now, &all)?;
            from.save_optimizer_states(&path, true)?;
            let next_store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
            next_store.init_gpu("e", &now)?;
            next_store.set_optimizer(&spec)?;
            let loaded = next_store.load_optimizer_states(&path);
            let _ = std::fs::remove_file(&path);
            loaded?;
            let next = grads(3 + generation, &[&[3, 4, 5, 30]])?;
            local.push("e", &next[..])?;
            next_store.push_gpu_row_sparse("e", &[&DeviceRowSparse::from_host(&next[0], 0)?])?;
            let step = format!("a device store resumed from states, generation {generation}");
            compare_updated_rows(info, &next_store, &*local, &all, &what(&step))?;
            if generation == 0 {
                let mut a = rsp(50, &[], 0)?;
                local.row_sparse_pull("e", &mut a, &all)?;
                optimizer_results_match(
                    info,
                    &b.to_vec::<f32>()?,
                    &a.to_vec::<f32>()?,
                    &what("local resumed from the device store's states"),
                )?;
            }
            from = next_store;
        }
    }
    Ok(())
}

/// An optimizer refuses a row-sparse GPU key missing rows (naming the counts, the key
/// unchanged), as MXNet's optimizers refuse such a weight; once a push without an optimizer
/// stored every row, the optimizer updates it, as `local` does.
fn row_sparse_optimizer_after_a_full_push(info: &GpuInfo) -> TestResult {
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.5)
        .with("momentum", 0.5);
    let refusing = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let init = rsp(50, &[2, 9], 3)?;
    refusing.init_gpu("e", &init)?;
    refusing.set_optimizer(&sgd)?;
    let grad = DeviceRowSparse::from_host(&rsp(50, &[2], 4)?, dev(info, 0))?;
    let refused = refusing
        .push_gpu_row_sparse("e", &[&grad])
        .expect_err("a push to a key missing rows was accepted")
        .to_string();
    if !refused.contains("stores 2 of its 50 rows") {
        return Err(fail(format!(
            "the refusal does not give the counts: {refused}"
        )));
    }
    let mut out = DeviceRowSparse::zeros(&[50, 7], 0)?;
    let ids = NDArray::from_vec(&[3], vec![1i64, 2, 9])?;
    refusing.row_sparse_pull_gpu("e", &mut [&mut out], &[&ids])?;
    if out.to_host()? != init.retain_rows(&[1, 2, 9])? {
        return Err(fail("a refused push changed the key"));
    }

    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let local = create("local")?;
    store.init_gpu("e", &init)?;
    local.init("e", &init)?;
    let every: Vec<i64> = (0..50).collect();
    let halves = [rsp(50, &every[..30], 5)?, rsp(50, &every[20..], 6)?];
    let gpus: Vec<DeviceRowSparse> = halves
        .iter()
        .enumerate()
        .map(|(i, h)| DeviceRowSparse::from_host(h, dev(info, i)))
        .collect::<Result<_, _>>()?;
    store.push_gpu_row_sparse("e", &gpus.iter().collect::<Vec<_>>())?;
    local.push("e", &halves[..])?;
    store.set_optimizer(&sgd)?;
    local.set_optimizer(&sgd)?;
    for round in 0..2 {
        let g = rsp(50, &[0, 17, 49], 7 + round)?;
        store.push_gpu_row_sparse("e", &[&DeviceRowSparse::from_host(&g, dev(info, 1))?])?;
        local.push("e", &g)?;
    }
    let all = NDArray::from_vec(&[50], every)?;
    compare_updated_rows(
        info,
        &store,
        &*local,
        &all,
        "after a push of every row, sgd",
    )
}

/// Row-sparse `NDArray`s in GPU memory (MXNet's `RowSparseNDArray` on `gpu(i)`) through the
/// `KVStoreBase` calls of `local` (staged through the host), `device` (a
/// row-sparse GPU key: reduced, updated lazily and gathered on its merge GPU) and
/// `dist_device_sync` (2 workers): an embedding initialised with every row from a GPU array,
/// lazy sgd, pushes of row-sparse gradients from every GPU, `row_sparse_pull` into row-sparse
/// outputs on GPUs, which stay there; every store lands where `local` fed host arrays does.
fn gpu_row_sparse_ndarrays_through_stores(info: &GpuInfo) -> TestResult {
    use kvstore_base::Context;
    let on_gpu = |a: &NDArray, i: usize| a.to_context(Context::Gpu(dev(info, i)));
    let every: Vec<i64> = (0..50).collect();
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9);
    let init = NDArray::row_sparse(&[50, 7], every.clone(), &host(&[50, 7], fdata(350, 2)))?;
    let grads = |round: usize| -> Result<Vec<NDArray>, Failed> {
        [[1i64, 3, 40], [3, 4, 41]]
            .iter()
            .enumerate()
            .map(|(i, ids)| {
                let rows = host(&[3, 7], fdata(21, i + 2 * round));
                let mut ids = ids.to_vec();
                ids[2] += round as i64;
                Ok(NDArray::row_sparse(&[50, 7], ids, &rows)?)
            })
            .collect()
    };
    let ids = NDArray::from_vec(&[4], vec![41i64, 3, 0, 40])?;
    // The reference: local with host arrays.
    let reference = create("local")?;
    reference.init("e", &init)?;
    reference.set_optimizer(&sgd)?;
    for round in 0..2 {
        reference.push("e", &grads(round)?)?;
    }
    let mut want = rsp(50, &[], 0)?;
    reference.row_sparse_pull("e", &mut want, &ids)?;
    // One worker's part on `kv`: the same calls with arrays on the GPUs.
    let run = |kv: &dyn KVStoreBase, want: &NDArray, what: &str| -> TestResult {
        kv.init("e", &on_gpu(&init, 0)?)?;
        kv.set_optimizer(&sgd)?;
        for round in 0..2 {
            let on_gpus: Vec<NDArray> = grads(round)?
                .iter()
                .enumerate()
                .map(|(i, g)| on_gpu(g, i))
                .collect::<Result<_, _>>()?;
            kv.push("e", &on_gpus)?;
        }
        let mut outs = [on_gpu(&rsp(50, &[], 0)?, 0)?, on_gpu(&rsp(50, &[], 0)?, 1)?];
        kv.row_sparse_pull("e", &mut outs, &ids)?;
        for (i, out) in outs.iter().enumerate() {
            if out.context() != Context::Gpu(dev(info, i))
                || out.storage_type() != kvstore_base::StorageType::RowSparse
            {
                return Err(fail(format!(
                    "{what}: output {i} is now a {} array on {}",
                    out.storage_type(),
                    out.context()
                )));
            }
            let got = out.to_context(Context::Cpu)?;
            let (g, w) = (
                got.as_row_sparse().expect("row-sparse"),
                want.as_row_sparse().expect("row-sparse"),
            );
            if g.indices() != w.indices() {
                return Err(fail(format!(
                    "{what}: output {i} holds rows {:?}, local {:?}",
                    g.indices(),
                    w.indices()
                )));
            }
            optimizer_results_match(
                info,
                &got.to_vec::<f32>()?,
                &want.to_vec::<f32>()?,
                &format!("{what}: output {i}"),
            )?;
        }
        Ok(())
    };
    run(&*create("local")?, &want, "local")?;
    let device = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    run(&device, &want, "device")?;
    // `device` kept the key on a GPU: its GPU call reads it.
    let mut picked = DeviceRowSparse::zeros(&[50, 7], 0)?;
    device.row_sparse_pull_gpu("e", &mut [&mut picked], &[&ids])?;
    optimizer_results_match(
        info,
        &picked.to_host()?.to_vec::<f32>()?,
        &want.to_vec::<f32>()?,
        "device: row_sparse_pull_gpu of the key",
    )?;
    // Two workers each pushing the gradients: the servers sum two of each.
    let doubled = |round: usize| -> Result<Vec<NDArray>, Failed> {
        let mut twice = grads(round)?;
        twice.extend(grads(round)?);
        Ok(twice)
    };
    let reference = create("local")?;
    reference.init("e", &init)?;
    reference.set_optimizer(&sgd)?;
    for round in 0..2 {
        reference.push("e", &doubled(round)?)?;
    }
    reference.row_sparse_pull("e", &mut want, &ids)?;
    dist::job("dist_device_sync", 2, |kv| {
        run(kv, &want, "dist_device_sync")
    })?;
    Ok(())
}

/// `pull`, `pushpull`, `broadcast` and in-place `pushpull` skip row-sparse outputs (MXNet's
/// `ignore_sparse`): on a GPU, staged or not, they keep their rows, while a dense GPU output
/// of the same key in the same call receives the value; with `ignore_sparse` false a
/// row-sparse GPU output receives the stored rows, as `local`'s host output does. On
/// `local` (staged), `device` (a dense host key, a row-sparse GPU key) and `dist_device_sync`.
fn skipped_row_sparse_gpu_outputs(info: &GpuInfo) -> TestResult {
    use kvstore_base::Context;
    let on_gpu = |a: &NDArray, i: usize| a.to_context(Context::Gpu(dev(info, i)));
    let held = rsp(50, &[4, 7], 9)?;
    let rows_of = |a: &NDArray| -> Result<(Vec<i64>, Vec<f32>), Failed> {
        let host = a.to_context(Context::Cpu)?;
        let r = host
            .as_row_sparse()
            .ok_or_else(|| fail("not row-sparse any more"))?;
        Ok((r.indices().to_vec(), host.to_vec::<f32>()?))
    };
    let check = |kv: &dyn KVStoreBase, what: &str| -> TestResult {
        let dense = host(&[50, 7], fdata(350, 1));
        let table = rsp(50, &(0..50).collect::<Vec<i64>>(), 2)?;
        kv.init("d", &on_gpu(&dense, 0)?)?;
        kv.init("e", &on_gpu(&table, 0)?)?;
        let untouched = |out: &NDArray, call: &str| -> TestResult {
            if rows_of(out)? != rows_of(&held)? {
                return Err(fail(format!(
                    "{what}: {call} wrote a row-sparse output it skips"
                )));
            }
            Ok(())
        };
        // A dense key: a row-sparse and a dense GPU output.
        let mut outs = [
            on_gpu(&held, 0)?,
            on_gpu(&NDArray::zeros(&[50, 7], DType::F32), 1)?,
        ];
        kv.pull("d", &mut outs)?;
        untouched(&outs[0], "pull")?;
        if outs[1].to_vec::<f32>()? != dense.to_vec::<f32>()? {
            return Err(fail(format!(
                "{what}: the dense output of the pull differs"
            )));
        }
        for key in ["d", "e"] {
            let mut out = [on_gpu(&held, 1)?];
            let value = if key == "d" {
                dense.clone()
            } else {
                rsp(50, &[1], 3)?
            };
            kv.pushpull(key, &on_gpu(&value, 0)?, &mut out)?;
            untouched(&out[0], &format!("pushpull of {key}"))?;
        }
        let mut out = [on_gpu(&held, 0)?];
        kv.broadcast("b", &on_gpu(&dense, 0)?, &mut out)?;
        untouched(&out[0], "broadcast")?;
        // With ignore_sparse false: the stored rows.
        let mut out = [on_gpu(&held, 0)?];
        kv.pull_with_options("e", &mut out, 0, false)?;
        let mut want = [held.clone()];
        let reference = create("local")?;
        reference.init("e", &table)?;
        reference.pushpull("e", &rsp(50, &[1], 3)?, &mut [held.clone()])?;
        reference.pull_with_options("e", &mut want, 0, false)?;
        if rows_of(&out[0])? != rows_of(&want[0])? {
            return Err(fail(format!(
                "{what}: a pull with ignore_sparse false wrote other rows than local's"
            )));
        }
        Ok(())
    };
    check(&*create("local")?, "local")?;
    check(&*create("device")?, "device")?;
    dist::job("dist_device_sync", 1, |kv| check(kv, "dist_device_sync"))?;
    // In place: the pushed row-sparse GPU values are outputs the pull skips.
    let kv = create("local")?;
    kv.init("e", &rsp(50, &[4, 7], 1)?)?;
    let mut values = [on_gpu(&held, 0)?];
    kv.pushpull_in_place("e", &mut values)?;
    if rows_of(&values[0])? != rows_of(&held)? {
        return Err(fail(
            "local: an in-place pushpull wrote a row-sparse GPU value",
        ));
    }
    Ok(())
}

/// Row-sparse gradients of a dense GPU weight (Gluon's `Embedding(sparse_grad=True)`: the
/// weight dense, its gradients row-sparse), as MXNet's `device` store takes them: summed and
/// applied on the merge GPU, lazily by `sgd` and `adam` (the pushed rows only), by the host
/// updater for `sgd` with `lazy_update` false and `adagrad`; without an optimizer the sum
/// becomes the value (zeros elsewhere). Through `push_gpu_row_sparse` and through
/// `KVStoreBase` with `NDArray`s on the GPUs (a dense output pulled), against `local` with
/// host arrays; MXNet 1.9.1's `local` gives the first sgd case's
/// `[1, 0.99, 0.89, 1]` per row (`kvstore-test`'s row-sparse weight check, here dense).
fn row_sparse_gradients_of_a_dense_weight(info: &GpuInfo) -> TestResult {
    use kvstore_base::Context;
    let on_gpu = |a: &NDArray, i: usize| a.to_context(Context::Gpu(dev(info, i)));
    let specs = [
        None,
        Some(
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("wd", 0.1),
        ),
        Some(
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("momentum", 0.9)
                .with("wd", 0.01),
        ),
        Some(
            OptimizerSpec::new("adam")
                .with("learning_rate", 0.01)
                .with("wd", 0.1),
        ),
        Some(
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("momentum", 0.9)
                .with("lazy_update", false),
        ),
        Some(OptimizerSpec::new("adagrad").with("learning_rate", 0.1)),
    ];
    let grads = |round: usize| -> Result<Vec<NDArray>, Failed> {
        [vec![1i64, 2, 30], vec![1, 31 + round as i64]]
            .iter()
            .enumerate()
            .map(|(i, ids)| {
                let rows = host(&[ids.len(), 7], fdata(ids.len() * 7, i + 2 * round));
                Ok(NDArray::row_sparse(&[50, 7], ids.clone(), &rows)?)
            })
            .collect()
    };
    let weight = host(&[50, 7], fdata(350, 5));
    for spec in &specs {
        let what = |how: &str| format!("{how}, {spec:?}");
        let local = create("local")?;
        let direct = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
        let generic = create("device")?;
        local.init("w", &weight)?;
        direct.init_gpu("w", &weight)?;
        generic.init("w", &on_gpu(&weight, 0)?)?;
        if let Some(spec) = spec {
            local.set_optimizer(spec)?;
            direct.set_optimizer(spec)?;
            generic.set_optimizer(spec)?;
        }
        for round in 0..3 {
            let hosts = grads(round)?;
            local.push("w", &hosts[..])?;
            let on_gpus: Vec<NDArray> = hosts
                .iter()
                .enumerate()
                .map(|(i, g)| on_gpu(g, i + round))
                .collect::<Result<_, _>>()?;
            generic.push("w", &on_gpus[..])?;
            let arrays: Vec<DeviceRowSparse> = hosts
                .iter()
                .enumerate()
                .map(|(i, g)| DeviceRowSparse::from_host(g, dev(info, i + round)))
                .collect::<Result<_, _>>()?;
            direct.push_gpu_row_sparse("w", &arrays.iter().collect::<Vec<_>>())?;
            if round == 1 {
                // A dense gradient between the row-sparse ones: one optimizer state serves both.
                let dense = host(&[50, 7], fdata(350, 8));
                local.push("w", &dense)?;
                generic.push("w", &on_gpu(&dense, 0)?)?;
                direct.push_gpu("w", &[&DeviceArray::from_host(&dense, dev(info, 1))?])?;
            }
        }
        let mut want = NDArray::zeros(&[50, 7], DType::F32);
        local.pull("w", &mut want)?;
        let want = want.to_vec::<f32>()?;
        let mut out = DeviceArray::zeros(&[50, 7], dev(info, 1))?;
        direct.pull_gpu("w", &mut [&mut out])?;
        optimizer_results_match(
            info,
            &out.to_host()?.to_vec::<f32>()?,
            &want,
            &what("push_gpu_row_sparse"),
        )?;
        let mut out = on_gpu(&NDArray::zeros(&[50, 7], DType::F32), 1)?;
        generic.pull("w", &mut out)?;
        if out.context() != Context::Gpu(dev(info, 1)) {
            return Err(fail(format!(
                "{}: the output left its GPU",
                what("NDArrays")
            )));
        }
        optimizer_results_match(
            info,
            &out.to_vec::<f32>()?,
            &want,
            &what("NDArrays on GPUs"),
        )?;
        let Some(spec) = spec else { continue };
        // The states: saved by the device store, loaded by a fresh one holding the weight,
        // the next row-sparse push lands where `local`'s does.
        let path = std::env::temp_dir().join(format!(
            "kvstore-gpu-dense-rows-{}-{}",
            std::process::id(),
            spec.name
        ));
        generic.save_optimizer_states(&path, true)?;
        let resumed = create("device")?;
        resumed.init("w", &on_gpu(&host(&[50, 7], want.clone()), 0)?)?;
        resumed.set_optimizer(spec)?;
        let loaded = resumed.load_optimizer_states(&path);
        let _ = std::fs::remove_file(&path);
        loaded?;
        let next = grads(3)?;
        local.push("w", &next[..])?;
        let on_gpus: Vec<NDArray> = next
            .iter()
            .map(|g| on_gpu(g, 0))
            .collect::<Result<_, _>>()?;
        resumed.push("w", &on_gpus[..])?;
        let mut want = NDArray::zeros(&[50, 7], DType::F32);
        local.pull("w", &mut want)?;
        let mut out = on_gpu(&NDArray::zeros(&[50, 7], DType::F32), 0)?;
        resumed.pull("w", &mut out)?;
        optimizer_results_match(
            info,
            &out.to_vec::<f32>()?,
            &want.to_vec::<f32>()?,
            &what("resumed from the device store's states"),
        )?;
    }
    // MXNet 1.9.1's local store, dense weight: rows not pushed keep their value.
    let kv = create("device")?;
    kv.init("e", &on_gpu(&NDArray::ones(&[4, 2], DType::F32), 0)?)?;
    kv.set_optimizer(
        &OptimizerSpec::new("sgd")
            .with("learning_rate", 0.1)
            .with("wd", 0.1),
    )?;
    let rows = |ids: Vec<i64>, values: Vec<f32>| -> Result<NDArray, Failed> {
        let data = NDArray::from_vec(&[ids.len(), 2], values)?;
        Ok(on_gpu(&NDArray::row_sparse(&[4, 2], ids, &data)?, 0)?)
    };
    kv.push(
        "e",
        &[
            rows(vec![1, 2], vec![0.5, 0.5, 1.0, 1.0])?,
            rows(vec![1], vec![-0.5, -0.5])?,
        ],
    )?;
    let mut out = NDArray::zeros(&[4, 2], DType::F32);
    kv.pull("e", &mut out)?;
    let expected = [1.0f32, 1.0, 0.99, 0.99, 0.89, 0.89, 1.0, 1.0];
    if out.to_vec::<f32>()? != expected {
        return Err(fail(format!(
            "one lazy sgd step of a dense GPU weight: {:?}, MXNet's {expected:?}",
            out.to_vec::<f32>()?
        )));
    }
    Ok(())
}

/// A custom updater on a row-sparse GPU key that does not store every row gets the rows it
/// stores and the pushed rows (as `local`'s and MXNet's updaters get them, no row
/// invented): here it adds them, and the key then stores the union, as on `local`.
fn row_sparse_custom_updater(info: &GpuInfo) -> TestResult {
    use kvstore_base::KVStoreExt;
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let local = create("local")?;
    let init = rsp(50, &[2, 9], 3)?;
    store.init_gpu("e", &init)?;
    local.init("e", &init)?;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    for kv in [&store as &dyn KVStoreBase, &*local] {
        let seen = seen.clone();
        kv.set_updater_fn(move |_key, grad, weight| {
            let ids = weight.as_row_sparse().map(|r| r.indices().to_vec());
            seen.lock().expect("not poisoned").push(ids);
            weight.add_assign(grad)
        })?;
    }
    for round in 0..2usize {
        let g = rsp(50, &[0, 9, 30 + round as i64], 5 + round)?;
        store.push_gpu_row_sparse("e", &[&DeviceRowSparse::from_host(&g, dev(info, 1))?])?;
        local.push("e", &g)?;
    }
    // Device, local, device, local: the rows stored at init, then their union with the
    // first push's.
    let seen = seen.lock().expect("not poisoned").clone();
    let (first, second) = (Some(vec![2, 9]), Some(vec![0, 2, 9, 30]));
    if seen != [first.clone(), first, second.clone(), second] {
        return Err(fail(format!(
            "the device store's updater and local's saw weights of rows {seen:?} (device, \
             local, device, local)"
        )));
    }
    let all = NDArray::from_vec(&[50], (0..50i64).collect())?;
    compare_row_sparse_pull(info, &store, &*local, &all, "after two custom updates")?;
    Ok(())
}

/// The `nccl` store against `local` over several keys: `pushpull_gpu` without an optimizer
/// (one all-reduce per key; the first opens NCCL), `push_gpu_batch` + `pull_gpu_batch` (every
/// key in one NCCL group) without and with sgd, and `pushpull_gpu` with sgd (a reduce, the
/// step, a broadcast). One value and one output per GPU.
fn nccl_batches_match_local(info: &GpuInfo) -> TestResult {
    let gpus = info.devices.len();
    let store = DeviceStore::new("nccl", Engine::Nccl, ReduceConfig::default());
    let local = create("local")?;
    let sizes = [1000usize, 3, 70_001, 17];
    for (k, &n) in sizes.iter().enumerate() {
        store.init_gpu(k as i64, &host(&[n], fdata(n, 100 + k)))?;
        local.init(k as i64, &host(&[n], fdata(n, 100 + k)))?;
    }
    // Host values of step `step`, one per GPU, for every key; and their GPU copies.
    let values = |step: usize| key_values(info, &sizes, gpus, |k, g| 11 * step + 3 * k + g);
    let outputs = |k: usize| -> Result<Vec<DeviceArray>, Failed> {
        (0..gpus)
            .map(|g| DeviceArray::zeros(&[sizes[k]], dev(info, g)).map_err(Failed::from))
            .collect()
    };
    let compare = |outs: &[DeviceArray], k: usize, rel: f32, what: &str| -> TestResult {
        let mut cpu = NDArray::zeros(&[sizes[k]], DType::F32);
        local.pull(k as i64, &mut cpu)?;
        let cpu = cpu.to_vec::<f32>()?;
        for (g, o) in outs.iter().enumerate() {
            close(
                &o.to_host()?.to_vec::<f32>()?,
                &cpu,
                rel,
                &format!("{what}, key {k}, output {g}"),
            )?;
        }
        Ok(())
    };
    // The sums of float32 values may be added in another order by NCCL: 1e-6 relative.
    let rel = 1e-6;
    for step in 0..4 {
        if step == 2 {
            let spec = OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("momentum", 0.9);
            store.set_optimizer(&spec)?;
            local.set_optimizer(&spec)?;
        }
        let (hosts, on_gpus) = values(step)?;
        for (k, hs) in hosts.iter().enumerate() {
            local.push(k as i64, &hs[..])?;
        }
        let mut outs: Vec<Vec<DeviceArray>> =
            (0..sizes.len()).map(outputs).collect::<Result<_, _>>()?;
        if step % 2 == 0 {
            for (k, (vs, os)) in on_gpus.iter().zip(outs.iter_mut()).enumerate() {
                let refs: Vec<&DeviceArray> = vs.iter().collect();
                let mut out_refs: Vec<&mut DeviceArray> = os.iter_mut().collect();
                store.pushpull_gpu(k as i64, &refs, &mut out_refs)?;
            }
        } else {
            let refs: Vec<Vec<&DeviceArray>> =
                on_gpus.iter().map(|vs| vs.iter().collect()).collect();
            let batch: Vec<(kvstore_base::Key, &[&DeviceArray])> = refs
                .iter()
                .enumerate()
                .map(|(k, r)| ((k as i64).into(), &r[..]))
                .collect();
            store.push_gpu_batch(&batch)?;
            let mut out_refs: Vec<Vec<&mut DeviceArray>> =
                outs.iter_mut().map(|os| os.iter_mut().collect()).collect();
            let mut pulls: Vec<(kvstore_base::Key, &mut [&mut DeviceArray])> = out_refs
                .iter_mut()
                .enumerate()
                .map(|(k, r)| ((k as i64).into(), &mut r[..]))
                .collect();
            store.pull_gpu_batch(&mut pulls)?;
        }
        for (k, os) in outs.iter().enumerate() {
            compare(os, k, rel, &format!("step {step}"))?;
        }
        // The stored value is what was pulled: a plain pull gives it again.
        let mut again = outputs(0)?;
        let mut again_refs: Vec<&mut DeviceArray> = again.iter_mut().collect();
        store.pull_gpu(0i64, &mut again_refs)?;
        compare(&again, 0, rel, &format!("step {step}, pulled again"))?;
    }
    Ok(())
}

/// A push over every GPU enables direct access between them (MXNet's `EnableP2P`) for
/// exactly the ordered pairs the driver allows; the warning comes when some lack it.
fn peer_access_follows_the_driver(info: &GpuInfo) -> TestResult {
    use kvstore_device::peer::{can_access_peer, enabled_peer_access};
    if !kvstore_device::peer::p2p_requested() {
        return Ok(()); // MXNET_ENABLE_GPU_P2P=0: nothing to enable
    }
    let devs: Vec<usize> = info.devices.iter().map(|d| d.ordinal).collect();
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    store.init_gpu("p", &host(&[64], data(64, 0)))?;
    let values = devs
        .iter()
        .map(|&d| DeviceArray::from_host(&host(&[64], data(64, d)), d))
        .collect::<Result<Vec<_>, _>>()?;
    store.push_gpu("p", &values.iter().collect::<Vec<_>>())?;
    let access = enabled_peer_access(&devs);
    for (i, &from) in devs.iter().enumerate() {
        for (j, &to) in devs.iter().enumerate() {
            let allowed = from != to && can_access_peer(from, to)?;
            if access.direct[i][j] != allowed {
                return Err(fail(format!(
                    "gpu({from}) -> gpu({to}): direct access {} but the driver allows it: \
                     {allowed}\n{}",
                    access.direct[i][j],
                    access.matrix()
                )));
            }
        }
    }
    if access.warning().is_some() != (access.enabled_pairs() < access.all_pairs()) {
        return Err(fail("the warning does not follow the missing pairs"));
    }
    Ok(())
}

/// `NDArray`s in GPU memory: to and from the host bit for bit, writes into a clone leave the
/// original alone, float32 only.
fn gpu_ndarrays_round_trip(info: &GpuInfo) -> TestResult {
    use kvstore_base::Context;
    let host = host(&[3, 5], fdata(15, 4));
    for d in &info.devices {
        let gpu = host.to_context(Context::Gpu(d.ordinal))?;
        if gpu.context() != Context::Gpu(d.ordinal) || gpu.dense().is_some() {
            return Err(fail("a GPU array must report its GPU and no host view"));
        }
        if gpu.shape() != host.shape() || gpu.dtype() != DType::F32 {
            return Err(fail("a GPU array keeps its shape and dtype"));
        }
        if gpu.to_context(Context::Cpu)? != host || gpu.to_vec::<f32>()? != host.to_vec::<f32>()? {
            return Err(fail("the round trip through the GPU changed the values"));
        }
        // Copy on write: the clone gets its own memory at its first write.
        let mut copy = gpu.clone();
        copy.assign(&NDArray::zeros(&[3, 5], DType::F64))?;
        if gpu.to_vec::<f32>()? != host.to_vec::<f32>()? || copy.to_vec::<f32>()? != vec![0.0; 15] {
            return Err(fail("writing a clone of a GPU array changed the original"));
        }
        // Another GPU, and back.
        let other = info.devices[(d.ordinal + 1) % info.devices.len()].ordinal;
        if gpu.to_context(Context::Gpu(other))?.to_vec::<f32>()? != host.to_vec::<f32>()? {
            return Err(fail("a copy to another GPU changed the values"));
        }
    }
    let refused = NDArray::zeros(&[2], DType::F64).to_context(Context::Gpu(0));
    if !matches!(refused, Err(kvstore_base::Error::InvalidArgument(_))) {
        return Err(fail(format!(
            "a float64 GPU array must be refused, got {refused:?}"
        )));
    }
    Ok(())
}

/// Arrays large enough to be copied through a GPU's page-locked staging buffer, in chunks
/// (two and a half of them here, so the last is partial), arrive whole and in order both
/// ways, also from two threads copying through the same buffer at once, and into an array
/// already on the GPU (`assign`).
fn large_gpu_ndarrays_round_trip(info: &GpuInfo) -> TestResult {
    use kvstore_base::Context;
    const CHUNK: usize = 2 << 20; // the staging buffer's elements (src/host_copies.rs)
    let n = 2 * CHUNK + CHUNK / 2 + 7;
    let pattern = |seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 31 + seed) % 1_000_003) as f32)
            .collect()
    };
    let round_trip = |ordinal: usize, seed: usize| -> TestResult {
        let host = host(&[n], pattern(seed));
        let mut gpu = host.to_context(Context::Gpu(ordinal))?;
        if gpu.to_vec::<f32>()? != pattern(seed) {
            return Err(fail(format!(
                "a round trip of {n} elements through gpu({ordinal}) changed them"
            )));
        }
        gpu.assign(&NDArray::from_vec(&[n], pattern(seed + 1))?)?;
        if gpu.to_context(Context::Cpu)?.to_vec::<f32>()? != pattern(seed + 1) {
            return Err(fail(format!(
                "{n} elements written into an array on gpu({ordinal}) came back changed"
            )));
        }
        Ok(())
    };
    for d in &info.devices {
        std::thread::scope(|scope| {
            let other = scope.spawn(|| round_trip(d.ordinal, 5));
            let mine = round_trip(d.ordinal, 9);
            other
                .join()
                .unwrap_or_else(|_| Err(fail("a copying thread panicked")))
                .and(mine)
        })?;
    }
    Ok(())
}

/// Stores reached by name take `NDArray`s in GPU memory in every call (staged through host
/// memory by the calling layer, as MXNet's CPU stores do): the results equal those of the
/// same calls with host arrays, and the pushed arrays are left as they were. A host store
/// called directly (not through `KVStoreExt`) refuses them with an error.
fn gpu_ndarrays_through_stores(info: &GpuInfo) -> TestResult {
    use kvstore_base::{Context, KeyedValues};
    let direct = create("local")?;
    direct.init(1, &NDArray::zeros(&[4], DType::F32))?;
    let on_gpu0 = NDArray::ones(&[4], DType::F32).to_context(Context::Gpu(dev(info, 0)))?;
    let batch = KeyedValues::new("push", vec![1.into(), 1.into()], vec![&on_gpu0, &on_gpu0])?;
    match direct.push_batch(&batch, 0) {
        Err(e) if e.to_string().contains("host arrays") => {}
        other => {
            return Err(fail(format!(
                "a direct push of GPU arrays to local: {other:?}"
            )))
        }
    }
    // init_gpu with a GPU value keeps a host copy until the key is placed.
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    store.init_gpu(1, &on_gpu0)?;
    store.init(2, &on_gpu0)?;
    store.push(2, &[on_gpu0.clone(), on_gpu0.clone()])?;
    let mut out = NDArray::zeros(&[4], DType::F32).to_context(Context::Gpu(dev(info, 1)))?;
    store.pull(1, &mut out)?;
    if out.to_vec::<f32>()? != vec![1.0; 4] {
        return Err(fail("a key initialised by init_gpu with a GPU value"));
    }
    let on_gpu = |a: &NDArray, i: usize| a.to_context(Context::Gpu(dev(info, i)));
    for name in ["local", "device", "teststore"] {
        let gpu_kv = create(name)?;
        let host_kv = create(name)?;
        let init = host(&[6], fdata(6, 1));
        // MXNet's TestStore has no init: a broadcast stands for it.
        let mut scratch = [on_gpu(&NDArray::zeros(&[6], DType::F32), 0)?];
        if name == "teststore" {
            gpu_kv.broadcast(3, &on_gpu(&init, 0)?, &mut scratch)?;
            if scratch[0].to_vec::<f32>()? != init.to_vec::<f32>()? {
                return Err(fail("teststore: a broadcast into a GPU array differs"));
            }
        } else {
            gpu_kv.init(3, &on_gpu(&init, 0)?)?;
            host_kv.init(3, &init)?;
        }
        let values: Vec<NDArray> = (0..3).map(|i| host(&[6], data(6, i))).collect();
        let gpu_values = values
            .iter()
            .enumerate()
            .map(|(i, v)| on_gpu(v, i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut gpu_outs = vec![
            on_gpu(&NDArray::zeros(&[6], DType::F32), 1)?,
            NDArray::zeros(&[6], DType::F32),
        ];
        let mut host_outs = vec![NDArray::zeros(&[6], DType::F32); 2];
        gpu_kv.pushpull(3, &gpu_values, &mut gpu_outs)?;
        host_kv.pushpull(3, &values, &mut host_outs)?;
        for (g, h) in gpu_outs.iter().zip(&host_outs) {
            if g.to_vec::<f32>()? != h.to_vec::<f32>()? {
                return Err(fail(format!(
                    "{name}: a pushpull of GPU arrays differs from host arrays"
                )));
            }
        }
        if gpu_outs[0].context() != Context::Gpu(dev(info, 1)) {
            return Err(fail(format!("{name}: the GPU output moved off its GPU")));
        }
        for (g, v) in gpu_values.iter().zip(&values) {
            if g.to_vec::<f32>()? != v.to_vec::<f32>()? {
                return Err(fail(format!("{name}: a pushed GPU array was changed")));
            }
        }
        if name == "teststore" {
            continue; // no pull
        }
        // In place, then a pull into GPU arrays.
        let mut in_place = gpu_values.clone();
        let mut host_in_place = values.clone();
        gpu_kv.pushpull_in_place(3, &mut in_place)?;
        host_kv.pushpull_in_place(3, &mut host_in_place)?;
        let mut pulled = on_gpu(&NDArray::zeros(&[6], DType::F32), 2)?;
        gpu_kv.pull(3, &mut pulled)?;
        let mut host_pulled = NDArray::zeros(&[6], DType::F32);
        host_kv.pull(3, &mut host_pulled)?;
        if in_place[2].to_vec::<f32>()? != host_in_place[2].to_vec::<f32>()?
            || pulled.to_vec::<f32>()? != host_pulled.to_vec::<f32>()?
        {
            return Err(fail(format!(
                "{name}: in-place pushpull or pull of GPU arrays differs"
            )));
        }
        if gpu_values[2].to_vec::<f32>()? != values[2].to_vec::<f32>()? {
            return Err(fail(format!(
                "{name}: an in-place pushpull wrote through a clone"
            )));
        }
    }
    Ok(())
}

/// The `device` (or `nccl`) store through `KVStoreBase` with `NDArray`s in GPU memory, against
/// `local` with host arrays: a key initialised on the host moves to the GPUs at its first
/// push of GPU arrays (placed: it has a merge GPU), pushes and pulls of several keys, sgd with
/// momentum; then host pulls copy from the GPU and host pushes are copied to it.
/// A key pushed host values under an optimizer, then GPU values (which make it a GPU key),
/// keeps its optimizer state and update count: the GPU kernels continue the host updater's
/// steps (adam's bias correction at t = 3, the momentum carried), as `local` does with three
/// host pushes.
fn a_host_key_moved_to_a_gpu_keeps_its_optimizer_state(info: &GpuInfo) -> TestResult {
    use kvstore_base::Context;
    let n = 16;
    let momentum = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9);
    let adam = OptimizerSpec::new("adam").with("learning_rate", 0.1);
    for spec in [momentum, adam] {
        let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
        let local = create("local")?;
        store.init(0i64, &host(&[n], fdata(n, 60)))?;
        local.init(0i64, &host(&[n], fdata(n, 60)))?;
        store.set_optimizer(&spec)?;
        local.set_optimizer(&spec)?;
        for round in 0..3 {
            let grad = host(&[n], fdata(n, 70 + round));
            match round {
                2 => store.push(0i64, &grad.to_context(Context::Gpu(dev(info, 0)))?)?,
                _ => store.push(0i64, &grad)?,
            }
            local.push(0i64, &grad)?;
        }
        let mut got = NDArray::zeros(&[n], DType::F32);
        store.pull(0i64, &mut got)?;
        let mut want = NDArray::zeros(&[n], DType::F32);
        local.pull(0i64, &mut want)?;
        close(
            &got.to_vec::<f32>()?,
            &want.to_vec::<f32>()?,
            1e-6,
            &format!("{} after two host pushes and a GPU one", spec.name),
        )?;
    }
    Ok(())
}

fn device_store_takes_gpu_ndarrays(info: &GpuInfo, engine: Engine) -> TestResult {
    use kvstore_base::Context;
    let name = if engine == Engine::Nccl {
        "nccl"
    } else {
        "device"
    };
    let store = DeviceStore::new(name, engine, ReduceConfig::default());
    let local = create("local")?;
    let per_key = match engine {
        Engine::Nccl => info.devices.len(),
        Engine::Device => 3,
    };
    let lens = [40usize, 7];
    // Key 0 from a host array, key 1 from a GPU array.
    store.init(0i64, &host(&[lens[0]], fdata(lens[0], 50)))?;
    store.init(
        1i64,
        &host(&[lens[1]], fdata(lens[1], 51)).to_context(Context::Gpu(dev(info, 1)))?,
    )?;
    for (k, &n) in lens.iter().enumerate() {
        local.init(k as i64, &host(&[n], fdata(n, 50 + k)))?;
    }
    let spec = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9);
    for round in 0..3 {
        if round == 1 {
            store.set_optimizer(&spec)?;
            local.set_optimizer(&spec)?;
        }
        let (hosts, _) = key_values(info, &lens, per_key, |k, i| 5 * round + 2 * k + i)?;
        let gpu_values: Vec<Vec<NDArray>> = hosts
            .iter()
            .map(|hs| {
                hs.iter()
                    .enumerate()
                    .map(|(i, h)| h.to_context(Context::Gpu(dev(info, i))))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<_, _>>()?;
        let mut outs: Vec<Vec<NDArray>> = lens
            .iter()
            .map(|&n| {
                (0..per_key)
                    .map(|i| {
                        NDArray::zeros(&[n], DType::F32).to_context(Context::Gpu(dev(info, i)))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<_, _>>()?;
        store.pushpull(&[0i64, 1], &gpu_values, &mut outs)?;
        local.push(&[0i64, 1], &hosts)?;
        for (k, os) in outs.iter().enumerate() {
            let mut expected = NDArray::zeros(&[lens[k]], DType::F32);
            local.pull(k as i64, &mut expected)?;
            for o in os {
                close(
                    &o.to_vec::<f32>()?,
                    &expected.to_vec::<f32>()?,
                    1e-6,
                    &format!("round {round}, key {k}"),
                )?;
            }
        }
    }
    if !store.merge_devices().contains_key(&Key::from(0i64)) {
        return Err(fail(
            "the key initialised on the host was not placed on a GPU",
        ));
    }
    // Host arrays: pulls copy from the GPU, pushes are refused.
    let mut on_host = NDArray::zeros(&[lens[0]], DType::F64);
    store.pull(0i64, &mut on_host)?;
    let mut expected = NDArray::zeros(&[lens[0]], DType::F64);
    local.pull(0i64, &mut expected)?;
    close(
        &on_host.astype(DType::F32).to_vec::<f32>()?,
        &expected.astype(DType::F32).to_vec::<f32>()?,
        1e-6,
        "a host pull of a GPU key",
    )?;
    // Host values pushed to a GPU key are copied to the GPUs and reduced there (for nccl, one
    // per GPU of its communicators).
    let count = if engine == Engine::Nccl { per_key } else { 2 };
    let pushed: Vec<NDArray> = (0..count)
        .map(|i| host(&[lens[0]], fdata(lens[0], 9 + i)))
        .collect();
    store.push(0i64, &pushed)?;
    local.push(0i64, &pushed)?;
    let mut after = NDArray::zeros(&[lens[0]], DType::F32);
    store.pull(0i64, &mut after)?;
    local.pull(0i64, &mut expected)?;
    close(
        &after.to_vec::<f32>()?,
        &expected.astype(DType::F32).to_vec::<f32>()?,
        1e-6,
        "host values pushed to a GPU key",
    )?;
    let refused = store.push(0i64, &NDArray::zeros(&[lens[0]], DType::F64));
    if !matches!(
        refused.as_ref().map_err(|e| e.root()),
        Err(kvstore_base::Error::DTypeMismatch { .. })
    ) {
        return Err(fail(format!(
            "a float64 host push to a GPU key: {refused:?}"
        )));
    }
    Ok(())
}

/// Calls on GPU arrays that are refused (a bad output, an output key without a value, a bad
/// value for one key of several, a row-sparse host key) leave every key as it was.
fn refused_gpu_ndarray_calls_change_nothing(info: &GpuInfo) -> TestResult {
    use kvstore_base::{Context, Error};
    let g = |v: f32, n: usize, i: usize| {
        NDArray::full(&[n], f64::from(v), DType::F32).to_context(Context::Gpu(dev(info, i)))
    };
    let kv = create("device")?;
    let value_of = |key: i64| -> Result<Vec<f32>, Failed> {
        let mut out = NDArray::zeros(&[2], DType::F32);
        kv.pull(key, &mut out)?;
        Ok(out.to_vec::<f32>()?)
    };
    kv.init(1, &g(1.0, 2, 0)?)?;
    // A pushpull whose output has the wrong shape: nothing pushed.
    let bad = kv.pushpull(1, &[g(7.0, 2, 0)?], &mut [g(0.0, 3, 1)?]);
    if !matches!(
        bad.as_ref().map_err(|e| e.root()),
        Err(Error::ShapeMismatch { .. })
    ) {
        return Err(fail(format!("a pushpull into a wrong shape: {bad:?}")));
    }
    if value_of(1)? != vec![1.0; 2] {
        return Err(fail("a refused pushpull changed the key"));
    }
    // A broadcast with an output key that has no value: no key initialised.
    kv.init(9, &NDArray::full(&[2], 9.0, DType::F32))?;
    let mut outs = [g(0.0, 2, 0)?, NDArray::zeros(&[2], DType::F32)];
    let bad = kv.broadcast(&[5i64], &[g(5.0, 2, 0)?], &mut outs[..]);
    if bad.is_ok() || value_of(5).is_ok() {
        return Err(fail(format!(
            "a broadcast with a stray output key: {bad:?}"
        )));
    }
    // Host values for a host key and a GPU key, the GPU key's of the wrong dtype: nothing.
    kv.init(2, &NDArray::full(&[2], 2.0, DType::F32))?;
    let bad = kv.push(
        &[2i64, 1],
        [
            &NDArray::full(&[2], 5.0, DType::F32),
            &NDArray::full(&[2], 5.0, DType::F64),
        ],
    );
    if !matches!(
        bad.as_ref().map_err(|e| e.root()),
        Err(Error::DTypeMismatch { .. })
    ) {
        return Err(fail(format!("a float64 value for a GPU key: {bad:?}")));
    }
    if value_of(2)? != vec![2.0; 2] || value_of(1)? != vec![1.0; 2] {
        return Err(fail("a refused mixed push changed a key"));
    }
    // A row-sparse host key does not move to the GPUs; a GPU key has no row-sparse pull.
    let rows = rsp(4, &[1], 3)?;
    kv.init(3, &rows)?;
    if kv
        .push(
            3,
            &NDArray::zeros(&[4, 7], DType::F32).to_context(Context::Gpu(0))?,
        )
        .is_ok()
    {
        return Err(fail("GPU arrays pushed to a row-sparse host key"));
    }
    let mut picked = NDArray::row_sparse(&[4, 7], vec![], &NDArray::zeros(&[0, 7], DType::F32))?;
    kv.row_sparse_pull(3, &mut picked, &NDArray::from_vec(&[1], vec![1i64])?)?;
    if picked.to_vec::<f32>()? != rows.to_vec::<f32>()? {
        return Err(fail("the row-sparse host key changed"));
    }
    let mut dense = NDArray::row_sparse(&[2], vec![], &NDArray::zeros(&[0], DType::F32))?;
    if kv
        .row_sparse_pull(1, &mut dense, &NDArray::from_vec(&[1], vec![0i64])?)
        .is_ok()
    {
        return Err(fail("a row-sparse pull of a GPU key"));
    }
    // Refused GPU pushes move no host key to the GPUs and push no host key's part.
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    store.init(
        &["h", "a"],
        [
            &NDArray::ones(&[1], DType::F32),
            &NDArray::ones(&[4], DType::F32),
        ],
    )?;
    let bad_shapes = store.push(&["a", "a"], [&g(1.0, 4, 0)?, &g(1.0, 3, 1)?]);
    let unknown = store.push(&["a", "zz"], [&g(1.0, 4, 0)?, &g(1.0, 4, 1)?]);
    let mixed = store.pushpull(
        &["h", "a", "a"],
        [
            &NDArray::full(&[1], 5.0, DType::F32),
            &g(1.0, 4, 0)?,
            &g(1.0, 3, 1)?,
        ],
        &mut [
            NDArray::zeros(&[1], DType::F32),
            NDArray::zeros(&[4], DType::F32),
        ][..],
    );
    if bad_shapes.is_ok() || unknown.is_ok() || mixed.is_ok() || !store.gpu_keys().is_empty() {
        return Err(fail(format!(
            "refused pushes: {bad_shapes:?} {unknown:?} {mixed:?}, GPU keys {:?}",
            store.gpu_keys()
        )));
    }
    let mut h = NDArray::zeros(&[1], DType::F32);
    store.pull("h", &mut h)?;
    if h.to_vec::<f32>()? != vec![1.0] {
        return Err(fail("a refused pushpull pushed its host key"));
    }
    // A host store given GPU outputs of one key (it sees the first, the others copy it): one
    // of another shape is refused before the call, naming it, and nothing is written or
    // pushed.
    let local = create("local")?;
    local.init(4, &NDArray::full(&[2], 4.0, DType::F32))?;
    let mut outs = [g(0.0, 2, 0)?, g(0.0, 2, 1)?, g(0.0, 3, 2)?];
    let bad = local.pushpull(4, &[g(1.0, 2, 0)?], &mut outs[..]);
    let named = bad
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default();
    if !matches!(
        bad.as_ref().map_err(|e| e.root()),
        Err(Error::ShapeMismatch { .. })
    ) || !named.contains("output 2")
        || !named.contains("local")
    {
        return Err(fail(format!(
            "local: a pushpull into GPU outputs of two shapes: {bad:?}"
        )));
    }
    let mut value = NDArray::zeros(&[2], DType::F32);
    local.pull(4, &mut value)?;
    let written: Vec<Vec<f32>> = outs
        .iter()
        .map(|o| o.to_vec::<f32>())
        .collect::<Result<_, _>>()?;
    if value.to_vec::<f32>()? != vec![4.0; 2] || written.iter().flatten().any(|&x| x != 0.0) {
        return Err(fail(format!(
            "local: a refused pushpull changed the key or wrote an output: {written:?}"
        )));
    }
    // Accepted: every GPU output gets the key's value.
    let mut outs = [g(0.0, 2, 0)?, g(0.0, 2, 1)?, g(0.0, 2, 2)?];
    local.pull(4, &mut outs[..])?;
    for (i, out) in outs.iter().enumerate() {
        if out.to_vec::<f32>()? != vec![4.0; 2] || out.context() != Context::Gpu(dev(info, i)) {
            return Err(fail(format!("local: GPU output {i} of a pull: {out:?}")));
        }
    }
    Ok(())
}

/// A state file that carries its optimizer (`dump_optimizer`) replaces the optimizer of GPU
/// keys too, as it does for host keys.
fn state_file_optimizer_reaches_gpu_keys(info: &GpuInfo) -> TestResult {
    use kvstore_base::Context;
    let path = std::env::temp_dir().join(format!("kvstore-gpu-states-{}", std::process::id()));
    let first = create("device")?;
    first.set_optimizer(&OptimizerSpec::new("sgd").with("learning_rate", 0.1))?;
    first.save_optimizer_states(&path, true)?;
    let second = create("device")?;
    second.set_optimizer(&OptimizerSpec::new("sgd").with("learning_rate", 1.0))?;
    let loaded = second.load_optimizer_states(&path);
    let _ = std::fs::remove_file(&path);
    loaded?;
    let on_gpu = NDArray::zeros(&[3], DType::F32).to_context(Context::Gpu(dev(info, 0)))?;
    second.init(1, &on_gpu)?;
    second.init(2, &NDArray::zeros(&[3], DType::F32))?;
    let grad = NDArray::ones(&[3], DType::F32);
    second.push(1, &grad.to_context(Context::Gpu(dev(info, 0)))?)?;
    second.push(2, &grad)?;
    let (mut a, mut b) = (
        NDArray::zeros(&[3], DType::F32),
        NDArray::zeros(&[3], DType::F32),
    );
    second.pull(1, &mut a)?;
    second.pull(2, &mut b)?;
    if a.to_vec::<f32>()? != b.to_vec::<f32>()? || b.to_vec::<f32>()? != vec![-0.1f32; 3] {
        return Err(fail(format!(
            "after loading sgd lr 0.1: GPU key {:?}, host key {:?}",
            a.to_vec::<f32>()?,
            b.to_vec::<f32>()?
        )));
    }
    Ok(())
}
