//! Where a key's value lives on the servers: MXNet's `EncodeDefaultKey`, in wide arithmetic.
//!
//! - An array of fewer than `bigarray_bound` elements lives whole on one server, chosen by
//!   hashing the key: `(key * 9973) mod servers`. MXNet evaluates the product in 32-bit signed
//!   arithmetic, which overflows for keys above 215329 and then indexes a negative server; here
//!   it is computed in 128-bit with a non-negative remainder, so every int key (negative keys
//!   included) has a server. Placement only has to agree among workers, which it does as long
//!   as they share the bound and the server count.
//! - A bigger array is split into one contiguous slice per server: slice `i` has
//!   `round(n / S * (i + 1)) - round(n / S * i)` elements (division in `f64`, rounding half away
//!   from zero, as MXNet does), so every server stores and updates only its part. A row-sparse
//!   key's value is split the same way in whole rows ([`place_rows`], MXNet's
//!   `EncodeRowSparseKey`). A dense key is kept in whole rows too where that costs no balance
//!   ([`place_dense`]), so that the servers can apply row-sparse gradients to it.

use std::ops::Range;

/// The multiplier of MXNet's key hash.
const KEY_HASH: i128 = 9973;

/// The slices of one key's value and the servers that hold them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `(server rank, element range of the flattened value)`, in server order, covering the
    /// value exactly once.
    pub parts: Vec<(usize, Range<usize>)>,
}

impl Placement {
    /// Whether the value is split across servers.
    pub fn is_split(&self) -> bool {
        self.parts.len() > 1
    }
}

/// The server that holds a small key: `(key * 9973) mod servers`, never negative.
///
/// # Panics
/// If `servers` is 0 (a cluster always has at least one server; configuration checks it).
pub fn server_of(key: i64, servers: usize) -> usize {
    assert!(servers > 0, "a cluster has at least one server");
    let product = i128::from(key) * KEY_HASH;
    product.rem_euclid(servers as i128) as usize
}

/// Where the `elements` of `key`'s value live on `servers` servers.
///
/// ```
/// use kvstore_dist::placement::place;
/// // A small key lives whole on the server its hash picks.
/// assert_eq!(place(3, 10, 2, 1_000_000).parts, vec![(1, 0..10)]);
/// // A big key is split evenly across all of them.
/// let big = place(3, 3_000_000, 2, 1_000_000);
/// assert_eq!(big.parts, vec![(0, 0..1_500_000), (1, 1_500_000..3_000_000)]);
/// ```
///
/// # Panics
/// If `servers` is 0.
pub fn place(key: i64, elements: usize, servers: usize, bigarray_bound: usize) -> Placement {
    place_units(key, elements, 1, servers, bigarray_bound)
}

/// Where the `rows` rows of `row_len` elements of a row-sparse `key` live on `servers`
/// servers: MXNet's `EncodeRowSparseKey`. As [`place`], but a split value is cut between
/// rows (server `i` holds rows `round(R / S * i)..round(R / S * (i + 1))`), so that every
/// server holds whole rows and can apply a row-sparse gradient to them. The ranges are in
/// elements, as [`place`]'s.
///
/// ```
/// use kvstore_dist::placement::place_rows;
/// // 5 rows of 4 elements, split over 2 servers: rows 0..3 (rounded half away from zero) and
/// // 3..5.
/// let big = place_rows(3, 5, 4, 2, 8);
/// assert_eq!(big.parts, vec![(0, 0..12), (1, 12..20)]);
/// ```
///
/// # Panics
/// If `servers` is 0.
pub fn place_rows(
    key: i64,
    rows: usize,
    row_len: usize,
    servers: usize,
    bigarray_bound: usize,
) -> Placement {
    place_units(key, rows, row_len, servers, bigarray_bound)
}

/// Where a dense `key` of `rows` rows of `row_len` elements lives, and whether its parts hold
/// whole rows (the servers then keep it by rows and apply a row-sparse gradient to it lazily,
/// as MXNet's `local` store does; MXNet's servers abort on one): [`place`] when its cuts fall
/// between rows (always for a key that is
/// not split, and for 1-D keys); else [`place_rows`] when its largest part is at most a tenth
/// larger than [`place`]'s (a key of many rows); else [`place`], flat (a wide key of few rows,
/// which cutting between rows would leave unbalanced).
///
/// ```
/// use kvstore_dist::placement::{place, place_dense};
/// // 100,000 rows of 64 over 3 servers: element cuts fall inside rows, row cuts balance.
/// let (embedding, by_rows) = place_dense(3, 100_000, 64, 3, 1_000_000);
/// assert!(by_rows && embedding.parts[1].1.len() % 64 == 0);
/// // 2 rows of 1,000,000 over 4 servers: cutting between rows would idle two servers.
/// let (wide, by_rows) = place_dense(3, 2, 1_000_000, 4, 1_000_000);
/// assert!(!by_rows && wide == place(3, 2_000_000, 4, 1_000_000));
/// ```
///
/// # Panics
/// If `servers` is 0.
pub fn place_dense(
    key: i64,
    rows: usize,
    row_len: usize,
    servers: usize,
    bigarray_bound: usize,
) -> (Placement, bool) {
    let by_elements = place(key, rows.saturating_mul(row_len), servers, bigarray_bound);
    let cut_between_rows = row_len > 0
        && by_elements
            .parts
            .iter()
            .all(|(_, range)| range.start % row_len == 0);
    if cut_between_rows {
        return (by_elements, true);
    }
    let by_rows = place_rows(key, rows, row_len, servers, bigarray_bound);
    let largest = |p: &Placement| p.parts.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    let balanced = largest(&by_rows).saturating_mul(10) <= largest(&by_elements).saturating_mul(11);
    match balanced {
        true => (by_rows, true),
        false => (by_elements, false),
    }
}

