//! [`PsLiteStore`]: a worker of an MXNet 1.9.1 `dist_sync` or `dist_async` job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use kvstore_base::{
    Capability, CreateRequest, DType, Error, KVStoreBase, Key, KeyedOuts, KeyedValues, NDArray,
    Result, StorageType,
};
use kvstore_dist::{DistConfig, Role};
use kvstore_local::reduce::{self, Outbound, ReduceConfig};

use crate::encoding::{
    self, PackedSlice, Slice, COMPRESSED_PUSH_PULL, DEFAULT_PUSH_PULL, ROW_SPARSE_PUSH_PULL,
};
use crate::van::{self, Message, Van, VanConfig, VanError, EVERYONE, WORKER_GROUP};

mod compressed;
mod rows;

use compressed::Packed;
use rows::RowsMessage;

/// MXNet's server command that puts the servers in sync mode (`kSyncMode`), sent by rank 0
/// when the store is created.
pub const CMD_SYNC_MODE: i32 = 3;
/// MXNet's server command that stops the servers (`kStopServer`), sent by rank 0 when the job
/// ends.
pub const CMD_STOP_SERVER: i32 = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A key the workers initialised.
#[derive(Debug, Clone)]
struct Entry {
    /// MXNet's int key (string keys are numbered in the order of their `init`, as MXNet does).
    id: i32,
    shape: Vec<usize>,
    dtype: DType,
    /// Where the value lives: the slices of a pull, of `init`, and of an uncompressed push.
    slices: Vec<Slice>,
    /// Once gradient compression is on: the codec and the slices of a compressed push.
    packed: Option<Packed>,
    /// A row-sparse key's row length (elements per row): its slices hold whole rows, and its
    /// requests are MXNet's row-sparse ones (`rows`).
    row_len: Option<usize>,
}

impl Entry {
    fn bytes(&self, slice: &Slice) -> std::ops::Range<usize> {
        let size = self.dtype.size_of();
        slice.elements.start * size..slice.elements.end * size
    }

    fn command(&self, request_type: u32) -> i32 {
        encoding::command(
            request_type,
            encoding::mxnet_dtype_id(self.dtype).expect("checked at init"),
        )
    }

    /// The command word of a pull: a compressed request once compression is on, as MXNet's.
    fn pull_command(&self) -> i32 {
        match self.packed {
            Some(_) => self.command(COMPRESSED_PUSH_PULL),
            None => self.command(DEFAULT_PUSH_PULL),
        }
    }

    fn check_value(&self, value: &NDArray, what: &str) -> Result<()> {
        Error::check_declared(&self.shape, self.dtype, value, what)
    }

    fn check_shape(&self, array: &NDArray, what: &str) -> Result<()> {
        Error::check_shape(&self.shape, array, what)
    }
}

/// What one key's requests carry.
#[derive(Clone, Copy)]
enum Payload<'a> {
    /// Nothing: a pull.
    Pull,
    /// The value's bytes, cut along the entry's slices (`init`, an uncompressed push).
    Dense(&'a [u8]),
    /// The packed value, cut along these slices (a compressed push).
    Packed(&'a [u8], &'a [PackedSlice]),
    /// A row-sparse push: a message per slice.
    RowPush(&'a [RowsMessage]),
    /// A pull of rows: a message per slice.
    RowPull(&'a [RowsMessage]),
}

/// A key's bytes to push.
enum Outgoing<'a> {
    /// The caller's value, or the sum of its values.
    Dense(Outbound<'a>),
    /// The packed value, and the slices that cut it.
    Packed(Vec<u8>, &'a [PackedSlice]),
    /// A row-sparse key's rows, a message per slice.
    Rows(Vec<RowsMessage>),
}

impl Outgoing<'_> {
    fn payload(&self) -> Payload<'_> {
        match self {
            Outgoing::Dense(value) => Payload::Dense(value.bytes()),
            Outgoing::Packed(bytes, slices) => Payload::Packed(bytes, slices),
            Outgoing::Rows(messages) => Payload::RowPush(messages),
        }
    }
}

/// One key's requests of a call: a request per slice of `entry`.
struct Request<'a> {
    key: &'a Key,
    entry: &'a Entry,
    payload: Payload<'a>,
}

/// The keys of the job, as this worker knows them.
#[derive(Debug, Default)]
struct Table {
    entries: HashMap<Key, Entry>,
    /// The int key the next string key gets.
    next_str_key: i32,
    /// The gradient compression, once set.
    codec: Option<kvstore_compression::Codec>,
    /// Keys whose init failed once rank 0's values may have reached the servers: never
    /// initialised again in this job (a second push of the values would count as a round's
    /// push), with why.
    failed_inits: HashMap<Key, String>,
}

