//! What the crate promises on every machine, GPU or not.

use kvstore_base::{create, Error, KVStoreExt, NDArray};
use kvstore_device::{probe, DeviceArray};

#[test]
fn the_probe_answers_without_panicking() {
    match probe() {
        Ok(info) => assert!(!info.devices.is_empty()),
        Err(Error::Device(reason)) => assert!(reason.starts_with("no "), "{reason}"),
        Err(other) => panic!("unexpected error kind: {other}"),
    }
}

#[test]
fn device_is_created_and_serves_cpu_values_without_a_gpu() {
    let kv = create("device").unwrap();
    assert_eq!(kv.type_name(), "device");
    let alias = create("local_allreduce_device").unwrap();
    assert_eq!(alias.type_name(), "local_allreduce_device");
    kv.init("a", &NDArray::from_vec(&[2], vec![1.0f32, 2.0]).unwrap())
        .unwrap();
    let mut out = NDArray::from_vec(&[2], vec![0.0f32, 0.0]).unwrap();
    kv.pull("a", &mut out).unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
}

#[test]
fn without_a_gpu_nccl_and_gpu_memory_are_device_errors() {
    let Err(reason) = probe() else {
        return; // a GPU machine: tests/gpu.rs covers it
    };
    let e = create("nccl").unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    assert_eq!(e.to_string(), reason.to_string());
    let e = DeviceArray::zeros(&[4], 0).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
}

#[test]
fn gpu_keys_and_cpu_keys_do_not_mix() {
    let kv = kvstore_device::DeviceStore::new(
        "device",
        kvstore_device::Engine::Device,
        kvstore_local::reduce::ReduceConfig::default(),
    );
    kv.init_gpu("g", &NDArray::from_vec(&[2], vec![1.0f32, 2.0]).unwrap())
        .unwrap();
    assert!(kv
        .init("g", &NDArray::from_vec(&[2], vec![1.0f32, 2.0]).unwrap())
        .is_err());
    kv.init("c", &NDArray::from_vec(&[2], vec![1.0f32, 2.0]).unwrap())
        .unwrap();
    assert!(kv
        .init_gpu("c", &NDArray::from_vec(&[2], vec![1.0f32, 2.0]).unwrap())
        .is_err());
    assert!(kv
        .init_gpu("d", &NDArray::from_vec(&[2], vec![1.0f64, 2.0]).unwrap())
        .is_err());
}
