//! The vectorised codecs against straightforward scalar versions of MXNet's kernels (one
//! output byte at a time, `if`/`else if` per element, as `quantize_2bit::Map` and friends),
//! on random data with special values, every length from 0 to 100 and some longer ones,
//! several rounds so that residuals carry. Bit for bit: packed bytes, residuals, dequantised
//! values.
//!
//! The kernel version is picked once per process; `KVSTORE_COMPRESSION_SIMD=baseline` or
//! `avx2` runs these tests on the other versions.

use half::f16;
use kvstore_base::{DType, Error, Key, NDArray};
use kvstore_compression::{Codec, CompressionType, Residuals};

const POSBITS: [u8; 4] = [0xC0, 0x30, 0x0C, 0x03];
const NEGBITS: [u8; 4] = [0x80, 0x20, 0x08, 0x02];
const BITS: [u8; 8] = [0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01];

fn ref_quantize_2bit(g: &[f32], r: &mut [f32], out: &mut [u8], t: f32) {
    let nt = -t;
    for (b, byte) in out.iter_mut().enumerate() {
        *byte = 0;
        let start = b * 4;
        let end = (start + 4).min(g.len());
        for i in start..end {
            r[i] += g[i];
            if r[i] >= t {
                *byte |= POSBITS[i & 3];
                r[i] -= t;
            } else if r[i] <= nt {
                *byte |= NEGBITS[i & 3];
                r[i] -= nt;
            }
        }
    }
}

fn ref_dequantize_2bit(packed: &[u8], out: &mut [f32], t: f32) {
    for (i, o) in out.iter_mut().enumerate() {
        let masked = packed[i >> 2] & POSBITS[i & 3];
        *o = if masked == POSBITS[i & 3] {
            t
        } else if masked == NEGBITS[i & 3] {
            -t
        } else {
            0.0
        };
    }
}

fn ref_quantize_1bit(g: &[f32], r: &mut [f32], out: &mut [u8], t: f32) {
    for (b, byte) in out.iter_mut().enumerate() {
        *byte = 0;
        let start = b * 8;
        let end = (start + 8).min(g.len());
        for i in start..end {
            r[i] += g[i];
            if r[i] > t {
                *byte |= BITS[i & 7];
                r[i] -= 1.0;
            } else {
                r[i] += 1.0;
            }
        }
    }
}

fn ref_dequantize_1bit(packed: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let masked = packed[i >> 3] & BITS[i & 7];
        *o = if masked == BITS[i & 7] { 1.0 } else { -1.0 };
    }
}

fn ref_quantize(codec: Codec, g: &[f32], r: &mut [f32], out: &mut [u8]) {
    match codec.kind() {
        CompressionType::TwoBit => ref_quantize_2bit(g, r, out, codec.threshold()),
        CompressionType::OneBit => ref_quantize_1bit(g, r, out, codec.threshold()),
    }
}

fn ref_dequantize(codec: Codec, packed: &[u8], out: &mut [f32]) {
    match codec.kind() {
        CompressionType::TwoBit => ref_dequantize_2bit(packed, out, codec.threshold()),
        CompressionType::OneBit => ref_dequantize_1bit(packed, out),
    }
}

/// xorshift64*: deterministic data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Mostly uniform in `[-scale, scale)`, sometimes a special value.
    fn value(&mut self, scale: f32, t: f32) -> f32 {
        if !self.next().is_multiple_of(8) {
            return (self.unit() * 2.0 - 1.0) * scale;
        }
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            t,
            -t,
            t / 2.0,
            -t / 2.0,
            f32::from_bits(t.to_bits().wrapping_sub(1)),
            -f32::from_bits(t.to_bits().wrapping_add(1)),
            1.0,
            -1.0,
            f32::MIN_POSITIVE / 4.0,
            1e30,
            -1e30,
        ];
        specials[(self.next() % specials.len() as u64) as usize]
    }

    fn vec(&mut self, n: usize, scale: f32, t: f32) -> Vec<f32> {
        (0..n).map(|_| self.value(scale, t)).collect()
    }
}