/// Whether a store named `name` is an async worker, by MXNet's rule: a type name that contains
/// `_async` (`pslite_dist_async`); any other name is a sync worker, whose rank 0 puts the
/// servers in sync mode.
///
/// ```
/// use kvstore_pslite::worker::is_async;
///
/// assert!(is_async("pslite_dist_async"));
/// assert!(!is_async("pslite_dist_sync"));
/// ```
pub fn is_async(name: &str) -> bool {
    name.to_ascii_lowercase().contains("_async")
}

/// A worker that joins a job whose scheduler and servers are MXNet 1.9.1's (and whose other
/// workers may be MXNet's Python workers), speaking ps-lite's protocol. See the crate docs.
pub struct PsLiteStore {
    name: String,
    /// `dist_async` ([`is_async`]): rank 0 leaves the servers in async mode, and a push needs
    /// this worker to have set the optimizer first.
    asynchronous: bool,
    /// Whether this worker sent the servers an optimizer (`set_optimizer`, or a `kController`
    /// command).
    optimizer_sent: AtomicBool,
    van: Van,
    num_workers: usize,
    num_servers: usize,
    bigarray_bound: usize,
    table: Mutex<Table>,
    /// Serialises `init` calls (collective calls; their keys get ids in call order) and
    /// `set_gradient_compression`.
    init: Mutex<()>,
    /// The compression residual of each MXNet key, on this worker (zero at first).
    residuals: Mutex<HashMap<i32, Vec<f32>>>,
    reduce: ReduceConfig,
    /// Whether the start-up finished: only then does dropping the store end the job (a store
    /// that failed to start leaves without the exit barriers, which the others would take for
    /// a call of theirs).
    started: bool,
}

impl std::fmt::Debug for PsLiteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PsLiteStore")
            .field("name", &self.name)
            .field("rank", &self.van.rank())
            .field("num_workers", &self.num_workers)
            .field("num_servers", &self.num_servers)
            .finish_non_exhaustive()
    }
}

fn backend(store: &str, e: VanError) -> Error {
    Error::Backend {
        store: store.to_string(),
        source: Box::new(e),
    }
}

impl PsLiteStore {
    /// Joins the job `dist` describes as a worker (see [`Van::join`]), meets every node in
    /// the start-up barrier, and, as rank 0 of a sync worker, puts the servers in sync mode,
    /// as an MXNet worker does when it creates `dist_sync`. A `name` that contains `_async`
    /// ([`is_async`]) makes an async worker, as `dist_async` does: the servers stay in async
    /// mode, applying each push on its own.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `dist` is not a worker's configuration;
    /// [`Error::Backend`] when joining fails or a wait times out (naming who is missing).
    pub fn connect(name: &str, dist: &DistConfig) -> Result<PsLiteStore> {
        if dist.role != Role::Worker {
            return Err(Error::InvalidArgument(format!(
                "{name}: DMLC_ROLE={}: a store is a worker; the scheduler and servers are \
                 MXNet's (`DMLC_ROLE=server python -c 'import mxnet'`) or this crate's \
                 (`run_role`)",
                dist.role
            )));
        }
        let van = Van::join(van_config(name, dist)?).map_err(|e| backend(name, e))?;
        let workers = van
            .nodes()
            .iter()
            .filter(|n| n.role == crate::meta::Role::Worker)
            .count();
        let mut store = PsLiteStore {
            name: name.to_string(),
            asynchronous: is_async(name),
            optimizer_sent: AtomicBool::new(false),
            num_workers: workers,
            num_servers: van.servers().count(),
            bigarray_bound: usize::try_from(dist.bigarray_bound).unwrap_or(usize::MAX),
            van,
            table: Mutex::new(Table::default()),
            init: Mutex::new(()),
            residuals: Mutex::new(HashMap::new()),
            reduce: ReduceConfig::from_env(),
            started: false,
        };
        store.van.barrier(EVERYONE).map_err(|e| backend(name, e))?;
        if store.van.rank() == 0 && !store.asynchronous {
            store.command_all(CMD_SYNC_MODE, "")?;
        }
        store.started = true;
        Ok(store)
    }

