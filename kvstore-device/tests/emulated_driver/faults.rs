//! Checks only the emulated driver can run: the GPU running out of memory at every allocation
//! of a call, one after the other. A push or a pull that fails that way must leave the store
//! as it was (every value, optimizer state, update count and residual; every output), and
//! the same call must then succeed and give what the CPU path gives.

use kvstore_base::{
    CompressionParams, DType, KVStoreBase, KVStoreExt, Key, NDArray, OptimizerSpec,
};
use kvstore_device::{probe, DeviceArray, DeviceRowSparse, DeviceStore, Engine, GpuInfo};
use kvstore_local::reduce::ReduceConfig;
use libtest_mimic::{Failed, Trial};

use crate::cases::{close, dev, fail, fdata, host, key_values, rsp, KeyValues, TestResult};

/// Makes every allocation of this thread fail after `n` more (`None`: never), through the
/// emulated driver's control function.
fn fail_allocations_after(n: Option<i64>) -> TestResult {
    // SAFETY: the emulated driver (the loaded `libcuda`) exports this function with this
    // signature; it only sets a thread-local counter.
    unsafe {
        let lib = cudarc::driver::sys::culib();
        let set = lib.get::<unsafe extern "C" fn(i64)>(b"kvemu_fail_allocations_after\0")?;
        set(n.unwrap_or(-1));
    }
    Ok(())
}

/// Runs `call` with allocations failing after `n`, then lets them succeed again.
fn with_allocations_failing_after<T>(
    n: i64,
    call: impl FnOnce() -> kvstore_base::Result<T>,
) -> Result<kvstore_base::Result<T>, Failed> {
    fail_allocations_after(Some(n))?;
    let result = call();
    fail_allocations_after(None)?;
    Ok(result)
}

/// The keys of the scenario and their lengths; the last is initialised after the first push,
/// so the tested push places it.
const KEYS: [(i64, usize); 3] = [(0, 1000), (1, 37), (2, 4097)];

/// What a scenario sets on both stores.
#[derive(Clone)]
struct Setting {
    engine: Engine,
    optimizer: Option<OptimizerSpec>,
    compression: Option<&'static str>,
}

/// A GPU-valued store and a CPU-valued one with the same setting, past one push of the first
/// keys, the last key initialised after it.
fn stores(info: &GpuInfo, setting: &Setting) -> Result<(DeviceStore, DeviceStore), Failed> {
    let name = match setting.engine {
        Engine::Nccl => "nccl",
        Engine::Device => "device",
    };
    let gpu = DeviceStore::new(name, setting.engine, ReduceConfig::default());
    let cpu = DeviceStore::new(name, setting.engine, ReduceConfig::default());
    for &(k, n) in &KEYS[..2] {
        gpu.init_gpu(k, &host(&[n], fdata(n, 100 + k as usize)))?;
        cpu.init(k, &host(&[n], fdata(n, 100 + k as usize)))?;
    }
    for s in [&gpu, &cpu] {
        if let Some(kind) = setting.compression {
            s.set_gradient_compression(&CompressionParams::from([(
                "type".to_string(),
                kind.to_string(),
            )]))?;
        }
        if let Some(spec) = &setting.optimizer {
            s.set_optimizer(spec)?;
        }
    }
    push_both(info, setting, &gpu, &cpu, &KEYS[..2], 0)?;
    let (k, n) = KEYS[2];
    gpu.init_gpu(k, &host(&[n], fdata(n, 100 + k as usize)))?;
    cpu.init(k, &host(&[n], fdata(n, 100 + k as usize)))?;
    Ok((gpu, cpu))
}

/// The values of `round` for `keys`: on the host, and on the GPUs (one per GPU for `nccl`,
/// three spread over the GPUs for `device`).
fn round_values(
    info: &GpuInfo,
    setting: &Setting,
    keys: &[(i64, usize)],
    round: usize,
) -> Result<KeyValues, Failed> {
    let count = match setting.engine {
        Engine::Nccl => info.devices.len(),
        Engine::Device => 3,
    };
    let lens: Vec<usize> = keys.iter().map(|&(_, n)| n).collect();
    key_values(info, &lens, count, |k, i| {
        7 * round + 3 * keys[k].0 as usize + i
    })
}

