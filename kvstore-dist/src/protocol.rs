//! The data protocol between workers and servers, on top of the [`transport`](crate::transport).
//!
//! Every message is one frame: the `command` says what it is, `key` is the key's wire id (an
//! int key's bits, or the id a string key got at its first `init`), `aux` is the part index
//! (a value at or above the big-array bound is split into one part per server; a push's `aux`
//! also carries its step number, see "Retried pushes") and `flags`
//! carries the element type ([`dtype_flag`]). Payloads are the raw elements of the part in
//! native byte order, so a push or a pull moves its bytes without any encoding step.
//!
//! | command | payload | answer |
//! |---|---|---|
//! | [`CMD_HELLO`] | [`Hello`] | the server's rank in `aux` |
//! | [`CMD_INIT`] | [`InitMeta`], then rank 0's data | empty, once rank 0's value is in place |
//! | [`CMD_PUSH`] | the part's elements (with [`FLAG_ROW_SPARSE`]: [`RowsPush`]) | empty, once applied (sync: once merged; the round's last once the round is updated) |
//! | [`CMD_PULL`] | none | the part's elements |
//! | [`CMD_PUSHPULL`] | as [`CMD_PUSH`] | the round's result |
//! | [`CMD_ROW_SPARSE_PULL`] | [`RowRequest`] | the rows' elements inside the part |
//! | [`CMD_SET_OPTIMIZER`] | an [`OptimizerSpec`](kvstore_base::OptimizerSpec) as JSON; `key` 1: keep an optimizer already running (it must be the one the job set) | empty |
//! | [`CMD_COMMAND`] | the body, `key` = MXNet's command head | empty |
//! | [`CMD_SET_COMPRESSION`] | the compression parameters as JSON; `key` 1: keep a codec already set (it must be the same) | empty |
//! | [`CMD_BYE`] | none | empty; the worker is done |
//! | [`CMD_BATCH`] | [`BatchItem`]s, then the pushed data (or each init's payload) | the pulled data, concatenated in item order |
//! | [`CMD_SHM_ATTACH`] | [`ShmAttach`] | empty, once the server mapped the region |
//! | [`CMD_SAVE_STATES`] | none | the server's optimizer state file (its slices of every key) |
//! | [`CMD_LOAD_STATES`] | a state file of the server's slices | empty, once loaded |
//! | [`CMD_LOAD_OUTCOME`] | `key`: the load's number; `aux` 2: started, 1: rank 0's outcome (status byte, error text), 0: a question | empty; for a question: nothing yet, the outcome once recorded (held until then), or [`LOAD_PENDING`] after at most a second |
//!
//! # Shared memory on one host
//!
//! Right after its hello, a worker on the same host as a server may lend it a shared-memory
//! region ([`CMD_SHM_ATTACH`]; refused, or failing, it stays on TCP alone). Then a
//! [`CMD_PUSH`], [`CMD_PULL`] or [`CMD_PUSHPULL`] of one big part may carry [`ShmSlot`]s
//! instead of data: with [`FLAG_SHM_DATA`] the payload starts with the slot holding the pushed
//! elements; with [`FLAG_SHM_REPLY`] it then holds the slot the answer's elements go to, and
//! the server, having written them there, answers with an empty payload flagged
//! [`FLAG_SHM_REPLY`] (an answer without the flag carries its data as usual). A slot outside
//! the region is an error answer.
//!
//! # Row-sparse keys
//!
//! A key initialised with a row-sparse value is placed by whole rows (MXNet's
//! `EncodeRowSparseKey`, see [`placement::place_rows`](crate::placement::place_rows)), and a
//! dense key too where that keeps the balance
//! ([`placement::place_dense`](crate::placement::place_dense)); their parts are declared with
//! their row length ([`InitMeta::row_len`]) and the server keeps them
//! as `[rows, row_len]` arrays. A push (or pushpull) of row-sparse values to such a key
//! carries only the rows present in the worker's sum ([`FLAG_ROW_SPARSE`], [`RowsPush`]): the server merges
//! the round's rows (their union) and hands the optimizer a row-sparse gradient, which the
//! lazy optimizers apply to those rows only, as MXNet's servers do.
//!
//! Small parts (up to [`BATCH_ITEM_BYTES`]) of a multi-key call travel together in
//! [`CMD_BATCH`] messages, one per server, so that 1000 small keys cost a few messages instead
//! of 2000. A batch is answered once every item is: the error of a failed item is the batch's
//! error, prefixed with `item <index>: ` so that the worker can name the item's key.
//!
//! A failed request is answered with the transport's error frame: a UTF-8 message that the
//! worker wraps with the key and the operation.
//!
//! # Retried pushes
//!
//! A push (or pushpull) carries its worker's step number of the key ([`PushSeq`], 1 to 65535,
//! wrapping; 0: none): in the top 16 bits of `aux` ([`push_aux`]), or in a [`BatchItem`]'s
//! `seq`. A push that fails on one part of a key may have been merged on another server; the
//! worker retries the step with the same number, and a server that merged this worker's push
//! of that number already (in the round in progress, or the last one completed) acknowledges
//! the retry without merging it again, answering a pushpull with that round's result. A round
//! that fails forgets the numbers merged in it: their retries merge anew.

