//! Checks of the CUDA kernel source that need no GPU:
//!
//! - `nvrtc::*`: every kernel ([`kvstore_device::gpu::kernel_source`]) compiles with NVRTC,
//!   with the options the runtime uses, and the PTX has every entry point. Needs `libnvrtc`
//!   on the loader path (it is ignored, with the reason, otherwise); no driver, no GPU.
//! - `emulated::*`: the compression kernels ([`COMPRESSION_KERNELS`]) compiled as C++ by the
//!   host's compiler (`$CXX`, else `c++`; ignored with the reason when there is none), with
//!   definitions of CUDA's thread indices and `float4`, and run over every block and thread of
//!   a small grid, one after the other (each thread's work is independent of the others').
//!   The residuals, packed words and dequantised values must equal
//!   [`kvstore_compression::Codec`]'s bit for bit, over several rounds (the residual carried),
//!   for lengths around the word sizes, aligned buffers (the `float4` path) and misaligned ones
//!   (the scalar path), grids smaller than the work (the grid-stride loops), and special values
//!   (NaN, infinities, signed zeros, denormals, values at the threshold). Compiled with
//!   `-ffp-contract=off`, as NVRTC with `--fmad=false`.
//!
//! This checks the kernels' logic and arithmetic, not the GPU: the GPU run is in
//! `tests/gpu.rs`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kvstore_compression::{Codec, CompressionType};
use kvstore_device::gpu::{compile_kernels, kernel_source};
use kvstore_device::gpu_codec::COMPRESSION_KERNELS;
use libtest_mimic::{Arguments, Failed, Trial};

const SHIM: &str = r#"
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
"#;

const DRIVER: &str = r#"
template <typename F> static void launch(unsigned blocks, unsigned threads, F f) {
    gridDim.x = blocks; blockDim.x = threads;
    for (unsigned b = 0; b < blocks; ++b) {
        for (unsigned t = 0; t < threads; ++t) { blockIdx.x = b; threadIdx.x = t; f(); }
    }
}
static void get(void* p, size_t bytes) {
    if (bytes && fread(p, 1, bytes, stdin) != bytes) { fprintf(stderr, "short input\n"); exit(2); }
}
static void put(const void* p, size_t bytes) { if (bytes) fwrite(p, 1, bytes, stdout); }
// kind (2|1) n threshold-bits(hex) blocks threads offset rounds
// stdin: rounds x grad[n], then base[n]; stdout per round: residual[n], words, deq[n], base+deq[n]
int main(int argc, char** argv) {
    if (argc != 8) { fprintf(stderr, "usage\n"); return 2; }
    int kind = atoi(argv[1]);
    unsigned long long n = strtoull(argv[2], 0, 10);
    uint32_t tb = (uint32_t)strtoul(argv[3], 0, 16);
    float t; memcpy(&t, &tb, 4);
    unsigned blocks = (unsigned)atoi(argv[4]), threads = (unsigned)atoi(argv[5]);
    unsigned offset = (unsigned)atoi(argv[6]);
    int rounds = atoi(argv[7]);
    unsigned long long factor = kind == 2 ? 16 : 32;
    unsigned long long words = (n + factor - 1) / factor;
    std::vector<float> gbuf(n + 8), rbuf(n + 8, 0.0f), dbuf(n + 8), abuf(n + 8), base(n);
    float* g = gbuf.data() + offset; float* r = rbuf.data() + offset;
    float* d = dbuf.data() + offset; float* a = abuf.data() + offset;
    std::vector<unsigned int> packed(words + 1);
    std::vector<float> grads(n * rounds);
    get(grads.data(), 4 * n * rounds);
    get(base.data(), 4 * n);
    for (int k = 0; k < rounds; ++k) {
        memcpy(g, grads.data() + k * n, 4 * n);
        for (unsigned long long w = 0; w <= words; ++w) packed[w] = 0xdeadbeefu;
        if (kind == 2) launch(blocks, threads, [&] { quantize_2bit(g, r, packed.data(), t, n); });
        else launch(blocks, threads, [&] { quantize_1bit(g, r, packed.data(), t, n); });
        if (packed[words] != 0xdeadbeefu) { fprintf(stderr, "wrote past the words\n"); return 3; }
        memcpy(a, base.data(), 4 * n);
        if (kind == 2) {
            launch(blocks, threads, [&] { dequantize_2bit(packed.data(), d, t, 0, n); });
            launch(blocks, threads, [&] { dequantize_2bit(packed.data(), a, t, 1, n); });
        } else {
            launch(blocks, threads, [&] { dequantize_1bit(packed.data(), d, 0, n); });
            launch(blocks, threads, [&] { dequantize_1bit(packed.data(), a, 1, n); });
        }
        put(r, 4 * n); put(packed.data(), 4 * words); put(d, 4 * n); put(a, 4 * n);
    }
    fflush(stdout);
    return 0;
}
"#;

