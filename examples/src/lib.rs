//! Example jobs for ballast: data, models and tasks.
//!
//! - [`cifar`] and [`text`]: loaders for CIFAR-10 binary files and UTF-8 text, with generated
//!   data in the same formats when none is given;
//! - [`models`]: a ResNet-18-style image classifier and a decoder-only byte-level Transformer;
//!
//! The training loop itself (world, plan, balanced steps, progress, metrics, checkpoints) is
//! `ballast::job`; each binary supplies a `ballast::job::Task`.
#![warn(missing_docs)]

pub mod cifar;
pub mod models;
pub mod text;

use std::{io::Write, path::Path, process::ExitCode};

use ballast::{
    config::{self, Defaults, Settings, TrainArgs},
    job::{self, Task},
};
use clap::{CommandFactory, FromArgMatches};
use serde::de::DeserializeOwned;

/// Scores next-unit logits `[n · units_per_sample, classes]` against their targets
/// `[n · units_per_sample]`: per sample, the sum of its units' cross-entropy losses; the units
/// whose most likely class is the target; the units counted.
pub fn score(
    logits: burn::tensor::Tensor<2>,
    targets: burn::tensor::Tensor<1, burn::tensor::Int>,
    units_per_sample: usize,
) -> ballast::eval::EvalBatch {
    let [rows, _] = logits.dims();
    let per = units_per_sample.max(1);
    let losses = burn::tensor::activation::log_softmax(logits.clone(), 1)
        .gather(1, targets.clone().reshape([rows, 1]))
        .reshape([rows / per, per])
        .sum_dim(1)
        .reshape([rows / per])
        .neg();
    let predicted = logits.argmax(1).reshape([rows]).into_data();
    let targets = targets.into_data();
    ballast::eval::EvalBatch {
        losses: losses.into_data().iter::<f32>().collect(),
        correct: predicted
            .iter::<i64>()
            .zip(targets.iter::<i64>())
            .filter(|(p, t)| p == t)
            .count() as u64,
        units: rows as u64,
    }
}

/// A tiny deterministic generator for synthetic data (the same bytes on every machine).
#[derive(Debug, Clone)]
pub struct Lcg(u64);

impl Lcg {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let x = self.0;
        (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ (x >> 32)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// readers (other ranks generating the same file) never see a partial file.
///
/// # Errors
/// IO errors, with the path.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = dir.to_path_buf();
    tmp.push(format!(
        ".{}.{}.{:?}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("data"),
        std::process::id(),
        std::thread::current().id()
    ));
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// An example binary's `main`: parses `C` (with the job's defaults appended to `--help`), runs
/// `run`, and turns an error into `<name>: error: ...` on stderr and exit code 2.
pub fn main_with<C: CommandFactory + FromArgMatches>(
    name: &str,
    defaults: &Defaults,
    run: impl FnOnce(&C) -> anyhow::Result<()>,
) -> ExitCode {
    // A CUDA library installed under a versioned name only is linked where cudarc looks for it
    // (this may relaunch the process, before anything else runs).
    #[cfg(feature = "cuda")]
    ballast::libs::relaunch_with_found_libraries();
    let matches = C::command().after_help(defaults.describe()).get_matches();
    let cli = match C::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            ballast::job::failure::say_error(name, &format!("{e:#}"), code);
            ExitCode::from(code)
        }
    }
}

/// The exit code of a job that failed with `e`: a [`ballast::Error`] in its chain decides
/// ([`ballast::Error::exit_code`]: 75 when a restart could pass, as after a lost rank); any
/// other error is bad input or a bug, 2.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|cause| cause.downcast_ref::<ballast::Error>())
        .map_or(2, ballast::Error::exit_code)
}

/// The launcher's view and the validated settings (flags over the `--config` file over
/// `defaults`), with the file's `[model]` table.
///
/// # Errors
/// Launcher variables or settings that are invalid.
pub fn settings<M: DeserializeOwned + Default>(
    train: &TrainArgs,
    defaults: &Defaults,
) -> anyhow::Result<(ballast::cluster::Launch, Settings, M)> {
    let launch = job::launch()?;
    let (settings, model) = config::load::<M>(train, defaults, launch.is_launched().then_some(launch.world_size))?;
    Ok((launch, settings, model))
}

/// The fraction of the training data to hold out: `--eval-fraction` if given, else 0.1 of
/// generated data (so the default run reports held-out numbers), else none.
pub fn eval_fraction(settings: &Settings) -> Option<f64> {
    match (settings.eval_fraction, &settings.data, &settings.eval_data) {
        (Some(f), _, _) => Some(f),
        (None, None, None) => Some(0.1),
        _ => None,
    }
}

/// Runs `task` on every rank and prints rank 0's summary.
///
/// # Errors
/// As [`job::run`].
pub fn train<T: Task>(task: &T, settings: &Settings, launch: &ballast::cluster::Launch) -> anyhow::Result<()> {
    let summary = job::run(task, settings, launch)?;
    if launch.rank == 0 {
        job::print_summary(&summary);
    }
    Ok(())
}
