//! When a rank dies: `ballast launch` starts the job again from its newest checkpoint, on the
//! survivors when a rank's process died, on the same ranks after a transient stall, and never
//! after bad input.
//!
//! The job is the ResNet example (small: width 8, 2 stages of 1 block) under `mpirun -np 3`, 100
//! steps with a
//! checkpoint every 10, on a fixed plan (`--initial-plan equal --no-rebalance --micro-batch
//! largest`, no memory budgets), so every run is deterministic and a restarted run can be
//! compared bit for bit with a reference that resumes the same checkpoint by hand. Each fault
//! runs `BALLAST_RESTART_TRIALS` trials (3 by default; `scripts/restart-trials.sh` runs 20).
#![cfg(feature = "mpi")]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ballast_tests::{bin, one_job, text};

const STEPS: u64 = 100;
const EVERY: u64 = 10;
/// The job's synthetic set and global batch.
const SAMPLES: usize = 2000;
const BATCH: usize = 48;
/// How long one supervised run may take before the test calls it hung.
const LIMIT: Duration = Duration::from_secs(600);

fn trials() -> u64 {
    std::env::var("BALLAST_RESTART_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// The job under test, a small ResNet on 2000 synthetic images (about 50 ms a step here).
const JOB: [&str; 8] = [
    "--width",
    "8",
    "--stages",
    "2",
    "--blocks",
    "1",
    "--synthetic-images",
    "2000",
];

/// The job's arguments, writing into `dir`.
fn job_args(dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = JOB.map(String::from).to_vec();
    args.extend(
        [
            "--global-batch",
            "48",
            "--steps",
            "100",
            "--checkpoint-every",
            "10",
            "--keep",
            "20",
            "--log-every",
            "1",
            "--initial-plan",
            "equal",
            "--no-rebalance",
            "--micro-batch",
            "largest",
            "--seed",
            "5",
        ]
        .map(String::from),
    );
    args.extend(["--work-dir".into(), dir.display().to_string()]);
    args.extend(["--checkpoint-dir".into(), dir.join("ck").display().to_string()]);
    args.extend(["--metrics".into(), dir.join("m.jsonl").display().to_string()]);
    args
}

/// `mpirun -np <ranks> ballast <job args>`, as words.
fn mpirun_words(ranks: usize, dir: &Path) -> Vec<String> {
    let mut words: Vec<String> = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np"]
        .map(String::from)
        .to_vec();
    words.push(ranks.to_string());
    words.push(bin("resnet"));
    words.extend(job_args(dir));
    words
}

/// A supervised run: its output lines as they come, with the time each arrived.
struct Supervised {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    mark: String,
    started: Instant,
}

impl Supervised {
    /// `ballast launch --max-restarts 2 --min-ranks 2 -- mpirun -np 3 resnet ...`; every
    /// process of it carries `BALLAST_TEST_MARK=<mark>`, by which the test finds its ranks.
    fn start(dir: &Path, envs: &[(&str, &str)]) -> Self {
        let mut words: Vec<String> = ["launch", "--max-restarts", "2", "--min-ranks", "2", "--"]
            .map(String::from)
            .to_vec();
        words.extend(mpirun_words(3, dir));
        Self::spawn(&bin("ballast"), &words, dir, envs)
    }

    /// `program words...`, marked and watched as [`Supervised::start`] does.
    fn spawn(program: &str, words: &[String], dir: &Path, envs: &[(&str, &str)]) -> Self {
        let mark = format!("{}-{}", std::process::id(), dir.display());
        let mut cmd = Command::new(program);
        cmd.args(words)
            .env("BALLAST_TEST_MARK", &mark)
            .env("BALLAST_HEARTBEAT_DIR", dir.join("heartbeat"))
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("ballast launch");
        let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push((Instant::now(), line));
                }
            });
        }
        Self {
            child,
            lines,
            mark,
            started: Instant::now(),
        }
    }

    /// Waits for a line that `pred` accepts; its arrival time.
    fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> Instant {
        loop {
            if let Some((t, _)) = self.lines.lock().unwrap().iter().find(|(_, l)| pred(l)) {
                return *t;
            }
            if self.started.elapsed() > LIMIT || self.child.try_wait().unwrap().is_some() {
                let _ = self.child.kill();
                panic!("never saw {what}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of rank `rank` of this run (its first attempt, or the current one).
    fn rank_pid(&self, rank: usize) -> u32 {
        let want = [
            format!("BALLAST_TEST_MARK={}", self.mark),
            format!("OMPI_COMM_WORLD_RANK={rank}"),
        ];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
                    continue;
                };
                let vars: Vec<String> = environ
                    .split(|&b| b == 0)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .collect();
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
                if want.iter().all(|w| vars.contains(w)) && exe.ends_with("resnet") {
                    return pid;
                }
            }
            assert!(Instant::now() < deadline, "rank {rank} not found");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the supervisor to end: its exit code and everything it printed.
    fn finish(mut self) -> (i32, String) {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200));
                let code = status.code().expect("the run ended by a signal");
                // No process of the run is left.
                let left = self.processes_left();
                assert!(
                    left.is_empty(),
                    "processes {left:?} outlived the run\n{}",
                    self.output()
                );
                return (code, self.output());
            }
            if self.started.elapsed() > LIMIT {
                let _ = self.child.kill();
                panic!("the run hung:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn processes_left(&self) -> Vec<u32> {
        let mark = format!("BALLAST_TEST_MARK={}", self.mark);
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == mark.as_bytes()))
                    && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
            })
            .collect()
    }

    fn output(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| format!("{l}\n"))
            .collect()
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// The checksum of the summary line that says `trained steps <from>..100 on <ranks> ranks`.
fn final_checksum(output: &str, from: u64, ranks: usize) -> String {
    let head = format!("trained steps {from}..{STEPS} on {ranks} ranks");
    let line = output
        .lines()
        .find(|l| l.starts_with(&head))
        .unwrap_or_else(|| panic!("no line `{head}`:\n{output}"));
    line.split("checksum ")
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .to_string()
}

