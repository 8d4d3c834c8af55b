//! # kvstore-horovod: the `horovod` store, Horovod's design on TCP between workers
//!
//! MXNet 2.x's `kv.create('horovod')` hands every call to Horovod: `pushpull` is a sum
//! all-reduce across workers, `broadcast` copies rank 0's value to every worker, and there is
//! no server and no optimizer in the store (Gluon's `Trainer` then runs the optimizer on each
//! worker). This crate provides the same store without MPI, NCCL or Gloo: the workers meet at
//! the scheduler of `kvstore-dist` (ranks, the node table, barriers) and exchange tensors over
//! its TCP transport in a ring.
//!
//! ```no_run
//! use kvstore_base::{create, DType, KVStoreExt, NDArray};
//! use kvstore_horovod as _; // links the crate, whose registration provides `horovod`
//!
//! // DMLC_PS_ROOT_URI=... DMLC_PS_ROOT_PORT=... DMLC_NUM_WORKER=2 (DMLC_NUM_SERVER=0 or unset)
//! let kv = create("horovod")?; // blocks until every worker has joined
//! let grad = NDArray::full(&[2, 3], kv.rank() as f64 + 1.0, DType::F32);
//! let mut sum = NDArray::zeros(&[2, 3], DType::F32);
//! kv.pushpull(3, &grad, &mut sum)?; // 1 + 2 = 3.0 everywhere with 2 workers
//! # Ok::<(), kvstore_base::Error>(())
//! ```
//!
//! ## Operations
//!
//! | operation | horovod store |
//! |---|---|
//! | `pushpull` | sum all-reduce (`hvd.allreduce(average=False)`, named `str(key)`); a worker's values for one key (one per device) are summed locally first (on a GPU when they are in GPU memory and `kvstore-device` is linked; one array per key goes through the ring), and the total lands in every output of the key (copied to one GPU output, then GPU to GPU) |
//! | `broadcast` | rank 0's value into every output, on every worker (`hvd.broadcast(root_rank=0)`) |
//! | `barrier` | every worker (the scheduler's barrier) |
//! | `rank`, `num_workers` | the worker's rank and the number of workers (`hvd.rank()`, `hvd.size()`) |
//! | `set_gradient_compression` | Horovod's `Compression.fp16` (`{"type": "fp16"}`; `{"type": "none"}` turns it off): every later `pushpull` sends its `float32`, `float64` and `bfloat16` gradients through the ring as `float16`, summed in `float16` (each addition rounded, as Horovod's), and casts the result into the outputs' dtype; half the bytes of `float32` on the ring. Every worker must set the same (a key sent as `float16` by some workers only fails, naming its dtypes). MXNet's `2bit` and `1bit` are [`Error::Unsupported`](kvstore_base::Error::Unsupported) (their codes are summed by servers that dequantise); `broadcast` is never compressed |
//! | `init`, `push`, `pull`, `set_optimizer`, `set_updater`, optimizer states, row-sparse pull, commands to servers | [`Error::Unsupported`](kvstore_base::Error::Unsupported): the store keeps no values and runs no optimizer |
//!
//! `is_capable` is true for [`Capability::Distributed`] only (`gradient_compression` stays
//! false: it means MXNet's codecs). MXNet's horovod store says false to everything, and its
//! `set_optimizer` silently does nothing; here it is an error, so that a caller never believes
//! an optimizer runs. Priorities are accepted and ignored.
//!
//! ## How Horovod's features map
//!
//! - **Ring all-reduce** ([`ring`]): reduce-scatter then all-gather over `n` chunks, `2 (n - 1)`
//!   steps; each worker sends `2 (n - 1) / n` of the tensor to the next rank and receives as
//!   much from the previous one, whatever `n`. Sums are computed in the tensor's dtype (half
//!   types through `f32`, integers wrapping), each element once on one rank, so every worker
//!   gets bit-identical results. Any size works, including sizes not divisible by `n` and 0.
//! - **Coordinator** ([`coordinator`]): rank 0 collects, from every rank, the tensors it is
//!   ready to reduce (name, operation, dtype, shape), keeps them across cycles, finds those
//!   ready on every rank, and sends every rank the same numbered list of operations: ranks
//!   never wait on each other in different orders, whatever order, calls or threads their
//!   keys came in. Mismatched dtypes, shapes or operations fail the tensor, and so the call
//!   that holds it, on every rank that submitted it.
//! - **Cycles** (`HOROVOD_CYCLE_TIME`, 1 ms by default as in current Horovod, fractions
//!   allowed, `0`: no waiting): a store is shared by the threads of a worker, which may call it
//!   at the same time, as MXNet's engine issues Horovod operations. Their tensors are queued;
//!   one waiting thread at a time leads a cycle: it waits until the cycle time has passed
//!   since the previous cycle started, submits everything queued (a tensor whose name is
//!   already in flight stays queued for a later cycle) to the coordinator in one submission,
//!   runs the groups it answers and hands each thread its results. A tensor still waiting for
//!   other ranks does not hold up the tensors queued after it: the next cycle goes out anyway.
//!   [`HorovodStore::cycles`] and [`HorovodStore::ring_operations`] count cycles and ring
//!   operations.
//! - **Tensor fusion**: tensors ready together of one dtype and operation, from any calls of
//!   any threads, are grouped up to `HOROVOD_FUSION_THRESHOLD` bytes (64 MiB by default,
//!   Horovod's default in the releases MXNet 2.x used; `0` turns fusion off) and reduced as
//!   one ring operation: 1000 small keys, in one call or in calls of several threads within
//!   a cycle, cost a few ring passes, not 1000. A group is one buffer to the ring, but not a
//!   copy: tensors of 256 KiB or more take part in place (the ring sends from and adds into
//!   their own memory, in pieces of at most 1 MiB that never cross a tensor's end), and each
//!   run of smaller ones is packed into one staging buffer, which is what saves messages.
//! - **Errors stay with their call**: a failed tensor (mismatch, stall) fails the call that
//!   holds it, with an error naming its key, and no other call; a failed ring operation fails
//!   the calls whose tensors were in it. A call returns once every tensor of it is done or
//!   failed, and writes its outputs only when all are done.
//! - **Stall inspector**: a tensor submitted by some ranks and not by the others is logged
//!   as a warning after `HOROVOD_STALL_CHECK_TIME_SECONDS` (60 s; `HOROVOD_STALL_CHECK_DISABLE`
//!   turns it off), as Horovod's is, and fails on the ranks that submitted it after
//!   `HOROVOD_STALL_SHUTDOWN_TIME_SECONDS` (default: the store's `KVSTORE_TIMEOUT_SECS`,
//!   600 s), with an error naming the tensor (the key) and, for each missing rank, the stalled
//!   tensors it did not submit, instead of hanging. A missing rank that submits it later
//!   fails at once with the same error.
//!
//! ## Deviations from Horovod
//!
//! - No MPI, NCCL or Gloo: a TCP ring between the workers' advertised addresses, on CPU
//!   memory. No hierarchical all-reduce, no response cache, no autotuning, no Adasum,
//!   allgather or alltoall.
//! - fp16 compression is a setting of the store (`set_gradient_compression`), where Horovod
//!   takes it as an argument of its `DistributedTrainer`; the cast happens inside the store.
//! - No background thread: the calling threads lead the cycles themselves, one at a time, so
//!   an idle worker sends nothing. Instead of a message exchange every cycle, a worker with
//!   tensors in flight keeps one submission held at rank 0, answered as soon as groups or
//!   failures are there for it (or at once when its next cycle supersedes it).
//! - A worker does not refuse a tensor whose name is already in flight (Horovod raises an
//!   error): it is queued until the first one is done.
//! - The stall inspector ends the stalled call with an error after the timeout where Horovod,
//!   unless `HOROVOD_STALL_SHUTDOWN_TIME_SECONDS` is set, waits forever (its `0`, "never", is
//!   the timeout here). The cycle time must therefore be shorter than that.
//!
//! ## Running a job
//!
//! The variables are those of the dist stores (see [`config`]), with `DMLC_NUM_SERVER` `0` or
//! unset. [`LocalJob`] runs a scheduler without servers in this process; `kvstore launch -n 4
//! -s 0 -- PROGRAM` runs a job on this machine. A job launched with servers works too (`-s
//! 1`): the servers are greeted by every worker and stay idle until they leave. As with the
//! dist stores, a process whose
//! `DMLC_ROLE` is `server` or `scheduler` that creates the store runs that role and exits when
//! the job ends.
#![deny(missing_docs)]

pub mod config;
pub mod coordinator;
mod local;
pub mod ring;
mod store;
pub mod wire;

pub use config::HorovodConfig;
pub use local::LocalJob;
pub use store::HorovodStore;

use kvstore_base::{Capability, CreateRequest, KVStoreBase};
use kvstore_dist::Role;

fn create(request: &CreateRequest) -> kvstore_base::Result<Box<dyn KVStoreBase>> {
    let config = HorovodConfig::from_request(request)?;
    match config.dist.role {
        Role::Worker => Ok(Box::new(HorovodStore::connect(&request.name, &config)?)),
        Role::Server => {
            let status = match kvstore_dist::run_server(&config.dist) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("kvstore server: {e}");
                    1
                }
            };
            std::process::exit(status)
        }
        Role::Scheduler => {
            let status = match kvstore_dist::Scheduler::start(&config.dist).and_then(|s| s.join()) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("kvstore scheduler: {e}");
                    1
                }
            };
            std::process::exit(status)
        }
    }
}

kvstore_base::register!("horovod", create, capabilities = [Capability::Distributed]);
