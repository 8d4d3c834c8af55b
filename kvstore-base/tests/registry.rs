//! The registry: static registration with `register!`, runtime registration and overrides,
//! `create` by any casing, and the errors for unknown and ambiguous names.

use std::sync::{Mutex, OnceLock};

use kvstore_base::{
    create, create_default, register, register_runtime, registered, registered_names,
    unregister_runtime, Capability, CreateRequest, DType, Error, KVStoreBase, KVStoreExt,
    KeyedOuts, KeyedValues, NDArray, Result,
};

/// A store that copies the first value of a call into every output; enough to be told apart.
#[derive(Debug, Default)]
struct CaseStore {
    name: String,
    marker: f64,
}

impl KVStoreBase for CaseStore {
    fn type_name(&self) -> &str {
        if self.name.is_empty() {
            "casestore"
        } else {
            &self.name
        }
    }
    fn rank(&self) -> usize {
        0
    }
    fn num_workers(&self) -> usize {
        1
    }
    fn is_capable(&self, capability: Capability) -> bool {
        capability == Capability::RowSparse
    }
    fn broadcast_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, _: i32) -> Result<()> {
        Ok(())
    }
    fn pushpull_batch(&self, _: &KeyedValues<'_>, outs: &mut KeyedOuts<'_>, _: i32) -> Result<()> {
        for out in outs.outs_mut() {
            let marker = NDArray::full(out.shape(), self.marker, out.dtype());
            out.assign(&marker)?;
        }
        Ok(())
    }
}

register!(CaseStore);

/// A store registered by type with declared capabilities: listing them builds nothing.
#[derive(Debug)]
struct DeclaredStore;

impl Default for DeclaredStore {
    fn default() -> Self {
        panic!("registered() must not build a store whose capabilities are declared")
    }
}

impl KVStoreBase for DeclaredStore {
    fn type_name(&self) -> &str {
        "declaredstore"
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
    fn broadcast_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, _: i32) -> Result<()> {
        Ok(())
    }
    fn pushpull_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, _: i32) -> Result<()> {
        Ok(())
    }
}

register!(DeclaredStore, capabilities = [Capability::Distributed]);

fn named(request: &CreateRequest) -> Result<Box<dyn KVStoreBase>> {
    Ok(Box::new(CaseStore {
        name: request.name.clone(),
        marker: 2.0,
    }))
}

register!(
    "Explicit_Store",
    named,
    aliases = ["explicit_alias"],
    capabilities = [Capability::Optimizer, Capability::InitPushPull]
);

// Two crates claiming one name: neither may win silently.
register!("contested", named);
mod elsewhere {
    kvstore_base::register!("contested", super::named);
}

fn marker_of(kv: &dyn KVStoreBase) -> f64 {
    let mut out = NDArray::zeros(&[1], DType::F32);
    kv.pushpull(1, &NDArray::zeros(&[1], DType::F32), &mut out)
        .unwrap();
    out.to_f64_vec()[0]
}

#[test]
fn register_type_uses_the_lower_cased_type_name() {
    assert!(registered_names().contains(&"casestore".to_string()));
    for spelling in ["casestore", "CaseStore", "CASESTORE", "cAsEsToRe"] {
        let kv = create(spelling).unwrap_or_else(|e| panic!("create({spelling:?}): {e}"));
        assert_eq!(kv.type_name(), "casestore");
    }
}

#[test]
fn register_explicit_name_with_aliases_and_declared_capabilities() {
    let kv = create("EXPLICIT_STORE").unwrap();
    assert_eq!(
        kv.type_name(),
        "explicit_store",
        "the factory sees the lower-cased name"
    );
    let via_alias = create("Explicit_Alias").unwrap();
    assert_eq!(via_alias.type_name(), "explicit_alias");

    let info = registered()
        .into_iter()
        .find(|i| i.name == "explicit_store")
        .unwrap();
    assert_eq!(info.aliases, vec!["explicit_alias"]);
    assert_eq!(
        info.capabilities.unwrap(),
        vec![Capability::Optimizer, Capability::InitPushPull]
    );
    assert!(info.origin.starts_with("registry"), "{}", info.origin);
}

#[test]
fn register_type_with_declared_capabilities_does_not_build_a_store() {
    let info = registered()
        .into_iter()
        .find(|i| i.name == "declaredstore")
        .unwrap();
    assert_eq!(info.capabilities.unwrap(), vec![Capability::Distributed]);
}

