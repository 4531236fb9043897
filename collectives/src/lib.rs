//! Collectives for ballast: one [`Communicator`] trait, three backends, and fused buckets.
//!
//! | backend | ranks are | built with | module |
//! |---|---|---|---|
//! | `local` | threads in one process | always | [`local`] |
//! | `mpi` | processes under `mpirun`/`srun` | feature `mpi` | `mpi` |
//! | `nccl` | GPU processes, MPI as control plane | feature `nccl` | `nccl` |
//!
//! Every backend keeps the contract written on [`communicator`]: same calls in the same order,
//! a timeout on every blocking call naming the ranks that never arrived, typed errors instead of
//! hangs, identical results on every rank. The `conformance` module (feature `conformance`) holds
//! the exact checks that prove it.
//!
//! This crate knows nothing about burn, models or training: it moves numbers.
//!
//! ```
//! use ballast_collectives::{bucket::FusedBuffer, local, CommOptions, Communicator};
//!
//! // Three ranks as threads; each fills a fused buffer of two "gradients" and sums it.
//! let results = local::run(3, CommOptions::default(), |mut comm| {
//!     let r = comm.rank() as f32;
//!     let mut grads = FusedBuffer::<f32>::new(&[2, 3], 25 << 20).unwrap();
//!     grads.pack(0, &[r, r]).unwrap();
//!     grads.pack(1, &[1.0, 1.0, 1.0]).unwrap();
//!     grads.all_reduce_sum(&mut comm).unwrap();
//!     grads.as_slice().to_vec()
//! });
//! assert_eq!(results[2], vec![3.0, 3.0, 3.0, 3.0, 3.0]);
//! ```
#![warn(missing_docs)]

pub mod bucket;
pub mod communicator;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod env;
mod error;
pub mod local;
pub mod loss;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

pub use communicator::{
    reduce_buckets_through_host, AllReduceSum, BufferError, CommOptions, Communicator, CommunicatorExt, CudaRegion,
    DeviceBuffer, Element, DEFAULT_TIMEOUT,
};
pub use error::{Error, Result, EXIT_LOST_RANK};
