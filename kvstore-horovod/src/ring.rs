//! The data plane: a mailbox of received chunks, the ring all-reduce and the broadcast chain.
//!
//! A fused buffer of `E` elements is cut into `n` chunks, chunk `c` holding elements
//! `c E / n .. (c + 1) E / n` (so any `E`, divisible by `n` or not, zero included). Rank `r`
//! sends only to rank `r + 1` and receives only from rank `r - 1`:
//!
//! - **reduce-scatter**, steps `s = 0 .. n - 1`: send chunk `r - s`, receive chunk `r - s - 1`
//!   and add it in (in the dtype's arithmetic); rank `r` then holds the complete sum of chunk
//!   `r + 1`;
//! - **all-gather**, steps `s = 0 .. n - 1`: send chunk `r + 1 - s`, receive chunk `r - s` and
//!   copy it in.
//!
//! Each rank sends `2 (n - 1)` chunks, `2 (n - 1) / n` of the buffer, whatever `n`. Every
//! element's sum is computed once, on one rank, and copied to the others: all ranks get
//! bit-identical results. Chunks travel in pieces of at most [`PIECE_BYTES`], so that a piece
//! is added while the next one is on the wire. Empty chunks are not sent.
//!
//! The buffer is a list of `Segments`: the fused tensors' own memory, in the group's order,
//! seen as one buffer. A piece never crosses the end of a segment, so pieces are sent from
//! and received into the tensors themselves: fusing tensors costs no packing copy. Every rank
//! cuts the same group the same way (same tensors, same order, same sizes), so pieces match.
//!
//! A broadcast goes down the chain `0 → 1 → … → n - 1` in pieces, each rank forwarding a
//! piece as soon as it has it.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use half::{bf16, f16};
use kvstore_base::DType;
use kvstore_dist::transport::{Connection, Outgoing, Payload, Pending, TransportError};

use crate::wire::CMD_DATA;

/// The largest message of a chunk: bigger chunks go in several pieces.
pub const PIECE_BYTES: usize = 1 << 20;

/// Chunks received from the previous rank, by (group sequence number, message id).
#[derive(Default)]
pub(crate) struct Mailbox {
    slots: Mutex<Slots>,
    arrived: Condvar,
}

#[derive(Default)]
struct Slots {
    chunks: HashMap<(u64, u64), Payload>,
    /// Groups this rank gave up on (or never ran): chunks still arriving for them are
    /// dropped, not kept forever.
    dead: HashSet<u64>,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Files a received chunk (dropped when its group is one this rank gave up on).
    pub(crate) fn put(&self, seq: u64, id: u64, payload: Payload) {
        let mut slots = self.lock();
        if slots.dead.contains(&seq) {
            return;
        }
        slots.chunks.insert((seq, id), payload);
        drop(slots);
        self.arrived.notify_all();
    }

    /// Gives up on group `seq`: drops what arrived of it and whatever arrives later.
    pub(crate) fn forget(&self, seq: u64) {
        let mut slots = self.lock();
        slots.chunks.retain(|(s, _), _| *s != seq);
        slots.dead.insert(seq);
    }

