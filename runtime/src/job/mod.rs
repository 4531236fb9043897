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

use ballast_balancer::Sharding;
use ballast_cluster::Launch;
use ballast_collectives::{local, CommOptions, Communicator, CommunicatorExt};

use crate::{
    balance::{plan_table, shard_table, BalanceOptions, Balancer},
    checkpoint::{self, Checkpointer, TrainState},
    device::DeviceChoice,
    eval::{EvalBatch, EvalKind, EvalTotals},
    memory::DeviceMeter,
    metrics::MetricsWriter,
    optim::ShardPlace,
    DataParallel, DdpOptions, GlobalSampler,
};
use burn::{
    module::Module,
    optim::AdamConfig,
    tensor::{Device, Tensor},
};
use serde_json::json;

use crate::config::Settings;

pub mod failure;
mod output;
mod resume;
mod train;
mod writer;

use crate::Error;
pub use output::print_summary;
use output::{Output, Progress};
use resume::*;
use train::Training;
use writer::{BackgroundWriter, Written};

/// Set by `ballast launch` when it starts a job again: what was lost and where the job resumes,
/// as a JSON object. Rank 0 writes it into the metrics file as a line of kind `restart`.
pub const RESTART_VAR: &str = "BALLAST_RESTART";

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

type Result<T, E = Error> = std::result::Result<T, E>;

/// This process's place in the job: launched (one rank) or not (ranks as threads).
///
/// # Errors
/// Launcher variables that are malformed.
pub fn launch() -> Result<Launch> {
    Launch::from_env().map_err(Error::from)
}

/// Runs `task` with `settings` on every rank of the job and returns rank 0's summary.
///
/// # Errors
/// Anything a rank reports: plan, data, collective, checkpoint errors. With ranks as threads,
/// the first rank's error that is a cause, not a consequence of another rank's failure.
pub fn run<T: Task>(task: &T, settings: &Settings, launch: &Launch) -> Result<Summary> {
    // cubecl reports failures of its device thread through the `log` facade: record them, so
    // the step after one fails instead of training on what was never computed.
    crate::health::install_device_log();
    let options = CommOptions::from_env()?;
    let choice = |rank: usize| (!settings.devices.is_empty()).then(|| DeviceChoice::for_rank(&settings.devices, rank));
    if let Some(me) = crate::world::join_on(launch, options.clone(), choice(launch.rank))? {
        return rank_main(me.comm, task, settings, false, me.device, me.gpu);
    }
    // A rank stuck outside the collectives cannot be joined: as long as the collectives' deadline
    // after the others failed, then the process ends.
    let grace = options.timeout;
    let results = local::run_watched(
        settings.ranks,
        options,
        grace,
        |stuck| end_stuck(stuck, grace),
        |comm| {
            let rank = comm.rank();
            let choice = choice(rank).unwrap_or_default();
            let device = choice.device(0)?.autodiff();
            let gpu = match choice {
                DeviceChoice::Cuda(ordinal) => Some(ordinal.unwrap_or(0)),
                _ => None,
            };
            rank_main(Box::new(comm), task, settings, true, device, gpu)
        },
    );
    let (summary, cause) = first_summary_and_cause(results.into_iter().enumerate());
    match cause {
        Some(e) => Err(e),
        None => summary.ok_or(Error::NoRank),
    }
}

/// Rank 0's summary (the first one returned), and the error that is a cause rather than a
/// consequence of another rank's failure; a rank's panic is its error.
fn first_summary_and_cause(
    results: impl Iterator<Item = (usize, std::thread::Result<Result<Summary>>)>,
) -> (Option<Summary>, Option<Error>) {
    let mut summary = None;
    let mut errors = Vec::new();
    for (rank, r) in results {
        let r = r.unwrap_or_else(|panic| {
            Err(Error::RankPanicked {
                rank,
                message: crate::health::panic_message(panic.as_ref()),
            })
        });
        match r {
            Ok(s) => summary = summary.or(Some(s)),
            Err(e) => errors.push(e),
        }
    }
    (summary, errors.into_iter().min_by_key(Error::is_consequence))
}