/// Bit patterns, NaNs made one: which NaN `NaN + x` or `inf - inf` gives (sign, payload)
/// depends on the order the compiler picks for the operands of a commutative addition, in
/// MXNet's build as in this one.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|x| if x.is_nan() { 0x7FC0_0000 } else { x.to_bits() })
        .collect()
}

fn codecs() -> Vec<Codec> {
    let mut c = Vec::new();
    for t in [0.5f32, 0.25, 1.0, 1e-6, 0.1, 3.0, f32::INFINITY, 0.0, -0.5] {
        c.push(Codec::two_bit(t));
    }
    for t in [
        0.0f32,
        0.5,
        -0.5,
        1.0,
        -2.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ] {
        c.push(Codec::one_bit(t));
    }
    c
}

fn lengths() -> Vec<usize> {
    (0..=100)
        .chain([127, 128, 129, 255, 256, 1000, 1023, 4097])
        .collect()
}

#[test]
fn quantize_matches_the_scalar_kernels() {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    for codec in codecs() {
        let t = codec.threshold();
        let scale = if t.is_finite() && t != 0.0 {
            1.5 * t.abs()
        } else {
            1.5
        };
        for n in lengths() {
            let mut r_fast = vec![0.0f32; n];
            let mut r_ref = vec![0.0f32; n];
            let bytes = codec.compressed_len(n);
            let mut p_fast = vec![0x55u8; bytes];
            let mut p_ref = vec![0xAAu8; bytes];
            for round in 0..4 {
                let g = rng.vec(n, scale, t);
                codec.quantize(&g, &mut r_fast, &mut p_fast).unwrap();
                ref_quantize(codec, &g, &mut r_ref, &mut p_ref);
                let label = format!("{:?} n={n} round {round}", codec);
                assert_eq!(p_fast, p_ref, "{label}: packed");
                assert_eq!(bits(&r_fast), bits(&r_ref), "{label}: residual");

                let mut d_fast = vec![f32::NAN; n];
                let mut d_ref = vec![0.0f32; n];
                codec.dequantize(&p_fast, &mut d_fast).unwrap();
                ref_dequantize(codec, &p_ref, &mut d_ref);
                assert_eq!(bits(&d_fast), bits(&d_ref), "{label}: dequantized");

                let base = rng.vec(n, 2.0, t);
                let mut a_fast = base.clone();
                codec.dequantize_add(&p_fast, &mut a_fast).unwrap();
                let a_ref: Vec<f32> = base.iter().zip(&d_ref).map(|(b, d)| b + d).collect();
                assert_eq!(bits(&a_fast), bits(&a_ref), "{label}: dequantize_add");
            }
        }
    }
}

