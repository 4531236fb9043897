//! Host offload: master parameters and Adam moments in host memory, for devices too small to
//! hold optimizer state next to a useful micro-batch.
//!
//! Per step the device only runs forward and backward; the averaged gradient (already on the
//! host in the fused all-reduce buffer on CPU ranks) updates the host master copy with
//! [`HostAdam`], and the new parameters are loaded back into the model. The device saves
//! 8 bytes per parameter of Adam state (12 with the master copy's gradient buffer).
//!
//! On CPU ranks the buffers are plain host vectors. With the `cuda` feature, on a GPU rank, the
//! Adam moments live in managed memory (`StateBuffer::Managed`), advised to the host and
//! prefetched explicitly; that path is **not yet verified on a GPU**.
//!
//! Host RAM is finite and swapping destroys throughput: [`check_host_memory`] refuses offload
//! buffers beyond `MemAvailable` minus a margin, and [`SwapMonitor`] reports rising `pswpout`
//! (pages swapped out) while training.

mod host_adam;
#[cfg(feature = "cuda")]
pub mod managed;

use std::path::{Path, PathBuf};

use burn::module::Module;

pub use host_adam::{HostAdam, HostAdamConfig};

use crate::params::flatten_params;

/// Errors of the offload path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OffloadError {
    /// Host RAM cannot hold the offloaded state.
    #[error(
        "offloading needs {needed} bytes of host RAM but only {usable} are usable ({available} available \
         in {path} minus a {margin_pct:.0}% margin); free host memory, put fewer ranks on this host, or \
         give the device more memory"
    )]
    HostMemory {
        /// Bytes the offloaded state needs.
        needed: u64,
        /// Bytes usable after the margin.
        usable: u64,
        /// `MemAvailable`.
        available: u64,
        /// Margin kept free, percent.
        margin_pct: f64,
        /// The meminfo file read.
        path: String,
    },
    /// Host memory facts could not be read.
    #[error(transparent)]
    Proc(#[from] ballast_cluster::Error),
    /// The CUDA driver is absent.
    #[error("CUDA offload needs the NVIDIA driver (libcuda.so), which is not installed here")]
    NoCuda,
    /// The device has less free memory than a managed buffer would take.
    #[error(
        "refusing to allocate {needed} bytes of managed memory with only {free} free on the device: \
         oversubscribed managed memory can stall the GPU"
    )]
    DeviceMemory {
        /// Bytes asked for.
        needed: u64,
        /// Free device bytes.
        free: u64,
    },
    /// A CUDA call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Fraction of `MemAvailable` offload may use by default: the rest stays for the OS page cache,
/// data loading and the other ranks on the host.
pub const DEFAULT_HOST_MARGIN: f64 = 0.20;

/// Fails when `needed` bytes of offloaded state do not fit in `MemAvailable` of `<root>/proc/meminfo`
/// minus `margin`.
///
/// # Errors
/// [`OffloadError::HostMemory`] with the numbers; [`OffloadError::Proc`] when meminfo is unreadable.
pub fn check_host_memory(root: &Path, needed: u64, margin: f64) -> Result<u64, OffloadError> {
    let mem = ballast_cluster::host_memory(root)?;
    let usable = (mem.available as f64 * (1.0 - margin)) as u64;
    if needed > usable {
        return Err(OffloadError::HostMemory {
            needed,
            usable,
            available: mem.available,
            margin_pct: margin * 100.0,
            path: root.join("proc/meminfo").display().to_string(),
        });
    }
    Ok(usable)
}

/// Optimizer state memory the host Adam works on: a host vector, or (with `cuda`, on a GPU rank)
/// CUDA managed memory advised to live on the host and be accessed by the device.
///
/// The host Adam is the state's only user, so managed state is prefetched to the host before each
/// update (explicit prefetch runs at copy speed; faulting page by page does not). A clone is a
/// host copy.
pub enum StateBuffer {
    /// Plain host memory.
    Host(Vec<f32>),
    /// CUDA managed memory (not yet verified on a GPU).
    #[cfg(feature = "cuda")]
    Managed(managed::ManagedBuffer),
}

impl StateBuffer {
    /// `len` zeros in host memory.
    pub fn host(len: usize) -> Self {
        Self::Host(vec![0.0; len])
    }

    /// `len` values in managed memory for GPU `ordinal`, after checking the device can hold
    /// them.
    ///
    /// # Errors
    /// [`OffloadError::NoCuda`], [`OffloadError::DeviceMemory`] or [`OffloadError::Cuda`].
    #[cfg(feature = "cuda")]
    pub fn managed(ordinal: usize, len: usize) -> Result<Self, OffloadError> {
        managed::ManagedBuffer::new(ordinal, len).map(Self::Managed)
    }

    /// Whether this is managed memory.
    pub fn is_managed(&self) -> bool {
        !matches!(self, Self::Host(_))
    }

    /// Moves managed memory to the host and waits (a no-op for host memory). A failed
    /// prefetch only costs speed: host access still works, by page faults.
    pub fn prepare_for_host(&mut self) {
        #[cfg(feature = "cuda")]
        if let Self::Managed(b) = self {
            if b.prefetch_to_host().and_then(|()| b.wait()).is_err() {
                eprintln!(
                    "ballast: warning: prefetching optimizer state to the host failed; it will fault in page by page"
                );
            }
        }
    }
}

