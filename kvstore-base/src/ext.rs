//! [`KVStoreExt`]: MXNet's calling forms (single key, key list, per-device lists) over any store.

use crate::staging::{
    with_arrays_on_host, with_outs_on_host, with_values_on_host, with_written_outs_fanned_out,
};
use crate::{Capability, Error, KVStoreBase, Key, KeyedOuts, KeyedValues, Keys, NDArray, Result};

/// The arrays of a call, shaped like its keys: one array, a list, or a list of lists.
///
/// With one key, a list means one array per device. With a key list, a list means one array
/// per key, and a list of lists one list of per-device arrays per key. [`Values`] and
/// [`Outs`] convert from references to arrays, slices, arrays of arrays and `Vec`s.
#[derive(Debug)]
pub enum Arrays<T> {
    /// A single array.
    One(T),
    /// A list of arrays.
    List(Vec<T>),
    /// A list of lists of arrays.
    Nested(Vec<Vec<T>>),
}

/// Input arrays of a call (see [`Arrays`]).
pub type Values<'a> = Arrays<&'a NDArray>;

/// Output arrays of a call (see [`Arrays`]).
pub type Outs<'a> = Arrays<&'a mut NDArray>;

impl<'a> From<&'a NDArray> for Values<'a> {
    fn from(v: &'a NDArray) -> Self {
        Arrays::One(v)
    }
}
impl<'a> From<&'a [NDArray]> for Values<'a> {
    fn from(v: &'a [NDArray]) -> Self {
        Arrays::List(v.iter().collect())
    }
}
impl<'a, const N: usize> From<&'a [NDArray; N]> for Values<'a> {
    fn from(v: &'a [NDArray; N]) -> Self {
        Arrays::List(v.iter().collect())
    }
}
impl<'a> From<&'a Vec<NDArray>> for Values<'a> {
    fn from(v: &'a Vec<NDArray>) -> Self {
        Arrays::List(v.iter().collect())
    }
}
impl<'a> From<Vec<&'a NDArray>> for Values<'a> {
    fn from(v: Vec<&'a NDArray>) -> Self {
        Arrays::List(v)
    }
}
impl<'a, const N: usize> From<[&'a NDArray; N]> for Values<'a> {
    fn from(v: [&'a NDArray; N]) -> Self {
        Arrays::List(v.to_vec())
    }
}
impl<'a> From<&'a [Vec<NDArray>]> for Values<'a> {
    fn from(v: &'a [Vec<NDArray>]) -> Self {
        Arrays::Nested(v.iter().map(|l| l.iter().collect()).collect())
    }
}
impl<'a, const N: usize> From<&'a [Vec<NDArray>; N]> for Values<'a> {
    fn from(v: &'a [Vec<NDArray>; N]) -> Self {
        Values::from(&v[..])
    }
}
impl<'a> From<&'a Vec<Vec<NDArray>>> for Values<'a> {
    fn from(v: &'a Vec<Vec<NDArray>>) -> Self {
        Values::from(&v[..])
    }
}
impl<'a> From<Vec<Vec<&'a NDArray>>> for Values<'a> {
    fn from(v: Vec<Vec<&'a NDArray>>) -> Self {
        Arrays::Nested(v)
    }
}