/// `unquantize` takes a quantisation back to within rounding: of one push, and of an earlier
/// push after a later one quantised on top of it (every step is an addition). Finite values
/// only (`inf - inf` has no way back).
#[test]
fn unquantize_restores_the_residual_to_within_rounding() {
    let mut rng = Rng(0xFEED_5EED);
    for codec in [
        Codec::two_bit(0.5),
        Codec::two_bit(0.01),
        Codec::one_bit(0.0),
    ] {
        let t = codec.threshold().max(1.0);
        for n in lengths() {
            let finite = |rng: &mut Rng| -> Vec<f32> {
                (0..n).map(|_| (rng.unit() * 2.0 - 1.0) * 2.0 * t).collect()
            };
            let r0 = finite(&mut rng);
            let (g1, g2) = (finite(&mut rng), finite(&mut rng));
            let bytes = codec.compressed_len(n);
            let (mut p1, mut p2) = (vec![0u8; bytes], vec![0u8; bytes]);
            // Without the failed push: the residual after g2 alone.
            let mut expected = r0.clone();
            codec.quantize(&g2, &mut expected, &mut p2).unwrap();
            let mut r = r0.clone();
            codec.quantize(&g1, &mut r, &mut p1).unwrap();
            let mut once = r.clone();
            codec.unquantize(&p1, &g1, &mut once).unwrap();
            // With g1 failed after g2 went out: g2's codes may differ; compare the sums.
            let mut both = r.clone();
            codec.quantize(&g2, &mut both, &mut p2).unwrap();
            codec.unquantize(&p1, &g1, &mut both).unwrap();
            let mut sent2 = vec![0.0f32; n];
            codec.dequantize(&p2, &mut sent2).unwrap();
            for i in 0..n {
                let bound =
                    4.0 * f32::EPSILON * (r0[i].abs() + g1[i].abs() + g2[i].abs() + 2.0 * t);
                let label = format!("{codec:?} n={n} element {i}");
                assert!(
                    (once[i] - r0[i]).abs() <= bound,
                    "{label}: {} vs {}",
                    once[i],
                    r0[i]
                );
                // What g2 leaves: r0 + g2 - sent2.
                let want = r0[i] + g2[i] - sent2[i];
                assert!(
                    (both[i] - want).abs() <= bound,
                    "{label}: {} vs {want}",
                    both[i]
                );
            }
            let g16: Vec<f16> = g1.iter().map(|&x| f16::from_f32(x)).collect();
            let mut r16 = r0.clone();
            codec.quantize_f16(&g16, &mut r16, &mut p1).unwrap();
            codec.unquantize_f16(&p1, &g16, &mut r16).unwrap();
            for i in 0..n {
                let bound = 4.0 * f32::EPSILON * (r0[i].abs() + g1[i].abs() + 2.0 * t);
                assert!(
                    (r16[i] - r0[i]).abs() <= bound,
                    "{codec:?} f16 n={n} element {i}"
                );
            }
        }
    }
    let codec = Codec::two_bit(0.5);
    let e = codec
        .unquantize(&[0u8; 4], &[1.0; 16], &mut [0.0; 15])
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

/// `KVSTORE_COMPRESSION_SIMD` caps the kernel version (so the runs below test what they say).
#[test]
fn the_kernel_version_asked_for_runs() {
    let level = kvstore_compression::simd_level();
    match std::env::var("KVSTORE_COMPRESSION_SIMD").as_deref() {
        Ok("baseline") => assert_eq!(level, "baseline"),
        Ok("avx2") => assert!(matches!(level, "avx2" | "baseline"), "{level}"),
        _ => {}
    }
}

/// The checks above, in a process of their own for each kernel version this CPU has below its
/// best (the version is picked once per process).
#[test]
fn every_kernel_version_matches_the_scalar_kernels() {
    if std::env::var_os("KVSTORE_COMPRESSION_SIMD").is_some() {
        return; // a run of one version already
    }
    for level in ["baseline", "avx2"] {
        if level == "avx2" && kvstore_compression::simd_level() == "baseline" {
            continue;
        }
        for test in [
            "the_kernel_version_asked_for_runs",
            "quantize_matches_the_scalar_kernels",
            "dequantize_matches_the_scalar_kernels_on_any_bytes",
            "f16_goes_through_f32",
            "unquantize_restores_the_residual_to_within_rounding",
        ] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", test, "--test-threads", "1"])
                .env("KVSTORE_COMPRESSION_SIMD", level)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{test} on the {level} kernels: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Any packed bytes, including the `01` code MXNet never writes (it dequantises to 0) and
/// non-zero padding (ignored).
#[test]
fn dequantize_matches_the_scalar_kernels_on_any_bytes() {
    let mut rng = Rng(42);
    for codec in codecs() {
        for n in lengths() {
            let packed: Vec<u8> = (0..codec.compressed_len(n))
                .map(|_| rng.next() as u8)
                .collect();
            let mut fast = vec![0.0f32; n];
            let mut reference = vec![0.0f32; n];
            codec.dequantize(&packed, &mut fast).unwrap();
            ref_dequantize(codec, &packed, &mut reference);
            assert_eq!(bits(&fast), bits(&reference), "{codec:?} n={n}");
        }
    }
}

#[test]
fn special_values() {
    let t = 0.5f32;
    let codec = Codec::two_bit(t);
    let g = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.5, -0.5];
    let mut r = [0.0f32; 6];
    let mut p = [0u8; 4];
    codec.quantize(&g, &mut r, &mut p).unwrap();
    // NaN: 00; +inf: 11; -inf: 10; -0.0 (0 + -0 = +0): 00 | t: 11; -t: 10.
    assert_eq!(p, [0b00_11_10_00, 0b11_10_00_00, 0, 0]);
    assert!(r[0].is_nan());
    assert_eq!(r[1], f32::INFINITY);
    assert_eq!(r[2], f32::NEG_INFINITY);
    assert_eq!(r[3].to_bits(), 0.0f32.to_bits());
    assert_eq!(&r[4..], &[0.0, 0.0]);

    // A -0.0 residual stays -0.0 when nothing is sent.
    let mut r = [-0.0f32];
    codec.quantize(&[-0.0], &mut r, &mut p).unwrap();
    assert_eq!(r[0].to_bits(), (-0.0f32).to_bits());
    assert_eq!(p, [0; 4]);

    let codec = Codec::one_bit(0.0);
    let mut r = [0.0f32; 4];
    codec
        .quantize(&[f32::NAN, 0.0, f32::MIN_POSITIVE, -1.0], &mut r, &mut p)
        .unwrap();
    // NaN > 0 and 0 > 0 are false; strict comparison.
    assert_eq!(p, [0b0010_0000, 0, 0, 0]);
    assert!(r[0].is_nan());
    assert_eq!(r[1..], [1.0, f32::MIN_POSITIVE - 1.0, 0.0]);
    let mut out = [0.0f32; 4];
    codec.dequantize(&p, &mut out).unwrap();
    assert_eq!(out, [-1.0, -1.0, 1.0, -1.0]);
}

#[test]
fn f16_goes_through_f32() {
    let mut rng = Rng(7);
    for codec in [Codec::two_bit(0.25), Codec::one_bit(0.0)] {
        for n in [0, 1, 17, 1023, 1024, 1025, 3000] {
            let g16: Vec<f16> = (0..n)
                .map(|_| f16::from_f32(rng.value(0.5, 0.25)))
                .collect();
            let g32: Vec<f32> = g16.iter().map(|x| x.to_f32()).collect();
            let bytes = codec.compressed_len(n);
            let (mut r16, mut r32) = (vec![0.0f32; n], vec![0.0f32; n]);
            let (mut p16, mut p32) = (vec![0u8; bytes], vec![0u8; bytes]);
            for _ in 0..3 {
                codec.quantize_f16(&g16, &mut r16, &mut p16).unwrap();
                codec.quantize(&g32, &mut r32, &mut p32).unwrap();
                assert_eq!(p16, p32);
                assert_eq!(bits(&r16), bits(&r32));
            }
            let mut d16 = vec![f16::ZERO; n];
            let mut d32 = vec![0.0f32; n];
            codec.dequantize_f16(&p16, &mut d16).unwrap();
            codec.dequantize(&p32, &mut d32).unwrap();
            let expect: Vec<f16> = d32.iter().map(|&x| f16::from_f32(x)).collect();
            assert_eq!(d16, expect);

            let base: Vec<f16> = (0..n).map(|i| f16::from_f32(i as f32 * 0.01)).collect();
            let mut a16 = base.clone();
            codec.dequantize_add_f16(&p16, &mut a16).unwrap();
            let expect: Vec<f16> = base
                .iter()
                .zip(&d32)
                .map(|(b, d)| f16::from_f32(b.to_f32() + d))
                .collect();
            assert_eq!(a16, expect);
        }
    }
}

#[test]
fn ndarray_forms() {
    let codec = Codec::two_bit(0.5);
    let g = NDArray::from_vec(&[2, 3], vec![0.6f32, -0.6, 0.1, 0.5, -0.5, 0.0]).unwrap();
    let mut r = vec![0.0f32; 6];
    let mut p = vec![0u8; 4];
    codec.quantize_array(&g, &mut r, &mut p).unwrap();
    assert_eq!(p, [0b11_10_00_11, 0b10_00_00_00, 0, 0]);

    let mut out = NDArray::zeros(&[2, 3], DType::F32);
    codec.dequantize_array(&p, &mut out).unwrap();
    assert_eq!(
        out.to_vec::<f32>().unwrap(),
        [0.5, -0.5, 0.0, 0.5, -0.5, 0.0]
    );
    codec.dequantize_add_array(&p, &mut out).unwrap();
    assert_eq!(
        out.to_vec::<f32>().unwrap(),
        [1.0, -1.0, 0.0, 1.0, -1.0, 0.0]
    );

    let g16 = g.astype(DType::F16);
    let mut r16 = vec![0.0f32; 6];
    let mut p16 = vec![0u8; 4];
    codec.quantize_array(&g16, &mut r16, &mut p16).unwrap();
    assert_eq!(p16, p);
    let mut out16 = NDArray::zeros(&[6], DType::F16);
    codec.dequantize_array(&p16, &mut out16).unwrap();
    assert_eq!(out16.to_f64_vec(), [0.5, -0.5, 0.0, 0.5, -0.5, 0.0]);

    let g64 = g.astype(DType::F64);
    let err = codec.quantize_array(&g64, &mut r, &mut p).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(m) if m.contains("float64")));
}

