//! The optional shared-secret handshake that opens every connection of a job.
//!
//! MXNet's parameter servers (ps-lite) accept anyone who reaches their ports: any host of the
//! network can push gradients into a job, stop its servers or read its weights. Given a
//! [`Secret`] (`KVSTORE_SECRET_FILE` or `KVSTORE_SECRET`), both ends of every connection
//! (scheduler, servers, workers, `byteps`' and `horovod`'s peers: they all use this transport)
//! first prove to each other that they know it, and a peer that cannot is refused before any
//! request of its reaches a handler.
//!
//! # The exchange
//!
//! Four frames, before the connection's first request; `K` is the secret, `Nc` and `Ns` are 32
//! fresh random bytes of the client and of the server, `||` joins bytes:
//!
//! 1. client -> server: a request [`CMD_AUTH`], step 1, carrying `Nc`;
//! 2. server -> client: `Ns || HMAC-SHA256(K, "kvstore-dist v1 server proof" || Nc || Ns)`;
//!    the client checks the proof (the server knows `K`);
//! 3. client -> server: a request [`CMD_AUTH`], step 2, carrying
//!    `HMAC-SHA256(K, "kvstore-dist v1 client proof" || Nc || Ns)`; the server checks it;
//! 4. server -> client: an empty response (accepted), or an error naming why (refused), after
//!    which the server closes the connection.
//!
//! Both proofs cover both nonces, so neither can be replayed on another connection, and their
//! labels differ, so a proof cannot be reflected back to the node that made it. Proofs are
//! compared in constant time. The secret itself never travels.
//!
//! # What it does not do
//!
//! It authenticates connections; it does not encrypt them. The frames that follow the
//! handshake travel in the clear and unsigned (as every frame does without a secret): a party
//! that can read and rewrite the traffic between two nodes can still see the values and alter
//! them. Keep a job on a network you trust for that (a private network, a VPN, or a tunnel).
//!
//! # Mismatched settings
//!
//! Every combination ends in an error that says what to change, never in a wait:
//! - client with a secret, server without: the server answers step 1 with an error ("this node
//!   has no shared secret");
//! - client without, server with: the server answers the client's first request with an error
//!   ("this node only serves peers that know the job's shared secret") and closes;
//! - different secrets: the client refuses the server's proof (or the server the client's).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::error::TransportError;
use super::frame::{write_frame, FrameHeader, MessageKind, Outgoing, HEADER_LEN};
use super::TransportConfig;

/// The request command of the handshake's steps (never handed to a handler).
pub const CMD_AUTH: u32 = 0x4B56_00A0;

/// Bytes of a nonce and of a proof.
const NONCE_LEN: usize = 32;
const PROOF_LEN: usize = 32;
/// Largest handshake frame either side reads: an error message is cut to this.
const MAX_HANDSHAKE_BYTES: u64 = 4096;
/// Largest first request whose payload a server with a secret reads and drops before refusing
/// it (so that the refusal is not lost to a reset connection).
const DRAIN_REFUSED_BYTES: u64 = 1 << 20;

const SERVER_LABEL: &[u8] = b"kvstore-dist v1 server proof";
const CLIENT_LABEL: &[u8] = b"kvstore-dist v1 client proof";

/// What a server with a secret answers a first request that is not the handshake.
pub(crate) const AUTH_REQUIRED: &str = "this node only serves peers that know the job's shared \
     secret: give every node of the job the same KVSTORE_SECRET_FILE (or KVSTORE_SECRET)";

/// What a server without a secret answers a handshake.
pub(crate) const NO_SECRET_HERE: &str = "this node has no shared secret, but the connecting \
     node sent one: give every node of the job the same KVSTORE_SECRET_FILE (or KVSTORE_SECRET), \
     or none";

