//! `ballast-selftest CHECK`: the checks the test suite runs on whatever world this process is in
//! (features `cli` and `testkit`; not part of the `ballast` command).
//!
//! Under `mpirun` every process checks itself and prints one line; with no launcher, `--threads`
//! ranks run as threads. The exit code is non-zero if any check on this process failed.
#![warn(missing_docs)]

/// Exact heap accounting: the balance checks measure memory with it.
#[global_allocator]
static ALLOC: ballast::memory::CountingAlloc = ballast::memory::CountingAlloc;

use std::process::ExitCode;

use anyhow::Result;
use ballast::{
    cluster::Launch,
    collectives::{conformance, local, CommOptions, Communicator},
    world::launched_communicator,
};

/// Options of `ballast-selftest`.
#[derive(clap::Parser)]
#[command(
    name = "ballast-selftest",
    about = "Checks of ballast on this world of ranks (used by the test suite)"
)]
struct Args {
    /// Which check to run.
    #[arg(value_enum)]
    check: Check,
    /// Ranks to run as threads when no launcher started this process.
    #[arg(long, default_value_t = 3)]
    threads: usize,
    /// `equivalence`: each rank's device (flex, wgpu, wgpu:cpu, cuda; one entry: every rank);
    /// runs the device cases (shares 5/2/1 and 8/0/0 on three ranks, 8 on one) instead of the
    /// default matrix on flex. `balance`: each rank's device (default flex).
    #[arg(long)]
    device: Option<String>,
    /// `balance`: memory budget per rank (e.g. 24MiB,16MiB,8MiB); one value applies to all.
    #[arg(long, value_delimiter = ',')]
    budgets: Vec<String>,
    /// `balance`: global batch.
    #[arg(long, default_value_t = 192)]
    global_batch: usize,
    /// `balance`: steps.
    #[arg(long, default_value_t = 12)]
    steps: u64,
    /// `balance`: hidden width of the model.
    #[arg(long, default_value_t = 256)]
    width: usize,
    /// `balance`: train the image conv net (`--width` = channels) instead of the MLP.
    #[arg(long)]
    conv: bool,
    /// `balance`: first plan (measured, equal, naive).
    #[arg(long, default_value = "measured")]
    initial: String,
    /// `balance`: make RANK's first micro-batch of STEP fail once as out of memory (RANK:STEP).
    #[arg(long)]
    inject_oom: Option<String>,
    /// `balance`: keep the first plan.
    #[arg(long)]
    no_rebalance: bool,
    /// `balance`: time probes and steps by a simulated clock at these samples/s per rank
    /// (e.g. 200,100,100) instead of the wall clock.
    #[arg(long, value_delimiter = ',')]
    simulated_speeds: Vec<f64>,
    /// `balance`: never offload optimizer state to the host.
    #[arg(long)]
    no_offload: bool,
    /// `balance`: where Adam's state lives: off (whole on every device), even or memory (one
    /// shard per rank).
    #[arg(long, default_value = "off")]
    optimizer_sharding: String,
    /// `balance`: micro-batch per device: `fastest` measured within its memory, or `largest`
    /// (fills the memory budget).
    #[arg(long, default_value = "fastest")]
    micro_batch: String,
    /// `balance`: the float type the replicas compute in (f32, bf16, f16).
    #[arg(long, default_value = "f32")]
    precision: ballast::Precision,
    /// `balance`: write each rank's full record to DIR/rank-R.json (stdout gets a summary).
    #[arg(long)]
    out_dir: Option<std::path::PathBuf>,
    /// Limit this process's address space to BYTES (`setrlimit(RLIMIT_AS)`) before anything
    /// else, so that a device whose memory is host memory (Mesa's software Vulkan device) meets
    /// a real failed allocation.
    #[arg(long, value_name = "BYTES")]
    address_space: Option<u64>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Check {
    /// Every collective against a serial reference, exactly.
    Collectives,
    /// The last rank passes a longer buffer: every rank must get a shape error.
    WrongLength,
    /// The last rank never joins: every other rank must get a timeout naming it.
    MissingRank,
    /// Rank 0 passes other shard counts to a reduce-scatter: every rank must get a counts error.
    CountsMismatch,
    /// Rank 0 is later than the timeout to a barrier for which every rank raised it.
    LongerDeadline,
    /// Data-parallel training with unequal shares against one device on the whole batch
    /// (three ranks).
    Equivalence,
    /// Adam with its state sharded unevenly over three ranks against one device on the whole
    /// batch.
    Sharded,
    /// Replicas in bf16 (f32 sums, master and Adam state) on three ranks against one device
    /// running the same recipe on the whole batch.
    Precision,
    /// Balanced training with per-rank memory budgets; prints one JSON record per rank.
    Balance,
    /// Writes checkpoints of a `--width` MLP into `--out-dir` forever, printing `saved STEP`
    /// after each is in place (crash-during-save tests kill it at random moments).
    CheckpointWriter,
}

/// Runs the check.
fn run(args: &Args) -> Result<ExitCode> {
    if let Some(bytes) = args.address_space {
        limit_address_space(bytes)?;
    }
    let launch = Launch::from_env()?;
    let options = match args.check {
        Check::Collectives => CommOptions::from_env()?,
        _ => std::env::var(ballast::collectives::env::TIMEOUT_SECS)
            .ok()
            .map_or_else(|| Ok(conformance::short_timeout_options()), |_| CommOptions::from_env())?,
    };
    let check = args.check;
    if let Check::Equivalence | Check::Sharded | Check::Precision = check {
        let cases = match (check, args.device.as_deref()) {
            (Check::Sharded, _) => ballast::testing::sharded_cases(),
            (Check::Precision, _) => ballast::testing::precision_cases(),
            (_, None) => ballast::testing::three_rank_cases(),
            (_, Some(list)) => {
                let world = if launch.is_launched() {
                    launch.world_size
                } else {
                    args.threads
                };
                ballast::testing::device_cases(world, &ballast::device::DeviceChoice::parse_list(list)?)
            }
        };
        return equivalence(&launch, options, args.threads, &cases);
    }
    if let Check::Balance = check {
        return balance(&launch, options, args);
    }
    if let Check::CheckpointWriter = check {
        return checkpoint_writer(args);
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
        Check::Collectives => conformance::check_all(comm)
            .map(|p| p.join("; "))
            .map_err(|e| e.to_string()),
        Check::WrongLength => conformance::check_wrong_length(comm).map_err(|e| e.to_string()),
        Check::MissingRank => conformance::check_missing_rank(comm, last).map_err(|e| e.to_string()),
        Check::CountsMismatch => conformance::check_counts_mismatch(comm).map_err(|e| e.to_string()),
        Check::LongerDeadline => conformance::check_longer_deadline(comm).map_err(|e| e.to_string()),
        Check::Equivalence | Check::Sharded | Check::Precision | Check::Balance | Check::CheckpointWriter => {
            Err("has its own runner".into())
        }
    };
    (comm.rank(), comm.world_size(), comm.backend(), result)
}

fn equivalence(
    launch: &Launch,
    options: CommOptions,
    threads: usize,
    cases: &[ballast::testing::Case],
) -> Result<ExitCode> {
    use ballast::testing::equivalence_report;
    let reports: Vec<Result<Vec<String>, String>> = match launched_communicator(launch, options.clone())? {
        Some(comm) => vec![equivalence_report(comm, cases).map_err(|e| e.to_string())],
        None => local::run(threads, options, |comm| {
            equivalence_report(Box::new(comm), cases).map_err(|e| e.to_string())
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

fn balance(launch: &Launch, options: CommOptions, args: &Args) -> Result<ExitCode> {
    use ballast::{
        balance::{BalanceOptions, InitialPlan},
        testing::{balanced_run, BalancedRun},
    };
    let initial = match args.initial.as_str() {
        "measured" => InitialPlan::Measured,
        "equal" => InitialPlan::Equal,
        "naive" => InitialPlan::Naive,
        other => anyhow::bail!("--initial {other:?}: use measured, equal or naive"),
    };
    let micro_batch_policy = match args.micro_batch.as_str() {
        "fastest" => ballast::balancer::MicroBatchPolicy::Fastest,
        "largest" => ballast::balancer::MicroBatchPolicy::Largest,
        other => anyhow::bail!("--micro-batch {other:?}: use fastest or largest"),
    };
    let optimizer_sharding: ballast::balancer::Sharding =
        args.optimizer_sharding.parse().map_err(anyhow::Error::msg)?;
    let budgets: Vec<u64> = args
        .budgets
        .iter()
        .map(|b| ballast::cluster::parse_bytes(b).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    let inject: Option<(usize, u64)> = match &args.inject_oom {
        None => None,
        Some(spec) => {
            let (r, s) = spec
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--inject-oom {spec:?}: use RANK:STEP, e.g. 1:3"))?;
            Some((r.parse()?, s.parse()?))
        }
    };
    let run_rank = |comm: Box<dyn Communicator>| -> Result<String, String> {
        let rank = comm.rank();
        if let Some(dir) = &args.out_dir {
            // Fault-injection tests find each rank's process here.
            let pid = dir.join(format!("rank-{rank}.pid"));
            std::fs::write(&pid, std::process::id().to_string())
                .map_err(|e| format!("writing {}: {e}", pid.display()))?;
        }
        let budget = match budgets.len() {
            0 => u64::MAX,
            1 => budgets[0],
            _ => *budgets
                .get(rank)
                .ok_or_else(|| format!("--budgets has no value for rank {rank}"))?,
        };
        let run = BalancedRun {
            global_batch: args.global_batch,
            steps: args.steps,
            width: args.width,
            conv: args.conv,
            lr: 1e-3,
            device: match args.device.as_deref() {
                Some(list) => ballast::device::DeviceChoice::for_rank(
                    &ballast::device::DeviceChoice::parse_list(list).map_err(|e| e.to_string())?,
                    rank,
                ),
                None => ballast::device::DeviceChoice::Flex,
            },
            device_oom_at_step: None,
            oom_in_device_log: false,
            precision: args.precision,
            balance: BalanceOptions {
                budget_bytes: budget,
                initial,
                rebalance: !args.no_rebalance,
                inject_oom_at_step: inject.filter(|(r, _)| *r == rank).map(|(_, s)| s),
                simulated_speeds: args.simulated_speeds.clone(),
                optimizer_sharding,
                tunables: ballast::balancer::Tunables {
                    offload: if args.no_offload {
                        ballast::balancer::OffloadPolicy::Never
                    } else {
                        ballast::balancer::OffloadPolicy::WhenNeeded
                    },
                    micro_batch_policy,
                    ..Default::default()
                },
                ..BalanceOptions::default()
            },
        };
        let (records, params, reports) = balanced_run(comm, &run).map_err(|e| e.to_string())?;
        let checksum = params.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
            (h ^ u64::from(v.to_bits())).wrapping_mul(0x0100_0000_01b3)
        });
        let json = serde_json::json!({
            "rank": rank, "budget": budget, "reports": reports, "records": records, "param_count": params.len(),
            "params_checksum": format!("{checksum:016x}"), "params_head": &params[..4.min(params.len())],
            // Every parameter of small models only: JSON values of millions of them take more
            // memory than a run under an address-space limit has.
            "params": if rank == 0 && params.len() <= 1 << 20 { serde_json::json!(params) } else { serde_json::Value::Null },
        });
        match &args.out_dir {
            Some(dir) => {
                let path = dir.join(format!("rank-{rank}.json"));
                std::fs::write(&path, json.to_string()).map_err(|e| format!("writing {}: {e}", path.display()))?;
                let last = records.last();
                Ok(format!(
                    "rank {rank} wrote {} ({} steps, final shares {:?}, checksum {checksum:016x})",
                    path.display(),
                    records.len(),
                    last.map(|r| r.shares.clone()).unwrap_or_default()
                ))
            }
            None => Ok(json.to_string()),
        }
    };
    let outputs: Vec<Result<String, String>> = match launched_communicator(launch, options.clone())? {
        Some(comm) => vec![run_rank(comm)],
        None => local::run(args.threads, options, |comm| run_rank(Box::new(comm))),
    };
    let mut ok = true;
    for out in outputs {
        match out {
            Ok(line) => println!("balance {line}"),
            Err(e) => {
                ok = false;
                println!("balance error: {e}");
            }
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Caps this process's address space (soft and hard limit) at `bytes`.
fn limit_address_space(bytes: u64) -> Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: `limit` is a valid rlimit for the duration of the call; lowering this process's
    // own limit has no other effect on memory safety.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
        anyhow::bail!("setrlimit(RLIMIT_AS, {bytes}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn checkpoint_writer(args: &Args) -> Result<ExitCode> {
    use std::io::Write;

    use ballast::{
        checkpoint::{Checkpointer, TrainState},
        optim::{HostAdam, HostAdamConfig},
        testing::WideMlp,
    };
    use burn::module::Module;
    let dir = args
        .out_dir
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("checkpoint-writer needs --out-dir"))?;
    let device = burn::tensor::Device::flex();
    let model = WideMlp::with_width(args.width, &device);
    let params = model.num_params();
    let mut adam = HostAdam::new(params, HostAdamConfig::default());
    let mut master = ballast::params::flatten_params(&model);
    let grads = vec![1e-3f32; params];
    let cp = Checkpointer::new(dir, 3)?;
    // Continue from the newest good checkpoint, so the Adam step count equals the step.
    let mut start = 0;
    if let Some(path) = cp.newest()? {
        let loaded = ballast::checkpoint::load(&path, &model)?;
        if let Some(saved) = loaded.adam {
            adam.restore(saved.m, saved.v, saved.t).map_err(anyhow::Error::msg)?;
        }
        start = loaded.state.step;
    }
    for step in start + 1.. {
        adam.step(&mut master, &grads, 1e-3);
        let state = TrainState {
            step,
            seed: 1,
            global_batch: 1,
            world_size: 1,
            job: "checkpoint-writer".into(),
            plan: None,
            shards: None,
        };
        cp.save(&model, Some((&adam).into()), &state)?;
        println!("saved {step}");
        std::io::stdout().flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    match run(&args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ballast-selftest: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
