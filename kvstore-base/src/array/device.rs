//! Arrays in device (GPU) memory. `kvstore-base` does not depend on CUDA: a device backend
//! (`kvstore-device`) implements [`DeviceMemory`] for its dense buffers (and
//! [`DeviceRowSparseMemory`] for its row-sparse arrays) and registers a
//! [`DeviceBackend`] with [`register_device_backend!`](crate::register_device_backend), which
//! is what [`NDArray::to_context`](crate::NDArray::to_context) uses to place an array on
//! `gpu(i)`. Without a registered backend, asking for GPU memory is an
//! [`Error::Device`](crate::Error::Device).

use std::any::Any;
use std::fmt;

use crate::{Context, DType, HostArray, Result};

/// A dense array in the memory of a device, owned by the backend that made it. Stores that
/// accept device arrays downcast it (`as_any`) to their own type.
pub trait DeviceMemory: fmt::Debug + Send + Sync + 'static {
    /// The device it lives on (never [`Context::Cpu`]).
    fn context(&self) -> Context;

    /// The element type.
    fn dtype(&self) -> DType;

    /// The shape.
    fn shape(&self) -> &[usize];

    /// A copy in host memory (waits for the device's pending work on it).
    ///
    /// # Errors
    /// [`Error::Device`](crate::Error::Device) when the device fails.
    fn to_host(&self) -> Result<HostArray>;

    /// Overwrites the array with `host`, which has its shape and dtype.
    ///
    /// # Errors
    /// A shape or dtype mismatch; [`Error::Device`](crate::Error::Device) when the device
    /// fails.
    fn write_from_host(&mut self, host: &HostArray) -> Result<()>;

    /// A copy on the same device.
    ///
    /// # Errors
    /// [`Error::Device`](crate::Error::Device), e.g. the device out of memory.
    fn try_clone(&self) -> Result<Box<dyn DeviceMemory>>;

    /// Overwrites the array with `src`, device memory of its shape and dtype (on any device).
    /// The provided implementation goes through host memory; a backend copies between its own
    /// buffers on the devices (device to device, or peer to peer).
    ///
    /// # Errors
    /// A shape or dtype mismatch; [`Error::Device`](crate::Error::Device) when a device
    /// fails.
    fn copy_from_device(&mut self, src: &dyn DeviceMemory) -> Result<()> {
        self.write_from_host(&src.to_host()?)
    }

    /// The concrete buffer, for the backend that made it.
    fn as_any(&self) -> &dyn Any;

    /// The concrete buffer, mutably.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A row-sparse array in the memory of a device (MXNet's `RowSparseNDArray` on `gpu(i)`):
/// the ids of its stored rows, known on the host, and the rows in device memory. Owned by the
/// backend that made it ([`DeviceBackend::upload_row_sparse`]); stores that take such arrays
/// downcast it (`as_any`). It is never written: clones of an `NDArray` share it, and a write
/// into one replaces its memory by a new upload (its rows may change in number).
pub trait DeviceRowSparseMemory: fmt::Debug + Send + Sync + 'static {
    /// The device it lives on (never [`Context::Cpu`]).
    fn context(&self) -> Context;

    /// The element type.
    fn dtype(&self) -> DType;

    /// The full (dense) shape.
    fn shape(&self) -> &[usize];

    /// The ids of the stored rows, strictly increasing.
    fn indices(&self) -> &[i64];

    /// A copy of the stored rows in host memory, shape `[indices().len(), shape[1], ...]`
    /// (waits for the device's pending work on them).
    ///
    /// # Errors
    /// [`Error::Device`](crate::Error::Device) when the device fails.
    fn rows_to_host(&self) -> Result<HostArray>;

    /// The concrete array, for the backend that made it.
    fn as_any(&self) -> &dyn Any;
}

