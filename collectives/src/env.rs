//! Environment variables read by ballast's collectives, defined once.

/// Seconds a blocking collective waits for every rank (default 30).
pub const TIMEOUT_SECS: &str = "BALLAST_TIMEOUT_SECS";

/// Directory of the MPI ranks' heartbeat files, shared by the ranks of a host (default
/// `/tmp/ballast-heartbeat-<launcher pid>`).
pub const HEARTBEAT_DIR: &str = "BALLAST_HEARTBEAT_DIR";
