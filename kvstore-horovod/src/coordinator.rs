//! Horovod's coordinator, on rank 0: which tensors are ready on every rank, in which order and
//! fused how; and the stall inspector.
//!
//! Each rank submits, once per cycle, the tensors its threads queued since its last cycle
//! ([`CMD_SUBMIT`](crate::wire::CMD_SUBMIT)): name, operation, dtype, shape. The coordinator
//! keeps every rank's submitted tensors across cycles, as Horovod's message table does, so a
//! rank may spread its tensors over cycles and calls in any way. A tensor is **ready** once
//! every rank has submitted it (with the same operation, dtype and shape; a mismatch fails the
//! tensor on every rank that submitted it). Ready tensors are packed, in the order they were
//! first submitted, into groups of one operation and dtype of at most the fusion threshold's
//! bytes, numbered in one sequence for the job, and every rank receives every group: each rank
//! runs the groups in sequence order, so ranks never wait on each other in different orders.
//!
//! A rank's submission is held until the rank has something to receive (groups, failures) or
//! nothing pending; a later submission of the rank (its next cycle) answers the held one at
//! once with whatever is there, so that a rank waiting for one tensor can still submit others.
//!
//! The **stall inspector**: a tensor submitted by some ranks but not all for longer than the
//! stall check time (`HOROVOD_STALL_CHECK_TIME_SECONDS`) is logged as a warning naming the
//! missing ranks, as Horovod's is; after the stall shutdown time
//! (`HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`, else the timeout: a synchronous call cannot wait
//! forever) it fails on the ranks that submitted it, with an error naming the tensor and, for
//! each missing rank, the stalled tensors it did not submit. A missing rank that submits it
//! later fails at once with the same error, rather than start a record the others (moved on to
//! the tensor's next round) would complete with data of another step.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvstore_dist::transport::{Outgoing, Responder};

use crate::wire::{decode_requests, encode_plan, Failure, Group, Op, Plan, TensorRequest, FRESH};

struct Tensor {
    request: TensorRequest,
    submitted: Vec<bool>,
    first: Instant,
    order: u64,
    /// Whether the stall warning was logged.
    warned: bool,
}

#[derive(Default)]
struct RankState {
    /// The names it submitted that are neither planned nor failed.
    pending: Vec<String>,
    /// Its held submission.
    responder: Option<Responder>,
    /// Groups to deliver.
    outbox: Vec<Group>,
    /// Failed tensors to deliver.
    failures: Vec<Failure>,
}

struct State {
    tensors: HashMap<String, Tensor>,
    /// Tensors failed by a mismatch before every rank had submitted them: the message, and
    /// the ranks still to submit, whose next submission of the name fails at once with it
    /// (instead of starting a record no other rank completes, which would stall).
    mismatched: HashMap<String, (String, Vec<bool>)>,
    ranks: Vec<RankState>,
    next_seq: u64,
    next_order: u64,
}

/// An answer to send once the lock is released.
type Reply = (Responder, Result<Vec<u8>, String>);

pub(crate) struct Coordinator {
    size: usize,
    fusion_threshold: u64,
    /// When a tensor some ranks wait with is logged (`None`: never).
    stall_warning: Option<Duration>,
    /// When it fails on the ranks that submitted it.
    stall_shutdown: Duration,
    state: Mutex<State>,
}

impl Coordinator {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A coordinator for `size` ranks, with its stall-inspector thread.
    pub(crate) fn start(
        size: usize,
        fusion_threshold: u64,
        stall_warning: Option<Duration>,
        stall_shutdown: Duration,
    ) -> std::io::Result<(Arc<Coordinator>, Monitor)> {
        let coordinator = Arc::new(Coordinator {
            size,
            fusion_threshold,
            stall_warning,
            stall_shutdown,
            state: Mutex::new(State {
                tensors: HashMap::new(),
                mismatched: HashMap::new(),
                ranks: (0..size).map(|_| RankState::default()).collect(),
                next_seq: 0,
                next_order: 0,
            }),
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let first = stall_warning.map_or(stall_shutdown, |w| w.min(stall_shutdown));
        let tick = (first / 20).clamp(Duration::from_millis(5), Duration::from_millis(250));
        let c = Arc::clone(&coordinator);
        let thread = std::thread::Builder::new()
            .name("kvstore-horovod stall inspector".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    c.inspect();
                }
            })?;
        Ok((
            coordinator,
            Monitor {
                stop: Some(stop),
                thread: Some(thread),
            },
        ))
    }

