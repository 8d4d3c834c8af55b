//! Checks that need several workers of one job at once, for distributed stores (`dist_sync`,
//! `dist_async`; later `byteps`, `horovod`).
//!
//! A [`MultiWorkerFactory`] builds the N workers of a fresh job. Each [`MultiCheck`] is given a
//! [`Job`] (the factory, N and the store's [`Semantics`]), builds its workers and runs each
//! worker's part on a thread of its own with [`on_each_worker`], which waits at most
//! [`WORKER_DEADLINE`]: a worker that hangs fails the check instead of hanging the suite.
//! [`multi_worker_trials`] turns the checks into trials named
//! `<label>::multi::<check>::<N>_workers`, one per worker count.
//!
//! Values are small integers and halves, so that every sum is exact in `f32` whatever the
//! order the workers' pushes are added in.

use std::any::Any;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use kvstore_base::{
    Capability, DType, Error, KVStoreBase, KVStoreExt, Key, NDArray, OptimizerSpec, Result,
};
use libtest_mimic::{Arguments, Failed, Trial};

use super::util::{declare, expect_all, expect_error, f32s, filled};
use super::{ensure, CheckResult, Failure};

/// Builds the workers of a fresh job: given N, the N worker stores of one new job, ordered by
/// rank (the store at index `i` has rank `i`).
///
/// Creating the workers of a job usually blocks until all of them have joined, so the
/// factory creates them concurrently ([`create_workers`] does that).
pub type MultiWorkerFactory = dyn Fn(usize) -> Result<Vec<Box<dyn KVStoreBase>>> + Send + Sync;

/// How a store combines the pushes of its workers; it decides which checks apply and what
/// they expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Semantics {
    /// MXNet's `dist_sync` (and allreduce stores such as `horovod`): the pushes of a key form
    /// rounds of one push per worker; a round's sum replaces the value, or goes through the
    /// optimizer, once every worker has pushed, and a worker's pull (or the answer of its
    /// pushpull) that follows its push sees the result of that push's round.
    Sync,
    /// MXNet's `dist_async`: each push is applied on its own as it arrives, through the
    /// optimizer or, without one, replacing the value; a push is applied before the worker's
    /// next call, so after a barrier every worker sees every push made before it.
    Async,
}

impl Semantics {
    fn name(self) -> &'static str {
        match self {
            Semantics::Sync => "sync",
            Semantics::Async => "async",
        }
    }
}

impl fmt::Display for Semantics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a multi-worker check runs against: a factory, a number of workers and the semantics
/// of the store.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    factory: &'a MultiWorkerFactory,
    workers: usize,
    semantics: Semantics,
}

impl fmt::Debug for Job<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("workers", &self.workers)
            .field("semantics", &self.semantics)
            .finish_non_exhaustive()
    }
}

impl<'a> Job<'a> {
    /// A job of `workers` workers built by `factory`, for a store of `semantics`.
    pub fn new(factory: &'a MultiWorkerFactory, workers: usize, semantics: Semantics) -> Self {
        Job {
            factory,
            workers,
            semantics,
        }
    }

    /// The number of workers.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The store's semantics.
    pub fn semantics(&self) -> Semantics {
        self.semantics
    }

    /// Builds the workers of a fresh job.
    ///
    /// # Errors
    /// A [`Failure`] when the factory fails or returns another number of workers.
    pub fn create(&self) -> std::result::Result<Vec<Box<dyn KVStoreBase>>, Failure> {
        let n = self.workers;
        let workers = (self.factory)(n)
            .map_err(|e| Failure(format!("the factory failed to build {n} workers: {e}")))?;
        ensure!(
            workers.len() == n,
            "the factory built {} workers, {n} were asked for",
            workers.len()
        );
        Ok(workers)
    }
}

/// One behaviour of a distributed store, checked with several workers at once.
#[derive(Clone, Copy)]
pub struct MultiCheck {
    /// The behaviour, phrased as a claim.
    pub name: &'static str,
    /// Capabilities the store needs for the check to apply.
    pub requires: &'static [Capability],
    /// The semantics the check holds for.
    pub applies_to: &'static [Semantics],
    /// Runs the check.
    pub run: fn(&Job<'_>) -> CheckResult,
}

impl fmt::Debug for MultiCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiCheck")
            .field("name", &self.name)
            .field("requires", &self.requires)
            .field("applies_to", &self.applies_to)
            .finish()
    }
}

/// How long [`on_each_worker`] waits for the workers' parts of a check.
///
/// Far above what a check takes (well under a second) and above the timeouts of the stores
/// under test (a few seconds), so that a store's own timeout error is what is reported when
/// it has one; a part still running after it is reported as hung and left behind.
pub const WORKER_DEADLINE: Duration = Duration::from_secs(60);

/// Creates the `n` workers of one job with `create`, each on a thread of its own (creating a
/// worker usually blocks until every worker of the job has joined), and returns them ordered
/// by rank.
///
/// # Errors
/// The first error of `create` (the workers already built are dropped), or
/// [`Error::InvalidArgument`] when a creation panicked.
pub fn create_workers<F>(n: usize, create: F) -> Result<Vec<Box<dyn KVStoreBase>>>
where
    F: Fn() -> Result<Box<dyn KVStoreBase>> + Sync,
{
    let created: Vec<Result<Box<dyn KVStoreBase>>> = thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|_| s.spawn(&create)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|p| {
                    Err(Error::InvalidArgument(format!(
                        "creating a worker panicked: {}",
                        panic_message(&*p)
                    )))
                })
            })
            .collect()
    });
    let mut workers = created.into_iter().collect::<Result<Vec<_>>>()?;
    workers.sort_by_key(|w| w.rank());
    Ok(workers)
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not a string)".to_string()
    }
}

/// Runs `part` for every worker, each on a thread of its own (the worker is dropped on that
/// thread when its part ends), and returns the parts' results in the order of `workers`.
///
/// Waits at most [`WORKER_DEADLINE`]: a part that has not ended by then is left running and
/// reported as hung.
///
/// # Errors
/// A [`Failure`] listing, in the order they ended, every part that failed or panicked
/// (prefixed with its worker's rank), then the parts that did not end in time.
pub fn on_each_worker<T, F>(
    workers: Vec<Box<dyn KVStoreBase>>,
    part: F,
) -> std::result::Result<Vec<T>, Failure>
where
    T: Send + 'static,
    F: Fn(&dyn KVStoreBase) -> std::result::Result<T, Failure> + Send + Sync + 'static,
{
    on_each_worker_within(workers, WORKER_DEADLINE, part)
}

