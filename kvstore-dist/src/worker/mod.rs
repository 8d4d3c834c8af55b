//! The worker side: the `dist_sync`, `dist_async` and `dist_device_sync` stores.
//!
//! Creating a store joins the cluster as a worker ([`Node::join_recovering`]: blocks until
//! every node has registered; once the job runs, a new worker takes a lost worker's place, see
//! [`DistStore::is_recovery`]), connects to every server and says hello (rank and mode). Then:
//!
//! - `init` declares every key on its servers from every worker; rank 0 also sends the value,
//!   which is the one kept; each worker's `init` returns once it is in place (MXNet: rank 0
//!   pushes, then a worker barrier). A key's value lives whole on one server, or split across
//!   all of them at or above `MXNET_KVSTORE_BIGARRAY_BOUND` elements
//!   ([`placement`](crate::placement)).
//! - `push` sums a key's per-device values on the worker, then sends every part of every key
//!   of the call before waiting for any answer (the calls are pipelined, in ascending key order
//!   as MXNet); a sync push returns once the servers merged it (as MXNet's push does not block
//!   its caller; the round's last push once the round is updated), and the worker's next pull
//!   of the key waits for the round to close. The caller's arrays are only read. Row-sparse
//!   values of a key kept by rows (a row-sparse key, or a dense one placed in whole rows) send
//!   only the rows of their sum (see [`protocol`](crate::protocol#row-sparse-keys)).
//! - `pull` asks every part and writes the answers into the outputs, casting to the output's
//!   dtype; `pushpull` does both in one message per part; `broadcast` is init then pull;
//!   `row_sparse_pull` fetches only the requested rows.
//! - `set_optimizer` checks the spec locally, rank 0 sends it to every server (which rebuild
//!   it from the optimizer registry), then the workers meet in a barrier so that no push
//!   reaches a server before its optimizer.
//! - `set_updater` is unsupported: the optimizer runs on the servers, and a closure cannot
//!   travel to them (use `set_optimizer`).
//! - `save_optimizer_states` joins the servers' states of their slices into one file of whole
//!   keys, `local`'s format; `load_optimizer_states` (on every worker) cuts one for the
//!   servers (`worker/states.rs`).
//! - On a server's host, the worker lends the server a shared-memory region right after its
//!   hello (unless `KVSTORE_SHM=0`): big parts of pushes (compressed or not), pulls and
//!   pushpulls then move through it (pushed elements copied in, answers written there by the server), and the
//!   TCP message carries only the slots. Any failure leaves that connection on TCP alone.
//! - With a name holding `device` (`dist_device_sync`), arrays in GPU memory are taken as they
//!   are: summed on a GPU before a push, pulled once per key to the host (`worker/device.rs`).
//! - Dropping the store says goodbye to every server and to the scheduler.
//!
//! Every wait is bounded by `KVSTORE_TIMEOUT_SECS` (plus a little, so that a server's error
//! naming the workers a round waits for arrives first; a worker waiting for rank 0's
//! `load_optimizer_states` waits up to ten times it); a server that dies fails the pending
//! requests at once, naming it.

mod compressed;
mod device;
mod exchange;
mod keys;
mod rows;
pub(crate) mod shm_link;
mod states;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvstore_base::{
    with_outs_fanned_out, with_values_on_host, with_values_summed_on_host, Capability,
    CompressionParams, CreateRequest, Error, KVStoreBase, Key, KeyGroup, KeyedOuts, KeyedValues,
    NDArray, OptimizerSpec, PriorityGate, Result, StorageType,
};
use kvstore_compression::{Codec, CompressionSpec};
use kvstore_local::reduce::{self, ReduceConfig};

use self::compressed::check_compressible;
use self::keys::{KeyMeta, KeyTable};
use self::rows::{log_rows, rows_payload};
use self::shm_link::Link;
use crate::cluster::Group;
use crate::config::{DistConfig, Role};
use crate::node::Node;
use crate::protocol::{self, Hello, Mode};
use crate::transport::{Connection, Outgoing, Pending, Response, TransportError};

/// A server's answer to a request sent to every server; `None` when it was not awaited
/// (another server was lost first: it may have acted on the request).
type ServerOutcome = Option<std::result::Result<Response, TransportError>>;

