//! Times one `Updater::update` step on a 16 MiB weight, next to a plain in-place loop doing
//! the same arithmetic on the same kind of buffers.
//!
//! ```text
//! cargo run --release -p kvstore-optimizer --example step_speed [-- STEPS]
//! ```

use std::hint::black_box;
use std::time::Instant;

use kvstore_base::{DType, Key, NDArray, OptimizerSpec};
use kvstore_optimizer::Updater;

/// Bytes of the weight: 16 MiB.
const BYTES: usize = 16 << 20;

/// The median and the minimum of `steps` runs of `f`, in milliseconds (after 2 warm-up runs).
fn time(steps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    f();
    let mut ms: Vec<f64> = (0..steps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[0])
}

fn report(what: &str, (median, min): (f64, f64)) {
    println!("{what:<44} median {median:8.2} ms   min {min:8.2} ms");
}

fn values(n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|i| ((i % 1000) as f64 / 1000.0 - 0.5) * scale)
        .collect()
}

fn updater_step(steps: usize, spec: &OptimizerSpec, dtype: DType) -> (f64, f64) {
    let n = BYTES / dtype.size_of();
    let mut up = Updater::from_spec(spec).unwrap();
    let mut w = NDArray::from_vec(&[n], values(n, 2.0))
        .unwrap()
        .astype(dtype);
    let g = NDArray::from_vec(&[n], values(n, 1e-3))
        .unwrap()
        .astype(dtype);
    let key = Key::from(0);
    time(steps, || {
        up.update(&key, black_box(&g), black_box(&mut w)).unwrap();
    })
}

/// The sgd-momentum arithmetic of the updater (wd 0, rescale 1, no clipping), in place.
fn plain_sgd_mom(steps: usize) -> (f64, f64) {
    let n = BYTES / 4;
    let mut w: Vec<f32> = values(n, 2.0).into_iter().map(|x| x as f32).collect();
    let g: Vec<f32> = values(n, 1e-3).into_iter().map(|x| x as f32).collect();
    let mut m = vec![0f32; n];
    let (mu, lr, wd, rescale) = (0.9f32, 0.1f32, 0.0f32, 1.0f32);
    time(steps, || {
        let (w, g, m) = (black_box(&mut w), black_box(&g), black_box(&mut m));
        for ((w, &g), m) in w.iter_mut().zip(g.iter()).zip(m.iter_mut()) {
            *m = mu * *m - lr * wd * *w - lr * rescale * g;
            *w += *m;
        }
    })
}

/// Adam's arithmetic (no wd, no clipping), in place.
fn plain_adam(steps: usize) -> (f64, f64) {
    let n = BYTES / 4;
    let mut w: Vec<f32> = values(n, 2.0).into_iter().map(|x| x as f32).collect();
    let g: Vec<f32> = values(n, 1e-3).into_iter().map(|x| x as f32).collect();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let (b1, b2, eps, lr) = (0.9f32, 0.999f32, 1e-8f32, 1e-3f32);
    time(steps, || {
        let (w, g) = (black_box(&mut w), black_box(&g));
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *w -= lr * *m / (v.sqrt() + eps);
        }
    })
}

fn main() {
    let steps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("STEPS is a number"))
        .unwrap_or(20);
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9);
    let adam = OptimizerSpec::new("adam").with("learning_rate", 1e-3);
    println!("16 MiB weight, {steps} timed steps each");
    report(
        "plain in-place loop, sgd-momentum f32",
        plain_sgd_mom(steps),
    );
    report(
        "updater sgd-momentum f32",
        updater_step(steps, &sgd, DType::F32),
    );
    report("plain in-place loop, adam f32", plain_adam(steps));
    report("updater adam f32", updater_step(steps, &adam, DType::F32));
    report(
        "updater sgd-momentum f64",
        updater_step(steps, &sgd, DType::F64),
    );
    report(
        "updater sgd-momentum f16",
        updater_step(steps, &sgd, DType::F16),
    );
    report("updater adam f16", updater_step(steps, &adam, DType::F16));
    report(
        "updater sgd-momentum bf16",
        updater_step(steps, &sgd, DType::BF16),
    );
    let lamb = OptimizerSpec::new("lamb").with("learning_rate", 1e-3);
    report("updater lamb f32", updater_step(steps, &lamb, DType::F32));
    report("updater lamb f64", updater_step(steps, &lamb, DType::F64));
    let mp = |s: &OptimizerSpec| s.clone().with("multi_precision", true);
    report(
        "updater sgd-momentum f16 multi_precision",
        updater_step(steps, &mp(&sgd), DType::F16),
    );
    report(
        "updater adam f16 multi_precision",
        updater_step(steps, &mp(&adam), DType::F16),
    );
}
