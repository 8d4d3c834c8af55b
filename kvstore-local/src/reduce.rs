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
    /// Threads for big arrays (`MXNET_KVSTORE_REDUCTION_NTHREADS`, default 4; at most
    /// [`MAX_THREADS`] run).
    pub threads: usize,
    /// Element count from which an array is big (`MXNET_KVSTORE_BIGARRAY_BOUND`, default 1,000,000).
    pub bigarray_bound: usize,
}

/// The most threads one sum or copy runs on, whatever [`ReduceConfig::threads`] asks: more
/// than any machine has cores, few enough that starting them cannot fail.
pub const MAX_THREADS: usize = 256;

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
            self.threads
                .min(MAX_THREADS)
                .min(len.div_ceil(BLOCK))
                .max(1)
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

/// `dst = srcs[0] + srcs[1] + ...` for slices of one length, serially. With `stream`, each
/// block is summed in a small buffer and written to `dst` with cache-bypassing stores.
fn sum_serial<T: Element>(dst: &mut [T], srcs: &[&[T]], stream: bool) {
    let (first, rest) = srcs.split_first().expect("at least one source");
    let mut scratch = if stream {
        vec![T::ZERO; BLOCK.min(dst.len())]
    } else {
        Vec::new()
    };
    for lo in (0..dst.len()).step_by(BLOCK) {
        let hi = (lo + BLOCK).min(dst.len());
        let d = if stream {
            &mut scratch[..hi - lo]
        } else {
            &mut dst[lo..hi]
        };
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
        if stream {
            stream::copy(&mut dst[lo..hi], &scratch[..hi - lo]);
        }
    }
    if stream {
        stream::fence();
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

/// `dst = srcs[0] + srcs[1] + ...`, split across threads for big arrays. Big arrays are
/// written with cache-bypassing stores when `stream_big` is set (for results that are not read
/// again at once: a stored value, not a merge buffer handed to an updater).
///
/// # Panics
/// If `srcs` is empty or a source's length differs from `dst`'s (callers validate first).
pub fn sum_slices<T: Element>(
    dst: &mut [T],
    srcs: &[&[T]],
    config: &ReduceConfig,
    stream_big: bool,
) {
    assert!(
        srcs.iter().all(|s| s.len() == dst.len()),
        "validated by the caller"
    );
    let stream = stream_big && dst.len() >= config.bigarray_bound;
    let threads = config.threads_for(dst.len());
    if threads == 1 {
        return sum_serial(dst, srcs, stream);
    }
    let ranges = split(dst.len(), threads);
    std::thread::scope(|scope| {
        let mut rest = dst;
        for range in ranges {
            let (chunk, tail) = rest.split_at_mut(range.len());
            rest = tail;
            let parts: Vec<&[T]> = srcs.iter().map(|s| &s[range.clone()]).collect();
            scope.spawn(move || sum_serial(chunk, &parts, stream));
        }
    });
}

/// Copies `src` into every slice of `dsts`, split across threads for big arrays: each block of
/// `src` is read once and written to every destination, with cache-bypassing stores for big
/// arrays (a pull's outputs are not read back by the store).
pub fn broadcast_slices<T: Element>(dsts: Vec<&mut [T]>, src: &[T], config: &ReduceConfig) {
    assert!(
        dsts.iter().all(|d| d.len() == src.len()),
        "validated by the caller"
    );
    let stream = src.len() >= config.bigarray_bound;
    let threads = config.threads_for(src.len());
    if threads == 1 {
        return broadcast_serial(dsts, src, stream);
    }
    let mut rests = dsts;
    std::thread::scope(|scope| {
        for range in split(src.len(), threads) {
            let parts: Vec<&mut [T]> = rests
                .iter_mut()
                .map(|rest| {
                    let (head, tail) = std::mem::take(rest).split_at_mut(range.len());
                    *rest = tail;
                    head
                })
                .collect();
            let part = &src[range];
            scope.spawn(move || broadcast_serial(parts, part, stream));
        }
    });
}

fn broadcast_serial<T: Element>(mut dsts: Vec<&mut [T]>, src: &[T], stream: bool) {
    if !stream {
        for d in dsts {
            d.copy_from_slice(src);
        }
        return;
    }
    for lo in (0..src.len()).step_by(BLOCK) {
        let hi = (lo + BLOCK).min(src.len());
        for d in dsts.iter_mut() {
            stream::copy(&mut d[lo..hi], &src[lo..hi]);
        }
    }
    stream::fence();
}

/// Sums dense `srcs` (same shape and dtype as `dst`, validated by the caller) into `dst`.
/// Arrays that are not in standard layout are first copied into it. With `stream_big`, big
/// results are written with cache-bypassing stores (see [`sum_slices`]).
pub fn sum_into(dst: &mut NDArray, srcs: &[&NDArray], config: &ReduceConfig, stream_big: bool) {
    let host = dst.dense_mut().expect("dense destination");
    macro_rules! run {
        ($($variant:ident => $t:ty),*) => {
            match host {
                $(HostArray::$variant(d) => {
                    let owned: Vec<std::borrow::Cow<'_, [$t]>> = srcs.iter().map(|s| contiguous::<$t>(s)).collect();
                    let views: Vec<&[$t]> = owned.iter().map(|c| &c[..]).collect();
                    match d.as_slice_mut() {
                        Some(out) => sum_slices(out, &views, config, stream_big),
                        None => {
                            let mut out = vec![<$t as Element>::ZERO; d.len()];
                            sum_slices(&mut out, &views, config, false);
                            for (d, o) in d.iter_mut().zip(out) { *d = o; }
                        }
                    }
                })*
            }
        };
    }
    run!(F32 => f32, F64 => f64, F16 => half::f16, BF16 => half::bf16, I32 => i32, I64 => i64, U8 => u8);
}

/// A key's bytes to send over a network: the caller's own when it pushed one contiguous value,
/// else the sum of its values (one per device) made by [`sum_values`].
#[derive(Debug)]
pub enum Outbound<'a> {
    /// The caller's bytes.
    Borrowed(&'a [u8]),
    /// The sum, an array of its own.
    Owned(NDArray),
}

impl Outbound<'_> {
    /// The bytes to send.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Outbound::Borrowed(b) => b,
            Outbound::Owned(a) => a.as_bytes().expect("a fresh array is contiguous"),
        }
    }
}

