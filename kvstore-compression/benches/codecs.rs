//! Benchmarks of the codecs, one thread, throughput in bytes of `f32` gradient.
//!
//! ```text
//! cargo bench -p kvstore-compression --bench codecs
//! ```
//!
//! Each codec (2-bit with threshold 0.5, 1-bit with threshold 0) on 64 MiB of `f32` (memory
//! bound) and on 256 KiB (in cache, the kernels' own speed): `quantize` (gradient and
//! residual read, residual and packed codes written), `dequantize`, `dequantize_add`.
//! Gradients are uniform in [-1, 1); buffers are allocated outside the timed closure.
//! Under `cargo test --benches` every benchmark runs once.

use divan::counter::BytesCount;
use divan::Bencher;
use kvstore_compression::Codec;

fn main() {
    divan::main();
}

const SIZES: [usize; 2] = [256 << 10, 64 << 20];

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

fn codec(name: &str) -> Codec {
    match name {
        "2bit" => Codec::two_bit(0.5),
        _ => Codec::one_bit(0.0),
    }
}

#[divan::bench(args = ["2bit", "1bit"], consts = SIZES, sample_count = 20)]
fn quantize<const BYTES: usize>(bencher: Bencher, kind: &str) {
    let codec = codec(kind);
    let grad = uniform(BYTES / 4, 7);
    let mut residual = vec![0.0f32; grad.len()];
    let mut packed = vec![0u8; codec.compressed_len(grad.len())];
    bencher
        .counter(BytesCount::new(BYTES))
        .bench_local(|| codec.quantize(&grad, &mut residual, &mut packed).unwrap());
}

#[divan::bench(args = ["2bit", "1bit"], consts = SIZES, sample_count = 20)]
fn dequantize<const BYTES: usize>(bencher: Bencher, kind: &str) {
    let codec = codec(kind);
    let grad = uniform(BYTES / 4, 7);
    let mut residual = vec![0.0f32; grad.len()];
    let mut packed = vec![0u8; codec.compressed_len(grad.len())];
    codec.quantize(&grad, &mut residual, &mut packed).unwrap();
    let mut out = vec![0.0f32; grad.len()];
    bencher
        .counter(BytesCount::new(BYTES))
        .bench_local(|| codec.dequantize(&packed, &mut out).unwrap());
}

#[divan::bench(args = ["2bit", "1bit"], consts = SIZES, sample_count = 20)]
fn dequantize_add<const BYTES: usize>(bencher: Bencher, kind: &str) {
    let codec = codec(kind);
    let grad = uniform(BYTES / 4, 7);
    let mut residual = vec![0.0f32; grad.len()];
    let mut packed = vec![0u8; codec.compressed_len(grad.len())];
    codec.quantize(&grad, &mut residual, &mut packed).unwrap();
    let mut out = vec![0.0f32; grad.len()];
    bencher
        .counter(BytesCount::new(BYTES))
        .bench_local(|| codec.dequantize_add(&packed, &mut out).unwrap());
}
