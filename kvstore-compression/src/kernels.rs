//! The quantisation kernels: one 32-bit word of output per block of 16 (2-bit) or 32 (1-bit)
//! elements, without branches.
//!
//! A word holds its bytes in memory order (little-endian), so byte `k` of the output is bits
//! `8k..8k+8` of the block's word, the first element of a byte in its most significant bits.
//!
//! Two implementations, picked at run time, with bit-identical results (the same `f32`
//! operations on the same operands; NaN payloads aside, see `Codec`):
//!
//! - `portable`: plain Rust over fixed-size blocks, for any target. An element's code is a
//!   comparison turned into a lane mask ANDed with the element's bit pattern in the word, the
//!   word the OR of a block's patterns, the residual updated with selects; dequantisation
//!   compares the masked word with the same patterns, as MXNet's kernels. The compiler
//!   vectorises a block.
//! - `x86`: the same with AVX-512 (one 16-lane vector per 2-bit block) or AVX2 intrinsics:
//!   comparisons into lane masks, the word assembled from the mask bits with a small table
//!   (2-bit) or a bit reversal (1-bit), dequantisation by testing the broadcast word against
//!   per-lane bit masks. Full blocks only; the tail goes through `portable`.

/// Elements per 2-bit word.
pub(crate) const TWO_BIT_BLOCK: usize = 16;
/// Elements per 1-bit word.
pub(crate) const ONE_BIT_BLOCK: usize = 32;

/// Bit position of the low bit of element `j`'s 2-bit code in its word.
const fn shift2(j: usize) -> u32 {
    (8 * (j / 4) + 6 - 2 * (j % 4)) as u32
}

/// Bit position of element `j`'s 1-bit code in its word.
const fn shift1(j: usize) -> u32 {
    (8 * (j / 8) + 7 - j % 8) as u32
}

const fn table2(code: u32) -> [u32; TWO_BIT_BLOCK] {
    let mut t = [0; TWO_BIT_BLOCK];
    let mut j = 0;
    while j < TWO_BIT_BLOCK {
        t[j] = code << shift2(j);
        j += 1;
    }
    t
}

const fn table1() -> [u32; ONE_BIT_BLOCK] {
    let mut t = [0; ONE_BIT_BLOCK];
    let mut j = 0;
    while j < ONE_BIT_BLOCK {
        t[j] = 1 << shift1(j);
        j += 1;
    }
    t
}

/// Element `j`'s `11` pattern (MXNet's `posbits`, placed in the word).
pub(crate) const POS2: [u32; TWO_BIT_BLOCK] = table2(0b11);
/// Element `j`'s `10` pattern (MXNet's `negbits`, placed in the word): its code's high bit.
pub(crate) const NEG2: [u32; TWO_BIT_BLOCK] = table2(0b10);
/// Element `j`'s `01` pattern: its code's low bit.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const LOW2: [u32; TWO_BIT_BLOCK] = table2(0b01);
/// Element `j`'s bit in a 1-bit word.
pub(crate) const BIT1: [u32; ONE_BIT_BLOCK] = table1();

mod portable {
    use super::{BIT1, NEG2, ONE_BIT_BLOCK, POS2, TWO_BIT_BLOCK};

    #[inline(always)]
    fn mask(b: bool) -> u32 {
        (b as u32).wrapping_neg()
    }

    #[inline(always)]
    fn select(b: bool, x: f32, y: f32) -> f32 {
        if b {
            x
        } else {
            y
        }
    }

    /// The word of one block, through an optimisation barrier in every loop over blocks.
    ///
    /// Without it LLVM's loop vectoriser may vectorise *across* blocks (16 words at a time,
    /// with gathers and scatter stores, several times slower), depending on inlining; with
    /// it, the loop over blocks stays a loop and the SLP vectoriser turns each block into
    /// vector instructions. It costs a register spill per word.
    #[inline(always)]
    fn opaque(word: u32) -> u32 {
        std::hint::black_box(word)
    }