    /// The registry's factory: the `DMLC_*`/`KVSTORE_*` configuration from the environment
    /// and the create options, as the dist stores read it.
    ///
    /// # Errors
    /// As [`PsLiteStore::connect`], or a bad configuration.
    ///
    /// A process whose `DMLC_ROLE` is `server` or `scheduler` runs that role (this crate's
    /// [`crate::server`] or [`crate::scheduler`]) until the job ends and then **exits**, as the
    /// dist stores do, so that one program can start every node of a job.
    pub fn from_request(request: &CreateRequest) -> Result<PsLiteStore> {
        let (dist, _) = kvstore_dist::worker::request_config(request)?;
        if dist.role != Role::Worker {
            let status = match run_role(&request.name, &dist) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("{e}");
                    1
                }
            };
            std::process::exit(status);
        }
        PsLiteStore::connect(&request.name, &dist)
    }

    /// The node this worker is in the job (its ps-lite id and address).
    pub fn node(&self) -> &crate::meta::NodeRecord {
        self.van.me()
    }

    /// The bytes of the messages this worker sent so far (headers and data frames): a push of
    /// `n` float32 elements costs about `4n` bytes, or `n / 4` with 2-bit compression.
    pub fn bytes_sent(&self) -> u64 {
        self.van.bytes_sent()
    }

    /// The job's nodes, as the scheduler listed them (itself included).
    pub fn job_nodes(&self) -> &[crate::meta::NodeRecord] {
        self.van.nodes()
    }

    /// Sends `head`/`body` to every server and waits for each to answer.
    fn command_all(&self, head: i32, body: &str) -> Result<()> {
        let ts = self.van.new_timestamp();
        self.van.expect(ts);
        let servers: Vec<i32> = self.van.servers().map(|s| s.id).collect();
        let meta = van::command_request(head, body, ts);
        for &id in &servers {
            if let Err(e) = self.van.send(id, &meta, &[]) {
                self.van.forget(ts);
                return Err(backend(&self.name, e));
            }
        }
        self.van
            .wait(
                ts,
                &servers,
                &format!("server command {head}"),
                self.van.deadline(),
            )
            .map(drop)
            .map_err(|e| backend(&self.name, e))
    }

    /// The entries of `keys`, in order; a key of the other type than the store's, or a key
    /// not initialised, is an error naming it.
    fn entries(&self, operation: &'static str, keys: &[&Key]) -> Result<Vec<Entry>> {
        let table = lock(&self.table);
        keys.iter()
            .map(|&k| match table.entries.get(k) {
                Some(entry) => Ok(entry.clone()),
                None => match table.entries.keys().next() {
                    Some(first) if !first.same_kind(k) => Err(Error::MixedKeyTypes {
                        operation,
                        first: first.clone(),
                        other: k.clone(),
                    }),
                    _ => Err(Error::KeyNotInitialized.at_key(&self.name, operation, k.clone())),
                },
            })
            .collect()
    }

    /// Each key's entry and values to push, every value checked against its entry.
    fn pushed<'a>(
        &self,
        operation: &'static str,
        values: &'a KeyedValues<'_>,
    ) -> Result<Vec<(Key, Entry, Vec<&'a NDArray>)>> {
        let groups = values.groups();
        let keys: Vec<&Key> = groups.iter().map(|g| &g.key).collect();
        let entries = self.entries(operation, &keys)?;
        for (g, e) in groups.iter().zip(&entries) {
            for (i, &p) in g.positions.iter().enumerate() {
                e.check_value(values.values()[p], &format!("pushed value {i}"))
                    .map_err(|err| err.at_key(&self.name, operation, g.key.clone()))?;
                if values.values()[p].storage_type() != StorageType::Dense && e.row_len.is_none() {
                    return Err(Error::InvalidArgument(
                        "a row-sparse value to a key initialised dense: MXNet's servers keep \
                         a key dense or by rows from its init (init it with a row-sparse value)"
                            .into(),
                    )
                    .at_key(&self.name, operation, g.key.clone()));
                }
            }
        }
        Ok(groups
            .into_iter()
            .zip(entries)
            .map(|(g, e)| {
                let arrays = g.positions.iter().map(|&p| values.values()[p]).collect();
                (g.key, e, arrays)
            })
            .collect())
    }

    /// Sends one request per slice of every key (pushes carry `bytes`), then waits for every
    /// answer; returns the answers per key and slice.
    fn exchange(
        &self,
        operation: &'static str,
        requests: &[Request<'_>],
        pull: bool,
        priority: i32,
    ) -> Result<Vec<Vec<Message>>> {
        let mut sent: Vec<Vec<(i32, i32)>> = Vec::with_capacity(requests.len());
        let mut failure = None;
        'send: for &Request {
            key,
            entry,
            payload,
        } in requests
        {
            let mut slices = Vec::with_capacity(entry.slices.len());
            for (i, slice) in entry.slices.iter().enumerate() {
                let ts = self.van.new_timestamp();
                let server = Van::server_id(slice.server);
                let ps_key = slice.ps_key.to_le_bytes();
                self.van.expect(ts);
                // Slices of more than 2 GiB were refused at init.
                let result = match payload {
                    Payload::Pull => {
                        let meta = van::kv_request(entry.pull_command(), ts, false, pull, priority);
                        self.van.send(server, &meta, &[&ps_key, &[]])
                    }
                    Payload::Dense(bytes) => {
                        let head = entry.command(DEFAULT_PUSH_PULL);
                        let meta = van::kv_request(head, ts, true, pull, priority);
                        let vals = &bytes[entry.bytes(slice)];
                        let len = (vals.len() as i32).to_le_bytes();
                        self.van.send(server, &meta, &[&ps_key, vals, &len])
                    }
                    Payload::Packed(bytes, packed) => {
                        // MXNet's compressed request: the size key (with no value), then the
                        // slice's key with its words.
                        let head = entry.command(COMPRESSED_PUSH_PULL);
                        let meta = van::kv_request(head, ts, true, pull, priority);
                        let packed = &packed[i];
                        let vals = &bytes[packed.words.start * 4..packed.words.end * 4];
                        let mut keys = [0u8; 16];
                        keys[..8].copy_from_slice(&packed.size_key.to_le_bytes());
                        keys[8..].copy_from_slice(&ps_key);
                        let mut lens = [0u8; 8];
                        lens[4..].copy_from_slice(&(vals.len() as i32).to_le_bytes());
                        self.van.send(server, &meta, &[&keys, vals, &lens])
                    }
                    Payload::RowPush(messages) => {
                        let head = entry.command(ROW_SPARSE_PUSH_PULL);
                        let meta = van::kv_request(head, ts, true, pull, priority);
                        let m = &messages[i];
                        self.van.send(server, &meta, &[&m.keys, &m.vals, &m.lens])
                    }
                    Payload::RowPull(messages) => {
                        let head = entry.command(ROW_SPARSE_PUSH_PULL);
                        let meta = van::kv_request(head, ts, false, pull, priority);
                        self.van.send(server, &meta, &[&messages[i].keys, &[]])
                    }
                };
                if let Err(e) = result {
                    self.van.forget(ts);
                    failure =
                        Some(backend(&self.name, e).at_key(&self.name, operation, key.clone()));
                    // The slices of this key already sent are waited for too.
                    sent.push(slices);
                    break 'send;
                }
                slices.push((ts, server));
            }
            sent.push(slices);
        }
        // Every request sent is waited for, until one deadline, so that no answer is left to a
        // later call.
        let deadline = self.van.deadline();
        let mut answers = Vec::with_capacity(sent.len());
        for (&Request { key, .. }, slices) in requests.iter().zip(&sent) {
            let mut got = Vec::with_capacity(slices.len());
            for &(ts, server) in slices {
                match self.van.wait(
                    ts,
                    &[server],
                    &format!("{operation} of key {key}"),
                    deadline,
                ) {
                    Ok(mut m) => got.push(m.remove(0)),
                    Err(e) => {
                        if failure.is_none() {
                            failure = Some(backend(&self.name, e).at_key(
                                &self.name,
                                operation,
                                key.clone(),
                            ));
                        }
                    }
                }
            }
            answers.push(got);
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(answers),
        }
    }

    /// The value bytes of an answer to a pull of `slice`, checked.
    fn pulled<'m>(&self, entry: &Entry, slice: &Slice, answer: &'m Message) -> Result<&'m [u8]> {
        let expected = entry.bytes(slice).len();
        let vals = answer.data.get(1).map_or(&[][..], |v| v.as_slice());
        // The answer echoes the request's keys: the slice's key (a row-sparse key's master key,
        // then a key per row of the slice, every row being pulled).
        let key_ok = answer.data.first().is_some_and(|k| match entry.row_len {
            None => k.as_slice() == slice.ps_key.to_le_bytes(),
            Some(row_len) => {
                let rows = slice.elements.len() / row_len.max(1);
                k.len() == 8 * (rows + 1)
                    && k.chunks_exact(8).enumerate().all(|(j, key)| {
                        let expected = slice.ps_key.wrapping_add(j.saturating_sub(1) as u64);
                        key == expected.to_le_bytes()
                    })
            }
        });
        if !key_ok || vals.len() != expected {
            return Err(Error::Backend {
                store: self.name.clone(),
                source: format!(
                    "{} answered {} bytes for ps-lite key {}, {expected} expected",
                    van::node_name(answer.sender),
                    vals.len(),
                    slice.ps_key
                )
                .into(),
            });
        }
        Ok(vals)
    }

    /// Writes each key's answers into its outputs (cast to the output's dtype).
    fn write_outs(
        &self,
        operation: &'static str,
        entries: &HashMap<Key, (Entry, Vec<Message>)>,
        outs: &mut KeyedOuts<'_>,
        ignore_sparse: bool,
    ) -> Result<()> {
        // Every answer checked before any output is written.
        for (key, (entry, answers)) in entries {
            for (slice, answer) in entry.slices.iter().zip(answers) {
                self.pulled(entry, slice, answer)
                    .map_err(|e| e.at_key(&self.name, operation, key.clone()))?;
            }
        }
        for (key, out) in outs.iter_mut() {
            let (entry, answers) = &entries[key];
            let at = |e: Error| e.at_key(&self.name, operation, key.clone());
            if ignore_sparse && out.storage_type() == StorageType::RowSparse {
                continue;
            }
            if out.storage_type() == StorageType::Dense && out.dtype() == entry.dtype {
                if let Some(dst) = out.as_bytes_mut() {
                    for (slice, answer) in entry.slices.iter().zip(answers) {
                        let src = self.pulled(entry, slice, answer).map_err(at)?;
                        dst[entry.bytes(slice)].copy_from_slice(src);
                    }
                    continue;
                }
            }
            let mut whole = Vec::with_capacity(entry.bytes(&entry.slices[0]).len());
            for (slice, answer) in entry.slices.iter().zip(answers) {
                whole.extend_from_slice(self.pulled(entry, slice, answer).map_err(at)?);
            }
            // Cast to the output's dtype; a row-sparse output keeps the non-zero rows.
            let value = NDArray::from_bytes(&entry.shape, entry.dtype, &whole).map_err(at)?;
            out.assign(&value).map_err(at)?;
        }
        Ok(())
    }

    /// Checks every output against its key's entry; returns the distinct keys with their
    /// entries.
    fn check_outs(
        &self,
        operation: &'static str,
        outs: &KeyedOuts<'_>,
    ) -> Result<Vec<(Key, Entry)>> {
        let groups = outs.groups();
        let keys: Vec<&Key> = groups.iter().map(|g| &g.key).collect();
        let entries = self.entries(operation, &keys)?;
        for (group, entry) in groups.iter().zip(&entries) {
            for &i in &group.positions {
                entry
                    .check_shape(outs.outs()[i], &format!("output {i}"))
                    .map_err(|e| e.at_key(&self.name, operation, group.key.clone()))?;
            }
        }
        Ok(groups.into_iter().map(|g| g.key).zip(entries).collect())
    }

    fn pull_keys(
        &self,
        operation: &'static str,
        outs: &mut KeyedOuts<'_>,
        ignore_sparse: bool,
        priority: i32,
    ) -> Result<()> {
        let keyed = self.check_outs(operation, outs)?;
        // A row-sparse key is pulled as every row of it.
        let whole = rows::whole_pulls(&keyed);
        let requests: Vec<Request<'_>> = keyed
            .iter()
            .map(|(key, entry)| Request {
                key,
                entry,
                payload: match whole.get(key) {
                    Some(messages) => Payload::RowPull(messages),
                    None => Payload::Pull,
                },
            })
            .collect();
        let answers = self.exchange(operation, &requests, true, priority)?;
        let by_key: HashMap<Key, (Entry, Vec<Message>)> = keyed
            .into_iter()
            .zip(answers)
            .map(|((key, entry), answers)| (key, (entry, answers)))
            .collect();
        self.write_outs(operation, &by_key, outs, ignore_sparse)
    }

    fn push_values(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        outs: Option<&mut KeyedOuts<'_>>,
        priority: i32,
    ) -> Result<()> {
        if let Some(outs) = &outs {
            outs.check_against(operation, values)?;
            self.check_outs(operation, outs)?;
        }
        let pushed = self.pushed(operation, values)?;
        let refused = pushed.iter().find_map(|(key, entry, _)| {
            self.push_refusal(entry, outs.is_some())
                .map(|e| e.at_key(&self.name, operation, key.clone()))
        });
        if let Some(e) = refused {
            return Err(e);
        }
        // Each key's bytes: packed with its codec once compression is on, else the caller's
        // value or the sum of its values (one per device) in MXNet's association order. They
        // borrow `pushed`, which the answers then take over.
        let answers = {
            let outgoing: Vec<Outgoing<'_>> = pushed
                .iter()
                .map(|(key, entry, arrays)| match &entry.packed {
                    _ if entry.row_len.is_some() => entry
                        .summed_rows(arrays)
                        .map(|(ids, bytes)| Outgoing::Rows(entry.row_messages(&ids, Some(&bytes))))
                        .map_err(|e| e.at_key(&self.name, operation, key.clone())),
                    Some(layout) => self
                        .quantize(entry, layout, arrays)
                        .map(|bytes| Outgoing::Packed(bytes, &layout.slices))
                        .map_err(|e| e.at_key(&self.name, operation, key.clone())),
                    None => Ok(Outgoing::Dense(reduce::outbound(arrays, &self.reduce))),
                })
                .collect::<Result<_>>()?;
            let requests: Vec<Request<'_>> = pushed
                .iter()
                .zip(&outgoing)
                .map(|((key, entry, _), outgoing)| Request {
                    key,
                    entry,
                    payload: outgoing.payload(),
                })
                .collect();
            self.exchange(operation, &requests, outs.is_some(), priority)?
        };
        if let Some(outs) = outs {
            let by_key: HashMap<Key, (Entry, Vec<Message>)> = pushed
                .into_iter()
                .zip(answers)
                .map(|((k, e, _), a)| (k, (e, a)))
                .collect();
            self.write_outs(operation, &by_key, outs, false)?;
        }
        Ok(())
    }

    /// Why MXNet's servers cannot take a push of `entry` now (a `pushpull` with `pushpull`), if
    /// they cannot: an async worker with no optimizer set (MXNet's servers abort), a row-sparse
    /// key in a pushpull or with no optimizer set (MXNet's servers corrupt the value), a
    /// compressed pushpull (MXNet's workers abort).
    fn push_refusal(&self, entry: &Entry, pushpull: bool) -> Option<Error> {
        let optimizer_set = self.optimizer_sent.load(Ordering::Acquire);
        let why = if self.asynchronous && !optimizer_set {
            "this async worker has set no optimizer: in async mode MXNet 1.9.1's servers apply \
             each push through the optimizer, and abort without one (\"Updater needs to be set \
             for async mode\"); call set_optimizer first, as every MXNet worker does"
        } else if entry.row_len.is_some() && pushpull {
            "a row-sparse key in a pushpull (MXNet's workers push rows and pull them apart: \
             push, then row_sparse_pull)"
        } else if entry.row_len.is_some() && !optimizer_set {
            "a row-sparse push with no optimizer set on this worker (MXNet 1.9.1's servers \
             would replace the value by the pushed rows and read it as if it held every row; \
             call set_optimizer first)"
        } else if entry.packed.is_some() && pushpull {
            return Some(Error::Unsupported {
                store: self.name.clone(),
                operation: "pushpull with gradient compression (MXNet 1.9.1 compresses pushes \
                            only, and its workers abort on a compressed pushpull: push, then \
                            pull)",
            });
        } else {
            return None;
        };
        Some(Error::InvalidArgument(why.into()))
    }

    /// `init`: checks every key, numbers string keys, rank 0 pushes the values (the servers
    /// take a key's first push as its value), then every worker meets in a barrier.
    fn init_keys(&self, operation: &'static str, values: &KeyedValues<'_>) -> Result<()> {
        values.check_one_value_per_key(&self.name, operation)?;
        let _one_init_at_a_time = lock(&self.init);
        let mut new: Vec<(Key, Entry)> = Vec::with_capacity(values.len());
        {
            let table = lock(&self.table);
            let codec = table.codec;
            let mut next_str_key = table.next_str_key;
            for (key, value) in values.iter() {
                let at = |e: Error| e.at_key(&self.name, operation, key.clone());
                // One value per key was checked above: a key repeats only across calls.
                if table.entries.contains_key(key) {
                    return Err(at(Error::DuplicateInit));
                }
                if let Some(why) = table.failed_inits.get(key) {
                    return Err(at(Error::InvalidArgument(format!(
                        "its init failed ({why}) once its value may have reached the servers: \
                         MXNet's protocol cannot init a key twice (the second value would count \
                         as a push); restart the job"
                    ))));
                }
                // One type of key per store, as in MXNet, whose workers number string keys
                // 0, 1, 2, ... in the order of their init: they would share the int keys.
                if let Some(first) = table.entries.keys().next() {
                    if !first.same_kind(key) {
                        return Err(Error::MixedKeyTypes {
                            operation,
                            first: first.clone(),
                            other: key.clone(),
                        });
                    }
                }
                let by_rows = value.storage_type() == StorageType::RowSparse;
                if by_rows && codec.is_some() {
                    return Err(at(Error::InvalidArgument(
                        "a row-sparse key with gradient compression (MXNet: \"Gradient \
                         compression for row sparse storage type is not supported\")"
                            .into(),
                    )));
                }
                if let Some(refused) = refused_dtype(value.dtype()) {
                    return Err(at(Error::Unsupported {
                        store: self.name.clone(),
                        operation: refused,
                    }));
                }
                let id = match key {
                    Key::Int(k) => i32::try_from(*k).ok().filter(|k| *k >= 0).ok_or_else(|| {
                        at(Error::InvalidArgument(
                            "MXNet's dist keys are ints from 0 to 2^31 - 1 (a negative key \
                                 would land in another server's key range)"
                                .into(),
                        ))
                    })?,
                    Key::Str(_) => {
                        let id = next_str_key;
                        next_str_key += 1;
                        id
                    }
                };
                let row_len = by_rows.then(|| value.shape()[1..].iter().product::<usize>());
                let (slices, packed) = match codec {
                    _ if by_rows => (self.row_layout(id, value.shape()).map_err(at)?, None),
                    Some(codec) => {
                        let packed = self
                            .packed_layout(id, value.size(), value.dtype(), codec)
                            .map_err(at)?;
                        (packed.slices(), Some(packed))
                    }
                    None => (
                        encoding::place(id, value.size(), self.num_servers, self.bigarray_bound)
                            .map_err(|e| at(Error::InvalidArgument(e)))?,
                        None,
                    ),
                };
                let largest = slices.iter().map(|s| s.elements.len()).max().unwrap_or(0);
                if largest.saturating_mul(value.dtype().size_of()) > i32::MAX as usize {
                    return Err(at(Error::InvalidArgument(format!(
                        "a slice of {largest} elements of {}: ps-lite's lengths are 32-bit (at \
                         most 2 GiB per server and key; add servers)",
                        value.dtype()
                    ))));
                }
                let entry = Entry {
                    id,
                    shape: value.shape().to_vec(),
                    dtype: value.dtype(),
                    slices,
                    packed,
                    row_len,
                };
                log::debug!("{}: key {key} is MXNet key {}", self.name, entry.id);
                new.push((key.clone(), entry));
            }
        }
        if self.van.rank() == 0 {
            // The caller's bytes, or a copy of a value that is not contiguous (a view); every
            // row of a row-sparse key.
            let payloads: Vec<Outgoing<'_>> = values
                .values()
                .iter()
                .zip(&new)
                .map(|(&v, (key, entry))| match entry.row_len {
                    Some(_) => entry
                        .init_rows(v)
                        .map(Outgoing::Rows)
                        .map_err(|e| e.at_key(&self.name, operation, key.clone())),
                    None => Ok(Outgoing::Dense(reduce::outbound(&[v], &self.reduce))),
                })
                .collect::<Result<_>>()?;
            let requests: Vec<Request<'_>> = new
                .iter()
                .zip(&payloads)
                .map(|((key, entry), payload)| Request {
                    key,
                    entry,
                    payload: payload.payload(),
                })
                .collect();
            if let Err(e) = self.exchange(operation, &requests, false, 0) {
                self.init_failed(&new, &e);
                return Err(e);
            }
        }
        // The keys are this worker's once every worker got past the init: a failed init
        // leaves them out, refused from then on (an init cannot be retried in the same job, as
        // in MXNet: rank 0's values may be on the servers already, and a second push of them
        // would count as a round's push).
        if let Err(e) = self.van.barrier(WORKER_GROUP) {
            let e = backend(&self.name, e);
            // Only rank 0 sent values: another rank may init again.
            if self.van.rank() == 0 {
                self.init_failed(&new, &e);
            }
            return Err(e);
        }
        let mut table = lock(&self.table);
        for (key, entry) in new {
            if matches!(key, Key::Str(_)) {
                table.next_str_key = table.next_str_key.max(entry.id + 1);
            }
            table.entries.insert(key, entry);
        }
        Ok(())
    }

    /// Records that the init of `new` failed with `e` once rank 0's values may have been sent:
    /// those keys are refused from then on, and string keys keep the ids they took (MXNet's
    /// workers number them at `init`, whatever follows).
    fn init_failed(&self, new: &[(Key, Entry)], e: &Error) {
        let mut table = lock(&self.table);
        for (key, entry) in new {
            if matches!(key, Key::Str(_)) {
                table.next_str_key = table.next_str_key.max(entry.id + 1);
            }
            table.failed_inits.insert(key.clone(), e.to_string());
        }
    }

    /// The end of the job, as an MXNet worker ends it: the workers meet, rank 0 stops the
    /// servers, and every node meets in the last barrier.
    fn finish(&mut self) -> std::result::Result<(), VanError> {
        self.van.barrier(WORKER_GROUP)?;
        let stopped = match self.van.rank() {
            0 => self
                .command_all(CMD_STOP_SERVER, "")
                .map_err(|e| VanError(e.to_string())),
            _ => Ok(()),
        };
        // The last barrier even when the servers were not stopped: the scheduler waits for it.
        let last = self.van.barrier(EVERYONE);
        stopped.and(last)
    }
}

