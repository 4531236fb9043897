//! Ranks as threads in one process.
//!
//! This is the backend a new user meets first (no launcher, no MPI) and the one most tests run
//! on. It keeps the full [contract](crate::communicator): the arrival handshake, length and order
//! checks, timeouts naming missing ranks, and identical results on every rank (sums are taken in
//! rank order by every rank).
//!
//! ```
//! use ballast_collectives::{local, CommOptions, Communicator};
//!
//! let sums = local::run(3, CommOptions::default(), |mut comm| {
//!     let mut buf = vec![comm.rank() as f32 + 1.0; 4];
//!     comm.all_reduce_sum_f32(&mut buf).unwrap();
//!     buf
//! });
//! assert!(sums.iter().all(|s| s == &vec![6.0; 4]));
//! ```
//!
//! Each rank copies its contribution into a shared slot; the slot is dropped when every rank
//! has read it. This costs one copy per rank, which is irrelevant next to the model compute
//! that threads share the cores with.
//!
//! # A rank that is lost
//! A rank's communicator records, when it is dropped, that the rank has left the group, and
//! whether its thread was panicking. A collective waiting for a rank that has left fails at
//! once with [`Error::RankLeft`] instead of waiting out the deadline (which the sequential
//! probes raise to minutes). A rank stuck outside the collectives is named by the others'
//! timeouts; [`run_watched`] then ends the job instead of joining a thread that never ends.

