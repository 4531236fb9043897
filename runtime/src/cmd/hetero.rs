//! `ballast bench hetero`: balanced against naive equal-split DDP against the ideal, on ranks
//! of unequal speed and memory, measured side by side in one run.
//!
//! Run it with ranks pinned to unequal core sets, e.g.
//! `mpirun -np 3 cluster/pin-by-rank.sh 0 1 1 -- target/release/ballast bench hetero --json`
//! (rank 0 alone on a core, ranks 1 and 2 sharing one: speeds about 2:1:1).
//!
//! - **ideal**: every rank trains on its own (forward and backward, no communication) for the
//!   same wall-clock window, all at once, at the fastest of the micro-batches it could run (the
//!   balanced plan's, its memory cap, the fastest its probes measured, the naive one); the sum
//!   of the ranks' samples/s.
//! - **naive**: equal shares, one micro-batch size everywhere capped by the smallest budget,
//!   one all-reduce per step: what DDP does with unequal devices.
//! - **balanced**: the measured plan with online rebalancing.
//! - **convergence** (first, once): from equal shares with online rebalancing, the step whose
//!   plan first comes within 10 % of the speeds measured so far, and how many times it changed.
//!
//! Standalone, naive and balanced blocks follow each other in rounds, the order rotating, so
//! drift in machine load hits all three; the summary gives the pooled ratios and the spread of
//! the per-round ones.

use std::{process::ExitCode, time::Instant};

use anyhow::Result;
use ballast::{
    balance::{BalanceOptions, Balancer, InitialPlan},
    collectives::CommunicatorExt,
    memory::DeviceMeter,
    testing::{ImageConvNet, Regressor, SyntheticSet, IMAGE_SIDE, TARGETS},
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
    /// Rounds of standalone, naive and balanced blocks.
    #[arg(long, default_value_t = 8)]
    pub blocks: usize,
    /// Steps per naive or balanced block.
    #[arg(long, default_value_t = 6)]
    pub steps_per_block: u64,
    /// Seconds of each standalone (ideal) block.
    #[arg(long, default_value_t = 1.0)]
    pub standalone_secs: f64,
    /// Channels of the convolutional model.
    #[arg(long, default_value_t = 8)]
    pub channels: usize,
    /// Steps of the convergence block (from equal shares, rebalancing online).
    #[arg(long, default_value_t = 18)]
    pub convergence_steps: u64,
}

