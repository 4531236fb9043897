//! The [`Communicator`] trait and what every backend shares.
//!
//! # Contract
//!
//! These rules hold for every backend; each backend's docs add its own.
//!
//! 1. **Same calls, same order.** Every rank of a communicator issues the same collectives in
//!    the same order, with the same root and (except for [`Communicator::all_gather_bytes`] and
//!    [`Communicator::broadcast_bytes`]) the same number of elements. Backends check this: each
//!    collective starts with a small *arrival handshake* that carries the operation, its sequence
//!    number, the root and the length. A mismatch becomes [`Error::ShapeMismatch`] or
//!    [`Error::OrderMismatch`] on **every** rank, never a hang or a silently wrong sum.
//! 2. **Timeouts.** Every blocking call waits at most [`CommOptions::timeout`] for the other ranks
//!    to arrive. Ranks that did not arrive are named in [`Error::Timeout`]. After any error the
//!    communicator is poisoned: later calls return [`Error::Poisoned`] at once.
//! 3. **Threads.** A communicator is `Send` but not `Sync`: one thread drives it (`&mut self`).
//!    The MPI backend asks for `MPI_THREAD_SERIALIZED` and refuses to start with less.
//! 4. **Results are identical on every rank.** A sum is reduced in one order and the same bits are
//!    delivered everywhere, so replicas that apply the same update stay bit-identical.

use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};

use crate::{Error, Result};

/// Default time a collective waits for the other ranks.
///
/// Thirty seconds: long enough for a rank to finish a slow micro-batch, short enough that an
/// operator learns about a dead or stalled rank within half a minute. Raise it with
/// [`crate::env::TIMEOUT_SECS`] for steps that take longer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Options shared by all backends.
#[derive(Debug, Clone, PartialEq)]
pub struct CommOptions {
    /// How long a blocking collective waits for every rank to arrive (default [`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
}

impl Default for CommOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl CommOptions {
    /// Options from the environment: [`crate::env::TIMEOUT_SECS`] overrides the timeout.
    ///
    /// # Errors
    /// A value that is not a positive number of seconds.
    pub fn from_env() -> Result<Self> {
        let mut options = Self::default();
        if let Ok(raw) = std::env::var(crate::env::TIMEOUT_SECS) {
            let secs: f64 = raw.trim().parse().map_err(|_| Error::InvalidArgument {
                op: "options",
                rank: 0,
                reason: format!(
                    "{}={raw:?} is not a number of seconds (e.g. {}=60)",
                    crate::env::TIMEOUT_SECS,
                    crate::env::TIMEOUT_SECS
                ),
            })?;
            if !(secs > 0.0 && secs.is_finite()) {
                return Err(Error::InvalidArgument {
                    op: "options",
                    rank: 0,
                    reason: format!("{} must be positive, got {raw}", crate::env::TIMEOUT_SECS),
                });
            }
            options.timeout = Duration::from_secs_f64(secs);
        }
        Ok(options)
    }

    /// Sets the timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// A process group: a fixed set of ranks that run collectives together.
///
/// See the [module docs](self) for the contract every implementation keeps.
pub trait Communicator: Send {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Short backend name: `local`, `mpi` or `nccl`.
    fn backend(&self) -> &'static str;
    /// The timeout each blocking call honours.
    fn timeout(&self) -> Duration;
    /// Sets the timeout of the calls that follow, for a call known to wait longer (a barrier
    /// behind a large checkpoint write). Every rank sets the same at the same point: a rank with
    /// a shorter deadline reports the others missing first.
    fn set_timeout(&mut self, timeout: Duration);
    /// Collectives this rank has entered so far (the sequence number of its next handshake):
    /// the difference over a step counts the collectives the step really ran.
    fn collectives_started(&self) -> u64;

    /// Returns once every rank has called `barrier`.
    ///
    /// # Errors
    /// [`Error::Timeout`] naming the ranks that did not arrive; order errors.
    fn barrier(&mut self) -> Result<()>;

