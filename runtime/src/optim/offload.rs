//! Host offload: master parameters and Adam moments in host memory, for devices too small to
//! hold optimizer state next to a useful micro-batch.
//!
//! Per step the device only runs forward and backward; the averaged gradient updates the master
//! copy with Adam, and the new parameters are loaded back into the model. The device saves 8
//! bytes per parameter of Adam state (12 with the master copy).
//!
//! On CPU ranks the buffers are plain host vectors and [`HostAdam`] updates them on the host
//! cores. With the `cuda` feature, on a GPU rank, the master copy, the moments and a gradient
//! buffer live in CUDA managed memory advised to the host (`super::StateBuffer::Managed`), and the GPU
//! computes the step, streaming the state through the device two chunks at a time
//! ([`super::chunks::chunk_schedule`], `super::managed::ChunkedAdam`): state larger than the device's free memory is
//! updated at PCIe speed instead of by the host CPU. That path is **not yet verified on a GPU**.
//!
//! Host RAM is finite and swapping destroys throughput: [`check_host_memory`] refuses offload
//! buffers beyond `MemAvailable` minus a margin, and [`SwapMonitor`] reports rising `pswpout`
//! (pages swapped out) while training.

use std::path::{Path, PathBuf};

use burn::module::Module;

use super::host::{HostAdam, HostAdamConfig};
use super::state::StateBuffer;
use crate::ddp::{DataParallel, GradientForm, ReducedGrads, StepOptimizer, StepStats};
use crate::params::{flatten_params, load_params};
use crate::transfer::{byte_len, to_host};
use crate::Error;

/// Fraction of `MemAvailable` offload may use by default: the rest stays for the OS page cache,
/// data loading and the other ranks on the host.
pub const DEFAULT_HOST_MARGIN: f64 = 0.20;

/// Fails when `needed` bytes of offloaded state do not fit in `MemAvailable` of `<root>/proc/meminfo`
/// minus `margin`.
///
/// # Errors
/// [`Error::HostMemory`] with the numbers; [`Error::Cluster`] when meminfo is unreadable.
pub fn check_host_memory(root: &Path, needed: u64, margin: f64) -> Result<u64, Error> {
    let mem = ballast_cluster::host_memory(root)?;
    let usable = (mem.available as f64 * (1.0 - margin)) as u64;
    if needed > usable {
        return Err(Error::HostMemory {
            needed,
            usable,
            available: mem.available,
            margin_pct: margin * 100.0,
            path: root.join("proc/meminfo").display().to_string(),
        });
    }
    Ok(usable)
}

/// The host side of an offloaded optimizer: master parameters and Adam state.
///
/// On a GPU rank (feature `cuda`) the master copy, a gradient buffer and the moments live in
/// managed memory and each step is computed by the GPU chunk by chunk
/// (`managed::ChunkedAdam`); elsewhere the host Adam computes it. A clone is a host copy and
/// steps on the host.
pub struct HostOffload {
    master: StateBuffer,
    /// In a mixed precision, whether `master` holds the f32 master values, taken over from the
    /// [`DataParallel`] at the first step (before it, `master` holds the replica's rounded
    /// values, and the `DataParallel`'s copy is the master).
    holds_master: bool,
    adam: HostAdam,
    /// Bytes the last step moved to the device and back (the GPU update's prefetches).
    moved: (u64, u64),
    /// Boxed: the kernel, its streams and the gradient buffer are large next to a host state.
    #[cfg(feature = "cuda")]
    gpu: Option<Box<GpuUpdate>>,
}

/// What the chunked GPU update of an offloaded optimizer needs besides the state: the kernel
/// and its streams, and managed room for the step's gradient.
#[cfg(feature = "cuda")]
struct GpuUpdate {
    chunked: super::managed::ChunkedAdam,
    grads: StateBuffer,
}

