//! The row kernels ([`ROW_KERNELS`]) against the host: the gather of a row-sparse pull
//! against [`NDArray::retain_rows`], and the scatter of a row-sparse push (the first value's
//! rows written, the others' added, as `DeviceStore::push_gpu_row_sparse` launches them)
//! against a push of the same row-sparse values to the `local` store.

use std::path::Path;

use kvstore_base::{create, DType, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_device::gpu::KERNELS;
use kvstore_device::sparse::ROW_KERNELS;
use libtest_mimic::{Failed, Trial};

use crate::emulator::{self, f32s, grid_args, run, same, Input, Rng};

/// The driver. `argv`: op (`gather`, `scatter`, `sgd_rows`, `adam_rows`), blocks, threads,
/// rows, row_len.
///
/// - `gather`: the table (rows x row_len); the count of ids, the ids. Writes the gathered rows.
/// - `scatter`: the count of values; per value the count of ids, the ids, the rows. Writes
///   the table after scattering them into zeros, the first written, the others added.
/// - `sgd_rows`, `adam_rows`: momentum (adam: beta1), beta2, epsilon, wd, rescale, clip;
///   has_mom, has_clip; the table (the weight; the states start at zero); the count of steps,
///   per step its learning rate, the count of ids, the ids, the gradient's rows. Writes the
///   weight after the lazy steps.
const DRIVER: &str = r#"
int main(int argc, char** argv) {
    if (argc != 6) { fprintf(stderr, "usage\n"); return 2; }
    const char* op = argv[1];
    unsigned blocks = (unsigned)atoi(argv[2]), threads = (unsigned)atoi(argv[3]);
    unsigned long long rows = strtoull(argv[4], 0, 10), row_len = strtoull(argv[5], 0, 10);
    Buffer table(rows * row_len, 0);
    if (!strcmp(op, "gather")) {
        get(table.data, 4 * rows * row_len);
        int count = get_int();
        std::vector<long long> ids(count + 1);
        for (int i = 0; i < count; ++i) ids[i] = get_int();
        Buffer out(count * row_len, 0);
        launch(blocks, threads, [&] { gather_rows(out.data, table.data, ids.data(), count, row_len); });
        if (!out.guards_intact()) { fprintf(stderr, "wrote past the output\n"); return 3; }
        put(out.data, 4 * count * row_len);
    } else if (!strcmp(op, "scatter")) {
        for (unsigned long long i = 0; i < rows * row_len; ++i) table.data[i] = 0.0f;
        int values = get_int();
        for (int k = 0; k < values; ++k) {
            int count = get_int();
            std::vector<long long> ids(count + 1);
            for (int i = 0; i < count; ++i) ids[i] = get_int();
            Buffer src(count * row_len, 0);
            get(src.data, 4 * count * row_len);
            launch(blocks, threads, [&] {
                scatter_rows(table.data, src.data, ids.data(), count, row_len, k > 0);
            });
        }
        if (!table.guards_intact()) { fprintf(stderr, "wrote past the table\n"); return 3; }
        put(table.data, 4 * rows * row_len);
    } else if (!strcmp(op, "sgd_rows") || !strcmp(op, "adam_rows")) {
        float hyper[6];
        for (int i = 0; i < 6; ++i) hyper[i] = get_float();
        int has_mom = get_int(), has_clip = get_int();
        get(table.data, 4 * rows * row_len);
        Buffer s1(rows * row_len, 0), s2(rows * row_len, 0);
        for (unsigned long long i = 0; i < rows * row_len; ++i) s1.data[i] = s2.data[i] = 0.0f;
        int steps = get_int();
        for (int k = 0; k < steps; ++k) {
            float lr = get_float();
            int count = get_int();
            std::vector<long long> ids(count + 1);
            for (int i = 0; i < count; ++i) ids[i] = get_int();
            Buffer grad(count * row_len, 0);
            get(grad.data, 4 * count * row_len);
            launch(blocks, threads, [&] {
                if (op[0] == 's') {
                    sgd_rows_update(table.data, grad.data, ids.data(), has_mom ? s1.data : 0,
                                    has_mom, hyper[0], lr, hyper[3], hyper[4], has_clip,
                                    hyper[5], count, row_len);
                } else {
                    adam_rows_update(table.data, grad.data, ids.data(), s1.data, s2.data, lr,
                                     hyper[3], hyper[4], has_clip, hyper[5], hyper[0],
                                     hyper[1], hyper[2], count, row_len);
                }
            });
        }
        if (!table.guards_intact() || !s1.guards_intact() || !s2.guards_intact()) {
            fprintf(stderr, "wrote past a buffer\n");
            return 3;
        }
        put(table.data, 4 * rows * row_len);
    } else {
        fprintf(stderr, "unknown op\n");
        return 2;
    }
    fflush(stdout);
    return 0;
}
"#;

/// Table shapes: (rows, row_len), 1-d tables (row_len 1) included.
const SHAPES: &[(usize, usize)] = &[(1, 1), (5, 1), (7, 3), (16, 4), (33, 17)];

/// Sorted distinct ids of `0..rows`, each kept with probability about `p`.
fn ids(rng: &mut Rng, rows: usize, p: f32) -> Vec<i64> {
    (0..rows as i64)
        .filter(|_| (rng.next() + 1.0) / 2.0 < p)
        .collect()
}

fn floats(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 7 {
            3 => -0.0,
            _ => rng.next() * 3.0 / 7.0,
        })
        .collect()
}

