//! Keys: MXNet accepts int and str keys, but never both in one call.

use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::Error;

/// A key of the store: an integer or a string, as in MXNet.
///
/// Integer keys are 64-bit (MXNet's are 32-bit and overflow at 2^31).
///
/// ```
/// use kvstore_base::Key;
/// assert_eq!(Key::from(3), Key::Int(3));
/// assert_eq!(Key::from("w").to_string(), "\"w\"");
/// assert!(Key::from(3).same_kind(&Key::from(7)));
/// assert!(!Key::from(3).same_kind(&Key::from("w")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// An integer key.
    Int(i64),
    /// A string key.
    Str(Arc<str>),
}

impl Key {
    /// Whether both keys are ints or both are strings.
    pub fn same_kind(&self, other: &Key) -> bool {
        matches!(
            (self, other),
            (Key::Int(_), Key::Int(_)) | (Key::Str(_), Key::Str(_))
        )
    }

    /// `"int"` or `"str"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Key::Int(_) => "int",
            Key::Str(_) => "str",
        }
    }

    /// The integer, for an int key.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Key::Int(k) => Some(*k),
            Key::Str(_) => None,
        }
    }

    /// The string, for a str key.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Key::Str(s) => Some(s),
            Key::Int(_) => None,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Int(k) => write!(f, "{k}"),
            Key::Str(s) => write!(f, "{s:?}"),
        }
    }
}

macro_rules! int_key {
    ($($t:ty),*) => {$(
        impl From<$t> for Key {
            fn from(k: $t) -> Key {
                Key::Int(i64::from(k))
            }
        }
    )*};
}
int_key!(i8, i16, i32, i64, u8, u16, u32);

impl From<&str> for Key {
    fn from(k: &str) -> Key {
        Key::Str(Arc::from(k))
    }
}

impl From<String> for Key {
    fn from(k: String) -> Key {
        Key::Str(Arc::from(k))
    }
}

impl From<&String> for Key {
    fn from(k: &String) -> Key {
        Key::from(k.as_str())
    }
}

impl From<&Key> for Key {
    fn from(k: &Key) -> Key {
        k.clone()
    }
}

/// One key or a list of keys: the first argument of every data call of
/// [`KVStoreExt`](crate::KVStoreExt).
///
/// Converts from a single key (`3`, `"w"`, a [`Key`]) or a list of them
/// (`&[1, 2]`, `vec!["a", "b"]`, `&keys[..]`).
#[derive(Debug, Clone, PartialEq)]
pub enum Keys {
    /// A single key: its values are one array, or one array per device.
    One(Key),
    /// Several keys: one entry of values per key.
    Many(Vec<Key>),
}

impl<K: Into<Key>> From<K> for Keys {
    fn from(k: K) -> Keys {
        Keys::One(k.into())
    }
}

impl<K: Into<Key> + Clone> From<&[K]> for Keys {
    fn from(ks: &[K]) -> Keys {
        Keys::Many(ks.iter().cloned().map(Into::into).collect())
    }
}

impl<K: Into<Key> + Clone, const N: usize> From<&[K; N]> for Keys {
    fn from(ks: &[K; N]) -> Keys {
        Keys::from(&ks[..])
    }
}

impl<K: Into<Key>> From<Vec<K>> for Keys {
    fn from(ks: Vec<K>) -> Keys {
        Keys::Many(ks.into_iter().map(Into::into).collect())
    }
}

impl<K: Into<Key> + Clone> From<&Vec<K>> for Keys {
    fn from(ks: &Vec<K>) -> Keys {
        Keys::from(&ks[..])
    }
}

/// Holds a store to one type of key, as MXNet holds each of its stores: the first key any
/// call names fixes the type (int or string) for good, even if that call then fails, and a
/// key of the other type is an [`Error::MixedKeyTypes`] naming both keys. Safe to share
/// between threads.
///
/// ```
/// use kvstore_base::{Error, Key, KeyTypeGuard};
///
/// let guard = KeyTypeGuard::new();
/// guard.check("init", &[Key::from("w"), Key::from("b")])?;
/// let err = guard.check("push", &[Key::from(3)]).unwrap_err();
/// assert!(matches!(err, Error::MixedKeyTypes { .. }));
/// assert!(err.to_string().contains("\"w\"") && err.to_string().contains('3'));
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Default)]
pub struct KeyTypeGuard {
    first: OnceLock<Key>,
}

impl KeyTypeGuard {
    /// A guard that has seen no key yet.
    pub fn new() -> KeyTypeGuard {
        KeyTypeGuard::default()
    }

    /// Checks that every key of a call has the store's type of key, fixing it to the type of
    /// the call's first key if no call named a key before.
    ///
    /// # Errors
    /// [`Error::MixedKeyTypes`] for the first key of the other type.
    pub fn check<'a>(
        &self,
        operation: &'static str,
        keys: impl IntoIterator<Item = &'a Key>,
    ) -> Result<(), Error> {
        let mut keys = keys.into_iter().peekable();
        let Some(&key) = keys.peek() else {
            return Ok(());
        };
        let first = self.first.get_or_init(|| key.clone());
        match keys.find(|k| !first.same_kind(k)) {
            Some(other) => Err(Error::MixedKeyTypes {
                operation,
                first: first.clone(),
                other: other.clone(),
            }),
            None => Ok(()),
        }
    }
}
