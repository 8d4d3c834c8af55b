//! The pickles MXNet 1.9.1's `kv.set_optimizer` sends, one per optimizer MXNet registers and
//! per learning-rate scheduler (written by MXNet itself: `scripts/mxnet_optimizer_pickles.py`
//! made `tests/data/mxnet_optimizer_pickles.txt`): this crate's server reads each as data into
//! an optimizer `kvstore-optimizer` builds, or names the one it does not have.

use kvstore_optimizer::Updater;
use kvstore_pslite::pickle::optimizer_spec;

/// The optimizers MXNet 1.9.1 registers that `kvstore-optimizer` does not have.
const NOT_BUILT: &[&str] = &["lbsgd", "sgld"];

fn pickles() -> Vec<(String, Vec<u8>)> {
    let text = include_str!("data/mxnet_optimizer_pickles.txt");
    text.lines()
        .map(|line| {
            let (label, hex) = line.split_once('\t').expect("label, tab, hex");
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            (label.to_string(), bytes)
        })
        .collect()
}

#[test]
fn every_mxnet_optimizer_pickle_reads_into_an_optimizer() {
    let pickles = pickles();
    assert_eq!(pickles.len(), 23, "19 optimizers and 4 schedulers");
    let mut failures = Vec::new();
    for (label, bytes) in pickles {
        let name = label.split('+').next().unwrap();
        let built = optimizer_spec(&bytes).and_then(|spec| {
            assert_eq!(spec.name, name, "{label}");
            Updater::from_spec(&spec).map_err(|e| e.to_string())
        });
        match (NOT_BUILT.contains(&name), built) {
            (false, Ok(_)) => {}
            (true, Err(e)) if e.contains(name) => {}
            (_, Err(e)) => failures.push(format!("{label}: {e}")),
            (true, Ok(_)) => failures.push(format!("{label}: built, though listed as not built")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_scheduler_keeps_its_settings() {
    let (_, bytes) = pickles()
        .into_iter()
        .find(|(label, _)| label == "sgd+poly")
        .unwrap();
    let spec = optimizer_spec(&bytes).unwrap();
    let kvstore_base::ParamValue::Map(schedule) = &spec.params["lr_scheduler"] else {
        panic!("{spec:?}");
    };
    let number = |k: &str| schedule[k].as_f64().unwrap();
    assert_eq!(schedule["type"], kvstore_base::ParamValue::from("poly"));
    assert_eq!(
        (number("max_update"), number("pwr"), number("warmup_steps")),
        (10.0, 2.0, 2.0)
    );
    // MXNet's optimizer replaced the scheduler's base rate with its own learning rate.
    assert_eq!(number("base_lr"), 0.1);
}
