//! A ps-lite server: MXNet 1.9.1's `KVStoreDistServer` without an updater, in Rust, so that
//! MXNet's own Python workers (with `update_on_kvstore=False`: Gluon's `Trainer` runs the
//! optimizer on the workers) and this crate's workers can use it.
//!
//! As MXNet's `DataHandleDefault`: a key's first push is its value (rank 0's `init`); in sync
//! mode (`kSyncMode`, which rank 0 sends when it creates `dist_sync`) a push is held until every
//! worker pushed the key, the sum then replaces the value and every held request is answered,
//! with the value when it asked for it (`pushpull`); a pull is answered at once with the value.
//! Without sync mode a push replaces the value (MXNet's async server needs an updater). Unlike
//! MXNet's, every dtype is summed exactly in its own type (MXNet's aborts on integer dtypes and
//! holds float64 as float32), and a command it cannot honour (`kController`: a pickled Python
//! optimizer; gradient compression) stops the server with an error rather than being run or
//! ignored.

use std::collections::HashMap;
use std::time::Duration;

use kvstore_base::{DType, NDArray};
use kvstore_local::reduce::{self, ReduceConfig};

use crate::encoding;
use crate::meta::{data_type, Meta, Role};
use crate::van::{node_name, Message, Van, VanConfig, VanError, EVERYONE};
use crate::worker::{CMD_STOP_SERVER, CMD_SYNC_MODE};

/// MXNet's command carrying a pickled Python optimizer (`kController`).
pub const CMD_CONTROLLER: i32 = 0;
/// MXNet's command turning on multi-precision updates (`kSetMultiPrecision`).
pub const CMD_SET_MULTI_PRECISION: i32 = 1;
/// MXNet's command setting gradient compression (`kSetGradientCompression`).
pub const CMD_SET_GRADIENT_COMPRESSION: i32 = 4;

/// One key's state on this server.
#[derive(Debug)]
struct Slot {
    dtype: DType,
    stored: NDArray,
    /// The sum of the last round, reused as the next round's output.
    spare: Option<NDArray>,
    /// This round's pushes, and the requests that brought them.
    held: Vec<(Message, NDArray)>,
}

/// The dtype of a command word of a dense request (`RequestType::kDefaultPushPull`).
fn dtype_of(head: i32) -> Result<DType, String> {
    for dtype in DType::ALL {
        let id = encoding::mxnet_dtype_id(dtype).expect("every dtype has an MXNet id");
        if encoding::command(encoding::DEFAULT_PUSH_PULL, id) == head {
            return Ok(dtype);
        }
    }
    Err(format!(
        "command word {head}: not a dense push or pull of a known dtype (row-sparse and \
         compressed requests are not served)"
    ))
}

/// The meta of the answer to `request`; with `with_value`, its data frames follow (the key,
/// the value, its length).
fn answer(request: &Message, with_value: bool) -> Meta {
    let meta = &request.meta;
    Meta {
        head: meta.head,
        request: false,
        push: meta.push,
        pull: meta.pull,
        simple_app: meta.simple_app,
        app_id: meta.app_id,
        timestamp: meta.timestamp,
        customer_id: meta.customer_id,
        data_type: match with_value {
            true => vec![data_type::UINT64, data_type::OTHER, data_type::INT32],
            false => Vec::new(),
        },
        ..Meta::default()
    }
}

/// Answers `request`, with `value` (written from its memory) when it asked for the value.
fn reply(van: &Van, request: &Message, value: Option<&[u8]>) -> Result<(), VanError> {
    match value.filter(|_| request.meta.pull) {
        Some(bytes) => {
            let key = request.data.first().map_or(&[][..], |k| k.as_slice());
            let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX).to_le_bytes();
            van.send(request.sender, &answer(request, true), &[key, bytes, &len])
        }
        None => van.send(request.sender, &answer(request, false), &[]),
    }
}

/// The server's loop state.
struct Server {
    van: Van,
    num_workers: usize,
    sync: bool,
    slots: HashMap<u64, Slot>,
    reduce: ReduceConfig,
}

impl Server {
    /// A command to the servers; `Ok(true)` when it stops the server.
    fn command(&mut self, request: &Message) -> Result<bool, VanError> {
        let head = request.meta.head;
        match head {
            CMD_SYNC_MODE => self.sync = true,
            CMD_STOP_SERVER => {}
            CMD_SET_MULTI_PRECISION => {}
            CMD_CONTROLLER | CMD_SET_GRADIENT_COMPRESSION => {
                return Err(VanError(format!(
                    "{} sent command {head} ({}): this server runs no optimizer and no \
                     compression; run the optimizer on the workers (Gluon: \
                     update_on_kvstore=False)",
                    node_name(request.sender),
                    if head == CMD_CONTROLLER {
                        "kController, a pickled Python optimizer"
                    } else {
                        "kSetGradientCompression"
                    }
                )))
            }
            _ => log::info!("pslite server: command {head} acknowledged (nothing to do)"),
        }
        reply(&self.van, request, None)?;
        Ok(head == CMD_STOP_SERVER)
    }

