//! `test`: MXNet 1.x's test optimizer, `w += rescale_grad·g` (no learning rate), with a state
//! array that holds a copy of the weight after each update.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map2, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct Test {
    base: Base,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (p, base) = begin(spec, LrDefault::PassThrough, WEIGHT_OR_GAMMA)?;
    end(p, &[])?;
    Ok(Box::new(Test { base }))
}

register!(
    TEST,
    "test",
    "MXNet's test optimizer: w += rescale_grad * g",
    build
);

impl Test {
    fn kernel<R: Real>(&mut self, _key: &Key, b: Buffers<'_, R>) {
        // MXNet 1.x's Test.update neither counts updates nor reads the learning rate.
        let rescale = R::of(self.base.rescale_grad);
        let (weight, grad, [copy]) = b.split();
        map2(weight, grad, copy, |w, g, _| {
            let w = w + g * rescale;
            (w, w)
        });
    }
}

impl Optimizer for Test {
    common!("test");
    fn state_len(&self) -> usize {
        1
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
