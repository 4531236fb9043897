//! After the first step, on a pool device held to a budget: the micro-batch cap measured again
//! with the optimizer's state in place, and caps lowered by out-of-memory applied to the plan.

use super::*;

/// Bisection steps of [`Balancer::refit_cap`] between the largest size that fits and the
/// smallest that does not.
pub(super) const REFIT_BISECTIONS: usize = 3;

impl Balancer {
    /// Once, after the first step, on a device whose pool is held to a budget: the optimizer's
    /// state now exists (burn's optimizers create it in their first step) and the pool holds it
    /// in pages of its own size, which the probes, run before any state existed, could not see.
    /// The cap in force is measured again as a step runs it (two micro-batches, the first one's
    /// gradients alive while the second runs, then summed), halved until its peak fits the
    /// budget, then raised by bisection towards the smallest size found over it. A lower cap
    /// applies to this rank from the next step on and reaches the other ranks in that step's
    /// all-reduce, as an out-of-memory cap does. Gradients of these measurements are dropped.
    pub(super) fn refit_cap<M, F>(&mut self, ddp: &mut DataParallel, model: &M, loss_fn: &mut F, batch: &[usize])
    where
        M: Module,
        F: FnMut(&M, &[usize]) -> Tensor<1>,
    {
        let rank = ddp.rank();
        let planned = self.plan.ranks[rank].micro_batch;
        if planned == 0 || batch.is_empty() {
            return;
        }
        let budget = self.options.budget_bytes;
        let scratch = scratch_copy(model);
        let mut fits = |m: usize| {
            let idx: Vec<usize> = batch.iter().copied().cycle().take(m).collect();
            self.meter.reset_peak();
            let seen = crate::health::reports_recorded();
            let ran = contain_device_oom(|| {
                let mut sums = burn::optim::GradientsAccumulator::new();
                for _ in 0..2 {
                    let loss = loss_fn(&scratch, &idx);
                    let grads = loss.clone().backward();
                    // A failed allocation arrives on the buffers: this size does not fit.
                    crate::health::check_tensors(&DataParallel::micro_batch_tensors(&scratch, &grads, &loss), seen)?;
                    sums.accumulate(&scratch, burn::optim::GradientsParams::from_grads(grads, &scratch));
                }
                Ok::<(), crate::health::DeviceFault>(())
            });
            let peak = self.meter.peak();
            self.meter.reset_peak();
            let ran = match ran {
                Ok(Err(fault)) if fault.is_out_of_memory() => {
                    ddp.acknowledge_device_log();
                    false
                }
                Ok(done) => done.is_ok(),
                Err(_) => false,
            };
            ran && peak <= budget
        };
        if fits(planned) {
            return;
        }
        let (mut good, mut bad) = (planned / 2, planned);
        while good > 0 && !fits(good) {
            (good, bad) = (good / 2, good);
        }
        if good == 0 {
            // Not even one sample fits: the step's own check reports it.
            return;
        }
        for _ in 0..REFIT_BISECTIONS {
            let mid = good + (bad - good) / 2;
            if mid == good {
                break;
            }
            if fits(mid) {
                good = mid;
            } else {
                bad = mid;
            }
        }
        self.refitted_cap = Some(good);
        ddp.set_note(good as f32);
    }

    pub(super) fn apply_cap_limits(&mut self) {
        for (i, limit) in self.cap_limits.iter().enumerate() {
            if let Some(limit) = *limit {
                let r = &mut self.plan.ranks[i];
                if r.micro_batch > limit {
                    *r = RankAssignment::at_cap(&self.reports[i], r.share, limit, &self.options.tunables);
                }
            }
        }
    }
}
