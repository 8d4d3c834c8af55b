//! MXNet's calling forms through `KVStoreExt`: int literals and str keys, single keys with one
//! array or one per device, key lists with lists and lists of lists, and their errors.

use std::sync::Mutex;

use kvstore_base::{
    Capability, DType, Error, KVStoreBase, KVStoreExt, Key, KeyedOuts, KeyedValues, NDArray, Result,
};

/// Records the flattened keys each call receives.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<Vec<Key>>>);

impl KVStoreBase for Recorder {
    fn type_name(&self) -> &str {
        "recorder"
    }
    fn rank(&self) -> usize {
        0
    }
    fn num_workers(&self) -> usize {
        1
    }
    fn is_capable(&self, _: Capability) -> bool {
        false
    }
    fn broadcast_batch(&self, v: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, _: i32) -> Result<()> {
        self.0.lock().unwrap().push(v.keys().to_vec());
        Ok(())
    }
    fn pushpull_batch(&self, v: &KeyedValues<'_>, o: &mut KeyedOuts<'_>, _: i32) -> Result<()> {
        self.0.lock().unwrap().push(v.keys().to_vec());
        self.0.lock().unwrap().push(o.keys().to_vec());
        Ok(())
    }
}

fn calls(kv: &Recorder) -> Vec<Vec<String>> {
    kv.0.lock()
        .unwrap()
        .drain(..)
        .map(|keys| keys.iter().map(|k| k.to_string()).collect())
        .collect()
}

fn a() -> NDArray {
    NDArray::ones(&[2], DType::F32)
}

#[test]
fn single_int_key_with_one_array_and_with_one_per_device() {
    let kv = Recorder::default();
    let (grad, mut out) = (a(), a());
    kv.pushpull(3, &grad, &mut out).unwrap();
    let mut outs = vec![a(), a()];
    kv.pushpull(3, &[a(), a(), a()], &mut outs).unwrap();
    assert_eq!(
        calls(&kv),
        vec![vec!["3"], vec!["3"], vec!["3", "3", "3"], vec!["3", "3"]]
    );
}

#[test]
fn str_keys_and_key_lists() {
    let kv = Recorder::default();
    let mut outs = [a(), a()];
    kv.pushpull(&["w", "b"], &[a(), a()], &mut outs).unwrap();
    let values = vec![vec![a(); 2], vec![a(); 3]];
    let mut nested = vec![vec![a()], vec![a(), a()]];
    kv.pushpull(vec![1u32, 2], &values, &mut nested).unwrap();
    let name = String::from("owned");
    kv.broadcast(&name, &a(), &mut a()).unwrap();
    assert_eq!(
        calls(&kv),
        vec![
            vec!["\"w\"", "\"b\""],
            vec!["\"w\"", "\"b\""],
            vec!["1", "1", "2", "2", "2"],
            vec!["1", "2", "2"],
            vec!["\"owned\""],
        ]
    );
}

