//! Optimizer state sharded over the ranks, unevenly (ZeRO-1 with shards sized per device).
//!
//! The model's float parameters, flattened in [`crate::params`] order, are cut into one
//! contiguous shard per rank: `counts[r]` values for rank `r`, in rank order, a count of 0
//! allowed. Each rank keeps Adam's moments (and a master copy of the values) for its own shard
//! only, so the 8 bytes of state per parameter are spread over the ranks instead of repeated on
//! each. [`crate::DataParallel::finish_step_sharded`] drives a step: the gradient sums are
//! reduce-scattered, each rank updates its shard, and the updated shards are all-gathered into
//! every replica. Each parameter's update is computed once, on one rank, so the replicas are
//! bit-identical whatever device computed each shard.
//!
//! The update is [`crate::offload::HostAdam`]'s, burn's Adam step for step, on this rank's host
//! ([`HostOffload`] of the shard's values).

use std::path::Path;

use burn::module::Module;

use crate::{
    balancer::split_proportional,
    offload::{HostAdamConfig, HostOffload},
    params::flatten_params,
    DdpError,
};

/// Cuts `params` values into one shard per rank in proportion to `weights` (for example each
/// device's free memory), exactly: the counts add up to `params` (largest remainder, ties to the
/// lower rank). A weight of 0 gives that rank no shard.
///
/// # Errors
/// [`DdpError::Shards`] for negative, non-finite or all-zero weights.
pub fn shard_counts(params: usize, weights: &[f64]) -> Result<Vec<usize>, DdpError> {
    split_proportional(params, weights).map_err(|e| DdpError::Shards { reason: e.to_string() })
}

/// Adam for this rank's shard of the parameters (see the module docs).
#[derive(Debug, Clone)]
pub struct ShardedAdam {
    rank: usize,
    counts: Vec<usize>,
    offset: usize,
    host: HostOffload,
}

impl ShardedAdam {
    /// This rank's shard of `model`'s parameters, with zeroed moments. `counts` holds one count
    /// per rank (the same on every rank) and covers every parameter; `model` must be the replica
    /// [`crate::DataParallel::wrap`] returned, so every rank starts from the same values.
    ///
    /// # Errors
    /// [`DdpError::Shards`] when `counts` has no entry for `rank` or does not add up to the
    /// model's parameters; [`DdpError::Offload`] when host RAM cannot hold the shard's state.
    pub fn new<M: Module>(
        model: &M,
        rank: usize,
        counts: Vec<usize>,
        config: HostAdamConfig,
    ) -> Result<Self, DdpError> {
        let all = flatten_params(model);
        let total: usize = counts.iter().sum();
        if rank >= counts.len() || total != all.len() {
            return Err(DdpError::Shards {
                reason: format!(
                    "{} shards of {total} parameters in all for rank {rank} of a model with {} parameters",
                    counts.len(),
                    all.len()
                ),
            });
        }
        let offset: usize = counts[..rank].iter().sum();
        let master = all[offset..offset + counts[rank]].to_vec();
        let host = HostOffload::from_values(master, config, Path::new("/"))?;
        Ok(Self {
            rank,
            counts,
            offset,
            host,
        })
    }

    /// Every rank's shard size, in rank order.
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// The rank this shard belongs to.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Where this rank's shard starts in the flat parameters.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// One Adam step of this rank's shard with its averaged gradient; returns the updated values.
    ///
    /// # Panics
    /// If `grads` is not as long as this rank's shard.
    pub fn step(&mut self, grads: &[f32], lr: f32) -> &[f32] {
        self.host.step(grads, lr)
    }

    /// The shard's host optimizer: its Adam state (`adam`, `adam_mut`) and bytes held.
    pub fn host(&self) -> &HostOffload {
        &self.host
    }

    /// The shard's host optimizer, to restore its Adam state.
    pub fn host_mut(&mut self) -> &mut HostOffload {
        &mut self.host
    }

    /// Bytes this rank holds for its shard: Adam's two moments and the master values (12 per
    /// parameter of the shard).
    pub fn state_bytes(&self) -> u64 {
        self.host.host_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cover_every_parameter_and_follow_the_weights() {
        assert_eq!(shard_counts(100, &[6.0, 3.0, 1.0]).unwrap(), vec![60, 30, 10]);
        assert_eq!(shard_counts(10, &[7.0, 3.0, 0.0]).unwrap(), vec![7, 3, 0]);
        assert_eq!(shard_counts(7, &[1.0, 1.0, 1.0]).unwrap(), vec![3, 2, 2]);
        let err = shard_counts(7, &[0.0, 0.0]).unwrap_err().to_string();
        assert!(err.contains("the optimizer shards do not fit"), "{err}");
    }
}
