//! Compiling the kernels ([`kernel_source`](crate::gpu::kernel_source)) with NVRTC into an
//! image a GPU's driver loads, and loading it.
//!
//! Machine code (a cubin) for the GPU's own compute capability comes first: a driver loads it
//! as it is, even when the NVRTC that built it is newer than the driver (CUDA's minor-version
//! compatibility). PTX is the fallback (an NVRTC too old for the GPU's architecture): the
//! driver compiles it itself, which a driver older than the NVRTC refuses
//! (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`). When both fail, the error gives both reasons, the
//! NVRTC version and the CUDA version the driver supports.

use std::collections::HashMap;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{
    compile_ptx_with_opts, result as nvrtc, sys as nvrtc_sys, CompileOptions, Ptx,
};
use kvstore_base::{Error, Result};

use crate::gpu::kernel_source;
use crate::probe::panic_text;

/// A GPU's compute capability, `(major, minor)`.
pub type ComputeCapability = (i32, i32);

/// The NVRTC options of every kernel: no fused multiply-add, IEEE division and square root,
/// denormals kept, so that each operation rounds as the CPU code's does.
const OPTIONS: [&str; 4] = [
    "--fmad=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--ftz=false",
];

/// The option naming the real architecture of `capability` (`--gpu-architecture=sm_90`).
fn architecture_option(capability: ComputeCapability) -> String {
    format!("--gpu-architecture=sm_{}{}", capability.0, capability.1)
}

/// Fails with the reason when `libnvrtc` cannot be loaded.
fn require_nvrtc() -> Result<()> {
    // SAFETY: only tries `dlopen` on the candidate names, as the probe does.
    if unsafe { nvrtc_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Device(
            "no NVRTC: libnvrtc not found (the GPU kernels are compiled at run time; \
             install the CUDA toolkit's NVRTC or set LD_LIBRARY_PATH)"
                .into(),
        ))
    }
}

/// Compiles the kernels to PTX (as the runtime does when no machine code can be built for a
/// GPU) and returns its text. Needs `libnvrtc` only, no driver or GPU.
///
/// # Errors
/// [`Error::Device`] when `libnvrtc` cannot be loaded or the compilation fails (with NVRTC's
/// log).
pub fn compile_kernels() -> Result<String> {
    compile_ptx().map(|ptx| ptx.to_src())
}

fn compile_ptx() -> Result<Ptx> {
    require_nvrtc()?;
    let options = CompileOptions {
        options: OPTIONS.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    };
    match catch_unwind(|| compile_ptx_with_opts(kernel_source(), options)) {
        Ok(ptx) => ptx.map_err(|e| Error::Device(format!("NVRTC compile: {e}"))),
        Err(p) => Err(Error::Device(format!("NVRTC failed: {}", panic_text(&*p)))),
    }
}

/// Compiles the kernels to machine code for GPUs of `capability` (an ELF cubin), as the
/// runtime loads them. Needs `libnvrtc` only, no driver or GPU.
///
/// # Errors
/// [`Error::Device`] when `libnvrtc` cannot be loaded, does not know the architecture, or the
/// compilation fails (with NVRTC's log).
pub fn compile_kernels_for(capability: ComputeCapability) -> Result<Vec<u8>> {
    require_nvrtc()?;
    let source = CString::new(kernel_source())
        .map_err(|_| Error::Device("the kernel source holds a NUL byte".into()))?;
    let mut options: Vec<String> = OPTIONS.iter().map(|o| o.to_string()).collect();
    options.push(architecture_option(capability));
    let compiled = catch_unwind(AssertUnwindSafe(|| cubin_of(&source, &options)));
    match compiled {
        Ok(cubin) => cubin.map_err(|e| {
            Error::Device(format!(
                "NVRTC compile for sm_{}{}: {e}",
                capability.0, capability.1
            ))
        }),
        Err(p) => Err(Error::Device(format!("NVRTC failed: {}", panic_text(&*p)))),
    }
}

/// Runs NVRTC over `source` with `options` and returns the cubin, or NVRTC's error and log.
fn cubin_of(source: &CString, options: &[String]) -> std::result::Result<Vec<u8>, String> {
    let program = nvrtc::create_program(source, None).map_err(|e| e.to_string())?;
    // SAFETY: `program` was just created and is destroyed once, below; `source` outlives it.
    let result = unsafe { compiled_cubin(program, options) };
    // SAFETY: as above.
    let _ = unsafe { nvrtc::destroy_program(program) };
    result
}

