//! `ballast bench hetero`: balanced against naive equal-split DDP against the ideal, on ranks
//! of unequal speed and memory, measured side by side in one run.
//!
//! Run it with ranks pinned to unequal core sets, e.g.
//! `mpirun -np 3 cluster/pin-by-rank.sh 0 1 1 -- target/release/ballast bench hetero --json`
//! (rank 0 alone on a core, ranks 1 and 2 sharing one: speeds about 2:1:1).
//!
//! - **ideal**: every rank trains on its own (forward and backward at its balanced micro-batch,
//!   no communication) for the same wall-clock window, all at once; the sum of their samples/s.
//! - **naive**: equal shares, one micro-batch size everywhere capped by the smallest budget,
//!   one all-reduce per step: what DDP does with unequal devices.
//! - **balanced**: the measured plan with online rebalancing.
//!
//! Naive and balanced blocks alternate so drift in machine load hits both.

use std::{process::ExitCode, time::Instant};

use anyhow::{bail, Result};
use ballast::{
    balance::{BalanceOptions, Balancer, InitialPlan},
    collectives::{CommOptions, CommunicatorExt},
    memory::DeviceMeter,
    testing::{ImageConvNet, Regressor, SyntheticSet, IMAGE_SIDE, TARGETS},
    world::launched_communicator,
    DataParallel, DdpOptions, GlobalSampler,
};
use burn::{
    nn::loss::{MseLoss, Reduction},
    optim::AdamConfig,
    tensor::Device,
};
use serde_json::json;

/// Options of `ballast bench hetero`.
#[derive(clap::Args)]
pub struct HeteroArgs {
    /// Print JSON lines (the last one is the summary).
    #[arg(long)]
    pub json: bool,
    /// Memory budget per rank (comma-separated; one value applies to all).
    #[arg(long, value_delimiter = ',', default_value = "24MiB,16MiB,8MiB")]
    pub budgets: Vec<String>,
    /// Samples per optimizer step.
    #[arg(long, default_value_t = 360)]
    pub global_batch: usize,
    /// Alternating naive/balanced block pairs.
    #[arg(long, default_value_t = 3)]
    pub blocks: usize,
    /// Steps per block.
    #[arg(long, default_value_t = 5)]
    pub steps_per_block: u64,
    /// Seconds of the standalone (ideal) measurement.
    #[arg(long, default_value_t = 2.0)]
    pub standalone_secs: f64,
    /// Channels of the convolutional model.
    #[arg(long, default_value_t = 8)]
    pub channels: usize,
}

