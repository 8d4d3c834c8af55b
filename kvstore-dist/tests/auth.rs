//! The shared-secret handshake over real sockets on 127.0.0.1: who is served, who is refused
//! and with which message, and that nothing a refused peer sends reaches a handler. Every wait
//! is bounded by a transport timeout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore_base::{DType, KVStoreExt, NDArray};
use kvstore_dist::transport::auth::CMD_AUTH;
use kvstore_dist::transport::{
    Connection, FrameHeader, MessageKind, Outgoing, Request, Responder, Secret, Server,
    TransportConfig, TransportError, HEADER_LEN,
};
use kvstore_dist::LocalCluster;

fn secret(byte: u8) -> Secret {
    Secret::new(vec![byte; 32]).unwrap()
}

fn config(secret: Option<Secret>) -> TransportConfig {
    TransportConfig {
        timeout: Duration::from_secs(5),
        node_id: 8,
        secret,
        ..TransportConfig::default()
    }
}

/// An echo server that counts the requests its handler sees.
fn counting_server(secret: Option<Secret>) -> (Server, Arc<AtomicUsize>) {
    counting_server_with(config(secret))
}

fn counting_server_with(config: TransportConfig) -> (Server, Arc<AtomicUsize>) {
    let handled = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&handled);
    let server = Server::bind(
        "127.0.0.1:0",
        config,
        move |req: Request, resp: Responder| {
            seen.fetch_add(1, Ordering::SeqCst);
            resp.respond(Outgoing::new(req.header.command, &req.payload))
                .unwrap();
        },
    )
    .unwrap();
    (server, handled)
}

fn wait_for_no_connections(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.connections() > 0 {
        assert!(Instant::now() < deadline, "the server kept the connection");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn nodes_sharing_the_secret_talk_as_without_one() {
    let (server, handled) = counting_server(Some(secret(7)));
    let conn = Connection::connect(server.local_addr(), config(Some(secret(7)))).unwrap();
    for size in [0usize, 5, 1 << 20] {
        let data = vec![3u8; size];
        let resp = conn.request(Outgoing::new(1, &data), "echo").unwrap();
        assert_eq!(resp.payload.len(), size);
    }
    assert_eq!(handled.load(Ordering::SeqCst), 3);
    assert!(conn.peer().contains("node 8"), "{}", conn.peer());
}

#[test]
fn a_node_with_another_secret_is_refused_before_any_request() {
    let (server, handled) = counting_server(Some(secret(7)));
    let err = Connection::connect(server.local_addr(), config(Some(secret(8)))).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TransportError::Auth { .. }), "{msg}");
    // The client checks the server's proof first: it is the one that says so.
    assert!(
        msg.contains("the server does not know this node's shared secret")
            && msg.contains("KVSTORE_SECRET"),
        "{msg}"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    wait_for_no_connections(&server);
}

#[test]
fn an_authenticated_connection_stays_usable_past_the_handshakes_timeouts() {
    // The handshake bounds its reads; an idle connection afterwards must not inherit that.
    let short = TransportConfig {
        timeout: Duration::from_millis(300),
        ..config(Some(secret(7)))
    };
    let (server, handled) = counting_server_with(short.clone());
    let conn = Connection::connect(server.local_addr(), short).unwrap();
    std::thread::sleep(Duration::from_millis(900));
    let resp = conn.request(Outgoing::new(1, b"late"), "echo").unwrap();
    assert_eq!(&*resp.payload, b"late");
    assert_eq!(handled.load(Ordering::SeqCst), 1);
}

#[test]
fn a_peer_trickling_its_handshake_is_dropped_within_the_handshake_limit() {
    let (server, handled) = counting_server_with(TransportConfig {
        timeout: Duration::from_millis(400),
        ..config(Some(secret(7)))
    });
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    let header = FrameHeader {
        kind: MessageKind::Request,
        flags: 0,
        command: CMD_AUTH,
        sender: 9,
        request_id: 0,
        key: 0,
        aux: 1,
        payload_len: 32,
    }
    .encode();
    // One byte every 100 ms: each read is quick, the whole handshake is not.
    let started = Instant::now();
    let mut closed = false;
    for byte in header.iter().chain([0u8; 32].iter()) {
        if raw.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    wait_for_no_connections(&server);
    assert!(
        closed || started.elapsed() < Duration::from_secs(4),
        "the server kept the trickling peer"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 0);
}

#[test]
fn a_node_without_the_secret_gets_an_error_naming_the_setting() {
    let (server, handled) = counting_server(Some(secret(7)));
    let conn = Connection::connect(server.local_addr(), config(None)).unwrap();
    let err = conn
        .request(Outgoing::new(1, b"hello"), "push of key 3")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("only serves peers that know the job's shared secret")
            && msg.contains("KVSTORE_SECRET_FILE")
            && msg.contains("push of key 3"),
        "{msg}"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    wait_for_no_connections(&server);
}

#[test]
fn a_node_with_a_secret_is_told_when_the_server_has_none() {
    let (server, handled) = counting_server(None);
    let err = Connection::connect(server.local_addr(), config(Some(secret(7)))).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TransportError::Auth { .. }), "{msg}");
    assert!(msg.contains("this node has no shared secret"), "{msg}");
    assert_eq!(handled.load(Ordering::SeqCst), 0);
}

