//! Shared-memory regions between a worker and a server on the same host.
//!
//! A worker creates a file in a shared-memory directory (`/dev/shm` by default), sized but
//! sparse (pages cost memory only once touched), maps it `MAP_SHARED`, writes a random nonce
//! at its start and names it to the server ([`CMD_SHM_ATTACH`](crate::protocol::CMD_SHM_ATTACH)).
//! The server opens the same file (never creating one), checks its size, owner, mode and the
//! nonce (which proves that both ends see the same memory, hence the same host), and maps it;
//! the worker then unlinks the file, so nothing is left behind whatever happens next.
//!
//! A shared-memory directory may be smaller than the region (containers often mount a 64 MiB
//! `/dev/shm`), and touching a page of a file that the filesystem cannot back kills the process
//! with `SIGBUS`. So the worker commits the region's pages with `fallocate` before it hands out
//! a slot beyond those already committed; a commit that fails sends that message over TCP
//! instead.
//!
//! # For worker stores
//!
//! [`Link::attach`] lends a region to the server of a [`Connection`](crate::transport::Connection)
//! (honouring `KVSTORE_SHM`, `KVSTORE_SHM_BYTES` and `KVSTORE_SHM_DIR` through
//! [`DistConfig`](crate::DistConfig)); [`Link::reserve`] hands out the slots of one request as
//! a [`Lease`], which a worker fills, sends ([`Lease::slots`] gives the flags and payload of the
//! message), marks [`answered`](Lease::answered) on any answer, and reads
//! ([`Lease::with_reply`]). `DistStore` and the `byteps` store use them the same way.
//!
//! # Invariants of a shared region
//!
//! Both processes may write the region at any time, so nothing here hands out a reference
//! that outlives one bounds-checked operation except `Region::with_slice`, whose caller
//! promises what the protocol guarantees:
//!
//! - the worker writes a slot only while no request using that slot is in flight (it reserves
//!   slots with a bump allocator and reuses the region only once every request that used it
//!   has been answered, or never again once one failed);
//! - the server reads a push slot only while handling the request that names it, and writes a
//!   reply slot only before answering the request that names it;
//! - every offset and length received from the peer is checked against the mapped size before
//!   any access (`Region::check`): a bad one is an error, never an out-of-bounds access.
//!
//! A peer that breaks the protocol (writes a slot it lent) can only garble the values in that
//! slot; memory outside the mapping is never touched.

use std::path::{Path, PathBuf};

pub use crate::worker::shm_link::{Lease, Link};

/// Bytes at the start of a region holding the nonce (slots start after them).
pub(crate) const HEADER_BYTES: usize = 64;
/// Length of the nonce.
pub(crate) const NONCE_LEN: usize = 16;
/// The prefix of every region file's name; a server opens no other file.
pub(crate) const FILE_PREFIX: &str = "kvstore-shm-";

/// A mapped shared-memory region, unmapped on drop.
pub(crate) struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory shared by design; every access goes through the
// bounds-checked methods below, which copy with raw pointers (see the module's invariants).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Region({} bytes)", self.len)
    }
}

impl Region {
    /// The mapped size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Checks that `offset..offset + len` lies inside the region (and after its header).
    pub(crate) fn check(&self, offset: u64, len: u64) -> Result<(usize, usize), String> {
        let fits = offset >= HEADER_BYTES as u64
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.len as u64);
        if !fits {
            return Err(format!(
                "shared-memory slot of {len} bytes at offset {offset} lies outside the region \
                 ({HEADER_BYTES}..{} bytes)",
                self.len
            ));
        }
        Ok((offset as usize, len as usize))
    }

    /// Copies `src` into the region at `offset`.
    pub(crate) fn copy_in(&self, offset: u64, src: &[u8]) -> Result<(), String> {
        let (at, n) = self.check(offset, src.len() as u64)?;
        // SAFETY: `at..at + n` is inside the mapping (checked); `src` is ordinary memory that
        // cannot overlap the mapping through a shared reference we handed out.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), n) };
        Ok(())
    }

    /// Calls `f` with the region's bytes `offset..offset + len`.
    ///
    /// The caller's protocol must keep the peer from writing that range meanwhile (see the
    /// module's invariants); the range is bounds-checked.
    pub(crate) fn with_slice<T>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, String> {
        let (at, n) = self.check(offset, len)?;
        // SAFETY: `at..at + n` is inside the mapping (checked), which lives as long as `self`;
        // the slice does not escape `f`.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.add(at), n) };
        Ok(f(bytes))
    }

    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        // SAFETY: a region is at least `HEADER_BYTES` long (checked when mapped).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, nonce.as_mut_ptr(), NONCE_LEN) };
        nonce
    }
}

/// A region created by a worker: the region, its file (to unlink once the server has it) and
/// its nonce.
pub(crate) struct Created {
    /// The mapping.
    pub region: Region,
    /// The open file, to commit pages with [`commit`].
    pub file: std::fs::File,
    /// The file, still linked.
    pub path: PathBuf,
    /// The nonce written at its start.
    pub nonce: [u8; NONCE_LEN],
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(target_os = "linux")]
mod sys {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    use std::os::unix::io::AsRawFd;

