//! Faults a test asks a rank for at a step boundary, through [`FAULT_VAR`]: a panic, or a rank
//! that stops making progress (a thread stuck outside the collectives).
//!
//! `BALLAST_TESTKIT_FAULT=panic:2:7` panics rank 2 before step 7; `hang:2:7` makes it sleep
//! forever there. With [`FAULT_ONCE_VAR`] naming a file, the fault fires only while that file
//! does not exist, and creates it: a restarted job runs through the same step.

use std::path::Path;

/// The fault: `panic:RANK:STEP` or `hang:RANK:STEP`.
pub const FAULT_VAR: &str = "BALLAST_TESTKIT_FAULT";

/// A file that marks the fault as fired (it then fires no more).
pub const FAULT_ONCE_VAR: &str = "BALLAST_TESTKIT_FAULT_ONCE";

/// Fires the fault [`FAULT_VAR`] asks of `rank` before `step`, if any.
///
/// # Panics
/// When the fault is a panic, and when [`FAULT_VAR`] is malformed.
pub fn at_step(rank: usize, step: u64) {
    let Ok(spec) = std::env::var(FAULT_VAR) else {
        return;
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let [kind, at_rank, at_step] = parts[..] else {
        panic!("{FAULT_VAR}={spec}: expected KIND:RANK:STEP");
    };
    if at_rank.parse() != Ok(rank) || at_step.parse() != Ok(step) || !first_time() {
        return;
    }
    eprintln!("ballast: rank {rank}: injecting a {kind} before step {step} as asked ({FAULT_VAR})");
    match kind {
        "panic" => panic!("rank {rank}: the fault injected before step {step}"),
        "hang" => loop {
            std::thread::park();
        },
        other => panic!("{FAULT_VAR}={spec}: unknown fault {other:?} (panic or hang)"),
    }
}

/// Whether the fault has not fired yet; marks it fired.
fn first_time() -> bool {
    let Some(path) = std::env::var_os(FAULT_ONCE_VAR) else {
        return true;
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(Path::new(&path))
        .is_ok()
}
