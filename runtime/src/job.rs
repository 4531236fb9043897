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
    balance::{plan_table, shard_table, BalanceError, BalanceOptions, Balancer},
    checkpoint::{self, CheckpointError, Checkpointer, TrainState},
    device::DeviceChoice,
    eval::{EvalBatch, EvalError, EvalKind, EvalTotals},
    memory::DeviceMeter,
    metrics::MetricsWriter,
    sampler::SamplerError,
    sharded::ShardPlace,
    world::WorldError,
    DataParallel, DdpError, DdpOptions, GlobalSampler,
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

/// Why a job failed: one rank's error, typed, so the caller (and [`run`], choosing which rank's
/// error to report) can tell a cause from its consequences.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The world could not be joined (launcher variables, MPI, NCCL).
    #[error(transparent)]
    World(#[from] WorldError),
    /// A collective failed (a timeout naming the missing ranks, a mismatch, a lost peer).
    #[error(transparent)]
    Collective(#[from] ballast_collectives::Error),
    /// Data-parallel training failed (replicas differ, a collective inside a step).
    #[error(transparent)]
    Ddp(#[from] DdpError),
    /// Probing, planning or a balanced step failed (no plan fits, out of memory).
    #[error(transparent)]
    Balance(#[from] BalanceError),
    /// The dataset cannot be batched as asked.
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The held-out evaluation failed.
    #[error("evaluating the held-out set after step {step}: {source}")]
    Eval {
        /// Steps trained before the evaluation.
        step: u64,
        /// What failed.
        source: EvalError,
    },
    /// `--load` names a file that holds no weights of this model.
    #[error("--load {}: not weights of this model: {source}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// Why it does not fit.
        source: CheckpointError,
    },
    /// `--load` names weights another job wrote.
    #[error("--load {} holds a `{found}` model, not `{expected}`; load a file this job wrote", path.display())]
    WrongJob {
        /// The file.
        path: PathBuf,
        /// The job that wrote it.
        found: String,
        /// This job.
        expected: String,
    },
    /// `--resume` without `--checkpoint-dir`.
    #[error("--resume needs --checkpoint-dir (the directory the run saved its checkpoints in)")]
    ResumeWithoutDirectory,
    /// `--resume` found no complete checkpoint.
    #[error("--resume: no complete checkpoint in {}; run without --resume to start from step 0", dir.display())]
    NothingToResume {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// The optimizer state saved in a checkpoint does not fit the run.
    #[error("resuming the optimizer from {}: {reason}", path.display())]
    OptimizerState {
        /// The checkpoint.
        path: PathBuf,
        /// Why it does not fit.
        reason: String,
    },
    /// The loss stopped being a number.
    #[error("step {step}: the loss is {loss} (diverged); lower --lr (now {lr})")]
    Diverged {
        /// The step.
        step: u64,
        /// Its loss.
        loss: f64,
        /// The run's `--lr`.
        lr: f64,
    },
    /// The metrics file could not be written.
    #[error("writing the metrics file {}: {source}; choose a writable --metrics path", path.display())]
    Metrics {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A rank's device failed the start-up check: its kernels do not run, or compute wrong
    /// values. Nothing was trained.
    #[error("rank {rank}: {failure}; nothing was trained")]
    Canary {
        /// The rank.
        rank: usize,
        /// What the check found.
        failure: crate::health::CanaryError,
    },
    /// Another rank's device failed the start-up check, so this rank stops too.
    #[error("rank {rank}'s device failed the start-up check; nothing was trained")]
    PeerCanary {
        /// The rank whose device failed.
        rank: usize,
    },
    /// Every rank ended without a summary or an error (a bug).
    #[error("no rank returned a summary")]
    NoRank,
}

impl JobError {
    /// The collective error at the root of this one, through the errors that carry one.
    pub fn collective(&self) -> Option<&ballast_collectives::Error> {
        fn in_ddp(d: &DdpError) -> Option<&ballast_collectives::Error> {
            match d {
                DdpError::Collective(c) => Some(c),
                _ => None,
            }
        }
        match self {
            Self::Collective(c) | Self::World(WorldError::Collectives(c)) => Some(c),
            Self::Ddp(d) | Self::Balance(BalanceError::Ddp(d)) => in_ddp(d),
            Self::Balance(BalanceError::Collective(c)) => Some(c),
            Self::Eval {
                source: EvalError::Comm(c),
                ..
            } => Some(c),
            _ => None,
        }
    }

    /// Whether this rank failed only because another one did first (a timeout waiting for it,
    /// a peer that went away): [`run`] reports the other rank's error.
    pub fn is_consequence(&self) -> bool {
        matches!(self, Self::PeerCanary { .. })
            || self
                .collective()
                .is_some_and(ballast_collectives::Error::is_consequence)
    }
}

type Result<T, E = JobError> = std::result::Result<T, E>;

/// This process's place in the job: launched (one rank) or not (ranks as threads).
///
/// # Errors
/// Launcher variables that are malformed.
pub fn launch() -> Result<Launch> {
    Ok(Launch::from_env().map_err(WorldError::from)?)
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
    let results = local::run(settings.ranks, options, |comm| {
        let rank = comm.rank();
        let choice = choice(rank).unwrap_or_default();
        let device = choice.device(0).map_err(WorldError::from)?.autodiff();
        let gpu = match choice {
            DeviceChoice::Cuda(ordinal) => Some(ordinal.unwrap_or(0)),
            _ => None,
        };
        rank_main(Box::new(comm), task, settings, true, device, gpu)
    });
    let mut summary = None;
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(s) => summary = summary.or(Some(s)),
            Err(e) => errors.push(e),
        }
    }
    if let Some(e) = errors.into_iter().min_by_key(JobError::is_consequence) {
        return Err(e);
    }
    summary.ok_or(JobError::NoRank)
}

/// Adam's state per parameter on the device when it is sharded: two f32 moments.
const ADAM_BYTES_PER_PARAM: u64 = 8;

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

/// One rank's whole job, in its phases.
/// Every rank runs the start-up check on its device ([`crate::health::canary_in`]) and the
/// verdicts are shared in one collective, so all ranks stop together, before anything is built,
/// when one device cannot run kernels.
fn check_devices(comm: &mut dyn Communicator, device: &Device, s: &Settings) -> Result<()> {
    let rank = comm.rank();
    let mine = crate::health::canary_in(&device.clone().inner(), s.canary_dtype);
    let failed: Vec<bool> = comm.all_gather(&mine.is_err())?;
    mine.map_err(|failure| JobError::Canary { rank, failure })?;
    match failed.iter().position(|&f| f) {
        Some(other) => Err(JobError::PeerCanary { rank: other }),
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
    let (mut ddp, model) = DataParallel::wrap(comm, model, DdpOptions::default())?;
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
    };
    let started = Instant::now();
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
    let last_checkpoint = run.last_checkpoint.take();
    let state = run.state.clone();
    ddp.verify_replicas(&model)?;
    let saved_model = save_model(&mut ddp, &model, s, &state)?;
    let seconds = started.elapsed().as_secs_f64();
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
    let model = built.ok_or(JobError::NoRank)?;
    let Some(path) = &s.load else {
        return Ok((model, 0));
    };
    // Every rank reads the same file; DataParallel::wrap checks that the replicas agree.
    let loaded = checkpoint::load(path, &model).map_err(|source| JobError::Load {
        path: path.clone(),
        source,
    })?;
    if loaded.state.job != s.job {
        return Err(JobError::WrongJob {
            path: path.clone(),
            found: loaded.state.job,
            expected: s.job.clone(),
        });
    }
    let step = loaded.state.step;
    Ok((loaded.apply(model), step))
}

/// Puts a checkpoint's Adam state where this run keeps it: this rank's shard of it (cut out of
/// the whole model's moments, whatever number of ranks saved them), or the host Adam that runs
/// on every rank when the state is not sharded.
fn restore_optimizer(balancer: &mut Balancer, path: PathBuf, saved: checkpoint::AdamMoments) -> Result<()> {
    if let Some(shard) = balancer.shard_mut() {
        return shard.restore(&saved).map_err(|e| JobError::OptimizerState {
            path,
            reason: e.to_string(),
        });
    }
    let host = balancer.host_mut().ok_or_else(|| JobError::OptimizerState {
        path: path.clone(),
        reason: "the host optimizer is not running".into(),
    })?;
    host.adam_mut()
        .restore(saved.m, saved.v, saved.t)
        .map_err(|e| JobError::OptimizerState {
            path,
            reason: e.to_string(),
        })
}

/// The whole model's Adam moments, all-gathered from every rank's shard, on rank 0 (every rank
/// must call it; the others drop each moment as soon as the collective returns). `None` when
/// the state is not sharded.
fn gather_shards(comm: &mut dyn Communicator, balancer: &Balancer) -> Result<Option<checkpoint::AdamMoments>> {
    let Some(shard) = balancer.shard() else {
        return Ok(None);
    };
    let n: usize = shard.counts().iter().sum();
    let (m, v) = shard.moments()?;
    let mut gather = |mine: Vec<f32>| -> Result<Vec<f32>> {
        let mut all = vec![0.0; n];
        comm.all_gather_f32(&mine, shard.counts(), &mut all)?;
        Ok(if comm.rank() == 0 { all } else { Vec::new() })
    };
    let m = gather(m)?;
    let v = gather(v)?;
    Ok((comm.rank() == 0).then(|| checkpoint::AdamMoments { m, v, t: shard.steps() }))
}

/// Where training starts: the model, the step, and what a resumed checkpoint carried.
struct Start<M> {
    model: M,
    state: TrainState,
    /// The checkpoint's optimizer state, with the checkpoint's path.
    optimizer: Option<(PathBuf, checkpoint::AdamMoments)>,
    /// The checkpoint's plan, when it was saved by a world of this size.
    plan: Option<serde_json::Value>,
    /// The checkpoint's optimizer shards, when it was saved by a world of this size.
    shards: Option<Vec<usize>>,
}

/// With `--resume`, every rank loads the newest complete checkpoint (rank 0 picks it, the
/// others open that file); otherwise training starts at step 0 (`--eval-only`: at the step of
/// the loaded weights).
fn resume<M: Module>(
    ddp: &mut DataParallel,
    model: M,
    s: &Settings,
    checkpointer: Option<&Checkpointer>,
    loaded_step: u64,
) -> Result<Start<M>> {
    let world = ddp.world_size();
    let mut state = TrainState {
        step: if s.eval_only { loaded_step } else { 0 },
        seed: s.seed,
        global_batch: s.global_batch,
        world_size: world,
        job: s.job.clone(),
        plan: None,
        shards: None,
    };
    if !s.resume {
        return Ok(Start {
            model,
            state,
            optimizer: None,
            plan: None,
            shards: None,
        });
    }
    let cp = checkpointer.ok_or(JobError::ResumeWithoutDirectory)?;
    let chosen = if ddp.rank() == 0 { cp.newest()? } else { None };
    let chosen: Option<PathBuf> = ddp.comm().broadcast_value(0, &chosen)?;
    let path = chosen.ok_or_else(|| JobError::NothingToResume {
        dir: cp.dir().to_path_buf(),
    })?;
    let loaded = checkpoint::load(&path, &model)?;
    loaded.state.check_compatible(&s.job, s.global_batch, s.seed, &path)?;
    state.step = loaded.state.step;
    let same_world = loaded.state.world_size == world;
    let plan = same_world.then(|| loaded.state.plan.clone()).flatten();
    let shards = same_world.then(|| loaded.state.shards.clone()).flatten();
    if ddp.rank() == 0 {
        println!(
            "resuming from {} (step {}, saved by {} ranks, now {world})",
            path.display(),
            state.step,
            loaded.state.world_size
        );
    }
    let optimizer = loaded.adam.clone().map(|adam| (path, adam));
    Ok(Start {
        model: loaded.apply(model),
        state,
        optimizer,
        plan,
        shards,
    })
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
            "{world} ranks ({}), {} samples, global batch {}, steps {}..{steps}",
            if threads {
                "threads on simulated devices"
            } else {
                "processes"
            },
            task.len(),
            s.global_batch,
            start.state.step
        );
        print!("{}", plan_table(balancer.plan(), balancer.reports()));
        if let Some(placed) = balancer.shard_plan() {
            print!("{}", shard_table(placed, ADAM_BYTES_PER_PARAM));
        }
    }
    Ok(balancer)
}