use std::{
    collections::{BTreeSet, HashMap},
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{mpsc, Arc, Condvar, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use crate::{
    communicator::{counts_key, shard_offset, verify_headers, Header, OpKind},
    CommOptions, Communicator, Error, Result,
};

/// One rank of a group of threads; create a group with [`world`] or [`run`].
pub struct LocalCommunicator {
    rank: usize,
    world: Arc<World>,
    seq: u64,
    options: CommOptions,
    poisoned: Option<String>,
}

/// Creates `size` connected communicators, one per rank, to hand to threads.
///
/// # Panics
/// If `size` is zero.
pub fn world(size: usize, options: CommOptions) -> Vec<LocalCommunicator> {
    assert!(size > 0, "a world needs at least one rank");
    let world = Arc::new(World {
        size,
        state: Mutex::new(State {
            slots: HashMap::new(),
            left: vec![None; size],
            failed: false,
        }),
        changed: Condvar::new(),
    });
    (0..size)
        .map(|rank| LocalCommunicator {
            rank,
            world: Arc::clone(&world),
            seq: 0,
            options: options.clone(),
            poisoned: None,
        })
        .collect()
}

/// Runs `f` on `size` threads, one communicator each, and returns the results by rank.
///
/// # Panics
/// If a rank's thread panics (the panic is propagated).
pub fn run<R, F>(size: usize, options: CommOptions, f: F) -> Vec<R>
where
    R: Send,
    F: Fn(LocalCommunicator) -> R + Sync,
{
    let comms = world(size, options);
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let f = &f;
                std::thread::Builder::new()
                    .name(format!("ballast-rank-{}", comm.rank))
                    .spawn_scoped(scope, move || f(comm))
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// The ranks [`run_watched`] gave up on, and what the others returned.
pub struct Stuck<R> {
    /// Ranks still running `grace` after the group failed.
    pub ranks: Vec<usize>,
    /// The ranks that ended, with their results (a panic as `Err`), by rank.
    pub ended: Vec<(usize, thread::Result<R>)>,
}

/// How often [`run_watched`] looks at the group while it waits.
const WATCH_PERIOD: Duration = Duration::from_millis(50);

/// Runs `f` on `size` threads as [`run`] does, for a job that must end even when a rank cannot:
/// a rank's panic comes back as its `Err` instead of unwinding here, and once the group has
/// failed (a collective gave up waiting for a rank, or a rank's thread panicked) the ranks
/// still running `grace` later are handed to `stuck` with the others' results. `stuck` cannot
/// return (`Infallible`): it ends the process, as a scoped thread that never returns cannot be
/// joined.
pub fn run_watched<R, F, S>(
    size: usize,
    options: CommOptions,
    grace: Duration,
    stuck: S,
    f: F,
) -> Vec<thread::Result<R>>
where
    R: Send,
    F: Fn(LocalCommunicator) -> R + Sync,
    S: FnOnce(Stuck<R>) -> std::convert::Infallible,
{
    let comms = world(size, options);
    let group = Arc::clone(&comms[0].world);
    let (done, ended) = mpsc::channel();
    thread::scope(|scope| {
        let mut handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (f, done) = (&f, done.clone());
                let rank = comm.rank;
                let handle = thread::Builder::new()
                    .name(format!("ballast-rank-{rank}"))
                    .spawn_scoped(scope, move || {
                        // The communicator moves into `f`, so a panic drops it while unwinding
                        // and the group learns that this rank left.
                        let result = catch_unwind(AssertUnwindSafe(|| f(comm)));
                        let _ = done.send(rank);
                        result
                    })
                    .expect("spawning a rank thread");
                Some(handle)
            })
            .collect();
        let mut running: BTreeSet<usize> = (0..size).collect();
        let mut failed_at = None;
        while !running.is_empty() {
            if let Ok(rank) = ended.recv_timeout(WATCH_PERIOD) {
                running.remove(&rank);
            }
            if failed_at.is_none() && group.lock().failed {
                failed_at = Some(Instant::now());
            }
            if failed_at.is_some_and(|t| t.elapsed() >= grace) && !running.is_empty() {
                let ended = (0..size)
                    .filter(|r| !running.contains(r))
                    .filter_map(|r| Some((r, join(handles[r].take()?))))
                    .collect();
                match stuck(Stuck {
                    ranks: running.into_iter().collect(),
                    ended,
                }) {}
            }
        }
        handles.into_iter().flatten().map(join).collect()
    })
}

fn join<R>(handle: thread::ScopedJoinHandle<'_, thread::Result<R>>) -> thread::Result<R> {
    handle.join().and_then(|result| result)
}

struct World {
    size: usize,
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    slots: HashMap<u64, Slot>,
    /// The ranks whose communicator was dropped, and how: `its thread panicked` or `it returned`.
    left: Vec<Option<&'static str>>,
    /// Set when a collective gave up or a rank's thread panicked: the group cannot finish.
    failed: bool,
}

struct Slot {
    headers: Vec<Option<Header>>,
    payloads: Vec<Option<Arc<Payload>>>,
    readers: usize,
    /// Set when a rank gave up waiting on this slot: nobody may complete it any more.
    aborted: Option<String>,
}

enum Payload {
    Empty,
    F32(Vec<f32>),
    F64(Vec<f64>),
    U64(Vec<u64>),
    Bytes(Vec<u8>),
}

impl World {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LocalCommunicator {
    /// Deposits this rank's header and payload for the next operation and returns every rank's
    /// payload once all have arrived.
    fn exchange(
        &mut self,
        op: OpKind,
        root: usize,
        key: u64,
        len: usize,
        payload: Payload,
    ) -> Result<Vec<Arc<Payload>>> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Poisoned {
                rank: self.rank,
                reason: reason.clone(),
            });
        }
        if root >= self.world.size {
            return Err(self.poison(Error::InvalidArgument {
                op: op.name(),
                rank: self.rank,
                reason: format!("root {root} is not a rank of a world of {}", self.world.size),
            }));
        }
        let seq = self.seq;
        self.seq += 1;
        let mine = Header {
            seq,
            op,
            root: root as u64,
            key,
            len: len as u64,
        };
        let size = self.world.size;
        let deadline = Instant::now() + self.options.timeout;
        let mut state = self.world.lock();
        let slot = state.slots.entry(seq).or_insert_with(|| Slot {
            headers: vec![None; size],
            payloads: vec![None; size],
            readers: 0,
            aborted: None,
        });
        if let Some(reason) = &slot.aborted {
            let err = Error::Poisoned {
                rank: self.rank,
                reason: reason.clone(),
            };
            drop(state);
            return Err(self.poison(err));
        }
        slot.headers[self.rank] = Some(mine);
        slot.payloads[self.rank] = Some(Arc::new(payload));
        self.world.changed.notify_all();
        loop {
            let slot = state.slots.get_mut(&seq).expect("slot lives until read by all");
            let complete = slot.headers.iter().all(Option::is_some);
            if complete && slot.aborted.is_none() {
                let headers: Vec<Header> = slot.headers.iter().map(|h| h.expect("complete")).collect();
                let payloads: Vec<Arc<Payload>> = slot
                    .payloads
                    .iter()
                    .map(|p| Arc::clone(p.as_ref().expect("complete")))
                    .collect();
                slot.readers += 1;
                if slot.readers == size {
                    state.slots.remove(&seq);
                }
                drop(state);
                return match verify_headers(self.rank, &mine, &headers) {
                    Ok(()) => Ok(payloads),
                    Err(e) => Err(self.poison(e)),
                };
            }
            let now = Instant::now();
            let aborted = slot.aborted.is_some();
            let missing: Vec<usize> = (0..size).filter(|&r| slot.headers[r].is_none()).collect();
            let left: Vec<usize> = missing.iter().copied().filter(|&r| state.left[r].is_some()).collect();
            if aborted || now >= deadline || !left.is_empty() {
                let err = match left.first() {
                    Some(&first) => Error::RankLeft {
                        op: op.name(),
                        seq,
                        rank: self.rank,
                        how: state.left[first].unwrap_or("it returned"),
                        left,
                    },
                    None => Error::Timeout {
                        op: op.name(),
                        seq,
                        rank: self.rank,
                        missing,
                        timeout: self.options.timeout,
                    },
                };
                let slot = state.slots.get_mut(&seq).expect("slot lives until read by all");
                if slot.aborted.is_none() {
                    slot.aborted = Some(err.to_string());
                    state.failed = true;
                    self.world.changed.notify_all();
                }
                drop(state);
                return Err(self.poison(err));
            }
            state = self
                .world
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn poison(&mut self, err: Error) -> Error {
        if self.poisoned.is_none() {
            self.poisoned = Some(err.to_string());
        }
        err
    }

    fn reduce<T: Copy + std::ops::AddAssign>(
        &mut self,
        op: OpKind,
        buf: &mut [T],
        wrap: fn(Vec<T>) -> Payload,
        unwrap: fn(&Payload) -> Option<&[T]>,
    ) -> Result<()> {
        if self.world.size == 1 {
            // A world of one: the sum is the buffer itself. Keep the poisoning rule and the
            // sequence numbering, skip the copies.
            self.exchange(op, 0, 0, buf.len(), Payload::Empty)?;
            return Ok(());
        }
        let payloads = self.exchange(op, 0, 0, buf.len(), wrap(buf.to_vec()))?;
        // Every rank sums in rank order, so every rank gets the same bits.
        let mut first = true;
        for p in &payloads {
            let src = unwrap(p).expect("ranks agreed on the operation");
            if first {
                buf.copy_from_slice(src);
                first = false;
            } else {
                for (d, s) in buf.iter_mut().zip(src) {
                    *d += *s;
                }
            }
        }
        Ok(())
    }
}

impl Drop for LocalCommunicator {
    /// Tells the group that this rank has left, so nobody waits for it any more.
    fn drop(&mut self) {
        let panicking = thread::panicking();
        let mut state = self.world.lock();
        state.left[self.rank] = Some(if panicking {
            "its thread panicked"
        } else {
            "it returned"
        });
        state.failed |= panicking;
        self.world.changed.notify_all();
    }
}

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world.size
    }

    fn backend(&self) -> &'static str {
        "local"
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
        self.exchange(OpKind::Barrier, 0, 0, 0, Payload::Empty).map(drop)
    }

    fn broadcast_f32(&mut self, root: usize, buf: &mut [f32]) -> Result<()> {
        let payload = if self.rank == root {
            Payload::F32(buf.to_vec())
        } else {
            Payload::Empty
        };
        let payloads = self.exchange(OpKind::BroadcastF32, root, 0, buf.len(), payload)?;
        if let Payload::F32(src) = payloads[root].as_ref() {
            buf.copy_from_slice(src);
        }
        Ok(())
    }

    fn broadcast_bytes(&mut self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        let payload = if self.rank == root {
            Payload::Bytes(buf.clone())
        } else {
            Payload::Empty
        };
        let payloads = self.exchange(OpKind::BroadcastBytes, root, 0, buf.len(), payload)?;
        if let Payload::Bytes(src) = payloads[root].as_ref() {
            buf.clone_from(src);
        }
        Ok(())
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.reduce(OpKind::AllReduceF32, buf, Payload::F32, |p| match p {
            Payload::F32(v) => Some(v),
            _ => None,
        })
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        self.reduce(OpKind::AllReduceF64, buf, Payload::F64, |p| match p {
            Payload::F64(v) => Some(v),
            _ => None,
        })
    }

    fn all_reduce_sum_u64(&mut self, buf: &mut [u64]) -> Result<()> {
        self.reduce(OpKind::AllReduceU64, buf, Payload::U64, |p| match p {
            Payload::U64(v) => Some(v),
            _ => None,
        })
    }

    fn all_gather_bytes(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let payloads = self.exchange(OpKind::AllGatherBytes, 0, 0, data.len(), Payload::Bytes(data.to_vec()))?;
        Ok(payloads
            .iter()
            .map(|p| match p.as_ref() {
                Payload::Bytes(b) => b.clone(),
                _ => Vec::new(),
            })
            .collect())
    }

    fn reduce_scatter_sum_f32(&mut self, buf: &[f32], counts: &[usize], shard: &mut [f32]) -> Result<()> {
        let op = OpKind::ReduceScatterF32;
        let offset =
            shard_offset(op, self.rank, self.world.size, counts, buf.len(), shard.len()).map_err(|e| self.poison(e))?;
        let range = offset..offset + shard.len();
        if self.world.size == 1 {
            self.exchange(op, 0, counts_key(counts), buf.len(), Payload::Empty)?;
            shard.copy_from_slice(&buf[range]);
            return Ok(());
        }
        let payloads = self.exchange(op, 0, counts_key(counts), buf.len(), Payload::F32(buf.to_vec()))?;
        // Rank order, as in the all-reduce: every element is summed the same way.
        for (i, p) in payloads.iter().enumerate() {
            let Payload::F32(src) = p.as_ref() else {
                unreachable!("ranks agreed on the operation")
            };
            if i == 0 {
                shard.copy_from_slice(&src[range.clone()]);
            } else {
                for (d, s) in shard.iter_mut().zip(&src[range.clone()]) {
                    *d += *s;
                }
            }
        }
        Ok(())
    }

    fn all_gather_f32(&mut self, shard: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
        let op = OpKind::AllGatherF32;
        shard_offset(op, self.rank, self.world.size, counts, out.len(), shard.len()).map_err(|e| self.poison(e))?;
        let payloads = self.exchange(op, 0, counts_key(counts), out.len(), Payload::F32(shard.to_vec()))?;
        let mut offset = 0;
        for p in &payloads {
            let Payload::F32(src) = p.as_ref() else {
                unreachable!("ranks agreed on the operation")
            };
            out[offset..offset + src.len()].copy_from_slice(src);
            offset += src.len();
        }
        Ok(())
    }
}
