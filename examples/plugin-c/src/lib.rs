//! # kvstore-plugin-c: a kvstore plugin written in C
//!
//! `summing_store.c` implements the C ABI of `kvstore_plugin.h` (in
//! `kvstore-base/include/`): an in-memory store registered as `summingstore` that keeps values
//! (`init`, `push`, `pull`, plus `broadcast` and `pushpull`) of every dtype. The build script
//! compiles it with the system C compiler (`$CC`, else `cc`) into a shared library, whose
//! path is [`SUMMING_STORE`]; a host loads it with `kvstore_base::plugin::load_plugin` or
//! through `KVSTORE_PLUGIN_PATH`, then calls `kvstore_base::create("summingstore")`.
//!
//! The crate's tests load this plugin, the Rust one (`kvstore-plugin-example`) and the local
//! store exported as a plugin (`kvstore-plugin-local`), run the conformance suite on each,
//! check every error of the loader (with the C fixtures whose paths are the other constants),
//! compare the operations of ABI revision 1.1 with the local store in process, and check that
//! descriptors of revision 1.0 still load, their missing operations unsupported. This C
//! plugin is compiled against the current header (revision 1.1) and leaves the functions
//! appended in 1.1 null.
#![deny(missing_docs)]

/// The C plugin `summingstore`, compiled from `summing_store.c`.
pub const SUMMING_STORE: &str = env!("KVSTORE_PLUGIN_C_SUMMING_STORE");

/// A test fixture: a plugin whose descriptor claims ABI version 999.
pub const BAD_VERSION: &str = env!("KVSTORE_PLUGIN_C_BAD_VERSION");

/// A test fixture: a shared library without the `kvstore_plugin_entry` symbol.
pub const NO_ENTRY: &str = env!("KVSTORE_PLUGIN_C_NO_ENTRY");

/// A test fixture: a version-1 descriptor without its required functions.
pub const MISSING_FUNCTION: &str = env!("KVSTORE_PLUGIN_C_MISSING_FUNCTION");

/// A test fixture: a library reporting the C layout of the ABI types
/// (`size_t kvstore_plugin_layout(size_t *out, size_t cap)`).
pub const LAYOUT: &str = env!("KVSTORE_PLUGIN_C_LAYOUT");
