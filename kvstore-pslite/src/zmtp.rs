//! ZMTP 3.1, the ZeroMQ wire protocol, as far as ps-lite uses it: a DEALER socket sending to
//! a ROUTER socket over TCP, with the NULL security mechanism.
//!
//! ps-lite gives every node one ROUTER socket it receives on, and one DEALER socket per peer it
//! sends to; a DEALER announces its node's identity (`ps<id>`) in its handshake, and the
//! receiving ROUTER tells the application who sent each message by it. Data only ever flows
//! DEALER to ROUTER, so a connection here is one-way after the handshake: [`Dealer`] writes
//! messages, [`accept_dealer`] reads the handshake of an incoming connection and
//! [`read_message`] its messages.
//!
//! A connection opens with a 64-byte greeting from each side (signature, version 3.1,
//! mechanism `NULL`), then a `READY` command from each naming its socket type (and, for a
//! DEALER, its identity); a message is a run of frames, each a flags byte (`MORE`, `LONG`,
//! `COMMAND`), a 1- or 8-byte big-endian size and the bytes.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const FLAG_MORE: u8 = 1;
const FLAG_LONG: u8 = 2;
const FLAG_COMMAND: u8 = 4;

/// The most a frame's header alone makes this side reserve (256 MiB).
const EAGER_FRAME_BYTES: u64 = 256 << 20;

/// The greeting this side sends: signature, version 3.1, mechanism `NULL`, not as-server.
fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xFF;
    g[9] = 0x7F;
    g[10] = 3;
    g[11] = 1;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Checks a peer's greeting: a ZMTP 3.x peer with the `NULL` mechanism.
fn check_greeting(g: &[u8; 64]) -> io::Result<()> {
    if g[0] != 0xFF || g[9] & 1 != 1 {
        return Err(bad("the peer does not speak ZMTP (no ZeroMQ signature)"));
    }
    if g[10] < 3 {
        return Err(bad(format!(
            "the peer speaks ZMTP {}.{}, 3.0 or later is needed",
            g[10], g[11]
        )));
    }
    let mechanism = &g[12..32];
    if &mechanism[..4] != b"NULL" || mechanism[4..].iter().any(|&b| b != 0) {
        let name = String::from_utf8_lossy(mechanism);
        return Err(bad(format!(
            "the peer uses the ZMTP mechanism {:?}: only NULL (ps-lite's) is supported",
            name.trim_end_matches('\0')
        )));
    }
    Ok(())
}

fn bad(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// The `READY` command's body naming `socket_type` and, when given, `identity`.
fn ready(socket_type: &str, identity: Option<&[u8]>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.push(5);
    body.extend_from_slice(b"READY");
    let mut property = |name: &str, value: &[u8]| {
        body.push(name.len() as u8);
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(value);
    };
    property("Socket-Type", socket_type.as_bytes());
    if let Some(identity) = identity {
        property("Identity", identity);
    }
    body
}

/// A frame header: flags and size.
fn frame_header(flags: u8, len: usize) -> ([u8; 9], usize) {
    let mut h = [0u8; 9];
    if len <= 255 {
        h[0] = flags;
        h[1] = len as u8;
        (h, 2)
    } else {
        h[0] = flags | FLAG_LONG;
        h[1..9].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 9)
    }
}

/// Reads one frame's flags and size.
fn read_frame_header(stream: &mut impl Read) -> io::Result<(u8, u64)> {
    let mut flags = [0u8; 1];
    stream.read_exact(&mut flags)?;
    let len = if flags[0] & FLAG_LONG != 0 {
        let mut n = [0u8; 8];
        stream.read_exact(&mut n)?;
        u64::from_be_bytes(n)
    } else {
        let mut n = [0u8; 1];
        stream.read_exact(&mut n)?;
        u64::from(n[0])
    };
    Ok((flags[0], len))
}

/// Reads a frame of at most `limit` bytes.
fn read_frame(stream: &mut impl Read, limit: u64) -> io::Result<(u8, Vec<u8>)> {
    let (flags, len) = read_frame_header(stream)?;
    if len > limit {
        return Err(bad(format!(
            "a frame of {len} bytes makes the message larger than the {limit} bytes accepted \
             (KVSTORE_MAX_MESSAGE_BYTES)"
        )));
    }
    // At most EAGER_FRAME_BYTES reserved from the header alone; a bigger frame grows as its
    // bytes arrive, so that a peer announcing a huge frame and sending nothing holds little.
    let mut bytes = Vec::with_capacity(len.min(EAGER_FRAME_BYTES) as usize);
    stream.take(len).read_to_end(&mut bytes)?;
    if (bytes.len() as u64) < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok((flags, bytes))
}

