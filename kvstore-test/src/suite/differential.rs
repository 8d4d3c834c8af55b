//! The store under test against [`TestStore`](crate::TestStore), the oracle: random sequences
//! of operations must give the same values on both.

use kvstore_base::{DType, KVStoreExt, Key, NDArray};

use super::util::store;
use super::{Check, CheckResult, Failure, StoreFactory};
use crate::TestStore;

pub(super) const CHECKS: &[Check] = &[
    Check {
        name: "differential_random_pushpulls_match_teststore",
        requires: &[],
        run: random_pushpulls_match_teststore,
    },
    Check {
        name: "differential_random_pushpulls_with_str_keys_match_teststore",
        requires: &[],
        run: random_str_key_pushpulls_match_teststore,
    },
];

/// A small deterministic generator (xorshift64*), so failures reproduce from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Multiples of 1/4 in [-64, 64]: every sum of a few of them is exact in any float dtype,
    /// so the order in which a store adds them cannot matter.
    fn array(&mut self, shape: &[usize], dtype: DType) -> NDArray {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n)
            .map(|_| (self.below(513) as f64 - 256.0) / 4.0)
            .collect();
        NDArray::from_vec(shape, data).expect("shape").astype(dtype)
    }
}

const SHAPES: [&[usize]; 4] = [&[3], &[2, 3], &[1], &[4, 1, 2]];
const DTYPES: [DType; 3] = [DType::F32, DType::F64, DType::F16];

fn run_sequence(factory: &StoreFactory, keys: Vec<Key>, seed: u64) -> CheckResult {
    let kv = store(factory)?;
    let oracle = TestStore;
    let mut rng = Rng(seed);
    // Dtypes the store may refuse ([`allow_refused_dtypes`](crate::allow_refused_dtypes)) are
    // left out.
    let dtypes: Vec<DType> = DTYPES
        .iter()
        .copied()
        .filter(|&d| !super::may_refuse(d))
        .collect();
    let layout: Vec<(&[usize], DType)> = keys
        .iter()
        .map(|_| {
            (
                SHAPES[rng.below(SHAPES.len())],
                dtypes[rng.below(dtypes.len())],
            )
        })
        .collect();
    let compare = |step: &str, got: &[NDArray], want: &[NDArray]| -> CheckResult {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            if g != w {
                return Err(Failure(format!(
                    "seed {seed}, {step}, output {i}: store gave {:?}, teststore gave {:?}",
                    g.to_f64_vec(),
                    w.to_f64_vec()
                )));
            }
        }
        Ok(())
    };

    // Every key starts with a broadcast (which also initialises it in stores that keep values).
    for (key, &(shape, dtype)) in keys.iter().zip(&layout) {
        let value = rng.array(shape, dtype);
        let mut got = vec![NDArray::zeros(shape, dtype); 2];
        let mut want = got.clone();
        kv.broadcast(key, &value, &mut got)?;
        oracle.broadcast(key, &value, &mut want)?;
        compare(&format!("broadcast of key {key}"), &got, &want)?;
    }

    for round in 0..40 {
        let mut chosen: Vec<usize> = (0..keys.len()).filter(|_| rng.below(2) == 0).collect();
        if chosen.is_empty() {
            chosen.push(rng.below(keys.len()));
        }
        let call_keys: Vec<Key> = chosen.iter().map(|&k| keys[k].clone()).collect();
        let values: Vec<Vec<NDArray>> = chosen
            .iter()
            .map(|&k| {
                let (shape, dtype) = layout[k];
                (0..1 + rng.below(5))
                    .map(|_| rng.array(shape, dtype))
                    .collect()
            })
            .collect();
        let step = format!("round {round}, keys {call_keys:?}");
        if rng.below(3) == 0 {
            let mut got = values.clone();
            let mut want = values.clone();
            kv.pushpull_in_place(&call_keys, &mut got)?;
            oracle.pushpull_in_place(&call_keys, &mut want)?;
            compare(&step, &got.concat(), &want.concat())?;
        } else {
            let outs: Vec<Vec<NDArray>> = chosen
                .iter()
                .map(|&k| vec![NDArray::zeros(layout[k].0, layout[k].1); 1 + rng.below(3)])
                .collect();
            let (mut got, mut want) = (outs.clone(), outs);
            kv.pushpull(&call_keys, &values, &mut got)?;
            oracle.pushpull(&call_keys, &values, &mut want)?;
            compare(&step, &got.concat(), &want.concat())?;
        }
    }
    Ok(())
}

fn random_pushpulls_match_teststore(factory: &StoreFactory) -> CheckResult {
    for seed in [1, 0x5eed, 0xdead_beef] {
        run_sequence(factory, (0..6).map(|k| Key::from(k * 7)).collect(), seed)?;
    }
    Ok(())
}

fn random_str_key_pushpulls_match_teststore(factory: &StoreFactory) -> CheckResult {
    let keys = ["embedding", "fc1_weight", "fc1_bias", "out"];
    run_sequence(factory, keys.iter().map(|&k| Key::from(k)).collect(), 42)
}
