//! [`TestStore`]: MXNet's `TestStore`, the reference the other stores are checked against.

use std::collections::HashMap;

use kvstore_base::{
    register, Capability, Error, KVStoreBase, Key, KeyedOuts, KeyedValues, NDArray, Result,
};

/// MXNet's `TestStore` (`mxnet.kvstore.base.TestStore`), registered as `teststore`.
///
/// A single-process store with no state: it has only MXNet's abstract operations.
///
/// - `broadcast` copies each key's value into every output of the key (`o[:] = value`).
/// - `pushpull` sums a key's values (`sum(values)`, left to right from 0 in the values'
///   dtype) and writes the sum into every output, or back into the values for the in-place
///   form; a key's single value is copied as it is (MXNet's `o[:] = value` for one `NDArray`,
///   so a `-0.0` stays `-0.0`).
/// - Several keys in one call are each handled so (MXNet's `TestStore` takes one key a call).
/// - `rank` is 0, `num_workers` 1, `is_capable` is false for everything (MXNet's only
///   capability, `optimizer`, included), and `init`, `push`, `pull`, `set_optimizer` and the
///   optimizer-state files are unsupported.
///
/// Unlike MXNet's, it checks its input: values of one key must agree in shape and dtype and
/// outputs must have the value's shape (their dtype may differ: values are cast, as
/// `o[:] = value` does). A call with bad input writes nothing.
///
/// ```
/// use kvstore_base::{create, DType, KVStoreExt, NDArray};
/// use kvstore_test as _; // links the crate, which registers `teststore`
///
/// let kv = create("TestStore")?;
/// let mut values = vec![NDArray::ones(&[2], DType::F32), NDArray::full(&[2], 2.0, DType::F32)];
/// kv.pushpull_in_place(3, &mut values)?;
/// assert_eq!(values[0].to_vec::<f32>()?, vec![3.0, 3.0]);
/// assert_eq!(values[1].to_vec::<f32>()?, vec![3.0, 3.0]);
/// # Ok::<(), kvstore_base::Error>(())
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct TestStore;

register!(TestStore);

/// The name `TestStore` is registered under.
pub const NAME: &str = "teststore";

impl TestStore {
    fn sum(&self, key: &Key, values: &[&NDArray]) -> Result<NDArray> {
        let first = values[0];
        if values.len() == 1 {
            return Ok(first.clone());
        }
        let mut sum = NDArray::zeros(first.shape(), first.dtype());
        for (i, value) in values.iter().enumerate() {
            first
                .check_like(value, &format!("value {i} of the key"))
                .and_then(|()| sum.add_assign(value))
                .map_err(|e| e.at_key(NAME, "pushpull", key.clone()))?;
        }
        Ok(sum)
    }
}

/// Writes `results[key]` into every output, after checking every output's shape, so that a
/// bad output leaves all of them untouched.
fn write_all(
    operation: &'static str,
    outs: &mut KeyedOuts<'_>,
    result_of: impl Fn(&Key) -> Option<NDArray>,
) -> Result<()> {
    let keys = outs.keys().to_vec();
    let mut results = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let result =
            result_of(key).ok_or_else(|| {
                Error::InvalidArgument(format!("output key {key} has no value in this call"))
                    .at_key(NAME, operation, key.clone())
            })?;
        let out = &outs.outs()[i];
        if out.shape() != result.shape() {
            return Err(Error::ShapeMismatch {
                what: format!("output {i}"),
                expected: result.shape().to_vec(),
                found: out.shape().to_vec(),
            }
            .at_key(NAME, operation, key.clone()));
        }
        results.push(result);
    }
    for (out, result) in outs.outs_mut().iter_mut().zip(&results) {
        out.assign(result)?;
    }
    Ok(())
}

impl KVStoreBase for TestStore {
    fn type_name(&self) -> &str {
        NAME
    }

    fn rank(&self) -> usize {
        0
    }

    fn num_workers(&self) -> usize {
        1
    }

    fn is_capable(&self, _capability: Capability) -> bool {
        false
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        _priority: i32,
    ) -> Result<()> {
        values.check_on_host(self.type_name(), "broadcast")?;
        outs.check_on_host(self.type_name(), "broadcast")?;
        outs.check_against("broadcast", values)?;
        values.check_one_value_per_key(NAME, "broadcast")?;
        let by_key: HashMap<&Key, &NDArray> = values.iter().collect();
        write_all("broadcast", outs, |key| {
            by_key.get(key).map(|v| (*v).clone())
        })
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        _priority: i32,
    ) -> Result<()> {
        values.check_on_host(self.type_name(), "pushpull")?;
        outs.check_on_host(self.type_name(), "pushpull")?;
        outs.check_against("pushpull", values)?;
        let mut sums = HashMap::new();
        for group in values.groups() {
            let arrays: Vec<&NDArray> = group
                .positions
                .iter()
                .map(|&i| values.values()[i])
                .collect();
            let sum = self.sum(&group.key, &arrays)?;
            sums.insert(group.key, sum);
        }
        write_all("pushpull", outs, |key| sums.get(key).cloned())
    }
}
