//! Environment variables read by ballast's collectives, defined once.

/// Seconds a blocking collective waits for every rank (default 30).
pub const TIMEOUT_SECS: &str = "BALLAST_TIMEOUT_SECS";

/// Directory of the MPI ranks' heartbeat files, shared by the ranks of a host (default
/// `$XDG_RUNTIME_DIR/ballast-heartbeat-<uid>-<launcher pid>`, in the temporary directory
/// without `XDG_RUNTIME_DIR`). It must be private to the user: see `Error::HeartbeatDir`.
pub const HEARTBEAT_DIR: &str = "BALLAST_HEARTBEAT_DIR";

/// Directory where a rank that ends because a peer was lost leaves its loss report
/// (`rank-<rank>.json`, see the `loss` module). `ballast launch` sets it for the job it
/// supervises; unset, nothing is written.
pub const REPORT_DIR: &str = "BALLAST_REPORT_DIR";