/// The GPU store's batch push of `gpus` (per key of `keys`).
fn push_gpu_values(
    gpu: &DeviceStore,
    keys: &[(i64, usize)],
    gpus: &[Vec<DeviceArray>],
) -> kvstore_base::Result<()> {
    let refs: Vec<Vec<&DeviceArray>> = gpus.iter().map(|vs| vs.iter().collect()).collect();
    let batch: Vec<(Key, &[&DeviceArray])> = keys
        .iter()
        .zip(&refs)
        .map(|(&(k, _), r)| (k.into(), &r[..]))
        .collect();
    gpu.push_gpu_batch(&batch)
}

/// One push of `round` to `keys` on both stores.
fn push_both(
    info: &GpuInfo,
    setting: &Setting,
    gpu: &DeviceStore,
    cpu: &DeviceStore,
    keys: &[(i64, usize)],
    round: usize,
) -> TestResult {
    let (hosts, gpus) = round_values(info, setting, keys, round)?;
    push_gpu_values(gpu, keys, &gpus)?;
    for (&(k, _), hs) in keys.iter().zip(&hosts) {
        cpu.push(k, &hs[..])?;
    }
    Ok(())
}

/// Every key's value in the GPU store, on the host.
fn gpu_values(info: &GpuInfo, gpu: &DeviceStore) -> Result<Vec<Vec<f32>>, Failed> {
    KEYS.iter()
        .map(|&(k, n)| {
            let mut out = DeviceArray::zeros(&[n], dev(info, 1))?;
            gpu.pull_gpu(k, &mut [&mut out])?;
            Ok(out.to_host()?.to_vec::<f32>()?)
        })
        .collect()
}

/// The GPU store holds what the CPU store holds.
fn same_as_cpu(info: &GpuInfo, gpu: &DeviceStore, cpu: &DeviceStore, what: &str) -> TestResult {
    for (&(k, n), got) in KEYS.iter().zip(gpu_values(info, gpu)?) {
        let mut expected = NDArray::zeros(&[n], DType::F32);
        cpu.pull(k, &mut expected)?;
        close(
            &got,
            &expected.to_vec::<f32>()?,
            1e-6,
            &format!("{what}, key {k}"),
        )?;
    }
    Ok(())
}

/// Fails the allocations of the scenario's second push at each point in turn (a fresh pair of
/// stores each time): the failed push changes no value, and the same push, then another one,
/// give what the CPU path gives (so neither a state, a count nor a residual moved).
fn push_out_of_memory(info: &GpuInfo, setting: &Setting) -> TestResult {
    for allowed in 0i64.. {
        let (gpu, cpu) = stores(info, setting)?;
        let (hosts, gpus) = round_values(info, setting, &KEYS, 1)?;
        let before = gpu_values(info, &gpu)?;
        let result =
            with_allocations_failing_after(allowed, || push_gpu_values(&gpu, &KEYS, &gpus))?;
        let after = gpu_values(info, &gpu)?;
        if attempt_succeeded("push", allowed, result, &before, &after)? {
            // Every allocation point was failed once: this push ran through.
            return Ok(());
        }
        push_gpu_values(&gpu, &KEYS, &gpus)?;
        for (&(k, _), hs) in KEYS.iter().zip(&hosts) {
            cpu.push(k, &hs[..])?;
        }
        same_as_cpu(
            info,
            &gpu,
            &cpu,
            &format!("the push retried after allocation {allowed}"),
        )?;
        push_both(info, setting, &gpu, &cpu, &KEYS, 2)?;
        same_as_cpu(
            info,
            &gpu,
            &cpu,
            &format!("the next push after allocation {allowed}"),
        )?;
    }
    unreachable!("the loop returns")
}