/// A worker of a dist job (see the [module docs](self)).
pub struct DistStore {
    name: String,
    mode: Mode,
    rank: u32,
    num_workers: u32,
    bigarray_bound: usize,
    node: Mutex<Option<Node>>,
    servers: Vec<Arc<Connection>>,
    /// The shared-memory region lent to each server, where one is (same host, `KVSTORE_SHM`).
    shm: Vec<Option<Arc<Link>>>,
    keys: Mutex<KeyTable>,
    /// Held by an init from its key checks until its keys are recorded: string keys take their
    /// wire ids in init order, and two threads' inits must not take the same one.
    initialising: Mutex<()>,
    /// The gradient-compression codec, once set.
    codec: Mutex<Option<Codec>>,
    /// Quantisation residuals by key wire id (whole keys; parts index into them).
    residuals: Mutex<HashMap<u64, Vec<f32>>>,
    /// Calls send their messages in priority order.
    send_gate: PriorityGate,
    /// Set once an optimizer runs on the servers.
    optimizer: AtomicBool,
    /// The optimizer this worker set, to refuse a push it would refuse before any key of the
    /// call is sent; `None` before `set_optimizer` and after a load of states (a state file
    /// may replace the servers' optimizer): then only what every optimizer refuses is checked.
    updater: Mutex<Option<kvstore_optimizer::Updater>>,
    /// How a key's per-device values are summed before a push.
    reduce: ReduceConfig,
    /// `load_optimizer_states` calls so far (numbered alike on every worker).
    loads: std::sync::atomic::AtomicU64,
    /// The job's timeout (`KVSTORE_TIMEOUT_SECS`), for waits outside the transport.
    timeout: Duration,
    /// The largest message a node accepts (`KVSTORE_MAX_MESSAGE_BYTES`): a call that would
    /// send a bigger one over TCP is refused before it sends anything.
    max_message_bytes: u64,
    /// This worker took the place of a lost worker (MXNet's `is_recovery`): its inits keep the
    /// servers' values, and its `set_optimizer` / `set_gradient_compression` keep the servers'
    /// settings without a barrier.
    recovered: bool,
    /// MXNet's device communicator (a store name holding `device`): GPU values summed on a
    /// GPU before a push, pulls copied GPU to GPU (`worker/device.rs`).
    device_comm: bool,
    /// Log each row-sparse push and pull (`MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE`).
    row_sparse_verbose: bool,
}

impl std::fmt::Debug for DistStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistStore")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("rank", &self.rank)
            .field("num_workers", &self.num_workers)
            .field("servers", &self.servers.len())
            .finish_non_exhaustive()
    }
}

/// The variable (or create option) naming a `kvstore.toml` whose `[dist]` table configures the
/// store under the environment.
pub const CONFIG_VAR: &str = "KVSTORE_CONFIG";

/// The settings of a store created with `request`: the process environment with the create
/// options over it ([`crate::config::request_vars`]), and the dist configuration they give
/// over the `KVSTORE_CONFIG` file when one is named. Every store of a dist job
/// (`dist_*`, `byteps`, `pslite_dist_sync`) reads its configuration so.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the store, for a bad variable or file.
pub fn request_config(
    request: &CreateRequest,
) -> Result<(DistConfig, std::collections::HashMap<String, String>)> {
    let vars = crate::config::request_vars(&request.options);
    let invalid = |e: crate::ConfigError| Error::InvalidArgument(format!("{}: {e}", request.name));
    let file = match vars.get(CONFIG_VAR) {
        Some(path) => crate::DistFile::from_path(std::path::Path::new(path)).map_err(invalid)?,
        None => crate::DistFile::default(),
    };
    let config = DistConfig::from_vars_and_file(vars.clone(), &file).map_err(invalid)?;
    Ok((config, vars))
}

/// Extra time a worker waits beyond the timeout, so that a server's error (which names the
/// workers a round waits for) arrives before the worker's own timeout.
fn grace(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_secs(2)) + Duration::from_millis(100)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A value ready to send: the caller's own bytes, or a summed / standardised copy.
enum Outbound<'a> {
    Borrowed(&'a NDArray),
    Owned(NDArray),
}

impl Outbound<'_> {
    /// The array: dense and contiguous.
    fn array(&self) -> &NDArray {
        match self {
            Outbound::Borrowed(a) => a,
            Outbound::Owned(a) => a,
        }
    }

    fn bytes(&self) -> &[u8] {
        self.array()
            .as_bytes()
            .expect("outbound arrays are dense and contiguous")
    }
}

/// The sum of a key's values (one per device) as bytes in the key's layout, in MXNet's
/// association order (its CPU reduction's, as the `local` store), threaded for big arrays.
fn outbound<'a>(values: &[&'a NDArray], config: &ReduceConfig) -> Outbound<'a> {
    if let [single] = values {
        if single.as_bytes().is_some() {
            return Outbound::Borrowed(single);
        }
    }
    // Sent at once, not read again here: big sums bypass the cache.
    Outbound::Owned(reduce::sum_values(values, config, true))
}

/// What a push sends for one key.
enum Payload<'a> {
    /// The sum of its values, every element.
    Dense(Outbound<'a>),
    /// For each part, the rows of the sum of its row-sparse values ([`protocol::RowsPush`]).
    Rows(Vec<Vec<u8>>),
}

