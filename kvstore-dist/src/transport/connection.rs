//! The client side: a connection with many requests in flight, answered by id.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::buffer::Payload;
use super::error::TransportError;
use super::frame::{write_frame_within, FrameHeader, MessageKind, Outgoing, HEADER_LEN};
use super::{configure_stream, TransportConfig};

/// A successful response: its header and payload.
#[derive(Debug)]
pub struct Response {
    /// The header (command, key, aux, flags as the server set them).
    pub header: FrameHeader,
    /// The payload.
    pub payload: Payload,
}

type Outcome = Result<Response, TransportError>;

struct Slot {
    tx: SyncSender<Outcome>,
    what: String,
    buf: Option<Vec<u8>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Slot>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

struct Shared {
    addr: SocketAddr,
    /// The peer's node id as announced in its frames (0: unknown).
    node: AtomicU32,
    state: Mutex<State>,
}

impl Shared {
    fn peer(&self) -> String {
        peer_name(self.addr, self.node.load(Ordering::Relaxed))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection closed and fails every pending request with `reason`.
    fn close(&self, reason: String) {
        let drained: Vec<(u64, Slot)> = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(reason);
            }
            st.pending.drain().collect()
        };
        let reason = self.lock().closed.clone().unwrap_or_default();
        let peer = self.peer();
        for (request_id, slot) in drained {
            let _ = slot.tx.send(Err(TransportError::PeerClosed {
                peer: peer.clone(),
                request_id,
                what: slot.what,
                reason: reason.clone(),
            }));
        }
    }
}

pub(crate) fn peer_name(addr: SocketAddr, node: u32) -> String {
    if node == 0 {
        addr.to_string()
    } else {
        format!("node {node} at {addr}")
    }
}