/// [`place`] of `units` units of `unit` elements each, cut between units.
fn place_units(
    key: i64,
    units: usize,
    unit: usize,
    servers: usize,
    bigarray_bound: usize,
) -> Placement {
    let elements = units.saturating_mul(unit);
    if elements < bigarray_bound || servers == 1 {
        return Placement {
            parts: vec![(server_of(key, servers), 0..elements)],
        };
    }
    let share = units as f64 / servers as f64;
    let boundary = |i: usize| -> usize {
        if i == servers {
            units
        } else {
            (share * i as f64).round() as usize
        }
    };
    Placement {
        parts: (0..servers)
            .map(|i| (i, boundary(i) * unit..boundary(i + 1) * unit))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_keys_are_kept_by_rows_where_that_keeps_the_balance() {
        // Unsplit, 1-D, and split where element cuts fall between rows: MXNet's placement.
        for (rows, row_len, servers) in [(4usize, 2usize, 3usize), (10, 1, 3), (1000, 64, 2)] {
            let (p, by_rows) = place_dense(5, rows, row_len, servers, 100);
            assert!(by_rows, "{rows} x {row_len}");
            assert_eq!(p, place(5, rows * row_len, servers, 100));
        }
        // Element cuts inside rows: row cuts when balanced.
        let (p, by_rows) = place_dense(5, 1000, 64, 3, 100);
        assert!(by_rows);
        assert_eq!(p, place_rows(5, 1000, 64, 3, 100));
        // Few wide rows: flat.
        for (rows, servers) in [(1usize, 2usize), (3, 2), (10, 4)] {
            let (p, by_rows) = place_dense(5, rows, 1_000_001, servers, 100);
            assert!(!by_rows, "{rows} rows on {servers} servers");
            assert_eq!(p, place(5, rows * 1_000_001, servers, 100));
        }
    }

    #[test]
    fn small_keys_hash_like_mxnet_where_mxnet_does_not_overflow() {
        // (key * 9973) % S in 32-bit is exact for keys up to 215329.
        for key in [0i64, 1, 2, 3, 77, 1000, 215_329] {
            for servers in 1..=5usize {
                let mxnet = ((key as i32).wrapping_mul(9973) % servers as i32) as usize;
                assert_eq!(
                    server_of(key, servers),
                    mxnet,
                    "key {key}, {servers} servers"
                );
            }
        }
    }

    #[test]
    fn keys_that_overflow_in_mxnet_still_have_a_server() {
        for key in [300_001i64, -1, i64::MIN, i64::MAX] {
            for servers in 1..=4 {
                assert!(server_of(key, servers) < servers);
            }
        }
    }

    #[test]
    fn big_values_are_split_evenly_and_exactly_once() {
        for (elements, servers) in [(1_000_000usize, 3usize), (1_000_001, 2), (5_000_003, 7)] {
            let placement = place(9, elements, servers, 1_000_000);
            assert!(placement.is_split());
            assert_eq!(placement.parts.len(), servers);
            let mut next = 0;
            for (i, (server, range)) in placement.parts.iter().enumerate() {
                assert_eq!(*server, i);
                assert_eq!(range.start, next);
                let expected = (elements as f64 / servers as f64 * (i + 1) as f64).round() as usize
                    - (elements as f64 / servers as f64 * i as f64).round() as usize;
                assert_eq!(range.len(), expected.min(elements - next));
                next = range.end;
            }
            assert_eq!(next, elements);
        }
    }

    #[test]
    fn row_sparse_values_are_split_between_rows_as_mxnet_does() {
        // MXNet's EncodeRowSparseKey: r_i = llround(R / S * (i + 1)) - llround(R / S * i).
        for (rows, row_len, servers) in [(7usize, 3usize, 2usize), (10, 5, 3), (2, 8, 4)] {
            let placement = place_rows(1, rows, row_len, servers, 1);
            assert_eq!(placement.parts.len(), servers);
            let mut next = 0;
            for (i, (server, range)) in placement.parts.iter().enumerate() {
                let r = |i: usize| (rows as f64 / servers as f64 * i as f64).round() as usize;
                assert_eq!((*server, range.start), (i, next));
                assert_eq!(range.len(), (r(i + 1) - r(i)) * row_len);
                next = range.end;
            }
            assert_eq!(next, rows * row_len);
        }
        // The bound counts elements, not rows; below it the key lives whole on one server.
        assert!(!place_rows(1, 10, 4, 2, 41).is_split());
        assert!(place_rows(1, 10, 4, 2, 40).is_split());
        assert_eq!(place_rows(3, 10, 4, 2, 41), place(3, 40, 2, 41));
    }

    #[test]
    fn the_bound_is_in_elements_and_one_server_never_splits() {
        assert!(!place(1, 999_999, 4, 1_000_000).is_split());
        assert!(place(1, 1_000_000, 4, 1_000_000).is_split());
        assert_eq!(
            place(1, 5_000_000, 1, 1_000_000).parts,
            vec![(0, 0..5_000_000)]
        );
    }
}
