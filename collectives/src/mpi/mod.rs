//! Ranks as processes, over MPI (Open MPI or MPICH), for CPU ranks and the control plane.
//!
//! # How a collective runs
//!
//! 1. **Arrival handshake** on a private duplicate of `MPI_COMM_WORLD`: the ranks agree on the
//!    collective's [header](crate::communicator) (sequence number, operation, root, length) in
//!    ⌈log2 n⌉ rounds of nonblocking point-to-point messages, polled with `MPI_Test` against the
//!    timeout ([`Handshake`]; the private `handshake` module has the algorithm). Headers that disagree become
//!    [`Error::ShapeMismatch`] / [`Error::OrderMismatch`] on every rank, and a timeout names the
//!    ranks that never arrived; both are found in a second round only when something is wrong.
//! 2. **Data phase** on a second duplicate: the MPI collective (`MPI_Iallreduce` with
//!    `MPI_IN_PLACE`, `MPI_Ibcast`, `MPI_Iallgather` + `MPI_Iallgatherv`), so the data moves
//!    with the library's algorithms, completed by polling `MPI_Test` and yielding the core
//!    between polls. Ranks that share a core (pinned CPU ranks) hand it to each other at once; in
//!    the blocking call a waiting rank spun until the scheduler preempted it, which cost
//!    milliseconds per all-reduce with two ranks on one core. Every rank is known to be inside
//!    the call. If a peer stalls *during* the data phase (it was stopped after announcing
//!    itself), a watchdog thread prints which operation stalled and ends the process with exit
//!    code [`EXIT_STALLED`]; the launcher then tears the job down. Returning an error instead is
//!    impossible there: MPI may still write into the caller's buffer. For the same reason an
//!    `MPI_Test` that fails during a data phase ends the process with a message.
//!
//! # A rank that dies
//!
//! Open MPI stops the other ranks with SIGTERM when one exits abnormally. Where SIGTERM still has
//! its default action, [`MpiCommunicator::init`] installs a handler that prints which ranks of
//! this host had exited first (from the heartbeat files, which hold process ids) and ends the
//! process with exit code 143, as the default action would.
//!
//! # Thread level
//!
//! `MPI_THREAD_SERIALIZED`: the communicator is `Send`, so the thread that calls MPI may not be
//! the one that initialised it, but one thread at a time calls it (`&mut self`). MPI is asked for
//! that level and [`MpiCommunicator::init`] refuses to start when the library provides less. The
//! watchdog never calls MPI.
//!
//! # Standard sections
//! MPI 4.0 §3.7 (nonblocking point-to-point), §3.8.4 (cancel), §6.12 (nonblocking collectives:
//! `MPI_Ibcast`, `MPI_Iallgatherv`, `MPI_Iallreduce`), §6.9.6 (`MPI_IN_PLACE`).

mod handshake;
mod heartbeat;
mod watchdog;

use std::{
    ffi::{c_int, c_void},
    mem::MaybeUninit,
    time::{Duration, Instant},
};

use mpi::{ffi, raw::AsRaw, Threading};

pub use self::handshake::Handshake;
use self::watchdog::Watchdog;
use crate::{
    communicator::{counts_key, shard_offset, OpKind},
    CommOptions, Communicator, Error, Result,
};

/// Exit code of a process ended by the data-phase watchdog ([`crate::EXIT_LOST_RANK`]).
pub const EXIT_STALLED: i32 = crate::EXIT_LOST_RANK as i32;

extern "C" {
    fn ballast_mpi_in_place() -> *mut c_void;
}

/// One rank of `MPI_COMM_WORLD`. Create it once per process with [`MpiCommunicator::init`].
pub struct MpiCommunicator {
    rank: usize,
    size: usize,
    seq: u64,
    options: CommOptions,
    poisoned: Option<String>,
    control: ffi::MPI_Comm,
    data: ffi::MPI_Comm,
    watchdog: Watchdog,
    handshake_kind: Handshake,
    /// Handshake messages sent and received so far.
    messages: u64,
    /// Finalises MPI when dropped, after the duplicated communicators are freed.
    universe: std::mem::ManuallyDrop<mpi::environment::Universe>,
}

// SAFETY: the raw communicator handles are plain values that MPI lets any thread use under
// MPI_THREAD_SERIALIZED as long as one thread at a time does: `init` refuses to return a
// communicator unless MPI provides that level (or MULTIPLE), and `&mut self` on every call
// ensures one caller at a time. The struct is not `Sync`.
unsafe impl Send for MpiCommunicator {}

