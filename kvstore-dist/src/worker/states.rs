//! Optimizer-state files of a worker (MXNet's dist stores cannot save them: "Cannot save
//! states for distributed training"). Each server holds the optimizer state of its slices of
//! the keys; `save_optimizer_states` asks every server for its state file and joins them into
//! one file of whole keys, in the format the `local` store writes, so that a checkpoint moves
//! between a `local` store and a dist one, or to a job with another number of servers.
//! `load_optimizer_states` is called by every worker, as `set_optimizer`: rank 0 reads the
//! file, cuts it into the servers' slices and sends each its part, then the workers meet in a
//! barrier, so that no push reaches a server before its states.

use std::path::Path;

use kvstore_base::{Error, Result};
use kvstore_optimizer::sliced::{self, KeySlices};

use super::{backend, exchange, lock, DistStore};
use crate::protocol;
use crate::transport::Outgoing;

impl DistStore {
    /// Where every key's slices are: server and element range.
    fn layout(&self) -> Vec<KeySlices> {
        lock(&self.keys)
            .metas()
            .map(|m| KeySlices {
                key: m.key.clone(),
                shape: m.shape.clone(),
                slices: m.parts.iter().map(|p| (p.server, p.start..p.end)).collect(),
            })
            .collect()
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
        let pending = self
            .servers
            .iter()
            .map(|c| c.send(Outgoing::new(protocol::CMD_SAVE_STATES, &[]), operation))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| backend(&self.name, e))?;
        // Outcomes come in the order they settle: put each file at its server's index.
        let tagged = pending.into_iter().enumerate().collect();
        let mut files = vec![None; self.servers.len()];
        for (server, outcome) in exchange::settle(tagged) {
            let answer = outcome.map_err(|e| backend(&self.name, e))?;
            files[server] = Some(answer.payload.to_vec());
        }
        let files = files
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                Error::InvalidArgument(format!("{}: a server did not answer", self.name))
            })?;
        let joined = sliced::join(&files, &self.layout(), dump_optimizer)?;
        std::fs::write(path, joined).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    pub(super) fn load_states(&self, path: &Path) -> Result<()> {
        let operation = "load_optimizer_states";
        self.check_optimizer(operation)?;
        let sent = match self.rank {
            0 => self.send_states(path, operation),
            _ => Ok(()),
        };
        // No push may reach a server before its states: every worker waits for rank 0.
        let met = self.worker_barrier();
        sent.and(met)
    }

    /// Rank 0's part of a load: the file cut into the servers' slices, each sent its own.
    fn send_states(&self, path: &Path, operation: &'static str) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let files = sliced::split(&bytes, &self.layout(), self.servers.len())?;
        let pending = self
            .servers
            .iter()
            .zip(&files)
            .map(|(c, file)| c.send(Outgoing::new(protocol::CMD_LOAD_STATES, file), operation))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| backend(&self.name, e))?;
        let tagged = pending.into_iter().map(|p| ((), p)).collect();
        match exchange::settle(tagged)
            .into_iter()
            .find_map(|(_, outcome)| outcome.err())
        {
            Some(e) => Err(backend(&self.name, e)),
            None => Ok(()),
        }
    }
}
