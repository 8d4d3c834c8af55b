//! GPU memory behind `kvstore-base`'s [`NDArray`]: [`DeviceArray`] is its
//! [`DeviceMemory`] and [`DeviceRowSparse`] its [`DeviceRowSparseMemory`], and linking this
//! crate registers the backend that [`NDArray::to_context`] uses for `Context::Gpu(i)`.
//! Float32 arrays only, dense or row-sparse, as the GPU kernels.
//!
//! ```no_run
//! use kvstore_base::{Context, DType, KVStoreExt, NDArray};
//! use kvstore_device as _; // links the GPU backend
//!
//! # fn main() -> kvstore_base::Result<()> {
//! let kv = kvstore_base::create("local")?;
//! let grads = [
//!     NDArray::ones(&[4], DType::F32).to_context(Context::Gpu(0))?,
//!     NDArray::ones(&[4], DType::F32).to_context(Context::Gpu(0))?,
//! ];
//! let mut out = NDArray::zeros_in(&[4], DType::F32, Context::Gpu(0))?;
//! kv.init(7, &NDArray::zeros(&[4], DType::F32))?;
//! kv.pushpull(7, &grads, &mut out)?; // staged through host memory by `local`, as MXNet's
//! assert_eq!(out.to_vec::<f32>()?, vec![2.0; 4]);
//! # Ok(()) }
//! ```

use std::any::Any;

use kvstore_base::{
    Context, DType, DeviceBackend, DeviceMemory, DeviceRowSparseMemory, Error, HostArray, NDArray,
    Result,
};

use crate::gpu::DeviceArray;
use crate::sparse::DeviceRowSparse;