/// A row-sparse pull into outputs on every GPU, failing at each allocation in turn, leaves
/// every output as it was.
fn row_sparse_pull_out_of_memory(info: &GpuInfo) -> TestResult {
    let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
    let shape = [40usize, 7];
    store.init_gpu("e", &rsp(40, &[1, 7, 30], 1)?)?;
    let mut values = Vec::new();
    for i in 0..3i64 {
        let value = rsp(40, &[i, 7, 20 + i], 2 + i as usize)?;
        values.push(DeviceRowSparse::from_host(&value, dev(info, i as usize))?);
    }
    store.push_gpu_row_sparse("e", &values.iter().collect::<Vec<_>>())?;
    let ids: Vec<NDArray> = (0..3)
        .map(|i| NDArray::from_vec(&[3], vec![7i64, 20 + i, 39]))
        .collect::<Result<_, _>>()?;
    let id_refs: Vec<&NDArray> = ids.iter().collect();
    for allowed in 0i64.. {
        let mut outs = (0..3)
            .map(|i| DeviceRowSparse::zeros(&shape, dev(info, i)))
            .collect::<Result<Vec<_>, _>>()?;
        let before = outs
            .iter()
            .map(|o| o.to_host())
            .collect::<Result<Vec<_>, _>>()?;
        let mut out_refs: Vec<&mut DeviceRowSparse> = outs.iter_mut().collect();
        let result = with_allocations_failing_after(allowed, || {
            store.row_sparse_pull_gpu("e", &mut out_refs, &id_refs)
        })?;
        let after = outs
            .iter()
            .map(|o| o.to_host())
            .collect::<Result<Vec<_>, _>>()?;
        if pull_succeeded(allowed, result, &before, &after)? {
            return Ok(());
        }
    }
    unreachable!("the loop returns")
}

/// Every row of the row-sparse GPU key `e` (of `rows` rows), on the host.
fn all_rows(store: &DeviceStore, rows: usize) -> Result<NDArray, Failed> {
    let ids = NDArray::from_vec(&[rows], (0..rows as i64).collect())?;
    let mut out = DeviceRowSparse::zeros(&[rows, 7], 0)?;
    store.row_sparse_pull_gpu("e", &mut [&mut out], &[&ids])?;
    Ok(out.to_host()?)
}

/// A push of row-sparse values from every GPU to a key storing every row (with `optimizer`,
/// or none), failing at each allocation in turn (the key's placement at the first push
/// included), leaves the key as it was; retried, and pushed again, it gives what `local`
/// gives (the optimizer states and update count untouched by the failure).
fn row_sparse_push_out_of_memory(info: &GpuInfo, optimizer: Option<&OptimizerSpec>) -> TestResult {
    let every: Vec<i64> = (0..40).collect();
    let values = |round: usize| -> Result<(Vec<NDArray>, Vec<DeviceRowSparse>), Failed> {
        let hosts: Vec<NDArray> = (0..3)
            .map(|i| {
                rsp(
                    40,
                    &[i as i64, 7, 20 + i as i64 + round as i64],
                    2 + i + round,
                )
            })
            .collect::<Result<_, _>>()?;
        let gpus = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| DeviceRowSparse::from_host(h, dev(info, i)))
            .collect::<Result<_, _>>()?;
        Ok((hosts, gpus))
    };
    for allowed in 0i64.. {
        let store = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
        let local = kvstore_base::create("local")?;
        let init = rsp(40, &every, 1)?;
        store.init_gpu("e", &init)?;
        local.init("e", &init)?;
        if let Some(spec) = optimizer {
            store.set_optimizer(spec)?;
            local.set_optimizer(spec)?;
        }
        let (hosts, gpus) = values(0)?;
        let refs: Vec<&DeviceRowSparse> = gpus.iter().collect();
        let before = all_rows(&store, 40)?;
        let result =
            with_allocations_failing_after(allowed, || store.push_gpu_row_sparse("e", &refs))?;
        let after = all_rows(&store, 40)?;
        if attempt_succeeded("row-sparse push", allowed, result, &before, &after)? {
            return Ok(());
        }
        for round in [0, 1] {
            let (hosts, gpus) = if round == 0 {
                (hosts.clone(), Vec::new())
            } else {
                values(round)?
            };
            let refs: Vec<&DeviceRowSparse> = match round {
                0 => refs.clone(),
                _ => gpus.iter().collect(),
            };
            store.push_gpu_row_sparse("e", &refs)?;
            local.push("e", &hosts[..])?;
            let ids = NDArray::from_vec(&[40], every.clone())?;
            let mut want = rsp(40, &[], 0)?;
            local.row_sparse_pull("e", &mut want, &ids)?;
            close(
                &all_rows(&store, 40)?.to_vec::<f32>()?,
                &want.to_vec::<f32>()?,
                1e-6,
                &format!("push {round} after allocation {allowed} failed"),
            )?;
        }
    }
    unreachable!("the loop returns")
}

