//! One round trip of a multi-key call: every part of every key to its server, pipelined, big
//! parts in messages of their own (sent from the caller's memory), small ones together in
//! batches; then the answers, written into the outputs. A big part to a server that has this
//! worker's shared-memory region travels through it when it fits (see
//! [`protocol`](crate::protocol#shared-memory-on-one-host)).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use kvstore_base::{Error, Key, NDArray, Result, StorageType};

use super::keys::KeyMeta;
use super::shm_link::Lease;
use super::DistStore;
use crate::protocol::{self, BatchItem};
use crate::transport::{Outgoing, Pending, Response, TransportError};

type Outcome = std::result::Result<Response, TransportError>;

/// Parts of at least this many bytes are copied into the outputs with streaming stores.
const STREAM_BYTES: usize = 16 << 20;
/// Threads that copy one big part.
const COPY_THREADS: usize = 1;

/// What a call sends for each part of each key.
#[derive(Clone, Copy)]
pub(crate) enum Parts<'a, 'd> {
    /// Nothing (a pull).
    None,
    /// Pushes: `data[i][p]` is what part `p` of key `i` sends (its elements, compressed or
    /// not, or some of its rows), with the flags `flags[i]` says.
    Pushed {
        /// The bytes of each part of each key.
        data: &'a [Vec<&'d [u8]>],
        /// Each key's flags ([`protocol::FLAG_COMPRESSED`], [`protocol::FLAG_ROW_SPARSE`]).
        flags: &'a [u16],
        /// Each key's push step number ([`KeyMeta::push_seq`]).
        seqs: &'a [protocol::PushSeq],
    },
    /// An init: each part's declaration ([`KeyMeta::init_meta`]), then, from rank 0, the
    /// part's bytes of `values[i]`; built as each message goes, so that an init never holds a
    /// second copy of the model.
    Init {
        /// Each key's value, contiguous.
        values: &'a [&'d [u8]],
        /// Whether the parts carry their data (rank 0's do).
        with_data: bool,
    },
}

impl<'d> Parts<'_, 'd> {
    /// The bytes sent for part `part` of key `i` (of `metas`).
    fn bytes(&self, metas: &[Arc<KeyMeta>], i: usize, part: usize) -> Cow<'d, [u8]> {
        match *self {
            Parts::None => Cow::Borrowed(&[]),
            Parts::Pushed { data, .. } => Cow::Borrowed(data[i][part]),
            Parts::Init { values, with_data } => {
                let meta = &metas[i];
                let mut payload = meta.init_meta(part).encode();
                if with_data {
                    payload.extend_from_slice(&values[i][meta.byte_range(part)]);
                }
                Cow::Owned(payload)
            }
        }
    }

    fn is_none(&self) -> bool {
        matches!(self, Parts::None)
    }

    /// The flags key `i`'s messages carry besides its dtype.
    fn flags(&self, i: usize) -> u16 {
        match *self {
            Parts::Pushed { flags, .. } => flags[i],
            Parts::None | Parts::Init { .. } => 0,
        }
    }

    /// The push step number of key `i` (0 for what is not a push).
    fn seq(&self, i: usize) -> protocol::PushSeq {
        match *self {
            Parts::Pushed { seqs, .. } => seqs[i],
            Parts::None | Parts::Init { .. } => 0,
        }
    }

    /// The bytes by which part `part` of key `i` is sent alone or batched: those of its value,
    /// or, for rows, those pushed and those answered (`receive`: the part's value), so that a
    /// few rows of a big key travel in a batch, and a big answer alone.
    fn size(&self, metas: &[Arc<KeyMeta>], i: usize, part: usize, receive: bool) -> usize {
        let value = metas[i].byte_range(part).len();
        match *self {
            Parts::Pushed { data, flags, .. } if flags[i] & protocol::FLAG_ROW_SPARSE != 0 => {
                data[i][part].len().max(if receive { value } else { 0 })
            }
            _ => value,
        }
    }
}

