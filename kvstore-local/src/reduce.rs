//! CPU reduction kernels: the fused sum of several arrays and the parallel copy, MXNet's
//! `CommCPU` arithmetic at memory speed.
//!
//! The sum keeps MXNet's association order, so results are bit-identical to it: the first
//! value, then the others added in groups of up to four, `acc + (((a + b) + c) + d)`, in the
//! arrays' own dtype. It is fused: every input is read once and the output written once, block
//! by block, so the block of the output stays in the L1 cache while the inputs stream past.
//! Arrays of at least `bigarray_bound` elements are split across `threads` threads
//! (`MXNET_KVSTORE_BIGARRAY_BOUND`, `MXNET_KVSTORE_REDUCTION_NTHREADS`).

use kvstore_base::{Element, HostArray, HostElement, NDArray};

/// Elements per block of the fused loop: 16 KiB of `f32`, small enough for the output block
/// to stay in L1 while up to five inputs stream through.
const BLOCK: usize = 4096;

/// How reductions are parallelised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReduceConfig {
    /// Threads for big arrays (`MXNET_KVSTORE_REDUCTION_NTHREADS`, default 4).
    pub threads: usize,
    /// Element count from which an array is big (`MXNET_KVSTORE_BIGARRAY_BOUND`, default 1,000,000).
    pub bigarray_bound: usize,
}

impl Default for ReduceConfig {
    fn default() -> Self {
        ReduceConfig {
            threads: 4,
            bigarray_bound: 1_000_000,
        }
    }
}

impl ReduceConfig {
    /// The defaults, overridden by MXNet's environment variables when they are set to numbers.
    pub fn from_env() -> Self {
        let mut config = ReduceConfig::default();
        if let Some(n) = env_usize("MXNET_KVSTORE_REDUCTION_NTHREADS") {
            config.threads = n.max(1);
        }
        if let Some(n) = env_usize("MXNET_KVSTORE_BIGARRAY_BOUND") {
            config.bigarray_bound = n.max(1);
        }
        config
    }

    fn threads_for(&self, len: usize) -> usize {
        if len >= self.bigarray_bound && self.threads > 1 {
            self.threads.min(len.div_ceil(BLOCK)).max(1)
        } else {
            1
        }
    }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// Splits `0..len` into `parts` ranges whose boundaries fall on blocks.
fn split(len: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let blocks = len.div_ceil(BLOCK);
    let per = blocks.div_ceil(parts.max(1)) * BLOCK;
    (0..len)
        .step_by(per.max(1))
        .map(|lo| lo..(lo + per).min(len))
        .collect()
}

/// `dst = srcs[0] + srcs[1] + ...` for slices of one length, serially.
fn sum_serial<T: Element>(dst: &mut [T], srcs: &[&[T]]) {
    let (first, rest) = srcs.split_first().expect("at least one source");
    for lo in (0..dst.len()).step_by(BLOCK) {
        let hi = (lo + BLOCK).min(dst.len());
        let d = &mut dst[lo..hi];
        d.copy_from_slice(&first[lo..hi]);
        for group in rest.chunks(4) {
            match group {
                [a] => add1(d, &a[lo..hi]),
                [a, b] => add2(d, &a[lo..hi], &b[lo..hi]),
                [a, b, c] => add3(d, &a[lo..hi], &b[lo..hi], &c[lo..hi]),
                [a, b, c, e] => add4(d, &a[lo..hi], &b[lo..hi], &c[lo..hi], &e[lo..hi]),
                _ => unreachable!("chunks(4) yields 1 to 4 sources"),
            }
        }
    }
}

#[inline(always)]
fn add1<T: Element>(d: &mut [T], a: &[T]) {
    for (d, &a) in d.iter_mut().zip(a) {
        *d = d.add(a);
    }
}

#[inline(always)]
fn add2<T: Element>(d: &mut [T], a: &[T], b: &[T]) {
    for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
        *d = d.add(a.add(b));
    }
}

#[inline(always)]
fn add3<T: Element>(d: &mut [T], a: &[T], b: &[T], c: &[T]) {
    for (((d, &a), &b), &c) in d.iter_mut().zip(a).zip(b).zip(c) {
        *d = d.add(a.add(b).add(c));
    }
}

#[inline(always)]
fn add4<T: Element>(d: &mut [T], a: &[T], b: &[T], c: &[T], e: &[T]) {
    for ((((d, &a), &b), &c), &e) in d.iter_mut().zip(a).zip(b).zip(c).zip(e) {
        *d = d.add(a.add(b).add(c).add(e));
    }
}

/// `dst = srcs[0] + srcs[1] + ...`, split across threads for big arrays.
///
/// # Panics
/// If `srcs` is empty or a source's length differs from `dst`'s (callers validate first).
pub fn sum_slices<T: Element>(dst: &mut [T], srcs: &[&[T]], config: &ReduceConfig) {
    assert!(
        srcs.iter().all(|s| s.len() == dst.len()),
        "validated by the caller"
    );
    let threads = config.threads_for(dst.len());
    if threads == 1 {
        return sum_serial(dst, srcs);
    }
    let ranges = split(dst.len(), threads);
    std::thread::scope(|scope| {
        let mut rest = dst;
        for range in ranges {
            let (chunk, tail) = rest.split_at_mut(range.len());
            rest = tail;
            let parts: Vec<&[T]> = srcs.iter().map(|s| &s[range.clone()]).collect();
            scope.spawn(move || sum_serial(chunk, &parts));
        }
    });
}

