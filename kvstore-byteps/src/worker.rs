//! [`BytePsStore`]: the worker side of the `byteps` store.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvstore_base::{
    with_in_place_sums_on_host, with_outs_fanned_out, with_values_on_host,
    with_values_summed_on_host, Capability, CreateRequest, Error, KVStoreBase, Key, KeyGroup,
    KeyedOuts, KeyedValues, NDArray, OptimizerSpec, Result, StorageType,
};
use kvstore_dist::cluster::Group;
use kvstore_dist::protocol::{self, InitMeta, Mode};
use kvstore_dist::shm::{Lease, Link};
use kvstore_dist::transport::{Connection, Outgoing, Pending, Response, TransportError};
use kvstore_dist::{DistConfig, DistStore, Node, Role};
use kvstore_local::reduce::{outbound, Outbound, ReduceConfig};

use crate::partition::{self, Partition, DEFAULT_PARTITION_BYTES};
use crate::schedule::CreditScheduler;

mod batched;

use batched::Flight;

/// The variable (or create option) with the partition size in bytes.
pub const PARTITION_BYTES_VAR: &str = "BYTEPS_PARTITION_BYTES";
/// The variable (or create option) with the scheduling credit, in partitions (0: none).
pub const SCHEDULING_CREDIT_VAR: &str = "BYTEPS_SCHEDULING_CREDIT";
/// The variable (or create option) that turns on asynchronous mode.
pub const ENABLE_ASYNC_VAR: &str = "BYTEPS_ENABLE_ASYNC";
/// Partitions of more than this many bytes move through the shared-memory region of their
/// server when it has one: the dist stores' threshold for a part in a message of its own
/// ([`protocol::BATCH_ITEM_BYTES`]).
pub const SHM_MIN_BYTES: usize = protocol::BATCH_ITEM_BYTES;

type Outcome = std::result::Result<Response, TransportError>;

/// A request on its way, and the shared-memory slots it uses.
struct Sent {
    pending: Pending,
    lease: Option<Lease>,
}

impl Sent {
    /// Waits for the answer. Any answer, an error message too, means the server is done with
    /// the slots; a request left unanswered (timed out, connection lost) keeps its lease in
    /// flight, which retires the region once dropped (the server may still write it).
    fn wait(self) -> (Outcome, Option<Lease>) {
        let outcome = self.pending.wait();
        let mut lease = self.lease;
        if let Some(l) = lease.as_mut() {
            l.settle(&outcome);
        }
        (outcome, lease)
    }

    /// Waits for the answer to a pull: its bytes, received or in the lease's reply slot.
    fn pulled(self) -> std::result::Result<Pulled, TransportError> {
        let (outcome, lease) = self.wait();
        let response = outcome?;
        match lease {
            Some(lease)
                if response.header.flags & protocol::FLAG_SHM_REPLY != 0
                    && response.payload.is_empty() =>
            {
                Ok(Pulled::Shm(lease))
            }
            // Answered over TCP after all (a server may), or flagged without a slot: the
            // length check of the outputs names it.
            _ => Ok(Pulled::Bytes(response.payload.into_vec())),
        }
    }
}

/// A pulled partition: received bytes, or the reply slot of an answered lease.
#[derive(Debug)]
enum Pulled {
    Bytes(Vec<u8>),
    Shm(Lease),
}

impl Default for Pulled {
    fn default() -> Self {
        Pulled::Bytes(Vec::new())
    }
}

impl Pulled {
    fn len(&self) -> usize {
        match self {
            Pulled::Bytes(b) => b.len(),
            Pulled::Shm(lease) => lease.reply.map_or(0, |s| s.len as usize),
        }
    }

    /// Calls `f` with the partition's bytes.
    fn with<T>(&self, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        match self {
            Pulled::Bytes(b) => Ok(f(b)),
            Pulled::Shm(lease) => lease
                .with_reply(f)
                .map_err(|e| Error::InvalidArgument(format!("shared-memory answer: {e}"))),
        }
    }
}

/// The BytePS settings of a worker, from `BYTEPS_*` variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BytePsConfig {
    /// `BYTEPS_PARTITION_BYTES` (default 4,096,000): the most bytes of one partition.
    pub partition_bytes: usize,
    /// `BYTEPS_SCHEDULING_CREDIT` (default 0): partitions in flight at once; 0 sends every
    /// partition of a call at once, without priority scheduling.
    pub scheduling_credit: usize,
    /// `BYTEPS_ENABLE_ASYNC` (default off): servers add each push into the stored value at once.
    pub asynchronous: bool,
}

impl Default for BytePsConfig {
    fn default() -> Self {
        BytePsConfig {
            partition_bytes: DEFAULT_PARTITION_BYTES,
            scheduling_credit: 0,
            asynchronous: false,
        }
    }
}