/// Ends the process when ranks as threads are stuck after the job failed: prints the others'
/// error that caused it and the stuck ranks, and exits with the lost-rank code.
fn end_stuck(stuck: local::Stuck<Result<Summary>>, grace: std::time::Duration) -> std::convert::Infallible {
    let (_, cause) = first_summary_and_cause(stuck.ended.into_iter());
    if let Some(e) = cause {
        eprintln!("ballast: error: {e}");
    }
    eprintln!(
        "ballast: rank(s) {:?} did not end within {grace:?} after the job failed (stuck outside the \
         collectives); ending the process with exit {}",
        stuck.ranks,
        ballast_collectives::EXIT_LOST_RANK
    );
    std::process::exit(ballast_collectives::EXIT_LOST_RANK.into())
}

/// One rank's whole job, in its phases.
/// Every rank runs the start-up check on its device ([`crate::health::canary_in`]) and the
/// verdicts are shared in one collective, so all ranks stop together, before anything is built,
/// when one device cannot run kernels.
fn check_devices(comm: &mut dyn Communicator, device: &Device, s: &Settings) -> Result<()> {
    let rank = comm.rank();
    let mine = crate::health::canary_in(&device.clone().inner(), s.canary_dtype);
    let failed: Vec<bool> = comm.all_gather(&mine.is_err())?;
    mine.map_err(|failure| Error::RankCanary {
        rank,
        source: Box::new(failure),
    })?;
    match failed.iter().position(|&f| f) {
        Some(other) => Err(Error::PeerCanary { rank: other }),
        None => Ok(()),
    }
}