/// The bytes to send for a key's `values` (see [`Outbound`]).
///
/// # Panics
/// As [`sum_values`], for several values of different shapes or dtypes (callers validate
/// first).
pub fn outbound<'a>(values: &[&'a NDArray], config: &ReduceConfig) -> Outbound<'a> {
    if let [single] = values {
        if let Some(b) = single.as_bytes() {
            return Outbound::Borrowed(b);
        }
    }
    Outbound::Owned(sum_values(values, config, true))
}

/// The sum of one key's values (one per device; row-sparse ones densified) in a new dense
/// array, in MXNet's association order: what a worker of a distributed store sends for a key
/// it was given several values of.
///
/// ```
/// use kvstore_base::{DType, NDArray};
/// use kvstore_local::reduce::{sum_values, ReduceConfig};
///
/// let values = [1.0, 1e8, -1e8].map(|x| NDArray::full(&[2], x, DType::F32));
/// let sum = sum_values(&values.iter().collect::<Vec<_>>(), &ReduceConfig::default(), false);
/// assert_eq!(sum.to_vec::<f32>().unwrap(), vec![1.0, 1.0]); // 1 + (1e8 + -1e8)
/// ```
///
/// # Panics
/// If `values` is empty or their shapes or dtypes differ (callers validate first).
pub fn sum_values(values: &[&NDArray], config: &ReduceConfig, stream_big: bool) -> NDArray {
    let first = values.first().expect("at least one value");
    let dense: Vec<std::borrow::Cow<'_, NDArray>> = values
        .iter()
        .map(|v| match v.dense() {
            Some(_) => std::borrow::Cow::Borrowed(*v),
            None => std::borrow::Cow::Owned(v.to_dense()),
        })
        .collect();
    let sources: Vec<&NDArray> = dense.iter().map(|v| &**v).collect();
    let mut sum = NDArray::zeros(first.shape(), first.dtype());
    sum_into(&mut sum, &sources, config, stream_big);
    sum
}

