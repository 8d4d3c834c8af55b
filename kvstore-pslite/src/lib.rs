//! # kvstore-pslite: MXNet 1.9.1's wire protocol, both ways
//!
//! This crate speaks ps-lite's wire protocol as MXNet 1.9.1 builds it (ZeroMQ's ZMTP 3 over
//! TCP, a protobuf header per message), in both directions:
//!
//! - `pslite_dist_sync`, a worker store, joins a `dist_sync` job whose **scheduler and servers
//!   are MXNet's**, beside MXNet's own Python workers or alone: the way to move a job to Rust
//!   one worker at a time, or to feed an MXNet parameter server from Rust.
//!   `pslite_dist_async` joins a `dist_async` job so (see "Async" below).
//! - [`scheduler`] and [`server`] are a ps-lite scheduler and server in Rust: **MXNet's own
//!   Python workers**, unchanged, and this crate's run on them. The optimizer a Python worker
//!   sets (`kv.set_optimizer`, a pickle) is read as data ([`pickle`]), never run, and rebuilt
//!   by name from `kvstore-optimizer`: MXNet's `SGD` and `Adam` give the weights MXNet's own
//!   servers give, bit for bit. A process whose
//!   `DMLC_ROLE` is `scheduler` or `server` that creates `pslite_dist_sync` runs that role and
//!   exits ([`worker::run_role`]; the `kvstore` command's `pslite-scheduler` and
//!   `pslite-server` run them, and `kvstore launch --pslite` starts a whole job on them);
//!   [`LocalJob`] runs both on threads, for tests.
//!
//! ```no_run
//! use kvstore_base::{create, DType, KVStoreExt, NDArray};
//! use kvstore_pslite as _; // links the crate, whose registration provides the store
//!
//! // DMLC_ROLE=worker DMLC_PS_ROOT_URI=10.0.0.1 DMLC_PS_ROOT_PORT=9091
//! // DMLC_NUM_SERVER=2 DMLC_NUM_WORKER=4, the scheduler and servers started by MXNet:
//! // DMLC_ROLE=server python -c 'import mxnet'
//! let kv = create("pslite_dist_sync")?; // blocks until every node has registered
//! let mut weight = NDArray::zeros(&[1024, 1024], DType::F32);
//! kv.init(3, &weight)?; // rank 0's value is kept, as in MXNet
//! let grad = NDArray::ones(&[1024, 1024], DType::F32);
//! kv.push(3, &grad)?; // returns once every worker pushed key 3 this round
//! kv.pull(3, &mut weight)?; // the sum of the round's pushes (no optimizer on the servers)
//! # Ok::<(), kvstore_base::Error>(())
//! ```
//!
//! ## What it does as MXNet's worker does
//!
//! - **Joining** ([`van`]): registers with the scheduler (`ADD_NODE`), takes the id and rank
//!   the scheduler assigns (not `DMLC_WORKER_ID`), links to the scheduler and every server,
//!   and meets every node in the start-up barrier; rank 0 then puts the servers in sync mode
//!   (`kSyncMode`), as `mx.kv.create('dist_sync')` does.
//! - **Keys** ([`encoding`]): MXNet's int keys, placed as `EncodeDefaultKey` places them
//!   (whole on server `(key · 9973) mod S` below `MXNET_KVSTORE_BIGARRAY_BOUND` elements, else
//!   cut into one slice per server); string keys numbered 0, 1, 2, ... in the order of their
//!   `init`, as MXNet's worker numbers them (so every worker must init them in the same
//!   order, and one worker does not mix string and int keys).
//! - **`init`**: rank 0 pushes the values (a server takes a key's first push as its value),
//!   then the workers meet in a barrier. **`push`**: a worker's values of a key are summed
//!   first (in MXNet's association order), then one request per slice; it returns when the
//!   servers acknowledge, that is once every worker pushed the key this round.
//!   **`pull`**: one request per slice, answered from the stored value. **`pushpull`**: one
//!   `ZPushPull` per slice, answered with the round's result. **`broadcast`**: `init`, then
//!   `pull`. **`barrier`**: the workers' barrier. Keys of float32 and float16 (the dtype goes
//!   in the command word of each message).
//! - **Gradient compression** (`set_gradient_compression`, MXNet 1.9.1's `2bit`): every
//!   worker sets it before its keys' `init` (as Gluon's `Trainer` does; rank 0 sends the
//!   servers `kSetGradientCompression`). Keys are then laid out as `EncodeCompressedKey` lays
//!   them out (a big key cut in whole 32-bit words of 16 elements), a push is quantised against
//!   the key's residual on this worker (error feedback; after summing the worker's values) and
//!   travels as a compressed request, 16x smaller; the servers dequantise and sum. `init` and
//!   pulls stay uncompressed, as in MXNet.
//! - **Row-sparse keys** (`worker::rows`): a key initialised with a row-sparse value is kept
//!   by rows, laid out as `EncodeRowSparseKey` lays it out (a big key cut across the servers by
//!   rows); `init` sends every row, a push sends the rows of the worker's summed values (every
//!   server a message, with no rows when it holds none of them), `row_sparse_pull` asks each
//!   server for its rows among the unique sorted ids, and `pull` for every row. A push needs
//!   an optimizer set on this worker (MXNet's servers corrupt the value without one; set it on
//!   every worker, since a worker whose push is refused leaves the others' round waiting), and
//!   compression, `pushpull` and rows pushed to a key initialised dense are refused, naming
//!   the key. The rows pulled equal a Python worker's, bit for bit.
//! - **The end**: dropping the store is MXNet's exit: the workers meet, rank 0 stops the
//!   servers (`kStopServer`), and every node meets in the last barrier.
//!
//! ## Async: `pslite_dist_async`
//!
//! As `mx.kv.create('dist_async')`: rank 0 does not put the servers in sync mode, so each
//! push is applied on its own as it arrives, through the optimizer the workers set, and its
//! acknowledgement comes once it is applied; a pull returns the value as the pushes that
//! arrived before it left it. Everything else (keys, `init`, compression, the end) is the
//! sync worker's. MXNet 1.9.1's servers abort on a push in async mode when no optimizer was
//! set ("Updater needs to be set for async mode"), so this store refuses a push or `pushpull`
//! before this worker has set one (`set_optimizer`, or a `kController` command), naming the
//! key; every MXNet worker sets it so (Gluon's `Trainer` does). Set it on every worker, then
//! meet in a barrier, before the first push: a later `set_optimizer` (of any worker) replaces
//! the servers' optimizer and its state, as in MXNet.
//!
//! ## Where it differs
//!
//! - **`set_optimizer`** sends MXNet's servers a pickle they turn into MXNet's own optimizer:
//!   `functools.partial(mxnet.optimizer.optimizer.SGD, learning_rate=..., ...)()` (data this
//!   store writes from the spec, [`pickle::mxnet_optimizer_pickle`]; this crate's servers read
//!   it back as the spec). Every worker that calls it sends it, as MXNet's do. Refused: what
//!   MXNet's constructors do not take (`adamw`, which 1.9.1 lacks; `lr_mult`/`wd_mult`; a
//!   scheduler's saved state). Without an optimizer a sync server stores the sum of each
//!   round's pushes.
//! - Not offered: optimizer states, recovery of a lost worker, heartbeats (`PS_HEARTBEAT_INTERVAL` is off
//!   by default in MXNet too) and the resender (`PS_RESEND`).
//! - **Compression, where MXNet fails**: MXNet's worker aborts on a compressed key that is not
//!   float32 and on a `pushpull` with compression, and has no 1-bit codec: this store refuses
//!   each with an error naming the key. Compression set after an `init` is refused, naming the
//!   key: only rank 0 tells the servers, so a worker could push compressed before they have
//!   the codec, and a key cut across the servers would lie on them otherwise than compressed
//!   pushes cut it (MXNet's servers abort on either).
//! - Every wait is bounded by `KVSTORE_TIMEOUT_SECS` (600 s by default) and ends in an error
//!   naming the server, the scheduler or the barrier it waited for; a server whose connection
//!   closes fails the requests waiting for it at once. MXNet's worker waits forever.
//! - **dtypes**: MXNet 1.9.1's server aborts (taking the job down) on a push of an integer
//!   dtype ("This operation only support floating point types"), and holds a float64 key as
//!   float32, so that its values silently lose precision: `init` of such a key is
//!   [`Unsupported`](kvstore_base::Error::Unsupported), naming why.
//! - A small key whose 32-bit hash wraps to a negative server (some keys above 215,329),
//!   which crashes MXNet's worker, is placed on the non-negative remainder; a key outside 32
//!   bits and a slice of more than 2 GiB (ps-lite's lengths are 32-bit) are errors naming the
//!   key.
//! - **Calls of one round**: an MXNet 1.9.1 server never acknowledges a plain `push` in a
//!   round (of a key) where another worker used `pushpull`, so every worker must use the same
//!   call for a key in a round (MXNet's own Python workers hang the same way; this one fails
//!   after `KVSTORE_TIMEOUT_SECS`, naming the server).
//! - Messages larger than `KVSTORE_MAX_MESSAGE_BYTES` (4 GiB) are refused, and a message's
//!   memory grows with the bytes that arrive, not with the sizes its frames announce.
//! - Negative int keys are refused (their ps-lite key would fall in another server's range).
//!
//! The configuration is the dist stores' (`DMLC_PS_ROOT_URI`, `DMLC_PS_ROOT_PORT`,
//! `DMLC_NUM_SERVER`, `DMLC_NUM_WORKER`, `DMLC_NODE_HOST`/`DMLC_INTERFACE`, `PORT`,
//! `KVSTORE_BIND_HOST`, `MXNET_KVSTORE_BIGARRAY_BOUND`, `KVSTORE_TIMEOUT_SECS`,
//! `KVSTORE_MAX_MESSAGE_BYTES`, `KVSTORE_CONFIG`), from the environment or the create options.
//! `DMLC_NUM_WORKER` counts every worker of the job, MXNet's and this crate's.
//!
//! ## The scheduler and the server
//!
//! As ps-lite's scheduler: ids in the order of registration, the node table to every node, a
//! barrier released once every node of its group entered it; the job ends with every node's
//! second barrier. As MXNet's `KVStoreDistServer`:
//!
//! - a key's first push is its value; a sync round (after `kSyncMode`) sums one push per
//!   worker, in arrival order as MXNet's server does (in float32 for float16 keys once a
//!   worker sent `kSetMultiPrecision`), applies the optimizer a worker set (`kController`) or
//!   else stores the sum, and answers them all (`pushpull`s with the value); async mode applies
//!   the optimizer to each push (or stores it); a pull is answered with the value at once; a
//!   worker's second push in a round waits for the next round (MXNet's counts it as another
//!   worker's);
//! - once a worker set 2-bit compression, compressed pushes are dequantised into the round's
//!   sum;
//! - row-sparse keys ([`server::rows`]): initialised with every row, then pushed and pulled by
//!   rows (`row_sparse_pull`); the optimizer steps the value with the round's rows.
//!
//! Unlike MXNet's:
//!
//! - the optimizer's pickle is read as data, and a pickle that calls anything but an object's
//!   reconstruction, or an object that is not one of MXNet's optimizers, stops the server with
//!   an error naming it (never run; an MXNet Python worker that sent it then waits in ps-lite,
//!   as for any server that dies);
//! - every dtype is summed exactly in its own type; a plain push in a round with a `pushpull`
//!   is acknowledged; in async mode without an optimizer each push replaces the value (a push
//!   of rows: the rows it lacks become zeros), where MXNet's server aborts;
//! - a row-sparse init that lacks rows is refused, naming them (MXNet's keeps them as the
//!   first rows), and without an optimizer a round's rows replace the value, the other rows
//!   becoming zeros (MXNet's reads its sparse sum as if it held every row);
//! - registration and barriers give up after `KVSTORE_TIMEOUT_SECS`, naming who is missing;
//!   requests from nodes that are not workers of the job are ignored; a sync round waiting for
//!   a worker that left ends the server with an error naming it, as does one that waited
//!   `KVSTORE_TIMEOUT_SECS` for a live worker's push (naming the key and the worker; a
//!   warning is logged after a tenth of that, at most 60 s); a message over 16 frames, a push
//!   whose lengths frame disagrees with its values (as MXNet's server checks) and a pickle of
//!   more than 4 Mi references are refused, as is a sync round's push seen twice (ps-lite's
//!   `PS_RESEND`, which needs ACKs this crate does not send); a worker's second push of a key
//!   in one sync round waits for the next round (MXNet's server counts it as another
//!   worker's); a node keeps at most 4096 incoming connections
//!   ([`van::MAX_CONNECTIONS`]), gives each 10 s for its handshake, refuses headers over
//!   16 MiB + 64 KiB, and holds at most 1 GiB of requests unread, past which the connections
//!   bringing more wait (ZeroMQ's high-water mark does that for MXNet); a node table that does not
//!   number the nodes as ps-lite does is refused; every worker gone ends the scheduler,
//!   naming them; a late `ADD_NODE` is logged and ignored; a barrier waiting for a node
//!   that left, or a server that left, ends the scheduler so (this crate's nodes then fail at
//!   once; MXNet's Python workers wait in ps-lite, as for any scheduler that dies, unless
//!   `kvstore launch` ends them; MXNet's scheduler and servers wait forever).
//!
//! Not served: optimizer states (`save_optimizer_states` of a Python worker), an optimizer
//! that already made updates.
//!
//! ## Modules
//!
//! - [`zmtp`]: ZMTP 3.1 (greeting, `READY`, frames), DEALER to ROUTER.
//! - [`meta`]: ps-lite's protobuf header, encoded and decoded by hand.
//! - [`van`]: the node: registration, links, barriers, requests and responses.
//! - [`encoding`]: MXNet's key placement (uncompressed and compressed) and command words.
//! - [`worker`]: [`PsLiteStore`], the `KVStoreBase` (its compressed pushes and its row-sparse
//!   keys in modules of their own), and [`worker::run_role`].
//! - [`scheduler`], [`server`]: the scheduler and the server (its row-sparse requests in
//!   [`server::rows`]); [`local`]: [`LocalJob`].
#![deny(missing_docs)]

