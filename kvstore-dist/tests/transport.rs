//! The transport over real sockets on 127.0.0.1: framing, concurrency, timeouts, peers that
//! vanish or misbehave. Every wait in these tests is bounded by a transport timeout.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvstore_dist::transport::frame::{write_frame, HeaderError};
use kvstore_dist::transport::{
    Connection, ConnectionId, FrameHeader, Handler, MessageKind, Outgoing, Request, Responder,
    Server, TransportConfig, TransportError, HEADER_LEN,
};

fn config(timeout_ms: u64) -> TransportConfig {
    TransportConfig {
        timeout: Duration::from_millis(timeout_ms),
        ..TransportConfig::default()
    }
}

/// A server that echoes the key and the payload back.
fn echo_server(node_id: u32) -> Server {
    let cfg = TransportConfig {
        node_id,
        ..config(5_000)
    };
    Server::bind("127.0.0.1:0", cfg, |req: Request, resp: Responder| {
        let out = Outgoing::new(req.header.command, &req.payload)
            .key(req.header.key)
            .aux(req.header.aux);
        resp.respond(out).unwrap();
    })
    .unwrap()
}

#[test]
fn header_codec_round_trips_lengths_over_4_gib() {
    let h = FrameHeader {
        kind: MessageKind::Request,
        flags: 3,
        command: 42,
        sender: 9,
        request_id: 77,
        key: u64::MAX,
        aux: 1,
        payload_len: (5u64 << 30) + 17,
    };
    let bytes = h.encode();
    assert_eq!(bytes.len(), HEADER_LEN);
    assert_eq!(&bytes[0..4], b"KVSD");
    assert_eq!(&bytes[40..48], &((5u64 << 30) + 17).to_le_bytes());
    assert_eq!(FrameHeader::decode(&bytes, u64::MAX).unwrap(), h);
}

#[test]
fn header_codec_refuses_absurd_lengths_and_foreign_bytes() {
    let h = FrameHeader {
        kind: MessageKind::Response,
        flags: 0,
        command: 0,
        sender: 0,
        request_id: 1,
        key: 0,
        aux: 0,
        payload_len: u64::MAX,
    };
    let err = FrameHeader::decode(&h.encode(), 1 << 30).unwrap_err();
    assert_eq!(
        err,
        HeaderError::TooLarge {
            len: u64::MAX,
            max: 1 << 30
        }
    );
    assert!(err
        .to_string()
        .contains("exceeds the maximum message size of 1073741824 bytes"));

    let mut bytes = h.encode();
    bytes[0] = b'X';
    assert!(matches!(
        FrameHeader::decode(&bytes, u64::MAX),
        Err(HeaderError::BadMagic(_))
    ));
    let mut bytes = h.encode();
    bytes[4] = 9;
    assert_eq!(
        FrameHeader::decode(&bytes, u64::MAX),
        Err(HeaderError::BadVersion(9))
    );
    let mut bytes = h.encode();
    bytes[5] = 200;
    assert_eq!(
        FrameHeader::decode(&bytes, u64::MAX),
        Err(HeaderError::BadKind(200))
    );
}

/// Records the connection of every request, and the connections that ended.
#[derive(Default)]
struct ConnectionLog {
    requests: Mutex<Vec<ConnectionId>>,
    ended: Mutex<Vec<ConnectionId>>,
}

/// A server's handle on a shared [`ConnectionLog`].
struct Logging(Arc<ConnectionLog>);

impl Handler for Logging {
    fn handle(&self, request: Request, responder: Responder) {
        self.0.requests.lock().unwrap().push(request.connection);
        responder.respond(Outgoing::new(0, &[])).unwrap();
    }

    fn disconnected(&self, connection: ConnectionId) {
        self.0.ended.lock().unwrap().push(connection);
    }
}

