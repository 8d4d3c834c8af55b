//! Typed host (CPU) storage: one `ndarray` array per element type.

use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn, Zip};

use crate::{DType, Element};

/// A dense CPU array of one of the supported element types.
///
/// This is what a [`NDArray`](crate::NDArray) holds on the CPU. Backends match on it to run
/// type-specialised kernels; [`HostElement::host`] and [`HostElement::host_mut`] give typed access.
#[derive(Debug, Clone, PartialEq)]
pub enum HostArray {
    /// `float32` elements.
    F32(ArrayD<f32>),
    /// `float64` elements.
    F64(ArrayD<f64>),
    /// `float16` elements.
    F16(ArrayD<f16>),
    /// `bfloat16` elements.
    BF16(ArrayD<bf16>),
    /// `int32` elements.
    I32(ArrayD<i32>),
    /// `int64` elements.
    I64(ArrayD<i64>),
    /// `uint8` elements.
    U8(ArrayD<u8>),
}

/// Runs `$body` with `$a` bound to the typed array inside a [`HostArray`] (or `&`/`&mut` to it).
#[macro_export]
#[doc(hidden)]
macro_rules! __with_host {
    ($data:expr, $a:ident => $body:expr) => {
        match $data {
            $crate::HostArray::F32($a) => $body,
            $crate::HostArray::F64($a) => $body,
            $crate::HostArray::F16($a) => $body,
            $crate::HostArray::BF16($a) => $body,
            $crate::HostArray::I32($a) => $body,
            $crate::HostArray::I64($a) => $body,
            $crate::HostArray::U8($a) => $body,
        }
    };
}
pub(crate) use crate::__with_host as with_host;

/// Runs `$body` with `$T` as the element type named by a [`DType`].
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
        }
    };
}

impl HostArray {
    /// An array of `shape` with every element equal to `value` cast to `dtype`. Large arrays
    /// of zeros, which the allocator hands over untouched, are advised huge pages
    /// ([`advise_huge_pages`](crate::advise_huge_pages)).
    pub fn full(shape: &[usize], value: f64, dtype: DType) -> HostArray {
        with_dtype!(dtype, T => {
            let mut data = vec![T::from_f64(value); shape.iter().product()];
            if value == 0.0 {
                crate::advise_huge_pages(&mut data);
            }
            T::wrap(ArrayD::from_shape_vec(IxDyn(shape), data).expect("one element per index"))
        })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        with_host!(self, a => element_dtype(a))
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        with_host!(self, a => a.shape())
    }

    /// Sets every element to zero, in place.
    pub(crate) fn fill_zero(&mut self) {
        with_host!(self, a => a.fill(crate::Element::from_f64(0.0)))
    }

    /// This array in standard (row-major, contiguous) layout: itself when it already is, else
    /// a copy.
    pub(crate) fn into_standard_layout(self) -> HostArray {
        if host_bytes(&self).is_some() {
            return self;
        }
        with_host!(&self, a => HostElement::wrap(a.as_standard_layout().into_owned()))
    }

    /// A copy converted to `dtype` (MXNet's `astype`); a plain clone when the type is the same.
    pub fn cast(&self, dtype: DType) -> HostArray {
        if self.dtype() == dtype {
            return self.clone();
        }
        if is_half_pair(dtype, self) && host_bytes(self).is_some() {
            let mut out = HostArray::full(self.shape(), 0.0, dtype);
            if convert_half(&mut out, self) {
                return out;
            }
        }
        with_host!(self, a => with_dtype!(dtype, T => T::wrap(a.mapv(T::cast_from))))
    }

    /// Overwrites every element with the matching element of `src` (same shape), casting.
    pub(crate) fn assign_cast(&mut self, src: &HostArray) {
        if convert_half(self, src) {
            return;
        }
        with_host!(self, dst => assign_typed(dst, src))
    }

    /// Adds `other` (same shape and dtype) element-wise, with MXNet's arithmetic.
    pub(crate) fn add_same(&mut self, other: &HostArray) {
        with_host!(self, dst => add_typed(dst, other))
    }

    /// Whether every element is zero.
    pub(crate) fn row_is_zero(&self, row: usize) -> bool {
        with_host!(self, a => a.index_axis(ndarray::Axis(0), row).iter().all(|x| x.to_f64() == 0.0))
    }
}

/// Whether converting `src` to `dtype` is between `float32` and `float16`.
fn is_half_pair(dtype: DType, src: &HostArray) -> bool {
    matches!(
        (dtype, src),
        (DType::F16, HostArray::F32(_)) | (DType::F32, HostArray::F16(_))
    )
}

