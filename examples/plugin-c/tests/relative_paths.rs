//! A plugin named by a bare file name or a relative path is loaded from the working
//! directory, the file the loader checked, never one of the same name that the dynamic
//! linker's search (`LD_LIBRARY_PATH`, the system's folders) would find. In a binary of its
//! own: it changes the working directory.

use std::path::Path;

use kvstore_base::plugin::{discover, load_plugin};

#[test]
fn bare_file_names_and_relative_paths_load_the_file_in_the_working_directory() {
    let dir = std::env::temp_dir().join(format!("kvstore-relative-plugin-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::copy(
        kvstore_plugin_c::SUMMING_STORE,
        dir.join("libsumming_copy.so"),
    )
    .unwrap();
    std::fs::copy(
        kvstore_plugin_c::SUMMING_STORE,
        dir.join("sub").join("libsumming_sub.so"),
    )
    .unwrap();
    std::env::set_current_dir(&dir).unwrap();
    let loaded = load_plugin("libsumming_copy.so");
    let found = discover(std::ffi::OsStr::new("sub/libsumming_sub.so"));
    std::env::set_current_dir(std::env::temp_dir()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let loaded = loaded.unwrap();
    assert_eq!(loaded.name, "summingstore");
    assert_eq!(loaded.path, Path::new("libsumming_copy.so"));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].as_ref().unwrap().name, "summingstore");
}