/// The number after `prefix` in the first line holding it.
fn number_after(output: &str, prefix: &str) -> u64 {
    let at = output
        .find(prefix)
        .unwrap_or_else(|| panic!("no `{prefix}`:\n{output}"));
    output[at + prefix.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The uninterrupted 3-rank run (every checkpoint kept), and the runs that resume one of its
/// checkpoints by hand on 2 or 3 ranks, each done once.
struct Reference {
    dir: tempfile::TempDir,
    resumed: BTreeMap<(u64, usize), String>,
}

impl Reference {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = run_job(3, dir.path(), false);
        assert!(out.0, "{}", out.1);
        Self {
            dir,
            resumed: BTreeMap::new(),
        }
    }

    /// The final checksum of resuming the reference's checkpoint of `step` on `ranks` ranks.
    fn resumed(&mut self, step: u64, ranks: usize) -> String {
        let ck = self.dir.path().join("ck");
        self.resumed
            .entry((step, ranks))
            .or_insert_with(|| {
                let dir = tempfile::tempdir().unwrap();
                std::fs::create_dir_all(dir.path().join("ck")).unwrap();
                let name = format!("step-{step:010}.safetensors");
                std::fs::copy(ck.join(&name), dir.path().join("ck").join(&name)).unwrap();
                let (ok, output) = run_job(ranks, dir.path(), true);
                assert!(ok, "{output}");
                final_checksum(&output, step, ranks)
            })
            .clone()
    }
}

/// `mpirun -np <ranks> resnet ...` in `dir` (with `--resume`): success and output.
fn run_job(ranks: usize, dir: &Path, resume: bool) -> (bool, String) {
    let _one = one_job();
    let mut words = mpirun_words(ranks, dir);
    if resume {
        words.push("--resume".into());
    }
    let out = Command::new(&words[0])
        .args(&words[1..])
        .env("BALLAST_HEARTBEAT_DIR", dir.join("heartbeat"))
        .output()
        .unwrap();
    (out.status.success(), text(&out))
}

/// Every epoch's samples are taken once: for each step, the run that counted it (the last one
/// to record it) took positions that tile the step's slice of the epoch, and the steps of an
/// epoch tile the epoch.
fn each_sample_once(metrics: &Path) {
    let text = std::fs::read_to_string(metrics).unwrap();
    // step -> (run, rank -> positions), the last run to record the step winning.
    let mut steps: BTreeMap<u64, (String, BTreeMap<u64, [usize; 2]>)> = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] != "train" {
            continue;
        }
        let (run, step, rank) = (
            v["run"].as_str().unwrap().to_string(),
            v["step"].as_u64().unwrap(),
            v["rank"].as_u64().unwrap(),
        );
        let positions: [usize; 2] = serde_json::from_value(v["positions"].clone()).unwrap();
        let entry = steps.entry(step).or_insert_with(|| (run.clone(), BTreeMap::new()));
        if entry.0 != run {
            *entry = (run, BTreeMap::new());
        }
        entry.1.insert(rank, positions);
    }
    assert_eq!(
        steps.keys().copied().collect::<Vec<_>>(),
        (0..STEPS).collect::<Vec<_>>()
    );
    let per_epoch = SAMPLES.div_ceil(BATCH) as u64;
    let mut next_in_epoch = 0;
    for (step, (_, ranks)) in &steps {
        if step % per_epoch == 0 {
            next_in_epoch = 0;
        }
        for positions in ranks.values() {
            assert_eq!(
                positions[0], next_in_epoch,
                "step {step}: a gap or an overlap in the epoch's samples"
            );
            next_in_epoch = positions[1];
        }
        if step % per_epoch == per_epoch - 1 {
            assert_eq!(next_in_epoch, SAMPLES, "epoch ending at step {step} missed samples");
        }
    }
}