use kvstore_base::plugin::{dtype_code, dtype_from_code};
use kvstore_base::{DType, Key};

/// A worker introduces itself: rank and mode.
pub const CMD_HELLO: u32 = 0x100;
/// Declares a key on a server (every worker) and sets its value (rank 0).
pub const CMD_INIT: u32 = 0x101;
/// Pushes a part.
pub const CMD_PUSH: u32 = 0x102;
/// Pulls a part.
pub const CMD_PULL: u32 = 0x103;
/// Pushes a part and answers with the round's result.
pub const CMD_PUSHPULL: u32 = 0x104;
/// Pulls some rows of a part.
pub const CMD_ROW_SPARSE_PULL: u32 = 0x105;
/// Installs an optimizer, rebuilt from its spec by the server.
pub const CMD_SET_OPTIMIZER: u32 = 0x106;
/// MXNet's `send_command_to_servers(head, body)`.
pub const CMD_COMMAND: u32 = 0x107;
/// A worker leaves the job.
pub const CMD_BYE: u32 = 0x108;
/// Sets gradient compression on a server: the payload is the parameters as a JSON object
/// (`{"type": "2bit", "threshold": "0.5"}`).
pub const CMD_SET_COMPRESSION: u32 = 0x10A;

/// The flag of a push whose payload is compressed (the server's codec dequantises it); the
/// low byte of the flags is the dtype.
pub const FLAG_COMPRESSED: u16 = 0x100;

/// The flag of a push whose payload is a [`RowsPush`]: some rows of a part declared with a
/// row length.
pub const FLAG_ROW_SPARSE: u16 = 0x1000;

/// The flag of a hello or an init from a worker that took a lost worker's place (a recovery
/// node). A hello so flagged takes the rank over from a connection still open (the lost
/// worker's); an init keeps a value already in place, and its declaration must match it
/// (rank 0's included).
pub const FLAG_RECOVERING: u16 = 0x800;

/// A push whose elements are in the worker's shared-memory region: the payload starts with
/// their [`ShmSlot`].
pub const FLAG_SHM_DATA: u16 = 0x200;
/// A pull or pushpull whose answer goes to a slot of the worker's shared-memory region: the
/// payload holds that [`ShmSlot`] (after the data slot, if any); an answer so written is empty
/// and carries this flag.
pub const FLAG_SHM_REPLY: u16 = 0x400;

/// A worker lends the server a shared-memory region of the same host ([`ShmAttach`]).
pub const CMD_SHM_ATTACH: u32 = 0x10B;

/// Asks a server for its optimizer's state file (the states of its slices of every key, and
/// the optimizer): the answer's payload.
pub const CMD_SAVE_STATES: u32 = 0x10C;
/// Replaces a server's optimizer states (and, when the file holds it, its optimizer) with the
/// state file in the payload.
pub const CMD_LOAD_STATES: u32 = 0x10D;
/// Rank 0's `load_optimizer_states` call number `key` (every worker numbers its calls), for
/// the other workers, kept on server 0: with `aux` 2, rank 0 records that it started; with
/// `aux` 1, how it ended (the payload: a status byte, 0 for success, then the error's text);
/// with `aux` 0, a worker asks: the answer is empty (not started), the recorded outcome (held
/// until rank 0 records it, a long poll), or [`LOAD_PENDING`] after at most a second (a
/// quarter of the timeout) still waiting; an error answer when rank 0 is already past that
/// call.
pub const CMD_LOAD_OUTCOME: u32 = 0x10E;
/// The answer to a [`CMD_LOAD_OUTCOME`] question while rank 0's load runs.
pub const LOAD_PENDING: u8 = 0xFF;

