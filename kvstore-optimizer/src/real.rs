//! The arithmetic the update kernels run in.
//!
//! Kernels are written once, generic over [`Real`], and run in `f32`, `f64`, or — for
//! half-precision weights without a master copy — in [`Half`] / [`BHalf`], which round every
//! operation's result back to 16 bits, the way mshadow's `half_t` arithmetic does in MXNet.

use std::fmt::Debug;
use std::ops::{Add, Div, Mul, Neg, Sub};

use half::{bf16, f16};
use kvstore_base::{DType, Element};

/// A floating-point type a kernel computes in.
pub(crate) trait Real:
    Copy
    + Debug
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + Send
    + Sync
    + 'static
{
    /// The storage dtype of arrays in this arithmetic.
    const DTYPE: DType;
    /// The element type arrays of this arithmetic store.
    type Elem: Element;
    /// The stored elements, seen in this arithmetic (same bits, no copy).
    fn slice(s: &[Self::Elem]) -> &[Self];
    /// The stored elements, seen mutably in this arithmetic (same bits, no copy).
    fn slice_mut(s: &mut [Self::Elem]) -> &mut [Self];
    /// Converts from `f64`, rounding to nearest.
    fn of(x: f64) -> Self;
    /// Converts to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// `self` to the power `e` (mshadow's `power`: `powf` for `float` and half precision,
    /// the result of the latter rounded to 16 bits).
    fn pow(self, e: Self) -> Self;
    /// A kernel's `float` parameter: MXNet operator parameters are `float`, so a value passes
    /// through `f32` before it is cast to the element type.
    fn param(x: f64) -> Self {
        Self::of(x as f32 as f64)
    }
    /// Zero.
    fn zero() -> Self {
        Self::of(0.0)
    }
    /// One.
    fn one() -> Self {
        Self::of(1.0)
    }
    /// `|x|`.
    fn abs(self) -> Self {
        if self < Self::zero() {
            -self
        } else {
            self
        }
    }
    /// `-1`, `0` or `1`.
    fn sign(self) -> Self {
        if self > Self::zero() {
            Self::one()
        } else if self < Self::zero() {
            -Self::one()
        } else {
            Self::zero()
        }
    }
    /// mshadow's `clip::Map(x, bound)`: `x` limited to `[-bound, bound]`.
    fn clip(self, bound: Self) -> Self {
        if self > bound {
            bound
        } else if self < -bound {
            -bound
        } else {
            self
        }
    }

    /// [`clip`](Real::clip) when a bound is given, else the value itself.
    #[inline(always)]
    fn clip_by(self, bound: Option<Self>) -> Self {
        match bound {
            Some(c) => self.clip(c),
            None => self,
        }
    }
}

macro_rules! native {
    ($t:ty, $d:expr) => {
        impl Real for $t {
            const DTYPE: DType = $d;
            type Elem = $t;
            fn slice(s: &[$t]) -> &[$t] {
                s
            }
            fn slice_mut(s: &mut [$t]) -> &mut [$t] {
                s
            }
            fn of(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn pow(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
        }
    };
}
native!(f32, DType::F32);
native!(f64, DType::F64);

macro_rules! sixteen {
    ($name:ident, $t:ty, $d:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
        // `transparent`: a slice of the storage type is a slice of this type (`Real::slice`).
        #[repr(transparent)]
        pub struct $name(pub $t);

        impl $name {
            #[inline(always)]
            fn f(self) -> f32 {
                self.0.to_f32()
            }
            #[inline(always)]
            fn r(x: f32) -> Self {
                $name(<$t>::from_f32(x))
            }
        }
        impl Add for $name {
            type Output = Self;
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                Self::r(self.f() + o.f())
            }
        }
        impl Sub for $name {
            type Output = Self;
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                Self::r(self.f() - o.f())
            }
        }
        impl Mul for $name {
            type Output = Self;
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                Self::r(self.f() * o.f())
            }
        }
        impl Div for $name {
            type Output = Self;
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                Self::r(self.f() / o.f())
            }
        }
        impl Neg for $name {
            type Output = Self;
            #[inline(always)]
            fn neg(self) -> Self {
                $name(-self.0)
            }
        }
        impl Real for $name {
            const DTYPE: DType = $d;
            type Elem = $t;
            fn slice(s: &[$t]) -> &[Self] {
                // SAFETY: `Self` is a `repr(transparent)` wrapper of `$t`: same size, alignment
                // and validity, so the slice's memory is a valid `[Self]` of the same length.
                unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<Self>(), s.len()) }
            }
            fn slice_mut(s: &mut [$t]) -> &mut [Self] {
                // SAFETY: as in `slice`; the exclusive borrow moves to the result.
                unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<Self>(), s.len()) }
            }
            /// Through `f32`, as mshadow's `half_t(double)` converts (two roundings).
            fn of(x: f64) -> Self {
                $name(<$t>::from_f32(x as f32))
            }
            fn to_f64(self) -> f64 {
                self.0.to_f64()
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                Self::r(self.f().sqrt())
            }
            #[inline(always)]
            fn pow(self, e: Self) -> Self {
                Self::r(self.f().powf(e.f()))
            }
            // The exact values `of(0.0)` and `of(1.0)` give, without a conversion.
            fn zero() -> Self {
                $name(<$t>::ZERO)
            }
            fn one() -> Self {
                $name(<$t>::ONE)
            }
        }
    };
}
sixteen!(
    Half,
    f16,
    DType::F16,
    "`float16` arithmetic that rounds every result to 16 bits."
);
sixteen!(
    BHalf,
    bf16,
    DType::BF16,
    "`bfloat16` arithmetic that rounds every result to 16 bits."
);