    /// Handles a submission from `rank` (`aux`: cycle number, [`FRESH`] when the rank has
    /// nothing in flight).
    pub(crate) fn submit(&self, rank: u64, aux: u64, payload: &[u8], responder: Responder) {
        let mut replies = Vec::new();
        {
            let mut st = self.lock();
            self.submit_locked(&mut st, rank, aux, payload, responder, &mut replies);
        }
        send(replies);
    }

    fn submit_locked(
        &self,
        st: &mut State,
        rank: u64,
        aux: u64,
        payload: &[u8],
        responder: Responder,
        replies: &mut Vec<Reply>,
    ) {
        let Some(r) = usize::try_from(rank).ok().filter(|&r| r < self.size) else {
            replies.push((
                responder,
                Err(format!(
                    "rank {rank} is out of range: the job has {} ranks",
                    self.size
                )),
            ));
            return;
        };
        let requests = match decode_requests(payload) {
            Ok(r) => r,
            Err(e) => {
                replies.push((responder, Err(format!("bad submission: {e}"))));
                return;
            }
        };
        if aux & FRESH != 0 {
            // The rank has nothing in flight: whatever is left here is stale.
            self.withdraw(st, r);
            st.ranks[r].outbox.clear();
            st.ranks[r].failures.clear();
        }
        // A later cycle supersedes the held submission: answer it with what there is.
        if let Some(held) = st.ranks[r].responder.take() {
            let rank = &mut st.ranks[r];
            let plan = Plan {
                groups: std::mem::take(&mut rank.outbox),
                failures: std::mem::take(&mut rank.failures),
            };
            replies.push((held, Ok(encode_plan(&plan))));
        }
        st.ranks[r].responder = Some(responder);
        for request in requests {
            self.record(st, r, request);
        }
        self.plan(st);
        for rank in 0..self.size {
            deliver(st, rank, replies);
        }
    }

    /// Records that rank `r` submitted `request`; a mismatch with the other ranks' fails the
    /// tensor on every rank that submitted it.
    fn record(&self, st: &mut State, r: usize, request: TensorRequest) {
        let name = request.name.clone();
        if let Some((message, owed)) = st.mismatched.get_mut(&name) {
            if std::mem::take(&mut owed[r]) {
                let message = message.clone();
                if owed.iter().all(|o| !o) {
                    st.mismatched.remove(&name);
                }
                st.ranks[r].failures.push(Failure { name, message });
                return;
            }
        }
        let order = st.next_order;
        st.next_order += 1;
        let tensor = st.tensors.entry(name.clone()).or_insert_with(|| Tensor {
            request: request.clone(),
            submitted: vec![false; self.size],
            first: Instant::now(),
            order,
            warned: false,
        });
        if tensor.submitted.iter().all(|s| !s) {
            tensor.request = request.clone();
            tensor.first = Instant::now();
            tensor.order = order;
            tensor.warned = false;
        }
        if tensor.submitted[r] {
            // Workers never do this; refuse the second copy only.
            st.ranks[r].failures.push(Failure {
                message: format!("rank {r} submitted tensor {name} again while it is in flight"),
                name,
            });
            return;
        }
        let known = &tensor.request;
        if known.op != request.op || known.dtype != request.dtype || known.shape != request.shape {
            let others: Vec<usize> = (0..self.size).filter(|&i| tensor.submitted[i]).collect();
            let message = format!(
                "mismatched {}: rank {r} submitted tensor {name} as {} of {} {:?}, rank{} {} as \
                 {} of {} {:?}",
                if known.op != request.op {
                    "operations"
                } else if known.dtype != request.dtype {
                    "data types"
                } else {
                    "shapes"
                },
                request.op.name(),
                request.dtype,
                request.shape,
                if others.len() == 1 { "" } else { "s" },
                list(&others),
                known.op.name(),
                known.dtype,
                known.shape,
            );
            st.tensors.remove(&name);
            let mut owed = vec![true; self.size];
            for rank in others.into_iter().chain([r]) {
                owed[rank] = false;
                self.fail(st, rank, &name, message.clone());
            }
            if owed.iter().any(|&o| o) {
                st.mismatched.insert(name, (message, owed));
            }
            return;
        }
        tensor.submitted[r] = true;
        st.ranks[r].pending.push(name);
    }