/// How parts are grouped into [`CMD_BATCH`](protocol::CMD_BATCH) messages: the protocol's
/// sizes, made smaller when the largest message a node accepts (`KVSTORE_MAX_MESSAGE_BYTES`,
/// 1 KiB at the least) is, so that no batch (nor its answer) is ever over it.
struct BatchLimits {
    /// Parts bigger than this go alone.
    item: usize,
    /// A batch is closed once its parts' bytes reach this.
    batch: usize,
    /// A batch never grows past this many bytes of message (see [`BatchLimits::cost`]).
    message: usize,
}

impl BatchLimits {
    /// What an init's key description adds to an item at most, besides a string key's text
    /// (its `InitMeta`: 25 bytes and the key as text, an integer's at most 20 digits).
    const ITEM_EXTRA: usize = 64;

    fn new(max_message_bytes: u64) -> BatchLimits {
        let max = usize::try_from(max_message_bytes).unwrap_or(usize::MAX);
        BatchLimits {
            item: protocol::BATCH_ITEM_BYTES.min(max / 4),
            batch: protocol::BATCH_BYTES.min(max / 2),
            // The batch's own count (4 bytes) kept out.
            message: max.saturating_sub(4),
        }
    }

    /// The most one part of `size` bytes of `key` adds to a batch message: its bytes, its
    /// table entry and an init's key description.
    fn cost(size: usize, key: &Key) -> usize {
        size + protocol::BATCH_ITEM_LEN + Self::ITEM_EXTRA + Self::key_text(key)
    }

    /// The bytes of a string key's text (an integer key's fit in [`Self::ITEM_EXTRA`]).
    fn key_text(key: &Key) -> usize {
        match key {
            Key::Str(s) => s.len(),
            Key::Int(_) => 0,
        }
    }
}

/// What a call sends: the command, the keys, their parts and the flags to add.
#[derive(Clone, Copy)]
struct Call<'a, 'd> {
    operation: &'static str,
    command: u32,
    metas: &'a [Arc<KeyMeta>],
    parts: Parts<'a, 'd>,
    extra_flags: u16,
}

/// What one sent message covers: a single part, or the parts of a batch in item order.
enum Sent {
    One {
        meta: usize,
        part: usize,
        /// The shared-memory slots the message uses, if any.
        shm: Option<Lease>,
    },
    Batch {
        items: Vec<(usize, usize)>,
    },
}

/// Where one part's answer is.
#[derive(Clone)]
enum Src {
    /// A byte range of a received buffer.
    Buffer(usize, Range<usize>),
    /// The reply slot of a lease.
    Shm(usize),
}

/// The answers of a pull or pushpull: each part's bytes inside one of the received buffers,
/// or in a shared-memory reply slot.
pub(crate) struct Answers {
    buffers: Vec<Vec<u8>>,
    /// Where each part of each key is.
    slots: Vec<Vec<Src>>,
    /// Buffers received for a single part, by key: returned to the key's pool afterwards.
    owned: Vec<(usize, usize)>,
    /// Answered leases whose reply slots hold parts (their slots are freed on drop).
    leases: Vec<Lease>,
}

impl Answers {
    /// Calls `f` with the bytes of part `part` of key `meta`.
    fn with_part<T>(&self, meta: usize, part: usize, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        match &self.slots[meta][part] {
            Src::Buffer(b, range) => Ok(f(&self.buffers[*b][range.clone()])),
            Src::Shm(l) => self.leases[*l]
                .with_reply(f)
                .map_err(|e| Error::InvalidArgument(format!("shared-memory answer: {e}"))),
        }
    }