/// What a rank writes as it runs: the metrics lines of one run id, and the evaluations.
struct Output {
    run_id: String,
    metrics: MetricsWriter,
    path: PathBuf,
    job: String,
    rank: usize,
    world: usize,
    threads: bool,
    evals: Vec<(u64, EvalTotals)>,
}

impl Output {
    /// Opens the metrics file; rank 0's run id reaches every rank.
    fn open(ddp: &mut DataParallel, s: &Settings, threads: bool) -> Result<Self> {
        let id = format!(
            "{}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            std::process::id()
        );
        let run_id: String = ddp.comm().broadcast_value(0, &id)?;
        let metrics = MetricsWriter::append(&s.metrics).map_err(|source| JobError::Metrics {
            path: s.metrics.clone(),
            source,
        })?;
        Ok(Self {
            run_id,
            metrics,
            path: s.metrics.clone(),
            job: s.job.clone(),
            rank: ddp.rank(),
            world: ddp.world_size(),
            threads,
            evals: Vec::new(),
        })
    }

    /// Appends `fields` with the run's identity as one metrics line.
    fn record(&mut self, kind: &str, fields: serde_json::Value) -> Result<()> {
        let mut line = json!({
            "run": self.run_id, "job": self.job, "kind": kind, "rank": self.rank, "world_size": self.world,
        });
        if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), fields) {
            line.extend(fields);
        }
        self.metrics.record(&line).map_err(|source| JobError::Metrics {
            path: self.path.clone(),
            source,
        })
    }
}

