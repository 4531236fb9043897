//! `ballast bench ...`: benchmarks that print JSON lines, with ratios taken side by side. Each
//! benchmark is a module of its own that owns its arguments.

use std::process::ExitCode;

use anyhow::Result;

/// The benchmarks.
#[derive(clap::Subcommand)]
pub enum Bench {
    /// Our fused-bucket all-reduce against raw MPI_Allreduce on the same bytes (run under mpirun).
    Allreduce(super::allreduce_bench::AllreduceArgs),
    /// Balanced vs naive equal-split DDP vs ideal on unequal ranks (run under mpirun, pinned).
    Hetero(super::hetero::HeteroArgs),
    /// Host Adam bandwidth against a STREAM-like triad on 1 and 2 threads.
    Adam(super::adam_bench::AdamArgs),
    /// Step time of a 1-rank DataParallel loop against a plain burn loop, alternated.
    Overhead(super::overhead::OverheadArgs),
    /// Checkpoint load (map, checksum, copy) against a plain sequential read of the file; with a
    /// job's command after `--`, that job's step time with a checkpoint every step against none.
    Checkpoint(super::checkpoint_bench::CheckpointArgs),
    /// Messages and latency of the tree handshake against the all-to-all one (run under mpirun).
    Handshake(super::handshake_bench::HandshakeArgs),
    /// Sharded against replicated Adam on the same plan: step time and bytes on the wire (run
    /// under mpirun, pinned).
    Sharded(super::sharded_bench::ShardedArgs),
}

/// Runs a benchmark.
pub fn run(bench: Bench) -> Result<ExitCode> {
    match bench {
        Bench::Allreduce(args) => super::allreduce_bench::run(&args),
        Bench::Overhead(args) => super::overhead::run(&args),
        Bench::Hetero(args) => super::hetero::run(&args),
        Bench::Adam(args) => super::adam_bench::run(&args),
        Bench::Checkpoint(args) => super::checkpoint_bench::run(&args),
        Bench::Handshake(args) => super::handshake_bench::run(&args),
        Bench::Sharded(args) => super::sharded_bench::run(&args),
    }
}
