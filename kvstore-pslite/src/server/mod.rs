//! A ps-lite server: MXNet 1.9.1's `KVStoreDistServer` in Rust, so that MXNet's own Python
//! workers and this crate's workers can use it.
//!
//! As MXNet's `DataHandleDefault`: a key's first push is its value (rank 0's `init`); in sync
//! mode (`kSyncMode`, which rank 0 sends when it creates `dist_sync`) a push is held until every
//! worker pushed the key, then the optimizer a worker set steps the value with the sum (the sum
//! replaces the value when none was set) and every held request is answered, with the value
//! when it asked for it (`pushpull`); a pull is answered at once with the value. Without sync
//! mode each push steps the value (or replaces it).
//!
//! The optimizer comes as MXNet's pickled Python object (`kController`): it is read as data
//! ([`crate::pickle`]) and rebuilt by name from `kvstore-optimizer`, keyed by MXNet's int key
//! (each server keeps the states of its own slices), and replaces any other optimizer before
//! it, as in MXNet; the same optimizer sent again (each MXNet worker sends it) keeps its
//! states, which MXNet's server starts afresh.
//!
//! As MXNet's `DataHandleCompressed`, once a worker sent `kSetGradientCompression` (2-bit, as
//! MXNet 1.9.1's text `"1,<threshold>"` says), a compressed push (the slice's length in its
//! first key, the packed words with the second) is dequantised and summed into the round as an
//! uncompressed push is, and a compressed pull is answered with the value.
//!
//! As MXNet's `DataHandleRowSparse` ([`rows`]), a row-sparse key is initialised with every row
//! and then pushed and pulled by rows; the optimizer sees the round's rows as a row-sparse
//! gradient.
//!
//! Unlike MXNet's, every dtype is summed exactly in its own type (MXNet's aborts on integer
//! dtypes and holds float64 as float32), a pickle it cannot read as one of MXNet's
//! optimizers (one that calls anything) stops the server with an error rather than being
//! run, and a sync round takes one push per worker: a worker's second push of a key waits for
//! the next round (MXNet's counts pushes, so a worker pushing twice completes a round that
//! lacks another worker's gradient).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use kvstore_base::{DType, Key, NDArray};
use kvstore_compression::{Codec, CompressionSpec, CompressionType};
use kvstore_local::reduce::{self, ReduceConfig};
use kvstore_optimizer::Updater;

use crate::encoding::{self, COMPRESSED_PUSH_PULL, DEFAULT_PUSH_PULL, ROW_SPARSE_PUSH_PULL};
use crate::meta::{data_type, Meta, Role};
use crate::van::{node_name, node_names, Message, Van, VanConfig, VanError, EVERYONE};
use crate::worker::{CMD_STOP_SERVER, CMD_SYNC_MODE};

pub mod rows;

/// MXNet's command carrying a pickled Python optimizer (`kController`).
pub const CMD_CONTROLLER: i32 = 0;
/// The largest pickled optimizer the server reads.
const MAX_OPTIMIZER_BYTES: usize = 16 << 20;

/// Most pushes of one key a worker may have waiting for later sync rounds.
const MAX_QUEUED_PUSHES: usize = 64;

/// MXNet's command turning on multi-precision updates (`kSetMultiPrecision`).
pub const CMD_SET_MULTI_PRECISION: i32 = 1;
/// MXNet's command setting gradient compression (`kSetGradientCompression`).
pub const CMD_SET_GRADIENT_COMPRESSION: i32 = 4;

/// One key's state on this server.
#[derive(Debug)]
struct Slot {
    dtype: DType,
    /// The value: 1-D for a dense key, `(rows, row_len)` for a row-sparse one.
    stored: NDArray,
    /// A row-sparse key's row length (elements per row); `None` for a dense key.
    row_len: Option<usize>,
    /// The sum of the last round, reused as the next round's output.
    spare: Option<NDArray>,
    /// This round's pushes, and the requests that brought them: one per worker.
    held: Vec<(Message, Pushed)>,
    /// Pushes of workers that pushed in this round already, for the rounds after it, in
    /// arrival order.
    queued: VecDeque<(Message, Pushed)>,
    /// When this round's first push arrived, and whether its wait was logged already.
    round_started: Option<(Instant, bool)>,
}

