//! Launching the `ballast` and `ballast-selftest` binaries under `mpirun` from a test.

#![allow(dead_code)]

use std::process::Output;

use ballast::testing::launch;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use ballast::testing::launch::{lines_with, one_job as serial, output_text as dump};

/// Runs `ballast <args>` on `ranks` MPI processes (see [`ballast::testing::launch::mpirun`]).
pub fn mpirun(ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    launch::mpirun(env!("CARGO_BIN_EXE_ballast"), None, ranks, args, envs)
}

/// Runs `ballast-selftest <args>` as [`mpirun`] runs `ballast`.
pub fn selftest(ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    launch::mpirun(env!("CARGO_BIN_EXE_ballast-selftest"), None, ranks, args, envs)
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
