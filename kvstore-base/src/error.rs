//! The one error type of the contract.

use std::path::PathBuf;

use crate::{DType, Key};

/// Everything that can go wrong in a store, its registry or its values.
///
/// Errors about a particular key are wrapped in [`Error::AtKey`], which names the store, the
/// operation and the key; [`Error::root`] gives the underlying cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `create` was given a name nothing is registered under.
    #[error(
        "unknown kvstore type {name:?}; registered: {}{}{}",
        registered.join(", "),
        suggestion.as_ref().map(|s| format!("; did you mean {s:?}?")).unwrap_or_default(),
        provided_by.as_ref().map(|p| format!("; {name:?} is a store of {p}, which this program does not link")).unwrap_or_default()
    )]
    UnknownStore {
        /// The requested name, lower-cased.
        name: String,
        /// Every registered name and alias, sorted.
        registered: Vec<String>,
        /// The registered name closest to the requested one, if any is close.
        suggestion: Option<String>,
        /// For a name of this project's stores whose crate is not linked: that crate and the
        /// `kvstore` facade's feature that links it.
        provided_by: Option<String>,
    },

    /// Two crates registered the same name statically; neither wins silently.
    #[error("kvstore type {name:?} is registered more than once, by {}; register one of them under another name", origins.join(" and "))]
    AmbiguousStore {
        /// The contested name.
        name: String,
        /// Where each registration comes from (module paths).
        origins: Vec<String>,
    },

    /// The store does not offer this operation.
    #[error("{store}: {operation} is not supported by this kvstore type")]
    Unsupported {
        /// The store's type name.
        store: String,
        /// The operation, e.g. `push` or `set_optimizer`.
        operation: &'static str,
    },

    /// A capability string that is not one of [`Capability::ALL`](crate::Capability::ALL).
    #[error(
        "unknown capability {0:?}; known capabilities: {known}",
        known = crate::capability::known_capabilities()
    )]
    UnknownCapability(String),

    /// Int and str keys in one call (or, for stores that fix the key type, across calls).
    #[error("{operation}: inconsistent types of keys detected: {first} is an {} key but {other} is a {} key", first.kind(), other.kind())]
    MixedKeyTypes {
        /// The operation.
        operation: &'static str,
        /// A key of the kind seen first.
        first: Key,
        /// A key of the other kind.
        other: Key,
    },

    /// A call with no keys at all.
    #[error("{operation}: the key list is empty")]
    EmptyKeys {
        /// The operation.
        operation: &'static str,
    },

    /// Lists whose lengths must agree do not (keys vs values, values vs outs, ...).
    #[error("{operation}: expected {expected} {what}, got {found}")]
    CountMismatch {
        /// The operation.
        operation: &'static str,
        /// What was counted, e.g. `values for 3 keys`.
        what: String,
        /// How many were needed.
        expected: usize,
        /// How many were given.
        found: usize,
    },

    /// Two arrays that must have the same shape do not.
    #[error("shape mismatch: {what} has shape {found:?} but {expected:?} was expected")]
    ShapeMismatch {
        /// Which array has the unexpected shape.
        what: String,
        /// The shape it should have.
        expected: Vec<usize>,
        /// The shape it has.
        found: Vec<usize>,
    },

    /// Two arrays that must have the same element type do not.
    #[error("dtype mismatch: {what} has dtype {found} but {expected} was expected")]
    DTypeMismatch {
        /// Which array has the unexpected dtype.
        what: String,
        /// The dtype it should have.
        expected: DType,
        /// The dtype it has.
        found: DType,
    },

    /// An error about one key of a call: the store, the operation and the key, then the cause.
    #[error("{store}: {operation} of key {key}: {cause}")]
    AtKey {
        /// The store's type name.
        store: String,
        /// The operation.
        operation: &'static str,
        /// The key.
        key: Key,
        /// What went wrong.
        cause: Box<Error>,
    },

    /// A key was used before `init`.
    #[error("key has not been initialised (call init first)")]
    KeyNotInitialized,

    /// A key was initialised twice.
    #[error("duplicate init of the key (init or broadcast was called with it more than once)")]
    DuplicateInit,

    /// An argument is invalid in a way the other variants do not describe.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// GPU memory or a device backend is unavailable or failed.
    #[error("device error: {0}")]
    Device(String),

    /// A file could not be read or written.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A plugin library could not be loaded: the file is missing, is not a shared library, does
    /// not export the plugin entry, or speaks another version of the plugin ABI.
    #[error("cannot load kvstore plugin {}: {reason}", path.display())]
    Plugin {
        /// The library file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The store panicked during an operation; the panic was caught at a plugin boundary.
    #[error("{store}: {operation} panicked: {message}")]
    Panic {
        /// The store's type name.
        store: String,
        /// The operation.
        operation: &'static str,
        /// The panic message.
        message: String,
    },

    /// A backend-specific failure.
    #[error("{store}: {source}")]
    Backend {
        /// The store's type name.
        store: String,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Checks that `array` has the shape a key was declared with; `what` names the array.
    ///
    /// ```
    /// use kvstore_base::{DType, Error, NDArray};
    /// let pushed = NDArray::zeros(&[3, 2], DType::F32);
    /// let e = Error::check_shape(&[2, 3], &pushed, "pushed value 0").unwrap_err();
    /// assert_eq!(e.to_string(), "shape mismatch: pushed value 0 has shape [3, 2] but [2, 3] was expected");
    /// ```
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming both shapes.
    pub fn check_shape(
        expected: &[usize],
        array: &crate::NDArray,
        what: &str,
    ) -> Result<(), Error> {
        match array.shape() == expected {
            true => Ok(()),
            false => Err(Error::ShapeMismatch {
                what: what.to_string(),
                expected: expected.to_vec(),
                found: array.shape().to_vec(),
            }),
        }
    }

    /// Checks that `array` has the shape and the dtype a key was declared with; `what` names
    /// the array.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] or [`Error::DTypeMismatch`].
    pub fn check_declared(
        expected_shape: &[usize],
        expected_dtype: crate::DType,
        array: &crate::NDArray,
        what: &str,
    ) -> Result<(), Error> {
        Error::check_shape(expected_shape, array, what)?;
        match array.dtype() == expected_dtype {
            true => Ok(()),
            false => Err(Error::DTypeMismatch {
                what: what.to_string(),
                expected: expected_dtype,
                found: array.dtype(),
            }),
        }
    }

    /// Checks that a `row_sparse_pull` has one row-id array per output.
    ///
    /// # Errors
    /// [`Error::CountMismatch`] naming both counts.
    pub fn check_row_id_count(outputs: usize, row_ids: usize) -> Result<(), Error> {
        match outputs == row_ids {
            true => Ok(()),
            false => Err(Error::CountMismatch {
                operation: "row_sparse_pull",
                what: "row-id arrays, one per output".into(),
                expected: outputs,
                found: row_ids,
            }),
        }
    }

    /// Wraps this error as being about `key` in `operation` of `store`.
    ///
    /// ```
    /// use kvstore_base::{Error, Key};
    /// let e = Error::KeyNotInitialized.at_key("local", "pull", Key::from(3));
    /// assert_eq!(e.to_string(), "local: pull of key 3: key has not been initialised (call init first)");
    /// assert!(matches!(e.root(), Error::KeyNotInitialized));
    /// ```
    pub fn at_key(self, store: &str, operation: &'static str, key: Key) -> Error {
        Error::AtKey {
            store: store.to_string(),
            operation,
            key,
            cause: Box::new(self),
        }
    }

    /// The innermost error, looking through [`Error::AtKey`].
    pub fn root(&self) -> &Error {
        match self {
            Error::AtKey { cause, .. } => cause.root(),
            other => other,
        }
    }

    /// The key this error is about, if any.
    pub fn key(&self) -> Option<&Key> {
        match self {
            Error::AtKey { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
