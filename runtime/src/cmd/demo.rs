//! `ballast demo`: ranks as threads with unequal shares sum fused "gradients" exactly.

use std::process::ExitCode;

use anyhow::{ensure, Result};
use ballast::{
    balancer::{split_proportional, StepPlan},
    collectives::{bucket::FusedBuffer, local, CommOptions, Communicator},
};

/// Options of `ballast demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Relative speeds of the simulated devices, one per rank.
    #[arg(long, value_delimiter = ',', default_value = "3,2,1")]
    speeds: Vec<f64>,
    /// Samples per optimizer step over all ranks.
    #[arg(long, default_value_t = 48)]
    global_batch: usize,
}

/// Runs the command.
pub fn run(args: &Args) -> Result<ExitCode> {
    let shares = split_proportional(args.global_batch, &args.speeds)?;
    let caps: Vec<usize> = shares.iter().map(|&s| s.div_ceil(2).max(1)).collect();
    let plan = StepPlan::new(args.global_batch, &shares, &caps)?;
    println!("rank  share  micro-batches");
    for (r, p) in plan.ranks.iter().enumerate() {
        println!("{r:>4}  {:>5}  {:?}", p.share, p.micro_batches());
    }
    // Each sample contributes a "gradient" equal to its index; the mean over the global batch is
    // known exactly, so the demo checks itself.
    let lens = [7usize, 1000, 3];
    let n = plan.ranks.len();
    let offsets = plan.offsets();
    let results = local::run(
        n,
        CommOptions::default(),
        |mut comm| -> ballast::collectives::Result<Vec<f32>> {
            let r = comm.rank();
            let mut grads = FusedBuffer::<f32>::new(&lens, 4096)?;
            for sample in offsets[r]..offsets[r] + plan.ranks[r].share {
                for t in 0..lens.len() {
                    grads.tensor_mut(t).iter_mut().for_each(|g| *g += sample as f32);
                }
            }
            grads.all_reduce_sum(&mut comm)?;
            Ok(grads.as_slice().to_vec())
        },
    );
    let want = (0..args.global_batch).sum::<usize>() as f32;
    for (r, res) in results.into_iter().enumerate() {
        let sums = res?;
        ensure!(sums.iter().all(|&s| s == want), "rank {r} got a wrong sum");
    }
    println!(
        "{n} ranks summed {} fused gradient elements exactly: mean gradient {}",
        lens.iter().sum::<usize>(),
        want / args.global_batch as f32
    );
    Ok(ExitCode::SUCCESS)
}