/// MXNet's `multi_sum_sq` (the norms of `multi_lamb_update` and `multi_lars`) of an array of
/// `dtype`: the squares of its values added into a `float` accumulator in index order, a
/// `double` value squared in `double`. A half-precision value is squared in `float`: MXNet
/// squares it in its own type, where a value of 256 or more squares to infinity and the
/// optimizer step that follows turns the weights into infinities or NaN.
pub(crate) fn multi_sum_sq<R: Real>(xs: &[R], dtype: DType) -> f32 {
    let sum = |square: fn(f64) -> f32| xs.iter().fold(0.0f32, |s, x| s + square(x.to_f64()));
    match dtype {
        DType::F64 => xs.iter().fold(0.0f32, |s, x| {
            (f64::from(s) + x.to_f64() * x.to_f64()) as f32
        }),
        DType::F16 => sum(|x| {
            let h = f16::from_f64(x).to_f32();
            h * h
        }),
        DType::BF16 => sum(|x| {
            let h = bf16::from_f64(x).to_f32();
            h * h
        }),
        _ => sum(|x| {
            let v = x as f32;
            v * v
        }),
    }
}

/// MXNet's `norm` (L2, over every element) of values in `f32`: its stable `nrm2` reduction,
/// in order, keeping the largest magnitude so far as a scale and the sum of the squares
/// relative to it (zeros skipped), then `scale·sqrt(sum)`.
pub(crate) fn nrm2_f32(xs: impl Iterator<Item = f32>) -> f32 {
    let (mut sum, mut scale) = (0.0f32, 0.0f32);
    for x in xs.filter(|&x| x != 0.0) {
        let a = x.abs();
        if scale < a {
            sum = 1.0 + sum * (scale / a) * (scale / a);
            scale = a;
        } else {
            sum += (a / scale) * (a / scale);
        }
    }
    scale * sum.sqrt()
}

/// MXNet's `norm` (L2) of a row-sparse array's stored values in `f32`: `sqrt` of their dot
/// product with themselves as OpenBLAS's `sdot` computes it on x86-64 with AVX2 (the MXNet
/// 1.9.1 wheels' BLAS): blocks of 32 values into 32 `f32` lanes by fused multiply-adds,
/// the lanes summed pairwise, the remaining values' `f32` squares added in `f64`, the total
/// rounded to `f32`. `value` gives each element's `f32` value.
pub(crate) fn sparse_norm_f32<T: Copy>(xs: &[T], value: impl Fn(T) -> f32) -> f32 {
    let blocked = xs.len() - xs.len() % 32;
    let mut total = 0.0f64;
    if blocked > 0 {
        let mut lanes = [[0.0f32; 8]; 4];
        for block in xs[..blocked].chunks_exact(32) {
            for (k, acc) in lanes.iter_mut().enumerate() {
                for (l, a) in acc.iter_mut().enumerate() {
                    let x = value(block[8 * k + l]);
                    *a = x.mul_add(x, *a);
                }
            }
        }
        // Each register's halves added, then registers 0+1, 2+3, and those, then the four
        // values by two horizontal adds.
        let fold = |r: [f32; 8]| [r[0] + r[4], r[1] + r[5], r[2] + r[6], r[3] + r[7]];
        let add = |a: [f32; 4], b: [f32; 4]| [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]];
        let [r0, r1, r2, r3] = lanes.map(fold);
        let v = add(add(r0, r1), add(r2, r3));
        total = f64::from((v[0] + v[1]) + (v[2] + v[3]));
    }
    for &x in &xs[blocked..] {
        let x = value(x);
        total += f64::from(x * x);
    }
    (total as f32).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_half_scalar_rounds_through_float_as_mshadow_does() {
        // 1 + 2^-11 + 2^-40 rounds to the tie 1 + 2^-11 in float, which float16 rounds to
        // even (1); rounded once it would be 1 + 2^-10.
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(Half::of(x).to_f64(), 1.0);
        assert_eq!(Half::of(0.5).to_f64(), 0.5);
    }
}