impl BytePsConfig {
    /// Reads the `BYTEPS_*` variables of `vars` (unset ones keep their defaults).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming a variable whose value is not valid.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<BytePsConfig> {
        let mut c = BytePsConfig::default();
        let bad = |var: &str, value: &str, want: &str| {
            Error::InvalidArgument(format!("{var}={value:?}: expected {want}"))
        };
        if let Some(v) = vars.get(PARTITION_BYTES_VAR) {
            c.partition_bytes = v
                .trim()
                .parse()
                .ok()
                .filter(|&n: &usize| n > 0)
                .ok_or_else(|| bad(PARTITION_BYTES_VAR, v, "a positive number of bytes"))?;
        }
        if let Some(v) = vars.get(SCHEDULING_CREDIT_VAR) {
            c.scheduling_credit = v
                .trim()
                .parse()
                .map_err(|_| bad(SCHEDULING_CREDIT_VAR, v, "a number of partitions (0: off)"))?;
        }
        if let Some(v) = vars.get(ENABLE_ASYNC_VAR) {
            c.asynchronous = match v.trim().to_ascii_lowercase().as_str() {
                "" | "0" | "false" | "no" | "off" => false,
                "1" | "true" | "yes" | "on" => true,
                _ => return Err(bad(ENABLE_ASYNC_VAR, v, "0 or 1")),
            };
        }
        Ok(c)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn backend(store: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Backend {
        store: store.to_string(),
        source: Box::new(e),
    }
}

/// A declared tensor.
#[derive(Debug)]
struct Tensor {
    key: Key,
    dtype: kvstore_base::DType,
    shape: Vec<usize>,
    parts: Vec<Partition>,
    /// Buffers that pulled partitions are received into, reused from call to call.
    buffers: Mutex<Vec<Vec<u8>>>,
}

impl Tensor {
    /// A receive buffer (a reused one when one is free).
    fn take_buffer(&self) -> Vec<u8> {
        lock(&self.buffers).pop().unwrap_or_default()
    }

    /// Returns receive buffers for reuse.
    fn give_buffers(&self, buffers: Vec<Vec<u8>>) {
        let mut pool = lock(&self.buffers);
        for b in buffers {
            if pool.len() < 2 * self.parts.len() && b.capacity() > 0 {
                pool.push(b);
            }
        }
    }

    fn byte_range(&self, i: usize) -> std::ops::Range<usize> {
        let size = self.dtype.size_of();
        let e = &self.parts[i].elements;
        e.start * size..e.end * size
    }

    fn check_value(&self, value: &NDArray, what: &str) -> Result<()> {
        Error::check_declared(&self.shape, self.dtype, value, what)
    }

    fn check_out(&self, out: &NDArray, what: &str) -> Result<()> {
        Error::check_shape(&self.shape, out, what)
    }

