//! Sparse logistic regression over a hashed feature space, as MXNet's sparse linear
//! classification example trains it: the weight is an embedding-like table of 100,000 rows
//! stored row-sparse in the store, and each step touches only the rows of its samples'
//! features.
//!
//! Each step, a worker `row_sparse_pull`s the rows its mini-batch uses, computes the gradient
//! of the logistic loss on those rows (a row-sparse array) and pushes it with the bias's
//! gradient; the store's lazy SGD updates only those rows. The loss and accuracy on held-out
//! samples are printed after each epoch, with the share of the table each step read.
//!
//! Run: `cargo run -p kvstore-examples --bin train_sparse`
//!
//! The first argument names another store, which must run the optimizer and serve
//! `row_sparse_pull` (`local`, `device`, the dist stores). With a distributed one, every
//! worker of the job runs this program and takes `1 / num_workers` of each mini-batch, and
//! only the rows a step uses cross the network. The table (100,000 elements) lives whole on
//! one server unless `MXNET_KVSTORE_BIGARRAY_BOUND` is lower; then every server keeps a slice
//! of its rows:
//!
//! ```text
//! cargo build -p kvstore-cli -p kvstore-examples
//! MXNET_KVSTORE_BIGARRAY_BOUND=10000 target/debug/kvstore launch -n 2 -s 2 -- \
//!     target/debug/train_sparse dist_sync
//! ```
//!
//! With `--dense-table` after the store's name, the table is stored dense, as Gluon's
//! `Embedding(sparse_grad=True)` keeps its weight: the gradients are still row-sparse (and
//! applied lazily, to the rows they hold), but each step pulls the whole table.

use std::collections::BTreeMap;

use kvstore::prelude::*;
use kvstore::{Capability, Error, OptimizerSpec};

/// Rows of the weight table: the hashed feature space.
const FEATURES: usize = 100_000;
/// Active features per sample.
const ACTIVE: usize = 12;
const SAMPLES: usize = 8192;
const HELD_OUT: usize = 1024;
const BATCH: usize = 256;
const EPOCHS: usize = 5;

/// A small deterministic generator (xorshift64*), so every worker builds the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// A feature id, frequent ones more likely (a rough power law, as hashed features are).
    fn feature(&mut self) -> usize {
        let u = self.uniform().max(1e-7);
        ((FEATURES as f32).powf(u) as usize - 1).min(FEATURES - 1)
    }
}

/// One sample: its active features (sorted, distinct) and its label, 0 or 1.
struct Sample {
    features: Vec<usize>,
    label: f32,
}

/// Samples labelled by a hidden linear model over the same features, with 5% of labels
/// flipped.
fn make_data(rng: &mut Rng, count: usize, truth: &[f32]) -> Vec<Sample> {
    (0..count)
        .map(|_| {
            let mut features: Vec<usize> = (0..ACTIVE).map(|_| rng.feature()).collect();
            features.sort_unstable();
            features.dedup();
            let score: f32 = features.iter().map(|&f| truth[f]).sum();
            let flipped = rng.uniform() < 0.05;
            let label = f32::from(u8::from((score > 0.0) != flipped));
            Sample { features, label }
        })
        .collect()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The weight rows a set of samples uses, sorted.
fn rows_of<'a>(samples: impl Iterator<Item = &'a Sample>) -> Vec<i64> {
    let mut rows: Vec<i64> = samples
        .flat_map(|s| s.features.iter().map(|&f| f as i64))
        .collect();
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// How the store keeps the weight table.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Table {
    /// Row-sparse, every row stored: a step `row_sparse_pull`s the rows it uses.
    RowSparse,
    /// Dense: a step pulls the whole table.
    Dense,
}

/// Pulls the rows `rows` of the weight table: their values, by row id.
fn pull_rows(kv: &dyn KVStoreBase, rows: &[i64], table: Table) -> Result<BTreeMap<i64, f32>> {
    if table == Table::Dense {
        let mut whole = NDArray::zeros(&[FEATURES, 1], DType::F32);
        kv.pull("weight", &mut whole)?;
        let values = whole.to_vec::<f32>()?;
        return Ok(rows.iter().map(|&r| (r, values[r as usize])).collect());
    }
    let ids = NDArray::from_vec(&[rows.len()], rows.to_vec())?;
    let mut out =
        NDArray::row_sparse(&[FEATURES, 1], vec![], &NDArray::zeros(&[0, 1], DType::F32))?;
    kv.row_sparse_pull("weight", &mut out, &ids)?;
    let pulled = out
        .as_row_sparse()
        .ok_or_else(|| Error::InvalidArgument("row_sparse_pull gave a dense array".into()))?;
    let values = NDArray::from_host(pulled.rows().clone()).to_vec::<f32>()?;
    Ok(pulled.indices().iter().copied().zip(values).collect())
}

/// The model's logit for sample `s`.
fn logit(s: &Sample, weights: &BTreeMap<i64, f32>, bias: f32) -> f32 {
    bias + s
        .features
        .iter()
        .map(|&f| weights[&(f as i64)])
        .sum::<f32>()
}