impl std::ops::Deref for StateBuffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Self::Host(v) => v,
            #[cfg(feature = "cuda")]
            Self::Managed(b) => b.as_slice(),
        }
    }
}

impl std::ops::DerefMut for StateBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            Self::Host(v) => v,
            #[cfg(feature = "cuda")]
            Self::Managed(b) => b.as_mut_slice(),
        }
    }
}

impl Clone for StateBuffer {
    fn clone(&self) -> Self {
        Self::Host(self.to_vec())
    }
}

impl PartialEq for StateBuffer {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

/// The host side of an offloaded optimizer: master parameters and Adam state.
#[derive(Clone)]
pub struct HostOffload {
    master: Vec<f32>,
    adam: HostAdam,
}

impl std::fmt::Debug for HostOffload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostOffload")
            .field("params", &self.master.len())
            .field("host_bytes", &self.host_bytes())
            .field("steps", &self.adam.steps())
            .finish()
    }
}

impl HostOffload {
    /// Copies `model`'s parameters to host memory and creates zeroed Adam moments, after checking
    /// that host RAM (read under `root`, normally `/`) can hold them.
    ///
    /// # Errors
    /// [`OffloadError::HostMemory`] when it cannot.
    pub fn new<M: Module>(model: &M, config: HostAdamConfig, root: &Path) -> Result<Self, OffloadError> {
        Self::for_device(model, config, root, None)
    }

    /// As [`HostOffload::new`]; on a GPU rank (`gpu` = its ordinal, with `cuda`) the Adam moments
    /// go to managed memory, advised to the host (see [`StateBuffer`]). Without `cuda` the
    /// ordinal is ignored.
    ///
    /// # Errors
    /// [`OffloadError::HostMemory`]; with `cuda`, the managed buffer's errors.
    pub fn for_device<M: Module>(
        model: &M,
        config: HostAdamConfig,
        root: &Path,
        gpu: Option<usize>,
    ) -> Result<Self, OffloadError> {
        Self::with_state(flatten_params(model), config, root, gpu)
    }

    /// Host Adam for `master`, some of a model's flat parameters (a shard of them), with zeroed
    /// moments in host memory, after the same host-RAM check as [`HostOffload::new`].
    ///
    /// # Errors
    /// [`OffloadError::HostMemory`] when host RAM cannot hold them.
    pub fn from_values(master: Vec<f32>, config: HostAdamConfig, root: &Path) -> Result<Self, OffloadError> {
        Self::with_state(master, config, root, None)
    }

    fn with_state(
        master: Vec<f32>,
        config: HostAdamConfig,
        root: &Path,
        gpu: Option<usize>,
    ) -> Result<Self, OffloadError> {
        check_host_memory(root, master.len() as u64 * 12, DEFAULT_HOST_MARGIN)?;
        let n = master.len();
        let (m, v) = match gpu {
            #[cfg(feature = "cuda")]
            Some(ordinal) => (StateBuffer::managed(ordinal, n)?, StateBuffer::managed(ordinal, n)?),
            _ => (StateBuffer::host(n), StateBuffer::host(n)),
        };
        Ok(Self {
            master,
            adam: HostAdam::with_buffers(m, v, config),
        })
    }

    /// Applies one Adam step to the master parameters and returns them.
    pub fn step(&mut self, grads: &[f32], lr: f32) -> &[f32] {
        self.adam.step(&mut self.master, grads, lr);
        &self.master
    }

    /// The Adam state.
    pub fn adam(&self) -> &HostAdam {
        &self.adam
    }

    /// The Adam state, to restore it.
    pub fn adam_mut(&mut self) -> &mut HostAdam {
        &mut self.adam
    }

    /// Host bytes held (master copy and moments).
    pub fn host_bytes(&self) -> u64 {
        self.master.len() as u64 * 4 + self.adam.state_bytes()
    }
}

/// Watches `pswpout` in `<root>/proc/vmstat` and reports when the host starts swapping.
#[derive(Debug, Clone)]
pub struct SwapMonitor {
    path: PathBuf,
    last: Option<u64>,
}

/// A host that swapped out pages since the last poll.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SwapWarning {
    /// Pages swapped out since the last poll.
    pub pages_out: u64,
    /// Pages swapped in since the last poll (0 when unknown).
    pub pages_in: u64,
}

impl SwapMonitor {
    /// A monitor of `<root>/proc/vmstat`; the first poll sets the baseline.
    pub fn new(root: &Path) -> Self {
        Self {
            path: root.join("proc/vmstat"),
            last: None,
        }
    }

    /// `Some` when `pswpout` rose since the previous poll; `None` otherwise or when the file is
    /// unreadable (no swap accounting is not an error).
    pub fn poll(&mut self) -> Option<SwapWarning> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        let out = field("pswpout ")?;
        let previous = self.last.replace(out);
        match previous {
            Some(p) if out > p => Some(SwapWarning {
                pages_out: out - p,
                pages_in: field("pswpin ").unwrap_or(0),
            }),
            _ => None,
        }
    }
}
