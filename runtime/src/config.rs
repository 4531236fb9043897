//! Settings of an example job: a TOML file (`--config`) and command-line flags, flags winning.
//!
//! The file has two tables, `[train]` (the keys of [`TrainArgs`]) and `[model]` (the job's own
//! model keys). Unknown keys are errors, so a misspelt setting is never silently ignored.
//!
//! ```toml
//! [train]
//! global_batch = 48
//! lr = 0.002
//! steps = 200
//! device_memory = ["24MiB", "16MiB", "8MiB"]
//! speeds = [3, 2, 1]
//!
//! [model]
//! width = 8
//! ```

use std::path::{Path, PathBuf};

use crate::Error;
use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize};

/// Training settings shared by the examples. Every field may come from the `[train]` table of
/// the `--config` file or from its flag; the flag wins.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file with `[train]` and `[model]` tables holding any of these settings (flags win).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Ranks to run as threads when no launcher (mpirun, srun) started this process [default: one
    /// per --device-memory entry, or 3].
    #[arg(long)]
    pub ranks: Option<usize>,
    /// Samples per optimizer step over all ranks (the batch one big device would train on).
    #[arg(long)]
    pub global_batch: Option<usize>,
    /// Learning rate of Adam (the peak, with --lr-schedule cosine).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate over the run: `cosine` (from --lr at step 0 down to a tenth of it at the
    /// last step, which keeps the last steps of a run from the loss spikes Adam shows at a
    /// high rate) or `constant` [default: cosine].
    #[arg(long, value_name = "cosine|constant")]
    pub lr_schedule: Option<String>,
    /// Optimizer steps to train (counted from step 0, so a resumed run stops at the same step).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Passes over the data instead of --steps.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Memory budget of each device, one per rank, e.g. `24MiB,16MiB,8MiB`; a rank's
    /// micro-batch is capped so its measured peak stays within it. Omit for no cap.
    #[arg(long, value_delimiter = ',', value_name = "BYTES,...")]
    pub device_memory: Option<Vec<String>>,
    /// Each rank's device, one per rank or one for every rank: `flex` (the CPU), `wgpu` (the
    /// best adapter), `wgpu:cpu` (a software Vulkan device), `cuda` (this process's local GPU) or
    /// `cuda:N` [default: flex for ranks as threads; under a launcher the local GPU where the
    /// cuda feature finds one, else flex].
    #[arg(long, value_delimiter = ',', value_name = "DEVICE,...")]
    pub device: Option<Vec<String>>,
    /// Relative speeds of simulated devices when ranks run as threads, e.g. `3,2,1`: a rank of
    /// speed s sleeps so that it takes max/s times as long. Ignored under a launcher, where
    /// speeds are the real devices' (pin ranks to cores with cluster/run-local.sh).
    #[arg(long, value_delimiter = ',', value_name = "S,...")]
    pub speeds: Option<Vec<f64>>,
    /// Training data (see the job's --help); omit to generate a small synthetic set.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Directory for generated data, metrics and checkpoints [default: runs/JOB].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Metrics file: one JSON line per step and rank, appended [default: WORK_DIR/metrics.jsonl].
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// Directory for checkpoints (safetensors); omit for none.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every this many steps (and after the last) [default: 50].
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints to keep; older ones are deleted [default: 3].
    #[arg(long)]
    pub keep: Option<usize>,
    /// Resume from the newest complete checkpoint in --checkpoint-dir.
    #[arg(long)]
    #[serde(default)]
    pub resume: bool,
    /// Seed of the initial weights, the data order and generated data [default: 1].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print a progress line every this many steps when stderr is not a terminal [default: 10].
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Keep the first plan: do not re-plan from observed speeds.
    #[arg(long)]
    #[serde(default)]
    pub no_rebalance: bool,
    /// First plan: `measured` (shares by measured speed) or `equal` (equal shares, capped by
    /// memory: reproducible bit for bit across runs, with --no-rebalance) [default: measured].
    #[arg(long, value_name = "measured|equal")]
    pub initial_plan: Option<String>,
    /// Micro-batch per device: `fastest` (the largest size measured within 5 % of the fastest
    /// that fits its memory) or `largest` (fills the memory budget) [default: fastest].
    #[arg(long, value_name = "fastest|largest")]
    pub micro_batch: Option<String>,
    /// Where Adam's state lives: `memory` (one shard per rank, sized by the memory each device
    /// has left, on the devices; a device that cannot hold even its shard keeps it in host
    /// memory), `even` (equal shards) or `off` (the whole state on every rank, updated by the
    /// host Adam) [default: memory].
    #[arg(long, value_name = "off|even|memory")]
    pub optimizer_sharding: Option<String>,
    /// The float type the replicas compute in: `f32`, `bf16` (forward and backward in bf16;
    /// gradient sums, the all-reduce, an f32 master copy and Adam's state in f32) or `f16` (the
    /// same with dynamic loss scaling) [default: f32].
    #[arg(long, value_name = "f32|bf16|f16")]
    pub precision: Option<String>,
    /// Held-out data to evaluate on (the job's --help says which format: CIFAR-10
    /// `test_batch.bin`, or a text file); never trained on.
    #[arg(long, value_name = "PATH", conflicts_with = "eval_fraction")]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training data (a fixed, seeded choice; of generated data,
    /// this fraction more is generated and held out) and evaluate on it [default: 0.1 with
    /// generated data; none for --data without --eval-data].
    #[arg(long, value_name = "F")]
    pub eval_fraction: Option<f64>,
    /// Evaluate on the held-out set every this many steps, and always after the last; 0 for the
    /// end only [default: 50].
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// After training, write the model's weights (safetensors, no optimizer state) to this file.
    #[arg(long, value_name = "FILE")]
    pub save_model: Option<PathBuf>,
    /// Start from the weights in this file (a --save-model file or a checkpoint).
    #[arg(long, value_name = "FILE")]
    pub load: Option<PathBuf>,
    /// Do not train: evaluate the --load model on the held-out set and exit.
    #[arg(long, requires = "load")]
    #[serde(default)]
    pub eval_only: bool,
    /// Abort the process when this step is about to start (fault-injection tests; feature
    /// `testkit`).
    #[cfg(feature = "testkit")]
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub crash_at_step: Option<u64>,
    /// Run each rank's start-up check in this float type (f32, f64, f16, bf16) instead of f32
    /// (tests: a type whose kernels a device cannot compile makes its check fail for real;
    /// feature `testkit`).
    #[cfg(feature = "testkit")]
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub canary_dtype: Option<String>,
}