const ROUNDS: usize = 4;
const LENGTHS: &[usize] = &[1, 5, 15, 16, 17, 31, 32, 33, 47, 64, 100, 1000];

/// Builds the emulator: `Ok(path)`, `Err(Ok(reason))` when there is no compiler (ignored),
/// `Err(Err(log))` when the source does not compile (a failure).
fn build_emulator() -> Result<PathBuf, Result<String, String>> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        return Err(Ok(format!("no C++ compiler ({cxx} not found; set CXX)")));
    }
    // Cargo's temporary folder of the build, or the system's when the binary was copied to
    // another machine.
    let dir = [
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        std::env::temp_dir(),
    ]
    .into_iter()
    .map(|d| d.join("kvstore-device-kernel-emulation"))
    .find(|d| std::fs::create_dir_all(d).is_ok())
    .ok_or_else(|| Err("no writable temporary folder".to_string()))?;
    let src = dir.join(format!("emulate-{}.cpp", std::process::id()));
    let exe = dir.join(format!("emulate-{}", std::process::id()));
    std::fs::write(&src, format!("{SHIM}\n{COMPRESSION_KERNELS}\n{DRIVER}"))
        .map_err(|e| Err(e.to_string()))?;
    let out = Command::new(&cxx)
        .args([
            "-std=c++14",
            "-O2",
            "-ffp-contract=off",
            "-fno-strict-aliasing",
        ])
        .args(["-Wall", "-Wno-unused-variable", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .map_err(|e| Err(e.to_string()))?;
    if !out.status.success() {
        return Err(Err(format!(
            "the kernel source does not compile as C++:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(exe)
}

/// Deterministic pseudo-random values (xorshift), uniform in `[-1, 1)`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Gradients of round `k`: mostly `scale * [-1.5, 1.5)`, with special values mixed in.
fn gradient(rng: &mut Rng, n: usize, t: f32, k: usize) -> Vec<f32> {
    let scale = if t.abs() > 0.0 { t.abs() } else { 1.0 };
    let specials = [
        t,
        -t,
        f32::from_bits(t.to_bits().wrapping_sub(1)),
        f32::from_bits(t.to_bits().wrapping_add(1)),
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-45,
        -1e-45,
        1e30,
        -1e30,
        1.0,
        -1.0,
    ];
    (0..n)
        .map(|i| {
            if (i * 7 + k * 3).is_multiple_of(11) {
                specials[(i + k) % specials.len()]
            } else {
                rng.next() * 1.5 * scale
            }
        })
        .collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Equal bit patterns, or both NaN (which NaN a residual holds is not specified).
fn same(a: &[f32], b: &[f32]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()))
}

fn emulate(exe: &Path, codec: Codec) -> Result<(), Failed> {
    let kind = match codec.kind() {
        CompressionType::TwoBit => 2,
        CompressionType::OneBit => 1,
    };
    let t = codec.threshold();
    let grids = [(1u32, 1u32), (2, 3), (3, 32), (64, 64)];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(t.to_bits()) ^ kind);
    let mut checked = 0;
    for (c, &n) in LENGTHS.iter().enumerate() {
        for offset in [0usize, 1] {
            let (blocks, threads) = grids[(c + offset) % grids.len()];
            let grads: Vec<Vec<f32>> = (0..ROUNDS).map(|k| gradient(&mut rng, n, t, k)).collect();
            let base: Vec<f32> = (0..n).map(|_| rng.next() * 3.0).collect();
            let mut input = Vec::with_capacity(4 * n * (ROUNDS + 1));
            for v in grads.iter().chain(std::iter::once(&base)) {
                input.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            }
            let mut child = Command::new(exe)
                .args([
                    kind.to_string(),
                    n.to_string(),
                    format!("{:08x}", t.to_bits()),
                    blocks.to_string(),
                    threads.to_string(),
                    offset.to_string(),
                    ROUNDS.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            child.stdin.take().expect("piped").write_all(&input)?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                return Err(format!(
                    "emulator failed (n={n}): {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            let packed_len = codec.compressed_len(n);
            let round_len = 4 * n * 3 + packed_len;
            if out.stdout.len() != round_len * ROUNDS {
                return Err(format!("emulator wrote {} bytes", out.stdout.len()).into());
            }
            let mut residual = vec![0.0f32; n];
            let mut packed = vec![0u8; packed_len];
            for (k, round) in out.stdout.chunks_exact(round_len).enumerate() {
                let what = format!("{} t={t} n={n} offset={offset} round {k}", codec.kind());
                codec.quantize(&grads[k], &mut residual, &mut packed)?;
                let (r, rest) = round.split_at(4 * n);
                let (p, rest) = rest.split_at(packed_len);
                let (d, a) = rest.split_at(4 * n);
                if let Some(i) = same(&f32s(r), &residual) {
                    return Err(format!(
                        "{what}: residual {i}: kernel {:?} vs codec {:?}",
                        f32s(r)[i],
                        residual[i]
                    )
                    .into());
                }
                if p != packed.as_slice() {
                    return Err(format!("{what}: packed {p:02x?} vs codec {packed:02x?}").into());
                }
                let mut deq = vec![0.0f32; n];
                codec.dequantize(&packed, &mut deq)?;
                if let Some(i) = same(&f32s(d), &deq) {
                    return Err(format!("{what}: dequantised element {i} differs").into());
                }
                let mut added = base.clone();
                codec.dequantize_add(&packed, &mut added)?;
                if let Some(i) = same(&f32s(a), &added) {
                    return Err(format!("{what}: dequantise-add element {i} differs").into());
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, LENGTHS.len() * 2 * ROUNDS);
    Ok(())
}

fn nvrtc_compiles() -> Result<(), Failed> {
    let ptx = compile_kernels()?;
    for entry in [
        "sum_group",
        "sgd_update",
        "adam_update",
        "quantize_2bit",
        "quantize_1bit",
        "dequantize_2bit",
        "dequantize_1bit",
    ] {
        if !ptx.contains(&format!(".entry {entry}(")) {
            return Err(format!("the PTX has no entry {entry}").into());
        }
    }
    // No fused multiply-add anywhere: each operation rounds as on the CPU.
    if ptx.contains("fma.") {
        return Err("the PTX contains fma instructions".into());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let mut trials = Vec::new();

    assert!(kernel_source().contains(COMPRESSION_KERNELS));
    let nvrtc = compile_kernels().err().map(|e| e.to_string());
    let nvrtc_missing = nvrtc.as_deref().filter(|e| e.contains("no NVRTC"));
    let trial = Trial::test("nvrtc::every_kernel_compiles_without_fma", nvrtc_compiles);
    trials.push(match nvrtc_missing {
        Some(reason) => trial.with_kind(reason.to_string()).with_ignored_flag(true),
        None => trial,
    });

    let emulator = build_emulator();
    let codecs = [
        Codec::two_bit(0.5),
        Codec::two_bit(0.1),
        Codec::two_bit(1e-6),
        Codec::two_bit(3.0),
        Codec::one_bit(-0.5),
        Codec::one_bit(0.0),
        Codec::one_bit(0.5),
    ];
    for codec in codecs {
        let name = format!(
            "emulated::{}_t{}_matches_the_cpu_codec",
            codec.kind(),
            codec.threshold()
        );
        let built = emulator.clone();
        let trial = Trial::test(name, move || match &built {
            Ok(exe) => emulate(exe, codec),
            Err(Ok(reason)) => Err(reason.clone().into()),
            Err(Err(log)) => Err(log.clone().into()),
        });
        trials.push(match &emulator {
            Err(Ok(reason)) => trial.with_kind(reason.clone()).with_ignored_flag(true),
            _ => trial,
        });
    }
    libtest_mimic::run(&args, trials).exit_code()
}