impl MpiCommunicator {
    /// Initialises MPI (`MPI_THREAD_SERIALIZED`) and returns this process's rank of the world.
    /// Starts the watchdog thread, which writes this rank's heartbeat file, and, where SIGTERM
    /// has its default action, a handler that names the ranks that died (see the module docs).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when MPI was already initialised in this process;
    /// [`Error::Mpi`] when duplicating the world communicator fails. A rank that does not join
    /// the duplication within `options.timeout` ends the process as a stalled collective does.
    pub fn init(options: CommOptions) -> Result<Self> {
        let (universe, level) =
            mpi::initialize_with_threading(Threading::Serialized).ok_or_else(|| Error::InvalidArgument {
                op: "mpi init",
                rank: 0,
                reason: "MPI is already initialised in this process; create one MpiCommunicator per process".into(),
            })?;
        if !matches!(level, Threading::Serialized | Threading::Multiple) {
            return Err(Error::InvalidArgument {
                op: "mpi init",
                rank: 0,
                reason: format!(
                    "this MPI library provides thread level {level:?}, and ballast needs MPI_THREAD_SERIALIZED \
                     (a communicator may be driven from another thread than the one that started MPI); use an \
                     MPI built with thread support (Open MPI and MPICH provide it by default)"
                ),
            });
        }
        let world = universe.world();
        let world_raw = world.as_raw();
        let mut rank: c_int = 0;
        let mut size: c_int = 0;
        // SAFETY: MPI is initialised; the out-pointers are valid.
        unsafe {
            ffi::MPI_Comm_rank(world_raw, &mut rank);
            ffi::MPI_Comm_size(world_raw, &mut size);
        }
        let rank = rank as usize;
        // MPI_Comm_dup is collective over the world: a rank that never starts would hold it
        // forever, so the watchdog bounds it like any data-phase call.
        let watchdog = Watchdog::spawn(rank, size as usize)?;
        watchdog.arm("MPI_Comm_dup", 0, options.timeout);
        let dups = dup(world_raw, rank).and_then(|control| Ok((control, dup(world_raw, rank)?)));
        watchdog.disarm();
        let (control, data) = match dups {
            Ok(dups) => dups,
            Err(e) => {
                watchdog.stop(rank);
                return Err(e);
            }
        };
        let mut comm = Self {
            rank,
            size: size as usize,
            seq: 0,
            options,
            poisoned: None,
            control,
            data,
            watchdog,
            handshake_kind: Handshake::default(),
            messages: 0,
            universe: std::mem::ManuallyDrop::new(universe),
        };
        // Every rank's host, so that a rank whose host-mates are all alive can name the host
        // where the lost one ran (one control-plane collective, with its deadline).
        let hosts = comm.all_gather_bytes(watchdog::hostname().as_bytes())?;
        comm.watchdog
            .know_hosts(hosts.iter().map(|h| String::from_utf8_lossy(h).into_owned()).collect());
        Ok(comm)
    }

    /// The MPI library's own version string (`MPI_Get_library_version`).
    pub fn library_version() -> String {
        mpi::environment::library_version().unwrap_or_else(|_| "unknown".into())
    }

    /// Chooses how the ranks agree before each collective. Every rank must choose the same,
    /// at the same point of the program (after a barrier, say); `ballast bench handshake`
    /// compares the two.
    pub fn set_handshake(&mut self, handshake: Handshake) {
        self.handshake_kind = handshake;
    }

    /// Point-to-point messages this rank has sent and received in handshakes so far: the cost
    /// `ballast bench handshake` reports per collective.
    pub fn handshake_messages(&self) -> u64 {
        self.messages
    }

