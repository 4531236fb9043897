//! `ballast demo`: data-parallel training on ranks as threads standing for unequal devices.
//!
//! Each simulated device gets a relative speed (its share of the global batch) and a memory cap
//! (its largest micro-batch). The demo prints the plan, trains a small regression MLP and checks
//! at the end that every replica holds the same bits.

use std::process::ExitCode;

use anyhow::{ensure, Result};
use ballast::{
    balancer::{split_proportional, StepPlan},
    collectives::{local, CommOptions, Communicator},
    testing::{Mlp, Regressor, SyntheticSet},
    DataParallel, DdpOptions, GlobalSampler,
};
use burn::{
    nn::loss::{MseLoss, Reduction},
    optim::AdamConfig,
    tensor::Device,
};

/// Options of `ballast demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Relative speeds of the simulated devices, one per rank.
    #[arg(long, value_delimiter = ',', default_value = "3,2,1")]
    speeds: Vec<f64>,
    /// Largest micro-batch of each simulated device (its memory cap).
    #[arg(long, value_delimiter = ',', default_value = "12,8,4")]
    caps: Vec<usize>,
    /// Samples per optimizer step over all ranks.
    #[arg(long, default_value_t = 48)]
    global_batch: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: u64,
}

/// Runs the command.
pub fn run(args: &Args) -> Result<ExitCode> {
    ensure!(
        args.speeds.len() == args.caps.len(),
        "--speeds has {} values but --caps has {}; give one of each per simulated device",
        args.speeds.len(),
        args.caps.len()
    );
    let shares = split_proportional(args.global_batch, &args.speeds)?;
    let plan = StepPlan::new(args.global_batch, &shares, &args.caps)?;
    println!("rank  speed  share  cap  micro-batches");
    for (r, p) in plan.ranks.iter().enumerate() {
        println!(
            "{r:>4}  {:>5}  {:>5}  {:>3}  {:?}",
            args.speeds[r],
            p.share,
            p.micro_batch_cap,
            p.micro_batches()
        );
    }
    let n = plan.ranks.len();
    let data = SyntheticSet::new(2000, 11);
    let sampler = GlobalSampler::new(data.len(), args.global_batch, 11)?;
    let results = local::run(n, CommOptions::default(), |comm| -> Result<Vec<f64>> {
        let rank = comm.rank();
        let device = Device::flex().autodiff();
        let (mut ddp, mut model) = DataParallel::wrap(Box::new(comm), Mlp::init(&device), DdpOptions::default())?;
        let mut optim = AdamConfig::new().init();
        let mut losses = Vec::new();
        for step in 0..args.steps {
            let batch = sampler.batch(step);
            let mine = &sampler.split(&batch, &shares)[rank];
            let mut offset = 0;
            let rank_plan = ballast::balancer::RankPlan::new(mine.len(), args.caps[rank])?;
            for m in rank_plan.micro_batches() {
                let (x, y) = data.batch(&mine[offset..offset + m], &device);
                offset += m;
                let loss = MseLoss::new().forward(model.forward(x), y, Reduction::Mean);
                ddp.backward(&model, loss, m)?;
            }
            let (next, stats) = ddp.finish_step(model, &mut optim, 3e-3)?;
            model = next;
            losses.push(stats.loss);
            if rank == 0 && (step % 10 == 0 || step + 1 == args.steps) {
                println!(
                    "step {step:>4}  loss {:.5}  samples {}  rank-0 micro-batches {}",
                    stats.loss, stats.global_samples, stats.micro_batches
                );
            }
        }
        ddp.verify_replicas(&model)?;
        Ok(losses)
    });
    let mut first_last = None;
    for r in results {
        let losses = r?;
        first_last = Some((losses[0], losses[losses.len() - 1]));
    }
    if let Some((first, last)) = first_last {
        println!("{n} ranks, replicas bit-identical; loss {first:.4} -> {last:.4}");
    }
    Ok(ExitCode::SUCCESS)
}