    /// Writes key `i`'s value into `out`: straight into its memory when `out` is dense,
    /// contiguous and of the key's dtype, else through a copy cast into `out`.
    pub(crate) fn write(&self, i: usize, meta: &KeyMeta, out: &mut NDArray) -> Result<()> {
        if out.storage_type() == StorageType::Dense && out.dtype() == meta.dtype {
            if let Some(bytes) = out.as_bytes_mut() {
                for part in 0..meta.parts.len() {
                    let dst = &mut bytes[meta.byte_range(part)];
                    self.with_part(i, part, |src| copy_bytes(dst, src))?;
                }
                return Ok(());
            }
        }
        let mut value = NDArray::zeros(&meta.shape, meta.dtype);
        let bytes = value.as_bytes_mut().expect("a fresh array is contiguous");
        for part in 0..meta.parts.len() {
            let dst = &mut bytes[meta.byte_range(part)];
            self.with_part(i, part, |src| dst.copy_from_slice(src))?;
        }
        if out.storage_type() == StorageType::RowSparse {
            *out = value.to_row_sparse()?.astype(out.dtype());
            Ok(())
        } else {
            out.assign(&value)
        }
    }

    /// Returns the single-part buffers to their keys for reuse.
    pub(crate) fn recycle(mut self, metas: &[Arc<KeyMeta>]) {
        for (meta, b) in self.owned.drain(..) {
            metas[meta].give_buffer(std::mem::take(&mut self.buffers[b]));
        }
    }
}

