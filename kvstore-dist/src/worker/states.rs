//! Optimizer-state files of a worker (MXNet's dist stores cannot save them: "Cannot save
//! states for distributed training"). Each server holds the optimizer state of its slices of
//! the keys; `save_optimizer_states` asks every server for its state file and joins them into
//! one file of whole keys, in the format the `local` store writes, so that a checkpoint moves
//! between a `local` store and a dist one, or to a job with another number of servers.
//!
//! `load_optimizer_states` is called by every worker, as `set_optimizer`: rank 0 reads the
//! file, cuts it into the servers' slices (every key and state checked first) and sends each
//! server its part, then records the outcome on the servers; the workers meet in a barrier
//! (so that no push reaches a server before its states), and the others then read rank 0's
//! outcome, so that a failed load is an error on every worker.
//!
//! Each server's file travels in one message (at most `KVSTORE_MAX_MESSAGE_BYTES`, 4 GiB by
//! default), and the other workers wait for rank 0's load in the barrier, within the store's
//! timeout.

use std::path::Path;

use kvstore_base::{Error, Result};
use kvstore_optimizer::sliced::{self, KeySlices};

use super::{backend, exchange, lock, DistStore};
use crate::protocol;
use crate::transport::{Outgoing, Response, TransportError};

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

    /// Sends `command` with `payload(server)` to every server; the outcomes by server.
    fn to_each_server<'p>(
        &self,
        command: u32,
        aux: u64,
        payload: impl Fn(usize) -> &'p [u8],
        what: &str,
    ) -> Vec<std::result::Result<Response, TransportError>> {
        let mut outcomes: Vec<Option<std::result::Result<Response, TransportError>>> =
            (0..self.servers.len()).map(|_| None).collect();
        let mut pending = Vec::new();
        for (server, c) in self.servers.iter().enumerate() {
            match c.send(Outgoing::new(command, payload(server)).aux(aux), what) {
                Ok(p) => pending.push((server, p)),
                Err(e) => outcomes[server] = Some(Err(e)),
            }
        }
        for (server, outcome) in exchange::settle(pending) {
            outcomes[server] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(TransportError::PeerClosed {
                        peer: "a server".into(),
                        request_id: 0,
                        what: what.to_string(),
                        reason: "not awaited: another server was lost first".into(),
                    })
                })
            })
            .collect()
    }

    pub(super) fn save_states(&self, path: &Path, dump_optimizer: bool) -> Result<()> {
        let operation = "save_optimizer_states";
        self.check_optimizer(operation)?;
        let files = self
            .to_each_server(protocol::CMD_SAVE_STATES, 0, |_| &[], operation)
            .into_iter()
            .map(|o| o.map(|answer| answer.payload.to_vec()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| backend(&self.name, e))?;
        let joined = sliced::join(&files, &self.layout(), dump_optimizer)?;
        std::fs::write(path, joined).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    pub(super) fn load_states(&self, path: &Path) -> Result<()> {
        let operation = "load_optimizer_states";
        self.check_optimizer(operation)?;
        if self.rank != 0 {
            // Rank 0 loads; its outcome is read once it has recorded it.
            self.worker_barrier()?;
            return self.rank_0s_load_outcome();
        }
        let loaded = self.send_states(path, operation);
        let text = match &loaded {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        };
        let recorded = self
            .to_each_server(
                protocol::CMD_LOAD_OUTCOME,
                1,
                |_| text.as_bytes(),
                operation,
            )
            .into_iter()
            .find_map(|o| o.err());
        // No push may reach a server before its states: every worker waits for rank 0.
        let met = self.worker_barrier();
        loaded?;
        if let Some(e) = recorded {
            return Err(backend(&self.name, e));
        }
        met
    }

    /// What rank 0's last load gave, as recorded on server 0.
    fn rank_0s_load_outcome(&self) -> Result<()> {
        let answer = self.servers[0]
            .request(
                Outgoing::new(protocol::CMD_LOAD_OUTCOME, &[]),
                "load_optimizer_states (rank 0's outcome)",
            )
            .map_err(|e| backend(&self.name, e))?;
        match answer.payload.is_empty() {
            true => Ok(()),
            false => Err(Error::InvalidArgument(format!(
                "{}: load_optimizer_states failed on rank 0, which loads for every worker: {}",
                self.name,
                String::from_utf8_lossy(&answer.payload)
            ))),
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
        let outcomes = self.to_each_server(protocol::CMD_LOAD_STATES, 0, |s| &files[s], operation);
        let loaded: Vec<usize> = (0..outcomes.len())
            .filter(|&s| outcomes[s].is_ok())
            .collect();
        let Some((server, e)) = outcomes
            .into_iter()
            .enumerate()
            .find_map(|(s, o)| o.err().map(|e| (s, e)))
        else {
            return Ok(());
        };
        let e = backend(&self.name, e);
        Err(match loaded.is_empty() {
            true => e,
            false => Error::InvalidArgument(format!(
                "{}: the optimizer states reached servers {loaded:?} but not server {server} \
                 ({e}): the servers now hold different states; load the file again",
                self.name
            )),
        })
    }
}
