//! The global sampler: which samples every step takes, whatever the shares.
//!
//! Each epoch is a seeded permutation of the dataset. Global step `t` of an epoch takes
//! positions `[t·B, (t+1)·B)` of that permutation and hands them to ranks **in rank order**, each
//! rank a consecutive slice as long as its share. So the sequence of global batches depends only
//! on the seed, the dataset length and `B`, never on the number of ranks or their shares, and
//! every sample is seen exactly once per epoch.
//!
//! **Last partial batch.** When the dataset length is not a multiple of `B`, the last step of an
//! epoch has fewer samples: it is kept (not dropped), and its samples are split over ranks in
//! proportion to the step's shares. The gradient is then the mean over those fewer samples, as a
//! single device running the same batch would compute it.
//!
//! ```
//! use ballast::sampler::GlobalSampler;
//!
//! let sampler = GlobalSampler::new(10, 4, 7).unwrap();
//! assert_eq!(sampler.steps_per_epoch(), 3); // 4 + 4 + 2
//! let batch = sampler.batch(2);            // the partial last batch
//! assert_eq!(batch.len(), 2);
//! let parts = sampler.split(&batch, &[3, 1]);
//! assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 0]);
//! ```

use crate::Error;
use ballast_balancer::split_proportional;

/// Deterministic epoch permutations cut into global batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalSampler {
    len: usize,
    global_batch: usize,
    seed: u64,
}

impl GlobalSampler {
    /// A sampler over `len` samples with global batch `global_batch`, shuffled with `seed`.
    ///
    /// # Errors
    /// [`Error`] for an empty dataset or a zero batch.
    pub fn new(len: usize, global_batch: usize, seed: u64) -> Result<Self, Error> {
        if len == 0 {
            return Err(Error::EmptyDataset);
        }
        if global_batch == 0 {
            return Err(Error::ZeroBatch);
        }
        Ok(Self {
            len,
            global_batch,
            seed,
        })
    }

    /// Samples per global step (the last step of an epoch may take fewer).
    pub fn global_batch(&self) -> usize {
        self.global_batch
    }

    /// Global steps in one epoch (the last may be partial).
    pub fn steps_per_epoch(&self) -> usize {
        self.len.div_ceil(self.global_batch)
    }

    /// The permutation of epoch `epoch` (Fisher–Yates with a SplitMix64 stream).
    pub fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..self.len).collect();
        let mut state = self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for i in (1..self.len).rev() {
            let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
            perm.swap(i, j);
        }
        perm
    }

    /// The sample indices of global step `step` (counted from the start of training).
    pub fn batch(&self, step: u64) -> Vec<usize> {
        let per_epoch = self.steps_per_epoch() as u64;
        let epoch = step / per_epoch;
        let within = (step % per_epoch) as usize;
        let perm = self.permutation(epoch);
        let start = within * self.global_batch;
        let end = (start + self.global_batch).min(self.len);
        perm[start..end].to_vec()
    }

    /// Splits a global batch over ranks in rank order by `shares`. A full batch is split exactly
    /// by the shares; a partial one in proportion to them (all shares zero is not allowed for a
    /// non-empty batch and gives everything to rank 0).
    pub fn split(&self, batch: &[usize], shares: &[usize]) -> Vec<Vec<usize>> {
        split_batch(batch, shares)
    }
}

/// Splits a global batch over ranks in rank order by `shares` (see [`GlobalSampler::split`]).
pub fn split_batch(batch: &[usize], shares: &[usize]) -> Vec<Vec<usize>> {
    let sizes = split_sizes(batch.len(), shares);
    let mut out = Vec::with_capacity(sizes.len());
    let mut off = 0;
    for s in sizes {
        out.push(batch[off..off + s].to_vec());
        off += s;
    }
    out
}

/// How many of a global batch of `len` samples each rank takes by `shares` (see
/// [`split_batch`]): the shares themselves for a full batch, in proportion to them otherwise.
pub fn split_sizes(len: usize, shares: &[usize]) -> Vec<usize> {
    if shares.iter().sum::<usize>() == len {
        return shares.to_vec();
    }
    let weights: Vec<f64> = shares.iter().map(|&s| s as f64).collect();
    split_proportional(len, &weights).unwrap_or_else(|_| {
        let mut v = vec![0; shares.len()];
        if let Some(first) = v.first_mut() {
            *first = len;
        }
        v
    })
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the shares, every sample is seen exactly once per epoch, and the global
        /// batches do not depend on the shares.
        #[test]
        fn each_sample_once_per_epoch(len in 1usize..200, seed: u64,
                                      shares in proptest::collection::vec(0usize..10, 1..5)) {
            let total: usize = shares.iter().sum();
            prop_assume!(total > 0);
            let sampler = GlobalSampler::new(len, total, seed).unwrap();
            let mut seen = vec![0u32; len];
            for step in 0..sampler.steps_per_epoch() as u64 {
                let batch = sampler.batch(step);
                let parts = sampler.split(&batch, &shares);
                prop_assert_eq!(parts.concat(), batch);
                for i in parts.concat() { seen[i] += 1; }
            }
            prop_assert!(seen.iter().all(|&c| c == 1));
        }
    }

    #[test]
    fn epochs_differ_and_repeat() {
        let s = GlobalSampler::new(50, 8, 1).unwrap();
        assert_ne!(s.permutation(0), s.permutation(1));
        assert_eq!(s.permutation(3), s.permutation(3));
        assert_eq!(s.batch(7), s.permutation(1)[0..8].to_vec());
        assert!(GlobalSampler::new(0, 8, 1).is_err());
        assert!(GlobalSampler::new(8, 0, 1).is_err());
    }
}