/// The van settings of a node of the job `dist` describes.
fn van_config(name: &str, dist: &DistConfig) -> Result<VanConfig> {
    let host = kvstore_dist::node::advertised_host(dist).map_err(|e| Error::Backend {
        store: name.to_string(),
        source: Box::new(e),
    })?;
    Ok(VanConfig {
        scheduler: dist.scheduler_addr(),
        bind: dist.bind_host.clone().unwrap_or_else(|| host.clone()),
        host,
        port: dist.port.unwrap_or(0),
        timeout: dist.timeout,
        max_message_bytes: dist.max_message_bytes,
    })
}

/// Runs this crate's ps-lite scheduler or server (by `dist.role`) until the job ends: MXNet
/// 1.9.1's Python workers (and this crate's) can use them in place of MXNet's.
///
/// # Errors
/// [`Error::InvalidArgument`] for a worker's configuration; [`Error::Backend`] when the role
/// fails (naming why).
pub fn run_role(name: &str, dist: &DistConfig) -> Result<()> {
    let workers = dist.num_workers as usize;
    if dist.secret.is_some() {
        log::warn!(
            "{name}: KVSTORE_SECRET_FILE / KVSTORE_SECRET is set, but ps-lite's protocol has no \
             handshake: this {} lets in any process that reaches its port",
            dist.role
        );
    }
    if dist.num_servers == 0 {
        return Err(Error::InvalidArgument(format!(
            "{name}: DMLC_NUM_SERVER=0: a ps-lite job needs at least one server"
        )));
    }
    match dist.role {
        Role::Scheduler => {
            let config = VanConfig {
                scheduler: dist.scheduler_addr(),
                host: dist.root_uri.clone(),
                bind: dist
                    .bind_host
                    .clone()
                    .unwrap_or_else(|| dist.root_uri.clone()),
                port: dist.root_port,
                timeout: dist.timeout,
                max_message_bytes: dist.max_message_bytes,
            };
            crate::scheduler::run_scheduler(config, workers, dist.num_servers as usize)
                .map_err(|e| backend(name, e))
        }
        Role::Server => crate::server::run_server(van_config(name, dist)?, workers)
            .map_err(|e| backend(name, e)),
        Role::Worker => Err(Error::InvalidArgument(format!(
            "{name}: run_role runs the scheduler or a server; a worker creates the store"
        ))),
    }
}

