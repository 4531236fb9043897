//! Real launchers: a one-node Slurm (Debian's slurm-wlm, started by `scripts/slurm-local.sh`)
//! runs the ResNet job under `srun -n 3` and through `sbatch cluster/slurm.sbatch`, and two
//! "hosts" on this machine (`scripts/two-hosts.sh`) run it under one `mpirun`; all of them train
//! exactly what `mpirun -np 3` on one host trains with the same plan. A lost host is named.
//!
//! The plan is fixed (`--initial-plan equal --no-rebalance --micro-batch largest` without memory
//! budgets: equal shares, each in one micro-batch; a budget's cap comes from measured peaks,
//! which can differ by a sample between runs), so the runs must agree bit for bit: the same
//! shares and micro-batches, the same loss at every step, the same final parameters (checksum)
//! and held-out numbers. Slurm is stopped and its folder
//! removed when the test ends, also when it fails.
#![cfg(feature = "mpi")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use ballast::checkpoint::{self, Checkpointer};
use ballast_tests::{one_job, text, workspace_file};

/// The one-node Slurm, stopped when dropped.
struct Slurm {
    conf: String,
}

impl Slurm {
    fn script() -> PathBuf {
        PathBuf::from(workspace_file("scripts/slurm-local.sh"))
    }

    /// Starts Slurm, or says why it cannot run here.
    fn start() -> Result<Self, String> {
        let out = Command::new(Self::script())
            .arg("start")
            .output()
            .map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout.lines().find_map(|l| l.strip_prefix("export SLURM_CONF=")) {
            Some(conf) if out.status.success() => Ok(Self { conf: conf.to_string() }),
            _ => Err(text(&out)),
        }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new(Self::script()).arg("stop").output();
    }
}

const JOB_ARGS: [&str; 15] = [
    "--micro-batch",
    "largest",
    "--initial-plan",
    "equal",
    "--no-rebalance",
    "--steps",
    "20",
    "--metrics",
    "m.jsonl",
    "--log-every",
    "10",
    "--eval-every",
    "10",
    "--seed",
    "5",
];

fn job_args() -> Vec<&'static str> {
    JOB_ARGS.to_vec()
}

/// What must be the same under every launcher: per train line (rank, step, loss, share,
/// micro-batch, micro-batches), the summary's checksum and the final held-out line.
fn run_record(dir: &Path, out: &Output) -> (Vec<String>, String, String) {
    assert!(out.status.success(), "{}", text(out));
    let metrics = std::fs::read_to_string(dir.join("m.jsonl")).unwrap_or_else(|e| panic!("{e}\n{}", text(out)));
    let mut steps: Vec<String> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            format!(
                "rank {} step {} loss {} share {} micro {} {}",
                v["rank"], v["step"], v["loss"], v["share"], v["micro_batch"], v["micro_batches"]
            )
        })
        .collect();
    steps.sort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?}\n{stdout}"))
            .to_string()
    };
    let summary = line("trained steps");
    let checksum = summary[summary.find("checksum").unwrap()..].to_string();
    (steps, checksum, line("held-out evaluation at step 20"))
}

fn job_bin() -> String {
    ballast_tests::bin("resnet")
}

