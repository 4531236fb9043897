//! The loop every example runs.
//!
//! 1. Join the world: under mpirun/srun this process is one rank; otherwise the ranks run as
//!    threads standing for simulated devices (each with a memory budget and a speed).
//! 2. Build the model (rank 0's initial weights reach every rank), measure each device with a
//!    few forward/backward probes, agree on a plan and print it.
//! 3. Train: each step, every rank runs its share of the global batch in planned micro-batches
//!    and all ranks sum gradients once. Rank 0 shows progress; every rank appends a metrics line.
//! 4. Checkpoint every `checkpoint_every` steps (rank 0 writes, atomically) and resume from the
//!    newest complete checkpoint, on any number of ranks.

use std::{
    io::IsTerminal,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ballast_cluster::Launch;
use ballast_collectives::{local, CommOptions, Communicator, CommunicatorExt};

use crate::{
    balance::{plan_table, BalanceOptions, Balancer},
    checkpoint::{self, Checkpointer, TrainState},
    eval::{EvalBatch, EvalKind, EvalTotals},
    memory::DeviceMeter,
    metrics::MetricsWriter,
    DataParallel, DdpOptions, GlobalSampler,
};
use burn::{
    module::Module,
    optim::AdamConfig,
    tensor::{Device, Tensor},
};
use serde_json::json;

use crate::config::Settings;

/// A training task: a model, a dataset addressed by sample index, and a loss.
pub trait Task: Sync {
    /// The model.
    type Model: Module;
    /// Builds the model (random initial weights from the device's seed).
    fn build(&self, device: &Device) -> Self::Model;
    /// Number of samples.
    fn len(&self) -> usize;
    /// Mean loss of the samples `indices`.
    fn loss(&self, model: &Self::Model, indices: &[usize], device: &Device) -> Tensor<1>;
    /// A line describing the model and data (printed before the plan).
    fn describe(&self) -> String;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Held-out samples, addressed as `0..eval_len()` by [`Task::evaluate`]; 0 (the default)
    /// when the task has none, and the job then does not evaluate.
    fn eval_len(&self) -> usize {
        0
    }
    /// Forward only: one loss per held-out sample of `indices` (summed over the sample's units),
    /// with the units predicted correctly and the units counted. A task with
    /// [`Task::eval_len`] > 0 implements it; the default returns nothing, which the job reports
    /// as an error.
    fn evaluate(&self, model: &Self::Model, indices: &[usize], device: &Device) -> EvalBatch {
        let _ = (model, indices, device);
        EvalBatch::default()
    }
    /// What [`Task::evaluate`] measures, for the printed lines.
    fn eval_kind(&self) -> EvalKind {
        EvalKind::Loss
    }
    /// A simple reference for the held-out numbers: its name and its mean loss per unit on the
    /// held-out set (e.g. a unigram byte model for a language model).
    fn eval_baseline(&self) -> Option<(String, f64)> {
        None
    }
    /// Text rank 0 prints after the run from the final model (the language model prints text
    /// it generates); called on rank 0 only.
    fn final_note(&self, model: &Self::Model, device: &Device) -> Option<String> {
        let _ = (model, device);
        None
    }
}

/// What a run did, as rank 0 saw it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Ranks.
    pub world_size: usize,
    /// First step run (non-zero after a resume).
    pub first_step: u64,
    /// Steps run in this invocation.
    pub steps: u64,
    /// Global-batch loss of every step run.
    pub losses: Vec<f64>,
    /// Wall seconds of the training loop.
    pub seconds: f64,
    /// Samples per second over the loop.
    pub samples_per_sec: f64,
    /// Checksum of the final parameters (identical on every rank).
    pub checksum: u64,
    /// Newest checkpoint written, if any.
    pub last_checkpoint: Option<PathBuf>,
    /// Every held-out evaluation of this invocation, as (step, totals); the last is the final
    /// model's.
    pub evals: Vec<(u64, EvalTotals)>,
    /// What the evaluations measure.
    pub eval_kind: EvalKind,
    /// The task's reference for the held-out numbers (name, mean loss per unit).
    pub eval_baseline: Option<(String, f64)>,
    /// Where the final weights were written (`--save-model`).
    pub saved_model: Option<PathBuf>,
    /// Rank 0's [`Task::final_note`].
    pub note: Option<String>,
}

/// This process's place in the job: launched (one rank) or not (ranks as threads).
pub fn launch() -> Result<Launch> {
    Ok(Launch::from_env()?)
}

