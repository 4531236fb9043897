//! `ballast bench overhead`: what wrapping a loop in [`DataParallel`] costs on one rank.
//!
//! Both loops train the same MLP from the same parameters on the same batch, in the same
//! micro-batches, on the same device: ours through [`DataParallel`] on a world of one, the plain
//! one with burn's own `GradientsAccumulator` (each micro-batch's mean loss divided by the number
//! of micro-batches). Both read the step's loss once (as any loop that logs does). Steps
//! alternate between the two loops, ABBA, so machine noise hits both alike.

use std::{process::ExitCode, time::Instant};

use anyhow::Result;
use ballast::{
    collectives::{local, CommOptions},
    device::DeviceChoice,
    params::{flatten_params, load_params},
    testing::relative_difference,
    DataParallel, DdpOptions,
};
use burn::{
    module::Module,
    nn::{
        loss::{MseLoss, Reduction},
        Linear, LinearConfig, Relu,
    },
    optim::{GradientsAccumulator, GradientsParams, SgdConfig},
    tensor::{Device, Distribution, Tensor},
};
use serde_json::json;

/// Options of `ballast bench overhead`.
#[derive(clap::Args)]
pub struct OverheadArgs {
    /// Print JSON lines (the last one is the summary).
    #[arg(long)]
    pub json: bool,
    /// Timed steps per path.
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// Samples per step; one measurement per value, the summary reports the last.
    #[arg(long, value_delimiter = ',', default_value = "128,256,512")]
    pub batches: Vec<usize>,
    /// Hidden width of the benchmark MLP.
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Micro-batches per step (equal sizes; the batch must divide by it).
    #[arg(long, default_value_t = 4)]
    pub micro_batches: usize,
    /// Device of the rank: flex, wgpu, wgpu:cpu or cuda.
    #[arg(long, default_value = "flex")]
    pub device: String,
}

const IN: usize = 256;
const OUT: usize = 16;

#[derive(Module, Debug)]
struct Net {
    a: Linear,
    b: Linear,
    c: Linear,
    act: Relu,
}

impl Net {
    fn new(width: usize, device: &Device) -> Self {
        Self {
            a: LinearConfig::new(IN, width).init(device),
            b: LinearConfig::new(width, width).init(device),
            c: LinearConfig::new(width, OUT).init(device),
            act: Relu::new(),
        }
    }

    fn loss(&self, x: Tensor<2>, y: Tensor<2>) -> Tensor<1> {
        let h = self.act.forward(self.a.forward(x));
        let h = self.act.forward(self.b.forward(h));
        MseLoss::new().forward(self.c.forward(h), y, Reduction::Mean)
    }
}

/// Runs the benchmark.
pub fn run(args: &OverheadArgs) -> Result<ExitCode> {
    anyhow::ensure!(
        !args.batches.is_empty() && args.steps > 0,
        "need at least one batch size and one step"
    );
    let k = args.micro_batches;
    anyhow::ensure!(
        k > 0 && args.batches.iter().all(|b| b % k == 0),
        "--micro-batches {k} must divide every batch size ({:?})",
        args.batches
    );
    let choice: DeviceChoice = args.device.parse()?;
    let device = choice.device(0)?.autodiff();
    let target = if choice.is_gpu() { 1.05 } else { 1.03 };
    let mut last = None;
    for &batch in &args.batches {
        let m = measure(&device, batch, args.steps, args.width, k)?;
        let line = json!({
            "bench": "overhead", "summary": false, "device": choice.to_string(), "params": m.params,
            "batch": batch, "micro_batches": k, "steps": args.steps,
            "ours_step_ms": {"mean": m.mean_ours * 1e3, "median": m.med_ours * 1e3},
            "plain_step_ms": {"mean": m.mean_plain * 1e3, "median": m.med_plain * 1e3},
            "overhead_ratio": m.med_ours / m.med_plain,
            "fixed_overhead_ms": (m.med_ours - m.med_plain) * 1e3,
            "max_rel_param_diff": m.param_rel,
            "device_to_host_bytes_per_step": m.to_host,
        });
        if args.json {
            println!("{line}");
        } else {
            println!(
                "{} parameters on {choice}, batch {batch} in {k} micro-batches: ours {:.2} ms, plain {:.2} ms per step \
                 (median); ratio {:.3}; parameters differ by {:.1e} (relative); {} bytes device→host per step",
                m.params,
                m.med_ours * 1e3,
                m.med_plain * 1e3,
                m.med_ours / m.med_plain,
                m.param_rel,
                m.to_host,
            );
        }
        last = Some((batch, m));
    }
    let (batch, m) = last.expect("at least one batch");
    let summary = json!({
        "bench": "overhead", "summary": true, "device": choice.to_string(), "batch": batch,
        "micro_batches": k, "params": m.params,
        "overhead_ratio": m.med_ours / m.med_plain, "overhead_ratio_mean": m.mean_ours / m.mean_plain,
        "fixed_overhead_ms": (m.med_ours - m.med_plain) * 1e3, "target": target,
        "device_to_host_bytes_per_step": m.to_host,
    });
    if args.json {
        println!("{summary}");
    }
    Ok(ExitCode::SUCCESS)
}