/// A `row_sparse_pull` through `KVStoreExt` of two keys into row-sparse outputs in GPU memory
/// (and one on the host), the GPU running out of memory at each allocation in turn, leaves
/// every output as it was: on `device` (row-sparse GPU keys, gathered on their GPU) and
/// `local` (staged through the host).
fn ndarray_row_sparse_pull_out_of_memory(kv: &dyn KVStoreBase, info: &GpuInfo) -> TestResult {
    use kvstore_base::Context;
    let on_gpu = |a: &NDArray, i: usize| a.to_context(Context::Gpu(dev(info, i)));
    for (key, seed) in [("e", 1), ("f", 2)] {
        kv.init(
            key,
            &on_gpu(&rsp(40, &(0..40).collect::<Vec<i64>>(), seed)?, 0)?,
        )?;
    }
    let ids = NDArray::from_vec(&[3], vec![39i64, 0, 7])?;
    let keys = ["e", "f"].map(kvstore_base::Key::from);
    for allowed in 0i64.. {
        // Two outputs of `e` on GPUs, one of `f` on the host.
        let mut outs = vec![
            vec![
                on_gpu(&rsp(40, &[2], 5)?, 0)?,
                on_gpu(&rsp(40, &[3], 6)?, 1)?,
            ],
            vec![rsp(40, &[4], 7)?],
        ];
        let host_copies = |outs: &[Vec<NDArray>]| {
            outs.iter()
                .flatten()
                .map(|o| o.to_context(Context::Cpu))
                .collect::<kvstore_base::Result<Vec<_>>>()
        };
        let before = host_copies(&outs)?;
        let result = with_allocations_failing_after(allowed, || {
            kv.row_sparse_pull(&keys[..], &mut outs, &ids)
        })?;
        let after = host_copies(&outs)?;
        if pull_succeeded(allowed, result, &before, &after)? {
            return Ok(());
        }
    }
    unreachable!("the loop returns")
}

/// Whether `what` (a push, a pull) allowed `allowed` allocations succeeded; an error unless
/// it did with some allocations, or failed out of memory leaving what it writes as it was
/// (`before`).
fn attempt_succeeded<T: PartialEq>(
    what: &str,
    allowed: i64,
    result: kvstore_base::Result<()>,
    before: &T,
    after: &T,
) -> Result<bool, Failed> {
    match result {
        Ok(()) if allowed == 0 => Err(fail(format!(
            "the {what} allocates nothing: the scenario tests nothing"
        ))),
        Ok(()) => Ok(true),
        Err(e) if !e.to_string().contains("OUT_OF_MEMORY") => Err(fail(format!(
            "allocation {allowed} failed with another error: {e}"
        ))),
        Err(e) if after != before => Err(fail(format!(
            "a {what} failing at allocation {allowed} changed what it writes ({e})"
        ))),
        Err(_) => Ok(false),
    }
}

/// As [`attempt_succeeded`], for a pull.
fn pull_succeeded<T: PartialEq>(
    allowed: i64,
    result: kvstore_base::Result<()>,
    before: &T,
    after: &T,
) -> Result<bool, Failed> {
    attempt_succeeded("pull", allowed, result, before, after)
}