    /// Copies `root`'s buffer into every other rank's buffer; lengths must match.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`], [`Error::Timeout`], backend errors.
    fn broadcast_f32(&mut self, root: usize, buf: &mut [f32]) -> Result<()>;

    /// Replaces every rank's `buf` with `root`'s; lengths may differ (non-roots are resized).
    ///
    /// # Errors
    /// [`Error::Timeout`], backend errors.
    fn broadcast_bytes(&mut self, root: usize, buf: &mut Vec<u8>) -> Result<()>;

    /// Element-wise sum over ranks, in place.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`], [`Error::Timeout`], backend errors.
    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<()>;

    /// Element-wise sum over ranks, in place (for counters and checksums).
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_sum_f32`].
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()>;

    /// Element-wise sum over ranks, in place (for sample counts).
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_sum_f32`].
    fn all_reduce_sum_u64(&mut self, buf: &mut [u64]) -> Result<()>;

    /// Every rank's bytes, indexed by rank; lengths may differ.
    ///
    /// # Errors
    /// [`Error::Timeout`], backend errors.
    fn all_gather_bytes(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Sums `buf` over ranks and keeps this rank's shard of the sum: `buf` is cut into one
    /// contiguous shard per rank, `counts[r]` elements for rank `r` in rank order, and `shard`
    /// (`counts[rank]` elements) receives this rank's. Every rank passes the same `counts`,
    /// summing to `buf.len()`; a count may be 0. The sum is reduced in one order everywhere, as
    /// for [`Communicator::all_reduce_sum_f32`], and the bytes each rank sends are those of one
    /// reduce-scatter, half of an all-reduce's.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for counts that do not fit the buffers, [`Error::CountsMismatch`]
    /// when ranks pass different counts, and those of [`Communicator::all_reduce_sum_f32`].
    fn reduce_scatter_sum_f32(&mut self, buf: &[f32], counts: &[usize], shard: &mut [f32]) -> Result<()>;

    /// Gathers every rank's shard into `out` in rank order: rank `r` passes `counts[r]` elements
    /// and `out` has their total. Every rank passes the same `counts`; a count may be 0.
    ///
    /// # Errors
    /// As [`Communicator::reduce_scatter_sum_f32`].
    fn all_gather_f32(&mut self, shard: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()>;

    /// [`Communicator::reduce_scatter_sum_f32`] over buffers that may live on an accelerator:
    /// `buf` (the full buffer) is summed over ranks and `shard` (`counts[rank]` elements)
    /// receives this rank's part of the sum. Backends that reduce host memory read `buf` once and
    /// write `shard` once (this default); NCCL reduces CUDA memory where it is.
    ///
    /// # Errors
    /// As [`Communicator::reduce_scatter_sum_f32`]; [`Error::Device`] when a buffer cannot be
    /// read or written.
    fn reduce_scatter_sum_device(
        &mut self,
        buf: &mut dyn DeviceBuffer,
        counts: &[usize],
        shard: &mut dyn DeviceBuffer,
    ) -> Result<()> {
        let rank = self.rank();
        let host = buf.read().map_err(device_error("reading a device buffer", rank))?;
        let mut mine = vec![0.0; shard.len()];
        self.reduce_scatter_sum_f32(&host, counts, &mut mine)?;
        shard.write(mine).map_err(device_error("writing a device buffer", rank))
    }

    /// [`Communicator::all_gather_f32`] over buffers that may live on an accelerator: `out`
    /// receives every rank's `shard` in rank order. Backends that move host memory read `shard`
    /// once and write `out` once (this default); NCCL gathers in CUDA memory.
    ///
    /// # Errors
    /// As [`Communicator::all_gather_f32`]; [`Error::Device`] when a buffer cannot be read or
    /// written.
    fn all_gather_device(
        &mut self,
        shard: &mut dyn DeviceBuffer,
        counts: &[usize],
        out: &mut dyn DeviceBuffer,
    ) -> Result<()> {
        let rank = self.rank();
        let mine = shard.read().map_err(device_error("reading a device buffer", rank))?;
        let mut all = vec![0.0; out.len()];
        self.all_gather_f32(&mine, counts, &mut all)?;
        out.write(all).map_err(device_error("writing a device buffer", rank))
    }

    /// Element-wise sum over ranks of a buffer that may live on an accelerator, in place; the
    /// same contract as [`Communicator::all_reduce_sum_f32`] (one collective, lengths must
    /// match). Backends that reduce host memory read the buffer once, sum it and write the sum
    /// back once: that default is what every backend of this crate runs today.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_sum_f32`]; [`Error::Device`] when the buffer cannot be read
    /// or written.
    fn all_reduce_sum_device(&mut self, buf: &mut dyn DeviceBuffer) -> Result<()> {
        let rank = self.rank();
        let mut host = buf.read().map_err(device_error("reading a device buffer", rank))?;
        self.all_reduce_sum_f32(&mut host)?;
        buf.write(host).map_err(device_error("writing a device buffer", rank))
    }

    /// Element-wise sum over ranks of `buckets` taken together, as one collective: a step's
    /// gradient buckets, which then need one agreement between the ranks, not one per bucket. The
    /// buckets are summed as their concatenation, in order, so only the total length must match
    /// across ranks (how each rank cuts it into buckets is its own affair). By default one bucket
    /// is reduced by [`Communicator::all_reduce_sum_device`] directly and several by
    /// [`reduce_buckets_through_host`]; a backend that reduces device memory in place (NCCL)
    /// overrides this with [`DeviceBuffer::cuda_region`].
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_sum_device`].
    fn all_reduce_sum_buckets(&mut self, buckets: &mut [&mut dyn DeviceBuffer]) -> Result<()> {
        if let [one] = buckets {
            return self.all_reduce_sum_device(&mut **one);
        }
        reduce_buckets_through_host(self, buckets)
    }
}

/// Turns a device buffer's message into [`Error::Device`] for `op` on `rank`.
pub(crate) fn device_error(op: &'static str, rank: usize) -> impl Fn(BufferError) -> Error {
    move |e| Error::Device {
        op,
        rank,
        message: e.to_string(),
    }
}

/// Reduces `buckets` as one host buffer: each is read once, the concatenation is summed by
/// [`Communicator::all_reduce_sum_f32`] (one collective), and each is written back once. What
/// [`Communicator::all_reduce_sum_buckets`] does on a host backend.
///
/// # Errors
/// As [`Communicator::all_reduce_sum_device`].
pub fn reduce_buckets_through_host<C: Communicator + ?Sized>(
    comm: &mut C,
    buckets: &mut [&mut dyn DeviceBuffer],
) -> Result<()> {
    let rank = comm.rank();
    let mut host = read_buckets(rank, buckets)?;
    comm.all_reduce_sum_f32(&mut host)?;
    write_buckets(rank, buckets, &host)
}

/// The concatenation of `buckets`, each read once.
pub(crate) fn read_buckets(rank: usize, buckets: &mut [&mut dyn DeviceBuffer]) -> Result<Vec<f32>> {
    let mut host = Vec::with_capacity(buckets.iter().map(|b| b.len()).sum());
    for bucket in buckets.iter_mut() {
        host.extend(bucket.read().map_err(device_error("reading a device buffer", rank))?);
    }
    Ok(host)
}

/// Writes `values`, the concatenation of `buckets`, back into them, each once.
pub(crate) fn write_buckets(rank: usize, buckets: &mut [&mut dyn DeviceBuffer], values: &[f32]) -> Result<()> {
    let mut rest = values;
    for bucket in buckets.iter_mut() {
        let (mine, after) = rest.split_at(bucket.len().min(rest.len()));
        rest = after;
        bucket
            .write(mine.to_vec())
            .map_err(device_error("writing a device buffer", rank))?;
    }
    Ok(())
}

/// A device buffer's place in CUDA memory, as [`DeviceBuffer::cuda_region`] hands it out: `len`
/// `f32` at an address in the primary context of GPU `ordinal`, whose contents are complete
/// (every write the tensor library queued has finished). The address stays valid, and no one
/// else touches the memory, until the region is dropped: it holds whatever guarantees that (the
/// tensor library's allocation guard and the tensor itself).
///
/// A communicator writes through the address (NCCL reduces in place), so a region can only be
/// made by [`CudaRegion::new`], whose caller vouches for it.
pub struct CudaRegion {
    ptr: u64,
    len: usize,
    ordinal: usize,
    /// Held for its drop: the memory stays valid until then.
    _keep: Box<dyn std::any::Any>,
}

impl CudaRegion {
    /// A region of `len` `f32` at device address `ptr` on GPU `ordinal`, kept valid by `keep`.
    ///
    /// # Safety
    /// `ptr` must address `len` `f32` (`4 * len` bytes) of device memory in the primary context
    /// of GPU `ordinal`, whose contents are complete (no queued write pending on any stream), and
    /// that memory must stay allocated, in place, and untouched by anyone but the holder of the
    /// region (who may read and write it on any stream of that context) until `keep` is dropped
    /// with the region. A `len` of 0 needs no memory.
    pub unsafe fn new(ptr: u64, len: usize, ordinal: usize, keep: Box<dyn std::any::Any>) -> Self {
        Self {
            ptr,
            len,
            ordinal,
            _keep: keep,
        }
    }

    /// Device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Number of `f32` elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The CUDA device ordinal the memory belongs to.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
}

impl std::fmt::Debug for CudaRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRegion")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("ordinal", &self.ordinal)
            .finish_non_exhaustive()
    }
}

/// What a [`DeviceBuffer`] reports when its tensor library cannot read, write or hand out the
/// buffer: the library's own error, boxed (a message becomes one with `.into()`).
pub type BufferError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A flat `f32` buffer owned by a tensor library, possibly in accelerator memory: what
/// [`Communicator::all_reduce_sum_device`] reduces. The collectives never hold on to it.
pub trait DeviceBuffer {
    /// Number of elements.
    fn len(&self) -> usize;

    /// Whether the buffer has no element.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the buffer to host memory (one device→host transfer).
    ///
    /// # Errors
    /// The tensor library's message.
    fn read(&mut self) -> std::result::Result<Vec<f32>, BufferError>;

    /// Replaces the buffer's contents with `values` (one host→device transfer); `values` has
    /// [`DeviceBuffer::len`] elements.
    ///
    /// # Errors
    /// The tensor library's message.
    fn write(&mut self, values: Vec<f32>) -> std::result::Result<(), BufferError>;

    /// The buffer in CUDA memory, for a communicator that works on it in place there (NCCL):
    /// `None` (the default) when it is not in CUDA memory, and the communicator falls back to
    /// [`DeviceBuffer::read`] and [`DeviceBuffer::write`]. After a `Some`, the collective's
    /// result (a sum, a shard of one, a gathered buffer) is written into the region and the
    /// buffer is neither read nor written through the other methods in the same collective.
    ///
    /// # Errors
    /// The tensor library's message.
    fn cuda_region(&mut self) -> std::result::Result<Option<CudaRegion>, BufferError> {
        Ok(None)
    }
}

/// A host vector is a device buffer whose reads and writes are copies.
impl DeviceBuffer for Vec<f32> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn read(&mut self) -> std::result::Result<Vec<f32>, BufferError> {
        Ok(self.clone())
    }

    fn write(&mut self, values: Vec<f32>) -> std::result::Result<(), BufferError> {
        *self = values;
        Ok(())
    }
}

/// Typed helpers over the byte-level operations.
pub trait CommunicatorExt: Communicator {
    /// Every rank's `value`, indexed by rank (small control-plane values: reports, plans).
    ///
    /// # Errors
    /// Those of [`Communicator::all_gather_bytes`], and [`Error::Codec`].
    fn all_gather<T: Serialize + DeserializeOwned>(&mut self, value: &T) -> Result<Vec<T>> {
        let rank = self.rank();
        let bytes = serde_json::to_vec(value).map_err(|e| codec("all_gather", rank, &e))?;
        self.all_gather_bytes(&bytes)?
            .iter()
            .map(|b| serde_json::from_slice(b).map_err(|e| codec("all_gather", rank, &e)))
            .collect()
    }

    /// `root`'s `value` on every rank.
    ///
    /// # Errors
    /// Those of [`Communicator::broadcast_bytes`], and [`Error::Codec`].
    fn broadcast_value<T: Serialize + DeserializeOwned>(&mut self, root: usize, value: &T) -> Result<T> {
        let rank = self.rank();
        let mut bytes = if rank == root {
            serde_json::to_vec(value).map_err(|e| codec("broadcast_value", rank, &e))?
        } else {
            Vec::new()
        };
        self.broadcast_bytes(root, &mut bytes)?;
        serde_json::from_slice(&bytes).map_err(|e| codec("broadcast_value", rank, &e))
    }
}

impl<C: Communicator + ?Sized> CommunicatorExt for C {}

fn codec(op: &'static str, rank: usize, e: &serde_json::Error) -> Error {
    Error::Codec {
        op,
        rank,
        message: e.to_string(),
    }
}

/// The collectives, as carried in the arrival handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub(crate) enum OpKind {
    Barrier = 1,
    BroadcastF32 = 2,
    BroadcastBytes = 3,
    AllReduceF32 = 4,
    AllReduceF64 = 5,
    AllReduceU64 = 6,
    AllGatherBytes = 7,
    ReduceScatterF32 = 8,
    AllGatherF32 = 9,
}

impl OpKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpKind::Barrier => "barrier",
            OpKind::BroadcastF32 => "broadcast_f32",
            OpKind::BroadcastBytes => "broadcast_bytes",
            OpKind::AllReduceF32 => "all_reduce_sum_f32",
            OpKind::AllReduceF64 => "all_reduce_sum_f64",
            OpKind::AllReduceU64 => "all_reduce_sum_u64",
            OpKind::AllGatherBytes => "all_gather_bytes",
            OpKind::ReduceScatterF32 => "reduce_scatter_sum_f32",
            OpKind::AllGatherF32 => "all_gather_f32",
        }
    }

    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            1 => OpKind::Barrier,
            2 => OpKind::BroadcastF32,
            3 => OpKind::BroadcastBytes,
            4 => OpKind::AllReduceF32,
            5 => OpKind::AllReduceF64,
            6 => OpKind::AllReduceU64,
            7 => OpKind::AllGatherBytes,
            8 => OpKind::ReduceScatterF32,
            9 => OpKind::AllGatherF32,
            _ => return None,
        })
    }

    /// Whether every rank must pass the same length.
    pub(crate) fn lengths_must_match(self) -> bool {
        !matches!(self, OpKind::BroadcastBytes | OpKind::AllGatherBytes)
    }
}

/// What one rank announces when it enters a collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub seq: u64,
    pub op: OpKind,
    pub root: u64,
    /// What else every rank must agree on: the [`counts_key`] of a sharded collective, else 0.
    pub key: u64,
    pub len: u64,
}

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
impl Header {
    /// Words on the wire; the length comes last (some operations let it differ).
    pub(crate) const WORDS: usize = 5;

    pub(crate) fn encode(&self) -> [u64; Self::WORDS] {
        [self.seq, self.op as u64, self.root, self.key, self.len]
    }

    pub(crate) fn decode(words: &[u64; Self::WORDS]) -> Option<Self> {
        Some(Self {
            seq: words[0],
            op: OpKind::from_code(words[1])?,
            root: words[2],
            key: words[3],
            len: words[4],
        })
    }

    fn describe(&self) -> String {
        if matches!(self.op, OpKind::BroadcastF32 | OpKind::BroadcastBytes) {
            format!("{}(root {}) #{}", self.op.name(), self.root, self.seq)
        } else {
            format!("{} #{}", self.op.name(), self.seq)
        }
    }
}

/// Checks the headers every rank announced (indexed by rank) against this rank's.
///
/// Every rank runs this on the same headers, so every rank reaches the same verdict.
pub(crate) fn verify_headers(rank: usize, mine: &Header, all: &[Header]) -> Result<()> {
    let first = &all[0];
    if let Some((other_rank, other)) = all
        .iter()
        .enumerate()
        .find(|(_, h)| h.seq != first.seq || h.op != first.op || h.root != first.root)
    {
        return Err(Error::OrderMismatch {
            seq: mine.seq,
            rank,
            op: first.describe(),
            other_rank,
            other_op: other.describe(),
        });
    }
    if let Some(other_rank) = all.iter().position(|h| h.key != mine.key) {
        return Err(Error::CountsMismatch {
            op: mine.op.name(),
            seq: mine.seq,
            rank,
            other_rank,
        });
    }
    if mine.op.lengths_must_match() && all.iter().any(|h| h.len != mine.len) {
        return Err(Error::ShapeMismatch {
            op: mine.op.name(),
            seq: mine.seq,
            rank,
            lengths: all.iter().map(|h| h.len).collect(),
        });
    }
    Ok(())
}

/// The handshake key of a shard layout: every rank must pass the same counts (FNV-1a of the
/// counts and their number).
pub(crate) fn counts_key(counts: &[usize]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for word in std::iter::once(counts.len()).chain(counts.iter().copied()) {
        for byte in (word as u64).to_le_bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// Checks a shard layout on this rank: one count per rank, counts summing to `total` (the full
/// buffer) and this rank's count equal to `part` (its shard). Returns this rank's offset.
pub(crate) fn shard_offset(
    op: OpKind,
    rank: usize,
    world: usize,
    counts: &[usize],
    total: usize,
    part: usize,
) -> Result<usize> {
    let invalid = |reason: String| Error::InvalidArgument {
        op: op.name(),
        rank,
        reason,
    };
    if counts.len() != world {
        return Err(invalid(format!(
            "{} counts for a world of {world}: pass one count per rank",
            counts.len()
        )));
    }
    let sum: usize = counts.iter().sum();
    if sum != total {
        return Err(invalid(format!(
            "the counts sum to {sum} but the full buffer has {total} elements"
        )));
    }
    if counts[rank] != part {
        return Err(invalid(format!(
            "this rank's count is {} but its shard has {part} elements",
            counts[rank]
        )));
    }
    Ok(counts[..rank].iter().sum())
}

/// Element types that can be summed by a collective.
pub trait Element: Copy + Default + Send + Sync + std::ops::AddAssign + std::fmt::Debug + 'static {
    /// Name used in messages.
    const NAME: &'static str;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
}
impl Element for f64 {
    const NAME: &'static str = "f64";
}
impl Element for u64 {
    const NAME: &'static str = "u64";
}

/// Sums an element type through the matching [`Communicator`] method.
pub trait AllReduceSum: Element {
    /// Calls the `all_reduce_sum_*` method for `Self`.
    ///
    /// # Errors
    /// Those of the method called.
    fn all_reduce_sum(comm: &mut dyn Communicator, buf: &mut [Self]) -> Result<()>;
}

impl AllReduceSum for f32 {
    fn all_reduce_sum(comm: &mut dyn Communicator, buf: &mut [Self]) -> Result<()> {
        comm.all_reduce_sum_f32(buf)
    }
}
impl AllReduceSum for f64 {
    fn all_reduce_sum(comm: &mut dyn Communicator, buf: &mut [Self]) -> Result<()> {
        comm.all_reduce_sum_f64(buf)
    }
}
impl AllReduceSum for u64 {
    fn all_reduce_sum(comm: &mut dyn Communicator, buf: &mut [Self]) -> Result<()> {
        comm.all_reduce_sum_u64(buf)
    }
}