/// The first metrics line of kind `restart`.
fn restart_record(metrics: &Path) -> serde_json::Value {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["kind"] == "restart")
        .expect("a restart line in the metrics")
}

/// A small generator for the trials' steps (the same trials every run).
fn pick(trial: u64, salt: u64, low: u64, high: u64) -> u64 {
    let mut x = (trial + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    low + (x >> 33) % (high - low + 1)
}

fn min_median_max(mut xs: Vec<f64>) -> String {
    xs.sort_by(f64::total_cmp);
    format!("{:.2}/{:.2}/{:.2}", xs[0], xs[xs.len() / 2], xs[xs.len() - 1])
}

#[test]
fn restart_after_a_killed_rank_goes_on_on_the_survivors() {
    let mut reference = Reference::new();
    let mut restart_s = Vec::new();
    for trial in 0..trials() {
        let dir = tempfile::tempdir().unwrap();
        let kill_at = pick(trial, 1, 15, 85);
        let (code, output, seconds) = {
            let _one = one_job();
            let mut run = Supervised::start(dir.path(), &[("BALLAST_TIMEOUT_SECS", "10")]);
            run.wait_line("the kill step", |l| l.starts_with(&format!("step {kill_at:>5} ")));
            signal(run.rank_pid(2), "-KILL");
            let killed = Instant::now();
            let again = run.wait_line("training again", |l| l.starts_with("ballast launch: training again"));
            let (code, output) = run.finish();
            (code, output, again.duration_since(killed).as_secs_f64())
        };
        assert_eq!(code, 0, "trial {trial}\n{output}");
        assert!(
            output.contains("ballast launch: restart 1 of 2: rank(s) [2] on host "),
            "{output}"
        );
        assert!(!output.contains("restart 2 of"), "{output}");
        let from = number_after(&output, "resuming from the checkpoint of step ");
        let last = number_after(&output, "lost (process ended) after step ");
        // Lost: at most one checkpoint interval, plus the steps rank 0 ran while the interval's
        // checkpoint was still being written in the background (a few milliseconds here).
        assert!(
            from % EVERY == 0 && last >= kill_at && last - from <= EVERY + 2,
            "trial {trial}: killed after step {kill_at}, last step seen {last}, resumed from {from}\n{output}"
        );
        assert_eq!(
            final_checksum(&output, from, 2),
            reference.resumed(from, 2),
            "trial {trial}\n{output}"
        );
        each_sample_once(&dir.path().join("m.jsonl"));
        let record = restart_record(&dir.path().join("m.jsonl"));
        assert_eq!(
            (record["lost"].clone(), record["ranks"].clone()),
            (serde_json::json!([2]), serde_json::json!(2))
        );
        restart_s.push(seconds);
        println!("trial {trial}: rank 2 killed after step {kill_at}; resumed on 2 ranks from step {from} ({} steps lost); first step after the restart {seconds:.2}s after the kill", last - from);
    }
    println!(
        "restart after a killed rank: {} trials, death to first step min/median/max {} s",
        restart_s.len(),
        min_median_max(restart_s)
    );
}

#[test]
fn restart_after_a_kill_during_a_checkpoint_write_uses_the_previous_checkpoint() {
    let mut reference = Reference::new();
    for trial in 0..trials() {
        let dir = tempfile::tempdir().unwrap();
        let write = pick(trial, 2, 2, 8) * EVERY;
        let ck = dir.path().join("ck");
        let (code, output) = {
            let _one = one_job();
            // Rank 0 writes; every write pauses halfway for 1.5 s, and the test kills it there.
            let pause = [
                ("BALLAST_TESTKIT_WRITE_PAUSE_MS", "1500"),
                ("BALLAST_TIMEOUT_SECS", "10"),
            ];
            let mut run = Supervised::start(dir.path(), &pause);
            run.wait_line("the kill step", |l| l.starts_with(&format!("step {write:>5} ")));
            let tmp = format!(".tmp-step-{write:010}-");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !std::fs::read_dir(&ck)
                .unwrap()
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with(&tmp))
            {
                assert!(Instant::now() < deadline, "the write of step {write} never started");
                std::thread::sleep(Duration::from_millis(10));
            }
            signal(run.rank_pid(0), "-KILL");
            run.finish()
        };
        assert_eq!(code, 0, "trial {trial}\n{output}");
        assert!(
            output.contains("ballast launch: restart 1 of 2: rank(s) [0] on host "),
            "{output}"
        );
        let from = number_after(&output, "resuming from the checkpoint of step ");
        assert_eq!(
            from,
            write - EVERY,
            "trial {trial}: the half-written checkpoint of step {write} must not be used\n{output}"
        );
        // Nothing is corrupt: every checkpoint left verifies, and none is partial.
        for entry in std::fs::read_dir(&ck).unwrap().filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("step-") {
                ballast::checkpoint::verify(&entry.path()).unwrap_or_else(|e| panic!("trial {trial}: {name}: {e}"));
            }
        }
        assert_eq!(
            final_checksum(&output, from, 2),
            reference.resumed(from, 2),
            "trial {trial}\n{output}"
        );
        each_sample_once(&dir.path().join("m.jsonl"));
        println!("trial {trial}: rank 0 killed while writing step {write}; resumed on 2 ranks from step {from}");
    }
}

