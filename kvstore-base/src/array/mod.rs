//! [`NDArray`]: the values a store keeps, receives and hands out.

mod context;
mod device;
mod host;
mod huge_pages;

use std::sync::Arc;

pub use context::{Context, StorageType};
pub use device::{
    device_backend, device_backends, DeviceBackend, DeviceBackendRegistration, DeviceMemory,
    DeviceRowSparseMemory,
};
use host::add_from_bytes;
use host::{gather_rows, scatter_rows, with_host};
pub(crate) use host::{host_bytes, host_bytes_mut};
pub use host::{HostArray, HostElement};
pub use huge_pages::{advise_huge_pages, ADVISED_FROM};

use ndarray::{ArrayD, IxDyn};

use crate::{DType, Element, Error, Result};

/// An n-dimensional array: element type, shape, context and storage, on top of `ndarray`.
///
/// Dense arrays hold every element; row-sparse arrays hold only some rows of their first
/// axis, with the ids of those rows (MXNet's `RowSparseNDArray`), which is how embedding
/// gradients travel.
///
/// `Clone` is a deep copy: a store that keeps a clone never sees later writes to the caller's
/// array. (An array in device memory is copied on its first write after a clone instead:
/// the same guarantee, without a device copy that could fail inside `clone`.)
///
/// Arrays live on the host ([`Context::Cpu`]) or, when a device backend is linked
/// (`kvstore-device`), in GPU memory ([`to_context`](NDArray::to_context),
/// [`from_device`](NDArray::from_device), [`from_device_row_sparse`](NDArray::from_device_row_sparse)):
/// dense or row-sparse (the ids of the stored rows on the host, the rows on the device),
/// their host views ([`dense`](NDArray::dense), [`as_slice`](NDArray::as_slice),
/// [`as_row_sparse`](NDArray::as_row_sparse), ...) are `None`, and
/// [`to_vec`](NDArray::to_vec) and `to_context(Context::Cpu)` copy them to the host.
///
/// ```
/// use kvstore_base::{DType, NDArray};
///
/// let a = NDArray::from_vec(&[2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
/// assert_eq!(a.shape(), &[2, 2]);
/// assert_eq!(a.dtype(), DType::F32);
///
/// let mut b = NDArray::zeros(&[2, 2], DType::F64);
/// b.assign(&a).unwrap(); // `b[:] = a`, casting to float64
/// assert_eq!(b.to_vec::<f64>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NDArray {
    context: Context,
    data: Data,
}

#[derive(Debug, Clone)]
enum Data {
    Dense(HostArray),
    RowSparse(RowSparse),
    /// Dense, in device memory; shared by clones until one of them is written.
    Device(Arc<dyn DeviceMemory>),
    /// Row-sparse, its rows in device memory; shared by clones until one of them is written.
    DeviceRows(Arc<dyn DeviceRowSparseMemory>),
}

impl PartialEq for Data {
    fn eq(&self, other: &Data) -> bool {
        match (self, other) {
            (Data::Dense(a), Data::Dense(b)) => a == b,
            (Data::RowSparse(a), Data::RowSparse(b)) => a == b,
            (Data::Device(a), Data::Device(b)) => {
                a.context() == b.context()
                    && matches!((a.to_host(), b.to_host()), (Ok(x), Ok(y)) if x == y)
            }
            (Data::DeviceRows(a), Data::DeviceRows(b)) => {
                a.context() == b.context()
                    && a.shape() == b.shape()
                    && a.indices() == b.indices()
                    && matches!((a.rows_to_host(), b.rows_to_host()), (Ok(x), Ok(y)) if x == y)
            }
            _ => false,
        }
    }
}

/// The panic of the infallible methods (`astype`, `to_f64_vec`) when a device fails.
fn host_copy_failed(e: &Error) -> ! {
    panic!("copying a device array to the host failed: {e}")
}

