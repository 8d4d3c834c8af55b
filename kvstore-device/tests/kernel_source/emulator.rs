//! CUDA kernel source run as C++ on the CPU: a shim that defines CUDA's thread indices,
//! qualifiers and `float4`, a `launch` that runs every thread of a grid one after the other
//! (each thread's work is independent of the others'), the build of a driver program with
//! the host's compiler, and the byte plumbing to and from it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kvstore_device::gpu::KERNEL_PRELUDE;
use libtest_mimic::Failed;

/// Definitions that make kernel source valid C++, and the grid runner.
pub const SHIM: &str = r#"
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
struct kv_dim3 { unsigned int x, y, z; };
static kv_dim3 blockIdx, blockDim, threadIdx, gridDim;
struct alignas(16) float4 { float x, y, z, w; };
#define __global__
#define __device__
#define __forceinline__ inline
template <typename F> static void launch(unsigned blocks, unsigned threads, F f) {
    gridDim.x = blocks; blockDim.x = threads;
    for (unsigned b = 0; b < blocks; ++b) {
        for (unsigned t = 0; t < threads; ++t) { blockIdx.x = b; threadIdx.x = t; f(); }
    }
}
static void get(void* p, size_t bytes) {
    if (bytes && fread(p, 1, bytes, stdin) != bytes) { fprintf(stderr, "short input\n"); exit(2); }
}
static int get_int() { int32_t v; get(&v, 4); return v; }
static float get_float() { float v; get(&v, 4); return v; }
static void put(const void* p, size_t bytes) { if (bytes) fwrite(p, 1, bytes, stdout); }
/* A buffer of n floats starting `offset` floats into a 16-byte aligned allocation (offset 1:
   misaligned for float4), with guard values after it. */
struct Buffer {
    std::vector<float4> storage;
    float* data;
    unsigned long long n;
    Buffer(unsigned long long n_, int offset) : storage((n_ + 16) / 4 + 2), n(n_) {
        float* base = &storage[0].x;
        for (size_t i = 0; i < storage.size() * 4; ++i) base[i] = -7777.0f;
        data = base + offset;
    }
    bool guards_intact() const {
        const float* base = &storage[0].x;
        for (size_t i = (size_t)(data - base) + n; i < storage.size() * 4; ++i)
            if (base[i] != -7777.0f) return false;
        return true;
    }
};
"#;

/// The host's C++ compiler (`$CXX`, else `c++`), or why there is none.
pub fn cxx() -> Result<String, String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    match Command::new(&cxx).arg("--version").output() {
        Ok(_) => Ok(cxx),
        Err(_) => Err(format!("no C++ compiler ({cxx} not found; set CXX)")),
    }
}

/// The folder `name` in Cargo's temporary folder of the build, or in the system's when the
/// binary was copied to another machine; created.
pub fn scratch_dir(name: &str) -> Option<PathBuf> {
    [
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        std::env::temp_dir(),
    ]
    .into_iter()
    .map(|d| d.join(name))
    .find(|d| std::fs::create_dir_all(d).is_ok())
}

/// Compiles the C++ file `src` into `out` with `cxx`, the kernels' floating-point flags (no
/// contraction into fused multiply-add, as NVRTC with `--fmad=false`) and `extra`; the
/// compiler's log, after `what`, when it fails.
pub fn compile_cxx(
    cxx: &str,
    src: &Path,
    out: &Path,
    extra: &[&str],
    what: &str,
) -> Result<(), String> {
    let built = Command::new(cxx)
        .args(["-std=c++14", "-ffp-contract=off", "-fno-strict-aliasing"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(src)
        .output()
        .map_err(|e| e.to_string())?;
    if built.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}:\n{}",
            String::from_utf8_lossy(&built.stderr)
        ))
    }
}

/// Builds `driver` (C++ using [`SHIM`], the kernels' prelude and the kernels of `kernels`) under
/// the name `name`:
/// `Ok(path)`, `Err(Ok(reason))` when there is no compiler (the checks are ignored),
/// `Err(Err(log))` when the source does not compile (a failure).
pub fn build(name: &str, kernels: &str, driver: &str) -> Result<PathBuf, Result<String, String>> {
    let cxx = cxx().map_err(Ok)?;
    let dir = scratch_dir("kvstore-device-kernel-emulation")
        .ok_or_else(|| Err("no writable temporary folder".to_string()))?;
    let src = dir.join(format!("{name}-{}.cpp", std::process::id()));
    let exe = dir.join(format!("{name}-{}", std::process::id()));
    std::fs::write(
        &src,
        format!("{SHIM}\n{KERNEL_PRELUDE}\n{kernels}\n{driver}"),
    )
    .map_err(|e| Err(e.to_string()))?;
    let flags = [
        "-O2",
        "-Wall",
        "-Wno-unused-variable",
        "-Wno-unknown-pragmas",
    ];
    compile_cxx(
        &cxx,
        &src,
        &exe,
        &flags,
        "the kernel source does not compile as C++",
    )
    .map_err(Err)?;
    Ok(exe)
}

/// Runs the emulator with `args`, `input` on its standard input; returns its standard output.
pub fn run(exe: &Path, args: &[String], input: &[u8]) -> Result<Vec<u8>, Failed> {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("piped").write_all(input)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!(
            "emulator {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(out.stdout)
}

/// The bytes an emulator reads: little-endian 32-bit numbers.
#[derive(Default)]
pub struct Input(pub Vec<u8>);

impl Input {
    /// Appends float32 values.
    pub fn floats(&mut self, values: &[f32]) -> &mut Self {
        self.0.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        self
    }

    /// Appends 32-bit integers.
    pub fn ints(&mut self, values: &[i32]) -> &mut Self {
        self.0.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        self
    }
}

/// Grids smaller than the work (the grid-stride loops) and larger: (blocks, threads).
pub const GRIDS: &[(u32, u32)] = &[(1, 1), (2, 3), (3, 32), (64, 64)];

/// Grid `i` of [`GRIDS`] (cycling), as the driver's two arguments.
pub fn grid_args(i: usize) -> [String; 2] {
    let (blocks, threads) = GRIDS[i % GRIDS.len()];
    [blocks.to_string(), threads.to_string()]
}

/// Values that float arithmetic treats apart: signed zeros, NaN, infinities, the smallest
/// denormals, huge values.
pub const SPECIAL_VALUES: [f32; 9] = [
    0.0,
    -0.0,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    1e-45,
    -1e-45,
    1e30,
    -1e30,
];

/// Deterministic pseudo-random values (xorshift), uniform in `[-1, 1)`.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Float32 values of little-endian bytes.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The first position where `a` and `b` differ: not the same bit pattern, unless both are NaN
/// (which NaN an operation produces is not specified). `None` when equal.
pub fn same(a: &[f32], b: &[f32]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()))
}
