//! Small partitions of a call travel together: one [`CMD_BATCH`](protocol::CMD_BATCH) message
//! per server and MiB (the batches of the dist stores, which a server answers as a whole), so
//! that a call of a thousand small tensors costs a few messages instead of a thousand or two.
//! Partitions of more than [`SHM_MIN_BYTES`] keep messages of their own (and the servers'
//! shared memory). Under a scheduling credit, the small partitions granted at once go
//! together in the same way ([`BytePsStore::send_granted`]).

use std::borrow::Cow;
use std::sync::Arc;

use kvstore_base::Result;
use kvstore_dist::protocol::{self, BatchItem};
use kvstore_dist::transport::{Outgoing, TransportError};

use super::{BytePsStore, Pulled, Sent, Task, Tensor, SHM_MIN_BYTES};

/// What one message of a call covers.
enum Covers {
    /// One partition in a message of its own.
    One(Task),
    /// The partitions of a batch, in item order.
    Batch(Vec<Task>),
}

/// A message of a call on its way.
pub(super) struct Flight {
    covers: Covers,
    sent: Sent,
}

impl Flight {
    /// A partition's own message.
    pub(super) fn one(task: Task, sent: Sent) -> Flight {
        Flight {
            covers: Covers::One(task),
            sent,
        }
    }

    /// Waits for the acknowledgement: `None`, or the failed partition (a batch's error names
    /// its failed item) and the error.
    pub(super) fn acknowledged(self) -> Option<(Task, TransportError)> {
        let (outcome, _lease) = self.sent.wait();
        let e = outcome.err()?;
        Some((self.covers.failed(&e), e))
    }

    /// Waits for pulled partitions: each one's bytes, or the failed partition and the error.
    /// A batch's answer is cut by the partitions' sizes; an answer of the wrong size leaves a
    /// partition of the wrong size, which the outputs' check names.
    pub(super) fn pulled(
        self,
        tensors: &[Arc<Tensor>],
    ) -> std::result::Result<Vec<(Task, Pulled)>, (Task, TransportError)> {
        let items = match self.covers {
            Covers::One(task) => {
                return self
                    .sent
                    .pulled()
                    .map(|p| vec![(task, p)])
                    .map_err(|e| (task, e))
            }
            Covers::Batch(items) => items,
        };
        let (outcome, _lease) = self.sent.wait();
        let buf = match outcome {
            Ok(response) => response.payload.into_vec(),
            Err(e) => return Err((failed(&items, &e), e)),
        };
        let mut at = 0;
        let last = items.len() - 1;
        let parts = items
            .into_iter()
            .enumerate()
            .map(|(n, task)| {
                let len = tensors[task.tensor].byte_range(task.part).len();
                let start = at.min(buf.len());
                let end = if n == last {
                    buf.len()
                } else {
                    (at + len).min(buf.len())
                };
                at += len;
                (task, Pulled::Bytes(buf[start..end.max(start)].to_vec()))
            })
            .collect();
        Ok(parts)
    }
}

impl Covers {
    /// The partition an error is about.
    fn failed(&self, e: &TransportError) -> Task {
        match self {
            Covers::One(task) => *task,
            Covers::Batch(items) => failed(items, e),
        }
    }
}

/// The item of a batch that an error names (`item <i>: ...`), else its first.
fn failed(items: &[Task], e: &TransportError) -> Task {
    let named = match e {
        TransportError::Remote { message, .. } => {
            protocol::split_item_error(message).map(|(i, _)| i)
        }
        _ => None,
    };
    items[named.filter(|&i| i < items.len()).unwrap_or(0)]
}

/// What a call sends: the command, about which tensors, with which bytes.
struct Call<'a, P> {
    operation: &'static str,
    command: u32,
    tensors: &'a [Arc<Tensor>],
    /// The bytes sent for a partition (empty for a pull).
    payload: P,
    /// Whether each message of `command` is followed by the pull of its partitions.
    then_pull: bool,
}