impl Slot {
    /// Whether worker `sender` pushed in this round already.
    fn holds_push_of(&self, sender: i32) -> bool {
        self.held.iter().any(|(held, _)| held.sender == sender)
    }

    /// A key's slot, holding `stored` and no round.
    fn new(dtype: DType, stored: NDArray, row_len: Option<usize>) -> Slot {
        Slot {
            dtype,
            stored,
            row_len,
            spare: None,
            held: Vec::new(),
            queued: VecDeque::new(),
            round_started: None,
        }
    }

    /// The sum of a complete round's pushes in `dtype` (the key's, or float32 for a half
    /// type under multi-precision), in the spare buffer: the uncompressed pushes added in
    /// arrival order, as MXNet's server merges them (`merged += pushed`), then the compressed
    /// ones dequantised into it (the first one overwriting it when no push was uncompressed).
    fn round_sum(&mut self, reduce: &ReduceConfig, dtype: DType) -> Result<NDArray, String> {
        if self.row_len.is_some() {
            return rows::round_sum(self, dtype);
        }
        let mut sum = match self.spare.take() {
            Some(spare) if spare.dtype() == dtype => spare,
            _ => NDArray::zeros(self.stored.shape(), dtype),
        };
        let cast: Vec<NDArray>;
        let mut dense: Vec<&NDArray> = self
            .held
            .iter()
            .filter_map(|(_, p)| match p {
                Pushed::Dense(value) => Some(value),
                Pushed::Packed { .. } | Pushed::Rows(_) => None,
            })
            .collect();
        if dense.first().is_some_and(|d| d.dtype() != dtype) {
            cast = dense.iter().map(|d| d.astype(dtype)).collect();
            dense = cast.iter().collect();
        }
        let mut written = !dense.is_empty();
        if written {
            // The first two in one pass (a + b either way), the others added one by one.
            let (first, rest) = dense.split_at(dense.len().min(2));
            reduce::sum_into(&mut sum, first, reduce, false);
            for d in rest {
                sum.add_assign(d).map_err(|e| e.to_string())?;
            }
        }
        for (_, pushed) in &self.held {
            if let Pushed::Packed { bytes, codec, .. } = pushed {
                let done = match written {
                    true => codec.dequantize_add_array(bytes, &mut sum),
                    false => codec.dequantize_array(bytes, &mut sum),
                };
                done.map_err(|e| e.to_string())?;
                written = true;
            }
        }
        Ok(sum)
    }
}

/// A push, as it arrived.
#[derive(Debug)]
enum Pushed {
    /// An uncompressed value.
    Dense(NDArray),
    /// The packed words of `elements` elements, and the codec to dequantise them with.
    Packed {
        elements: usize,
        bytes: Vec<u8>,
        codec: Codec,
    },
    /// Rows of a row-sparse key: a row-sparse array of the stored value's shape (no rows for
    /// a push that carried none).
    Rows(NDArray),
}

impl Pushed {
    /// The number of elements it stands for.
    fn len(&self) -> usize {
        match self {
            Pushed::Dense(value) | Pushed::Rows(value) => value.size(),
            Pushed::Packed { elements, .. } => *elements,
        }
    }

    /// The value it stands for.
    fn into_value(self) -> Result<NDArray, String> {
        match self {
            Pushed::Dense(value) | Pushed::Rows(value) => Ok(value),
            Pushed::Packed {
                elements,
                bytes,
                codec,
            } => {
                let mut value = NDArray::zeros(&[elements], DType::F32);
                codec
                    .dequantize_array(&bytes, &mut value)
                    .map_err(|e| e.to_string())?;
                Ok(value)
            }
        }
    }
}

/// The request type (uncompressed or compressed) and the dtype of a command word.
fn request_of(head: i32) -> Result<(u32, DType), String> {
    for request_type in [
        DEFAULT_PUSH_PULL,
        ROW_SPARSE_PUSH_PULL,
        COMPRESSED_PUSH_PULL,
    ] {
        for dtype in DType::ALL {
            let id = encoding::mxnet_dtype_id(dtype).expect("every dtype has an MXNet id");
            if encoding::command(request_type, id) == head {
                return Ok((request_type, dtype));
            }
        }
    }
    Err(format!(
        "command word {head}: not a dense, row-sparse or compressed push or pull of a known \
         dtype"
    ))
}

