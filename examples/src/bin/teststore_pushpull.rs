//! `pushpull` on `teststore`, MXNet's reference store: per-device values in, their sum out.
//!
//! Run it with `cargo run -p kvstore-examples --bin teststore_pushpull`.
#![deny(missing_docs)]

use std::process::ExitCode;

use kvstore::prelude::*;

/// Number of simulated devices (GPUs).
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
    // The facade's `test` feature links `teststore`; it is found by name like any store.
    let kv = kvstore::create("teststore")?;
    println!("created {:?}", kv.type_name());

    // Device d contributes [d + 1, d + 1, d + 1] for the key "bias".
    let values: Vec<NDArray> = (0..DEVICES)
        .map(|d| NDArray::full(&[3], (d + 1) as f64, DType::F32))
        .collect();
    for (device, value) in values.iter().enumerate() {
        println!("device {device}: pushes {:?}", value.to_vec::<f32>()?);
    }

    // One call pushes every device's value and pulls the sum into every device's output.
    let mut outs = vec![NDArray::zeros(&[3], DType::F32); DEVICES];
    kv.pushpull("bias", &values, &mut outs)?;

    for (device, out) in outs.iter().enumerate() {
        println!("device {device}: pulls {:?}", out.to_vec::<f32>()?);
    }
    let sum = outs[0].to_vec::<f32>()?;
    println!("teststore: pushpull of {DEVICES} device values gave {sum:?} on every device");
    Ok(())
}