/// `dst = src`, split across threads for big arrays.
pub fn copy_slices<T: Element>(dst: &mut [T], src: &[T], config: &ReduceConfig) {
    let threads = config.threads_for(dst.len());
    if threads == 1 {
        return dst.copy_from_slice(src);
    }
    std::thread::scope(|scope| {
        let mut rest = dst;
        for range in split(src.len(), threads) {
            let (chunk, tail) = rest.split_at_mut(range.len());
            rest = tail;
            let part = &src[range];
            scope.spawn(move || chunk.copy_from_slice(part));
        }
    });
}

/// Sums dense `srcs` (same shape and dtype as `dst`, validated by the caller) into `dst`.
/// Arrays that are not in standard layout are first copied into it.
pub fn sum_into(dst: &mut NDArray, srcs: &[&NDArray], config: &ReduceConfig) {
    let dtype = dst.dtype();
    let host = dst.dense_mut().expect("dense destination");
    macro_rules! run {
        ($($variant:ident => $t:ty),*) => {
            match host {
                $(HostArray::$variant(d) => {
                    let owned: Vec<std::borrow::Cow<'_, [$t]>> = srcs.iter().map(|s| contiguous::<$t>(s)).collect();
                    let views: Vec<&[$t]> = owned.iter().map(|c| &c[..]).collect();
                    match d.as_slice_mut() {
                        Some(out) => sum_slices(out, &views, config),
                        None => {
                            let mut out = vec![<$t as Element>::ZERO; d.len()];
                            sum_slices(&mut out, &views, config);
                            for (d, o) in d.iter_mut().zip(out) { *d = o; }
                        }
                    }
                })*
            }
        };
    }
    debug_assert!(srcs.iter().all(|s| s.dtype() == dtype));
    run!(F32 => f32, F64 => f64, F16 => half::f16, BF16 => half::bf16, I32 => i32, I64 => i64, U8 => u8);
}

/// Copies dense `src` into dense `dst` of the same shape, in parallel for big arrays when the
/// dtypes agree; otherwise casting, as [`NDArray::assign`] does.
pub fn copy_into(
    dst: &mut NDArray,
    src: &NDArray,
    config: &ReduceConfig,
) -> kvstore_base::Result<()> {
    macro_rules! fast {
        ($($variant:ident => $t:ty),*) => {
            match (dst.dense_mut(), src.dense()) {
                $((Some(HostArray::$variant(d)), Some(HostArray::$variant(s))) => {
                    if let (Some(d), Some(s)) = (d.as_slice_mut(), s.as_slice()) {
                        if d.len() == s.len() {
                            copy_slices(d, s, config);
                            return Ok(());
                        }
                    }
                })*
                _ => {}
            }
        };
    }
    if dst.shape() == src.shape() {
        fast!(F32 => f32, F64 => f64, F16 => half::f16, BF16 => half::bf16, I32 => i32, I64 => i64, U8 => u8);
    }
    dst.assign(src)
}

fn contiguous<T: Element>(array: &NDArray) -> std::borrow::Cow<'_, [T]> {
    match array.as_slice::<T>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => {
            let host = array
                .dense()
                .and_then(|h| <T as HostElement>::host(h))
                .expect("validated dtype");
            std::borrow::Cow::Owned(host.iter().copied().collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(srcs: &[Vec<f32>]) -> Vec<f32> {
        let mut acc = srcs[0].clone();
        for group in srcs[1..].chunks(4) {
            for (i, a) in acc.iter_mut().enumerate() {
                let mut g = group[0][i];
                for s in &group[1..] {
                    g += s[i];
                }
                *a += g;
            }
        }
        acc
    }

    #[test]
    fn fused_sum_matches_mxnet_association_order_for_any_count() {
        for count in 1..=11 {
            let len = 3 * BLOCK + 17;
            let srcs: Vec<Vec<f32>> = (0..count)
                .map(|k| {
                    (0..len)
                        .map(|i| ((i * 7 + k * 13) % 101) as f32 * 0.1 + 1e7 * (k % 2) as f32)
                        .collect()
                })
                .collect();
            let views: Vec<&[f32]> = srcs.iter().map(|s| &s[..]).collect();
            for config in [
                ReduceConfig::default(),
                ReduceConfig {
                    threads: 3,
                    bigarray_bound: 1,
                },
            ] {
                let mut out = vec![0.0; len];
                sum_slices(&mut out, &views, &config);
                assert_eq!(out, reference(&srcs), "{count} sources, {config:?}");
            }
        }
    }

    #[test]
    fn parallel_copy_copies_everything() {
        let src: Vec<i64> = (0..100_003).collect();
        let mut dst = vec![0i64; src.len()];
        copy_slices(
            &mut dst,
            &src,
            &ReduceConfig {
                threads: 4,
                bigarray_bound: 10,
            },
        );
        assert_eq!(dst, src);
    }

    #[test]
    fn split_covers_the_range_on_block_boundaries() {
        let ranges = split(10 * BLOCK + 5, 3);
        assert_eq!(ranges.first().unwrap().start, 0);
        assert_eq!(ranges.last().unwrap().end, 10 * BLOCK + 5);
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
            assert_eq!(pair[0].end % BLOCK, 0);
        }
    }
}