/// Many small parts in one message: `aux` is the inner command ([`CMD_INIT`], [`CMD_PUSH`],
/// [`CMD_PULL`] or [`CMD_PUSHPULL`]), the payload a [`BatchItem`] list then the pushed data
/// (for an init, each item's [`InitMeta`] then rank 0's data; its flags may carry
/// [`FLAG_RECOVERING`]).
pub const CMD_BATCH: u32 = 0x109;

/// Parts at most this big travel in [`CMD_BATCH`] messages; bigger ones in messages of their
/// own, sent straight from the caller's memory.
pub const BATCH_ITEM_BYTES: usize = 64 << 10;
/// A batch is closed once its data reaches this many bytes (or [`BATCH_MAX_ITEMS`] items), so
/// that big calls still pipeline.
pub const BATCH_BYTES: usize = 1 << 20;
/// Most items in one batch.
pub const BATCH_MAX_ITEMS: usize = 4096;
/// Most bytes a batch's answer may carry: twice [`BATCH_BYTES`] (a batch closes once its parts
/// reach it, and each part is at most [`BATCH_ITEM_BYTES`]; `byteps` may add a part or two on
/// top). A server refuses a batch pull that asks more (big parts travel alone), rather than
/// build an answer of any size.
pub const BATCH_MAX_ANSWER_BYTES: usize = 2 * BATCH_BYTES;

/// MXNet's server command heads (`_get_kvstore_server_command_type`).
pub mod head {
    /// `kController`: MXNet sends a pickled optimizer; here the body is an optimizer spec as
    /// JSON (nothing received from the network is ever executed).
    pub const CONTROLLER: i32 = 0;
    /// `kSetMultiPrecision`.
    pub const SET_MULTI_PRECISION: i32 = 1;
    /// `kStopServer`.
    pub const STOP_SERVER: i32 = 2;
    /// `kSyncMode`.
    pub const SYNC_MODE: i32 = 3;
    /// `kSetGradientCompression`.
    pub const SET_GRADIENT_COMPRESSION: i32 = 4;
    /// `kSetProfilerParams`.
    pub const SET_PROFILER_PARAMS: i32 = 5;

    /// MXNet's name of a head.
    pub fn name(head: i32) -> Option<&'static str> {
        Some(match head {
            CONTROLLER => "kController",
            SET_MULTI_PRECISION => "kSetMultiPrecision",
            STOP_SERVER => "kStopServer",
            SYNC_MODE => "kSyncMode",
            SET_GRADIENT_COMPRESSION => "kSetGradientCompression",
            SET_PROFILER_PARAMS => "kSetProfilerParams",
            _ => return None,
        })
    }
}

/// How a server merges pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// One push per worker per round, then one update (`dist_sync`, `dist_device_sync`).
    Sync,
    /// Every push applied as it arrives (`dist_async`).
    Async,
}

impl Mode {
    /// The wire code.
    pub fn code(self) -> u64 {
        match self {
            Mode::Sync => 1,
            Mode::Async => 2,
        }
    }

    /// The mode of a wire code.
    pub fn from_code(code: u64) -> Option<Mode> {
        match code {
            1 => Some(Mode::Sync),
            2 => Some(Mode::Async),
            _ => None,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        })
    }
}

/// The flags of a frame carrying elements of `dtype`.
pub fn dtype_flag(dtype: DType) -> u16 {
    dtype_code(dtype) as u16
}

/// The dtype named by a frame's flags.
pub fn dtype_of_flag(flags: u16) -> Option<DType> {
    dtype_from_code(u32::from(flags & 0xff))
}

/// Whether a frame's flags mark a compressed payload.
pub fn is_compressed(flags: u16) -> bool {
    flags & FLAG_COMPRESSED != 0
}

/// Whether a frame's flags mark a row-sparse push ([`RowsPush`]).
pub fn is_row_sparse(flags: u16) -> bool {
    flags & FLAG_ROW_SPARSE != 0
}

/// A worker's introduction: `key` = its rank, `aux` = [`Mode::code`], payload = store name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The worker's rank.
    pub rank: u32,
    /// The merge mode it runs.
    pub mode: Mode,
}

