//! The transport's errors: each names the peer and, for a request, what was awaited.

use std::time::Duration;

/// A transport failure. Messages name the peer (address, and node id when known) and, for a
/// request, its id and the caller's description (such as the key).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Connecting failed or timed out.
    #[error("cannot connect to {peer}: {source}")]
    Connect {
        /// The address tried.
        peer: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Binding a listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No response arrived in time.
    #[error(
        "timed out after {timeout:?} waiting for {peer} to answer {what} (request {request_id})"
    )]
    Timeout {
        /// The peer.
        peer: String,
        /// The request id.
        request_id: u64,
        /// The caller's description of the request (e.g. `push of key 3`).
        what: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// The connection closed (or broke) before the response arrived.
    #[error("connection to {peer} lost while waiting for {what} (request {request_id}): {reason}")]
    PeerClosed {
        /// The peer.
        peer: String,
        /// The request id.
        request_id: u64,
        /// The caller's description of the request.
        what: String,
        /// Why the connection ended.
        reason: String,
    },
    /// The peer answered the request with an error.
    #[error("{peer} failed {what} (request {request_id}): {message}")]
    Remote {
        /// The peer.
        peer: String,
        /// The request id.
        request_id: u64,
        /// The caller's description of the request.
        what: String,
        /// The peer's message.
        message: String,
    },
    /// The peer sent bytes that are not a valid frame (bad magic, version or kind), or a
    /// message over the configured maximum.
    #[error("protocol error from {peer}: {reason}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// A message this node was to send is over the largest message a node of the job accepts
    /// ([`TransportConfig::max_message_bytes`](super::TransportConfig::max_message_bytes),
    /// `KVSTORE_MAX_MESSAGE_BYTES`): it was not sent, and the connection stays usable.
    #[error(
        "{what} for {peer} would be a message of {len} bytes, over the largest message a node \
         accepts, {max} bytes (KVSTORE_MAX_MESSAGE_BYTES): not sent; set KVSTORE_MAX_MESSAGE_BYTES \
         higher on every node of the job"
    )]
    TooLarge {
        /// The peer.
        peer: String,
        /// The caller's description of the message (e.g. `push of key 3`).
        what: String,
        /// The payload's length in bytes.
        len: u64,
        /// The configured maximum.
        max: u64,
    },
    /// The shared-secret handshake that opens a connection failed: the peer does not know the
    /// job's secret, has none, or broke off (see [`auth`](super::auth)).
    #[error("authentication with {peer} failed: {reason}")]
    Auth {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// Sending to or receiving from the peer failed.
    #[error("I/O error with {peer} while {during}: {source}")]
    Io {
        /// The peer.
        peer: String,
        /// What was being done (e.g. `sending request 4 (push of key 3)`).
        during: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl TransportError {
    /// Wraps this error as a [`kvstore_base::Error::Backend`] of `store`.
    pub fn into_store_error(self, store: &str) -> kvstore_base::Error {
        kvstore_base::Error::Backend {
            store: store.to_string(),
            source: Box::new(self),
        }
    }
}

impl From<TransportError> for kvstore_base::Error {
    /// A [`kvstore_base::Error::Backend`] of store `dist`; use
    /// [`TransportError::into_store_error`] to name the concrete store.
    fn from(e: TransportError) -> kvstore_base::Error {
        e.into_store_error("dist")
    }
}
