//! The workspace's end-to-end suite: whole jobs of the `ballast` and example binaries, run as a
//! user runs them (ranks as threads and under `mpirun`), resumed after a crash, with ranks killed
//! or stalled, and their checkpoints read by Python. Unit and crate-level tests stay in their
//! crates; this folder holds what crosses them.
//!
//! The binaries under test are the workspace's own, built by the same `cargo test --workspace`
//! run (`./scripts/test-all.sh`): [`bin`] finds them beside the test executable, in the
//! profile's target folder. Cargo hands `CARGO_BIN_EXE_*` only to a binary's own package, so
//! this is how a suite outside the binaries' packages reaches them.

use std::{
    path::Path,
    process::{Command, Output},
    sync::{Mutex, MutexGuard},
};

static ONE_JOB: Mutex<()> = Mutex::new(());

/// The path of the workspace binary `name` (`ballast`, `ballast-selftest`, `resnet`,
/// `transformer`), in the target folder of the running test.
///
/// # Panics
/// When the binary is not there, with the command that builds it.
pub fn bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test>-<hash>: the binaries are in target/<profile>.
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lies in target/<profile>/deps");
    let path = profile.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is not built; run the suite with the workspace, which builds every binary first: \
         ./scripts/test-all.sh, or cargo test --release --workspace --features \"$(./scripts/features.sh)\"",
        path.display()
    );
    path.to_str().expect("the target folder's path is UTF-8").to_string()
}

/// A file of this suite (`python/read_checkpoint.py`).
pub fn suite_file(relative: &str) -> String {
    format!("{}/{relative}", env!("CARGO_MANIFEST_DIR"))
}

/// A file of the workspace (`cluster/pin-by-rank.sh`).
pub fn workspace_file(relative: &str) -> String {
    format!("{}/../{relative}", env!("CARGO_MANIFEST_DIR"))
}

/// One job at a time within a test binary, until the guard is dropped: jobs side by side would
/// share the cores and spoil timing- and pinning-sensitive checks.
pub fn one_job() -> MutexGuard<'static, ()> {
    ONE_JOB.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `ballast <args>` on `ranks` MPI processes (oversubscribed, allowed as root) and returns
/// the output. Panics with the full output when `mpirun` cannot be started: these tests are
/// compiled only with the `mpi` feature, whose build already needs an MPI installation.
pub fn mpirun(ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    launch(&bin("ballast"), None, ranks, args, envs)
}

/// Runs `ballast-selftest <args>` as [`mpirun`] runs `ballast`.
pub fn selftest(ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    launch(&bin("ballast-selftest"), None, ranks, args, envs)
}

/// As [`mpirun`], in directory `dir`, with owned arguments.
pub fn mpirun_in(dir: &Path, ranks: usize, args: &[String], envs: &[(&str, &str)]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    launch(&bin("ballast"), Some(dir), ranks, &args, envs)
}

fn launch(bin: &str, dir: Option<&Path>, ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
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
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
