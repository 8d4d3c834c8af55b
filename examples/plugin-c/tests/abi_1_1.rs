//! The operations appended in revision 1.1 of the plugin ABI, through a loaded plugin
//! (`localpluginstore`: kvstore-local's store exported with `export_plugin!`) against the same
//! store in process; and descriptors of revision 1.0 (a smaller `struct_size`), which keep
//! loading and working, their missing operations unsupported.

mod common;

use std::path::{Path, PathBuf};

use kvstore_base::plugin::abi::*;
use kvstore_base::plugin::{load_plugin, register_descriptor, PluginApi};
use kvstore_base::{
    create, Capability, CompressionParams, DType, Error, KVStoreBase, KVStoreExt, NDArray,
    OptimizerSpec,
};
use kvstore_compression::CompressionSpec;
use kvstore_local::reduce::ReduceConfig;
use kvstore_local::LocalStore;

const NAME: &str = "localpluginstore";

/// A store of the plugin, loaded once per process (loading again only re-registers it).
fn plugin_store() -> Box<dyn KVStoreBase> {
    let loaded = load_plugin(common::local_plugin()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.name, NAME);
    create(NAME).unwrap_or_else(|e| panic!("{e}"))
}

/// The same store in process: the local store under the plugin's name.
fn local_store() -> LocalStore {
    LocalStore::with_config(NAME, ReduceConfig::from_env())
}

/// The calls the plugin recorded (barriers, compression parameters, commands).
fn recorded_calls() -> Vec<String> {
    type Calls = unsafe extern "C" fn(*mut u8, usize) -> usize;
    // SAFETY: the library is the test plugin, already loaded (and never unloaded) by
    // `load_plugin`; loading it again returns the same instance, whose records are read.
    let library = unsafe { libloading::Library::new(common::local_plugin()) }.unwrap();
    // SAFETY: the plugin defines the function with exactly this signature.
    let calls = unsafe { library.get::<Calls>(b"kvstore_plugin_local_calls") }.unwrap();
    let mut buffer = vec![0u8; 64 * 1024];
    // SAFETY: the buffer has the capacity passed.
    let len = unsafe { calls(buffer.as_mut_ptr(), buffer.len()) };
    assert!(len < buffer.len(), "the records do not fit the buffer");
    String::from_utf8(buffer[..len].to_vec())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn temp_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "kvstore-abi-1-1-{what}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ))
}

fn filled(shape: &[usize], value: f64) -> NDArray {
    NDArray::full(shape, value, DType::F32)
}

fn params(pairs: &[(&str, &str)]) -> CompressionParams {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn capabilities_need_the_functions_and_the_declaration() {
    let loaded = load_plugin(common::local_plugin()).unwrap();
    // Declared: optimizer, init_push_pull, updater, gradient_compression, row_sparse,
    // optimizer_states. The updater cannot cross the ABI.
    assert_eq!(
        loaded.capabilities.as_deref(),
        Some(
            &[
                Capability::Optimizer,
                Capability::InitPushPull,
                Capability::GradientCompression,
                Capability::RowSparse,
                Capability::OptimizerStates,
            ][..]
        )
    );
    let kv = plugin_store();
    for capability in [
        Capability::Optimizer,
        Capability::InitPushPull,
        Capability::GradientCompression,
        Capability::RowSparse,
        Capability::OptimizerStates,
    ] {
        assert!(kv.is_capable(capability), "{capability}");
    }
    assert!(!kv.is_capable(Capability::Updater));
    assert!(!kv.is_capable(Capability::Distributed));
    let err = kv.set_updater_fn(|_, _, _| Ok(())).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unsupported {
                operation: "set_updater",
                ..
            }
        ),
        "{err}"
    );

    // The Rust example plugin provides every function (export_plugin! fills them) but its
    // store has none of these capabilities: they are not reported, and the calls come back
    // from the store as unsupported.
    let example = load_plugin(common::rust_plugin()).unwrap();
    let kv = create(&example.name).unwrap();
    for capability in [
        Capability::GradientCompression,
        Capability::RowSparse,
        Capability::OptimizerStates,
    ] {
        assert!(!kv.is_capable(capability), "{capability}");
    }
    let err = kv
        .set_gradient_compression(&params(&[("type", "2bit")]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unsupported {
                operation: "set_gradient_compression",
                ref store,
            } if store == "rustpluginstore"
        ),
        "{err}"
    );
    assert!(matches!(kv.barrier(), Err(Error::Unsupported { .. })));
}