#[test]
fn each_connection_has_its_own_id_and_its_end_names_it() {
    let log = Arc::new(ConnectionLog::default());
    let server = Server::bind("127.0.0.1:0", config(5_000), Logging(Arc::clone(&log))).unwrap();
    let first = Connection::connect(server.local_addr(), config(5_000)).unwrap();
    let second = Connection::connect(server.local_addr(), config(5_000)).unwrap();
    for conn in [&first, &second, &first] {
        conn.request(Outgoing::new(1, &[]), "ping").unwrap();
    }
    let seen = log.requests.lock().unwrap().clone();
    assert_eq!(seen[0], seen[2], "one connection, one id");
    assert_ne!(seen[0], seen[1], "two connections, two ids");
    assert_eq!(seen[0].addr.ip(), seen[1].addr.ip());
    assert_eq!(seen[0].to_string(), seen[0].addr.to_string());
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.ended.lock().unwrap().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    // Only the closed connection ended, named by its id.
    assert_eq!(*log.ended.lock().unwrap(), vec![seen[0]]);
    second.request(Outgoing::new(1, &[]), "ping").unwrap();
}

#[test]
fn request_round_trip_with_payloads_of_several_sizes() {
    let server = echo_server(8);
    let conn = Connection::connect(server.local_addr(), config(5_000)).unwrap();
    for len in [0usize, 1, 47, 48, 65_536, 3 << 20] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let resp = conn
            .request(Outgoing::new(5, &payload).key(len as u64).aux(9), "echo")
            .unwrap();
        assert_eq!(resp.header.kind, MessageKind::Response);
        assert_eq!(resp.header.key, len as u64);
        assert_eq!(resp.header.command, 5);
        assert_eq!(resp.header.aux, 9);
        assert_eq!(resp.header.sender, 8);
        assert_eq!(&*resp.payload, &payload[..]);
    }
    assert_eq!(conn.peer(), format!("node 8 at {}", server.local_addr()));
}

#[test]
fn response_lands_in_the_callers_buffer() {
    let server = echo_server(0);
    let conn = Connection::connect(server.local_addr(), config(5_000)).unwrap();
    let buf = vec![0u8; 1 << 20];
    let ptr = buf.as_ptr();
    let payload = vec![5u8; 1000];
    let resp = conn
        .send_into(Outgoing::new(1, &payload), "pull of key 1", buf)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(resp.payload.len(), 1000);
    assert_eq!(resp.payload.as_ptr(), ptr);
    assert!(resp.payload.iter().all(|&b| b == 5));
}