/// A connection to a server: requests from any thread, many in flight, each answered by id.
///
/// Dropping it closes the socket, fails whatever is still pending, and joins its reader thread.
pub struct Connection {
    shared: Arc<Shared>,
    writer: Mutex<TcpStream>,
    next_id: AtomicU64,
    /// Bytes written to the socket so far (headers included).
    sent: AtomicU64,
    /// Requests written to the socket so far.
    requests: AtomicU64,
    config: TransportConfig,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.shared.peer())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `addr` (each resolved address in turn), within `config.timeout` each.
    pub fn connect<A: ToSocketAddrs>(
        addr: A,
        config: TransportConfig,
    ) -> Result<Connection, TransportError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| TransportError::Connect {
                peer: "<unresolved address>".to_string(),
                source,
            })?
            .collect();
        let mut last = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, config.timeout) {
                Ok(stream) => return Connection::from_stream(stream, config),
                Err(e) => last = Some((a, e)),
            }
        }
        Err(match last {
            Some((a, source)) => TransportError::Connect {
                peer: a.to_string(),
                source,
            },
            None => TransportError::Connect {
                peer: "<no address>".to_string(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the address resolved to nothing",
                ),
            },
        })
    }

    /// Wraps a connected stream (sets TCP_NODELAY, buffer sizes and the send timeout) and
    /// starts its reader thread.
    pub fn from_stream(
        stream: TcpStream,
        config: TransportConfig,
    ) -> Result<Connection, TransportError> {
        let addr = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let io_err = |source| TransportError::Io {
            peer: addr.to_string(),
            during: "setting up the connection".to_string(),
            source,
        };
        configure_stream(&stream, &config).map_err(io_err)?;
        if let Some(secret) = &config.secret {
            super::auth::client_handshake(&stream, secret, &config, &addr.to_string())?;
        }
        log::info!(
            "kvstore-dist: connected to {addr}{}",
            if config.secret.is_some() {
                " (authenticated)"
            } else {
                ""
            }
        );
        let read_half = stream.try_clone().map_err(io_err)?;
        let shared = Arc::new(Shared {
            addr,
            node: AtomicU32::new(0),
            state: Mutex::new(State::default()),
        });
        let reader_shared = Arc::clone(&shared);
        let max = config.max_message_bytes;
        let reader = std::thread::Builder::new()
            .name(format!("kvstore-dist reader {addr}"))
            .spawn(move || reader_loop(&reader_shared, read_half, max))
            .map_err(io_err)?;
        Ok(Connection {
            shared,
            writer: Mutex::new(stream),
            next_id: AtomicU64::new(1),
            sent: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            config,
            reader: Some(reader),
        })
    }

    /// Bytes this connection has written to its socket (frame headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Requests this connection has written to its socket.
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The peer: its address, and its node id once it has sent one.
    pub fn peer(&self) -> String {
        self.shared.peer()
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Whether the connection has ended (closed by either side or broken).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Number of requests awaiting a response.
    pub fn pending(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Sends a request and waits for its response (at most the configured timeout).
    /// `what` describes the request in errors (e.g. `push of key 3`).
    pub fn request(&self, out: Outgoing<'_>, what: &str) -> Result<Response, TransportError> {
        self.send(out, what)?.wait()
    }

    /// Sends a request; the returned [`Pending`] waits for its response.
    pub fn send(&self, out: Outgoing<'_>, what: &str) -> Result<Pending, TransportError> {
        self.send_with(out, what, None)
    }

    /// Like [`send`](Connection::send), but the response's payload is read into `buf` (grown
    /// if too small), for responses whose size the caller knows.
    pub fn send_into(
        &self,
        out: Outgoing<'_>,
        what: &str,
        buf: Vec<u8>,
    ) -> Result<Pending, TransportError> {
        self.send_with(out, what, Some(buf))
    }

    fn send_with(
        &self,
        out: Outgoing<'_>,
        what: &str,
        buf: Option<Vec<u8>>,
    ) -> Result<Pending, TransportError> {
        if out.payload.len() as u64 > self.config.max_message_bytes {
            // The peer would refuse it and close the connection: refused here instead, so
            // that the error names the request and the connection stays usable.
            return Err(TransportError::TooLarge {
                peer: self.shared.peer(),
                what: what.to_string(),
                len: out.payload.len() as u64,
                max: self.config.max_message_bytes,
            });
        }
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut st = self.shared.lock();
            if let Some(reason) = &st.closed {
                return Err(TransportError::PeerClosed {
                    peer: self.shared.peer(),
                    request_id,
                    what: what.to_string(),
                    reason: reason.clone(),
                });
            }
            st.pending.insert(
                request_id,
                Slot {
                    tx,
                    what: what.to_string(),
                    buf,
                },
            );
        }
        let header = out.header(MessageKind::Request, self.config.node_id, request_id);
        super::trace("sending to", || self.shared.peer(), &header);
        let written = {
            let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            write_frame_within(&w, &header, out.payload, self.config.timeout)
        };
        if written.is_ok() {
            self.sent
                .fetch_add((HEADER_LEN + out.payload.len()) as u64, Ordering::Relaxed);
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(source) = written {
            self.shared.lock().pending.remove(&request_id);
            let err = TransportError::Io {
                peer: self.shared.peer(),
                during: format!("sending request {request_id} ({what})"),
                source,
            };
            // A partly written frame leaves the stream unusable: end it, failing the others.
            if let Ok(w) = self.writer.lock() {
                let _ = w.shutdown(Shutdown::Both);
            }
            self.shared.close(format!("a send failed: {err}"));
            return Err(err);
        }
        Ok(Pending {
            shared: Arc::clone(&self.shared),
            rx,
            request_id,
            what: what.to_string(),
            timeout: self.config.timeout,
            deadline: Instant::now() + self.config.timeout,
            stall_warning: self.config.stall_warning,
            stall_logged: false,
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            if st.closed.is_none() {
                st.closed = Some("the connection was closed locally".to_string());
            }
        }
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(Shutdown::Both);
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.shared
            .close("the connection was closed locally".to_string());
    }
}

/// A request in flight. [`wait`](Pending::wait) returns its response, an error from the peer,
/// [`TransportError::Timeout`] once the configured timeout has passed since the send, or
/// [`TransportError::PeerClosed`] as soon as the connection ends.
#[must_use = "a request's outcome is only known by waiting for it"]
pub struct Pending {
    shared: Arc<Shared>,
    rx: Receiver<Outcome>,
    request_id: u64,
    what: String,
    timeout: Duration,
    deadline: Instant,
    /// When a wait still going is logged (zero: never), and whether it was.
    stall_warning: Duration,
    stall_logged: bool,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("request_id", &self.request_id)
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// The request's id.
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// Waits for the response until the configured timeout (counted from the send); a wait
    /// still going at [`TransportConfig::stall_warning`] from the send is logged (level
    /// `warn`) once, by this and by [`poll`](Pending::poll) and
    /// [`wait_timeout`](Pending::wait_timeout).
    pub fn wait(self) -> Outcome {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let timeout = self.timeout;
        self.wait_for(left, timeout)
    }

    /// How long from now until the stall warning is due, when it is still to come and before
    /// the deadline.
    fn until_stall_warning(&self) -> Option<Duration> {
        if self.stall_logged || self.stall_warning.is_zero() {
            return None;
        }
        let sent = self.deadline.checked_sub(self.timeout)?;
        Some((sent + self.stall_warning).saturating_duration_since(Instant::now()))
    }

    /// Logs that the request still waits, once.
    fn log_stall(&mut self) {
        self.stall_logged = true;
        log::warn!(
            "kvstore-dist: {} has waited {:?} or more for {} to answer (request {}); it fails \
             once it has waited {:?} (KVSTORE_TIMEOUT_SECS)",
            self.what,
            self.stall_warning,
            self.shared.peer(),
            self.request_id,
            self.timeout
        );
    }

    /// Whether the connection has ended: the outcome is then already known (a response that
    /// came first, else [`TransportError::PeerClosed`]).
    pub fn connection_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Waits at most `slice` (and never past the configured timeout): `Some(outcome)` when the
    /// request is settled (answered, failed or timed out), `None` when it is still in flight,
    /// so that a caller waiting on several requests can look at the others meanwhile.
    pub fn poll(&mut self, slice: Duration) -> Option<Outcome> {
        let due = self.until_stall_warning().is_some_and(|d| d.is_zero());
        if due && Instant::now() < self.deadline {
            // An answer already here (a caller polling late) is no stall.
            match self.rx.try_recv() {
                Ok(outcome) => return Some(outcome),
                Err(TryRecvError::Disconnected) => return Some(Err(self.closed())),
                Err(TryRecvError::Empty) => self.log_stall(),
            }
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(slice.min(left)) {
            Ok(outcome) => Some(outcome),
            Err(RecvTimeoutError::Timeout) if slice < left => None,
            Err(RecvTimeoutError::Timeout) => Some(self.timed_out(self.timeout)),
            Err(RecvTimeoutError::Disconnected) => Some(Err(self.closed())),
        }
    }

    /// Waits at most `limit` from now, whatever the configured timeout.
    pub fn wait_timeout(self, limit: Duration) -> Outcome {
        self.wait_for(limit, limit)
    }

    /// Waits at most `left` from now (`reported` as the timeout if it runs out), logging the
    /// stall warning on the way if it falls due.
    fn wait_for(mut self, left: Duration, reported: Duration) -> Outcome {
        let end = Instant::now() + left;
        if let Some(stall) = self.until_stall_warning().filter(|&s| s < left) {
            match self.rx.recv_timeout(stall) {
                Ok(outcome) => return outcome,
                Err(RecvTimeoutError::Disconnected) => return Err(self.closed()),
                Err(RecvTimeoutError::Timeout) => self.log_stall(),
            }
        }
        let left = end.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(outcome) => outcome,
            Err(RecvTimeoutError::Timeout) => self.timed_out(reported),
            Err(RecvTimeoutError::Disconnected) => Err(self.closed()),
        }
    }

    /// Withdraws the request after its time is up; a response that raced in is still taken.
    fn timed_out(&self, reported: Duration) -> Outcome {
        self.shared.lock().pending.remove(&self.request_id);
        self.rx.try_recv().unwrap_or_else(|_| {
            Err(TransportError::Timeout {
                peer: self.shared.peer(),
                request_id: self.request_id,
                what: self.what.clone(),
                timeout: reported,
            })
        })
    }

    /// The error of a request whose connection ended.
    fn closed(&self) -> TransportError {
        TransportError::PeerClosed {
            peer: self.shared.peer(),
            request_id: self.request_id,
            reason: self
                .shared
                .lock()
                .closed
                .clone()
                .unwrap_or_else(|| "the request was dropped".to_string()),
            what: self.what.clone(),
        }
    }
}

/// Reads a header; `Ok(false)` on a clean end of stream before its first byte.
pub(crate) fn read_header(stream: &mut TcpStream, buf: &mut [u8; HEADER_LEN]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < HEADER_LEN {
        match stream.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the peer closed the connection after {filled} bytes of a header"),
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads and drops `len` bytes with a small scratch buffer (a response nobody waits for).
pub(crate) fn discard(stream: &mut TcpStream, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut stream.take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection in the middle of a message",
        ));
    }
    Ok(())
}

pub(crate) fn payload_len(header: &FrameHeader) -> Result<usize, String> {
    usize::try_from(header.payload_len).map_err(|_| {
        format!(
            "a payload of {} bytes does not fit in memory",
            header.payload_len
        )
    })
}

fn reader_loop(shared: &Shared, mut stream: TcpStream, max: u64) {
    let reason = loop {
        let mut hb = [0u8; HEADER_LEN];
        match read_header(&mut stream, &mut hb) {
            Ok(true) => {}
            Ok(false) => break "the peer closed the connection".to_string(),
            Err(e) => break format!("reading from the socket failed: {e}"),
        }
        let header = match FrameHeader::decode(&hb, max) {
            Ok(h) => h,
            Err(e) => break format!("protocol error: {e}"),
        };
        if header.kind == MessageKind::Request {
            break "protocol error: the peer sent a request on a client connection".to_string();
        }
        if header.sender != 0 {
            shared.node.store(header.sender, Ordering::Relaxed);
        }
        let len = match payload_len(&header) {
            Ok(n) => n,
            Err(e) => break format!("protocol error: {e}"),
        };
        super::trace("received from", || shared.peer(), &header);
        let slot = shared.lock().pending.remove(&header.request_id);
        let Some(slot) = slot else {
            // Timed out (or unknown): skip its payload without allocating it.
            if let Err(e) = discard(&mut stream, header.payload_len) {
                break format!("reading from the socket failed: {e}");
            }
            continue;
        };
        let mut payload = Payload::with_buffer(slot.buf.unwrap_or_default(), len);
        if let Err(e) = stream.read_exact(&mut payload) {
            let reason = format!("reading a response payload failed: {e}");
            let _ = slot.tx.send(Err(TransportError::PeerClosed {
                peer: shared.peer(),
                request_id: header.request_id,
                what: slot.what,
                reason: reason.clone(),
            }));
            break reason;
        }
        let outcome = match header.kind {
            MessageKind::Error => {
                let mut message = String::from_utf8_lossy(&payload).into_owned();
                if message.len() > 4096 {
                    let mut cut = 4096;
                    while !message.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    message.truncate(cut);
                    message.push_str("...");
                }
                Err(TransportError::Remote {
                    peer: shared.peer(),
                    request_id: header.request_id,
                    what: slot.what,
                    message,
                })
            }
            _ => Ok(Response { header, payload }),
        };
        let _ = slot.tx.send(outcome);
    };
    shared.close(reason);
}
