//! The frame: a fixed 48-byte little-endian header, then the payload.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `KVSD` (`0x4453_564B` read as u32 LE) |
//! | 4 | 1 | version ([`VERSION`]) |
//! | 5 | 1 | kind ([`MessageKind`]) |
//! | 6 | 2 | flags (free for the stores: push/pull bits, dtype, ...) |
//! | 8 | 4 | command (ps-lite's `head`) |
//! | 12 | 4 | sender node id |
//! | 16 | 8 | request id (a response carries its request's) |
//! | 24 | 8 | key |
//! | 32 | 8 | aux (free: e.g. a length or a round number) |
//! | 40 | 8 | payload length in bytes (u64: no 2 GiB or 4 GiB limit) |

use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// `KVSD` in the first four bytes of every frame.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KVSD");
/// The frame format version this crate writes and accepts. It names the protocol spoken in the
/// frames too (2: init declarations carry a row length, pushes may carry rows; 3: they carry
/// the key's storage type; 4: pushes carry a step number), so that a process of another build
/// is refused at its first frame instead of misread.
pub const VERSION: u8 = 4;
/// Size of the header in bytes.
pub const HEADER_LEN: usize = 48;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// A request; the receiver answers with a response or an error carrying its request id.
    Request = 1,
    /// A successful response.
    Response = 2,
    /// A failed request: the payload is a UTF-8 message.
    Error = 3,
}

impl MessageKind {
    fn from_u8(v: u8) -> Option<MessageKind> {
        match v {
            1 => Some(MessageKind::Request),
            2 => Some(MessageKind::Response),
            3 => Some(MessageKind::Error),
            _ => None,
        }
    }
}

/// The decoded header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame is.
    pub kind: MessageKind,
    /// Free bits for the stores.
    pub flags: u16,
    /// The command (ps-lite's `head`).
    pub command: u32,
    /// The sender's node id (0: not assigned yet).
    pub sender: u32,
    /// The request id; a response carries its request's.
    pub request_id: u64,
    /// The key the message is about.
    pub key: u64,
    /// A free field.
    pub aux: u64,
    /// Length of the payload that follows, in bytes.
    pub payload_len: u64,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The first four bytes are not [`MAGIC`]: not our protocol.
    #[error("bad magic {0:#010x} (expected {MAGIC:#010x}, \"KVSD\"): not a kvstore-dist peer")]
    BadMagic(u32),
    /// Another version of the format.
    #[error("unsupported frame version {0} (this build speaks version {VERSION})")]
    BadVersion(u8),
    /// An unknown message kind.
    #[error("unknown message kind {0}")]
    BadKind(u8),
    /// The announced payload is larger than the receiver accepts.
    #[error(
        "announced payload of {len} bytes exceeds the maximum message size of {max} bytes \
         (KVSTORE_MAX_MESSAGE_BYTES); refused without allocating"
    )]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The receiver's maximum.
        max: u64,
    },
}

impl FrameHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5] = self.kind as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.command.to_le_bytes());
        b[12..16].copy_from_slice(&self.sender.to_le_bytes());
        b[16..24].copy_from_slice(&self.request_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.key.to_le_bytes());
        b[32..40].copy_from_slice(&self.aux.to_le_bytes());
        b[40..48].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Decodes a header, refusing a payload over `max_payload` bytes.
    pub fn decode(b: &[u8; HEADER_LEN], max_payload: u64) -> Result<FrameHeader, HeaderError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(HeaderError::BadVersion(b[4]));
        }
        let kind = MessageKind::from_u8(b[5]).ok_or(HeaderError::BadKind(b[5]))?;
        let payload_len = u64_at(40);
        if payload_len > max_payload {
            return Err(HeaderError::TooLarge {
                len: payload_len,
                max: max_payload,
            });
        }
        Ok(FrameHeader {
            kind,
            flags: u16_at(6),
            command: u32_at(8),
            sender: u32_at(12),
            request_id: u64_at(16),
            key: u64_at(24),
            aux: u64_at(32),
            payload_len,
        })
    }
}