/// A job's defaults.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Job name (directory under `runs/`, `job` field of metrics).
    pub job: &'static str,
    /// Global batch.
    pub global_batch: usize,
    /// Learning rate.
    pub lr: f64,
    /// Steps.
    pub steps: u64,
    /// Device memory budgets.
    pub device_memory: &'static [&'static str],
    /// Simulated speeds.
    pub speeds: &'static [f64],
}

impl Defaults {
    /// The job's defaults as a help paragraph.
    pub fn describe(&self) -> String {
        let memory = if self.device_memory.is_empty() {
            "unlimited".to_string()
        } else {
            self.device_memory.join(",")
        };
        let speeds: Vec<String> = self.speeds.iter().map(|s| s.to_string()).collect();
        format!(
            "Defaults of this job: --global-batch {} --lr {} --steps {} --device-memory {memory} --speeds {} \
             (the last two only when ranks run as threads; under mpirun budgets are unlimited unless given).",
            self.global_batch,
            self.lr,
            self.steps,
            speeds.join(",")
        )
    }
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Job name.
    pub job: String,
    /// Ranks when running as threads.
    pub ranks: usize,
    /// Global batch.
    pub global_batch: usize,
    /// Learning rate (the peak of a cosine schedule).
    pub lr: f64,
    /// Learning rate over the run.
    pub lr_schedule: LrSchedule,
    /// Steps, or epochs to convert once the data size is known.
    pub length: Length,
    /// Budget per rank, bytes (empty: unlimited).
    pub device_memory: Vec<u64>,
    /// Simulated speeds per rank (threads only; empty: none).
    pub speeds: Vec<f64>,
    /// Each rank's device (`--device`; empty: the default choice, see [`TrainArgs::device`]).
    pub devices: Vec<crate::device::DeviceChoice>,
    /// Data path.
    pub data: Option<PathBuf>,
    /// Work directory.
    pub work_dir: PathBuf,
    /// Metrics file.
    pub metrics: PathBuf,
    /// Checkpoint directory.
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint interval in steps.
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub keep: usize,
    /// Resume from the newest checkpoint.
    pub resume: bool,
    /// Seed.
    pub seed: u64,
    /// Progress line interval.
    pub log_every: u64,
    /// Re-plan online.
    pub rebalance: bool,
    /// Start from equal shares instead of measured ones.
    pub equal_start: bool,
    /// How each device's micro-batch is chosen within its memory.
    pub micro_batch_policy: ballast_balancer::MicroBatchPolicy,
    /// Where the optimizer state lives.
    pub optimizer_sharding: ballast_balancer::Sharding,
    /// The float type the replicas compute in.
    pub precision: crate::Precision,
    /// Held-out data file or directory.
    pub eval_data: Option<PathBuf>,
    /// Fraction of the training data to hold out (validated: strictly between 0 and 1).
    pub eval_fraction: Option<f64>,
    /// Evaluate every this many steps (0: at the end only).
    pub eval_every: u64,
    /// Where to write the final weights.
    pub save_model: Option<PathBuf>,
    /// Weights to start from.
    pub load: Option<PathBuf>,
    /// Evaluate the loaded model only.
    pub eval_only: bool,
    /// Abort when this step is about to start, once rank 0's checkpoints handed over before it
    /// are durable (tests; feature `testkit`).
    #[cfg(feature = "testkit")]
    pub crash_at_step: Option<u64>,
    /// The float type of each rank's start-up check (`f32` but in tests).
    pub canary_dtype: burn::tensor::DType,
}

