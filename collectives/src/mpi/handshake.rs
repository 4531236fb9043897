//! The arrival handshake that opens every collective: ranks agree on (sequence number,
//! operation, root, length) before any data moves.
//!
//! # Agreement in ⌈log2 n⌉ rounds
//!
//! Each rank contributes its [`Header`] as an [`Agreement`]: the minimum and the maximum of every
//! field (both equal to its own) and, for broadcasts, the root's length. The agreements are
//! combined by recursive doubling over nonblocking point-to-point messages: with `p` the largest
//! power of two ≤ n, ranks `p..n` first hand theirs to rank `r − p`, ranks `0..p` exchange with
//! `r ^ 2^k` for k = 0, 1, …, and the result goes back to ranks `p..n`. Every rank ends with the
//! same combination of all n headers, so minimum = maximum on every field means every rank called
//! the same collective; a rank sends and receives at most 2·⌈log2 n⌉ + 2 messages, where
//! announcing to every peer took 2·(n − 1).
//!
//! # When they do not agree, or someone does not come
//!
//! Both are rare and both need names, so a second round sends every rank's header to every peer
//! (the all-to-all exchange, which is also [`Handshake::AllToAll`]). On disagreement every rank
//! checks the same headers and returns the same [`Error::OrderMismatch`] or
//! [`Error::ShapeMismatch`]. On a timeout the present ranks, all stuck in the same rounds, time
//! out within the spread of their arrivals; the second round waits one more timeout for them and
//! names those whose header never came in [`Error::Timeout`]. A timeout therefore reports after
//! one to two timeouts; a rank counts as missing exactly when it arrived more than one timeout
//! after the reporting rank, as with the all-to-all handshake.
//!
//! # Buffers MPI may still use
//!
//! Every message buffer is owned by a [`Messages`] set, on the heap. A receive that times out is
//! cancelled and completed; a send that cannot be completed is freed with `MPI_Request_free`,
//! after which MPI may still read its buffer. A set dropped with any such request leaks its
//! buffers instead of freeing them, so no early return (an MPI error while posting, a failed
//! test, a timeout) leaves MPI a dangling pointer.

use std::{
    ffi::c_int,
    time::{Duration, Instant},
};

use mpi::ffi;

use super::{mpi_error, u64_type, MpiCommunicator};
use crate::{
    communicator::{verify_headers, Header, OpKind},
    Error, Result,
};

/// How the ranks agree before a collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Handshake {
    /// Recursive doubling of the headers' minima and maxima: at most 2·⌈log2 n⌉ + 2 messages per
    /// rank; the all-to-all exchange only to name ranks when something is wrong.
    #[default]
    Tree,
    /// Every rank sends its header to every peer and receives every peer's: 2·(n − 1) messages
    /// per rank and one round. Kept as the baseline of `ballast bench handshake`.
    AllToAll,
}

/// Message tags on the control communicator, one per phase so no phase can take another's
/// message.
const TAG_ALL_TO_ALL: c_int = 0x0ba1;
const TAG_TO_LOWER: c_int = 0x0ba2;
const TAG_TO_UPPER: c_int = 0x0ba3;
const TAG_ROUND: c_int = 0x0c00;

/// What a collective may rely on once the handshake succeeded.
pub(super) struct Agreed {
    /// The root's length (broadcasts; 0 when this rank is not told).
    pub root_len: u64,
}

/// Minimum and maximum of every header field over a set of ranks, and the root's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Agreement {
    min: [u64; Header::WORDS],
    max: [u64; Header::WORDS],
    root_len: u64,
}

impl Agreement {
    const WORDS: usize = 2 * Header::WORDS + 1;

    fn of(header: &Header, rank: usize) -> Self {
        let words = header.encode();
        Self {
            min: words,
            max: words,
            root_len: if header.root == rank as u64 { header.len } else { 0 },
        }
    }

    fn combine(mut self, other: &Self) -> Self {
        for i in 0..Header::WORDS {
            self.min[i] = self.min[i].min(other.min[i]);
            self.max[i] = self.max[i].max(other.max[i]);
        }
        self.root_len = self.root_len.max(other.root_len);
        self
    }

