//! Helpers the end-to-end tests of the example binaries share.

use std::process::Output;

/// One job at a time within a test binary: jobs would share the cores, and the main command's
/// time limit is for a machine of its own.
static ONE_JOB: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the cores for one job until dropped.
pub fn one_job() -> std::sync::MutexGuard<'static, ()> {
    ONE_JOB.lock().unwrap_or_else(|e| e.into_inner())
}

/// A finished process's status and output, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
