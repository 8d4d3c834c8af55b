//! The multi-worker stores with values and outputs in GPU memory: `dist_device_sync`,
//! `byteps` and `horovod` sum a key's GPU values on a GPU (this crate's backend) before
//! sending one array, and copy each received key to the GPUs once. Results are compared bit
//! for bit with the same calls on host arrays (`dist_sync` for `dist_device_sync`, the store
//! itself for the others), on jobs of two workers (two, so that the sum of the workers'
//! contributions does not depend on their arrival order) and, for the parameter servers, one
//! server.

use std::time::Duration;

use kvstore_base::{Context, DType, KVStoreBase, KVStoreExt, NDArray};
use kvstore_byteps as _;
use kvstore_device::GpuInfo;
use kvstore_dist::LocalCluster;
use kvstore_horovod::LocalJob;
use libtest_mimic::Failed;

use super::{data, dev, fail, host, TestResult};

/// Every wait of a job.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The shape of the key that takes several values per worker.
const SHAPE: [usize; 2] = [3, 347];

/// Runs `part` on each of the `workers` workers of a fresh job of `store` (one server for the
/// parameter servers, every node in this process); the results by rank.
pub fn job<T: Send>(
    store: &str,
    workers: usize,
    part: impl Fn(&dyn KVStoreBase) -> Result<T, Failed> + Sync,
) -> Result<Vec<T>, Failed> {
    let (options, finish): (_, Box<dyn FnOnce() -> kvstore_base::Result<()>>) =
        if store == "horovod" {
            let job = LocalJob::start(workers as u32, TIMEOUT)?;
            (job.worker_options().clone(), Box::new(move || job.finish()))
        } else {
            let cluster = LocalCluster::start(1, workers as u32, TIMEOUT)?;
            (
                cluster.worker_options().clone(),
                Box::new(move || cluster.finish()),
            )
        };
    let stores = kvstore_test::create_workers(workers, || {
        kvstore_base::create_with(store, options.clone())
    })?;
    let results: Vec<Result<T, Failed>> = std::thread::scope(|s| {
        let handles: Vec<_> = stores.iter().map(|kv| s.spawn(|| part(&**kv))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(fail("a worker panicked"))))
            .collect()
    });
    drop(stores);
    finish()?;
    results.into_iter().collect()
}

/// Value `i` of worker `rank`: values 1 and 2 are 1e8 and -1e8, so that a sum in another
/// association order than MXNet's loses the others.
fn value(rank: usize, i: usize) -> NDArray {
    let n = SHAPE.iter().product();
    match i {
        1 => NDArray::full(&SHAPE, 1e8, DType::F32),
        2 => NDArray::full(&SHAPE, -1e8, DType::F32),
        _ => host(&SHAPE, data(n, i + 7 * rank)),
    }
}

/// In GPU memory when `on` holds (value `i` on the GPU `dev(info, i)`), else as it is.
fn place(array: NDArray, info: &GpuInfo, i: usize, on: bool) -> Result<NDArray, Failed> {
    Ok(match on {
        true => array.to_context(Context::Gpu(dev(info, i)))?,
        false => array,
    })
}

