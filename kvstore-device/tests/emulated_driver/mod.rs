//! Builds the emulated CUDA driver (`driver.cpp`, with the crate's kernels compiled in as C++)
//! into a folder holding it as `libcuda.so` and `libnccl.so` (and `libnvrtc.so` when no real
//! NVRTC can be loaded): a process started with that folder first on `LD_LIBRARY_PATH` runs
//! the crate's GPU code on the CPU.

use std::fmt::Write as _;
use std::path::PathBuf;

use kvstore_device::gpu::kernel_source;

use crate::emulator::{compile_cxx, cxx, scratch_dir, SHIM};

/// The driver's source, after the generated kernel table.
const DRIVER: &str = include_str!("driver.cpp");

/// One `extern "C" __global__` function of the kernel source: its name and parameter types.
struct Kernel {
    name: String,
    types: Vec<String>,
}

/// Every kernel entry point of `source`, with the types of its parameters.
fn kernels(source: &str) -> Vec<Kernel> {
    const MARK: &str = "extern \"C\" __global__ void ";
    let mut found = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find(MARK) {
        rest = &rest[at + MARK.len()..];
        let open = rest.find('(').expect("a kernel has parameters");
        let close = rest.find(')').expect("a kernel's parameters end");
        let name = rest[..open].trim().to_string();
        let types = rest[open + 1..close]
            .split(',')
            .map(|param| {
                let param = param.split_whitespace().collect::<Vec<_>>().join(" ");
                let cut = param
                    .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .map_or(0, |i| i + 1);
                param[..cut].trim().to_string()
            })
            .collect();
        found.push(Kernel { name, types });
    }
    found
}

/// The table of kernels the driver looks functions up in: for each, the size of every
/// parameter, which are pointers, and a runner that unpacks the parameters and runs the grid.
fn kernel_table(source: &str) -> String {
    let mut table = String::from(
        "struct KvKernel { const char* name; size_t nargs; const size_t* sizes; \
         const bool* is_pointer; void (*run)(const unsigned char*, unsigned, unsigned, bool); };\n\
         /* Every thread of a grid, first to last, or last to first (`reverse`). */\n\
         template <typename F> static void kv_launch(unsigned blocks, unsigned threads, bool reverse, F f) {\n\
             gridDim.x = blocks; blockDim.x = threads;\n\
             for (unsigned i = 0; i < blocks; ++i) {\n\
                 for (unsigned j = 0; j < threads; ++j) {\n\
                     blockIdx.x = reverse ? blocks - 1 - i : i;\n\
                     threadIdx.x = reverse ? threads - 1 - j : j;\n\
                     f();\n\
                 }\n\
             }\n\
         }\n",
    );
    let kernels = kernels(source);
    for k in &kernels {
        let name = &k.name;
        let sizes: Vec<String> = k.types.iter().map(|t| format!("sizeof({t})")).collect();
        let pointers: Vec<&str> = k
            .types
            .iter()
            .map(|t| if t.contains('*') { "true" } else { "false" })
            .collect();
        let _ = writeln!(
            table,
            "static const size_t kv_sizes_{name}[] = {{{}}};\n\
             static const bool kv_pointers_{name}[] = {{{}}};",
            sizes.join(", "),
            pointers.join(", ")
        );
        let _ = writeln!(
            table,
            "static void kv_run_{name}(const unsigned char* args, unsigned blocks, unsigned threads, bool reverse) {{\n    size_t off = 0;"
        );
        for (i, t) in k.types.iter().enumerate() {
            let _ = writeln!(
                table,
                "    {t} a{i}; memcpy((void*)&a{i}, args + off, sizeof(a{i})); off += sizeof(a{i});"
            );
        }
        let args: Vec<String> = (0..k.types.len()).map(|i| format!("a{i}")).collect();
        let _ = writeln!(
            table,
            "    (void)off;\n    kv_launch(blocks, threads, reverse, [&] {{ {name}({}); }});\n}}",
            args.join(", ")
        );
    }
    let entries: Vec<String> = kernels
        .iter()
        .map(|k| {
            format!(
                "{{\"{0}\", {1}, kv_sizes_{0}, kv_pointers_{0}, kv_run_{0}}}",
                k.name,
                k.types.len()
            )
        })
        .collect();
    let _ = writeln!(
        table,
        "static const KvKernel KV_KERNELS[] = {{\n    {}\n}};\n\
         static const size_t KV_KERNEL_COUNT = {};",
        entries.join(",\n    "),
        kernels.len()
    );
    table
}

/// Where the driver is built: [`KEEP`]'s folder when it is set, else a folder of this process
/// in Cargo's temporary folder of the build (or the system's, for a copied binary).
fn folder() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(KEEP) {
        let dir = PathBuf::from(dir);
        return std::fs::create_dir_all(&dir).is_ok().then_some(dir);
    }
    scratch_dir(&format!("kvstore-emulated-driver-{}", std::process::id()))
}

/// When set, the folder the driver is built into and left in, for running other programs
/// against it (`LD_LIBRARY_PATH=<folder> KVSTORE_EMULATED_GPUS=2 <program>`).
pub const KEEP: &str = "KVSTORE_EMULATED_DRIVER_DIR";

/// Builds the driver: `Ok(folder)` for `LD_LIBRARY_PATH`, `Err(Ok(reason))` when there is no
/// C++ compiler (the checks are ignored), `Err(Err(log))` when it does not build (a failure).
pub fn build() -> Result<PathBuf, Result<String, String>> {
    let cxx = cxx().map_err(Ok)?;
    let dir = folder().ok_or_else(|| Err("no writable temporary folder".to_string()))?;
    let source = kernel_source();
    let src = dir.join("driver.cpp");
    let code = format!(
        "{SHIM}\n{source}\n{}\nstatic const char KV_SOURCE[] = R\"KVSOURCE({source})KVSOURCE\";\n{DRIVER}",
        kernel_table(&source)
    );
    std::fs::write(&src, code).map_err(|e| Err(e.to_string()))?;
    let lib = dir.join("libcuda.so");
    let flags = ["-O1", "-g", "-shared", "-fPIC", "-pthread"];
    compile_cxx(
        &cxx,
        &src,
        &lib,
        &flags,
        "the emulated driver does not build",
    )
    .map_err(Err)?;
    // One library under every name: NCCL's collectives reach the driver's streams and memory.
    let mut names = vec!["libnccl.so"];
    // SAFETY: only tries `dlopen` on the candidate names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        names.push("libnvrtc.so");
    }
    for name in names {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("libcuda.so", &link).map_err(|e| Err(e.to_string()))?;
    }
    Ok(dir)
}