/// The learning rate over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrSchedule {
    /// `lr` at every step.
    Constant,
    /// Half a cosine from `lr` at step 0 to `lr / 10` at the last step.
    Cosine,
}

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// Optimizer steps.
    Steps(u64),
    /// Passes over the data.
    Epochs(u64),
}

impl Settings {
    /// The learning rate of optimizer step `step` of a run of `steps` steps. It depends only on
    /// the step, so a resumed run continues the same schedule.
    pub fn lr_at(&self, step: u64, steps: u64) -> f64 {
        match self.lr_schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Cosine => {
                let progress = step as f64 / steps.saturating_sub(1).max(1) as f64;
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
                self.lr * (0.1 + 0.9 * cos)
            }
        }
    }

    /// Steps to train given `steps_per_epoch`.
    pub fn steps(&self, steps_per_epoch: usize) -> u64 {
        match self.length {
            Length::Steps(s) => s,
            Length::Epochs(e) => e * steps_per_epoch as u64,
        }
    }

    /// The slowdown factor of `rank` (1.0 = full speed) when ranks are simulated devices.
    pub fn slowdown(&self, rank: usize) -> f64 {
        let fastest = self.speeds.iter().copied().fold(0.0, f64::max);
        self.speeds.get(rank).map_or(1.0, |&s| fastest / s)
    }
}

/// Reads the `[train]` and `[model]` tables of a TOML file.
///
/// # Errors
/// Missing file, TOML syntax, unknown keys and wrong types, each naming the file.
pub fn read_file<M: DeserializeOwned + Default>(path: &Path) -> Result<(TrainArgs, M)> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File<M> {
        #[serde(default)]
        train: Option<TrainArgs>,
        #[serde(default)]
        model: Option<M>,
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}; check the --config path", path.display()))?;
    let file: File<M> = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "config file {} is invalid: {}; the file takes [train] and [model] tables (see --help for the keys)",
            path.display(),
            e.to_string().trim_end()
        )
    })?;
    Ok((file.train.unwrap_or_default(), file.model.unwrap_or_default()))
}