/// Runs `task` with `settings` on every rank of the job and returns rank 0's summary.
///
/// # Errors
/// Anything a rank reports: plan, data, collective, checkpoint errors.
pub fn run<T: Task>(task: &T, settings: &Settings, launch: &Launch) -> Result<Summary> {
    let options = CommOptions::from_env()?;
    if let Some(comm) = crate::world::launched_communicator(launch, options.clone())? {
        let (device, ordinal) = training_device(launch)?;
        // GPU ranks sum gradients over NCCL; MPI stays the control plane underneath.
        #[cfg(feature = "cuda")]
        let comm: Box<dyn Communicator> = match ordinal {
            Some(gpu) => Box::new(ballast_collectives::nccl::NcclCommunicator::new(comm, gpu)?),
            None => comm,
        };
        return rank_main(comm, task, settings, false, device, ordinal);
    }
    let results = local::run(settings.ranks, options, |comm| {
        rank_main(Box::new(comm), task, settings, true, Device::flex().autodiff(), None)
    });
    // The first error, preferring a cause over the timeouts it caused on the other ranks.
    let mut summary = None;
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(s) => summary = summary.or(Some(s)),
            Err(e) => errors.push(e),
        }
    }
    if let Some(e) = errors
        .into_iter()
        .min_by_key(|e| collective_error(e).is_some_and(ballast_collectives::Error::is_consequence))
    {
        return Err(e);
    }
    summary.context("no rank returned")
}

/// The slowest write a barrier behind rank 0's save allows for, in bytes per second: a
/// multi-gigabyte checkpoint on a slow disk must not trip the collective timeout.
const SLOWEST_WRITE_BYTES_PER_S: f64 = 20e6;

/// At most what a checkpoint of `model` writes: its parameters and two Adam moments, in f32.
fn checkpoint_bytes<M: burn::module::Module>(model: &M) -> u64 {
    model.num_params() as u64 * 4 * 3
}

/// A barrier that waits for rank 0's write of up to `bytes` bytes: the collective timeout plus
/// the write at [`SLOWEST_WRITE_BYTES_PER_S`], restored afterwards.
fn barrier_after_write(comm: &mut dyn Communicator, bytes: u64) -> Result<()> {
    let usual = comm.timeout();
    comm.set_timeout(usual + std::time::Duration::from_secs_f64(bytes as f64 / SLOWEST_WRITE_BYTES_PER_S));
    let waited = comm.barrier();
    comm.set_timeout(usual);
    Ok(waited?)
}

/// The collective error at the root of `e`, through the crate errors that carry one.
fn collective_error(e: &anyhow::Error) -> Option<&ballast_collectives::Error> {
    use crate::{balance::BalanceError, ddp::DdpError, eval::EvalError};
    fn in_ddp(d: &DdpError) -> Option<&ballast_collectives::Error> {
        match d {
            DdpError::Collective(c) => Some(c),
            _ => None,
        }
    }
    e.chain().find_map(|cause| {
        if let Some(c) = cause.downcast_ref::<ballast_collectives::Error>() {
            return Some(c);
        }
        if let Some(d) = cause.downcast_ref::<DdpError>() {
            return in_ddp(d);
        }
        match cause.downcast_ref::<BalanceError>() {
            Some(BalanceError::Collective(c)) => return Some(c),
            Some(BalanceError::Ddp(d)) => return in_ddp(d),
            _ => {}
        }
        match cause.downcast_ref::<EvalError>() {
            Some(EvalError::Comm(c)) => Some(c),
            _ => None,
        }
    })
}

/// The device of a launched rank and its GPU ordinal: with the `cuda` feature and a GPU
/// present, the GPU for this local rank (not yet verified on a GPU); otherwise the CPU.
fn training_device(launch: &Launch) -> Result<(Device, Option<usize>)> {
    #[cfg(feature = "cuda")]
    if ballast_collectives::nccl::cuda_present() {
        let count = cudarc::driver::CudaContext::device_count().ok().map(|c| c as usize);
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let index = ballast_cluster::device_for_local_rank(launch.local_rank, visible.as_deref(), count)?;
        return Ok((Device::cuda(index).autodiff(), Some(index)));
    }
    let _ = launch;
    Ok((Device::flex().autodiff(), None))
}

