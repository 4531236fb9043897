//! ballast: data-parallel training of burn models on unequal devices.
//!
//! One process (or, with no launcher, one thread) per device. Each rank processes its own share
//! of every global batch, in as many micro-batches as its memory needs, and all ranks sum their
//! gradients once per optimizer step, weighted by sample counts, so training equals one device
//! running the whole batch.
//!
//! This crate composes the others:
//! - [`collectives`]: communicators (threads, MPI, NCCL) and fused buckets;
//! - [`balancer`]: pure planning of shares and micro-batches;
//! - [`cluster`]: launcher bootstrap and host facts.
//!
//! | feature | adds |
//! |---|---|
//! | `mpi` | ranks as processes under `mpirun`/`srun` |
//! | `wgpu` | ranks on burn's wgpu backend (Vulkan, Metal, DX12) |
//! | `cuda` | GPU ranks with NCCL (not yet verified on a GPU) |
//! | `cli` | `config`, `job`, `report`: the job runner with flags, TOML settings, progress bars and SVG reports; the `ballast` binary |
//! | `testkit` | `testing` (small models, synthetic data, the equivalence harness), fault injection, the `ballast-selftest` binary |
#![warn(missing_docs)]

pub use ballast_balancer as balancer;
pub use ballast_cluster as cluster;
pub use ballast_collectives as collectives;

pub mod balance;
pub mod checkpoint;
#[cfg(feature = "cli")]
pub mod config;
#[cfg(feature = "cuda")]
mod cuda;
pub mod ddp;
pub mod device;
mod error;
pub mod eval;
pub mod health;
#[cfg(feature = "cli")]
pub mod job;
#[cfg(target_os = "linux")]
pub mod libs;
pub mod memory;
pub mod metrics;

pub mod optim;
pub mod params;
#[cfg(feature = "cli")]
pub mod report;
pub mod sampler;

#[cfg(feature = "testkit")]
pub mod testing;
mod transfer;
pub mod world;

pub use ddp::{
    Averaging, DataParallel, DdpOptions, GradientForm, LossReduction, LossScaling, Precision, ReducedGrads,
    StepOptimizer, StepStats,
};
pub use error::{Error, Result};
pub use sampler::GlobalSampler;
