//! The one error type of this crate.

use std::time::Duration;

/// Result alias used across `ballast-collectives`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a collective can fail with.
///
/// Every variant names the rank that observed the failure and the operation, so a
/// message read in one rank's log says where it happened.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Some ranks did not enter the collective before the deadline.
    #[error(
        "{op} #{seq} timed out after {timeout:?} on rank {rank}: rank(s) {missing:?} never arrived \
         (a rank died, stalled or skipped this call; if a step is legitimately this slow raise the \
         timeout with BALLAST_TIMEOUT_SECS)"
    )]
    Timeout {
        /// The operation, e.g. `all_reduce_sum_f32`.
        op: &'static str,
        /// Sequence number of the operation on this communicator.
        seq: u64,
        /// The rank reporting the timeout.
        rank: usize,
        /// The ranks that never arrived.
        missing: Vec<usize>,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// Ranks the collective waited for left the group instead: their thread panicked or
    /// returned (ranks as threads, where a departure is seen at once).
    #[error(
        "{op} #{seq} on rank {rank}: rank(s) {left:?} left the group without joining it ({how}); \
         the job cannot go on without them"
    )]
    RankLeft {
        /// The operation.
        op: &'static str,
        /// Sequence number of the operation.
        seq: u64,
        /// The rank reporting.
        rank: usize,
        /// The ranks that left.
        left: Vec<usize>,
        /// How the first of them ended: `its thread panicked` or `it returned`.
        how: &'static str,
    },
    /// Ranks passed buffers of different lengths to the same collective.
    #[error(
        "{op} #{seq}: buffer lengths differ across ranks (rank {rank} sees lengths {lengths:?}, \
         indexed by rank); every rank must pass the same number of elements"
    )]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// Sequence number of the operation.
        seq: u64,
        /// The rank reporting the mismatch.
        rank: usize,
        /// The length each rank passed, indexed by rank.
        lengths: Vec<u64>,
    },
    /// Ranks passed different shard counts to a sharded collective.
    #[error(
        "{op} #{seq} (seen on rank {rank}): rank {other_rank} passed other shard counts than this \
         rank; every rank must pass the same counts, one per rank"
    )]
    CountsMismatch {
        /// The operation.
        op: &'static str,
        /// Sequence number of the operation.
        seq: u64,
        /// The rank reporting the mismatch.
        rank: usize,
        /// A rank whose counts differ from this rank's.
        other_rank: usize,
    },
    /// Ranks called different collectives (or with a different root) at the same position.
    #[error(
        "call order differs across ranks at operation #{seq} (seen on rank {rank}): rank 0 called \
         {op} but rank {other_rank} called {other_op}; every rank must issue the same collectives \
         in the same order"
    )]
    OrderMismatch {
        /// Sequence number of the operation.
        seq: u64,
        /// The rank reporting the mismatch.
        rank: usize,
        /// What rank 0 called.
        op: String,
        /// A rank that called something else.
        other_rank: usize,
        /// What that rank called.
        other_op: String,
    },
    /// An earlier collective failed on this communicator; it cannot be used any more.
    #[error("communicator on rank {rank} is unusable after an earlier failure: {reason}")]
    Poisoned {
        /// The rank reporting.
        rank: usize,
        /// The first failure.
        reason: String,
    },
    /// The backend does not implement this operation.
    #[error("backend {backend} does not support {op}")]
    Unsupported {
        /// The backend name.
        backend: &'static str,
        /// The operation.
        op: &'static str,
    },
    /// A shared library the backend needs is not installed.
    #[error("{lib} could not be loaded: {fix}")]
    LibraryMissing {
        /// The library, e.g. `libnccl.so`.
        lib: &'static str,
        /// How to fix it.
        fix: &'static str,
    },
    /// An argument is out of range.
    #[error("invalid argument to {op} on rank {rank}: {reason}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// The rank reporting.
        rank: usize,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// MPI returned an error code.
    #[error("MPI {call} failed on rank {rank} with code {code}: {message}")]
    Mpi {
        /// The MPI call.
        call: &'static str,
        /// The rank reporting.
        rank: usize,
        /// The MPI error code.
        code: i32,
        /// MPI's error string.
        message: String,
    },
    /// NCCL or the CUDA driver returned an error.
    #[error("{call} failed on rank {rank}: {message}")]
    Gpu {
        /// The NCCL or CUDA call.
        call: &'static str,
        /// The rank reporting.
        rank: usize,
        /// What the library said.
        message: String,
    },
    /// A buffer on a device could not be read or written by its tensor library.
    #[error("{op} failed on rank {rank}: {message}")]
    Device {
        /// What was attempted.
        op: &'static str,
        /// The rank reporting.
        rank: usize,
        /// The tensor library's message.
        message: String,
    },
    /// A conformance check found a wrong result or an unexpected outcome (feature
    /// `conformance`).
    #[error("conformance check {check} on rank {rank}: {detail}")]
    Conformance {
        /// The check.
        check: &'static str,
        /// The rank reporting.
        rank: usize,
        /// What was wrong.
        detail: String,
    },
    /// The directory of the host's heartbeat files is not private to this user, so writing
    /// process ids into it could be steered by someone else.
    #[error(
        "the heartbeat directory {} is refused on rank {rank}: {reason}. Remove it if nobody \
         of yours uses it (another user may have created it), or set BALLAST_HEARTBEAT_DIR to a \
         directory of your own with mode 0700",
        path.display()
    )]
    HeartbeatDir {
        /// The rank reporting.
        rank: usize,
        /// The directory.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A value could not be encoded or decoded for the wire.
    #[error("could not (de)serialise a value for {op} on rank {rank}: {message}")]
    Codec {
        /// The operation.
        op: &'static str,
        /// The rank reporting.
        rank: usize,
        /// The codec's message.
        message: String,
    },
}

impl Error {
    /// Whether this error is what a rank sees when *another* rank failed: a timeout waiting for
    /// it, its departure, or a communicator poisoned by an earlier failure. A job that gathers every rank's
    /// error reports a cause before these.
    pub fn is_consequence(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. } | Error::RankLeft { .. } | Error::Poisoned { .. }
        )
    }

    /// Whether a run started again could pass where this one failed: a rank or device was lost
    /// or stopped answering, or the transport failed. Mismatched calls (a bug), a missing
    /// library or a refused heartbeat directory fail again the same way.
    pub fn may_pass_on_restart(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. }
                | Error::RankLeft { .. }
                | Error::Poisoned { .. }
                | Error::Mpi { .. }
                | Error::Gpu { .. }
                | Error::Device { .. }
        )
    }
}

/// The exit code of a process that ends because a rank was lost or a collective failed in a way
/// a restart could pass (`EX_TEMPFAIL`): the watchdog's code, and the code of a job whose error
/// [`Error::may_pass_on_restart`]. `ballast launch` restarts on it; it never restarts on 2 (bad
/// input).
pub const EXIT_LOST_RANK: u8 = 75;
