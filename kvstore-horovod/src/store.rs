//! [`HorovodStore`]: one worker of a `horovod` job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvstore_base::{
    Capability, Error, KVStoreBase, Key, KeyedOuts, KeyedValues, NDArray, Result, StorageType,
};
use kvstore_dist::protocol::{Mode, CMD_BYE, CMD_HELLO};
use kvstore_dist::transport::{
    Connection, Handler, Outgoing, Request, Responder, Server, TransportError,
};
use kvstore_dist::{Group as NodeGroup, Node, Role};

use crate::config::HorovodConfig;
use crate::coordinator::{Coordinator, Monitor, NAME_END};
use crate::ring::{Mailbox, Ring};
use crate::wire::{
    decode_groups, encode_requests, Group, Op, TensorRequest, CMD_DATA, CMD_SUBMIT, NEW_CALL,
};

/// The capabilities of the store: it spans workers; it keeps no values and runs no optimizer.
pub(crate) const CAPABILITIES: &[Capability] = &[Capability::Distributed];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Extra time beyond a bound, so that the peer's error (which says more) arrives first.
fn grace(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_secs(2)) + Duration::from_millis(100)
}

/// Horovod's name of a key's tensor: `str(key)`.
fn tensor_name(key: &Key) -> String {
    match key {
        Key::Int(k) => k.to_string(),
        Key::Str(s) => s.to_string(),
    }
}

fn backend(store: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::Backend {
        store: store.to_string(),
        source: e.into(),
    }
}

/// Serves a worker's address: chunks from the previous rank, submissions on rank 0.
struct WorkerHandler {
    rank: usize,
    mailbox: Arc<Mailbox>,
    coordinator: Option<Arc<Coordinator>>,
}

impl Handler for WorkerHandler {
    fn handle(&self, request: Request, responder: Responder) {
        let h = request.header;
        match h.command {
            CMD_DATA => {
                self.mailbox.put(h.key, h.aux, request.payload);
                let _ = responder.respond(Outgoing::new(0, &[]));
            }
            CMD_SUBMIT => match &self.coordinator {
                Some(c) => c.submit(h.key, h.aux, &request.payload, responder),
                None => {
                    let _ = responder.respond_error(&format!(
                        "{NAME_END}rank {} is not the coordinator (rank 0 is)",
                        self.rank
                    ));
                }
            },
            other => {
                let _ = responder.respond_error(&format!("{NAME_END}unknown command {other:#x}"));
            }
        }
    }
}

/// The links of a job of more than one worker.
struct Links {
    /// To rank `rank + 1`: the ring's data.
    next: Connection,
    /// To rank 0: submissions.
    coordinator: Connection,
    mailbox: Arc<Mailbox>,
}

/// One tensor of a call: its key, what is submitted, and the data (this rank's value, then
/// the result).
struct Local {
    key: Key,
    request: TensorRequest,
    data: NDArray,
}

/// A dense, contiguous copy of `a`.
fn own(a: &NDArray) -> NDArray {
    let dense = a.to_dense();
    if dense.as_bytes().is_some() {
        return dense;
    }
    let mut copy = NDArray::zeros(a.shape(), a.dtype());
    copy.assign(&dense).expect("same shape");
    copy
}

/// A worker of a `horovod` job (see the [crate docs](crate)).
pub struct HorovodStore {
    name: String,
    rank: usize,
    size: usize,
    timeout: Duration,
    stall: Duration,
    /// Serialises the calls of this worker; counts them.
    calls: Mutex<u64>,
    links: Option<Links>,
    /// Parameter servers of the job, if it has some: greeted and left idle.
    servers: Vec<Connection>,
    server: Option<Server>,
    monitor: Option<Monitor>,
    node: Mutex<Option<Node>>,
}

