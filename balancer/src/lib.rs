//! Planning for unequal devices: how many samples of the global batch each rank takes, in how
//! many micro-batches.
//!
//! This crate is pure: numbers in, a plan out. It does no IO and knows nothing of MPI, CUDA or
//! burn, so every rule here is property-tested on its own and every rank computes the same plan
//! from the same inputs.
//!
//! ```
//! use ballast_balancer::{split_proportional, RankPlan};
//!
//! // A global batch of 8 over ranks twice, once and half as fast as a baseline.
//! let shares = split_proportional(8, &[2.0, 1.0, 0.5]).unwrap();
//! assert_eq!(shares.iter().sum::<usize>(), 8);
//! assert_eq!(shares, vec![5, 2, 1]);
//! // Rank 0 can hold 3 samples at once: 5 samples take 2 micro-batches.
//! let plan = RankPlan::new(5, 3).unwrap();
//! assert_eq!(plan.micro_batches(), vec![3, 2]);
//! ```
#![warn(missing_docs)]

mod baseline;
mod rebalance;
mod shard;
mod solve;

pub use baseline::{fit_memory_line, solve_equal, EqualCaps};
pub use rebalance::Rebalancer;
pub use shard::{solve_sharded, solve_with_shards, OptimizerState, ShardedPlan, Sharding};
pub use solve::{
    cap_with_offload, compute_groups, memory_cap, micro_batch_schedule, operating_point, solve, speed_at, DeviceReport,
    MicroBatchPolicy, OffloadPolicy, Plan, RankAssignment, SpeedPoint, Tunables,
};

use serde::{Deserialize, Serialize};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Weights must be finite and non-negative, with at least one positive.
    #[error("invalid rank weights {weights:?}: every weight must be finite and >= 0 and at least one > 0")]
    BadWeights {
        /// The weights given.
        weights: Vec<f64>,
    },
    /// A rank with samples to process has a micro-batch cap of zero.
    #[error("rank has a share of {share} samples but a micro-batch cap of 0; give it share 0 or a cap >= 1")]
    ZeroCap {
        /// The share.
        share: usize,
    },
    /// No device can hold even one sample, or the inputs are unusable.
    #[error("no feasible plan for a global batch of {global_batch}: {details}")]
    Infeasible {
        /// The global batch.
        global_batch: usize,
        /// Per device: what it needs and what it has.
        details: String,
    },
    /// A report is unusable (zero speed, NaN, budget below zero...).
    #[error("device report of rank {rank} is invalid: {reason}")]
    BadReport {
        /// The rank.
        rank: usize,
        /// What is wrong.
        reason: String,
    },
    /// An optimizer sharding that is not one of `off`, `even`, `memory`.
    #[error("optimizer sharding {given:?}: use off, even or memory")]
    UnknownSharding {
        /// What was given.
        given: String,
    },
}

