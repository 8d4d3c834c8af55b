//! The TCP transport of the dist stores: framing, request/response connections, a server.
//!
//! # Shape
//!
//! - [`frame`]: a fixed 48-byte little-endian [`FrameHeader`] (magic, version, kind, flags,
//!   command, sender node id, request id, key, aux, 64-bit payload length) followed by the
//!   payload. No length limit in the format; the receiver refuses anything over its
//!   [`TransportConfig::max_message_bytes`] before allocating.
//! - [`Connection`]: the client side. Callers on any number of threads issue requests
//!   ([`Connection::request`] / [`Connection::send`]); each gets a [`Pending`] that waits on
//!   its own one-shot channel. One reader thread per connection reads responses and hands each
//!   to its caller by request id, so many requests are in flight at once and responses may come
//!   back in any order.
//! - [`Server`]: an accept loop and one thread per accepted connection that reads requests and
//!   calls the handler with the request and a [`Responder`]; the handler may answer at once or
//!   later from another thread (MXNet's sync mode answers a round's pushes together).
//!
//! Sends are zero-copy: the header and the caller's payload slice go to the kernel in one
//! `writev` (`write_vectored`), with no intermediate buffer. Receives read straight into one
//! buffer sized from the header: a fresh allocation, a caller-provided buffer
//! ([`Connection::send_into`]) or, on the server, a buffer from a small per-connection pool
//! that [`Payload`] returns on drop.
//!
//! With a [`Secret`] in [`TransportConfig::secret`], every connection opens with the
//! handshake of [`auth`]: client and server prove to each other that they know the job's
//! secret before the first request is handled.
//!
//! Nothing waits forever: a response waits at most [`TransportConfig::timeout`] and then fails
//! with [`TransportError::Timeout`] naming the peer, the request id and the caller's
//! description (e.g. the key); a blocked send fails after the same time without progress; a
//! peer that closes the connection (or sends garbage) fails every pending request at once with
//! [`TransportError::PeerClosed`] naming it.
//!
//! # Why std threads and blocking sockets, not tokio
//!
//! A parameter-server process holds a handful of long-lived connections (one per server or
//! worker), not thousands of short ones, and moves bulk payloads of megabytes: a thread per
//! connection costs nothing here, and a blocking `writev`/`read` of a large buffer is the
//! fastest path the kernel offers. Threads keep latency predictable (no executor scheduling,
//! no cooperative-yield stalls behind a long copy), and a library that others embed in their
//! training loops should not impose or start an async runtime (nor clash with theirs).

pub mod auth;
pub mod buffer;
pub mod connection;
pub mod error;
pub mod frame;
pub mod server;

use std::net::TcpStream;
use std::time::Duration;

pub use auth::Secret;
pub use buffer::Payload;
pub use connection::{Connection, Pending, Response};
pub use error::TransportError;
pub use frame::{FrameHeader, MessageKind, Outgoing, HEADER_LEN, MAGIC, VERSION};
pub use server::{ConnectionId, Handler, Request, Responder, Server};

/// Settings of connections and servers.
#[derive(Debug, Clone, PartialEq)]
pub struct TransportConfig {
    /// Bound on every wait: connecting, a response, a send that makes no progress.
    pub timeout: Duration,
    /// Largest payload accepted from a peer; a header announcing more is refused before any
    /// allocation and the connection is closed.
    pub max_message_bytes: u64,
    /// This node's id, written as the sender of every frame (ps-lite's numbering: scheduler 1,
    /// servers 8, 10, ..., workers 9, 11, ...); 0 while not yet assigned.
    pub node_id: u32,
    /// `SO_SNDBUF` / `SO_RCVBUF` to request, in bytes; `None` leaves the kernel's
    /// auto-tuning, which on Linux grows buffers up to `tcp_rmem`/`tcp_wmem` (an explicit size
    /// disables that and is capped by `rmem_max`/`wmem_max`).
    pub socket_buffer_bytes: Option<usize>,
    /// Buffers a server connection keeps for reuse by incoming payloads (see [`Payload`]).
    pub pooled_buffers: usize,
    /// A request still unanswered this long is logged as a warning naming the peer and the
    /// request (`KVSTORE_STALL_WARNING_SECS`); zero: never. It still fails only at `timeout`.
    pub stall_warning: Duration,
    /// The job's shared secret: when set, every connection opens with the handshake of
    /// [`auth`] (both ends prove they know it) and a peer that cannot is refused; a node with
    /// a secret and one without cannot talk. `None`: no handshake.
    pub secret: Option<Secret>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            timeout: Duration::from_secs_f64(crate::config::DEFAULT_TIMEOUT_SECS),
            max_message_bytes: crate::config::DEFAULT_MAX_MESSAGE_BYTES,
            node_id: 0,
            socket_buffer_bytes: None,
            pooled_buffers: 4,
            stall_warning: Duration::from_secs_f64(crate::config::DEFAULT_STALL_WARNING_SECS),
            secret: None,
        }
    }
}

/// Logs one frame at level `debug`: ps-lite's `PS_VERBOSE=2`, every message (the `kvstore`
/// command's log shows `debug` under it). Costs one check of the log level otherwise.
pub(crate) fn trace(direction: &str, peer: impl FnOnce() -> String, h: &FrameHeader) {
    if log::log_enabled!(log::Level::Debug) {
        let peer = peer();
        log::debug!(
            "kvstore-dist: {direction} {peer}: {:?} {} (command {:#x}, key {}, aux {}, flags \
             {:#x}), {} bytes",
            h.kind,
            h.request_id,
            h.command,
            h.key,
            h.aux,
            h.flags,
            h.payload_len
        );
    }
}

/// TCP_NODELAY (small requests must not wait for Nagle), the requested buffer sizes and the
/// send timeout.
pub(crate) fn configure_stream(
    stream: &TcpStream,
    config: &TransportConfig,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    if let Some(size) = config.socket_buffer_bytes {
        let sock = socket2::SockRef::from(stream);
        sock.set_send_buffer_size(size)?;
        sock.set_recv_buffer_size(size)?;
    }
    stream.set_write_timeout(Some(config.timeout))?;
    Ok(())
}
