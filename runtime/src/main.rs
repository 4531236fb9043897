//! The `ballast` command line: run jobs, inspect the machine, benchmark, plan.
#![warn(missing_docs)]

mod cmd;

/// Exact heap accounting: CPU ranks measure their memory with it.
#[global_allocator]
static ALLOC: ballast::memory::CountingAlloc = ballast::memory::CountingAlloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Data-parallel training of burn models on unequal devices.
#[derive(Parser)]
#[command(name = "ballast", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what this machine and launcher provide: ranks, MPI, CUDA, NCCL, devices, memory.
    Doctor(cmd::doctor::Args),
    /// Benchmarks that print JSON lines (ratios measured side by side in one run).
    #[command(subcommand)]
    Bench(cmd::bench::Bench),
    /// Dry-run the planner for a described cluster: shares, micro-batches, memory, step time.
    Plan(cmd::plan::Args),
    /// Train a small regression MLP with the full job loop (threads on simulated devices, or
    /// one process per rank under mpirun): plan, balanced steps, metrics, checkpoints.
    /// Defaults: --global-batch 48 --lr 0.003 --steps 100, 3 ranks with --speeds 3,2,1 and no
    /// memory budgets.
    Demo(Box<cmd::demo::Args>),
    /// Run a job's launch command (`-- mpirun -np 3 resnet ...`) and start it again from its
    /// newest checkpoint when it loses a rank: on the survivors while at least --min-ranks are
    /// left, re-planned. Exit 0: finished; 2: bad input (never restarted); 3: gave up after
    /// --max-restarts.
    Launch(cmd::launch::Args),
    /// Summarise a job's metrics file per rank; draw throughput and memory over time (--svg).
    Report(cmd::report::Args),
}

fn main() -> ExitCode {
    // SAFETY: the first thing main does, before any thread exists: restores the default action
    // for SIGPIPE, so output into a closed pipe (`ballast plan ... | head -1`) ends the process
    // quietly, as it does for other command-line tools, instead of a failed print panicking.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A CUDA library installed under a versioned name only (libnccl.so.2, libnvrtc.so.13) is
    // linked where cudarc looks for it: this may relaunch the process, so it comes first.
    #[cfg(feature = "cuda")]
    ballast::libs::relaunch_with_found_libraries();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor(args) => cmd::doctor::run(&args),
        Command::Bench(bench) => cmd::bench::run(bench),
        Command::Demo(args) => cmd::demo::run(&args),
        Command::Plan(args) => cmd::plan::run(&args),
        Command::Launch(args) => cmd::launch::run(&args),
        Command::Report(args) => cmd::report::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // 75 when a rank was lost and a restart could pass (`ballast launch` restarts on it).
            let lost = err.chain().find_map(|c| c.downcast_ref::<ballast::Error>());
            let code = lost.map_or(2, ballast::Error::exit_code);
            ballast::job::failure::say_error("ballast", &format!("{err:#}"), code);
            ExitCode::from(code)
        }
    }
}