#[test]
fn restart_after_a_transient_stall_keeps_every_rank() {
    let mut reference = Reference::new();
    for trial in 0..trials() {
        let dir = tempfile::tempdir().unwrap();
        let stop_at = pick(trial, 3, 15, 85);
        let (code, output) = {
            let _one = one_job();
            let mut run = Supervised::start(dir.path(), &[("BALLAST_TIMEOUT_SECS", "3")]);
            run.wait_line("the stop step", |l| l.starts_with(&format!("step {stop_at:>5} ")));
            let victim = run.rank_pid(1);
            signal(victim, "-STOP");
            // Past the 3 s deadline the others end; the stopped process then runs on, into its
            // launcher's SIGTERM (or has been killed already).
            std::thread::sleep(Duration::from_secs(6));
            let _ = Command::new("kill").args(["-CONT", &victim.to_string()]).status();
            run.finish()
        };
        assert_eq!(code, 0, "trial {trial}\n{output}");
        assert!(
            output.contains("ballast launch: restart 1 of 2: rank(s) [1] on host "),
            "{output}"
        );
        assert!(output.contains("stopped answering (transient)"), "{output}");
        assert!(output.contains("on the same 3 ranks"), "{output}");
        let from = number_after(&output, "resuming from the checkpoint of step ");
        assert_eq!(
            final_checksum(&output, from, 3),
            reference.resumed(from, 3),
            "trial {trial}\n{output}"
        );
        each_sample_once(&dir.path().join("m.jsonl"));
        println!("trial {trial}: rank 1 stopped after step {stop_at}; restarted on 3 ranks from step {from}");
    }
}

#[test]
fn bad_input_is_not_restarted() {
    let _one = one_job();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-cifar");
    let out = Command::new(bin("ballast"))
        .args([
            "launch",
            "--max-restarts",
            "2",
            "--",
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "3",
        ])
        .arg(bin("resnet"))
        .args(["--steps", "5", "--work-dir"])
        .arg(dir.path())
        .arg("--checkpoint-dir")
        .arg(dir.path().join("ck"))
        .arg("--data")
        .arg(&missing)
        .env("BALLAST_HEARTBEAT_DIR", dir.path().join("heartbeat"))
        .output()
        .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert_eq!(all.matches("not restarting").count(), 1, "{all}");
    assert!(!all.contains("ballast launch: restart"), "{all}");
    // The three ranks fail alike and the message is said once: by rank 0, or by the supervisor
    // for the others when the launcher ended rank 0 first.
    assert_eq!(all.matches("resnet: error:").count(), 1, "{all}");
    assert!(all.contains(&missing.display().to_string()), "{all}");
}

