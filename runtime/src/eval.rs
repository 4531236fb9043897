//! Held-out evaluation: which samples are held out, and data-parallel evaluation that gives
//! exactly the numbers one device evaluating everything would give.
//!
//! # Exactness
//! Every rank evaluates a contiguous slice of the held-out set, in proportion to the plan's
//! shares (so in proportion to its speed), in micro-batches of its planned size. A task returns
//! one loss per sample (summed over the sample's units: one image, or every byte of a text
//! window); each is rounded to a fixed point of 2⁻³² and summed as an integer, so the sum does
//! not depend on how samples were split over ranks or micro-batches. One all-reduce of five
//! integers (the loss sum in two words, correct, units, samples) then gives every rank the same
//! totals. They equal one device's totals whenever a sample's loss does not depend on the other
//! samples of its micro-batch, which holds for models that normalise per sample (as the examples
//! do) on one backend.

use crate::Error;
use ballast_balancer::split_proportional;
use ballast_collectives::Communicator;

/// What a task's evaluation measures, for printing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalKind {
    /// Mean loss per sample only.
    Loss,
    /// A classifier: top-1 accuracy and mean loss per sample.
    Classifier,
    /// A language model: mean loss per token (byte) and perplexity, next-token accuracy.
    LanguageModel,
}

/// What a task reports for one micro-batch of held-out samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalBatch {
    /// One loss per sample, summed over the sample's units (nats).
    pub losses: Vec<f32>,
    /// Units predicted correctly (images classified right, next bytes predicted right).
    pub correct: u64,
    /// Units evaluated (images, or bytes predicted).
    pub units: u64,
}

/// Totals of one evaluation over the whole held-out set (identical on every rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct EvalTotals {
    /// Sum of the per-sample losses in units of 2⁻³² nats (exact integer sum).
    pub loss_sum_fixed: i128,
    /// Units predicted correctly.
    pub correct: u64,
    /// Units evaluated.
    pub units: u64,
    /// Samples evaluated.
    pub samples: u64,
}

/// The fixed-point scale of [`EvalTotals::loss_sum_fixed`].
pub const LOSS_SCALE: f64 = 4_294_967_296.0;

impl EvalTotals {
    /// The loss sum in nats.
    pub fn loss_sum(&self) -> f64 {
        self.loss_sum_fixed as f64 / LOSS_SCALE
    }

    /// Mean loss per unit (per image, or per byte).
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum() / self.units.max(1) as f64
    }

    /// Fraction of units predicted correctly.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.units.max(1) as f64
    }

    /// `exp(mean loss)`: the perplexity of a language model.
    pub fn perplexity(&self) -> f64 {
        self.mean_loss().exp()
    }

    /// One line for people: what `kind` asks to be shown.
    pub fn describe(&self, kind: EvalKind) -> String {
        match kind {
            EvalKind::Loss => format!("mean loss {:.4} over {} samples", self.mean_loss(), self.samples),
            EvalKind::Classifier => format!(
                "accuracy {:.4} ({}/{}), mean loss {:.4}",
                self.accuracy(),
                self.correct,
                self.units,
                self.mean_loss()
            ),
            EvalKind::LanguageModel => format!(
                "loss {:.4} nats/byte, perplexity {:.3}, next-byte accuracy {:.4} ({} sequences, {} bytes)",
                self.mean_loss(),
                self.perplexity(),
                self.accuracy(),
                self.samples,
                self.units
            ),
        }
    }
}

/// A loss rounded to the fixed point of [`LOSS_SCALE`].
fn fixed(loss: f32) -> i128 {
    (f64::from(loss) * LOSS_SCALE).round() as i128
}

/// The held-out samples of rank `rank`: a contiguous slice of `0..len`, slices in rank order
/// and sized in proportion to `shares` (every rank's share of a training step).
pub fn slice_for(len: usize, shares: &[usize], rank: usize) -> std::ops::Range<usize> {
    let weights: Vec<f64> = shares.iter().map(|&s| s as f64).collect();
    let sizes = split_proportional(len, &weights).unwrap_or_else(|_| {
        // All shares zero cannot come from a plan; give everything to rank 0.
        let mut v = vec![0; shares.len().max(1)];
        v[0] = len;
        v
    });
    let start: usize = sizes[..rank.min(sizes.len())].iter().sum();
    start..start + sizes.get(rank).copied().unwrap_or(0)
}

/// Evaluates this rank's slice of a held-out set of `len` samples (see [`slice_for`]) in
/// micro-batches of `micro_batch`, then sums the totals over every rank in one all-reduce.
/// `run` evaluates the held-out samples it is given.
///
/// # Errors
/// [`Error`]: a non-finite loss, a task returning the wrong count, the collective.
pub fn evaluate(
    comm: &mut dyn Communicator,
    len: usize,
    shares: &[usize],
    micro_batch: usize,
    mut run: impl FnMut(&[usize]) -> EvalBatch,
) -> Result<(EvalTotals, usize), Error> {
    let mine = slice_for(len, shares, comm.rank());
    let local = mine.len();
    let mut loss: i128 = 0;
    let (mut correct, mut units) = (0u64, 0u64);
    let indices: Vec<usize> = mine.collect();
    for chunk in indices.chunks(micro_batch.max(1)) {
        let batch = run(chunk);
        if batch.losses.len() != chunk.len() {
            return Err(Error::EvalCount {
                expected: chunk.len(),
                got: batch.losses.len(),
            });
        }
        for (&index, &value) in chunk.iter().zip(&batch.losses) {
            if !value.is_finite() {
                return Err(Error::EvalNotFinite { index, value });
            }
            loss += fixed(value);
        }
        correct += batch.correct;
        units += batch.units;
    }
    // The loss sum travels as a high word (wrapping two's complement) and a low 32-bit word, so
    // the integer sum over ranks is exact for any total below 2⁹⁵.
    let mut words = [
        (loss >> 32) as i64 as u64,
        (loss & 0xFFFF_FFFF) as u64,
        correct,
        units,
        local as u64,
    ];
    comm.all_reduce_sum_u64(&mut words)?;
    let total = (i128::from(words[0] as i64) << 32) + i128::from(words[1]);
    Ok((
        EvalTotals {
            loss_sum_fixed: total,
            correct: words[2],
            units: words[3],
            samples: words[4],
        },
        local,
    ))
}