/// One worker's part: a refused pushpull (a value of another shape, then an output of
/// another shape), which must send nothing; a pushpull of five values into three outputs
/// (two on GPUs with `gpu`); a push of one value and a pull into two outputs; a broadcast of
/// a new key into three outputs; an in-place pushpull of the five values. Everything pulled,
/// in host memory.
fn worker_part(kv: &dyn KVStoreBase, info: &GpuInfo, gpu: bool) -> Result<Vec<Vec<f32>>, Failed> {
    let rank = kv.rank();
    // `horovod` keeps no values: no init, push or pull.
    let keeps_values = kv.type_name() != "horovod";
    if keeps_values {
        kv.init(0, &NDArray::zeros(&SHAPE, DType::F32))?;
        kv.init(1, &host(&[7], data(7, 1)))?;
    }
    let values = (0..5)
        .map(|i| place(value(rank, i), info, i, gpu))
        .collect::<Result<Vec<_>, _>>()?;
    let mut outs = [
        place(NDArray::zeros(&SHAPE, DType::F32), info, 0, gpu)?,
        place(NDArray::zeros(&SHAPE, DType::F32), info, 1, gpu)?,
        NDArray::zeros(&SHAPE, DType::F32),
    ];
    let narrow = place(NDArray::zeros(&[3, 346], DType::F32), info, 2, gpu)?;
    let bad = vec![values[0].clone(), narrow.clone()];
    let err = kv.pushpull(0, &bad, &mut outs[..]).unwrap_err().to_string();
    if !(err.contains("key 0") && err.contains("346")) {
        return Err(fail(format!(
            "a value of another shape: the error names the key and the shape: {err}"
        )));
    }
    let mut narrow_outs = [narrow.clone()];
    if kv.pushpull(0, &values, &mut narrow_outs[..]).is_ok() {
        return Err(fail("an output of another shape was accepted"));
    }
    kv.pushpull(0, &values, &mut outs[..])?;
    let mut pulled = [
        place(NDArray::zeros(&[7], DType::F32), info, 0, gpu)?,
        place(NDArray::zeros(&[7], DType::F32), info, 1, gpu)?,
    ];
    let pushed = place(host(&[7], data(7, 3 + rank)), info, 1, gpu)?;
    match keeps_values {
        true => {
            kv.push(1, &pushed)?;
            kv.pull(1, &mut pulled[..])?;
        }
        false => kv.pushpull(1, &pushed, &mut pulled[..])?,
    }
    // A broadcast of a new key into GPU and host outputs: rank 0's value everywhere.
    let mut broadcast = [
        place(NDArray::zeros(&[7], DType::F32), info, 0, gpu)?,
        place(NDArray::zeros(&[7], DType::F32), info, 1, gpu)?,
        NDArray::zeros(&[7], DType::F32),
    ];
    kv.broadcast(
        2,
        &place(host(&[7], data(7, 5 + rank)), info, 2, gpu)?,
        &mut broadcast[..],
    )?;
    if kv.type_name() == "byteps" {
        // BytePS broadcasts declared keys too: rank 0's new value.
        let again = place(host(&[7], data(7, 9 + rank)), info, 0, gpu)?;
        kv.broadcast(2, &again, &mut broadcast[..])?;
    }
    if !keeps_values {
        let refused = kv.push(0, &values[0]).unwrap_err();
        if !matches!(refused, kvstore_base::Error::Unsupported { .. }) {
            return Err(fail(format!("horovod: a push of a GPU value: {refused}")));
        }
    }
    // An in-place pushpull of the five values: each overwritten by the round's sum.
    let mut in_place = values;
    kv.pushpull_in_place(0, &mut in_place[..])?;
    outs.iter()
        .chain(&pulled)
        .chain(&broadcast)
        .chain(&in_place)
        .map(|o| o.to_vec::<f32>().map_err(Failed::from))
        .collect()
}

/// GPU values and outputs on `dist_device_sync` give bit for bit what host ones give on
/// `dist_sync`.
pub fn sums_as_dist_sync(info: &GpuInfo) -> TestResult {
    same_as_on_host(info, "dist_device_sync", "dist_sync")
}

/// GPU values and outputs on `byteps` give bit for bit what host ones give.
pub fn byteps_sums_as_on_host(info: &GpuInfo) -> TestResult {
    same_as_on_host(info, "byteps", "byteps")
}

/// GPU values and outputs on `horovod` give bit for bit what host ones give.
pub fn horovod_sums_as_on_host(info: &GpuInfo) -> TestResult {
    same_as_on_host(info, "horovod", "horovod")
}

/// [`worker_part`] with GPU arrays on `store` gives bit for bit what it gives with host
/// arrays on `host_store`, and sums each worker's values in MXNet's order.
fn same_as_on_host(info: &GpuInfo, store: &str, host_store: &str) -> TestResult {
    let on_gpus = job(store, 2, |kv| worker_part(kv, info, true))?;
    let on_host = job(host_store, 2, |kv| worker_part(kv, info, false))?;
    for (rank, (g, h)) in on_gpus.iter().zip(&on_host).enumerate() {
        for (i, (g, h)) in g.iter().zip(h).enumerate() {
            if g != h {
                let at = g.iter().zip(h).position(|(a, b)| a != b).unwrap_or(0);
                return Err(fail(format!(
                    "rank {rank}, output {i}: element {at} is {} on GPUs, {} on the host",
                    g.get(at).copied().unwrap_or(f32::NAN),
                    h.get(at).copied().unwrap_or(f32::NAN)
                )));
            }
        }
    }
    // Element 0 of each worker's values: v0 + (((1e8 + -1e8) + v3) + v4) in MXNet's order,
    // exactly v0 + v3 + v4 (small integers); adding one by one would round v0 away
    // (1e8 - 15 is not a float32).
    let expected: f32 = (0..2)
        .map(|r| {
            [0, 3, 4]
                .iter()
                .map(|&i| data(1, i + 7 * r)[0])
                .sum::<f32>()
        })
        .sum();
    if on_gpus[0][0][0] != expected {
        return Err(fail(format!(
            "element 0 of the sum is {}, {expected} expected",
            on_gpus[0][0][0]
        )));
    }
    Ok(())
}