impl<'a> From<&'a mut NDArray> for Outs<'a> {
    fn from(v: &'a mut NDArray) -> Self {
        Arrays::One(v)
    }
}
impl<'a> From<&'a mut [NDArray]> for Outs<'a> {
    fn from(v: &'a mut [NDArray]) -> Self {
        Arrays::List(v.iter_mut().collect())
    }
}
impl<'a, const N: usize> From<&'a mut [NDArray; N]> for Outs<'a> {
    fn from(v: &'a mut [NDArray; N]) -> Self {
        Arrays::List(v.iter_mut().collect())
    }
}
impl<'a> From<&'a mut Vec<NDArray>> for Outs<'a> {
    fn from(v: &'a mut Vec<NDArray>) -> Self {
        Arrays::List(v.iter_mut().collect())
    }
}
impl<'a> From<Vec<&'a mut NDArray>> for Outs<'a> {
    fn from(v: Vec<&'a mut NDArray>) -> Self {
        Arrays::List(v)
    }
}
impl<'a> From<&'a mut [Vec<NDArray>]> for Outs<'a> {
    fn from(v: &'a mut [Vec<NDArray>]) -> Self {
        Arrays::Nested(v.iter_mut().map(|l| l.iter_mut().collect()).collect())
    }
}
impl<'a, const N: usize> From<&'a mut [Vec<NDArray>; N]> for Outs<'a> {
    fn from(v: &'a mut [Vec<NDArray>; N]) -> Self {
        Outs::from(&mut v[..])
    }
}
impl<'a> From<&'a mut Vec<Vec<NDArray>>> for Outs<'a> {
    fn from(v: &'a mut Vec<Vec<NDArray>>) -> Self {
        Outs::from(&mut v[..])
    }
}
impl<'a> From<Vec<Vec<&'a mut NDArray>>> for Outs<'a> {
    fn from(v: Vec<Vec<&'a mut NDArray>>) -> Self {
        Arrays::Nested(v)
    }
}

impl<T> Arrays<T> {
    /// Pairs every array with its key, MXNet's `_ctype_key_value`.
    ///
    /// # Errors
    /// [`Error::EmptyKeys`] for an empty key list, [`Error::CountMismatch`] when the arrays
    /// do not match the keys one to one (or a key has an empty list), and
    /// [`Error::InvalidArgument`] for a single key with a list of lists or a key list with a
    /// single array.
    pub fn flatten(self, operation: &'static str, keys: Keys) -> Result<(Vec<Key>, Vec<T>)> {
        let per_key = |key: &Key, n: usize| -> Result<()> {
            if n == 0 {
                Err(Error::CountMismatch {
                    operation,
                    what: format!("arrays for key {key} (at least one)"),
                    expected: 1,
                    found: 0,
                })
            } else {
                Ok(())
            }
        };
        match (keys, self) {
            (Keys::One(key), Arrays::One(a)) => Ok((vec![key], vec![a])),
            (Keys::One(key), Arrays::List(list)) => {
                per_key(&key, list.len())?;
                Ok((vec![key; list.len()], list))
            }
            (Keys::One(key), Arrays::Nested(_)) => Err(Error::InvalidArgument(format!(
                "{operation}: key {key} takes one array or a list of arrays (one per device), not a list of lists"
            ))),
            (Keys::Many(keys), _) if keys.is_empty() => Err(Error::EmptyKeys { operation }),
            (Keys::Many(keys), Arrays::One(_)) => Err(Error::InvalidArgument(format!(
                "{operation}: {} keys need a list of arrays, one entry per key, not a single array",
                keys.len()
            ))),
            (Keys::Many(keys), Arrays::List(list)) => {
                check_count(operation, &keys, list.len())?;
                Ok((keys, list))
            }
            (Keys::Many(keys), Arrays::Nested(lists)) => {
                check_count(operation, &keys, lists.len())?;
                let mut flat_keys = Vec::new();
                let mut flat = Vec::new();
                for (key, list) in keys.into_iter().zip(lists) {
                    per_key(&key, list.len())?;
                    flat_keys.extend(std::iter::repeat_n(key, list.len()));
                    flat.extend(list);
                }
                Ok((flat_keys, flat))
            }
        }
    }
}

fn check_count(operation: &'static str, keys: &[Key], found: usize) -> Result<()> {
    if keys.len() == found {
        Ok(())
    } else {
        Err(Error::CountMismatch {
            operation,
            what: format!("array entries for {} keys", keys.len()),
            expected: keys.len(),
            found,
        })
    }
}

