//! Arrays in device (GPU) memory. `kvstore-base` does not depend on CUDA: a device backend
//! (`kvstore-device`) implements [`DeviceMemory`] for its buffers and registers a
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

    /// The concrete buffer, for the backend that made it.
    fn as_any(&self) -> &dyn Any;

    /// The concrete buffer, mutably.
    fn as_any_mut(&mut self) -> &mut dyn Any;
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
}

/// The registration a device backend submits ([`register_device_backend!`]).
///
/// [`register_device_backend!`]: crate::register_device_backend
pub struct DeviceBackendRegistration {
    /// The backend.
    pub backend: &'static dyn DeviceBackend,
}

inventory::collect!(DeviceBackendRegistration);

/// The linked device backend, if any (the first registered).
pub fn device_backend() -> Option<&'static dyn DeviceBackend> {
    inventory::iter::<DeviceBackendRegistration>
        .into_iter()
        .next()
        .map(|r| r.backend)
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
