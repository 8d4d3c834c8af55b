//! Plugins listed in `KVSTORE_PLUGIN_PATH` (a file and a folder) are loaded at the first
//! `create`; a library that fails to load is logged and skipped.

mod common;

use std::path::Path;

use kvstore_base::{create, registered};

#[test]
fn plugins_on_the_path_are_found_by_name() {
    common::capture_logs();
    // The folder of the C build holds the C plugin and the fixtures that fail to load.
    let c_folder = Path::new(kvstore_plugin_c::SUMMING_STORE).parent().unwrap();
    let missing = std::env::temp_dir().join("kvstore-no-such-plugin-on-the-path.so");
    let paths =
        std::env::join_paths([common::rust_plugin().as_path(), c_folder, &missing]).unwrap();
    // This binary runs one test, so nothing else reads the environment concurrently.
    std::env::set_var(kvstore_base::plugin::PLUGIN_PATH_VAR, &paths);

    assert_eq!(create("SummingStore").unwrap().type_name(), "summingstore");
    assert_eq!(
        create("rustpluginstore").unwrap().type_name(),
        "rustpluginstore"
    );
    let info = registered();
    let c = info.iter().find(|i| i.name == "summingstore").unwrap();
    assert!(c.runtime, "{c:?}");
    assert_eq!(
        c.origin,
        kvstore_plugin_c::SUMMING_STORE,
        "found in the folder"
    );
    assert_eq!(
        c.capabilities.as_deref().unwrap(),
        [kvstore_base::Capability::InitPushPull]
    );

    let logs = common::logs();
    for broken in [
        "bad_version",
        "no_entry",
        "missing_function",
        "layout",
        "kvstore-no-such-plugin-on-the-path",
    ] {
        assert!(
            logs.iter().any(|l| l.starts_with("WARN")
                && l.contains("KVSTORE_PLUGIN_PATH")
                && l.contains(broken)),
            "no warning about {broken} in {logs:?}"
        );
    }
}