/// The float type of the start-up check: `f32`, or `--canary-dtype` with the testkit.
fn canary_dtype(cli: &TrainArgs) -> Result<burn::tensor::DType> {
    use burn::tensor::DType;
    #[cfg(feature = "testkit")]
    if let Some(name) = &cli.canary_dtype {
        return Ok(match name.as_str() {
            "f32" => DType::F32,
            "f64" => DType::F64,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => bail!("--canary-dtype {other:?}: use f32, f64, f16 or bf16"),
        });
    }
    let _ = cli;
    Ok(DType::F32)
}

/// Parses `--device` entries and checks that this binary has each one's backend.
fn resolve_devices(specs: Vec<String>) -> Result<Vec<crate::device::DeviceChoice>> {
    specs
        .iter()
        .enumerate()
        .map(|(rank, spec)| {
            let choice: crate::device::DeviceChoice = spec
                .parse()
                .map_err(|e| anyhow::anyhow!("--device entry {rank}: {e}"))?;
            if let Err(e @ Error::NotBuilt { .. }) = choice.device(0) {
                bail!("--device entry {rank}: {e}");
            }
            Ok(choice)
        })
        .collect()
}

/// Merges flags over the file's settings, applies `defaults` and validates. `launched` is the
/// world size when a launcher started this process: the simulated devices of the defaults
/// (budgets, speeds) then do not apply, and per-rank lists must match the world.
///
/// # Errors
/// Each invalid value, named with the flag and what to give instead.
pub fn resolve(cli: &TrainArgs, file: &TrainArgs, defaults: &Defaults, launched: Option<usize>) -> Result<Settings> {
    macro_rules! pick {
        ($f:ident) => {
            cli.$f.clone().or_else(|| file.$f.clone())
        };
    }
    let global_batch = pick!(global_batch).unwrap_or(defaults.global_batch);
    if global_batch < 1 {
        bail!("--global-batch must be at least 1 (got {global_batch}); it is the number of samples per optimizer step");
    }
    let lr = pick!(lr).unwrap_or(defaults.lr);
    if !(lr.is_finite() && lr > 0.0) {
        bail!("--lr must be a positive number (got {lr}); try 0.001");
    }
    let length = match (pick!(steps), pick!(epochs)) {
        (Some(_), Some(_)) => bail!("give either steps or epochs, not both"),
        (Some(0), None) | (None, Some(0)) => bail!("--steps/--epochs must be at least 1"),
        (Some(s), None) => Length::Steps(s),
        (None, Some(e)) => Length::Epochs(e),
        (None, None) => Length::Steps(defaults.steps),
    };
    let memory_specs: Vec<String> = pick!(device_memory).unwrap_or_else(|| {
        if launched.is_some() {
            Vec::new()
        } else {
            defaults.device_memory.iter().map(|s| (*s).to_string()).collect()
        }
    });
    let mut device_memory = Vec::new();
    for (rank, spec) in memory_specs.iter().enumerate() {
        let bytes = ballast_cluster::parse_bytes(spec).map_err(|e| {
            anyhow::anyhow!(
                "--device-memory entry {rank} ({spec:?}) is not a size: {e}; write sizes like 24MiB or 2GiB"
            )
        })?;
        if bytes == 0 {
            bail!("--device-memory entry {rank} is 0 bytes; every device needs a positive budget");
        }
        device_memory.push(bytes);
    }
    let speeds = match launched {
        // Real devices have their own speeds.
        Some(_) => Vec::new(),
        None => pick!(speeds).unwrap_or_else(|| defaults.speeds.to_vec()),
    };
    if let Some((rank, s)) = speeds.iter().enumerate().find(|(_, s)| !(s.is_finite() && **s > 0.0)) {
        bail!("--speeds entry {rank} is {s}; speeds are positive relative numbers such as 3,2,1");
    }
    let devices = resolve_devices(pick!(device).unwrap_or_default())?;
    let ranks = match (launched, pick!(ranks)) {
        (Some(world), Some(r)) if r != world => {
            bail!("--ranks is {r} but the launcher started {world} processes; drop --ranks or start {r} processes")
        }
        (Some(world), _) => world,
        (None, Some(0)) => bail!("--ranks must be at least 1"),
        (None, Some(r)) => r,
        (None, None) if !device_memory.is_empty() => device_memory.len(),
        (None, None) if !speeds.is_empty() => speeds.len(),
        (None, None) if devices.len() > 1 => devices.len(),
        (None, None) => 3,
    };
    if devices.len() > 1 && devices.len() != ranks {
        bail!(
            "the job has {ranks} ranks but --device lists {} devices; give one device per rank, or one for all",
            devices.len()
        );
    }
    if !device_memory.is_empty() && device_memory.len() != ranks {
        bail!(
            "the job has {ranks} ranks but --device-memory lists {} budgets; give one budget per rank",
            device_memory.len()
        );
    }
    if !speeds.is_empty() && speeds.len() != ranks {
        bail!(
            "--ranks is {ranks} but --speeds lists {} speeds; give one speed per rank",
            speeds.len()
        );
    }
    let work_dir = pick!(work_dir).unwrap_or_else(|| PathBuf::from("runs").join(defaults.job));
    let metrics = pick!(metrics).unwrap_or_else(|| work_dir.join("metrics.jsonl"));
    let checkpoint_every = pick!(checkpoint_every).unwrap_or(50);
    if checkpoint_every == 0 {
        bail!("--checkpoint-every must be at least 1");
    }
    let keep = pick!(keep).unwrap_or(3);
    if keep == 0 {
        bail!("--keep must be at least 1: the newest checkpoint is always kept");
    }
    let checkpoint_dir = pick!(checkpoint_dir);
    let resume = cli.resume || file.resume;
    if resume && checkpoint_dir.is_none() {
        bail!("--resume needs --checkpoint-dir: the directory to resume from");
    }
    let precision: crate::Precision = match pick!(precision) {
        None => crate::Precision::F32,
        Some(text) => text
            .parse()
            .map_err(|e: crate::Error| anyhow::anyhow!("--precision: {e}"))?,
    };
    let eval_fraction = pick!(eval_fraction);
    if let Some(f) = eval_fraction {
        if !(f.is_finite() && f > 0.0 && f < 1.0) {
            bail!("--eval-fraction is {f}; give a number between 0 and 1, such as 0.1");
        }
    }
    let eval_data = pick!(eval_data);
    if eval_data.is_some() && eval_fraction.is_some() {
        bail!("give either --eval-data or --eval-fraction, not both");
    }
    let eval_only = cli.eval_only || file.eval_only;
    let load = pick!(load);
    if eval_only && load.is_none() {
        bail!("--eval-only needs --load FILE: the model to evaluate");
    }
    if eval_only && resume {
        bail!("--eval-only does not train; drop --resume");
    }
    let save_model = pick!(save_model);
    if let (Some(save), Some(data)) = (&save_model, &pick!(data)) {
        if save == data {
            bail!(
                "--save-model {} is the training data; choose another path",
                save.display()
            );
        }
    }
    Ok(Settings {
        job: defaults.job.to_string(),
        ranks,
        global_batch,
        lr,
        lr_schedule: match pick!(lr_schedule).as_deref() {
            None | Some("cosine") => LrSchedule::Cosine,
            Some("constant") => LrSchedule::Constant,
            Some(other) => bail!("--lr-schedule is {other:?}; use `cosine` or `constant`"),
        },
        length,
        device_memory,
        speeds,
        devices,
        data: pick!(data),
        work_dir,
        metrics,
        checkpoint_dir,
        checkpoint_every,
        keep,
        resume,
        seed: pick!(seed).unwrap_or(1),
        log_every: pick!(log_every).unwrap_or(10).max(1),
        rebalance: !(cli.no_rebalance || file.no_rebalance),
        equal_start: match pick!(initial_plan).as_deref() {
            None | Some("measured") => false,
            Some("equal") => true,
            Some(other) => bail!("--initial-plan is {other:?}; use `measured` or `equal`"),
        },
        micro_batch_policy: match pick!(micro_batch).as_deref() {
            None | Some("fastest") => ballast_balancer::MicroBatchPolicy::Fastest,
            Some("largest") => ballast_balancer::MicroBatchPolicy::Largest,
            Some(other) => bail!("--micro-batch is {other:?}; use `fastest` or `largest`"),
        },
        optimizer_sharding: match pick!(optimizer_sharding) {
            None => ballast_balancer::Sharding::Memory,
            Some(text) => text
                .parse()
                .map_err(|e: ballast_balancer::Error| anyhow::anyhow!("--optimizer-sharding: {e}"))?,
        },
        precision,
        eval_data,
        eval_fraction,
        eval_every: pick!(eval_every).unwrap_or(50),
        save_model,
        load,
        eval_only,
        #[cfg(feature = "testkit")]
        crash_at_step: cli.crash_at_step,
        canary_dtype: canary_dtype(cli)?,
    })
}