pub mod encoding;
pub mod local;
pub mod meta;
pub mod pickle;
pub mod scheduler;
pub mod server;
pub mod van;
pub mod worker;
pub mod zmtp;

pub use local::LocalJob;
pub use worker::PsLiteStore;

use kvstore_base::{Capability, CreateRequest, KVStoreBase};

/// The sync worker's name (`dist_sync`'s semantics).
pub const NAME: &str = "pslite_dist_sync";

/// The async worker's name (`dist_async`'s semantics; see the crate docs).
pub const ASYNC_NAME: &str = "pslite_dist_async";

/// The dtypes whose keys the store refuses at `init`
/// ([`Unsupported`](kvstore_base::Error::Unsupported)): MXNet 1.9.1's servers abort on integer
/// dtypes (and bfloat16) and hold float64 as float32.
pub const REFUSED_DTYPES: &[kvstore_base::DType] = &[
    kvstore_base::DType::F64,
    kvstore_base::DType::BF16,
    kvstore_base::DType::I32,
    kvstore_base::DType::I64,
    kvstore_base::DType::U8,
];

/// The capabilities of both stores (each registration lists them too, as the macro takes
/// them).
const CAPABILITIES: &[Capability] = &[
    Capability::InitPushPull,
    Capability::Distributed,
    Capability::GradientCompression,
    Capability::Optimizer,
    Capability::RowSparse,
];

fn create(request: &CreateRequest) -> kvstore_base::Result<Box<dyn KVStoreBase>> {
    Ok(Box::new(PsLiteStore::from_request(request)?))
}

/// Registers a worker store of this crate by name, with the capabilities [`CAPABILITIES`]
/// lists (the registry's macro takes them written out).
macro_rules! register_worker {
    ($name:literal) => {
        kvstore_base::register!(
            $name,
            create,
            capabilities = [
                Capability::InitPushPull,
                Capability::Distributed,
                Capability::GradientCompression,
                Capability::Optimizer,
                Capability::RowSparse
            ]
        );
    };
}

register_worker!("pslite_dist_sync");
register_worker!("pslite_dist_async");

#[cfg(test)]
mod tests {
    #[test]
    fn both_stores_register_the_capabilities_they_report() {
        let ours: Vec<_> = kvstore_base::registered()
            .into_iter()
            .filter(|info| [super::NAME, super::ASYNC_NAME].contains(&info.name.as_str()))
            .collect();
        assert_eq!(ours.len(), 2);
        for info in ours {
            assert_eq!(info.capabilities.as_deref(), Ok(super::CAPABILITIES));
        }
    }
}