    fn store(out: &mut [u8], word: u32) {
        out.copy_from_slice(&word.to_le_bytes());
    }

    fn load(packed: &[u8]) -> u32 {
        u32::from_le_bytes(packed.try_into().expect("4 bytes"))
    }

    /// One 2-bit block: `r += g`; `r >= t` → `11`, `r -= t`; else `r <= nt` → `10`,
    /// `r -= nt`.
    #[inline(always)]
    fn quantize2_block(g: &[f32; 16], r: &mut [f32; 16], t: f32, nt: f32) -> u32 {
        let mut word = 0;
        for j in 0..TWO_BIT_BLOCK {
            let x = r[j] + g[j];
            let pos = x >= t;
            let neg = x <= nt;
            // POS2 covers NEG2's bit, so `pos` wins when both hold (t <= 0), as MXNet's
            // else-if.
            word |= (POS2[j] & mask(pos)) | (NEG2[j] & mask(neg));
            r[j] = select(pos, x - t, select(neg, x - nt, x));
        }
        word
    }

    #[inline(always)]
    fn dequantize2_value(word: u32, j: usize, t: f32, nt: f32) -> f32 {
        let m = word & POS2[j];
        select(m == POS2[j], t, select(m == NEG2[j], nt, 0.0))
    }

    /// One 1-bit block: `r += g`; `r > t` → `1`, `r -= 1`; else `0`, `r += 1`.
    #[inline(always)]
    fn quantize1_block(g: &[f32; 32], r: &mut [f32; 32], t: f32) -> u32 {
        let mut word = 0;
        for j in 0..ONE_BIT_BLOCK {
            let x = r[j] + g[j];
            let hi = x > t;
            word |= BIT1[j] & mask(hi);
            r[j] = select(hi, x - 1.0, x + 1.0);
        }
        word
    }

    #[inline(always)]
    fn dequantize1_value(word: u32, j: usize) -> f32 {
        select(word & BIT1[j] == BIT1[j], 1.0, -1.0)
    }

    // The drivers. Lengths are checked by the caller: `residual.len() == grad.len()`,
    // `out.len() == 4 * ceil(n / block)`.

    #[inline(always)]
    pub(super) fn quantize2(grad: &[f32], residual: &mut [f32], out: &mut [u8], t: f32) {
        let nt = -t;
        let mut g = grad.chunks_exact(TWO_BIT_BLOCK);
        let mut r = residual.chunks_exact_mut(TWO_BIT_BLOCK);
        let mut o = out.chunks_exact_mut(4);
        for ((g, r), o) in (&mut g).zip(&mut r).zip(&mut o) {
            let word = quantize2_block(g.try_into().unwrap(), r.try_into().unwrap(), t, nt);
            store(o, opaque(word));
        }
        let (g, r) = (g.remainder(), r.into_remainder());
        if !g.is_empty() {
            // The tail through a zero-padded block; the padding's codes are masked off.
            let mut gb = [0.0; TWO_BIT_BLOCK];
            let mut rb = [0.0; TWO_BIT_BLOCK];
            gb[..g.len()].copy_from_slice(g);
            rb[..r.len()].copy_from_slice(r);
            let word = quantize2_block(&gb, &mut rb, t, nt);
            let valid = POS2[..g.len()].iter().fold(0, |m, p| m | p);
            r.copy_from_slice(&rb[..r.len()]);
            store(o.next().expect("tail word"), word & valid);
        }
    }

    #[inline(always)]
    pub(super) fn dequantize2<const ADD: bool>(packed: &[u8], out: &mut [f32], t: f32) {
        let nt = -t;
        let mut o = out.chunks_exact_mut(TWO_BIT_BLOCK);
        let mut p = packed.chunks_exact(4);
        for (o, p) in (&mut o).zip(&mut p) {
            let word = opaque(load(p));
            for (j, o) in o.iter_mut().enumerate() {
                let v = dequantize2_value(word, j, t, nt);
                *o = if ADD { *o + v } else { v };
            }
        }
        let o = o.into_remainder();
        if !o.is_empty() {
            let word = load(p.next().expect("tail word"));
            for (j, o) in o.iter_mut().enumerate() {
                let v = dequantize2_value(word, j, t, nt);
                *o = if ADD { *o + v } else { v };
            }
        }
    }