/// The linked device backend, for placing an array in `context` (a GPU).
fn gpu_backend(context: Context) -> Result<&'static dyn DeviceBackend> {
    match crate::device_backends().as_slice() {
        [one] => Ok(*one),
        [] => Err(Error::Device(format!(
            "cannot place an array on {context}: no device backend provides GPU memory in this \
             build"
        ))),
        several => Err(Error::Device(format!(
            "cannot place an array on {context}: {} device backends are linked ({}); link one",
            several.len(),
            several
                .iter()
                .map(|b| b.name())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The error of an operation that needs host data, on an array in device memory.
fn on_device(what: &str, context: Context) -> Error {
    Error::InvalidArgument(format!(
        "{what} needs an array in host memory, this one is on {context}: copy it with \
         to_context(Context::Cpu) first"
    ))
}

/// The parts of a row-sparse array: its full shape, the sorted ids of the stored rows, and
/// the stored rows (shape `[ids.len(), shape[1], ...]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RowSparse {
    shape: Vec<usize>,
    indices: Vec<i64>,
    rows: HostArray,
}

impl RowSparse {
    /// The full (dense) shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Ids of the stored rows, strictly increasing.
    pub fn indices(&self) -> &[i64] {
        &self.indices
    }

    /// The stored rows, one per id.
    pub fn rows(&self) -> &HostArray {
        &self.rows
    }

    /// The stored rows' elements as bytes in native byte order, row after row.
    ///
    /// ```
    /// use kvstore_base::{DType, NDArray};
    /// let rows = NDArray::ones(&[1, 2], DType::F32);
    /// let a = NDArray::row_sparse(&[4, 2], vec![3], &rows).unwrap();
    /// assert_eq!(a.as_row_sparse().unwrap().rows_bytes().len(), 8);
    /// ```
    pub fn rows_bytes(&self) -> &[u8] {
        host_bytes(&self.rows).expect("the rows of a row-sparse array are in standard layout")
    }
}

impl NDArray {
    /// A dense array of `shape` filled with `value` (cast to `dtype`).
    ///
    /// # Panics
    /// When the product of the non-zero dimensions overflows `isize` (as `ndarray` does);
    /// like any allocation, when memory runs out. The same holds for [`NDArray::zeros`] and
    /// [`NDArray::ones`].
    pub fn full(shape: &[usize], value: f64, dtype: DType) -> NDArray {
        NDArray::from_host(HostArray::full(shape, value, dtype))
    }

    /// A dense array of zeros.
    pub fn zeros(shape: &[usize], dtype: DType) -> NDArray {
        NDArray::full(shape, 0.0, dtype)
    }

    /// A dense array of ones.
    pub fn ones(shape: &[usize], dtype: DType) -> NDArray {
        NDArray::full(shape, 1.0, dtype)
    }

    /// A dense array of zeros in `context`.
    ///
    /// # Errors
    /// [`Error::Device`] for a GPU context when no device backend provides GPU memory.
    pub fn zeros_in(shape: &[usize], dtype: DType, context: Context) -> Result<NDArray> {
        match context {
            Context::Cpu => Ok(NDArray::zeros(shape, dtype)),
            Context::Gpu(_) => Ok(NDArray::from_device(
                gpu_backend(context)?.zeros(shape, dtype, context)?,
            )),
        }
    }

    /// A 0-dimensional array holding `value`.
    pub fn scalar<T: Element>(value: T) -> NDArray {
        NDArray::from_host(T::wrap(ArrayD::from_elem(IxDyn(&[]), value)))
    }

    /// A dense array of `shape` holding `data` in row-major order.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `data.len()` is not the product of `shape`.
    pub fn from_vec<T: Element>(shape: &[usize], data: Vec<T>) -> Result<NDArray> {
        let len = data.len();
        let array = ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|_| {
            let wanted = match element_count(shape) {
                Some(n) => format!("{n} elements"),
                None => "too many elements to address".into(),
            };
            Error::InvalidArgument(format!(
                "{len} elements cannot fill shape {shape:?} ({wanted})"
            ))
        })?;
        Ok(NDArray::from_host(T::wrap(array)))
    }

    /// A dense array of `shape` and `dtype` whose elements are `bytes` (native byte order,
    /// row-major), e.g. a payload received from the network.
    ///
    /// ```
    /// use kvstore_base::{DType, NDArray};
    ///
    /// let a = NDArray::from_vec(&[2], vec![1.5f32, -2.0]).unwrap();
    /// let b = NDArray::from_bytes(&[2], DType::F32, a.as_bytes().unwrap()).unwrap();
    /// assert_eq!(a, b);
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `bytes.len()` is not the byte size of `shape` in `dtype`.
    pub fn from_bytes(shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<NDArray> {
        let expected = element_count(shape)
            .and_then(|n| n.checked_mul(dtype.size_of()))
            .filter(|_| addressable(shape, dtype));
        if expected != Some(bytes.len()) {
            return Err(Error::InvalidArgument(format!(
                "{} bytes cannot fill shape {shape:?} of {dtype} ({})",
                bytes.len(),
                match expected {
                    Some(n) => format!("{n} bytes"),
                    None => "too many elements to address".to_string(),
                }
            )));
        }
        let mut array = NDArray::zeros(shape, dtype);
        array
            .as_bytes_mut()
            .expect("a fresh dense array is contiguous")
            .copy_from_slice(bytes);
        Ok(array)
    }

    /// `self += bytes`, where `bytes` holds this array's elements in its dtype (native byte
    /// order, row-major), e.g. a payload received from the network: MXNet's addition for the
    /// dtype, as [`add_assign`](NDArray::add_assign). Any alignment of `bytes` is accepted.
    ///
    /// ```
    /// use kvstore_base::NDArray;
    ///
    /// let mut a = NDArray::from_vec(&[2], vec![1.0f32, 2.0]).unwrap();
    /// let b = NDArray::from_vec(&[2], vec![0.5f32, 0.25]).unwrap();
    /// a.add_bytes(b.as_bytes().unwrap()).unwrap();
    /// assert_eq!(a.to_vec::<f32>().unwrap(), vec![1.5, 2.25]);
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when this array is not dense and contiguous or `bytes` is not
    /// exactly its size; nothing is written then.
    pub fn add_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let want = self.size() * self.dtype().size_of();
        if bytes.len() != want {
            return Err(Error::InvalidArgument(format!(
                "{} bytes cannot be added to {} elements of {} ({want} bytes)",
                bytes.len(),
                self.size(),
                self.dtype()
            )));
        }
        let Data::Dense(host) = &mut self.data else {
            return Err(Error::InvalidArgument(
                "bytes can only be added to a dense host array".into(),
            ));
        };
        with_host!(host, a => match a.as_slice_mut() {
            Some(dst) => {
                add_from_bytes(dst, bytes);
                Ok(())
            }
            None => Err(Error::InvalidArgument(
                "bytes can only be added to a contiguous array".into(),
            )),
        })
    }

    /// The sorted, unique row ids that this array holds (a dense array of integer-valued
    /// numbers, as `row_sparse_pull` takes them), each checked to be in `0..rows`.
    ///
    /// ```
    /// use kvstore_base::NDArray;
    ///
    /// let ids = NDArray::from_vec(&[3], vec![3i64, 0, 3]).unwrap();
    /// assert_eq!(ids.unique_row_ids(4).unwrap(), vec![0, 3]);
    /// assert!(ids.unique_row_ids(3).is_err());
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a row-sparse array or an id that is not an integer in
    /// `0..rows`; [`Error::Device`] when ids in device memory cannot be copied to the host.
    pub fn unique_row_ids(&self, rows: usize) -> Result<Vec<i64>> {
        if self.storage_type() != StorageType::Dense {
            return Err(Error::InvalidArgument(
                "row ids must be a dense array".into(),
            ));
        }
        let mut out = Vec::with_capacity(self.size());
        for v in self.try_to_f64_vec()? {
            if v.fract() != 0.0 || v < 0.0 || v >= rows as f64 {
                return Err(Error::InvalidArgument(format!(
                    "row id {v} is not an integer in 0..{rows}"
                )));
            }
            out.push(v as i64);
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The elements of a dense, standard-layout (row-major, contiguous) host array as bytes
    /// in native byte order; `None` for row-sparse arrays and non-contiguous views.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.data {
            Data::Dense(host) => host_bytes(host),
            _ => None,
        }
    }

    /// The elements of a dense, standard-layout host array as writable bytes; `None` as for
    /// [`as_bytes`](NDArray::as_bytes).
    pub fn as_bytes_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.data {
            Data::Dense(host) => host_bytes_mut(host),
            _ => None,
        }
    }

    /// Wraps a typed host array.
    pub fn from_host(host: HostArray) -> NDArray {
        NDArray {
            context: Context::Cpu,
            data: Data::Dense(host),
        }
    }

    /// Wraps an array in device memory (made by a device backend).
    pub fn from_device(memory: Box<dyn DeviceMemory>) -> NDArray {
        NDArray {
            context: memory.context(),
            data: Data::Device(Arc::from(memory)),
        }
    }

    /// The device memory of a dense array on a GPU, `None` for a host array or a row-sparse one
    /// ([`device_row_sparse`](NDArray::device_row_sparse)).
    pub fn device(&self) -> Option<&dyn DeviceMemory> {
        match &self.data {
            Data::Device(m) => Some(&**m),
            _ => None,
        }
    }

    /// The device memory of a dense array on a GPU, to write into (`None` for a host array or
    /// a row-sparse one). When a clone shares it, this array first gets a copy of its own.
    ///
    /// # Errors
    /// [`Error::Device`] when that copy fails (the device out of memory).
    pub fn device_mut(&mut self) -> Result<Option<&mut dyn DeviceMemory>> {
        let Data::Device(m) = &mut self.data else {
            return Ok(None);
        };
        if Arc::get_mut(m).is_none() {
            *m = Arc::from(m.try_clone()?);
        }
        Ok(Arc::get_mut(m).map(|m| m as &mut dyn DeviceMemory))
    }

    /// Wraps a row-sparse array in device memory (made by a device backend).
    pub fn from_device_row_sparse(memory: Box<dyn DeviceRowSparseMemory>) -> NDArray {
        NDArray {
            context: memory.context(),
            data: Data::DeviceRows(Arc::from(memory)),
        }
    }

    /// The device memory of a row-sparse array on a GPU, `None` for any other array.
    pub fn device_row_sparse(&self) -> Option<&dyn DeviceRowSparseMemory> {
        match &self.data {
            Data::DeviceRows(m) => Some(&**m),
            _ => None,
        }
    }

    /// Whether the array is in device memory (dense or row-sparse): a store that works on
    /// host memory stages it.
    pub fn in_device_memory(&self) -> bool {
        matches!(self.data, Data::Device(_) | Data::DeviceRows(_))
    }

    /// For a row-sparse array in device memory: a new one in the same context holding `src`
    /// (its rows, or a dense source's non-zero rows, cast to this array's dtype), to replace
    /// it (`*self = ...`, which allocates nothing: how a write into it is done once every
    /// allocation of a call succeeded). `None` for any other array.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the shapes differ; [`Error::Device`] when a copy fails.
    pub fn row_sparse_replacement(&self, src: &NDArray) -> Result<Option<NDArray>> {
        if !matches!(self.data, Data::DeviceRows(_)) {
            return Ok(None);
        }
        self.check_shape_of(src, "the source array")?;
        let src = src.on_host()?;
        let sparse = src.to_row_sparse()?;
        let r = sparse.as_row_sparse().expect("a row-sparse host array");
        let rows = r.rows.cast(self.dtype());
        let memory = gpu_backend(self.context)?.upload_row_sparse(
            &r.shape,
            &r.indices,
            &rows,
            self.context,
        )?;
        Ok(Some(NDArray::from_device_row_sparse(memory)))
    }

    /// Zeros in host memory with this array's shape, dtype and storage type (a row-sparse
    /// array without rows for a row-sparse one): the host stand-in of an output.
    pub fn zeros_on_host_like(&self) -> NDArray {
        if self.storage_type() == StorageType::RowSparse {
            let mut row_shape = self.shape().to_vec();
            row_shape[0] = 0;
            NDArray::from_rows(
                self.shape(),
                Vec::new(),
                HostArray::full(&row_shape, 0.0, self.dtype()),
            )
        } else {
            NDArray::zeros(self.shape(), self.dtype())
        }
    }

    /// A row-sparse array of `shape` whose rows `indices` hold `rows`; every other row is zero.
    ///
    /// `rows` must be dense with shape `[indices.len(), shape[1], ...]`. Ids must be strictly
    /// increasing and inside `0..shape[0]`.
    ///
    /// ```
    /// use kvstore_base::{DType, NDArray};
    /// let rows = NDArray::ones(&[2, 3], DType::F32);
    /// let a = NDArray::row_sparse(&[4, 3], vec![0, 2], &rows).unwrap();
    /// assert_eq!(a.to_dense().to_vec::<f32>().unwrap()[6..9], [1.0, 1.0, 1.0]);
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a 0-d shape, a shape whose dense form would not fit in
    /// memory (more than `isize::MAX` bytes), unsorted, duplicate or out-of-range ids, or a
    /// sparse `rows`; [`Error::ShapeMismatch`] when `rows` has the wrong shape.
    pub fn row_sparse(shape: &[usize], indices: Vec<i64>, rows: &NDArray) -> Result<NDArray> {
        check_row_sparse_parts(shape, &indices, rows)?;
        let Data::Dense(host) = &rows.data else {
            unreachable!("checked: the rows are dense")
        };
        Ok(NDArray::from_rows(shape, indices, host.clone()))
    }

    /// [`NDArray::row_sparse`] taking the rows by value: they become the array's rows without
    /// a copy (when in standard layout).
    ///
    /// ```
    /// use kvstore_base::{DType, NDArray};
    /// let a = NDArray::row_sparse_from(&[4, 3], vec![1], NDArray::ones(&[1, 3], DType::F32));
    /// assert_eq!(a.unwrap().as_row_sparse().unwrap().indices(), &[1]);
    /// ```
    ///
    /// # Errors
    /// As [`NDArray::row_sparse`].
    pub fn row_sparse_from(shape: &[usize], indices: Vec<i64>, rows: NDArray) -> Result<NDArray> {
        check_row_sparse_parts(shape, &indices, &rows)?;
        let Data::Dense(host) = rows.data else {
            unreachable!("checked: the rows are dense")
        };
        Ok(NDArray::from_rows(shape, indices, host))
    }

    /// The row-sparse array of checked parts (rows kept in standard layout, so that they can
    /// be read as bytes).
    fn from_rows(shape: &[usize], indices: Vec<i64>, rows: HostArray) -> NDArray {
        NDArray {
            context: Context::Cpu,
            data: Data::RowSparse(RowSparse {
                shape: shape.to_vec(),
                indices,
                rows: rows.into_standard_layout(),
            }),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match &self.data {
            Data::Dense(h) => h.dtype(),
            Data::RowSparse(r) => r.rows.dtype(),
            Data::Device(m) => m.dtype(),
            Data::DeviceRows(m) => m.dtype(),
        }
    }

    /// The shape (the full, dense shape for row-sparse arrays).
    pub fn shape(&self) -> &[usize] {
        match &self.data {
            Data::Dense(h) => h.shape(),
            Data::RowSparse(r) => &r.shape,
            Data::Device(m) => m.shape(),
            Data::DeviceRows(m) => m.shape(),
        }
    }

    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape().len()
    }

    /// Number of elements of the full shape.
    pub fn size(&self) -> usize {
        self.shape().iter().product()
    }

    /// Where the array lives.
    pub fn context(&self) -> Context {
        self.context
    }

    /// Dense or row-sparse.
    pub fn storage_type(&self) -> StorageType {
        match &self.data {
            Data::Dense(_) | Data::Device(_) => StorageType::Dense,
            Data::RowSparse(_) | Data::DeviceRows(_) => StorageType::RowSparse,
        }
    }

    /// The host array of a dense host array, `None` for a row-sparse one or one in device
    /// memory.
    pub fn dense(&self) -> Option<&HostArray> {
        match &self.data {
            Data::Dense(h) => Some(h),
            _ => None,
        }
    }

    /// The host array of a dense host array, taken out of it without a copy; `None` for a
    /// row-sparse one or one in device memory.
    ///
    /// ```
    /// use kvstore_base::{DType, NDArray};
    ///
    /// let host = NDArray::full(&[2, 3], 1.0, DType::F32).into_dense().unwrap();
    /// assert_eq!(host.shape(), &[2, 3]);
    /// ```
    pub fn into_dense(self) -> Option<HostArray> {
        match self.data {
            Data::Dense(h) => Some(h),
            _ => None,
        }
    }

    /// The host array of a dense host array, mutably.
    pub fn dense_mut(&mut self) -> Option<&mut HostArray> {
        match &mut self.data {
            Data::Dense(h) => Some(h),
            _ => None,
        }
    }

    /// The parts of a row-sparse host array, `None` for a dense one or one in device memory
    /// ([`device_row_sparse`](NDArray::device_row_sparse)).
    pub fn as_row_sparse(&self) -> Option<&RowSparse> {
        match &self.data {
            Data::RowSparse(r) => Some(r),
            _ => None,
        }
    }

    /// This array's elements in host memory: itself, or a copy of an array in device memory.
    fn on_host(&self) -> Result<std::borrow::Cow<'_, NDArray>> {
        match &self.data {
            Data::Device(m) => Ok(std::borrow::Cow::Owned(NDArray::from_host(m.to_host()?))),
            Data::DeviceRows(m) => Ok(std::borrow::Cow::Owned(NDArray::from_rows(
                m.shape(),
                m.indices().to_vec(),
                m.rows_to_host()?,
            ))),
            _ => Ok(std::borrow::Cow::Borrowed(self)),
        }
    }

    /// A typed view of a dense array; `None` for another dtype or a row-sparse array.
    pub fn view<T: Element>(&self) -> Option<ndarray::ArrayViewD<'_, T>> {
        self.dense().and_then(T::host).map(|a| a.view())
    }

    /// A typed mutable view of a dense array; `None` for another dtype or a row-sparse array.
    pub fn view_mut<T: Element>(&mut self) -> Option<ndarray::ArrayViewMutD<'_, T>> {
        self.dense_mut().and_then(T::host_mut).map(|a| a.view_mut())
    }

    /// The elements of a dense, standard-layout array as a slice.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        self.dense().and_then(T::host).and_then(|a| a.as_slice())
    }

    /// The elements of a dense, standard-layout array as a mutable slice.
    pub fn as_slice_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        self.dense_mut()
            .and_then(T::host_mut)
            .and_then(|a| a.as_slice_mut())
    }

    /// Every element in row-major order (row-sparse arrays are densified, arrays in device
    /// memory copied to the host).
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`] when `T` is not the array's element type; [`Error::Device`]
    /// when the copy from a device fails.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let dense = self.on_host()?.to_dense();
        match dense.dense().and_then(T::host) {
            Some(a) => Ok(a.iter().copied().collect()),
            None => Err(Error::DTypeMismatch {
                what: "the requested element type".into(),
                expected: self.dtype(),
                found: T::DTYPE,
            }),
        }
    }

    /// Every element converted to `f64`, in row-major order.
    ///
    /// # Panics
    /// For an array in device memory, when copying it to the host fails (a failing device):
    /// [`try_to_f64_vec`](NDArray::try_to_f64_vec) returns that error instead.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.try_to_f64_vec()
            .unwrap_or_else(|e| host_copy_failed(&e))
    }

    /// Every element converted to `f64`, in row-major order.
    ///
    /// # Errors
    /// [`Error::Device`] when copying an array in device memory to the host fails.
    pub fn try_to_f64_vec(&self) -> Result<Vec<f64>> {
        let dense = self.on_host()?.to_dense();
        let host = dense.dense().expect("to_dense returns a dense array");
        Ok(with_host!(host, a => a.iter().map(|x| x.to_f64()).collect()))
    }

    /// Checks that `other` has this array's shape; `what` names `other` in the error.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] with both shapes.
    pub fn check_shape_of(&self, other: &NDArray, what: &str) -> Result<()> {
        if self.shape() == other.shape() {
            return Ok(());
        }
        Err(Error::ShapeMismatch {
            what: what.to_string(),
            expected: self.shape().to_vec(),
            found: other.shape().to_vec(),
        })
    }

    /// Checks that `other` has this array's shape and dtype; `what` names `other` in the error.
    ///
    /// ```
    /// use kvstore_base::{DType, NDArray};
    /// let stored = NDArray::zeros(&[2, 3], DType::F32);
    /// let err = stored.check_like(&NDArray::zeros(&[3, 2], DType::F32), "pushed value 0").unwrap_err();
    /// assert_eq!(err.to_string(), "shape mismatch: pushed value 0 has shape [3, 2] but [2, 3] was expected");
    /// ```
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] or [`Error::DTypeMismatch`].
    pub fn check_like(&self, other: &NDArray, what: &str) -> Result<()> {
        self.check_shape_of(other, what)?;
        if self.dtype() != other.dtype() {
            return Err(Error::DTypeMismatch {
                what: what.to_string(),
                expected: self.dtype(),
                found: other.dtype(),
            });
        }
        Ok(())
    }

    /// Whether this is a row-sparse array that stores every one of its rows (MXNet's "fully
    /// populated" row-sparse weight, which its optimizers update as a dense one).
    ///
    /// ```
    /// use kvstore_base::{DType, NDArray};
    /// let all = NDArray::ones(&[2, 3], DType::F32).retain_rows(&[0, 1]).unwrap();
    /// assert!(all.stores_every_row());
    /// assert!(!all.retain_rows(&[1]).unwrap().stores_every_row());
    /// ```
    pub fn stores_every_row(&self) -> bool {
        match &self.data {
            // Ids are strictly increasing inside 0..shape[0]: as many as rows means all.
            Data::RowSparse(r) => r.indices.len() == r.shape[0],
            Data::DeviceRows(m) => m.indices().len() == m.shape()[0],
            _ => false,
        }
    }

    /// Runs `f` on the dense array that a row-sparse array storing every row stands for (see
    /// [`stores_every_row`](NDArray::stores_every_row)), in place: its rows are that array,
    /// nothing is copied. The array is row-sparse again afterwards (every row stored), unless
    /// `f` replaced it by an array of another shape, which is then kept. `None`, without
    /// calling `f`, for any other array (one in device memory included).
    ///
    /// ```
    /// use kvstore_base::{DType, NDArray};
    /// let mut w = NDArray::ones(&[2, 2], DType::F32).retain_rows(&[0, 1]).unwrap();
    /// w.with_every_row_dense(|dense| dense.add_assign(&NDArray::ones(&[2, 2], DType::F32)))
    ///     .unwrap()
    ///     .unwrap();
    /// assert!(w.stores_every_row());
    /// assert_eq!(w.to_vec::<f32>().unwrap(), vec![2.0; 4]);
    /// ```
    pub fn with_every_row_dense<T>(&mut self, f: impl FnOnce(&mut NDArray) -> T) -> Option<T> {
        if !self.stores_every_row() || !matches!(self.data, Data::RowSparse(_)) {
            return None;
        }
        let placeholder = Data::Dense(HostArray::full(&[0], 0.0, self.dtype()));
        let Data::RowSparse(r) = std::mem::replace(&mut self.data, placeholder) else {
            unreachable!("checked by stores_every_row")
        };
        let mut dense = NDArray {
            context: self.context,
            data: Data::Dense(r.rows),
        };
        let out = f(&mut dense);
        self.data = match dense.data {
            Data::Dense(rows) if rows.shape() == r.shape.as_slice() => Data::RowSparse(RowSparse {
                shape: r.shape,
                indices: r.indices,
                rows: rows.into_standard_layout(),
            }),
            other => other,
        };
        Some(out)
    }

    /// A dense copy (a plain clone for a dense array, host or device; a row-sparse array in
    /// device memory is densified on the host and copied back to its device).
    ///
    /// # Panics
    /// For a row-sparse array in device memory, when a copy to or from its device fails:
    /// [`try_to_dense`](NDArray::try_to_dense) returns that error instead.
    pub fn to_dense(&self) -> NDArray {
        self.try_to_dense().unwrap_or_else(|e| host_copy_failed(&e))
    }

    /// [`to_dense`](NDArray::to_dense), returning the error of a failing device.
    ///
    /// # Errors
    /// [`Error::Device`] when a row-sparse array in device memory cannot be copied to the host
    /// or its dense form back to the device.
    pub fn try_to_dense(&self) -> Result<NDArray> {
        Ok(match &self.data {
            Data::Dense(_) | Data::Device(_) => self.clone(),
            Data::DeviceRows(_) => {
                let dense = self.on_host()?.to_dense();
                let host = dense.dense().expect("a dense host array");
                NDArray::from_device(gpu_backend(self.context)?.upload(host, self.context)?)
            }
            Data::RowSparse(r) => {
                let mut host = HostArray::full(&r.shape, 0.0, r.rows.dtype());
                scatter_rows(&mut host, &r.indices, &r.rows, false);
                NDArray {
                    context: self.context,
                    data: Data::Dense(host),
                }
            }
        })
    }

    /// A row-sparse copy holding the rows that have a non-zero element (MXNet's
    /// `cast_storage` to `row_sparse`); a plain clone for a row-sparse array.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a 0-dimensional array.
    pub fn to_row_sparse(&self) -> Result<NDArray> {
        let host = match &self.data {
            Data::RowSparse(_) | Data::DeviceRows(_) => return Ok(self.clone()),
            Data::Dense(h) => h,
            Data::Device(_) => return Err(on_device("a row-sparse copy", self.context)),
        };
        if host.shape().is_empty() {
            return Err(Error::InvalidArgument(
                "a 0-dimensional array cannot be row-sparse".into(),
            ));
        }
        let ids: Vec<usize> = (0..host.shape()[0])
            .filter(|&row| !host.row_is_zero(row))
            .collect();
        let rows = gather_rows(host, &ids);
        NDArray::row_sparse(
            host.shape(),
            ids.iter().map(|&i| i as i64).collect(),
            &NDArray::from_host(rows),
        )
    }

    /// The rows `ids` of this array as a row-sparse array of the same shape (MXNet's
    /// `sparse_retain`): exactly those rows are stored, zeros where this array has none.
    ///
    /// ```
    /// use kvstore_base::{DType, NDArray};
    /// let table = NDArray::from_vec(&[3, 2], vec![1.0f32, 1.0, 2.0, 2.0, 3.0, 3.0]).unwrap();
    /// let picked = table.retain_rows(&[0, 2]).unwrap();
    /// assert_eq!(picked.as_row_sparse().unwrap().indices(), &[0, 2]);
    /// assert_eq!(picked.to_vec::<f32>().unwrap(), vec![1.0, 1.0, 0.0, 0.0, 3.0, 3.0]);
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a 0-d array or ids that are not strictly increasing
    /// inside `0..shape[0]`.
    pub fn retain_rows(&self, ids: &[i64]) -> Result<NDArray> {
        let shape = self.shape().to_vec();
        if shape.is_empty() {
            return Err(Error::InvalidArgument(
                "rows cannot be selected from a 0-dimensional array".into(),
            ));
        }
        let mut row_shape = shape.clone();
        row_shape[0] = ids.len();
        let mut rows = HostArray::full(&row_shape, 0.0, self.dtype());
        // Validate before touching any row: row_sparse() checks order and range again below.
        if let Some(bad) = ids
            .iter()
            .find(|&&id| id < 0 || id as u64 >= shape[0] as u64)
        {
            return Err(Error::InvalidArgument(format!(
                "row id {bad} is outside 0..{} of shape {shape:?}",
                shape[0]
            )));
        }
        match &self.data {
            Data::Dense(host) => {
                let picked: Vec<usize> = ids.iter().map(|&id| id as usize).collect();
                rows = gather_rows(host, &picked);
            }
            Data::Device(_) | Data::DeviceRows(_) => {
                return Err(on_device("retain_rows", self.context))
            }
            Data::RowSparse(r) => {
                let (mut to, mut from) = (Vec::new(), Vec::new());
                for (j, id) in ids.iter().enumerate() {
                    if let Ok(p) = r.indices.binary_search(id) {
                        to.push(j as i64);
                        from.push(p);
                    }
                }
                scatter_rows(&mut rows, &to, &gather_rows(&r.rows, &from), false);
            }
        }
        NDArray::row_sparse(&shape, ids.to_vec(), &NDArray::from_host(rows))
    }

    /// A copy with elements converted to `dtype` (MXNet's `astype`). An array in device
    /// memory is cast on the host: unless `dtype` is its own (a plain clone), the copy is on
    /// the host ([`to_context`](NDArray::to_context) moves it back).
    ///
    /// # Panics
    /// For an array in device memory, when copying it to the host fails (a failing device):
    /// [`try_astype`](NDArray::try_astype) returns that error instead.
    pub fn astype(&self, dtype: DType) -> NDArray {
        self.try_astype(dtype)
            .unwrap_or_else(|e| host_copy_failed(&e))
    }

    /// [`astype`](NDArray::astype), returning the error of a failing device.
    ///
    /// # Errors
    /// [`Error::Device`] when copying an array in device memory to the host fails.
    pub fn try_astype(&self, dtype: DType) -> Result<NDArray> {
        if self.in_device_memory() {
            if self.dtype() == dtype {
                return Ok(self.clone());
            }
            return self.on_host()?.try_astype(dtype);
        }
        let data = match &self.data {
            Data::Dense(h) => Data::Dense(h.cast(dtype)),
            Data::RowSparse(r) => Data::RowSparse(RowSparse {
                shape: r.shape.clone(),
                indices: r.indices.clone(),
                rows: r.rows.cast(dtype),
            }),
            Data::Device(_) | Data::DeviceRows(_) => unreachable!("handled above"),
        };
        Ok(NDArray {
            context: self.context,
            data,
        })
    }

    /// A copy in `context` (MXNet's `as_in_context`): to the host, or into the memory of a
    /// GPU through the linked device backend (dense and row-sparse arrays).
    ///
    /// # Errors
    /// [`Error::Device`] for a GPU context when no device backend provides GPU memory, or when
    /// the device fails; [`Error::InvalidArgument`] for an array the backend cannot hold (e.g.
    /// a dtype it does not support).
    pub fn to_context(&self, context: Context) -> Result<NDArray> {
        match context {
            Context::Cpu => Ok(self.on_host()?.into_owned()),
            Context::Gpu(_) if self.context == context => Ok(self.clone()),
            Context::Gpu(id) => {
                let backend = gpu_backend(context)?;
                if let Data::Device(src) = &self.data {
                    if let Some(copy) = backend.copy_between_devices(&**src, context)? {
                        return Ok(NDArray::from_device(copy));
                    }
                }
                let host = self.on_host()?;
                match &host.data {
                    Data::Dense(dense) => Ok(NDArray::from_device(backend.upload(dense, context)?)),
                    Data::RowSparse(r) => Ok(NDArray::from_device_row_sparse(
                        backend.upload_row_sparse(&r.shape, &r.indices, &r.rows, context)?,
                    )),
                    Data::Device(_) | Data::DeviceRows(_) => Err(Error::Device(format!(
                        "an array on gpu({id}) stayed in device memory on its way to the host"
                    ))),
                }
            }
        }
    }

    /// The element-wise sum of `values`, arrays in device memory of one shape and dtype, made
    /// on one of their devices by the linked device backend, in MXNet's association order (see
    /// [`DeviceBackend::sum`]): `Ok(None)` when a value is not dense in device memory (a host
    /// or a row-sparse array) or the backend does not sum on its devices, so that the caller
    /// sums on the host instead.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for no value; [`Error::ShapeMismatch`] or [`Error::DTypeMismatch`] naming the value that differs from
    /// the first; [`Error::Device`] when the device fails.
    pub fn sum_on_device(values: &[&NDArray]) -> Result<Option<NDArray>> {
        let Some(first) = values.first() else {
            return Err(Error::InvalidArgument(
                "a sum needs at least one value".into(),
            ));
        };
        for (i, v) in values.iter().enumerate().skip(1) {
            first.check_like(v, &format!("value {i} of the sum"))?;
        }
        let Some(memories) = values
            .iter()
            .map(|v| v.device())
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        let Some(backend) = device_backend() else {
            return Ok(None);
        };
        Ok(backend.sum(&memories)?.map(NDArray::from_device))
    }

    /// `self[:] = src`: copies `src` into this array, keeping this array's dtype (values are
    /// cast, as MXNet's `copyto` does) and storage type (a dense source written into a
    /// row-sparse array keeps its non-zero rows).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the shapes differ; nothing is written then.
    pub fn assign(&mut self, src: &NDArray) -> Result<()> {
        if self.shape() != src.shape() {
            return Err(Error::ShapeMismatch {
                what: "the source array".into(),
                expected: self.shape().to_vec(),
                found: src.shape().to_vec(),
            });
        }
        if let (Some(from), Some(_)) = (src.device(), self.device()) {
            if from.dtype() == self.dtype() {
                // Device to device: no trip through host memory.
                let dst = self.device_mut()?.expect("a device array");
                return dst.copy_from_device(from);
            }
        }
        let src = src.on_host()?;
        let src = src.as_ref();
        if let Some(fresh) = self.row_sparse_replacement(src)? {
            *self = fresh;
            return Ok(());
        }
        if let Some(dst) = self.device_mut()? {
            let dense = src.to_dense();
            let host = dense.dense().expect("a dense host array");
            let mut cast = HostArray::full(host.shape(), 0.0, dst.dtype());
            cast.assign_cast(host);
            return dst.write_from_host(&cast);
        }
        match &mut self.data {
            Data::Device(_) | Data::DeviceRows(_) => unreachable!("written above"),
            Data::Dense(dst) => match &src.data {
                Data::Dense(s) => dst.assign_cast(s),
                Data::RowSparse(r) if r.rows.dtype() == dst.dtype() => {
                    // Zeros, then the stored rows: no dense copy of the source.
                    dst.fill_zero();
                    scatter_rows(dst, &r.indices, &r.rows, false);
                }
                _ => dst.assign_cast(src.to_dense().dense().expect("dense")),
            },
            Data::RowSparse(dst) => {
                let sparse = src.to_row_sparse()?;
                let Data::RowSparse(r) = sparse.data else {
                    unreachable!("to_row_sparse returns a row-sparse array")
                };
                dst.indices = r.indices;
                dst.rows = r.rows.cast(dst.rows.dtype());
            }
        }
        Ok(())
    }

    /// `self += other`, element-wise with MXNet's arithmetic for the dtype (floats in their
    /// own precision, half types rounded through `f32`, integers wrapping).
    ///
    /// Row-sparse plus row-sparse stays row-sparse (the union of the rows); any other mix
    /// leaves `self` dense.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] or [`Error::DTypeMismatch`]; nothing is written then.
    pub fn add_assign(&mut self, other: &NDArray) -> Result<()> {
        if self.shape() != other.shape() {
            return Err(Error::ShapeMismatch {
                what: "the added array".into(),
                expected: self.shape().to_vec(),
                found: other.shape().to_vec(),
            });
        }
        if self.dtype() != other.dtype() {
            return Err(Error::DTypeMismatch {
                what: "the added array".into(),
                expected: self.dtype(),
                found: other.dtype(),
            });
        }
        for array in [&*self, other] {
            if array.in_device_memory() {
                return Err(on_device("add_assign", array.context));
            }
        }
        if let (Data::RowSparse(a), Data::RowSparse(b)) = (&mut self.data, &other.data) {
            if a.indices == b.indices {
                // The same rows: added in place.
                a.rows.add_same(&b.rows);
                return Ok(());
            }
            *self = NDArray {
                context: self.context,
                data: Data::RowSparse(sparse_sum(a, b)),
            };
            return Ok(());
        }
        if let Data::RowSparse(_) = self.data {
            *self = self.to_dense();
        }
        let dst = self.dense_mut().expect("densified above");
        match &other.data {
            Data::Dense(src) => dst.add_same(src),
            Data::RowSparse(r) => scatter_rows(dst, &r.indices, &r.rows, true),
            Data::Device(_) | Data::DeviceRows(_) => unreachable!("refused above"),
        }
        Ok(())
    }
}

