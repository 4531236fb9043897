//! The data-phase watchdog: a thread that ends the process when a call inside MPI outlives its
//! deadline, and the heartbeat files (each holding its rank's process id) that let it name the
//! peers that stopped. When the launcher stops this rank with SIGTERM (Open MPI does once
//! another rank died), the same files name the ranks of this host that exited first.

use std::{
    ffi::c_int,
    sync::{
        atomic::{AtomicI32, Ordering},
        Arc, Condvar, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use super::{
    heartbeat::{self, HeartbeatDir},
    EXIT_STALLED,
};
use crate::loss::{LossEvent, LossReport};

/// Ends the process if a data-phase call outlives its deadline (see the module docs), naming
/// the peers that stopped.
///
/// Inside an MPI collective nothing says which peer is missing, so every rank's watchdog thread
/// also writes a heartbeat file (its rank, refreshed twice a second) in a directory shared by
/// the ranks of a host ([`crate::env::HEARTBEAT_DIR`], default
/// `$XDG_RUNTIME_DIR/ballast-heartbeat-<uid>-<launcher pid>`, private to the user: see
/// [`super::heartbeat`]). A stopped or dead process stops refreshing its file; when a stall is detected the
/// stale files name the culprits. Ranks on other hosts without a shared directory are not seen
/// and the message says so.
pub(super) struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    heartbeat: Arc<HeartbeatDir>,
    /// Every rank's host name, by rank, once gathered at start-up ([`Watchdog::know_hosts`]).
    hosts: Arc<OnceLock<Vec<String>>>,
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
/// How long a rank stopped by the launcher looks for the peer that exited before it (Open MPI
/// waits at least half a second between SIGTERM and SIGKILL).
const EXIT_SETTLE: Duration = Duration::from_millis(300);

impl Watchdog {
    /// Starts the watchdog of `rank` and writes its first heartbeat.
    ///
    /// # Errors
    /// [`crate::Error::HeartbeatDir`] when the heartbeat directory is not private to this user
    /// (see [`super::heartbeat`]).
    pub(super) fn spawn(rank: usize, size: usize) -> crate::Result<Self> {
        let heartbeat = Arc::new(HeartbeatDir::open(&heartbeat::default_path(), rank)?);
        // The first heartbeat is written before this rank takes part in any collective, so a
        // peer that outlives it can always read its process id.
        heartbeat.beat(rank);
        let hosts: Arc<OnceLock<Vec<String>>> = Arc::default();
        report_exited_peers_on_sigterm(rank, size, Arc::clone(&heartbeat), Arc::clone(&hosts));
        let known_hosts = Arc::clone(&hosts);
        let shared = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let theirs = Arc::clone(&shared);
        let hb = Arc::clone(&heartbeat);
        std::thread::Builder::new()
            .name("ballast-mpi-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*theirs;
                let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
                let mut last_beat = Some(Instant::now());
                loop {
                    if state.stop {
                        return;
                    }
                    if last_beat.is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY / 2) {
                        hb.beat(rank);
                        last_beat = Some(Instant::now());
                    }
                    let now = Instant::now();
                    let wait = match state.armed {
                        Some((op, seq, deadline, timeout)) if now >= deadline => {
                            let suspects = stale_ranks(&hb, size, rank);
                            let (exited, stalled) = exited_or_stalled(&hb, &suspects);
                            // Marked first, as a rank stopped by the launcher is: the peers
                            // that outlive this exit must not take it for the cause.
                            hb.mark_stopped(rank);
                            leave_report(rank, LossEvent::Stalled, exited, stalled, known_hosts.get());
                            let named = if suspects.is_empty() {
                                format!(
                                    "no rank on this host stopped responding, {} (heartbeats in {})",
                                    elsewhere(known_hosts.get(), rank),
                                    hb.path().display()
                                )
                            } else {
                                format!("rank(s) {suspects:?} stopped responding")
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
        Ok(Self {
            shared,
            heartbeat,
            hosts,
        })
    }

    /// Records every rank's host name (by rank), so that a rank stopped or stalled while all
    /// ranks of its own host are alive names the other hosts' ranks.
    pub(super) fn know_hosts(&self, hosts: Vec<String>) {
        let _ = self.hosts.set(hosts);
    }

    /// A handshake of `rank` timed out waiting for `missing`: leaves the report that tells the
    /// ranks whose process exited from those that run on but stopped answering (see
    /// [`crate::loss`]), and marks this rank as ending because of them.
    pub(super) fn report_missing(&self, rank: usize, missing: &[usize]) {
        let hb = &self.heartbeat;
        let (exited, stalled) = exited_or_stalled(hb, missing);
        hb.mark_stopped(rank);
        leave_report(rank, LossEvent::Stalled, exited, stalled, self.hosts.get());
    }

    pub(super) fn arm(&self, op: &'static str, seq: u64, timeout: Duration) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).armed = Some((op, seq, Instant::now() + timeout, timeout));
        cv.notify_one();
    }

    pub(super) fn disarm(&self) {
        let (lock, _) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).armed = None;
    }

    pub(super) fn stop(&self, rank: usize) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_one();
        self.heartbeat.remove(rank);
    }
}

/// Ranks (other than `me`) whose heartbeat file names a process that no longer runs, leaving
/// out those the launcher stopped (they exited because another rank did).
fn exited_ranks(dir: &HeartbeatDir, size: usize, me: usize) -> Vec<usize> {
    (0..size)
        .filter(|&r| r != me)
        .filter(|&r| has_exited(dir, r) && !dir.was_stopped(r))
        .collect()
}

/// Whether `rank`'s heartbeat names a process that no longer runs.
fn has_exited(dir: &HeartbeatDir, rank: usize) -> bool {
    dir.pid_of(rank).is_some_and(|pid| !process_runs(pid))
}

/// `ranks` of this host (those with a heartbeat here) split into those whose process exited
/// and those whose process runs on, or ended itself: a rank that marked itself stopped (its
/// watchdog, or the launcher's SIGTERM, ended it) did not die, so a peer whose report comes
/// after that exit (a rank continued after SIGSTOP whose own watchdog fired first) still counts
/// it as stalled. Ranks of other hosts are in neither.
fn exited_or_stalled(dir: &HeartbeatDir, ranks: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (mut exited, mut stalled) = (Vec::new(), Vec::new());
    for &r in ranks {
        match dir.pid_of(r) {
            Some(pid) if !process_runs(pid) && !dir.was_stopped(r) => exited.push(r),
            Some(_) => stalled.push(r),
            None => {}
        }
    }
    (exited, stalled)
}

/// Whether `pid` is a live process: not gone, not a zombie, and not already exiting (a process
/// killed with SIGKILL can take a while to release its memory before it becomes a zombie).
fn process_runs(pid: libc::pid_t) -> bool {
    /// `PF_EXITING` in the kernel's per-task flags (`include/linux/sched.h`).
    const PF_EXITING: u64 = 0x4;
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let exists =
        unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    // After the command name: state, ppid, pgrp, session, tty_nr, tpgid, flags, ...
    let ending = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let fields: Vec<&str> = s.rsplit(") ").next().unwrap_or("").split_whitespace().collect();
        let state = fields.first().copied().unwrap_or("");
        let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
        state == "Z" || state == "X" || flags & PF_EXITING != 0
    });
    exists && !ending
}

/// Ranks of this host that exited, waiting up to [`EXIT_SETTLE`] for one to show: the launcher
/// can stop this rank while the one that died is still being torn down.
fn exited_ranks_settled(dir: &HeartbeatDir, size: usize, me: usize) -> Vec<usize> {
    let until = Instant::now() + EXIT_SETTLE;
    loop {
        let gone = exited_ranks(dir, size, me);
        if !gone.is_empty() || Instant::now() >= until {
            return gone;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Write end of the pipe through which the SIGTERM handler wakes the reporting thread (-1: none).
static TERM_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigterm(_signal: c_int) {
    let fd = TERM_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; `byte` outlives the call.
        unsafe { libc::write(fd, std::ptr::from_ref(&byte).cast(), 1) };
    }
}

/// When the launcher stops this rank with SIGTERM, says which ranks of this host exited first
/// (their heartbeat files name processes that are gone), then exits with 143 as SIGTERM's
/// default action would. Installed only while SIGTERM has its default action: a program's own
/// handler stays in place.
fn report_exited_peers_on_sigterm(
    rank: usize,
    size: usize,
    heartbeat: Arc<HeartbeatDir>,
    hosts: Arc<OnceLock<Vec<String>>>,
) {
    // SAFETY: an all-zero sigaction is a valid value of the C struct.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: with a null new action, sigaction only writes the current one into `current`.
    if unsafe { libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut current) } != 0
        || current.sa_sigaction != libc::SIG_DFL
    {
        return;
    }
    let mut fds: [c_int; 2] = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    let [read_end, write_end] = fds;
    let reporter = std::thread::Builder::new()
        .name("ballast-mpi-sigterm".into())
        .spawn(move || {
            let mut byte = 0u8;
            // SAFETY: reads at most one byte into `byte` from the pipe's read end, which only
            // this thread uses.
            if unsafe { libc::read(read_end, std::ptr::from_mut(&mut byte).cast(), 1) } != 1 {
                return;
            }
            // Marked first: a peer stopped a moment later must not take this exit for the cause.
            heartbeat.mark_stopped(rank);
            let gone = exited_ranks_settled(&heartbeat, size, rank);
            leave_report(
                rank,
                LossEvent::StoppedByLauncher,
                gone.clone(),
                Vec::new(),
                hosts.get(),
            );
            let named = if gone.is_empty() {
                format!(
                    "no other rank on this host had exited, {}",
                    elsewhere(hosts.get(), rank)
                )
            } else {
                format!("rank(s) {gone:?} exited before it")
            };
            eprintln!(
                "ballast: rank {rank} (host {}) stopped by the launcher (SIGTERM): {named}",
                hostname()
            );
            // SAFETY: ends the process as SIGTERM's default action would, without running
            // destructors that could block in MPI.
            unsafe { libc::_exit(128 + libc::SIGTERM) };
        });
    if reporter.is_err() {
        // SAFETY: closing the two descriptors just created, used by nobody.
        unsafe {
            libc::close(read_end);
            libc::close(write_end);
        }
        return;
    }
    TERM_PIPE.store(write_end, Ordering::Relaxed);
    // SAFETY: an all-zero sigaction is a valid value of the C struct.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigterm as extern "C" fn(c_int) as libc::sighandler_t;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: `action.sa_mask` is a valid sigset to empty; the handler only calls write(2),
    // which is async-signal-safe, on a descriptor that stays open for the process's life.
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}

/// Ranks (other than `me`) whose heartbeat file exists but was last touched more than
/// [`HEARTBEAT_STALE`] ago, leaving out those that ended because of another rank.
fn stale_ranks(dir: &HeartbeatDir, size: usize, me: usize) -> Vec<usize> {
    (0..size)
        .filter(|&r| r != me)
        .filter(|&r| dir.age_of(r).is_some_and(|age| age > HEARTBEAT_STALE) && !dir.was_stopped(r))
        .collect()
}

/// Leaves this rank's finding for a supervisor (see [`crate::loss`]); a report that cannot be
/// written is said on stderr, since the process is about to end either way.
fn leave_report(rank: usize, event: LossEvent, exited: Vec<usize>, stalled: Vec<usize>, hosts: Option<&Vec<String>>) {
    let elsewhere = if exited.is_empty() && stalled.is_empty() {
        other_hosts_ranks(hosts, rank)
    } else {
        Vec::new()
    };
    let report = LossReport {
        rank,
        host: hostname(),
        event,
        exited,
        stalled,
        elsewhere,
        hosts: hosts.cloned().unwrap_or_default(),
    };
    if let Err(e) = report.write_if_asked() {
        eprintln!("ballast: rank {rank}: cannot leave its report for the supervisor: {e}");
    }
}

/// The ranks on hosts other than `me`'s (`hosts`: every rank's host name, when known).
fn other_hosts_ranks(hosts: Option<&Vec<String>>, me: usize) -> Vec<usize> {
    let Some(mine) = hosts.and_then(|h| h.get(me)) else {
        return Vec::new();
    };
    hosts
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, host)| *host != mine)
        .map(|(rank, _)| rank)
        .collect()
}

/// Where the lost rank must be when every rank of this host (`me`'s) is alive: the ranks of the
/// other hosts, by host (`hosts`: every rank's host name, when known).
fn elsewhere(hosts: Option<&Vec<String>>, me: usize) -> String {
    let Some(mine) = hosts.and_then(|h| h.get(me)) else {
        return "so a rank on another host may have (host names not gathered yet)".into();
    };
    let mut others: std::collections::BTreeMap<&str, Vec<usize>> = std::collections::BTreeMap::new();
    for (rank, host) in hosts.into_iter().flatten().enumerate() {
        if host != mine {
            others.entry(host.as_str()).or_default().push(rank);
        }
    }
    match others.len() {
        0 => "and every rank runs on this host".into(),
        1 => {
            let (host, ranks) = others.iter().next().expect("one host");
            format!("so the lost rank is on host {host}: rank(s) {ranks:?}")
        }
        _ => {
            let list: Vec<String> = others.iter().map(|(h, r)| format!("{h} {r:?}")).collect();
            format!("so the lost rank is on another host: {}", list.join(", "))
        }
    }
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank whose process is gone counts as exited, unless it marked itself stopped first (it
    /// ended on its own watchdog or the launcher's SIGTERM): then it stalled, it did not die.
    #[test]
    fn a_rank_that_ended_itself_is_stalled_not_exited() {
        let path = std::env::temp_dir().join(format!("ballast-wd-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        let hb = HeartbeatDir::open(&path, 0).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        std::fs::write(path.join("rank-1"), format!("{gone}\n")).unwrap();
        hb.beat(2);
        assert_eq!(exited_or_stalled(&hb, &[1, 2, 3]), (vec![1], vec![2]));
        hb.mark_stopped(1);
        assert_eq!(exited_or_stalled(&hb, &[1, 2, 3]), (vec![], vec![1, 2]));
        std::fs::remove_dir_all(&path).unwrap();
    }
}
