//! # kvstore-optimizer: MXNet's optimizers and updater
//!
//! The optimizers, learning-rate schedulers and `Updater` of Apache MXNet 1.9.1, rebuilt by
//! name from a serialisable [`OptimizerSpec`](kvstore_base::OptimizerSpec), so a store (or a
//! parameter server across the network) can run the same update rule a worker asked for.
//!
//! ```
//! use kvstore_base::{DType, Key, NDArray, OptimizerSpec};
//! use kvstore_optimizer::Updater;
//!
//! let spec = OptimizerSpec::new("adam").with("learning_rate", 0.01).with("wd", 1e-4);
//! let mut updater = Updater::from_spec(&spec)?;
//! let mut weight = NDArray::ones(&[3, 4], DType::F32);
//! let grad = NDArray::full(&[3, 4], 0.5, DType::F32);
//! updater.update(&Key::from(0), &grad, &mut weight)?;
//! let bytes = updater.save_states(true)?;
//! let mut resumed = Updater::from_spec(&OptimizerSpec::new("sgd"))?;
//! resumed.load_states(&bytes)?; // now an adam updater with the saved state
//! assert_eq!(resumed.optimizer().name(), "adam");
//! # Ok::<(), kvstore_base::Error>(())
//! ```
//!
//! ## Optimizers
//!
//! [`optimizer_names`] lists them: `adadelta`, `adagrad`, `adam`, `adamax`, `adamw`, `ccsgd`
//! (MXNet 1.x's deprecated name for `sgd`), `dcasgd`, `ftml`, `ftrl`, `groupadagrad`, `lamb`,
//! `lars`, `nadam`, `nag`, `rmsprop`, `sgd`, `signum`, `test`. Each module's docs give its
//! formula and hyper-parameters (MXNet's names and defaults). Every optimizer also takes the
//! base parameters:
//!
//! | name               | meaning (default)                                                     |
//! |--------------------|-----------------------------------------------------------------------|
//! | `learning_rate`    | the rate (0.01 for sgd-like optimizers when no scheduler is given; adam, nadam, rmsprop, lamb, adamw 0.001; adamax 0.002; ftrl 0.1) |
//! | `lr_scheduler`     | a map describing a scheduler, see [`LrScheduler`]                     |
//! | `wd`               | weight decay (0)                                                      |
//! | `rescale_grad`     | gradient multiplier (1)                                               |
//! | `clip_gradient`    | clip the (rescaled) gradient to `±clip_gradient` (off; 0 is off)      |
//! | `begin_num_update` | the first update count (0)                                            |
//! | `multi_precision`  | keep an `f32` master copy of `float16`/`bfloat16` weights (false)     |
//! | `lr_mult`, `wd_mult` | maps from a key (its integer as text, or the string key) or a parameter name to a multiplier |
//! | `param_idx2name`   | map from a key to a parameter name; names not ending in `_weight` or `_gamma` get `wd_mult` 0 (`_weight` only for lars) |
//! | `lazy_update`      | with a row-sparse gradient, only its rows change (true); taken by `sgd`, `ccsgd`, `adam` and `lars`, as in MXNet (the others accept and ignore it); dense gradients are the same either way |
//!
//! Update counting follows MXNet: each update of a key first increments the key's count
//! (starting from `begin_num_update`) and sets `num_update` to the largest count, then
//! computes the learning rate, so the first update uses `num_update = 1`.
//!
//! A row-sparse gradient of a dense weight is applied as MXNet 1.9.1 applies it (details in
//! [`Updater::update`] and the optimizers' docs): lazily, changing only the gradient's rows
//! of the weight, its master copy and the state, with MXNet's sparse kernels, by `sgd` and
//! `ccsgd` (with `lazy_update`, without `multi_precision`), `nag` without momentum, `adam`
//! (with `lazy_update`), `lars` (likewise), `adagrad` (which then refuses weight decay, as
//! MXNet does) and `groupadagrad`; every row, with the arithmetic of MXNet's standard
//! row-sparse kernels, by `adam` and by `sgd` without momentum with `lazy_update` false, and
//! by `lars` then or with `multi_precision`; as the dense array it stands for by every other
//! optimizer and in every other case.
//!
//! Weights of dtype `float32` and `float64` are updated in their own precision; `float16` and
//! `bfloat16` weights either in 16-bit arithmetic that rounds each operation (as MXNet's
//! `half_t` kernels do) or, with `multi_precision`, on an `f32` master copy kept in the state.
//! Like MXNet's kernels, hyper-parameters reach the arithmetic as `float` values.
//! Integer weights are an error.
//!
//! ## State file format (version 1)
//!
//! [`Updater::save_states`] writes, all integers little-endian:
//!
//! | field | encoding |
//! |-------|----------|
//! | magic | the 8 bytes `KVSOPTST` |
//! | version | `u32`, currently 1 |
//! | flags | `u32`; bit 0: an optimizer section follows |
//! | optimizer section | name (*string*), hyper-parameters (*map*), run-time state (*map*: `num_update`, `lr`, the scheduler with its position, optimizer extras) |
//! | key count | `u64` |
//! | per key | key (`u8` 0 + `i64`, or `u8` 1 + *string*); update count (`u8` 0, or `u8` 1 + `u64`, written with the optimizer section); master weight (`u8` 0, or `u8` 1 + *array*); `u32` number of state arrays, then each *array* |
//! | checksum | `u32` CRC-32 (IEEE, as zlib) of every byte before it |
//!
//! *string*: `u32` byte length + UTF-8. *array*: `u8` dtype (0 f32, 1 f64, 2 f16, 3 bf16,
//! 4 i32, 5 i64, 6 u8), `u32` rank, one `u64` per dimension, then the elements in row-major
//! order. *map*: `u32` count + (*string*, *value*) pairs; *value*: `u8` tag then 0 bool (`u8`),
//! 1 int (`i64`), 2 float (`f64` bits), 3 *string*, 4 list (`u32` count + *values*), 5 *map*.
//!
//! [`Updater::load_states`] checks magic, version and checksum before parsing, and every
//! length against the bytes left, so a foreign, truncated or damaged file is an
//! [`Error::InvalidArgument`](kvstore_base::Error::InvalidArgument), never a panic.
#![deny(missing_docs)]

mod base;
mod optimizer;
mod optimizers;
mod params;
mod real;
mod registry;
mod schedule;
pub mod sliced;
mod state_file;
mod updater;

pub use base::Base;
pub use optimizer::{Buffers, Optimizer, RowSparse, Slices, StateInit};
pub use real::{BHalf, Half};
pub use registry::{create, optimizer_names, OptimizerEntry, OPTIMIZERS};
pub use schedule::{LrScheduler, WarmupMode};
pub use updater::{check_weight_dtype, Updater};
