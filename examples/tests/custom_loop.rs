//! The custom-loop example (`examples/src/bin/custom_loop.rs`): a user's loop with burn's AdamW or
//! SGD, or ballast's sharded AdamW, global-norm clipping at 1.0, on 3 unequal ranks as threads and
//! under `mpirun -np 3`, against one device on the whole batch.

mod common;

use std::process::{Command, Output};

use common::{one_job, text};

const BIN: &str = env!("CARGO_BIN_EXE_custom_loop");

/// Runs the example and returns rank 0's JSON report.
fn report(out: Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no report: {}", text(&out)));
    println!("{line}");
    serde_json::from_str(line).unwrap()
}

/// Checks a report: the distributed run equals one device within `tolerance` (parameters) and
/// clipped in some steps, not all, as the reference did.
fn check(r: &serde_json::Value, tolerance: f64) {
    let steps = r["steps"].as_u64().unwrap();
    let clipped = r["clipped_steps"].as_u64().unwrap();
    assert!(r["max_rel_param"].as_f64().unwrap() <= tolerance, "{r}");
    assert!(r["max_rel_loss"].as_f64().unwrap() <= tolerance, "{r}");
    assert!(
        clipped > 0 && clipped < steps,
        "clipping must act in some steps, not all: {r}"
    );
    assert_eq!(clipped, r["reference_clipped_steps"].as_u64().unwrap(), "{r}");
    assert_eq!(r["replicas_identical"], true, "{r}");
}

fn threads(optimizer: &str) -> serde_json::Value {
    let _alone = one_job();
    report(Command::new(BIN).args(["--optimizer", optimizer]).output().unwrap())
}

#[test]
fn burn_adamw_with_clipping_on_three_threads_equals_one_device() {
    check(&threads("adamw"), 1e-5);
}

#[test]
fn burn_sgd_with_clipping_on_three_threads_equals_one_device() {
    check(&threads("sgd"), 1e-6);
}

#[test]
fn sharded_adamw_with_clipping_on_three_threads_equals_one_device() {
    check(&threads("sharded"), 1e-5);
}

#[cfg(feature = "mpi")]
mod under_mpirun {
    use super::*;

    fn mpirun(optimizer: &str) -> serde_json::Value {
        let _alone = one_job();
        report(
            Command::new("mpirun")
                .args([
                    "--allow-run-as-root",
                    "--oversubscribe",
                    "-np",
                    "3",
                    BIN,
                    "--optimizer",
                    optimizer,
                ])
                .output()
                .unwrap_or_else(|e| panic!("cannot start mpirun ({e}); apt-get install -y openmpi-bin libopenmpi-dev")),
        )
    }

    #[test]
    fn burn_adamw_with_clipping_under_mpirun_equals_one_device() {
        check(&mpirun("adamw"), 1e-5);
    }

    #[test]
    fn sharded_adamw_with_clipping_under_mpirun_equals_one_device() {
        check(&mpirun("sharded"), 1e-5);
    }
}

/// The example refuses a world of the wrong size with its own message and a non-zero exit.
#[cfg(feature = "mpi")]
#[test]
fn the_example_names_the_world_it_needs() {
    let _alone = one_job();
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", BIN])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("this example runs on 3 ranks: mpirun -np 3"),
        "{}",
        text(&out)
    );
}
