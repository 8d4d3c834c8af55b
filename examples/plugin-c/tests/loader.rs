//! The loader's errors (missing file, not a library, not a plugin, wrong ABI version,
//! incomplete descriptor), name clashes, and panics inside a plugin.

mod common;

use std::path::Path;

use kvstore_base::plugin::load_plugin;
use kvstore_base::{create, register_runtime, Capability, DType, Error, KVStoreExt, NDArray};

/// Checks that loading `path` fails with [`Error::Plugin`] naming the file and `reason`.
fn expect_refused(path: &Path, reason: &str) {
    let err = load_plugin(path).expect_err("the library was loaded");
    match &err {
        Error::Plugin { path: p, reason: r } => {
            assert_eq!(p, path);
            assert!(
                r.contains(reason),
                "reason {r:?} does not mention {reason:?}"
            );
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let path = std::env::temp_dir().join("kvstore-no-such-plugin.so");
    expect_refused(&path, "no such file");
}

#[test]
fn a_file_that_is_not_a_library_is_a_clear_error() {
    let path =
        std::env::temp_dir().join(format!("kvstore-not-a-library-{}.so", std::process::id()));
    std::fs::write(&path, "this is a text file, not a shared library\n").unwrap();
    let result =
        std::panic::catch_unwind(|| expect_refused(&path, "not a loadable shared library"));
    let _ = std::fs::remove_file(&path);
    result.unwrap();
}

#[test]
fn a_library_without_the_entry_is_not_a_plugin() {
    expect_refused(
        Path::new(kvstore_plugin_c::NO_ENTRY),
        "not a kvstore plugin: the library does not export `kvstore_plugin_entry`",
    );
}

#[test]
fn a_plugin_for_another_abi_version_is_refused() {
    expect_refused(
        Path::new(kvstore_plugin_c::BAD_VERSION),
        "built for kvstore plugin ABI version 999, but this host speaks version 1",
    );
    assert!(
        matches!(create("from_the_future"), Err(Error::UnknownStore { .. })),
        "the refused plugin was registered"
    );
}

#[test]
fn a_descriptor_without_required_functions_is_refused() {
    expect_refused(
        Path::new(kvstore_plugin_c::MISSING_FUNCTION),
        "lacks the required function `create`",
    );
}

#[test]
fn a_name_clash_warns_and_the_plugin_overrides() {
    common::capture_logs();
    register_runtime("summingstore", "an_earlier_crate", Some(&[]), |_| {
        Err(Error::InvalidArgument(
            "the overridden store was built".into(),
        ))
    });
    let path = common::c_plugin();
    let loaded = load_plugin(&path).unwrap();
    assert_eq!(loaded.name, "summingstore");
    assert_eq!(loaded.overridden.as_deref(), Some("an_earlier_crate"));
    assert_eq!(loaded.capabilities, Some(vec![Capability::InitPushPull]));
    let warning = format!(
        "New kvstore {}::summingstore is overriding existing kvstore an_earlier_crate::summingstore",
        path.display()
    );
    assert!(
        common::logs()
            .iter()
            .any(|l| l.starts_with("WARN") && l.contains(&warning)),
        "no warning {warning:?} in {:?}",
        common::logs()
    );
    let kv = create("SummingStore").expect("the plugin's store");
    assert_eq!(kv.type_name(), "summingstore");
}

#[test]
fn a_panic_in_a_plugin_is_an_error_and_the_store_stays_usable() {
    let loaded = load_plugin(common::rust_plugin()).unwrap();
    let kv = create(&loaded.name).unwrap();
    kv.init(
        &["panic", "w"],
        &[
            NDArray::zeros(&[2], DType::F32),
            NDArray::zeros(&[2], DType::F32),
        ],
    )
    .unwrap();
    let err = kv
        .push("panic", &NDArray::ones(&[2], DType::F32))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Panic {
                operation: "push",
                ..
            }
        ),
        "expected a panic error, got {err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("rustpluginstore: push panicked") && text.contains("which panics by design"),
        "{text}"
    );
    // The store still works after the panic: the next calls go through as before.
    kv.push(
        "w",
        &[
            NDArray::ones(&[2], DType::F32),
            NDArray::ones(&[2], DType::F32),
        ],
    )
    .unwrap();
    let mut out = NDArray::zeros(&[2], DType::F32);
    kv.pull("w", &mut out).unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![2.0, 2.0]);
    // A second panic is caught as well.
    assert!(kv.push("panic", &NDArray::ones(&[2], DType::F32)).is_err());
}

#[test]
fn plugin_errors_keep_their_kind_key_and_message() {
    let loaded = load_plugin(common::c_plugin()).unwrap();
    let kv = create(&loaded.name).unwrap();
    kv.init("w", &NDArray::zeros(&[2, 3], DType::F32)).unwrap();
    let err = kv
        .push("w", &NDArray::zeros(&[3, 2], DType::F32))
        .unwrap_err();
    assert!(matches!(err.root(), Error::ShapeMismatch { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "summingstore: push of key \"w\": shape mismatch: the pushed value (against the stored \
         value) has shape [3, 2] but [2, 3] was expected"
    );
    let err = kv
        .push("w", &NDArray::zeros(&[2, 3], DType::I64))
        .unwrap_err();
    assert!(matches!(err.root(), Error::DTypeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("int64"), "{err}");
    // Arrays the ABI does not carry are refused on the host side.
    let rows = NDArray::ones(&[1, 3], DType::F32);
    let sparse = NDArray::row_sparse(&[2, 3], vec![0], &rows).unwrap();
    let err = kv.push("w", &sparse).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("dense arrays only"), "{err}");
    // Operations the plugin does not offer are unsupported.
    let err = kv
        .set_optimizer(&kvstore_base::OptimizerSpec::new("sgd"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unsupported {
                operation: "set_optimizer",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn create_options_reach_the_plugin() {
    load_plugin(common::c_plugin()).unwrap();
    let options = [("colour".to_string(), "blue".to_string())]
        .into_iter()
        .collect();
    let err = kvstore_base::create_with("summingstore", options).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("takes no options, got 1"), "{err}");
}
