//! Copies of float32 data between GPU memory and ordinary (pageable) host memory, staged
//! through a page-locked buffer of each GPU.
//!
//! The driver copies to and from pageable memory through small buffers of its own, page by
//! page; measured on an H200 (in a virtual machine), 64 MiB took 81 ms to the host and 164 ms
//! from it that way, against 1.2 ms into page-locked memory. Copies of at least
//! [`STAGED_FROM`] bytes therefore go in chunks of [`CHUNK`] elements through the GPU's
//! page-locked buffer (allocated at its first use, kept for the process), the CPU copying
//! each chunk from or into the caller's memory. Smaller copies, and every copy when
//! page-locked memory cannot be had, go straight to the driver.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cudarc::driver::{CudaSlice, CudaStream, PinnedHostSlice};
use kvstore_base::{Error, Result};

use crate::gpu::cuda;

/// Elements per staged chunk: 8 MiB of float32 (a copy of one chunk takes about 0.15 ms at
/// the 54 GB/s measured into page-locked memory, well past the cost of the wait after it).
pub(crate) const CHUNK: usize = 2 << 20;

/// Copies smaller than this many bytes go straight to the driver.
pub(crate) const STAGED_FROM: usize = 1 << 20;

/// The page-locked buffer of one GPU, shared by the threads copying to or from it (one copy at
/// a time: the GPU has one copy engine each way, which one large copy fills).
#[derive(Debug, Default)]
pub(crate) struct Staging {
    /// [`CHUNK`] elements of page-locked memory in the GPU's context, once asked for.
    buffer: Mutex<Option<PinnedHostSlice<f32>>>,
    /// The allocation failed (a limit on locked memory, say): copies go straight to the
    /// driver.
    unavailable: AtomicBool,
}

type Locked<'a> = MutexGuard<'a, Option<PinnedHostSlice<f32>>>;

impl Staging {
    /// Copies `src` to a new host vector, once everything queued on `stream` before it is done
    /// (`stream` is the one the GPU's work is ordered on).
    ///
    /// # Errors
    /// [`Error::Device`] when a copy or a wait fails.
    pub(crate) fn download(
        &self,
        stream: &Arc<CudaStream>,
        src: &CudaSlice<f32>,
    ) -> Result<Vec<f32>> {
        let n = src.len();
        let mut buffer = self.staged(stream, n);
        let Some(pinned) = buffer.as_mut().and_then(|b| b.as_mut()) else {
            drop(buffer);
            let data = stream.clone_dtoh(src).map_err(cuda("copy to host"))?;
            stream.synchronize().map_err(cuda("synchronize"))?;
            return Ok(data);
        };
        let staged = pinned_slice(pinned)?;
        let mut out = Vec::with_capacity(n);
        // Untouched yet: huge pages make its first writes cheaper.
        kvstore_base::advise_huge_pages(&mut out);
        for start in (0..n).step_by(CHUNK) {
            let end = (start + CHUNK).min(n);
            let chunk = &mut staged[..end - start];
            stream
                .memcpy_dtoh(&src.slice(start..end), chunk)
                .map_err(cuda("copy to host"))?;
            // The copy into page-locked memory is asynchronous: wait before reading it.
            stream.synchronize().map_err(cuda("synchronize"))?;
            out.extend_from_slice(chunk);
        }
        Ok(out)
    }

    /// Copies `src` into `dst` (at least as long), queued on `stream` after what is queued
    /// there; `src` may change as soon as this returns.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `dst` is shorter than `src`; [`Error::Device`] when a
    /// copy or a wait fails.
    pub(crate) fn upload(
        &self,
        stream: &Arc<CudaStream>,
        src: &[f32],
        dst: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = src.len();
        if dst.len() < n {
            return Err(Error::InvalidArgument(format!(
                "a host-to-GPU copy of {n} elements into a GPU array of {}",
                dst.len()
            )));
        }
        let mut buffer = self.staged(stream, n);
        let Some(pinned) = buffer.as_mut().and_then(|b| b.as_mut()) else {
            drop(buffer);
            // From pageable memory the driver has read `src` when the call returns.
            return stream.memcpy_htod(src, dst).map_err(cuda("copy to GPU"));
        };
        let staged = pinned_slice(pinned)?;
        for start in (0..n).step_by(CHUNK) {
            let end = (start + CHUNK).min(n);
            let chunk = &mut staged[..end - start];
            chunk.copy_from_slice(&src[start..end]);
            stream
                .memcpy_htod(&*chunk, &mut dst.slice_mut(start..end))
                .map_err(cuda("copy to GPU"))?;
            // The copy from page-locked memory is asynchronous: wait before the buffer is
            // written again (by the next chunk, or another thread once it is unlocked).
            stream.synchronize().map_err(cuda("synchronize"))?;
        }
        Ok(())
    }

    /// The buffer, locked, for a copy of `elements` (allocated at the first copy of
    /// [`STAGED_FROM`] bytes or more); `None` when the copy goes straight to the driver: a
    /// smaller one, or any once page-locked memory was refused.
    fn staged(&self, stream: &Arc<CudaStream>, elements: usize) -> Option<Locked<'_>> {
        if elements * std::mem::size_of::<f32>() < STAGED_FROM
            || self.unavailable.load(Ordering::Relaxed)
        {
            return None;
        }
        let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        if buffer.is_none() {
            match allocate(stream) {
                Some(pinned) => *buffer = Some(pinned),
                None => {
                    self.unavailable.store(true, Ordering::Relaxed);
                    return None;
                }
            }
        }
        Some(buffer)
    }
}

/// [`CHUNK`] elements of page-locked memory in `stream`'s context, zeroed; unavailable when
/// the driver refuses them.
fn allocate(stream: &Arc<CudaStream>) -> Option<PinnedHostSlice<f32>> {
    // SAFETY: the memory is zeroed below before any of it is read; float32 has no invalid
    // bit patterns.
    let allocated = unsafe { stream.context().alloc_pinned_with_flags::<f32>(CHUNK, 0) };
    let mut pinned = allocated.ok()?;
    let ptr = pinned.as_mut_ptr().ok()?;
    // SAFETY: `ptr` points to the CHUNK float32s of the allocation just made.
    unsafe { std::ptr::write_bytes(ptr, 0, CHUNK) };
    Some(pinned)
}

/// The page-locked memory as a slice (no copy is pending on it: every use waits for its copy).
fn pinned_slice(pinned: &mut PinnedHostSlice<f32>) -> Result<&mut [f32]> {
    pinned
        .as_mut_slice()
        .map_err(|e| Error::Device(format!("page-locked staging buffer: {e}")))
}