/// A little-endian `u64` from 8 bytes.
/// The values frame of a push, taken out of `request`, which keeps its keys alone (what its
/// answer echoes).
fn take_values(request: &mut Message) -> Vec<u8> {
    let vals = request
        .data
        .get_mut(1)
        .map(std::mem::take)
        .unwrap_or_default();
    request.data.truncate(1);
    vals
}

fn u64_at(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
}

/// The meta of the answer to `request`; with `with_value`, its data frames follow (the key,
/// the value, its length).
fn answer(request: &Message, with_value: bool) -> Meta {
    let meta = &request.meta;
    Meta {
        head: meta.head,
        request: false,
        push: meta.push,
        pull: meta.pull,
        simple_app: meta.simple_app,
        app_id: meta.app_id,
        timestamp: meta.timestamp,
        customer_id: meta.customer_id,
        data_type: match with_value {
            true => vec![data_type::UINT64, data_type::OTHER, data_type::INT32],
            false => Vec::new(),
        },
        ..Meta::default()
    }
}

/// Answers `request`, with `value` (written from its memory) when it asked for the value.
fn reply(van: &Van, request: &Message, value: Option<&[u8]>) -> Result<(), VanError> {
    match value.filter(|_| request.meta.pull) {
        Some(bytes) => {
            let key = request.data.first().map_or(&[][..], |k| k.as_slice());
            let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX).to_le_bytes();
            van.send(request.sender, &answer(request, true), &[key, bytes, &len])
        }
        None => van.send(request.sender, &answer(request, false), &[]),
    }
}

/// The server's loop state.
struct Server {
    van: Van,
    num_workers: usize,
    sync: bool,
    /// `kSetMultiPrecision` came: a sync round's float16/bfloat16 pushes are summed in float32,
    /// as MXNet's server sums them into its float32 buffer.
    multi_precision: bool,
    slots: HashMap<u64, Slot>,
    reduce: ReduceConfig,
    /// The gradient compression a worker set (`kSetGradientCompression`).
    codec: Option<Codec>,
    /// The optimizer a worker set (`kController`): applied to each round's sum (each push in
    /// async mode), as MXNet's server applies its updater.
    updater: Option<Updater>,
    /// What `updater` was built from.
    optimizer: Option<kvstore_base::OptimizerSpec>,
    /// The first key of this server's range (a compressed push's first key is this plus the
    /// slice's length).
    range_begin: u64,
}

impl Server {
    /// A command to the servers; `Ok(true)` when it stops the server.
    fn command(&mut self, request: &Message) -> Result<bool, VanError> {
        let head = request.meta.head;
        match head {
            CMD_SYNC_MODE => self.sync = true,
            CMD_STOP_SERVER => {}
            CMD_SET_MULTI_PRECISION => self.multi_precision = true,
            CMD_SET_GRADIENT_COMPRESSION => {
                let body = String::from_utf8_lossy(&request.meta.body);
                let refused = |why: String| {
                    VanError(format!(
                        "{} sent kSetGradientCompression {body:?}: {why}",
                        node_name(request.sender)
                    ))
                };
                let spec =
                    CompressionSpec::decode_params(&body).map_err(|e| refused(e.to_string()))?;
                if spec.kind != CompressionType::TwoBit {
                    return Err(refused(
                        "MXNet 1.9.1 has 2-bit compression only (its servers abort on another)"
                            .into(),
                    ));
                }
                log::info!("pslite server: gradient compression {body:?}");
                self.codec = Some(spec.codec());
            }
            CMD_CONTROLLER => {
                // The pickle is read as data, never run (see `pickle`); the optimizer is
                // rebuilt by name, and replaces any other before it, as MXNet's server does.
                // The same optimizer again (every MXNet worker sends it, rank 0 perhaps after
                // the first rounds) keeps the one running and its states, which MXNet's server
                // starts afresh.
                let refused = |why: String| {
                    VanError(format!(
                        "{} sent an optimizer (kController) this server does not run: {why}",
                        node_name(request.sender)
                    ))
                };
                let body = &request.meta.body;
                if body.len() > MAX_OPTIMIZER_BYTES {
                    return Err(refused(format!(
                        "{} bytes (MXNet's optimizers pickle to a few KiB; at most {} read)",
                        body.len(),
                        MAX_OPTIMIZER_BYTES
                    )));
                }
                let spec = crate::pickle::optimizer_spec(body).map_err(refused)?;
                if self.optimizer.as_ref() == Some(&spec) {
                    log::debug!("pslite server: the optimizer running, sent again: kept");
                } else {
                    let updater = Updater::from_spec(&spec).map_err(|e| refused(e.to_string()))?;
                    log::info!("pslite server: optimizer {} ({:?})", spec.name, spec.params);
                    self.updater = Some(updater);
                    self.optimizer = Some(spec);
                }
            }
            _ => log::info!("pslite server: command {head} acknowledged (nothing to do)"),
        }
        reply(&self.van, request, None)?;
        Ok(head == CMD_STOP_SERVER)
    }

