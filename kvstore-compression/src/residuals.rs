//! [`Residuals`]: the error-feedback state of a store, one `f32` vector per key and device.

use std::collections::HashMap;

use kvstore_base::Key;

/// The residuals of a store: one `f32` vector per `(key, device)`, created zeroed at its first
/// use, as MXNet's per-key, per-device residual arrays.
///
/// "Device" is whatever index the store uses to tell a key's pushed values apart: MXNet's
/// local stores index the residuals by the position of the value in the push (the `i`-th
/// value of a key uses residual `i`), its dist workers keep one per key (device `0`, after
/// the worker's own reduction).
///
/// ```
/// use kvstore_base::Key;
/// use kvstore_compression::{Codec, Residuals};
///
/// let codec = Codec::two_bit(0.5);
/// let mut residuals = Residuals::new();
/// let grad = [0.3f32; 16];
/// let mut packed = vec![0u8; codec.compressed_len(grad.len())];
/// for _ in 0..2 {
///     let r = residuals.get_or_zeroed(&Key::from(3), 0, grad.len());
///     codec.quantize(&grad, r, &mut packed).unwrap();
/// }
/// // 0.3 + 0.3 = 0.6 >= 0.5 at the second push: every code is 11, 0.1 is left over.
/// assert_eq!(packed, vec![0xFF; 4]);
/// assert!(residuals.get(&Key::from(3), 0).unwrap().iter().all(|&r| (r - 0.1).abs() < 1e-6));
/// ```
#[derive(Debug, Default, Clone)]
pub struct Residuals {
    map: HashMap<(Key, usize), Vec<f32>>,
}

impl Residuals {
    /// No residuals yet.
    pub fn new() -> Self {
        Residuals::default()
    }

    /// The residual of `key` on `device`, `len` elements: created zeroed at the first call;
    /// replaced by zeros when it has another length (the key now has another size).
    pub fn get_or_zeroed(&mut self, key: &Key, device: usize, len: usize) -> &mut [f32] {
        let r = self.map.entry((key.clone(), device)).or_default();
        if r.len() != len {
            r.clear();
            r.resize(len, 0.0);
        }
        r
    }

    /// The residual of `key` on `device`, if it exists.
    pub fn get(&self, key: &Key, device: usize) -> Option<&[f32]> {
        self.map.get(&(key.clone(), device)).map(Vec::as_slice)
    }

    /// Forgets every residual of `key` (e.g. when the key is initialised again).
    pub fn remove_key(&mut self, key: &Key) {
        self.map.retain(|(k, _), _| k != key);
    }

    /// Forgets every residual.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// How many `(key, device)` residuals exist.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
