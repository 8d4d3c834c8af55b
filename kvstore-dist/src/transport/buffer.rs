//! Receive buffers: one allocation per message, reused through a small pool on servers.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, Weak};

/// A received payload: the first `len` bytes of a buffer.
///
/// The buffer keeps its full initialised length when it goes back to its pool, so a reused
/// buffer is never zeroed again; a fresh one comes from `vec![0; n]` (`calloc`: the kernel's
/// zero pages, no memset).
pub struct Payload {
    buf: Vec<u8>,
    len: usize,
    pool: Option<Weak<Pool>>,
}

impl Payload {
    /// A payload of `len` bytes in `buf` (grown if it is too small; never shrunk).
    pub(crate) fn with_buffer(mut buf: Vec<u8>, len: usize) -> Payload {
        if buf.len() < len {
            if buf.capacity() >= len {
                buf.resize(len, 0);
            } else {
                // Drop the old buffer first: one fresh zeroed allocation, no copy of old bytes.
                buf = vec![0u8; len];
            }
        }
        Payload {
            buf,
            len,
            pool: None,
        }
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The payload as a `Vec` (the buffer, truncated to the payload; it does not return to a
    /// pool).
    pub fn into_vec(mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.buf);
        v.truncate(self.len);
        v
    }
}

impl From<Vec<u8>> for Payload {
    /// A payload of exactly these bytes (belonging to no pool).
    fn from(bytes: Vec<u8>) -> Payload {
        let len = bytes.len();
        Payload::with_buffer(bytes, len)
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl DerefMut for Payload {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes)", self.len)
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take().and_then(|p| p.upgrade()) {
            pool.put(std::mem::take(&mut self.buf));
        }
    }
}

/// Buffers of one server connection, kept for reuse.
pub(crate) struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

/// Buffers smaller than this are not worth pooling.
const MIN_POOLED: usize = 64 * 1024;

impl Pool {
    pub(crate) fn new(max: usize) -> Arc<Pool> {
        Arc::new(Pool {
            free: Mutex::new(Vec::new()),
            max,
        })
    }

    /// A payload of `len` bytes: the smallest pooled buffer that fits, else a fresh one.
    pub(crate) fn take(self: &Arc<Pool>, len: usize) -> Payload {
        if len < MIN_POOLED || self.max == 0 {
            return Payload::with_buffer(Vec::new(), len);
        }
        let buf = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            match best {
                Some(i) => free.swap_remove(i),
                // Nothing fits: drop the largest so that the pool does not hold stale sizes.
                None => {
                    let largest = free
                        .iter()
                        .enumerate()
                        .max_by_key(|(_, b)| b.len())
                        .map(|(i, _)| i);
                    if let Some(i) = largest {
                        free.swap_remove(i);
                    }
                    Vec::new()
                }
            }
        };
        let mut p = Payload::with_buffer(buf, len);
        p.pool = Some(Arc::downgrade(self));
        p
    }

    fn put(&self, buf: Vec<u8>) {
        if buf.len() < MIN_POOLED {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.max {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_buffers_are_reused_without_shrinking() {
        let pool = Pool::new(2);
        let mut a = pool.take(1 << 20);
        a[0] = 7;
        let ptr = a.as_ptr();
        drop(a);
        let b = pool.take(1 << 19);
        assert_eq!(b.len(), 1 << 19);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.into_vec().len(), 1 << 19);
        let small = pool.take(10);
        assert_eq!(&*small, &[0u8; 10]);
    }
}