#[test]
fn barrier_and_commands_reach_the_plugin() {
    let kv = plugin_store();
    kv.barrier().unwrap();
    kv.send_command_to_servers(3, "sync the servers: é")
        .unwrap();
    let calls = recorded_calls();
    assert!(calls.iter().any(|c| c == "barrier"), "{calls:?}");
    assert!(
        calls
            .iter()
            .any(|c| c == "send_command_to_servers 3 sync the servers: é"),
        "{calls:?}"
    );
    // The plugin's refusal comes back with its kind and message.
    let err = kv.send_command_to_servers(-1, "nope").unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "invalid argument: localpluginstore: command head -1 is reserved (heads are non-negative)"
    );
    assert!(
        !recorded_calls().iter().any(|c| c.contains("nope")),
        "a refused command was recorded"
    );
}

#[test]
fn compression_parameters_round_trip() {
    let kv = plugin_store();
    kv.set_gradient_compression(&params(&[("type", "2bit"), ("threshold", "0.25")]))
        .unwrap();
    let calls = recorded_calls();
    assert!(
        calls
            .iter()
            .any(|c| c == r#"set_gradient_compression {"threshold": "0.25", "type": "2bit"}"#),
        "{calls:?}"
    );
    // Bad parameters: the plugin's error, as MXNet words it, with its kind.
    for bad in [
        params(&[("type", "3bit")]),
        params(&[("threshold", "0.5")]),
        params(&[("type", "2bit"), ("threshold", "-1")]),
        params(&[("type", "2bit"), ("threshold", "half")]),
    ] {
        let err = kv.set_gradient_compression(&bad).unwrap_err();
        let expected = CompressionSpec::from_params(&bad).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert_eq!(err.to_string(), expected.to_string(), "{bad:?}");
    }
}

/// Runs `steps` pushes of key 1 and pulls it.
fn run_steps(kv: &dyn KVStoreBase, steps: std::ops::Range<i32>) -> NDArray {
    for step in steps {
        kv.push(1, &filled(&[4], 0.25 * f64::from(step) + 1.0))
            .unwrap();
    }
    let mut out = NDArray::zeros(&[4], DType::F32);
    kv.pull(1, &mut out).unwrap();
    out
}

#[test]
fn optimizer_states_cross_through_a_file_byte_for_byte() {
    let adam = OptimizerSpec::new("adam")
        .with("learning_rate", 0.1)
        .with("wd", 0.01);
    let local = local_store();
    let plugin = plugin_store();
    let stores: [&dyn KVStoreBase; 2] = [&local, &*plugin];
    let (from_local, from_plugin) = (temp_path("local-states"), temp_path("plugin-states"));

    // No optimizer yet: the same refusal.
    let errors: Vec<String> = stores
        .iter()
        .map(|kv| {
            let err = kv.save_optimizer_states(&from_local, false).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
            err.to_string()
        })
        .collect();
    assert_eq!(errors[0], errors[1]);
    assert!(!from_local.exists());

    for kv in stores {
        kv.init(1, &filled(&[4], 1.0)).unwrap();
        kv.set_optimizer(&adam).unwrap();
        run_steps(kv, 0..2);
    }
    for dump in [false, true] {
        local.save_optimizer_states(&from_local, dump).unwrap();
        plugin.save_optimizer_states(&from_plugin, dump).unwrap();
        let (a, b) = (
            std::fs::read(&from_local).unwrap(),
            std::fs::read(&from_plugin).unwrap(),
        );
        assert!(!a.is_empty());
        assert_eq!(
            a, b,
            "the plugin's state file differs (dump_optimizer {dump})"
        );
    }

    // A fresh plugin store resumes from the file the in-process store wrote, and ends where
    // the in-process store does.
    let expected = run_steps(&local, 2..4);
    let resumed = plugin_store();
    resumed.init(1, &run_steps(&*plugin, 2..2)).unwrap();
    resumed.set_optimizer(&adam).unwrap();
    resumed.load_optimizer_states(&from_local).unwrap();
    assert_eq!(run_steps(&*resumed, 2..4), expected);

    // A missing file: the same I/O error, naming the path.
    let missing = temp_path("no-such-states");
    let errors: Vec<String> = [&local as &dyn KVStoreBase, &*resumed]
        .iter()
        .map(|kv| {
            let err = kv.load_optimizer_states(&missing).unwrap_err();
            assert!(
                matches!(&err, Error::Io { path, source } if path == &missing
                    && source.kind() == std::io::ErrorKind::NotFound),
                "the path and the OS error's kind cross the ABI: {err:?}"
            );
            err.to_string()
        })
        .collect();
    assert_eq!(errors[0], errors[1]);
    // A file that holds no states: an error, and nothing changes.
    std::fs::write(&from_plugin, b"certainly not optimizer states").unwrap();
    let before = run_steps(&*resumed, 4..4);
    let err = resumed.load_optimizer_states(&from_plugin).unwrap_err();
    let local_err = local.load_optimizer_states(&from_plugin).unwrap_err();
    assert_eq!(
        std::mem::discriminant(&err),
        std::mem::discriminant(&local_err)
    );
    assert_eq!(err.to_string(), local_err.to_string());
    assert_eq!(run_steps(&*resumed, 4..4), before);
    let _ = std::fs::remove_file(&from_local);
    let _ = std::fs::remove_file(&from_plugin);
}

/// A row-sparse embedding table of 5 rows of 3 (rows 0, 2, 4 stored) and a dense key, in one
/// batch, then a push of a row-sparse gradient and a dense one.
fn fill_tables(kv: &dyn KVStoreBase) {
    let rows = NDArray::from_vec(
        &[3, 3],
        vec![1.0f32, 1.5, 2.0, 3.0, 3.5, 4.0, 5.0, 5.5, 6.0],
    )
    .unwrap();
    let table = NDArray::row_sparse(&[5, 3], vec![0, 2, 4], &rows).unwrap();
    kv.init(&["emb", "dense"], &[table, filled(&[2], 7.0)])
        .unwrap();
    let grad_rows =
        NDArray::from_vec(&[2, 3], vec![10.0f32, 10.0, 10.0, 20.0, 20.0, 20.0]).unwrap();
    let grad = NDArray::row_sparse(&[5, 3], vec![1, 4], &grad_rows).unwrap();
    kv.push(&["emb", "dense"], &[grad, filled(&[2], 2.0)])
        .unwrap();
}

fn empty_output(dtype: DType) -> NDArray {
    NDArray::row_sparse(&[5, 3], vec![], &NDArray::zeros(&[0, 3], dtype)).unwrap()
}

#[test]
fn row_sparse_values_and_pulls_match_the_local_store() {
    let local = local_store();
    let plugin = plugin_store();
    fill_tables(&local);
    fill_tables(&*plugin);

    // Unsorted, repeated ids; two outputs of different dtypes, one id list each.
    let ids = [
        NDArray::from_vec(&[4], vec![4i64, 1, 4, 0]).unwrap(),
        NDArray::from_vec(&[2], vec![3.0f32, 2.0]).unwrap(),
    ];
    let mut results = Vec::new();
    for kv in [&local as &dyn KVStoreBase, &*plugin] {
        let mut outs = vec![empty_output(DType::F32), empty_output(DType::F64)];
        kv.row_sparse_pull(&["emb", "emb"], &mut outs[..], &ids[..])
            .unwrap();
        let mut dense = NDArray::zeros(&[2], DType::F32);
        kv.pull("dense", &mut dense).unwrap();
        results.push((outs, dense));
    }
    let (in_process, through_plugin) = (&results[0], &results[1]);
    for (i, (a, b)) in in_process.0.iter().zip(&through_plugin.0).enumerate() {
        assert_eq!(a.dtype(), b.dtype(), "output {i}");
        assert_eq!(
            a.as_row_sparse().map(|r| r.indices().to_vec()),
            b.as_row_sparse().map(|r| r.indices().to_vec()),
            "output {i}"
        );
        assert_eq!(a.to_f64_vec(), b.to_f64_vec(), "output {i}");
    }
    assert_eq!(
        through_plugin.0[0].as_row_sparse().unwrap().indices(),
        &[0, 1, 4]
    );
    assert_eq!(
        through_plugin.0[0].to_f64_vec(),
        vec![0.0, 0.0, 0.0, 10.0, 10.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 20.0, 20.0, 20.0],
        "without an optimizer, the pushed gradient replaced the stored value"
    );
    assert_eq!(in_process.1, through_plugin.1);
}

#[test]
fn row_sparse_pull_errors_match_the_local_store_and_write_nothing() {
    let local = local_store();
    let plugin = plugin_store();
    fill_tables(&local);
    fill_tables(&*plugin);
    let good_ids = NDArray::from_vec(&[1], vec![2i64]).unwrap();

    // (keys, ids of the second output, dense second output?, what it is)
    type Case<'a> = (&'a [&'a str], NDArray, bool, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            &["emb", "emb"],
            NDArray::from_vec(&[2], vec![1i64, 7]).unwrap(),
            false,
            "a row id outside the table",
        ),
        (
            &["emb", "emb"],
            NDArray::from_vec(&[1], vec![0.5f32]).unwrap(),
            false,
            "a row id that is not an integer",
        ),
        (
            &["emb", "no_such_key"],
            good_ids.clone(),
            false,
            "a key never initialised",
        ),
        (
            &["emb", "dense"],
            good_ids.clone(),
            false,
            "a key whose value is dense",
        ),
        (&["emb", "emb"], good_ids.clone(), true, "a dense output"),
    ];
    for (keys, ids, dense_out, what) in cases {
        let mut errors = Vec::new();
        for kv in [&local as &dyn KVStoreBase, &*plugin] {
            let sentinel = NDArray::row_sparse(&[5, 3], vec![3], &filled(&[1, 3], 42.0)).unwrap();
            let second = if dense_out {
                filled(&[5, 3], 42.0)
            } else {
                sentinel.clone()
            };
            let mut outs = [sentinel.clone(), second.clone()];
            let err = kv
                .row_sparse_pull(keys, &mut outs[..], &vec![good_ids.clone(), ids.clone()])
                .unwrap_err();
            assert_eq!(outs[0], sentinel, "{what}: a failed pull wrote output 0");
            assert_eq!(outs[1], second, "{what}: a failed pull wrote output 1");
            assert!(
                err.key().is_some(),
                "{what}: the error names no key: {err:?}"
            );
            errors.push(err);
        }
        assert_eq!(
            std::mem::discriminant(errors[0].root()),
            std::mem::discriminant(errors[1].root()),
            "{what}: {:?} in process, {:?} through the plugin",
            errors[0],
            errors[1]
        );
        assert_eq!(errors[0].to_string(), errors[1].to_string(), "{what}");
        assert!(
            errors[1].to_string().contains(&format!("{:?}", keys[1])),
            "{what}: {}",
            errors[1]
        );
    }

    // One id list per output, or one for all: a count mismatch otherwise, before any call.
    let mut outs = vec![empty_output(DType::F32); 3];
    let err = plugin
        .row_sparse_pull(
            &["emb"; 3],
            &mut outs[..],
            &vec![good_ids.clone(), good_ids.clone()],
        )
        .unwrap_err();
    assert!(matches!(err, Error::CountMismatch { .. }), "{err:?}");
}

