//! A user's own training loop with ballast, in PyTorch DDP's order: per micro-batch
//! `ddp.backward`, then `ddp.reduce` (the averaged gradients of the global batch, in burn's own
//! `GradientsParams`), global-norm clipping with the norm logged, and burn's own optimizer.
//!
//! Three unequal ranks (shares 5:2:1 of each batch, micro-batches of at most 8, 5 and 3 samples)
//! run as threads, or one per process under `mpirun -np 3`. Every rank also trains the same model
//! on one device over the whole batch with a plain burn loop (no ballast code), and rank 0 prints
//! one JSON line comparing the two.
//!
//! ```text
//! custom_loop --optimizer adamw            # threads
//! mpirun -np 3 custom_loop --optimizer sharded
//! ```

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use ballast::{
    cluster::Launch,
    collectives::{local, CommOptions, Communicator},
    optim::HostAdamConfig,
    optim::{shard_counts, ShardPlace, ShardedAdam},
    params::{flatten_params, load_params},
    DataParallel, DdpOptions, GlobalSampler,
};
use ballast_examples::Lcg;
use burn::{
    module::{Module, ModuleVisitor, Param},
    nn::{
        loss::{MseLoss, Reduction},
        Linear, LinearConfig, Relu,
    },
    optim::{AdamWConfig, GradientsParams, ModuleOptimizer, SgdConfig},
    tensor::{Device, Tensor, TensorData},
};
use clap::{Parser, ValueEnum};

/// A custom training loop over three unequal ranks, compared with one device.
#[derive(Parser)]
#[command(name = "custom_loop", version)]
struct Cli {
    /// The optimizer: burn's AdamW or SGD, or ballast's sharded AdamW.
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: Optim,
    /// Steps to train.
    #[arg(long, default_value_t = 20)]
    steps: u64,
    /// Clip the gradient to this global L2 norm.
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// Samples per global batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Optim {
    Adamw,
    Sgd,
    Sharded,
}

/// Each rank's share of a batch and its largest micro-batch: unequal devices.
const SHARES: [usize; 3] = [5, 2, 1];
const MICRO_BATCH: [usize; 3] = [8, 5, 3];
const FEATURES: usize = 16;
const SAMPLES: usize = 1024;
const WEIGHT_DECAY: f32 = 0.01;

#[derive(Module, Debug)]
struct Net {
    l1: Linear,
    act: Relu,
    l2: Linear,
}

impl Net {
    fn new(device: &Device) -> Self {
        Self {
            l1: LinearConfig::new(FEATURES, 64).init(device),
            act: Relu::new(),
            l2: LinearConfig::new(64, 4).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.l2.forward(self.act.forward(self.l1.forward(x)))
    }
}

/// Inputs and targets, the same on every rank (generated from one seed).
struct Data {
    x: Vec<f32>,
    y: Vec<f32>,
}

impl Data {
    fn new() -> Self {
        let mut rng = Lcg::new(7);
        let x: Vec<f32> = (0..SAMPLES * FEATURES).map(|_| rng.unit() * 4.0 - 2.0).collect();
        let y = x
            .chunks(FEATURES)
            .flat_map(|row| (0..4).map(move |t| 0.8 * row[t] * row[t + 4] - 0.4 * row[t + 8]))
            .collect();
        Self { x, y }
    }

