//! The server side: an accept loop, a thread per connection, a handler callback.

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::auth::{CMD_AUTH, NO_SECRET_HERE};
use super::buffer::{Payload, Pool};
use super::connection::{payload_len, peer_name, read_header};
use super::error::TransportError;
use super::frame::{
    write_frame_within, FrameHeader, HeaderError, MessageKind, Outgoing, HEADER_LEN,
};
use super::{configure_stream, TransportConfig};

/// A request received by a [`Server`].
#[derive(Debug)]
pub struct Request {
    /// The header (command, key, aux, flags, sender node id, request id).
    pub header: FrameHeader,
    /// The payload, in a pooled buffer that returns to its connection's pool on drop.
    pub payload: Payload,
    /// The connection it came on (displayed as the peer's address, which it holds): unlike
    /// the address, never the same for two connections of a server, even when a closed
    /// connection's port is reused by a new one.
    pub connection: ConnectionId,
}

/// One accepted connection of a [`Server`]: its number (unique in the process) and the
/// peer's address, which is what it displays as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    /// The connection's number, counted from 1 in the order the process accepted them.
    pub number: u64,
    /// The peer's address.
    pub addr: SocketAddr,
}

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

/// The number of the next accepted connection.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Handles the requests of a [`Server`]. Called on the connection's thread, one request at a
/// time per connection; it may answer at once or move the [`Responder`] elsewhere and answer
/// later. It should not block for long: the connection reads nothing meanwhile.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(&self, request: Request, responder: Responder);

    /// Called once when `connection` has ended (closed by the peer, broken, or closed
    /// because the server is stopping), after its last request was handled. The default does
    /// nothing.
    fn disconnected(&self, connection: ConnectionId) {
        let _ = connection;
    }
}

impl<F> Handler for F
where
    F: Fn(Request, Responder) + Send + Sync + 'static,
{
    fn handle(&self, request: Request, responder: Responder) {
        self(request, responder)
    }
}

/// The way to answer one request. A responder dropped without answering sends an error
/// response, so the client never waits on a request the server forgot.
pub struct Responder {
    writer: Arc<Mutex<TcpStream>>,
    request_id: u64,
    peer: String,
    node_id: u32,
    /// The largest payload a peer accepts (this server's own limit, the job's setting).
    max_payload: u64,
    /// The longest an answer may take to write (the job's timeout): a peer slower to read it
    /// loses its connection.
    write_limit: Duration,
    answered: bool,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("request_id", &self.request_id)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// The id of the request this answers.
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// Sends the response (zero-copy from `out.payload`). A payload over the largest message
    /// a node accepts (`KVSTORE_MAX_MESSAGE_BYTES`, which the client would refuse, closing the
    /// connection) is not sent: the client gets an error saying so instead, and this returns
    /// [`TransportError::TooLarge`].
    pub fn respond(mut self, out: Outgoing<'_>) -> Result<(), TransportError> {
        self.answered = true;
        let len = out.payload.len() as u64;
        if len > self.max_payload {
            let too_large = TransportError::TooLarge {
                peer: self.peer.clone(),
                what: format!("the answer to request {}", self.request_id),
                len,
                max: self.max_payload,
            };
            let message = too_large.to_string();
            self.send(MessageKind::Error, Outgoing::new(0, message.as_bytes()))?;
            return Err(too_large);
        }
        self.send(MessageKind::Response, out)
    }

    /// Sends an error response carrying `message`.
    pub fn respond_error(mut self, message: &str) -> Result<(), TransportError> {
        self.answered = true;
        self.send(MessageKind::Error, Outgoing::new(0, message.as_bytes()))
    }

    fn send(&self, kind: MessageKind, out: Outgoing<'_>) -> Result<(), TransportError> {
        let header = out.header(kind, self.node_id, self.request_id);
        super::trace("sending to", || self.peer.clone(), &header);
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_frame_within(&w, &header, out.payload, self.write_limit).map_err(|source| {
            // A partly written frame leaves the stream unusable.
            let _ = w.shutdown(Shutdown::Both);
            TransportError::Io {
                peer: self.peer.clone(),
                during: format!("answering request {}", self.request_id),
                source,
            }
        })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.answered {
            let message = format!(
                "the server dropped request {} without answering it",
                self.request_id
            );
            let _ = self.send(MessageKind::Error, Outgoing::new(0, message.as_bytes()));
        }
    }
}

