//! The workspace's end-to-end suite: whole jobs of the `ballast` and example binaries, run as a
//! user runs them (ranks as threads and under `mpirun`), resumed after a crash, with ranks killed
//! or stalled, and their checkpoints read by Python. Unit and crate-level tests stay in their
//! crates; this folder holds what crosses them.
//!
//! The binaries under test are the workspace's own, built by the same `cargo test --workspace`
//! run (`./scripts/test-all.sh`): [`bin`] finds them beside the test executable, in the
//! profile's target folder. Cargo hands `CARGO_BIN_EXE_*` only to a binary's own package, so
//! this is how a suite outside the binaries' packages reaches them.

use std::{path::Path, process::Output};

use ballast::testing::launch;

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

pub use ballast::testing::launch::{lines_with, one_job, output_text as text};

/// Runs `ballast <args>` on `ranks` MPI processes (see [`ballast::testing::launch::mpirun`]).
pub fn mpirun(ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    launch::mpirun(&bin("ballast"), None, ranks, args, envs)
}

/// Runs `ballast-selftest <args>` as [`mpirun`] runs `ballast`.
pub fn selftest(ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    launch::mpirun(&bin("ballast-selftest"), None, ranks, args, envs)
}

/// As [`mpirun`], in directory `dir`, with owned arguments.
pub fn mpirun_in(dir: &Path, ranks: usize, args: &[String], envs: &[(&str, &str)]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    launch::mpirun(&bin("ballast"), Some(dir), ranks, &args, envs)
}
