//! Optimizer-state files of a worker (MXNet's dist stores cannot save them: "Cannot save
//! states for distributed training"). Each server holds the optimizer state of its slices of
//! the keys; `save_optimizer_states` asks every server for its state file and joins them into
//! one file of whole keys, in the format the `local` store writes, so that a checkpoint moves
//! between a `local` store and a dist one, or to a job with another number of servers.
//!
//! `load_optimizer_states` is called by every worker, as `set_optimizer`: rank 0 records on
//! server 0 that its load started and meets the others in a barrier, then reads the file,
//! cuts it into the servers' slices (every key and state checked first), sends each server
//! its part, and records the outcome; the others, past the barrier, wait for that outcome
//! (so that no push of theirs reaches a server before its states; at most ten times
//! `KVSTORE_TIMEOUT_SECS`) and return it, so that a failed load is an error on every worker.
//! Loads are numbered alike on every worker: a worker never reads another load's outcome.
//!
//! Each server's file travels in one message (at most `KVSTORE_MAX_MESSAGE_BYTES`, 4 GiB by
//! default): a server whose share is bigger answers a save with an error saying so, and a load
//! with such a share is refused before any server is sent its part; the connections stay
//! usable either way.

use std::path::Path;

use kvstore_base::{Error, Result};
use kvstore_optimizer::sliced::{self, KeySlices};

use super::{backend, lock, DistStore};
use crate::protocol;
use crate::transport::{Outgoing, TransportError};

impl DistStore {
    /// Where every key's slices are (server and element range), in key order.
    fn layout(&self) -> Vec<KeySlices> {
        let mut layout: Vec<KeySlices> = lock(&self.keys)
            .metas()
            .map(|m| KeySlices {
                key: m.key.clone(),
                shape: m.shape.clone(),
                dtype: m.dtype,
                slices: m.parts.iter().map(|p| (p.server, p.start..p.end)).collect(),
                row_len: m.row_len,
            })
            .collect();
        layout.sort_by(|a, b| a.key.cmp(&b.key));
        layout
    }

    /// Refuses `operation` unless an optimizer runs on the servers.
    fn check_optimizer(&self, operation: &str) -> Result<()> {
        match self.optimizer.load(std::sync::atomic::Ordering::Relaxed) {
            true => Ok(()),
            false => Err(Error::InvalidArgument(format!(
                "{}: {operation} needs an optimizer installed with set_optimizer (the servers \
                 keep no other state)",
                self.name
            ))),
        }
    }

