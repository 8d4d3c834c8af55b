//! Flattened calls: the `(key, array)` pairs every [`KVStoreBase`](crate::KVStoreBase) method
//! receives, the shape of MXNet's C API.
//!
//! A key appears once per array: `push("w", &[g0, g1])` becomes `[("w", g0), ("w", g1)]`.
//! The constructors enforce what every store relies on: at least one pair, as many keys as
//! arrays, and keys all of one kind.

use std::collections::HashMap;

use crate::{Error, Key, NDArray, Result};

/// The error of a store that works on host memory given an array in device memory.
fn on_device(store: &str, operation: &'static str, key: &Key, context: crate::Context) -> Error {
    Error::InvalidArgument(format!(
        "this store works on host arrays and this one is on {context}: call it through \
         KVStoreExt (which copies device arrays to the host) or copy it with to_context"
    ))
    .at_key(store, operation, key.clone())
}

/// The input arrays of a call, each with its key.
#[derive(Debug, Clone)]
pub struct KeyedValues<'a> {
    keys: Vec<Key>,
    values: Vec<&'a NDArray>,
}

/// The output arrays of a call, each with its key.
#[derive(Debug)]
pub struct KeyedOuts<'a> {
    keys: Vec<Key>,
    outs: Vec<&'a mut NDArray>,
}

/// The positions of one key's arrays inside a [`KeyedValues`] or [`KeyedOuts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGroup {
    /// The key.
    pub key: Key,
    /// Indices of its arrays, in call order.
    pub positions: Vec<usize>,
}

fn check_keys(operation: &'static str, keys: &[Key], arrays: usize, what: &str) -> Result<()> {
    let Some(first) = keys.first() else {
        return Err(Error::EmptyKeys { operation });
    };
    if keys.len() != arrays {
        return Err(Error::CountMismatch {
            operation,
            what: format!("{what} for {} keys", keys.len()),
            expected: keys.len(),
            found: arrays,
        });
    }
    if let Some(other) = keys.iter().find(|k| !k.same_kind(first)) {
        return Err(Error::MixedKeyTypes {
            operation,
            first: first.clone(),
            other: other.clone(),
        });
    }
    Ok(())
}

fn group(keys: &[Key]) -> Vec<KeyGroup> {
    let mut index: HashMap<&Key, usize> = HashMap::with_capacity(keys.len());
    let mut groups: Vec<KeyGroup> = Vec::new();
    for (pos, key) in keys.iter().enumerate() {
        let slot = *index.entry(key).or_insert_with(|| {
            groups.push(KeyGroup {
                key: key.clone(),
                positions: Vec::new(),
            });
            groups.len() - 1
        });
        groups[slot].positions.push(pos);
    }
    groups
}

impl<'a> KeyedValues<'a> {
    /// Pairs `keys[i]` with `values[i]`.
    ///
    /// # Errors
    /// [`Error::EmptyKeys`], [`Error::CountMismatch`] or [`Error::MixedKeyTypes`].
    pub fn new(operation: &'static str, keys: Vec<Key>, values: Vec<&'a NDArray>) -> Result<Self> {
        check_keys(operation, &keys, values.len(), "values")?;
        Ok(KeyedValues { keys, values })
    }

    /// The key of each array.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The arrays.
    pub fn values(&self) -> &[&'a NDArray] {
        &self.values
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a batch holds at least one pair.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The pairs in call order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &'a NDArray)> + '_ {
        self.keys.iter().zip(self.values.iter().copied())
    }

    /// Refuses values in device memory, for a store that works on host memory and is called
    /// directly (through [`KVStoreExt`](crate::KVStoreExt) they arrive staged on the host).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the store, the operation and the key.
    pub fn check_on_host(&self, store: &str, operation: &'static str) -> Result<()> {
        match self.iter().find(|(_, v)| v.in_device_memory()) {
            Some((key, v)) => Err(on_device(store, operation, key, v.context())),
            None => Ok(()),
        }
    }

    /// Whether any value is in device memory.
    pub fn any_on_device(&self) -> bool {
        self.values.iter().any(|v| v.in_device_memory())
    }

    /// The distinct keys, in order of first appearance, with the positions of their arrays.
    pub fn groups(&self) -> Vec<KeyGroup> {
        group(&self.keys)
    }

    /// Checks that every key has exactly one value, as `broadcast` needs (rank 0's value).
    ///
    /// # Errors
    /// [`Error::CountMismatch`] for the first key with several values, wrapped with
    /// [`Error::at_key`] naming `store` and `operation`.
    pub fn check_one_value_per_key(&self, store: &str, operation: &'static str) -> Result<()> {
        match self.groups().into_iter().find(|g| g.positions.len() != 1) {
            None => Ok(()),
            Some(group) => Err(Error::CountMismatch {
                operation,
                what: format!("value for the key ({operation} takes one value per key)"),
                expected: 1,
                found: group.positions.len(),
            }
            .at_key(store, operation, group.key)),
        }
    }
}

impl<'a> KeyedOuts<'a> {
    /// Pairs `keys[i]` with `outs[i]`.
    ///
    /// # Errors
    /// [`Error::EmptyKeys`], [`Error::CountMismatch`] or [`Error::MixedKeyTypes`].
    pub fn new(
        operation: &'static str,
        keys: Vec<Key>,
        outs: Vec<&'a mut NDArray>,
    ) -> Result<Self> {
        check_keys(operation, &keys, outs.len(), "outputs")?;
        Ok(KeyedOuts { keys, outs })
    }

