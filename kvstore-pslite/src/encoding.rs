//! Where MXNet 1.9.1 puts a key on the servers, and the command word of its messages: the
//! worker must reproduce both exactly for an MXNet server to read its requests.
//!
//! - **Key ranges.** ps-lite gives server `i` of `S` the keys
//!   `[⌊(2^64 − 1) / S⌋ · i, ⌊(2^64 − 1) / S⌋ · (i + 1))`; a message's key is the start of its
//!   server's range plus MXNet's int key ([`ps_key`]).
//! - **Placement** (`EncodeDefaultKey`). An array of fewer than `MXNET_KVSTORE_BIGARRAY_BOUND`
//!   elements (1,000,000 by default) lives whole on server `(key · 9973) mod S`, computed as
//!   MXNet computes it, in 32-bit signed arithmetic; a bigger one is cut into one slice per
//!   server ([`kvstore_dist::placement::place`], the same rounding). MXNet's product
//!   overflows for keys above 215,329; where it wraps to a negative server, MXNet's worker
//!   indexes outside its server list and crashes, so no MXNet worker can use such a key: this
//!   worker then takes the non-negative remainder ([`small_key_server`]).
//! - **Command word** (`GetCommandType`): `((m + d)(m + d + 1)) / 2 + d` for request type `m`
//!   (0 for a dense push or pull) and MXNet's dtype id `d` ([`command`]).

use std::ops::Range;

use kvstore_base::DType;

/// One slice of a key's value: the server that holds it, its ps-lite key, and the elements of
/// the flattened value it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// The server's rank.
    pub server: usize,
    /// The key of the slice's messages.
    pub ps_key: u64,
    /// The elements of the flattened value.
    pub elements: Range<usize>,
}

/// The first key of server `server`'s range among `servers` (ps-lite's
/// `GetServerKeyRanges`).
pub fn range_begin(server: usize, servers: usize) -> u64 {
    (u64::MAX / servers as u64) * server as u64
}

/// The ps-lite key of MXNet key `key` on `server`: its range's start plus the key, the key
/// sign-extended as C++ converts an `int` to `uint64_t`.
pub fn ps_key(key: i32, server: usize, servers: usize) -> u64 {
    range_begin(server, servers).wrapping_add(i64::from(key) as u64)
}

/// The server MXNet 1.9.1 puts a small key on: `(key * 9973) % servers` in 32-bit signed
/// arithmetic (the product wrapping as it does in MXNet's build). Where that is negative (MXNet's
/// worker crashes on such a key, so none uses it), the non-negative remainder.
pub fn small_key_server(key: i32, servers: usize) -> usize {
    let servers = i32::try_from(servers).unwrap_or(i32::MAX);
    key.wrapping_mul(9973).rem_euclid(servers) as usize
}

/// The slices of MXNet key `key`, a value of `elements` elements, on `servers` servers.
///
/// ```
/// use kvstore_pslite::encoding::place;
/// // A small key: whole on server (3 * 9973) % 2 = 1.
/// let small = place(3, 10, 2, 1_000_000).unwrap();
/// assert_eq!((small[0].server, small[0].elements.clone()), (1, 0..10));
/// // A big one: one slice per server.
/// let big = place(3, 3_000_000, 2, 1_000_000).unwrap();
/// assert_eq!(big.len(), 2);
/// assert_eq!(big[1].ps_key, u64::MAX / 2 + 3);
/// ```
///
/// # Errors
/// No servers.
pub fn place(
    key: i32,
    elements: usize,
    servers: usize,
    bigarray_bound: usize,
) -> Result<Vec<Slice>, String> {
    if servers == 0 {
        return Err("the job has no servers".into());
    }
    if elements >= bigarray_bound {
        let placement =
            kvstore_dist::placement::place(i64::from(key), elements, servers, bigarray_bound);
        return Ok(slices_of(key, placement, servers));
    }
    let server = small_key_server(key, servers);
    Ok(vec![Slice {
        server,
        ps_key: ps_key(key, server, servers),
        elements: 0..elements,
    }])
}