    fn batch(&self, indices: &[usize], device: &Device) -> (Tensor<2>, Tensor<2>) {
        let pick = |v: &[f32], width: usize| -> Vec<f32> {
            indices
                .iter()
                .flat_map(|&i| v[i * width..(i + 1) * width].iter().copied())
                .collect()
        };
        let n = indices.len();
        (
            Tensor::from_data(TensorData::new(pick(&self.x, FEATURES), [n, FEATURES]), device),
            Tensor::from_data(TensorData::new(pick(&self.y, 4), [n, 4]), device),
        )
    }
}

fn loss(model: &Net, data: &Data, indices: &[usize], device: &Device) -> Tensor<1> {
    let (x, y) = data.batch(indices, device);
    MseLoss::new().forward(model.forward(x), y, Reduction::Mean)
}

/// What one run produced: the final parameters, each step's loss and gradient norm.
struct Run {
    params: Vec<f32>,
    losses: Vec<f64>,
    norms: Vec<f32>,
}

fn lr(optim: Optim) -> f64 {
    match optim {
        Optim::Sgd => 0.05,
        Optim::Adamw | Optim::Sharded => 0.01,
    }
}

fn burn_optimizer(optim: Optim) -> ModuleOptimizer {
    match optim {
        Optim::Sgd => SgdConfig::new().init(),
        Optim::Adamw | Optim::Sharded => AdamWConfig::new().with_weight_decay(WEIGHT_DECAY).init(),
    }
}

/// This rank's part of the data-parallel run: the user's loop.
fn train(comm: Box<dyn Communicator>, device: &Device, cli: &Cli) -> Result<(Run, DataParallel)> {
    let rank = comm.rank();
    let data = Data::new();
    let model = load_params(Net::new(device), &initial_params());
    let (mut ddp, mut model) = DataParallel::wrap(comm, model, DdpOptions::default())?;
    let mut optim = burn_optimizer(cli.optimizer);
    let adamw = HostAdamConfig {
        weight_decay: WEIGHT_DECAY,
        decoupled: true,
        ..HostAdamConfig::default()
    };
    let counts = shard_counts(flatten_params(&model).len(), &[3.0, 2.0, 1.0])?;
    let mut sharded = ShardedAdam::new(&model, rank, counts, adamw, ShardPlace::Device)?;
    let sampler = GlobalSampler::new(SAMPLES, cli.batch, 11)?;
    let mut run = Run {
        params: Vec::new(),
        losses: Vec::new(),
        norms: Vec::new(),
    };
    for step in 0..cli.steps {
        let mine = &sampler.split(&sampler.batch(step), &SHARES)[rank];
        for micro_batch in mine.chunks(MICRO_BATCH[rank]) {
            let loss = loss(&model, &data, micro_batch, device);
            ddp.backward(&model, loss, micro_batch.len())?;
        }
        let lr = lr(cli.optimizer);
        if cli.optimizer == Optim::Sharded {
            // ballast's sharded AdamW: the gradient is reduce-scattered, one shard per rank.
            let mut grads = ddp.reduce_for(&model, &sharded)?;
            run.norms.push(grads.clip_global_norm(cli.clip)?);
            run.losses.push(grads.stats().loss);
            model = ddp.apply(model, &mut sharded, grads, lr)?.0;
        } else {
            // burn's own optimizer, on the averaged gradients of the global batch.
            let mut grads = ddp.reduce(&model)?;
            run.norms.push(grads.clip_global_norm(cli.clip)?);
            run.losses.push(grads.stats().loss);
            model = optim.step(lr, model, grads.into_params()?);
        }
        if rank == 0 {
            eprintln!(
                "step {step}: loss {:.5}, gradient norm {:.4}",
                run.losses[step as usize], run.norms[step as usize]
            );
        }
    }
    ddp.verify_replicas(&model)
        .context("the replicas differ after training")?;
    run.params = flatten_params(&model);
    Ok((run, ddp))
}

/// The same training on one device over the whole batch, with a plain burn loop: burn's
/// gradients, the global norm summed here over every parameter, burn's optimizer.
fn reference(device: &Device, cli: &Cli) -> Result<Run> {
    let data = Data::new();
    let mut model = load_params(Net::new(device), &initial_params());
    let mut optim = burn_optimizer(cli.optimizer);
    let sampler = GlobalSampler::new(SAMPLES, cli.batch, 11)?;
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for step in 0..cli.steps {
        let loss = loss(&model, &data, &sampler.batch(step), device);
        losses.push(f64::from(loss.clone().into_scalar::<f32>()));
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let norm = squared_norm(&model, &grads).sqrt() as f32;
        norms.push(norm);
        let scale = cli.clip / (norm + 1e-6);
        if scale < 1.0 {
            grads = scaled(&model, grads, scale);
        }
        model = optim.step(lr(cli.optimizer), model, grads);
    }
    Ok(Run {
        params: flatten_params(&model),
        losses,
        norms,
    })
}

fn squared_norm(model: &Net, grads: &GradientsParams) -> f64 {
    struct Sum<'a>(&'a GradientsParams, f64);
    impl ModuleVisitor for Sum<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                let v: Vec<f32> = g.into_data().try_to_vec::<f32>().expect("f32 gradient");
                self.1 += v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
            }
        }
    }
    let mut sum = Sum(grads, 0.0);
    model.visit(&mut sum);
    sum.1
}