impl DeviceMemory for DeviceArray {
    fn context(&self) -> Context {
        DeviceArray::context(self)
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn shape(&self) -> &[usize] {
        DeviceArray::shape(self)
    }

    fn to_host(&self) -> Result<HostArray> {
        DeviceArray::to_host(self)?
            .into_dense()
            .ok_or_else(|| Error::Device("a GPU array's host copy is not dense".into()))
    }

    fn write_from_host(&mut self, host: &HostArray) -> Result<()> {
        self.copy_from_host_array(host)
    }

    fn try_clone(&self) -> Result<Box<dyn DeviceMemory>> {
        Ok(Box::new(self.copy_to(self.ordinal())?))
    }

    fn copy_from_device(&mut self, src: &dyn DeviceMemory) -> Result<()> {
        match src.as_any().downcast_ref::<DeviceArray>() {
            Some(src) => self.copy_from(src),
            None => self.write_from_host(&src.to_host()?),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl DeviceRowSparseMemory for DeviceRowSparse {
    fn context(&self) -> Context {
        Context::Gpu(self.ordinal())
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn shape(&self) -> &[usize] {
        DeviceRowSparse::shape(self)
    }

    fn indices(&self) -> &[i64] {
        DeviceRowSparse::indices(self)
    }

    fn rows_to_host(&self) -> Result<HostArray> {
        let rows = self.rows_on_host()?;
        Ok(rows
            .dense()
            .expect("rows_on_host answers a dense array")
            .clone())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The backend [`NDArray::to_context`] uses for GPU contexts: float32 arrays uploaded with
/// [`DeviceArray::from_host`] (dense) and [`DeviceRowSparse::from_host`] (row-sparse).
#[derive(Debug)]
pub struct CudaBackend;

impl DeviceBackend for CudaBackend {
    fn name(&self) -> &'static str {
        "kvstore-device (CUDA)"
    }

    fn upload(&self, host: &HostArray, context: Context) -> Result<Box<dyn DeviceMemory>> {
        Ok(Box::new(DeviceArray::from_host_array(
            host,
            gpu_ordinal(context)?,
        )?))
    }

    fn upload_row_sparse(
        &self,
        shape: &[usize],
        indices: &[i64],
        rows: &HostArray,
        context: Context,
    ) -> Result<Box<dyn DeviceRowSparseMemory>> {
        Ok(Box::new(DeviceRowSparse::from_parts(
            shape,
            indices.to_vec(),
            rows,
            gpu_ordinal(context)?,
        )?))
    }

    fn zeros(
        &self,
        shape: &[usize],
        dtype: DType,
        context: Context,
    ) -> Result<Box<dyn DeviceMemory>> {
        let ordinal = gpu_ordinal(context)?;
        if dtype != DType::F32 {
            return Err(Error::InvalidArgument(format!(
                "GPU arrays are float32 for now, not {dtype}"
            )));
        }
        Ok(Box::new(DeviceArray::zeros(shape, ordinal)?))
    }

    fn copy_between_devices(
        &self,
        src: &dyn DeviceMemory,
        context: Context,
    ) -> Result<Option<Box<dyn DeviceMemory>>> {
        let Some(src) = src.as_any().downcast_ref::<DeviceArray>() else {
            return Ok(None);
        };
        Ok(Some(Box::new(src.copy_to(gpu_ordinal(context)?)?)))
    }

    /// Sums on the GPU holding most of the values (the first of them on a tie): the others
    /// are copied there first (peer to peer), then one reduction kernel pass reads each value
    /// once, as the `device` store's push.
    fn sum(&self, values: &[&dyn DeviceMemory]) -> Result<Option<Box<dyn DeviceMemory>>> {
        let Some(arrays) = values
            .iter()
            .map(|v| v.as_any().downcast_ref::<DeviceArray>())
            .collect::<Option<Vec<&DeviceArray>>>()
        else {
            return Ok(None);
        };
        sum_arrays(&arrays).map(|sum| Some(Box::new(sum) as Box<dyn DeviceMemory>))
    }
}

/// The ordinal of a GPU context.
fn gpu_ordinal(context: Context) -> Result<usize> {
    match context {
        Context::Gpu(ordinal) => Ok(ordinal),
        Context::Cpu => Err(Error::InvalidArgument(
            "device memory is on a GPU, not cpu(0)".into(),
        )),
    }
}

/// The sum of `arrays` (at least one, of one shape) on the GPU holding most of them.
fn sum_arrays(arrays: &[&DeviceArray]) -> Result<DeviceArray> {
    let first = arrays
        .first()
        .ok_or_else(|| Error::InvalidArgument("a sum needs at least one value".into()))?;
    let held = |ordinal: usize| arrays.iter().filter(|a| a.ordinal() == ordinal).count();
    let target = arrays
        .iter()
        .map(|a| a.ordinal())
        .fold(
            first.ordinal(),
            |best, o| if held(o) > held(best) { o } else { best },
        );
    // Values on other GPUs are copied to the target first (peer to peer).
    let moved = arrays
        .iter()
        .map(|a| {
            (a.ordinal() != target)
                .then(|| a.copy_to(target))
                .transpose()
        })
        .collect::<Result<Vec<Option<DeviceArray>>>>()?;
    let sources: Vec<&DeviceArray> = moved
        .iter()
        .zip(arrays)
        .map(|(copy, a)| copy.as_ref().unwrap_or(a))
        .collect();
    let mut sum = DeviceArray::zeros(first.shape(), target)?;
    sum.sum_from(&sources)?;
    Ok(sum)
}

static CUDA_BACKEND: CudaBackend = CudaBackend;
kvstore_base::register_device_backend!(CUDA_BACKEND);

/// The [`DeviceArray`] of an [`NDArray`] in GPU memory made by this crate; `None` for a host
/// array or another backend's memory.
pub fn device_array(array: &NDArray) -> Option<&DeviceArray> {
    array.device()?.as_any().downcast_ref()
}

/// The [`DeviceRowSparse`] of a row-sparse [`NDArray`] in GPU memory made by this crate;
/// `None` for any other array.
pub fn device_row_sparse(array: &NDArray) -> Option<&DeviceRowSparse> {
    array.device_row_sparse()?.as_any().downcast_ref()
}