/// [`on_each_worker`] with another deadline.
fn on_each_worker_within<T, F>(
    workers: Vec<Box<dyn KVStoreBase>>,
    within: Duration,
    part: F,
) -> std::result::Result<Vec<T>, Failure>
where
    T: Send + 'static,
    F: Fn(&dyn KVStoreBase) -> std::result::Result<T, Failure> + Send + Sync + 'static,
{
    let n = workers.len();
    let ranks: Vec<usize> = workers.iter().map(|w| w.rank()).collect();
    let part = Arc::new(part);
    let (tx, rx) = mpsc::channel();
    for (i, kv) in workers.into_iter().enumerate() {
        let tx = tx.clone();
        let part = Arc::clone(&part);
        let spawned = thread::Builder::new()
            .name(format!("kvstore-test worker rank {}", ranks[i]))
            .spawn(move || {
                let outcome = panic::catch_unwind(AssertUnwindSafe(|| part(&*kv)))
                    .unwrap_or_else(|p| Err(Failure(format!("panicked: {}", panic_message(&*p)))));
                drop(kv);
                let _ = tx.send((i, outcome));
            });
        if let Err(e) = spawned {
            return Err(Failure(format!(
                "cannot spawn the thread of rank {}: {e}",
                ranks[i]
            )));
        }
    }
    drop(tx);
    let deadline = Instant::now() + within;
    let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut ended = vec![false; n];
    let mut failures = Vec::new();
    for _ in 0..n {
        let Ok((i, outcome)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        else {
            break;
        };
        ended[i] = true;
        match outcome {
            Ok(t) => results[i] = Some(t),
            Err(f) => failures.push(format!("rank {}: {f}", ranks[i])),
        }
    }
    for i in (0..n).filter(|&i| !ended[i]) {
        failures.push(format!(
            "rank {}: did not end within {within:?} (hung)",
            ranks[i]
        ));
    }
    if !failures.is_empty() {
        return Err(Failure(failures.join("\n")));
    }
    Ok(results.into_iter().map(|r| r.expect("ended")).collect())
}

/// Every multi-worker check.
pub const MULTI_CHECKS: &[MultiCheck] = &[
    MultiCheck {
        name: "rank_and_num_workers",
        requires: &[Capability::Distributed],
        applies_to: ANY,
        run: rank_and_num_workers,
    },
    MultiCheck {
        name: "init_keeps_rank_0s_value",
        requires: KV,
        applies_to: ANY,
        run: init_keeps_rank_0s_value,
    },
    MultiCheck {
        name: "push_sums_one_push_per_worker",
        requires: KV,
        applies_to: SYNC,
        run: push_sums_one_push_per_worker,
    },
    MultiCheck {
        name: "pushpull_sums_across_workers",
        requires: &[Capability::Distributed],
        applies_to: SYNC,
        run: pushpull_sums_across_workers,
    },
    MultiCheck {
        name: "a_workers_device_values_are_summed_in_mxnets_order",
        requires: &[Capability::Distributed],
        applies_to: SYNC,
        run: a_workers_device_values_are_summed_in_mxnets_order,
    },
    MultiCheck {
        name: "pushpull_sums_each_workers_device_list_first",
        requires: &[Capability::Distributed],
        applies_to: SYNC,
        run: pushpull_sums_each_workers_device_list_first,
    },
    MultiCheck {
        name: "pushpull_sums_every_dtype_across_workers",
        requires: &[Capability::Distributed],
        applies_to: SYNC,
        run: sums_every_dtype_across_workers,
    },
    MultiCheck {
        name: "rounds_are_per_key_however_workers_group_keys_in_calls",
        requires: &[Capability::Distributed],
        applies_to: SYNC,
        run: rounds_are_per_key_however_calls_group_keys,
    },
    MultiCheck {
        name: "broadcast_from_rank_0_reaches_every_worker",
        requires: &[Capability::Distributed],
        applies_to: ANY,
        run: broadcast_from_rank_0_reaches_every_worker,
    },
    MultiCheck {
        name: "many_int_keys_in_one_call",
        requires: KV,
        applies_to: ANY,
        run: many_int_keys_in_one_call,
    },
    MultiCheck {
        name: "many_str_keys_in_one_call",
        requires: KV,
        applies_to: ANY,
        run: many_str_keys_in_one_call,
    },
    MultiCheck {
        name: "optimizer_on_the_servers_adds_the_rescaled_sum_of_every_push",
        requires: &[
            Capability::Distributed,
            Capability::InitPushPull,
            Capability::Optimizer,
        ],
        applies_to: ANY,
        run: optimizer_adds_the_rescaled_sum_of_every_push,
    },
    MultiCheck {
        name: "compressed_pushes_quantise_with_a_residual_and_init_and_pull_are_exact",
        requires: &[
            Capability::Distributed,
            Capability::InitPushPull,
            Capability::Optimizer,
            Capability::GradientCompression,
        ],
        applies_to: SYNC,
        run: compressed_pushes_quantise_with_a_residual,
    },
    MultiCheck {
        name: "barrier_holds_every_worker_until_all_entered",
        requires: &[Capability::Distributed],
        applies_to: ANY,
        run: barrier_holds_every_worker_until_all_entered,
    },
    MultiCheck {
        name: "errors_at_one_worker_name_the_key_and_spare_the_others",
        requires: KV,
        applies_to: ANY,
        run: errors_at_one_worker_spare_the_others,
    },
    MultiCheck {
        name: "async_push_replaces_the_value_without_an_optimizer",
        requires: KV,
        applies_to: ASYNC,
        run: async_push_replaces_the_value,
    },
    MultiCheck {
        name: "async_push_before_a_barrier_is_seen_by_every_worker_after",
        requires: KV,
        applies_to: ASYNC,
        run: async_push_before_a_barrier_is_seen_after,
    },
];

const ANY: &[Semantics] = &[Semantics::Sync, Semantics::Async];
const SYNC: &[Semantics] = &[Semantics::Sync];
const ASYNC: &[Semantics] = &[Semantics::Async];
const KV: &[Capability] = &[Capability::Distributed, Capability::InitPushPull];

/// What the factory's probe (a job of one worker) says about the store.
enum Probe {
    /// The store exists; its type name and capabilities.
    Store(String, Vec<Capability>),
    /// The store cannot exist on this machine (a [`Error::Device`]).
    Unavailable(String),
    /// The factory is broken.
    Broken(String),
}

fn probe(factory: &MultiWorkerFactory) -> Probe {
    match factory(1) {
        Ok(workers) => match workers.first() {
            Some(w) if workers.len() == 1 => Probe::Store(
                w.type_name().to_string(),
                Capability::ALL
                    .iter()
                    .copied()
                    .filter(|&c| w.is_capable(c))
                    .collect(),
            ),
            _ => Probe::Broken(format!(
                "the factory built {} workers for a job of 1",
                workers.len()
            )),
        },
        Err(e @ Error::Device(_)) => Probe::Unavailable(format!("store unavailable: {e}")),
        Err(e) => Probe::Broken(format!("the factory failed: {e}")),
    }
}

fn trials_of(
    label: &str,
    factory: Arc<MultiWorkerFactory>,
    semantics: Semantics,
    workers: &[usize],
    probe: &Probe,
) -> Vec<Trial> {
    let mut trials = Vec::new();
    for &n in workers {
        for check in MULTI_CHECKS {
            let name = format!("{label}::multi::{}::{n}_workers", check.name);
            let skip_reason = match probe {
                Probe::Broken(message) => {
                    let message = message.clone();
                    trials.push(Trial::test(name, move || Err(message.into())));
                    continue;
                }
                Probe::Unavailable(reason) => Some(reason.clone()),
                Probe::Store(_, capabilities) => check
                    .requires
                    .iter()
                    .find(|c| !capabilities.contains(c))
                    .map(|c| format!("needs {c}"))
                    .or_else(|| {
                        (!check.applies_to.contains(&semantics)).then(|| {
                            let wanted: Vec<&str> =
                                check.applies_to.iter().map(|s| s.name()).collect();
                            format!("{} stores only", wanted.join(", "))
                        })
                    }),
            };
            let factory = Arc::clone(&factory);
            let run = check.run;
            let trial = Trial::test(name, move || {
                run(&Job::new(&*factory, n, semantics)).map_err(|f| Failed::from(f.0))
            });
            trials.push(match skip_reason {
                Some(reason) => trial.with_kind(reason).with_ignored_flag(true),
                None => trial,
            });
        }
    }
    trials
}

/// The multi-worker checks as trials named `<label>::multi::<check>::<N>_workers`, one per
/// worker count of `workers`, for a store of `semantics` whose jobs `factory` builds.
///
/// The factory is probed once with a job of one worker: a check needing a capability the
/// store lacks or holding for other semantics, or every check when the store cannot exist on
/// this machine (an [`Error::Device`] from the factory), is marked ignored with the reason as
/// its kind; any other factory error fails every check.
pub fn multi_worker_trials(
    label: &str,
    factory: Arc<MultiWorkerFactory>,
    semantics: Semantics,
    workers: &[usize],
) -> Vec<Trial> {
    let probe = probe(&*factory);
    trials_of(label, factory, semantics, workers, &probe)
}

/// Runs `trials` as a test binary: parses the command line as libtest does, runs, and returns
/// the exit code. For test targets that gather the trials of several stores or jobs.
pub fn run_trials(trials: Vec<Trial>) -> ExitCode {
    libtest_mimic::run(&Arguments::from_args(), trials).exit_code()
}

/// Runs every multi-worker check against the jobs `factory` builds, once per worker count of
/// `workers`, as a test binary (see
/// [`multi_worker_conformance_tests!`](crate::multi_worker_conformance_tests)), and returns
/// the exit code. Trials are labelled with the store's type name.
pub fn run_multi_worker_conformance<F>(
    factory: F,
    semantics: Semantics,
    workers: &[usize],
) -> ExitCode
where
    F: Fn(usize) -> Result<Vec<Box<dyn KVStoreBase>>> + Send + Sync + 'static,
{
    let args = Arguments::from_args();
    let factory: Arc<MultiWorkerFactory> = Arc::new(factory);
    let probe = probe(&*factory);
    let label = match &probe {
        Probe::Store(name, _) => name.clone(),
        _ => "unavailable".to_string(),
    };
    libtest_mimic::run(
        &args,
        trials_of(&label, factory, semantics, workers, &probe),
    )
    .exit_code()
}

// ---------------------------------------------------------------------------------------
// Helpers of the checks.

/// Adds what was being done to an unexpected error.
trait During<T> {
    fn during(self, what: impl fmt::Display) -> std::result::Result<T, Failure>;
}

impl<T> During<T> for Result<T> {
    fn during(self, what: impl fmt::Display) -> std::result::Result<T, Failure> {
        self.map_err(|e| Failure(format!("{what}: unexpected error: {e}")))
    }
}

/// Checks every element of `array` against `expected`.
fn expect_values(
    array: &NDArray,
    expected: &[f64],
    what: &str,
) -> std::result::Result<(), Failure> {
    let got = array.to_f64_vec();
    ensure!(
        got == expected,
        "{what}: got {got:?}, expected {expected:?}"
    );
    Ok(())
}

/// `1 + 2 + ... + n`.
fn triangle(n: usize) -> f64 {
    (n * (n + 1) / 2) as f64
}

/// An `f32` array of `shape` whose element `i` is `f(i)`.
fn from_fn(shape: &[usize], f: impl Fn(usize) -> f64) -> NDArray {
    let size: usize = shape.iter().product();
    f32s(shape, &(0..size).map(|i| f(i) as f32).collect::<Vec<_>>())
}

// ---------------------------------------------------------------------------------------
// The checks.

fn rank_and_num_workers(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    let workers = job.create()?;
    let ranks: Vec<usize> = workers.iter().map(|w| w.rank()).collect();
    ensure!(
        ranks == (0..n).collect::<Vec<_>>(),
        "the workers of a job of {n} have ranks {ranks:?}: expected 0..{n}, each once, in order"
    );
    let name = workers[0].type_name().to_string();
    // Each worker answers the same from its own thread, during the job.
    on_each_worker(workers, move |kv| {
        ensure!(
            kv.num_workers() == n,
            "num_workers() is {} in a job of {n}",
            kv.num_workers()
        );
        ensure!(
            kv.type_name() == name,
            "type name {:?}, rank 0's is {name:?}",
            kv.type_name()
        );
        ensure!(
            kv.is_capable(Capability::Distributed),
            "is_capable(distributed) is false"
        );
        Ok(())
    })?;
    Ok(())
}

fn init_keeps_rank_0s_value(job: &Job<'_>) -> CheckResult {
    on_each_worker(job.create()?, |kv| {
        let r = kv.rank() as f64;
        kv.init(
            &[1, 2],
            &[filled(&[2, 3], 10.0 + r), filled(&[5], -1.0 - r)],
        )
        .during("init of keys [1, 2]")?;
        kv.init(3, &from_fn(&[3], |i| i as f64 + 0.5 + 100.0 * r))
            .during("init of key 3")?;
        let mut outs = vec![
            vec![NDArray::zeros(&[2, 3], DType::F32); 2],
            vec![NDArray::zeros(&[5], DType::F64)],
        ];
        kv.pull(&[1, 2], &mut outs).during("pull of keys [1, 2]")?;
        expect_all(&outs[0][0], 10.0, "key 1, out 0 (rank 0 inited 10)")?;
        expect_all(&outs[0][1], 10.0, "key 1, out 1 (rank 0 inited 10)")?;
        expect_all(&outs[1][0], -1.0, "key 2 (rank 0 inited -1)")?;
        let mut out = NDArray::zeros(&[3], DType::F32);
        kv.pull(3, &mut out).during("pull of key 3")?;
        expect_values(&out, &[0.5, 1.5, 2.5], "key 3 (rank 0's init)")
    })?;
    Ok(())
}

fn push_sums_one_push_per_worker(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    on_each_worker(job.create()?, move |kv| {
        let r = kv.rank();
        kv.init(5, &NDArray::zeros(&[2, 3], DType::F32))
            .during("init of key 5")?;
        let mut out = NDArray::zeros(&[2, 3], DType::F32);
        for round in 0..3 {
            let grad = from_fn(&[2, 3], |j| ((r + 1) * (j + 1) + 10 * round) as f64);
            kv.push(5, &grad)
                .during(format_args!("push of round {round}"))?;
            kv.pull(5, &mut out)
                .during(format_args!("pull after round {round}"))?;
            let expected: Vec<f64> = (0..6)
                .map(|j| (j + 1) as f64 * triangle(n) + (10 * n * round) as f64)
                .collect();
            expect_values(
                &out,
                &expected,
                &format!("key 5 after round {round} (the sum of one push per worker)"),
            )?;
        }
        Ok(())
    })?;
    Ok(())
}

fn pushpull_sums_across_workers(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    on_each_worker(job.create()?, move |kv| {
        let r = kv.rank();
        declare(kv, 8, &[3], DType::F32)?;
        for round in 0..3 {
            let value = f32s(
                &[3],
                &[(r + 1) as f32, -2.0 * (r + 1) as f32, round as f32 + 0.5],
            );
            let before = value.clone();
            let mut outs = vec![NDArray::zeros(&[3], DType::F32); 2];
            kv.pushpull(8, &value, &mut outs)
                .during(format_args!("pushpull of round {round}"))?;
            let expected = [
                triangle(n),
                -2.0 * triangle(n),
                n as f64 * (round as f64 + 0.5),
            ];
            for (i, out) in outs.iter().enumerate() {
                expect_values(out, &expected, &format!("round {round}, out {i}"))?;
            }
            ensure!(value == before, "pushpull modified its input value");
        }
        Ok(())
    })?;
    Ok(())
}

/// MXNet sums a worker's device values as its CPU reduction does, the first plus the others
/// in groups of up to four: `[1, 1e8, -1e8]` is `1 + (1e8 + -1e8)` = 1, where adding them one
/// by one would lose the 1 in float32. Each worker's 1 is then summed exactly across workers.
fn a_workers_device_values_are_summed_in_mxnets_order(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    on_each_worker(job.create()?, move |kv| {
        declare(kv, 6, &[3], DType::F32)?;
        let values = [filled(&[3], 1.0), filled(&[3], 1e8), filled(&[3], -1e8)];
        let mut out = NDArray::zeros(&[3], DType::F32);
        kv.pushpull(6, &values, &mut out)
            .during("pushpull of three device values")?;
        expect_all(
            &out,
            n as f64,
            "out (each worker's 1 + (1e8 + -1e8), summed)",
        )
    })?;
    Ok(())
}

fn pushpull_sums_each_workers_device_list_first(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    on_each_worker(job.create()?, move |kv| {
        let r = kv.rank();
        declare(kv, 4, &[2, 2], DType::F32)?;
        // Worker r has r + 1 devices; device d holds 10 (r + 1) + d.
        let values: Vec<NDArray> = (0..=r)
            .map(|d| filled(&[2, 2], (10 * (r + 1) + d) as f64))
            .collect();
        let expected: f64 = (0..n)
            .flat_map(|w| (0..=w).map(move |d| (10 * (w + 1) + d) as f64))
            .sum();
        let mut outs = vec![NDArray::zeros(&[2, 2], DType::F32); 3];
        kv.pushpull(4, &values, &mut outs)
            .during("pushpull of the device list")?;
        for (i, out) in outs.iter().enumerate() {
            expect_all(
                out,
                expected,
                &format!("out {i} (every worker's devices, summed)"),
            )?;
        }
        // In place: each worker's two values are summed, then the total lands in both.
        let mut values = vec![
            filled(&[2, 2], (r + 1) as f64),
            filled(&[2, 2], 2.0 * (r + 1) as f64),
        ];
        kv.pushpull_in_place(4, &mut values)
            .during("pushpull in place")?;
        for (i, v) in values.iter().enumerate() {
            expect_all(
                v,
                3.0 * triangle(n),
                &format!("value {i} after pushpull in place"),
            )?;
        }
        Ok(())
    })?;
    Ok(())
}

fn broadcast_from_rank_0_reaches_every_worker(job: &Job<'_>) -> CheckResult {
    on_each_worker(job.create()?, |kv| {
        let r = kv.rank() as f64;
        let values = [
            from_fn(&[2, 3], |i| i as f64 + 100.0 * r),
            filled(&[4], -0.25 - r),
        ];
        let before = values.clone();
        let mut outs = vec![
            vec![NDArray::zeros(&[2, 3], DType::F32); 2],
            vec![NDArray::zeros(&[4], DType::F64)],
        ];
        kv.broadcast(&[10, 11], &values, &mut outs)
            .during("broadcast of keys [10, 11]")?;
        let rank0 = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        expect_values(&outs[0][0], &rank0, "key 10, out 0 (rank 0's value)")?;
        expect_values(&outs[0][1], &rank0, "key 10, out 1 (rank 0's value)")?;
        ensure!(
            outs[1][0].dtype() == DType::F64,
            "the float64 out of key 11 became {}",
            outs[1][0].dtype()
        );
        expect_all(
            &outs[1][0],
            -0.25,
            "key 11 (rank 0's value, cast to float64)",
        )?;
        ensure!(values == before, "broadcast modified its input values");
        let mut out = NDArray::zeros(&[1], DType::F32);
        kv.broadcast(12, &filled(&[1], 7.0 + r), &mut out)
            .during("broadcast of key 12")?;
        expect_all(&out, 7.0, "key 12 (rank 0's value)")
    })?;
    Ok(())
}

/// The shape of the `i`th of the many keys: mostly a few elements, and every 50th one 96
/// (above a small `MXNET_KVSTORE_BIGARRAY_BOUND`, so split across servers when the harness
/// sets one).
fn many_keys_shape(i: usize) -> Vec<usize> {
    match i % 50 {
        7 => vec![96],
        j if j % 3 == 0 => vec![1, i % 5 + 1],
        _ => vec![i % 5 + 1],
    }
}

/// Initialises, pulls, pushes (pushpulls, for sync stores) and pulls `keys`, each operation
/// one call for every key, every worker with its own values; then every worker must have
/// pulled the same.
fn many_keys(job: &Job<'_>, keys: Vec<Key>) -> CheckResult {
    let n = job.workers();
    let semantics = job.semantics();
    let count = keys.len();
    let pulled = on_each_worker(job.create()?, move |kv| {
        let r = kv.rank();
        let shapes: Vec<Vec<usize>> = (0..count).map(many_keys_shape).collect();
        let inits: Vec<NDArray> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| filled(s, (i + 1000 * r) as f64))
            .collect();
        kv.init(&keys, &inits)
            .during(format_args!("init of {count} keys in one call"))?;
        let mut outs: Vec<NDArray> = shapes
            .iter()
            .map(|s| NDArray::zeros(s, DType::F32))
            .collect();
        kv.pull(&keys, &mut outs)
            .during(format_args!("pull of {count} keys in one call"))?;
        for (i, out) in outs.iter().enumerate() {
            expect_all(
                out,
                i as f64,
                &format!("key {} after init (rank 0's)", keys[i]),
            )?;
        }
        if semantics == Semantics::Async {
            // An async push is applied at once: nobody pushes before everyone has pulled.
            // (A sync round cannot complete before this worker pushes too.)
            kv.barrier().during("barrier after the pulls")?;
        }
        // Key i: worker r pushes (i mod 13) + r + 1.
        let grads: Vec<NDArray> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| filled(s, (i % 13 + r + 1) as f64))
            .collect();
        match semantics {
            Semantics::Sync => {
                kv.pushpull(&keys, &grads, &mut outs)
                    .during(format_args!("pushpull of {count} keys in one call"))?;
                for (i, out) in outs.iter().enumerate() {
                    let sum = (n * (i % 13)) as f64 + triangle(n);
                    expect_all(out, sum, &format!("key {} after pushpull", keys[i]))?;
                }
            }
            Semantics::Async => {
                kv.push(&keys, &grads)
                    .during(format_args!("push of {count} keys in one call"))?;
                kv.barrier().during("barrier after the pushes")?;
            }
        }
        let mut outs: Vec<NDArray> = shapes
            .iter()
            .map(|s| NDArray::zeros(s, DType::F64))
            .collect();
        kv.pull(&keys, &mut outs)
            .during(format_args!("the last pull of {count} keys in one call"))?;
        let values: Vec<f64> = outs.iter().map(|o| o.to_f64_vec()[0]).collect();
        for (i, out) in outs.iter().enumerate() {
            expect_all(
                out,
                values[i],
                &format!("key {} (every element alike)", keys[i]),
            )?;
            let ok = match semantics {
                Semantics::Sync => values[i] == (n * (i % 13)) as f64 + triangle(n),
                // The last push applied wins: one worker's.
                Semantics::Async => (0..n).any(|w| values[i] == (i % 13 + w + 1) as f64),
            };
            ensure!(
                ok,
                "key {} is {} after every worker pushed (i mod 13) + rank + 1 = {} + rank + 1",
                keys[i],
                values[i],
                i % 13
            );
        }
        Ok(values)
    })?;
    for (w, values) in pulled.iter().enumerate().skip(1) {
        if let Some(i) = (0..count).find(|&i| values[i] != pulled[0][i]) {
            return Err(Failure(format!(
                "rank {w} pulled {} for key index {i}, rank 0 pulled {}",
                values[i], pulled[0][i]
            )));
        }
    }
    Ok(())
}