#[test]
fn mixed_key_types_in_one_call_are_an_error() {
    let kv = Recorder::default();
    let keys = vec![Key::from(1), Key::from("w")];
    let err = kv.pushpull(keys, &[a(), a()], &mut [a(), a()]).unwrap_err();
    assert!(matches!(err, Error::MixedKeyTypes { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "pushpull: inconsistent types of keys detected: 1 is an int key but \"w\" is a str key"
    );
    assert!(
        calls(&kv).is_empty(),
        "the store was called despite the error"
    );
}

#[test]
fn malformed_argument_lists_are_errors_not_panics() {
    let kv = Recorder::default();
    let empty: [i32; 0] = [];
    let none: [NDArray; 0] = [];
    assert!(matches!(
        kv.pushpull(&empty, &none, &mut Vec::<NDArray>::new()),
        Err(Error::EmptyKeys {
            operation: "pushpull"
        })
    ));
    let err = kv
        .pushpull(&[1, 2, 3], &[a(), a()], &mut [a(), a(), a()])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "pushpull: expected 3 array entries for 3 keys, got 2"
    );
    let err = kv.pushpull(&[1, 2], &[a(), a()], &mut [a()]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CountMismatch {
                expected: 2,
                found: 1,
                ..
            }
        ),
        "{err:?}"
    );
    let err = kv.pushpull(&[1, 2], &a(), &mut [a(), a()]).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let err = kv.broadcast(4, &vec![vec![a()]], &mut a()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(calls(&kv).is_empty());
}

#[test]
fn unsupported_operations_name_the_store_and_operation() {
    let kv = Recorder::default();
    let err = kv.push(1, &a()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "recorder: push is not supported by this kvstore type"
    );
    let err = kv.set_updater_fn(|_, _, _| Ok(())).unwrap_err();
    assert!(matches!(
        err,
        Error::Unsupported {
            operation: "set_updater",
            ..
        }
    ));
    assert!(matches!(kv.barrier(), Err(Error::Unsupported { .. })));
}

#[test]
fn boxed_stores_take_the_same_forms() {
    let kv: Box<dyn KVStoreBase> = Box::new(Recorder::default());
    let mut out = a();
    kv.pushpull("x", &a(), &mut out).unwrap();
    assert!(!kv.is_capable_by_name("Optimizer").unwrap());
    assert!(matches!(
        kv.is_capable_by_name("compression"),
        Err(Error::UnknownCapability(_))
    ));
}

/// Records the priority each batch call receives, by operation.
#[derive(Debug, Default)]
struct PriorityRecorder(Mutex<Vec<(&'static str, i32)>>);

impl PriorityRecorder {
    fn record(&self, operation: &'static str, priority: i32) -> Result<()> {
        self.0.lock().unwrap().push((operation, priority));
        Ok(())
    }
}

impl KVStoreBase for PriorityRecorder {
    fn type_name(&self) -> &str {
        "priority recorder"
    }
    fn rank(&self) -> usize {
        0
    }
    fn num_workers(&self) -> usize {
        1
    }
    fn is_capable(&self, _: Capability) -> bool {
        true
    }
    fn broadcast_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, p: i32) -> Result<()> {
        self.record("broadcast", p)
    }
    fn pushpull_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, p: i32) -> Result<()> {
        self.record("pushpull", p)
    }
    fn pushpull_in_place_batch(&self, _: &mut KeyedOuts<'_>, p: i32) -> Result<()> {
        self.record("pushpull_in_place", p)
    }
    fn push_batch(&self, _: &KeyedValues<'_>, p: i32) -> Result<()> {
        self.record("push", p)
    }
    fn pull_batch(&self, _: &mut KeyedOuts<'_>, p: i32, _: bool) -> Result<()> {
        self.record("pull", p)
    }
    fn row_sparse_pull_batch(&self, _: &mut KeyedOuts<'_>, _: &[&NDArray], p: i32) -> Result<()> {
        self.record("row_sparse_pull", p)
    }
}

#[test]
fn every_calling_form_with_a_priority_passes_it_to_the_store() {
    let kv = PriorityRecorder::default();
    let mut out = a();
    let ids = NDArray::from_vec(&[1], vec![0i64]).unwrap();
    kv.push_with_priority(1, &a(), -1).unwrap();
    kv.pull_with_priority(1, &mut out, -2).unwrap();
    kv.pull_with_options(1, &mut out, -3, false).unwrap();
    kv.pushpull_with_priority(1, &a(), &mut out, -4).unwrap();
    kv.pushpull_in_place_with_priority(1, &mut out, -5).unwrap();
    kv.broadcast_with_priority(1, &a(), &mut out, -6).unwrap();
    kv.row_sparse_pull_with_priority(1, &mut out, &ids, -7)
        .unwrap();
    // The plain forms pass MXNet's default, 0.
    kv.pushpull_in_place(1, &mut out).unwrap();
    kv.broadcast(1, &a(), &mut out).unwrap();
    kv.row_sparse_pull(1, &mut out, &ids).unwrap();
    assert_eq!(
        *kv.0.lock().unwrap(),
        [
            ("push", -1),
            ("pull", -2),
            ("pull", -3),
            ("pushpull", -4),
            ("pushpull_in_place", -5),
            ("broadcast", -6),
            ("row_sparse_pull", -7),
            ("pushpull_in_place", 0),
            ("broadcast", 0),
            ("row_sparse_pull", 0),
        ]
    );
}