/// The training loop's state between steps.
struct Training<'a, T> {
    task: &'a T,
    settings: &'a Settings,
    device: &'a Device,
    /// The run's last step.
    steps: u64,
    state: TrainState,
    /// burn's optimizer, which the step signature asks for: a placeholder, as the host Adam
    /// runs on every rank (`host_optimizer`).
    optim: burn::optim::ModuleOptimizer,
    out: &'a mut Output,
    progress: Option<&'a Progress>,
    last_checkpoint: Option<PathBuf>,
}

impl<T: Task> Training<'_, T> {
    /// One step: this rank's share in planned micro-batches, the all-reduce and the update,
    /// its metrics line, then a checkpoint and an evaluation when they are due. Returns the
    /// model, the step's global loss and its samples.
    fn step<F>(
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
        #[cfg(feature = "testkit")]
        if s.crash_at_step == Some(step) {
            eprintln!(
                "ballast: rank {}: aborting before step {step} as asked (--crash-at-step)",
                self.out.rank
            );
            std::process::abort();
        }
        let plan = balancer.plan().clone();
        let t0 = Instant::now();
        let lr = s.lr_at(step, self.steps);
        let (model, out) = balancer.step(ddp, model, &mut self.optim, lr, &sampler.batch(step), loss_fn)?;
        let step_s = t0.elapsed().as_secs_f64();
        if !out.stats.loss.is_finite() {
            return Err(JobError::Diverged {
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
                "collectives": out.stats.collectives,
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
        if let Some(cp) = checkpointer {
            if done % s.checkpoint_every == 0 || done == self.steps {
                // Rank 0 writes; the others wait so that nobody runs ahead of a failed save.
                let gathered = gather_shards(ddp.comm(), balancer)?;
                let written = if self.out.rank == 0 {
                    self.state.plan = serde_json::to_value(balancer.plan()).ok();
                    self.state.shards = balancer.shard().map(|s| s.counts().to_vec());
                    let adam = match &gathered {
                        Some(moments) => Some(moments.into()),
                        None => balancer.host().map(|h| h.adam().into()),
                    };
                    Some(cp.save(&model, adam, &self.state)?)
                } else {
                    None
                };
                barrier_after_write(ddp.comm(), checkpoint_bytes(&model))?;
                self.last_checkpoint = written;
            }
        }
        if done == self.steps || (s.eval_every > 0 && done % s.eval_every == 0) {
            self.evaluate(ddp, &model, balancer.plan())?;
        }
        Ok((model, out.stats.loss, out.stats.global_samples))
    }

    /// Every rank evaluates its slice of the held-out set by `plan`'s shares; the totals go
    /// to the metrics, the progress output and the summary.
    fn evaluate(&mut self, ddp: &mut DataParallel, model: &T::Model, plan: &ballast_balancer::Plan) -> Result<()> {
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
        .map_err(|source| JobError::Eval { step, source })?;
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

/// `--save-model`: rank 0 writes the final weights; nobody reports success before the file is
/// in place.
fn save_model<M: Module>(
    ddp: &mut DataParallel,
    model: &M,
    s: &Settings,
    state: &TrainState,
) -> Result<Option<PathBuf>> {
    let Some(path) = &s.save_model else {
        return Ok(None);
    };
    if ddp.rank() == 0 {
        checkpoint::save_model(path, model, state)?;
    }
    barrier_after_write(ddp.comm(), checkpoint_bytes(model))?;
    Ok(Some(path.clone()))
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
