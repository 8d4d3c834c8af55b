//! Where an array's memory lives.

use std::fmt;

/// The device context of an [`NDArray`](crate::NDArray), as MXNet's `mx.cpu()` / `mx.gpu(i)`.
///
/// Arrays are created on [`Context::Cpu`]. GPU contexts are part of the contract so that
/// stores and callers can describe where values live; GPU memory itself is provided by a
/// device backend (`kvstore-device`). Without one, asking for GPU memory is an
/// [`Error::Device`](crate::Error::Device), never a panic.
///
/// ```
/// use kvstore_base::Context;
/// assert_eq!(Context::Gpu(1).to_string(), "gpu(1)");
/// assert_eq!(Context::default(), Context::Cpu);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Context {
    /// Host memory.
    #[default]
    Cpu,
    /// Memory of the GPU with this ordinal.
    Gpu(usize),
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Context::Cpu => f.write_str("cpu(0)"),
            Context::Gpu(id) => write!(f, "gpu({id})"),
        }
    }
}

/// How an array stores its elements, as MXNet's `stype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageType {
    /// Every element is stored (`default` in MXNet).
    Dense,
    /// Only some rows are stored, with their row ids (`row_sparse`).
    RowSparse,
}

impl fmt::Display for StorageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StorageType::Dense => "default",
            StorageType::RowSparse => "row_sparse",
        })
    }
}