/// A job's shared secret: at least [`Secret::MIN_LEN`] bytes. Never displayed, never sent.
///
/// ```
/// use kvstore_dist::transport::Secret;
///
/// let secret = Secret::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap();
/// assert_eq!(format!("{secret:?}"), "Secret(32 bytes, hidden)");
/// assert!(Secret::new(b"short".to_vec()).is_err());
/// ```
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// The shortest secret accepted, in bytes: a shorter one could be found by trying
    /// candidates against a recorded handshake.
    pub const MIN_LEN: usize = 16;

    /// A secret of these bytes; an error below [`Secret::MIN_LEN`] bytes.
    pub fn new(bytes: Vec<u8>) -> Result<Secret, String> {
        if bytes.len() < Self::MIN_LEN {
            return Err(format!(
                "a shared secret needs at least {} bytes, this one has {} (for example \
                 `head -c 32 /dev/urandom | base64 > secret`)",
                Self::MIN_LEN,
                bytes.len()
            ));
        }
        Ok(Secret(bytes.into()))
    }

    /// The largest secret file read, in bytes.
    pub const MAX_FILE_LEN: u64 = 64 * 1024;

    /// A secret given as text (a variable, a file's contents), without the line ending an
    /// editor, `echo` or a secret store leaves at its end: trailing `\n`, `\r`, spaces and
    /// tabs are dropped, so that a file and a variable holding the same line agree.
    pub fn from_text(mut bytes: Vec<u8>) -> Result<Secret, String> {
        while bytes
            .last()
            .is_some_and(|b| matches!(b, b'\n' | b'\r' | b' ' | b'\t'))
        {
            bytes.pop();
        }
        Secret::new(bytes)
    }

    /// The secret in the file at `path` ([`from_text`](Secret::from_text)); an error for a
    /// file over [`MAX_FILE_LEN`](Secret::MAX_FILE_LEN) bytes.
    pub fn from_file(path: &std::path::Path) -> Result<Secret, String> {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut bytes = Vec::new();
        file.take(Self::MAX_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if bytes.len() as u64 > Self::MAX_FILE_LEN {
            return Err(format!(
                "{}: a secret file holds at most {} bytes",
                path.display(),
                Self::MAX_FILE_LEN
            ));
        }
        Secret::from_text(bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A fresh secret for a job, as text: 32 random bytes from the kernel in 64 hex digits
    /// (what `kvstore launch` gives the processes of a job when none is set).
    pub fn generate_text() -> std::io::Result<String> {
        let bytes: [u8; 32] = random()?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    fn proof(&self, label: &[u8], client_nonce: &[u8], server_nonce: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(label);
        mac.update(client_nonce);
        mac.update(server_nonce);
        mac
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes, hidden)", self.0.len())
    }
}

impl PartialEq for Secret {
    /// Equal bytes, compared in constant time.
    fn eq(&self, other: &Secret) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(other.0.iter())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

/// `N` random bytes from the kernel.
pub(crate) fn random<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

/// The longest a handshake may take, whatever `KVSTORE_TIMEOUT_SECS`: a peer that trickles
/// its bytes cannot hold a server's thread longer.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// How long a server reads what a refused peer still sends before closing.
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// Why a handshake did not complete.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The other end refused it or cannot prove the secret, or broke the protocol: trying
    /// again cannot help.
    Refused(String),
    /// The connection failed, closed or timed out during it: worth another attempt.
    Io(std::io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(reason) => f.write_str(reason),
            Failure::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Io(e)
    }
}

/// The end of a handshake's reads: every read waits at most until then.
#[derive(Clone, Copy)]
struct Deadline(Instant);

impl Deadline {
    fn after(limit: Duration) -> Deadline {
        Deadline(Instant::now() + limit)
    }

    /// Fills `buf` from `stream`; `Ok(false)` when the peer closed before its first byte.
    fn read_exact(self, mut stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<bool> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = self.0.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the handshake did not complete in time",
                ));
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection in the middle of a frame",
                    ))
                }
                Ok(n) => filled += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted
                            | std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads and drops up to `len` bytes (fewer if the peer closes or the time runs out).
    fn discard(self, stream: &TcpStream, len: u64) {
        let mut scratch = [0u8; 16 * 1024];
        let mut left = len;
        while left > 0 {
            let n = scratch
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            match self.read_exact(stream, &mut scratch[..n]) {
                Ok(true) => left -= n as u64,
                _ => return,
            }
        }
    }

    /// The header of the next frame (its payload left unread); `Ok(None)` when the peer
    /// closed the connection before it.
    fn header(self, stream: &TcpStream) -> Result<Option<FrameHeader>, Failure> {
        let mut hb = [0u8; HEADER_LEN];
        if !self.read_exact(stream, &mut hb)? {
            return Ok(None);
        }
        FrameHeader::decode(&hb, u64::MAX)
            .map(Some)
            .map_err(|e| Failure::Refused(format!("protocol error: {e}")))
    }

    /// The next frame, whose payload may hold at most [`MAX_HANDSHAKE_BYTES`].
    fn frame(self, stream: &TcpStream) -> Result<Option<(FrameHeader, Vec<u8>)>, Failure> {
        let Some(header) = self.header(stream)? else {
            return Ok(None);
        };
        if header.payload_len > MAX_HANDSHAKE_BYTES {
            return Err(Failure::Refused(format!(
                "protocol error: a handshake frame of {} bytes (at most {MAX_HANDSHAKE_BYTES})",
                header.payload_len
            )));
        }
        let mut payload = vec![0u8; header.payload_len as usize];
        if !self.read_exact(stream, &mut payload)? && !payload.is_empty() {
            return Err(Failure::Io(closed_mid_frame()));
        }
        Ok(Some((header, payload)))
    }
}