/// A message to send: the header fields a caller chooses, and a borrowed payload (sent
/// without copying).
#[derive(Debug, Clone, Copy, Default)]
pub struct Outgoing<'a> {
    /// The command (ps-lite's `head`).
    pub command: u32,
    /// Free bits.
    pub flags: u16,
    /// The key.
    pub key: u64,
    /// A free field.
    pub aux: u64,
    /// The payload.
    pub payload: &'a [u8],
}

impl<'a> Outgoing<'a> {
    /// A message with `command` and `payload`, key and aux 0.
    pub fn new(command: u32, payload: &'a [u8]) -> Outgoing<'a> {
        Outgoing {
            command,
            payload,
            ..Outgoing::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: u64) -> Self {
        self.key = key;
        self
    }

    /// Sets the aux field.
    pub fn aux(mut self, aux: u64) -> Self {
        self.aux = aux;
        self
    }

    /// Sets the flags.
    pub fn flags(mut self, flags: u16) -> Self {
        self.flags = flags;
        self
    }

    pub(crate) fn header(&self, kind: MessageKind, sender: u32, request_id: u64) -> FrameHeader {
        FrameHeader {
            kind,
            flags: self.flags,
            command: self.command,
            sender,
            request_id,
            key: self.key,
            aux: self.aux,
            payload_len: self.payload.len() as u64,
        }
    }
}

/// Writes the header and the payload with vectored writes, straight from the caller's slice.
pub fn write_frame<W: Write>(w: &mut W, header: &FrameHeader, payload: &[u8]) -> io::Result<()> {
    let head = header.encode();
    let mut bufs = [IoSlice::new(&head), IoSlice::new(payload)];
    let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
    // Skip empty slices so that a zero-length write is not mistaken for a closed socket.
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the socket accepted no more bytes",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`write_frame`] to `stream`, whose write timeout is `limit` (as the transport configures
/// every stream), within `limit` in all: a peer that reads a big frame a little at a time,
/// each write making some progress, fails the write with [`io::ErrorKind::TimedOut`] once
/// `limit` has passed since the first byte, rather than hold the writer (and what its caller
/// holds) for as long as it likes. A frame written in one call costs nothing more.
pub fn write_frame_within(
    stream: &TcpStream,
    header: &FrameHeader,
    payload: &[u8],
    limit: Duration,
) -> io::Result<()> {
    let mut w = DeadlineWriter {
        stream,
        deadline: Instant::now() + limit,
        limit,
        calls: 0,
    };
    let written = write_frame(&mut w, header, payload);
    if w.calls > 1 {
        // Later writes shortened the timeout: back to the stream's own.
        stream.set_write_timeout(Some(limit))?;
    }
    written
}

/// A stream's writes bounded by one deadline (see [`write_frame_within`]).
struct DeadlineWriter<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
    limit: Duration,
    /// Writes so far: the first runs under the stream's own timeout, `limit`.
    calls: u32,
}

impl DeadlineWriter<'_> {
    fn before_write(&mut self) -> io::Result<()> {
        self.calls += 1;
        if self.calls == 1 {
            return Ok(());
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the peer did not read the whole message within {:?} (KVSTORE_TIMEOUT_SECS)",
                    self.limit
                ),
            ));
        }
        self.stream.set_write_timeout(Some(left))
    }
}

impl Write for DeadlineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.before_write()?;
        (&mut &*self.stream).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.before_write()?;
        (&mut &*self.stream).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = FrameHeader {
            kind: MessageKind::Response,
            flags: 0xBEEF,
            command: 7,
            sender: 9,
            request_id: u64::MAX - 1,
            key: 1 << 40,
            aux: 3,
            payload_len: 5 << 30,
        };
        assert_eq!(FrameHeader::decode(&h.encode(), u64::MAX).unwrap(), h);
    }

    #[test]
    fn empty_payload_writes_only_the_header() {
        let h = Outgoing::new(1, &[]).header(MessageKind::Request, 0, 1);
        let mut out = Vec::new();
        write_frame(&mut out, &h, &[]).unwrap();
        assert_eq!(out.len(), HEADER_LEN);
    }
}