/// [`with_values_on_host`] unless `store` handles device arrays.
fn with_host_values<S: KVStoreBase + ?Sized, R>(
    store: &S,
    values: &KeyedValues<'_>,
    call: impl FnOnce(&KeyedValues<'_>) -> Result<R>,
) -> Result<R> {
    match store.handles_device_arrays() {
        true => call(values),
        false => with_values_on_host(values, call),
    }
}

/// Outputs in device memory staged through the host unless `store` handles device arrays:
/// copies of them when the call reads them ([`with_outs_on_host`]: an in-place pushpull);
/// else, since such a call writes each key's result into every output of the key, one host
/// stand-in per key, copied into its first device output and from there to the others, device
/// to device (MXNet's CPU stores copy their result from the host into each output).
fn with_host_outs<S: KVStoreBase + ?Sized, R>(
    store: &S,
    operation: &'static str,
    outs: &mut KeyedOuts<'_>,
    read: bool,
    call: impl FnOnce(&mut KeyedOuts<'_>) -> Result<R>,
) -> Result<R> {
    match (store.handles_device_arrays(), read) {
        (true, _) => call(outs),
        (false, true) => with_outs_on_host(outs, call),
        (false, false) => with_written_outs_fanned_out(store.type_name(), operation, outs, call),
    }
}

fn values<'a>(operation: &'static str, keys: Keys, values: Values<'a>) -> Result<KeyedValues<'a>> {
    let (keys, values) = values.flatten(operation, keys)?;
    KeyedValues::new(operation, keys, values)
}

fn outs<'a>(operation: &'static str, keys: Keys, outs: Outs<'a>) -> Result<KeyedOuts<'a>> {
    let (keys, outs) = outs.flatten(operation, keys)?;
    KeyedOuts::new(operation, keys, outs)
}

/// MXNet's calling forms over any [`KVStoreBase`]: a single key, a list of keys, one array
/// per device, a list of lists.
///
/// ```
/// use kvstore_base::{DType, KVStoreExt, NDArray};
/// # fn main() -> Result<(), kvstore_base::Error> {
/// # kvstore_base::register_runtime("doc_sum", "doc", Some(&[]), |_| Ok(Box::new(DocSum)));
/// let kv = kvstore_base::create("doc_sum")?; // any store; `local` in real code
///
/// let grads = [NDArray::ones(&[2], DType::F32), NDArray::ones(&[2], DType::F32)];
/// let mut out = NDArray::zeros(&[2], DType::F32);
/// kv.pushpull(3, &grads, &mut out)?;          // one key, one value per device
/// assert_eq!(out.to_vec::<f32>()?, vec![2.0, 2.0]);
///
/// let (a, b) = (NDArray::ones(&[1], DType::F32), NDArray::ones(&[3], DType::F32));
/// let mut outs = [NDArray::zeros(&[1], DType::F32), NDArray::zeros(&[3], DType::F32)];
/// kv.pushpull(&["a", "b"], [&a, &b], &mut outs)?; // one value per key
/// # Ok(()) }
/// # #[derive(Debug)] struct DocSum;
/// # impl kvstore_base::KVStoreBase for DocSum {
/// #   fn type_name(&self) -> &str { "doc_sum" }
/// #   fn rank(&self) -> usize { 0 }
/// #   fn num_workers(&self) -> usize { 1 }
/// #   fn is_capable(&self, _: kvstore_base::Capability) -> bool { false }
/// #   fn broadcast_batch(&self, _: &kvstore_base::KeyedValues<'_>, _: &mut kvstore_base::KeyedOuts<'_>, _: i32) -> kvstore_base::Result<()> { Ok(()) }
/// #   fn pushpull_batch(&self, v: &kvstore_base::KeyedValues<'_>, o: &mut kvstore_base::KeyedOuts<'_>, _: i32) -> kvstore_base::Result<()> {
/// #     for (k, out) in o.keys().to_vec().iter().zip(o.outs_mut()) {
/// #       let mut sum = NDArray::zeros(out.shape(), out.dtype());
/// #       for (vk, val) in v.iter() { if vk == k { sum.add_assign(val)?; } }
/// #       out.assign(&sum)?;
/// #     }
/// #     Ok(())
/// #   }
/// # }
/// ```
pub trait KVStoreExt: KVStoreBase {
    /// Initialises keys (MXNet's `kv.init(key, value)`).
    ///
    /// # Errors
    /// As [`KVStoreBase::init_batch`], plus malformed argument lists.
    fn init<'a>(&self, keys: impl Into<Keys>, values: impl Into<Values<'a>>) -> Result<()> {
        let values = self::values("init", keys.into(), values.into())?;
        with_host_values(self, &values, |v| self.init_batch(v))
    }

    /// Pushes values (MXNet's `kv.push(key, value)`), priority 0.
    ///
    /// # Errors
    /// As [`KVStoreBase::push_batch`], plus malformed argument lists.
    fn push<'a>(&self, keys: impl Into<Keys>, values: impl Into<Values<'a>>) -> Result<()> {
        self.push_with_priority(keys, values, 0)
    }

    /// Pushes values with a priority (higher runs earlier).
    ///
    /// # Errors
    /// As [`KVStoreBase::push_batch`], plus malformed argument lists.
    fn push_with_priority<'a>(
        &self,
        keys: impl Into<Keys>,
        values: impl Into<Values<'a>>,
        priority: i32,
    ) -> Result<()> {
        let values = self::values("push", keys.into(), values.into())?;
        with_host_values(self, &values, |v| self.push_batch(v, priority))
    }

    /// Pulls values into `outs` (MXNet's `kv.pull(key, out)`), skipping row-sparse outputs.
    ///
    /// # Errors
    /// As [`KVStoreBase::pull_batch`], plus malformed argument lists.
    fn pull<'a>(&self, keys: impl Into<Keys>, outs: impl Into<Outs<'a>>) -> Result<()> {
        self.pull_with_priority(keys, outs, 0)
    }

    /// Pulls values with a priority.
    ///
    /// # Errors
    /// As [`KVStoreBase::pull_batch`], plus malformed argument lists.
    fn pull_with_priority<'a>(
        &self,
        keys: impl Into<Keys>,
        outs: impl Into<Outs<'a>>,
        priority: i32,
    ) -> Result<()> {
        let mut outs = self::outs("pull", keys.into(), outs.into())?;
        with_host_outs(self, "pull", &mut outs, false, |o| {
            self.pull_batch(o, priority, true)
        })
    }

    /// `pull` with MXNet's `ignore_sparse` flag: with `false`, row-sparse outputs receive the
    /// full value instead of being skipped.
    ///
    /// # Errors
    /// As [`KVStoreBase::pull_batch`], plus malformed argument lists.
    fn pull_with_options<'a>(
        &self,
        keys: impl Into<Keys>,
        outs: impl Into<Outs<'a>>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        let mut outs = self::outs("pull", keys.into(), outs.into())?;
        with_host_outs(self, "pull", &mut outs, false, |o| {
            self.pull_batch(o, priority, ignore_sparse)
        })
    }

    /// Pushes `values` and pulls the result into `outs` (MXNet's `kv.pushpull(key, value, out)`).
    ///
    /// # Errors
    /// As [`KVStoreBase::pushpull_batch`], plus malformed argument lists.
    fn pushpull<'a, 'b>(
        &self,
        keys: impl Into<Keys>,
        values: impl Into<Values<'a>>,
        outs: impl Into<Outs<'b>>,
    ) -> Result<()> {
        self.pushpull_with_priority(keys, values, outs, 0)
    }

    /// `pushpull` with a priority.
    ///
    /// # Errors
    /// As [`KVStoreBase::pushpull_batch`], plus malformed argument lists.
    fn pushpull_with_priority<'a, 'b>(
        &self,
        keys: impl Into<Keys>,
        values: impl Into<Values<'a>>,
        outs: impl Into<Outs<'b>>,
        priority: i32,
    ) -> Result<()> {
        let keys = keys.into();
        let values = self::values("pushpull", keys.clone(), values.into())?;
        let mut outs = self::outs("pushpull", keys, outs.into())?;
        with_host_values(self, &values, |v| {
            with_host_outs(self, "pushpull", &mut outs, false, |o| {
                self.pushpull_batch(v, o, priority)
            })
        })
    }

    /// `pushpull` with the result written back into the values (MXNet's `kv.pushpull(key, value)`).
    ///
    /// # Errors
    /// As [`KVStoreBase::pushpull_in_place_batch`], plus malformed argument lists.
    fn pushpull_in_place<'a>(
        &self,
        keys: impl Into<Keys>,
        values: impl Into<Outs<'a>>,
    ) -> Result<()> {
        self.pushpull_in_place_with_priority(keys, values, 0)
    }

    /// `pushpull_in_place` with a priority (Gluon's `Trainer` passes `priority=-i` for the
    /// `i`-th parameter, so the first layers' gradients go first).
    ///
    /// # Errors
    /// As [`KVStoreBase::pushpull_in_place_batch`], plus malformed argument lists.
    fn pushpull_in_place_with_priority<'a>(
        &self,
        keys: impl Into<Keys>,
        values: impl Into<Outs<'a>>,
        priority: i32,
    ) -> Result<()> {
        let mut values = self::outs("pushpull", keys.into(), values.into())?;
        with_host_outs(self, "pushpull", &mut values, true, |v| {
            self.pushpull_in_place_batch(v, priority)
        })
    }

    /// Broadcasts rank 0's `values` into `outs` (MXNet's `kv.broadcast(key, value, out)`).
    ///
    /// # Errors
    /// As [`KVStoreBase::broadcast_batch`], plus malformed argument lists.
    fn broadcast<'a, 'b>(
        &self,
        keys: impl Into<Keys>,
        values: impl Into<Values<'a>>,
        outs: impl Into<Outs<'b>>,
    ) -> Result<()> {
        self.broadcast_with_priority(keys, values, outs, 0)
    }

    /// `broadcast` with a priority.
    ///
    /// # Errors
    /// As [`KVStoreBase::broadcast_batch`], plus malformed argument lists.
    fn broadcast_with_priority<'a, 'b>(
        &self,
        keys: impl Into<Keys>,
        values: impl Into<Values<'a>>,
        outs: impl Into<Outs<'b>>,
        priority: i32,
    ) -> Result<()> {
        let keys = keys.into();
        let values = self::values("broadcast", keys.clone(), values.into())?;
        let mut outs = self::outs("broadcast", keys, outs.into())?;
        with_host_values(self, &values, |v| {
            with_host_outs(self, "broadcast", &mut outs, false, |o| {
                self.broadcast_batch(v, o, priority)
            })
        })
    }

    /// Pulls the rows `row_ids` of row-sparse values into `outs` (MXNet's
    /// `kv.row_sparse_pull(key, out, row_ids=...)`). One row-id array may serve every output.
    ///
    /// # Errors
    /// As [`KVStoreBase::row_sparse_pull_batch`], plus malformed argument lists, and
    /// [`Error::CountMismatch`] when the number of row-id arrays is neither 1 nor the number of
    /// outputs.
    fn row_sparse_pull<'a, 'b>(
        &self,
        keys: impl Into<Keys>,
        outs: impl Into<Outs<'a>>,
        row_ids: impl Into<Values<'b>>,
    ) -> Result<()> {
        self.row_sparse_pull_with_priority(keys, outs, row_ids, 0)
    }

    /// `row_sparse_pull` with a priority.
    ///
    /// # Errors
    /// As [`row_sparse_pull`](KVStoreExt::row_sparse_pull).
    fn row_sparse_pull_with_priority<'a, 'b>(
        &self,
        keys: impl Into<Keys>,
        outs: impl Into<Outs<'a>>,
        row_ids: impl Into<Values<'b>>,
        priority: i32,
    ) -> Result<()> {
        let keys = keys.into();
        let mut outs = self::outs("row_sparse_pull", keys.clone(), outs.into())?;
        let row_ids: Vec<&NDArray> = match row_ids.into() {
            Arrays::One(ids) => vec![ids; outs.len()],
            other => {
                let (_, ids) = other.flatten("row_sparse_pull", keys)?;
                match ids.len() {
                    1 => vec![ids[0]; outs.len()],
                    n if n == outs.len() => ids,
                    n => {
                        return Err(Error::CountMismatch {
                            operation: "row_sparse_pull",
                            what: "row-id arrays (one, or one per output)".into(),
                            expected: outs.len(),
                            found: n,
                        })
                    }
                }
            }
        };
        // Row ids in device memory are read on the host, unless the store takes them.
        if self.handles_device_arrays() {
            return self.row_sparse_pull_batch(&mut outs, &row_ids, priority);
        }
        with_arrays_on_host(&row_ids, |ids| {
            with_outs_on_host(&mut outs, |o| self.row_sparse_pull_batch(o, ids, priority))
        })
    }

    /// Installs a custom updater closure `(key, merged_gradient, stored_value)`.
    ///
    /// # Errors
    /// As [`KVStoreBase::set_updater`].
    fn set_updater_fn<F>(&self, updater: F) -> Result<()>
    where
        F: FnMut(&Key, &NDArray, &mut NDArray) -> Result<()> + Send + 'static,
    {
        self.set_updater(Box::new(updater))
    }

    /// MXNet's string form of `is_capable`: case-insensitive.
    ///
    /// # Errors
    /// [`Error::UnknownCapability`] for a string that names no capability.
    fn is_capable_by_name(&self, capability: &str) -> Result<bool> {
        Ok(self.is_capable(capability.parse::<Capability>()?))
    }
}

