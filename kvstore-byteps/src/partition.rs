//! How a tensor is cut into partitions and where each partition lives.
//!
//! As BytePS (`operations.cc` `InitTensor`, `global.cc`):
//!
//! - a tensor declared `d`th (0, 1, 2, ... in declaration order, which must be the same on every
//!   worker) is cut into partitions of at most `partition_bytes` bytes, rounded down to whole
//!   elements (at least one element); partition `i` gets the 64-bit key `(d << 16) + i`, so a
//!   tensor has at most 65,536 partitions;
//! - partition key `k` lives on server `djb2(decimal string of k) mod servers`, BytePS's
//!   default `BYTEPS_KEY_HASH_FN=djb2`.
//!
//! The partition key is the wire id of the part on the dist servers (`kvstore_dist::protocol`):
//! each partition is a key of its own there, merged and answered independently.

use std::ops::Range;

/// BytePS's default `BYTEPS_PARTITION_BYTES`.
pub const DEFAULT_PARTITION_BYTES: usize = 4_096_000;

/// Most partitions of one tensor: the index takes the low 16 bits of the partition key.
pub const MAX_PARTITIONS: usize = 1 << 16;

/// One partition of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// `(declared << 16) + index`: the key of the partition on its server.
    pub key: u64,
    /// The rank of the server that sums it.
    pub server: usize,
    /// Its elements in the flattened tensor.
    pub elements: Range<usize>,
}

/// BytePS's `djb2` string hash: `h = 5381; h = h * 33 + c` for each byte, in 64-bit wrapping
/// arithmetic.
pub fn djb2(s: &str) -> u64 {
    s.bytes().fold(5381u64, |h, c| {
        h.wrapping_shl(5).wrapping_add(h).wrapping_add(u64::from(c))
    })
}

/// The key of partition `index` of the tensor declared `declared`th.
pub fn partition_key(declared: u64, index: usize) -> u64 {
    (declared << 16) + index as u64
}

/// The server of partition key `key`: `djb2(key as a decimal string) mod servers`.
///
/// # Panics
/// If `servers` is 0.
pub fn server_of(key: u64, servers: usize) -> usize {
    assert!(servers > 0, "a cluster has at least one server");
    (djb2(&key.to_string()) % servers as u64) as usize
}

/// Elements per partition for elements of `element_size` bytes: `partition_bytes` rounded down
/// to whole elements, at least one.
pub fn elements_per_partition(partition_bytes: usize, element_size: usize) -> usize {
    (partition_bytes / element_size.max(1)).max(1)
}

/// The partitions of the tensor declared `declared`th, of `elements` elements of
/// `element_size` bytes, over `servers` servers. An empty tensor has one empty partition.
///
/// # Errors
/// A message when the tensor would need more than [`MAX_PARTITIONS`] partitions.
pub fn partitions(
    declared: u64,
    elements: usize,
    element_size: usize,
    partition_bytes: usize,
    servers: usize,
) -> Result<Vec<Partition>, String> {
    let per = elements_per_partition(partition_bytes, element_size);
    let count = elements.div_ceil(per).max(1);
    if count > MAX_PARTITIONS {
        return Err(format!(
            "a tensor of {elements} elements of {element_size} bytes needs {count} partitions of \
             {partition_bytes} bytes, more than the {MAX_PARTITIONS} a tensor can have: raise \
             BYTEPS_PARTITION_BYTES"
        ));
    }
    Ok((0..count)
        .map(|i| {
            let key = partition_key(declared, i);
            Partition {
                key,
                server: server_of(key, servers),
                elements: (i * per).min(elements)..((i + 1) * per).min(elements),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn djb2_is_the_classic_string_hash() {
        assert_eq!(djb2(""), 5381);
        assert_eq!(djb2("a"), 5381 * 33 + 97);
        assert_eq!(djb2("65536"), {
            let mut h: u64 = 5381;
            for c in "65536".bytes() {
                h = (h << 5) + h + u64::from(c);
            }
            h
        });
    }

    #[test]
    fn partitions_cover_the_tensor_in_whole_elements() {
        // 4,096,000 bytes of float32 = 1,024,000 elements per partition.
        let parts = partitions(3, 2_500_000, 4, DEFAULT_PARTITION_BYTES, 2).unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].elements, 0..1_024_000);
        assert_eq!(parts[2].elements, 2_048_000..2_500_000);
        assert_eq!(parts[1].key, (3 << 16) + 1);
        // Bytes that are not a multiple of the element size round down.
        assert_eq!(elements_per_partition(10, 4), 2);
        assert_eq!(elements_per_partition(3, 8), 1);
        assert_eq!(partitions(0, 0, 4, 16, 1).unwrap().len(), 1);
        assert!(partitions(0, MAX_PARTITIONS + 1, 1, 1, 1).is_err());
    }

    #[test]
    fn partitions_spread_over_the_servers() {
        let parts = partitions(1, 64 * 100, 4, 400, 3).unwrap();
        let mut per_server = [0usize; 3];
        for p in &parts {
            assert_eq!(p.server, server_of(p.key, 3));
            per_server[p.server] += 1;
        }
        assert!(per_server.iter().all(|&n| n > 0), "{per_server:?}");
    }
}