    fn key_value(&mut self, request: Message) -> Result<(), VanError> {
        let sender = request.sender;
        let bad = |what: String| VanError(format!("{}: {what}", node_name(sender)));
        let key: [u8; 8] = request
            .data
            .first()
            .and_then(|k| k.as_slice().try_into().ok())
            .ok_or_else(|| bad("a request without its one key".into()))?;
        let ps_key = u64::from_le_bytes(key);
        let dtype = dtype_of(request.meta.head).map_err(bad)?;
        let Server {
            van,
            slots,
            num_workers,
            sync,
            reduce,
        } = self;
        if !request.meta.push {
            // A key never pushed is answered with no value (MXNet's server aborts): this
            // crate's worker then fails its pull naming this server (an MXNet worker fails a
            // check of ps-lite's).
            let value = slots
                .get(&ps_key)
                .map_or(&[][..], |s| s.stored.as_bytes().expect("contiguous"));
            return reply(van, &request, Some(value));
        }
        let vals = request.data.get(1).map_or(&[][..], |v| v.as_slice());
        if !vals.len().is_multiple_of(dtype.size_of()) {
            return Err(bad(format!("{} bytes of {dtype}", vals.len())));
        }
        let pushed = NDArray::from_bytes(&[vals.len() / dtype.size_of()], dtype, vals)
            .map_err(|e| bad(e.to_string()))?;
        // The copy is kept; the request keeps its key alone.
        let mut request = request;
        request.data.truncate(1);
        let Some(slot) = slots.get_mut(&ps_key) else {
            // The key's first push: its value.
            reply(van, &request, None)?;
            slots.insert(
                ps_key,
                Slot {
                    dtype,
                    stored: pushed,
                    spare: None,
                    held: Vec::new(),
                },
            );
            return Ok(());
        };
        if slot.dtype != dtype || slot.stored.shape() != pushed.shape() {
            return Err(bad(format!(
                "a push of {:?} {dtype} to a key holding {:?} {}",
                pushed.shape(),
                slot.stored.shape(),
                slot.dtype
            )));
        }
        if !*sync {
            slot.stored = pushed;
            return reply(van, &request, slot.stored.as_bytes());
        }
        slot.held.push((request, pushed));
        if slot.held.len() < *num_workers {
            return Ok(());
        }
        // The round is complete: one pass sums every push into the spare buffer, which becomes
        // the value.
        let mut sum = slot
            .spare
            .take()
            .unwrap_or_else(|| NDArray::zeros(slot.stored.shape(), dtype));
        let pushes: Vec<&NDArray> = slot.held.iter().map(|(_, p)| p).collect();
        reduce::sum_into(&mut sum, &pushes, reduce, false);
        slot.spare = Some(std::mem::replace(&mut slot.stored, sum));
        let value = slot.stored.as_bytes().expect("contiguous");
        for (request, _) in slot.held.drain(..) {
            reply(van, &request, Some(value))?;
        }
        Ok(())
    }
}

/// Runs a server of the job `config` names until rank 0 stops it (MXNet's `kStopServer`) and
/// every node met in the last barrier.
///
/// # Errors
/// Joining fails, a request it cannot serve (named), or every worker lost.
pub fn run_server(config: VanConfig, num_workers: usize) -> Result<(), VanError> {
    let van = Van::join_as(config, Role::Server)?;
    van.barrier(EVERYONE)?;
    let mut server = Server {
        van,
        num_workers,
        sync: false,
        slots: HashMap::new(),
        reduce: ReduceConfig::from_env(),
    };
    let workers: Vec<i32> = server
        .van
        .nodes()
        .iter()
        .filter(|n| n.role == Role::Worker)
        .map(|n| n.id)
        .collect();
    loop {
        let request = server.van.next_request(Duration::from_secs(1));
        let Some(request) = request else {
            // Idle as long as the job trains; over once no worker is left to stop it, or when
            // a round waits for a worker that is gone.
            if server.van.all_lost(&workers) {
                return Err(VanError(
                    "every worker left without stopping the server (kStopServer)".into(),
                ));
            }
            if server.slots.values().any(|s| !s.held.is_empty()) {
                let lost: Vec<String> = workers
                    .iter()
                    .filter(|&&id| server.van.all_lost(&[id]))
                    .map(|&id| node_name(id))
                    .collect();
                if !lost.is_empty() {
                    return Err(VanError(format!(
                        "a sync round waits for pushes of {}, which left the job",
                        lost.join(", ")
                    )));
                }
            }
            continue;
        };
        if !workers.contains(&request.sender) {
            log::warn!(
                "pslite server: ignored a request from {}, not a worker of the job",
                node_name(request.sender)
            );
            continue;
        }
        if request.meta.simple_app {
            if server.command(&request)? {
                break;
            }
        } else {
            server.key_value(request)?;
        }
    }
    server.van.barrier(EVERYONE)?;
    server.van.close();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_words_give_their_dtype() {
        assert_eq!(dtype_of(0), Ok(DType::F32));
        assert_eq!(dtype_of(5), Ok(DType::F16));
        assert_eq!(dtype_of(2), Ok(DType::F64));
        assert_eq!(dtype_of(90), Ok(DType::BF16));
        // 3: a compressed float32 request; 1: a row-sparse one.
        assert!(dtype_of(3)
            .unwrap_err()
            .contains("not a dense push or pull"));
        assert!(dtype_of(1).is_err());
    }

    #[test]
    fn answers_echo_their_request() {
        let request = Message {
            sender: 9,
            meta: Meta {
                head: 5,
                request: true,
                pull: true,
                app_id: Some(0),
                timestamp: Some(7),
                customer_id: 0,
                ..Meta::default()
            },
            data: vec![42u64.to_le_bytes().to_vec(), Vec::new()],
        };
        let meta = answer(&request, true);
        assert!(!meta.request && meta.pull && !meta.push);
        assert_eq!(
            (meta.head, meta.timestamp, meta.app_id),
            (5, Some(7), Some(0))
        );
        assert_eq!(meta.data_type.len(), 3);
        assert!(answer(&request, false).data_type.is_empty());
    }
}
