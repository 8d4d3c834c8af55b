//! Who the store says it is and what it says it can do.

use std::path::Path;

use kvstore_base::{Capability, DType, Error, KVStoreExt, NDArray, OptimizerSpec};

use super::util::{expect_error, store};
use super::{ensure, Check, CheckResult, StoreFactory};

pub(super) const CHECKS: &[Check] = &[
    Check {
        name: "identity_rank_is_below_num_workers",
        requires: &[],
        run: rank_is_below_num_workers,
    },
    Check {
        name: "identity_type_name_is_lower_case",
        requires: &[],
        run: type_name_is_lower_case,
    },
    Check {
        name: "capability_strings_parse_case_insensitively",
        requires: &[],
        run: capability_strings_parse_case_insensitively,
    },
    Check {
        name: "capability_unknown_string_is_an_error",
        requires: &[],
        run: unknown_capability_is_an_error,
    },
    Check {
        name: "capability_missing_means_unsupported_operation",
        requires: &[],
        run: missing_capability_means_unsupported,
    },
];

fn rank_is_below_num_workers(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    ensure!(kv.num_workers() >= 1, "num_workers is {}", kv.num_workers());
    ensure!(
        kv.rank() < kv.num_workers(),
        "rank {} is not below num_workers {}",
        kv.rank(),
        kv.num_workers()
    );
    Ok(())
}

fn type_name_is_lower_case(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let name = kv.type_name();
    ensure!(!name.is_empty(), "the type name is empty");
    ensure!(
        name == name.to_lowercase(),
        "type name {name:?} is not lower case (create() lower-cases names)"
    );
    Ok(())
}

fn capability_strings_parse_case_insensitively(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    for &cap in Capability::ALL {
        let upper = cap.name().to_uppercase();
        ensure!(
            kv.is_capable_by_name(&upper)? == kv.is_capable(cap),
            "is_capable({upper:?}) disagrees with is_capable({cap:?})"
        );
    }
    Ok(())
}

fn unknown_capability_is_an_error(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    expect_error(
        kv.is_capable_by_name("teleportation"),
        "is_capable(\"teleportation\")",
        |e| matches!(e, Error::UnknownCapability(_)),
        &["teleportation"],
    )
}

fn is_unsupported(e: &Error) -> bool {
    matches!(e, Error::Unsupported { .. })
}

/// An operation whose capability the store does not claim answers `Unsupported`, naming the
/// store and the operation, instead of doing something else.
fn missing_capability_means_unsupported(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let name = kv.type_name().to_string();
    let value = NDArray::ones(&[2], DType::F32);
    let mut out = NDArray::zeros(&[2], DType::F32);
    if !kv.is_capable(Capability::Optimizer) {
        expect_error(
            kv.set_optimizer(&OptimizerSpec::new("sgd")),
            "set_optimizer",
            is_unsupported,
            &[&name, "set_optimizer"],
        )?;
    }
    if !kv.is_capable(Capability::InitPushPull) {
        expect_error(kv.init(1, &value), "init", is_unsupported, &[&name, "init"])?;
        expect_error(kv.push(1, &value), "push", is_unsupported, &[&name, "push"])?;
        expect_error(
            kv.pull(1, &mut out),
            "pull",
            is_unsupported,
            &[&name, "pull"],
        )?;
    }
    if !kv.is_capable(Capability::Updater) {
        expect_error(
            kv.set_updater_fn(|_, _, _| Ok(())),
            "set_updater",
            is_unsupported,
            &[&name],
        )?;
    }
    if !kv.is_capable(Capability::GradientCompression) {
        let params = [("type".to_string(), "2bit".to_string())]
            .into_iter()
            .collect();
        expect_error(
            kv.set_gradient_compression(&params),
            "set_gradient_compression",
            is_unsupported,
            &[&name],
        )?;
    }
    if !kv.is_capable(Capability::OptimizerStates) {
        let path = Path::new("kvstore-conformance-states-never-written");
        expect_error(
            kv.save_optimizer_states(path, false),
            "save_optimizer_states",
            is_unsupported,
            &[&name],
        )?;
        expect_error(
            kv.load_optimizer_states(path),
            "load_optimizer_states",
            is_unsupported,
            &[&name],
        )?;
        ensure!(
            !path.exists(),
            "save_optimizer_states created a file although unsupported"
        );
    }
    Ok(())
}