/// What every worker tells a server about one part of a key at `init`; rank 0 appends the
/// data. Encoded as `dtype u32, elements u64, row_len u64, kind u8, name length u32, name
/// bytes` (little-endian), where `kind` is the key's kind (bit 0: 0 int, 1 str) and its storage
/// type (bit 1: row-sparse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitMeta {
    /// Element type.
    pub dtype: DType,
    /// Elements in this part.
    pub elements: u64,
    /// Elements per row for a part of whole rows (of a row-sparse key, or of a dense key placed
    /// in whole rows: the server keeps it as `[elements / row_len, row_len]` and takes
    /// row-sparse pushes); 0 for a flat part.
    pub row_len: u64,
    /// Whether the key was initialised row-sparse (every worker must init it alike).
    pub row_sparse: bool,
    /// The user's key (the server runs the optimizer under this key).
    pub key: Key,
}

impl InitMeta {
    /// The encoding (see the type's docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        out.extend_from_slice(&dtype_code(self.dtype).to_le_bytes());
        out.extend_from_slice(&self.elements.to_le_bytes());
        out.extend_from_slice(&self.row_len.to_le_bytes());
        let (kind, name) = match &self.key {
            Key::Int(k) => (0u8, k.to_string()),
            Key::Str(s) => (1u8, s.to_string()),
        };
        out.push(kind | (u8::from(self.row_sparse) << 1));
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out
    }

    /// Decodes the meta at the start of `bytes`; returns it and the data that follows.
    pub fn decode(bytes: &[u8]) -> Result<(InitMeta, &[u8]), String> {
        let short = || format!("init message of {} bytes is truncated", bytes.len());
        let take = |at: usize, n: usize| bytes.get(at..at + n).ok_or_else(short);
        let dtype_code = u32::from_le_bytes(take(0, 4)?.try_into().expect("4 bytes"));
        let dtype = dtype_from_code(dtype_code)
            .ok_or_else(|| format!("unknown dtype code {dtype_code}"))?;
        let elements = u64::from_le_bytes(take(4, 8)?.try_into().expect("8 bytes"));
        let row_len = u64::from_le_bytes(take(12, 8)?.try_into().expect("8 bytes"));
        if row_len != 0 && !elements.is_multiple_of(row_len) {
            return Err(format!(
                "an init declares {elements} elements in rows of {row_len}: not whole rows"
            ));
        }
        // Any array's bytes must be addressable (a row's too, when the part has no rows).
        let size = dtype.size_of() as u64;
        let addressable = |n: u64| n.checked_mul(size).is_some_and(|b| b <= isize::MAX as u64);
        if !addressable(elements) || !addressable(row_len) {
            return Err(format!(
                "an init declares {elements} elements in rows of {row_len} of {dtype}: too large \
                 to address"
            ));
        }
        let kind_and_storage = take(20, 1)?[0];
        let (kind, row_sparse) = (kind_and_storage & !2, kind_and_storage & 2 != 0);
        let len = u32::from_le_bytes(take(21, 4)?.try_into().expect("4 bytes")) as usize;
        let name =
            std::str::from_utf8(take(25, len)?).map_err(|_| "key name is not UTF-8".to_string())?;
        let key = match kind {
            0 => Key::Int(
                name.parse()
                    .map_err(|_| format!("bad int key {name:?} in init message"))?,
            ),
            1 => Key::from(name),
            k => return Err(format!("unknown key kind {k} in init message")),
        };
        Ok((
            InitMeta {
                dtype,
                elements,
                row_len,
                row_sparse,
                key,
            },
            &bytes[25 + len..],
        ))
    }
}

/// A worker's step number of a key, carried by its pushes (see the module docs, "Retried
/// pushes"): 1 to 65535, wrapping past 0; 0 for a push that is never a retry.
pub type PushSeq = u16;

/// The bits of a push's `aux` below its [`PushSeq`]: the part index.
const PART_BITS: u32 = 48;

/// The `aux` of a push of part `part` with step number `seq`.
pub fn push_aux(part: u64, seq: PushSeq) -> u64 {
    part | (u64::from(seq) << PART_BITS)
}

/// The part index and the step number of a push's `aux`.
pub fn split_push_aux(aux: u64) -> (u64, PushSeq) {
    (aux & ((1 << PART_BITS) - 1), (aux >> PART_BITS) as PushSeq)
}

/// One part in a [`CMD_BATCH`] message: 24 bytes, `wire u64, part u32, flags u16, seq u16,
/// len u64` (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchItem {
    /// The key's wire id.
    pub wire: u64,
    /// The part index.
    pub part: u32,
    /// The element type ([`dtype_flag`]).
    pub flags: u16,
    /// A push's step number ([`PushSeq`]; 0 otherwise).
    pub seq: PushSeq,
    /// Bytes of the part: pushed with the item, or expected back for a pull.
    pub len: u64,
}