impl DistStore {
    /// Sends `command` (init, push, pull or pushpull) for every part of `metas` (with the
    /// bytes of `parts`, flagged with `extra_flags`) and waits for every answer; returns the
    /// answers of a pull or pushpull. Callers enter by `priority` to send (see
    /// [`PriorityGate`](kvstore_base::PriorityGate)). Requests are waited for until the first
    /// lost server (see [`settle`]); a lost server is the error returned, else the first
    /// failure, wrapped with its key.
    pub(crate) fn exchange(
        &self,
        operation: &'static str,
        command: u32,
        metas: &[Arc<KeyMeta>],
        parts: Parts<'_, '_>,
        extra_flags: u16,
        priority: i32,
    ) -> Result<Option<Answers>> {
        let receive = answers_data(command);
        let call = Call {
            operation,
            command,
            metas,
            parts,
            extra_flags,
        };
        self.check_message_sizes(&call)?;
        let limits = BatchLimits::new(self.max_message_bytes);
        let mut sent: Vec<(Sent, Pending)> = Vec::new();
        // Calls go out on the wire in priority order; answers are awaited outside the gate.
        let pass = self.send_gate.enter(priority);
        for server in 0..self.servers.len() {
            let mut batch: Vec<(usize, usize)> = Vec::new();
            let (mut batch_bytes, mut batch_message) = (0, 0);
            for (i, meta) in metas.iter().enumerate() {
                for (part, p) in meta.parts.iter().enumerate() {
                    if p.server != server {
                        continue;
                    }
                    let size = parts.size(metas, i, part, receive);
                    if size > limits.item {
                        let what = format!("{operation} of key {}", meta.key);
                        let payload = parts.bytes(metas, i, part);
                        let flags = (parts.flags(i), parts.seq(i));
                        let (pending, shm) = self
                            .send_one(&call, (meta, part, flags), &payload, &what)
                            .map_err(self.transport_at(operation, &meta.key))?;
                        sent.push((Sent::One { meta: i, part, shm }, pending));
                        continue;
                    }
                    let cost = BatchLimits::cost(size, &meta.key);
                    if !batch.is_empty() && batch_message + cost > limits.message {
                        let items = std::mem::take(&mut batch);
                        sent.push(self.send_batch(&call, server, items)?);
                        (batch_bytes, batch_message) = (0, 0);
                    }
                    batch.push((i, part));
                    batch_bytes += size;
                    batch_message += cost;
                    if batch_bytes >= limits.batch || batch.len() >= protocol::BATCH_MAX_ITEMS {
                        let items = std::mem::take(&mut batch);
                        sent.push(self.send_batch(&call, server, items)?);
                        (batch_bytes, batch_message) = (0, 0);
                    }
                }
            }
            if !batch.is_empty() {
                sent.push(self.send_batch(&call, server, batch)?);
            }
        }
        drop(pass);
        let mut answers = Answers {
            buffers: Vec::new(),
            slots: metas
                .iter()
                .map(|m| vec![Src::Buffer(0, 0..0); m.parts.len()])
                .collect(),
            owned: Vec::new(),
            leases: Vec::new(),
        };
        let mut first_error: Option<Error> = None;
        let mut lost = None;
        for (mut what, outcome) in settle(sent) {
            if let Sent::One {
                shm: Some(lease), ..
            } = &mut what
            {
                lease.settle(&outcome);
            }
            match outcome {
                Ok(response)
                    if receive && response.header.flags & protocol::FLAG_SHM_REPLY != 0 =>
                {
                    let Sent::One {
                        meta,
                        part,
                        shm: Some(lease),
                    } = what
                    else {
                        first_error.get_or_insert_with(|| {
                            Error::InvalidArgument(format!(
                                "{}: a server answered in shared memory a request that named no reply slot",
                                self.name
                            ))
                        });
                        continue;
                    };
                    let expected = metas[meta].byte_range(part).len() as u64;
                    if lease.reply.map(|s| s.len) != Some(expected) || !response.payload.is_empty()
                    {
                        first_error.get_or_insert_with(|| {
                            self.at(operation, &metas[meta].key)(Error::InvalidArgument(format!(
                                "a server answered part {part} in shared memory with a payload of {} bytes",
                                response.payload.len()
                            )))
                        });
                        continue;
                    }
                    answers.slots[meta][part] = Src::Shm(answers.leases.len());
                    answers.leases.push(lease);
                }
                Ok(response) if receive => {
                    let b = answers.buffers.len();
                    let buf = response.payload.into_vec();
                    match what {
                        Sent::One { meta, part, .. } => {
                            if buf.len() != metas[meta].byte_range(part).len() {
                                first_error.get_or_insert_with(|| {
                                    self.at(operation, &metas[meta].key)(Error::InvalidArgument(
                                        format!(
                                            "a server answered {} bytes for part {part}, {} \
                                             expected",
                                            buf.len(),
                                            metas[meta].byte_range(part).len()
                                        ),
                                    ))
                                });
                            }
                            answers.slots[meta][part] = Src::Buffer(b, 0..buf.len());
                            answers.owned.push((meta, b));
                        }
                        Sent::Batch { items } => {
                            let mut at = 0;
                            for (meta, part) in items {
                                let len = metas[meta].byte_range(part).len();
                                let end = (at + len).min(buf.len());
                                answers.slots[meta][part] = Src::Buffer(b, at.min(end)..end);
                                at += len;
                            }
                            if at != buf.len() {
                                first_error.get_or_insert_with(|| {
                                    Error::InvalidArgument(format!(
                                        "{}: a server answered {} bytes to a batch of {at} bytes",
                                        self.name,
                                        buf.len()
                                    ))
                                });
                            }
                        }
                    }
                    answers.buffers.push(buf);
                }
                Ok(_) => {}
                Err(e) if is_loss(&e) => {
                    lost.get_or_insert_with(|| self.attribute(operation, metas, &what, e));
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| self.attribute(operation, metas, &what, e));
                }
            }
        }
        // A lost server explains the other failures of the call (rounds it left incomplete).
        if let Some(e) = lost.or(first_error) {
            answers.recycle(metas);
            return Err(e);
        }
        Ok(receive.then_some(answers))
    }

    /// Refuses a call, before it sends anything, when one of its parts would be a message over
    /// the largest a node accepts (`KVSTORE_MAX_MESSAGE_BYTES`): the transport refuses to send
    /// it, and the parts sent before it would be declared or pushed, a sync round counting a
    /// retry's as the next. Inits and pushes of rows are checked: an init is a key's biggest
    /// dense message, and its pushes and pulls are no bigger, but rows carry their 8-byte ids
    /// besides (a 1-d float32 key pushed whole is three times its init). The calls that move
    /// dense data take no extra pass over their parts. Parts are measured as TCP messages even
    /// where a server shares memory with this worker: its region may have no room when the
    /// part is sent, and a job behaves alike on one host and across hosts.
    fn check_message_sizes(&self, call: &Call<'_, '_>) -> Result<()> {
        let init = call.command == protocol::CMD_INIT;
        let rows = |i: usize| call.parts.flags(i) & protocol::FLAG_ROW_SPARSE != 0;
        if !init && !(0..call.metas.len()).any(rows) {
            return Ok(());
        }
        let max = self.max_message_bytes;
        for (i, meta) in call.metas.iter().enumerate() {
            if !init && !rows(i) {
                continue;
            }
            for (part, p) in meta.parts.iter().enumerate() {
                let size = call.parts.size(call.metas, i, part, false) as u64;
                // An init's message also carries the key's description.
                let extra = match init {
                    true => BatchLimits::ITEM_EXTRA + BatchLimits::key_text(&meta.key),
                    false => 0,
                };
                if size + extra as u64 <= max {
                    continue;
                }
                let advice = match init {
                    true => {
                        "MXNET_KVSTORE_BIGARRAY_BOUND lower to cut big keys across more servers"
                    }
                    false => "push fewer rows per call (each row carries an 8-byte id)",
                };
                return Err(self.at(call.operation, &meta.key)(Error::InvalidArgument(
                    format!(
                        "part {part} of the key (for server {}) would be a message of {size} \
                         bytes, over the largest message a node accepts, {max} bytes \
                         (KVSTORE_MAX_MESSAGE_BYTES): nothing of the call was sent; set \
                         KVSTORE_MAX_MESSAGE_BYTES higher on every node of the job, or {advice}",
                        p.server
                    ),
                )));
            }
        }
        Ok(())
    }

    /// Sends one big part (of `meta`, with its key's `flags`) in a message of its own:
    /// through the shared-memory region of its server when there is one with room, else over
    /// TCP. Returns the request and the slots it uses.
    fn send_one(
        &self,
        call: &Call<'_, '_>,
        (meta, part, (flags, seq)): (&KeyMeta, usize, (u16, protocol::PushSeq)),
        payload: &[u8],
        what: &str,
    ) -> std::result::Result<(Pending, Option<Lease>), TransportError> {
        let command = call.command;
        let extra_flags = call.extra_flags | flags;
        let receive = answers_data(command);
        // An init (rare, and answered only once rank 0's value is in) stays on TCP.
        let link = match command {
            protocol::CMD_INIT => None,
            _ => self.shm[meta.parts[part].server].as_ref(),
        };
        let data = (command != protocol::CMD_PULL).then_some(payload);
        let reply = receive.then(|| meta.byte_range(part).len());
        // A compressed push takes the slot too (its flag tells the server to dequantise what
        // it reads there); the answer of a pushpull is the uncompressed value either way.
        let lease = link.and_then(|link| link.lease(data, reply, what));
        let Some(mut lease) = lease else {
            let out = Outgoing::new(command, payload).flags(extra_flags);
            return Ok((self.send(meta, (part, seq), out, what, receive)?, None));
        };
        let (shm_flags, slots) = lease.slots();
        lease.sending();
        let out = Outgoing::new(command, &slots).flags(shm_flags | extra_flags);
        // The answer is expected in the reply slot (an empty message): no receive buffer. One
        // that comes over TCP after all (a server may answer so) is read as usual.
        let pending = self.send(meta, (part, seq), out, what, false)?;
        Ok((pending, Some(lease)))
    }

    fn send_batch(
        &self,
        call: &Call<'_, '_>,
        server: usize,
        items: Vec<(usize, usize)>,
    ) -> Result<(Sent, Pending)> {
        let Call {
            operation,
            command,
            metas,
            parts,
            extra_flags,
        } = *call;
        let chunks: Vec<Cow<'_, [u8]>> = if parts.is_none() {
            Vec::new()
        } else {
            items
                .iter()
                .map(|&(i, part)| parts.bytes(metas, i, part))
                .collect()
        };
        let table: Vec<BatchItem> = items
            .iter()
            .enumerate()
            .map(|(n, &(i, part))| BatchItem {
                wire: metas[i].wire,
                part: part as u32,
                flags: protocol::dtype_flag(metas[i].dtype) | extra_flags | parts.flags(i),
                seq: parts.seq(i),
                // Pushed bytes (maybe compressed), else the bytes expected back.
                len: chunks
                    .get(n)
                    .map_or(metas[i].byte_range(part).len(), |c| c.len())
                    as u64,
            })
            .collect();
        let payload = BatchItem::encode(&table, &chunks);
        let first = &metas[items[0].0].key;
        let what = match items.len() {
            1 => format!("{operation} of key {first} (a batch)"),
            n => format!("{operation} of {n} keys from key {first} (a batch)"),
        };
        let out = Outgoing::new(protocol::CMD_BATCH, &payload).aux(u64::from(command));
        match self.servers[server].send(out, &what) {
            Ok(p) => Ok((Sent::Batch { items }, p)),
            Err(e) => {
                let key = &metas[items[0].0].key;
                Err(self.transport_at(operation, key)(e))
            }
        }
    }

    /// Wraps a failed request's error with the key it concerns: a batch's error names its
    /// failed item.
    fn attribute(
        &self,
        operation: &'static str,
        metas: &[Arc<KeyMeta>],
        sent: &Sent,
        e: TransportError,
    ) -> Error {
        let meta = match sent {
            Sent::One { meta, .. } => *meta,
            Sent::Batch { items } => {
                let named = match &e {
                    TransportError::Remote { message, .. } => {
                        protocol::split_item_error(message).map(|(i, _)| i)
                    }
                    _ => None,
                };
                items[named.filter(|&i| i < items.len()).unwrap_or(0)].0
            }
        };
        self.transport_at(operation, &metas[meta].key)(e)
    }
}

