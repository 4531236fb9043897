//! Why a job stopped.

use super::*;

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