struct ConnEntry {
    stream: TcpStream,
    thread: JoinHandle<()>,
}

struct ServerShared {
    stopping: AtomicBool,
    conns: Mutex<Vec<ConnEntry>>,
    config: TransportConfig,
    handler: Box<dyn Handler>,
}

impl ServerShared {
    fn conns(&self) -> MutexGuard<'_, Vec<ConnEntry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A listening server. Dropping it stops accepting, closes every connection and joins all
/// its threads (after the handler calls in progress return).
pub struct Server {
    addr: SocketAddr,
    shared: Arc<ServerShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on `addr` (port 0: any free port) and serves every connection with `handler`.
    pub fn bind<A: ToSocketAddrs + std::fmt::Debug>(
        addr: A,
        config: TransportConfig,
        handler: impl Handler,
    ) -> Result<Server, TransportError> {
        let shown = format!("{addr:?}");
        let listener = TcpListener::bind(&addr).map_err(|source| TransportError::Bind {
            addr: shown.clone(),
            source,
        })?;
        Server::from_listener(listener, config, handler)
    }

    /// Serves every connection of an already bound `listener` with `handler` (a node serves
    /// on the socket it advertised to the scheduler, [`Node::take_listener`](crate::Node::take_listener)).
    pub fn from_listener(
        listener: TcpListener,
        config: TransportConfig,
        handler: impl Handler,
    ) -> Result<Server, TransportError> {
        let local = listener
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: "a listening socket".to_string(),
                source,
            })?;
        let shown = local.to_string();
        let shared = Arc::new(ServerShared {
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            config,
            handler: Box::new(handler),
        });
        let acc_shared = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name(format!("kvstore-dist accept {local}"))
            .spawn(move || accept_loop(&acc_shared, listener))
            .map_err(|source| TransportError::Bind {
                addr: shown,
                source,
            })?;
        Ok(Server {
            addr: local,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.shared
            .conns()
            .iter()
            .filter(|c| !c.thread.is_finished())
            .count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(5));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let conns: Vec<ConnEntry> = std::mem::take(&mut *self.shared.conns());
        for c in &conns {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        for c in conns {
            let _ = c.thread.join();
        }
    }
}

fn accept_loop(shared: &Arc<ServerShared>, listener: TcpListener) {
    for incoming in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match incoming {
            Ok(s) => s,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                log::warn!("kvstore-dist: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let peer = match stream.peer_addr() {
            Ok(p) => p,
            Err(_) => continue,
        };
        if let Err(e) = configure_stream(&stream, &shared.config) {
            log::warn!("kvstore-dist: cannot configure the connection from {peer}: {e}");
            continue;
        }
        let (Ok(keep), Ok(writer)) = (stream.try_clone(), stream.try_clone()) else {
            continue;
        };
        let conn_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("kvstore-dist serve {peer}"))
            .spawn(move || {
                let connection = ConnectionId {
                    number: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
                    addr: peer,
                };
                serve(&conn_shared, stream, writer, connection)
            });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                log::warn!("kvstore-dist: cannot start a thread for {peer}: {e}");
                continue;
            }
        };
        let mut conns = shared.conns();
        let (done, open): (Vec<_>, Vec<_>) = std::mem::take(&mut *conns)
            .into_iter()
            .partition(|c| c.thread.is_finished());
        *conns = open;
        conns.push(ConnEntry {
            stream: keep,
            thread,
        });
        drop(conns);
        for c in done {
            let _ = c.thread.join();
        }
    }
}

