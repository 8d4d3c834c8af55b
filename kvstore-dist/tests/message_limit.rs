//! `KVSTORE_MAX_MESSAGE_BYTES`, the largest message a node accepts, as a setting of the job
//! rather than a trap: a message over it is refused by its sender with an error naming the key
//! (or the states) and the variable, before anything of the call is sent, and the connection
//! stays usable; batches of small keys are cut to fit under it.

use std::time::Duration;

use kvstore_base::{DType, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_dist::protocol::Mode;
use kvstore_dist::transport::{
    Connection, Outgoing, Request, Responder, Server, TransportConfig, TransportError,
};
use kvstore_dist::{DistConfig, DistStore, LocalCluster};
use kvstore_local as _;

/// The limit of these jobs: 64 KiB.
const LIMIT: usize = 64 << 10;

fn transport(max_message_bytes: u64) -> TransportConfig {
    TransportConfig {
        timeout: Duration::from_secs(5),
        max_message_bytes,
        ..TransportConfig::default()
    }
}

#[test]
fn a_request_over_the_limit_is_not_sent_and_the_connection_stays_usable() {
    let server = Server::bind(
        "127.0.0.1:0",
        transport(1 << 30),
        |req: Request, resp: Responder| {
            resp.respond(Outgoing::new(0, &req.payload)).unwrap();
        },
    )
    .unwrap();
    let conn = Connection::connect(server.local_addr(), transport(LIMIT as u64)).unwrap();
    let big = vec![7u8; LIMIT + 1];
    let err = conn
        .request(Outgoing::new(1, &big), "push of key 9")
        .unwrap_err();
    assert!(matches!(err, TransportError::TooLarge { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("push of key 9"), "{text}");
    assert!(text.contains("KVSTORE_MAX_MESSAGE_BYTES"), "{text}");
    assert_eq!(conn.bytes_sent(), 0, "nothing was sent");
    let answer = conn.request(Outgoing::new(1, b"still"), "a ping").unwrap();
    assert_eq!(&answer.payload[..], b"still");
}

#[test]
fn an_answer_over_the_limit_is_an_error_and_the_connection_stays_usable() {
    let server = Server::bind(
        "127.0.0.1:0",
        transport(LIMIT as u64),
        |req: Request, resp: Responder| {
            let len = req.header.key as usize;
            let answer = vec![1u8; len];
            let sent = resp.respond(Outgoing::new(0, &answer));
            assert_eq!(sent.is_err(), len > LIMIT);
        },
    )
    .unwrap();
    let conn = Connection::connect(server.local_addr(), transport(LIMIT as u64)).unwrap();
    let err = conn
        .request(
            Outgoing::new(1, b"").key(LIMIT as u64 + 1),
            "save of the states",
        )
        .unwrap_err();
    assert!(matches!(err, TransportError::Remote { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("KVSTORE_MAX_MESSAGE_BYTES"), "{text}");
    assert!(text.contains(&format!("{} bytes", LIMIT + 1)), "{text}");
    let answer = conn
        .request(Outgoing::new(1, b"").key(LIMIT as u64), "a ping")
        .unwrap();
    assert_eq!(answer.payload.len(), LIMIT);
}

/// A job of one server and one worker whose nodes accept messages of at most [`LIMIT`]
/// bytes, with shared memory `shm` (on: "1", off: "0").
fn job(shm: &str, part: impl FnOnce(&DistStore)) {
    job_of(1, shm, part);
}

/// [`job`] with `servers` servers.
fn job_of(servers: u32, shm: &str, part: impl FnOnce(&DistStore)) {
    let cluster = LocalCluster::start_with(
        servers,
        1,
        Duration::from_secs(10),
        [
            ("KVSTORE_MAX_MESSAGE_BYTES", LIMIT.to_string()),
            ("KVSTORE_SHM", shm.to_string()),
        ],
    )
    .unwrap();
    let config = DistConfig::from_vars(cluster.worker_options().clone()).unwrap();
    let kv = DistStore::connect("dist_sync", Mode::Sync, &config).unwrap();
    part(&kv);
    drop(kv);
    cluster.finish().unwrap();
}

#[test]
fn a_call_with_a_part_over_the_limit_sends_nothing_and_names_the_key() {
    // Key 2 is server 0's and key 3 server 1's (`key * 9973 mod 2`): server 0's batch would be
    // sent before server 1's big part is tried.
    job_of(2, "0", |kv| {
        let big = LIMIT / 4 + 1; // float32 elements: just over the limit
        let before = kv.requests_sent();
        let values = [
            NDArray::ones(&[8], DType::F32),
            NDArray::ones(&[big], DType::F32),
        ];
        let err = kv.init(&[2, 3], &values).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("key 3") && text.contains("KVSTORE_MAX_MESSAGE_BYTES"),
            "{text}"
        );
        assert_eq!(kv.requests_sent(), before, "nothing of the call was sent");

        // The connection is fine: a call within the limit goes through.
        kv.init(2, &NDArray::ones(&[8], DType::F32)).unwrap();
        let mut out = NDArray::zeros(&[8], DType::F32);
        kv.pushpull(2, &NDArray::full(&[8], 5.0, DType::F32), &mut out)
            .unwrap();
        assert_eq!(out.to_f64_vec(), vec![5.0; 8]);
    });
}

#[test]
fn a_push_of_rows_over_the_limit_sends_nothing_and_names_the_key() {
    // Key 2 is server 0's and key 3 server 1's. Key 3 fits at its init (LIMIT / 2 bytes), but
    // every row pushed carries its 8-byte id: its 1-element rows make 3 times the bytes.
    job_of(2, "0", |kv| {
        let rows = LIMIT / 8;
        kv.init(
            &[2, 3],
            &[
                NDArray::ones(&[8], DType::F32),
                NDArray::ones(&[rows, 1], DType::F32),
            ],
        )
        .unwrap();
        let ids: Vec<i64> = (0..rows as i64).collect();
        let every_row =
            NDArray::row_sparse(&[rows, 1], ids, &NDArray::ones(&[rows, 1], DType::F32)).unwrap();
        let before = kv.requests_sent();
        let err = kv
            .push(&[2, 3], &[NDArray::ones(&[8], DType::F32), every_row])
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("key 3") && text.contains("fewer rows"),
            "{text}"
        );
        assert_eq!(kv.requests_sent(), before, "nothing of the call was sent");
        // Key 2 was not pushed: its round is still open for this (only) worker's push.
        let mut out = NDArray::zeros(&[8], DType::F32);
        kv.pushpull(2, &NDArray::full(&[8], 5.0, DType::F32), &mut out)
            .unwrap();
        assert_eq!(out.to_f64_vec(), vec![5.0; 8]);
    });
}

#[test]
fn many_small_keys_travel_in_batches_that_fit_under_the_limit() {
    job("0", |kv| {
        // 300 keys of 1 KiB: 300 KiB in one call, batched by at most 64 KiB.
        let keys: Vec<i32> = (0..300).collect();
        let values: Vec<NDArray> = keys
            .iter()
            .map(|&k| NDArray::full(&[256], f64::from(k), DType::F32))
            .collect();
        kv.init(&keys, &values).unwrap();
        let mut outs: Vec<NDArray> = keys
            .iter()
            .map(|_| NDArray::zeros(&[256], DType::F32))
            .collect();
        kv.pushpull(&keys, &values, &mut outs).unwrap();
        for (&k, out) in keys.iter().zip(&outs) {
            assert_eq!(out.to_f64_vec(), vec![f64::from(k); 256], "key {k}");
        }
    });
}

#[test]
fn an_inits_batch_counts_the_text_of_string_keys() {
    job("0", |kv| {
        // 100 keys of 1000-character names and 512 bytes: the names are most of the call.
        let names: Vec<String> = (0..100)
            .map(|i| format!("{}-{i}", "layer".repeat(200)))
            .collect();
        let values: Vec<NDArray> = names
            .iter()
            .map(|_| NDArray::ones(&[128], DType::F32))
            .collect();
        kv.init(&names, &values).unwrap();
        let mut out = NDArray::zeros(&[128], DType::F32);
        kv.pull(names[99].as_str(), &mut out).unwrap();
        assert_eq!(out.to_f64_vec(), vec![1.0; 128]);
    });
}

#[test]
fn with_shared_memory_too_a_key_over_the_limit_is_refused_at_its_init() {
    job("1", |kv| {
        let big = 4 * LIMIT; // float32 elements: 16 times the limit
        kv.init(5, &NDArray::zeros(&[LIMIT / 8], DType::F32))
            .unwrap();
        // Inits travel over TCP: refused, and so the key is never pushed nor pulled.
        let err = kv.init(6, &NDArray::zeros(&[big], DType::F32)).unwrap_err();
        assert!(
            err.to_string().contains("KVSTORE_MAX_MESSAGE_BYTES"),
            "{err}"
        );
        // A key of half the limit: its init fits, and so do its pushes and pulls.
        let mut out = NDArray::zeros(&[LIMIT / 8], DType::F32);
        kv.pushpull(5, &NDArray::full(&[LIMIT / 8], 2.0, DType::F32), &mut out)
            .unwrap();
        assert_eq!(out.to_f64_vec(), vec![2.0; LIMIT / 8]);
    });
}

#[test]
fn optimizer_states_over_the_limit_are_refused_and_the_job_goes_on() {
    // Three keys of 48 KiB with momentum: each message fits, the states (144 KiB) do not.
    let elements = 12 * 1024;
    let keys = [1, 2, 3];
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9);
    let dir = std::env::temp_dir().join(format!("kvstore-message-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("states");

    // A file of the same keys, written by the local store.
    let local = kvstore_base::create("local").unwrap();
    local.set_optimizer(&sgd).unwrap();
    for k in keys {
        local
            .init(k, &NDArray::ones(&[elements], DType::F32))
            .unwrap();
        local
            .push(k, &NDArray::ones(&[elements], DType::F32))
            .unwrap();
    }
    local.save_optimizer_states(&file, false).unwrap();
    assert!(std::fs::metadata(&file).unwrap().len() > LIMIT as u64);

    job("0", |kv| {
        kv.set_optimizer(&sgd).unwrap();
        for k in keys {
            kv.init(k, &NDArray::ones(&[elements], DType::F32)).unwrap();
            kv.push(k, &NDArray::ones(&[elements], DType::F32)).unwrap();
        }
        let saved = dir.join("saved");
        let err = kv.save_optimizer_states(&saved, false).unwrap_err();
        assert!(
            err.to_string().contains("KVSTORE_MAX_MESSAGE_BYTES"),
            "{err}"
        );
        assert!(!saved.exists());

        let err = kv.load_optimizer_states(&file).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("KVSTORE_MAX_MESSAGE_BYTES") && text.contains("nothing was loaded"),
            "{text}"
        );

        // The job goes on: one more step, with the servers' momentum untouched by the load.
        let mut out = NDArray::zeros(&[elements], DType::F32);
        kv.pushpull(1, &NDArray::ones(&[elements], DType::F32), &mut out)
            .unwrap();
        let mut expected = NDArray::zeros(&[elements], DType::F32);
        local
            .pushpull(1, &NDArray::ones(&[elements], DType::F32), &mut expected)
            .unwrap();
        assert_eq!(out, expected, "the same step as the local store's");
    });
    std::fs::remove_dir_all(&dir).unwrap();
}