/// Runs the benchmark.
pub fn run(args: &HeteroArgs) -> Result<ExitCode> {
    let comm = super::pinned::pinned_world("hetero")?;
    let rank = comm.rank();
    let budget = super::pinned::rank_budget(&args.budgets, rank)?;
    let device = Device::flex().autodiff();
    device.seed(5);
    // A whole number of global batches, so every step is a full one (as in a long epoch; a
    // short last batch costs a step's fixed overhead for a fraction of the samples).
    let samples = 4096usize.div_ceil(args.global_batch.max(1)) * args.global_batch.max(1);
    let data = SyntheticSet::with_dims(samples, IMAGE_SIDE * IMAGE_SIDE, TARGETS, 5);
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
    let loss_fn_ideal = loss_fn;
    let pool: Vec<usize> = (0..64).collect();
    let options = BalanceOptions {
        budget_bytes: budget,
        ..BalanceOptions::default()
    };
    let mut balanced = Balancer::probe(
        &mut ddp,
        &model,
        &mut loss_fn,
        &pool,
        args.global_batch,
        meter,
        options.clone(),
    )?;
    let mut naive = balanced.variant(InitialPlan::Naive, false)?;
    let mut optim = AdamConfig::new().init();
    let emit = |v: serde_json::Value| {
        if rank == 0 {
            println!("{v}");
        }
    };

    // Ideal: every rank alone, all at once, for the same window. First each rank tries the
    // micro-batches it could run (the balanced plan's, the largest its memory holds, the fastest
    // its probes measured, the naive one) in short windows over several sweeps, and keeps the
    // one with the best window, so the ideal never suffers from the planner's choice or from
    // one slow spell of the machine.
    let report = &balanced.reports()[rank];
    let cap = ballast::balancer::memory_cap(report, &options.tunables).max(1);
    let fastest_probed = report
        .speed_curve
        .iter()
        .filter(|p| p.micro_batch <= cap)
        .max_by(|a, b| a.samples_per_sec.total_cmp(&b.samples_per_sec))
        .map_or(cap, |p| p.micro_batch);
    let candidates = [
        balanced.plan().ranks[rank].micro_batch.max(1),
        cap,
        fastest_probed,
        naive.plan().ranks[rank].micro_batch.max(1),
    ];
    let mut next = 0usize;
    let mut standalone = |ddp: &mut DataParallel, model: &ImageConvNet, micro_batch: usize, secs: f64| -> Result<f64> {
        ddp.comm().barrier()?;
        let started = Instant::now();
        let mut samples = 0usize;
        while started.elapsed().as_secs_f64() < secs {
            let idx: Vec<usize> = (0..micro_batch).map(|i| (next + i) % data.len()).collect();
            next += micro_batch;
            drop(loss_fn_ideal(model, &idx).backward());
            samples += micro_batch;
        }
        Ok(samples as f64 / started.elapsed().as_secs_f64())
    };
    let mut best_window = [0.0f64; 4];
    for _sweep in 0..3 {
        for (best, &micro_batch) in best_window.iter_mut().zip(&candidates) {
            let rate = standalone(&mut ddp, &model, micro_batch, args.standalone_secs / 4.0)?;
            *best = best.max(rate);
        }
    }
    let pick = (0..candidates.len()).fold(0, |a, b| if best_window[b] > best_window[a] { b } else { a });
    let ideal_micro_batch = candidates[pick];
    let tried: Vec<[usize; 4]> = ddp.comm().all_gather(&candidates)?;
    let tried_rates: Vec<[f64; 4]> = ddp.comm().all_gather(&best_window)?;
    let chosen: Vec<usize> = ddp.comm().all_gather(&ideal_micro_batch)?;
    emit(json!({
        "bench": "hetero", "phase": "candidates", "micro_batches_tried": tried, "samples_per_sec_tried": tried_rates,
        "ideal_micro_batches": chosen,
    }));

    let mut step = 0u64;
    let convergence = {
        let mut from_equal = balanced.variant(InitialPlan::Equal, true)?;
        let mut shares = Vec::new();
        let mut speeds = Vec::new();
        for _ in 0..args.convergence_steps {
            shares.push(from_equal.plan().shares());
            let (m, _) = from_equal.step(&mut ddp, model, &mut optim, 1e-3, &sampler.batch(step), &mut loss_fn)?;
            model = m;
            step += 1;
            speeds.push(from_equal.observed_speeds());
        }
        let converged = steps_to_converge(&shares, &speeds, 0.10);
        let replans = shares.windows(2).filter(|w| w[0] != w[1]).count();
        let line = json!({
            "bench": "hetero", "phase": "convergence", "from": "equal", "steps": args.convergence_steps,
            "steps_to_within_10pct": converged, "replans": replans, "shares": shares,
            "final_speeds": speeds.last(),
        });
        emit(line.clone());
        line
    };
    // Let rebalancing settle before measuring.
    for _ in 0..args.steps_per_block {
        let (m, _) = balanced.step(&mut ddp, model, &mut optim, 1e-3, &sampler.batch(step), &mut loss_fn)?;
        model = m;
        step += 1;
    }
    // Rounds of (standalone, naive, balanced), the order rotating, so drift in the machine's
    // speed over the run hits all three alike.
    let mut totals = [(0usize, 0f64), (0usize, 0f64)];
    let mut ideal_rates: Vec<f64> = Vec::new();
    // Per round: (naive, balanced, ideal) samples/s.
    let mut rounds = vec![[0.0f64; 3]; args.blocks];
    for (block, round) in rounds.iter_mut().enumerate() {
        for phase in 0..3 {
            let which = (phase + block) % 3;
            if which == 2 {
                let rate = standalone(&mut ddp, &model, ideal_micro_batch, args.standalone_secs)?;
                let rates: Vec<f64> = ddp.comm().all_gather(&rate)?;
                let ideal: f64 = rates.iter().sum();
                ideal_rates.push(ideal);
                round[2] = ideal;
                emit(json!({
                    "bench": "hetero", "phase": "standalone", "block": block, "samples_per_sec": rates,
                    "ideal": ideal, "micro_batches": chosen,
                }));
                continue;
            }
            let (b, name) = if which == 0 {
                (&mut naive, "naive")
            } else {
                (&mut balanced, "balanced")
            };
            let shares = b.plan().shares();
            let caps = b.plan().micro_batches();
            ddp.comm().barrier()?;
            let started = Instant::now();
            let mut n = 0usize;
            let mut compute = vec![0.0; shares.len()];
            let mut step_ms = Vec::new();
            for _ in 0..args.steps_per_block {
                let step_started = Instant::now();
                let batch = sampler.batch(step);
                n += batch.len();
                let (m, out) = b.step(&mut ddp, model, &mut optim, 1e-3, &batch, &mut loss_fn)?;
                for (c, t) in compute.iter_mut().zip(&out.stats.rank_compute) {
                    *c += t / args.steps_per_block as f64;
                }
                model = m;
                step += 1;
                step_ms.push((step_started.elapsed().as_secs_f64() * 1e4).round() / 10.0);
            }
            let secs = started.elapsed().as_secs_f64();
            totals[which].0 += n;
            totals[which].1 += secs;
            round[which] = n as f64 / secs;
            emit(json!({
                "bench": "hetero", "phase": name, "block": block, "samples": n, "seconds": secs,
                "samples_per_sec": n as f64 / secs, "shares": shares, "micro_batches": caps,
                "mean_rank_compute_s": compute, "step_ms": step_ms,
            }));
        }
    }
    let ideal = ideal_rates.iter().sum::<f64>() / ideal_rates.len().max(1) as f64;
    let naive_rate = totals[0].0 as f64 / totals[0].1;
    let balanced_rate = totals[1].0 as f64 / totals[1].1;
    ddp.verify_replicas(&model)?;
    // Each round's ratios, its three phases measured back to back: their spread shows how much
    // the machine's drift moves the pooled figures.
    let spread = |f: &dyn Fn(&[f64; 3]) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        json!({"min": v.first(), "median": v.get(v.len() / 2), "max": v.last()})
    };
    let rounds_vs_naive = spread(&|r| r[1] / r[0]);
    let rounds_vs_ideal = spread(&|r| r[1] / r[2]);
    emit(json!({
        "bench": "hetero", "summary": true, "ranks": chosen.len(),
        "naive_samples_per_sec": naive_rate, "balanced_samples_per_sec": balanced_rate, "ideal_samples_per_sec": ideal,
        "balanced_vs_naive": balanced_rate / naive_rate, "balanced_vs_ideal": balanced_rate / ideal,
        "targets": {"balanced_vs_naive": 1.30, "balanced_vs_ideal": 0.92},
        "rounds": args.blocks, "rounds_balanced_vs_naive": rounds_vs_naive, "rounds_balanced_vs_ideal": rounds_vs_ideal,
        "balanced_shares": balanced.plan().shares(), "balanced_micro_batches": balanced.plan().micro_batches(),
        "naive_shares": naive.plan().shares(), "naive_micro_batches": naive.plan().micro_batches(),
        "convergence_steps": convergence["steps_to_within_10pct"], "convergence_replans": convergence["replans"],
    }));
    Ok(ExitCode::SUCCESS)
}