    /// Whether every rank announced the same sequence number, operation and root, and the same
    /// length where `op` needs one.
    fn agrees(&self, op: OpKind) -> bool {
        let fields = if op.lengths_must_match() {
            0..Header::WORDS
        } else {
            0..Header::WORDS - 1
        };
        fields.into_iter().all(|i| self.min[i] == self.max[i])
    }

    fn encode(&self) -> [u64; Self::WORDS] {
        let mut out = [0; Self::WORDS];
        out[..Header::WORDS].copy_from_slice(&self.min);
        out[Header::WORDS..2 * Header::WORDS].copy_from_slice(&self.max);
        out[2 * Header::WORDS] = self.root_len;
        out
    }

    fn decode(words: &[u64]) -> Self {
        let mut min = [0; Header::WORDS];
        let mut max = [0; Header::WORDS];
        min.copy_from_slice(&words[..Header::WORDS]);
        max.copy_from_slice(&words[Header::WORDS..2 * Header::WORDS]);
        Self {
            min,
            max,
            root_len: words[2 * Header::WORDS],
        }
    }
}

/// Nonblocking messages of `u64` words, posted together and completed by polling.
///
/// Invariant: a buffer is freed only when its request is known complete; a set dropped while a
/// request may still use its buffer (active, or freed with `MPI_Request_free`) leaks them all.
struct Messages {
    comm: ffi::MPI_Comm,
    bufs: Vec<Box<[u64]>>,
    reqs: Vec<ffi::MPI_Request>,
    peers: Vec<usize>,
    receives: Vec<bool>,
    /// Which messages completed (a cancelled receive never does).
    done: Vec<bool>,
    /// Some request was freed before completing: MPI may still read its buffer.
    released: bool,
}

impl Messages {
    fn new(comm: ffi::MPI_Comm) -> Self {
        Self {
            comm,
            bufs: Vec::new(),
            reqs: Vec::new(),
            peers: Vec::new(),
            receives: Vec::new(),
            done: Vec::new(),
            released: false,
        }
    }

    /// Posts a receive of `words` words from `peer`; returns its index.
    fn receive(&mut self, peer: usize, tag: c_int, words: usize, rank: usize) -> Result<usize> {
        self.post(peer, tag, vec![0; words].into_boxed_slice(), true, rank)
    }

    /// Posts a send of `data` to `peer`; returns its index.
    fn send(&mut self, peer: usize, tag: c_int, data: &[u64], rank: usize) -> Result<usize> {
        self.post(peer, tag, data.into(), false, rank)
    }

    fn post(&mut self, peer: usize, tag: c_int, mut buf: Box<[u64]>, receive: bool, rank: usize) -> Result<usize> {
        let mut req = null_request();
        let (ptr, len) = (buf.as_mut_ptr(), buf.len() as c_int);
        // The buffer moves into `self` before MPI sees it: its heap address stays the same, and
        // from now on only `Drop` (which leaks it while the request may be active) frees it.
        self.bufs.push(buf);
        // SAFETY: `ptr` points to `len` words owned by `self.bufs`, freed only after the request
        // completes (see the type's invariant); `self.comm` is a live communicator; `req` is a
        // valid out-pointer. If the call fails no request exists and the buffer is simply owned.
        let rc = unsafe {
            if receive {
                ffi::MPI_Irecv(ptr.cast(), len, u64_type(), peer as c_int, tag, self.comm, &mut req)
            } else {
                ffi::MPI_Isend(ptr.cast(), len, u64_type(), peer as c_int, tag, self.comm, &mut req)
            }
        };
        if rc != 0 {
            return Err(mpi_error(if receive { "MPI_Irecv" } else { "MPI_Isend" }, rank, rc));
        }
        self.reqs.push(req);
        self.peers.push(peer);
        self.receives.push(receive);
        self.done.push(false);
        Ok(self.reqs.len() - 1)
    }

    /// Tests every active request once; true when all are complete.
    fn poll(&mut self, rank: usize) -> Result<bool> {
        let mut all = true;
        for (req, done) in self.reqs.iter_mut().zip(self.done.iter_mut()) {
            if *done {
                continue;
            }
            let mut flag: c_int = 0;
            // SAFETY: `req` is an active request of this set; MPI_Test sets it to
            // MPI_REQUEST_NULL when it completes. On an error it stays active and `Drop` leaks
            // the buffers.
            let rc = unsafe { ffi::MPI_Test(req, &mut flag, status_ignore()) };
            if rc != 0 {
                return Err(mpi_error("MPI_Test", rank, rc));
            }
            *done = flag != 0;
            all &= *done;
        }
        Ok(all)
    }

