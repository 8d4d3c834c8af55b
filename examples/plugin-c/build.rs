//! Compiles the C plugin (`summing_store.c`) and the C fixtures of the loader tests into shared
//! libraries with the system C compiler (`$CC`, else `cc`), and tells the crate where they are.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let include = manifest.join("../../kvstore-base/include");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let (prefix, suffix) = match target_os.as_str() {
        "macos" | "ios" => ("lib", ".dylib"),
        "windows" => ("", ".dll"),
        _ => ("lib", ".so"),
    };
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-changed=../../kvstore-base/include/kvstore_plugin.h");
    for (env, name, source) in [
        (
            "KVSTORE_PLUGIN_C_SUMMING_STORE",
            "summing_store",
            "summing_store.c",
        ),
        (
            "KVSTORE_PLUGIN_C_BAD_VERSION",
            "bad_version",
            "tests/c/bad_version.c",
        ),
        (
            "KVSTORE_PLUGIN_C_NO_ENTRY",
            "no_entry",
            "tests/c/no_entry.c",
        ),
        (
            "KVSTORE_PLUGIN_C_MISSING_FUNCTION",
            "missing_function",
            "tests/c/missing_function.c",
        ),
        ("KVSTORE_PLUGIN_C_LAYOUT", "layout", "tests/c/layout.c"),
    ] {
        println!("cargo:rerun-if-changed={source}");
        let library = out.join(format!("{prefix}{name}{suffix}"));
        compile(&compiler, &manifest.join(source), &include, &library);
        println!("cargo:rustc-env={env}={}", library.display());
    }
}

fn compile(compiler: &str, source: &Path, include: &Path, library: &Path) {
    let status = Command::new(compiler)
        .args(["-shared", "-fPIC", "-pthread", "-O2", "-std=c11"])
        .args(["-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(library)
        .arg(source)
        .arg("-lm")
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{compiler}` (set CC): {e}"));
    assert!(
        status.success(),
        "the C compiler `{compiler}` failed on {} ({status})",
        source.display()
    );
}
