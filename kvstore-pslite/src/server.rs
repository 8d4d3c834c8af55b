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
    /// The sum of this round's pushes so far, and the requests it holds.
    merged: Option<NDArray>,
    held: Vec<Message>,
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

/// The answer to `request`, with `value` when it asked for the value.
fn answer(request: &Message, value: Option<&NDArray>) -> (Meta, Vec<Vec<u8>>) {
    let meta = &request.meta;
    let mut reply = Meta {
        head: meta.head,
        request: false,
        push: meta.push,
        pull: meta.pull,
        simple_app: meta.simple_app,
        app_id: meta.app_id,
        timestamp: meta.timestamp,
        customer_id: meta.customer_id,
        ..Meta::default()
    };
    let mut data = Vec::new();
    if let Some(value) = value.filter(|_| meta.pull) {
        let bytes = value
            .as_bytes()
            .expect("stored values are contiguous")
            .to_vec();
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        data.push(request.data.first().cloned().unwrap_or_default());
        data.push(bytes);
        data.push(len.to_le_bytes().to_vec());
        reply.data_type = vec![data_type::UINT64, data_type::OTHER, data_type::INT32];
    }
    (reply, data)
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
    fn reply(&self, request: &Message, value: Option<&NDArray>) -> Result<(), VanError> {
        let (meta, data) = answer(request, value);
        let frames: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        self.van.send(request.sender, &meta, &frames)
    }

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
        self.reply(request, None)?;
        Ok(head == CMD_STOP_SERVER)
    }

    fn key_value(&mut self, request: Message) -> Result<(), VanError> {
        let bad = |what: String| VanError(format!("{}: {what}", node_name(request.sender)));
        let key: [u8; 8] = request
            .data
            .first()
            .and_then(|k| k.as_slice().try_into().ok())
            .ok_or_else(|| bad("a request without its one key".into()))?;
        let ps_key = u64::from_le_bytes(key);
        let dtype = dtype_of(request.meta.head).map_err(bad)?;
        if !request.meta.push {
            // A key never pushed is answered with no value (MXNet's server aborts); the worker
            // then fails its pull, naming this server.
            let value = self
                .slots
                .get(&ps_key)
                .map_or_else(|| empty(dtype), |s| s.stored.clone());
            return self.reply(&request, Some(&value));
        }
        let vals = request.data.get(1).map_or(&[][..], |v| v.as_slice());
        if !vals.len().is_multiple_of(dtype.size_of()) {
            return Err(bad(format!("{} bytes of {dtype}", vals.len())));
        }
        let pushed = NDArray::from_bytes(&[vals.len() / dtype.size_of()], dtype, vals)
            .map_err(|e| bad(e.to_string()))?;
        let Some(slot) = self.slots.get_mut(&ps_key) else {
            // The key's first push: its value.
            self.slots.insert(
                ps_key,
                Slot {
                    dtype,
                    stored: pushed,
                    merged: None,
                    held: Vec::new(),
                },
            );
            return self.reply(&request, None);
        };
        if slot.dtype != dtype || slot.stored.shape() != pushed.shape() {
            return Err(bad(format!(
                "a push of {:?} {dtype} to a key holding {:?} {}",
                pushed.shape(),
                slot.stored.shape(),
                slot.dtype
            )));
        }
        if !self.sync {
            slot.stored = pushed;
            let stored = slot.stored.clone();
            return self.reply(&request, Some(&stored));
        }
        slot.merged = Some(match slot.merged.take() {
            None => pushed,
            Some(sum) => reduce::sum_values(&[&sum, &pushed], &self.reduce, false),
        });
        slot.held.push(request);
        if slot.held.len() < self.num_workers {
            return Ok(());
        }
        slot.stored = slot.merged.take().expect("merged above");
        let held = std::mem::take(&mut slot.held);
        let stored = slot.stored.clone();
        for request in &held {
            self.reply(request, Some(&stored))?;
        }
        Ok(())
    }
}

fn empty(dtype: DType) -> NDArray {
    NDArray::zeros(&[0], dtype)
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
    loop {
        let request = server.van.next_request(Duration::from_secs(1))?;
        let Some(request) = request else { continue };
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
    fn a_pull_is_answered_with_the_key_the_value_and_its_length() {
        let request = Message {
            sender: 9,
            meta: Meta {
                head: 0,
                request: true,
                pull: true,
                app_id: Some(0),
                timestamp: Some(7),
                customer_id: 0,
                ..Meta::default()
            },
            data: vec![42u64.to_le_bytes().to_vec(), Vec::new()],
        };
        let value = NDArray::from_vec(&[2], vec![1.5f32, -2.0]).unwrap();
        let (meta, data) = answer(&request, Some(&value));
        assert!(!meta.request && meta.pull && meta.timestamp == Some(7));
        assert_eq!(data[0], 42u64.to_le_bytes());
        assert_eq!(data[1], value.as_bytes().unwrap());
        assert_eq!(data[2], 8i32.to_le_bytes());
        // A push is acknowledged without data.
        let mut push = request.clone();
        push.meta.pull = false;
        push.meta.push = true;
        assert!(answer(&push, Some(&value)).1.is_empty());
    }
}