#[test]
fn length_errors_change_nothing() {
    let codec = Codec::two_bit(0.5);
    let g = [1.0f32; 17];
    let mut r = [0.0f32; 17];
    let mut p = [0u8; 8];
    // 17 elements take 8 bytes.
    assert!(codec.quantize(&g, &mut r, &mut p[..4]).is_err());
    assert!(codec.quantize(&g, &mut r[..16], &mut p).is_err());
    assert_eq!(r, [0.0; 17]);
    assert_eq!(p, [0; 8]);
    let mut out = [0.0f32; 17];
    assert!(codec.dequantize(&p[..4], &mut out).is_err());
    assert!(codec.dequantize_add(&p, &mut out[..1]).is_err());
    assert_eq!(Codec::one_bit(0.0).compressed_len(33), 8);
    assert_eq!(Codec::one_bit(0.0).compressed_len(32), 4);
    assert_eq!(codec.compressed_len(0), 0);
    assert_eq!(codec.compressed_len(16), 4);
    assert_eq!(codec.compressed_len(17), 8);
    assert_eq!(codec.factor(), 16);
}

#[test]
fn residuals_per_key_and_device() {
    let mut res = Residuals::new();
    let k = Key::from("w");
    res.get_or_zeroed(&k, 0, 3)[0] = 1.0;
    res.get_or_zeroed(&k, 1, 3)[0] = 2.0;
    assert_eq!(res.get(&k, 0).unwrap(), [1.0, 0.0, 0.0]);
    assert_eq!(res.get_or_zeroed(&k, 1, 3), [2.0, 0.0, 0.0]);
    assert_eq!(res.len(), 2);
    // Another length: zeros again.
    assert_eq!(res.get_or_zeroed(&k, 1, 2), [0.0, 0.0]);
    res.get_or_zeroed(&Key::from(3), 0, 1);
    res.remove_key(&k);
    assert_eq!(res.len(), 1);
    assert!(res.get(&k, 0).is_none());
    res.clear();
    assert!(res.is_empty());
}
