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

use std::{
    collections::HashMap,
    sync::{Arc, Condvar, Mutex, MutexGuard},
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
        state: Mutex::new(State::default()),
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

struct World {
    size: usize,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    slots: HashMap<u64, Slot>,
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
            if slot.aborted.is_some() || now >= deadline {
                let missing: Vec<usize> = (0..size).filter(|&r| slot.headers[r].is_none()).collect();
                let err = Error::Timeout {
                    op: op.name(),
                    seq,
                    rank: self.rank,
                    missing,
                    timeout: self.options.timeout,
                };
                if slot.aborted.is_none() {
                    slot.aborted = Some(err.to_string());
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