#[test]
fn registered_probes_capabilities_when_not_declared() {
    let info = registered()
        .into_iter()
        .find(|i| i.name == "casestore")
        .unwrap();
    assert_eq!(info.capabilities.unwrap(), vec![Capability::RowSparse]);
    assert!(!info.runtime);
}

#[test]
fn unknown_name_lists_registered_stores_and_suggests_the_nearest() {
    let err = create("CaseStor").unwrap_err();
    let Error::UnknownStore {
        name,
        registered,
        suggestion,
        provided_by,
    } = &err
    else {
        panic!("expected UnknownStore, got {err:?}");
    };
    assert_eq!(name, "casestor");
    assert!(registered.contains(&"casestore".to_string()));
    assert!(registered.contains(&"explicit_alias".to_string()));
    assert_eq!(suggestion.as_deref(), Some("casestore"));
    assert_eq!(provided_by, &None);
    let text = err.to_string();
    assert!(
        text.starts_with("unknown kvstore type \"casestor\"; registered: "),
        "{text}"
    );
    assert!(text.contains("casestore, "), "{text}");
    assert!(text.ends_with("did you mean \"casestore\"?"), "{text}");

    let far = create("qwertyuiopasdf").unwrap_err().to_string();
    assert!(!far.contains("did you mean"), "{far}");
}

#[test]
fn two_static_registrations_of_one_name_are_an_error_naming_both() {
    let err = create("contested").unwrap_err();
    assert!(matches!(err, Error::AmbiguousStore { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("registry") && text.contains("registry::elsewhere"),
        "{text}"
    );
}

#[test]
fn create_default_is_local() {
    // No crate registering `local` is linked into this test binary.
    match create_default() {
        Err(Error::UnknownStore { name, .. }) => assert_eq!(name, "local"),
        other => panic!("expected UnknownStore for local, got {other:?}"),
    }
}

/// Collects the warnings logged by the registry.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            self.0.lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

fn warnings() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(capture).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
        capture
    })
}

fn warnings_about(name: &str) -> Vec<String> {
    warnings()
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.contains(name))
        .cloned()
        .collect()
}

#[test]
fn runtime_registration_overrides_a_static_one_with_a_warning() {
    warnings();
    let previous = register_runtime("CASESTORE_OVERRIDE_PROBE", "first_plugin", None, |_| {
        Ok(Box::new(CaseStore::default()))
    });
    assert_eq!(previous, None, "a new name overrides nothing");
    assert!(warnings_about("casestore_override_probe").is_empty());

    // Overriding a static registration: the runtime one wins, with MXNet's warning.
    let previous = register_runtime("explicit_alias", "my_plugin", Some(&[]), |_| {
        Ok(Box::new(CaseStore {
            name: "runtime".into(),
            marker: 7.0,
        }))
    });
    assert_eq!(previous.as_deref(), Some("registry"));
    let logged = warnings_about("explicit_alias");
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(
        logged[0],
        "WARNING: New kvstore my_plugin::explicit_alias is overriding existing kvstore registry::explicit_alias"
    );
    let kv = create("Explicit_Alias").unwrap();
    assert_eq!(marker_of(&*kv), 7.0);

    // Overriding a runtime registration.
    let previous = register_runtime("explicit_alias", "other_plugin", Some(&[]), |_| {
        Ok(Box::new(CaseStore {
            name: "runtime".into(),
            marker: 9.0,
        }))
    });
    assert_eq!(previous.as_deref(), Some("my_plugin"));
    assert_eq!(warnings_about("explicit_alias").len(), 2);
    assert_eq!(marker_of(&*create("explicit_alias").unwrap()), 9.0);

    // Removing it brings the static registration back.
    assert!(unregister_runtime("EXPLICIT_ALIAS"));
    assert_eq!(marker_of(&*create("explicit_alias").unwrap()), 2.0);
    assert!(unregister_runtime("casestore_override_probe"));
}

#[test]
fn a_failing_factory_error_reaches_the_caller_and_registered_says_why() {
    register_runtime("broken_store", "tests", None, |_| {
        Err(Error::Device("no GPU in this test".into()))
    });
    let err = create("broken_store").unwrap_err();
    assert!(matches!(err, Error::Device(_)), "{err:?}");
    let info = registered()
        .into_iter()
        .find(|i| i.name == "broken_store")
        .unwrap();
    assert!(info.runtime);
    assert!(info.capabilities.unwrap_err().contains("no GPU"));
    unregister_runtime("broken_store");
}