    fn map(file: &File, len: usize) -> Result<Region, String> {
        // SAFETY: a fresh shared mapping of a file we hold open, of its full size; the result
        // is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap failed: {}", std::io::Error::last_os_error()));
        }
        Ok(Region {
            ptr: ptr.cast(),
            len,
        })
    }

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: `ptr` and `len` are the mapping made in `map`, unmapped only here.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    /// Creates, sizes (sparse) and maps a region of `len` bytes in `dir`, with a fresh nonce.
    pub(crate) fn create(dir: &Path, len: usize) -> Result<Created, String> {
        if len < 2 * HEADER_BYTES {
            return Err(format!("a region of {len} bytes is too small"));
        }
        let name: [u8; 12] =
            crate::transport::auth::random().map_err(|e| format!("no random bytes: {e}"))?;
        let path = dir.join(format!(
            "{FILE_PREFIX}{}-{}",
            std::process::id(),
            hex(&name)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let made = (|| {
            file.set_len(len as u64)
                .map_err(|e| format!("cannot size {}: {e}", path.display()))?;
            let region = map(&file, len)?;
            let nonce: [u8; NONCE_LEN] =
                crate::transport::auth::random().map_err(|e| format!("no random bytes: {e}"))?;
            // SAFETY: the mapping is at least `HEADER_BYTES` long (checked above).
            unsafe { std::ptr::copy_nonoverlapping(nonce.as_ptr(), region.ptr, NONCE_LEN) };
            Ok(Created {
                region,
                file: file
                    .try_clone()
                    .map_err(|e| format!("cannot keep the file: {e}"))?,
                path: path.clone(),
                nonce,
            })
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        made
    }

    /// Backs `offset..offset + len` of a region's file with memory (`fallocate`), so that
    /// touching it cannot fail with `SIGBUS`.
    pub(crate) fn commit(file: &File, offset: usize, len: usize) -> Result<(), String> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err("the range does not fit an off_t".into());
        };
        // SAFETY: fallocate on a file descriptor we hold open; no memory is passed.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) } != 0 {
            return Err(format!(
                "cannot back {len} bytes of the region: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Opens and maps the region a worker named: a file called `name` in `dir` (no path
    /// separators, our prefix), an existing regular file of this user, private to it, of
    /// exactly `len` bytes, holding `nonce` at its start.
    pub(crate) fn open(
        dir: &Path,
        name: &str,
        len: u64,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Region, String> {
        if !name.starts_with(FILE_PREFIX) || name.contains('/') || name.contains("..") {
            return Err(format!("{name:?} is not a region file name"));
        }
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if !meta.file_type().is_file() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
            return Err(format!(
                "{} is not a private regular file of this user",
                path.display()
            ));
        }
        if meta.len() != len || len < 2 * HEADER_BYTES as u64 {
            return Err(format!(
                "{} holds {} bytes, not the {len} announced",
                path.display(),
                meta.len()
            ));
        }
        let len = usize::try_from(len).map_err(|_| "the region does not fit in memory")?;
        let region = map(&file, len)?;
        if region.nonce() != *nonce {
            return Err(format!(
                "{} does not hold the announced nonce: another host's file",
                path.display()
            ));
        }
        Ok(region)
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use super::*;

    impl Drop for Region {
        fn drop(&mut self) {}
    }

    pub(crate) fn create(_dir: &Path, _len: usize) -> Result<Created, String> {
        Err("shared memory is not supported on this platform".into())
    }

    pub(crate) fn commit(_file: &std::fs::File, _offset: usize, _len: usize) -> Result<(), String> {
        Err("shared memory is not supported on this platform".into())
    }

    pub(crate) fn open(
        _dir: &Path,
        _name: &str,
        _len: u64,
        _nonce: &[u8; NONCE_LEN],
    ) -> Result<Region, String> {
        Err("shared memory is not supported on this platform".into())
    }
}

pub(crate) use sys::{commit, create, open};

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn create_open_copy_and_bounds() {
        let dir = std::env::temp_dir();
        let made = create(&dir, 1 << 16).unwrap();
        let name = made.path.file_name().unwrap().to_str().unwrap().to_string();
        let other = open(&dir, &name, 1 << 16, &made.nonce).unwrap();
        assert!(open(&dir, &name, 1 << 17, &made.nonce).is_err());
        assert!(open(&dir, &name, 1 << 16, &[0; NONCE_LEN]).is_err());
        assert!(open(&dir, "../etc/passwd", 1 << 16, &made.nonce).is_err());
        std::fs::remove_file(&made.path).unwrap();
        commit(&made.file, 0, 4096).unwrap();
        made.region.copy_in(100, &[1, 2, 3]).unwrap();
        assert_eq!(other.with_slice(100, 3, |b| b.to_vec()).unwrap(), [1, 2, 3]);
        assert!(other.copy_in(0, &[1]).is_err(), "the header is not a slot");
        assert!(other.check((1 << 16) - 2, 3).is_err());
        assert!(other.check(u64::MAX - 1, 4).is_err());
        assert!(other.with_slice(64, 1 << 16, |_| ()).is_err());
    }
}
