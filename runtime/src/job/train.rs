//! The training loop's step and its evaluations.

use super::*;

/// The training loop's state between steps.
pub(super) struct Training<'a, T> {
    pub(super) task: &'a T,
    pub(super) settings: &'a Settings,
    pub(super) device: &'a Device,
    /// The run's last step.
    pub(super) steps: u64,
    pub(super) state: TrainState,
    /// burn's optimizer, which the step signature asks for: a placeholder, as the host Adam
    /// runs on every rank (`host_optimizer`).
    pub(super) optim: burn::optim::ModuleOptimizer,
    pub(super) out: &'a mut Output,
    pub(super) progress: Option<&'a Progress>,
    pub(super) last_checkpoint: Option<PathBuf>,
    /// Rank 0's checkpoint writer (none on the other ranks, or without a checkpoint directory).
    pub(super) writer: Option<BackgroundWriter>,
    /// When the loop began: train lines carry the time since (`loop_s`), which counts what
    /// happens between steps (checkpoints, evaluations) as `step_s` does not.
    pub(super) started: Instant,
}

impl<T: Task> Training<'_, T> {
    /// One step: this rank's share in planned micro-batches, the all-reduce and the update,
    /// its metrics line, then a checkpoint and an evaluation when they are due. Returns the
    /// model, the step's global loss and its samples.
    pub(super) fn step<F>(
        &mut self,
        ddp: &mut DataParallel,
        balancer: &mut Balancer,
        model: T::Model,
        sampler: &GlobalSampler,
        checkpointer: Option<&Checkpointer>,
        loss_fn: &mut F,
    ) -> Result<(T::Model, f64, usize)>
    where
        F: FnMut(&T::Model, &[usize]) -> Tensor<1>,
    {
        let s = self.settings;
        let step = self.state.step;
        // The crash stands for one after the checkpoints handed over before it are durable:
        // rank 0 waits for its writer first. With ranks as threads one abort ends them all, so
        // only rank 0 aborts; the others run on into the step and wait for it there.
        #[cfg(feature = "testkit")]
        if s.crash_at_step == Some(step) && (self.out.rank == 0 || !self.out.threads) {
            if let Some(writer) = self.writer.as_mut() {
                let _ = writer.wait();
            }
            eprintln!(
                "ballast: rank {}: aborting before step {step} as asked (--crash-at-step)",
                self.out.rank
            );
            std::process::abort();
        }
        #[cfg(feature = "testkit")]
        crate::testing::fault::at_step(self.out.rank, step);
        let plan = balancer.plan().clone();
        let t0 = Instant::now();
        let lr = s.lr_at(step, self.steps);
        let batch = sampler.batch(step);
        let (model, out) = balancer.step(ddp, model, &mut self.optim, lr, &batch, loss_fn)?;
        let step_s = t0.elapsed().as_secs_f64();
        if !out.stats.loss.is_finite() {
            return Err(Error::LossDiverged {
                step,
                loss: out.stats.loss,
                lr: s.lr,
            });
        }
        let mine = &plan.ranks[self.out.rank];
        let peak_bytes = (!self.out.threads).then_some(out.peak_bytes);
        self.out.record(
            "train",
            json!({
                "step": step,
                "epoch": step / sampler.steps_per_epoch() as u64,
                "positions": positions(sampler, step, &batch, &plan.shares(), self.out.rank),
                "loss": out.stats.loss,
                "lr": lr,
                "samples": out.stats.local_samples,
                "global_samples": out.stats.global_samples,
                "share": mine.share,
                "micro_batch": mine.micro_batch,
                "micro_batches": out.micro_batches,
                "accumulation": out.micro_batches.len(),
                "compute_s": out.stats.compute.as_secs_f64(),
                "allreduce_s": out.stats.all_reduce.as_secs_f64(),
                "step_s": step_s,
                "loop_s": self.started.elapsed().as_secs_f64(),
                "collectives": out.stats.collectives,
                "overflow": out.stats.overflow,
                "loss_scale": out.stats.loss_scale,
                "peak_bytes": peak_bytes,
                "budget_bytes": s.device_memory.get(self.out.rank),
                "predicted_peak_bytes": mine.predicted_peak_bytes,
                "offload": mine.offload,
                "oom_retries": out.oom_retries,
                "optimizer_shard": balancer.shard().map(|s| s.len()),
                "optimizer_on_host": balancer.shard().map(|s| s.place() == ShardPlace::Host),
                "optimizer_state_bytes": balancer.shard().map(|s| s.state_bytes()),
                "optimizer_state_measured_bytes": balancer.shard_measured_bytes(),
                "plan_changed": out.plan_changed,
                "swap_warning": out.swap_warning,
            }),
        )?;
        self.state.step += 1;
        if let Some(p) = self.progress {
            p.update(self.state.step, &out.stats, &plan, step_s);
        }
        let done = self.state.step;
        if checkpointer.is_some() && (done % s.checkpoint_every == 0 || done == self.steps) {
            // Every rank takes part in gathering the state; rank 0 copies it into memory and
            // hands it to its writer thread, and training goes on while it is written.
            let gathered = gather_shards(ddp.comm(), balancer)?;
            let master = gather_master(ddp, balancer)?;
            if let Some(writer) = self.writer.as_mut() {
                self.state.plan = serde_json::to_value(balancer.plan()).ok();
                self.state.shards = balancer.shard().map(|s| s.counts().to_vec());
                let adam = match &gathered {
                    Some(moments) => Some(moments.into()),
                    None => balancer.host().map(|h| h.adam().into()),
                };
                let params = master.unwrap_or_else(|| crate::params::flatten_params(&model));
                let encoded = Checkpointer::encode_values(&model, &params, adam, &self.state)?;
                if let Some(written) = writer.submit(encoded)? {
                    self.note_written(written)?;
                }
            }
        }
        if done == self.steps || (s.eval_every > 0 && done % s.eval_every == 0) {
            self.evaluate(ddp, &model, balancer.plan())?;
        }
        Ok((model, out.stats.loss, out.stats.global_samples))
    }

    /// A checkpoint is durable: it becomes the run's last one, and a metrics line says how long
    /// after its step boundary it was safe.
    pub(super) fn note_written(&mut self, written: Written) -> Result<()> {
        self.out.record(
            "checkpoint",
            json!({"step": written.step, "bytes": written.bytes, "durable_s": written.durable_after.as_secs_f64()}),
        )?;
        self.last_checkpoint = Some(written.path);
        Ok(())
    }

    /// Waits for rank 0's write in flight, at the end of the run.
    ///
    /// # Errors
    /// That write's error.
    pub(super) fn finish_writes(&mut self) -> Result<()> {
        match self.writer.as_mut().map(BackgroundWriter::wait).transpose()?.flatten() {
            Some(written) => self.note_written(written),
            None => Ok(()),
        }
    }

    /// Every rank evaluates its slice of the held-out set by `plan`'s shares; the totals go
    /// to the metrics, the progress output and the summary.
    pub(super) fn evaluate(
        &mut self,
        ddp: &mut DataParallel,
        model: &T::Model,
        plan: &ballast_balancer::Plan,
    ) -> Result<()> {
        let task = self.task;
        if task.eval_len() == 0 {
            return Ok(());
        }
        let step = self.state.step;
        let t0 = Instant::now();
        let shares: Vec<usize> = plan.ranks.iter().map(|r| r.share).collect();
        let micro = plan.ranks[self.out.rank].micro_batch.max(1);
        let device = self.device;
        let (totals, mine) = crate::eval::evaluate(ddp.comm(), task.eval_len(), &shares, micro, |idx| {
            task.evaluate(model, idx, device)
        })
        .map_err(|source| Error::Evaluating {
            step,
            source: Box::new(source),
        })?;
        let eval_s = t0.elapsed().as_secs_f64();
        self.out.record(
            "eval",
            json!({
                "step": step,
                "eval_samples": mine,
                "micro_batch": micro,
                "samples": totals.samples,
                "units": totals.units,
                "correct": totals.correct,
                "loss_sum": totals.loss_sum(),
                // The exact integer sum (2^-32 nats), as text: JSON numbers lose its low bits.
                "loss_sum_fixed": totals.loss_sum_fixed.to_string(),
                "loss": totals.mean_loss(),
                "accuracy": totals.accuracy(),
                "perplexity": totals.perplexity(),
                "eval_s": eval_s,
                "eval_kind": task.eval_kind(),
            }),
        )?;
        if let Some(p) = self.progress {
            p.note(&format!(
                "held-out after step {step}: {} ({eval_s:.1}s)",
                totals.describe(task.eval_kind())
            ));
        }
        self.out.evals.push((step, totals));
        Ok(())
    }
}

/// The positions `[first, end)` in its epoch's permutation of the samples that `rank` takes at
/// `step` (the balancer splits `batch` by `shares` in rank order): the sampler's record, from
/// which the metrics show every sample used once per epoch, across restarts too.
fn positions(sampler: &GlobalSampler, step: u64, batch: &[usize], shares: &[usize], rank: usize) -> [usize; 2] {
    let within = (step % sampler.steps_per_epoch() as u64) as usize;
    let sizes: Vec<usize> = crate::sampler::split_batch(batch, shares)
        .iter()
        .map(Vec::len)
        .collect();
    let first = within * sampler.global_batch() + sizes[..rank].iter().sum::<usize>();
    [first, first + sizes[rank]]
}