impl BytePsStore {
    /// Sends `command` (init, push or pull) for every task, `payload(task)` its bytes (empty
    /// for a pull); with `then_pull`, each push message is followed at once by the pull of the
    /// same partitions on the same connection (so the server has the push first). Returns
    /// the messages sent with `command`, and the pulls.
    pub(super) fn send_batched<'p>(
        &self,
        operation: &'static str,
        command: u32,
        tensors: &[Arc<Tensor>],
        tasks: &[Task],
        payload: impl Fn(Task) -> Cow<'p, [u8]>,
        then_pull: bool,
    ) -> Result<(Vec<Flight>, Vec<Flight>)> {
        let call = Call {
            operation,
            command,
            tensors,
            payload,
            then_pull,
        };
        let (mut sent, mut pulls) = (Vec::new(), Vec::new());
        // The batch being filled for each server, and its bytes.
        let mut open: Vec<(Vec<Task>, usize)> = vec![(Vec::new(), 0); self.servers.len()];
        for &task in tasks {
            let t = &tensors[task.tensor];
            let bytes = t.byte_range(task.part).len();
            if bytes > SHM_MIN_BYTES {
                self.send_alone(&call, task, &mut sent, &mut pulls)?;
                continue;
            }
            let server = t.parts[task.part].server;
            let (items, size) = &mut open[server];
            items.push(task);
            *size += bytes;
            if *size >= protocol::BATCH_BYTES || items.len() >= protocol::BATCH_MAX_ITEMS {
                *size = 0;
                let items = std::mem::take(items);
                self.flush(&call, server, items, &mut sent, &mut pulls)?;
            }
        }
        for (server, (items, _)) in open.into_iter().enumerate() {
            if !items.is_empty() {
                self.flush(&call, server, items, &mut sent, &mut pulls)?;
            }
        }
        Ok((sent, pulls))
    }

    /// Pushes granted tasks (`G`: what each holds until its push is acknowledged): partitions
    /// of more than [`SHM_MIN_BYTES`] alone, the others in one batch per server; with
    /// `then_pull`, each push message followed at once by the pull of its partitions. Each
    /// push message joins `sent` with the grants it covers, each pull `pulls`, as they go out
    /// (on an error, what went out before it is there).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_granted<'p, G>(
        &self,
        operation: &'static str,
        tensors: &[Arc<Tensor>],
        granted: Vec<(Task, G)>,
        payload: impl Fn(Task) -> Cow<'p, [u8]>,
        then_pull: bool,
        sent: &mut Vec<(Vec<G>, Flight)>,
        pulls: &mut Vec<Flight>,
    ) -> Result<()> {
        let call = Call {
            operation,
            command: protocol::CMD_PUSH,
            tensors,
            payload,
            then_pull,
        };
        // A push and its grants are recorded even when its pull then fails: they wait for the
        // push's acknowledgement.
        let mut pushed = Vec::with_capacity(1);
        let mut record = |grants: Vec<G>, pushed: &mut Vec<Flight>, outcome: Result<()>| {
            if let Some(push) = pushed.pop() {
                sent.push((grants, push));
            }
            outcome
        };
        let mut by_server: Vec<(Vec<Task>, Vec<G>)> = (0..self.servers.len())
            .map(|_| (Vec::new(), Vec::new()))
            .collect();
        for (task, grant) in granted {
            let t = &tensors[task.tensor];
            if t.byte_range(task.part).len() <= SHM_MIN_BYTES {
                let (items, grants) = &mut by_server[t.parts[task.part].server];
                items.push(task);
                grants.push(grant);
                continue;
            }
            let outcome = self.send_alone(&call, task, &mut pushed, pulls);
            record(vec![grant], &mut pushed, outcome)?;
        }
        for (server, (items, grants)) in by_server.into_iter().enumerate() {
            if !items.is_empty() {
                let outcome = self.flush(&call, server, items, &mut pushed, pulls);
                record(grants, &mut pushed, outcome)?;
            }
        }
        Ok(())
    }

    /// Sends `task`'s partition in a message of its own, and its pull when the call asks; the
    /// message joins `sent` before the pull goes.
    fn send_alone<'p, P: Fn(Task) -> Cow<'p, [u8]>>(
        &self,
        call: &Call<'_, P>,
        task: Task,
        sent: &mut Vec<Flight>,
        pulls: &mut Vec<Flight>,
    ) -> Result<()> {
        let (t, operation) = (&call.tensors[task.tensor], call.operation);
        let s = self.send(t, task.part, call.command, &(call.payload)(task), operation)?;
        sent.push(Flight::one(task, s));
        if call.then_pull {
            let p = self.send(t, task.part, protocol::CMD_PULL, &[], operation)?;
            pulls.push(Flight::one(task, p));
        }
        Ok(())
    }

    /// Sends one batch of the call's command to `server`, and its pull when the call asks;
    /// the batch joins `sent` before the pull goes.
    fn flush<'p, P: Fn(Task) -> Cow<'p, [u8]>>(
        &self,
        call: &Call<'_, P>,
        server: usize,
        items: Vec<Task>,
        sent: &mut Vec<Flight>,
        pulls: &mut Vec<Flight>,
    ) -> Result<()> {
        let pull_items = call.then_pull.then(|| items.clone());
        sent.push(self.send_batch(call, call.command, server, items)?);
        if let Some(items) = pull_items {
            pulls.push(self.send_batch(call, protocol::CMD_PULL, server, items)?);
        }
        Ok(())
    }

    /// Sends `command` for `items` to `server` in one batch.
    fn send_batch<'p, P: Fn(Task) -> Cow<'p, [u8]>>(
        &self,
        call: &Call<'_, P>,
        command: u32,
        server: usize,
        items: Vec<Task>,
    ) -> Result<Flight> {
        let Call {
            operation, tensors, ..
        } = *call;
        let chunks: Vec<Cow<'_, [u8]>> = match command {
            protocol::CMD_PULL => Vec::new(),
            _ => items.iter().map(|&task| (call.payload)(task)).collect(),
        };
        let table: Vec<BatchItem> = items
            .iter()
            .enumerate()
            .map(|(n, task)| {
                let t = &tensors[task.tensor];
                BatchItem {
                    wire: t.parts[task.part].key,
                    part: task.part as u32,
                    flags: protocol::dtype_flag(t.dtype),
                    // BytePS pushes are never retried by step.
                    seq: 0,
                    // Sent bytes, else the bytes expected back.
                    len: chunks
                        .get(n)
                        .map_or(t.byte_range(task.part).len(), |c| c.len())
                        as u64,
                }
            })
            .collect();
        let body = BatchItem::encode(&table, &chunks);
        let what = format!("{operation} of {} partitions (a batch)", items.len());
        let out = Outgoing::new(protocol::CMD_BATCH, &body).aux(u64::from(command));
        let pending = self.servers[server]
            .send(out, &what)
            .map_err(self.transport_at(operation, &tensors[items[0].tensor].key))?;
        Ok(Flight {
            covers: Covers::Batch(items),
            sent: Sent {
                pending,
                lease: None,
            },
        })
    }
}