/// The properties of a `READY` command's body.
fn ready_properties(body: &[u8]) -> io::Result<Vec<(String, Vec<u8>)>> {
    let name_len = *body.first().ok_or_else(|| bad("an empty ZMTP command"))? as usize;
    let name = body
        .get(1..1 + name_len)
        .ok_or_else(|| bad("a truncated ZMTP command"))?;
    if name == b"ERROR" {
        let reason = body.get(1 + name_len + 1..).unwrap_or_default();
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "the peer refused the connection: {}",
                String::from_utf8_lossy(reason)
            ),
        ));
    }
    if name != b"READY" {
        return Err(bad(format!(
            "expected the ZMTP READY command, got {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    let mut rest = &body[1 + name_len..];
    let mut properties = Vec::new();
    while !rest.is_empty() {
        let n = rest[0] as usize;
        let name = rest
            .get(1..1 + n)
            .ok_or_else(|| bad("a truncated property"))?;
        let len_at = 1 + n;
        let len = rest
            .get(len_at..len_at + 4)
            .ok_or_else(|| bad("a truncated property"))?;
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        let value = rest
            .get(len_at + 4..len_at + 4 + len)
            .ok_or_else(|| bad("a truncated property value"))?;
        properties.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
        rest = &rest[len_at + 4 + len..];
    }
    Ok(properties)
}

/// Exchanges greetings and `READY` commands on `stream` as `socket_type`; returns the peer's
/// properties.
fn handshake(
    stream: &mut TcpStream,
    socket_type: &str,
    identity: Option<&[u8]>,
) -> io::Result<Vec<(String, Vec<u8>)>> {
    exchange_greetings(stream, socket_type, identity).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => bad(
            "the peer closed the connection during the ZMTP handshake: is it a ps-lite (MXNet) \
             node?",
        ),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer did not complete the ZMTP handshake in time: is it a ps-lite (MXNet) node?",
        ),
        _ => e,
    })
}

fn exchange_greetings(
    stream: &mut TcpStream,
    socket_type: &str,
    identity: Option<&[u8]>,
) -> io::Result<Vec<(String, Vec<u8>)>> {
    stream.write_all(&greeting())?;
    let mut peer = [0u8; 64];
    stream.read_exact(&mut peer)?;
    check_greeting(&peer)?;
    let body = ready(socket_type, identity);
    let (header, n) = frame_header(FLAG_COMMAND, body.len());
    stream.write_all(&[&header[..n], &body[..]].concat())?;
    let (flags, command) = read_frame(stream, 64 * 1024)?;
    if flags & FLAG_COMMAND == 0 {
        return Err(bad("the peer sent a message before its READY command"));
    }
    ready_properties(&command)
}

/// The sending end of a ps-lite link: a DEALER connected to a peer's ROUTER.
#[derive(Debug)]
pub struct Dealer {
    stream: TcpStream,
}

