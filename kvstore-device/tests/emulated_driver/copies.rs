//! What crosses between the host and the GPUs, counted by the emulated driver
//! (`kvemu_host_copy_bytes`: bytes copied at the calling thread's request).

use kvstore_base::{Context, DType, KVStoreBase, KVStoreExt, NDArray};
use kvstore_device::{probe, GpuInfo};
use libtest_mimic::{Failed, Trial};

use crate::cases::{dev, dist, fail, TestResult};

/// Bytes this thread copied from the host to the GPUs (`to_device`) or back since the last
/// reset; `reset` starts counting again.
fn host_copy_bytes(to_device: bool, reset: bool) -> Result<u64, Failed> {
    // SAFETY: the emulated driver (the loaded `libcuda`) exports this function with this
    // signature; it reads and resets thread-local counters.
    unsafe {
        let lib = cudarc::driver::sys::culib();
        let get = lib.get::<unsafe extern "C" fn(i32, i32) -> u64>(b"kvemu_host_copy_bytes\0")?;
        Ok(get(i32::from(to_device), i32::from(reset)))
    }
}

/// Bytes copied (to the host, to the GPUs) by a push of three GPU values of 1000 float32 to
/// one key, by a pull of it into three GPU outputs, and by an in-place pushpull of three GPU
/// values (shared with clones, the pushed values), on a one-worker job of `store`.
fn traffic(store: &str, info: &GpuInfo) -> Result<[(u64, u64); 3], Failed> {
    let mut counts = dist::job(store, 1, |kv: &dyn KVStoreBase| {
        kv.init(0, &NDArray::zeros(&[1000], DType::F32))?;
        let on_gpu =
            |i: usize| NDArray::ones(&[1000], DType::F32).to_context(Context::Gpu(dev(info, i)));
        let values = (0..3).map(on_gpu).collect::<Result<Vec<_>, _>>()?;
        let mut outs = (0..3).map(on_gpu).collect::<Result<Vec<_>, _>>()?;
        let measure = |call: &mut dyn FnMut() -> kvstore_base::Result<()>| {
            host_copy_bytes(false, true)?;
            host_copy_bytes(true, true)?;
            call()?;
            Ok::<_, Failed>((host_copy_bytes(false, true)?, host_copy_bytes(true, true)?))
        };
        let push = measure(&mut || kv.push(0, &values[..]))?;
        let pull = measure(&mut || kv.pull(0, &mut outs[..]))?;
        let mut in_place = values.clone();
        let both = measure(&mut || kv.pushpull_in_place(0, &mut in_place[..]))?;
        for out in &outs {
            if out.to_vec::<f32>()? != vec![3.0; 1000] {
                return Err(fail(format!("{store}: a pulled output is not the sum")));
            }
        }
        if in_place
            .iter()
            .any(|v| v.to_vec::<f32>().ok() != Some(vec![3.0; 1000]))
        {
            return Err(fail(format!(
                "{store}: an in-place pushpull gave another sum"
            )));
        }
        Ok([push, pull, both])
    })?;
    Ok(counts.remove(0))
}

/// `dist_device_sync` (and `byteps`) sum a key's GPU values on a GPU and copy one array to
/// the host per push, and one to a GPU per pull (the other outputs are filled GPU to GPU),
/// where `dist_sync` copies every value and every output.
fn dist_device_sync_copies_one_array_per_key(info: &GpuInfo) -> TestResult {
    const BYTES: u64 = 4000;
    let device = traffic("dist_device_sync", info)?;
    let host = traffic("dist_sync", info)?;
    let want_device = [(BYTES, 0), (0, BYTES), (BYTES, BYTES)];
    for (store, copied) in [
        ("dist_device_sync", device),
        ("byteps", traffic("byteps", info)?),
    ] {
        if copied != want_device {
            return Err(fail(format!(
                "{store} copied (to the host, to the GPUs) {copied:?} for the push, the pull \
                 and the in-place pushpull, {want_device:?} expected"
            )));
        }
    }
    // `dist_sync` stages through the host: every value; a pull writes its key's result into
    // one host stand-in, copied to the first GPU output and from there to the others, GPU to
    // GPU; an in-place pushpull reads and writes every value.
    let want_host = [(3 * BYTES, 0), (0, BYTES), (3 * BYTES, 3 * BYTES)];
    if host != want_host {
        return Err(fail(format!(
            "dist_sync copied {host:?}, {want_host:?} expected"
        )));
    }
    Ok(())
}

/// `horovod` (pushpull and broadcast only) copies one array per key each way for a pushpull
/// of three GPU values into three GPU outputs, and for a broadcast into three GPU outputs.
fn horovod_copies_one_array_per_key(info: &GpuInfo) -> TestResult {
    const BYTES: u64 = 4000;
    let copied = dist::job("horovod", 1, |kv: &dyn KVStoreBase| {
        let on_gpu =
            |i: usize| NDArray::ones(&[1000], DType::F32).to_context(Context::Gpu(dev(info, i)));
        let values = (0..3).map(on_gpu).collect::<Result<Vec<_>, _>>()?;
        let mut outs = (0..3).map(on_gpu).collect::<Result<Vec<_>, _>>()?;
        host_copy_bytes(false, true)?;
        host_copy_bytes(true, true)?;
        kv.pushpull(0, &values[..], &mut outs[..])?;
        let pushpull = (host_copy_bytes(false, true)?, host_copy_bytes(true, true)?);
        kv.broadcast(1, &values[0], &mut outs[..])?;
        let broadcast = (host_copy_bytes(false, true)?, host_copy_bytes(true, true)?);
        Ok([pushpull, broadcast])
    })?;
    let want = [(BYTES, BYTES), (BYTES, BYTES)];
    match copied[0] == want {
        true => Ok(()),
        false => Err(fail(format!(
            "horovod copied (to the host, to the GPUs) {:?} for the pushpull and the broadcast, \
             {want:?} expected",
            copied[0]
        ))),
    }
}

/// The checks of one emulated run, named `<prefix>::copies::...`.
pub fn trials(prefix: &str) -> Vec<Trial> {
    vec![
        Trial::test(
            format!("{prefix}::copies::dist_device_sync_copies_one_array_per_key"),
            || dist_device_sync_copies_one_array_per_key(&probe()?),
        ),
        Trial::test(
            format!("{prefix}::copies::horovod_copies_one_array_per_key"),
            || horovod_copies_one_array_per_key(&probe()?),
        ),
    ]
}