/// Reads `--config` if given and resolves the settings; returns them with the `[model]` table.
///
/// # Errors
/// See [`read_file`] and [`resolve`].
pub fn load<M: DeserializeOwned + Default>(
    cli: &TrainArgs,
    defaults: &Defaults,
    launched: Option<usize>,
) -> Result<(Settings, M)> {
    let (file, model) = match &cli.config {
        Some(path) => read_file::<M>(path)?,
        None => (TrainArgs::default(), M::default()),
    };
    Ok((resolve(cli, &file, defaults, launched)?, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: Defaults = Defaults {
        job: "test",
        global_batch: 8,
        lr: 1e-3,
        steps: 10,
        device_memory: &[],
        speeds: &[],
    };

    #[test]
    fn cosine_runs_from_the_rate_to_a_tenth_of_it() {
        let s = resolve(&TrainArgs::default(), &TrainArgs::default(), &DEFAULTS, None).unwrap();
        assert_eq!(s.lr_schedule, LrSchedule::Cosine);
        let lrs: Vec<f64> = (0..101).map(|t| s.lr_at(t, 101)).collect();
        assert!((lrs[0] - 1e-3).abs() < 1e-15, "{}", lrs[0]);
        assert!((lrs[50] - 0.55e-3).abs() < 1e-12, "{}", lrs[50]);
        assert!((lrs[100] - 1e-4).abs() < 1e-15, "{}", lrs[100]);
        assert!(lrs.windows(2).all(|w| w[1] < w[0]));
        assert!((s.lr_at(0, 1) - 1e-3).abs() < 1e-15);
    }

    #[test]
    fn optimizer_state_is_sharded_by_memory_unless_told_otherwise() {
        let s = resolve(&TrainArgs::default(), &TrainArgs::default(), &DEFAULTS, None).unwrap();
        assert_eq!(s.optimizer_sharding, ballast_balancer::Sharding::Memory);
        let off = TrainArgs {
            optimizer_sharding: Some("off".into()),
            ..TrainArgs::default()
        };
        let s = resolve(&off, &TrainArgs::default(), &DEFAULTS, None).unwrap();
        assert_eq!(s.optimizer_sharding, ballast_balancer::Sharding::Off);
        let bad = TrainArgs {
            optimizer_sharding: Some("zero3".into()),
            ..TrainArgs::default()
        };
        let err = resolve(&bad, &TrainArgs::default(), &DEFAULTS, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--optimizer-sharding") && err.contains("use off, even or memory"),
            "{err}"
        );
    }

    #[test]
    fn constant_keeps_the_rate_and_unknown_schedules_are_errors() {
        let cli = TrainArgs {
            lr_schedule: Some("constant".into()),
            ..TrainArgs::default()
        };
        let s = resolve(&cli, &TrainArgs::default(), &DEFAULTS, None).unwrap();
        assert!((0..10).all(|t| s.lr_at(t, 10) == 1e-3));
        let bad = TrainArgs {
            lr_schedule: Some("linear".into()),
            ..TrainArgs::default()
        };
        let err = resolve(&bad, &TrainArgs::default(), &DEFAULTS, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--lr-schedule") && err.contains("cosine"), "{err}");
    }
}
