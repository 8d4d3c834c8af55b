//! A store registered explicitly before the registry was first read is not overridden by a
//! plugin of the same name listed in `KVSTORE_PLUGIN_PATH`: the environment's plugins are
//! loaded first, at the registry's first use, whatever that use is.

mod common;

use kvstore_base::{create, register_runtime, Error, KVStoreBase, KeyedOuts, KeyedValues, Result};

#[derive(Debug)]
struct Explicit;

impl KVStoreBase for Explicit {
    fn type_name(&self) -> &str {
        "explicit"
    }
    fn rank(&self) -> usize {
        0
    }
    fn num_workers(&self) -> usize {
        1
    }
    fn is_capable(&self, _: kvstore_base::Capability) -> bool {
        false
    }
    fn broadcast_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, _: i32) -> Result<()> {
        Err(Error::InvalidArgument("not used".into()))
    }
    fn pushpull_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, _: i32) -> Result<()> {
        Err(Error::InvalidArgument("not used".into()))
    }
}

#[test]
fn an_explicit_registration_made_first_wins_over_the_environments_plugin() {
    // This binary runs one test, so nothing else reads the environment concurrently.
    std::env::set_var(
        kvstore_base::plugin::PLUGIN_PATH_VAR,
        common::c_plugin().as_os_str(),
    );
    // The registry's first use: the C plugin (`summingstore`) is loaded now, then overridden.
    let overridden = register_runtime("SummingStore", "this test", None, |_| {
        Ok(Box::new(Explicit) as Box<dyn KVStoreBase>)
    });
    assert_eq!(
        overridden.as_deref(),
        Some(kvstore_plugin_c::SUMMING_STORE),
        "the plugin on the path was loaded before the explicit registration"
    );
    assert_eq!(create("summingstore").unwrap().type_name(), "explicit");
}
