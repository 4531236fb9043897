//! Running the workspace's binaries under `mpirun` from a test, one job at a time, and reading
//! what they printed: shared by the crates' own tests and the end-to-end suite.

use std::{
    path::Path,
    process::{Command, Output},
    sync::{Mutex, MutexGuard},
};

static ONE_JOB: Mutex<()> = Mutex::new(());

/// One job at a time within a test process, until the guard is dropped: jobs side by side would
/// share the cores and spoil timing- and pinning-sensitive checks.
pub fn one_job() -> MutexGuard<'static, ()> {
    ONE_JOB.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `bin args` on `ranks` MPI processes (oversubscribed, allowed as root, each `envs` entry
/// exported to every rank), in `dir` when given, holding [`one_job`], and returns the output.
///
/// # Panics
/// With the install command when `mpirun` cannot be started: these tests are compiled only
/// with the `mpi` feature, whose build already needs an MPI installation.
pub fn mpirun(bin: &str, dir: Option<&Path>, ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let _one_at_a_time = one_job();
    let mut cmd = Command::new("mpirun");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", &ranks.to_string()]);
    for (k, v) in envs {
        cmd.args(["-x", &format!("{k}={v}")]);
    }
    cmd.arg(bin).args(args);
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot start mpirun ({e}); install it with: apt-get install -y openmpi-bin libopenmpi-dev")
    })
}

/// The lines of stdout that start with `prefix`, sorted.
pub fn lines_with(out: &Output, prefix: &str) -> Vec<String> {
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// A finished process's status and everything it printed, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