impl std::fmt::Debug for HorovodStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HorovodStore")
            .field("name", &self.name)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl HorovodStore {
    /// Joins the job of `config` as a worker (blocks until every node has registered), serves
    /// on the advertised address and connects to the next rank and to rank 0.
    ///
    /// # Errors
    /// [`Error::Backend`] when joining or connecting fails or times out.
    pub fn connect(name: &str, config: &HorovodConfig) -> Result<HorovodStore> {
        let mut dist = config.dist.clone();
        dist.role = Role::Worker;
        let mut node = Node::join(&dist).map_err(|e| backend(name, e))?;
        let rank = node.rank() as usize;
        let workers: Vec<String> = node.workers().map(|w| w.addr.clone()).collect();
        let size = workers.len();
        let mut transport = dist.transport();
        transport.node_id = node.id();
        let (coordinator, monitor) = if rank == 0 && size > 1 {
            let (c, m) = Coordinator::start(size, config.fusion_threshold, config.stall_check)
                .map_err(|e| backend(name, e))?;
            (Some(c), Some(m))
        } else {
            (None, None)
        };
        let mailbox = Arc::new(Mailbox::default());
        let listener = node
            .take_listener()
            .ok_or_else(|| backend(name, "the node's listening socket is gone"))?;
        let server = Server::from_listener(
            listener,
            transport.clone(),
            WorkerHandler {
                rank,
                mailbox: Arc::clone(&mailbox),
                coordinator,
            },
        )
        .map_err(|e| backend(name, e))?;
        let links = if size > 1 {
            let next = Connection::connect(workers[(rank + 1) % size].as_str(), transport.clone())
                .map_err(|e| backend(name, e))?;
            let mut long = transport.clone();
            long.timeout = dist.timeout.max(config.stall_check) + grace(dist.timeout);
            let coordinator =
                Connection::connect(workers[0].as_str(), long).map_err(|e| backend(name, e))?;
            Some(Links {
                next,
                coordinator,
                mailbox,
            })
        } else {
            None
        };
        // A job launched with parameter servers: say hello (and goodbye when leaving) so
        // that they end with the job.
        let mut servers = Vec::new();
        for s in node.servers() {
            let conn = Connection::connect(s.addr.as_str(), transport.clone())
                .map_err(|e| backend(name, e))?;
            conn.request(
                Outgoing::new(CMD_HELLO, name.as_bytes())
                    .key(rank as u64)
                    .aux(Mode::Sync.code()),
                &format!("hello from worker rank {rank}"),
            )
            .map_err(|e| backend(name, e))?;
            servers.push(conn);
        }
        Ok(HorovodStore {
            name: name.to_string(),
            rank,
            size,
            timeout: dist.timeout,
            stall: config.stall_check,
            calls: Mutex::new(0),
            links,
            servers,
            server: Some(server),
            monitor,
            node: Mutex::new(Some(node)),
        })
    }

    /// Bytes this worker has sent to the next rank of the ring so far (chunks of all-reduces
    /// and broadcasts, frame headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.links.as_ref().map_or(0, |l| l.next.bytes_sent())
    }

    /// Bytes this worker has sent to the coordinator so far (its submissions).
    pub fn control_bytes_sent(&self) -> u64 {
        self.links
            .as_ref()
            .map_or(0, |l| l.coordinator.bytes_sent())
    }

    fn at(&self, operation: &'static str, key: &Key) -> impl FnOnce(Error) -> Error + '_ {
        let key = key.clone();
        move |e| e.at_key(&self.name, operation, key)
    }

    /// Runs the collective operations of one call: submits its tensors to the coordinator
    /// and runs the groups it answers, in order, until every tensor is done. The results
    /// replace `tensors[i].data`.
    fn collective(&self, operation: &'static str, tensors: &mut [Local]) -> Result<()> {
        let mut calls = lock(&self.calls);
        *calls += 1;
        let call = *calls;
        let Some(links) = &self.links else {
            // A job of one: the local values are the results.
            return Ok(());
        };
        let by_name: HashMap<String, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.request.name.clone(), i))
            .collect();
        let requests: Vec<TensorRequest> = tensors.iter().map(|t| t.request.clone()).collect();
        let mut payload = encode_requests(&requests);
        let mut aux = call | NEW_CALL;
        let mut left = tensors.len();
        let what = format!("{operation} submission of call {call}");
        let wait = self.stall + grace(self.timeout) + Duration::from_millis(300);
        while left > 0 {
            let answer = links
                .coordinator
                .send(
                    Outgoing::new(CMD_SUBMIT, &payload)
                        .key(self.rank as u64)
                        .aux(aux),
                    &what,
                )
                .and_then(|p| p.wait_timeout(wait));
            payload.clear();
            aux = call;
            let groups = match answer {
                Ok(r) => decode_groups(&r.payload)
                    .map_err(|e| backend(&self.name, format!("bad plan from rank 0: {e}")))?,
                Err(TransportError::Remote { message, .. }) => {
                    let (name, message) = message.split_once(NAME_END).unwrap_or(("", &message));
                    let e = backend(&self.name, message.to_string());
                    return Err(match by_name.get(name) {
                        Some(&i) => e.at_key(&self.name, operation, tensors[i].key.clone()),
                        None => e,
                    });
                }
                Err(e) => return Err(backend(&self.name, e)),
            };
            for g in groups {
                left = left.saturating_sub(g.names.len());
                self.run_group(links, operation, &g, &by_name, tensors)?;
            }
        }
        Ok(())
    }

    /// Runs one group: fuses its tensors (unless it has one), runs the ring, unfuses.
    fn run_group(
        &self,
        links: &Links,
        operation: &'static str,
        group: &Group,
        by_name: &HashMap<String, usize>,
        tensors: &mut [Local],
    ) -> Result<()> {
        let indices: Vec<usize> = group
            .names
            .iter()
            .map(|n| {
                by_name.get(n).copied().ok_or_else(|| {
                    backend(
                        &self.name,
                        format!("rank 0 planned tensor {n}, which this call does not have"),
                    )
                })
            })
            .collect::<Result<_>>()?;
        let ring = Ring {
            rank: self.rank,
            size: self.size,
            next: &links.next,
            mailbox: &links.mailbox,
            timeout: self.timeout + grace(self.timeout),
        };
        let shown: Vec<&str> = group.names.iter().take(4).map(String::as_str).collect();
        let what = format!(
            "{} of {} tensor{} [{}{}]",
            group.op.name(),
            group.names.len(),
            if group.names.len() == 1 { "" } else { "s" },
            shown.join(", "),
            if group.names.len() > 4 { ", ..." } else { "" }
        );
        let run = |buf: &mut [u8]| match group.op {
            Op::Allreduce => ring.allreduce(group.seq, group.dtype, buf, &what),
            Op::Broadcast => ring.broadcast(group.seq, buf, &what),
        };
        let first_key = tensors[indices[0]].key.clone();
        let fail = |message: String| {
            backend(&self.name, message).at_key(&self.name, operation, first_key.clone())
        };
        if let [i] = indices[..] {
            let buf = tensors[i]
                .data
                .as_bytes_mut()
                .expect("owned arrays are contiguous");
            return run(buf).map_err(fail);
        }
        let total: usize = indices
            .iter()
            .map(|&i| tensors[i].data.as_bytes().expect("contiguous").len())
            .sum();
        let mut fused = Vec::with_capacity(total);
        for &i in &indices {
            fused.extend_from_slice(tensors[i].data.as_bytes().expect("contiguous"));
        }
        run(&mut fused).map_err(fail)?;
        let mut at = 0;
        for &i in &indices {
            let dst = tensors[i].data.as_bytes_mut().expect("contiguous");
            dst.copy_from_slice(&fused[at..at + dst.len()]);
            at += dst.len();
        }
        Ok(())
    }

    /// Writes each key's result into its outputs (row-sparse outputs are skipped, as MXNet
    /// does for a pull).
    fn write_outs(
        &self,
        operation: &'static str,
        tensors: &[Local],
        outs: &mut KeyedOuts<'_>,
    ) -> Result<()> {
        for (key, out) in outs.iter_mut() {
            if out.storage_type() == StorageType::RowSparse {
                continue;
            }
            let t = tensors.iter().find(|t| &t.key == key).expect("checked");
            out.assign(&t.data).map_err(self.at(operation, key))?;
        }
        Ok(())
    }

    /// Checks that each output has its key's value's shape.
    fn check_outs(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        outs: &KeyedOuts<'_>,
    ) -> Result<()> {
        for (i, (key, out)) in outs.keys().iter().zip(outs.outs()).enumerate() {
            let (_, value) = values
                .iter()
                .find(|(k, _)| *k == key)
                .expect("checked against values");
            value
                .check_shape_of(out, &format!("output {i}"))
                .map_err(self.at(operation, key))?;
        }
        Ok(())
    }
}

