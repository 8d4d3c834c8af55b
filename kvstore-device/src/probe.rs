//! [`probe`]: is there a CUDA driver and a GPU, without ever panicking.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use cudarc::driver::CudaContext;
use kvstore_base::{Error, Result};

/// One visible GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDevice {
    /// The CUDA ordinal (`Context::Gpu(ordinal)`).
    pub ordinal: usize,
    /// The device name the driver reports.
    pub name: String,
    /// Total memory in bytes.
    pub total_memory: usize,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
}

/// What [`probe`] found: the GPUs, and whether the libraries the kernels and the `nccl`
/// store need can be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Every visible GPU, by ordinal; never empty.
    pub devices: Vec<GpuDevice>,
    /// `libnvrtc` (run-time compilation of the reduction and optimizer kernels) loads.
    pub nvrtc: bool,
    /// `libnccl` (the `nccl` store) loads.
    pub nccl: bool,
}

/// Looks for a CUDA driver and GPUs. Never panics: the shared libraries are opened with
/// fallible loaders first, and the few driver calls made after that run under
/// `catch_unwind` (cudarc panics on a symbol the loaded driver lacks). The answer is computed
/// once per process.
///
/// # Errors
/// [`Error::Device`] naming what is missing: `no CUDA driver: libcuda.so.1 not found ...`,
/// a driver that fails to initialise, or no device.
pub fn probe() -> Result<GpuInfo> {
    static PROBE: OnceLock<std::result::Result<GpuInfo, String>> = OnceLock::new();
    PROBE
        .get_or_init(probe_uncached)
        .clone()
        .map_err(Error::Device)
}

/// Whether `libnccl` can be loaded (checked without touching any NCCL function).
pub(crate) fn nccl_present() -> bool {
    // SAFETY: only tries `dlopen` on the candidate names; runs no library code but the
    // library's initialisers, as any `dlopen` does.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn probe_uncached() -> std::result::Result<GpuInfo, String> {
    if std::env::var_os("KVSTORE_DEVICE_DISABLE").is_some_and(|v| v != "0") {
        return Err("no CUDA driver: disabled by KVSTORE_DEVICE_DISABLE".into());
    }
    // SAFETY: as in `nccl_present`.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(
            "no CUDA driver: libcuda.so.1 not found (install the NVIDIA driver or set \
             LD_LIBRARY_PATH)"
                .into(),
        );
    }
    let found = catch_unwind(AssertUnwindSafe(
        || -> std::result::Result<GpuInfo, String> {
            let count = CudaContext::device_count().map_err(|e| {
                format!("no usable CUDA driver: cuInit/cuDeviceGetCount failed: {e}")
            })?;
            if count <= 0 {
                return Err("no CUDA device: the driver loads but reports 0 GPUs".into());
            }
            let mut devices = Vec::new();
            for ordinal in 0..count as usize {
                let ctx = CudaContext::new(ordinal)
                    .map_err(|e| format!("CUDA device {ordinal} cannot be opened: {e}"))?;
                devices.push(GpuDevice {
                    ordinal,
                    name: ctx.name().unwrap_or_else(|_| "unknown".into()),
                    total_memory: ctx.total_mem().unwrap_or(0),
                    compute_capability: ctx.compute_capability().unwrap_or((0, 0)),
                });
            }
            // SAFETY: as in `nccl_present`.
            let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
            Ok(GpuInfo {
                devices,
                nvrtc,
                nccl: nccl_present(),
            })
        },
    ));
    match found {
        Ok(result) => result,
        Err(panic) => Err(format!(
            "no usable CUDA driver: the driver library lacks a needed function ({})",
            panic_text(&*panic)
        )),
    }
}

pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}
