//! Element types of [`NDArray`](crate::NDArray) values.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

use crate::{Error, HostElement};

/// The element type of an array, with MXNet's spelling (`float32`, `float16`, ...).
///
/// ```
/// use kvstore_base::DType;
/// assert_eq!("float16".parse::<DType>().unwrap(), DType::F16);
/// assert_eq!(DType::BF16.size_of(), 2);
/// assert_eq!(DType::I64.to_string(), "int64");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit IEEE float (`float32`).
    F32,
    /// 64-bit IEEE float (`float64`).
    F64,
    /// 16-bit IEEE half (`float16`).
    F16,
    /// 16-bit brain float (`bfloat16`).
    BF16,
    /// 32-bit signed integer (`int32`).
    I32,
    /// 64-bit signed integer (`int64`).
    I64,
    /// 8-bit unsigned integer (`uint8`).
    U8,
}

impl DType {
    /// Every supported element type.
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];

    /// Bytes per element.
    pub const fn size_of(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// MXNet's name for the type (`float32`, `bfloat16`, `uint8`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
        }
    }

    /// Whether the type is a floating-point type.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;

    /// Parses MXNet's spelling, or the short Rust-style one (`f32`, `bf16`, `u8`).
    fn from_str(s: &str) -> Result<Self, Error> {
        let lower = s.to_ascii_lowercase();
        let dtype = match lower.as_str() {
            "float32" | "f32" => DType::F32,
            "float64" | "f64" => DType::F64,
            "float16" | "f16" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            "int32" | "i32" => DType::I32,
            "int64" | "i64" => DType::I64,
            "uint8" | "u8" => DType::U8,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown dtype {s:?}; expected one of float32, float64, float16, bfloat16, int32, int64, uint8"
                )))
            }
        };
        Ok(dtype)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
    impl Sealed for u8 {}
}

/// A Rust type that can be the element of an [`NDArray`](crate::NDArray).
///
/// Implemented for `f32`, `f64`, [`half::f16`], [`half::bf16`], `i32`, `i64` and `u8`; sealed.
/// Arithmetic follows MXNet: floats add in their own precision (half types round through
/// `f32`, as mshadow does), integers wrap on overflow.
pub trait Element:
    sealed::Sealed + HostElement + Copy + Send + Sync + PartialEq + fmt::Debug + Default + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// The additive identity.
    const ZERO: Self;
    /// Adds two elements the way MXNet does for this type.
    fn add(self, other: Self) -> Self;
    /// Converts to `f64` (exact for every type but `i64` beyond 2^53).
    fn to_f64(self) -> f64;
    /// Converts from `f64` with MXNet's cast semantics (round to nearest for floats, half
    /// types through `f32` as mshadow's do; truncation toward zero with saturation for
    /// integers).
    fn from_f64(value: f64) -> Self;
    /// Whether this is an integer type.
    const INTEGER: bool;
    /// The value as `i64`: exact for the integer types (floats truncate toward zero).
    fn to_i64(self) -> i64;
    /// `value` narrowed as C's `static_cast` between integers does (MXNet's): the low bits
    /// kept, so `300` becomes `44` as `uint8` (for floats: the nearest value).
    fn from_i64_wrapping(value: i64) -> Self;
    /// `value` converted to this type as MXNet's `astype` converts it: from an integer as C's
    /// `static_cast` does ([`from_i64_wrapping`](Element::from_i64_wrapping): wrapping into
    /// an integer, rounded once into a float), from a float through `f64`
    /// ([`from_f64`](Element::from_f64)).
    #[inline(always)]
    fn cast_from<S: Element>(value: S) -> Self {
        if S::INTEGER {
            Self::from_i64_wrapping(value.to_i64())
        } else {
            Self::from_f64(value.to_f64())
        }
    }
}

