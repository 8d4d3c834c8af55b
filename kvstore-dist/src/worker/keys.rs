//! What a worker knows of its keys: wire ids, shapes, placement, receive buffers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvstore_base::{DType, Error, Key, NDArray, Result, StorageType};

use crate::placement::{place, place_dense, place_rows};
use crate::protocol::{InitMeta, PushSeq};

/// One slice of a key's value on one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    /// The server's rank.
    pub server: usize,
    /// First element of the slice in the flattened value.
    pub start: usize,
    /// One past the last element.
    pub end: usize,
}

/// An initialised key.
#[derive(Debug)]
pub(crate) struct KeyMeta {
    pub key: Key,
    /// The key's id on the wire: an int key's bits, or a string key's id.
    pub wire: u64,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Whether it was initialised with a row-sparse value (`row_sparse_pull` needs that).
    pub row_sparse: bool,
    /// Elements per row when the parts hold whole rows (a row-sparse key whose rows have
    /// elements, or a dense one placed by [`place_dense`] in whole rows): the servers then
    /// take row-sparse pushes (of a dense weight: Gluon's `Embedding(sparse_grad=True)`,
    /// applied lazily as MXNet's `local` store applies it).
    pub row_len: Option<usize>,
    pub parts: Vec<Part>,
    /// Buffers that pulled parts are received into, reused from call to call.
    buffers: Mutex<Vec<Vec<u8>>>,
    /// The key's push step numbers (see [`KeyMeta::push_seq`]).
    steps: Mutex<Steps>,
}

/// A key's push step numbers: the last one given, and the one of a failed push that the next
/// push retries.
#[derive(Debug, Default)]
struct Steps {
    last: PushSeq,
    failed: Option<PushSeq>,
}

impl KeyMeta {
    pub(crate) fn new(
        key: Key,
        wire: u64,
        value: &NDArray,
        servers: usize,
        bigarray_bound: usize,
    ) -> KeyMeta {
        let row_sparse = value.storage_type() == StorageType::RowSparse;
        let shape = value.shape();
        let row_len = shape
            .split_first()
            .map(|(_, rest)| rest.iter().product::<usize>())
            .filter(|&len| len > 0);
        let (placement, row_len) = match (row_len, row_sparse) {
            (Some(len), true) => (
                place_rows(wire as i64, shape[0], len, servers, bigarray_bound),
                Some(len),
            ),
            (Some(len), false) => {
                let (placement, by_rows) =
                    place_dense(wire as i64, shape[0], len, servers, bigarray_bound);
                (placement, by_rows.then_some(len))
            }
            (None, _) => (
                place(wire as i64, value.size(), servers, bigarray_bound),
                None,
            ),
        };
        KeyMeta {
            key,
            wire,
            dtype: value.dtype(),
            shape: shape.to_vec(),
            row_sparse,
            row_len,
            parts: placement
                .parts
                .into_iter()
                .map(|(server, range)| Part {
                    server,
                    start: range.start,
                    end: range.end,
                })
                .collect(),
            buffers: Mutex::new(Vec::new()),
            steps: Mutex::new(Steps::default()),
        }
    }

    /// The step number of a push of the key: the failed push's when the last one failed
    /// ([`KeyMeta::push_failed`]: this push retries it, and the servers that merged it then
    /// do not merge it again), else the next one (1 to 65535, wrapping past 0).
    pub(crate) fn push_seq(&self) -> PushSeq {
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(seq) = steps.failed.take() {
            return seq;
        }
        steps.last = steps.last.checked_add(1).unwrap_or(1);
        steps.last
    }

    /// Records that the push of step `seq` failed: the next push of the key retries it.
    pub(crate) fn push_failed(&self, seq: PushSeq) {
        self.steps.lock().unwrap_or_else(|e| e.into_inner()).failed = Some(seq);
    }