/// Converts `src` into `dst` (same shape) when one is `float32` and the other `float16` and
/// both are contiguous, a block of elements at a time (the CPU's conversion instructions where
/// it has them): the same values as converting each element, rounded to nearest, ties to
/// even. Returns false, writing nothing, for any other pair or layout.
fn convert_half(dst: &mut HostArray, src: &HostArray) -> bool {
    use half::slice::HalfFloatSliceExt;
    match (dst, src) {
        (HostArray::F16(d), HostArray::F32(s)) => match (d.as_slice_mut(), s.as_slice()) {
            (Some(d), Some(s)) if d.len() == s.len() => {
                d.convert_from_f32_slice(s);
                true
            }
            _ => false,
        },
        (HostArray::F32(d), HostArray::F16(s)) => match (d.as_slice_mut(), s.as_slice()) {
            (Some(d), Some(s)) if d.len() == s.len() => {
                s.convert_to_f32_slice(d);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

fn add_typed<T: Element>(dst: &mut ArrayD<T>, other: &HostArray) {
    let src = T::host(other).expect("dtype checked by caller");
    Zip::from(dst).and(src).for_each(|d, &s| *d = d.add(s));
}

/// Copies row `i` of `rows` into row `ids[i]` of `dst` (same dtype), for every `i`.
pub(crate) fn scatter_rows(dst: &mut HostArray, ids: &[i64], rows: &HostArray, accumulate: bool) {
    with_host!(dst, d => scatter_typed(d, ids, rows, accumulate))
}

fn scatter_typed<T: Element>(dst: &mut ArrayD<T>, ids: &[i64], rows: &HostArray, accumulate: bool) {
    let src = T::host(rows).expect("dtype checked by caller");
    for (i, &id) in ids.iter().enumerate() {
        let mut row = dst.index_axis_mut(ndarray::Axis(0), id as usize);
        let from = src.index_axis(ndarray::Axis(0), i);
        if accumulate {
            Zip::from(&mut row)
                .and(&from)
                .for_each(|a, &b| *a = a.add(b));
        } else {
            row.assign(&from);
        }
    }
}

/// The rows `ids` of `src`, in that order.
pub(crate) fn gather_rows(src: &HostArray, ids: &[usize]) -> HostArray {
    with_host!(src, a => HostElement::wrap(a.select(ndarray::Axis(0), ids)))
}

fn element_dtype<T: Element>(_: &ArrayD<T>) -> DType {
    T::DTYPE
}

fn assign_typed<T: Element>(dst: &mut ArrayD<T>, src: &HostArray) {
    match T::host(src) {
        Some(same) => dst.assign(same),
        None => {
            with_host!(src, s => Zip::from(dst).and(s).for_each(|d, &x| *d = T::cast_from(x)))
        }
    }
}

/// Typed access to [`HostArray`] for the element types.
pub trait HostElement: Sized {
    /// The typed array inside `host`, if it holds this type.
    fn host(host: &HostArray) -> Option<&ArrayD<Self>>;
    /// The typed array inside `host`, mutably, if it holds this type.
    fn host_mut(host: &mut HostArray) -> Option<&mut ArrayD<Self>>;
    /// Wraps a typed array.
    fn wrap(array: ArrayD<Self>) -> HostArray;
}

macro_rules! host_element {
    ($t:ty, $variant:ident) => {
        impl HostElement for $t {
            #[inline]
            fn host(host: &HostArray) -> Option<&ArrayD<Self>> {
                match host {
                    HostArray::$variant(a) => Some(a),
                    _ => None,
                }
            }
            #[inline]
            fn host_mut(host: &mut HostArray) -> Option<&mut ArrayD<Self>> {
                match host {
                    HostArray::$variant(a) => Some(a),
                    _ => None,
                }
            }
            #[inline]
            fn wrap(array: ArrayD<Self>) -> HostArray {
                HostArray::$variant(array)
            }
        }
    };
}
host_element!(f32, F32);
host_element!(f64, F64);
host_element!(f16, F16);
host_element!(bf16, BF16);
host_element!(i32, I32);
host_element!(i64, I64);
host_element!(u8, U8);

/// The elements of a standard-layout host array as bytes.
pub(crate) fn host_bytes(host: &HostArray) -> Option<&[u8]> {
    with_host!(host, a => a.as_slice().map(|s| {
        // SAFETY: the element types are plain numbers (f32, f64, f16, bf16, i32, i64, u8)
        // without padding; any initialised value may be read as bytes, and the byte slice
        // covers exactly the memory of `s`, borrowed for the same lifetime.
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
    }))
}

/// The elements of a standard-layout host array as writable bytes.
pub(crate) fn host_bytes_mut(host: &mut HostArray) -> Option<&mut [u8]> {
    with_host!(host, a => a.as_slice_mut().map(|s| {
        // SAFETY: as in `host_bytes`; moreover every bit pattern is a valid value of these
        // element types, so any bytes written through the slice leave valid elements.
        unsafe {
            std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s))
        }
    }))
}

/// `dst += bytes` element-wise (`bytes` holds `dst.len()` elements in native byte order, at
/// any alignment).
pub(crate) fn add_from_bytes<T: Element>(dst: &mut [T], bytes: &[u8]) {
    // SAFETY: `T` is a plain number type (f32, f64, f16, bf16, i32, i64, u8) for which every
    // bit pattern is a valid value; `align_to` only returns a middle slice of correctly
    // aligned, whole elements inside `bytes`.
    let (head, mid, _) = unsafe { bytes.align_to::<T>() };
    if head.is_empty() && mid.len() == dst.len() {
        for (d, s) in dst.iter_mut().zip(mid) {
            *d = d.add(*s);
        }
        return;
    }
    // A misaligned buffer: read each element through a copy.
    let size = std::mem::size_of::<T>();
    for (d, chunk) in dst.iter_mut().zip(bytes.chunks_exact(size)) {
        let mut s = T::ZERO;
        // SAFETY: `s` is a valid `T` of `size` bytes; any bytes form a valid `T` (see above).
        unsafe {
            std::ptr::copy_nonoverlapping(chunk.as_ptr(), (&mut s as *mut T).cast::<u8>(), size)
        };
        *d = d.add(s);
    }
}