/// What makes device memory: linked in by a device backend crate.
pub trait DeviceBackend: Send + Sync + 'static {
    /// The backend's name, for messages.
    fn name(&self) -> &'static str;

    /// A copy of `host` in the memory of `context` (a GPU).
    ///
    /// # Errors
    /// A device that does not exist or fails, or an array the backend cannot hold (a dtype it
    /// does not support, no element).
    fn upload(&self, host: &HostArray, context: Context) -> Result<Box<dyn DeviceMemory>>;

    /// A row-sparse array of `shape` in the memory of `context` (a GPU) whose rows `indices`
    /// (strictly increasing, inside `0..shape[0]`, checked by the caller) hold `rows`. The
    /// provided implementation refuses: a backend without row-sparse arrays.
    ///
    /// # Errors
    /// As [`upload`](DeviceBackend::upload); [`Error::InvalidArgument`](crate::Error::InvalidArgument)
    /// from a backend that does not hold row-sparse arrays.
    fn upload_row_sparse(
        &self,
        shape: &[usize],
        indices: &[i64],
        rows: &HostArray,
        context: Context,
    ) -> Result<Box<dyn DeviceRowSparseMemory>> {
        let _ = (shape, indices, rows);
        Err(crate::Error::InvalidArgument(format!(
            "a row-sparse array cannot be placed on {context}: the {} device backend holds \
             dense arrays only",
            self.name()
        )))
    }

    /// Zeros of `shape` and `dtype` in the memory of `context` (a GPU). The provided
    /// implementation uploads host zeros; a backend fills them on the device.
    ///
    /// # Errors
    /// As [`upload`](DeviceBackend::upload).
    fn zeros(
        &self,
        shape: &[usize],
        dtype: DType,
        context: Context,
    ) -> Result<Box<dyn DeviceMemory>> {
        self.upload(&HostArray::full(shape, 0.0, dtype), context)
    }

    /// A copy of `src` (device memory of this backend) in the memory of `context`, another
    /// device, copied device to device: `None` when the backend does not (the provided
    /// implementation), so that the copy goes through host memory.
    ///
    /// # Errors
    /// [`Error::Device`](crate::Error::Device) when a device fails.
    fn copy_between_devices(
        &self,
        src: &dyn DeviceMemory,
        context: Context,
    ) -> Result<Option<Box<dyn DeviceMemory>>> {
        let _ = (src, context);
        Ok(None)
    }

    /// The element-wise sum of `values` (at least one; one shape and dtype, checked by the
    /// caller; on any of the backend's devices) in new memory on one of their devices, in
    /// MXNet's association order (`values[0]`, then the others in groups of up to four, as
    /// MXNet's CPU reduction): `None` when the backend does not sum on its devices (the
    /// provided implementation) or does not own these arrays. Stores that send a sum of
    /// device arrays elsewhere (`dist_device_sync`) use it to copy one array to the host
    /// instead of every value.
    ///
    /// # Errors
    /// [`Error::Device`](crate::Error::Device) when a device fails (out of memory, for
    /// instance).
    fn sum(&self, values: &[&dyn DeviceMemory]) -> Result<Option<Box<dyn DeviceMemory>>> {
        let _ = values;
        Ok(None)
    }
}

/// The registration a device backend submits ([`register_device_backend!`]).
///
/// [`register_device_backend!`]: crate::register_device_backend
pub struct DeviceBackendRegistration {
    /// The backend.
    pub backend: &'static dyn DeviceBackend,
}

inventory::collect!(DeviceBackendRegistration);

/// The linked device backend: `None` when no crate registers one, or when several do (which
/// one would serve GPU memory would depend on the link order; [`device_backends`] lists them,
/// and placing an array on a GPU then says which are linked).
pub fn device_backend() -> Option<&'static dyn DeviceBackend> {
    match device_backends().as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// Every linked device backend, in registration order (normally none or one).
pub fn device_backends() -> Vec<&'static dyn DeviceBackend> {
    inventory::iter::<DeviceBackendRegistration>
        .into_iter()
        .map(|r| r.backend)
        .collect()
}

/// Registers a device backend (a `static` implementing [`DeviceBackend`]): linking the crate
/// is then enough for [`NDArray::to_context`](crate::NDArray::to_context) to reach GPU
/// memory.
///
/// ```ignore
/// static GPU: MyGpuBackend = MyGpuBackend;
/// kvstore_base::register_device_backend!(GPU);
/// ```
#[macro_export]
macro_rules! register_device_backend {
    ($backend:path) => {
        $crate::__private::inventory::submit! {
            $crate::DeviceBackendRegistration { backend: &$backend }
        }
    };
}