/// Splits `total` samples in proportion to `weights`, exactly (largest remainder, ties to the
/// lower rank), so the shares add up to `total` and each is within one of its exact quota.
///
/// # Errors
/// [`Error::BadWeights`] for negative, non-finite or all-zero weights.
pub fn split_proportional(total: usize, weights: &[f64]) -> Result<Vec<usize>> {
    let sum: f64 = weights.iter().sum();
    if weights.is_empty() || weights.iter().any(|w| !w.is_finite() || *w < 0.0) || sum <= 0.0 || !sum.is_finite() {
        return Err(Error::BadWeights {
            weights: weights.to_vec(),
        });
    }
    let quotas: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut shares: Vec<usize> = quotas.iter().map(|q| q.floor() as usize).collect();
    let assigned: usize = shares.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Largest fractional part first; ties go to the lower rank so every rank agrees.
    order.sort_by(|&a, &b| {
        let fa = quotas[a] - quotas[a].floor();
        let fb = quotas[b] - quotas[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &i in order.iter().take(total.saturating_sub(assigned)) {
        shares[i] += 1;
    }
    Ok(shares)
}

/// One rank's part of a step: `share` samples in micro-batches of at most `micro_batch_cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankPlan {
    /// Samples this rank processes per step.
    pub share: usize,
    /// Largest micro-batch this rank runs (memory cap).
    pub micro_batch_cap: usize,
}

impl RankPlan {
    /// A plan for `share` samples with micro-batches of at most `micro_batch_cap`.
    ///
    /// # Errors
    /// [`Error::ZeroCap`] when `share > 0` and `micro_batch_cap == 0`.
    pub fn new(share: usize, micro_batch_cap: usize) -> Result<Self> {
        if share > 0 && micro_batch_cap == 0 {
            return Err(Error::ZeroCap { share });
        }
        Ok(Self { share, micro_batch_cap })
    }

    /// Number of micro-batches (gradient accumulation steps): `ceil(share / cap)`, 0 for share 0.
    pub fn accumulation_steps(&self) -> usize {
        if self.share == 0 {
            0
        } else {
            self.share.div_ceil(self.micro_batch_cap)
        }
    }

    /// Micro-batch sizes of nearly equal size (differing by at most one), as few as the cap
    /// allows: every micro-batch stays near the size that was chosen for its speed (a small
    /// remainder can run at a fraction of the speed, e.g. below a kernel's batch threshold).
    pub fn micro_batches_even(&self) -> Vec<usize> {
        let k = self.accumulation_steps();
        (0..k)
            .map(|i| self.share / k + usize::from(i < self.share % k))
            .collect()
    }

    /// Micro-batch sizes in order: full micro-batches of the cap, then the remainder.
    ///
    /// Full-size micro-batches use the memory the cap was chosen for (and the per-call
    /// efficiency that comes with it); only the last one is smaller.
    pub fn micro_batches(&self) -> Vec<usize> {
        let k = self.accumulation_steps();
        (0..k)
            .map(|i| {
                let done = i * self.micro_batch_cap;
                (self.share - done).min(self.micro_batch_cap)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn shares_sum_and_follow_weights(total in 0usize..10_000, weights in proptest::collection::vec(0.0f64..100.0, 1..16)) {
            prop_assume!(weights.iter().sum::<f64>() > 1e-9);
            let shares = split_proportional(total, &weights).unwrap();
            prop_assert_eq!(shares.iter().sum::<usize>(), total);
            let sum: f64 = weights.iter().sum();
            for (s, w) in shares.iter().zip(&weights) {
                let quota = total as f64 * w / sum;
                prop_assert!((*s as f64 - quota).abs() < 1.0 + 1e-9, "share {} quota {}", s, quota);
            }
            prop_assert_eq!(split_proportional(total, &weights).unwrap(), shares);
        }

        #[test]
        fn micro_batches_cover_the_share(share in 0usize..5000, cap in 1usize..300) {
            let plan = RankPlan::new(share, cap).unwrap();
            let mbs = plan.micro_batches();
            prop_assert_eq!(mbs.iter().sum::<usize>(), share);
            prop_assert_eq!(mbs.len(), plan.accumulation_steps());
            prop_assert!(mbs.iter().all(|&m| m >= 1 && m <= cap));
            prop_assert!(plan.accumulation_steps() * cap >= share);
            let even = plan.micro_batches_even();
            prop_assert_eq!(even.iter().sum::<usize>(), share);
            prop_assert_eq!(even.len(), plan.accumulation_steps());
            prop_assert!(even.iter().all(|&m| m >= 1 && m <= cap));
            let (lo, hi) = (even.iter().min().copied().unwrap_or(0), even.iter().max().copied().unwrap_or(0));
            prop_assert!(hi - lo <= 1);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(split_proportional(8, &[]).is_err());
        assert!(split_proportional(8, &[0.0, 0.0]).is_err());
        assert!(split_proportional(8, &[1.0, -1.0]).is_err());
        assert!(split_proportional(8, &[f64::NAN]).is_err());
        assert!(RankPlan::new(3, 0).is_err());
        assert_eq!(RankPlan::new(0, 0).unwrap().accumulation_steps(), 0);
    }

    #[test]
    fn micro_batches_fill_the_cap_first() {
        assert_eq!(RankPlan::new(5, 3).unwrap().micro_batches(), vec![3, 2]);
        assert_eq!(RankPlan::new(10, 4).unwrap().micro_batches(), vec![4, 4, 2]);
    }
}
