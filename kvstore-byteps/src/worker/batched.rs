//! Small partitions of a call travel together: one [`CMD_BATCH`](protocol::CMD_BATCH) message
//! per server and MiB (the batches of the dist stores, which a server answers as a whole), so
//! that a call of a thousand small tensors costs a few messages instead of a thousand or two.
//! Partitions of more than [`SHM_MIN_BYTES`] keep messages of their own (and the servers'
//! shared memory). With a scheduling credit every partition still goes alone, under its grant.

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

/// The batches being filled, one per server: partitions and their bytes.
struct Open {
    items: Vec<Task>,
    bytes: usize,
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
        payload: impl Fn(Task) -> &'p [u8],
        then_pull: bool,
    ) -> Result<(Vec<Flight>, Vec<Flight>)> {
        let (mut sent, mut pulls) = (Vec::new(), Vec::new());
        let mut open: Vec<Open> = (0..self.servers.len())
            .map(|_| Open {
                items: Vec::new(),
                bytes: 0,
            })
            .collect();
        for &task in tasks {
            let t = &tensors[task.tensor];
            let bytes = t.byte_range(task.part).len();
            if bytes > SHM_MIN_BYTES {
                let s = self.send(t, task.part, command, payload(task), operation)?;
                sent.push(Flight::one(task, s));
                if then_pull {
                    let p = self.send(t, task.part, protocol::CMD_PULL, &[], operation)?;
                    pulls.push(Flight::one(task, p));
                }
                continue;
            }
            let server = t.parts[task.part].server;
            let batch = &mut open[server];
            batch.items.push(task);
            batch.bytes += bytes;
            if batch.bytes >= protocol::BATCH_BYTES
                || batch.items.len() >= protocol::BATCH_MAX_ITEMS
            {
                let items = std::mem::take(&mut batch.items);
                batch.bytes = 0;
                self.send_batches(
                    operation, command, tensors, server, items, &payload, then_pull,
                )
                .map(|(s, p)| {
                    sent.push(s);
                    pulls.extend(p);
                })?;
            }
        }
        for (server, batch) in open.into_iter().enumerate() {
            if batch.items.is_empty() {
                continue;
            }
            let (s, p) = self.send_batches(
                operation,
                command,
                tensors,
                server,
                batch.items,
                &payload,
                then_pull,
            )?;
            sent.push(s);
            pulls.extend(p);
        }
        Ok((sent, pulls))
    }

    /// Sends one batch of `command` to `server`, and its pull when `then_pull`.
    #[allow(clippy::too_many_arguments)]
    fn send_batches<'p>(
        &self,
        operation: &'static str,
        command: u32,
        tensors: &[Arc<Tensor>],
        server: usize,
        items: Vec<Task>,
        payload: &impl Fn(Task) -> &'p [u8],
        then_pull: bool,
    ) -> Result<(Flight, Option<Flight>)> {
        let pull = if then_pull { Some(items.clone()) } else { None };
        let sent = self.send_batch(operation, command, tensors, server, items, payload)?;
        let pulled = match pull {
            Some(items) => Some(self.send_batch(
                operation,
                protocol::CMD_PULL,
                tensors,
                server,
                items,
                payload,
            )?),
            None => None,
        };
        Ok((sent, pulled))
    }

    fn send_batch<'p>(
        &self,
        operation: &'static str,
        command: u32,
        tensors: &[Arc<Tensor>],
        server: usize,
        items: Vec<Task>,
        payload: &impl Fn(Task) -> &'p [u8],
    ) -> Result<Flight> {
        let chunks: Vec<&[u8]> = match command {
            protocol::CMD_PULL => Vec::new(),
            _ => items.iter().map(|&task| payload(task)).collect(),
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