/// The slices of row-sparse MXNet key `key`, `rows` rows of `row_len` elements, as MXNet
/// 1.9.1's `EncodeRowSparseKey` lays them out: whole on the server [`place`] gives a small key
/// (fewer than `bigarray_bound` elements), else cut by **rows** over every server, server `i`
/// holding `round(r / S · (i + 1)) − round(r / S · i)` of the `r` rows. A slice's ps-lite key
/// is the key's *master key* on its server; its elements are those of its rows.
///
/// ```
/// use kvstore_pslite::encoding::place_rows;
/// // 400 rows of 5 on 2 servers, above the bound: rows 0..200 and 200..400.
/// let slices = place_rows(10, 400, 5, 2, 1000).unwrap();
/// assert_eq!(slices[0].elements, 0..1000);
/// assert_eq!(slices[1].elements, 1000..2000);
/// // Below it: whole on server (10 * 9973) % 2 = 0.
/// assert_eq!(place_rows(10, 6, 3, 2, 1000).unwrap()[0].elements, 0..18);
/// ```
///
/// # Errors
/// No servers.
pub fn place_rows(
    key: i32,
    rows: usize,
    row_len: usize,
    servers: usize,
    bigarray_bound: usize,
) -> Result<Vec<Slice>, String> {
    if servers == 0 {
        return Err("the job has no servers".into());
    }
    let elements = rows.saturating_mul(row_len);
    if elements < bigarray_bound {
        return place(key, elements, servers, bigarray_bound);
    }
    let placement =
        kvstore_dist::placement::place_rows(i64::from(key), rows, row_len, servers, bigarray_bound);
    Ok(slices_of(key, placement, servers))
}

/// The slices of a split key's parts (every server's, MXNet's key on each).
fn slices_of(
    key: i32,
    placement: kvstore_dist::placement::Placement,
    servers: usize,
) -> Vec<Slice> {
    placement
        .parts
        .into_iter()
        .map(|(server, elements)| Slice {
            server,
            ps_key: ps_key(key, server, servers),
            elements,
        })
        .collect()
}

/// One slice of a compressed push (`EncodeCompressedKey`): the slice of the value it stands for
/// (the pull layout), the key that tells the server the slice's length in elements, and the
/// 32-bit words of the packed value it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedSlice {
    /// The server, the ps-lite key and the elements of the value the slice covers (a pull
    /// and `init` of the key use these slices).
    pub slice: Slice,
    /// The first key of the message: its server's range start plus the slice's length in
    /// elements (MXNet sends it with an empty value).
    pub size_key: u64,
    /// The 32-bit words of the packed value the slice carries.
    pub words: Range<usize>,
}

/// The slices of MXNet key `key`, a value of `elements` elements, when gradient compression
/// packs `factor` elements per 32-bit word (16 for 2-bit), as MXNet 1.9.1's
/// `EncodeCompressedKey` lays them out.
///
/// A small key lives whole on the server [`place`] gives it. A big one (at least
/// `bigarray_bound` elements) is cut by **words**: server `i` but the last gets
/// `round(w / S · (i + 1)) − round(w / S · i)` of the `w = ⌈elements / factor⌉` words and
/// `factor` elements per word; the last server the rest. So a big key is split otherwise than
/// without compression ([`place`]), and every worker and server must agree on which layout a
/// key has from its `init` on.
///
/// ```
/// use kvstore_pslite::encoding::place_compressed;
/// // 3,000 elements on 2 servers, 16 per word: 188 words, 94 (1,504 elements) on server 0.
/// let slices = place_compressed(10, 3000, 2, 1000, 16).unwrap();
/// assert_eq!(slices[0].slice.elements, 0..1504);
/// assert_eq!(slices[1].slice.elements, 1504..3000);
/// assert_eq!((slices[0].words.clone(), slices[1].words.clone()), (0..94, 94..188));
/// // The size key: the range start plus the slice's length.
/// assert_eq!(slices[1].size_key, u64::MAX / 2 + 1496);
/// ```
///
/// # Errors
/// No servers, or a big key too small to give every server but the last its whole words
/// (MXNet's worker would compute a negative last slice; raise `MXNET_KVSTORE_BIGARRAY_BOUND`).
pub fn place_compressed(
    key: i32,
    elements: usize,
    servers: usize,
    bigarray_bound: usize,
    factor: usize,
) -> Result<Vec<PackedSlice>, String> {
    let words = elements.div_ceil(factor);
    if elements < bigarray_bound {
        return Ok(place(key, elements, servers, bigarray_bound)?
            .into_iter()
            .map(|slice| PackedSlice {
                size_key: range_begin(slice.server, servers).wrapping_add(elements as u64),
                words: 0..words,
                slice,
            })
            .collect());
    }
    if servers == 0 {
        return Err("the job has no servers".into());
    }
    let share = |i: usize| (words as f64 / servers as f64 * i as f64).round() as usize;
    let (mut word, mut element) = (0, 0);
    let mut slices = Vec::with_capacity(servers);
    for server in 0..servers {
        let (part_words, part_elements) = if server + 1 == servers {
            (words - word, elements.checked_sub(element))
        } else {
            let part = share(server + 1) - share(server);
            (
                part,
                Some(part * factor).filter(|e| element + e <= elements),
            )
        };
        let part_elements = part_elements.ok_or_else(|| {
            format!(
                "key {key}: {elements} elements cannot be split over {servers} servers in \
                 whole words of {factor} (raise MXNET_KVSTORE_BIGARRAY_BOUND above {elements})"
            )
        })?;
        slices.push(PackedSlice {
            slice: Slice {
                server,
                ps_key: ps_key(key, server, servers),
                elements: element..element + part_elements,
            },
            size_key: range_begin(server, servers).wrapping_add(part_elements as u64),
            words: word..word + part_words,
        });
        word += part_words;
        element += part_elements;
    }
    Ok(slices)
}

