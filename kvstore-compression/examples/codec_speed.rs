//! Throughput of the codecs on 64 MiB of `f32` gradient (16 Mi elements), one thread.
//!
//! ```text
//! cargo run --release -p kvstore-compression --example codec_speed
//! ```
//!
//! For 2-bit (threshold 0.5) and 1-bit (threshold 0), prints the median of several runs of
//! `quantize` (gradient and residual read, residual and packed codes written), `dequantize`
//! (packed codes read, `f32` values written) and `dequantize_add` (added into an `f32`
//! buffer), in GB/s of `f32` elements (64 MiB / time), next to a `copy_from_slice` of 64 MiB
//! for the machine's memory bandwidth. At this size the kernels are bound by memory; the
//! same figures for 256 KiB (in cache, each run repeated 256 times) show their own speed.
//! Gradients are uniform in [-1, 1). `KVSTORE_COMPRESSION_SIMD=baseline|avx2` caps the
//! kernel version.

use std::time::{Duration, Instant};

use kvstore_compression::{simd_level, Codec};

const BIG: usize = 64 << 20;
const SMALL: usize = 256 << 10;
const RUNS: usize = 9;

fn uniform(n: usize, mut seed: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn median(mut f: impl FnMut()) -> Duration {
    f(); // warm-up: page faults, caches
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[RUNS / 2]
}

/// GB/s of `f32` elements: `bytes * reps` over `d`.
fn gbps(bytes: usize, reps: usize, d: Duration) -> f64 {
    (bytes * reps) as f64 / d.as_secs_f64() / 1e9
}

fn measure(bytes: usize, reps: usize) {
    let n = bytes / 4;
    let grad = uniform(n, 0x9E37_79B9_7F4A_7C15);
    let mut residual = vec![0.0f32; n];
    let mut out = vec![0.0f32; n];
    let line = |what: &str, d: Duration| {
        println!("  {what:<28} {:>7.2} GB/s", gbps(bytes, reps, d));
    };
    let copy = median(|| {
        for _ in 0..reps {
            out.copy_from_slice(std::hint::black_box(&grad));
        }
    });
    line("copy_from_slice (reference)", copy);
    for (name, codec) in [("2bit", Codec::two_bit(0.5)), ("1bit", Codec::one_bit(0.0))] {
        let mut packed = vec![0u8; codec.compressed_len(n)];
        let q = median(|| {
            for _ in 0..reps {
                codec.quantize(&grad, &mut residual, &mut packed).unwrap();
            }
        });
        let d = median(|| {
            for _ in 0..reps {
                codec.dequantize(&packed, &mut out).unwrap();
            }
        });
        let a = median(|| {
            for _ in 0..reps {
                codec.dequantize_add(&packed, &mut out).unwrap();
            }
        });
        line(&format!("{name} quantize"), q);
        line(&format!("{name} dequantize"), d);
        line(&format!("{name} dequantize_add"), a);
    }
}

fn main() {
    println!(
        "one thread, kernels: {}, median of {RUNS} runs, GB/s of f32 elements",
        simd_level()
    );
    println!("64 MiB ({} elements):", BIG / 4);
    measure(BIG, 1);
    println!(
        "256 KiB ({} elements, in cache, 256 repetitions per run):",
        SMALL / 4
    );
    measure(SMALL, 256);
}
