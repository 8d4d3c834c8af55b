//! Two linked device backends: which one would serve GPU memory would depend on the link
//! order, so placing an array on a GPU is an error naming both (this test binary links two).

use kvstore_base::{
    device_backend, device_backends, register_device_backend, Context, DType, DeviceBackend,
    DeviceMemory, Error, HostArray, NDArray, Result,
};

/// A backend that never gets as far as making memory.
struct Refusing(&'static str);

impl DeviceBackend for Refusing {
    fn name(&self) -> &'static str {
        self.0
    }

    fn upload(&self, _: &HostArray, context: Context) -> Result<Box<dyn DeviceMemory>> {
        Err(Error::Device(format!("{} has no {context}", self.0)))
    }
}

static FIRST: Refusing = Refusing("first-gpus");
static SECOND: Refusing = Refusing("second-gpus");
register_device_backend!(FIRST);
register_device_backend!(SECOND);

#[test]
fn two_device_backends_are_an_error_naming_both() {
    assert_eq!(device_backends().len(), 2);
    assert!(device_backend().is_none(), "neither is picked silently");
    let err = NDArray::zeros_in(&[2], DType::F32, Context::Gpu(0)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Device(_)), "{text}");
    assert!(
        text.contains("2 device backends are linked")
            && text.contains("first-gpus")
            && text.contains("second-gpus"),
        "{text}"
    );
}