    fn key_value(&mut self, mut request: Message) -> Result<(), VanError> {
        let sender = request.sender;
        let bad = |what: String| VanError(format!("{}: {what}", node_name(sender)));
        let (request_type, dtype) = request_of(request.meta.head).map_err(bad)?;
        if request_type == ROW_SPARSE_PUSH_PULL {
            return self.row_sparse(request, dtype);
        }
        let compressed_push = request_type == COMPRESSED_PUSH_PULL && request.meta.push;
        // A compressed push carries two keys: the slice's length (plus the range start), then
        // the slice's key; every other request its one key.
        let keys = request.data.first().map_or(&[][..], |k| k.as_slice());
        let (ps_key, size_key) = match (compressed_push, keys.len()) {
            (false, 8) => (u64_at(keys), None),
            (true, 16) => (u64_at(&keys[8..]), Some(u64_at(&keys[..8]))),
            (_, n) => return Err(bad(format!("a request with {n} bytes of keys"))),
        };
        if !request.meta.push {
            // A key never pushed is answered with no value (MXNet's server aborts): this
            // crate's worker then fails its pull naming this server (an MXNet worker fails a
            // check of ps-lite's).
            let value = self
                .slots
                .get(&ps_key)
                .map_or(&[][..], |s| s.stored.as_bytes().expect("contiguous"));
            return reply(&self.van, &request, Some(value));
        }
        // MXNet's server checks the lengths: one, the values' bytes, for a push; two, 0 (the
        // size key's) then the values' bytes, for a compressed push.
        let lens: Vec<i32> = request.data.get(2).map_or(Vec::new(), |l| {
            l.chunks(4)
                .map(|c| c.try_into().map_or(-1, i32::from_le_bytes))
                .collect()
        });
        let vals = take_values(&mut request);
        let expected_lens: &[i32] = match (size_key, i32::try_from(vals.len())) {
            (None, Ok(n)) => &[n][..],
            (Some(_), Ok(n)) => &[0, n][..],
            (_, Err(_)) => &[][..],
        };
        if lens != expected_lens || expected_lens.is_empty() {
            return Err(bad(format!(
                "a push of {} bytes to {} with lengths {lens:?} (MXNet's worker sends \
                 {expected_lens:?})",
                vals.len(),
                self.describe_key(ps_key)
            )));
        }
        let pushed = match size_key {
            None => {
                if !vals.len().is_multiple_of(dtype.size_of()) {
                    return Err(bad(format!("{} bytes of {dtype}", vals.len())));
                }
                let value = NDArray::from_bytes(&[vals.len() / dtype.size_of()], dtype, &vals)
                    .map_err(|e| bad(e.to_string()))?;
                Pushed::Dense(value)
            }
            Some(size_key) => {
                let codec = self.codec.ok_or_else(|| {
                    bad(
                        "a compressed push before kSetGradientCompression (no codec to \
                         dequantise it with)"
                            .into(),
                    )
                })?;
                if dtype != DType::F32 {
                    return Err(bad(format!(
                        "a compressed push of {dtype} (compression packs float32)"
                    )));
                }
                // The length must account for the words exactly: the server allocates no
                // more than the message's bytes stand for.
                let elements = size_key.wrapping_sub(self.range_begin);
                let elements = usize::try_from(elements)
                    .ok()
                    .filter(|n| n.div_ceil(codec.factor()).checked_mul(4) == Some(vals.len()))
                    .ok_or_else(|| {
                        bad(format!(
                            "a compressed push of {} bytes for {elements} elements",
                            vals.len()
                        ))
                    })?;
                Pushed::Packed {
                    elements,
                    bytes: vals,
                    codec,
                }
            }
        };
        let key_name = self.describe_key(ps_key);
        let Some(slot) = self.slots.get_mut(&ps_key) else {
            if let Pushed::Packed { elements, .. } = pushed {
                // MXNet's workers and this crate's init every key uncompressed; a size key
                // alone must not decide what the server allocates.
                return Err(bad(format!(
                    "a compressed push of {elements} elements to {key_name}, never initialised"
                )));
            }
            // The key's first push: its value.
            reply(&self.van, &request, None)?;
            let stored = pushed.into_value().map_err(bad)?;
            self.slots.insert(ps_key, Slot::new(dtype, stored, None));
            return Ok(());
        };
        if slot.row_len.is_some() || slot.dtype != dtype || slot.stored.shape() != [pushed.len()] {
            return Err(bad(format!(
                "a push of [{}] {dtype} to {}, which holds {:?} {}{}",
                pushed.len(),
                key_name,
                slot.stored.shape(),
                slot.dtype,
                match slot.row_len {
                    Some(_) => " by rows (row-sparse)",
                    None => "",
                }
            )));
        }
        self.take_push(ps_key, request, pushed)
    }