fn closed_mid_frame() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the peer closed the connection in the middle of a frame",
    )
}

fn send(
    stream: &TcpStream,
    kind: MessageKind,
    out: Outgoing<'_>,
    sender: u32,
    request_id: u64,
) -> std::io::Result<()> {
    let header = out.header(kind, sender, request_id);
    let mut w: &TcpStream = stream;
    write_frame(&mut w, &header, out.payload).and_then(|()| w.flush())
}

/// Proves the client's knowledge of `secret` to the server of `stream`, and checks the
/// server's, within [`HANDSHAKE_LIMIT`] (or the configured timeout when shorter). Runs before
/// the connection's reader starts. A refusal is [`TransportError::Auth`]; a connection that
/// failed on the way is [`TransportError::Io`] (worth another attempt).
pub(crate) fn client_handshake(
    stream: &TcpStream,
    secret: &Secret,
    config: &TransportConfig,
    peer: &str,
) -> Result<(), TransportError> {
    client_steps(stream, secret, config).map_err(|failure| match failure {
        Failure::Refused(reason) => TransportError::Auth {
            peer: peer.to_string(),
            reason,
        },
        Failure::Io(source) => TransportError::Io {
            peer: peer.to_string(),
            during: "the shared-secret handshake".to_string(),
            source,
        },
    })?;
    stream
        .set_read_timeout(None)
        .map_err(|source| TransportError::Io {
            peer: peer.to_string(),
            during: "clearing the handshake's read timeout".to_string(),
            source,
        })
}

fn client_steps(
    stream: &TcpStream,
    secret: &Secret,
    config: &TransportConfig,
) -> Result<(), Failure> {
    let deadline = Deadline::after(config.timeout.min(HANDSHAKE_LIMIT));
    let client_nonce: [u8; NONCE_LEN] = random()?;
    let step1 = Outgoing::new(CMD_AUTH, &client_nonce).aux(1);
    send(stream, MessageKind::Request, step1, config.node_id, 0)?;
    let answer = expect_answer(deadline, stream, 1)?;
    if answer.len() != NONCE_LEN + PROOF_LEN {
        return Err(Failure::Refused(format!(
            "protocol error: the server's proof has {} bytes, not {}",
            answer.len(),
            NONCE_LEN + PROOF_LEN
        )));
    }
    let (server_nonce, server_proof) = answer.split_at(NONCE_LEN);
    secret
        .proof(SERVER_LABEL, &client_nonce, server_nonce)
        .verify_slice(server_proof)
        .map_err(|_| {
            Failure::Refused(
                "the server does not know this node's shared secret (KVSTORE_SECRET_FILE or \
                 KVSTORE_SECRET differs between them)"
                    .to_string(),
            )
        })?;
    let client_proof = secret
        .proof(CLIENT_LABEL, &client_nonce, server_nonce)
        .finalize()
        .into_bytes();
    let step2 = Outgoing::new(CMD_AUTH, &client_proof).aux(2);
    send(stream, MessageKind::Request, step2, config.node_id, 0)?;
    expect_answer(deadline, stream, 2)?;
    Ok(())
}

/// The payload of the server's answer to step `step`, or why there is none.
fn expect_answer(deadline: Deadline, stream: &TcpStream, step: u64) -> Result<Vec<u8>, Failure> {
    let Some((header, payload)) = deadline.frame(stream)? else {
        return Err(Failure::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            format!("the server closed the connection during step {step} of the handshake"),
        )));
    };
    match header.kind {
        MessageKind::Response if header.command == CMD_AUTH => Ok(payload),
        MessageKind::Error => Err(Failure::Refused(format!(
            "the server refused the handshake: {}",
            String::from_utf8_lossy(&payload)
        ))),
        kind => Err(Failure::Refused(format!(
            "protocol error: a {kind:?} frame of command {:#x} answered step {step} of the \
             handshake",
            header.command
        ))),
    }
}