fn scaled(model: &Net, grads: GradientsParams, scale: f32) -> GradientsParams {
    struct Scale(GradientsParams, f32);
    impl ModuleVisitor for Scale {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.remove::<D>(param.id) {
                self.0.register(param.id, g.mul_scalar(self.1));
            }
        }
    }
    let mut s = Scale(grads, scale);
    model.visit(&mut s);
    s.0
}

/// `‖a − b‖ / ‖b‖`.
fn relative(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|&y| f64::from(y).powi(2)).sum();
    (diff / norm).sqrt()
}

/// Rank 0's report: the distributed run against the reference.
fn report(cli: &Cli, mode: &str, run: &Run, reference: &Run) -> serde_json::Value {
    let loss_rel = run
        .losses
        .iter()
        .zip(&reference.losses)
        .map(|(a, b)| ((a - b) / b).abs())
        .fold(0.0, f64::max);
    let clipped = run.norms.iter().filter(|&&n| n > cli.clip).count();
    serde_json::json!({
        "optimizer": cli.optimizer.to_possible_value().map(|v| v.get_name().to_string()),
        "mode": mode,
        "ranks": SHARES.len(),
        "steps": cli.steps,
        "clip": cli.clip,
        "clipped_steps": clipped,
        "reference_clipped_steps": reference.norms.iter().filter(|&&n| n > cli.clip).count(),
        "max_rel_param": relative(&run.params, &reference.params),
        "max_rel_loss": loss_rel,
        "max_rel_norm": run.norms.iter().zip(&reference.norms).map(|(a, b)| f64::from((a - b).abs() / b)).fold(0.0, f64::max),
        "norms": run.norms,
        "replicas_identical": true,
    })
}

fn main() -> ExitCode {
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("custom_loop: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let launch = Launch::from_env()?;
    if let Some(rank) = ballast::world::join(&launch, CommOptions::default())? {
        if rank.comm.world_size() != SHARES.len() {
            bail!(
                "this example runs on {} ranks: mpirun -np {}",
                SHARES.len(),
                SHARES.len()
            );
        }
        let (run, ddp) = train(rank.comm, &rank.device, cli)?;
        if ddp.rank() == 0 {
            println!("{}", report(cli, "mpirun", &run, &reference(&rank.device, cli)?));
        }
        return Ok(());
    }
    let device = Device::flex().autodiff();
    let results = local::run(SHARES.len(), CommOptions::default(), |comm| {
        train(Box::new(comm), &device, cli).map(|(run, _)| run)
    });
    let mut runs = Vec::new();
    for (rank, result) in results.into_iter().enumerate() {
        runs.push(result.with_context(|| format!("rank {rank}"))?);
    }
    let reference = reference(&device, cli)?;
    println!("{}", report(cli, "threads", &runs[0], &reference));
    Ok(())
}

/// The parameters every run starts from, uniform in ±0.25 from a fixed seed (burn initialises
/// from its own random state, so a fresh model would differ between the two runs).
fn initial_params() -> Vec<f32> {
    let len = flatten_params(&Net::new(&Device::flex())).len();
    let mut rng = Lcg::new(3);
    (0..len).map(|_| rng.unit() * 0.5 - 0.25).collect()
}