/// Size of one encoded [`BatchItem`].
pub const BATCH_ITEM_LEN: usize = 24;

impl BatchItem {
    /// Encodes `items` and appends `data` (the pushed bytes of each item, in order; empty for
    /// pulls).
    pub fn encode<D: AsRef<[u8]>>(items: &[BatchItem], data: &[D]) -> Vec<u8> {
        let total: usize = data.iter().map(|d| d.as_ref().len()).sum();
        let mut out = Vec::with_capacity(4 + items.len() * BATCH_ITEM_LEN + total);
        out.extend_from_slice(&(items.len() as u32).to_le_bytes());
        for it in items {
            out.extend_from_slice(&it.wire.to_le_bytes());
            out.extend_from_slice(&it.part.to_le_bytes());
            out.extend_from_slice(&it.flags.to_le_bytes());
            out.extend_from_slice(&it.seq.to_le_bytes());
            out.extend_from_slice(&it.len.to_le_bytes());
        }
        for d in data {
            out.extend_from_slice(d.as_ref());
        }
        out
    }

    /// Decodes a batch: the items and the data that follows them.
    pub fn decode(bytes: &[u8]) -> Result<(Vec<BatchItem>, &[u8]), String> {
        let count = bytes
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or("a batch message without its item count")?;
        if count > BATCH_MAX_ITEMS {
            return Err(format!(
                "a batch of {count} items (at most {BATCH_MAX_ITEMS})"
            ));
        }
        let table = count
            .checked_mul(BATCH_ITEM_LEN)
            .and_then(|n| bytes.get(4..4 + n))
            .ok_or_else(|| format!("a batch of {count} items is truncated"))?;
        let items = table
            .chunks_exact(BATCH_ITEM_LEN)
            .map(|c| BatchItem {
                wire: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
                part: u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
                flags: u16::from_le_bytes(c[12..14].try_into().expect("2 bytes")),
                seq: u16::from_le_bytes(c[14..16].try_into().expect("2 bytes")),
                len: u64::from_le_bytes(c[16..24].try_into().expect("8 bytes")),
            })
            .collect();
        Ok((items, &bytes[4 + table.len()..]))
    }
}

/// The region a worker lends with [`CMD_SHM_ATTACH`]: encoded as `len u64, nonce [u8; 16],
/// file name (UTF-8, the rest)` (little-endian). The file lives in the shared-memory
/// directory (`KVSTORE_SHM_DIR`) and starts with the nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmAttach {
    /// The region's size in bytes.
    pub len: u64,
    /// The random bytes at the region's start.
    pub nonce: [u8; 16],
    /// The file's name inside the shared-memory directory.
    pub name: String,
}

impl ShmAttach {
    /// The encoding (see the type's docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.name.len());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    /// Decodes an attach request.
    pub fn decode(bytes: &[u8]) -> Result<ShmAttach, String> {
        if bytes.len() < 24 {
            return Err(format!(
                "a region announcement of {} bytes is truncated",
                bytes.len()
            ));
        }
        let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let nonce = bytes[8..24].try_into().expect("16 bytes");
        let name = std::str::from_utf8(&bytes[24..])
            .map_err(|_| "the region's file name is not UTF-8".to_string())?
            .to_string();
        Ok(ShmAttach { len, nonce, name })
    }
}

/// A slot of a worker's shared-memory region: 16 bytes, `offset u64, len u64`
/// (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmSlot {
    /// Byte offset in the region.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Size of one encoded [`ShmSlot`].
pub const SHM_SLOT_LEN: usize = 16;