    /// Polls until every request completes (true) or `deadline` passes (false: receives
    /// cancelled, sends released).
    fn complete_by(&mut self, deadline: Instant, rank: usize) -> Result<bool> {
        let started = Instant::now();
        loop {
            if self.poll(rank)? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                self.abandon();
                return Ok(false);
            }
            // Spin briefly for latency, then yield so oversubscribed ranks can run.
            let waited = started.elapsed();
            if waited < Duration::from_micros(50) {
                std::hint::spin_loop();
            } else if waited < Duration::from_millis(2) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Cancels and completes the pending receives, releases the pending sends.
    fn abandon(&mut self) {
        let null = null_request();
        for (req, &receive) in self.reqs.iter_mut().zip(&self.receives) {
            if *req == null {
                continue;
            }
            if receive {
                // SAFETY: cancelling an unmatched receive and waiting for it is always allowed;
                // afterwards MPI no longer touches its buffer.
                unsafe {
                    ffi::MPI_Cancel(req);
                    ffi::MPI_Wait(req, status_ignore());
                }
            } else {
                // SAFETY: releasing a send lets it finish in the background; MPI may still read
                // its buffer, so `released` makes `Drop` leak the buffers.
                unsafe { ffi::MPI_Request_free(req) };
                self.released = true;
            }
        }
    }

    /// Whether receive `i` completed.
    fn arrived(&self, i: usize) -> bool {
        self.receives[i] && self.done[i]
    }

    /// The words of message `i` (a completed receive).
    fn words(&self, i: usize) -> &[u64] {
        &self.bufs[i]
    }
}

impl Drop for Messages {
    fn drop(&mut self) {
        let null = null_request();
        if self.released || self.reqs.iter().any(|r| *r != null) {
            for buf in std::mem::take(&mut self.bufs) {
                Box::leak(buf);
            }
        }
    }
}

fn null_request() -> ffi::MPI_Request {
    // SAFETY: reading a constant the MPI library exports.
    unsafe { ffi::RSMPI_REQUEST_NULL }
}

fn status_ignore() -> *mut ffi::MPI_Status {
    // SAFETY: reading a constant the MPI library exports.
    unsafe { ffi::RSMPI_STATUS_IGNORE }
}

impl MpiCommunicator {
    /// Agrees with every peer on this collective before its data phase (see the module docs).
    pub(super) fn handshake(&mut self, op: OpKind, root: usize, key: u64, len: usize) -> Result<Agreed> {
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
            key,
            len: len as u64,
        };
        self.seq += 1;
        let result = match self.handshake_kind {
            Handshake::Tree => self.agree_tree(&mine),
            Handshake::AllToAll => self
                .all_to_all(&mine, Instant::now() + self.options.timeout)
                .map(|headers| Agreed {
                    root_len: headers[root].len,
                }),
        };
        result.map_err(|e| self.poison(e))
    }

    fn agree_tree(&mut self, mine: &Header) -> Result<Agreed> {
        let deadline = Instant::now() + self.options.timeout;
        match self.recursive_doubling(Agreement::of(mine, self.rank), deadline)? {
            Some(agreement) if agreement.agrees(mine.op) => Ok(Agreed {
                root_len: agreement.root_len,
            }),
            // Every rank saw the same disagreement: the exchange names the rank that differs.
            Some(_) => {
                self.all_to_all(mine, Instant::now() + self.options.timeout)?;
                Err(Error::OrderMismatch {
                    seq: mine.seq,
                    rank: self.rank,
                    op: mine.op.name().into(),
                    other_rank: self.rank,
                    other_op: "a handshake whose rounds disagreed though every rank's header agrees".into(),
                })
            }
            // Someone did not come: the present ranks wait one more timeout for each other, and
            // the exchange names the absent ones. If everyone turns up after all, the first
            // timeout still stands: the ranks were that far apart.
            None => {
                self.all_to_all(mine, Instant::now() + self.options.timeout)?;
                Err(Error::Timeout {
                    op: mine.op.name(),
                    seq: mine.seq,
                    rank: self.rank,
                    missing: Vec::new(),
                    timeout: self.options.timeout,
                })
            }
        }
    }