fn ints(ids: &[i64]) -> Vec<i32> {
    ids.iter().map(|&i| i as i32).collect()
}

fn args(op: &str, c: usize, rows: usize, row_len: usize) -> Vec<String> {
    let [blocks, threads] = grid_args(c);
    vec![
        op.into(),
        blocks,
        threads,
        rows.to_string(),
        row_len.to_string(),
    ]
}

fn gather_matches_retain_rows(exe: &Path) -> Result<(), Failed> {
    let mut rng = Rng(0x6A7E);
    for (c, &(rows, row_len)) in SHAPES.iter().enumerate() {
        for p in [0.0, 0.3, 1.0] {
            let table = floats(&mut rng, rows * row_len);
            let picked = ids(&mut rng, rows, p);
            let mut input = Input::default();
            input
                .floats(&table)
                .ints(&[picked.len() as i32])
                .ints(&ints(&picked));
            let got = f32s(&run(exe, &args("gather", c, rows, row_len), &input.0)?);
            let host = NDArray::from_vec(&[rows, row_len], table)?;
            let want = host.retain_rows(&picked)?;
            let want = NDArray::from_host(want.as_row_sparse().expect("row-sparse").rows().clone())
                .to_vec::<f32>()?;
            if let Some(i) = same(&got, &want) {
                return Err(format!("[{rows}, {row_len}] ids {picked:?}: element {i}").into());
            }
        }
    }
    Ok(())
}

fn scatter_matches_local(exe: &Path, values: usize) -> Result<(), Failed> {
    let mut rng = Rng(0x5CA7 + values as u64);
    for (c, &(rows, row_len)) in SHAPES.iter().enumerate() {
        let mut input = Input::default();
        input.ints(&[values as i32]);
        let mut pushed = Vec::new();
        for k in 0..values {
            let held = ids(&mut rng, rows, if k == 1 { 0.0 } else { 0.5 });
            let data = floats(&mut rng, held.len() * row_len);
            input
                .ints(&[held.len() as i32])
                .ints(&ints(&held))
                .floats(&data);
            let rows_array = NDArray::from_vec(&[held.len(), row_len], data)?;
            pushed.push(NDArray::row_sparse(&[rows, row_len], held, &rows_array)?);
        }
        let got = f32s(&run(exe, &args("scatter", c, rows, row_len), &input.0)?);

        let local = create("local")?;
        let empty = NDArray::row_sparse(
            &[rows, row_len],
            Vec::new(),
            &NDArray::zeros(&[0, row_len], DType::F32),
        )?;
        local.init("w", &empty)?;
        local.push("w", &pushed[..])?;
        let mut dense = NDArray::zeros(&[rows, row_len], DType::F32);
        local.pull("w", &mut dense)?;
        let want = dense.to_vec::<f32>()?;
        // Equal values; the sign of a zero may differ: `local` drops the rows of a row-sparse
        // sum that are all zeros (MXNet's cast to row_sparse), so its -0.0 reads back as 0.0.
        let differs = got.len() != want.len()
            || got
                .iter()
                .zip(&want)
                .any(|(g, w)| g != w && !(g.is_nan() && w.is_nan()));
        if differs {
            let i = got.iter().zip(&want).position(|(g, w)| g != w).unwrap_or(0);
            return Err(format!(
                "{values} values into [{rows}, {row_len}]: element {i}: kernel {} vs local {}",
                got.get(i).copied().unwrap_or(f32::NAN),
                want.get(i).copied().unwrap_or(f32::NAN)
            )
            .into());
        }
    }
    Ok(())
}

/// Steps of a lazy optimizer check.
const LAZY_STEPS: usize = 4;

