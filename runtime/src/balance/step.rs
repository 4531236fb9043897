//! One balanced step: this rank's share in micro-batches under the memory watch, backing off
//! from an out-of-memory, then the data-parallel step and what every rank learns from it.

use super::*;

/// How a step watches memory (see `Balancer::memory_watch`).
#[derive(Clone, Copy)]
pub(super) struct MemoryWatch {
    /// The device's memory is a pool (wgpu, CUDA), read through the device.
    pool: bool,
    /// The peak is read after every micro-batch and held to the budget.
    check: bool,
}

/// What running this rank's share did.
#[derive(Default)]
pub(super) struct ShareRun {
    ran: Vec<usize>,
    peak_bytes: u64,
    oom_retries: usize,
}

impl Balancer {
    /// Whether the test hook asks this step's first micro-batch to fail (once).
    pub(super) fn injects_oom(&self, step: u64) -> bool {
        #[cfg(feature = "testkit")]
        let asked = self.options.inject_oom_at_step == Some(step);
        #[cfg(not(feature = "testkit"))]
        let asked = {
            let _ = step;
            false
        };
        asked && !self.injected
    }

    /// Plans with the measured all-reduce: the previous step's, as the rank that waited least
    /// for the others saw it. It adds the same to every candidate plan's step time, so the
    /// rebalancer's gain is a share of the whole step, not of compute alone.
    pub(super) fn observe_all_reduce(&mut self, stats: &StepStats) {
        if stats.step == 0 {
            return;
        }
        let comm_s = stats
            .balancer
            .prev_all_reduce
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        if comm_s.is_finite() {
            self.plan.predicted_step_s += comm_s - self.plan.allreduce_s;
            self.plan.allreduce_s = comm_s;
        }
    }

    /// Smoothed samples/s of every rank, as the rebalancer sees them.
    pub fn observed_speeds(&self) -> Vec<f64> {
        self.rebalancer.speeds(&self.reports)
    }

    /// Runs one step: this rank's share of `batch` in planned micro-batches, one all-reduce,
    /// the optimizer update, and possibly a new plan for the next step.
    ///
    /// # Errors
    /// [`Error::SampleOverBudget`] when one sample does not fit; DDP and collective errors.
    pub fn step<M, F>(
        &mut self,
        ddp: &mut DataParallel,
        model: M,
        optim: &mut ModuleOptimizer,
        lr: f64,
        batch: &[usize],
        loss_fn: &mut F,
    ) -> Result<(M, BalancedStep), Error>
    where
        M: Module,
        F: FnMut(&M, &[usize]) -> Tensor<1>,
    {
        ddp.mark_ready();
        let parts = split_batch(batch, &self.plan.shares());
        let watch = self.memory_watch();
        let share = self.run_share(ddp, &model, &parts[ddp.rank()], loss_fn, watch)?;
        let (model, stats) = match (self.host.as_mut(), self.sharded.as_mut()) {
            (Some(host), _) => ddp.step(model, host, lr)?,
            (None, Some(sharded)) => ddp.step(model, &mut sharded.adam, lr)?,
            (None, None) => ddp.step(model, optim, lr)?,
        };
        let plan_changed = self.learn_from(&stats);
        if watch.pool && watch.check && !self.refitted {
            self.refitted = true;
            self.refit_cap(ddp, &model, loss_fn, batch);
        }
        Ok((
            model,
            BalancedStep {
                stats,
                micro_batches: share.ran,
                peak_bytes: share.peak_bytes,
                oom_retries: share.oom_retries,
                plan_changed,
                swap_warning: self.swap.poll(),
            },
        ))
    }

    /// How this step watches memory: a pool (wgpu, CUDA) is read after each micro-batch only
    /// against a budget, since reading waits for the device; a simulated device on a shared heap
    /// cannot be read per rank. A watched pool starts the step with its peak reset, so the pages
    /// the previous step freed (optimizer temporaries, buckets) do not count.
    pub(super) fn memory_watch(&mut self) -> MemoryWatch {
        let pool = self.meter.reads_pool();
        let check = if pool {
            self.options.budget_bytes != u64::MAX
        } else {
            !self.options.shared_heap
        };
        if pool && check {
            self.meter.reset_peak();
        }
        MemoryWatch { pool, check }
    }