impl DistStore {
    /// Joins the cluster of `config` as a worker and connects to every server.
    ///
    /// # Errors
    /// [`Error::Backend`] when joining (see [`Node::join`]), connecting or saying hello fails
    /// or times out, naming the scheduler or the server.
    pub fn connect(name: &str, mode: Mode, config: &DistConfig) -> Result<DistStore> {
        let mut config = config.clone();
        config.role = Role::Worker;
        let node = Node::join_recovering(&config).map_err(|e| backend(name, e))?;
        let recovered = node.is_recovery();
        let mut transport = config.transport();
        transport.node_id = node.id();
        transport.timeout = config.timeout + grace(config.timeout);
        let hello = Hello {
            rank: node.rank(),
            mode,
        };
        let mut servers = Vec::new();
        let mut shm = Vec::new();
        for server in node.servers() {
            let conn = Connection::connect(server.addr.as_str(), transport.clone())
                .map_err(|e| backend(name, e))?;
            let what = format!("hello from worker rank {}", hello.rank);
            let answer = conn
                .request(
                    Outgoing::new(protocol::CMD_HELLO, name.as_bytes())
                        .key(u64::from(hello.rank))
                        .aux(hello.mode.code())
                        .flags(recovery_flags(recovered)),
                    &what,
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
            shm.push(Link::attach(&conn, &config));
            servers.push(Arc::new(conn));
        }
        Ok(DistStore {
            name: name.to_string(),
            mode,
            rank: node.rank(),
            num_workers: config.num_workers,
            bigarray_bound: usize::try_from(config.bigarray_bound).unwrap_or(usize::MAX),
            node: Mutex::new(Some(node)),
            servers,
            shm,
            keys: Mutex::new(KeyTable::default()),
            initialising: Mutex::new(()),
            codec: Mutex::new(None),
            updater: Mutex::new(None),
            residuals: Mutex::new(HashMap::new()),
            send_gate: PriorityGate::default(),
            optimizer: AtomicBool::new(false),
            reduce: ReduceConfig {
                threads: ReduceConfig::from_env().threads,
                bigarray_bound: usize::try_from(config.bigarray_bound).unwrap_or(usize::MAX),
            },
            device_comm: name.contains("device"),
            loads: std::sync::atomic::AtomicU64::new(0),
            timeout: config.timeout,
            max_message_bytes: config.max_message_bytes,
            recovered,
            row_sparse_verbose: config.row_sparse_verbose,
        })
    }

    /// The registry's factory for `mode`: the configuration comes from the environment
    /// (MXNet's `DMLC_*` variables, see [`config`](crate::config)), each overridden by a
    /// create option of the same name (`DMLC_PS_ROOT_PORT`, `KVSTORE_TIMEOUT_SECS`, ...),
    /// over the `[dist]` table of the `kvstore.toml` that `KVSTORE_CONFIG` names, if any.
    ///
    /// As in MXNet, a process whose `DMLC_ROLE` is `server` or `scheduler` runs that role
    /// until the job ends and then **exits the process** (MXNet does so when the module is
    /// imported), so that a job written for MXNet's launcher, which starts the same program
    /// in every role, runs unchanged.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad configuration, else as [`DistStore::connect`].
    pub fn from_request(request: &CreateRequest, mode: Mode) -> Result<Box<dyn KVStoreBase>> {
        let (config, vars) = request_config(request)?;
        if let Some(van) = vars
            .get("DMLC_PS_VAN_TYPE")
            .filter(|v| !matches!(v.trim(), "" | "zmq"))
        {
            // MXNet's P3 store (`p3`) and RDMA van (`ibverbs`) are not provided: say so once,
            // rather than let the job believe it runs them.
            log::warn!(
                "{}: DMLC_PS_VAN_TYPE={van:?} is ignored: this store speaks its own TCP \
                 transport (with shared memory between processes of one host), not MXNet's \
                 P3 or ibverbs vans",
                request.name
            );
        }
        match config.role {
            Role::Worker => Ok(Box::new(DistStore::connect(&request.name, mode, &config)?)),
            Role::Server => {
                let status = match crate::server::run_server(&config) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("kvstore server: {e}");
                        1
                    }
                };
                std::process::exit(status)
            }
            Role::Scheduler => {
                let status = match crate::Scheduler::start(&config).and_then(|s| s.join()) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("kvstore scheduler: {e}");
                        1
                    }
                };
                std::process::exit(status)
            }
        }
    }

    fn at(&self, operation: &'static str, key: &Key) -> impl FnOnce(Error) -> Error + '_ {
        let key = key.clone();
        move |e| e.at_key(&self.name, operation, key)
    }

    fn transport_at(
        &self,
        operation: &'static str,
        key: &Key,
    ) -> impl FnOnce(TransportError) -> Error + '_ {
        let key = key.clone();
        move |e| backend(&self.name, e).at_key(&self.name, operation, key)
    }

    /// The metas of the keys of `groups`, checked to be initialised.
    fn metas(&self, operation: &'static str, keys: &[&Key]) -> Result<Vec<Arc<KeyMeta>>> {
        let table = lock(&self.keys);
        keys.iter()
            .map(|k| table.get(&self.name, operation, k))
            .collect()
    }

    /// Sends `out` (command, payload, extra flags) about part `part` of `meta` to its server,
    /// with a push's step number `seq` (0 otherwise), the answer read into a reused buffer
    /// when `receive`.
    fn send(
        &self,
        meta: &KeyMeta,
        (part, seq): (usize, protocol::PushSeq),
        out: Outgoing<'_>,
        what: &str,
        receive: bool,
    ) -> std::result::Result<Pending, TransportError> {
        let flags = out.flags | protocol::dtype_flag(meta.dtype);
        let out = out
            .key(meta.wire)
            .aux(protocol::push_aux(part as u64, seq))
            .flags(flags);
        let conn = &self.servers[meta.parts[part].server];
        if receive {
            conn.send_into(out, what, meta.take_buffer())
        } else {
            conn.send(out, what)
        }
    }

    /// Declares (and on rank 0 sets) the keys of `values`.
    fn init_keys(&self, operation: &'static str, values: &KeyedValues<'_>) -> Result<()> {
        let _initialising = lock(&self.initialising);
        let groups = values.groups();
        let metas: Vec<Arc<KeyMeta>> = {
            let table = lock(&self.keys);
            let mut metas = Vec::with_capacity(groups.len());
            let mut new_strs = 0;
            for g in &groups {
                table.check_kind(operation, &g.key)?;
                if table.contains(&g.key) || g.positions.len() != 1 {
                    return Err(self.at(operation, &g.key)(Error::DuplicateInit));
                }
                let value = values.values()[g.positions[0]];
                metas.push(Arc::new(KeyMeta::new(
                    g.key.clone(),
                    table.wire_id(&g.key, new_strs),
                    value,
                    self.servers.len(),
                    self.bigarray_bound,
                )));
                new_strs += usize::from(matches!(g.key, Key::Str(_)));
            }
            metas
        };
        // Each part's declaration (and rank 0's data), small ones batched per server, each
        // message built as it goes.
        // Only rank 0 sends data (a value that is not contiguous is made so first).
        let with_data = self.rank == 0;
        let owned: Vec<Outbound<'_>> = groups
            .iter()
            .filter(|_| with_data)
            .map(|g| outbound(&[values.values()[g.positions[0]]], &self.reduce))
            .collect();
        let data: Vec<&[u8]> = if with_data {
            owned.iter().map(Outbound::bytes).collect()
        } else {
            vec![&[][..]; groups.len()]
        };
        let parts = exchange::Parts::Init {
            values: &data,
            with_data,
        };
        let flags = recovery_flags(self.recovered);
        self.exchange(operation, protocol::CMD_INIT, &metas, parts, flags, 0)?;
        lock(&self.keys).insert(metas);
        Ok(())
    }

    /// After a load of states, which may have replaced the servers' optimizer: pushes are
    /// checked only for what every optimizer refuses.
    fn forget_updater(&self) {
        *lock(&self.updater) = None;
    }

    /// With an optimizer on the servers, refuses a push any of whose keys it would refuse
    /// (an integer weight; rows it cannot take), naming the key, before anything is sent: the
    /// servers update each key on its own, and the call's other keys would be stepped.
    /// `pushes_rows`: whether a key's push travels as rows (else dense).
    fn check_under_optimizer(
        &self,
        operation: &'static str,
        groups: &[KeyGroup],
        metas: &[Arc<KeyMeta>],
        pushes_rows: impl Fn(&KeyGroup, &KeyMeta) -> bool,
    ) -> Result<()> {
        if !self.optimizer.load(Ordering::Relaxed) {
            return Ok(());
        }
        let updater = lock(&self.updater);
        for (g, meta) in groups.iter().zip(metas) {
            let rows = pushes_rows(g, meta);
            match updater.as_ref() {
                // A pushed value's dtype is the key's (checked before).
                Some(u) => u.check_declared(&g.key, meta.dtype, meta.dtype, rows),
                None => kvstore_optimizer::check_weight_dtype(meta.dtype),
            }
            .map_err(self.at(operation, &g.key))?;
        }
        Ok(())
    }

    /// Sends the pushes of `values` (summed per key), pipelined, and waits for them; with
    /// `outs`, the answers carry the round's result and are written there.
    fn push_keys(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        outs: Option<&mut KeyedOuts<'_>>,
        priority: i32,
    ) -> Result<()> {
        let mut groups = values.groups();
        groups.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&Key> = groups.iter().map(|g| &g.key).collect();
        let metas = self.metas(operation, &keys)?;
        // Check everything before sending anything.
        self.check_groups(operation, values, &groups, &metas)?;
        if let Some(outs) = outs.as_deref() {
            self.check_outs(operation, outs)?;
        }
        let codec = *lock(&self.codec);
        if codec.is_some() {
            for (KeyGroup { key, positions }, meta) in groups.iter().zip(&metas) {
                check_compressible(meta, positions.iter().map(|&p| values.values()[p]))
                    .map_err(self.at(operation, key))?;
            }
        }
        // A push (or pushpull) of row-sparse values to a key kept by rows sends the rows of
        // their sum.
        let pushes_rows = |g: &KeyGroup, meta: &KeyMeta| {
            codec.is_none()
                && meta.row_len.is_some()
                && g.positions
                    .iter()
                    .all(|&p| values.values()[p].storage_type() == StorageType::RowSparse)
        };
        self.check_under_optimizer(operation, &groups, &metas, pushes_rows)?;
        let payloads: Vec<Payload<'_>> = groups
            .iter()
            .zip(&metas)
            .map(|(g, meta)| {
                let arrays: Vec<&NDArray> =
                    g.positions.iter().map(|&p| values.values()[p]).collect();
                if pushes_rows(g, meta) {
                    if self.row_sparse_verbose {
                        log_rows(self.rank, operation, &g.key, &arrays);
                    }
                    rows_payload(meta, &arrays)
                        .map(Payload::Rows)
                        .map_err(self.at(operation, &g.key))
                } else {
                    Ok(Payload::Dense(outbound(&arrays, &self.reduce)))
                }
            })
            .collect::<Result<_>>()?;
        let command = if outs.is_some() {
            protocol::CMD_PUSHPULL
        } else {
            protocol::CMD_PUSH
        };
        // The codes of each key's parts, when compressed.
        let packed = match codec {
            Some(codec) => self.quantize(codec, &metas, &payloads),
            None => Vec::new(),
        };
        let (data, flags): (Vec<Vec<&[u8]>>, Vec<u16>) = match codec {
            Some(_) => {
                let data = packed
                    .iter()
                    .map(|parts| parts.iter().map(Vec::as_slice).collect())
                    .collect();
                (data, vec![protocol::FLAG_COMPRESSED; metas.len()])
            }
            None => payloads
                .iter()
                .zip(&metas)
                .map(|(payload, m)| match payload {
                    Payload::Dense(p) => (
                        (0..m.parts.len())
                            .map(|part| &p.bytes()[m.byte_range(part)])
                            .collect(),
                        0,
                    ),
                    Payload::Rows(parts) => (
                        parts.iter().map(Vec::as_slice).collect(),
                        protocol::FLAG_ROW_SPARSE,
                    ),
                })
                .unzip(),
        };
        // Each key's step number: a retry of a failed push takes that push's.
        let seqs: Vec<protocol::PushSeq> = metas.iter().map(|m| m.push_seq()).collect();
        let parts = exchange::Parts::Pushed {
            data: &data,
            flags: &flags,
            seqs: &seqs,
        };
        let answers = match self.exchange(operation, command, &metas, parts, 0, priority) {
            Ok(answers) => answers,
            Err(e) => {
                // Some parts may be merged: the next push of each key retries this step.
                for (meta, &seq) in metas.iter().zip(&seqs) {
                    meta.push_failed(seq);
                }
                // Not delivered (or not known to be): the residuals give the codes back.
                if let Some(codec) = codec {
                    self.unquantize(codec, &metas, &payloads, &packed);
                }
                return Err(e);
            }
        };
        if let (Some(outs), Some(answers)) = (outs, answers) {
            let written = self.write_outs(operation, &metas, &answers, outs, true);
            answers.recycle(&metas);
            written?;
        }
        Ok(())
    }

    /// Whether this worker took the place of a lost worker when it joined (MXNet's
    /// `is_recovery`, ps-lite's recovery node): it has the lost worker's rank, its `init`
    /// calls keep the values the servers hold (declarations must match them), and
    /// `set_optimizer` (and `kController`) / `set_gradient_compression` leave the servers'
    /// optimizer (with its states) and codec as they are, without a barrier (installing them
    /// where none is set, refusing a different optimizer or codec), and
    /// `load_optimizer_states` leaves the servers' states as they are: the program runs from
    /// its start and rejoins the others.
    pub fn is_recovery(&self) -> bool {
        self.recovered
    }

    /// The nodes among ps-lite's `node_id` that the scheduler counts as dead, one line each
    /// naming the node and why (MXNet's `get_num_dead_node(node_id, timeout)` is the count):
    /// `node_id` is a group (1 the scheduler, 2 the servers, 4 the workers, or their sums) or
    /// one node's id (server `r`: `8 + 2r`, worker `r`: `9 + 2r`); a node is dead when it is
    /// lost (its connection to the scheduler dropped, or it missed heartbeats for
    /// `PS_HEARTBEAT_TIMEOUT`) or silent for longer than `timeout`. Nodes that left the job
    /// are not dead; the scheduler, answering, is not.
    ///
    /// Unlike MXNet's, whose answer means nothing without heartbeats (every node then counts
    /// as dead after `timeout`), heartbeats are always on here.
    ///
    /// # Errors
    /// [`Error::Backend`] naming the scheduler when it cannot be asked.
    pub fn dead_nodes(&self, node_id: u64, timeout: Duration) -> Result<Vec<String>> {
        match self.node().as_ref() {
            Some(node) => node
                .dead_nodes(node_id, timeout)
                .map_err(|e| backend(&self.name, e)),
            None => Err(Error::InvalidArgument(format!(
                "{}: this worker has left the cluster",
                self.name
            ))),
        }
    }

    /// Bytes written to the servers so far (frame headers included): what pushes cost on the
    /// wire, with or without gradient compression. Data moved through shared memory is not
    /// counted (only the slots naming it).
    pub fn bytes_sent(&self) -> u64 {
        self.servers.iter().map(|c| c.bytes_sent()).sum()
    }

    /// Requests sent to the servers so far: the small parts of a multi-key call (up to 64 KiB
    /// each) travel together, in about one message per server and MiB, so an init, push,
    /// pull or broadcast of a thousand small keys costs a few messages, not a thousand.
    pub fn requests_sent(&self) -> u64 {
        self.servers.iter().map(|c| c.requests_sent()).sum()
    }

    /// How many of the connections to the servers move big parts through shared memory (and
    /// still may: a region is retired after a failed request).
    pub fn shm_connections(&self) -> usize {
        self.shm.iter().flatten().filter(|l| l.usable()).count()
    }

    /// Refuses arrays in device memory unless the store has MXNet's device communicator
    /// (then the staging helpers of `kvstore-base` take them; the other dist stores receive
    /// them staged by `KVStoreExt`).
    fn host_arrays_only(
        &self,
        operation: &'static str,
        values: Option<&KeyedValues<'_>>,
        outs: Option<&KeyedOuts<'_>>,
    ) -> Result<()> {
        if self.device_comm {
            return Ok(());
        }
        if let Some(values) = values {
            values.check_on_host(self.type_name(), operation)?;
        }
        outs.map_or(Ok(()), |outs| {
            outs.check_on_host(self.type_name(), operation)
        })
    }

    /// Checks every value of `values` against its key (initialised, shape, dtype).
    fn check_values(&self, operation: &'static str, values: &KeyedValues<'_>) -> Result<()> {
        let groups = values.groups();
        let keys: Vec<&Key> = groups.iter().map(|g| &g.key).collect();
        let metas = self.metas(operation, &keys)?;
        self.check_groups(operation, values, &groups, &metas)
    }

    /// Checks the values of each group against its key's meta.
    fn check_groups(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        groups: &[KeyGroup],
        metas: &[Arc<KeyMeta>],
    ) -> Result<()> {
        for (KeyGroup { key, positions }, meta) in groups.iter().zip(metas) {
            for (i, &p) in positions.iter().enumerate() {
                meta.check_value(values.values()[p], &format!("pushed value {i}"))
                    .map_err(self.at(operation, key))?;
            }
        }
        Ok(())
    }

    fn check_outs(&self, operation: &'static str, outs: &KeyedOuts<'_>) -> Result<()> {
        let keys: Vec<&Key> = outs.keys().iter().collect();
        let metas = self.metas(operation, &keys)?;
        for (i, (meta, out)) in metas.iter().zip(outs.outs()).enumerate() {
            meta.check_out(out, &format!("output {i}"))
                .map_err(self.at(operation, &meta.key))?;
        }
        Ok(())
    }

    /// Writes each key's answer into its outputs (skipping row-sparse outputs when
    /// `ignore_sparse`, as MXNet).
    fn write_outs(
        &self,
        operation: &'static str,
        metas: &[Arc<KeyMeta>],
        answers: &exchange::Answers,
        outs: &mut KeyedOuts<'_>,
        ignore_sparse: bool,
    ) -> Result<()> {
        let index: HashMap<&Key, usize> =
            metas.iter().enumerate().map(|(i, m)| (&m.key, i)).collect();
        for (key, out) in outs.iter_mut() {
            if ignore_sparse && out.storage_type() == StorageType::RowSparse {
                continue;
            }
            let i = *index.get(key).expect("checked");
            answers
                .write(i, &metas[i], out)
                .map_err(self.at(operation, key))?;
        }
        Ok(())
    }

    /// Pulls the keys of `outs`.
    fn pull_keys(
        &self,
        operation: &'static str,
        outs: &mut KeyedOuts<'_>,
        ignore_sparse: bool,
        priority: i32,
    ) -> Result<()> {
        let mut groups = outs.groups();
        groups.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&Key> = groups.iter().map(|g| &g.key).collect();
        let metas = self.metas(operation, &keys)?;
        self.check_outs(operation, outs)?;
        for meta in &metas {
            meta.pulled();
        }
        let answers = self
            .exchange(
                operation,
                protocol::CMD_PULL,
                &metas,
                exchange::Parts::None,
                0,
                priority,
            )?
            .expect("a pull has answers");
        let written = self.write_outs(operation, &metas, &answers, outs, ignore_sparse);
        answers.recycle(&metas);
        written
    }

    fn node(&self) -> MutexGuard<'_, Option<Node>> {
        lock(&self.node)
    }

    /// Rank 0 sends `command` with `payload` (and `key`) to every server and waits for all.
    fn to_all_servers(&self, command: u32, key: u64, payload: &[u8], what: &str) -> Result<()> {
        let outcomes = self.to_each_server(command, key, |_| payload, what);
        self.all_answered(outcomes, what).map(drop)
    }

    /// Sends `command` with `payload(server)` to every server; the outcomes by server.
    fn to_each_server<'p>(
        &self,
        command: u32,
        key: u64,
        payload: impl Fn(usize) -> &'p [u8],
        what: &str,
    ) -> Vec<ServerOutcome> {
        let mut outcomes: Vec<ServerOutcome> = (0..self.servers.len()).map(|_| None).collect();
        let mut pending = Vec::new();
        for (server, c) in self.servers.iter().enumerate() {
            match c.send(Outgoing::new(command, payload(server)).key(key), what) {
                Ok(p) => pending.push((server, p)),
                Err(e) => outcomes[server] = Some(Err(e)),
            }
        }
        for (server, outcome) in exchange::settle(pending) {
            outcomes[server] = Some(outcome);
        }
        outcomes
    }

    /// Every server's answer, by server; else the first failure (a lost server first: it
    /// explains the others' failures), or a server not awaited.
    fn all_answered(&self, outcomes: Vec<ServerOutcome>, what: &str) -> Result<Vec<Response>> {
        let mut answers = Vec::with_capacity(outcomes.len());
        let mut errors = Vec::new();
        let mut unknown = None;
        for (server, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Some(Ok(answer)) => answers.push(answer),
                Some(Err(e)) => errors.push(e),
                None => unknown = unknown.or(Some(server)),
            }
        }
        errors.sort_by_key(|e| !exchange::is_loss(e));
        if let Some(e) = errors.into_iter().next() {
            return Err(backend(&self.name, e));
        }
        match unknown {
            Some(server) => Err(Error::Backend {
                store: self.name.clone(),
                source: format!(
                    "{what}: {} was not awaited (another server was lost)",
                    self.servers[server].peer()
                )
                .into(),
            }),
            None => Ok(answers),
        }
    }

    fn worker_barrier(&self) -> Result<()> {
        match self.node().as_ref() {
            Some(node) => node
                .barrier(Group::Workers)
                .map_err(|e| backend(&self.name, e)),
            None => Err(Error::InvalidArgument(format!(
                "{}: this worker has left the cluster",
                self.name
            ))),
        }
    }
}

