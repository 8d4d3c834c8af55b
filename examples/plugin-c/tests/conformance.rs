//! The conformance suite run on the example plugins and the local store as a plugin, loaded from their shared libraries and
//! reached by name through `create`, as any host would.

mod common;

use std::sync::Arc;

use kvstore_base::plugin::load_plugin;
use libtest_mimic::Arguments;

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let mut trials = Vec::new();
    for (label, path, name) in [
        ("c_plugin", common::c_plugin(), "summingstore"),
        ("rust_plugin", common::rust_plugin(), "rustpluginstore"),
        // Every operation of ABI revision 1.1: the optimizer-state and row-sparse checks run.
        ("local_plugin", common::local_plugin(), "localpluginstore"),
    ] {
        let loaded = load_plugin(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            loaded.name,
            name,
            "the plugin at {} registers {}",
            path.display(),
            loaded.name
        );
        trials.extend(kvstore_test::trials(
            label,
            Arc::new(move || kvstore_base::create(name)),
        ));
    }
    libtest_mimic::run(&args, trials).exit_code()
}