    /// Withdraws rank `r`'s pending tensors (it gave up on them).
    fn withdraw(&self, st: &mut State, r: usize) {
        for name in std::mem::take(&mut st.ranks[r].pending) {
            if let Some(t) = st.tensors.get_mut(&name) {
                t.submitted[r] = false;
                if t.submitted.iter().all(|s| !s) {
                    st.tensors.remove(&name);
                }
            }
        }
    }

    /// Fails tensor `name` on rank `r` (no longer pending there) with `message`.
    fn fail(&self, st: &mut State, r: usize, name: &str, message: String) {
        let rank = &mut st.ranks[r];
        rank.pending.retain(|n| n != name);
        rank.failures.push(Failure {
            name: name.to_string(),
            message,
        });
    }

    /// Turns the tensors ready on every rank into groups for every rank.
    fn plan(&self, st: &mut State) {
        let mut ready: Vec<(u64, TensorRequest)> = Vec::new();
        st.tensors.retain(|_, t| {
            if t.submitted.iter().all(|&s| s) {
                ready.push((t.order, t.request.clone()));
                false
            } else {
                true
            }
        });
        if ready.is_empty() {
            return;
        }
        ready.sort_by_key(|(order, _)| *order);
        let names: std::collections::HashSet<&str> =
            ready.iter().map(|(_, t)| t.name.as_str()).collect();
        for rank in &mut st.ranks {
            rank.pending.retain(|n| !names.contains(n.as_str()));
        }
        // Fuse per (operation, dtype), in submission order, up to the threshold.
        let mut groups: Vec<(Group, u64)> = Vec::new();
        let mut open: HashMap<(Op, kvstore_base::DType), usize> = HashMap::new();
        for (_, t) in ready {
            let bytes = t.bytes();
            let fits = open.get(&(t.op, t.dtype)).copied().filter(|&i| {
                self.fusion_threshold > 0
                    && groups[i].1.saturating_add(bytes) <= self.fusion_threshold
            });
            match fits {
                Some(i) => {
                    groups[i].0.names.push(t.name);
                    groups[i].1 += bytes;
                }
                None => {
                    open.insert((t.op, t.dtype), groups.len());
                    groups.push((
                        Group {
                            seq: 0,
                            op: t.op,
                            dtype: t.dtype,
                            names: vec![t.name],
                        },
                        bytes,
                    ));
                }
            }
        }
        for (mut g, _) in groups {
            g.seq = st.next_seq;
            st.next_seq += 1;
            for rank in &mut st.ranks {
                rank.outbox.push(g.clone());
            }
        }
    }

