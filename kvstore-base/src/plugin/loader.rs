//! Loading plugin libraries: [`load_plugin`] and discovery from `KVSTORE_PLUGIN_PATH`.

use std::path::{Path, PathBuf};
use std::sync::Once;

use super::abi::{KvPluginEntry, KV_PLUGIN_ENTRY};
use super::host::{register_descriptor, PluginApi};
use crate::{Capability, Error, Result};

/// The environment variable listing plugin libraries or folders of them, separated as `PATH`
/// is (`:` on Unix, `;` on Windows).
pub const PLUGIN_PATH_VAR: &str = "KVSTORE_PLUGIN_PATH";

/// A plugin that [`load_plugin`] registered.
#[derive(Debug, Clone)]
pub struct LoadedPlugin {
    /// The store name `create` now answers with the plugin's store.
    pub name: String,
    /// The library file.
    pub path: PathBuf,
    /// The declared capabilities (those the ABI forwards), `None` when not declared.
    pub capabilities: Option<Vec<Capability>>,
    /// The origin of the registration the plugin replaced, if the name was taken.
    pub overridden: Option<String>,
}

/// Loads the plugin library at `path` and registers its store in the runtime registry, so
/// that [`create`](crate::create) finds it by name. A relative `path` (a bare file name too)
/// is taken from the working directory, never searched for as the dynamic linker would.
///
/// The library stays loaded for the rest of the program (stores and their functions may be
/// in use anywhere). A name that is already registered is overridden, with MXNet's warning
/// (`New kvstore ... is overriding existing kvstore ...`) logged; [`LoadedPlugin::overridden`]
/// says which.
///
/// # Errors
/// [`Error::Plugin`] naming the file when it does not exist, is not a shared library, does
/// not export `kvstore_plugin_entry`, was built for another plugin ABI version, or returns a
/// descriptor smaller than revision 1.0's or without a required function. A descriptor of an
/// earlier revision of version 1 (a smaller `struct_size`) loads: the functions it lacks are
/// unsupported operations.
pub fn load_plugin(path: impl AsRef<Path>) -> Result<LoadedPlugin> {
    let path = path.as_ref();
    let fail = |reason: String| Error::Plugin {
        path: path.to_path_buf(),
        reason,
    };
    if !path.exists() {
        return Err(fail("no such file".into()));
    }
    if !path.is_file() {
        return Err(fail("not a file".into()));
    }
    // The dynamic linker searches its own folders for a name without a `/`: the file checked
    // above is the one loaded only through its full path.
    let resolved = std::fs::canonicalize(path).map_err(|e| fail(format!("cannot resolve: {e}")))?;
    // Loading a library runs its initialisers: that is what loading a plugin means, and the
    // reason only trusted paths belong in KVSTORE_PLUGIN_PATH.
    // SAFETY: see above; the library is never unloaded (it is leaked below), so nothing it
    // hands out can dangle.
    let library = unsafe { libloading::Library::new(&resolved) }
        .map_err(|e| fail(format!("not a loadable shared library: {e}")))?;
    // SAFETY: the symbol is declared by the ABI with exactly this type.
    let entry: KvPluginEntry =
        match unsafe { library.get::<KvPluginEntry>(KV_PLUGIN_ENTRY.as_bytes()) } {
            Ok(symbol) => *symbol,
            Err(_) => {
                return Err(fail(format!(
                    "not a kvstore plugin: the library does not export `{KV_PLUGIN_ENTRY}`"
                )))
            }
        };
    // The library is never unloaded: leak its handle so that `entry`, the descriptor and
    // every function it points to stay valid for the life of the program.
    std::mem::forget(library);
    let origin = path.display().to_string();
    // SAFETY: the entry follows the ABI (it is the plugin's exported entry), and the library
    // stays loaded, so the descriptor it returns and the functions it names stay valid.
    let api = unsafe { PluginApi::from_descriptor(entry(), &origin) }?;
    let loaded = LoadedPlugin {
        name: api.name().to_string(),
        path: path.to_path_buf(),
        capabilities: api.capabilities().map(<[Capability]>::to_vec),
        overridden: None,
    };
    let overridden = register_descriptor(api);
    log::info!("loaded kvstore plugin {} from {origin}", loaded.name);
    Ok(LoadedPlugin {
        overridden,
        ..loaded
    })
}

/// Whether a file name looks like a shared library of this platform.
fn is_library(path: &Path) -> bool {
    let suffix = std::env::consts::DLL_SUFFIX.trim_start_matches('.');
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(suffix))
}

/// Loads every plugin that `paths` lists (`PATH`-style: files, or folders whose shared
/// libraries, `.so`/`.dylib`/`.dll`, are loaded in name order). Empty entries are skipped.
///
/// Returns one result per library tried; a failure does not stop the others.
pub fn discover(paths: &std::ffi::OsStr) -> Vec<Result<LoadedPlugin>> {
    let mut results = Vec::new();
    for entry in std::env::split_paths(paths) {
        if entry.as_os_str().is_empty() {
            continue;
        }
        if entry.is_dir() {
            let listing = match std::fs::read_dir(&entry) {
                Ok(listing) => listing,
                Err(source) => {
                    results.push(Err(Error::Io {
                        path: entry.clone(),
                        source,
                    }));
                    continue;
                }
            };
            let mut files: Vec<PathBuf> = listing
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_library(p))
                .collect();
            files.sort();
            results.extend(files.into_iter().map(load_plugin));
        } else {
            results.push(load_plugin(&entry));
        }
    }
    results
}

/// Loads the plugins of `KVSTORE_PLUGIN_PATH` once per process, before the registry is first
/// read or changed (so that a store registered or loaded explicitly is never overridden later
/// by one of the environment's). A library that fails to load is logged as a warning and
/// skipped: a broken plugin must not make every other store unavailable.
pub(crate) fn discover_once() {
    static DISCOVERY: Once = Once::new();
    thread_local! {
        /// Set on the thread running the discovery: its own registrations must not wait
        /// for it.
        static DISCOVERING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if DISCOVERING.get() {
        return;
    }
    DISCOVERY.call_once(|| {
        let Some(paths) = std::env::var_os(PLUGIN_PATH_VAR) else {
            return;
        };
        DISCOVERING.set(true);
        let results = discover(&paths);
        DISCOVERING.set(false);
        for result in results {
            if let Err(e) = result {
                log::warn!("{PLUGIN_PATH_VAR}: {e}");
            }
        }
    });
}