    /// Combines every rank's agreement; `None` when `deadline` passed first.
    fn recursive_doubling(&mut self, mine: Agreement, deadline: Instant) -> Result<Option<Agreement>> {
        let (n, r) = (self.size, self.rank);
        let p = 1usize << n.ilog2();
        let mut state = mine;
        if r >= p {
            // Hand this rank's agreement down and wait for the combined one.
            let mut m = Messages::new(self.control);
            m.send(r - p, TAG_TO_LOWER, &state.encode(), r)?;
            let back = m.receive(r - p, TAG_TO_UPPER, Agreement::WORDS, r)?;
            self.messages += 2;
            if !m.complete_by(deadline, r)? {
                return Ok(None);
            }
            return Ok(Some(Agreement::decode(m.words(back))));
        }
        let upper = (r + p < n).then_some(r + p);
        if let Some(upper) = upper {
            let mut m = Messages::new(self.control);
            let theirs = m.receive(upper, TAG_TO_LOWER, Agreement::WORDS, r)?;
            self.messages += 1;
            if !m.complete_by(deadline, r)? {
                return Ok(None);
            }
            state = state.combine(&Agreement::decode(m.words(theirs)));
        }
        for k in 0..p.ilog2() {
            let partner = r ^ (1 << k);
            let mut m = Messages::new(self.control);
            let theirs = m.receive(partner, TAG_ROUND + k as c_int, Agreement::WORDS, r)?;
            m.send(partner, TAG_ROUND + k as c_int, &state.encode(), r)?;
            self.messages += 2;
            if !m.complete_by(deadline, r)? {
                return Ok(None);
            }
            state = state.combine(&Agreement::decode(m.words(theirs)));
        }
        if let Some(upper) = upper {
            let mut m = Messages::new(self.control);
            m.send(upper, TAG_TO_UPPER, &state.encode(), r)?;
            self.messages += 1;
            if !m.complete_by(deadline, r)? {
                return Ok(None);
            }
        }
        Ok(Some(state))
    }

    /// Sends `mine` to every peer and receives theirs by `deadline`, then checks them: the
    /// headers (indexed by rank) when they agree; [`Error::Timeout`] naming the ranks whose
    /// header never came; the mismatch errors of [`verify_headers`] otherwise.
    fn all_to_all(&mut self, mine: &Header, deadline: Instant) -> Result<Vec<Header>> {
        let (n, me) = (self.size, self.rank);
        let mut m = Messages::new(self.control);
        let mut slot = vec![None; n];
        for peer in (0..n).filter(|&p| p != me) {
            slot[peer] = Some(m.receive(peer, TAG_ALL_TO_ALL, Header::WORDS, me)?);
        }
        for peer in (0..n).filter(|&p| p != me) {
            m.send(peer, TAG_ALL_TO_ALL, &mine.encode(), me)?;
        }
        self.messages += 2 * (n as u64 - 1);
        if !m.complete_by(deadline, me)? {
            let missing: Vec<usize> = (0..n).filter(|&p| slot[p].is_some_and(|i| !m.arrived(i))).collect();
            if !missing.is_empty() {
                return Err(Error::Timeout {
                    op: mine.op.name(),
                    seq: mine.seq,
                    rank: me,
                    missing,
                    timeout: self.options.timeout,
                });
            }
        }
        let mut headers = Vec::with_capacity(n);
        for (peer, slot) in slot.iter().enumerate() {
            let header = match slot {
                None => Some(*mine),
                Some(i) => {
                    let words: &[u64; Header::WORDS] = m.words(*i).try_into().expect("header length");
                    Header::decode(words)
                }
            };
            let Some(header) = header else {
                return Err(Error::OrderMismatch {
                    seq: mine.seq,
                    rank: me,
                    op: mine.op.name().into(),
                    other_rank: peer,
                    other_op: "a message that is not a ballast handshake".into(),
                });
            };
            headers.push(header);
        }
        verify_headers(me, mine, &headers)?;
        Ok(headers)
    }
}