#[test]
fn launchers_srun_and_sbatch_train_what_mpirun_trains() {
    let _alone = one_job();
    let slurm = match Slurm::start() {
        Ok(slurm) => slurm,
        Err(why) => {
            println!("skipped: launchers_srun_and_sbatch_train_what_mpirun_trains: no Slurm here: {why}");
            return;
        }
    };
    let bin = job_bin();
    let run_in = |name: &str, cmd: &mut Command| {
        let dir = tempfile::tempdir().unwrap();
        let out = cmd
            .current_dir(dir.path())
            .env("SLURM_CONF", &slurm.conf)
            .output()
            .unwrap();
        println!(
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("trained"))
                .collect::<String>()
        );
        (run_record(dir.path(), &out), out)
    };
    let (mpirun, _) = run_in(
        "mpirun -np 3",
        Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "-np", "3", &bin])
            .args(job_args()),
    );
    let (srun, _) = run_in(
        "srun --mpi=pmix -n 3",
        Command::new("srun")
            .args(["--mpi=pmix", "--overcommit", "-n", "3", &bin])
            .args(job_args()),
    );
    // sbatch runs the template's doctor and job; its output file is the job's stdout.
    let bin_dir = Path::new(&bin).parent().unwrap().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let submitted = Command::new("sbatch")
        .args(["--wait", "--ntasks=3", "--overcommit", "--output=out.txt"])
        .arg(format!("--export=ALL,BALLAST_BIN={bin_dir}"))
        .arg(workspace_file("cluster/slurm.sbatch"))
        .args(job_args())
        .current_dir(dir.path())
        .env("SLURM_CONF", &slurm.conf)
        .output()
        .unwrap();
    assert!(submitted.status.success(), "{}", text(&submitted));
    let batch_out = Output {
        status: submitted.status,
        stdout: std::fs::read(dir.path().join("out.txt")).unwrap(),
        stderr: submitted.stderr.clone(),
    };
    let sbatch = run_record(dir.path(), &batch_out);
    let doctor = String::from_utf8_lossy(&batch_out.stdout);
    for rank in 0..3 {
        assert!(
            doctor.contains(&format!("rank         {rank} of 3 (local rank {rank})")),
            "the doctor names rank {rank} and its local rank\n{doctor}"
        );
    }
    assert_eq!(doctor.matches("launcher     Slurm srun").count(), 3, "{doctor}");
    println!("sbatch: {}", sbatch.1);
    assert_eq!(mpirun.0.len(), 3 * 20, "a train line per rank and step");
    for (name, other) in [("srun", &srun), ("sbatch", &sbatch)] {
        assert_eq!(other.0, mpirun.0, "{name}: steps differ from mpirun's");
        assert_eq!(other.1, mpirun.1, "{name}: final parameters differ from mpirun's");
        assert_eq!(other.2, mpirun.2, "{name}: held-out numbers differ from mpirun's");
    }
    drop(slurm);
    assert!(
        !Path::new("/tmp/ballast-slurm").exists(),
        "the Slurm folder is removed when the test ends"
    );
}

/// Two "hosts" on this machine (`scripts/two-hosts.sh`: network and UTS namespaces joined by a
/// veth pair, Open MPI's launch agent entering host-b's namespaces), torn down when dropped.
struct TwoHosts;

impl TwoHosts {
    fn script() -> PathBuf {
        PathBuf::from(workspace_file("scripts/two-hosts.sh"))
    }

    /// Sets the hosts up, or says why they cannot be here.
    fn up() -> Result<Self, String> {
        let out = Command::new(Self::script())
            .arg("up")
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(Self)
        } else {
            let _ = Command::new(Self::script()).arg("down").output();
            Err(text(&out))
        }
    }

    /// `mpirun` from host-a over both hosts (2 ranks on host-a, 1 on host-b) running `bin args`.
    fn mpirun(&self, bin: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(Self::script());
        cmd.args(["mpirun", "-np", "3"]);
        for var in [
            "OMPI_ALLOW_RUN_AS_ROOT",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
            "XDG_RUNTIME_DIR",
        ] {
            if std::env::var_os(var).is_some() {
                cmd.args(["-x", var]);
            }
        }
        cmd.arg(bin).args(args);
        cmd
    }

    /// Kills every process of host `h` with SIGKILL, all at once, as a host that dies takes its
    /// processes with it; returns them.
    fn kill(&self, h: &str) -> Vec<u32> {
        let victims = self.pids(h);
        assert!(!victims.is_empty(), "host-{h} runs nothing");
        let _ = Command::new("kill")
            .arg("-9")
            .args(victims.iter().map(u32::to_string))
            .status();
        victims
    }

    /// The hosts for test `test`, or `None` after printing why that test is skipped here.
    fn up_or_skip(test: &str) -> Option<Self> {
        Self::up()
            .map_err(|why| println!("skipped: {test}: no network namespaces here: {why}"))
            .ok()
    }

    /// The processes of host `h` (its network namespace).
    fn pids(&self, h: &str) -> Vec<u32> {
        let out = Command::new(Self::script()).args(["pids", h]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let _ = Command::new(Self::script()).arg("down").output();
    }
}