/// Which samples are held out of a dataset of `len` samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Samples to train on, ascending.
    pub train: Vec<usize>,
    /// Samples held out, ascending.
    pub eval: Vec<usize>,
}

fn held_count(len: usize, fraction: f64) -> Result<usize, Error> {
    if !(fraction.is_finite() && fraction > 0.0 && fraction < 1.0) {
        return Err(Error::EvalFraction(fraction));
    }
    let held = (len as f64 * fraction).round() as usize;
    if held == 0 || held >= len {
        return Err(Error::EvalSplitEmpty {
            fraction,
            len,
            held,
            left: len.saturating_sub(held),
        });
    }
    Ok(held)
}

/// Holds out `round(len · fraction)` samples chosen by a seeded permutation (the same for the
/// same `len`, `fraction` and `seed` on every machine).
///
/// # Errors
/// [`Error`] for a fraction outside (0, 1) or a split that leaves either side empty.
pub fn held_out(len: usize, fraction: f64, seed: u64) -> Result<Split, Error> {
    let held = held_count(len, fraction)?;
    // The epoch permutation of the training sampler with another stream.
    let sampler =
        crate::GlobalSampler::new(len, 1, seed ^ 0x4556_414c_5f53_504c).map_err(|_| Error::EvalSplitEmpty {
            fraction,
            len,
            held,
            left: 0,
        })?;
    let perm = sampler.permutation(0);
    let mut eval = perm[..held].to_vec();
    let mut train = perm[held..].to_vec();
    eval.sort_unstable();
    train.sort_unstable();
    Ok(Split { train, eval })
}

/// Holds out the last `round(len · fraction)` samples (for sequences cut from one text, where a
/// random choice would put overlapping neighbours on both sides).
///
/// # Errors
/// As [`held_out`].
pub fn held_out_tail(len: usize, fraction: f64) -> Result<Split, Error> {
    let held = held_count(len, fraction)?;
    Ok(Split {
        train: (0..len - held).collect(),
        eval: (len - held..len).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_set_in_rank_order_by_share() {
        let shares = [5, 2, 1];
        let slices: Vec<_> = (0..3).map(|r| slice_for(100, &shares, r)).collect();
        assert_eq!(slices[0].start, 0);
        assert_eq!(slices[0].end, slices[1].start);
        assert_eq!(slices[1].end, slices[2].start);
        assert_eq!(slices[2].end, 100);
        assert_eq!(slices.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![63, 25, 12]);
        assert_eq!(slice_for(10, &[8, 0, 0], 1).len(), 0);
    }

    #[test]
    fn a_split_is_disjoint_complete_and_seeded() {
        let s = held_out(1000, 0.1, 7).unwrap();
        assert_eq!(s.eval.len(), 100);
        assert_eq!(s.train.len(), 900);
        let mut all: Vec<usize> = s.train.iter().chain(&s.eval).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(held_out(1000, 0.1, 7).unwrap(), s);
        assert_ne!(held_out(1000, 0.1, 8).unwrap(), s);
        let t = held_out_tail(10, 0.3).unwrap();
        assert_eq!((t.train, t.eval), ((0..7).collect(), (7..10).collect()));
    }

    #[test]
    fn bad_fractions_are_errors() {
        for f in [0.0, 1.0, -0.5, f64::NAN, 2.0] {
            assert!(matches!(held_out(10, f, 1), Err(Error::EvalFraction(_))), "{f}");
        }
        assert!(matches!(
            held_out(10, 0.01, 1),
            Err(Error::EvalSplitEmpty { held: 0, .. })
        ));
        assert!(matches!(
            held_out_tail(2, 0.9),
            Err(Error::EvalSplitEmpty { left: 0, .. })
        ));
    }

    #[test]
    fn fixed_point_sums_do_not_depend_on_the_split() {
        let losses: Vec<f32> = (0..997).map(|i| ((i * 7919) % 1000) as f32 / 37.0 + 1e-3).collect();
        let whole: i128 = losses.iter().map(|&l| fixed(l)).sum();
        let parts: i128 = losses
            .chunks(13)
            .map(|c| c.iter().map(|&l| fixed(l)).sum::<i128>())
            .sum();
        assert_eq!(whole, parts);
        // The two-word encoding of a negative and a large sum.
        for v in [-5_i128 << 40, (1_i128 << 80) + 12345, -1] {
            let hi = (v >> 32) as i64 as u64;
            let lo = (v & 0xFFFF_FFFF) as u64;
            assert_eq!((i128::from(hi as i64) << 32) + i128::from(lo), v);
        }
    }
}