/// The summed gradients of the logistic loss over `samples`: the weight's as a row-sparse
/// array of the rows the samples use, and the bias's.
fn gradients(
    samples: &[Sample],
    weights: &BTreeMap<i64, f32>,
    bias: f32,
) -> Result<(NDArray, NDArray)> {
    let mut grad: BTreeMap<i64, f32> = BTreeMap::new();
    let mut grad_bias = 0.0f32;
    for s in samples {
        let error = sigmoid(logit(s, weights, bias)) - s.label;
        for &f in &s.features {
            *grad.entry(f as i64).or_default() += error;
        }
        grad_bias += error;
    }
    let rows: Vec<i64> = grad.keys().copied().collect();
    let values = NDArray::from_vec(&[rows.len(), 1], grad.into_values().collect())?;
    Ok((
        NDArray::row_sparse(&[FEATURES, 1], rows, &values)?,
        NDArray::from_vec(&[1], vec![grad_bias])?,
    ))
}

/// The mean logistic loss and the accuracy on `samples`.
fn evaluate(samples: &[Sample], weights: &BTreeMap<i64, f32>, bias: f32) -> (f32, f32) {
    let (mut loss, mut right) = (0.0f32, 0usize);
    for s in samples {
        let p = sigmoid(logit(s, weights, bias)).clamp(1e-7, 1.0 - 1e-7);
        loss -= s.label * p.ln() + (1.0 - s.label) * (1.0 - p).ln();
        right += usize::from((p > 0.5) == (s.label > 0.5));
    }
    (
        loss / samples.len() as f32,
        right as f32 / samples.len() as f32,
    )
}

fn main() -> Result<()> {
    let mut rng = Rng(0x5eed_5a55);
    // The hidden model: the frequent features carry the signal, the rare ones a little.
    let truth: Vec<f32> = (0..FEATURES)
        .map(|f| (rng.uniform() * 2.0 - 1.0) * if f < 2000 { 1.0 } else { 0.1 })
        .collect();
    let train = make_data(&mut rng, SAMPLES, &truth);
    let held_out = make_data(&mut rng, HELD_OUT, &truth);

    let store = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "local".to_string());
    let table_kind = match std::env::args().nth(2).as_deref() {
        None => Table::RowSparse,
        Some("--dense-table") => Table::Dense,
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "unknown option {other:?} (the only one is --dense-table)"
            )))
        }
    };
    let kv = create(&store)?;
    for needed in [Capability::Optimizer, Capability::RowSparse] {
        if !kv.is_capable(needed) {
            return Err(Error::InvalidArgument(format!(
                "store {store} cannot run this example: it needs a store that runs the \
                 optimizer and serves row_sparse_pull (local, device, dist_sync, dist_async, \
                 pslite_dist_sync)"
            )));
        }
    }
    let (rank, workers) = (kv.rank(), kv.num_workers());
    if !BATCH.is_multiple_of(workers) {
        return Err(Error::InvalidArgument(format!(
            "a mini-batch of {BATCH} samples cannot be shared by {workers} workers"
        )));
    }
    // rescale_grad turns the summed gradient of a batch into its mean; lazy_update (the
    // default) leaves the rows a step does not use alone, weight decay included.
    kv.set_optimizer(
        &OptimizerSpec::new("sgd")
            .with("learning_rate", 2.0)
            .with("momentum", 0.5)
            .with("wd", 1e-5)
            .with("rescale_grad", 1.0 / BATCH as f64),
    )?;
    // The table stores every row (MXNet's `weight.tostype('row_sparse')` of a zero array), or
    // is dense.
    let every_row: Vec<i64> = (0..FEATURES as i64).collect();
    let table = NDArray::zeros(&[FEATURES, 1], DType::F32);
    let table = match table_kind {
        Table::RowSparse => table.retain_rows(&every_row)?,
        Table::Dense => table,
    };
    kv.init(
        &["weight", "bias"],
        &[table, NDArray::zeros(&[1], DType::F32)],
    )?;
    let held_out_rows = rows_of(held_out.iter());
    let (initial, _) = evaluate(
        &held_out,
        &pull_rows(&*kv, &held_out_rows, table_kind)?,
        0.0,
    );
    let stored = match table_kind {
        Table::RowSparse => "row-sparse",
        Table::Dense => "dense",
    };
    println!(
        "store: {}, a {stored} table of {FEATURES} rows, initial held-out loss {initial:.4}",
        kv.type_name()
    );
    if workers > 1 {
        println!("worker {rank} of {workers}");
    }

    let shard = BATCH / workers;
    let mut bias = NDArray::zeros(&[1], DType::F32);
    let mut last = initial;
    for epoch in 1..=EPOCHS {
        let mut rows_read = 0;
        for start in (0..SAMPLES).step_by(BATCH) {
            let mine = &train[start + rank * shard..start + (rank + 1) * shard];
            let rows = rows_of(mine.iter());
            rows_read += rows.len();
            let weights = pull_rows(&*kv, &rows, table_kind)?;
            let (grad, grad_bias) = gradients(mine, &weights, bias.to_vec::<f32>()?[0])?;
            kv.push(&["weight", "bias"], &[grad, grad_bias])?;
            kv.pull("bias", &mut bias)?;
        }
        let weights = pull_rows(&*kv, &held_out_rows, table_kind)?;
        let (loss, accuracy) = evaluate(&held_out, &weights, bias.to_vec::<f32>()?[0]);
        last = loss;
        let steps = SAMPLES / BATCH;
        println!(
            "epoch {epoch}: held-out loss {loss:.4}, accuracy {:.1}%, {:.2}% of the table used per step",
            accuracy * 100.0,
            rows_read as f64 / steps as f64 / FEATURES as f64 * 100.0
        );
    }
    println!("trained: loss {initial:.4} -> {last:.4}");
    Ok(())
}