    /// Runs a nonblocking data-phase call to completion under the watchdog, polling with
    /// `MPI_Test` and yielding the core between polls: a rank that shares its core with a peer
    /// hands it over at once instead of spinning inside the library until the scheduler
    /// preempts it.
    fn guarded(
        &mut self,
        op: OpKind,
        seq: u64,
        call: &'static str,
        start: impl FnOnce(ffi::MPI_Comm, *mut ffi::MPI_Request) -> c_int,
    ) -> Result<()> {
        // SAFETY: reading a constant the MPI library exports.
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // The buffers `start` hands MPI stay valid until this returns; it returns only once the
        // request completed, or when `start` failed (no request exists). Every other way out
        // ends the process.
        self.watchdog.arm(op.name(), seq, self.options.timeout);
        let rc = start(self.data, &mut req);
        if rc != 0 {
            self.watchdog.disarm();
            return self.check(rc, call);
        }
        let started = Instant::now();
        loop {
            let mut flag: c_int = 0;
            // SAFETY: `req` is the active request started above.
            let rc = unsafe { ffi::MPI_Test(&mut req, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
            if rc != 0 {
                let err = mpi_error("MPI_Test", self.rank, rc);
                eprintln!(
                    "ballast: fatal: {call} #{seq} on rank {}: {err}. MPI may still write into the \
                     buffer, so this process ends (exit {EXIT_STALLED})",
                    self.rank
                );
                // SAFETY: _exit ends the process without running destructors that could block in
                // MPI or free the buffer MPI may still use.
                unsafe { libc::_exit(EXIT_STALLED) };
            }
            if flag != 0 {
                break;
            }
            if started.elapsed() < Duration::from_micros(20) {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        self.watchdog.disarm();
        Ok(())
    }

    fn all_reduce<T>(&mut self, op: OpKind, buf: &mut [T], dtype: ffi::MPI_Datatype) -> Result<()> {
        self.handshake(op, 0, 0, buf.len())?;
        let seq = self.seq - 1;
        // Counts are C ints: reduce in chunks below 2^31 elements.
        for chunk in buf.chunks_mut(c_int::MAX as usize) {
            // SAFETY: `chunk` is valid for `len` elements of `dtype` (the caller pairs the Rust
            // type with its MPI type) until `guarded` returns; every rank passes the same length
            // (checked by the handshake), so the chunks match across ranks.
            self.guarded(op, seq, "MPI_Iallreduce", |comm, req| unsafe {
                ffi::MPI_Iallreduce(
                    ballast_mpi_in_place(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len() as c_int,
                    dtype,
                    sum_op(),
                    comm,
                    req,
                )
            })?;
        }
        Ok(())
    }

    fn bcast_raw(&mut self, op: OpKind, seq: u64, root: usize, ptr: *mut c_void, bytes: usize) -> Result<()> {
        let dtype = u8_type();
        let mut offset = 0;
        while offset < bytes {
            let n = (bytes - offset).min(c_int::MAX as usize);
            // SAFETY: the caller passes `ptr` valid for `bytes` bytes on every rank (lengths
            // checked by the handshake, or resized to the root's) until `guarded` returns.
            self.guarded(op, seq, "MPI_Ibcast", |comm, req| unsafe {
                ffi::MPI_Ibcast(
                    ptr.cast::<u8>().add(offset).cast(),
                    n as c_int,
                    dtype,
                    root as c_int,
                    comm,
                    req,
                )
            })?;
            offset += n;
        }
        Ok(())
    }

    /// Checks a shard layout (see [`shard_offset`]) and converts it to MPI's C int counts; the
    /// total must fit one too (MPI addresses the full buffer with C int displacements).
    fn c_counts(&mut self, op: OpKind, counts: &[usize], total: usize, part: usize) -> Result<Vec<c_int>> {
        let checked = shard_offset(op, self.rank, self.size, counts, total, part).and_then(|_| {
            if total > c_int::MAX as usize {
                return Err(Error::InvalidArgument {
                    op: op.name(),
                    rank: self.rank,
                    reason: format!("{total} elements exceed what one MPI call can address; shard fewer"),
                });
            }
            Ok(counts.iter().map(|&c| c as c_int).collect())
        });
        checked.map_err(|e| self.poison(e))
    }

    fn check(&mut self, rc: c_int, call: &'static str) -> Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            let err = mpi_error(call, self.rank, rc);
            Err(self.poison(err))
        }
    }

    fn poison(&mut self, err: Error) -> Error {
        if self.poisoned.is_none() {
            self.poisoned = Some(err.to_string());
            if let Error::Timeout { missing, .. } = &err {
                self.watchdog.report_missing(self.rank, missing);
            }
        }
        err
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn timeout(&self) -> Duration {
        self.options.timeout
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.options.timeout = timeout;
    }

    fn collectives_started(&self) -> u64 {
        self.seq
    }

    fn barrier(&mut self) -> Result<()> {
        // Every rank has announced itself once the handshake completes: that is a barrier.
        self.handshake(OpKind::Barrier, 0, 0, 0).map(drop)
    }

    fn broadcast_f32(&mut self, root: usize, buf: &mut [f32]) -> Result<()> {
        self.handshake(OpKind::BroadcastF32, root, 0, buf.len())?;
        let seq = self.seq - 1;
        self.bcast_raw(
            OpKind::BroadcastF32,
            seq,
            root,
            buf.as_mut_ptr().cast(),
            std::mem::size_of_val(buf),
        )
    }

    fn broadcast_bytes(&mut self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        let agreed = self.handshake(OpKind::BroadcastBytes, root, 0, buf.len())?;
        let seq = self.seq - 1;
        buf.resize(agreed.root_len as usize, 0);
        self.bcast_raw(OpKind::BroadcastBytes, seq, root, buf.as_mut_ptr().cast(), buf.len())
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(OpKind::AllReduceF32, buf, f32_type())
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(OpKind::AllReduceF64, buf, f64_type())
    }

    fn all_reduce_sum_u64(&mut self, buf: &mut [u64]) -> Result<()> {
        self.all_reduce(OpKind::AllReduceU64, buf, u64_type())
    }

    fn all_gather_bytes(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.handshake(OpKind::AllGatherBytes, 0, 0, data.len())?;
        let seq = self.seq - 1;
        let mine = data.len() as u64;
        let mut gathered = vec![0u64; self.size];
        // SAFETY: `mine` is one u64 and `gathered` holds one per rank, both valid until
        // `guarded` returns; every rank gathers one u64 (the handshake agreed on the operation).
        self.guarded(OpKind::AllGatherBytes, seq, "MPI_Iallgather", |comm, req| unsafe {
            ffi::MPI_Iallgather(
                std::ptr::from_ref(&mine).cast(),
                1,
                u64_type(),
                gathered.as_mut_ptr().cast(),
                1,
                u64_type(),
                comm,
                req,
            )
        })?;
        let lens: Vec<usize> = gathered.iter().map(|&l| l as usize).collect();
        let total: usize = lens.iter().sum();
        if total > c_int::MAX as usize {
            return Err(self.poison(Error::InvalidArgument {
                op: "all_gather_bytes",
                rank: self.rank,
                reason: format!("{total} bytes in all exceed what one MPI call can gather; send less"),
            }));
        }
        let counts: Vec<c_int> = lens.iter().map(|&l| l as c_int).collect();
        let mut displs = Vec::with_capacity(lens.len());
        let mut off = 0;
        for &l in &lens {
            displs.push(off as c_int);
            off += l;
        }
        let mut out = vec![0u8; total];
        let dtype = u8_type();
        // SAFETY: `data`, `out`, `counts` and `displs` are valid for the sizes given until
        // `guarded` returns, and every rank computed them from the same gathered lengths.
        self.guarded(OpKind::AllGatherBytes, seq, "MPI_Iallgatherv", |comm, req| unsafe {
            ffi::MPI_Iallgatherv(
                data.as_ptr().cast(),
                data.len() as c_int,
                dtype,
                out.as_mut_ptr().cast(),
                counts.as_ptr(),
                displs.as_ptr(),
                dtype,
                comm,
                req,
            )
        })?;
        let mut result = Vec::with_capacity(lens.len());
        let mut off = 0;
        for l in lens {
            result.push(out[off..off + l].to_vec());
            off += l;
        }
        Ok(result)
    }

    fn reduce_scatter_sum_f32(&mut self, buf: &[f32], counts: &[usize], shard: &mut [f32]) -> Result<()> {
        let op = OpKind::ReduceScatterF32;
        let counts_c = self.c_counts(op, counts, buf.len(), shard.len())?;
        self.handshake(op, 0, counts_key(counts), buf.len())?;
        let seq = self.seq - 1;
        // SAFETY: `buf` holds the sum of `counts_c` elements and `shard` this rank's count (checked
        // by `c_counts`), both valid until `guarded` returns; every rank passes the same counts
        // (the handshake compared their keys).
        self.guarded(op, seq, "MPI_Ireduce_scatter", |comm, req| unsafe {
            ffi::MPI_Ireduce_scatter(
                buf.as_ptr().cast(),
                shard.as_mut_ptr().cast(),
                counts_c.as_ptr(),
                f32_type(),
                sum_op(),
                comm,
                req,
            )
        })
    }

    fn all_gather_f32(&mut self, shard: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
        let op = OpKind::AllGatherF32;
        let counts_c = self.c_counts(op, counts, out.len(), shard.len())?;
        self.handshake(op, 0, counts_key(counts), out.len())?;
        let seq = self.seq - 1;
        let displs: Vec<c_int> = counts_c
            .iter()
            .scan(0, |offset, &c| {
                let here = *offset;
                *offset += c;
                Some(here)
            })
            .collect();
        // SAFETY: `shard` holds this rank's count and `out` their total, which fits a C int
        // (checked by `c_counts`), so every displacement does too; all stay valid until `guarded`
        // returns, and every rank passes the same counts (the handshake compared their keys).
        self.guarded(op, seq, "MPI_Iallgatherv", |comm, req| unsafe {
            ffi::MPI_Iallgatherv(
                shard.as_ptr().cast(),
                shard.len() as c_int,
                f32_type(),
                out.as_mut_ptr().cast(),
                counts_c.as_ptr(),
                displs.as_ptr(),
                f32_type(),
                comm,
                req,
            )
        })
    }
}

impl Drop for MpiCommunicator {
    fn drop(&mut self) {
        if let Some(reason) = &self.poisoned {
            // Said before finalising, which may not return if a peer is gone.
            eprintln!("ballast: rank {} shutting down after an error: {reason}", self.rank);
        }
        // MPI_Finalize waits for every rank; a dead or stopped peer would make it wait forever.
        // The watchdog bounds it like any collective (and names a stopped peer).
        self.watchdog.arm("MPI_Finalize", self.seq, self.options.timeout);
        // SAFETY: the handles were created by MPI_Comm_dup and are freed once; the universe is
        // dropped exactly once, here, after them.
        unsafe {
            ffi::MPI_Comm_free(&mut self.control);
            ffi::MPI_Comm_free(&mut self.data);
            std::mem::ManuallyDrop::drop(&mut self.universe);
        }
        self.watchdog.disarm();
        self.watchdog.stop(self.rank);
    }
}

/// Raw MPI all-reduce (sum, in place) on `MPI_COMM_WORLD`, with no handshake and no timeout: the
/// baseline `ballast bench allreduce` compares against.
///
/// # Errors
/// [`Error::Mpi`] when MPI fails.
pub fn raw_all_reduce_sum_f32(comm: &MpiCommunicator, buf: &mut [f32]) -> Result<()> {
    // SAFETY: `buf` is valid for its length during this blocking call. The lengths are not
    // checked across ranks (a benchmark: every rank passes the same sizes).
    let rc = unsafe {
        ffi::MPI_Allreduce(
            ballast_mpi_in_place(),
            buf.as_mut_ptr().cast(),
            buf.len() as c_int,
            f32_type(),
            sum_op(),
            comm.data,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(mpi_error("MPI_Allreduce", comm.rank, rc))
    }
}

fn dup(comm: ffi::MPI_Comm, rank: usize) -> Result<ffi::MPI_Comm> {
    let mut out = MaybeUninit::<ffi::MPI_Comm>::uninit();
    // SAFETY: MPI is initialised and `comm` is valid.
    let rc = unsafe { ffi::MPI_Comm_dup(comm, out.as_mut_ptr()) };
    if rc != 0 {
        return Err(mpi_error("MPI_Comm_dup", rank, rc));
    }
    // SAFETY: initialised by a successful MPI_Comm_dup.
    let out = unsafe { out.assume_init() };
    // Errors come back as codes instead of aborting the job, so they become typed errors.
    // SAFETY: `out` is the live communicator just created; the handler is a library constant.
    unsafe { ffi::MPI_Comm_set_errhandler(out, ffi::RSMPI_ERRORS_RETURN) };
    Ok(out)
}

fn u8_type() -> ffi::MPI_Datatype {
    // SAFETY: reading a constant handle the MPI library exports.
    unsafe { ffi::RSMPI_UINT8_T }
}

fn u64_type() -> ffi::MPI_Datatype {
    // SAFETY: reading a constant handle the MPI library exports.
    unsafe { ffi::RSMPI_UINT64_T }
}

fn f32_type() -> ffi::MPI_Datatype {
    // SAFETY: reading a constant handle the MPI library exports.
    unsafe { ffi::RSMPI_FLOAT }
}

fn f64_type() -> ffi::MPI_Datatype {
    // SAFETY: reading a constant handle the MPI library exports.
    unsafe { ffi::RSMPI_DOUBLE }
}

fn sum_op() -> ffi::MPI_Op {
    // SAFETY: reading a constant handle the MPI library exports.
    unsafe { ffi::RSMPI_SUM }
}

fn mpi_error(call: &'static str, rank: usize, code: c_int) -> Error {
    let mut buf = vec![0u8; 1024];
    let mut len: c_int = 0;
    // SAFETY: MPI_MAX_ERROR_STRING is at most 512 in Open MPI and MPICH; the buffer is larger.
    unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr().cast(), &mut len) };
    buf.truncate(len.max(0) as usize);
    Error::Mpi {
        call,
        rank,
        code,
        message: String::from_utf8_lossy(&buf).into_owned(),
    }
}
