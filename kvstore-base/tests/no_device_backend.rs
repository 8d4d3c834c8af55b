//! Without a linked device backend, GPU memory is an error, never a panic (this test binary
//! links none).

use kvstore_base::{device_backend, Context, DType, Error, NDArray};

#[test]
fn gpu_context_is_an_error_without_a_device_backend() {
    assert!(device_backend().is_none());
    let err = NDArray::zeros_in(&[2], DType::F32, Context::Gpu(0)).unwrap_err();
    assert!(matches!(err, Error::Device(_)), "{err}");
    assert!(err.to_string().contains("no device backend"), "{err}");
}