    /// The key was pulled: a failed push before it was given up (a training loop that moves
    /// on pulls the weights for its next step), and the next push is a new step.
    pub(crate) fn pulled(&self) {
        self.steps.lock().unwrap_or_else(|e| e.into_inner()).failed = None;
    }

    /// What every worker tells the server about part `i`.
    pub(crate) fn init_meta(&self, i: usize) -> InitMeta {
        InitMeta {
            dtype: self.dtype,
            elements: (self.parts[i].end - self.parts[i].start) as u64,
            row_len: self.row_len.unwrap_or(0) as u64,
            row_sparse: self.row_sparse,
            key: self.key.clone(),
        }
    }

    /// The byte range of part `i`.
    pub(crate) fn byte_range(&self, i: usize) -> std::ops::Range<usize> {
        let size = self.dtype.size_of();
        self.parts[i].start * size..self.parts[i].end * size
    }

    /// A receive buffer (reused when one is free).
    pub(crate) fn take_buffer(&self) -> Vec<u8> {
        self.buffers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Returns a receive buffer for reuse.
    pub(crate) fn give_buffer(&self, buf: Vec<u8>) {
        let mut pool = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < 2 * self.parts.len() {
            pool.push(buf);
        }
    }

    /// Checks a pushed value (shape and dtype) against the key.
    pub(crate) fn check_value(&self, value: &NDArray, what: &str) -> Result<()> {
        Error::check_declared(&self.shape, self.dtype, value, what)
    }

    /// Checks an output's shape against the key (pulls cast into the output's dtype).
    pub(crate) fn check_out(&self, out: &NDArray, what: &str) -> Result<()> {
        Error::check_shape(&self.shape, out, what)
    }
}

/// The keys of a worker.
#[derive(Debug, Default)]
pub(crate) struct KeyTable {
    /// The first key ever initialised: fixes int or string keys for the store's life.
    kind: Option<Key>,
    metas: HashMap<Key, Arc<KeyMeta>>,
    /// Ids of string keys, given in first-init order (as MXNet: every worker must init its
    /// string keys in the same order).
    str_ids: HashMap<Arc<str>, u64>,
}

impl KeyTable {
    /// Every initialised key.
    pub(crate) fn metas(&self) -> impl Iterator<Item = &Arc<KeyMeta>> {
        self.metas.values()
    }

    /// Checks that `key` is of the store's key kind.
    pub(crate) fn check_kind(&self, operation: &'static str, key: &Key) -> Result<()> {
        match &self.kind {
            Some(first) if !first.same_kind(key) => Err(Error::MixedKeyTypes {
                operation,
                first: first.clone(),
                other: key.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// The key's meta, or `KeyNotInitialized` (wrapped with the key).
    pub(crate) fn get(
        &self,
        store: &str,
        operation: &'static str,
        key: &Key,
    ) -> Result<Arc<KeyMeta>> {
        self.check_kind(operation, key)?;
        self.metas
            .get(key)
            .cloned()
            .ok_or_else(|| Error::KeyNotInitialized.at_key(store, operation, key.clone()))
    }

    /// Whether `key` is initialised.
    pub(crate) fn contains(&self, key: &Key) -> bool {
        self.metas.contains_key(key)
    }

    /// The wire id `key` has or would get now.
    pub(crate) fn wire_id(&self, key: &Key, pending: usize) -> u64 {
        match key {
            Key::Int(k) => *k as u64,
            Key::Str(s) => self
                .str_ids
                .get(s)
                .copied()
                .unwrap_or((self.str_ids.len() + pending) as u64),
        }
    }

    /// Records initialised keys.
    pub(crate) fn insert(&mut self, metas: Vec<Arc<KeyMeta>>) {
        for meta in metas {
            if self.kind.is_none() {
                self.kind = Some(meta.key.clone());
            }
            if let Key::Str(s) = &meta.key {
                self.str_ids.insert(Arc::clone(s), meta.wire);
            }
            self.metas.insert(meta.key.clone(), meta);
        }
    }
}