/// MXNet's dtype id (mshadow's type flag) of `dtype`.
pub fn mxnet_dtype_id(dtype: DType) -> Option<u32> {
    match dtype {
        DType::F32 => Some(0),
        DType::F64 => Some(1),
        DType::F16 => Some(2),
        DType::U8 => Some(3),
        DType::I32 => Some(4),
        DType::I64 => Some(6),
        DType::BF16 => Some(12),
        _ => None,
    }
}

/// The request type of dense pushes and pulls (`RequestType::kDefaultPushPull`).
pub const DEFAULT_PUSH_PULL: u32 = 0;

/// The request type of row-sparse pushes and pulls (`RequestType::kRowSparsePushPull`).
pub const ROW_SPARSE_PUSH_PULL: u32 = 1;

/// The request type of compressed pushes and, once compression is on, of every pull
/// (`RequestType::kCompressedPushPull`).
pub const COMPRESSED_PUSH_PULL: u32 = 2;

/// MXNet's command word for request type `request_type` and dtype id `dtype_id`.
///
/// ```
/// use kvstore_pslite::encoding::command;
/// assert_eq!(command(0, 0), 0); // dense float32
/// assert_eq!(command(0, 2), 5); // dense float16
/// assert_eq!(command(2, 0), 3); // compressed float32
/// ```
pub fn command(request_type: u32, dtype_id: u32) -> i32 {
    let sum = request_type + dtype_id;
    ((sum * (sum + 1)) / 2 + dtype_id) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_of(slices: &[Slice], row_len: usize) -> Vec<(usize, Range<usize>)> {
        slices
            .iter()
            .map(|s| {
                let rows = s.elements.start / row_len..s.elements.end / row_len;
                (s.server, rows)
            })
            .collect()
    }

    #[test]
    fn a_big_row_sparse_key_is_cut_by_rows_rounding_as_mxnet() {
        // round(5 / 2) = 3 (half away from zero): rows 0-2, then 3-4.
        assert_eq!(
            rows_of(&place_rows(3, 5, 1, 2, 1).unwrap(), 1),
            [(0, 0..3), (1, 3..5)]
        );
        // 7 rows on 3 servers: round(2.33) = 2, round(4.67) = 5.
        assert_eq!(
            rows_of(&place_rows(3, 7, 4, 3, 1).unwrap(), 4),
            [(0, 0..2), (1, 2..5), (2, 5..7)]
        );
        // Each part under its server's master key.
        let slices = place_rows(3, 7, 4, 3, 1).unwrap();
        assert_eq!(slices[2].ps_key, ps_key(3, 2, 3));
        // Fewer rows than servers: some part is empty (the worker refuses such a key).
        assert!(place_rows(3, 1, 8, 2, 1)
            .unwrap()
            .iter()
            .any(|s| s.elements.is_empty()));
    }

    #[test]
    fn small_keys_hash_as_mxnet_does() {
        assert_eq!(small_key_server(0, 3), 0);
        assert_eq!(small_key_server(1, 3), 9973 % 3);
        assert_eq!(small_key_server(215_329, 7), 215_329 * 9973 % 7);
        // 500,000 * 9973 wraps to a positive product, used as MXNet uses it.
        let wrapped = 500_000i32.wrapping_mul(9973);
        assert!(wrapped > 0);
        assert_eq!(small_key_server(500_000, 5), (wrapped % 5) as usize);
        // 215,330 * 9973 wraps to a negative product: MXNet's worker would crash.
        assert_eq!(215_330i32.wrapping_mul(9973) % 3, -2);
        assert_eq!(small_key_server(215_330, 3), 1);
        assert_eq!(place(215_330, 4, 3, 1_000_000).unwrap()[0].server, 1);
    }

    #[test]
    fn key_ranges_are_ps_lites() {
        assert_eq!(range_begin(0, 3), 0);
        assert_eq!(range_begin(2, 3), (u64::MAX / 3) * 2);
        assert_eq!(ps_key(5, 1, 2), u64::MAX / 2 + 5);
        assert_eq!(ps_key(-1, 0, 1), u64::MAX);
    }

    #[test]
    fn big_arrays_are_split_over_every_server() {
        let slices = place(7, 10, 3, 8).unwrap();
        let covered: Vec<_> = slices.iter().map(|s| s.elements.clone()).collect();
        assert_eq!(covered, vec![0..3, 3..7, 7..10]);
        assert!(slices.iter().enumerate().all(|(i, s)| s.server == i));
        assert!(place(7, 10, 0, 8).is_err());
    }

    #[test]
    fn compressed_layouts_are_mxnets() {
        // A small key: one slice, the size key carrying its length, every word.
        let small = place_compressed(3, 20, 2, 1000, 16).unwrap();
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].slice, place(3, 20, 2, 1000).unwrap()[0]);
        assert_eq!(small[0].size_key, range_begin(1, 2) + 20);
        assert_eq!(small[0].words, 0..2);
        // MXNet's arithmetic on 3 servers: 1,000,001 elements are 62,501 words; servers 0 and 1
        // get round(20833.67) = 20834 and round(41667.33) - 20834 = 20833 words.
        let big = place_compressed(5, 1_000_001, 3, 1_000_000, 16).unwrap();
        let words: Vec<_> = big.iter().map(|s| s.words.len()).collect();
        let elements: Vec<_> = big.iter().map(|s| s.slice.elements.len()).collect();
        assert_eq!(words, vec![20834, 20833, 20834]);
        assert_eq!(elements, vec![333_344, 333_328, 333_329]);
        assert_eq!(big[2].slice.elements.end, 1_000_001);
        assert_eq!(big[2].words.end, 62_501);
        for s in &big {
            assert_eq!(s.slice.ps_key, ps_key(5, s.slice.server, 3));
            let begin = range_begin(s.slice.server, 3);
            assert_eq!(s.size_key - begin, s.slice.elements.len() as u64);
            assert_eq!(s.words.len(), s.slice.elements.len().div_ceil(16));
        }
        // Split otherwise than without compression.
        assert_ne!(
            big.iter().map(|s| s.slice.clone()).collect::<Vec<_>>(),
            place(5, 1_000_001, 3, 1_000_000).unwrap()
        );
        // Too few elements for whole words on every server but the last.
        let e = place_compressed(5, 10, 2, 8, 16).unwrap_err();
        assert!(e.contains("cannot be split over 2 servers"), "{e}");
        assert!(place_compressed(5, 20, 0, 8, 16).is_err());
    }

    #[test]
    fn command_words_are_mxnets() {
        // dense: float32 0, float64 2, float16 5, uint8 9, int32 14, int64 27, bfloat16 90
        let words: Vec<i32> = [0, 1, 2, 3, 4, 6, 12]
            .into_iter()
            .map(|d| command(DEFAULT_PUSH_PULL, d))
            .collect();
        assert_eq!(words, vec![0, 2, 5, 9, 14, 27, 90]);
    }
}