    pub(super) fn save_states(&self, path: &Path, dump_optimizer: bool) -> Result<()> {
        let operation = "save_optimizer_states";
        self.check_optimizer(operation)?;
        let outcomes = self.to_each_server(protocol::CMD_SAVE_STATES, 0, |_| &[], operation);
        let files: Vec<Vec<u8>> = self
            .all_answered(outcomes, operation)?
            .into_iter()
            .map(|answer| answer.payload.to_vec())
            .collect();
        let joined = sliced::join(&files, &self.layout(), dump_optimizer)?;
        std::fs::write(path, joined).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    pub(super) fn load_states(&self, path: &Path) -> Result<()> {
        let operation = "load_optimizer_states";
        if self.recovered {
            // The others are training and make no matching call; the servers' states are the
            // job's, newer than any file the program loads at its start: kept, as its
            // set_optimizer keeps the optimizer.
            self.check_optimizer(operation)?;
            log::warn!(
                "{}: {operation}({}) keeps the servers' states: this worker took a lost \
                 worker's place while the others train",
                self.name,
                path.display()
            );
            return Ok(());
        }
        // Every worker numbers its loads alike (counted even when refused below, so that the
        // numbers stay aligned): rank 0 records load n on server 0, the others wait for load
        // n's outcome, never an earlier one's.
        let number = self
            .loads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.check_optimizer(operation)?;
        if self.rank != 0 {
            // Once every worker met, rank 0 has recorded that call n started.
            self.worker_barrier()?;
            self.forget_updater();
            return self.wait_for_rank_0s_load(number);
        }
        let record = |aux: u64, payload: &[u8]| {
            self.servers[0]
                .request(
                    Outgoing::new(protocol::CMD_LOAD_OUTCOME, payload)
                        .key(number)
                        .aux(aux),
                    operation,
                )
                .map(drop)
                .map_err(|e| backend(&self.name, e))
        };
        // Started, then every worker meets: they are all in this call, and the record they
        // will read is this call's.
        record(2, &[])?;
        self.worker_barrier()?;
        let loaded = self.send_states(path, operation);
        let mut outcome = vec![u8::from(loaded.is_err())];
        if let Err(e) = &loaded {
            outcome.extend_from_slice(e.to_string().as_bytes());
        }
        let recorded = record(1, &outcome);
        self.forget_updater();
        loaded.and(recorded)
    }

    /// A worker other than rank 0, past the call's barrier: waits until rank 0 recorded load
    /// `number`'s outcome on server 0 (so that the servers hold the new states before this
    /// worker's next push), at most ten times the store's timeout, and returns it.
    fn wait_for_rank_0s_load(&self, number: u64) -> Result<()> {
        let start = std::time::Instant::now();
        let limit = 10 * self.timeout;
        // Server 0 holds a question until the outcome is recorded (a long poll), answering
        // "still pending" after at most a second: asked again at once.
        let pause = std::time::Duration::from_millis(5);
        loop {
            let answer = self.servers[0]
                .request(
                    Outgoing::new(protocol::CMD_LOAD_OUTCOME, &[]).key(number),
                    "load_optimizer_states (rank 0's outcome)",
                )
                .map_err(|e| backend(&self.name, e))?;
            match answer.payload.split_first() {
                Some((0, _)) => return Ok(()),
                Some((&protocol::LOAD_PENDING, _)) | None if start.elapsed() > limit => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: load_optimizer_states: rank 0 started call {number} but recorded \
                         no outcome within {limit:?} (ten times KVSTORE_TIMEOUT_SECS)",
                        self.name
                    )))
                }
                Some((&protocol::LOAD_PENDING, _)) | None => {}
                Some((_, text)) => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: load_optimizer_states failed on rank 0, which loads for every \
                         worker: {}",
                        self.name,
                        String::from_utf8_lossy(text)
                    )))
                }
            }
            std::thread::sleep(pause);
        }
    }

    /// Rank 0's part of a load: the file cut into the servers' slices (checked whole first),
    /// each sent its own; a failure names the servers that loaded and those that did not.
    fn send_states(&self, path: &Path, operation: &'static str) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let files = sliced::split(&bytes, &self.layout(), self.servers.len())?;
        // A share over the largest message would reach its server after the others loaded:
        // refused before any is sent.
        let max = self.max_message_bytes;
        if let Some((server, file)) = files.iter().enumerate().find(|(_, f)| f.len() as u64 > max) {
            return Err(Error::InvalidArgument(format!(
                "{}: {operation}: server {server}'s share of the states would be a message of \
                 {} bytes, over the largest message a node accepts, {max} bytes \
                 (KVSTORE_MAX_MESSAGE_BYTES): nothing was loaded; set KVSTORE_MAX_MESSAGE_BYTES \
                 higher on every node of the job",
                self.name,
                file.len()
            )));
        }
        let outcomes = self.to_each_server(protocol::CMD_LOAD_STATES, 0, |s| &files[s], operation);
        // Whether each server loaded: yes, no, or unknown (not awaited, or timed out: it may
        // still load).
        let reached: Vec<Option<bool>> = outcomes
            .iter()
            .map(|o| match o {
                Some(Ok(_)) => Some(true),
                None | Some(Err(TransportError::Timeout { .. })) => None,
                Some(Err(_)) => Some(false),
            })
            .collect();
        let servers = |state: Option<bool>| {
            (0..reached.len())
                .filter(|&s| reached[s] == state)
                .collect::<Vec<usize>>()
        };
        let (loaded, unknown) = (servers(Some(true)), servers(None));
        match self.all_answered(outcomes, operation) {
            Ok(_) => Ok(()),
            Err(e) if loaded.is_empty() && unknown.is_empty() => Err(e),
            Err(e) => Err(Error::InvalidArgument(format!(
                "{}: the optimizer states reached servers {loaded:?}, failed on servers {:?} \
                 and may have reached servers {unknown:?} ({e}): the servers may now hold \
                 different states; load the file again",
                self.name,
                servers(Some(false))
            ))),
        }
    }
}
