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
#![warn(missing_docs)]

pub use ballast_balancer as balancer;
pub use ballast_cluster as cluster;
pub use ballast_collectives as collectives;

pub mod balance;
pub mod checkpoint;
pub mod config;
pub mod ddp;
pub mod device;
pub mod eval;
pub mod job;
pub mod memory;
pub mod metrics;
pub mod offload;
pub mod params;
pub mod report;
pub mod sampler;
pub mod testing;
pub mod world;

pub use ddp::{Averaging, DataParallel, DdpError, DdpOptions, LossReduction, StepStats};
pub use sampler::GlobalSampler;
