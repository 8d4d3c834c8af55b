//! Runs the conformance suite against every store this build registers.
//!
//! Trials are named `<store>::<check>`; `KVSTORE_TEST=local,teststore` narrows the run to
//! some stores. A store that cannot be built here (no GPU, no servers) has its trials
//! reported as ignored, with the reason.

use std::sync::Arc;

fn main() -> std::process::ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let only: Option<Vec<String>> = std::env::var("KVSTORE_TEST").ok().map(|list| {
        list.split(',')
            .map(|s| s.trim().to_lowercase())
            .filter(|s| !s.is_empty())
            .collect()
    });
    let mut trials = Vec::new();
    for info in kvstore::registered() {
        if only
            .as_ref()
            .is_some_and(|names| !names.contains(&info.name))
        {
            continue;
        }
        let name = info.name.clone();
        trials.extend(kvstore_test::trials(
            &info.name,
            Arc::new(move || kvstore::create(&name)),
        ));
    }
    libtest_mimic::run(&args, trials).exit_code()
}
