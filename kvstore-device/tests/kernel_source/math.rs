//! The reduction and optimizer kernels ([`KERNELS`]) against the `local` store: the sum of a
//! push of 1 to 20 values (launched as [`sum_launches`] plans it), and several `sgd` and
//! `adam` steps, must equal what `local` stores for the same pushes bit for bit.

use std::path::Path;

use kvstore_base::{create, DType, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_device::gpu::{sum_launches, KERNELS};
use libtest_mimic::{Failed, Trial};

use crate::emulator::{self, f32s, grid_args, run, same, Input, Rng, SPECIAL_VALUES};

/// The driver. `argv`: op (`sum`, `sgd`, `adam`), blocks, threads, n, count (sources for
/// `sum`, steps otherwise). Buffers start at the offsets read first (0: 16-byte aligned, 1:
/// not); every output is checked for writes past its end.
///
/// - `sum`: offsets (count sources, then out); the launches (count, then head or -1 for the
///   output, first source, terms); the sources. Writes the output.
/// - `sgd`: offsets (w, g, mom); momentum, lr, wd, rescale, clip; has_mom, has_clip; the
///   initial weight; per step a gradient. Writes the weight and the momentum after each step.
/// - `adam`: offsets (w, g, mean, var); wd, rescale, clip, b1, b2, eps; has_clip; the initial
///   weight; per step lr and a gradient. Writes the weight, mean and var after each step.
const DRIVER: &str = r#"
static bool fail(const char* what) { fprintf(stderr, "%s\n", what); exit(3); return false; }
int main(int argc, char** argv) {
    if (argc != 6) { fprintf(stderr, "usage\n"); return 2; }
    const char* op = argv[1];
    unsigned blocks = (unsigned)atoi(argv[2]), threads = (unsigned)atoi(argv[3]);
    unsigned long long n = strtoull(argv[4], 0, 10);
    int count = atoi(argv[5]);
    if (!strcmp(op, "sum")) {
        std::vector<Buffer*> src;
        for (int k = 0; k < count; ++k) src.push_back(new Buffer(n, get_int()));
        Buffer out(n, get_int());
        int launches = get_int();
        std::vector<int> plan(3 * launches);
        for (int& v : plan) v = get_int();
        for (int k = 0; k < count; ++k) get(src[k]->data, 4 * n);
        for (int l = 0; l < launches; ++l) {
            int head = plan[3 * l], first = plan[3 * l + 1], terms = plan[3 * l + 2];
            const float* g[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int k = 0; k < terms; ++k) g[k] = src[first + k]->data;
            const float* h = head < 0 ? 0 : src[head]->data;
            launch(blocks, threads, [&] {
                sum_sources(out.data, h, head < 0, g[0], g[1], g[2], g[3], g[4], g[5], g[6],
                            g[7], terms, n);
            });
        }
        out.guards_intact() || fail("wrote past the output");
        put(out.data, 4 * n);
    } else if (!strcmp(op, "sgd")) {
        int ow = get_int(), og = get_int(), om = get_int();
        Buffer w(n, ow), g(n, og), mom(n, om);
        float momentum = get_float(), lr = get_float(), wd = get_float();
        float rescale = get_float(), clip = get_float();
        int has_mom = get_int(), has_clip = get_int();
        get(w.data, 4 * n);
        for (unsigned long long i = 0; i < n; ++i) mom.data[i] = 0.0f;
        for (int s = 0; s < count; ++s) {
            get(g.data, 4 * n);
            float* m = has_mom ? mom.data : 0;
            launch(blocks, threads, [&] {
                sgd_update(w.data, g.data, m, has_mom, momentum, lr, wd, rescale, has_clip, clip,
                           n);
            });
            (w.guards_intact() && mom.guards_intact()) || fail("wrote past a buffer");
            put(w.data, 4 * n);
            put(mom.data, 4 * n);
        }
    } else if (!strcmp(op, "adam")) {
        int ow = get_int(), og = get_int(), om = get_int(), ov = get_int();
        Buffer w(n, ow), g(n, og), mean(n, om), var(n, ov);
        float wd = get_float(), rescale = get_float(), clip = get_float();
        float b1 = get_float(), b2 = get_float(), eps = get_float();
        int has_clip = get_int();
        get(w.data, 4 * n);
        for (unsigned long long i = 0; i < n; ++i) { mean.data[i] = 0.0f; var.data[i] = 0.0f; }
        for (int s = 0; s < count; ++s) {
            float lr = get_float();
            get(g.data, 4 * n);
            launch(blocks, threads, [&] {
                adam_update(w.data, g.data, mean.data, var.data, lr, wd, rescale, has_clip, clip,
                            b1, b2, eps, n);
            });
            (w.guards_intact() && mean.guards_intact() && var.guards_intact()) ||
                fail("wrote past a buffer");
            put(w.data, 4 * n);
            put(mean.data, 4 * n);
            put(var.data, 4 * n);
        }
    } else {
        return fail("unknown op");
    }
    fflush(stdout);
    return 0;
}
"#;

const LENGTHS: &[usize] = &[1, 3, 4, 5, 8, 13, 100, 1001];

/// Values of `(-4 * scale, 4 * scale)`, with special values mixed in when `specials` is set.
fn values(rng: &mut Rng, n: usize, scale: f32, specials: bool) -> Vec<f32> {
    (0..n)
        .map(|i| match specials && i % 5 == 3 {
            true => SPECIAL_VALUES[(i / 5) % SPECIAL_VALUES.len()],
            // Full 24-bit significands over a range of magnitudes, so that sums round
            // differently in another association order.
            false => {
                let e = ((rng.next() + 1.0) * 6.0) as i32 - 6;
                rng.next() * scale / 3.0 * 2f32.powi(e)
            }
        })
        .collect()
}

fn host(v: &[f32]) -> Result<NDArray, Failed> {
    Ok(NDArray::from_vec(&[v.len()], v.to_vec())?)
}

fn pull(store: &dyn KVStoreBase, n: usize) -> Result<Vec<f32>, Failed> {
    let mut out = NDArray::zeros(&[n], DType::F32);
    store.pull("w", &mut out)?;
    Ok(out.to_vec::<f32>()?)
}

/// The sum of `count` sources: every length, aligned, and with one misaligned buffer (a
/// source, then the output), against a push of the same values to `local`.
fn sum_matches_local(exe: &Path, count: usize) -> Result<(), Failed> {
    let mut rng = Rng(0x5EED_0000 + count as u64);
    let plan = sum_launches(count);
    for (c, &n) in LENGTHS.iter().enumerate() {
        for misaligned in [None, Some(count / 2), Some(count)] {
            let srcs: Vec<Vec<f32>> = (0..count)
                .map(|k| values(&mut rng, n, 4.0, k % 3 == 1))
                .collect();
            let mut input = Input::default();
            let offsets: Vec<i32> = (0..=count)
                .map(|k| i32::from(misaligned == Some(k)))
                .collect();
            input.ints(&offsets).ints(&[plan.len() as i32]);
            for launch in &plan {
                let head = launch.head.map_or(-1, |h| h as i32);
                input.ints(&[head, launch.group.start as i32, launch.group.len() as i32]);
            }
            for s in &srcs {
                input.floats(s);
            }
            let [blocks, threads] = grid_args(c);
            let args = [
                "sum".into(),
                blocks,
                threads,
                n.to_string(),
                count.to_string(),
            ];
            let got = f32s(&run(exe, &args, &input.0)?);

            let local = create("local")?;
            local.init("w", &NDArray::zeros(&[n], DType::F32))?;
            let hosts = srcs
                .iter()
                .map(|s| host(s))
                .collect::<Result<Vec<_>, _>>()?;
            local.push("w", &hosts[..])?;
            let want = pull(&*local, n)?;
            if let Some(i) = same(&got, &want) {
                return Err(format!(
                    "{count} sources, n={n}, misaligned {misaligned:?}: element {i}: \
                     kernel {} vs local {}",
                    got[i], want[i]
                )
                .into());
            }
        }
    }
    Ok(())
}

const STEPS: usize = 3;

/// `STEPS` sgd steps against `local` with the same optimizer: aligned and misaligned.
fn sgd_matches_local(exe: &Path, spec: OptimizerSpec) -> Result<(), Failed> {
    let p = |name: &str| spec.params.get(name).and_then(|v| v.as_f64());
    let momentum = p("momentum").unwrap_or(0.0);
    let lr = p("learning_rate").unwrap_or(0.01);
    let wd = p("wd").unwrap_or(0.0);
    let rescale = p("rescale_grad").unwrap_or(1.0);
    let clip = p("clip_gradient").filter(|c| *c > 0.0);
    let mut rng = Rng(0xC0FFEE);
    for (c, &n) in LENGTHS.iter().enumerate() {
        for offsets in [[0, 0, 0], [1, 0, 0], [0, 0, 1]] {
            let w0 = values(&mut rng, n, 2.0, false);
            let grads: Vec<Vec<f32>> = (0..STEPS)
                .map(|s| values(&mut rng, n, 1.5, s == 1))
                .collect();
            let mut input = Input::default();
            input.ints(&offsets);
            input.floats(&[
                momentum as f32,
                lr as f32,
                wd as f32,
                rescale as f32,
                clip.unwrap_or(0.0) as f32,
            ]);
            input.ints(&[i32::from(momentum != 0.0), i32::from(clip.is_some())]);
            input.floats(&w0);
            for g in &grads {
                input.floats(g);
            }
            let what = format!("n={n} {offsets:?}");
            emulate_steps(exe, "sgd", c, &input, 2, &spec, &w0, &grads, &what)?;
        }
    }
    Ok(())
}

/// `STEPS` adam steps against `local`: the bias-corrected rate of step `t` as the GPU
/// optimizer computes it.
fn adam_matches_local(exe: &Path, spec: OptimizerSpec) -> Result<(), Failed> {
    let p = |name: &str| spec.params.get(name).and_then(|v| v.as_f64());
    let lr = p("learning_rate").unwrap_or(0.001);
    let wd = p("wd").unwrap_or(0.0);
    let rescale = p("rescale_grad").unwrap_or(1.0);
    let clip = p("clip_gradient").filter(|c| *c > 0.0);
    let (b1, b2, eps) = (
        p("beta1").unwrap_or(0.9),
        p("beta2").unwrap_or(0.999),
        p("epsilon").unwrap_or(1e-8),
    );
    let mut rng = Rng(0xADA4);
    for (c, &n) in LENGTHS.iter().enumerate() {
        for offsets in [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]] {
            let w0 = values(&mut rng, n, 2.0, false);
            let grads: Vec<Vec<f32>> = (0..STEPS)
                .map(|s| values(&mut rng, n, 1.5, s == 2))
                .collect();
            let mut input = Input::default();
            input.ints(&offsets);
            let f = |x: f64| x as f32;
            input.floats(&[
                f(wd),
                f(rescale),
                f(clip.unwrap_or(0.0)),
                f(b1),
                f(b2),
                f(eps),
            ]);
            input.ints(&[i32::from(clip.is_some())]).floats(&w0);
            for (s, g) in grads.iter().enumerate() {
                let t = (s + 1) as f64;
                let lr_t = lr * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t));
                input.floats(&[f(lr_t)]).floats(g);
            }
            let what = format!("n={n} {offsets:?}");
            emulate_steps(exe, "adam", c, &input, 3, &spec, &w0, &grads, &what)?;
        }
    }
    Ok(())
}