impl ShmSlot {
    /// The encoding (see the type's docs).
    pub fn encode(&self) -> [u8; SHM_SLOT_LEN] {
        let mut out = [0u8; SHM_SLOT_LEN];
        out[..8].copy_from_slice(&self.offset.to_le_bytes());
        out[8..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// The `index`-th slot of a payload.
    pub fn decode(payload: &[u8], index: usize) -> Result<ShmSlot, String> {
        let at = index * SHM_SLOT_LEN;
        let b = payload.get(at..at + SHM_SLOT_LEN).ok_or_else(|| {
            format!(
                "a shared-memory request of {} bytes lacks slot {index}",
                payload.len()
            )
        })?;
        Ok(ShmSlot {
            offset: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            len: u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
        })
    }
}

/// The payload of a push flagged [`FLAG_ROW_SPARSE`]: some rows of a part declared with a row
/// length. Encoded as `count u64, row u64 × count, then the rows' elements` (little-endian
/// ids, elements in native byte order); row ids are relative to the part's first row and
/// strictly increasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsPush<'a> {
    /// The row ids, `count` little-endian u64s.
    ids: &'a [u8],
    /// The rows' elements, `count × row_len` of them.
    pub data: &'a [u8],
}

impl<'a> RowsPush<'a> {
    /// Encodes the rows `ids` (relative to the part's first row, strictly increasing) holding
    /// `data`.
    pub fn encode(ids: impl ExactSizeIterator<Item = u64>, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8 * ids.len() + data.len());
        out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
        for id in ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    /// Decodes and checks a push to a part of `part_rows` rows of `row_bytes` bytes each: ids
    /// strictly increasing below `part_rows`, one row of data per id.
    pub fn decode(payload: &'a [u8], part_rows: u64, row_bytes: usize) -> Result<Self, String> {
        let count = payload
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or("a row-sparse push without its row count")?;
        let ids_end = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(8))
            .and_then(|n| n.checked_add(8))
            .filter(|&end| end <= payload.len())
            .ok_or_else(|| {
                format!(
                    "a row-sparse push of {count} rows is truncated ({} bytes)",
                    payload.len()
                )
            })?;
        let push = RowsPush {
            ids: &payload[8..ids_end],
            data: &payload[ids_end..],
        };
        let mut last = None;
        for id in push.ids() {
            if id >= part_rows || last.is_some_and(|l| l >= id) {
                return Err(format!(
                    "a row-sparse push names row {id}: rows must be strictly increasing and \
                     inside the part's {part_rows}"
                ));
            }
            last = Some(id);
        }
        // `count` ids fit in the payload, so `count × row_bytes` fits in a usize unless the
        // data cannot possibly match.
        let expected = (count as usize).checked_mul(row_bytes);
        if expected != Some(push.data.len()) {
            return Err(format!(
                "a row-sparse push of {count} rows of {row_bytes} bytes carries {} bytes of data",
                push.data.len()
            ));
        }
        Ok(push)
    }

    /// The row ids, relative to the part's first row.
    pub fn ids(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.ids
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
    }

    /// How many rows the push holds.
    pub fn count(&self) -> usize {
        self.ids.len() / 8
    }

    /// The id bytes and the elements of a push [`decode`](RowsPush::decode) checked, to keep
    /// it ([`from_checked`](RowsPush::from_checked) gives it back).
    pub(crate) fn checked_parts(&self) -> (&'a [u8], &'a [u8]) {
        (self.ids, self.data)
    }

    /// A push from the [`checked_parts`](RowsPush::checked_parts) of one that was checked.
    pub(crate) fn from_checked(ids: &'a [u8], data: &'a [u8]) -> Self {
        RowsPush { ids, data }
    }
}

/// Prefixes the error of item `index` of a batch (see [`split_item_error`]).
pub fn item_error(index: usize, message: &str) -> String {
    format!("item {index}: {message}")
}

/// The item index and message of a batch's error, when it names an item.
pub fn split_item_error(message: &str) -> Option<(usize, &str)> {
    let rest = message.strip_prefix("item ")?;
    let (index, message) = rest.split_once(": ")?;
    Some((index.parse().ok()?, message))
}

/// A [`CMD_ROW_SPARSE_PULL`] request for one part: encoded as `part_start u64, row_len u64,
/// rows i64...` (little-endian), the rows strictly increasing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRequest {
    /// The part's first element in the whole (flattened) array.
    pub part_start: u64,
    /// Elements per row of the whole array.
    pub row_len: u64,
    /// The requested row ids.
    pub rows: Vec<i64>,
}

impl RowRequest {
    /// The encoding (see the type's docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 8 * self.rows.len());
        out.extend_from_slice(&self.part_start.to_le_bytes());
        out.extend_from_slice(&self.row_len.to_le_bytes());
        out.extend(self.rows.iter().flat_map(|r| r.to_le_bytes()));
        out
    }

    /// Decodes a request.
    pub fn decode(bytes: &[u8]) -> Result<RowRequest, String> {
        if bytes.len() < 16 || !bytes.len().is_multiple_of(8) {
            return Err(format!(
                "row request of {} bytes is not a part offset, a row length and whole i64 row ids",
                bytes.len()
            ));
        }
        let mut words = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
        let part_start = words.next().expect("checked length");
        let row_len = words.next().expect("checked length");
        let rows: Vec<i64> = words.map(|w| w as i64).collect();
        // Sorted and unique (as a worker sends them): an answer never exceeds the part.
        if let Some(w) = rows.windows(2).find(|w| w[0] >= w[1]) {
            return Err(format!(
                "a row request names row {} after row {}: rows must be strictly increasing",
                w[1], w[0]
            ));
        }
        Ok(RowRequest {
            part_start,
            row_len,
            rows,
        })
    }
}

