//! The arithmetic the update kernels run in.
//!
//! Kernels are written once, generic over [`Real`], and run in `f32`, `f64`, or — for
//! half-precision weights without a master copy — in [`Half`] / [`BHalf`], which round every
//! operation's result back to 16 bits, the way mshadow's `half_t` arithmetic does in MXNet.

use std::fmt::Debug;
use std::ops::{Add, Div, Mul, Neg, Sub};

use half::{bf16, f16};
use kvstore_base::{DType, NDArray};

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
    /// Converts from `f64`, rounding to nearest.
    fn of(x: f64) -> Self;
    /// Converts to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// A kernel's `float` parameter: MXNet operator parameters are `float`, so a value passes
    /// through `f32` before it is cast to the element type.
    fn param(x: f64) -> Self {
        Self::of(x as f32 as f64)
    }
    /// Zero.
    fn zero() -> Self {
        Self::of(0.0)
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
            Self::of(1.0)
        } else if self < Self::zero() {
            Self::of(-1.0)
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
    /// Reads a dense array of this arithmetic's dtype.
    fn read(a: &NDArray) -> Option<Vec<Self>>;
    /// Builds an array of this arithmetic's dtype.
    fn write(shape: &[usize], data: Vec<Self>) -> NDArray;
}

macro_rules! native {
    ($t:ty, $d:expr) => {
        impl Real for $t {
            const DTYPE: DType = $d;
            fn of(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn read(a: &NDArray) -> Option<Vec<Self>> {
                a.to_vec::<$t>().ok()
            }
            fn write(shape: &[usize], data: Vec<Self>) -> NDArray {
                NDArray::from_vec(shape, data).expect("length matches shape")
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
        pub struct $name(pub $t);

        impl $name {
            fn f(self) -> f32 {
                self.0.to_f32()
            }
            fn r(x: f32) -> Self {
                $name(<$t>::from_f32(x))
            }
        }
        impl Add for $name {
            type Output = Self;
            fn add(self, o: Self) -> Self {
                Self::r(self.f() + o.f())
            }
        }
        impl Sub for $name {
            type Output = Self;
            fn sub(self, o: Self) -> Self {
                Self::r(self.f() - o.f())
            }
        }
        impl Mul for $name {
            type Output = Self;
            fn mul(self, o: Self) -> Self {
                Self::r(self.f() * o.f())
            }
        }
        impl Div for $name {
            type Output = Self;
            fn div(self, o: Self) -> Self {
                Self::r(self.f() / o.f())
            }
        }
        impl Neg for $name {
            type Output = Self;
            fn neg(self) -> Self {
                $name(-self.0)
            }
        }
        impl Real for $name {
            const DTYPE: DType = $d;
            fn of(x: f64) -> Self {
                $name(<$t>::from_f64(x))
            }
            fn to_f64(self) -> f64 {
                self.0.to_f64()
            }
            fn sqrt(self) -> Self {
                Self::r(self.f().sqrt())
            }
            fn read(a: &NDArray) -> Option<Vec<Self>> {
                a.to_vec::<$t>()
                    .ok()
                    .map(|v| v.into_iter().map($name).collect())
            }
            fn write(shape: &[usize], data: Vec<Self>) -> NDArray {
                NDArray::from_vec(shape, data.into_iter().map(|x| x.0).collect::<Vec<$t>>())
                    .expect("length matches shape")
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

/// Sum of squares, accumulated in `f64` for `float64` arrays and in `f32` otherwise (as
/// MXNet's `multi_sum_sq` / `norm` accumulate).
pub(crate) fn sum_sq<R: Real>(xs: &[R]) -> f64 {
    if R::DTYPE == DType::F64 {
        xs.iter().map(|x| x.to_f64() * x.to_f64()).sum()
    } else {
        let s: f32 = xs
            .iter()
            .map(|x| {
                let v = x.to_f64() as f32;
                v * v
            })
            .sum();
        f64::from(s)
    }
}

/// Sum of squares of the values cast to `f32`, accumulated in `f32`.
pub(crate) fn sum_sq_f32<R: Real>(xs: &[R]) -> f32 {
    xs.iter()
        .map(|x| {
            let v = x.to_f64() as f32;
            v * v
        })
        .sum()
}
