//! Horovod's coordinator, on rank 0: which tensors are ready on every rank, in which order and
//! fused how; and the stall inspector.
//!
//! Each rank submits the tensors of its call ([`CMD_SUBMIT`](crate::wire::CMD_SUBMIT)): name,
//! operation, dtype, shape. A tensor is **ready** once every rank has submitted it (with the
//! same operation, dtype and shape; a mismatch fails the call on every rank that submitted
//! it). Ready tensors are packed, in the order they were first submitted, into groups of one
//! operation and dtype of at most the fusion threshold's bytes, numbered in one sequence for
//! the job, and every rank receives every group: each rank runs the groups in sequence order,
//! so ranks never wait on each other in different orders, whatever order their calls listed
//! the keys in. A rank's submission is answered as soon as it has groups to run; it submits
//! again (a continuation) while its call has tensors left.
//!
//! The **stall inspector**: a tensor submitted by some ranks but not all for longer than the
//! stall time fails the calls of the ranks that submitted it, with an error naming the tensor
//! and the missing ranks (Horovod only warns, by default; a synchronous call cannot wait
//! forever).

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvstore_dist::transport::{Outgoing, Responder};

use crate::wire::{decode_requests, encode_groups, Group, Op, TensorRequest, NEW_CALL};

struct Tensor {
    request: TensorRequest,
    submitted: Vec<bool>,
    first: Instant,
    order: u64,
}

#[derive(Default)]
struct RankState {
    /// The names of its current call not yet planned.
    outstanding: Vec<String>,
    responder: Option<Responder>,
    outbox: Vec<Group>,
    /// Why its current call failed, to deliver once its outbox is empty.
    failed: Option<String>,
}

struct State {
    tensors: HashMap<String, Tensor>,
    ranks: Vec<RankState>,
    next_seq: u64,
    next_order: u64,
}

/// An answer to send once the lock is released.
type Reply = (Responder, Result<Vec<u8>, String>);

pub(crate) struct Coordinator {
    size: usize,
    fusion_threshold: u64,
    stall: Duration,
    state: Mutex<State>,
}

/// Separates the tensor's name from the message in a coordinator's error.
pub(crate) const NAME_END: char = '\n';