    /// Runs `mine` (this rank's share) in micro-batches of the planned size and adds each one's
    /// gradients to the step's sums. A micro-batch over the budget, or one whose device ran out
    /// of memory, is discarded; the rest of the share is re-laid at half its size (as the
    /// following steps will lay it out) and the new cap is noted for the step's all-reduce.
    pub(super) fn run_share<M, F>(
        &mut self,
        ddp: &mut DataParallel,
        model: &M,
        mine: &[usize],
        loss_fn: &mut F,
        watch: MemoryWatch,
    ) -> Result<ShareRun, Error>
    where
        M: Module,
        F: FnMut(&M, &[usize]) -> Tensor<1>,
    {
        let (rank, step) = (ddp.rank(), ddp.steps());
        let cap = self.plan.ranks[rank]
            .micro_batch
            .min(self.refitted_cap.unwrap_or(usize::MAX))
            .max(1);
        let mut queue =
            ballast_balancer::micro_batch_schedule(&self.reports[rank], mine.len(), cap, &self.options.tunables);
        let mut run = ShareRun::default();
        let (mut offset, mut i) = (0, 0);
        while i < queue.len() {
            let m = queue[i];
            if !watch.pool {
                memory::reset_peak();
            }
            let started = Instant::now();
            let attempt = self.micro_batch(ddp, model, &mine[offset..offset + m], loss_fn, watch.pool)?;
            let peak = if watch.check { self.meter.peak() } else { 0 };
            let inject = self.injects_oom(step);
            match attempt {
                Ok((grads, loss_value)) if peak <= self.options.budget_bytes && !inject => {
                    run.peak_bytes = run.peak_bytes.max(peak);
                    ddp.add_weighted_gradients(model, grads, loss_value, m)?;
                    if self.options.slowdown > 1.0 {
                        std::thread::sleep(started.elapsed().mul_f64(self.options.slowdown - 1.0));
                    }
                    run.ran.push(m);
                    offset += m;
                    i += 1;
                }
                failed => {
                    self.injected |= inject;
                    if watch.pool {
                        // The failed attempt's pages go back before the smaller retry is measured.
                        self.meter.reset_peak();
                    }
                    if m == 1 {
                        return Err(match failed.err() {
                            Some(message) => Error::DeviceOutOfMemory { rank, message },
                            None => Error::SampleOverBudget {
                                rank,
                                peak,
                                budget: self.options.budget_bytes,
                            },
                        });
                    }
                    run.oom_retries += 1;
                    let rest: usize = queue[i..].iter().sum();
                    queue.truncate(i);
                    queue.extend(ballast_balancer::micro_batch_schedule(
                        &self.reports[rank],
                        rest,
                        m / 2,
                        &self.options.tunables,
                    ));
                    ddp.set_note((m / 2) as f32);
                }
            }
        }
        if watch.pool && !watch.check {
            run.peak_bytes = self.meter.peak();
        }
        Ok(run)
    }

    /// One micro-batch's forward and backward. `Ok(Err(message))` is an out-of-memory to back
    /// off from: a panic (as the testkit and flex report one), or, on a pool device, a failed
    /// allocation that cubecl recorded on the buffers it did not write instead of panicking.
    /// That one is asked for now, before the gradients join the step's sums (it waits for the
    /// device, as reading the pool's peak does under a budget); any other device failure ends
    /// the step.
    pub(super) fn micro_batch<M, F>(
        &self,
        ddp: &mut DataParallel,
        model: &M,
        idx: &[usize],
        loss_fn: &mut F,
        pool: bool,
    ) -> Result<Result<(Gradients, Tensor<1>), String>, Error>
    where
        M: Module,
        F: FnMut(&M, &[usize]) -> Tensor<1>,
    {
        let seen = crate::health::reports_recorded();
        let attempt = contain_device_oom(|| {
            let loss = loss_fn(model, idx);
            let loss_value = loss.clone().inner();
            let grads: Gradients = ddp.weighted_loss(loss, idx.len()).backward();
            (grads, loss_value)
        });
        let Ok((grads, loss_value)) = attempt else {
            return Ok(attempt);
        };
        if !pool {
            return Ok(Ok((grads, loss_value)));
        }
        let tensors = DataParallel::micro_batch_tensors(model, &grads, &loss_value);
        match crate::health::check_tensors(&tensors, seen) {
            Ok(()) => Ok(Ok((grads, loss_value))),
            Err(fault) if fault.is_out_of_memory() => {
                // Handled here: the step need not fail on the device log's report.
                ddp.acknowledge_device_log();
                Ok(Err(first_line(&fault.message)))
            }
            Err(fault) => Err(Error::MicroBatchFailed {
                rank: ddp.rank(),
                device: crate::device::device_name(&crate::transfer::model_device(model)),
                step: ddp.steps(),
                message: fault.message,
            }),
        }
    }

    /// What the step's all-reduce taught every rank, applied alike on each: caps lowered by
    /// out-of-memory retries, the measured all-reduce, and a better plan from the observed
    /// speeds. Returns whether the plan changed.
    pub(super) fn learn_from(&mut self, stats: &StepStats) -> bool {
        let mut plan_changed = false;
        for (r, &note) in stats.balancer.notes.iter().enumerate() {
            if note >= 1.0 {
                let limit = note as usize;
                self.cap_limits[r] = Some(self.cap_limits[r].map_or(limit, |l| l.min(limit)));
                plan_changed = true;
            }
        }
        let clock = self.options.simulated_clock(stats.rank_samples.len());
        if clock.is_none() {
            self.observe_all_reduce(stats);
        }
        if self.options.rebalance && self.options.initial != InitialPlan::Naive {
            let (started, compute) = match &clock {
                // Every rank starts together and takes exactly its samples over its speed.
                Some(speeds) => (
                    vec![0.0; speeds.len()],
                    stats
                        .rank_samples
                        .iter()
                        .zip(speeds)
                        .map(|(&n, v)| n as f64 / v)
                        .collect(),
                ),
                // Start stamps as offsets from rank 0's: meaningful between ranks of one host,
                // which is all a compute group compares.
                None => (
                    stats
                        .balancer
                        .started
                        .iter()
                        .map(|&s| crate::ddp::start_offset(stats.balancer.started[0], s))
                        .collect(),
                    stats.rank_compute.clone(),
                ),
            };
            self.rebalancer.observe_timed(&stats.rank_samples, &started, &compute);
            if let Some(better) = self.rebalancer.propose(&self.plan, &self.reports) {
                self.plan = better;
                plan_changed = true;
            }
        }
        if plan_changed {
            self.apply_cap_limits();
            self.plan_changes.push(stats.step);
        }
        plan_changed
    }
}
