//! The one error type of `ballast`. Every fallible call of the library returns [`Error`]; each
//! variant is one kind of failure, and its message names the cause and the fix. The other crates'
//! errors (collectives, the launcher, the planner) arrive whole, so `?` works across all of them
//! and a caller matches one enum. Where a failure happened inside another step (an evaluation, a
//! `--load`, a rank's start-up check), the variant says where and holds the cause as its source.

use std::path::PathBuf;

use safetensors::Dtype;

use crate::checkpoint::FORMAT;
use crate::ddp::GradientForm;

/// A `Result` whose error is ballast's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every way a call of `ballast` can fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ----- the other crates
    /// A collective failed: a timeout naming the missing ranks, a mismatch, a lost peer, or a
    /// backend that did not start.
    #[error(transparent)]
    Collective(#[from] ballast_collectives::Error),
    /// The launcher's environment is malformed, or a host fact (`/proc`) could not be read.
    #[error(transparent)]
    Cluster(#[from] ballast_cluster::Error),
    /// No plan fits the devices.
    #[error(transparent)]
    Plan(#[from] ballast_balancer::Error),

    // ----- the world and its devices
    /// A launcher started us but this binary has no MPI support.
    #[error(
        "this process was started by {launcher} (rank {rank} of {world_size}) but ballast was built \
         without MPI; rebuild with `cargo build --release -p ballast --features mpi`"
    )]
    NoMpi {
        /// The launcher found.
        launcher: ballast_cluster::Launcher,
        /// Rank from the environment.
        rank: usize,
        /// World size from the environment.
        world_size: usize,
    },
    /// The text names no device.
    #[error(
        "unknown device {0:?}; use flex (the CPU), wgpu, wgpu:cpu, cuda or cuda:N, one per rank separated by commas"
    )]
    UnknownDevice(String),
    /// The device's backend was not compiled in.
    #[error("device {choice} needs ballast built with the `{feature}` feature; rebuild with `--features {feature}` (or `--features ballast/{feature}` from the workspace)")]
    NotBuilt {
        /// The device asked for.
        choice: String,
        /// The cargo feature that provides it.
        feature: &'static str,
    },
    /// A device failed its start-up check ([`crate::health::canary`]): its kernels do not
    /// compile or run, or they compute wrong values.
    #[error("{device}: the start-up check (products, a 16x16 matmul and sums with exact answers) failed: {reason}; {likely_cause}")]
    Canary {
        /// The device checked.
        device: String,
        /// What went wrong: the backend's error, or the wrong values.
        reason: String,
        /// What usually causes it on this kind of device, and the fix.
        likely_cause: String,
    },

    /// The text names no precision.
    #[error("unknown precision {0:?}; use f32, bf16 or f16")]
    UnknownPrecision(String),
    /// The device cannot compute in the precision asked for.
    #[error("{device} cannot compute in {precision}; train it in f32, or put it on a device that has {precision} (flex, cuda)")]
    PrecisionNotSupported {
        /// The device.
        device: String,
        /// The precision asked for.
        precision: crate::ddp::Precision,
    },
    /// The f32 master copy was handed to the optimizer that steps it (a sharded optimizer's
    /// shards, or the host Adam), so it cannot be read here or stepped by another optimizer.
    #[error(
        "the f32 master parameters were handed to the optimizer that steps them: read them with \
         ShardedAdam::master_shard (each rank its own shard) or HostOffload::master, and keep \
         stepping this model with that optimizer"
    )]
    MasterSharded,

    // ----- data
    /// The dataset is empty.
    #[error("the dataset is empty; give at least one sample")]
    EmptyDataset,
    /// The global batch is zero.
    #[error("global batch must be at least 1, got 0")]
    ZeroBatch,
    /// The held-out fraction is not strictly between 0 and 1.
    #[error("--eval-fraction is {0}; give a number between 0 and 1, such as 0.1")]
    EvalFraction(f64),
    /// No sample would be held out, or none left to train on.
    #[error(
        "--eval-fraction {fraction} of {len} samples holds out {held} and leaves {left} to train on; both need at \
         least one sample: use a larger data set or another fraction"
    )]
    EvalSplitEmpty {
        /// The fraction.
        fraction: f64,
        /// Samples in the data.
        len: usize,
        /// Samples it would hold out.
        held: usize,
        /// Samples it would leave.
        left: usize,
    },

    // ----- the data-parallel step
    /// Ranks hold different model structures.
    #[error(
        "rank {rank} holds a different model than rank 0: {detail}; every rank must build the same \
         model (same layers, sizes and order) before wrapping it"
    )]
    ModelMismatch {
        /// The first rank that differs from rank 0.
        rank: usize,
        /// The first difference.
        detail: String,
    },
    /// Replicas diverged (checked with [`crate::DataParallel::verify_replicas`]).
    #[error("replicas diverged: parameter checksums by rank are {checksums:x?}")]
    ReplicasDiverged {
        /// Each rank's checksum.
        checksums: Vec<u64>,
    },
    /// A step ended with no sample on any rank.
    #[error("step {step} had no samples on any rank; every step needs at least one sample")]
    EmptyStep {
        /// The step.
        step: u64,
    },
    /// A sharded optimizer's layout does not fit the model or the world.
    #[error("the optimizer shards do not fit: {reason}; plan one shard per rank covering every parameter")]
    Shards {
        /// What does not fit.
        reason: String,
    },
    /// The device reported a failure during the step (a kernel that did not compile or run, a
    /// failed allocation): the step's results were never computed, so it is not applied.
    #[error("rank {rank}, step {step}: the device failed, so the step was not applied: {message}")]
    DeviceFailed {
        /// The rank.
        rank: usize,
        /// The step.
        step: u64,
        /// The backend's report (cubecl's error and the device log).
        message: String,
    },
    /// Gradients were reduced in one form and handed to an optimizer that takes another.
    #[error(
        "the step's gradients are held as {held:?} but the optimizer takes them as {wanted:?}; reduce them \
         with `ddp.reduce_for(&model, &optim)` for the optimizer that applies them"
    )]
    GradientForm {
        /// The form the optimizer takes.
        wanted: GradientForm,
        /// The form the gradients are in.
        held: GradientForm,
    },
    /// A gradient could not be read back from burn.
    #[error("reading the gradient of parameter {path}: {message}")]
    Tensor {
        /// The parameter.
        path: String,
        /// burn's message.
        message: String,
    },

    // ----- the balancer
    /// A single sample does not fit this rank's budget.
    #[error(
        "rank {rank}: one sample needs {peak} bytes at peak but the budget is {budget} bytes; give this \
         device more memory (--device-memory) or a smaller model"
    )]
    SampleOverBudget {
        /// The rank.
        rank: usize,
        /// Measured peak.
        peak: u64,
        /// Its budget.
        budget: u64,
    },
    /// The device failed a micro-batch for another reason than memory (a kernel that did not
    /// compile or run): nothing of the step was applied.
    #[error(
        "rank {rank} ({device}), step {step}: the device failed a micro-batch, so nothing of the step was \
         applied: {message}"
    )]
    MicroBatchFailed {
        /// The rank.
        rank: usize,
        /// The device, as it names itself.
        device: String,
        /// The step.
        step: u64,
        /// The backend's report (cubecl's error and the device log).
        message: String,
    },
    /// The device ran out of memory on a micro-batch of one sample.
    #[error(
        "rank {rank}: the device ran out of memory on a micro-batch of one sample ({message}); give this \
         rank a device with more free memory or a smaller model"
    )]
    DeviceOutOfMemory {
        /// The rank.
        rank: usize,
        /// What the backend said.
        message: String,
    },
    /// A memory budget was given but this process cannot measure its heap.
    #[error(
        "rank {rank}: a memory budget is set but this binary does not count its heap, so every probe would \
         read 0 bytes; install the counting allocator (`#[global_allocator] static ALLOC: \
         ballast::memory::CountingAlloc = ballast::memory::CountingAlloc;`) or drop the budget"
    )]
    NotCounting {
        /// The rank.
        rank: usize,
    },

    // ----- optimizer state off the device
    /// Host RAM cannot hold the offloaded state.
    #[error(
        "offloading needs {needed} bytes of host RAM but only {usable} are usable ({available} available \
         in {path} minus a {margin_pct:.0}% margin); free host memory, put fewer ranks on this host, or \
         give the device more memory"
    )]
    HostMemory {
        /// Bytes the offloaded state needs.
        needed: u64,
        /// Bytes usable after the margin.
        usable: u64,
        /// `MemAvailable`.
        available: u64,
        /// Margin kept free, percent.
        margin_pct: f64,
        /// The meminfo file read.
        path: String,
    },
    /// The CUDA driver is absent.
    #[error("CUDA offload needs the NVIDIA driver (libcuda.so), which is not installed here")]
    NoCuda,
    /// The device has too little free memory for the chunked update of offloaded state.
    #[error(
        "updating offloaded optimizer state on the GPU needs {needed} bytes of free device memory for \
         two chunks, but only {free} are free; free device memory (a smaller micro-batch) or offload \
         on a CPU rank"
    )]
    DeviceMemory {
        /// Bytes asked for.
        needed: u64,
        /// Free device bytes.
        free: u64,
    },
    /// A CUDA call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// Saved Adam state does not fit this optimizer.
    #[error("saved Adam state has {m} and {v} values but the model has {params} parameters")]
    StateMismatch {
        /// First moments saved.
        m: usize,
        /// Second moments saved.
        v: usize,
        /// Parameters of this optimizer.
        params: usize,
    },

    // ----- checkpoints
    /// A file could not be written or read.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a safetensors file, or a damaged one.
    #[error(
        "{} is not a readable safetensors file ({reason}); it is truncated or corrupt — resume from an \
         older checkpoint or start without --resume", path.display()
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A checkpoint could not be encoded (the Adam state does not fit the model).
    #[error("cannot write a checkpoint: {reason}")]
    Encode {
        /// What does not fit.
        reason: String,
    },
    /// A safetensors file without ballast's metadata.
    #[error("{} is a safetensors file but not a ballast checkpoint (no `format: {FORMAT}` in __metadata__)", path.display())]
    NotBallast {
        /// The file.
        path: PathBuf,
    },
    /// Contents do not match the stored checksum.
    #[error(
        "{}: checksum mismatch (stored {stored}, computed {computed}); the file was damaged after it was written",
        path.display()
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Stored value.
        stored: String,
        /// Computed value.
        computed: String,
    },
    /// The model has a parameter the checkpoint lacks.
    #[error(
        "{} has no tensor `{name}`, which the model needs; is this a checkpoint of another model or configuration?",
        path.display()
    )]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
    },
    /// A tensor of another shape.
    #[error("{}: tensor `{name}` has shape {found:?} but the model's is {expected:?}; the checkpoint is of another model configuration", path.display())]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// In the file.
        found: Vec<usize>,
        /// In the model.
        expected: Vec<usize>,
    },
    /// A tensor of another dtype.
    #[error("{}: tensor `{name}` is {found:?}, expected F32", path.display())]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// In the file.
        found: Dtype,
    },
    /// Parameters the model does not have.
    #[error("{} holds parameters this model lacks ({names}); it is another model's checkpoint", path.display())]
    ExtraTensors {
        /// The file.
        path: PathBuf,
        /// Some of them.
        names: String,
    },
    /// The run's settings differ in a way that would change the data.
    #[error("{}: {detail}", path.display())]
    Incompatible {
        /// The file.
        path: PathBuf,
        /// What differs and what to do.
        detail: String,
    },

    // ----- evaluation
    /// A held-out loss that is not a finite number.
    #[error("held-out sample {index}: the loss is {value}; the model diverged (lower --lr) or the sample is broken")]
    EvalNotFinite {
        /// Index in the held-out set.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The task returned another number of losses than samples.
    #[error("the task returned {got} losses for {expected} held-out samples; `Task::evaluate` returns one per sample")]
    EvalCount {
        /// Samples asked for.
        expected: usize,
        /// Losses returned.
        got: usize,
    },
    /// The held-out evaluation after a step failed.
    #[error("evaluating the held-out set after step {step}: {source}")]
    Evaluating {
        /// Steps trained before the evaluation.
        step: u64,
        /// What failed.
        source: Box<Error>,
    },

    // ----- the job runner
    /// `--load` names a file that holds no weights of this model.
    #[error("--load {}: not weights of this model: {source}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// Why it does not fit.
        source: Box<Error>,
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
    /// The training loss stopped being a number.
    #[error("step {step}: the loss is {loss} (diverged); lower --lr (now {lr})")]
    LossDiverged {
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
    /// A rank's device failed the start-up check ([`Error::Canary`]). Nothing was trained.
    #[error("rank {rank}: {source}; nothing was trained")]
    RankCanary {
        /// The rank.
        rank: usize,
        /// What the check found.
        source: Box<Error>,
    },
    /// Another rank's device failed the start-up check, so this rank stops too.
    #[error("rank {rank}'s device failed the start-up check; nothing was trained")]
    PeerCanary {
        /// The rank whose device failed.
        rank: usize,
    },
    /// A rank's thread panicked (ranks as threads): the rank is lost, as a rank process that
    /// crashed is, and the job ends with the lost-rank exit code.
    #[error("rank {rank}'s thread panicked: {message}")]
    RankPanicked {
        /// The rank.
        rank: usize,
        /// The panic's message.
        message: String,
    },
    /// Every rank ended without a summary or an error (a bug).
    #[error("no rank returned a summary")]
    NoRank,
}

impl Error {
    /// The collective error at the root of this one, through the variants that say where it
    /// happened.
    pub fn collective(&self) -> Option<&ballast_collectives::Error> {
        match self {
            Self::Collective(c) => Some(c),
            Self::Evaluating { source, .. } | Self::Load { source, .. } | Self::RankCanary { source, .. } => {
                source.collective()
            }
            _ => None,
        }
    }

    /// The exit code of a process that ends with this error:
    /// [`ballast_collectives::EXIT_LOST_RANK`] (75) when a rank or device was lost and a
    /// restart could pass (a rank's thread that panicked counts as lost, as a crashed rank
    /// process does), 2 otherwise (bad input, a bug: a restart fails the same way).
    pub fn exit_code(&self) -> u8 {
        if matches!(self, Self::RankPanicked { .. })
            || self
                .collective()
                .is_some_and(ballast_collectives::Error::may_pass_on_restart)
        {
            ballast_collectives::EXIT_LOST_RANK
        } else {
            2
        }
    }

    /// Whether this rank failed only because another one did first (a timeout waiting for it,
    /// a peer that went away): the job runner reports the other rank's error.
    pub fn is_consequence(&self) -> bool {
        matches!(self, Self::PeerCanary { .. })
            || self
                .collective()
                .is_some_and(ballast_collectives::Error::is_consequence)
    }
}
