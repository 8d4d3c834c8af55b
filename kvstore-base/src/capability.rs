//! Capabilities a store may have, queried with [`KVStoreBase::is_capable`](crate::KVStoreBase::is_capable).

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Something a store may or may not support.
///
/// `Optimizer` is MXNet's one capability (`KVStoreBase.OPTIMIZER = 'optimizer'`); the others
/// describe further optional operations of this crate's contract, so that callers and the
/// conformance suite can tell what a store offers before calling it. Parsing is
/// case-insensitive, and an unknown name is an error, as MXNet's `is_capable` raises on one.
///
/// ```
/// use kvstore_base::Capability;
/// assert_eq!("OPTIMIZER".parse::<Capability>().unwrap(), Capability::Optimizer);
/// assert!("sparsity".parse::<Capability>().is_err());
/// assert_eq!(Capability::InitPushPull.to_string(), "init_push_pull");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Capability {
    /// Runs an optimizer inside the store (`set_optimizer`), MXNet's `optimizer`.
    Optimizer,
    /// Keeps values: `init`, `push` and `pull` (`init_push_pull`).
    InitPushPull,
    /// Accepts a custom updater closure (`updater`).
    Updater,
    /// Compresses gradients (`gradient_compression`).
    GradientCompression,
    /// Pulls selected rows of row-sparse values (`row_sparse`).
    RowSparse,
    /// Saves and loads optimizer states (`optimizer_states`).
    OptimizerStates,
    /// Spans several processes: workers and, for some stores, servers (`distributed`).
    Distributed,
}

impl Capability {
    /// Every capability, in a stable order.
    pub const ALL: &'static [Capability] = &[
        Capability::Optimizer,
        Capability::InitPushPull,
        Capability::Updater,
        Capability::GradientCompression,
        Capability::RowSparse,
        Capability::OptimizerStates,
        Capability::Distributed,
    ];

    /// The string spelling (`optimizer`, `init_push_pull`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Capability::Optimizer => "optimizer",
            Capability::InitPushPull => "init_push_pull",
            Capability::Updater => "updater",
            Capability::GradientCompression => "gradient_compression",
            Capability::RowSparse => "row_sparse",
            Capability::OptimizerStates => "optimizer_states",
            Capability::Distributed => "distributed",
        }
    }
}

/// The capability names, comma-separated (for messages).
pub(crate) fn known_capabilities() -> String {
    Capability::ALL
        .iter()
        .map(|c| c.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Capability {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let lower = s.to_lowercase();
        Capability::ALL
            .iter()
            .copied()
            .find(|c| c.name() == lower)
            .ok_or_else(|| Error::UnknownCapability(s.to_string()))
    }
}