impl<T: KVStoreBase + ?Sized> KVStoreExt for T {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    fn keys_of(keys: Vec<Key>) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn single_key_with_device_list_repeats_the_key() {
        let v = [
            NDArray::ones(&[1], DType::F32),
            NDArray::ones(&[1], DType::F32),
        ];
        let (keys, arrays) = Values::from(&v).flatten("push", Keys::from("w")).unwrap();
        assert_eq!(keys_of(keys), vec!["\"w\"", "\"w\""]);
        assert_eq!(arrays.len(), 2);
    }

    #[test]
    fn key_list_with_nested_lists_flattens_in_order() {
        let v = vec![
            vec![NDArray::ones(&[1], DType::F32); 2],
            vec![NDArray::ones(&[1], DType::F32); 3],
        ];
        let (keys, _) = Values::from(&v)
            .flatten("push", Keys::from(&[1, 2]))
            .unwrap();
        assert_eq!(keys_of(keys), vec!["1", "1", "2", "2", "2"]);
    }

    #[test]
    fn malformed_lists_are_errors() {
        let a = NDArray::ones(&[1], DType::F32);
        let v = [a.clone(), a.clone()];
        assert!(matches!(
            Values::from(&v).flatten("push", Keys::from(&[1, 2, 3])),
            Err(Error::CountMismatch {
                expected: 3,
                found: 2,
                ..
            })
        ));
        assert!(matches!(
            Values::from(&a).flatten("push", Keys::from(&[1, 2])),
            Err(Error::InvalidArgument(_))
        ));
        let empty: Vec<i32> = vec![];
        assert!(matches!(
            Values::from(&v).flatten("push", Keys::from(empty)),
            Err(Error::EmptyKeys { .. })
        ));
        let none: Vec<NDArray> = vec![];
        assert!(matches!(
            Values::from(&none).flatten("push", Keys::from(3)),
            Err(Error::CountMismatch { .. })
        ));
    }
}