/// Why a key of `dtype` is refused, if it is: MXNet 1.9.1's servers take floating-point
/// values only and hold every key as float32.
fn refused_dtype(dtype: DType) -> Option<&'static str> {
    if !crate::REFUSED_DTYPES.contains(&dtype) {
        return None;
    }
    match dtype {
        DType::F64 => Some(
            "a float64 key (MXNet 1.9.1's servers hold every key as float32: its values would \
             lose precision silently)",
        ),
        _ => Some(
            "a key of an integer or bfloat16 dtype (MXNet 1.9.1's servers abort on one: they \
             take floating-point values only)",
        ),
    }
}

impl KVStoreBase for PsLiteStore {
    fn type_name(&self) -> &str {
        &self.name
    }

    fn rank(&self) -> usize {
        self.van.rank()
    }

    fn num_workers(&self) -> usize {
        self.num_workers
    }

    fn is_capable(&self, capability: Capability) -> bool {
        crate::CAPABILITIES.contains(&capability)
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        self.init_keys("init", values)
    }

    fn push_batch(&self, values: &KeyedValues<'_>, priority: i32) -> Result<()> {
        self.push_values("push", values, None, priority)
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        self.pull_keys("pull", outs, ignore_sparse, priority)
    }

    /// One ps-lite `ZPushPull` per slice, as MXNet 1.9.1's `pushpull`: the server answers it
    /// with the key's value once the round is complete.
    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.push_values("pushpull", values, Some(outs), priority)
    }

    /// MXNet's `broadcast`: `init` (rank 0's value), then `pull`.
    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        outs.check_against("broadcast", values)?;
        outs.check_shapes_against(&self.name, "broadcast", values)?;
        self.init_keys("broadcast", values)?;
        self.pull_keys("broadcast", outs, true, priority)
    }

    /// MXNet's `row_sparse_pull` of a row-sparse key: the unique, sorted ids of each output's
    /// row-id array, one request per server holding some of the key (see the crate docs).
    fn row_sparse_pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        row_ids: &[&NDArray],
        priority: i32,
    ) -> Result<()> {
        self.pull_rows(outs, row_ids, priority)
    }

    fn barrier(&self) -> Result<()> {
        self.van
            .barrier(WORKER_GROUP)
            .map_err(|e| backend(&self.name, e))
    }

    /// Sent from this worker, as MXNet sends it (every worker that calls it sends it; MXNet's
    /// servers unpickle a `kController` body, a pickled Python optimizer, running what it
    /// names; this crate's servers read it as data).
    fn send_command_to_servers(&self, head: i32, body: &str) -> Result<()> {
        self.command_all(head, body)?;
        if head == crate::server::CMD_CONTROLLER {
            self.optimizer_sent.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// MXNet's `kv.set_optimizer`: the optimizer goes to every server as the pickle MXNet's
    /// servers turn into their own optimizer (`functools.partial(<MXNet's class>,
    /// **hyper-parameters)()`, see [`crate::pickle::mxnet_optimizer_pickle`]); this crate's
    /// servers read it as data. Every worker that calls it sends it, as MXNet's do (MXNet's
    /// servers install it anew each time, with fresh states; this crate's keep an identical
    /// one running), so set it before the first push.
    fn set_optimizer(&self, optimizer: &kvstore_base::OptimizerSpec) -> Result<()> {
        // The spec's own checks first (an unknown name, a bad value), as every store makes.
        kvstore_optimizer::Updater::from_spec(optimizer)?;
        let refused =
            |e: String| Error::InvalidArgument(format!("{}: set_optimizer: {e}", self.name));
        let pickle = crate::pickle::mxnet_optimizer_pickle(optimizer).map_err(refused)?;
        let body = String::from_utf8(pickle).map_err(|e| refused(e.to_string()))?;
        self.send_command_to_servers(crate::server::CMD_CONTROLLER, &body)?;
        let multi_precision = optimizer.params.get("multi_precision");
        if multi_precision == Some(&kvstore_base::ParamValue::Bool(true)) {
            self.command_all(crate::server::CMD_SET_MULTI_PRECISION, "")?;
        }
        Ok(())
    }

    /// MXNet 1.9.1's 2-bit compression (see the crate docs): set it on every worker before the
    /// keys' `init`, as MXNet's `Trainer` does; rank 0 tells the servers.
    fn set_gradient_compression(&self, params: &kvstore_base::CompressionParams) -> Result<()> {
        self.set_compression(params)
    }
}

impl Drop for PsLiteStore {
    fn drop(&mut self) {
        if !self.started {
            return;
        }
        if let Err(e) = self.finish() {
            log::warn!("{}: ending the job failed: {e}", self.name);
        }
        self.van.close();
    }
}
