//! Direct (peer-to-peer) access between GPUs: MXNet's `CommDevice::EnableP2P`, run by the
//! `device` store for the GPUs of its first push of several GPUs (and of every later push that
//! places new keys), unless `MXNET_ENABLE_GPU_P2P=0`. With peer access, a copy between two GPUs
//! goes over their link (NVLink, PCIe) instead of through host memory.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, PoisonError};

use cudarc::driver::sys::{self, CUresult};
use kvstore_base::{Error, Result};

use crate::gpu::{cuda, Runtime};

/// Which ordered pairs of a set of GPUs have direct access to each other's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAccess {
    /// The GPU ordinals, in the order of the rows and columns of `direct`.
    pub ordinals: Vec<usize>,
    /// `direct[i][j]`: gpu `ordinals[i]` reaches the memory of gpu `ordinals[j]` directly
    /// (always false on the diagonal, as CUDA reports it).
    pub direct: Vec<Vec<bool>>,
}

impl PeerAccess {
    /// The ordered pairs with direct access.
    pub fn enabled_pairs(&self) -> usize {
        self.direct.iter().flatten().filter(|&&d| d).count()
    }

    /// Every ordered pair of distinct GPUs: `n * (n - 1)`.
    pub fn all_pairs(&self) -> usize {
        let n = self.ordinals.len();
        n * n.saturating_sub(1)
    }

    /// MXNet's matrix: one row per GPU, `v` where it has direct access to the column's GPU,
    /// `.` elsewhere.
    ///
    /// ```
    /// use kvstore_device::peer::PeerAccess;
    ///
    /// let access = PeerAccess {
    ///     ordinals: vec![0, 1, 2],
    ///     direct: vec![vec![false, true, false], vec![true, false, false], vec![false; 3]],
    /// };
    /// assert_eq!(access.matrix(), ".v.\nv..\n...");
    /// assert_eq!((access.enabled_pairs(), access.all_pairs()), (2, 6));
    /// ```
    pub fn matrix(&self) -> String {
        self.direct
            .iter()
            .map(|row| row.iter().map(|&d| if d { 'v' } else { '.' }).collect())
            .collect::<Vec<String>>()
            .join("\n")
    }

    /// MXNet's warning when some pairs lack direct access (`None` when every pair has it).
    pub fn warning(&self) -> Option<String> {
        (self.enabled_pairs() < self.all_pairs()).then(|| {
            format!(
                "only {} out of {} GPU pairs are enabled direct access. It may affect the \
                 performance. You can set MXNET_ENABLE_GPU_P2P=0 to turn it off\n{}",
                self.enabled_pairs(),
                self.all_pairs(),
                self.matrix()
            )
        })
    }
}

/// Whether `MXNET_ENABLE_GPU_P2P` asks for peer access (the default, as in MXNet).
pub fn p2p_requested() -> bool {
    std::env::var("MXNET_ENABLE_GPU_P2P").map_or(true, |v| v.trim() != "0")
}

/// Whether the driver reports that gpu `from` can reach gpu `to`'s memory directly.
///
/// # Errors
/// [`Error::Device`] without those GPUs, or when the driver call fails.
pub fn can_access_peer(from: usize, to: usize) -> Result<bool> {
    let runtime = Runtime::get()?;
    let a = runtime.gpu(from)?.stream.context().clone();
    let b = runtime.gpu(to)?.stream.context().clone();
    let mut can = 0;
    // SAFETY: `can` is a valid out-pointer; the devices come from live contexts.
    let status =
        guarded(|| unsafe { sys::cuDeviceCanAccessPeer(&mut can, a.cu_device(), b.cu_device()) })?;
    status.result().map_err(cuda("cuDeviceCanAccessPeer"))?;
    Ok(can != 0)
}

/// Enables direct access for every ordered pair of `ordinals` the driver allows (once per
/// pair and process: peer access belongs to the contexts, which live as long as the
/// process), and reports which pairs have it.
///
/// # Errors
/// [`Error::Device`] without those GPUs, or when a query fails; a pair whose enabling fails
/// is reported without direct access, as MXNet counts it.
pub fn enable_peer_access(ordinals: &[usize]) -> Result<PeerAccess> {
    let mut enabled = ENABLED.lock().unwrap_or_else(PoisonError::into_inner);
    let mut direct = vec![vec![false; ordinals.len()]; ordinals.len()];
    for (i, &from) in ordinals.iter().enumerate() {
        for (j, &to) in ordinals.iter().enumerate() {
            if from == to {
                continue;
            }
            direct[i][j] = match enabled.get(&(from, to)) {
                Some(&done) => done,
                None => {
                    let done = can_access_peer(from, to)? && enable(from, to)?;
                    enabled.insert((from, to), done);
                    done
                }
            };
        }
    }
    Ok(PeerAccess {
        ordinals: ordinals.to_vec(),
        direct,
    })
}

/// The ordered pairs of `ordinals` whose direct access this process has enabled so far (by
/// [`enable_peer_access`], which the `device` store runs), without enabling any.
pub fn enabled_peer_access(ordinals: &[usize]) -> PeerAccess {
    let enabled = ENABLED.lock().unwrap_or_else(PoisonError::into_inner);
    PeerAccess {
        ordinals: ordinals.to_vec(),
        direct: ordinals
            .iter()
            .map(|&from| {
                ordinals
                    .iter()
                    .map(|&to| enabled.get(&(from, to)).copied().unwrap_or(false))
                    .collect()
            })
            .collect(),
    }
}

/// Every ordered pair of GPUs enabling was tried for, and whether it succeeded.
static ENABLED: Mutex<BTreeMap<(usize, usize), bool>> = Mutex::new(BTreeMap::new());

/// `cuCtxEnablePeerAccess` from gpu `from`'s context to gpu `to`'s: whether access is on.
fn enable(from: usize, to: usize) -> Result<bool> {
    let runtime = Runtime::get()?;
    let a = runtime.gpu(from)?.stream.context().clone();
    let b = runtime.gpu(to)?.stream.context().clone();
    a.bind_to_thread().map_err(cuda("cuCtxSetCurrent"))?;
    // SAFETY: `b`'s context is alive (the runtime keeps it); flags must be 0.
    let status = guarded(|| unsafe { sys::cuCtxEnablePeerAccess(b.cu_ctx(), 0) })?;
    Ok(matches!(
        status,
        CUresult::CUDA_SUCCESS | CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
    ))
}

/// Runs a raw driver call, turning the bindings' panic on a symbol the loaded driver lacks
/// into [`Error::Device`].
fn guarded(call: impl FnOnce() -> CUresult) -> Result<CUresult> {
    catch_unwind(AssertUnwindSafe(call))
        .map_err(|p| Error::Device(format!("CUDA driver: {}", crate::probe::panic_text(&*p))))
}