/// A frame from a raw socket, as a peer that does not follow the protocol would send it.
fn raw_frame(stream: &mut TcpStream, command: u32, aux: u64, request_id: u64, payload: &[u8]) {
    let header = FrameHeader {
        kind: MessageKind::Request,
        flags: 0,
        command,
        sender: 9,
        request_id,
        key: 0,
        aux,
        payload_len: payload.len() as u64,
    };
    stream.write_all(&header.encode()).unwrap();
    stream.write_all(payload).unwrap();
}

fn read_raw(stream: &mut TcpStream) -> Option<(FrameHeader, Vec<u8>)> {
    let mut hb = [0u8; HEADER_LEN];
    stream.read_exact(&mut hb).ok()?;
    let header = FrameHeader::decode(&hb, 1 << 20).unwrap();
    let mut payload = vec![0u8; header.payload_len as usize];
    stream.read_exact(&mut payload).unwrap();
    Some((header, payload))
}

#[test]
fn a_forged_proof_is_refused_and_the_connection_closed() {
    let (server, handled) = counting_server(Some(secret(7)));
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw_frame(&mut raw, CMD_AUTH, 1, 0, &[1; 32]);
    let (answer, payload) = read_raw(&mut raw).unwrap();
    assert_eq!((answer.kind, payload.len()), (MessageKind::Response, 64));
    // Replaying the server's own proof (another label) or any guess fails.
    raw_frame(&mut raw, CMD_AUTH, 2, 0, &payload[32..]);
    let (refusal, text) = read_raw(&mut raw).unwrap();
    assert_eq!(refusal.kind, MessageKind::Error);
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("does not know this node's shared secret"),
        "{text}"
    );
    assert!(read_raw(&mut raw).is_none(), "the connection stays open");
    assert_eq!(handled.load(Ordering::SeqCst), 0);
}

#[test]
fn a_handshake_frame_announcing_a_huge_payload_is_refused_without_reading_it() {
    let (server, handled) = counting_server(Some(secret(7)));
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let header = FrameHeader {
        kind: MessageKind::Request,
        flags: 0,
        command: CMD_AUTH,
        sender: 9,
        request_id: 4,
        key: 0,
        aux: 1,
        payload_len: 1 << 50,
    };
    raw.write_all(&header.encode()).unwrap();
    let (refusal, text) = read_raw(&mut raw).unwrap();
    assert_eq!((refusal.kind, refusal.request_id), (MessageKind::Error, 4));
    assert!(
        String::from_utf8_lossy(&text).contains("only serves peers that know"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    wait_for_no_connections(&server);
}

#[test]
fn a_silent_connection_is_dropped_after_the_timeout() {
    let (server, handled) = counting_server_with(TransportConfig {
        timeout: Duration::from_millis(300),
        ..config(Some(secret(7)))
    });
    let _silent = TcpStream::connect(server.local_addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.connections() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_for_no_connections(&server);
    assert_eq!(handled.load(Ordering::SeqCst), 0);
}

#[test]
fn a_dist_sync_job_runs_with_a_secret_and_refuses_a_worker_without_it() {
    let job_secret = "a secret of the job, 32 bytes ok";
    let cluster = LocalCluster::start_with(
        1,
        1,
        Duration::from_secs(20),
        [("KVSTORE_SECRET", job_secret)],
    )
    .unwrap();

    // A worker without the secret (the scheduler refuses its registration), then one with a
    // different secret: both fail at once with a message naming the setting.
    let mut options = cluster.worker_options().clone();
    options.remove("KVSTORE_SECRET");
    let Err(err) = kvstore_base::create_with("dist_sync", options.clone()) else {
        panic!("a worker without the secret joined");
    };
    let err = err.to_string();
    assert!(err.contains("shared secret"), "{err}");
    options.insert(
        "KVSTORE_SECRET".into(),
        "another secret, also 32 bytes ok".into(),
    );
    let Err(err) = kvstore_base::create_with("dist_sync", options) else {
        panic!("a worker with another secret joined");
    };
    let err = err.to_string();
    assert!(err.contains("KVSTORE_SECRET"), "{err}");

    let kv = cluster.create_worker("dist_sync").unwrap();
    kv.init(3, &NDArray::ones(&[4], DType::F32)).unwrap();
    kv.push(3, &NDArray::full(&[4], 2.0, DType::F32)).unwrap();
    let mut out = NDArray::zeros(&[4], DType::F32);
    kv.pull(3, &mut out).unwrap();
    assert_eq!(out.to_f64_vec(), vec![2.0; 4]);
    drop(kv);
    cluster.finish().unwrap();
}

#[test]
fn a_server_that_cannot_prove_the_secret_gets_nothing_from_the_client() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let impostor = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (step1, nonce) = read_raw(&mut s).unwrap();
        assert_eq!((step1.command, step1.aux, nonce.len()), (CMD_AUTH, 1, 32));
        // A nonce and a guessed proof.
        let answer = FrameHeader {
            kind: MessageKind::Response,
            payload_len: 64,
            ..step1
        };
        s.write_all(&answer.encode()).unwrap();
        s.write_all(&[0x5A; 64]).unwrap();
        // The client hangs up without sending its proof or any request.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest
    });
    let err = Connection::connect(addr, config(Some(secret(7)))).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, TransportError::Auth { .. })
            && msg.contains("the server does not know this node's shared secret"),
        "{msg}"
    );
    assert!(impostor.join().unwrap().is_empty(), "the client sent more");
}