/// Waits for the requests and returns the outcomes in the order they settled, and stops at the
/// first lost connection (the requests left are dropped): while the oldest request waits, the
/// requests of a connection that ended are settled first, so a server that died is reported
/// within a slice (50 ms), not after waiting out a round that another server holds open
/// because of it.
pub(crate) fn settle<T>(pending: Vec<(T, Pending)>) -> Vec<(T, Outcome)> {
    const SLICE: Duration = Duration::from_millis(50);
    let mut settled = Vec::with_capacity(pending.len());
    let mut pending: VecDeque<(T, Pending)> = pending.into();
    // Records an outcome; true when it is a lost connection (the rest is then dropped).
    let mut record = |tag: T, outcome: Outcome| {
        let lost = matches!(&outcome, Err(e) if is_loss(e));
        settled.push((tag, outcome));
        lost
    };
    // Answers come back in about the order the requests went out: wait for the oldest, and
    // only when a slice passes without its answer look through the others for a closed
    // connection, so that settling n requests costs O(n), not O(n^2).
    'waiting: while let Some((tag, mut first)) = pending.pop_front() {
        if let Some(outcome) = first.poll(SLICE) {
            if record(tag, outcome) {
                break;
            }
            continue;
        }
        pending.push_front((tag, first));
        let (closed, open): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut pending)
            .into_iter()
            .partition(|(_, p)| p.connection_closed());
        pending = open;
        for (tag, p) in closed {
            if record(tag, p.wait()) {
                break 'waiting;
            }
        }
    }
    settled
}

/// Whether the answers to `command` carry the parts' data (a pull's or a pushpull's do).
fn answers_data(command: u32) -> bool {
    !matches!(command, protocol::CMD_PUSH | protocol::CMD_INIT)
}

/// Whether `e` means the connection to a server is gone (the server died or is unreachable).
pub(crate) fn is_loss(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::PeerClosed { .. }
            | TransportError::Io { .. }
            | TransportError::Connect { .. }
    )
}

/// `dst.copy_from_slice(src)`, big copies with cache-bypassing stores (as `local` writes its
/// pulls): received parts into outputs, which this worker does not read back.
fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    let config = kvstore_local::reduce::ReduceConfig {
        threads: COPY_THREADS,
        bigarray_bound: STREAM_BYTES,
    };
    kvstore_local::reduce::broadcast_slices(vec![dst], src, &config);
}