/// The elements `[start, end)` of row `row` of length `row_len` that fall inside a part
/// covering elements `[part_start, part_end)`, relative to the part; `None` when none do.
pub fn row_in_part(row: u64, row_len: u64, part_start: u64, part_end: u64) -> Option<(u64, u64)> {
    let first = row.checked_mul(row_len)?;
    let start = first.max(part_start);
    let end = first.checked_add(row_len)?.min(part_end);
    (start < end).then(|| (start - part_start, end - part_start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_meta_round_trips_with_trailing_data() {
        for (key, row_sparse) in [(Key::Int(-7), false), (Key::from("layer1.weight"), true)] {
            let meta = InitMeta {
                dtype: DType::F16,
                elements: 1 << 33,
                row_len: 1 << 10,
                row_sparse,
                key,
            };
            let mut bytes = meta.encode();
            bytes.extend_from_slice(&[1, 2, 3]);
            let (back, rest) = InitMeta::decode(&bytes).unwrap();
            assert_eq!(back, meta);
            assert_eq!(rest, &[1, 2, 3]);
        }
        assert!(InitMeta::decode(&[0; 10]).is_err());
        let ragged = InitMeta {
            dtype: DType::F32,
            elements: 10,
            row_len: 4,
            row_sparse: true,
            key: Key::Int(1),
        };
        assert!(InitMeta::decode(&ragged.encode())
            .unwrap_err()
            .contains("not whole rows"));
    }

    #[test]
    fn a_push_aux_carries_the_part_and_the_step() {
        for (part, seq) in [(0u64, 0u16), (3, 1), ((1 << 48) - 1, u16::MAX)] {
            assert_eq!(split_push_aux(push_aux(part, seq)), (part, seq));
        }
        // A plain part index reads as a push of no step.
        assert_eq!(split_push_aux(5), (5, 0));
    }

    #[test]
    fn batches_round_trip() {
        let items = [
            BatchItem {
                wire: 7,
                part: 1,
                flags: 2,
                seq: 9,
                len: 3,
            },
            BatchItem {
                wire: u64::MAX,
                part: 0,
                flags: 0,
                seq: 0,
                len: 1,
            },
        ];
        let bytes = BatchItem::encode::<&[u8]>(&items, &[&[1, 2, 3], &[4]]);
        let (back, data) = BatchItem::decode(&bytes).unwrap();
        assert_eq!(back, items);
        assert_eq!(data, &[1, 2, 3, 4]);
        assert!(BatchItem::decode(&bytes[..20]).is_err());
        assert_eq!(
            split_item_error(&item_error(12, "a: b")),
            Some((12, "a: b"))
        );
        assert_eq!(split_item_error("plain"), None);
    }

    #[test]
    fn shm_messages_round_trip() {
        let a = ShmAttach {
            len: 1 << 28,
            nonce: [7; 16],
            name: "kvstore-shm-1-ab".into(),
        };
        assert_eq!(ShmAttach::decode(&a.encode()).unwrap(), a);
        assert!(ShmAttach::decode(&[0; 20]).is_err());
        let s = ShmSlot { offset: 64, len: 3 };
        let mut two = s.encode().to_vec();
        two.extend_from_slice(&ShmSlot { offset: 9, len: 1 }.encode());
        assert_eq!(ShmSlot::decode(&two, 0).unwrap(), s);
        assert_eq!(ShmSlot::decode(&two, 1).unwrap().offset, 9);
        assert!(ShmSlot::decode(&two, 2).is_err());
    }

    #[test]
    fn row_requests_round_trip() {
        let r = RowRequest {
            part_start: 6,
            row_len: 4,
            rows: vec![3, -1, 0],
        };
        assert!(
            RowRequest::decode(&r.encode()).is_err(),
            "rows out of order"
        );
        let sorted = RowRequest {
            rows: vec![-1, 0, 3],
            ..r
        };
        assert_eq!(RowRequest::decode(&sorted.encode()).unwrap(), sorted);
        assert!(RowRequest::decode(&[0; 12]).is_err());
    }

    #[test]
    fn rows_pushes_round_trip_and_bad_ones_are_refused() {
        let data: Vec<u8> = (0..16).collect();
        let bytes = RowsPush::encode([1u64, 4].into_iter(), &data);
        let push = RowsPush::decode(&bytes, 5, 8).unwrap();
        assert_eq!(push.ids().collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!((push.count(), push.data), (2, &data[..]));
        let empty = RowsPush::encode(std::iter::empty(), &[]);
        assert_eq!(RowsPush::decode(&empty, 0, 8).unwrap().count(), 0);
        // A row outside the part, rows out of order, data of the wrong length, a count
        // bigger than the payload, no count at all.
        assert!(RowsPush::decode(&bytes, 4, 8).is_err());
        let unsorted = RowsPush::encode([4u64, 1].into_iter(), &data);
        assert!(RowsPush::decode(&unsorted, 5, 8).is_err());
        let repeated = RowsPush::encode([1u64, 1].into_iter(), &data);
        assert!(RowsPush::decode(&repeated, 5, 8).is_err());
        assert!(RowsPush::decode(&bytes, 5, 4).is_err());
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(RowsPush::decode(&huge, u64::MAX, 8).is_err());
        assert!(RowsPush::decode(&[1, 2], 5, 8).is_err());
    }

    #[test]
    fn rows_are_cut_at_part_boundaries() {
        // Rows of 4 elements; the part covers elements 6..14.
        assert_eq!(row_in_part(0, 4, 6, 14), None);
        assert_eq!(row_in_part(1, 4, 6, 14), Some((0, 2)));
        assert_eq!(row_in_part(2, 4, 6, 14), Some((2, 6)));
        assert_eq!(row_in_part(3, 4, 6, 14), Some((6, 8)));
        assert_eq!(row_in_part(4, 4, 6, 14), None);
        // Rows past the end of any address are in no part.
        assert_eq!(row_in_part(u64::MAX / 4, 4, 0, u64::MAX), None);
    }

    /// Random bytes, and valid encodings cut, extended and with bytes changed: every decoder of
    /// a worker's or server's message answers `Ok` or `Err`, never panics.
    #[test]
    fn decoders_never_panic_on_random_or_mutated_bytes() {
        let mut rng = kvstore_test::fuzz::Rng::new(0x9E37_79B9_7F4A_7C15);
        let valid: Vec<Vec<u8>> = vec![
            InitMeta {
                dtype: DType::F32,
                elements: 12,
                row_len: 4,
                row_sparse: true,
                key: Key::Str("embedding".into()),
            }
            .encode(),
            BatchItem::encode::<&[u8]>(
                &[BatchItem {
                    wire: 3,
                    part: 0,
                    flags: dtype_flag(DType::F32),
                    seq: 1,
                    len: 8,
                }],
                &[&[0; 8]],
            ),
            ShmAttach {
                len: 1 << 20,
                nonce: [1; 16],
                name: "kvstore-shm-x".into(),
            }
            .encode(),
            ShmSlot { offset: 0, len: 16 }.encode().to_vec(),
            RowsPush::encode([0u64, 2].into_iter(), &[0; 32]),
            RowRequest {
                part_start: 0,
                row_len: 4,
                rows: vec![0, 2],
            }
            .encode(),
        ];
        for _ in 0..20_000 {
            let bytes = kvstore_test::fuzz::mutated(&mut rng, &valid);
            let _ = InitMeta::decode(&bytes);
            let _ = BatchItem::decode(&bytes);
            let _ = ShmAttach::decode(&bytes);
            let _ = ShmSlot::decode(&bytes, rng.below(3) as usize);
            let row_bytes = rng.pick(&[0usize, 1, 4, 16, usize::MAX]);
            let rows = rng.pick(&[0u64, 1, 3, u64::MAX]);
            if let Ok(push) = RowsPush::decode(&bytes, rows, row_bytes) {
                let _ = push.ids().count();
            }
            let _ = RowRequest::decode(&bytes);
            let mut header = [0u8; crate::transport::HEADER_LEN];
            for (i, b) in header.iter_mut().enumerate() {
                *b = bytes.get(i).copied().unwrap_or(rng.next() as u8);
            }
            let _ = crate::transport::FrameHeader::decode(&header, rng.next());
        }
    }
}