impl Dealer {
    /// Connects to the ROUTER at `addr` as a DEALER announcing `identity` (`ps<id>`, or empty
    /// before the node has an id), within `timeout` for the connection and the handshake.
    ///
    /// # Errors
    /// The connection fails, the peer is not a ZMTP 3 ROUTER with the NULL mechanism, or the
    /// handshake takes longer than `timeout`.
    pub fn connect(addr: &str, identity: &[u8], timeout: Duration) -> io::Result<Dealer> {
        // IPv4 first, as ZeroMQ prefers: MXNet's nodes listen on IPv4 only.
        let mut targets: Vec<std::net::SocketAddr> =
            std::net::ToSocketAddrs::to_socket_addrs(addr)?.collect();
        targets.sort_by_key(|a| a.is_ipv6());
        let mut last = bad(format!("{addr} resolves to no address"));
        let mut connected = None;
        for target in targets {
            match TcpStream::connect_timeout(&target, timeout) {
                Ok(stream) => {
                    connected = Some(stream);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let mut stream = connected.ok_or(last)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let properties = handshake(&mut stream, "DEALER", Some(identity))?;
        let socket_type = properties
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("Socket-Type"))
            .map(|(_, v)| v.as_slice());
        if socket_type != Some(b"ROUTER") {
            return Err(bad(format!(
                "the peer at {addr} is a {} socket, not ps-lite's ROUTER",
                socket_type.map_or("untyped".into(), String::from_utf8_lossy)
            )));
        }
        Ok(Dealer { stream })
    }

    /// Sends one message: `meta`, then each of `data` as a frame of its own, written straight
    /// from the callers' memory. Writes give up after the connection's timeout.
    ///
    /// # Errors
    /// A failed or timed-out write (the link is then unusable).
    pub fn send(&mut self, meta: &[u8], data: &[&[u8]]) -> io::Result<()> {
        let mut headers = Vec::with_capacity(1 + data.len());
        let more = |last: bool| if last { 0 } else { FLAG_MORE };
        headers.push(frame_header(more(data.is_empty()), meta.len()));
        for (i, d) in data.iter().enumerate() {
            headers.push(frame_header(more(i + 1 == data.len()), d.len()));
        }
        let mut slices = Vec::with_capacity(2 * headers.len());
        slices.push(IoSlice::new(&headers[0].0[..headers[0].1]));
        slices.push(IoSlice::new(meta));
        for (h, d) in headers[1..].iter().zip(data) {
            slices.push(IoSlice::new(&h.0[..h.1]));
            slices.push(IoSlice::new(d));
        }
        write_all_vectored(&mut self.stream, &mut slices)
    }

    /// Closes the link.
    pub fn close(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// `write_all` for a list of slices (`Write::write_all_vectored` is not stable).
fn write_all_vectored(stream: &mut TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Answers the handshake of a DEALER that connected to this node's ROUTER, within `timeout`;
/// returns the identity it announced (empty for a node without an id yet). The stream is left
/// without a read timeout, for [`read_message`].
///
/// # Errors
/// The peer is not a ZMTP 3 DEALER with the NULL mechanism, or the handshake takes longer than
/// `timeout`.
pub fn accept_dealer(stream: &mut TcpStream, timeout: Duration) -> io::Result<Vec<u8>> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let properties = handshake(stream, "ROUTER", None)?;
    let socket_type = properties
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("Socket-Type"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    if socket_type != b"DEALER" && socket_type != b"REQ" {
        return Err(bad(format!(
            "a {} socket connected: ps-lite's senders are DEALERs",
            String::from_utf8_lossy(&socket_type)
        )));
    }
    stream.set_read_timeout(None)?;
    Ok(properties
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("Identity"))
        .map(|(_, v)| v)
        .unwrap_or_default())
}

/// The most frames a message may have: ps-lite sends a meta frame and at most three data
/// frames (keys, values, lengths).
pub const MAX_FRAMES: usize = 16;

/// Reads the next message (its frames, commands such as heartbeats skipped), its frames
/// together at most `limit` bytes and at most [`MAX_FRAMES`] of them; `None` when the peer
/// closed the connection between messages.
///
/// # Errors
/// A connection that breaks inside a message, or a message over `limit` or with too many
/// frames.
pub fn read_message(stream: &mut impl Read, limit: u64) -> io::Result<Option<Vec<Vec<u8>>>> {
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut total = 0u64;
    loop {
        if frames.len() == MAX_FRAMES {
            return Err(bad(format!(
                "a message of more than {MAX_FRAMES} frames (ps-lite sends at most 4)"
            )));
        }
        let (flags, bytes) = match read_frame(stream, limit - total) {
            Ok(frame) => frame,
            Err(e) if frames.is_empty() && e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if flags & FLAG_COMMAND != 0 {
            continue;
        }
        total += bytes.len() as u64;
        frames.push(bytes);
        if flags & FLAG_MORE == 0 {
            return Ok(Some(frames));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_dealer_sends_messages_a_router_reads() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let router = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let identity = accept_dealer(&mut stream, Duration::from_secs(5)).unwrap();
            let mut messages = Vec::new();
            while let Some(m) = read_message(&mut stream, 1 << 20).unwrap() {
                messages.push(m);
            }
            (identity, messages)
        });
        let mut dealer = Dealer::connect(&addr, b"ps9", Duration::from_secs(5)).unwrap();
        let big = vec![7u8; 300];
        dealer.send(b"meta", &[]).unwrap();
        dealer.send(b"m2", &[b"keys", &big, b""]).unwrap();
        dealer.close();
        let (identity, messages) = router.join().unwrap();
        assert_eq!(identity, b"ps9");
        assert_eq!(
            messages,
            vec![
                vec![b"meta".to_vec()],
                vec![b"m2".to_vec(), b"keys".to_vec(), big, Vec::new()]
            ]
        );
    }

    #[test]
    fn a_peer_that_is_not_zmtp_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let http = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = stream.write_all(&[b'H'; 64]);
            std::thread::sleep(Duration::from_millis(200));
        });
        let e = Dealer::connect(&addr, b"", Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("does not speak ZMTP"), "{e}");
        http.join().unwrap();
    }

    #[test]
    fn frames_over_the_limit_are_refused() {
        let mut bytes = vec![FLAG_LONG];
        bytes.extend_from_slice(&(1u64 << 40).to_be_bytes());
        let e = read_message(&mut bytes.as_slice(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("KVSTORE_MAX_MESSAGE_BYTES"), "{e}");
    }

    #[test]
    fn messages_of_too_many_frames_are_refused() {
        // Empty frames with MORE cost two bytes each on the wire but a `Vec` each here.
        let mut bytes = [FLAG_MORE, 0].repeat(MAX_FRAMES);
        bytes.extend_from_slice(&[0, 0]);
        let e = read_message(&mut bytes.as_slice(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("frames"), "{e}");
        let mut four = [FLAG_MORE, 0].repeat(3);
        four.extend_from_slice(&[0, 0]);
        assert_eq!(
            read_message(&mut four.as_slice(), 1 << 20)
                .unwrap()
                .unwrap()
                .len(),
            4
        );
    }

    #[test]
    fn commands_between_messages_are_skipped() {
        let mut bytes = vec![FLAG_COMMAND, 4];
        bytes.extend_from_slice(b"PING");
        bytes.extend_from_slice(&[0, 1, b'x']);
        assert_eq!(
            read_message(&mut bytes.as_slice(), 64).unwrap(),
            Some(vec![b"x".to_vec()])
        );
        assert_eq!(read_message(&mut [].as_slice(), 64).unwrap(), None);
    }
}