/// The number of steps until the shares in force are within `band` of proportional to the
/// speeds observed by then: the first `t + 1` with `shares[t + 1]` within `band` of
/// `speeds[t]`'s proportions (shares of step 0 were planned before any step was seen).
fn steps_to_converge(shares: &[Vec<usize>], speeds: &[Vec<f64>], band: f64) -> Option<usize> {
    (0..shares.len().saturating_sub(1)).find_map(|t| {
        let total: f64 = speeds[t].iter().sum();
        let batch: usize = shares[t + 1].iter().sum();
        let close = shares[t + 1].iter().zip(&speeds[t]).all(|(&s, v)| {
            let ideal = batch as f64 * v / total;
            (s as f64 - ideal).abs() <= band * ideal
        });
        close.then_some(t + 1)
    })
}

#[cfg(test)]
mod tests {
    use super::steps_to_converge;

    #[test]
    fn convergence_counts_steps_until_shares_follow_speeds() {
        let shares = vec![
            vec![120, 120, 120],
            vec![120, 120, 120],
            vec![175, 92, 93],
            vec![180, 90, 90],
        ];
        let speeds = vec![vec![200.0, 100.0, 100.0]; 4];
        assert_eq!(steps_to_converge(&shares, &speeds, 0.10), Some(2));
        assert_eq!(steps_to_converge(&shares, &speeds, 0.001), Some(3));
        assert_eq!(steps_to_converge(&shares[..2], &speeds, 0.10), None);
    }
}