fn rank_main<T: Task>(
    comm: Box<dyn Communicator>,
    task: &T,
    s: &Settings,
    threads: bool,
    device: Device,
    gpu: Option<usize>,
) -> Result<Summary> {
    let rank = comm.rank();
    let world = comm.world_size();
    let mut comm = comm;
    let meter = match gpu {
        Some(ordinal) => DeviceMeter::for_device(&device).on_cuda(ordinal),
        None => DeviceMeter::for_device(&device),
    };
    // The seeded generator is process-wide: ranks as threads build (and lazily initialise) their
    // models one at a time, so rank 0's initial weights depend on the seed alone.
    let mut built = None;
    for turn in 0..world {
        if turn == rank {
            device.seed(s.seed);
            let model = task.build(&device);
            let _ = crate::params::checksum(&model);
            built = Some(model);
        }
        if threads {
            comm.barrier()?;
        }
    }
    let mut model = built.context("model not built")?;
    let mut loaded_step = 0;
    if let Some(path) = &s.load {
        // Every rank reads the same file; wrap below checks that the replicas agree.
        let loaded = checkpoint::load(path, &model)
            .with_context(|| format!("--load {}: not weights of this model", path.display()))?;
        if loaded.state.job != s.job {
            anyhow::bail!(
                "--load {} holds a `{}` model, not `{}`; load a file this job wrote",
                path.display(),
                loaded.state.job,
                s.job
            );
        }
        model = loaded.apply(model);
        loaded_step = loaded.state.step;
    }
    let (mut ddp, mut model) = DataParallel::wrap(comm, model, DdpOptions::default())?;
    let mut loss_fn = |m: &T::Model, idx: &[usize]| task.loss(m, idx, &device);

    let sampler = GlobalSampler::new(task.len(), s.global_batch, s.seed)?;
    let steps = s.steps(sampler.steps_per_epoch());
    let checkpointer = match &s.checkpoint_dir {
        Some(dir) => Some(Checkpointer::new(dir, s.keep)?),
        None => None,
    };
    // Resume: every rank loads the same checkpoint (rank 0 picks it; the others open that file).
    let mut state = TrainState {
        step: 0,
        seed: s.seed,
        global_batch: s.global_batch,
        world_size: world,
        job: s.job.clone(),
        plan: None,
    };
    if s.eval_only {
        // Evaluated as of the step the weights were saved at.
        state.step = loaded_step;
    }
    let mut resumed_optimizer = None;
    let mut resumed_plan = None;
    if s.resume {
        let cp = checkpointer.as_ref().context("--resume needs --checkpoint-dir")?;
        let chosen = if rank == 0 { cp.newest()? } else { None };
        let chosen: Option<PathBuf> = ddp.comm().broadcast_value(0, &chosen)?;
        let path = chosen.with_context(|| {
            format!(
                "--resume: no complete checkpoint in {}; run without --resume to start from step 0",
                cp.dir().display()
            )
        })?;
        let loaded = checkpoint::load(&path, &model)?;
        loaded.state.check_compatible(&s.job, s.global_batch, s.seed, &path)?;
        model = loaded.apply(model);
        state.step = loaded.state.step;
        resumed_optimizer = loaded.adam.clone();
        if loaded.state.world_size == world {
            resumed_plan = loaded.state.plan.clone();
        }
        if rank == 0 {
            println!(
                "resuming from {} (step {}, saved by {} ranks, now {world})",
                path.display(),
                state.step,
                loaded.state.world_size
            );
        }
    }

    let probe_max = s.global_batch.clamp(1, 32);
    let options = BalanceOptions {
        budget_bytes: s.device_memory.get(rank).copied().unwrap_or(u64::MAX),
        probe_sizes: [1, 2, 4, 8, 16, 32].into_iter().filter(|&m| m <= probe_max).collect(),
        rebalance: s.rebalance,
        slowdown: if threads { s.slowdown(rank) } else { 1.0 },
        shared_heap: threads,
        host_optimizer: true,
        // The host Adam keeps its state in host memory: none of it counts against the device.
        optimizer_bytes_per_param: 0,
        initial: if s.equal_start {
            crate::balance::InitialPlan::Equal
        } else {
            crate::balance::InitialPlan::Measured
        },
        tunables: ballast_balancer::Tunables {
            micro_batch_policy: s.micro_batch_policy,
            ..ballast_balancer::Tunables::default()
        },
        ..BalanceOptions::default()
    };
    let pool: Vec<usize> = (0..task.len().min(probe_max)).collect();
    let mut balancer = Balancer::probe(&mut ddp, &model, &mut loss_fn, &pool, s.global_batch, meter, options)?;
    // Same world: continue on the saved plan, so the arithmetic (and the result, bit for bit)
    // is that of an uninterrupted run. Another world: the plan just measured.
    let reused = match resumed_plan.and_then(|p| serde_json::from_value::<ballast_balancer::Plan>(p).ok()) {
        Some(plan) => balancer.adopt(plan),
        None => false,
    };
    if rank == 0 {
        println!("{}", task.describe());
        if reused {
            println!("continuing on the saved plan");
        }
        println!(
            "{world} ranks ({}), {} samples, global batch {}, steps {}..{steps}",
            if threads {
                "threads on simulated devices"
            } else {
                "processes"
            },
            task.len(),
            s.global_batch,
            state.step
        );
        print!("{}", plan_table(balancer.plan(), balancer.reports()));
    }
    // The host Adam runs on every rank (`host_optimizer`); its state is what checkpoints carry.
    // burn's optimizer is only a placeholder the step signature asks for.
    let mut optim = AdamConfig::new().init();
    if let Some(saved) = resumed_optimizer {
        let host = balancer.host_mut().context("the host optimizer is not running")?;
        host.adam_mut()
            .restore(saved.m, saved.v, saved.t)
            .map_err(|e| anyhow::anyhow!("resuming the optimizer: {e}"))?;
    }

    let run_id: String = {
        let id = format!(
            "{}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            std::process::id()
        );
        ddp.comm().broadcast_value(0, &id)?
    };
    let mut metrics = MetricsWriter::append(&s.metrics)?;
    let train_steps = if s.eval_only { state.step } else { steps };
    let progress = (rank == 0).then(|| Progress::new(train_steps.saturating_sub(state.step), s.log_every));
    let started = Instant::now();
    let first_step = state.step;
    let mut losses = Vec::new();
    let mut samples = 0usize;
    let mut last_checkpoint = None;
    let mut evals = Vec::new();
    // Every rank evaluates its slice of the held-out set by the current plan's shares.
    let mut held_out = |ddp: &mut DataParallel,
                        model: &T::Model,
                        plan: &ballast_balancer::Plan,
                        step: u64,
                        metrics: &mut MetricsWriter|
     -> Result<()> {
        if task.eval_len() == 0 {
            return Ok(());
        }
        let t0 = Instant::now();
        let shares: Vec<usize> = plan.ranks.iter().map(|r| r.share).collect();
        let micro = plan.ranks[rank].micro_batch.max(1);
        let (totals, mine) = crate::eval::evaluate(ddp.comm(), task.eval_len(), &shares, micro, |idx| {
            task.evaluate(model, idx, &device)
        })
        .with_context(|| format!("evaluating the held-out set after step {step}"))?;
        let eval_s = t0.elapsed().as_secs_f64();
        metrics.record(&json!({
            "run": run_id,
            "job": s.job,
            "kind": "eval",
            "rank": rank,
            "world_size": world,
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
        }))?;
        if let Some(p) = &progress {
            p.note(&format!(
                "held-out after step {step}: {} ({eval_s:.1}s)",
                totals.describe(task.eval_kind())
            ));
        }
        evals.push((step, totals));
        Ok(())
    };
    if s.eval_only {
        held_out(&mut ddp, &model, balancer.plan(), state.step, &mut metrics)?;
    }
    while state.step < train_steps {
        let step = state.step;
        #[cfg(feature = "testkit")]
        if s.crash_at_step == Some(step) {
            eprintln!("ballast: rank {rank}: aborting before step {step} as asked (--crash-at-step)");
            std::process::abort();
        }
        let plan = balancer.plan().clone();
        let t0 = Instant::now();
        let batch = sampler.batch(step);
        let lr = s.lr_at(step, steps);
        let (next, out) = balancer.step(&mut ddp, model, &mut optim, lr, &batch, &mut loss_fn)?;
        model = next;
        let step_s = t0.elapsed().as_secs_f64();
        if !out.stats.loss.is_finite() {
            anyhow::bail!(
                "step {step}: the loss is {} (diverged); lower --lr (now {})",
                out.stats.loss,
                s.lr
            );
        }
        losses.push(out.stats.loss);
        samples += out.stats.global_samples;
        let mine = &plan.ranks[rank];
        metrics.record(&json!({
            "run": run_id,
            "job": s.job,
            "kind": "train",
            "rank": rank,
            "world_size": world,
            "step": step,
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
            "all_reduces": out.stats.collectives,
            "peak_bytes": if threads { None } else { Some(out.peak_bytes) },
            "budget_bytes": s.device_memory.get(rank),
            "predicted_peak_bytes": mine.predicted_peak_bytes,
            "offload": mine.offload,
            "oom_retries": out.oom_retries,
            "plan_changed": out.plan_changed,
            "swap_warning": out.swap_warning,
        }))?;
        state.step += 1;
        if let Some(p) = &progress {
            p.update(state.step, &out.stats, &plan, step_s);
        }
        if let Some(cp) = &checkpointer {
            if state.step % s.checkpoint_every == 0 || state.step == steps {
                // Rank 0 writes; the others wait so that nobody runs ahead of a failed save.
                let written = if rank == 0 {
                    state.plan = serde_json::to_value(balancer.plan()).ok();
                    Some(cp.save(&model, balancer.host().map(|h| h.adam()), &state)?)
                } else {
                    None
                };
                barrier_after_write(ddp.comm(), checkpoint_bytes(&model))?;
                last_checkpoint = written;
            }
        }
        if state.step == steps || (s.eval_every > 0 && state.step % s.eval_every == 0) {
            held_out(&mut ddp, &model, balancer.plan(), state.step, &mut metrics)?;
        }
    }
    ddp.verify_replicas(&model)?;
    let saved_model = match &s.save_model {
        Some(path) => {
            if rank == 0 {
                checkpoint::save_model(path, &model, &state)?;
            }
            // Nobody reports success before the file is in place.
            barrier_after_write(ddp.comm(), checkpoint_bytes(&model))?;
            Some(path.clone())
        }
        None => None,
    };
    let seconds = started.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.finish();
    }
    Ok(Summary {
        world_size: world,
        first_step,
        steps: steps - first_step,
        losses,
        seconds,
        samples_per_sec: samples as f64 / seconds.max(1e-9),
        checksum: crate::params::checksum(&model),
        last_checkpoint,
        evals,
        eval_kind: task.eval_kind(),
        eval_baseline: task.eval_baseline(),
        saved_model,
        note: if rank == 0 {
            task.final_note(&model, &device)
        } else {
            None
        },
    })
}