fn many_int_keys_in_one_call(job: &Job<'_>) -> CheckResult {
    many_keys(job, (0..200).map(|i| Key::from(i * 7919 + 3)).collect())
}

fn many_str_keys_in_one_call(job: &Job<'_>) -> CheckResult {
    let mut keys: Vec<Key> = (0..199)
        .map(|i| Key::from(format!("layer{i}.weight")))
        .collect();
    keys.push(Key::from("权重"));
    many_keys(job, keys)
}

fn optimizer_adds_the_rescaled_sum_of_every_push(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    let semantics = job.semantics();
    on_each_worker(job.create()?, move |kv| {
        let r = kv.rank();
        // Key 5 is big enough to be split across the servers under a small big-array bound.
        let shapes = [vec![2, 2], vec![96]];
        let keys = [4, 5];
        let inits: Vec<NDArray> = shapes.iter().map(|s| filled(s, 1.0)).collect();
        kv.init(&keys, &inits).during("init of keys [4, 5]")?;
        kv.set_optimizer(&OptimizerSpec::new("test").with("rescale_grad", 0.5))
            .during("set_optimizer(test, rescale_grad 0.5)")?;
        // Round t: worker r pushes 2 (r + 1) (t + 1); the sum is (t + 1) n (n + 1), times 0.5.
        let mut expected = 1.0;
        let mut outs: Vec<NDArray> = shapes
            .iter()
            .map(|s| NDArray::zeros(s, DType::F32))
            .collect();
        for round in 0..3usize {
            let grads: Vec<NDArray> = shapes
                .iter()
                .map(|s| filled(s, (2 * (r + 1) * (round + 1)) as f64))
                .collect();
            expected += 0.5 * (round + 1) as f64 * 2.0 * triangle(n);
            if round == 2 {
                kv.pushpull(&keys, &grads, &mut outs)
                    .during(format_args!("pushpull of round {round}"))?;
            } else {
                kv.push(&keys, &grads)
                    .during(format_args!("push of round {round}"))?;
                if semantics == Semantics::Sync {
                    kv.pull(&keys, &mut outs)
                        .during(format_args!("pull after round {round}"))?;
                }
            }
            if semantics == Semantics::Sync {
                for (k, out) in keys.iter().zip(&outs) {
                    expect_all(
                        out,
                        expected,
                        &format!("key {k} after round {round}: 1 + 0.5 x the sums so far"),
                    )?;
                }
            }
        }
        kv.barrier().during("barrier after the pushes")?;
        kv.pull(&keys, &mut outs).during("the last pull")?;
        for (k, out) in keys.iter().zip(&outs) {
            expect_all(
                out,
                expected,
                &format!("key {k} after every push: 1 + 0.5 x the sum of every push"),
            )?;
        }
        Ok(())
    })?;
    Ok(())
}

