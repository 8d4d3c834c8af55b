//! Data-parallel training of a linear model, on the embedded `local` store by default.
//!
//! Four simulated devices each hold a copy of the weights and a quarter of every mini-batch.
//! Each step, every device computes the gradient of the mean squared error on its shard and
//! pushes it; the store sums the four gradients and runs SGD on the stored weights; every
//! device then pulls the new weights. The loss printed after each epoch falls towards the
//! noise floor.
//!
//! Run: `cargo run -p kvstore-examples --bin train_linear`
//!
//! The first argument names another store. With a distributed one, every worker of the job
//! runs this program and takes `1 / num_workers` of each mini-batch (its four devices share
//! it); the servers sum the gradients of every device of every worker and run SGD:
//!
//! ```text
//! cargo build -p kvstore-cli -p kvstore-examples
//! target/debug/kvstore launch -n 2 -s 1 -- target/debug/train_linear dist_sync
//! ```
//!
//! A store that runs no optimizer (`byteps`, whose servers only sum, and `horovod`, which has
//! no servers) is used as Gluon's `Trainer` uses it with `update_on_kvstore=False`: rank 0's
//! initial weights are broadcast, every step all-reduces the gradients with `pushpull`, and
//! each worker runs the same SGD on its own copy of the weights:
//!
//! ```text
//! target/debug/kvstore launch -n 2 -s 0 -- target/debug/train_linear horovod
//! target/debug/kvstore launch -n 2 -s 1 -- target/debug/train_linear byteps
//! ```

use kvstore::prelude::*;
use kvstore::{Capability, Error, Key, OptimizerSpec};
use kvstore_optimizer::Updater;

const DEVICES: usize = 4;
const FEATURES: usize = 8;
const SAMPLES: usize = 2048;
const BATCH: usize = 128;
const EPOCHS: usize = 8;

/// A small deterministic generator (xorshift64*), so every run prints the same figures.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly normal: the sum of four uniforms, centred and scaled.
    fn normal(&mut self) -> f32 {
        ((0..4).map(|_| self.uniform()).sum::<f32>() - 2.0) * 1.7
    }
}

/// The data set: `y = x . true_w + true_b + noise`.
struct Data {
    x: Vec<[f32; FEATURES]>,
    y: Vec<f32>,
}

fn make_data(rng: &mut Rng) -> Data {
    let true_w: Vec<f32> = (0..FEATURES).map(|i| i as f32 - 3.5).collect();
    let true_b = 0.5;
    let x: Vec<[f32; FEATURES]> = (0..SAMPLES)
        .map(|_| std::array::from_fn(|_| rng.normal()))
        .collect();
    let y = x
        .iter()
        .map(|row| {
            row.iter().zip(&true_w).map(|(a, w)| a * w).sum::<f32>() + true_b + 0.1 * rng.normal()
        })
        .collect();
    Data { x, y }
}

fn predict(w: &[f32], b: f32, row: &[f32; FEATURES]) -> f32 {
    row.iter().zip(w).map(|(a, w)| a * w).sum::<f32>() + b
}

/// The summed (not averaged) gradients of the squared error over `rows`, as NDArrays.
fn gradients(
    data: &Data,
    rows: std::ops::Range<usize>,
    w: &[f32],
    b: f32,
) -> Result<(NDArray, NDArray)> {
    let mut gw = vec![0.0f32; FEATURES];
    let mut gb = 0.0f32;
    for i in rows {
        let err = predict(w, b, &data.x[i]) - data.y[i];
        for (g, a) in gw.iter_mut().zip(&data.x[i]) {
            *g += 2.0 * err * a;
        }
        gb += 2.0 * err;
    }
    Ok((
        NDArray::from_vec(&[FEATURES], gw)?,
        NDArray::from_vec(&[1], vec![gb])?,
    ))
}

fn loss(data: &Data, w: &[f32], b: f32) -> f32 {
    let total: f32 = (0..SAMPLES)
        .map(|i| (predict(w, b, &data.x[i]) - data.y[i]).powi(2))
        .sum();
    total / SAMPLES as f32
}