/// `LAZY_STEPS` lazy steps of `spec` (`sgd` or `adam`) on a row-sparse weight storing every
/// row, each with a gradient of a few rows (one without rows), against `local` updating the
/// same weight with the same gradients (its lazy update, as MXNet's).
fn lazy_steps_match_local(exe: &Path, spec: OptimizerSpec) -> Result<(), Failed> {
    let p = |name: &str| spec.params.get(name).and_then(|v| v.as_f64());
    let adam = spec.name == "adam";
    let momentum = p("momentum").unwrap_or(0.0);
    let (b1, b2, eps) = (
        p("beta1").unwrap_or(0.9),
        p("beta2").unwrap_or(0.999),
        p("epsilon").unwrap_or(1e-8),
    );
    let lr = p("learning_rate").unwrap_or(if adam { 0.001 } else { 0.01 });
    let clip = p("clip_gradient").filter(|c| *c > 0.0);
    let mut rng = Rng(0x1A2E + u64::from(adam));
    for (c, &(rows, row_len)) in SHAPES.iter().enumerate() {
        let w0 = floats(&mut rng, rows * row_len);
        let mut input = Input::default();
        input.floats(&[
            if adam { b1 } else { momentum.max(0.0) } as f32,
            b2 as f32,
            eps as f32,
            p("wd").unwrap_or(0.0) as f32,
            p("rescale_grad").unwrap_or(1.0) as f32,
            clip.unwrap_or(0.0) as f32,
        ]);
        input.ints(&[i32::from(momentum != 0.0), i32::from(clip.is_some())]);
        input.floats(&w0).ints(&[LAZY_STEPS as i32]);
        let every_row: Vec<i64> = (0..rows as i64).collect();
        let weight = NDArray::from_vec(&[rows, row_len], w0)?;
        let local = create("local")?;
        local.init(
            "w",
            &NDArray::row_sparse(&[rows, row_len], every_row, &weight)?,
        )?;
        local.set_optimizer(&spec)?;
        for step in 1..=LAZY_STEPS {
            let held = ids(&mut rng, rows, if step == 2 { 0.0 } else { 0.5 });
            let grad = floats(&mut rng, held.len() * row_len);
            // The rate the GPU optimizer passes for update `step` (adam: bias-corrected).
            let t = step as f64;
            let rate = if adam {
                lr * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t))
            } else {
                lr
            };
            input
                .floats(&[rate as f32])
                .ints(&[held.len() as i32])
                .ints(&ints(&held))
                .floats(&grad);
            let rows_array = NDArray::from_vec(&[held.len(), row_len], grad)?;
            local.push(
                "w",
                &NDArray::row_sparse(&[rows, row_len], held, &rows_array)?,
            )?;
        }
        let op = if adam { "adam_rows" } else { "sgd_rows" };
        let got = f32s(&run(exe, &args(op, c, rows, row_len), &input.0)?);
        let mut want = NDArray::zeros(&[rows, row_len], DType::F32);
        local.pull("w", &mut want)?;
        let want = want.to_vec::<f32>()?;
        if let Some(i) = same(&got, &want) {
            return Err(format!(
                "{} on [{rows}, {row_len}]: element {i}: kernel {} vs local {}",
                spec.name,
                got.get(i).copied().unwrap_or(f32::NAN),
                want.get(i).copied().unwrap_or(f32::NAN)
            )
            .into());
        }
    }
    Ok(())
}

/// The checks, sharing one build of the emulator.
pub fn trials() -> Vec<Trial> {
    let emulator = emulator::build("rows", &format!("{KERNELS}\n{ROW_KERNELS}"), DRIVER);
    let mut trials = vec![crate::emulated_trial(
        "emulated::gather_rows_equals_retain_rows".into(),
        &emulator,
        gather_matches_retain_rows,
    )];
    for values in [1, 2, 3, 5] {
        trials.push(crate::emulated_trial(
            format!("emulated::scatter_of_{values}_row_sparse_values_equals_local"),
            &emulator,
            move |exe| scatter_matches_local(exe, values),
        ));
    }
    let lazy = [
        (
            "sgd_momentum_wd_rescale",
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("momentum", 0.9)
                .with("wd", 0.01)
                .with("rescale_grad", 0.5),
        ),
        (
            "sgd_clipped_without_momentum",
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("wd", 0.05)
                .with("clip_gradient", 0.1),
        ),
        (
            "sgd_clipped_with_momentum",
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("momentum", 0.5)
                .with("wd", 0.05)
                .with("clip_gradient", 0.1),
        ),
        (
            // MXNet keeps a momentum state, whose momentum counts as 0.
            "sgd_negative_momentum",
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("momentum", -0.5)
                .with("wd", 0.05),
        ),
        (
            "sgd_without_momentum",
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.2)
                .with("wd", 0.01),
        ),
        ("adam_defaults", OptimizerSpec::new("adam")),
        (
            // The clip (after weight decay, as MXNet 1.x) binds for most elements.
            "adam_wd_clip",
            OptimizerSpec::new("adam")
                .with("learning_rate", 0.01)
                .with("wd", 0.5)
                .with("clip_gradient", 0.1)
                .with("beta1", 0.8),
        ),
    ];
    for (name, spec) in lazy {
        trials.push(crate::emulated_trial(
            format!("emulated::lazy_{name}_row_steps_equal_local"),
            &emulator,
            move |exe| lazy_steps_match_local(exe, spec.clone()),
        ));
    }
    trials
}