impl Drop for HorovodStore {
    fn drop(&mut self) {
        for s in self.servers.drain(..) {
            let _ = s
                .send(Outgoing::new(CMD_BYE, &[]), "goodbye")
                .and_then(|p| p.wait_timeout(Duration::from_secs(5)));
        }
        self.links = None;
        self.server = None;
        self.monitor = None;
        if let Some(node) = lock(&self.node).take() {
            if let Err(e) = node.leave() {
                log::debug!("kvstore-horovod: rank {} left uncleanly: {e}", self.rank);
            }
        }
    }
}

impl KVStoreBase for HorovodStore {
    fn type_name(&self) -> &str {
        &self.name
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn num_workers(&self) -> usize {
        self.size
    }

    fn is_capable(&self, capability: Capability) -> bool {
        CAPABILITIES.contains(&capability)
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        let _ = priority;
        let operation = "pushpull";
        outs.check_against(operation, values)?;
        let mut groups = values.groups();
        groups.sort_by(|a, b| a.key.cmp(&b.key));
        for g in &groups {
            let first = values.values()[g.positions[0]];
            for (i, &p) in g.positions.iter().enumerate().skip(1) {
                first
                    .check_like(values.values()[p], &format!("pushed value {i}"))
                    .map_err(self.at(operation, &g.key))?;
            }
        }
        self.check_outs(operation, values, outs)?;
        let mut tensors = Vec::with_capacity(groups.len());
        for g in &groups {
            let mut sum = own(values.values()[g.positions[0]]);
            for &p in &g.positions[1..] {
                sum.add_assign(values.values()[p])
                    .map_err(self.at(operation, &g.key))?;
            }
            tensors.push(Local {
                key: g.key.clone(),
                request: TensorRequest {
                    name: tensor_name(&g.key),
                    op: Op::Allreduce,
                    dtype: sum.dtype(),
                    shape: sum.shape().to_vec(),
                },
                data: sum,
            });
        }
        self.collective(operation, &mut tensors)?;
        self.write_outs(operation, &tensors, outs)
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        let _ = priority;
        let operation = "broadcast";
        outs.check_against(operation, values)?;
        values.check_one_value_per_key(&self.name, operation)?;
        self.check_outs(operation, values, outs)?;
        let mut tensors: Vec<Local> = values
            .iter()
            .map(|(key, value)| {
                let data = own(value);
                Local {
                    key: key.clone(),
                    request: TensorRequest {
                        name: tensor_name(key),
                        op: Op::Broadcast,
                        dtype: data.dtype(),
                        shape: data.shape().to_vec(),
                    },
                    data,
                }
            })
            .collect();
        tensors.sort_by(|a, b| a.key.cmp(&b.key));
        self.collective(operation, &mut tensors)?;
        self.write_outs(operation, &tensors, outs)
    }

    fn barrier(&self) -> Result<()> {
        match lock(&self.node).as_ref() {
            Some(node) => node
                .barrier(NodeGroup::Workers)
                .map_err(|e| backend(&self.name, e)),
            None => Err(Error::InvalidArgument(format!(
                "{}: this worker has left the job",
                self.name
            ))),
        }
    }
}