    /// Fails once a sync round waited [`Van::timeout`] for pushes, naming the key, the
    /// workers that pushed it and those that did not (MXNet's server waits forever, and its
    /// workers with it); logs a warning once a round waited a tenth of that (at most 60 s).
    fn check_waiting_rounds(&mut self, workers: &[i32]) -> Result<(), VanError> {
        let timeout = self.van.timeout();
        let warn_after = (timeout / 10).min(Duration::from_secs(60));
        let range_begin = self.range_begin;
        for (&ps_key, slot) in &mut self.slots {
            let Some((started, warned)) = &mut slot.round_started else {
                continue;
            };
            let waited = started.elapsed();
            if waited < warn_after {
                continue;
            }
            let pushed: Vec<i32> = slot.held.iter().map(|(r, _)| r.sender).collect();
            let missing = workers.iter().copied().filter(|id| !pushed.contains(id));
            let what = format!(
                "the sync round of {} has waited {waited:.1?} for pushes of {} (pushed by {})",
                rows::key_name(ps_key, range_begin),
                node_names(missing),
                node_names(pushed.iter().copied()),
            );
            if waited >= timeout {
                return Err(VanError(format!(
                    "{what}: given up after {timeout:?} (KVSTORE_TIMEOUT_SECS)"
                )));
            }
            if !*warned {
                *warned = true;
                log::warn!("pslite server: {what}");
            }
        }
        Ok(())
    }