    /// What every worker declares to the server of partition `i`: the user's key names a
    /// single-partition tensor, `key.partN` one partition of a bigger one.
    fn init_meta(&self, i: usize) -> InitMeta {
        let key = if self.parts.len() == 1 {
            self.key.clone()
        } else {
            Key::from(format!("{}.part{i}", self.key))
        };
        InitMeta {
            dtype: self.dtype,
            elements: self.parts[i].elements.len() as u64,
            row_len: 0,
            row_sparse: false,
            key,
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    /// The first key declared: fixes int or string keys for the store's life.
    kind: Option<Key>,
    tensors: HashMap<Key, Arc<Tensor>>,
    /// Tensors declared so far: the next one's declaration index.
    declared: u64,
}

impl Table {
    fn check_kind(&self, operation: &'static str, key: &Key) -> Result<()> {
        match &self.kind {
            Some(first) if !first.same_kind(key) => Err(Error::MixedKeyTypes {
                operation,
                first: first.clone(),
                other: key.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// Returns the receive buffers of a call's answers to their tensors (and frees the slots of
/// the answers in shared memory).
fn recycle(tensors: &[Arc<Tensor>], answers: Vec<Vec<Pulled>>) {
    for (t, parts) in tensors.iter().zip(answers) {
        let buffers = parts
            .into_iter()
            .filter_map(|p| match p {
                Pulled::Bytes(b) => Some(b),
                Pulled::Shm(_) => None,
            })
            .collect();
        t.give_buffers(buffers);
    }
}

/// No answer yet for any partition of `tensors`.
fn empty_answers(tensors: &[Arc<Tensor>]) -> Vec<Vec<Pulled>> {
    tensors
        .iter()
        .map(|t| t.parts.iter().map(|_| Pulled::default()).collect())
        .collect()
}

/// The pushed bytes of a partition: its range of its tensor's outbound value.
fn pushed_bytes<'p>(
    tensors: &'p [Arc<Tensor>],
    payloads: &'p [Outbound<'_>],
) -> impl Fn(Task) -> Cow<'p, [u8]> + Copy {
    move |task: Task| {
        Cow::Borrowed(&payloads[task.tensor].bytes()[tensors[task.tensor].byte_range(task.part)])
    }
}

/// Every partition of every tensor, in order.
fn all_tasks(tensors: &[Arc<Tensor>]) -> Vec<Task> {
    tensors
        .iter()
        .enumerate()
        .flat_map(|(tensor, t)| (0..t.parts.len()).map(move |part| Task { tensor, part }))
        .collect()
}

/// One partition of one tensor of a call.
#[derive(Debug, Clone, Copy)]
struct Task {
    tensor: usize,
    part: usize,
}

/// A worker of a `byteps` job (see the [crate docs](crate)).
pub struct BytePsStore {
    name: String,
    config: BytePsConfig,
    rank: u32,
    num_workers: u32,
    timeout: Duration,
    node: Mutex<Option<Node>>,
    servers: Vec<Connection>,
    /// The shared-memory region lent to each server, where one is (same host, `KVSTORE_SHM`).
    shm: Vec<Option<Arc<Link>>>,
    table: Mutex<Table>,
    /// Held by a call that declares keys, from its check of the table to its record there:
    /// declarations are numbered in order (the partitions' wire keys), and two threads
    /// declaring at once would otherwise take the same numbers.
    declaring: Mutex<()>,
    /// `Some` when `BYTEPS_SCHEDULING_CREDIT` is not 0.
    scheduler: Option<CreditScheduler>,
    /// How a key's per-device values are summed before a push.
    reduce: ReduceConfig,
}

impl std::fmt::Debug for BytePsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BytePsStore")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("rank", &self.rank)
            .field("num_workers", &self.num_workers)
            .field("servers", &self.servers.len())
            .field("shm_connections", &self.shm_connections())
            .finish_non_exhaustive()
    }
}

impl BytePsStore {
    /// Joins the cluster of `dist` as a worker, connects to every server, says hello and lends
    /// each server on this host a shared-memory region (unless `KVSTORE_SHM=0`; any failure
    /// leaves that connection on TCP alone); in asynchronous mode rank 0 then makes every
    /// server add pushes into the stored values, and the workers meet in a barrier.
    ///
    /// # Errors
    /// [`Error::Backend`] when joining, connecting or saying hello fails or times out.
    pub fn connect(name: &str, dist: &DistConfig, config: BytePsConfig) -> Result<BytePsStore> {
        let partition = u64::try_from(config.partition_bytes).unwrap_or(u64::MAX);
        dist.require_max_message_bytes(
            name,
            (16 << 20).max(partition.saturating_add(4096)),
            "a partition (BYTEPS_PARTITION_BYTES) travels in one message, and small ones in \
             batches of 1 MiB",
        )?;
        let mut dist = dist.clone();
        dist.role = Role::Worker;
        let node = Node::join(&dist).map_err(|e| backend(name, e))?;
        let mut transport = dist.transport();
        transport.node_id = node.id();
        // A server's error (naming the workers a round waits for) arrives before our timeout.
        transport.timeout = dist.timeout
            + (dist.timeout / 4).min(Duration::from_secs(2))
            + Duration::from_millis(100);
        let mode = if config.asynchronous {
            Mode::Async
        } else {
            Mode::Sync
        };
        let mut servers = Vec::new();
        let mut shm = Vec::new();
        for server in node.servers() {
            let conn = Connection::connect(server.addr.as_str(), transport.clone())
                .map_err(|e| backend(name, e))?;
            let answer = conn
                .request(
                    Outgoing::new(protocol::CMD_HELLO, name.as_bytes())
                        .key(u64::from(node.rank()))
                        .aux(mode.code()),
                    &format!("hello from worker rank {}", node.rank()),
                )
                .map_err(|e| backend(name, e))?;
            if answer.header.aux != u64::from(server.rank) {
                return Err(Error::Backend {
                    store: name.to_string(),
                    source: format!(
                        "{server} answered as server rank {}: the node table is inconsistent",
                        answer.header.aux
                    )
                    .into(),
                });
            }
            shm.push(Link::attach(&conn, &dist));
            servers.push(conn);
        }
        let scheduler = (config.scheduling_credit > 0).then(|| {
            CreditScheduler::new(
                config
                    .scheduling_credit
                    .saturating_mul(config.partition_bytes),
            )
        });
        let store = BytePsStore {
            name: name.to_string(),
            config,
            rank: node.rank(),
            num_workers: dist.num_workers,
            timeout: transport.timeout,
            node: Mutex::new(Some(node)),
            servers,
            shm,
            table: Mutex::new(Table::default()),
            declaring: Mutex::new(()),
            scheduler,
            reduce: ReduceConfig::from_env(),
        };
        if config.asynchronous {
            store.make_servers_accumulate()?;
        }
        Ok(store)
    }

    /// The registry's factory: the dist configuration from the environment and the create
    /// options (`DMLC_*`, `KVSTORE_*`, `KVSTORE_CONFIG`, as
    /// [`DistStore::from_request`]), the `BYTEPS_*` variables from the same place.
    ///
    /// A process whose `DMLC_ROLE` is `server` or `scheduler` runs that role until the job ends
    /// and then **exits**, as the dist stores do.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad configuration, else as [`BytePsStore::connect`].
    pub fn from_request(request: &CreateRequest) -> Result<BytePsStore> {
        let (dist, vars) = kvstore_dist::worker::request_config(request)?;
        let config = BytePsConfig::from_vars(&vars)?;
        if dist.role != Role::Worker {
            // Runs the server or scheduler role and exits the process.
            DistStore::from_request(request, Mode::Sync)?;
            unreachable!("a server or scheduler role exits the process");
        }
        BytePsStore::connect(&request.name, &dist, config)
    }

    /// The settings in force.
    pub fn config(&self) -> BytePsConfig {
        self.config
    }

    /// The priority scheduler, when `BYTEPS_SCHEDULING_CREDIT` is not 0.
    pub fn scheduler(&self) -> Option<&CreditScheduler> {
        self.scheduler.as_ref()
    }

    /// Requests sent to the servers so far: the partitions of a call up to 64 KiB (under a
    /// scheduling credit, those granted at once) travel together, in about one message per server and MiB (and
    /// one for their pulls), so a call of a thousand small tensors costs a few messages.
    pub fn requests_sent(&self) -> u64 {
        self.servers.iter().map(|c| c.requests_sent()).sum()
    }

    /// Server connections that move big partitions through shared memory (a region lent and
    /// not retired).
    pub fn shm_connections(&self) -> usize {
        self.shm.iter().flatten().filter(|l| l.usable()).count()
    }

    /// Bytes written to the servers over TCP so far (frame headers included; partitions moved
    /// through shared memory count only their slots).
    pub fn bytes_sent(&self) -> u64 {
        self.servers.iter().map(Connection::bytes_sent).sum()
    }

    /// The partition keys and servers of `key`'s tensor, once declared.
    pub fn partitions(&self, key: impl Into<Key>) -> Option<Vec<Partition>> {
        lock(&self.table)
            .tensors
            .get(&key.into())
            .map(|t| t.parts.clone())
    }

    /// Asynchronous mode: the servers run MXNet's `test` optimizer with `rescale_grad` 1, which
    /// adds every push into the stored value (BytePS's async servers sum pushes into the store).
    fn make_servers_accumulate(&self) -> Result<()> {
        let sent = if self.rank == 0 {
            let spec = OptimizerSpec::new("test").with("rescale_grad", 1.0);
            let json = serde_json::to_vec(&spec).map_err(|e| backend(&self.name, e))?;
            let pending = self
                .servers
                .iter()
                .map(|c| {
                    c.send(
                        Outgoing::new(protocol::CMD_SET_OPTIMIZER, &json),
                        "asynchronous summation",
                    )
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| backend(&self.name, e))?;
            pending
                .into_iter()
                .try_for_each(|p| p.wait().map(drop))
                .map_err(|e| backend(&self.name, e))
        } else {
            Ok(())
        };
        let met = self.worker_barrier();
        sent.and(met)
    }

    fn worker_barrier(&self) -> Result<()> {
        match lock(&self.node).as_ref() {
            Some(node) => node
                .barrier(Group::Workers)
                .map_err(|e| backend(&self.name, e)),
            None => Err(Error::InvalidArgument(format!(
                "{}: this worker has left the cluster",
                self.name
            ))),
        }
    }

    fn transport_at(
        &self,
        operation: &'static str,
        key: &Key,
    ) -> impl FnOnce(TransportError) -> Error + '_ {
        let key = key.clone();
        move |e| backend(&self.name, e).at_key(&self.name, operation, key)
    }

    /// The tensors of `keys`, checked to be declared.
    fn tensors(&self, operation: &'static str, keys: &[&Key]) -> Result<Vec<Arc<Tensor>>> {
        let table = lock(&self.table);
        keys.iter()
            .map(|k| {
                table.check_kind(operation, k)?;
                table.tensors.get(*k).cloned().ok_or_else(|| {
                    Error::KeyNotInitialized.at_key(&self.name, operation, (*k).clone())
                })
            })
            .collect()
    }

    /// Sends `command` about partition `part` of `t` to its server: a push or pull of more
    /// than [`SHM_MIN_BYTES`] through the server's shared-memory region when it has room (the
    /// pushed bytes copied into a data slot, the answer expected in a reply slot), else the
    /// bytes over TCP.
    fn send(
        &self,
        t: &Tensor,
        part: usize,
        command: u32,
        payload: &[u8],
        operation: &'static str,
    ) -> Result<Sent> {
        let p = &t.parts[part];
        let what = format!("{operation} of key {} (partition {part})", t.key);
        let conn = &self.servers[p.server];
        let dtype = protocol::dtype_flag(t.dtype);
        if let Some(mut lease) = self.lease(t, part, command, payload, &what) {
            let (flags, slots) = lease.slots();
            let out = Outgoing::new(command, &slots)
                .key(p.key)
                .aux(part as u64)
                .flags(dtype | flags);
            lease.sending();
            // The answer is expected in the reply slot: no receive buffer.
            return conn
                .send(out, &what)
                .map(|pending| Sent {
                    pending,
                    lease: Some(lease),
                })
                .map_err(self.transport_at(operation, &t.key));
        }
        let out = Outgoing::new(command, payload)
            .key(p.key)
            .aux(part as u64)
            .flags(dtype);
        let sent = if command == protocol::CMD_PULL {
            conn.send_into(out, &what, t.take_buffer())
        } else {
            conn.send(out, &what)
        };
        sent.map(|pending| Sent {
            pending,
            lease: None,
        })
        .map_err(self.transport_at(operation, &t.key))
    }

    /// Shared-memory slots for a push (filled with `payload`) or pull of partition `part` of
    /// `t`, when it is big enough and its server has a region with room.
    fn lease(
        &self,
        t: &Tensor,
        part: usize,
        command: u32,
        payload: &[u8],
        what: &str,
    ) -> Option<Lease> {
        let bytes = t.byte_range(part).len();
        if bytes <= SHM_MIN_BYTES {
            return None;
        }
        let link = self.shm[t.parts[part].server].as_ref()?;
        match command {
            protocol::CMD_PUSH => link.lease(Some(payload), None, what),
            protocol::CMD_PULL => link.lease(None, Some(bytes), what),
            _ => None,
        }
    }

    /// Declares the keys of `values` (rank 0's value is the one kept).
    fn declare(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
    ) -> Result<Vec<Arc<Tensor>>> {
        let groups = values.groups();
        let tensors: Vec<Arc<Tensor>> = {
            let table = lock(&self.table);
            let mut out: Vec<Arc<Tensor>> = Vec::with_capacity(groups.len());
            for (n, g) in groups.iter().enumerate() {
                table.check_kind(operation, &g.key)?;
                if table.tensors.contains_key(&g.key) || g.positions.len() != 1 {
                    return Err(Error::DuplicateInit.at_key(&self.name, operation, g.key.clone()));
                }
                let value = values.values()[g.positions[0]];
                let parts = partition::partitions(
                    table.declared + n as u64,
                    value.size(),
                    value.dtype().size_of(),
                    self.config.partition_bytes,
                    self.servers.len(),
                )
                .map_err(|m| {
                    Error::InvalidArgument(m).at_key(&self.name, operation, g.key.clone())
                })?;
                out.push(Arc::new(Tensor {
                    key: g.key.clone(),
                    dtype: value.dtype(),
                    shape: value.shape().to_vec(),
                    parts,
                    buffers: Mutex::new(Vec::new()),
                }));
            }
            out
        };
        // Each partition's declaration (and rank 0's data), small ones batched per server,
        // each message built as it goes. Only rank 0 sends data.
        let with_data = self.rank == 0;
        let outbound: Vec<Outbound<'_>> = groups
            .iter()
            .map(|g| match values.values()[g.positions[0]] {
                _ if !with_data => Outbound::Borrowed(&[]),
                v => outbound(&[v], &self.reduce),
            })
            .collect();
        let tasks = all_tasks(&tensors);
        let payload = |task: Task| {
            let t = &tensors[task.tensor];
            let mut payload = t.init_meta(task.part).encode();
            if with_data {
                payload.extend_from_slice(&outbound[task.tensor].bytes()[t.byte_range(task.part)]);
            }
            Cow::Owned(payload)
        };
        let (sent, _) = self.send_batched(
            operation,
            protocol::CMD_INIT,
            &tensors,
            &tasks,
            payload,
            false,
        )?;
        self.acknowledged(operation, &tensors, sent)?;
        let mut table = lock(&self.table);
        for t in &tensors {
            if table.kind.is_none() {
                table.kind = Some(t.key.clone());
            }
            table.declared += 1;
            table.tensors.insert(t.key.clone(), Arc::clone(t));
        }
        Ok(tensors)
    }

    /// Waits for every message; the first failure (a lost server first) is returned.
    fn acknowledged(
        &self,
        operation: &'static str,
        tensors: &[Arc<Tensor>],
        sent: Vec<Flight>,
    ) -> Result<()> {
        let mut first: Option<Error> = None;
        for (task, e) in sent.into_iter().filter_map(Flight::acknowledged) {
            self.keep_first(&mut first, operation, &tensors[task.tensor].key, e);
        }
        first.map_or(Ok(()), Err)
    }

    /// Keeps in `first` the first failure of a call, or a lost server's, wrapped with `key`.
    fn keep_first(
        &self,
        first: &mut Option<Error>,
        operation: &'static str,
        key: &Key,
        e: TransportError,
    ) {
        let lost = matches!(e, TransportError::PeerClosed { .. });
        let e = self.transport_at(operation, key)(e);
        if lost || first.is_none() {
            *first = Some(e);
        }
    }

    /// Waits for the pulls of a call: each partition's answer, and the first failure among
    /// the call's failed pushes (`failed`) and its pulls (see [`keep_first`](Self::keep_first)).
    fn gather(
        &self,
        operation: &'static str,
        tensors: &[Arc<Tensor>],
        failed: Vec<(Task, TransportError)>,
        pulled: Vec<Flight>,
    ) -> (Vec<Vec<Pulled>>, Option<Error>) {
        let mut first: Option<Error> = None;
        let key = |task: Task| &tensors[task.tensor].key;
        for (task, e) in failed {
            self.keep_first(&mut first, operation, key(task), e);
        }
        let mut answers = empty_answers(tensors);
        for flight in pulled {
            match flight.pulled(tensors) {
                Ok(parts) => {
                    for (task, a) in parts {
                        answers[task.tensor][task.part] = a;
                    }
                }
                Err((task, e)) => self.keep_first(&mut first, operation, key(task), e),
            }
        }
        (answers, first)
    }

    /// Pushes the keys of `values` (each key's values summed first), partition by partition
    /// in priority order under the credit; with `outs`, pulls every partition back once its
    /// round is complete and writes the sums there. Non-root ranks push zeros when `zeros`.
    fn push_pull(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        outs: Option<&mut KeyedOuts<'_>>,
        priority: i32,
        zeros: bool,
    ) -> Result<()> {
        let mut groups = values.groups();
        groups.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&Key> = groups.iter().map(|g| &g.key).collect();
        let tensors = self.tensors(operation, &keys)?;
        self.check_groups(operation, values, &groups, &tensors)?;
        if let Some(outs) = outs.as_deref() {
            self.check_outs(operation, outs)?;
        }
        let payloads: Vec<Outbound<'_>> = groups
            .iter()
            .zip(&tensors)
            .map(|(g, t)| {
                if zeros && self.rank != 0 {
                    return Ok(Outbound::Owned(NDArray::zeros(&t.shape, t.dtype)));
                }
                let arrays: Vec<&NDArray> =
                    g.positions.iter().map(|&p| values.values()[p]).collect();
                Ok(outbound(&arrays, &self.reduce))
            })
            .collect::<Result<_>>()?;
        let tasks = all_tasks(&tensors);
        let pulls = outs.is_some();
        let (failed, pulled) = match &self.scheduler {
            None => self.send_all(operation, &tensors, &payloads, &tasks, pulls)?,
            Some(s) => {
                self.send_scheduled(s, operation, &tensors, &payloads, &tasks, pulls, priority)?
            }
        };
        let (answers, first) = self.gather(operation, &tensors, failed, pulled);
        let written = match (first, outs) {
            (Some(e), _) => Err(e),
            (None, Some(outs)) => self.write_outs(operation, &tensors, &answers, outs, true),
            (None, None) => Ok(()),
        };
        recycle(&tensors, answers);
        written
    }

    /// Every partition at once (no scheduling; small ones batched per server): each push,
    /// then its pull when `pulls`. Returns the failed pushes, once every push is acknowledged,
    /// and the pulls on their way.
    #[allow(clippy::type_complexity)]
    fn send_all(
        &self,
        operation: &'static str,
        tensors: &[Arc<Tensor>],
        payloads: &[Outbound<'_>],
        tasks: &[Task],
        pulls: bool,
    ) -> Result<(Vec<(Task, TransportError)>, Vec<Flight>)> {
        let payload = pushed_bytes(tensors, payloads);
        let (pushed, pulled) = self.send_batched(
            operation,
            protocol::CMD_PUSH,
            tensors,
            tasks,
            payload,
            pulls,
        )?;
        // A push's slot is free once acknowledged.
        let failed = pushed
            .into_iter()
            .filter_map(Flight::acknowledged)
            .collect();
        Ok((failed, pulled))
    }

    /// Partitions in priority order under the credit: a partition's push goes out once it has
    /// a grant, which is released when the server acknowledges the push; its pull (when
    /// `pulls`) follows the push at once and waits on the server for the round. Small
    /// partitions granted at once share a batch per server, and its acknowledgement.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn send_scheduled(
        &self,
        scheduler: &CreditScheduler,
        operation: &'static str,
        tensors: &[Arc<Tensor>],
        payloads: &[Outbound<'_>],
        tasks: &[Task],
        pulls: bool,
        priority: i32,
    ) -> Result<(Vec<(Task, TransportError)>, Vec<Flight>)> {
        let keyed: Vec<(u64, usize)> = tasks
            .iter()
            .map(|t| {
                let tensor = &tensors[t.tensor];
                (tensor.parts[t.part].key, tensor.byte_range(t.part).len())
            })
            .collect();
        let payload = pushed_bytes(tensors, payloads);
        let small = |task: Task| tensors[task.tensor].byte_range(task.part).len() <= SHM_MIN_BYTES;
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<(Vec<crate::schedule::Grant<'_>>, Flight)>();
            // Releases the grants of each push message (and its slot) once it is acknowledged.
            let acks = s.spawn(move || {
                rx.into_iter()
                    .filter_map(|(grants, flight)| {
                        let failed = flight.acknowledged();
                        drop(grants);
                        failed
                    })
                    .collect::<Vec<_>>()
            });
            let mut pulled = Vec::new();
            let mut queue = scheduler.enqueue(priority, &keyed);
            let sent = loop {
                let grant = match queue.next_grant(self.timeout) {
                    Ok(Some(g)) => g,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(self.no_credit(operation, tensors, tasks, e)),
                };
                // Small partitions granted at once (in priority order, within the credit)
                // travel together, up to a batch's worth; a big one granted on the way goes too.
                let mut granted = vec![(tasks[grant.tag], grant)];
                let mut bytes = 0;
                while small(granted[granted.len() - 1].0)
                    && granted.len() < protocol::BATCH_MAX_ITEMS
                    && bytes < protocol::BATCH_BYTES
                {
                    let Some(g) = queue.try_next_grant() else {
                        break;
                    };
                    let task = tasks[g.tag];
                    bytes += tensors[task.tensor].byte_range(task.part).len();
                    granted.push((task, g));
                }
                let mut out = Vec::new();
                let result = self.send_granted(
                    operation,
                    tensors,
                    granted,
                    payload,
                    pulls,
                    &mut out,
                    &mut pulled,
                );
                for flight in out {
                    let _ = tx.send(flight);
                }
                if let Err(e) = result {
                    break Err(e);
                }
            };
            drop(queue);
            drop(tx);
            let acks = acks
                .join()
                .expect("the acknowledgement thread does not panic");
            sent.map(|()| (acks, pulled))
        })
    }

    /// The error of a partition that got no scheduling credit in time, naming it and what held
    /// the credit.
    fn no_credit(
        &self,
        operation: &'static str,
        tensors: &[Arc<Tensor>],
        tasks: &[Task],
        e: crate::schedule::NoCredit,
    ) -> Error {
        let task = tasks[e.tag];
        let key = tensors[task.tensor].key.clone();
        let mut message = format!(
            "partition {} got no scheduling credit within {:?}: {} bytes of earlier pushes \
             were not acknowledged by their servers ({} partitions waiting, {} bytes of credit)",
            task.part,
            e.waited,
            e.in_flight,
            e.waiting,
            self.scheduler.as_ref().map_or(0, CreditScheduler::credit),
        );
        if !self.config.asynchronous {
            message.push_str(
                "; a sync server acknowledges a worker's second push of a partition only once \
                 every worker pushed it once, so workers that push a key twice, in different \
                 orders, wait on each other",
            );
        }
        Error::Backend {
            store: self.name.clone(),
            source: message.into(),
        }
        .at_key(&self.name, operation, key)
    }

    /// Checks every value of `values` against its declared tensor (shape, dtype).
    fn check_values(&self, operation: &'static str, values: &KeyedValues<'_>) -> Result<()> {
        let groups = values.groups();
        let keys: Vec<&Key> = groups.iter().map(|g| &g.key).collect();
        let tensors = self.tensors(operation, &keys)?;
        self.check_groups(operation, values, &groups, &tensors)
    }

    fn check_groups(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        groups: &[KeyGroup],
        tensors: &[Arc<Tensor>],
    ) -> Result<()> {
        for (g, t) in groups.iter().zip(tensors) {
            for (i, &p) in g.positions.iter().enumerate() {
                t.check_value(values.values()[p], &format!("pushed value {i}"))
                    .map_err(|e| e.at_key(&self.name, operation, g.key.clone()))?;
            }
        }
        Ok(())
    }

    fn check_outs(&self, operation: &'static str, outs: &KeyedOuts<'_>) -> Result<()> {
        let keys: Vec<&Key> = outs.keys().iter().collect();
        let tensors = self.tensors(operation, &keys)?;
        for (i, (t, out)) in tensors.iter().zip(outs.outs()).enumerate() {
            t.check_out(out, &format!("output {i}"))
                .map_err(|e| e.at_key(&self.name, operation, t.key.clone()))?;
        }
        Ok(())
    }

    /// Writes each key's partitions into its outputs, cast to the output's dtype.
    fn write_outs(
        &self,
        operation: &'static str,
        tensors: &[Arc<Tensor>],
        answers: &[Vec<Pulled>],
        outs: &mut KeyedOuts<'_>,
        ignore_sparse: bool,
    ) -> Result<()> {
        let index: HashMap<&Key, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (&t.key, i))
            .collect();
        // Every answer's length first: no output is written when one is wrong.
        for (t, answer) in tensors.iter().zip(answers) {
            for (part, bytes) in answer.iter().enumerate() {
                if bytes.len() != t.byte_range(part).len() {
                    return Err(Error::InvalidArgument(format!(
                        "server rank {} answered {} bytes for partition {part}, {} expected",
                        t.parts[part].server,
                        bytes.len(),
                        t.byte_range(part).len()
                    ))
                    .at_key(&self.name, operation, t.key.clone()));
                }
            }
        }
        for (key, out) in outs.iter_mut() {
            let i = *index.get(key).expect("checked");
            let t = &tensors[i];
            let at = |e: Error| e.at_key(&self.name, operation, key.clone());
            if out.storage_type() == StorageType::Dense && out.dtype() == t.dtype {
                if let Some(dst) = out.as_bytes_mut() {
                    for (part, bytes) in answers[i].iter().enumerate() {
                        let dst = &mut dst[t.byte_range(part)];
                        bytes.with(|b| dst.copy_from_slice(b)).map_err(at)?;
                    }
                    continue;
                }
            }
            if ignore_sparse && out.storage_type() == StorageType::RowSparse {
                continue;
            }
            let mut whole: Vec<u8> =
                Vec::with_capacity(t.shape.iter().product::<usize>() * t.dtype.size_of());
            for bytes in &answers[i] {
                bytes.with(|b| whole.extend_from_slice(b)).map_err(at)?;
            }
            let value = NDArray::from_bytes(&t.shape, t.dtype, &whole).map_err(at)?;
            if out.storage_type() == StorageType::RowSparse {
                **out = value.to_row_sparse().map_err(at)?.astype(out.dtype());
            } else {
                out.assign(&value).map_err(at)?;
            }
        }
        Ok(())
    }

    /// Pulls the keys of `outs` (every partition at once).
    fn pull_keys(
        &self,
        operation: &'static str,
        outs: &mut KeyedOuts<'_>,
        ignore_sparse: bool,
    ) -> Result<()> {
        let mut groups = outs.groups();
        groups.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&Key> = groups.iter().map(|g| &g.key).collect();
        let tensors = self.tensors(operation, &keys)?;
        self.check_outs(operation, outs)?;
        let tasks = all_tasks(&tensors);
        let (pulled, _) = self.send_batched(
            operation,
            protocol::CMD_PULL,
            &tensors,
            &tasks,
            |_| Cow::Borrowed(&[]),
            false,
        )?;
        let (answers, first) = self.gather(operation, &tensors, Vec::new(), pulled);
        let written = match first {
            Some(e) => Err(e),
            None => self.write_outs(operation, &tensors, &answers, outs, ignore_sparse),
        };
        recycle(&tensors, answers);
        written
    }
}

impl KVStoreBase for BytePsStore {
    fn type_name(&self) -> &str {
        &self.name
    }