/// The ResNet job over two hosts (ranks 0 and 1 on host-a, rank 2 on host-b, TCP between them)
/// trains exactly what one host trains with the same plan: the same steps and losses, final
/// parameters and held-out numbers; `ballast doctor` names each rank's host and local rank.
#[test]
fn launchers_two_hosts_train_what_one_host_trains() {
    let _alone = one_job();
    let Some(hosts) = TwoHosts::up_or_skip("launchers_two_hosts_train_what_one_host_trains") else {
        return;
    };
    let bin = job_bin();
    let one_dir = tempfile::tempdir().unwrap();
    let one = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "3", &bin])
        .args(job_args())
        .current_dir(one_dir.path())
        .output()
        .unwrap();
    let one = run_record(one_dir.path(), &one);
    let two_dir = tempfile::tempdir().unwrap();
    let two = hosts
        .mpirun(&bin, &job_args())
        .current_dir(two_dir.path())
        .output()
        .unwrap();
    let two = run_record(two_dir.path(), &two);
    println!("one host: {}\ntwo hosts: {}\n{}", one.1, two.1, two.2);
    assert_eq!(two.0, one.0, "steps differ between one and two hosts");
    assert_eq!(two.1, one.1, "final parameters differ between one and two hosts");
    assert_eq!(two.2, one.2, "held-out numbers differ between one and two hosts");
    let doctor = hosts
        .mpirun(&ballast_tests::bin("ballast"), &["doctor"])
        .output()
        .unwrap();
    assert!(doctor.status.success(), "{}", text(&doctor));
    let report = String::from_utf8_lossy(&doctor.stdout);
    for (host, ranks) in [("host-a", 2), ("host-b", 1)] {
        assert_eq!(
            report.lines().filter(|l| *l == format!("host         {host}")).count(),
            ranks,
            "{report}"
        );
    }
    assert!(
        report.contains("rank         2 of 3 (local rank 0)"),
        "host-b's rank is its first: {report}"
    );
}