fn serve(
    shared: &ServerShared,
    mut stream: TcpStream,
    writer: TcpStream,
    connection: ConnectionId,
) {
    let peer = connection.addr;
    let config = &shared.config;
    let writer = Arc::new(Mutex::new(writer));
    let pool = Pool::new(config.pooled_buffers);
    let mut node = 0u32;
    let authenticated = match &config.secret {
        None => Ok(true),
        Some(secret) => super::auth::server_handshake(&stream, secret, config),
    };
    if matches!(authenticated, Ok(true)) {
        log::info!(
            "kvstore-dist: serving a connection from {peer}{}",
            if config.secret.is_some() {
                " (authenticated)"
            } else {
                ""
            }
        );
    }
    let reason = match &authenticated {
        Ok(true) => serve_requests(shared, &mut stream, &writer, &pool, connection, &mut node),
        Ok(false) => None,
        Err(reason) => Some(format!("authentication failed: {reason}")),
    };
    if let Some(reason) = reason {
        if !shared.stopping.load(Ordering::SeqCst) {
            log::warn!(
                "kvstore-dist: closing the connection from {}: {reason}",
                peer_name(peer, node)
            );
        }
    }
    if authenticated.is_err() {
        // Let the refusal reach the peer before the connection closes.
        super::auth::drain_until_closed(&stream);
    }
    let _ = stream.shutdown(Shutdown::Both);
    if !matches!(authenticated, Ok(true)) {
        return; // the handler never saw the connection
    }
    log::info!(
        "kvstore-dist: the connection from {} ended",
        peer_name(peer, node)
    );
    if catch_unwind(AssertUnwindSafe(|| shared.handler.disconnected(connection))).is_err() {
        log::error!(
            "kvstore-dist: the disconnect handler panicked for {}",
            peer_name(peer, node)
        );
    }
}

/// Reads requests and hands them to the handler until the connection ends; `Some(reason)`
/// when it ended otherwise than by the peer closing it.
fn serve_requests(
    shared: &ServerShared,
    stream: &mut TcpStream,
    writer: &Arc<Mutex<TcpStream>>,
    pool: &Arc<Pool>,
    connection: ConnectionId,
    node: &mut u32,
) -> Option<String> {
    let peer = connection.addr;
    let config = &shared.config;
    loop {
        let mut hb = [0u8; HEADER_LEN];
        match read_header(stream, &mut hb) {
            Ok(true) => {}
            Ok(false) => break None,
            Err(e) => break Some(format!("read failed: {e}")),
        }
        let header = match FrameHeader::decode(&hb, config.max_message_bytes) {
            Ok(h) => h,
            Err(e) => {
                if let HeaderError::TooLarge { .. } = e {
                    // The header is otherwise ours: tell the client why before closing.
                    let mut id = [0u8; 8];
                    id.copy_from_slice(&hb[16..24]);
                    let responder = Responder {
                        writer: Arc::clone(writer),
                        request_id: u64::from_le_bytes(id),
                        peer: peer_name(peer, *node),
                        node_id: config.node_id,
                        max_payload: config.max_message_bytes,
                        write_limit: config.timeout,
                        answered: false,
                    };
                    let _ = responder.respond_error(&e.to_string());
                }
                break Some(format!("protocol error: {e}"));
            }
        };
        if header.kind != MessageKind::Request {
            break Some(format!(
                "protocol error: expected a request, got a {:?} frame",
                header.kind
            ));
        }
        *node = header.sender;
        super::trace("received from", || peer_name(peer, *node), &header);
        let len = match payload_len(&header) {
            Ok(n) => n,
            Err(e) => break Some(format!("protocol error: {e}")),
        };
        let mut payload = pool.take(len);
        if let Err(e) = stream.read_exact(&mut payload) {
            break Some(format!(
                "reading the payload of request {} failed: {e}",
                header.request_id
            ));
        }
        let responder = Responder {
            writer: Arc::clone(writer),
            request_id: header.request_id,
            peer: peer_name(peer, *node),
            node_id: config.node_id,
            max_payload: config.max_message_bytes,
            write_limit: config.timeout,
            answered: false,
        };
        if header.command == CMD_AUTH {
            // Handshakes never reach a handler: without a secret here, the peer's is refused;
            // with one, the connection's handshake is already done.
            let message = match config.secret {
                None => NO_SECRET_HERE,
                Some(_) => "protocol error: a second handshake on an authenticated connection",
            };
            let _ = responder.respond_error(message);
            break Some(format!("handshake refused: {message}"));
        }
        let request = Request {
            header,
            payload,
            connection,
        };
        if catch_unwind(AssertUnwindSafe(|| {
            shared.handler.handle(request, responder)
        }))
        .is_err()
        {
            log::error!(
                "kvstore-dist: the request handler panicked on request {} from {}",
                header.request_id,
                peer_name(peer, *node)
            );
        }
    }
}
