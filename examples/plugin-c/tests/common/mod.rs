//! Helpers shared by the loader tests: where the example plugins are.

use std::path::PathBuf;

/// The Rust example plugin (`libkvstore_plugin_example.so` on Linux). Cargo builds the
/// `cdylib` next to the test binaries (in `target/<profile>/deps`) because the tests depend on
/// the crate; a build of the crate itself puts it one folder up.
#[allow(dead_code)]
pub fn rust_plugin() -> PathBuf {
    cdylib("kvstore_plugin_example")
}

/// The test plugin of ABI revision 1.1 (`libkvstore_plugin_local.so` on Linux): the local
/// store as `localpluginstore`, found as [`rust_plugin`] is.
#[allow(dead_code)]
pub fn local_plugin() -> PathBuf {
    cdylib("kvstore_plugin_local")
}

/// The `cdylib` of the crate whose library is named `lib_name`, built by Cargo for the tests.
fn cdylib(lib_name: &str) -> PathBuf {
    let file = format!(
        "{}{lib_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe.parent().expect("the test binary's folder");
    let candidates = [deps.join(&file), deps.join("..").join(&file)];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| panic!("the plugin {lib_name} was not built: looked for {candidates:?}"))
}

/// The C example plugin.
#[allow(dead_code)]
pub fn c_plugin() -> PathBuf {
    PathBuf::from(kvstore_plugin_c::SUMMING_STORE)
}

/// Log records captured by [`capture_logs`].
static LOGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        LOGS.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

/// Installs a logger that keeps every record (once per process).
#[allow(dead_code)]
pub fn capture_logs() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Capture).expect("no other logger");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// The captured records so far (`LEVEL message`).
#[allow(dead_code)]
pub fn logs() -> Vec<String> {
    LOGS.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}