    /// The key of each output.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The outputs.
    pub fn outs(&self) -> &[&'a mut NDArray] {
        &self.outs
    }

    /// The outputs, mutably.
    pub fn outs_mut(&mut self) -> &mut [&'a mut NDArray] {
        &mut self.outs
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a batch holds at least one pair.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The pairs in call order, with the outputs writable.
    pub fn iter_mut(
        &mut self,
    ) -> std::iter::Zip<std::slice::Iter<'_, Key>, std::slice::IterMut<'_, &'a mut NDArray>> {
        self.keys.iter().zip(self.outs.iter_mut())
    }

    /// Refuses outputs in device memory, for a store that works on host memory and is called
    /// directly (through [`KVStoreExt`](crate::KVStoreExt) they arrive staged on the host).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the store, the operation and the key.
    pub fn check_on_host(&self, store: &str, operation: &'static str) -> Result<()> {
        match self.iter_on_device() {
            Some((key, context)) => Err(on_device(store, operation, key, context)),
            None => Ok(()),
        }
    }

    /// Whether any output is in device memory.
    pub fn any_on_device(&self) -> bool {
        self.iter_on_device().is_some()
    }

    fn iter_on_device(&self) -> Option<(&Key, crate::Context)> {
        self.keys
            .iter()
            .zip(&self.outs)
            .find(|(_, o)| o.in_device_memory())
            .map(|(k, o)| (k, o.context()))
    }

    /// The distinct keys, in order of first appearance, with the positions of their outputs.
    pub fn groups(&self) -> Vec<KeyGroup> {
        group(&self.keys)
    }

    /// Checks that these outputs can receive the results of `values`: keys of the same kind,
    /// and every output key present among the value keys.
    ///
    /// # Errors
    /// [`Error::MixedKeyTypes`], or [`Error::InvalidArgument`] naming an output key that has
    /// no value in the call.
    pub fn check_against(&self, operation: &'static str, values: &KeyedValues<'_>) -> Result<()> {
        let (first, other) = (&values.keys[0], &self.keys[0]);
        if !first.same_kind(other) {
            return Err(Error::MixedKeyTypes {
                operation,
                first: first.clone(),
                other: other.clone(),
            });
        }
        let value_keys: std::collections::HashSet<&Key> = values.keys.iter().collect();
        if let Some(missing) = self.keys.iter().find(|k| !value_keys.contains(k)) {
            return Err(Error::InvalidArgument(format!(
                "{operation}: output key {missing} has no value in this call"
            )));
        }
        Ok(())
    }

    /// [`check_against`](KeyedOuts::check_against), then that every output has the shape of
    /// its key's first value (a broadcast's rule, whose keys need not exist yet); errors about
    /// a key name `store` and `operation`.
    ///
    /// # Errors
    /// As [`check_against`](KeyedOuts::check_against); [`Error::ShapeMismatch`] naming the
    /// output, wrapped in [`Error::AtKey`].
    pub fn check_shapes_against(
        &self,
        store: &str,
        operation: &'static str,
        values: &KeyedValues<'_>,
    ) -> Result<()> {
        self.check_against(operation, values)?;
        let mut first_values: std::collections::HashMap<&Key, &NDArray> =
            std::collections::HashMap::with_capacity(values.len());
        for (key, value) in values.iter() {
            first_values.entry(key).or_insert(value);
        }
        for (i, (key, out)) in self.keys.iter().zip(&self.outs).enumerate() {
            let Some(value) = first_values.get(key) else {
                continue; // check_against found every output key among the values
            };
            value
                .check_shape_of(out, &format!("output {i}"))
                .map_err(|e| e.at_key(store, operation, key.clone()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn groups_keep_first_appearance_order() {
        let a = NDArray::ones(&[1], DType::F32);
        let keys = vec![Key::from(2), Key::from(1), Key::from(2)];
        let batch = KeyedValues::new("push", keys, vec![&a, &a, &a]).unwrap();
        let groups = batch.groups();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].key, Key::from(2));
        assert_eq!(groups[0].positions, vec![0, 2]);
        assert_eq!(groups[1].positions, vec![1]);
    }

    #[test]
    fn constructor_rejects_bad_batches() {
        let a = NDArray::ones(&[1], DType::F32);
        assert!(matches!(
            KeyedValues::new("push", vec![], vec![]),
            Err(Error::EmptyKeys { operation: "push" })
        ));
        assert!(matches!(
            KeyedValues::new("push", vec![Key::from(1)], vec![&a, &a]),
            Err(Error::CountMismatch {
                expected: 1,
                found: 2,
                ..
            })
        ));
        let err =
            KeyedValues::new("push", vec![Key::from(1), Key::from("w")], vec![&a, &a]).unwrap_err();
        assert!(
            err.to_string().contains("inconsistent types of keys"),
            "{err}"
        );
    }
}
