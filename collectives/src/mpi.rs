//! Ranks as processes, over MPI (Open MPI or MPICH), for CPU ranks and the control plane.
//!
//! # How a collective runs
//!
//! 1. **Arrival handshake** on a private duplicate of `MPI_COMM_WORLD`: each rank posts a
//!    nonblocking send of its [header](crate::communicator) (sequence number, operation, root,
//!    length) to every peer and a nonblocking receive from every peer, then polls with
//!    `MPI_Test` until all arrive or the timeout expires. A timeout names exactly the peers whose
//!    header never came; the receives are cancelled. Headers that disagree become
//!    [`Error::ShapeMismatch`] / [`Error::OrderMismatch`] on every rank, because every rank
//!    checks the same set of headers.
//! 2. **Data phase** on a second duplicate: the MPI collective (`MPI_Iallreduce` with
//!    `MPI_IN_PLACE`, `MPI_Ibcast`, `MPI_Iallgatherv`), so the data moves with the library's
//!    algorithms, completed by polling `MPI_Test` and yielding the core between polls. Ranks
//!    that share a core (pinned CPU ranks) hand it to each other at once; in the blocking call
//!    a waiting rank spun until the scheduler preempted it, which cost milliseconds per
//!    all-reduce with two ranks on one core. Every rank is known to be inside the call. If a
//!    peer stalls *during* the data phase (it was stopped after announcing itself), a watchdog
//!    thread prints which operation stalled and ends the process with exit code
//!    [`EXIT_STALLED`]; the launcher then tears the job down. Returning an error instead is impossible there: MPI may still write into the
//!    caller's buffer.
//!
//! # Thread level
//!
//! `MPI_THREAD_FUNNELED`: only the thread that created the communicator calls MPI. The watchdog
//! never calls MPI.
//!
//! # Standard sections
//! MPI 4.0 §3.7 (nonblocking point-to-point), §3.8.4 (cancel), §6.12 (nonblocking collectives:
//! `MPI_Ibcast`, `MPI_Iallgatherv`, `MPI_Iallreduce`), §6.9.6 (`MPI_IN_PLACE`).

use std::{
    ffi::{c_int, c_void},
    mem::MaybeUninit,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use mpi::{ffi, raw::AsRaw, Threading};

use crate::{
    communicator::{verify_headers, Header, OpKind},
    CommOptions, Communicator, Error, Result,
};

/// Exit code of a process ended by the data-phase watchdog.
pub const EXIT_STALLED: i32 = 75;

/// Tag of handshake messages on the control communicator.
const HANDSHAKE_TAG: c_int = 0x0ba1;

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
    /// Finalises MPI when dropped, after the duplicated communicators are freed.
    universe: std::mem::ManuallyDrop<mpi::environment::Universe>,
}

// SAFETY: the raw communicator handles are plain values that MPI lets any thread use under
// MPI_THREAD_FUNNELED as long as one thread at a time does; `&mut self` on every call ensures
// that. The struct is not `Sync`.
unsafe impl Send for MpiCommunicator {}

impl MpiCommunicator {
    /// Initialises MPI (`MPI_THREAD_FUNNELED`) and returns this process's rank of the world.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when MPI was already initialised in this process;
    /// [`Error::Mpi`] when duplicating the world communicator fails.
    pub fn init(options: CommOptions) -> Result<Self> {
        let (universe, _level) =
            mpi::initialize_with_threading(Threading::Funneled).ok_or_else(|| Error::InvalidArgument {
                op: "mpi init",
                rank: 0,
                reason: "MPI is already initialised in this process; create one MpiCommunicator per process".into(),
            })?;
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
        let control = dup(world_raw, rank)?;
        let data = dup(world_raw, rank)?;
        Ok(Self {
            rank,
            size: size as usize,
            seq: 0,
            options,
            poisoned: None,
            control,
            data,
            watchdog: Watchdog::spawn(rank, size as usize),
            universe: std::mem::ManuallyDrop::new(universe),
        })
    }

    /// The MPI library's own version string (`MPI_Get_library_version`).
    pub fn library_version() -> String {
        mpi::environment::library_version().unwrap_or_else(|_| "unknown".into())
    }