#[test]
fn concurrent_requests_from_many_threads_answered_out_of_order() {
    const N: usize = 8;
    let held: Arc<Mutex<Vec<(Request, Responder)>>> = Arc::new(Mutex::new(Vec::new()));
    let held2 = Arc::clone(&held);
    // Answers nothing until all N requests are in, then answers them in reverse order.
    let server = Server::bind(
        "127.0.0.1:0",
        config(5_000),
        move |req: Request, resp: Responder| {
            let mut h = held2.lock().unwrap();
            h.push((req, resp));
            if h.len() == N {
                let all: Vec<_> = h.drain(..).collect();
                for (req, resp) in all.into_iter().rev() {
                    let sum: u64 = req.payload.iter().map(|&b| u64::from(b)).sum();
                    resp.respond(Outgoing::new(0, &sum.to_le_bytes()).key(req.header.key))
                        .unwrap();
                }
            }
        },
    )
    .unwrap();
    let conn = Arc::new(Connection::connect(server.local_addr(), config(5_000)).unwrap());
    let order = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let conn = Arc::clone(&conn);
            let order = Arc::clone(&order);
            thread::spawn(move || {
                let payload = vec![i as u8; 1000 + i];
                let resp = conn
                    .request(
                        Outgoing::new(1, &payload).key(i as u64),
                        &format!("push of key {i}"),
                    )
                    .unwrap();
                assert_eq!(resp.header.key, i as u64);
                let mut sum = [0u8; 8];
                sum.copy_from_slice(&resp.payload);
                assert_eq!(u64::from_le_bytes(sum), (i * (1000 + i)) as u64);
                order.lock().unwrap().push(resp.header.request_id);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(order.lock().unwrap().len(), N);
    assert_eq!(conn.pending(), 0);
    assert!(held.lock().unwrap().is_empty());
}

#[test]
fn a_peer_that_never_answers_times_out_naming_peer_request_and_key() {
    let held: Arc<Mutex<Vec<Responder>>> = Arc::new(Mutex::new(Vec::new()));
    let held2 = Arc::clone(&held);
    let server = Server::bind(
        "127.0.0.1:0",
        config(5_000),
        move |_req: Request, resp: Responder| {
            held2.lock().unwrap().push(resp);
        },
    )
    .unwrap();
    let conn = Connection::connect(server.local_addr(), config(200)).unwrap();
    let start = Instant::now();
    let err = conn
        .request(Outgoing::new(1, b"abc").key(42), "push of key 42")
        .unwrap_err();
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(190), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let TransportError::Timeout { request_id, .. } = &err else {
        panic!("expected a timeout, got {err}")
    };
    let msg = err.to_string();
    assert!(msg.contains(&server.local_addr().to_string()), "{msg}");
    assert!(msg.contains(&format!("request {request_id}")), "{msg}");
    assert!(msg.contains("push of key 42"), "{msg}");
    assert_eq!(conn.pending(), 0);
    // The late answer is skipped and the connection stays usable.
    let late = held.lock().unwrap().pop().unwrap();
    late.respond(Outgoing::new(0, &[1u8; 100_000])).unwrap();
    let pending = conn.send(Outgoing::new(2, b"x"), "second").unwrap();
    held_answer(&held, Duration::from_secs(3));
    assert_eq!(pending.wait().unwrap().payload.len(), 1);

    // Through the store error type, the message keeps every detail.
    let store_err = kvstore_base::Error::from(err);
    assert!(
        store_err.to_string().starts_with("dist: timed out"),
        "{store_err}"
    );
    assert!(store_err.to_string().contains("push of key 42"));
}

/// Answers the next held responder with one byte, waiting for it to arrive.
fn held_answer(held: &Mutex<Vec<Responder>>, limit: Duration) {
    let start = Instant::now();
    loop {
        if let Some(r) = held.lock().unwrap().pop() {
            r.respond(Outgoing::new(0, b"y")).unwrap();
            return;
        }
        assert!(
            start.elapsed() < limit,
            "the request never reached the server"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_peer_that_disconnects_fails_all_pending_requests_promptly() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (close_tx, close_rx) = mpsc::channel::<()>();
    let peer = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 5 * (HEADER_LEN + 3)];
        let _ = s.read_exact(&mut buf);
        let _ = close_rx.recv_timeout(Duration::from_secs(5));
        // Dropping `s` closes the connection.
    });
    let conn = Connection::connect(addr, config(20_000)).unwrap();
    let pending: Vec<_> = (0..5u64)
        .map(|k| {
            conn.send(Outgoing::new(1, b"abc").key(k), &format!("pull of key {k}"))
                .unwrap()
        })
        .collect();
    assert_eq!(conn.pending(), 5);
    let start = Instant::now();
    close_tx.send(()).unwrap();
    let waiters: Vec<_> = pending
        .into_iter()
        .map(|p| thread::spawn(move || p.wait()))
        .collect();
    for (k, w) in waiters.into_iter().enumerate() {
        let err = w.join().unwrap().unwrap_err();
        assert!(matches!(err, TransportError::PeerClosed { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&addr.to_string()), "{msg}");
        assert!(msg.contains(&format!("pull of key {k}")), "{msg}");
        assert!(msg.contains("closed the connection"), "{msg}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    peer.join().unwrap();
    assert!(conn.is_closed());
    // A request on the dead connection fails at once.
    let err = conn
        .send(Outgoing::new(1, b""), "push of key 9")
        .unwrap_err();
    assert!(err.to_string().contains("push of key 9"), "{err}");
}

#[test]
fn a_hostile_server_announcing_a_huge_message_is_refused_without_allocating() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = [0u8; HEADER_LEN];
        s.read_exact(&mut req).unwrap();
        let h = FrameHeader::decode(&req, u64::MAX).unwrap();
        let evil = FrameHeader {
            kind: MessageKind::Response,
            payload_len: 1 << 62,
            ..h
        };
        s.write_all(&evil.encode()).unwrap();
        thread::sleep(Duration::from_millis(200));
    });
    let conn = Connection::connect(addr, config(5_000)).unwrap();
    let err = conn
        .request(Outgoing::new(1, b""), "pull of key 3")
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TransportError::PeerClosed { .. }), "{msg}");
    assert!(msg.contains("exceeds the maximum message size"), "{msg}");
    assert!(msg.contains("pull of key 3"), "{msg}");
    peer.join().unwrap();
}

