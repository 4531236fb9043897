//! The data-phase watchdog: a thread that ends the process when a call inside MPI outlives its
//! deadline, and the heartbeat files that let it name the peers that stopped.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use super::EXIT_STALLED;

/// Ends the process if a data-phase call outlives its deadline (see the module docs), naming
/// the peers that stopped.
///
/// Inside an MPI collective nothing says which peer is missing, so every rank's watchdog thread
/// also writes a heartbeat file (its rank, refreshed twice a second) in a directory shared by
/// the ranks of a host ([`crate::env::HEARTBEAT_DIR`], default `/tmp/ballast-heartbeat-<launcher
/// pid>`). A stopped or dead process stops refreshing its file; when a stall is detected the
/// stale files name the culprits. Ranks on other hosts without a shared directory are not seen
/// and the message says so.
pub(super) struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    heartbeat: Option<PathBuf>,
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
    pub(super) fn spawn(rank: usize, size: usize) -> Self {
        let dir = std::env::var_os(crate::env::HEARTBEAT_DIR)
            .map(PathBuf::from)
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
        if let Some(dir) = &self.heartbeat {
            let _ = std::fs::remove_file(dir.join(format!("rank-{rank}")));
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn beat(dir: &Path, rank: usize) {
    // The file's modification time is the heartbeat (a process stopped halfway through a write
    // still leaves a usable time).
    let _ = std::fs::write(dir.join(format!("rank-{rank}")), b"alive\n");
}

/// Ranks (other than `me`) whose heartbeat file exists but was last touched more than
/// [`HEARTBEAT_STALE`] ago.
fn stale_ranks(dir: &Path, size: usize, me: usize) -> Vec<usize> {
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
