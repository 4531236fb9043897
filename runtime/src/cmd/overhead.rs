//! `ballast bench overhead`: what wrapping a loop in `DataParallel` costs on one rank, on an MLP
//! (the loops and how they are timed: `ballast::testing::overhead`).

use std::process::ExitCode;

use anyhow::Result;
use ballast::{
    device::DeviceChoice,
    testing::overhead::{measure_overhead, Overhead},
};
use burn::{
    module::Module,
    nn::{
        loss::{MseLoss, Reduction},
        Linear, LinearConfig, Relu,
    },
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
            "ours_step_ms": {"mean": m.mean_ours * 1e3, "median": m.median_ours * 1e3},
            "plain_step_ms": {"mean": m.mean_plain * 1e3, "median": m.median_plain * 1e3},
            "overhead_ratio": m.ratio(),
            "fixed_overhead_ms": (m.median_ours - m.median_plain) * 1e3,
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
                m.median_ours * 1e3,
                m.median_plain * 1e3,
                m.ratio(),
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
        "overhead_ratio": m.ratio(), "overhead_ratio_mean": m.mean_ours / m.mean_plain,
        "fixed_overhead_ms": (m.median_ours - m.median_plain) * 1e3, "target": target,
        "device_to_host_bytes_per_step": m.to_host,
    });
    if args.json {
        println!("{summary}");
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(device: &Device, batch: usize, steps: usize, width: usize, k: usize) -> Result<Overhead> {
    let m = batch / k;
    let x = Tensor::<2>::random([batch, IN], Distribution::Uniform(-1.0, 1.0), device);
    let y = Tensor::<2>::random([batch, OUT], Distribution::Uniform(-1.0, 1.0), device);
    let micro = |t: &Tensor<2>, i: usize| t.clone().narrow(0, i * m, m);
    Ok(measure_overhead(
        Net::new(width, device),
        k,
        m,
        steps,
        1e-3,
        |net: &Net, j| net.loss(micro(&x, j), micro(&y, j)),
    )?)
}