impl Clone for HostOffload {
    fn clone(&self) -> Self {
        Self {
            master: self.master.clone(),
            holds_master: self.holds_master,
            adam: self.adam.clone(),
            moved: (0, 0),
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }
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
    /// [`Error::HostMemory`] when it cannot.
    pub fn new<M: Module>(model: &M, config: HostAdamConfig, root: &Path) -> Result<Self, Error> {
        Self::for_device(model, config, root, None)
    }

    /// As [`HostOffload::new`]; on a GPU rank (`gpu` = its ordinal, with `cuda`) the Adam moments
    /// go to managed memory, advised to the host (see [`StateBuffer`]). Without `cuda` the
    /// ordinal is ignored.
    ///
    /// # Errors
    /// [`Error::HostMemory`]; with `cuda`, the managed buffer's errors.
    pub fn for_device<M: Module>(
        model: &M,
        config: HostAdamConfig,
        root: &Path,
        gpu: Option<usize>,
    ) -> Result<Self, Error> {
        Self::with_state(flatten_params(model), config, root, gpu)
    }

    /// Host Adam for `master`, some of a model's flat parameters (a shard of them), with zeroed
    /// moments in host memory, after the same host-RAM check as [`HostOffload::new`].
    ///
    /// # Errors
    /// [`Error::HostMemory`] when host RAM cannot hold them.
    pub fn from_values(master: Vec<f32>, config: HostAdamConfig, root: &Path) -> Result<Self, Error> {
        Self::with_state(master, config, root, None)
    }

    fn with_state(master: Vec<f32>, config: HostAdamConfig, root: &Path, gpu: Option<usize>) -> Result<Self, Error> {
        let n = master.len();
        let on_gpu = cfg!(feature = "cuda") && gpu.is_some();
        // Master, moments and, on a GPU, the managed gradient buffer.
        let per_param = if on_gpu { 16 } else { 12 };
        check_host_memory(root, n as u64 * per_param, DEFAULT_HOST_MARGIN)?;
        match gpu {
            #[cfg(feature = "cuda")]
            Some(ordinal) => {
                let mut managed_master = StateBuffer::managed(ordinal, n)?;
                managed_master.copy_from_slice(&master);
                let adam = HostAdam::with_buffers(
                    StateBuffer::managed(ordinal, n)?,
                    StateBuffer::managed(ordinal, n)?,
                    config,
                );
                Ok(Self {
                    master: managed_master,
                    holds_master: false,
                    adam,
                    moved: (0, 0),
                    gpu: Some(Box::new(GpuUpdate {
                        chunked: super::managed::ChunkedAdam::new(ordinal, n)?,
                        grads: StateBuffer::managed(ordinal, n)?,
                    })),
                })
            }
            _ => Ok(Self {
                master: StateBuffer::Host(master),
                holds_master: false,
                adam: HostAdam::new(n, config),
                moved: (0, 0),
                #[cfg(feature = "cuda")]
                gpu: None,
            }),
        }
    }

    /// Applies one Adam step to the master parameters and returns them: on the GPU chunk by
    /// chunk where the state is in managed memory, else on the host.
    ///
    /// # Errors
    /// [`Error::Cuda`] when the GPU update fails.
    pub fn step(&mut self, grads: &[f32], lr: f32) -> Result<&[f32], Error> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &mut self.gpu {
            gpu.grads.copy_from_slice(grads);
            let stats = self.adam.step_on_gpu(&gpu.chunked, &mut self.master, &gpu.grads, lr)?;
            self.moved = (stats.to_device_bytes, stats.to_host_bytes);
            return Ok(&self.master);
        }
        self.adam.step(&mut self.master, grads, lr);
        Ok(&self.master)
    }

    /// Bytes the last step moved between host and device memory for the update itself, to the
    /// device and back: the GPU update's prefetches of the managed state, `(0, 0)` on the host.
    pub fn last_step_transfer(&self) -> (u64, u64) {
        self.moved
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

    /// In a mixed precision, the f32 master values this optimizer took over at its first step
    /// (the model's, or this shard's); `None` in f32 and before the first step.
    pub fn master(&self) -> Option<&[f32]> {
        self.holds_master.then_some(&self.master[..])
    }

    /// Makes `values` (f32 master values as long as the state) the master this optimizer
    /// updates, in place of the replica's rounded values it was made from.
    pub(crate) fn take_master(&mut self, values: &[f32]) {
        self.master.copy_from_slice(values);
        self.holds_master = true;
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

/// Adam with its state off the device: the master parameters and moments take the averaged
/// gradient from the host copy of the reduced buckets (the host cores update them, or on a GPU
/// rank the GPU chunk by chunk over managed memory), and the updated parameters are loaded back.
impl StepOptimizer for HostOffload {
    fn form(&self) -> GradientForm {
        GradientForm::Host
    }

    fn apply<M: Module>(
        &mut self,
        ddp: &mut DataParallel,
        model: M,
        grads: ReducedGrads,
        lr: f64,
    ) -> Result<(M, StepStats), Error> {
        if ddp.precision().is_mixed() && !self.holds_master {
            // The f32 master moves here: the host updates it, the replica takes its cast.
            if let Some(master) = ddp.take_master_range(0..self.master.len())? {
                self.take_master(&to_host(master, "the f32 master parameters")?);
            }
        }
        let (grads, mut stats) = grads.into_host()?;
        let params = self.step(&grads, lr as f32)?;
        stats.traffic.to_device += byte_len(params.len());
        let model = load_params(model, params);
        // In a mixed precision the replica takes the master's cast.
        let model = match ddp.precision() {
            precision if precision.is_mixed() => crate::ddp::cast_params(model, precision.compute_dtype()),
            _ => model,
        };
        let (down, up) = self.last_step_transfer();
        stats.traffic.to_device += down;
        stats.traffic.to_host += up;
        Ok((model, stats))
    }
}
