//! Launching the `ballast` and `ballast-selftest` binaries under `mpirun` from a test.

#![allow(dead_code)]

use std::{
    process::{Command, Output},
    sync::{Mutex, MutexGuard},
};

static MPI_JOBS: Mutex<()> = Mutex::new(());

/// One `mpirun` job at a time per test binary: jobs running side by side would share the
/// cores and spoil timing- and pinning-sensitive checks.
pub fn serial() -> MutexGuard<'static, ()> {
    MPI_JOBS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `ballast <args>` on `ranks` MPI processes (oversubscribed, allowed as root) and returns
/// the output. Panics with the full output when `mpirun` cannot be started: these tests are
/// compiled only with the `mpi` feature, whose build already needs an MPI installation.
pub fn mpirun(ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    launch(env!("CARGO_BIN_EXE_ballast"), ranks, args, envs)
}

/// Runs `ballast-selftest <args>` as [`mpirun`] runs `ballast`.
pub fn selftest(ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    launch(env!("CARGO_BIN_EXE_ballast-selftest"), ranks, args, envs)
}

fn launch(bin: &str, ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let _one_at_a_time = serial();
    let mut cmd = Command::new("mpirun");
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

/// Everything the run printed, for failure messages.
pub fn dump(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The equivalence report of `cases` on `ranks` ranks as threads, every rank's lines, printed.
#[cfg(feature = "testkit")]
pub fn equivalence_on_threads(ranks: usize, cases: &[ballast::testing::Case]) -> Vec<String> {
    use ballast::collectives::{local, CommOptions};
    let reports = local::run(ranks, CommOptions::default(), |comm| {
        ballast::testing::equivalence_report(Box::new(comm), cases).map_err(|e| e.to_string())
    });
    let lines: Vec<String> = reports
        .into_iter()
        .flat_map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect();
    for l in &lines {
        println!("{l}");
    }
    lines
}

/// The equivalence report of `ballast-selftest <check>` under `mpirun -np 3`, every rank's
/// lines, printed; the run must succeed and every rank report each of `cases` cases.
pub fn equivalence_under_mpirun(check: &str, cases: usize) -> Vec<String> {
    let out = selftest(3, &[check], &[]);
    assert!(out.status.success(), "{}", dump(&out));
    let lines = lines_with(&out, "equivalence rank");
    for l in &lines {
        println!("{l}");
    }
    assert_eq!(lines.len(), 3 * cases, "{}", dump(&out));
    lines
}