impl fmt::Debug for DeviceBackendRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBackendRegistration")
            .field("backend", &self.backend.name())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Capability, Error, KVStoreBase, KVStoreExt, KeyedOuts, KeyedValues, NDArray, StorageType,
    };

    /// "Device" memory that is host memory, to check `NDArray`'s device semantics without a
    /// GPU.
    #[derive(Debug, Clone)]
    struct HostBacked {
        context: Context,
        host: HostArray,
    }

    impl DeviceMemory for HostBacked {
        fn context(&self) -> Context {
            self.context
        }
        fn dtype(&self) -> DType {
            self.host.dtype()
        }
        fn shape(&self) -> &[usize] {
            self.host.shape()
        }
        fn to_host(&self) -> Result<HostArray> {
            Ok(self.host.clone())
        }
        fn write_from_host(&mut self, host: &HostArray) -> Result<()> {
            self.host = host.clone();
            Ok(())
        }
        fn try_clone(&self) -> Result<Box<dyn DeviceMemory>> {
            Ok(Box::new(self.clone()))
        }
        fn copy_from_device(&mut self, src: &dyn DeviceMemory) -> Result<()> {
            let src: &HostBacked = src.as_any().downcast_ref().expect("one backend");
            assert_eq!((src.shape(), src.dtype()), (self.shape(), self.dtype()));
            DEVICE_COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.host = src.host.clone();
            Ok(())
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    /// Row-sparse "device" memory that is host memory.
    #[derive(Debug, Clone)]
    struct HostBackedRows {
        context: Context,
        shape: Vec<usize>,
        indices: Vec<i64>,
        rows: HostArray,
    }

    impl DeviceRowSparseMemory for HostBackedRows {
        fn context(&self) -> Context {
            self.context
        }
        fn dtype(&self) -> DType {
            self.rows.dtype()
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn indices(&self) -> &[i64] {
            &self.indices
        }
        fn rows_to_host(&self) -> Result<HostArray> {
            Ok(self.rows.clone())
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    struct HostBackedBackend;

    impl DeviceBackend for HostBackedBackend {
        fn name(&self) -> &'static str {
            "host-backed test memory"
        }
        fn upload(&self, host: &HostArray, context: Context) -> Result<Box<dyn DeviceMemory>> {
            Ok(Box::new(HostBacked {
                context,
                host: host.clone(),
            }))
        }
        fn upload_row_sparse(
            &self,
            shape: &[usize],
            indices: &[i64],
            rows: &HostArray,
            context: Context,
        ) -> Result<Box<dyn DeviceRowSparseMemory>> {
            Ok(Box::new(HostBackedRows {
                context,
                shape: shape.to_vec(),
                indices: indices.to_vec(),
                rows: rows.clone(),
            }))
        }
        fn copy_between_devices(
            &self,
            src: &dyn DeviceMemory,
            context: Context,
        ) -> Result<Option<Box<dyn DeviceMemory>>> {
            let src: &HostBacked = src.as_any().downcast_ref().expect("one backend");
            DEVICE_COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Some(Box::new(HostBacked {
                context,
                host: src.host.clone(),
            })))
        }
        fn sum(&self, values: &[&dyn DeviceMemory]) -> Result<Option<Box<dyn DeviceMemory>>> {
            let mut sum = NDArray::from_host(values[0].to_host()?);
            for v in &values[1..] {
                sum.add_assign(&NDArray::from_host(v.to_host()?))?;
            }
            let host = sum.dense().expect("dense").clone();
            self.upload(&host, values[0].context()).map(Some)
        }
    }

    /// Device-to-device copies made by [`HostBacked::copy_from_device`].
    static DEVICE_COPIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    static BACKEND: HostBackedBackend = HostBackedBackend;
    crate::register_device_backend!(BACKEND);

    fn sample() -> NDArray {
        NDArray::from_vec(&[2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap()
    }

    #[test]
    fn device_arrays_copy_to_and_from_the_host() {
        let host = sample();
        let gpu = host.to_context(Context::Gpu(1)).unwrap();
        assert_eq!(gpu.context(), Context::Gpu(1));
        assert!(gpu.dense().is_none() && gpu.as_slice::<f32>().is_none());
        assert_eq!((gpu.shape(), gpu.dtype()), (&[2usize, 2][..], DType::F32));
        assert_eq!(gpu.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(gpu.to_context(Context::Cpu).unwrap(), host);
        assert_eq!(gpu, host.to_context(Context::Gpu(1)).unwrap());
        assert_ne!(gpu, host.to_context(Context::Gpu(0)).unwrap());
        assert_eq!(gpu.astype(DType::F64).to_vec::<f64>().unwrap()[3], 4.0);
    }

    #[test]
    fn a_write_into_a_clone_leaves_the_original() {
        let gpu = sample().to_context(Context::Gpu(0)).unwrap();
        let mut copy = gpu.clone();
        copy.assign(&NDArray::zeros(&[2, 2], DType::F64)).unwrap();
        assert_eq!(copy.to_vec::<f32>().unwrap(), vec![0.0; 4]);
        assert_eq!(gpu.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        // And into a host array from a device one.
        let mut host = NDArray::zeros(&[2, 2], DType::F32);
        host.assign(&gpu).unwrap();
        assert_eq!(host, sample());
    }

    #[test]
    fn device_to_device_assignments_stay_on_the_devices() {
        let before = DEVICE_COPIES.load(std::sync::atomic::Ordering::Relaxed);
        let src = sample().to_context(Context::Gpu(1)).unwrap();
        let mut dst = NDArray::zeros_in(&[2, 2], DType::F32, Context::Gpu(0)).unwrap();
        dst.assign(&src).unwrap();
        assert_eq!(
            (dst.context(), dst.to_vec::<f32>().unwrap()),
            (Context::Gpu(0), vec![1.0, 2.0, 3.0, 4.0])
        );
        assert!(DEVICE_COPIES.load(std::sync::atomic::Ordering::Relaxed) > before);
        let before = DEVICE_COPIES.load(std::sync::atomic::Ordering::Relaxed);
        let moved = src.to_context(Context::Gpu(3)).unwrap();
        assert_eq!(moved.context(), Context::Gpu(3));
        assert_eq!(moved.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert!(DEVICE_COPIES.load(std::sync::atomic::Ordering::Relaxed) > before);
        // Another dtype is cast through the host.
        let mut wide = NDArray::zeros_in(&[2, 2], DType::F64, Context::Gpu(0)).unwrap();
        wide.assign(&src).unwrap();
        assert_eq!(wide.to_vec::<f64>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn sums_on_the_device_need_device_values_of_one_shape_and_dtype() {
        let gpu = |x: f64| {
            NDArray::full(&[2], x, DType::F32)
                .to_context(Context::Gpu(2))
                .unwrap()
        };
        let (a, b) = (gpu(1.0), gpu(2.0));
        let sum = NDArray::sum_on_device(&[&a, &b])
            .unwrap()
            .expect("summed on the device");
        assert_eq!(
            (sum.context(), sum.to_vec::<f32>().unwrap()),
            (Context::Gpu(2), vec![3.0, 3.0])
        );
        let host = NDArray::ones(&[2], DType::F32);
        assert!(
            NDArray::sum_on_device(&[&a, &host]).unwrap().is_none(),
            "a host value: summed on the host"
        );
        let long = NDArray::ones(&[3], DType::F32)
            .to_context(Context::Gpu(2))
            .unwrap();
        let err = NDArray::sum_on_device(&[&a, &long])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("value 1 of the sum") && err.contains("[3]"),
            "{err}"
        );
        let wide = NDArray::ones(&[2], DType::F64)
            .to_context(Context::Gpu(2))
            .unwrap();
        assert!(matches!(
            NDArray::sum_on_device(&[&a, &wide]),
            Err(Error::DTypeMismatch { .. })
        ));
        assert!(NDArray::sum_on_device(&[]).is_err());
    }

    /// Device memory whose device has failed: every copy to the host errs.
    #[derive(Debug)]
    struct Failed;

    impl DeviceMemory for Failed {
        fn context(&self) -> Context {
            Context::Gpu(0)
        }
        fn dtype(&self) -> DType {
            DType::F32
        }
        fn shape(&self) -> &[usize] {
            &[2]
        }
        fn to_host(&self) -> Result<HostArray> {
            Err(Error::Device("the device fell off the bus".into()))
        }
        fn write_from_host(&mut self, _: &HostArray) -> Result<()> {
            Err(Error::Device("the device fell off the bus".into()))
        }
        fn try_clone(&self) -> Result<Box<dyn DeviceMemory>> {
            Err(Error::Device("the device fell off the bus".into()))
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    #[test]
    fn a_failing_device_is_an_error_of_the_fallible_reads() {
        let broken = NDArray::from_device(Box::new(Failed));
        assert!(matches!(
            broken.try_astype(DType::F64),
            Err(Error::Device(_))
        ));
        assert!(matches!(broken.try_to_f64_vec(), Err(Error::Device(_))));
        assert!(matches!(broken.unique_row_ids(4), Err(Error::Device(_))));
        // Its own dtype needs no copy.
        assert!(broken.try_astype(DType::F32).is_ok());
    }

    #[test]
    fn host_only_operations_refuse_device_arrays_with_a_clear_error() {
        let mut gpu = sample().to_context(Context::Gpu(0)).unwrap();
        let err = gpu.add_assign(&sample()).unwrap_err().to_string();
        assert!(
            err.contains("gpu(0)") && err.contains("to_context"),
            "{err}"
        );
        assert!(gpu.retain_rows(&[0]).is_err() && gpu.to_row_sparse().is_err());
        assert!(gpu.add_bytes(&[0; 16]).is_err());
        let mut rows = sparse_sample().to_context(Context::Gpu(0)).unwrap();
        let err = rows.add_assign(&sparse_sample()).unwrap_err().to_string();
        assert!(err.contains("gpu(0)"), "{err}");
        assert!(rows.retain_rows(&[1]).is_err());
    }

    /// A backend that keeps the provided `upload_row_sparse`.
    struct DenseOnly;

    impl DeviceBackend for DenseOnly {
        fn name(&self) -> &'static str {
            "dense-only"
        }
        fn upload(&self, host: &HostArray, context: Context) -> Result<Box<dyn DeviceMemory>> {
            HostBackedBackend.upload(host, context)
        }
    }

    #[test]
    fn a_backend_without_row_sparse_arrays_refuses_them_by_name() {
        let rows = HostArray::full(&[1, 2], 1.0, DType::F32);
        let err = DenseOnly
            .upload_row_sparse(&[3, 2], &[1], &rows, Context::Gpu(0))
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("dense-only")),
            "{err}"
        );
    }

    /// Rows 0 and 2 of a `[3, 2]` table.
    fn sparse_sample() -> NDArray {
        let rows = NDArray::from_vec(&[2, 2], vec![1.0f32, 2.0, 5.0, 6.0]).unwrap();
        NDArray::row_sparse(&[3, 2], vec![0, 2], &rows).unwrap()
    }

    #[test]
    fn row_sparse_device_arrays_keep_their_rows_on_the_device() {
        let host = sparse_sample();
        let gpu = host.to_context(Context::Gpu(1)).unwrap();
        assert_eq!(gpu.context(), Context::Gpu(1));
        assert_eq!(gpu.storage_type(), StorageType::RowSparse);
        assert!(gpu.in_device_memory() && gpu.as_row_sparse().is_none() && gpu.device().is_none());
        assert_eq!(gpu.device_row_sparse().unwrap().indices(), &[0, 2]);
        assert_eq!((gpu.shape(), gpu.dtype()), (&[3usize, 2][..], DType::F32));
        assert_eq!(gpu.to_context(Context::Cpu).unwrap(), host);
        assert_eq!(
            gpu.to_vec::<f32>().unwrap(),
            vec![1.0, 2.0, 0.0, 0.0, 5.0, 6.0]
        );
        assert_eq!(gpu, host.to_context(Context::Gpu(1)).unwrap());
        assert_ne!(gpu, host.to_context(Context::Gpu(0)).unwrap());
        assert!(!gpu.stores_every_row());
        // Densified on the host, back on its device.
        let dense = gpu.to_dense();
        assert_eq!(
            (dense.context(), dense.storage_type()),
            (Context::Gpu(1), StorageType::Dense)
        );
        assert_eq!(dense.to_vec::<f32>().unwrap(), gpu.to_vec::<f32>().unwrap());
        let same = gpu.to_row_sparse().unwrap();
        assert_eq!(
            (same.context(), same.storage_type()),
            (Context::Gpu(1), StorageType::RowSparse)
        );
        // Another dtype is cast on the host.
        assert_eq!(gpu.astype(DType::F64).context(), Context::Cpu);
    }

    #[test]
    fn assignments_into_row_sparse_device_arrays_replace_their_rows() {
        let gpu = sparse_sample().to_context(Context::Gpu(0)).unwrap();
        let mut copy = gpu.clone();
        // A dense source: its non-zero rows (row 1 here), cast to the array's dtype.
        let dense = NDArray::from_vec(&[3, 2], vec![0.0f64, 0.0, 7.0, 8.0, 0.0, 0.0]).unwrap();
        copy.assign(&dense).unwrap();
        assert_eq!(copy.device_row_sparse().unwrap().indices(), &[1]);
        assert_eq!(copy.dtype(), DType::F32);
        assert_eq!(
            copy.to_vec::<f32>().unwrap(),
            vec![0.0, 0.0, 7.0, 8.0, 0.0, 0.0]
        );
        // The clone it was made from is untouched.
        assert_eq!(gpu.device_row_sparse().unwrap().indices(), &[0, 2]);
        // From another row-sparse array, on the device or not.
        copy.assign(&gpu).unwrap();
        assert_eq!(copy, gpu);
        let mut host = NDArray::zeros(&[3, 2], DType::F32);
        host.assign(&gpu).unwrap();
        assert_eq!(
            host.to_vec::<f32>().unwrap(),
            vec![1.0, 2.0, 0.0, 0.0, 5.0, 6.0]
        );
        assert!(copy.assign(&NDArray::zeros(&[2, 2], DType::F32)).is_err());
        // Zeros on the host stand in for it: no rows.
        let stand_in = gpu.zeros_on_host_like();
        assert_eq!(stand_in.context(), Context::Cpu);
        assert_eq!(stand_in.as_row_sparse().unwrap().indices(), &[] as &[i64]);
    }

    /// A store that sums with `add_assign`, which refuses device arrays: it only works on them
    /// because `KVStoreExt` stages them through the host.
    #[derive(Debug)]
    struct Summing;

    impl KVStoreBase for Summing {
        fn type_name(&self) -> &str {
            "summing"
        }
        fn rank(&self) -> usize {
            0
        }
        fn num_workers(&self) -> usize {
            1
        }
        fn is_capable(&self, _: Capability) -> bool {
            false
        }
        fn broadcast_batch(
            &self,
            _: &KeyedValues<'_>,
            _: &mut KeyedOuts<'_>,
            _: i32,
        ) -> Result<()> {
            Ok(())
        }
        fn pushpull_batch(
            &self,
            values: &KeyedValues<'_>,
            outs: &mut KeyedOuts<'_>,
            _: i32,
        ) -> Result<()> {
            for out in outs.outs_mut() {
                let mut sum = NDArray::zeros(out.shape(), out.dtype());
                for v in values.values() {
                    sum.add_assign(v)?;
                }
                out.assign(&sum)?;
            }
            Ok(())
        }
    }

    #[test]
    fn stores_receive_device_arrays_staged_through_the_host() {
        let values = [
            sample().to_context(Context::Gpu(0)).unwrap(),
            sample().to_context(Context::Gpu(1)).unwrap(),
        ];
        let mut outs = [
            NDArray::zeros_in(&[2, 2], DType::F32, Context::Gpu(1)).unwrap(),
            NDArray::zeros(&[2, 2], DType::F32),
        ];
        Summing.pushpull(5, &values, &mut outs).unwrap();
        assert_eq!(outs[0].context(), Context::Gpu(1));
        assert_eq!(outs[0].to_vec::<f32>().unwrap(), vec![2.0, 4.0, 6.0, 8.0]);
        assert_eq!(outs[1].to_vec::<f32>().unwrap(), vec![2.0, 4.0, 6.0, 8.0]);
        // In place: the device arrays are read, then written.
        let mut in_place = values.clone();
        Summing.pushpull_in_place(5, &mut in_place).unwrap();
        assert_eq!(
            in_place[1].to_vec::<f32>().unwrap(),
            vec![2.0, 4.0, 6.0, 8.0]
        );
        assert_eq!(values[1].to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }
}