/// Rank 0's view: a progress bar on a terminal, a line every `log_every` steps otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    log_every: u64,
    started: Instant,
}

impl Progress {
    fn new(steps: u64, log_every: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(steps);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Self {
            bar,
            log_every,
            started: Instant::now(),
        }
    }

    fn update(&self, step: u64, stats: &crate::StepStats, plan: &ballast_balancer::Plan, step_s: f64) {
        let slowest = stats
            .rank_compute
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(r, _)| r);
        let micro: Vec<String> = plan.ranks.iter().map(|r| r.micro_batch.to_string()).collect();
        let memory: Vec<String> = plan
            .ranks
            .iter()
            .map(|r| format!("{:.1}", r.predicted_peak_bytes as f64 / (1u64 << 20) as f64))
            .collect();
        let msg = format!(
            "loss {:.4} | {:.0} samples/s | slowest rank {slowest} | micro-batch {} | memory {} MiB",
            stats.loss,
            stats.global_samples as f64 / step_s.max(1e-9),
            micro.join("/"),
            memory.join("/")
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(msg);
            }
            None => {
                if step % self.log_every == 0 || step == 1 {
                    println!("step {step:>5}  {:>6.1}s  {msg}", self.started.elapsed().as_secs_f64());
                }
            }
        }
    }

    /// A line above the bar (or on its own without one).
    fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }
}

