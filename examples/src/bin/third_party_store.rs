//! A store from a third-party crate, reached by name only.
//!
//! `my-kvstore` is an ordinary library crate that depends on `kvstore-base` and registers its
//! store as `mykvstore`. This program links the crate and never names the store's type: it
//! asks the registry for the store by name, exactly as it would for a built-in backend.
//!
//! Run it with `cargo run -p kvstore-examples --bin third_party_store`.
#![deny(missing_docs)]

use std::process::ExitCode;

use kvstore::prelude::*;
// Linking the crate is what registers its store; nothing from it is used directly.
use my_kvstore as _;

/// Number of simulated devices (GPUs) of the data-parallel demo.
const DEVICES: usize = 4;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // Every store this program links: the facade's defaults (`local`, `teststore`) and the
    // third-party `mykvstore`, each with what it says it can do.
    println!("registered stores:");
    for info in kvstore::registered() {
        let capabilities = match &info.capabilities {
            Ok(caps) if caps.is_empty() => "none".to_string(),
            Ok(caps) => caps.iter().map(|c| c.name()).collect::<Vec<_>>().join(", "),
            Err(reason) => format!("unknown ({reason})"),
        };
        println!("  {:<12} {capabilities}", info.name);
    }

    // Names are case-insensitive: the type is `MyKVStore`, the registered name `mykvstore`.
    let kv = kvstore::create("MyKVStore")?;
    println!(
        "created {:?}: rank {} of {} worker(s), init/push/pull: {}",
        kv.type_name(),
        kv.rank(),
        kv.num_workers(),
        kv.is_capable(Capability::InitPushPull)
    );

    // One weight, initialised once.
    let shape = [2, 3];
    kv.init("weight", &NDArray::zeros(&shape, DType::F32))?;

    // Each device computed a gradient; device d's holds (d + 1) * [1, 2, 3, 4, 5, 6].
    let gradients = (0..DEVICES)
        .map(|d| {
            let data = (1..=6).map(|i| ((d + 1) * i) as f32).collect();
            NDArray::from_vec(&shape, data)
        })
        .collect::<Result<Vec<_>>>()?;
    // One push with every device's gradient: the store sums them and keeps the sum.
    kv.push("weight", &gradients)?;

    // Every device pulls the result into its own copy of the weight.
    let mut replicas = vec![NDArray::zeros(&shape, DType::F32); DEVICES];
    kv.pull("weight", &mut replicas)?;
    for (device, replica) in replicas.iter().enumerate() {
        println!("device {device}: weight = {:?}", replica.to_vec::<f32>()?);
    }

    let pulled = replicas[0].to_vec::<f32>()?;
    println!("mykvstore: pulled {pulled:?} = sum of {DEVICES} device gradients");
    Ok(())
}