/// `dst[:] = src` for two dense arrays of one shape: a plain memory copy when the dtypes agree
/// and both are in standard layout, otherwise a cast, as [`NDArray::assign`] does. For small
/// arrays, where a pass over all outputs at once gains nothing.
///
/// # Errors
/// As [`NDArray::assign`] (a shape mismatch, which callers have ruled out).
pub fn copy_dense(dst: &mut NDArray, src: &NDArray) -> kvstore_base::Result<()> {
    macro_rules! same {
        ($($variant:ident),*) => {
            match (dst.dense_mut(), src.dense()) {
                $((Some(HostArray::$variant(d)), Some(HostArray::$variant(s))) => {
                    if let (Some(d), Some(s)) = (d.as_slice_mut(), s.as_slice()) {
                        if d.len() == s.len() {
                            d.copy_from_slice(s);
                            return Ok(());
                        }
                    }
                })*
                _ => {}
            }
        };
    }
    same!(F32, F64, F16, BF16, I32, I64, U8);
    dst.assign(src)
}

/// Copies dense `src` into every output (each of `src`'s shape, validated by the caller):
/// outputs of `src`'s dtype in standard layout share one pass over `src`
/// ([`broadcast_slices`]); the others are written with a cast, as [`NDArray::assign`] does.
///
/// # Errors
/// As [`NDArray::assign`] (shape mismatches, which callers have ruled out).
pub fn broadcast_into(
    outs: &mut [&mut NDArray],
    src: &NDArray,
    config: &ReduceConfig,
) -> kvstore_base::Result<()> {
    macro_rules! typed {
        ($($variant:ident => $t:ty),*) => {
            match src.dense() {
                $(Some(HostArray::$variant(s)) if s.as_slice().is_some() => {
                    broadcast_typed::<$t>(outs, s.as_slice().expect("checked"), src, config)
                })*
                _ => outs.iter_mut().try_for_each(|o| o.assign(src)),
            }
        };
    }
    typed!(F32 => f32, F64 => f64, F16 => half::f16, BF16 => half::bf16, I32 => i32, I64 => i64, U8 => u8)
}