impl Coordinator {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A coordinator for `size` ranks, with its stall-inspector thread.
    pub(crate) fn start(
        size: usize,
        fusion_threshold: u64,
        stall: Duration,
    ) -> std::io::Result<(Arc<Coordinator>, Monitor)> {
        let coordinator = Arc::new(Coordinator {
            size,
            fusion_threshold,
            stall,
            state: Mutex::new(State {
                tensors: HashMap::new(),
                ranks: (0..size).map(|_| RankState::default()).collect(),
                next_seq: 0,
                next_order: 0,
            }),
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let tick = (stall / 20).clamp(Duration::from_millis(5), Duration::from_millis(250));
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

    /// Handles a submission from `rank` (`aux`: call number, [`NEW_CALL`] for a new call).
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
                    "{NAME_END}rank {rank} is out of range: the job has {} ranks",
                    self.size
                )),
            ));
            return;
        };
        if aux & NEW_CALL != 0 {
            let requests = match decode_requests(payload) {
                Ok(r) => r,
                Err(e) => {
                    replies.push((responder, Err(format!("{NAME_END}bad submission: {e}"))));
                    return;
                }
            };
            // A new call: whatever was left of the last one is gone.
            self.withdraw(st, r);
            st.ranks[r].failed = None;
            st.ranks[r].outbox.clear();
            st.ranks[r].responder = Some(responder);
            for request in requests {
                self.record(st, r, request);
            }
            self.plan(st);
        } else {
            st.ranks[r].responder = Some(responder);
        }
        for rank in 0..self.size {
            deliver(st, rank, replies);
        }
    }

    /// Records that rank `r` submitted `request`; a mismatch with the other ranks' fails the
    /// calls of every rank that submitted the tensor.
    fn record(&self, st: &mut State, r: usize, request: TensorRequest) {
        let name = request.name.clone();
        let order = st.next_order;
        let tensor = st.tensors.entry(name.clone()).or_insert_with(|| Tensor {
            request: request.clone(),
            submitted: vec![false; self.size],
            first: Instant::now(),
            order,
        });
        if tensor.submitted.iter().all(|s| !s) {
            tensor.request = request.clone();
            tensor.first = Instant::now();
            tensor.order = order;
        }
        st.next_order += 1;
        let known = &tensor.request;
        let mismatch = (known.op != request.op
            || known.dtype != request.dtype
            || known.shape != request.shape)
            .then(|| {
                let others: Vec<usize> = (0..self.size).filter(|&i| tensor.submitted[i]).collect();
                let message = format!(
                    "{name}{NAME_END}mismatched {}: rank {r} submitted tensor {name} as {} of \
                     {} {:?}, rank{} {} as {} of {} {:?}",
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
                (others, message)
            });
        if let Some((others, message)) = mismatch {
            st.ranks[r].outstanding.push(name.clone());
            for rank in others.into_iter().chain([r]) {
                self.fail(st, rank, message.clone());
            }
            st.tensors.remove(&name);
            return;
        }
        let tensor = st.tensors.get_mut(&name).expect("inserted above");
        tensor.submitted[r] = true;
        st.ranks[r].outstanding.push(name);
    }

    /// Withdraws rank `r`'s outstanding tensors (its call ended).
    fn withdraw(&self, st: &mut State, r: usize) {
        for name in std::mem::take(&mut st.ranks[r].outstanding) {
            if let Some(t) = st.tensors.get_mut(&name) {
                t.submitted[r] = false;
                if t.submitted.iter().all(|s| !s) {
                    st.tensors.remove(&name);
                }
            }
        }
    }

    /// Fails rank `r`'s current call with `message`.
    fn fail(&self, st: &mut State, r: usize, message: String) {
        self.withdraw(st, r);
        st.ranks[r].failed.get_or_insert(message);
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
        for rank in &mut st.ranks {
            rank.outstanding
                .retain(|n| !ready.iter().any(|(_, t)| &t.name == n));
        }
        // Fuse per (operation, dtype), in submission order, up to the threshold.
        let mut groups: Vec<(Group, u64)> = Vec::new();
        let mut open: HashMap<(Op, kvstore_base::DType), usize> = HashMap::new();
        for (_, t) in ready {
            let bytes = t.bytes();
            let fits = open.get(&(t.op, t.dtype)).copied().filter(|&i| {
                self.fusion_threshold > 0 && groups[i].1 + bytes <= self.fusion_threshold
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

    /// The stall inspector: fails the calls waiting longer than the stall time for ranks
    /// that have not submitted the same tensor.
    fn inspect(&self) {
        let mut replies = Vec::new();
        {
            let mut st = self.lock();
            let mut stalled: Vec<(u64, String, Vec<usize>, Vec<usize>)> = st
                .tensors
                .values()
                .filter(|t| t.first.elapsed() >= self.stall)
                .map(|t| {
                    let (have, missing): (Vec<usize>, Vec<usize>) =
                        (0..self.size).partition(|&i| t.submitted[i]);
                    (t.order, t.request.name.clone(), have, missing)
                })
                .collect();
            if stalled.is_empty() {
                return;
            }
            stalled.sort();
            let mut messages: Vec<Option<String>> = vec![None; self.size];
            for (_, name, have, missing) in &stalled {
                for &r in have {
                    messages[r].get_or_insert_with(|| {
                        format!(
                            "{name}{NAME_END}stall inspector: tensor {name} was submitted by \
                             rank{} {} but rank{} {} did not submit it within {:?} \
                             (HOROVOD_STALL_CHECK_TIME_SECONDS); ranks that submit different \
                             tensors, or only some ranks submitting, would deadlock. \
                             Missing ranks: {}",
                            if have.len() == 1 { "" } else { "s" },
                            list(have),
                            if missing.len() == 1 { "" } else { "s" },
                            list(missing),
                            self.stall,
                            missing
                                .iter()
                                .map(|m| format!("{m}: [{name}]"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    });
                }
            }
            for (r, message) in messages.into_iter().enumerate() {
                if let Some(m) = message {
                    log::warn!("kvstore-horovod: rank {r}: {}", m.replace(NAME_END, ": "));
                    self.fail(&mut st, r, m);
                }
            }
            for rank in 0..self.size {
                deliver(&mut st, rank, &mut replies);
            }
        }
        send(replies);
    }
}

/// Answers rank `r`'s waiting submission if there is something to say: its groups first,
/// then a failure.
fn deliver(st: &mut State, r: usize, replies: &mut Vec<Reply>) {
    let rank = &mut st.ranks[r];
    if rank.responder.is_none() {
        return;
    }
    let answer = if !rank.outbox.is_empty() {
        Ok(encode_groups(&std::mem::take(&mut rank.outbox)))
    } else if let Some(message) = rank.failed.take() {
        Err(message)
    } else {
        return;
    };
    replies.push((rank.responder.take().expect("checked"), answer));
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