/// Prints rank 0's closing lines: loss at the start and the end, throughput.
pub fn print_summary(summary: &Summary) {
    let k = (summary.losses.len() / 10).clamp(1, 10);
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    if summary.losses.is_empty() {
        if summary.evals.is_empty() {
            println!("nothing to train: already at the last step");
        }
        print_eval_summary(summary);
        return;
    }
    let head = mean(&summary.losses[..k]);
    let tail = mean(&summary.losses[summary.losses.len() - k..]);
    println!(
        "trained steps {}..{} on {} ranks in {:.1}s ({:.1} samples/s); loss {head:.4} -> {tail:.4} (mean of first/last {k} steps); replicas identical (checksum {:016x})",
        summary.first_step,
        summary.first_step + summary.steps,
        summary.world_size,
        summary.seconds,
        summary.samples_per_sec,
        summary.checksum
    );
    if let Some(cp) = &summary.last_checkpoint {
        println!("checkpoint: {}", cp.display());
    }
    print_eval_summary(summary);
}

/// The final held-out line (and the task's reference), and where the model went.
fn print_eval_summary(summary: &Summary) {
    if let Some((step, totals)) = summary.evals.last() {
        println!(
            "held-out evaluation at step {step} on {} ranks: {}",
            summary.world_size,
            totals.describe(summary.eval_kind)
        );
        if let Some((name, loss)) = &summary.eval_baseline {
            let extra = match summary.eval_kind {
                EvalKind::LanguageModel => format!(", perplexity {:.3}", loss.exp()),
                _ => String::new(),
            };
            println!("reference on the same held-out set: {name}: loss {loss:.4}{extra}");
        }
    }
    if let Some(path) = &summary.saved_model {
        println!("model weights: {}", path.display());
    }
    if let Some(note) = &summary.note {
        println!("{note}");
    }
}