/// A lost host: every process of host-b (its Open MPI daemon and rank 2) is killed with SIGKILL
/// while the job trains and checkpoints every 5 steps. The survivors stop within the deadline,
/// both name rank 2 and host-b, and the newest checkpoint is complete. Two trials (more with
/// `BALLAST_LOST_HOST_TRIALS`), the kill 0.0–2.7 s after the first checkpoint.
#[test]
fn launchers_lost_host_is_named_and_the_checkpoint_is_complete() {
    let _alone = one_job();
    let Some(hosts) = TwoHosts::up_or_skip("launchers_lost_host_is_named_and_the_checkpoint_is_complete") else {
        return;
    };
    let trials: u64 = std::env::var("BALLAST_LOST_HOST_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let limit = std::time::Duration::from_secs(30);
    for trial in 0..trials {
        let dir = tempfile::tempdir().unwrap();
        let child = spawn_in(
            &mut hosts.mpirun(&job_bin(), &checkpointing_job("100000", &[])),
            dir.path(),
        );
        let cp = dir.path().join("cp");
        wait_for_a_checkpoint(&cp);
        std::thread::sleep(std::time::Duration::from_millis(300 * (trial * 7 % 10)));
        let victims = hosts.kill("b");
        let killed = std::time::Instant::now();
        let out = wait_with_deadline(child, limit);
        let secs = killed.elapsed().as_secs_f64();
        let all = text(&out);
        assert_ne!(out.status.code(), Some(0), "{all}");
        let named = "no other rank on this host had exited, so the lost rank is on host host-b: rank(s) [2]";
        assert_eq!(
            all.matches(named).count(),
            2,
            "both survivors name host-b and rank 2:\n{all}"
        );
        let newest = Checkpointer::new(&cp, 3)
            .unwrap()
            .newest()
            .unwrap()
            .expect("a checkpoint");
        checkpoint::verify(&newest).unwrap_or_else(|e| panic!("{}: {e}", newest.display()));
        println!(
            "lost host trial {trial}: {} processes of host-b killed; job ended after {secs:.2} s (exit {:?}); newest checkpoint {} complete",
            victims.len(),
            out.status.code(),
            newest.file_name().unwrap().to_string_lossy()
        );
        assert!(secs < limit.as_secs_f64(), "took {secs} s");
    }
}

/// `ballast launch` over the two hosts: every process of host-b (rank 2) is killed after the
/// first checkpoint, and the supervisor starts the job again on the two ranks of host-a from its
/// newest checkpoint, naming rank 2 and host-b; the job finishes its 40 steps there.
#[test]
fn launchers_lost_host_restarts_on_the_other_host() {
    let _alone = one_job();
    let Some(hosts) = TwoHosts::up_or_skip("launchers_lost_host_restarts_on_the_other_host") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let job = hosts.mpirun(&job_bin(), &checkpointing_job("40", &["--log-every", "1"]));
    let mut supervised = Command::new(ballast_tests::bin("ballast"));
    supervised
        .args(["launch", "--max-restarts", "1", "--min-ranks", "2", "--"])
        .arg(job.get_program())
        .args(job.get_args());
    let child = spawn_in(&mut supervised, dir.path());
    wait_for_a_checkpoint(&dir.path().join("cp"));
    hosts.kill("b");
    let out = wait_with_deadline(child, std::time::Duration::from_secs(300));
    let all = text(&out);
    println!("lost host under ballast launch: exit {:?}", out.status.code());
    for line in all
        .lines()
        .filter(|l| l.starts_with("ballast launch:") || l.starts_with("trained steps"))
    {
        println!("  {line}");
    }
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("ballast launch: restart 1 of 1: rank(s) [2] on host host-b lost"),
        "{all}"
    );
    assert!(all.contains("on 2 rank(s) without rank(s) [2]"), "{all}");
    let finished = all
        .lines()
        .find(|l| l.starts_with("trained steps") && l.contains("..40 on 2 ranks"));
    assert!(finished.is_some(), "{all}");
}

/// The ResNet job on the fixed plan for `steps` steps, a checkpoint every 5 into `cp`, then
/// `more` arguments.
fn checkpointing_job<'a>(steps: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--initial-plan",
        "equal",
        "--no-rebalance",
        "--micro-batch",
        "largest",
        "--steps",
        steps,
        "--checkpoint-dir",
        "cp",
        "--checkpoint-every",
        "5",
    ];
    args.extend_from_slice(more);
    args
}

/// Starts `cmd` in `dir` with a 5 s collective deadline, its output captured.
fn spawn_in(cmd: &mut Command, dir: &Path) -> std::process::Child {
    cmd.current_dir(dir)
        .env("BALLAST_TIMEOUT_SECS", "5")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the job has written a checkpoint into `cp` (at most 120 s).
fn wait_for_a_checkpoint(cp: &Path) {
    let started = std::time::Instant::now();
    while std::fs::read_dir(cp).map_or(true, |mut d| d.next().is_none()) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "no checkpoint was written"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Waits for `child` at most `limit`, killing it past that; returns what it printed.
fn wait_with_deadline(mut child: std::process::Child, limit: std::time::Duration) -> Output {
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the job outlived the lost host by {limit:?}:\n{}", text(&out));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}