    /// A push to the initialised key `ps_key`: in async mode applied at once (through the
    /// optimizer, or replacing the value); in sync mode held until every worker pushed the key,
    /// when the round's sum is applied so and every held request answered (with the value when
    /// it asked for it).
    fn take_push(&mut self, ps_key: u64, request: Message, pushed: Pushed) -> Result<(), VanError> {
        let sender = request.sender;
        let bad = |what: String| VanError(format!("{}: {what}", node_name(sender)));
        let Server {
            van,
            slots,
            num_workers,
            sync,
            multi_precision,
            reduce,
            range_begin,
            updater,
            ..
        } = self;
        let slot = slots.get_mut(&ps_key).expect("the caller found the key");
        // The key the optimizer knows: MXNet's int key (the server's range start taken off).
        let key = Key::Int(ps_key.wrapping_sub(*range_begin) as i64);
        // A half-precision round is summed in float32 under multi-precision, unless the optimizer
        // set since keeps no float32 copy to take such a gradient.
        let master = updater
            .as_ref()
            .is_none_or(|u| u.keeps_master_copy(slot.dtype));
        // Applies the optimizer to `weight`, when one was set (`Ok(false)` when none was).
        let mut optimize = |grad: &NDArray, weight: &mut NDArray| match updater {
            Some(updater) => updater
                .update(&key, grad, weight)
                .map(|()| true)
                .map_err(|e| bad(format!("the optimizer's update of key {key}: {e}"))),
            None => Ok(false),
        };
        if !*sync {
            let value = pushed.into_value().map_err(bad)?;
            if !optimize(&value, &mut slot.stored)? {
                match slot.row_len {
                    // The pushed rows replace the value; the others become zeros.
                    Some(_) => slot.stored.assign(&value).map_err(|e| bad(e.to_string()))?,
                    None => slot.stored = value,
                }
            }
            return reply(van, &request, slot.stored.as_bytes());
        }
        // The same request twice (sender and timestamp): ps-lite's PS_RESEND resends what was
        // not acknowledged, and this server sends no ACKs; counted as another worker's push it
        // would complete the round with a wrong sum.
        if slot.held.iter().chain(&slot.queued).any(|(held, _)| {
            held.sender == request.sender && held.meta.timestamp == request.meta.timestamp
        }) {
            return Err(bad(format!(
                "the same push to {} twice (timestamp {:?}): PS_RESEND must be unset, this \
                 server acknowledges no message",
                rows::key_name(ps_key, *range_begin),
                request.meta.timestamp
            )));
        }
        // A worker's second push of the key before the round completed belongs to the next
        // round: MXNet's server counts it as another worker's, completing the round without
        // one worker's gradient (and that worker's push then starts the next round).
        if slot.holds_push_of(sender) {
            let queued = slot
                .queued
                .iter()
                .filter(|(q, _)| q.sender == sender)
                .count();
            if queued >= MAX_QUEUED_PUSHES {
                return Err(bad(format!(
                    "{MAX_QUEUED_PUSHES} pushes of {} are queued for later sync rounds \
                     already, each waiting for every worker's push of the round before",
                    rows::key_name(ps_key, *range_begin)
                )));
            }
            slot.queued.push_back((request, pushed));
            return Ok(());
        }
        slot.round_started.get_or_insert((Instant::now(), false));
        slot.held.push((request, pushed));
        while slot.held.len() >= *num_workers {
            slot.round_started = None;
            let sum_dtype = match slot.dtype {
                DType::F16 | DType::BF16 if *multi_precision && master => DType::F32,
                dtype => dtype,
            };
            let sum = slot.round_sum(reduce, sum_dtype).map_err(bad)?;
            // The sum is the value, or the optimizer's gradient (a dense buffer is then kept
            // for the next round).
            let stepped = optimize(&sum, &mut slot.stored)?;
            match (stepped, slot.row_len) {
                (true, None) => slot.spare = Some(sum),
                (true, Some(_)) => {}
                (false, None) if sum.dtype() != slot.dtype => {
                    slot.stored.assign(&sum).map_err(|e| bad(e.to_string()))?;
                    slot.spare = Some(sum);
                }
                (false, None) => slot.spare = Some(std::mem::replace(&mut slot.stored, sum)),
                // The round's rows replace the value; the rows no one pushed become zeros.
                (false, Some(_)) => slot.stored.assign(&sum).map_err(|e| bad(e.to_string()))?,
            }
            let value = slot.stored.as_bytes().expect("contiguous");
            for (request, _) in slot.held.drain(..) {
                reply(van, &request, Some(value))?;
            }
            // The next round starts with the queued pushes: each worker's first.
            for (request, pushed) in std::mem::take(&mut slot.queued) {
                if slot.holds_push_of(request.sender) {
                    slot.queued.push_back((request, pushed));
                } else {
                    slot.held.push((request, pushed));
                }
            }
            if !slot.held.is_empty() {
                slot.round_started = Some((Instant::now(), false));
            }
        }
        Ok(())
    }
}