fn broadcast_typed<T: Element>(
    outs: &mut [&mut NDArray],
    src_slice: &[T],
    src: &NDArray,
    config: &ReduceConfig,
) -> kvstore_base::Result<()> {
    let mut fast: Vec<&mut [T]> = Vec::with_capacity(outs.len());
    let mut slow: Vec<&mut NDArray> = Vec::new();
    for out in outs.iter_mut() {
        if out
            .as_slice::<T>()
            .is_some_and(|o| o.len() == src_slice.len())
        {
            fast.push(out.as_slice_mut::<T>().expect("checked just above"));
        } else {
            slow.push(out);
        }
    }
    if !fast.is_empty() {
        broadcast_slices(fast, src_slice, config);
    }
    slow.into_iter().try_for_each(|o| o.assign(src))
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

/// Copies with cache-bypassing ("non-temporal") stores, so that writing a big output does not
/// first read it into the cache (glibc's `memcpy` only bypasses the cache above a threshold
/// derived from the cache size, often hundreds of MiB).
mod stream {
    use kvstore_base::Element;

    /// The bytes of a slice of plain numbers.
    fn bytes<T: Element>(s: &[T]) -> &[u8] {
        // SAFETY: every `Element` type is a plain number without padding (f32, f64, f16, bf16,
        // i32, i64, u8), so its memory is `len * size_of::<T>()` initialised bytes.
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
    }

    fn bytes_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
        // SAFETY: as in `bytes`; moreover every bit pattern is a valid value of these types, so
        // writing arbitrary bytes (here: the bytes of another slice of `T`) keeps them valid.
        unsafe {
            std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s))
        }
    }

    /// `dst.copy_from_slice(src)` with cache-bypassing stores where the CPU has them. Callers
    /// call [`fence`] once after their last streaming copy.
    ///
    /// # Panics
    /// If the lengths differ (the SIMD copies below rely on it for their bounds).
    pub(super) fn copy<T: Element>(dst: &mut [T], src: &[T]) {
        assert_eq!(dst.len(), src.len(), "stream::copy needs equal lengths");
        let (d, s) = (bytes_mut(dst), bytes(src));
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                return unsafe { x86::copy_avx512(d, s) };
            }
            if std::arch::is_x86_feature_detected!("avx") {
                // SAFETY: the CPU supports AVX (checked just above).
                return unsafe { x86::copy_avx(d, s) };
            }
        }
        d.copy_from_slice(s);
    }

    /// Orders the streaming stores before whatever follows (another thread reading the data).
    pub(super) fn fence() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `sfence` is part of SSE, which every x86_64 CPU has.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        /// # Safety
        /// The CPU must support AVX-512F; `d` and `s` must have the same length.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn copy_avx512(d: &mut [u8], s: &[u8]) {
            let n = d.len();
            let head = d.as_ptr().align_offset(64).min(n);
            d[..head].copy_from_slice(&s[..head]);
            let mut i = head;
            while i + 64 <= n {
                // SAFETY: `i + 64 <= n` keeps both 64-byte accesses in bounds; the load is
                // unaligned, the streaming store is to `d + i`, 64-byte aligned by `head`.
                unsafe {
                    let v = _mm512_loadu_si512(s.as_ptr().add(i).cast());
                    _mm512_stream_si512(d.as_mut_ptr().add(i).cast(), v);
                }
                i += 64;
            }
            d[i..].copy_from_slice(&s[i..]);
        }

        /// # Safety
        /// The CPU must support AVX; `d` and `s` must have the same length.
        #[target_feature(enable = "avx")]
        pub(super) unsafe fn copy_avx(d: &mut [u8], s: &[u8]) {
            let n = d.len();
            let head = d.as_ptr().align_offset(32).min(n);
            d[..head].copy_from_slice(&s[..head]);
            let mut i = head;
            while i + 32 <= n {
                // SAFETY: `i + 32 <= n` keeps both accesses in bounds; the streaming store is to
                // `d + i`, 32-byte aligned by `head`.
                unsafe {
                    let v = _mm256_loadu_si256(s.as_ptr().add(i).cast());
                    _mm256_stream_si256(d.as_mut_ptr().add(i).cast(), v);
                }
                i += 32;
            }
            d[i..].copy_from_slice(&s[i..]);
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
    fn an_absurd_thread_count_runs_at_most_max_threads() {
        let config = ReduceConfig {
            threads: usize::MAX,
            bigarray_bound: 1,
        };
        assert_eq!(config.threads_for(usize::MAX / 2), MAX_THREADS);
        assert_eq!(config.threads_for(BLOCK), 1);
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
                for stream in [false, true] {
                    let mut out = vec![0.0; len];
                    sum_slices(&mut out, &views, &config, stream);
                    assert_eq!(
                        out,
                        reference(&srcs),
                        "{count} sources, {config:?}, stream {stream}"
                    );
                }
            }
        }
    }

    #[test]
    fn broadcast_writes_every_destination_at_any_alignment() {
        let src: Vec<u8> = (0..70_001u32).map(|i| (i % 251) as u8).collect();
        for config in [
            ReduceConfig {
                threads: 1,
                bigarray_bound: usize::MAX,
            },
            ReduceConfig {
                threads: 3,
                bigarray_bound: 1,
            },
        ] {
            // Offsets 0..3 into a larger buffer exercise every head alignment.
            let mut backing: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; src.len() + 3]).collect();
            let dsts: Vec<&mut [u8]> = backing
                .iter_mut()
                .enumerate()
                .map(|(i, b)| &mut b[i..i + src.len()])
                .collect();
            broadcast_slices(dsts, &src, &config);
            for (i, b) in backing.iter().enumerate() {
                assert_eq!(
                    &b[i..i + src.len()],
                    &src[..],
                    "{config:?}, destination {i}"
                );
            }
        }
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