/// # Safety
/// `program` must be a live program of [`nvrtc::create_program`].
unsafe fn compiled_cubin(
    program: nvrtc_sys::nvrtcProgram,
    options: &[String],
) -> std::result::Result<Vec<u8>, String> {
    // SAFETY (every call below): `program` is live, by this function's contract, and each
    // buffer passed is as large as NVRTC said it must be.
    if let Err(e) = unsafe { nvrtc::compile_program(program, options) } {
        let log = unsafe { nvrtc::get_program_log(program) }
            .map(|log| {
                let bytes: Vec<u8> = log
                    .iter()
                    .map(|&c| c as u8)
                    .take_while(|&b| b != 0)
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        return Err(format!("{e}: {}", log.trim()));
    }
    let mut size = 0usize;
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(program, &mut size) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBINSize: {e}"))?;
    if size == 0 {
        return Err("NVRTC produced no machine code".into());
    }
    let mut cubin = vec![0u8; size];
    unsafe { nvrtc_sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast()) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBIN: {e}"))?;
    Ok(cubin)
}

/// The NVRTC version, `(major, minor)`, when it can be read.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    require_nvrtc().ok()?;
    let (mut major, mut minor) = (0, 0);
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: writes two integers.
        unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
    }))
    .ok()?
    .result()
    .ok()?;
    Some((major, minor))
}

/// The newest CUDA version the driver supports (`cuDriverGetVersion`: 12040 for 12.4), when
/// it can be read.
pub fn driver_cuda_version() -> Option<i32> {
    let mut version = 0;
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: writes one integer; the driver library was loaded by the probe.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
    }))
    .ok()?
    .result()
    .ok()?;
    Some(version)
}

/// The kernel images of a process: the cubin of each compute capability and the PTX, each
/// compiled at most once (a failure is kept too, so it is not retried per GPU).
#[derive(Default)]
pub(crate) struct KernelImages {
    cubins: HashMap<ComputeCapability, std::result::Result<Vec<u8>, String>>,
    ptx: Option<std::result::Result<Ptx, String>>,
}

impl KernelImages {
    /// Loads the kernels into `ctx`, a context on a GPU of `capability`, and builds `T` from
    /// the module with `functions` (which looks the kernels up): machine code first, PTX if
    /// that fails. Returns `T` and what was loaded (`"sm_90 machine code"`, `"PTX"`).
    ///
    /// # Errors
    /// [`Error::Device`] naming the GPU, both failures, the NVRTC version and the driver's
    /// CUDA version.
    pub(crate) fn load<T>(
        &mut self,
        ctx: &Arc<CudaContext>,
        gpu: usize,
        capability: ComputeCapability,
        functions: impl Fn(&Arc<CudaModule>) -> Result<T>,
    ) -> Result<(T, String)> {
        let load = |image: Ptx| -> std::result::Result<T, String> {
            let module = ctx
                .load_module(image)
                .map_err(|e| format!("cuModuleLoadData: {e}"))?;
            functions(&module).map_err(|e| e.to_string())
        };
        let cubin = self
            .cubins
            .entry(capability)
            .or_insert_with(|| compile_kernels_for(capability).map_err(|e| e.to_string()));
        let machine_code = match cubin {
            Ok(bytes) => match load(Ptx::from_binary(bytes.clone())) {
                Ok(t) => {
                    return Ok((
                        t,
                        format!("sm_{}{} machine code", capability.0, capability.1),
                    ))
                }
                Err(e) => e,
            },
            Err(e) => e.clone(),
        };
        let ptx = self
            .ptx
            .get_or_insert_with(|| compile_ptx().map_err(|e| e.to_string()));
        let ptx = match ptx {
            Ok(ptx) => match load(ptx.clone()) {
                Ok(t) => {
                    log::warn!(
                        "gpu({gpu}): the kernels were loaded as PTX, since machine code for \
                         its architecture failed: {machine_code}"
                    );
                    return Ok((t, "PTX".to_string()));
                }
                Err(e) => e,
            },
            Err(e) => e.clone(),
        };
        Err(Error::Device(format!(
            "cannot load the GPU kernels on gpu({gpu}) (compute capability {}.{}): as machine \
             code: {machine_code}; as PTX: {ptx}; {}",
            capability.0,
            capability.1,
            versions()
        )))
    }
}

/// The NVRTC and driver versions, and what to do when the NVRTC is the newer.
fn versions() -> String {
    let nvrtc = nvrtc_version();
    let driver = driver_cuda_version();
    let mut text = format!(
        "NVRTC {}, driver for CUDA {}",
        nvrtc.map_or("unknown".into(), |(major, minor)| format!(
            "{major}.{minor}"
        )),
        driver.map_or("unknown".into(), |v| format!(
            "{}.{}",
            v / 1000,
            (v % 1000) / 10
        )),
    );
    if let (Some((major, minor)), Some(v)) = (nvrtc, driver) {
        if major * 1000 + minor * 10 > v {
            text.push_str(
                " (the driver cannot compile PTX of a newer NVRTC: put an NVRTC no newer than \
                 the driver first on LD_LIBRARY_PATH, or update the driver)",
            );
        }
    }
    text
}