/// `a + b` of two row-sparse arrays of one shape and dtype: the union of their row ids,
/// each row `a`'s (or zeros) plus `b`'s, as MXNet's sum of row-sparse arrays keeps every row
/// either holds, zero or not; never densified.
fn sparse_sum(a: &RowSparse, b: &RowSparse) -> RowSparse {
    let mut union: Vec<i64> = Vec::with_capacity(a.indices.len() + b.indices.len());
    let (mut i, mut j) = (0, 0);
    while i < a.indices.len() || j < b.indices.len() {
        let next = match (a.indices.get(i), b.indices.get(j)) {
            (Some(&x), Some(&y)) if x == y => {
                (i, j) = (i + 1, j + 1);
                x
            }
            (Some(&x), Some(&y)) if x < y => {
                i += 1;
                x
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (_, Some(&y)) => {
                j += 1;
                y
            }
            (None, None) => unreachable!("the loop condition"),
        };
        union.push(next);
    }
    let position = |ids: &[i64]| -> Vec<i64> {
        ids.iter()
            .map(|id| union.binary_search(id).expect("in the union") as i64)
            .collect()
    };
    let mut row_shape = a.shape.clone();
    row_shape[0] = union.len();
    let mut rows = HostArray::full(&row_shape, 0.0, a.rows.dtype());
    scatter_rows(&mut rows, &position(&a.indices), &a.rows, false);
    scatter_rows(&mut rows, &position(&b.indices), &b.rows, true);
    RowSparse {
        shape: a.shape.clone(),
        indices: union,
        rows,
    }
}

/// The checks of [`NDArray::row_sparse`].
fn check_row_sparse_parts(shape: &[usize], indices: &[i64], rows: &NDArray) -> Result<()> {
    if shape.is_empty() {
        return Err(Error::InvalidArgument(
            "a row-sparse array needs at least one dimension".into(),
        ));
    }
    // `size()` and `to_dense()` need the full shape to be addressable, as a dense
    // array's is.
    let addressable = element_count(shape)
        .and_then(|n| n.checked_mul(rows.dtype().size_of()))
        .is_some_and(|bytes| bytes <= isize::MAX as usize);
    if !addressable {
        return Err(Error::InvalidArgument(format!(
            "a row-sparse {} array of shape {shape:?} is too large to address",
            rows.dtype()
        )));
    }
    let Data::Dense(host) = &rows.data else {
        return Err(Error::InvalidArgument(
            "the rows of a row-sparse array must be dense".into(),
        ));
    };
    let mut expected = shape.to_vec();
    expected[0] = indices.len();
    if host.shape() != expected.as_slice() {
        return Err(Error::ShapeMismatch {
            what: "the rows of a row-sparse array".into(),
            expected,
            found: host.shape().to_vec(),
        });
    }
    for (i, &id) in indices.iter().enumerate() {
        if id < 0 || id as u64 >= shape[0] as u64 {
            return Err(Error::InvalidArgument(format!(
                "row id {id} is outside 0..{} of shape {shape:?}",
                shape[0]
            )));
        }
        if i > 0 && indices[i - 1] >= id {
            return Err(Error::InvalidArgument(format!(
                "row ids must be strictly increasing, got {} then {id}",
                indices[i - 1]
            )));
        }
    }
    Ok(())
}

/// Whether an array of `shape` and `dtype` can be allocated: the byte size of its non-zero
/// dimensions fits in `isize` (a shape with a zero dimension holds no element, but its other
/// dimensions must still be addressable).
pub(crate) fn addressable(shape: &[usize], dtype: DType) -> bool {
    shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(dtype.size_of(), |n, &d| n.checked_mul(d))
        .is_some_and(|n| n <= isize::MAX as usize)
}

/// The number of elements of `shape`, `None` when it overflows `usize`.
fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

impl<T: Element, D: ndarray::Dimension> From<ndarray::Array<T, D>> for NDArray {
    fn from(array: ndarray::Array<T, D>) -> NDArray {
        NDArray::from_host(T::wrap(array.into_dyn()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn from_bytes_refuses_a_shape_too_large_to_allocate_even_when_empty() {
        // Zero elements, so zero bytes is the right length, but `[0, usize::MAX]` cannot be
        // allocated: an error, not a panic (shapes arrive from the network).
        for shape in [vec![0, usize::MAX], vec![usize::MAX / 2, 0, 3]] {
            let e = NDArray::from_bytes(&shape, DType::F32, &[]).unwrap_err();
            assert!(
                e.to_string().contains("too many elements"),
                "{shape:?}: {e}"
            );
        }
        let empty = NDArray::from_bytes(&[0, 1 << 20], DType::F64, &[]).unwrap();
        assert_eq!(empty.shape(), &[0, 1 << 20]);
    }

    #[test]
    fn a_sum_of_row_sparse_arrays_keeps_every_row_either_holds() {
        let rows = |v: Vec<f32>| NDArray::from_vec(&[2, 2], v).unwrap();
        let mut a = NDArray::row_sparse(&[5, 2], vec![0, 2], &rows(vec![1., 2., 3., 4.])).unwrap();
        let b = NDArray::row_sparse(&[5, 2], vec![2, 4], &rows(vec![-3., -4., 5., 6.])).unwrap();
        a.add_assign(&b).unwrap();
        assert_eq!(a.storage_type(), StorageType::RowSparse);
        assert_eq!(a.as_row_sparse().unwrap().indices(), &[0i64, 2, 4]);
        // Row 2 sums to zero and stays (an optimizer's lazy update still visits it).
        assert_eq!(
            a.to_vec::<f32>().unwrap(),
            vec![1., 2., 0., 0., 0., 0., 0., 0., 5., 6.]
        );
    }

    #[test]
    fn assign_casts_and_checks_shape() {
        let src = NDArray::from_vec(&[3], vec![1.5f64, -2.0, 3.25]).unwrap();
        let mut dst = NDArray::zeros(&[3], DType::F16);
        dst.assign(&src).unwrap();
        assert_eq!(dst.to_vec::<f16>().unwrap()[0], f16::from_f32(1.5));
        let mut wrong = NDArray::zeros(&[2], DType::F32);
        let err = wrong.assign(&src).unwrap_err().to_string();
        assert!(err.contains("[2]") && err.contains("[3]"), "{err}");
        assert_eq!(wrong, NDArray::zeros(&[2], DType::F32));
    }

    #[test]
    fn float32_and_float16_convert_as_element_by_element_whatever_the_layout() {
        // Ties, subnormals, overflow, signed zeros, infinities and NaN, and enough elements
        // that the block conversion's tail is exercised too.
        let mut values = vec![
            2049.0f32,
            2051.0,
            1e-8,
            6.0e-8,
            -3.0e-5,
            65519.0,
            65520.0,
            -1e6,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        values.extend((0..1000).map(|i| (i as f32 * 0.377).sin() * 1000.0));
        let n = values.len();
        let expected: Vec<f16> = values
            .iter()
            .map(|&x| f16::from_f64(f64::from(x)))
            .collect();
        let a = NDArray::from_vec(&[n], values.clone()).unwrap();
        let bits = |v: Vec<f16>| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();

        let cast = a.astype(DType::F16).to_vec::<f16>().unwrap();
        assert_eq!(bits(cast), bits(expected.clone()));
        let mut assigned = NDArray::zeros(&[n], DType::F16);
        assigned.assign(&a).unwrap();
        assert_eq!(
            bits(assigned.to_vec::<f16>().unwrap()),
            bits(expected.clone())
        );

        let halves = NDArray::from_vec(&[n], expected.clone()).unwrap();
        let back: Vec<u32> = halves
            .astype(DType::F32)
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        let wanted: Vec<u32> = expected.iter().map(|x| x.to_f32().to_bits()).collect();
        assert_eq!(back, wanted);

        // A transposed (not contiguous) source takes the element-by-element path: same values.
        let square = ndarray::Array::from_shape_vec((2, 3), values[..6].to_vec()).unwrap();
        let t = NDArray::from_host(HostArray::F32(square.reversed_axes().into_dyn()));
        assert!(t.as_bytes().is_none(), "not contiguous");
        let mut out = NDArray::zeros(&[3, 2], DType::F16);
        out.assign(&t).unwrap();
        let want: Vec<f16> = [0, 3, 1, 4, 2, 5]
            .iter()
            .map(|&i| f16::from_f64(f64::from(values[i])))
            .collect();
        assert_eq!(bits(out.to_vec::<f16>().unwrap()), bits(want));
    }

    #[test]
    fn casts_give_what_mxnet_1_9_1_gives() {
        // Figures from MXNet 1.9.1's `astype`: float32 to float16 rounds once (the 2^-23
        // decides: up); float64 to float16 goes through float32 (2^-40 is lost there, and the
        // tie then goes to even: down); integers narrow as C's static_cast, keeping low bits.
        let f32_up = NDArray::from_vec(&[1], vec![1.0f32 + 2f32.powi(-11) + 2f32.powi(-23)])
            .unwrap()
            .astype(DType::F16);
        assert_eq!(f32_up.to_vec::<f16>().unwrap()[0].to_bits(), 15361);
        let f64_twice = NDArray::from_vec(&[1], vec![1.0f64 + 2f64.powi(-11) + 2f64.powi(-40)])
            .unwrap()
            .astype(DType::F16);
        assert_eq!(f64_twice.to_vec::<f16>().unwrap()[0].to_bits(), 15360);
        let bytes = NDArray::from_vec(&[2], vec![-1i32, 300]).unwrap();
        assert_eq!(
            bytes.astype(DType::U8).to_vec::<u8>().unwrap(),
            vec![255, 44]
        );
        let mut narrowed = NDArray::zeros(&[1], DType::I32);
        narrowed
            .assign(&NDArray::from_vec(&[1], vec![(1i64 << 32) + 5]).unwrap())
            .unwrap();
        assert_eq!(narrowed.to_vec::<i32>().unwrap(), vec![5]);
        // Integers beyond 2^53 stay exact between the integer types.
        let big = NDArray::from_vec(&[1], vec![(1i64 << 60) + 1]).unwrap();
        let mut copy = NDArray::zeros(&[1], DType::I64);
        copy.assign(&big.astype(DType::I32)).unwrap();
        assert_eq!(copy.to_vec::<i64>().unwrap(), vec![1]);
    }

    #[test]
    fn add_assign_rejects_mismatches_without_writing() {
        let mut a = NDArray::ones(&[2, 2], DType::F32);
        let b = NDArray::ones(&[2, 2], DType::F64);
        assert!(matches!(a.add_assign(&b), Err(Error::DTypeMismatch { .. })));
        assert_eq!(a, NDArray::ones(&[2, 2], DType::F32));
    }

    #[test]
    fn row_sparse_round_trips_and_sums() {
        let rows = NDArray::from_vec(&[2, 2], vec![1i32, 2, 3, 4]).unwrap();
        let a = NDArray::row_sparse(&[4, 2], vec![1, 3], &rows).unwrap();
        assert_eq!(
            a.to_dense().to_vec::<i32>().unwrap(),
            vec![0, 0, 1, 2, 0, 0, 3, 4]
        );
        assert_eq!(a.to_dense().to_row_sparse().unwrap(), a);

        let rows_b = NDArray::from_vec(&[1, 2], vec![10i32, 10]).unwrap();
        let b = NDArray::row_sparse(&[4, 2], vec![0], &rows_b).unwrap();
        let mut sum = a.clone();
        sum.add_assign(&b).unwrap();
        assert_eq!(sum.as_row_sparse().unwrap().indices(), &[0, 1, 3]);
        assert_eq!(sum.to_vec::<i32>().unwrap(), vec![10, 10, 1, 2, 0, 0, 3, 4]);
    }

    #[test]
    fn row_sparse_validates_ids() {
        let rows = NDArray::ones(&[2, 2], DType::F32);
        assert!(NDArray::row_sparse(&[4, 2], vec![2, 1], &rows).is_err());
        assert!(NDArray::row_sparse(&[4, 2], vec![1, 1], &rows).is_err());
        assert!(NDArray::row_sparse(&[4, 2], vec![1, 4], &rows).is_err());
        assert!(NDArray::row_sparse(&[4, 3], vec![0, 1], &rows).is_err());
    }

    #[test]
    fn huge_shapes_are_errors_not_panics() {
        let err = NDArray::from_vec::<f32>(&[1 << 40, 1 << 40, 0], vec![1.0]).unwrap_err();
        assert!(err.to_string().contains("too many elements"), "{err}");
        let err = NDArray::from_vec::<f32>(&[2, 3], vec![1.0]).unwrap_err();
        assert!(err.to_string().contains("(6 elements)"), "{err}");

        let no_rows = NDArray::zeros(&[0, 1 << 40], DType::F32);
        let err = NDArray::row_sparse(&[1 << 40, 1 << 40], vec![], &no_rows).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        // 2^61 f32 elements: the count fits in usize, the bytes do not fit in isize.
        let err = NDArray::row_sparse(&[1 << 21, 1 << 40], vec![], &no_rows).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        let fits = NDArray::row_sparse(&[1 << 10, 1 << 40], vec![], &no_rows).unwrap();
        assert_eq!(fits.size(), 1 << 50);
    }

    #[test]
    fn to_vec_with_the_wrong_type_is_an_error() {
        let a = NDArray::ones(&[2], DType::F32);
        assert!(a.to_vec::<f64>().is_err());
        assert_eq!(a.to_f64_vec(), vec![1.0, 1.0]);
    }
}