/// The element types Rust has as primitives (`as` converts them, C's way): floats add as
/// floats, integers wrapping.
macro_rules! primitive_element {
    ($t:ty, $dtype:expr, zero: $zero:expr, integer: $integer:expr, add: $add:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            const ZERO: Self = $zero;
            #[inline(always)]
            fn add(self, other: Self) -> Self {
                $add(self, other)
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f64(value: f64) -> Self {
                value as $t
            }
            const INTEGER: bool = $integer;
            #[inline(always)]
            fn to_i64(self) -> i64 {
                self as i64
            }
            #[inline(always)]
            fn from_i64_wrapping(value: i64) -> Self {
                value as $t
            }
        }
    };
}
primitive_element!(f32, DType::F32, zero: 0.0, integer: false, add: |a: f32, b: f32| a + b);
primitive_element!(f64, DType::F64, zero: 0.0, integer: false, add: |a: f64, b: f64| a + b);
primitive_element!(i32, DType::I32, zero: 0, integer: true, add: i32::wrapping_add);
primitive_element!(i64, DType::I64, zero: 0, integer: true, add: i64::wrapping_add);
primitive_element!(u8, DType::U8, zero: 0, integer: true, add: u8::wrapping_add);

macro_rules! half_element {
    ($t:ty, $dtype:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            const ZERO: Self = <$t>::ZERO;
            #[inline(always)]
            fn add(self, other: Self) -> Self {
                <$t>::from_f32(self.to_f32() + other.to_f32())
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            /// Through `f32`, as mshadow's half types convert a `double` (an `f64` between two
            /// of this type's values may round twice, as in MXNet); an `f32` (every value of
            /// the other types an array holds but `f64` and big integers) rounds once,
            /// correctly, on every CPU.
            #[inline(always)]
            fn from_f64(value: f64) -> Self {
                <$t>::from_f32(value as f32)
            }
            const INTEGER: bool = false;
            #[inline(always)]
            fn to_i64(self) -> i64 {
                self.to_f32() as i64
            }
            #[inline(always)]
            fn from_i64_wrapping(value: i64) -> Self {
                <$t>::from_f32(value as f32)
            }
        }
    };
}
half_element!(f16, DType::F16);
half_element!(bf16, DType::BF16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_int64_is_rounded_once_into_a_float() {
        // Through f64 it rounds twice: to 2^54 + 2^30, a tie that f32 rounds down to 2^54;
        // once, it rounds up to 2^54 + 2^31.
        let x = (1i64 << 54) + (1 << 30) + 1;
        assert_eq!(f32::cast_from(x), x as f32);
        assert_eq!(f64::cast_from(x), x as f64);
        assert_eq!(f16::cast_from(70_000i64), f16::INFINITY);
        assert_eq!(i32::cast_from(1i64 << 32 | 5), 5);
        assert_eq!(u8::cast_from(-1.5f32), 0);
    }

    #[test]
    fn names_round_trip() {
        for dtype in DType::ALL {
            assert_eq!(dtype.name().parse::<DType>().unwrap(), dtype);
        }
        assert!("float8".parse::<DType>().is_err());
    }

    #[test]
    fn integer_addition_wraps_like_mxnet() {
        assert_eq!(Element::add(250u8, 10u8), 4);
        assert_eq!(Element::add(i32::MAX, 1), i32::MIN);
    }

    #[test]
    fn half_addition_rounds_through_f32() {
        let a = f16::from_f32(1.0);
        let b = f16::from_f32(0.0004);
        assert_eq!(Element::add(a, b), f16::from_f32(1.0004));
    }

    /// bfloat16 rounds to nearest even, unbiased; mshadow's `bf16_t` keeps the top half of the
    /// float32 (rounds toward zero), which would give 1.0 here.
    #[test]
    fn bfloat16_addition_rounds_to_nearest_not_toward_zero() {
        let one = bf16::from_f32(1.0);
        // 1 + 3·2⁻⁹ lies between 1 and 1 + 2⁻⁷ (bfloat16's step at 1), nearer the latter.
        let small = bf16::from_f32(3.0 / 512.0);
        assert_eq!(Element::add(one, small).to_f32(), 1.0 + 1.0 / 128.0);
        // A tie (1 + 2⁻⁸) goes to the even neighbour, 1.
        let half_step = bf16::from_f32(1.0 / 256.0);
        assert_eq!(Element::add(one, half_step).to_f32(), 1.0);
        // Negative values round the same way, away from zero when nearer.
        assert_eq!(Element::add(-one, -small).to_f32(), -(1.0 + 1.0 / 128.0));
        assert_eq!(
            <bf16 as Element>::from_f64(1.0 + 3.0 / 512.0).to_f32(),
            1.0 + 1.0 / 128.0
        );
    }
}