fn backend(store: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Backend {
        store: store.to_string(),
        source: Box::new(e),
    }
}

impl KVStoreBase for DistStore {
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

    fn handles_device_arrays(&self) -> bool {
        self.device_comm
    }

    fn pushpull_in_place_batch(&self, values: &mut KeyedOuts<'_>, priority: i32) -> Result<()> {
        if self.device_comm && values.any_on_device() {
            return self.pushpull_in_place_on_devices(values, priority);
        }
        let copies: Vec<NDArray> = values.outs().iter().map(|v| (**v).clone()).collect();
        let inputs = KeyedValues::new("pushpull", values.keys().to_vec(), copies.iter().collect())?;
        self.pushpull_batch(&inputs, values, priority)
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        self.host_arrays_only("init", Some(values), None)?;
        with_values_on_host(values, |values| self.init_keys("init", values))
    }

    fn push_batch(&self, values: &KeyedValues<'_>, priority: i32) -> Result<()> {
        self.host_arrays_only("push", Some(values), None)?;
        with_values_summed_on_host(
            &self.name,
            "push",
            values,
            |values| self.check_values("push", values),
            |values| self.push_keys("push", values, None, priority),
        )
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        self.host_arrays_only("pull", None, Some(outs))?;
        if outs.any_on_device() {
            // Every output, before one stands in for the others of its key.
            self.check_outs("pull", outs)?;
        }
        with_outs_fanned_out("pull", outs, |outs| {
            self.pull_keys("pull", outs, ignore_sparse, priority)
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
        self.host_arrays_only(operation, Some(values), Some(outs))?;
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
                    self.push_keys(operation, values, Some(outs), priority)
                })
            },
        )
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.host_arrays_only("broadcast", Some(values), Some(outs))?;
        // Checked against the values: the keys may not be initialised yet.
        outs.check_shapes_against(&self.name, "broadcast", values)?;
        with_values_on_host(values, |values| {
            with_outs_fanned_out("broadcast", outs, |outs| {
                self.init_keys("broadcast", values)?;
                self.pull_keys("broadcast", outs, true, priority)
            })
        })
    }

    fn row_sparse_pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        row_ids: &[&NDArray],
        priority: i32,
    ) -> Result<()> {
        let _ = priority;
        // With the device communicator, outputs and row ids may be in GPU memory: the rows
        // are pulled into host stand-ins and copied to the outputs.
        let ids_on_device = row_ids.iter().any(|r| r.in_device_memory());
        if self.device_comm && (ids_on_device || outs.any_on_device()) {
            return kvstore_base::with_arrays_on_host(row_ids, |row_ids| {
                kvstore_base::with_written_outs_on_host(outs, |outs| self.pull_rows(outs, row_ids))
            });
        }
        outs.check_on_host(self.type_name(), "row_sparse_pull")?;
        self.pull_rows(outs, row_ids)
    }

    fn set_optimizer(&self, optimizer: &OptimizerSpec) -> Result<()> {
        // Every worker checks the spec, so that a bad one fails everywhere alike.
        let updater = kvstore_optimizer::Updater::from_spec(optimizer)?;
        let json = serde_json::to_vec(optimizer).map_err(|e| {
            Error::InvalidArgument(format!("the optimizer spec cannot be encoded: {e}"))
        })?;
        if self.recovered {
            self.keep_servers_optimizer(&json, "set_optimizer")?;
            *lock(&self.updater) = Some(updater);
            self.optimizer.store(true, Ordering::Relaxed);
            return Ok(());
        }
        let sent = if self.rank == 0 {
            self.to_all_servers(protocol::CMD_SET_OPTIMIZER, 0, &json, "set_optimizer")
        } else {
            Ok(())
        };
        // No push may reach a server before its optimizer: every worker waits for rank 0.
        let met = self.worker_barrier();
        sent.and(met)?;
        *lock(&self.updater) = Some(updater);
        self.optimizer.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn save_optimizer_states(&self, path: &std::path::Path, dump_optimizer: bool) -> Result<()> {
        self.save_states(path, dump_optimizer)
    }

    fn load_optimizer_states(&self, path: &std::path::Path) -> Result<()> {
        self.load_states(path)
    }

    fn barrier(&self) -> Result<()> {
        self.worker_barrier()
    }

    fn set_gradient_compression(&self, params: &CompressionParams) -> Result<()> {
        // Every worker checks the parameters (and quantises its own pushes); rank 0 tells the
        // servers, which dequantise; the barrier keeps any compressed push from reaching a
        // server before the codec does.
        let spec = CompressionSpec::from_params(params)?;
        let json = serde_json::to_vec(params).map_err(|e| {
            Error::InvalidArgument(format!("the compression parameters cannot be encoded: {e}"))
        })?;
        // A worker taking a lost worker's place keeps the servers' codec (sets it where none
        // is, refuses a different one) and starts quantising with residuals from zero (a new
        // process), without meeting the others.
        let sent = if self.recovered || self.rank == 0 {
            self.to_all_servers(
                protocol::CMD_SET_COMPRESSION,
                u64::from(self.recovered),
                &json,
                "set_gradient_compression",
            )
        } else {
            Ok(())
        };
        let met = if self.recovered {
            Ok(())
        } else {
            self.worker_barrier()
        };
        sent.and(met)?;
        // A new setting keeps the residuals, as MXNet's and the device store's do.
        *lock(&self.codec) = Some(spec.codec());
        Ok(())
    }

    fn send_command_to_servers(&self, head: i32, body: &str) -> Result<()> {
        // Rank 0 sends once (every worker runs the same program), every server executes and
        // answers; MXNet sends from every worker that calls it.
        if self.rank != 0 {
            return Ok(());
        }
        if self.recovered && head == protocol::head::CONTROLLER {
            // MXNet's way to set the optimizer: kept as set_optimizer keeps it.
            return self.keep_servers_optimizer(body.as_bytes(), "server command 0 (kController)");
        }
        let what = match protocol::head::name(head) {
            Some(name) => format!("server command {head} ({name})"),
            None => format!("server command {head}"),
        };
        self.to_all_servers(
            protocol::CMD_COMMAND,
            head as i64 as u64,
            body.as_bytes(),
            &what,
        )
    }
}