#[test]
fn a_command_without_checkpoints_is_refused_before_it_runs() {
    let out = Command::new(bin("ballast"))
        .args(["launch", "--", "mpirun", "-np", "3", "ballast", "demo", "--steps", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("cannot find the job's checkpoint directory"),
        "{}",
        text(&out)
    );
}

/// The job with its 3 ranks as threads of one process, writing into `dir`.
fn threads_words(dir: &Path) -> Vec<String> {
    let mut words = job_args(dir);
    words.extend(["--ranks".into(), "3".into()]);
    words
}

/// The job on 3 rank threads with `fault` injected (`BALLAST_TESTKIT_FAULT`) and a collective
/// deadline of `timeout_secs`: its exit code and output.
fn threads_job_with_fault(fault: &str, timeout_secs: &str) -> (i32, String) {
    let _one = one_job();
    let dir = tempfile::tempdir().unwrap();
    let envs = [("BALLAST_TESTKIT_FAULT", fault), ("BALLAST_TIMEOUT_SECS", timeout_secs)];
    Supervised::spawn(&bin("resnet"), &threads_words(dir.path()), dir.path(), &envs).finish()
}

/// A rank thread that panics ends the job at once with the lost-rank exit code, naming the
/// rank, although the collectives' deadline is ten minutes (a timeout would take that long).
#[test]
fn a_panicking_rank_thread_ends_the_job_as_a_lost_rank() {
    let (code, all) = threads_job_with_fault("panic:2:7", "600");
    println!("threads, rank 2 panics before step 7: exit {code}");
    assert_eq!(code, 75, "{all}");
    assert!(
        all.contains("rank 2's thread panicked: rank 2: the fault injected before step 7"),
        "{all}"
    );
    assert!(!all.contains("trained steps"), "{all}");
}

/// A rank thread stuck outside the collectives: the others time out naming it, and after one
/// more deadline the process ends with the lost-rank exit code instead of waiting for the
/// thread forever.
#[test]
fn a_stuck_rank_thread_ends_the_job_after_the_deadline() {
    let (code, all) = threads_job_with_fault("hang:1:7", "3");
    assert_eq!(code, 75, "{all}");
    assert!(all.contains("rank(s) [1] never arrived"), "{all}");
    assert!(
        all.contains("ballast: rank(s) [1] did not end within 3s after the job failed"),
        "{all}"
    );
}

/// `ballast launch` over a job whose ranks are threads: a panicking rank thread ends the
/// attempt with exit 75, the job starts again on the same 3 ranks from its newest checkpoint
/// and ends with the parameters of a run that was never interrupted.
#[test]
fn launch_restarts_a_threads_job_after_a_panicking_rank() {
    let _one = one_job();
    let reference = tempfile::tempdir().unwrap();
    let plain = Supervised::spawn(&bin("resnet"), &threads_words(reference.path()), reference.path(), &[]);
    let (code, plain) = plain.finish();
    assert_eq!(code, 0, "{plain}");
    let dir = tempfile::tempdir().unwrap();
    let once = dir.path().join("fault-fired");
    let once = once.display().to_string();
    let fault = [
        ("BALLAST_TESTKIT_FAULT", "panic:2:25"),
        ("BALLAST_TESTKIT_FAULT_ONCE", once.as_str()),
    ];
    let mut words: Vec<String> = ["launch", "--max-restarts", "2", "--", bin("resnet").as_str()]
        .map(String::from)
        .to_vec();
    words.extend(threads_words(dir.path()));
    let run = Supervised::spawn(&bin("ballast"), &words, dir.path(), &fault);
    let (code, all) = run.finish();
    assert_eq!(code, 0, "{all}");
    assert_eq!(all.matches("ballast launch: restart 1 of 2").count(), 1, "{all}");
    assert!(!all.contains("restart 2 of 2"), "{all}");
    assert!(all.contains("resuming from the checkpoint of step 20"), "{all}");
    assert_eq!(final_checksum(&all, 20, 3), final_checksum(&plain, 0, 3), "{all}");
    each_sample_once(&dir.path().join("m.jsonl"));
}
