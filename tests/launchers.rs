//! Real launchers: a one-node Slurm (Debian's slurm-wlm, started by `scripts/slurm-local.sh`)
//! runs the ResNet job under `srun -n 3` and through `sbatch cluster/slurm.sbatch`, and both
//! train exactly what `mpirun -np 3` trains with the same plan.
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

const JOB_ARGS: [&str; 14] = [
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
];

fn job_args() -> Vec<&'static str> {
    let mut args = JOB_ARGS.to_vec();
    args.push("5");
    args
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
