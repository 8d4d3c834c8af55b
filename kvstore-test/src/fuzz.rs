//! Seeded random inputs for robustness tests: a small generator and the mutations of a valid
//! encoding that a damaged or hostile message would carry. Seeded, so that a failure replays.
//!
//! ```
//! use kvstore_test::fuzz::{mutated, Rng};
//!
//! let mut rng = Rng::new(7);
//! let valid = vec![vec![1u8, 2, 3, 4]];
//! for _ in 0..100 {
//!     let bytes = mutated(&mut rng, &valid);
//!     // ... decode `bytes`: an error is fine, a panic is not
//!     assert!(bytes.len() <= 96 + 4 + 3 * 16);
//! }
//! ```

/// xorshift64*: a small, fast, seeded generator (not for cryptography).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any value; 0 is made odd).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)] // not an iterator: it never ends
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// One of `items` (not empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Random bytes (half the time, up to 95 of them), else one of the `valid` encodings with up
/// to three changes: a byte replaced, the end cut off, or up to 15 random bytes appended.
pub fn mutated(rng: &mut Rng, valid: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = if valid.is_empty() || rng.below(2) == 0 {
        let n = rng.below(96) as usize;
        rng.bytes(n)
    } else {
        valid[rng.below(valid.len() as u64) as usize].clone()
    };
    for _ in 0..rng.below(4) {
        match rng.below(3) {
            0 if !bytes.is_empty() => {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] = rng.next() as u8;
            }
            1 => bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize),
            _ => {
                let n = rng.below(16) as usize;
                bytes.extend(rng.bytes(n));
            }
        }
    }
    bytes
}