    fn rank(&self) -> usize {
        self.rank as usize
    }

    fn num_workers(&self) -> usize {
        self.num_workers as usize
    }

    fn is_capable(&self, capability: Capability) -> bool {
        crate::CAPABILITIES.contains(&capability)
    }

    /// Arrays in GPU memory are taken as BytePS's communication service takes them: a key's
    /// values summed on a GPU, one array per key copied to the host and pushed, the result
    /// copied to one GPU output and from there to the others.
    fn handles_device_arrays(&self) -> bool {
        true
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        with_values_on_host(values, |values| {
            let _declaring = lock(&self.declaring);
            self.declare("init", values).map(drop)
        })
    }

    fn push_batch(&self, values: &KeyedValues<'_>, priority: i32) -> Result<()> {
        let check = |values: &KeyedValues<'_>| self.check_values("push", values);
        with_values_summed_on_host(&self.name, "push", values, check, |values| {
            self.push_pull("push", values, None, priority, false)
        })
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        let _ = priority;
        if outs.any_on_device() {
            // Every output, before one stands in for the others of its key.
            self.check_outs("pull", outs)?;
        }
        with_outs_fanned_out("pull", outs, |outs| {
            self.pull_keys("pull", outs, ignore_sparse)
        })
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        let operation = "pushpull";
        outs.check_against(operation, values)?;
        if values.any_on_device() || outs.any_on_device() {
            // Every value and output is checked before a value is summed or copied.
            self.check_values(operation, values)?;
            self.check_outs(operation, outs)?;
        }
        with_values_summed_on_host(
            &self.name,
            operation,
            values,
            |_| Ok(()),
            |values| {
                with_outs_fanned_out(operation, outs, |outs| {
                    self.push_pull(operation, values, Some(outs), priority, false)
                })
            },
        )
    }