    /// Announces this rank's header to every peer and collects theirs.
    fn handshake(&mut self, op: OpKind, root: usize, len: usize) -> Result<Vec<Header>> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Poisoned {
                rank: self.rank,
                reason: reason.clone(),
            });
        }
        if root >= self.size {
            return Err(self.poison(Error::InvalidArgument {
                op: op.name(),
                rank: self.rank,
                reason: format!("root {root} is not a rank of a world of {}", self.size),
            }));
        }
        let mine = Header {
            seq: self.seq,
            op,
            root: root as u64,
            len: len as u64,
        };
        self.seq += 1;
        let n = self.size;
        let me = self.rank;
        // Buffers live on the heap so they can be leaked if a request never completes.
        let send: Box<[u64; Header::WORDS]> = Box::new(mine.encode());
        let mut recv: Box<[[u64; Header::WORDS]]> = vec![[0u64; Header::WORDS]; n].into_boxed_slice();
        recv[self.rank] = mine.encode();
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        let mut recv_req = vec![null; n];
        let mut send_req = vec![null; n];
        let dtype = unsafe { ffi::RSMPI_UINT64_T };
        for peer in (0..n).filter(|&p| p != me) {
            // SAFETY: buffers outlive the requests (they are leaked if a request is abandoned).
            let rc = unsafe {
                ffi::MPI_Irecv(
                    recv[peer].as_mut_ptr().cast(),
                    Header::WORDS as c_int,
                    dtype,
                    peer as c_int,
                    HANDSHAKE_TAG,
                    self.control,
                    &mut recv_req[peer],
                )
            };
            self.check(rc, "MPI_Irecv")?;
        }
        for peer in (0..n).filter(|&p| p != me) {
            // SAFETY: as above.
            let rc = unsafe {
                ffi::MPI_Isend(
                    send.as_ptr().cast(),
                    Header::WORDS as c_int,
                    dtype,
                    peer as c_int,
                    HANDSHAKE_TAG,
                    self.control,
                    &mut send_req[peer],
                )
            };
            self.check(rc, "MPI_Isend")?;
        }
        let deadline = Instant::now() + self.options.timeout;
        let started = Instant::now();
        loop {
            let mut pending_recv = false;
            let mut pending_send = false;
            for (reqs, pending) in [(&mut recv_req, &mut pending_recv), (&mut send_req, &mut pending_send)] {
                for req in reqs.iter_mut().filter(|r| **r != null) {
                    let mut flag: c_int = 0;
                    // SAFETY: `req` is an active request created above.
                    let rc = unsafe { ffi::MPI_Test(req, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
                    if rc != 0 {
                        let err = mpi_error("MPI_Test", self.rank, rc);
                        Box::leak(send);
                        Box::leak(recv);
                        return Err(self.poison(err));
                    }
                    if flag == 0 {
                        *pending = true;
                    }
                }
            }
            if !pending_recv && !pending_send {
                break;
            }
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (0..n).filter(|&p| recv_req[p] != null).collect();
                for req in recv_req.iter_mut().filter(|r| **r != null) {
                    // SAFETY: cancelling and completing an unmatched receive is always allowed.
                    unsafe {
                        ffi::MPI_Cancel(req);
                        ffi::MPI_Wait(req, ffi::RSMPI_STATUS_IGNORE);
                    }
                }
                for req in send_req.iter_mut().filter(|r| **r != null) {
                    // SAFETY: the send completes in the background; its buffer is leaked below.
                    unsafe { ffi::MPI_Request_free(req) };
                }
                Box::leak(send);
                Box::leak(recv);
                let err = Error::Timeout {
                    op: op.name(),
                    seq: mine.seq,
                    rank: self.rank,
                    missing,
                    timeout: self.options.timeout,
                };
                return Err(self.poison(err));
            }
            // Spin briefly for latency, then yield so oversubscribed ranks can run.
            if started.elapsed() < Duration::from_micros(50) {
                std::hint::spin_loop();
            } else if started.elapsed() < Duration::from_millis(2) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let headers: Option<Vec<Header>> = recv.iter().map(Header::decode).collect();
        let Some(headers) = headers else {
            return Err(self.poison(Error::OrderMismatch {
                seq: mine.seq,
                rank: self.rank,
                op: mine.op.name().into(),
                other_rank: 0,
                other_op: "a message that is not a ballast handshake".into(),
            }));
        };
        verify_headers(self.rank, &mine, &headers).map_err(|e| self.poison(e))?;
        Ok(headers)
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
                self.watchdog.disarm();
                return self.check(rc, "MPI_Test");
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
        self.handshake(op, 0, buf.len())?;
        let seq = self.seq - 1;
        // Counts are C ints: reduce in chunks below 2^31 elements.
        for chunk in buf.chunks_mut(c_int::MAX as usize) {
            // SAFETY: `chunk` is valid for `len` elements of `dtype`; every rank passes the same
            // length (checked by the handshake).
            self.guarded(op, seq, "MPI_Iallreduce", |comm, req| unsafe {
                ffi::MPI_Iallreduce(
                    ballast_mpi_in_place(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len() as c_int,
                    dtype,
                    ffi::RSMPI_SUM,
                    comm,
                    req,
                )
            })?;
        }
        Ok(())
    }

    fn bcast_raw(&mut self, op: OpKind, seq: u64, root: usize, ptr: *mut c_void, bytes: usize) -> Result<()> {
        let dtype = unsafe { ffi::RSMPI_UINT8_T };
        let mut offset = 0;
        while offset < bytes {
            let n = (bytes - offset).min(c_int::MAX as usize);
            // SAFETY: `ptr` is valid for `bytes` bytes on every rank (lengths checked or resized).
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

    fn collectives_started(&self) -> u64 {
        self.seq
    }

    fn barrier(&mut self) -> Result<()> {
        // Every rank has announced itself once the handshake completes: that is a barrier.
        self.handshake(OpKind::Barrier, 0, 0).map(drop)
    }

    fn broadcast_f32(&mut self, root: usize, buf: &mut [f32]) -> Result<()> {
        self.handshake(OpKind::BroadcastF32, root, buf.len())?;
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
        let headers = self.handshake(OpKind::BroadcastBytes, root, buf.len())?;
        let seq = self.seq - 1;
        buf.resize(headers[root].len as usize, 0);
        self.bcast_raw(OpKind::BroadcastBytes, seq, root, buf.as_mut_ptr().cast(), buf.len())
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(OpKind::AllReduceF32, buf, unsafe { ffi::RSMPI_FLOAT })
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(OpKind::AllReduceF64, buf, unsafe { ffi::RSMPI_DOUBLE })
    }

    fn all_reduce_sum_u64(&mut self, buf: &mut [u64]) -> Result<()> {
        self.all_reduce(OpKind::AllReduceU64, buf, unsafe { ffi::RSMPI_UINT64_T })
    }

    fn all_gather_bytes(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let headers = self.handshake(OpKind::AllGatherBytes, 0, data.len())?;
        let seq = self.seq - 1;
        let lens: Vec<usize> = headers.iter().map(|h| h.len as usize).collect();
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
        let dtype = unsafe { ffi::RSMPI_UINT8_T };
        // SAFETY: `data`, `out`, `counts` and `displs` are valid for the sizes given, which every
        // rank computed from the same headers.
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
    // SAFETY: as in `MpiCommunicator::all_reduce`, minus the length check (a benchmark).
    let rc = unsafe {
        ffi::MPI_Allreduce(
            ballast_mpi_in_place(),
            buf.as_mut_ptr().cast(),
            buf.len() as c_int,
            ffi::RSMPI_FLOAT,
            ffi::RSMPI_SUM,
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
    unsafe { ffi::MPI_Comm_set_errhandler(out, ffi::RSMPI_ERRORS_RETURN) };
    Ok(out)
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

/// Ends the process if a data-phase call outlives its deadline (see the module docs), naming
/// the peers that stopped.
///
/// Inside an MPI collective nothing says which peer is missing, so every rank's watchdog thread
/// also writes a heartbeat file (its rank, refreshed twice a second) in a directory shared by
/// the ranks of a host ([`crate::env::HEARTBEAT_DIR`], default `/tmp/ballast-heartbeat-<launcher
/// pid>`). A stopped or dead process stops refreshing its file; when a stall is detected the
/// stale files name the culprits. Ranks on other hosts without a shared directory are not seen
/// and the message says so.
struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    heartbeat: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct WatchState {
    armed: Option<(&'static str, u64, Instant, Duration)>,
    stop: bool,
}

/// How often the heartbeat file is refreshed, and how old it may get before its rank counts as
/// stopped.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
const HEARTBEAT_STALE: Duration = Duration::from_secs(2);

impl Watchdog {
    fn spawn(rank: usize, size: usize) -> Self {
        let dir = std::env::var_os(crate::env::HEARTBEAT_DIR)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                // SAFETY: getppid has no preconditions.
                let parent = unsafe { libc::getppid() };
                std::env::temp_dir().join(format!("ballast-heartbeat-{parent}"))
            });
        let heartbeat = std::fs::create_dir_all(&dir).ok().map(|_| dir);
        let shared = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let theirs = Arc::clone(&shared);
        let hb = heartbeat.clone();
        std::thread::Builder::new()
            .name("ballast-mpi-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*theirs;
                let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
                let mut last_beat: Option<Instant> = None;
                loop {
                    if state.stop {
                        return;
                    }
                    if let Some(dir) = &hb {
                        if last_beat.is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY / 2) {
                            beat(dir, rank);
                            last_beat = Some(Instant::now());
                        }
                    }
                    let now = Instant::now();
                    let wait = match state.armed {
                        Some((op, seq, deadline, timeout)) if now >= deadline => {
                            let suspects = hb.as_deref().map(|d| stale_ranks(d, size, rank));
                            let named = match suspects {
                                Some(s) if !s.is_empty() => format!("rank(s) {s:?} stopped responding"),
                                _ => format!(
                                    "no rank on this host stopped (a rank on another host may have; heartbeats in {:?})",
                                    hb.as_deref().map(|d| d.display().to_string())
                                ),
                            };
                            eprintln!(
                                "ballast: fatal: {op} #{seq} stalled in its data phase (or while finalising) for {timeout:?} on rank {rank} \
                                 (host {}): {named}. Ending this process so the launcher stops the job (exit \
                                 {EXIT_STALLED})",
                                hostname()
                            );
                            // SAFETY: _exit ends the process without running destructors that
                            // could block in MPI.
                            unsafe { libc::_exit(EXIT_STALLED) };
                        }
                        Some((_, _, deadline, _)) => (deadline - now).min(HEARTBEAT_EVERY),
                        None => HEARTBEAT_EVERY,
                    };
                    state = cv.wait_timeout(state, wait).unwrap_or_else(|e| e.into_inner()).0;
                }
            })
            .expect("spawning the MPI watchdog thread");
        Self { shared, heartbeat }
    }

    fn arm(&self, op: &'static str, seq: u64, timeout: Duration) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).armed = Some((op, seq, Instant::now() + timeout, timeout));
        cv.notify_one();
    }

    fn disarm(&self) {
        let (lock, _) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).armed = None;
    }

    fn stop(&self, rank: usize) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_one();
        if let Some(dir) = &self.heartbeat {
            let _ = std::fs::remove_file(dir.join(format!("rank-{rank}")));
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn beat(dir: &std::path::Path, rank: usize) {
    // The file's modification time is the heartbeat (a process stopped halfway through a write
    // still leaves a usable time).
    let _ = std::fs::write(dir.join(format!("rank-{rank}")), b"alive\n");
}

/// Ranks (other than `me`) whose heartbeat file exists but was last touched more than
/// [`HEARTBEAT_STALE`] ago.
fn stale_ranks(dir: &std::path::Path, size: usize, me: usize) -> Vec<usize> {
    let now = std::time::SystemTime::now();
    (0..size)
        .filter(|&r| r != me)
        .filter(|&r| {
            std::fs::metadata(dir.join(format!("rank-{r}")))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > HEARTBEAT_STALE)
        })
        .collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
