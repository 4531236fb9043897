//! The optimizers ballast supplies, for state that does not fit beside the model on one device.
//! Any burn optimizer steps a [`crate::DataParallel`] model as well; these implement
//! [`crate::StepOptimizer`] the same way, so `ddp.step(model, &mut optim, lr)` takes any of them.
//!
//! - [`offload`]: [`HostOffload`], Adam with the master parameters and moments in host memory
//!   (the host cores update them, or on a GPU rank the GPU chunk by chunk), and the host-RAM and
//!   swap checks that keep it from swapping.
//! - [`sharded`]: [`ShardedAdam`], Adam's state cut into one uneven shard per rank (ZeRO-1),
//!   each shard on its rank's device or in its host memory.
//! - [`HostAdam`]: the Adam arithmetic on flat host buffers, burn's `Adam` step for step; the
//!   offloaded and host-sharded paths run it, and the device and kernel forms are tested against it.
//! - [`StateBuffer`]: where that state lives (a host vector, or CUDA managed memory), and
//!   [`chunks`], the schedule by which the GPU updates managed state two chunks at a time.
//! - `managed` (feature `cuda`): state in CUDA managed memory and the NVRTC kernel that updates it.

pub mod chunks;
mod host;
#[cfg(feature = "cuda")]
pub mod managed;
pub mod offload;
pub mod sharded;
mod state;

pub use host::{HostAdam, HostAdamConfig};
pub use offload::HostOffload;
pub use sharded::{shard_counts, ShardPlace, ShardedAdam};
pub use state::StateBuffer;