/// A page of readable memory followed by one that is not: a descriptor copied to the very end
/// of the first page cannot be read beyond its `struct_size` without a fault.
#[cfg(unix)]
fn guarded_copy(descriptor: *const KvPluginDescriptor, size: usize) -> *const KvPluginDescriptor {
    // SAFETY: plain libc calls on a fresh anonymous mapping, checked; the mapping is never
    // unmapped (registered descriptors live for the rest of the program).
    unsafe {
        let page = usize::try_from(libc::sysconf(libc::_SC_PAGESIZE)).unwrap();
        let base = libc::mmap(
            std::ptr::null_mut(),
            2 * page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(base, libc::MAP_FAILED);
        let guard = base.cast::<u8>().add(page);
        assert_eq!(libc::mprotect(guard.cast(), page, libc::PROT_NONE), 0);
        let copy = guard.sub(size);
        std::ptr::copy_nonoverlapping(descriptor.cast::<u8>(), copy, size);
        copy.cast()
    }
}

/// The descriptor of the plugin at `path`, reduced to revision 1.0: its first
/// `KV_PLUGIN_DESCRIPTOR_SIZE_V1_0` bytes, with that `struct_size` and the name `name`.
#[cfg(unix)]
fn revision_1_0_copy(path: &Path, name: &'static std::ffi::CStr) -> *const KvPluginDescriptor {
    // SAFETY: a plugin library, kept loaded for the rest of the program (leaked).
    let library = unsafe { libloading::Library::new(path) }.unwrap();
    // SAFETY: the entry has this type by the ABI.
    let entry = *unsafe { library.get::<KvPluginEntry>(KV_PLUGIN_ENTRY.as_bytes()) }.unwrap();
    std::mem::forget(library);
    // SAFETY: the entry returns a complete descriptor of this revision.
    let mut descriptor = unsafe { *entry() };
    assert_eq!(descriptor.struct_size, KV_PLUGIN_DESCRIPTOR_SIZE_V1_1);
    descriptor.struct_size = KV_PLUGIN_DESCRIPTOR_SIZE_V1_0;
    descriptor.name = name.as_ptr();
    guarded_copy(&descriptor, KV_PLUGIN_DESCRIPTOR_SIZE_V1_0)
}

/// Checks that every operation appended in 1.1 is unsupported on `kv`.
fn appended_operations_are_unsupported(kv: &dyn KVStoreBase) {
    let store = kv.type_name().to_string();
    let path = temp_path("never-written");
    let mut out = empty_output(DType::F32);
    let ids = NDArray::from_vec(&[1], vec![0i64]).unwrap();
    let results: Vec<(&str, kvstore_base::Result<()>)> = vec![
        ("barrier", kv.barrier()),
        (
            "set_gradient_compression",
            kv.set_gradient_compression(&params(&[("type", "2bit")])),
        ),
        (
            "save_optimizer_states",
            kv.save_optimizer_states(&path, true),
        ),
        ("load_optimizer_states", kv.load_optimizer_states(&path)),
        (
            "send_command_to_servers",
            kv.send_command_to_servers(0, "x"),
        ),
        ("row_sparse_pull", kv.row_sparse_pull("w", &mut out, &ids)),
        ("set_updater", kv.set_updater_fn(|_, _, _| Ok(()))),
    ];
    for (operation, result) in results {
        match result {
            Err(Error::Unsupported {
                store: s,
                operation: o,
            }) => {
                assert_eq!(s, store);
                assert_eq!(o, operation);
            }
            other => panic!("{operation}: expected unsupported, got {other:?}"),
        }
    }
    assert!(!path.exists());
    for capability in [
        Capability::GradientCompression,
        Capability::RowSparse,
        Capability::OptimizerStates,
        Capability::Updater,
    ] {
        assert!(!kv.is_capable(capability), "{capability}");
    }
}

#[cfg(unix)]
#[test]
fn a_revision_1_0_c_descriptor_loads_and_its_new_operations_are_unsupported() {
    let descriptor = revision_1_0_copy(&common::c_plugin(), c"oldsummingstore");
    // SAFETY: the copy holds a complete 1.0 descriptor whose name and functions live as long
    // as the (leaked) library.
    let api = unsafe { PluginApi::from_descriptor(descriptor, "summing store, 1.0 copy") }
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(api.struct_size(), KV_PLUGIN_DESCRIPTOR_SIZE_V1_0);
    assert_eq!(api.capabilities(), Some(&[Capability::InitPushPull][..]));
    register_descriptor(api);
    let kv = create("oldsummingstore").unwrap();
    // What 1.0 carries works as before.
    kv.init("w", &filled(&[3], 1.0)).unwrap();
    kv.push("w", &[filled(&[3], 2.0), filled(&[3], 3.0)])
        .unwrap();
    let mut out = NDArray::zeros(&[3], DType::F32);
    kv.pull("w", &mut out).unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![5.0; 3]);
    appended_operations_are_unsupported(&*kv);
    // Row-sparse values cannot reach a 1.0 plugin.
    let sparse = NDArray::row_sparse(&[3], vec![1], &filled(&[1], 1.0)).unwrap();
    let err = kv.push("w", &sparse).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("dense arrays only"), "{err}");
}

#[cfg(unix)]
#[test]
fn functions_beyond_a_1_0_struct_size_are_never_used() {
    // The local plugin's descriptor provides every 1.1 function; cut to 1.0 they are absent,
    // and so are the capabilities that need them (set_optimizer is 1.0's: optimizer stays).
    let descriptor = revision_1_0_copy(&common::local_plugin(), c"oldlocalpluginstore");
    // SAFETY: as above.
    let api = unsafe { PluginApi::from_descriptor(descriptor, "local plugin, 1.0 copy") }
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        api.capabilities(),
        Some(&[Capability::Optimizer, Capability::InitPushPull][..])
    );
    register_descriptor(api);
    let kv = create("oldlocalpluginstore").unwrap();
    assert!(kv.is_capable(Capability::Optimizer));
    kv.init(1, &filled(&[4], 1.0)).unwrap();
    kv.set_optimizer(&OptimizerSpec::new("sgd")).unwrap();
    appended_operations_are_unsupported(&*kv);
    // Dense operations still go through.
    kv.push(1, &filled(&[4], 1.0)).unwrap();
    let mut out = NDArray::zeros(&[4], DType::F32);
    kv.pull(1, &mut out).unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![0.99; 4]);
}