    /// The stall inspector: logs the tensors that some ranks submitted longer than the stall
    /// check time ago and others have not, and fails those older than the shutdown time on the
    /// ranks that submitted them (the missing ranks' later submissions of them too).
    fn inspect(&self) {
        let mut replies = Vec::new();
        {
            let mut st = self.lock();
            let due = |t: &Tensor, after: Duration| t.first.elapsed() >= after;
            let mut stalled: Vec<Stalled> = st
                .tensors
                .values()
                .filter(|t| {
                    due(t, self.stall_shutdown)
                        || self.stall_warning.is_some_and(|w| !t.warned && due(t, w))
                })
                .map(|t| {
                    let (have, missing): (Vec<usize>, Vec<usize>) =
                        (0..self.size).partition(|&i| t.submitted[i]);
                    Stalled {
                        order: t.order,
                        name: t.request.name.clone(),
                        have,
                        missing,
                        fail: due(t, self.stall_shutdown),
                    }
                })
                .collect();
            if stalled.is_empty() {
                return;
            }
            stalled.sort_by_key(|s| s.order);
            // For each missing rank, the stalled tensors it did not submit (Horovod's list).
            let mut missed: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
            for Stalled { name, missing, .. } in &stalled {
                for &m in missing {
                    missed.entry(m).or_default().push(name);
                }
            }
            let missing_list = |missing: &[usize]| {
                missing
                    .iter()
                    .map(|m| format!("{m}: [{}]", missed[m].join(", ")))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut failures = Vec::new();
            for Stalled {
                name,
                have,
                missing,
                fail,
                ..
            } in &stalled
            {
                let waited = |what: &str, after: Duration, var: &str| {
                    format!(
                        "stall inspector: tensor {name} was submitted by rank{} {} but rank{} \
                         {} did not submit it within {after:?} ({var}){what}. Missing ranks: {}",
                        if have.len() == 1 { "" } else { "s" },
                        list(have),
                        if missing.len() == 1 { "" } else { "s" },
                        list(missing),
                        missing_list(missing)
                    )
                };
                if !fail {
                    let warning = waited(
                        "; ranks that submit different tensors, or only some ranks \
                         submitting, would deadlock",
                        self.stall_warning.unwrap_or_default(),
                        "HOROVOD_STALL_CHECK_TIME_SECONDS",
                    );
                    log::warn!("kvstore-horovod: {warning}");
                    if let Some(t) = st.tensors.get_mut(name) {
                        t.warned = true;
                    }
                    continue;
                }
                let message = waited(
                    "; the ranks that submitted it give up (ranks that submit different \
                     tensors, or only some ranks submitting, would deadlock)",
                    self.stall_shutdown,
                    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS, else KVSTORE_TIMEOUT_SECS",
                );
                log::warn!("kvstore-horovod: ranks {}: {message}", list(have));
                failures.push((name.clone(), have.clone(), missing.clone(), message));
            }
            for (name, have, missing, message) in failures {
                st.tensors.remove(&name);
                for r in have {
                    self.fail(&mut st, r, &name, message.clone());
                }
                // A missing rank's later submission of it belongs to the round given up on.
                let mut owed = vec![false; self.size];
                for m in missing {
                    owed[m] = true;
                }
                st.mismatched.insert(name, (message, owed));
            }
            for rank in 0..self.size {
                deliver(&mut st, rank, &mut replies);
            }
        }
        send(replies);
    }
}

/// A tensor the stall inspector reports.
struct Stalled {
    /// When it was first submitted, in submission order.
    order: u64,
    name: String,
    /// The ranks that submitted it, and those that did not.
    have: Vec<usize>,
    missing: Vec<usize>,
    /// Whether it waited past the shutdown time (else only the warning's).
    fail: bool,
}

/// Answers rank `r`'s held submission if there is something to say (groups, failures), or
/// nothing will come (the rank has nothing pending).
fn deliver(st: &mut State, r: usize, replies: &mut Vec<Reply>) {
    let rank = &mut st.ranks[r];
    if rank.responder.is_none()
        || (rank.outbox.is_empty() && rank.failures.is_empty() && !rank.pending.is_empty())
    {
        return;
    }
    let plan = Plan {
        groups: std::mem::take(&mut rank.outbox),
        failures: std::mem::take(&mut rank.failures),
    };
    replies.push((
        rank.responder.take().expect("checked"),
        Ok(encode_plan(&plan)),
    ));
}

fn send(replies: Vec<Reply>) {
    for (responder, answer) in replies {
        let sent = match answer {
            Ok(payload) => responder.respond(Outgoing::new(0, &payload)),
            Err(message) => responder.respond_error(&message),
        };
        if let Err(e) = sent {
            log::warn!("kvstore-horovod coordinator: cannot answer: {e}");
        }
    }
}

fn list(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Stops the stall inspector when dropped.
pub(crate) struct Monitor {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