/// A pull into three GPU outputs and a host one through `kv` (a store that stages the GPU
/// ones through the host, or `dist_device_sync`, which copies each key to the GPUs once), the
/// outputs sharing their memory with clones (so writing them allocates), the GPU running out
/// of memory at each allocation in turn: a failed pull leaves every output as it was, and
/// the clones are never written.
fn staged_pull_out_of_memory(kv: &dyn KVStoreBase, info: &GpuInfo) -> TestResult {
    let shape = [500usize];
    kv.init(0, &NDArray::zeros(&shape, DType::F32))?;
    let values: Vec<NDArray> = (0..3)
        .map(|i| NDArray::full(&shape, i as f64 + 1.0, DType::F32))
        .collect();
    kv.push(0, &values[..])?;
    // Three outputs on GPUs, and one on the host that the call itself writes.
    let mut originals = (0..3)
        .map(|i| {
            NDArray::full(&shape, -1.0 - i as f64, DType::F32)
                .to_context(kvstore_base::Context::Gpu(dev(info, i)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    originals.push(NDArray::full(&shape, -9.0, DType::F32));
    let before = originals
        .iter()
        .map(|o| o.to_vec::<f32>())
        .collect::<Result<Vec<_>, _>>()?;
    for allowed in 0i64.. {
        let mut outs = originals.clone();
        let result = with_allocations_failing_after(allowed, || kv.pull(0, &mut outs[..]))?;
        let after = outs
            .iter()
            .map(|o| o.to_vec::<f32>())
            .collect::<Result<Vec<_>, _>>()?;
        for (o, b) in originals.iter().zip(&before) {
            if o.to_vec::<f32>()? != *b {
                return Err(fail("a pull wrote into a clone of its output"));
            }
        }
        if pull_succeeded(allowed, result, &before, &after)? {
            return match after.iter().all(|o| *o == vec![6.0; 500]) {
                true => Ok(()),
                false => Err(fail(format!("a pull gave {:?}...", &after[0][..3]))),
            };
        }
    }
    unreachable!("the loop returns")
}

/// The fault checks of one emulated run, named `<prefix>::faults::...`.
pub fn trials(prefix: &str) -> Vec<Trial> {
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9);
    let adam = OptimizerSpec::new("adam").with("learning_rate", 0.01);
    let push_settings = [
        ("device_plain", Engine::Device, None, None),
        (
            "device_sgd_momentum",
            Engine::Device,
            Some(sgd.clone()),
            None,
        ),
        ("device_adam", Engine::Device, Some(adam.clone()), None),
        ("device_2bit_sgd", Engine::Device, Some(sgd), Some("2bit")),
        ("device_1bit", Engine::Device, None, Some("1bit")),
        ("nccl_plain", Engine::Nccl, None, None),
        ("nccl_adam", Engine::Nccl, Some(adam), None),
    ];
    let mut trials: Vec<Trial> = push_settings
        .into_iter()
        .map(|(name, engine, optimizer, compression)| {
            let setting = Setting {
                engine,
                optimizer,
                compression,
            };
            Trial::test(
                format!("{prefix}::faults::out_of_memory_in_a_push_changes_nothing_{name}"),
                move || push_out_of_memory(&probe()?, &setting),
            )
        })
        .collect();
    trials.push(Trial::test(
        format!("{prefix}::faults::out_of_memory_in_a_row_sparse_pull_changes_no_output"),
        || row_sparse_pull_out_of_memory(&probe()?),
    ));
    let row_settings = [
        ("plain", None),
        (
            "lazy_adam",
            Some(OptimizerSpec::new("adam").with("learning_rate", 0.01)),
        ),
        ("adagrad_on_the_host", Some(OptimizerSpec::new("adagrad"))),
    ];
    for (name, optimizer) in row_settings {
        trials.push(Trial::test(
            format!("{prefix}::faults::out_of_memory_in_a_row_sparse_push_changes_nothing_{name}"),
            move || row_sparse_push_out_of_memory(&probe()?, optimizer.as_ref()),
        ));
    }
    for store in ["device", "local"] {
        trials.push(Trial::test(
            format!(
                "{prefix}::faults::out_of_memory_in_a_row_sparse_pull_of_gpu_ndarrays_changes_no_output_{store}"
            ),
            move || {
                let info = probe()?;
                ndarray_row_sparse_pull_out_of_memory(&*kvstore_base::create(store)?, &info)
            },
        ));
    }
    trials.push(Trial::test(
        format!("{prefix}::faults::out_of_memory_in_a_staged_pull_changes_no_output"),
        || {
            let info = probe()?;
            staged_pull_out_of_memory(&*kvstore_base::create("local")?, &info)
        },
    ));
    trials.push(Trial::test(
        format!("{prefix}::faults::out_of_memory_in_a_dist_device_sync_pull_changes_no_output"),
        || {
            let info = probe()?;
            crate::cases::dist::job("dist_device_sync", 1, |kv| {
                staged_pull_out_of_memory(kv, &info)
            })
            .map(|_| ())
        },
    ));
    trials
}