    /// Waits for chunk `(seq, id)` until `deadline`.
    fn take(&self, seq: u64, id: u64, deadline: Instant) -> Option<Payload> {
        let mut slots = self.lock();
        loop {
            if let Some(p) = slots.chunks.remove(&(seq, id)) {
                return Some(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            slots = match self.arrived.wait_timeout(slots, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// `dst += src`, both holding elements of `dtype` in native byte order: floats in their own
/// precision, half types rounded through `f32`, integers wrapping (MXNet's arithmetic).
pub(crate) fn add_bytes(dtype: DType, dst: &mut [u8], src: &[u8]) -> Result<(), String> {
    if dst.len() != src.len() {
        return Err(format!(
            "a chunk of {} bytes cannot be added to one of {}",
            src.len(),
            dst.len()
        ));
    }
    macro_rules! lanes {
        ($t:ty, |$a:ident, $b:ident| $e:expr) => {{
            const N: usize = std::mem::size_of::<$t>();
            for (d, s) in dst.chunks_exact_mut(N).zip(src.chunks_exact(N)) {
                let $a = <$t>::from_ne_bytes(d.try_into().expect("N bytes"));
                let $b = <$t>::from_ne_bytes(s.try_into().expect("N bytes"));
                d.copy_from_slice(&($e).to_ne_bytes());
            }
        }};
    }
    match dtype {
        DType::F32 => lanes!(f32, |a, b| a + b),
        DType::F64 => lanes!(f64, |a, b| a + b),
        DType::F16 => add_f16_bytes(dst, src),
        DType::BF16 => lanes!(bf16, |a, b| bf16::from_f32(a.to_f32() + b.to_f32())),
        DType::I32 => lanes!(i32, |a, b| a.wrapping_add(b)),
        DType::I64 => lanes!(i64, |a, b| a.wrapping_add(b)),
        DType::U8 => lanes!(u8, |a, b| a.wrapping_add(b)),
        other => return Err(format!("{other} cannot be summed by the horovod store")),
    }
    Ok(())
}

/// `dst += src` of `float16` elements (same length, even), each sum rounded through `f32` as
/// alone, a block at a time so that the conversions use the CPU's instructions (F16C) where it
/// has them: a ring under fp16 compression adds float16 chunks at every step.
fn add_f16_bytes(dst: &mut [u8], src: &[u8]) {
    use half::slice::HalfFloatSliceExt;
    const BLOCK: usize = 64;
    let mut halves = [f16::ZERO; BLOCK];
    let (mut sums, mut addends) = ([0f32; BLOCK], [0f32; BLOCK]);
    for (d, s) in dst.chunks_mut(2 * BLOCK).zip(src.chunks(2 * BLOCK)) {
        let n = d.len() / 2;
        let read = |bytes: &[u8], halves: &mut [f16; BLOCK], out: &mut [f32]| {
            for (h, b) in halves.iter_mut().zip(bytes.chunks_exact(2)) {
                *h = f16::from_ne_bytes([b[0], b[1]]);
            }
            halves[..n].convert_to_f32_slice(out);
        };
        read(d, &mut halves, &mut sums[..n]);
        read(s, &mut halves, &mut addends[..n]);
        for (x, y) in sums[..n].iter_mut().zip(&addends[..n]) {
            *x += *y;
        }
        halves[..n].convert_from_f32_slice(&sums[..n]);
        for (b, h) in d.chunks_exact_mut(2).zip(&halves[..n]) {
            b.copy_from_slice(&h.to_ne_bytes());
        }
    }
}

/// The byte range of chunk `c` of a buffer of `elements` elements of `size` bytes in `n` chunks.
pub(crate) fn chunk(c: usize, n: usize, elements: usize, size: usize) -> std::ops::Range<usize> {
    let at = |c: usize| (c as u128 * elements as u128 / n as u128) as usize * size;
    at(c)..at(c + 1)
}

/// The message id of piece `piece` of step `step`.
fn id(step: usize, piece: usize) -> u64 {
    ((step as u64) << 32) | piece as u64
}

/// This rank's place in the ring and its links.
pub(crate) struct Ring<'a> {
    pub rank: usize,
    pub size: usize,
    /// The connection to rank `rank + 1`.
    pub next: &'a Connection,
    pub mailbox: &'a Mailbox,
    /// Bound on each wait for a chunk.
    pub timeout: Duration,
}

/// A failure of the data plane, as text for the caller to wrap.
type Failed = String;

/// The tensors of a group, in the group's order, seen as one buffer of their concatenated
/// bytes (elements of one dtype).
pub(crate) struct Segments<'a> {
    parts: Vec<&'a mut [u8]>,
    /// Where each part starts in the concatenation.
    starts: Vec<usize>,
    len: usize,
}

impl<'a> Segments<'a> {
    /// The concatenation of `parts`, in order.
    pub(crate) fn new(parts: Vec<&'a mut [u8]>) -> Segments<'a> {
        let mut starts = Vec::with_capacity(parts.len());
        let mut len = 0;
        for p in &parts {
            starts.push(len);
            len += p.len();
        }
        Segments { parts, starts, len }
    }

    /// Bytes in all.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The pieces of the byte range `range` of the concatenation: `(part, range in the
    /// part)`, in order, each at most [`PIECE_BYTES`] and within one part.
    fn pieces(&self, range: std::ops::Range<usize>) -> Vec<(usize, std::ops::Range<usize>)> {
        let mut out = Vec::new();
        if range.is_empty() {
            return out;
        }
        // The last part starting at or before `range.start`.
        let first = self.starts.partition_point(|&s| s <= range.start) - 1;
        for (i, part) in self.parts.iter().enumerate().skip(first) {
            let start = self.starts[i];
            if start >= range.end {
                break;
            }
            let from = range.start.max(start) - start;
            let to = range.end.min(start + part.len()) - start;
            let mut at = from;
            while at < to {
                let end = (at + PIECE_BYTES).min(to);
                out.push((i, at..end));
                at = end;
            }
        }
        out
    }

    fn slice(&self, part: usize, range: std::ops::Range<usize>) -> &[u8] {
        &self.parts[part][range]
    }

    fn slice_mut(&mut self, part: usize, range: std::ops::Range<usize>) -> &mut [u8] {
        &mut self.parts[part][range]
    }
}

impl Ring<'_> {
    fn prev(&self) -> usize {
        (self.rank + self.size - 1) % self.size
    }

    /// Sends message `id` of group `seq` to the next rank.
    fn send(
        &self,
        seq: u64,
        id: u64,
        bytes: &[u8],
        acks: &mut Vec<Pending>,
        what: &str,
    ) -> Result<(), Failed> {
        let out = Outgoing::new(CMD_DATA, bytes).key(seq).aux(id);
        let p = self
            .next
            .send(out, what)
            .map_err(|e| format!("sending to rank {}: {e}", (self.rank + 1) % self.size))?;
        acks.push(p);
        Ok(())
    }

    /// Receives message `id` of group `seq` (step `step`) into `dst`, adding when `add` (else
    /// copying).
    fn receive(
        &self,
        seq: u64,
        (step, id): (usize, u64),
        dst: &mut [u8],
        add: Option<DType>,
        what: &str,
    ) -> Result<(), Failed> {
        let deadline = Instant::now() + self.timeout;
        let got = self.mailbox.take(seq, id, deadline).ok_or_else(|| {
            format!(
                "rank {} sent nothing within {:?} ({what}, operation {seq}, step {step})",
                self.prev(),
                self.timeout
            )
        })?;
        if got.len() != dst.len() {
            return Err(format!(
                "rank {} sent {} bytes where {} were expected ({what}, step {step})",
                self.prev(),
                got.len(),
                dst.len()
            ));
        }
        match add {
            Some(dtype) => add_bytes(dtype, dst, &got),
            None => {
                dst.copy_from_slice(&got);
                Ok(())
            }
        }
    }

    /// One step of the ring: sends the pieces of `out` of `buf` and receives those of `into`
    /// (adding when `add`), alternately, so that a piece is added while the next one travels
    /// and only a few pieces wait in the mailbox at a time.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        seq: u64,
        step: usize,
        buf: &mut Segments<'_>,
        out: std::ops::Range<usize>,
        into: std::ops::Range<usize>,
        add: Option<DType>,
        acks: &mut Vec<Pending>,
        what: &str,
    ) -> Result<(), Failed> {
        let sends = buf.pieces(out);
        let receives = buf.pieces(into);
        for piece in 0..sends.len().max(receives.len()) {
            if let Some((part, r)) = sends.get(piece) {
                self.send(
                    seq,
                    id(step, piece),
                    buf.slice(*part, r.clone()),
                    acks,
                    what,
                )?;
            }
            if let Some((part, r)) = receives.get(piece) {
                let dst = buf.slice_mut(*part, r.clone());
                self.receive(seq, (step, id(step, piece)), dst, add, what)?;
            }
        }
        Ok(())
    }

    fn settle(acks: Vec<Pending>) -> Result<(), Failed> {
        let mut first: Option<TransportError> = None;
        for p in acks {
            if let Err(e) = p.wait() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), |e| Err(e.to_string()))
    }

    /// Sums `buf` (elements of `dtype`) across the ring, in place.
    pub(crate) fn allreduce(
        &self,
        seq: u64,
        dtype: DType,
        buf: &mut Segments<'_>,
        what: &str,
    ) -> Result<(), Failed> {
        let result = self.allreduce_inner(seq, dtype, buf, what);
        if result.is_err() {
            self.mailbox.forget(seq);
        }
        result
    }

    fn allreduce_inner(
        &self,
        seq: u64,
        dtype: DType,
        buf: &mut Segments<'_>,
        what: &str,
    ) -> Result<(), Failed> {
        let (n, r) = (self.size, self.rank);
        let size = dtype.size_of();
        let elements = buf.len() / size;
        if n == 1 || elements == 0 {
            return Ok(());
        }
        let mut acks = Vec::new();
        for s in 0..n - 1 {
            let out = chunk((r + n - s) % n, n, elements, size);
            let into = chunk((r + 2 * n - s - 1) % n, n, elements, size);
            self.step(seq, s, buf, out, into, Some(dtype), &mut acks, what)?;
        }
        for s in 0..n - 1 {
            let out = chunk((r + 1 + n - s) % n, n, elements, size);
            let into = chunk((r + n - s) % n, n, elements, size);
            self.step(seq, n - 1 + s, buf, out, into, None, &mut acks, what)?;
        }
        Self::settle(acks)
    }

    /// Copies rank 0's `buf` into every rank's, down the chain.
    pub(crate) fn broadcast(
        &self,
        seq: u64,
        buf: &mut Segments<'_>,
        what: &str,
    ) -> Result<(), Failed> {
        let result = self.broadcast_inner(seq, buf, what);
        if result.is_err() {
            self.mailbox.forget(seq);
        }
        result
    }

    fn broadcast_inner(&self, seq: u64, buf: &mut Segments<'_>, what: &str) -> Result<(), Failed> {
        let n = self.size;
        if n == 1 || buf.len() == 0 {
            return Ok(());
        }
        let forward = self.rank + 1 < n;
        let mut acks = Vec::new();
        for (step, (part, r)) in buf.pieces(0..buf.len()).into_iter().enumerate() {
            // One piece per step: step `step`, piece 0.
            if self.rank > 0 {
                let dst = buf.slice_mut(part, r.clone());
                self.receive(seq, (step, id(step, 0)), dst, None, what)?;
            }
            if forward {
                self.send(seq, id(step, 0), buf.slice(part, r), &mut acks, what)?;
            }
        }
        Self::settle(acks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_for_any_size() {
        for n in 1..6 {
            for elements in [0, 1, 2, 3, 7, 10, 1001] {
                let mut end = 0;
                for c in 0..n {
                    let r = chunk(c, n, elements, 4);
                    assert_eq!(r.start, end);
                    end = r.end;
                }
                assert_eq!(end, elements * 4);
            }
        }
    }

    #[test]
    fn pieces_cover_a_range_within_parts_and_piece_bytes() {
        let mut a = vec![0u8; 10];
        let mut b = vec![0u8; 0];
        let mut c = vec![0u8; PIECE_BYTES + 6];
        let segs = Segments::new(vec![&mut a, &mut b, &mut c]);
        assert_eq!(segs.len(), PIECE_BYTES + 16);
        assert_eq!(segs.pieces(4..4), vec![]);
        assert_eq!(segs.pieces(2..8), vec![(0, 2..8)]);
        assert_eq!(segs.pieces(6..14), vec![(0, 6..10), (2, 0..4)]);
        assert_eq!(
            segs.pieces(10..PIECE_BYTES + 16),
            vec![(2, 0..PIECE_BYTES), (2, PIECE_BYTES..PIECE_BYTES + 6)]
        );
        assert_eq!(
            segs.pieces(0..PIECE_BYTES + 16),
            vec![
                (0, 0..10),
                (2, 0..PIECE_BYTES),
                (2, PIECE_BYTES..PIECE_BYTES + 6)
            ]
        );
    }

    #[test]
    fn adds_in_each_dtype() {
        let mut a = 1.5f32.to_ne_bytes().to_vec();
        add_bytes(DType::F32, &mut a, &2.25f32.to_ne_bytes()).unwrap();
        assert_eq!(f32::from_ne_bytes(a[..].try_into().unwrap()), 3.75);
        let mut u = vec![250u8];
        add_bytes(DType::U8, &mut u, &[10]).unwrap();
        assert_eq!(u, vec![4]);
        let mut h = f16::from_f32(1.0).to_ne_bytes().to_vec();
        add_bytes(DType::F16, &mut h, &f16::from_f32(0.5).to_ne_bytes()).unwrap();
        assert_eq!(f16::from_ne_bytes(h[..].try_into().unwrap()).to_f32(), 1.5);
        assert!(add_bytes(DType::I32, &mut [0u8; 4], &[0u8; 8]).is_err());
    }

    #[test]
    fn chunks_of_a_group_given_up_on_are_dropped_even_when_they_come_later() {
        let mailbox = Mailbox::default();
        let soon = || Instant::now() + std::time::Duration::from_millis(20);
        mailbox.put(1, 0, Payload::from(vec![1u8]));
        mailbox.put(2, 0, Payload::from(vec![2u8]));
        mailbox.forget(1);
        mailbox.put(1, 1, Payload::from(vec![3u8]));
        assert!(mailbox.take(1, 0, soon()).is_none());
        assert!(mailbox.take(1, 1, soon()).is_none());
        assert_eq!(
            mailbox.lock().chunks.len(),
            1,
            "only group 2's chunk is kept"
        );
        assert_eq!(&mailbox.take(2, 0, soon()).unwrap()[..], &[2u8]);
    }

    #[test]
    fn float16_chunks_add_as_element_by_element_rounding() {
        // 300 elements: whole blocks and a tail; ties, overflow, subnormals, NaN.
        let a: Vec<f16> = (0..300)
            .map(|i| f16::from_f32((i as f32 * 0.731).sin() * 40000.0))
            .chain([f16::from_f32(2048.0), f16::MAX, f16::from_bits(1), f16::NAN])
            .collect();
        let b: Vec<f16> = (0..300)
            .map(|i| f16::from_f32((i as f32 * 1.37).cos() * 30000.0))
            .chain([f16::from_f32(1.0), f16::MAX, f16::from_bits(1), f16::ONE])
            .collect();
        let bytes = |v: &[f16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_ne_bytes()).collect() };
        let mut sum = bytes(&a);
        add_bytes(DType::F16, &mut sum, &bytes(&b)).unwrap();
        let expected: Vec<f16> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f16::from_f32(x.to_f32() + y.to_f32()))
            .collect();
        let expected = bytes(&expected);
        assert_eq!(sum, expected);
    }
}