/// Runs the benchmark.
pub fn run(args: &HeteroArgs) -> Result<ExitCode> {
    let launch = ballast::cluster::Launch::from_env()?;
    let Some(comm) = launched_communicator(&launch, CommOptions::from_env()?)? else {
        bail!(
            "run this under mpirun with unequal ranks, e.g. mpirun -np 3 cluster/pin-by-rank.sh 0 1 1 -- \
             target/release/ballast bench hetero --json"
        );
    };
    let rank = comm.rank();
    let budgets: Vec<u64> = args
        .budgets
        .iter()
        .map(|b| ballast::cluster::parse_bytes(b).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    let budget = match budgets.len() {
        1 => budgets[0],
        n if n > rank => budgets[rank],
        n => bail!("--budgets has {n} values but this is rank {rank}"),
    };
    let device = Device::flex().autodiff();
    device.seed(5);
    let data = SyntheticSet::with_dims(4096, IMAGE_SIDE * IMAGE_SIDE, TARGETS, 5);
    let sampler = GlobalSampler::new(data.len(), args.global_batch, 5)?;
    let meter = DeviceMeter::start();
    let (mut ddp, mut model) = DataParallel::wrap(
        comm,
        ImageConvNet::with_channels(args.channels, &device),
        DdpOptions::default(),
    )?;
    let mut loss_fn = |m: &ImageConvNet, idx: &[usize]| {
        let (x, y) = data.batch(idx, &device);
        MseLoss::new().forward(m.forward(x), y, Reduction::Mean)
    };
    let pool: Vec<usize> = (0..64).collect();
    let options = BalanceOptions {
        budget_bytes: budget,
        ..BalanceOptions::default()
    };
    let mut balanced = Balancer::probe(&mut ddp, &model, &mut loss_fn, &pool, args.global_batch, meter, options)?;
    let mut naive = balanced.variant(InitialPlan::Naive, false)?;
    let mut optim = AdamConfig::new().init();
    let emit = |v: serde_json::Value| {
        if rank == 0 {
            println!("{v}");
        }
    };

    // Ideal: every rank alone, all at once, for the same window.
    let cap = balanced.plan().ranks[rank].micro_batch.max(1);
    ddp.comm().barrier()?;
    let started = Instant::now();
    let mut samples = 0usize;
    let mut next = 0usize;
    while started.elapsed().as_secs_f64() < args.standalone_secs {
        let idx: Vec<usize> = (0..cap).map(|i| (next + i) % data.len()).collect();
        next += cap;
        drop(loss_fn(&model, &idx).backward());
        samples += cap;
    }
    let rate = samples as f64 / started.elapsed().as_secs_f64();
    let rates: Vec<f64> = ddp.comm().all_gather(&rate)?;
    let ideal: f64 = rates.iter().sum();
    emit(
        json!({"bench": "hetero", "phase": "standalone", "samples_per_sec": rates, "ideal": ideal, "micro_batch": cap}),
    );

    // Let rebalancing settle before measuring.
    let mut step = 0u64;
    for _ in 0..args.steps_per_block {
        let (m, _) = balanced.step(&mut ddp, model, &mut optim, 1e-3, &sampler.batch(step), &mut loss_fn)?;
        model = m;
        step += 1;
    }
    let mut totals = [(0usize, 0f64), (0usize, 0f64)];
    for block in 0..args.blocks {
        for (which, name) in [(0usize, "naive"), (1usize, "balanced")] {
            let b = if which == 0 { &mut naive } else { &mut balanced };
            let shares = b.plan().shares();
            let caps = b.plan().micro_batches();
            ddp.comm().barrier()?;
            let started = Instant::now();
            let mut n = 0usize;
            let mut compute = vec![0.0; shares.len()];
            for _ in 0..args.steps_per_block {
                let batch = sampler.batch(step);
                n += batch.len();
                let (m, out) = b.step(&mut ddp, model, &mut optim, 1e-3, &batch, &mut loss_fn)?;
                for (c, t) in compute.iter_mut().zip(&out.stats.rank_compute) {
                    *c += t / args.steps_per_block as f64;
                }
                model = m;
                step += 1;
            }
            let secs = started.elapsed().as_secs_f64();
            totals[which].0 += n;
            totals[which].1 += secs;
            emit(json!({
                "bench": "hetero", "phase": name, "block": block, "samples": n, "seconds": secs,
                "samples_per_sec": n as f64 / secs, "shares": shares, "micro_batches": caps,
                "mean_rank_compute_s": compute,
            }));
        }
    }
    let naive_rate = totals[0].0 as f64 / totals[0].1;
    let balanced_rate = totals[1].0 as f64 / totals[1].1;
    ddp.verify_replicas(&model)?;
    emit(json!({
        "bench": "hetero", "summary": true, "ranks": rates.len(),
        "naive_samples_per_sec": naive_rate, "balanced_samples_per_sec": balanced_rate, "ideal_samples_per_sec": ideal,
        "balanced_vs_naive": balanced_rate / naive_rate, "balanced_vs_ideal": balanced_rate / ideal,
        "targets": {"balanced_vs_naive": 1.30, "balanced_vs_ideal": 0.92},
        "balanced_shares": balanced.plan().shares(), "balanced_micro_batches": balanced.plan().micro_batches(),
        "naive_shares": naive.plan().shares(), "naive_micro_batches": naive.plan().micro_batches(),
    }));
    Ok(ExitCode::SUCCESS)
}