    fn pushpull_in_place_batch(&self, values: &mut KeyedOuts<'_>, priority: i32) -> Result<()> {
        let operation = "pushpull";
        with_in_place_sums_on_host(
            &self.name,
            operation,
            values,
            |view| self.check_values(operation, view),
            |sums, outs| self.push_pull(operation, sums, Some(outs), priority, false),
        )
    }

    /// BytePS's broadcast: keys not declared yet are declared (rank 0's value), then every
    /// worker push-pulls, rank 0 its value and the others zeros, so that the sum is rank 0's
    /// value.
    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        outs.check_against("broadcast", values)?;
        values.check_one_value_per_key(&self.name, "broadcast")?;
        outs.check_shapes_against(&self.name, "broadcast", values)?;
        // Values of keys already declared: their tensors' shape and dtype, before any key is
        // declared.
        {
            let table = lock(&self.table);
            for (key, value) in values.iter() {
                if let Some(t) = table.tensors.get(key) {
                    t.check_value(value, "the broadcast value")
                        .map_err(|e| e.at_key(&self.name, "broadcast", key.clone()))?;
                }
            }
        }
        // Every output checked: arrays in device memory are staged before any key is declared.
        with_values_on_host(values, |values| {
            with_outs_fanned_out("broadcast", outs, |outs| {
                let declaring = lock(&self.declaring);
                let new: Vec<(Key, &NDArray)> = {
                    let table = lock(&self.table);
                    values
                        .iter()
                        .filter(|(k, _)| !table.tensors.contains_key(*k))
                        .map(|(k, v)| (k.clone(), v))
                        .collect()
                };
                // With async servers, which add every push, rank 0's value cannot replace a
                // stored one. (A key declared here holds it already: pulled below.)
                if self.config.asynchronous && new.len() < values.len() {
                    let table = lock(&self.table);
                    let stored = values
                        .keys()
                        .iter()
                        .find(|k| table.tensors.contains_key(*k));
                    if let Some(key) = stored {
                        return Err(Error::InvalidArgument(
                            "broadcast of a key already declared, with BYTEPS_ENABLE_ASYNC: the \
                             servers add every push, so rank 0's value cannot replace the stored \
                             one; broadcast a key before its first push"
                                .into(),
                        )
                        .at_key(&self.name, "broadcast", key.clone()));
                    }
                }
                if !new.is_empty() {
                    let (keys, arrays): (Vec<Key>, Vec<&NDArray>) = new.into_iter().unzip();
                    self.declare("broadcast", &KeyedValues::new("broadcast", keys, arrays)?)?;
                }
                drop(declaring);
                if self.config.asynchronous {
                    // Declared just now with rank 0's value, which every worker's init waited
                    // for: a pull reads it (a push would be added to it).
                    return self.pull_keys("broadcast", outs, false);
                }
                self.push_pull("broadcast", values, Some(outs), priority, true)
            })
        })
    }

    fn set_optimizer(&self, optimizer: &OptimizerSpec) -> Result<()> {
        // BytePS's servers only sum: workers run the optimizer on the summed gradients.
        let _ = optimizer;
        Err(self.unsupported("set_optimizer"))
    }

    fn barrier(&self) -> Result<()> {
        self.worker_barrier()
    }
}

impl Drop for BytePsStore {
    fn drop(&mut self) {
        let pending: Vec<Pending> = self
            .servers
            .iter()
            .filter_map(|c| {
                c.send(Outgoing::new(protocol::CMD_BYE, &[]), "goodbye")
                    .ok()
            })
            .collect();
        for p in pending {
            if let Err(e) = p.wait() {
                log::warn!("{}: goodbye to a server failed: {e}", self.name);
            }
        }
        self.servers.clear();
        if let Some(node) = lock(&self.node).take() {
            if let Err(e) = node.leave() {
                log::warn!("{}: leaving the cluster failed: {e}", self.name);
            }
        }
    }
}
