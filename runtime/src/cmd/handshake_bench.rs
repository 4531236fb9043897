//! `ballast bench handshake`: what agreeing before a collective costs, the tree handshake
//! against the all-to-all one it replaced.
//!
//! Both run as barriers (a barrier is a handshake and nothing else) on the same ranks, in rounds
//! that alternate which goes first, so drift in machine load hits both alike. Messages are
//! counted by the communicator (every point-to-point send and receive a handshake posts); the
//! figure per collective is the most any rank needed. Latency is the slowest rank's mean time per
//! barrier. Run under a launcher at several sizes: `scripts/bench-handshake.sh`.

use std::process::ExitCode;

use anyhow::Result;

/// Options of `ballast bench handshake`.
#[derive(clap::Args)]
pub struct HandshakeArgs {
    /// Print one JSON line (the summary) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Barriers per handshake in each round.
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// Rounds; each times both handshakes.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
}

/// Runs the benchmark (it needs MPI).
#[cfg(not(feature = "mpi"))]
pub fn run(_args: &HandshakeArgs) -> Result<ExitCode> {
    anyhow::bail!(
        "bench handshake measures the MPI handshake: build with `cargo build --release -p ballast --features mpi,cli,testkit` \
         and run under `mpirun -np 4 target/release/ballast bench handshake --json`"
    )
}

/// Runs the benchmark under a launcher; rank 0 prints the result.
#[cfg(feature = "mpi")]
pub fn run(args: &HandshakeArgs) -> Result<ExitCode> {
    use std::time::Instant;

    use anyhow::{bail, ensure};
    use ballast::collectives::{
        mpi::{Handshake, MpiCommunicator},
        CommOptions, Communicator, CommunicatorExt,
    };
    use serde_json::json;

    ensure!(
        args.iters > 0 && args.rounds > 0,
        "--iters and --rounds must be positive"
    );
    let launch = ballast::cluster::Launch::from_env()?;
    if !launch.is_launched() {
        bail!(
            "run this under a launcher: mpirun --allow-run-as-root --oversubscribe -np 4 target/release/ballast \
             bench handshake --json"
        );
    }
    let mut comm = MpiCommunicator::init(CommOptions::from_env()?)?;
    let n = comm.world_size();
    let kinds = [Handshake::Tree, Handshake::AllToAll];
    let mut seconds = [0.0f64; 2];
    let mut messages = [0u64; 2];
    for round in 0..args.rounds {
        for i in [round % 2, 1 - round % 2] {
            // Every rank switches after the same barrier; the phases' tags keep a late rank's
            // last messages of one handshake apart from the other's.
            comm.barrier()?;
            comm.set_handshake(kinds[i]);
            comm.barrier()?;
            let before = comm.handshake_messages();
            let started = Instant::now();
            for _ in 0..args.iters {
                comm.barrier()?;
            }
            seconds[i] += started.elapsed().as_secs_f64();
            messages[i] += comm.handshake_messages() - before;
        }
    }
    comm.set_handshake(Handshake::Tree);
    let all: Vec<([f64; 2], [u64; 2])> = comm.all_gather(&(seconds, messages))?;
    if comm.rank() != 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let calls = (args.rounds * args.iters) as f64;
    let slowest = |i: usize| all.iter().map(|(s, _)| s[i] / calls).fold(0.0, f64::max);
    let most = |i: usize| all.iter().map(|(_, m)| m[i] as f64 / calls).fold(0.0, f64::max);
    let (tree, old) = ((most(0), slowest(0)), (most(1), slowest(1)));
    let target = 2 * n.next_power_of_two().ilog2() + 2;
    let line = json!({
        "bench": "handshake",
        "ranks": n,
        "collectives": args.rounds * args.iters,
        "tree": {"messages_per_rank": tree.0, "latency_us": tree.1 * 1e6},
        "all_to_all": {"messages_per_rank": old.0, "latency_us": old.1 * 1e6},
        "messages_per_rank": tree.0,
        "target_messages_per_rank": target,
        "latency_ratio_vs_old": tree.1 / old.1,
    });
    if args.json {
        println!("{line}");
    } else {
        println!(
            "{n} ranks: tree {} messages/rank, {:.1} us; all-to-all {} messages/rank, {:.1} us; latency ratio {:.3} \
             (target messages <= {target})",
            tree.0,
            tree.1 * 1e6,
            old.0,
            old.1 * 1e6,
            tree.1 / old.1
        );
    }
    Ok(ExitCode::SUCCESS)
}