    #[inline(always)]
    pub(super) fn quantize1(grad: &[f32], residual: &mut [f32], out: &mut [u8], t: f32) {
        let mut g = grad.chunks_exact(ONE_BIT_BLOCK);
        let mut r = residual.chunks_exact_mut(ONE_BIT_BLOCK);
        let mut o = out.chunks_exact_mut(4);
        for ((g, r), o) in (&mut g).zip(&mut r).zip(&mut o) {
            let word = quantize1_block(g.try_into().unwrap(), r.try_into().unwrap(), t);
            store(o, opaque(word));
        }
        let (g, r) = (g.remainder(), r.into_remainder());
        if !g.is_empty() {
            let mut gb = [0.0; ONE_BIT_BLOCK];
            let mut rb = [0.0; ONE_BIT_BLOCK];
            gb[..g.len()].copy_from_slice(g);
            rb[..r.len()].copy_from_slice(r);
            let word = quantize1_block(&gb, &mut rb, t);
            let valid = BIT1[..g.len()].iter().fold(0, |m, b| m | b);
            r.copy_from_slice(&rb[..r.len()]);
            store(o.next().expect("tail word"), word & valid);
        }
    }

    #[inline(always)]
    pub(super) fn dequantize1<const ADD: bool>(packed: &[u8], out: &mut [f32]) {
        let mut o = out.chunks_exact_mut(ONE_BIT_BLOCK);
        let mut p = packed.chunks_exact(4);
        for (o, p) in (&mut o).zip(&mut p) {
            let word = opaque(load(p));
            for (j, o) in o.iter_mut().enumerate() {
                let v = dequantize1_value(word, j);
                *o = if ADD { *o + v } else { v };
            }
        }
        let o = o.into_remainder();
        if !o.is_empty() {
            let word = load(p.next().expect("tail word"));
            for (j, o) in o.iter_mut().enumerate() {
                let v = dequantize1_value(word, j);
                *o = if ADD { *o + v } else { v };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX-512 and AVX2 versions over full blocks; the tail goes to `portable`.
    //!
    //! SAFETY (every `unsafe` block below): block `b` covers elements `16b..16b+16` (2-bit)
    //! or `32b..32b+32` (1-bit) and bytes `4b..4b+4` of the packed form, and `b` only runs
    //! over the full blocks of `grad`/`out`, whose lengths the caller checked against
    //! `residual` and `packed`; loads and stores are unaligned.

    use std::arch::x86_64::*;

    use super::{portable, BIT1, LOW2, NEG2, ONE_BIT_BLOCK, TWO_BIT_BLOCK};

    /// For the mask of 8 consecutive elements of a 2-bit block (bit `i` = element `i`), the
    /// low bits of their codes in the word: element `i` at bit `8*(i/4) + 6 - 2*(i%4)`.
    static SPREAD2: [u16; 256] = {
        let mut t = [0u16; 256];
        let mut m = 0;
        while m < 256 {
            let mut i = 0;
            while i < 8 {
                if m >> i & 1 == 1 {
                    t[m] |= 1 << super::shift2(i);
                }
                i += 1;
            }
            m += 1;
        }
        t
    };

    /// The word of a 2-bit block from its masks (bit `j` = element `j`): `pos` (code `11`)
    /// and `any` (`11` or `10`).
    #[inline(always)]
    fn word2(pos: u32, any: u32) -> u32 {
        let spread = |m: u32| {
            u32::from(SPREAD2[(m & 0xFF) as usize])
                | u32::from(SPREAD2[(m >> 8 & 0xFF) as usize]) << 16
        };
        spread(pos) | spread(any) << 1
    }

    /// The word of a 1-bit block from its mask (bit `j` = element `j`): each byte's bits
    /// reversed (element `j` at bit `8*(j/8) + 7 - j%8`).
    #[inline(always)]
    fn word1(mask: u32) -> u32 {
        mask.reverse_bits().swap_bytes()
    }

    fn words(out: &mut [u8]) -> *mut u32 {
        out.as_mut_ptr().cast()
    }

    fn word_at(packed: &[u8], b: usize) -> u32 {
        u32::from_le_bytes(packed[4 * b..4 * b + 4].try_into().unwrap())
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn quantize2_avx512(grad: &[f32], residual: &mut [f32], out: &mut [u8], t: f32) {
        let blocks = grad.len() / TWO_BIT_BLOCK;
        let tv = _mm512_set1_ps(t);
        let ntv = _mm512_set1_ps(-t);
        let (g, r, o) = (grad.as_ptr(), residual.as_mut_ptr(), words(out));
        for b in 0..blocks {
            let i = b * TWO_BIT_BLOCK;
            unsafe {
                let x = _mm512_add_ps(_mm512_loadu_ps(r.add(i)), _mm512_loadu_ps(g.add(i)));
                let pos = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, tv);
                let neg = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, ntv);
                let y = _mm512_mask_sub_ps(x, neg, x, ntv);
                let y = _mm512_mask_sub_ps(y, pos, x, tv);
                _mm512_storeu_ps(r.add(i), y);
                let word = word2(u32::from(pos), u32::from(pos | neg));
                o.add(b).write_unaligned(word.to_le());
            }
        }
        let i = blocks * TWO_BIT_BLOCK;
        portable::quantize2(&grad[i..], &mut residual[i..], &mut out[4 * blocks..], t);
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn dequantize2_avx512<const ADD: bool>(packed: &[u8], out: &mut [f32], t: f32) {
        let blocks = out.len() / TWO_BIT_BLOCK;
        let tv = _mm512_set1_ps(t);
        let ntv = _mm512_set1_ps(-t);
        let (hi, lo) = unsafe {
            (
                _mm512_loadu_si512(NEG2.as_ptr().cast()),
                _mm512_loadu_si512(LOW2.as_ptr().cast()),
            )
        };
        let o = out.as_mut_ptr();
        for b in 0..blocks {
            let w = _mm512_set1_epi32(word_at(packed, b) as i32);
            // 1x: non-zero; x1: positive. 11 → t, 10 → -t, 0x → +0.0.
            let nonzero = _mm512_test_epi32_mask(w, hi);
            let positive = _mm512_test_epi32_mask(w, lo);
            let v = _mm512_maskz_mov_ps(nonzero, _mm512_mask_blend_ps(positive, ntv, tv));
            unsafe {
                let p = o.add(b * TWO_BIT_BLOCK);
                let v = if ADD {
                    _mm512_add_ps(_mm512_loadu_ps(p), v)
                } else {
                    v
                };
                _mm512_storeu_ps(p, v);
            }
        }
        let i = blocks * TWO_BIT_BLOCK;
        portable::dequantize2::<ADD>(&packed[4 * blocks..], &mut out[i..], t);
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn quantize1_avx512(grad: &[f32], residual: &mut [f32], out: &mut [u8], t: f32) {
        let blocks = grad.len() / ONE_BIT_BLOCK;
        let tv = _mm512_set1_ps(t);
        let one = _mm512_set1_ps(1.0);
        let (g, r, o) = (grad.as_ptr(), residual.as_mut_ptr(), words(out));
        for b in 0..blocks {
            let mut mask = 0u32;
            for h in 0..2 {
                let i = b * ONE_BIT_BLOCK + 16 * h;
                unsafe {
                    let x = _mm512_add_ps(_mm512_loadu_ps(r.add(i)), _mm512_loadu_ps(g.add(i)));
                    let hi = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, tv);
                    let y = _mm512_mask_sub_ps(_mm512_add_ps(x, one), hi, x, one);
                    _mm512_storeu_ps(r.add(i), y);
                    mask |= u32::from(hi) << (16 * h);
                }
            }
            unsafe { o.add(b).write_unaligned(word1(mask).to_le()) };
        }
        let i = blocks * ONE_BIT_BLOCK;
        portable::quantize1(&grad[i..], &mut residual[i..], &mut out[4 * blocks..], t);
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn dequantize1_avx512<const ADD: bool>(packed: &[u8], out: &mut [f32]) {
        let blocks = out.len() / ONE_BIT_BLOCK;
        let one = _mm512_set1_ps(1.0);
        let minus_one = _mm512_set1_ps(-1.0);
        let bits = unsafe {
            [
                _mm512_loadu_si512(BIT1.as_ptr().cast()),
                _mm512_loadu_si512(BIT1[16..].as_ptr().cast()),
            ]
        };
        let o = out.as_mut_ptr();
        for b in 0..blocks {
            let w = _mm512_set1_epi32(word_at(packed, b) as i32);
            for (h, bits) in bits.iter().enumerate() {
                let v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(w, *bits), minus_one, one);
                unsafe {
                    let p = o.add(b * ONE_BIT_BLOCK + 16 * h);
                    let v = if ADD {
                        _mm512_add_ps(_mm512_loadu_ps(p), v)
                    } else {
                        v
                    };
                    _mm512_storeu_ps(p, v);
                }
            }
        }
        let i = blocks * ONE_BIT_BLOCK;
        portable::dequantize1::<ADD>(&packed[4 * blocks..], &mut out[i..]);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn quantize2_avx2(grad: &[f32], residual: &mut [f32], out: &mut [u8], t: f32) {
        let blocks = grad.len() / TWO_BIT_BLOCK;
        let tv = _mm256_set1_ps(t);
        let ntv = _mm256_set1_ps(-t);
        let (g, r, o) = (grad.as_ptr(), residual.as_mut_ptr(), words(out));
        for b in 0..blocks {
            let (mut pos_mask, mut any_mask) = (0u32, 0u32);
            for h in 0..2 {
                let i = b * TWO_BIT_BLOCK + 8 * h;
                unsafe {
                    let x = _mm256_add_ps(_mm256_loadu_ps(r.add(i)), _mm256_loadu_ps(g.add(i)));
                    let pos = _mm256_cmp_ps::<_CMP_GE_OQ>(x, tv);
                    let neg = _mm256_cmp_ps::<_CMP_LE_OQ>(x, ntv);
                    let y = _mm256_blendv_ps(x, _mm256_sub_ps(x, ntv), neg);
                    let y = _mm256_blendv_ps(y, _mm256_sub_ps(x, tv), pos);
                    _mm256_storeu_ps(r.add(i), y);
                    pos_mask |= (_mm256_movemask_ps(pos) as u32) << (8 * h);
                    any_mask |= (_mm256_movemask_ps(_mm256_or_ps(pos, neg)) as u32) << (8 * h);
                }
            }
            unsafe { o.add(b).write_unaligned(word2(pos_mask, any_mask).to_le()) };
        }
        let i = blocks * TWO_BIT_BLOCK;
        portable::quantize2(&grad[i..], &mut residual[i..], &mut out[4 * blocks..], t);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn dequantize2_avx2<const ADD: bool>(packed: &[u8], out: &mut [f32], t: f32) {
        let blocks = out.len() / TWO_BIT_BLOCK;
        let tv = _mm256_set1_ps(t);
        let ntv = _mm256_set1_ps(-t);
        let (hi, lo) = unsafe {
            (
                [
                    _mm256_loadu_si256(NEG2.as_ptr().cast()),
                    _mm256_loadu_si256(NEG2[8..].as_ptr().cast()),
                ],
                [
                    _mm256_loadu_si256(LOW2.as_ptr().cast()),
                    _mm256_loadu_si256(LOW2[8..].as_ptr().cast()),
                ],
            )
        };
        let o = out.as_mut_ptr();
        for b in 0..blocks {
            let w = _mm256_set1_epi32(word_at(packed, b) as i32);
            for h in 0..2 {
                let nonzero = _mm256_cmpeq_epi32(_mm256_and_si256(w, hi[h]), hi[h]);
                let positive = _mm256_cmpeq_epi32(_mm256_and_si256(w, lo[h]), lo[h]);
                let v = _mm256_and_ps(
                    _mm256_blendv_ps(ntv, tv, _mm256_castsi256_ps(positive)),
                    _mm256_castsi256_ps(nonzero),
                );
                unsafe {
                    let p = o.add(b * TWO_BIT_BLOCK + 8 * h);
                    let v = if ADD {
                        _mm256_add_ps(_mm256_loadu_ps(p), v)
                    } else {
                        v
                    };
                    _mm256_storeu_ps(p, v);
                }
            }
        }
        let i = blocks * TWO_BIT_BLOCK;
        portable::dequantize2::<ADD>(&packed[4 * blocks..], &mut out[i..], t);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn quantize1_avx2(grad: &[f32], residual: &mut [f32], out: &mut [u8], t: f32) {
        let blocks = grad.len() / ONE_BIT_BLOCK;
        let tv = _mm256_set1_ps(t);
        let one = _mm256_set1_ps(1.0);
        let (g, r, o) = (grad.as_ptr(), residual.as_mut_ptr(), words(out));
        for b in 0..blocks {
            let mut mask = 0u32;
            for q in 0..4 {
                let i = b * ONE_BIT_BLOCK + 8 * q;
                unsafe {
                    let x = _mm256_add_ps(_mm256_loadu_ps(r.add(i)), _mm256_loadu_ps(g.add(i)));
                    let hi = _mm256_cmp_ps::<_CMP_GT_OQ>(x, tv);
                    let y = _mm256_blendv_ps(_mm256_add_ps(x, one), _mm256_sub_ps(x, one), hi);
                    _mm256_storeu_ps(r.add(i), y);
                    mask |= (_mm256_movemask_ps(hi) as u32) << (8 * q);
                }
            }
            unsafe { o.add(b).write_unaligned(word1(mask).to_le()) };
        }
        let i = blocks * ONE_BIT_BLOCK;
        portable::quantize1(&grad[i..], &mut residual[i..], &mut out[4 * blocks..], t);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn dequantize1_avx2<const ADD: bool>(packed: &[u8], out: &mut [f32]) {
        let blocks = out.len() / ONE_BIT_BLOCK;
        let one = _mm256_set1_ps(1.0);
        let minus_one = _mm256_set1_ps(-1.0);
        let bits: [__m256i; 4] =
            std::array::from_fn(|q| unsafe { _mm256_loadu_si256(BIT1[8 * q..].as_ptr().cast()) });
        let o = out.as_mut_ptr();
        for b in 0..blocks {
            let w = _mm256_set1_epi32(word_at(packed, b) as i32);
            for (q, bits) in bits.iter().enumerate() {
                let set = _mm256_cmpeq_epi32(_mm256_and_si256(w, *bits), *bits);
                let v = _mm256_blendv_ps(minus_one, one, _mm256_castsi256_ps(set));
                unsafe {
                    let p = o.add(b * ONE_BIT_BLOCK + 8 * q);
                    let v = if ADD {
                        _mm256_add_ps(_mm256_loadu_ps(p), v)
                    } else {
                        v
                    };
                    _mm256_storeu_ps(p, v);
                }
            }
        }
        let i = blocks * ONE_BIT_BLOCK;
        portable::dequantize1::<ADD>(&packed[4 * blocks..], &mut out[i..]);
    }
}

/// The entry points: the best version this CPU runs.
macro_rules! dispatch {
    ($name:ident ( $($arg:ident : $ty:ty),* ) => $portable:expr, $avx2:expr, $avx512:expr) => {
        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            match level() {
                // SAFETY: `level` reported that the CPU has AVX-512F.
                Level::Avx512 => return unsafe { $avx512 },
                // SAFETY: `level` reported that the CPU has AVX2.
                Level::Avx2 => return unsafe { $avx2 },
                Level::Baseline => {}
            }
            $portable
        }
    };
}

dispatch!(quantize_2bit(grad: &[f32], residual: &mut [f32], out: &mut [u8], t: f32)
    => portable::quantize2(grad, residual, out, t),
       x86::quantize2_avx2(grad, residual, out, t),
       x86::quantize2_avx512(grad, residual, out, t));
dispatch!(dequantize_2bit(packed: &[u8], out: &mut [f32], t: f32)
    => portable::dequantize2::<false>(packed, out, t),
       x86::dequantize2_avx2::<false>(packed, out, t),
       x86::dequantize2_avx512::<false>(packed, out, t));
dispatch!(dequantize_add_2bit(packed: &[u8], out: &mut [f32], t: f32)
    => portable::dequantize2::<true>(packed, out, t),
       x86::dequantize2_avx2::<true>(packed, out, t),
       x86::dequantize2_avx512::<true>(packed, out, t));
dispatch!(quantize_1bit(grad: &[f32], residual: &mut [f32], out: &mut [u8], t: f32)
    => portable::quantize1(grad, residual, out, t),
       x86::quantize1_avx2(grad, residual, out, t),
       x86::quantize1_avx512(grad, residual, out, t));
dispatch!(dequantize_1bit(packed: &[u8], out: &mut [f32])
    => portable::dequantize1::<false>(packed, out),
       x86::dequantize1_avx2::<false>(packed, out),
       x86::dequantize1_avx512::<false>(packed, out));
dispatch!(dequantize_add_1bit(packed: &[u8], out: &mut [f32])
    => portable::dequantize1::<true>(packed, out),
       x86::dequantize1_avx2::<true>(packed, out),
       x86::dequantize1_avx512::<true>(packed, out));

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Baseline,
    Avx2,
    Avx512,
}

/// The best kernel version of this CPU, detected once. `KVSTORE_COMPRESSION_SIMD=baseline`
/// or `avx2` caps it (to compare the versions, or to rule one out).
#[cfg(target_arch = "x86_64")]
fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = if std::arch::is_x86_feature_detected!("avx512f") {
            Level::Avx512
        } else if std::arch::is_x86_feature_detected!("avx2") {
            Level::Avx2
        } else {
            Level::Baseline
        };
        let cap = match std::env::var("KVSTORE_COMPRESSION_SIMD").as_deref() {
            Ok("baseline") => Level::Baseline,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        match (detected, cap) {
            (Level::Baseline, _) | (_, Level::Baseline) => Level::Baseline,
            (Level::Avx2, _) | (_, Level::Avx2) => Level::Avx2,
            _ => Level::Avx512,
        }
    })
}

/// The kernel version in use: `"avx512"`, `"avx2"` or `"baseline"`.
pub(crate) fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            Level::Avx512 => "avx512",
            Level::Avx2 => "avx2",
            Level::Baseline => "baseline",
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "baseline"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_msb_first() {
        // element 0: bits 7-6 of byte 0; element 4: bits 7-6 of byte 1.
        assert_eq!(POS2[0], 0xC0);
        assert_eq!(NEG2[3], 0x02);
        assert_eq!(POS2[4], 0xC000);
        assert_eq!(NEG2[15], 0x0200_0000);
        assert_eq!(LOW2[1], 0x10);
        assert_eq!(BIT1[0], 0x80);
        assert_eq!(BIT1[9], 0x4000);
        assert_eq!(BIT1[31], 0x0100_0000);
    }
}