/// Runs `op` on grid `c` with `input` and compares the weights it wrote after each step with
/// `local`'s ([`compare_steps`]).
#[allow(clippy::too_many_arguments)]
fn emulate_steps(
    exe: &Path,
    op: &str,
    c: usize,
    input: &Input,
    arrays: usize,
    spec: &OptimizerSpec,
    w0: &[f32],
    grads: &[Vec<f32>],
    what: &str,
) -> Result<(), Failed> {
    let [blocks, threads] = grid_args(c);
    let n = w0.len();
    let args = [
        op.into(),
        blocks,
        threads,
        n.to_string(),
        grads.len().to_string(),
    ];
    let out = f32s(&run(exe, &args, &input.0)?);
    compare_steps(&out, arrays, n, spec, w0, grads, what)
}

/// The weights the emulator wrote after each step (the first of `arrays` arrays per step)
/// against `local`'s after the same pushes.
fn compare_steps(
    out: &[f32],
    arrays: usize,
    n: usize,
    spec: &OptimizerSpec,
    w0: &[f32],
    grads: &[Vec<f32>],
    what: &str,
) -> Result<(), Failed> {
    if out.len() != arrays * n * grads.len() {
        return Err(format!("{what}: the emulator wrote {} values", out.len()).into());
    }
    let local = create("local")?;
    local.init("w", &host(w0)?)?;
    local.set_optimizer(spec)?;
    for (s, (g, step)) in grads.iter().zip(out.chunks_exact(arrays * n)).enumerate() {
        local.push("w", &host(g)?)?;
        let want = pull(&*local, n)?;
        let got = &step[..n];
        if let Some(i) = same(got, &want) {
            return Err(format!(
                "{} {what} step {}: element {i}: kernel {} vs local {} (weight {}, grad {})",
                spec.name,
                s + 1,
                got[i],
                want[i],
                w0[i],
                g[i]
            )
            .into());
        }
    }
    Ok(())
}