fn main() -> Result<()> {
    let mut rng = Rng(0x5eed_1234);
    let data = make_data(&mut rng);

    let store = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "local".to_string());
    let kv = create(&store)?;
    let (rank, workers) = (kv.rank(), kv.num_workers());
    if !BATCH.is_multiple_of(DEVICES * workers) {
        return Err(Error::InvalidArgument(format!(
            "a mini-batch of {BATCH} samples cannot be shared by {workers} workers of {DEVICES} devices"
        )));
    }
    // rescale_grad turns the summed gradient of a batch into its mean, as MXNet's Trainer does.
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.05)
        .with("momentum", 0.9)
        .with("rescale_grad", 1.0 / BATCH as f64);
    let initial_params = [
        NDArray::zeros(&[FEATURES], DType::F32),
        NDArray::zeros(&[1], DType::F32),
    ];
    // Each device's copy of the parameters: params[0][d] is device d's w, params[1][d] its b,
    // the list-of-lists layout MXNet uses for several keys with one array per device.
    let mut params: Vec<Vec<NDArray>> = vec![
        vec![NDArray::zeros(&[FEATURES], DType::F32); DEVICES],
        vec![NDArray::zeros(&[1], DType::F32); DEVICES],
    ];
    // Where the optimizer runs: in the store, or on each worker.
    let mut local_updater = if kv.is_capable(Capability::Optimizer) {
        kv.set_optimizer(&sgd)?;
        kv.init(&["w", "b"], &initial_params)?;
        None
    } else {
        // Every worker starts from rank 0's weights.
        kv.broadcast(&["w", "b"], &initial_params, &mut params)?;
        Some(Updater::from_spec(&sgd)?)
    };
    let initial = loss(&data, &[0.0; FEATURES], 0.0);
    println!(
        "store: {} ({DEVICES} devices), initial loss {initial:.4}",
        kv.type_name()
    );
    if workers > 1 {
        println!("worker {rank} of {workers}");
    }

    let shard = BATCH / (DEVICES * workers);
    let mut last = initial;
    for epoch in 1..=EPOCHS {
        for start in (0..SAMPLES).step_by(BATCH) {
            let mut grads: Vec<Vec<NDArray>> =
                vec![Vec::with_capacity(DEVICES), Vec::with_capacity(DEVICES)];
            for (d, (w, b)) in params[0].iter().zip(&params[1]).enumerate() {
                let w = w.to_vec::<f32>()?;
                let b = b.to_vec::<f32>()?[0];
                let lo = start + (rank * DEVICES + d) * shard;
                let (gw, gb) = gradients(&data, lo..lo + shard, &w, b)?;
                grads[0].push(gw);
                grads[1].push(gb);
            }
            match &mut local_updater {
                None => {
                    kv.push(&["w", "b"], &grads)?; // summed over devices, then SGD on the store
                    kv.pull(&["w", "b"], &mut params)?; // every device gets the new weights
                }
                Some(updater) => {
                    // The gradients summed over every device of every worker, then the same
                    // SGD step on every worker.
                    let mut summed = [
                        NDArray::zeros(&[FEATURES], DType::F32),
                        NDArray::zeros(&[1], DType::F32),
                    ];
                    kv.pushpull(&["w", "b"], &grads, &mut summed[..])?;
                    for ((name, grad), copies) in ["w", "b"].iter().zip(&summed).zip(&mut params) {
                        let (first, rest) = copies.split_first_mut().expect("DEVICES > 0");
                        updater.update(&Key::from(*name), grad, first)?;
                        for copy in rest {
                            copy.assign(first)?;
                        }
                    }
                }
            }
        }
        last = loss(
            &data,
            &params[0][0].to_vec::<f32>()?,
            params[1][0].to_vec::<f32>()?[0],
        );
        println!("epoch {epoch}: loss {last:.4}");
    }
    println!("trained: loss {initial:.4} -> {last:.4}");
    Ok(())
}
