//! `ballast selftest`: the exact collective checks on whatever world this process is in.
//!
//! Under `mpirun` every process checks itself and prints one line; with no launcher, `--threads`
//! ranks run as threads. The exit code is non-zero if any check on this process failed.

use std::process::ExitCode;

use anyhow::Result;
use ballast::{
    cluster::Launch,
    collectives::{conformance, local, CommOptions, Communicator},
    world::launched_communicator,
};

/// Options of `ballast selftest`.
#[derive(clap::Args)]
pub struct Args {
    /// Which check to run.
    #[arg(value_enum)]
    check: Check,
    /// Ranks to run as threads when no launcher started this process.
    #[arg(long, default_value_t = 3)]
    threads: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Check {
    /// Every collective against a serial reference, exactly.
    Collectives,
    /// The last rank passes a longer buffer: every rank must get a shape error.
    WrongLength,
    /// The last rank never joins: every other rank must get a timeout naming it.
    MissingRank,
    /// Data-parallel training with unequal shares against one device on the whole batch
    /// (three ranks).
    Equivalence,
}

/// Runs the command.
pub fn run(args: &Args) -> Result<ExitCode> {
    let launch = Launch::from_env()?;
    let options = match args.check {
        Check::Collectives => CommOptions::from_env()?,
        _ => std::env::var(ballast::collectives::env::TIMEOUT_SECS)
            .ok()
            .map_or_else(|| Ok(conformance::short_timeout_options()), |_| CommOptions::from_env())?,
    };
    let check = args.check;
    if let Check::Equivalence = check {
        return equivalence(&launch, options, args.threads);
    }
    let outcomes: Vec<(usize, usize, &'static str, Result<String, String>)> =
        match launched_communicator(&launch, options.clone())? {
            Some(mut comm) => vec![one(comm.as_mut(), check)],
            None => local::run(args.threads, options, |mut comm| one(&mut comm, check)),
        };
    let mut ok = true;
    for (rank, world, backend, outcome) in outcomes {
        match outcome {
            Ok(msg) => println!("selftest rank {rank}/{world} {backend}: OK {msg}"),
            Err(msg) => {
                ok = false;
                println!("selftest rank {rank}/{world} {backend}: FAIL {msg}");
            }
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn one(comm: &mut dyn Communicator, check: Check) -> (usize, usize, &'static str, Result<String, String>) {
    let last = comm.world_size() - 1;
    let result = match check {
        Check::Collectives => conformance::check_all(comm).map(|p| p.join("; ")),
        Check::WrongLength => conformance::check_wrong_length(comm),
        Check::MissingRank => conformance::check_missing_rank(comm, last),
        Check::Equivalence => Err("run through `selftest equivalence`".into()),
    };
    (comm.rank(), comm.world_size(), comm.backend(), result)
}

fn equivalence(launch: &Launch, options: CommOptions, threads: usize) -> Result<ExitCode> {
    use ballast::testing::{equivalence_report, three_rank_cases};
    let cases = three_rank_cases();
    let reports: Vec<Result<Vec<String>, String>> = match launched_communicator(launch, options.clone())? {
        Some(comm) => vec![equivalence_report(comm, &cases).map_err(|e| e.to_string())],
        None => local::run(threads, options, |comm| {
            equivalence_report(Box::new(comm), &cases).map_err(|e| e.to_string())
        }),
    };
    let mut ok = true;
    for report in reports {
        match report {
            Ok(lines) => {
                for line in lines {
                    ok &= !line.ends_with("FAIL");
                    println!("{line}");
                }
            }
            Err(e) => {
                ok = false;
                println!("equivalence error: {e}");
            }
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
