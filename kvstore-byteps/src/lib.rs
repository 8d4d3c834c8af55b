//! # kvstore-byteps: the `byteps` store
//!
//! A worker store built on BytePS's design (OSDI'20, `bytedance/byteps`): the servers are a
//! **summation service** that only adds the workers' pushes, every worker runs the optimizer
//! itself on the summed gradients, and tensors are cut into **partitions** spread over the
//! servers and sent in **priority** order under **credit-based flow control**.
//!
//! It speaks the dist stores' protocol ([`kvstore_dist::protocol`]) to the same servers
//! ([`kvstore_dist::ParamServer`], `kvstore server`): a job is a scheduler, S servers and W
//! workers configured by the `DMLC_*` variables and started by `kvstore launch` (or
//! [`kvstore_dist::LocalCluster`] in one process), whose workers create `byteps` instead of
//! `dist_sync`. A sync dist server without an optimizer *is* a summation service: one push per
//! worker per round, the sum stored, pulls after a push answered once the round is complete.
//! Like BytePS's IPC between co-located processes, a worker moves big partitions to and from
//! the servers of its own host through shared memory (see below).
//!
//! ```no_run
//! use kvstore_base::{create, DType, KVStoreExt, NDArray};
//! use kvstore_byteps as _; // links the crate, whose registration provides `byteps`
//!
//! // DMLC_ROLE=worker DMLC_PS_ROOT_URI=... DMLC_PS_ROOT_PORT=... DMLC_NUM_SERVER=2
//! // DMLC_NUM_WORKER=2 BYTEPS_SCHEDULING_CREDIT=4
//! let kv = create("byteps")?; // blocks until every node has joined
//! let mut sum = NDArray::zeros(&[1024, 1024], DType::F32);
//! kv.init("fc1.weight", &sum)?; // declares the tensor (rank 0's value is kept)
//! let grad = NDArray::ones(&[1024, 1024], DType::F32);
//! kv.pushpull_with_priority("fc1.weight", &grad, &mut sum, -1)?; // 2.0 with 2 workers
//! # Ok::<(), kvstore_base::Error>(())
//! ```
//!
//! ## What maps to what
//!
//! | BytePS | here |
//! |---|---|
//! | `byteps_declare_tensor`, declaration order | `init` (or a first `broadcast`) declares a key; the `d`th declared tensor's partition `i` has the key `(d << 16) + i` (so every worker must declare the same keys in the same order: from one thread, or in an order the threads agree on; two threads declaring at once take numbers one after the other) |
//! | `BYTEPS_PARTITION_BYTES` (default 4,096,000) | the same variable or create option; rounded down to whole elements ([`partition`]) |
//! | `BYTEPS_KEY_HASH_FN=djb2` | partition key `k` lives on server `djb2(decimal string of k) mod S` ([`partition::server_of`]) |
//! | `BYTEPS_SCHEDULING_CREDIT` (default 0: off) | the same; else at most `credit × partition bytes` of pushes unacknowledged, higher `priority` first, then lower partition key ([`schedule`]) |
//! | `push_pull(tensor, priority, is_average=False)` | `pushpull` (and `push`, `pull`): the sum over workers, not the average; a worker's per-device values are summed on the worker first |
//! | `broadcast_parameters(root_rank=0)` | `broadcast`: declares new keys, then a push-pull where every rank but 0 pushes zeros; with `BYTEPS_ENABLE_ASYNC=1` (servers that add every push) it declares the keys and pulls rank 0's value, and refuses a key already declared (no push could replace its value), naming it |
//! | `BYTEPS_ENABLE_ASYNC=1` | the servers add each push into the stored value at once (workers push weight deltas and pull weights), see below |
//! | `BYTEPS_ENABLE_IPC` (shared memory with co-located servers) | on by default: the dist stores' `KVSTORE_SHM` (0: TCP only), `KVSTORE_SHM_BYTES`, `KVSTORE_SHM_DIR`, see below |
//! | server: `COPY_FIRST`, `SUM_RECV`, `ALL_RECV`, push acks at once | the dist server's sync rounds: the first push of a round is copied, the others added, pushes acknowledged once merged, pulls answered when the round is complete |
//! | `rank()`, `size()` | `rank()`, `num_workers()` from the cluster |
//! | MXNet 2.x `is_capable(...) → False`, `set_optimizer → NotImplementedError` | `is_capable(Optimizer)` is false and `set_optimizer` is [`Unsupported`](kvstore_base::Error::Unsupported) |
//!
//! Capabilities: [`Distributed`](kvstore_base::Capability::Distributed) and
//! [`InitPushPull`](kvstore_base::Capability::InitPushPull) (MXNet 2.x's BytePS wrapper offers
//! only `broadcast` and `pushpull`; `init`, `push` and `pull` are the same operations split in
//! two, which the servers support).
//!
//! ## A call
//!
//! `pushpull` validates everything, sums each key's device values, then sends every partition
//! of every key: its push (from the caller's memory when it holds a single contiguous value)
//! and, at once behind it on the same connection, its pull, which the server answers when the
//! partition's round is complete. Without scheduling every partition goes out at once, and
//! partitions of up to 64 KiB travel together, one batch per server and MiB (the dist stores'
//! `CMD_BATCH`, answered as a whole), with their pulls in one batch right behind, so that a
//! call of a thousand small tensors costs a few messages, not two thousand
//! ([`BytePsStore::requests_sent`]; `init` batches its declarations the same way); with a
//! credit, a partition's push goes out when the [`schedule::CreditScheduler`] grants it and
//! its grant is released when the server acknowledges the push (an acknowledgement waits for
//! other workers only when the server holds the push, below); small partitions
//! granted at once (in priority order, within the credit) are batched the same way, each
//! batch's grants released when it is acknowledged (when every push in it is: a push the
//! server holds because the same worker's previous push of that partition is still in an
//! unfinished round holds its whole batch's grants, and a worker that pushes a key again before
//! the others pushed it once can then wait for them, until the timeout if they in turn wait
//! for its credit). Answers are written into the outputs, cast to their dtype.
//!
//! ## Shared memory with the servers of the host
//!
//! Right after its hello, a worker lends each server a shared-memory region
//! ([`kvstore_dist::shm::Link`]; a server on another host, `KVSTORE_SHM=0` or any failure
//! leaves that connection on TCP alone, logged at debug level). A partition of more than
//! [`SHM_MIN_BYTES`](worker::SHM_MIN_BYTES) (64 KiB, the dist stores' threshold) then travels
//! through a slot of the region ([`kvstore_dist::shm::Lease`]): its push copies the bytes into
//! a data slot, its pull names a reply slot that the server fills before answering, and the
//! TCP message carries only the slots. A slot is freed once its request is answered (an error
//! message too); a request left unanswered (timeout, lost server) retires the region for good.
//! The credit and the priority order are the same either way: a partition's bytes count
//! against the credit wherever they travel. [`BytePsStore::bytes_sent`] counts TCP bytes only;
//! [`BytePsStore::shm_connections`] tells which connections use shared memory.
//!
//! ## Asynchronous mode
//!
//! With `BYTEPS_ENABLE_ASYNC=1` every worker says hello in async mode and rank 0 installs
//! MXNet's `test` optimizer with `rescale_grad = 1` on every server (`w += g`), so each push is
//! added into the stored value as it arrives and a pull returns the current value: BytePS's
//! asynchronous servers. Partitions of a tensor are declared to the servers under distinct
//! names (`key.partN`) so that the optimizer's per-key state never mixes partitions. Only
//! floating-point dtypes can be pushed in this mode (the optimizer's).
//!
//! ## Deviations from BytePS
//!
//! - One process per worker: its values of a key in GPU memory are summed on a GPU (with
//!   `kvstore-device` linked: one pass of its reduction kernel, not NCCL) and copied to the host
//!   as one array, and a pulled key is copied to one GPU output and from there to the others,
//!   as BytePS's communication service does; no PCIe-switch reduce, no
//!   `BYTEPS_LOCAL_RANK`/`LOCAL_SIZE`; partitions are not rounded up to pages.
//! - TCP (the dist transport) between hosts, no RDMA (`DMLC_ENABLE_RDMA`); shared memory with
//!   the servers of the same host is the dist stores' region, set by `KVSTORE_SHM*` rather
//!   than `BYTEPS_ENABLE_IPC`, and used for big partitions only (small ones go over TCP).
//! - The credit covers the pushes a worker has in flight (BytePS schedules its first pipeline
//!   stage); pulls are not scheduled. Priority only orders concurrent calls of one worker and
//!   the partitions of one call by key.
//! - Small partitions travel in batches (BytePS sends one message per partition); the first
//!   round of a new key is not an "init push": `init` sets rank 0's value.
//! - Servers run the dist server: no `BYTEPS_SERVER_ENGINE_THREAD` pool or server-side
//!   priority; a server sums on the thread of the worker connection that completes the round.
//! - No gradient compression (BytePS's onebit/topk/randomk/dithering compressors), no
//!   `is_average` (the sum is returned: divide on the worker), no elastic resume/suspend.
//! - Other `BYTEPS_KEY_HASH_FN`s (`naive`, `sdbm`, `mixed`) are not offered.
//!
//! ## Modules
//!
//! - [`partition`]: partition keys, sizes and the djb2 placement.
//! - [`schedule`]: the priority queue with credit.
//! - [`worker`]: [`BytePsStore`] and [`BytePsConfig`].
#![deny(missing_docs)]

pub mod partition;
pub mod schedule;
pub mod worker;

pub use worker::{BytePsConfig, BytePsStore};

use kvstore_base::{Capability, CreateRequest, KVStoreBase};

/// The capabilities of the `byteps` store.
const CAPABILITIES: &[Capability] = &[Capability::InitPushPull, Capability::Distributed];

fn create(request: &CreateRequest) -> kvstore_base::Result<Box<dyn KVStoreBase>> {
    Ok(Box::new(BytePsStore::from_request(request)?))
}

kvstore_base::register!(
    "byteps",
    create,
    capabilities = [Capability::InitPushPull, Capability::Distributed]
);
