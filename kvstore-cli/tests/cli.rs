//! Runs the `kvstore` binary as a user would.

use std::process::Command;

fn kvstore(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kvstore: {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn list_shows_teststore_with_its_capabilities_and_origin() {
    let (ok, out, err) = kvstore(&["list"]);
    assert!(ok, "kvstore list failed:\n{err}");
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("NAME") && header.contains("CAPABILITIES"),
        "{out}"
    );
    let teststore = out
        .lines()
        .find(|l| l.starts_with("teststore "))
        .unwrap_or_else(|| panic!("teststore is not listed:\n{out}"));
    assert!(teststore.contains("none"), "{teststore}");
    assert!(teststore.contains("kvstore_test"), "{teststore}");
}

#[test]
fn help_lists_only_real_subcommands() {
    let (ok, out, err) = kvstore(&["--help"]);
    assert!(ok, "kvstore --help failed:\n{err}");
    assert!(out.contains("list"), "{out}");
    assert!(out.contains("planned"), "{out}");
}

#[test]
fn an_unknown_subcommand_fails_without_panicking() {
    let (ok, _, err) = kvstore(&["frobnicate"]);
    assert!(!ok);
    assert!(err.contains("frobnicate"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