/// Checks, within [`HANDSHAKE_LIMIT`] (or the configured timeout when shorter), that the
/// client of `stream` knows `secret`, proving this node's knowledge in turn. `Ok(false)`: the
/// client closed the connection before its first frame. After an error the connection must be
/// closed, once [`drain_until_closed`] let a refusal reach the client.
pub(crate) fn server_handshake(
    stream: &TcpStream,
    secret: &Secret,
    config: &TransportConfig,
) -> Result<bool, Failure> {
    let deadline = Deadline::after(config.timeout.min(HANDSHAKE_LIMIT));
    let refuse = |request_id: u64, reason: &str| {
        let refusal = Outgoing::new(CMD_AUTH, reason.as_bytes());
        let _ = send(
            stream,
            MessageKind::Error,
            refusal,
            config.node_id,
            request_id,
        );
        let _ = stream.shutdown(Shutdown::Write);
    };
    let Some(first) = deadline.header(stream)? else {
        return Ok(false);
    };
    let is_step = |h: &FrameHeader, step: u64, len: u64| {
        h.kind == MessageKind::Request
            && h.command == CMD_AUTH
            && h.aux == step
            && h.payload_len == len
    };
    if !is_step(&first, 1, NONCE_LEN as u64) {
        // Not a handshake (a node without the secret): drop a small payload so that the
        // refusal reaches the client before the connection closes.
        if first.payload_len <= DRAIN_REFUSED_BYTES {
            deadline.discard(stream, first.payload_len);
        }
        refuse(first.request_id, AUTH_REQUIRED);
        return Err(Failure::Refused(format!(
            "the peer's first request (command {:#x}) did not authenticate",
            first.command
        )));
    }
    let mut client_nonce = [0u8; NONCE_LEN];
    if !deadline.read_exact(stream, &mut client_nonce)? {
        return Err(Failure::Io(closed_mid_frame()));
    }
    let server_nonce: [u8; NONCE_LEN] = random()?;
    let mut answer = Vec::with_capacity(NONCE_LEN + PROOF_LEN);
    answer.extend_from_slice(&server_nonce);
    answer.extend_from_slice(
        &secret
            .proof(SERVER_LABEL, &client_nonce, &server_nonce)
            .finalize()
            .into_bytes(),
    );
    let step1_answer = Outgoing::new(CMD_AUTH, &answer);
    send(
        stream,
        MessageKind::Response,
        step1_answer,
        config.node_id,
        first.request_id,
    )?;
    let Some((second, proof)) = deadline.frame(stream)? else {
        // The client refused this node's proof (it holds another secret) and left.
        return Err(Failure::Refused(
            "the peer left after this node's proof: its secret differs".into(),
        ));
    };
    if !is_step(&second, 2, PROOF_LEN as u64) {
        refuse(
            second.request_id,
            "protocol error: expected step 2 of the handshake",
        );
        return Err(Failure::Refused("the peer broke off the handshake".into()));
    }
    if secret
        .proof(CLIENT_LABEL, &client_nonce, &server_nonce)
        .verify_slice(&proof)
        .is_err()
    {
        refuse(
            second.request_id,
            "the connecting node does not know this node's shared secret (KVSTORE_SECRET_FILE \
             or KVSTORE_SECRET differs between them)",
        );
        return Err(Failure::Refused(
            "the peer does not know the job's shared secret".into(),
        ));
    }
    let accepted = Outgoing::new(CMD_AUTH, &[]);
    send(
        stream,
        MessageKind::Response,
        accepted,
        config.node_id,
        second.request_id,
    )?;
    stream.set_read_timeout(None)?;
    Ok(true)
}

/// After a refusal: reads what the peer still sends (at most 1 MiB, for at most a second in
/// all) until it closes, so that closing this end does not reset the connection before the
/// peer has read the refusal.
pub(crate) fn drain_until_closed(stream: &TcpStream) {
    Deadline::after(DRAIN_LIMIT).discard(stream, DRAIN_REFUSED_BYTES);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_hidden_compared_by_value_and_at_least_16_bytes() {
        let a = Secret::new(vec![7; 16]).unwrap();
        assert_eq!(a, Secret::new(vec![7; 16]).unwrap());
        assert_ne!(a, Secret::new(vec![7; 17]).unwrap());
        assert_ne!(a, Secret::new([vec![7; 15], vec![8]].concat()).unwrap());
        assert!(!format!("{a:?}").contains('7'));
        let err = Secret::new(vec![1; 15]).unwrap_err();
        assert!(err.contains("16") && err.contains("15"), "{err}");
    }

    #[test]
    fn proofs_depend_on_label_nonces_and_secret() {
        let s = Secret::new(vec![1; 32]).unwrap();
        let t = Secret::new(vec![2; 32]).unwrap();
        let p = |s: &Secret, l: &[u8], c: &[u8], n: &[u8]| {
            s.proof(l, c, n).finalize().into_bytes().to_vec()
        };
        let base = p(&s, SERVER_LABEL, &[3; 32], &[4; 32]);
        assert_eq!(base, p(&s, SERVER_LABEL, &[3; 32], &[4; 32]));
        assert_ne!(base, p(&s, CLIENT_LABEL, &[3; 32], &[4; 32]));
        assert_ne!(base, p(&s, SERVER_LABEL, &[4; 32], &[3; 32]));
        assert_ne!(base, p(&t, SERVER_LABEL, &[3; 32], &[4; 32]));
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231_case_2() {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