/// Runs a server of the job `config` names until rank 0 stops it (MXNet's `kStopServer`) and
/// every node met in the last barrier.
///
/// A worker's request it cannot serve (malformed, or not fitting its key) stops it with an
/// error naming the worker and the key: ps-lite has no error answer, an MXNet worker left
/// unanswered would wait forever, and a stopped server ends the job at once (its scheduler
/// sees it go).
///
/// # Errors
/// Joining fails, a request it cannot serve (named), or every worker lost.
pub fn run_server(config: VanConfig, num_workers: usize) -> Result<(), VanError> {
    let van = Van::join_as(config, Role::Server)?;
    van.barrier(EVERYONE)?;
    let range_begin = encoding::range_begin(van.rank(), van.servers().count());
    let mut server = Server {
        van,
        num_workers,
        sync: false,
        multi_precision: false,
        slots: HashMap::new(),
        reduce: ReduceConfig::from_env(),
        codec: None,
        range_begin,
        updater: None,
        optimizer: None,
    };
    let workers: Vec<i32> = server
        .van
        .nodes()
        .iter()
        .filter(|n| n.role == Role::Worker)
        .map(|n| n.id)
        .collect();
    if workers.len() != server.num_workers {
        // A round completes with `num_workers` pushes: a count not the job's would complete
        // rounds early (a partial sum) or never.
        return Err(VanError(format!(
            "this server was told the job has {} workers (DMLC_NUM_WORKER), but the \
             scheduler's node table lists {}: every node of a job needs the same \
             DMLC_NUM_WORKER",
            server.num_workers,
            workers.len()
        )));
    }
    let mut checked = Instant::now();
    loop {
        let request = server.van.next_request(Duration::from_secs(1));
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            server.check_waiting_rounds(&workers)?;
        }
        let Some(request) = request else {
            // Idle as long as the job trains; over once no worker is left to stop it, or when
            // a round waits for a worker that is gone.
            if server.van.all_lost(&workers) {
                return Err(VanError(
                    "every worker left without stopping the server (kStopServer)".into(),
                ));
            }
            if server.slots.values().any(|s| !s.held.is_empty()) {
                let lost: Vec<String> = workers
                    .iter()
                    .filter(|&&id| server.van.all_lost(&[id]))
                    .map(|&id| node_name(id))
                    .collect();
                if !lost.is_empty() {
                    return Err(VanError(format!(
                        "a sync round waits for pushes of {}, which left the job",
                        lost.join(", ")
                    )));
                }
            }
            continue;
        };
        if !workers.contains(&request.sender) {
            log::warn!(
                "pslite server: ignored a request from {}, not a worker of the job",
                node_name(request.sender)
            );
            continue;
        }
        crate::van::refuse_resender(&request)?;
        if request.meta.simple_app {
            if server.command(&request)? {
                break;
            }
        } else {
            server.key_value(request)?;
        }
    }
    server.van.barrier(EVERYONE)?;
    server.van.close();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_words_give_their_request_and_dtype() {
        assert_eq!(request_of(0), Ok((DEFAULT_PUSH_PULL, DType::F32)));
        assert_eq!(request_of(5), Ok((DEFAULT_PUSH_PULL, DType::F16)));
        assert_eq!(request_of(2), Ok((DEFAULT_PUSH_PULL, DType::F64)));
        assert_eq!(request_of(90), Ok((DEFAULT_PUSH_PULL, DType::BF16)));
        // 3: a compressed float32 request; 1, 8: row-sparse float32 and float16 ones.
        assert_eq!(request_of(3), Ok((COMPRESSED_PUSH_PULL, DType::F32)));
        assert_eq!(request_of(1), Ok((ROW_SPARSE_PUSH_PULL, DType::F32)));
        assert_eq!(request_of(8), Ok((ROW_SPARSE_PUSH_PULL, DType::F16)));
        assert!(request_of(-1).is_err());
    }

    #[test]
    fn answers_echo_their_request() {
        let request = Message {
            sender: 9,
            meta: Meta {
                head: 5,
                request: true,
                pull: true,
                app_id: Some(0),
                timestamp: Some(7),
                customer_id: 0,
                ..Meta::default()
            },
            data: vec![42u64.to_le_bytes().to_vec(), Vec::new()],
        };
        let meta = answer(&request, true);
        assert!(!meta.request && meta.pull && !meta.push);
        assert_eq!(
            (meta.head, meta.timestamp, meta.app_id),
            (5, Some(7), Some(0))
        );
        assert_eq!(meta.data_type.len(), 3);
        assert!(answer(&request, false).data_type.is_empty());
    }
}