struct Measured {
    params: usize,
    mean_ours: f64,
    mean_plain: f64,
    med_ours: f64,
    med_plain: f64,
    param_rel: f64,
    to_host: u64,
}

fn measure(device: &Device, batch: usize, steps: usize, width: usize, k: usize) -> Result<Measured> {
    let m = batch / k;
    let x = Tensor::<2>::random([batch, IN], Distribution::Uniform(-1.0, 1.0), device);
    let y = Tensor::<2>::random([batch, OUT], Distribution::Uniform(-1.0, 1.0), device);
    let micro = |t: &Tensor<2>, i: usize| t.clone().narrow(0, i * m, m);
    let comm = local::world(1, CommOptions::default()).pop().expect("one rank");
    let (mut ddp, mut ours) = DataParallel::wrap(Box::new(comm), Net::new(width, device), DdpOptions::default())?;
    let mut plain = load_params(Net::new(width, device), &flatten_params(&ours));
    let mut to_host = 0;
    let mut opt_ours = SgdConfig::new().init();
    let mut opt_plain = SgdConfig::new().init();
    let lr = 1e-3;
    let mut t_ours = Vec::new();
    let mut t_plain = Vec::new();
    let warmup = 3;
    for i in 0..steps + warmup {
        for ours_first in [i % 2 == 0, i % 2 != 0] {
            let started = Instant::now();
            if ours_first {
                for j in 0..k {
                    let loss = ours.loss(micro(&x, j), micro(&y, j));
                    ddp.backward(&ours, loss, m)?;
                }
                let (next, stats) = ddp.finish_step(ours, &mut opt_ours, lr)?;
                ours = next;
                to_host = stats.traffic.to_host;
                if i >= warmup {
                    t_ours.push(started.elapsed().as_secs_f64());
                }
            } else {
                let mut accumulator = GradientsAccumulator::new();
                let mut loss_sum: Option<Tensor<1>> = None;
                for j in 0..k {
                    let loss = plain.loss(micro(&x, j), micro(&y, j)).div_scalar(k as f32);
                    let value = loss.clone().inner();
                    loss_sum = Some(match loss_sum {
                        Some(s) => s + value,
                        None => value,
                    });
                    accumulator.accumulate(&plain, GradientsParams::from_grads(loss.backward(), &plain));
                }
                let _value: f32 = loss_sum.expect("k > 0").into_scalar();
                plain = opt_plain.step(lr, plain, accumulator.grads());
                if i >= warmup {
                    t_plain.push(started.elapsed().as_secs_f64());
                }
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok(Measured {
        params: ours.num_params(),
        mean_ours: mean(&t_ours),
        mean_plain: mean(&t_plain),
        med_ours: median(&mut t_ours),
        med_plain: median(&mut t_plain),
        param_rel: relative_difference(&flatten_params(&ours), &flatten_params(&plain)),
        to_host,
    })
}