#[test]
fn a_hostile_client_gets_an_error_and_the_server_keeps_serving() {
    let cfg = TransportConfig {
        max_message_bytes: 1 << 20,
        ..config(5_000)
    };
    let server = Server::bind("127.0.0.1:0", cfg, |req: Request, resp: Responder| {
        resp.respond(Outgoing::new(0, &req.payload)).unwrap();
    })
    .unwrap();

    // An absurd length: an error frame for that request id, then the connection closes.
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let evil = FrameHeader {
        kind: MessageKind::Request,
        flags: 0,
        command: 0,
        sender: 0,
        request_id: 99,
        key: 0,
        aux: 0,
        payload_len: 1 << 40,
    };
    raw.write_all(&evil.encode()).unwrap();
    let mut reply = Vec::new();
    raw.read_to_end(&mut reply).unwrap();
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&reply[..HEADER_LEN]);
    let h = FrameHeader::decode(&hb, u64::MAX).unwrap();
    assert_eq!((h.kind, h.request_id), (MessageKind::Error, 99));
    let text = String::from_utf8(reply[HEADER_LEN..].to_vec()).unwrap();
    assert!(
        text.contains("exceeds the maximum message size of 1048576 bytes"),
        "{text}"
    );

    // Garbage: the connection is closed.
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(&[0xAB; HEADER_LEN]).unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    assert!(rest.is_empty());

    // A well-behaved client is still served.
    let conn = Connection::connect(server.local_addr(), config(5_000)).unwrap();
    let resp = conn.request(Outgoing::new(0, b"hello"), "echo").unwrap();
    assert_eq!(&*resp.payload, b"hello");
}

#[test]
fn handler_errors_and_forgotten_requests_reach_the_caller() {
    let server = Server::bind(
        "127.0.0.1:0",
        config(5_000),
        |req: Request, resp: Responder| match req.header.command {
            1 => resp
                .respond_error(&format!("key {} has not been initialised", req.header.key))
                .unwrap(),
            2 => drop(resp),
            _ => panic!("handler panics on command {}", req.header.command),
        },
    )
    .unwrap();
    let conn = Connection::connect(server.local_addr(), config(5_000)).unwrap();
    let err = conn
        .request(Outgoing::new(1, b"").key(7), "pull of key 7")
        .unwrap_err();
    assert!(matches!(err, TransportError::Remote { .. }));
    assert!(err.to_string().contains("failed pull of key 7"), "{err}");
    assert!(
        err.to_string().contains("key 7 has not been initialised"),
        "{err}"
    );

    let err = conn
        .request(Outgoing::new(2, b""), "push of key 1")
        .unwrap_err();
    assert!(err.to_string().contains("without answering"), "{err}");

    // A panicking handler answers with an error; the connection survives.
    let err = conn
        .request(Outgoing::new(3, b""), "push of key 2")
        .unwrap_err();
    assert!(err.to_string().contains("without answering"), "{err}");
    let err = conn
        .request(Outgoing::new(1, b"").key(8), "pull of key 8")
        .unwrap_err();
    assert!(err.to_string().contains("key 8"), "{err}");
}

#[test]
fn dropping_a_server_with_live_clients_ends_their_requests() {
    let server = echo_server(0);
    let conn = Connection::connect(server.local_addr(), config(5_000)).unwrap();
    conn.request(Outgoing::new(0, b"x"), "echo").unwrap();
    assert_eq!(server.connections(), 1);
    let start = Instant::now();
    drop(server);
    assert!(start.elapsed() < Duration::from_secs(2));
    let err = match conn.request(Outgoing::new(0, b"x"), "after shutdown") {
        Err(e) => e,
        Ok(_) => panic!("the server is gone"),
    };
    assert!(
        matches!(
            err,
            TransportError::PeerClosed { .. } | TransportError::Io { .. }
        ),
        "{err}"
    );
}

#[test]
fn connecting_to_a_closed_port_names_the_address() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = Connection::connect(addr, config(1_000)).unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[test]
fn write_frame_is_header_then_payload() {
    let mut out = Vec::new();
    let h = FrameHeader {
        kind: MessageKind::Request,
        flags: 0,
        command: 1,
        sender: 2,
        request_id: 3,
        key: 4,
        aux: 5,
        payload_len: 3,
    };
    write_frame(&mut out, &h, b"abc").unwrap();
    assert_eq!(&out[HEADER_LEN..], b"abc");
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&out[..HEADER_LEN]);
    assert_eq!(FrameHeader::decode(&hb, 3).unwrap(), h);
}
