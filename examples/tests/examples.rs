//! Runs the example programs and checks what they print.

use std::process::{Command, Output};

/// Runs a program built from this package and returns its output, checking that it succeeded.
fn run(program: &str) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(program)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    assert!(
        status.success(),
        "{program} failed with {status}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&stderr)
    );
    stdout
}

#[test]
fn third_party_store_is_found_by_name_and_sums_the_gradients() {
    let out = run(env!("CARGO_BIN_EXE_third_party_store"));
    // The registry lists the third-party store next to the facade's, with its capability.
    let listed = out
        .lines()
        .find(|l| l.trim_start().starts_with("mykvstore "))
        .unwrap_or_else(|| panic!("mykvstore is not listed:\n{out}"));
    assert!(listed.contains("init_push_pull"), "{listed}");
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("teststore ")),
        "{out}"
    );
    // create("MyKVStore") found it.
    assert!(out.contains("created \"mykvstore\""), "{out}");
    // Device d pushed (d + 1) * [1..=6]; the sum over 4 devices is 10 * [1..=6].
    let sum = "[10.0, 20.0, 30.0, 40.0, 50.0, 60.0]";
    assert_eq!(out.matches(&format!("weight = {sum}")).count(), 4, "{out}");
    assert!(
        out.contains(&format!(
            "mykvstore: pulled {sum} = sum of 4 device gradients"
        )),
        "{out}"
    );
}

#[test]
fn teststore_pushpull_gives_every_device_the_sum() {
    let out = run(env!("CARGO_BIN_EXE_teststore_pushpull"));
    assert!(out.contains("created \"teststore\""), "{out}");
    // 1 + 2 + 3 + 4 on every element, for every device.
    assert_eq!(out.matches("pulls [10.0, 10.0, 10.0]").count(), 4, "{out}");
    assert!(
        out.contains(
            "teststore: pushpull of 4 device values gave [10.0, 10.0, 10.0] on every device"
        ),
        "{out}"
    );
}

#[test]
fn training_on_the_local_store_drives_the_loss_to_the_noise_floor() {
    let out = run(env!("CARGO_BIN_EXE_train_linear"));
    assert!(out.starts_with("store: local (4 devices)"), "{out}");
    let last = out.lines().last().unwrap_or_default();
    let figures: Vec<f32> = last
        .trim_start_matches("trained: loss ")
        .split(" -> ")
        .map(|x| x.parse().unwrap_or_else(|_| panic!("not a loss: {last}")))
        .collect();
    let (initial, trained) = (figures[0], figures[1]);
    assert!(initial > 10.0, "{out}");
    // The data's noise has variance 0.01: a fitted model cannot do better, and should not do
    // much worse.
    assert!(trained < 0.02, "{out}");
    // Every epoch reports a finite loss.
    assert_eq!(
        out.lines().filter(|l| l.starts_with("epoch ")).count(),
        8,
        "{out}"
    );
}
