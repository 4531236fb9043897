//! `ballast launch`: runs a job's launch command and starts it again from its newest checkpoint
//! when it loses a rank, on the survivors while at least `--min-ranks` are left.
//!
//! Every attempt gets a private report directory ([`collectives::env::REPORT_DIR`]), where each
//! rank that ends because of a lost peer leaves what it saw ([`LossReport`]); the supervisor
//! reads them to tell a rank whose process died (dropped) from one that only stopped answering
//! (a transient fault: the same ranks again). The command is rewritten by
//! [`ballast::cluster::restart`], which holds the decisions and their tests.

use std::{
    io::{BufRead, BufReader},
    os::unix::{fs::DirBuilderExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, ExitCode, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ballast::{
    checkpoint::Checkpointer,
    cluster::restart::{self, Findings, Relaunch},
    collectives::{self, loss::LossReport},
    job::{failure, RESTART_VAR},
};
use crossbeam_channel::{never, select, Receiver};
use serde_json::json;

/// Exit code when the job still failed after `--max-restarts` restarts.
const EXIT_GAVE_UP: u8 = 3;
/// How often the supervisor looks at the report directory while the job runs.
const POLL: Duration = Duration::from_millis(100);
/// How long the job's output may go on after its launcher exited (ranks that left the pipe open).
const DRAIN: Duration = Duration::from_secs(2);

/// Options of `ballast launch`.
#[derive(clap::Args)]
pub struct Args {
    /// Restarts allowed before giving up (exit 3).
    #[arg(long, default_value_t = 3)]
    max_restarts: u32,
    /// Fewest ranks to go on with: a rank whose process died is dropped while at least this
    /// many survive, and started again otherwise [default: the command's ranks, never fewer].
    #[arg(long)]
    min_ranks: Option<usize>,
    /// The job's checkpoint directory, when its command does not name one with
    /// --checkpoint-dir (a --config file, say) [default: the command's].
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Seconds the launcher may take to end every rank once one rank reported a lost peer;
    /// past them the supervisor ends the attempt's processes itself.
    #[arg(long, default_value_t = 60)]
    end_within_secs: u64,
    /// The job's launch command, after `--`: `mpirun -np 3 resnet ...`, `srun -n 3 resnet ...`,
    /// or a job whose ranks run as threads (`resnet --ranks 3 ...`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// The process group of the running attempt (0: none), for the signal handler to forward to.
static ATTEMPT_GROUP: AtomicI32 = AtomicI32::new(0);
/// Set when the supervisor was asked to stop (SIGINT, SIGTERM): no more restarts.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Supervises the job: runs it, and starts it again after a lost rank.
pub fn run(args: &Args) -> Result<ExitCode> {
    let mut job = Supervised::new(args)?;
    forward_stop_signals();
    loop {
        let attempt = job.attempt()?;
        if STOPPING.load(Ordering::Relaxed) {
            println!("ballast launch: stopped by a signal; not restarting");
            return Ok(ExitCode::from(attempt.code));
        }
        match attempt.code {
            0 => {
                println!("ballast launch: the job finished after {} restart(s)", job.restarts);
                return Ok(ExitCode::SUCCESS);
            }
            2 => {
                for (ranks, message) in &attempt.errors {
                    println!("ballast launch: rank(s) {ranks:?} ended with: {message}");
                }
                println!(
                    "ballast launch: the job failed with exit 2 (bad input or a bug, as it says above): \
                     starting it again would fail the same way; not restarting"
                );
                return Ok(ExitCode::from(2));
            }
            _ if job.restarts >= args.max_restarts => {
                println!(
                    "ballast launch: the job failed with exit {} after {} restart(s) (--max-restarts {}); giving up",
                    attempt.code, job.restarts, args.max_restarts
                );
                return Ok(ExitCode::from(EXIT_GAVE_UP));
            }
            _ => job.prepare_restart(&attempt)?,
        }
    }
}

/// The job under supervision: its command as it will run next, and what happened so far.
struct Supervised {
    argv: Vec<String>,
    world: usize,
    min_ranks: usize,
    checkpoints: Checkpointer,
    max_restarts: u32,
    restarts: u32,
    end_within: Duration,
    /// Variables the next attempt gets on top of this process's environment.
    env: Vec<(String, String)>,
    /// When the previous attempt lost its rank: the next attempt's first step reports how long
    /// the restart took.
    lost_at: Option<Instant>,
    /// Directories of the survivors' hostfiles, removed when the supervisor ends.
    written: Vec<PathBuf>,
}

impl Drop for Supervised {
    fn drop(&mut self) {
        for dir in &self.written {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One run of the command, as the supervisor saw it.
struct Attempt {
    /// The launcher's exit code (128 + signal when a signal ended it).
    code: u8,
    /// The last step rank 0 reported (`step N` progress lines).
    last_step: Option<u64>,
    /// What the ranks reported about lost peers.
    reports: Vec<LossReport>,
    /// Errors of ranks other than 0 that rank 0's does not say, with the ranks that gave them.
    errors: Vec<(Vec<usize>, String)>,
    /// When the first rank reported a lost peer, or the launcher exited.
    lost_at: Instant,
}

impl Supervised {
    fn new(args: &Args) -> Result<Self> {
        let argv = args.command.clone();
        let world = restart::ranks_of(&argv).unwrap_or(1);
        let min_ranks = args.min_ranks.unwrap_or(world);
        if min_ranks == 0 || min_ranks > world {
            bail!("--min-ranks {min_ranks} must be between 1 and the command's {world} rank(s)");
        }
        let dir = args
            .checkpoint_dir
            .clone()
            .or_else(|| restart::checkpoint_dir(&argv))
            .with_context(|| {
                format!(
                "cannot find the job's checkpoint directory in `{}`: give the job --checkpoint-dir DIR (or ballast \
                 launch --checkpoint-dir DIR when a --config file sets it); without checkpoints a restart would \
                 start over from step 0",
                argv.join(" ")
            )
            })?;
        Ok(Self {
            argv,
            world,
            min_ranks,
            checkpoints: Checkpointer::new(&dir, 1)?,
            max_restarts: args.max_restarts,
            restarts: 0,
            end_within: Duration::from_secs(args.end_within_secs),
            env: Vec::new(),
            lost_at: None,
            written: Vec::new(),
        })
    }

    /// Runs the command once, forwarding its output, until its launcher exits; ends the
    /// attempt's processes itself when the launcher takes longer than `--end-within-secs` after
    /// a rank reported a lost peer.
    fn attempt(&mut self) -> Result<Attempt> {
        let reports_dir = private_dir(self.restarts)?;
        let mut command = Command::new(&self.argv[0]);
        command
            .args(&self.argv[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(collectives::env::REPORT_DIR, &reports_dir)
            .stdout(Stdio::piped())
            .process_group(0);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start `{}`", self.argv[0]))?;
        let group = i32::try_from(child.id()).context("process id out of range")?;
        ATTEMPT_GROUP.store(group, Ordering::Relaxed);
        let lines = forward_lines(child.stdout.take().context("the job's output")?);
        let exited = {
            let (tx, rx) = crossbeam_channel::bounded(1);
            std::thread::spawn(move || {
                let _ = tx.send(child.wait());
            });
            rx
        };
        let watched = self.watch(group, &reports_dir, lines, exited)?;
        ATTEMPT_GROUP.store(0, Ordering::Relaxed);
        // No process of this attempt outlives it (a rank its launcher left behind).
        // SAFETY: kill(2) with a negative pid signals that process group; nothing is borrowed.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let reports = LossReport::read_all(&reports_dir).unwrap_or_default();
        let errors = failure::errors_beyond_rank_zero(&reports_dir);
        let _ = std::fs::remove_dir_all(&reports_dir);
        Ok(Attempt {
            reports,
            errors,
            ..watched
        })
    }

    /// Forwards the job's lines and waits for its launcher, with the deadline that starts at
    /// the first report.
    fn watch(
        &mut self,
        group: i32,
        reports_dir: &Path,
        mut lines: Receiver<String>,
        exited: Receiver<std::io::Result<ExitStatus>>,
    ) -> Result<Attempt> {
        let mut last_step = None;
        let mut reported: Option<Instant> = None;
        let mut forced = false;
        let mut open = true;
        let status = loop {
            select! {
                recv(lines) -> line => match line {
                    Ok(line) => {
                        println!("{line}");
                        if let Some(step) = progress_step(&line) {
                            self.note_first_step(step);
                            last_step = Some(step);
                        }
                    }
                    Err(_) => {
                        lines = never();
                        open = false;
                    }
                },
                recv(exited) -> status => break status.context("the job's waiter")?.context("waiting for the job")?,
                default(POLL) => {}
            }
            if reported.is_none() && has_loss_reports(reports_dir) {
                reported = Some(Instant::now());
            }
            if !forced && reported.is_some_and(|t| t.elapsed() > self.end_within) {
                println!(
                    "ballast launch: the launcher did not end the job within {:?} of a lost rank; ending its processes",
                    self.end_within
                );
                // SAFETY: kill(2) with a negative pid signals the attempt's process group.
                unsafe { libc::kill(-group, libc::SIGKILL) };
                forced = true;
            }
        };
        let until = Instant::now() + DRAIN;
        while let Some(line) = open.then(|| lines.recv_deadline(until).ok()).flatten() {
            println!("{line}");
            last_step = progress_step(&line).or(last_step);
        }
        Ok(Attempt {
            code: exit_code(status),
            last_step,
            reports: Vec::new(),
            errors: Vec::new(),
            lost_at: reported.unwrap_or_else(Instant::now),
        })
    }

    /// The first step after a restart says how long the restart took.
    fn note_first_step(&mut self, step: u64) {
        if let Some(lost) = self.lost_at.take() {
            println!(
                "ballast launch: training again at step {step}, {:.1}s after the loss (restart {})",
                lost.elapsed().as_secs_f64(),
                self.restarts
            );
        }
    }

    /// Decides where the job starts again, rewrites its command, and says so in one line.
    fn prepare_restart(&mut self, attempt: &Attempt) -> Result<()> {
        self.restarts += 1;
        let findings = findings(&attempt.reports, self.world);
        let relaunch = restart::decide(self.world, self.min_ranks, &findings);
        let resume_at = self.checkpoints.newest_step()?.map(|(step, _)| step);
        let argv = relaunch.rewrite(&self.argv, self.world)?;
        let argv = self.place(&relaunch, argv, &attempt.reports)?;
        self.argv = restart::with_resume(&argv, resume_at.is_some());
        if let Some(visible) = std::env::var("CUDA_VISIBLE_DEVICES")
            .ok()
            .or_else(|| self.env_value("CUDA_VISIBLE_DEVICES"))
            .and_then(|v| relaunch.visible_devices(&v, self.world))
        {
            self.set_env("CUDA_VISIBLE_DEVICES", visible);
        }
        let ranks = relaunch.ranks(self.world);
        let record = json!({
            "restart": self.restarts, "exit": attempt.code, "lost": findings.lost(), "stalled": findings.stalled,
            "dropped": match &relaunch { Relaunch::Survivors { dropped, .. } => dropped.clone(), _ => Vec::new() },
            "ranks_before": self.world, "ranks": ranks, "last_step": attempt.last_step, "from_step": resume_at,
        });
        println!("{}", self.restart_line(attempt, &findings, &relaunch, resume_at));
        self.set_env(RESTART_VAR, record.to_string());
        self.world = ranks;
        self.lost_at = Some(attempt.lost_at);
        Ok(())
    }

    /// `argv` with the launcher's hosts (`--host`, `-H`, `srun -w`, a hostfile) keeping as many
    /// slots as they keep ranks, from the hosts the ranks reported; a rewritten hostfile is
    /// written beside the attempts' report directories.
    fn place(&mut self, relaunch: &Relaunch, argv: Vec<String>, reports: &[LossReport]) -> Result<Vec<String>> {
        let hosts = reports
            .iter()
            .map(|r| r.hosts.as_slice())
            .find(|h| h.len() == self.world)
            .unwrap_or_default();
        let placed = relaunch.placement(&argv, hosts);
        let Some((at, kept)) = placed.hostfile else {
            return Ok(placed.argv);
        };
        let mut argv = placed.argv;
        let text = std::fs::read_to_string(&argv[at]).with_context(|| format!("reading the hostfile {}", argv[at]))?;
        let dir = private_dir_named(&format!("hostfile-{}", self.restarts))?;
        let path = dir.join("hostfile");
        std::fs::write(&path, restart::hostfile_for(&text, &kept))
            .with_context(|| format!("writing the survivors' hostfile {}", path.display()))?;
        argv[at] = path.display().to_string();
        self.written.push(dir);
        Ok(argv)
    }

    /// `ballast launch: restart 1 of 2: ...`: which ranks, which step, what was lost, and where
    /// the job goes on.
    fn restart_line(
        &self,
        attempt: &Attempt,
        findings: &Findings,
        relaunch: &Relaunch,
        resume_at: Option<u64>,
    ) -> String {
        // Every rank's host, as the ranks gathered them; else the hosts of the reports that
        // named the ranks on their own host.
        let rank_hosts = attempt.reports.iter().map(|r| &r.hosts).find(|h| h.len() == self.world);
        let hosts = |ranks: &[usize]| -> String {
            let mut named: Vec<String> = match rank_hosts {
                Some(all) => ranks.iter().filter_map(|&r| all.get(r).cloned()).collect(),
                None => attempt
                    .reports
                    .iter()
                    .filter(|r| r.exited.iter().chain(&r.stalled).any(|x| ranks.contains(x)))
                    .map(|r| r.host.clone())
                    .collect(),
            };
            named.sort();
            named.dedup();
            if named.is_empty() {
                String::new()
            } else {
                format!(" on host {}", named.join(", "))
            }
        };
        let what = match (findings.lost(), findings.stalled.is_empty()) {
            (lost, _) if !lost.is_empty() => format!("rank(s) {lost:?}{} lost (process ended)", hosts(&lost)),
            (_, false) => format!(
                "rank(s) {:?}{} stopped answering (transient)",
                findings.stalled,
                hosts(&findings.stalled)
            ),
            _ => "no rank named".to_string(),
        };
        let at = attempt
            .last_step
            .map_or("before its first step".into(), |s| format!("after step {s}"));
        let from = match resume_at {
            Some(step) => {
                let lost = attempt
                    .last_step
                    .map_or(String::new(), |s| format!(", {} step(s) lost", s.saturating_sub(step)));
                format!("resuming from the checkpoint of step {step}{lost}")
            }
            None => "no checkpoint yet: starting over from step 0".into(),
        };
        let on = match relaunch {
            Relaunch::Survivors { dropped, ranks } => {
                format!("on {ranks} rank(s) without rank(s) {dropped:?} (new plan below)")
            }
            Relaunch::SameRanks { kept } if !kept.is_empty() => format!(
                "on the same {} ranks (without rank(s) {kept:?} fewer than --min-ranks {} would be left)",
                self.world, self.min_ranks
            ),
            Relaunch::SameRanks { .. } => format!("on the same {} ranks", self.world),
        };
        format!(
            "ballast launch: restart {} of {}: {what} {at} (launcher exit {}); {from}, {on}: {}",
            self.restarts,
            self.max_restarts,
            attempt.code,
            self.argv.join(" ")
        )
    }

    fn env_value(&self, key: &str) -> Option<String> {
        self.env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn set_env(&mut self, key: &str, value: String) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value));
    }
}

/// The ranks' reports merged: who died, who stalled, and the ranks of a host lost as a whole
/// (named by survivors that saw no local culprit, and silent themselves).
fn findings(reports: &[LossReport], world: usize) -> Findings {
    let mut exited: Vec<usize> = reports.iter().flat_map(|r| r.exited.iter().copied()).collect();
    exited.sort_unstable();
    exited.dedup();
    let mut stalled: Vec<usize> = reports
        .iter()
        .flat_map(|r| r.stalled.iter().copied())
        .filter(|r| !exited.contains(r))
        .collect();
    stalled.sort_unstable();
    stalled.dedup();
    let reporters: Vec<usize> = reports.iter().map(|r| r.rank).collect();
    let mut unreported_elsewhere: Vec<usize> = reports
        .iter()
        .flat_map(|r| r.elsewhere.iter().copied())
        .filter(|r| *r < world && !reporters.contains(r) && !exited.contains(r) && !stalled.contains(r))
        .collect();
    unreported_elsewhere.sort_unstable();
    unreported_elsewhere.dedup();
    Findings {
        exited,
        stalled,
        unreported_elsewhere,
    }
}

/// A fresh directory for an attempt's reports, private to this user (mode 0700), in
/// `XDG_RUNTIME_DIR` when there is one.
fn private_dir(attempt: u32) -> Result<PathBuf> {
    private_dir_named(&attempt.to_string())
}

/// A fresh directory `ballast-launch-<pid>-<name>`, private to this user (mode 0700), in
/// `XDG_RUNTIME_DIR` when there is one. Whatever held the name is removed first (a link is
/// removed, not followed), and the directory is created anew, never reused.
fn private_dir_named(name: &str) -> Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute() && d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("ballast-launch-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating the private directory {}", dir.display()))?;
    Ok(dir)
}

fn has_loss_reports(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| !failure::is_error_file(&e.file_name().to_string_lossy()))))
}

/// The job's output, line by line, from a thread that ends at its end.
fn forward_lines(out: std::process::ChildStdout) -> Receiver<String> {
    let (tx, rx) = crossbeam_channel::bounded(1024);
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The step of rank 0's progress line `step    37    12.3s  loss ...`.
fn progress_step(line: &str) -> Option<u64> {
    line.strip_prefix("step ")?.split_whitespace().next()?.parse().ok()
}

/// The launcher's exit code, or 128 + the signal that ended it.
fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
        (None, None) => 1,
    }
}