/// The checks, sharing one build of the emulator.
pub fn trials() -> Vec<Trial> {
    let emulator = emulator::build("math", KERNELS, DRIVER);
    let mut trials = Vec::new();
    for count in [1, 2, 3, 4, 5, 8, 9, 10, 13, 17, 20] {
        let name = format!("emulated::sum_of_{count}_values_equals_local");
        trials.push(crate::emulated_trial(name, &emulator, move |exe| {
            sum_matches_local(exe, count)
        }));
    }
    let sgd = [
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
                .with("clip_gradient", 0.25),
        ),
    ];
    for (name, spec) in sgd {
        let name = format!("emulated::{name}_steps_equal_local");
        trials.push(crate::emulated_trial(name, &emulator, move |exe| {
            sgd_matches_local(exe, spec.clone())
        }));
    }
    let adam = [
        ("adam_defaults", OptimizerSpec::new("adam")),
        (
            "adam_wd_clip",
            OptimizerSpec::new("adam")
                .with("learning_rate", 0.01)
                .with("wd", 0.1)
                .with("clip_gradient", 0.5)
                .with("beta1", 0.8),
        ),
    ];
    for (name, spec) in adam {
        let name = format!("emulated::{name}_steps_equal_local");
        trials.push(crate::emulated_trial(name, &emulator, move |exe| {
            adam_matches_local(exe, spec.clone())
        }));
    }
    trials
}