fn rank_main<T: Task>(
    mut comm: Box<dyn Communicator>,
    task: &T,
    s: &Settings,
    threads: bool,
    device: Device,
    gpu: Option<usize>,
) -> Result<Summary> {
    let rank = comm.rank();
    // A device whose kernels do not run is refused before anything is built or trained.
    check_devices(comm.as_mut(), &device, s)?;
    let meter = match gpu {
        Some(ordinal) => DeviceMeter::for_device(&device).on_cuda(ordinal),
        None => DeviceMeter::for_device(&device),
    };
    let (model, loaded_step) = build_model(comm.as_mut(), task, s, &device, threads)?;
    let (mut ddp, model) = DataParallel::wrap(comm, model, DdpOptions::default().with_precision(s.precision))?;
    let sampler = GlobalSampler::new(task.len(), s.global_batch, s.seed)?;
    let steps = s.steps(sampler.steps_per_epoch());
    let checkpointer = match &s.checkpoint_dir {
        Some(dir) => Some(Checkpointer::new(dir, s.keep)?),
        None => None,
    };
    let start = resume(&mut ddp, model, s, checkpointer.as_ref(), loaded_step)?;
    let mut loss_fn = |m: &T::Model, idx: &[usize]| task.loss(m, idx, &device);
    let mut balancer = plan_devices(&mut ddp, &start, task, s, steps, threads, meter, &mut loss_fn)?;
    if let Some((path, saved)) = start.optimizer {
        restore_optimizer(&mut balancer, path, saved)?;
    }
    let mut out = Output::open(&mut ddp, s, threads)?;
    if rank == 0 {
        if let Some(restart) = std::env::var(RESTART_VAR)
            .ok()
            .and_then(|v| serde_json::from_str(&v).ok())
        {
            out.record("restart", restart)?;
        }
    }
    let train_steps = if s.eval_only { start.state.step } else { steps };
    let progress = (rank == 0).then(|| Progress::new(train_steps.saturating_sub(start.state.step), s.log_every));
    let mut run = Training {
        task,
        settings: s,
        device: &device,
        steps,
        state: start.state,
        optim: AdamConfig::new().init(),
        out: &mut out,
        progress: progress.as_ref(),
        last_checkpoint: None,
        writer: checkpointer.clone().filter(|_| rank == 0).map(BackgroundWriter::spawn),
        started: Instant::now(),
    };
    let first_step = run.state.step;
    let mut model = start.model;
    if s.eval_only {
        run.evaluate(&mut ddp, &model, balancer.plan())?;
    }
    let mut losses = Vec::new();
    let mut samples = 0usize;
    while run.state.step < train_steps {
        let (next, loss, global_samples) = run.step(
            &mut ddp,
            &mut balancer,
            model,
            &sampler,
            checkpointer.as_ref(),
            &mut loss_fn,
        )?;
        model = next;
        losses.push(loss);
        samples += global_samples;
    }
    run.finish_writes()?;
    let last_checkpoint = run.last_checkpoint.take();
    let state = run.state.clone();
    ddp.verify_replicas(&model)?;
    let saved_model = save_model(&mut ddp, &model, s, &state)?;
    let seconds = run.started.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.finish();
    }
    Ok(Summary {
        world_size: ddp.world_size(),
        first_step,
        steps: steps - first_step,
        losses,
        seconds,
        samples_per_sec: samples as f64 / seconds.max(1e-9),
        checksum: crate::params::checksum(&model),
        last_checkpoint,
        evals: out.evals,
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

/// Builds the model on every rank from the seed (rank 0's initial weights then reach every
/// rank in [`DataParallel::wrap`]) and applies `--load`; returns it with the step the loaded
/// weights were saved at (0 without `--load`).
fn build_model<T: Task>(
    comm: &mut dyn Communicator,
    task: &T,
    s: &Settings,
    device: &Device,
    threads: bool,
) -> Result<(T::Model, u64)> {
    // The seeded generator is process-wide: ranks as threads build (and lazily initialise) their
    // models one at a time, so rank 0's initial weights depend on the seed alone.
    let mut built = None;
    for turn in 0..comm.world_size() {
        if turn == comm.rank() {
            device.seed(s.seed);
            let model = task.build(device);
            let _ = crate::params::checksum(&model);
            built = Some(model);
        }
        if threads {
            comm.barrier()?;
        }
    }
    let model = built.ok_or(Error::NoRank)?;
    let Some(path) = &s.load else {
        return Ok((model, 0));
    };
    // Every rank reads the same file; DataParallel::wrap checks that the replicas agree.
    let loaded = checkpoint::load(path, &model).map_err(|source| Error::Load {
        path: path.clone(),
        source: Box::new(source),
    })?;
    if loaded.state.job != s.job {
        return Err(Error::WrongJob {
            path: path.clone(),
            found: loaded.state.job,
            expected: s.job.clone(),
        });
    }
    let step = loaded.state.step;
    Ok((loaded.apply(model), step))
}

/// Measures every device, agrees on the first plan (the saved one when a resumed run of the
/// same world size can keep it, so the result is bit for bit that of an uninterrupted run) and
/// prints it on rank 0.
#[allow(clippy::too_many_arguments)]
fn plan_devices<T: Task, F>(
    ddp: &mut DataParallel,
    start: &Start<T::Model>,
    task: &T,
    s: &Settings,
    steps: u64,
    threads: bool,
    meter: DeviceMeter,
    loss_fn: &mut F,
) -> Result<Balancer>
where
    F: FnMut(&T::Model, &[usize]) -> Tensor<1>,
{
    let rank = ddp.rank();
    let world = ddp.world_size();
    let probe_max = s.global_batch.clamp(1, 32);
    let options = BalanceOptions {
        budget_bytes: s.device_memory.get(rank).copied().unwrap_or(u64::MAX),
        probe_sizes: [1, 2, 4, 8, 16, 32].into_iter().filter(|&m| m <= probe_max).collect(),
        rebalance: s.rebalance,
        slowdown: if threads { s.slowdown(rank) } else { 1.0 },
        shared_heap: threads,
        // Unsharded, the host Adam runs on every rank and keeps the state in host memory: none
        // of it counts against the device. Sharded, each shard's moments live on its device.
        host_optimizer: s.optimizer_sharding == Sharding::Off,
        optimizer_bytes_per_param: if s.optimizer_sharding == Sharding::Off {
            0
        } else {
            ADAM_BYTES_PER_PARAM
        },
        optimizer_sharding: s.optimizer_sharding,
        shard_counts: start.shards.clone(),
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
    let mut balancer = Balancer::probe(ddp, &start.model, loss_fn, &pool, s.global_batch, meter, options)?;
    let reused = match start
        .plan
        .clone()
        .and_then(|p| serde_json::from_value::<ballast_balancer::Plan>(p).ok())
    {
        Some(plan) => balancer.adopt(plan),
        None => false,
    };
    if rank == 0 {
        println!("{}", task.describe());
        if reused {
            println!("continuing on the saved plan");
        }
        println!(
            "{world} ranks ({}), {} samples, global batch {}, steps {}..{steps}, precision {}",
            if threads {
                "threads on simulated devices"
            } else {
                "processes"
            },
            task.len(),
            s.global_batch,
            start.state.step,
            s.precision
        );
        print!("{}", plan_table(balancer.plan(), balancer.reports()));
        if let Some(placed) = balancer.shard_plan() {
            print!("{}", shard_table(placed, ADAM_BYTES_PER_PARAM));
        }
    }
    Ok(balancer)
}