extern "C" fn on_stop_signal(signal: libc::c_int) {
    STOPPING.store(true, Ordering::Relaxed);
    let group = ATTEMPT_GROUP.load(Ordering::Relaxed);
    if group > 0 {
        // SAFETY: kill(2) is async-signal-safe; it forwards the signal to the attempt's group.
        unsafe { libc::kill(-group, signal) };
    }
}

/// SIGINT and SIGTERM reach the job (its own process group does not get the terminal's
/// signals) and stop the supervisor from starting it again.
fn forward_stop_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is a valid value of the C struct.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action.sa_mask` is a valid sigset to empty; the handler only touches atomics
        // and calls kill(2), which are async-signal-safe.
        unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast::collectives::loss::LossEvent;

    fn report(
        rank: usize,
        event: LossEvent,
        exited: Vec<usize>,
        stalled: Vec<usize>,
        elsewhere: Vec<usize>,
    ) -> LossReport {
        LossReport {
            rank,
            host: format!("h{rank}"),
            event,
            exited,
            stalled,
            elsewhere,
            hosts: Vec::new(),
        }
    }

    #[test]
    fn reports_merge_into_the_dead_the_stalled_and_lost_hosts() {
        let stopped = LossEvent::StoppedByLauncher;
        let died = [
            report(0, stopped, vec![2], vec![], vec![]),
            report(1, stopped, vec![2], vec![], vec![]),
        ];
        assert_eq!(findings(&died, 3).lost(), vec![2]);
        let stalled = [report(0, LossEvent::Stalled, vec![], vec![1], vec![])];
        let f = findings(&stalled, 3);
        assert_eq!((f.lost(), f.stalled), (vec![], vec![1]));
        // Host b (ranks 2, 3) went silent: the survivors on host a name it.
        let host = [
            report(0, stopped, vec![], vec![], vec![2, 3]),
            report(1, stopped, vec![], vec![], vec![2, 3]),
        ];
        assert_eq!(findings(&host, 4).lost(), vec![2, 3]);
        // A rank elsewhere that wrote its own report was not lost with its host.
        let both = [
            report(0, stopped, vec![], vec![], vec![2]),
            report(2, LossEvent::Stalled, vec![], vec![], vec![0]),
        ];
        assert_eq!(findings(&both, 3).lost(), Vec::<usize>::new());
    }

    #[test]
    fn progress_lines_give_their_step() {
        assert_eq!(progress_step("step    37    12.3s  loss 1.0"), Some(37));
        assert_eq!(progress_step("stepping"), None);
        assert_eq!(progress_step("held-out evaluation at step 4"), None);
    }
}