/// MXNet's nightly `dist_sync_kvstore.py --type=compressed_cpu` (`check_compr_residual`):
/// with 2-bit compression (threshold 0.5) each worker's push is quantised to -0.5, 0 or 0.5
/// and what quantising took off is kept for its next push; init and pulls are not
/// compressed. Every worker pushes the same values, through the `test` optimizer
/// (`w += 0.5 g`), so a round adds `0.5 n q` for the quantised value `q`.
fn compressed_pushes_quantise_with_a_residual(job: &Job<'_>) -> CheckResult {
    let n = job.workers() as f64;
    on_each_worker(job.create()?, move |kv| {
        let params = [("type", "2bit"), ("threshold", "0.5")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        kv.set_gradient_compression(&params)
            .during("set_gradient_compression(2bit, threshold 0.5)")?;
        // Key 5 is big enough to be split across the servers under a small big-array bound.
        let shapes = [vec![2, 2], vec![96]];
        let keys = [4, 5];
        // 0.75 is not a quantised value: an init that went through the codec would show.
        let inits: Vec<NDArray> = shapes.iter().map(|s| filled(s, 0.75)).collect();
        kv.init(&keys, &inits).during("init of keys [4, 5]")?;
        kv.set_optimizer(&OptimizerSpec::new("test").with("rescale_grad", 0.5))
            .during("set_optimizer(test, rescale_grad 0.5)")?;
        let mut outs: Vec<NDArray> = shapes
            .iter()
            .map(|s| NDArray::zeros(s, DType::F32))
            .collect();
        kv.pull(&keys, &mut outs)
            .during("the pull before any push")?;
        for (k, out) in keys.iter().zip(&outs) {
            expect_all(
                out,
                0.75,
                &format!("key {k} pulled after init (not compressed)"),
            )?;
        }
        // (pushed value, the residual after it, the quantised value it sent)
        let rounds = [
            (0.25, 0.25, 0.0),
            (0.25, 0.0, 0.5),
            (0.375, 0.375, 0.0),
            (0.125, 0.0, 0.5),
            (-0.75, -0.25, -0.5),
            (-0.25, 0.0, -0.5),
            (0.0, 0.0, 0.0),
        ];
        let mut expected = 0.75;
        for (round, &(pushed, residual, sent)) in rounds.iter().enumerate() {
            let grads: Vec<NDArray> = shapes.iter().map(|s| filled(s, pushed)).collect();
            kv.push(&keys, &grads)
                .during(format_args!("push of {pushed} (round {round})"))?;
            kv.pull(&keys, &mut outs)
                .during(format_args!("pull after round {round}"))?;
            expected += 0.5 * n * sent;
            for (k, out) in keys.iter().zip(&outs) {
                expect_all(
                    out,
                    expected,
                    &format!(
                        "key {k} after a push of {pushed} (round {round}: each worker sends                          {sent}, keeping {residual})"
                    ),
                )?;
            }
        }
        Ok(())
    })?;
    Ok(())
}

fn sums_every_dtype_across_workers(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    // Worker r pushes base + r: the sum is n base + n (n - 1) / 2, exact in every dtype.
    const BASES: &[(DType, [f64; 2])] = &[
        (DType::F32, [1.5, -2.0]),
        (DType::F64, [1e15, 0.25]),
        (DType::F16, [1.0, 0.5]),
        (DType::BF16, [1.0, -2.0]),
        (DType::I32, [7.0, -3.0]),
        (DType::I64, [(1u64 << 40) as f64, -1.0]),
        (DType::U8, [1.0, 20.0]),
    ];
    on_each_worker(job.create()?, move |kv| {
        let r = kv.rank() as f64;
        // A store may refuse a dtype its test binary declared refusable
        // (`allow_refused_dtypes`) with `Unsupported` at init; it is then left out, and a
        // pushpull of it must fail too.
        let mut bases = Vec::new();
        let mut keys: Vec<i32> = Vec::new();
        for (i, &(dtype, base)) in BASES.iter().enumerate() {
            let key = 20 + i as i32;
            if kv.is_capable(Capability::InitPushPull) {
                match kv.init(key, &NDArray::zeros(&[2], dtype)) {
                    Err(e)
                        if super::may_refuse(dtype)
                            && matches!(e.root(), Error::Unsupported { .. }) =>
                    {
                        let mut out = NDArray::zeros(&[2], dtype);
                        let pushed = kv.pushpull(key, &NDArray::zeros(&[2], dtype), &mut out);
                        ensure!(
                            pushed.is_err(),
                            "{dtype} was refused at init ({e}) but a pushpull of it succeeded"
                        );
                        continue;
                    }
                    initialised => initialised.during(format_args!("init of the {dtype} key"))?,
                }
            }
            bases.push((dtype, base));
            keys.push(key);
        }
        let values: Vec<NDArray> = bases
            .iter()
            .map(|&(dtype, [a, b])| {
                NDArray::from_vec(&[2], vec![a + r, b + r])
                    .expect("two elements")
                    .astype(dtype)
            })
            .collect();
        let mut outs: Vec<NDArray> = bases
            .iter()
            .map(|&(dtype, _)| NDArray::zeros(&[2], dtype))
            .collect();
        kv.pushpull(&keys, &values, &mut outs)
            .during("pushpull of one key per dtype")?;
        let extra = (n * (n - 1) / 2) as f64;
        for ((&(dtype, [a, b]), out), key) in bases.iter().zip(&outs).zip(&keys) {
            ensure!(
                out.dtype() == dtype,
                "key {key}: the {dtype} out became {}",
                out.dtype()
            );
            expect_values(
                out,
                &[n as f64 * a + extra, n as f64 * b + extra],
                &format!("key {key} ({dtype})"),
            )?;
        }
        Ok(())
    })?;
    Ok(())
}

fn rounds_are_per_key_however_calls_group_keys(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    on_each_worker(job.create()?, move |kv| {
        let r = kv.rank();
        let keys = [1, 2, 3, 4, 5, 6];
        let shape = |k: i32| if k == 6 { vec![96] } else { vec![2] };
        for &k in &keys {
            declare(kv, k, &shape(k), DType::F32)?;
        }
        for round in 0..2usize {
            // Key k, worker r: 10 k + r + 1 + 100 round.
            let value = |k: i32| filled(&shape(k), (10 * k as usize + r + 1 + 100 * round) as f64);
            let sum = |k: i32| (n * (10 * k as usize + 100 * round)) as f64 + triangle(n);
            let mut outs: Vec<NDArray> = keys
                .iter()
                .map(|&k| NDArray::zeros(&shape(k), DType::F32))
                .collect();
            if (r + round) % 2 == 0 {
                // Every key in one pushpull.
                let values: Vec<NDArray> = keys.iter().map(|&k| value(k)).collect();
                kv.pushpull(&keys, &values, &mut outs)
                    .during(format_args!("pushpull of every key, round {round}"))?;
            } else if kv.is_capable(Capability::InitPushPull) {
                // A push then a pull per key, in the same (ascending) order.
                for (&k, out) in keys.iter().zip(outs.iter_mut()) {
                    kv.push(k, &value(k))
                        .during(format_args!("push of key {k}, round {round}"))?;
                    kv.pull(k, out)
                        .during(format_args!("pull of key {k}, round {round}"))?;
                }
            } else {
                // A pushpull per key.
                for (&k, out) in keys.iter().zip(outs.iter_mut()) {
                    kv.pushpull(k, &value(k), out)
                        .during(format_args!("pushpull of key {k}, round {round}"))?;
                }
            }
            for (&k, out) in keys.iter().zip(&outs) {
                expect_all(out, sum(k), &format!("key {k} after round {round}"))?;
            }
        }
        Ok(())
    })?;
    Ok(())
}

fn barrier_holds_every_worker_until_all_entered(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    let entered: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
    on_each_worker(job.create()?, move |kv| {
        for (b, count) in entered.iter().enumerate() {
            // The last rank enters late, so that a barrier that holds no one fails every time.
            if kv.rank() == n - 1 {
                thread::sleep(Duration::from_millis(100));
            }
            count.fetch_add(1, Ordering::SeqCst);
            kv.barrier().during(format_args!("barrier {b}"))?;
            let c = count.load(Ordering::SeqCst);
            ensure!(
                c == n,
                "left barrier {b} when only {c} of the {n} workers had entered it"
            );
        }
        Ok(())
    })?;
    Ok(())
}

fn errors_at_one_worker_spare_the_others(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    let semantics = job.semantics();
    on_each_worker(job.create()?, move |kv| {
        let r = kv.rank();
        let name = kv.type_name().to_string();
        kv.init(
            &[9, 10],
            &[
                NDArray::zeros(&[2], DType::F32),
                NDArray::zeros(&[3], DType::F32),
            ],
        )
        .during("init of keys [9, 10]")?;
        // The last rank: a push of the wrong shape, and a pushpull into an out of the wrong
        // shape; rank 0: a push of the wrong dtype and a pull of a key never initialised.
        if r == n - 1 {
            expect_error(
                kv.push(9, &filled(&[3], 1.0)),
                "a push of shape [3] to key 9 of shape [2]",
                |e| matches!(e, Error::ShapeMismatch { .. }),
                &["9", "[2]", "[3]", &name],
            )?;
            let mut out = NDArray::zeros(&[4], DType::F32);
            expect_error(
                kv.pushpull(10, &filled(&[3], 1.0), &mut out),
                "a pushpull of key 10 of shape [3] into an out of shape [4]",
                |e| matches!(e, Error::ShapeMismatch { .. }),
                &["10", "[3]", "[4]"],
            )?;
            expect_all(&out, 0.0, "the out of the failed pushpull")?;
        }
        if r == 0 {
            expect_error(
                kv.push(9, &NDArray::ones(&[2], DType::F64)),
                "a float64 push to float32 key 9",
                |e| matches!(e, Error::DTypeMismatch { .. }),
                &["9", "float32", "float64"],
            )?;
            let mut out = NDArray::zeros(&[2], DType::F32);
            expect_error(
                kv.pull(77, &mut out),
                "a pull of key 77, never initialised",
                |e| matches!(e, Error::KeyNotInitialized),
                &["77"],
            )?;
        }
        // Then every worker pushes valid values: a failed call contributed nothing.
        let mut out = NDArray::zeros(&[2], DType::F32);
        for round in 0..2usize {
            kv.push(9, &filled(&[2], (10 * round + r + 1) as f64))
                .during(format_args!(
                    "the valid push of round {round} after the errors"
                ))?;
            if semantics == Semantics::Sync {
                kv.pull(9, &mut out)
                    .during(format_args!("pull after round {round}"))?;
                expect_all(
                    &out,
                    (10 * round * n) as f64 + triangle(n),
                    &format!("key 9 after round {round}, the errors' round included"),
                )?;
            }
        }
        let mut outs = vec![NDArray::zeros(&[3], DType::F32)];
        kv.pushpull(10, &filled(&[3], (r + 1) as f64), &mut outs)
            .during("the valid pushpull of key 10 after the errors")?;
        if semantics == Semantics::Sync {
            expect_all(&outs[0], triangle(n), "key 10 after the valid pushpull")?;
        }
        kv.barrier().during("barrier after the pushes")?;
        kv.pull(9, &mut out).during("the last pull of key 9")?;
        let v = out.to_f64_vec()[0];
        let ok = match semantics {
            Semantics::Sync => v == 10.0 * n as f64 + triangle(n),
            // The last push applied is some worker's last push.
            Semantics::Async => (0..n).any(|w| v == (10 + w + 1) as f64),
        };
        ensure!(ok, "key 9 is {v} after the last valid pushes");
        Ok(())
    })?;
    Ok(())
}

fn async_push_replaces_the_value(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    let pulled = on_each_worker(job.create()?, move |kv| {
        let r = kv.rank();
        kv.init(6, &NDArray::zeros(&[3], DType::F32))
            .during("init of key 6")?;
        kv.push(6, &filled(&[3], (r + 1) as f64)).during("push")?;
        kv.barrier().during("barrier after the pushes")?;
        let mut out = NDArray::zeros(&[3], DType::F32);
        kv.pull(6, &mut out).during("pull after the barrier")?;
        let v = out.to_f64_vec()[0];
        expect_all(&out, v, "key 6 (every element alike)")?;
        ensure!(
            (1..=n).any(|w| v == w as f64),
            "key 6 is {v} after each worker pushed rank + 1 once: expected one of the pushed \
             values (no optimizer: a push replaces the value)"
        );
        Ok(v)
    })?;
    ensure!(
        pulled.iter().all(|&v| v == pulled[0]),
        "the workers pulled different values after the barrier: {pulled:?}"
    );
    Ok(())
}

fn async_push_before_a_barrier_is_seen_after(job: &Job<'_>) -> CheckResult {
    let n = job.workers();
    on_each_worker(job.create()?, move |kv| {
        let r = kv.rank();
        kv.init(6, &NDArray::zeros(&[3], DType::F32))
            .during("init of key 6")?;
        let mut out = NDArray::zeros(&[3], DType::F32);
        for (writer, value) in [(0, 42.0), (n - 1, -7.5)] {
            if r == writer {
                kv.push(6, &filled(&[3], value))
                    .during(format_args!("rank {writer}'s push of {value}"))?;
            }
            kv.barrier()
                .during(format_args!("barrier after rank {writer}'s push"))?;
            kv.pull(6, &mut out).during("pull after the barrier")?;
            expect_all(
                &out,
                value,
                &format!("key 6 after rank {writer} pushed {value} alone, then a barrier"),
            )?;
            // Nobody pushes again before everyone has pulled.
            kv.barrier().during("barrier after the pulls")?;
        }
        Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use kvstore_base::{KeyedOuts, KeyedValues};

    use super::*;

    /// A worker that does nothing but say who it is.
    #[derive(Debug)]
    struct Fake {
        rank: usize,
        workers: usize,
        capabilities: &'static [Capability],
    }

    impl KVStoreBase for Fake {
        fn type_name(&self) -> &str {
            "fake"
        }
        fn rank(&self) -> usize {
            self.rank
        }
        fn num_workers(&self) -> usize {
            self.workers
        }
        fn is_capable(&self, capability: Capability) -> bool {
            self.capabilities.contains(&capability)
        }
        fn broadcast_batch(
            &self,
            _: &KeyedValues<'_>,
            _: &mut KeyedOuts<'_>,
            _: i32,
        ) -> Result<()> {
            Ok(())
        }
        fn pushpull_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, _: i32) -> Result<()> {
            Ok(())
        }
    }

    fn fakes(ranks: &[usize], workers: usize) -> Vec<Box<dyn KVStoreBase>> {
        ranks
            .iter()
            .map(|&rank| {
                Box::new(Fake {
                    rank,
                    workers,
                    capabilities: &[Capability::Distributed],
                }) as Box<dyn KVStoreBase>
            })
            .collect()
    }

    #[test]
    fn create_workers_orders_them_by_rank() {
        // Ranks handed out in reverse order of creation.
        let next = AtomicUsize::new(4);
        let workers = create_workers(4, || {
            Ok(fakes(&[next.fetch_sub(1, Ordering::SeqCst) - 1], 4).remove(0))
        })
        .unwrap();
        let ranks: Vec<usize> = workers.iter().map(|w| w.rank()).collect();
        assert_eq!(ranks, [0, 1, 2, 3]);
    }

    #[test]
    fn create_workers_returns_the_first_error() {
        let calls = Mutex::new(0);
        let err = create_workers(3, || {
            let mut c = calls.lock().unwrap();
            *c += 1;
            if *c == 2 {
                Err(Error::InvalidArgument("no room".into()))
            } else {
                Ok(fakes(&[*c], 3).remove(0))
            }
        })
        .unwrap_err();
        assert!(err.to_string().contains("no room"), "{err}");
    }

    #[test]
    fn parts_results_come_back_in_worker_order() {
        let out = on_each_worker(fakes(&[0, 1, 2], 3), |kv| Ok(kv.rank() * 10)).unwrap();
        assert_eq!(out, [0, 10, 20]);
    }

    #[test]
    fn failures_and_panics_name_the_rank_in_the_order_they_ended() {
        let err = on_each_worker::<(), _>(fakes(&[0, 1, 2], 3), |kv| match kv.rank() {
            0 => {
                thread::sleep(Duration::from_millis(400));
                Err(Failure("late".into()))
            }
            1 => Err(Failure("early".into())),
            _ => {
                thread::sleep(Duration::from_millis(300));
                panic!("boom")
            }
        })
        .unwrap_err();
        // Rank 1 ended first; the other two in an order the panic's report may change.
        let lines: Vec<&str> = err.0.lines().collect();
        assert_eq!(lines[0], "rank 1: early", "{err}");
        let mut rest = lines[1..].to_vec();
        rest.sort();
        assert_eq!(rest, ["rank 0: late", "rank 2: panicked: boom"], "{err}");
    }

    #[test]
    fn a_hung_part_fails_at_the_deadline() {
        let started = Instant::now();
        let err = on_each_worker_within(fakes(&[0, 1], 2), Duration::from_millis(200), |kv| {
            if kv.rank() == 1 {
                thread::sleep(Duration::from_secs(5));
            }
            Ok(())
        })
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(err.0, "rank 1: did not end within 200ms (hung)");
    }

    fn check(name: &str) -> MultiCheck {
        *MULTI_CHECKS.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn rank_check_catches_wrong_ranks_and_counts() {
        let run = check("rank_and_num_workers").run;
        let good = |n: usize| Ok(fakes(&(0..n).collect::<Vec<_>>(), n));
        assert!(run(&Job::new(&good, 3, Semantics::Sync)).is_ok());
        let twice = |n: usize| Ok(fakes(&vec![0; n], n));
        let err = run(&Job::new(&twice, 2, Semantics::Sync)).unwrap_err();
        assert!(err.0.contains("ranks [0, 0]"), "{err}");
        let miscounted = |n: usize| Ok(fakes(&(0..n).collect::<Vec<_>>(), n + 1));
        let err = run(&Job::new(&miscounted, 2, Semantics::Sync)).unwrap_err();
        assert!(err.0.contains("num_workers() is 3 in a job of 2"), "{err}");
        let short = |_: usize| Ok(fakes(&[0], 1));
        let err = run(&Job::new(&short, 2, Semantics::Sync)).unwrap_err();
        assert!(err.0.contains("built 1 workers, 2 were asked for"), "{err}");
    }

    #[test]
    fn trials_are_named_per_worker_count_and_ignored_with_the_reason() {
        let factory: Arc<MultiWorkerFactory> =
            Arc::new(|n| Ok(fakes(&(0..n).collect::<Vec<_>>(), n)));
        let trials = multi_worker_trials("fake", factory, Semantics::Async, &[2, 3]);
        assert_eq!(trials.len(), 2 * MULTI_CHECKS.len());
        let find = |name: &str| trials.iter().find(|t| t.name() == name).unwrap();
        let rank = find("fake::multi::rank_and_num_workers::3_workers");
        assert!(!rank.has_ignored_flag());
        let init = find("fake::multi::init_keeps_rank_0s_value::2_workers");
        assert!(init.has_ignored_flag());
        assert_eq!(init.kind(), "needs init_push_pull");
        let sums = find("fake::multi::pushpull_sums_across_workers::2_workers");
        assert!(sums.has_ignored_flag());
        assert_eq!(sums.kind(), "sync stores only");
    }

    #[test]
    fn a_device_error_ignores_every_trial_and_another_error_fails_them() {
        let absent: Arc<MultiWorkerFactory> = Arc::new(|_| Err(Error::Device("no GPU".into())));
        let trials = multi_worker_trials("gpu", absent, Semantics::Sync, &[2]);
        assert!(trials
            .iter()
            .all(|t| t.has_ignored_flag() && t.kind().contains("no GPU")));
        let broken: Arc<MultiWorkerFactory> =
            Arc::new(|_| Err(Error::InvalidArgument("bad config".into())));
        let trials = multi_worker_trials("broken", broken, Semantics::Sync, &[2]);
        assert_eq!(trials.len(), MULTI_CHECKS.len());
        assert!(trials.iter().all(|t| !t.has_ignored_flag()));
    }
}