impl DistStore {
    /// A worker taking a lost worker's place sets the optimizer (`spec_json`): the servers
    /// run the job's, with its states, which it neither resets nor meets the others for (they
    /// are training); they install it where none runs (rank 0 died before sending it) and
    /// refuse a different one.
    fn keep_servers_optimizer(&self, spec_json: &[u8], what: &str) -> Result<()> {
        self.to_all_servers(protocol::CMD_SET_OPTIMIZER, 1, spec_json, what)
    }

    /// Stops this worker's heartbeats and nothing else, as a frozen process (or a machine cut
    /// off without its connections closing) would look: the scheduler counts it as lost after
    /// the heartbeat timeout, and the servers, learning it from the scheduler, fail its rounds.
    /// For fault-injection tests.
    pub fn freeze_heartbeats(&self) {
        if let Some(node) = self.node().as_mut() {
            node.stop_heartbeats();
        }
    }

    /// Vanishes from the job without a goodbye, as a crashed worker process would: the
    /// connections to the servers and the scheduler close, and the servers fail the rounds in
    /// progress, naming this worker. For fault-injection tests (a worker taking its place:
    /// [`is_recovery`](DistStore::is_recovery)).
    pub fn abandon(mut self) {
        self.servers.clear();
        self.shm.clear();
        if let Some(node) = self.node().take() {
            node.abandon();
        }
    }
}

impl Drop for DistStore {
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
        if let Some(node) = self.node().take() {
            if let Err(e) = node.leave() {
                log::warn!("{}: leaving the cluster failed: {e}", self.name);
            }
        }
    }
}

/// The flags of a hello or an init: [`protocol::FLAG_RECOVERING`] from a worker that took a
/// lost worker's place.
fn recovery_flags(recovered: bool) -> u16 {
    if recovered {
        protocol::FLAG_RECOVERING
    } else {
        0
    }
}
