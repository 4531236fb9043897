//! What wrapping a training loop in [`DataParallel`] costs on one rank, for `ballast bench
//! overhead` and the GPU kit's ResNet check.
//!
//! Both loops train the same model from the same parameters on the same micro-batches, on the
//! same device: ours through [`DataParallel`] on a world of one, the plain one with burn's own
//! `GradientsAccumulator` (each micro-batch's mean loss divided by the number of micro-batches).
//! Both read the step's loss once (as any loop that logs does). Steps alternate between the two
//! loops, ABBA, so machine noise hits both alike.

use std::time::Instant;

use burn::{
    module::Module,
    optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer, SgdConfig},
    tensor::Tensor,
};

use ballast_collectives::{local, CommOptions};

use crate::{
    ddp::{DataParallel, DdpOptions},
    params::{flatten_params, load_params},
};

use super::relative_difference;
use crate::Error;

/// Steps of each loop run before timing starts (kernel compilation, pool growth).
pub const WARMUP_STEPS: usize = 3;

/// Step times of the two loops and what ours moved.
#[derive(Debug, Clone, PartialEq)]
pub struct Overhead {
    /// Parameters of the model.
    pub params: usize,
    /// Mean seconds per step through [`DataParallel`].
    pub mean_ours: f64,
    /// Mean seconds per step of the plain burn loop.
    pub mean_plain: f64,
    /// Median seconds per step through [`DataParallel`].
    pub median_ours: f64,
    /// Median seconds per step of the plain burn loop.
    pub median_plain: f64,
    /// Relative difference of the two models' parameters at the end.
    pub param_rel: f64,
    /// Device→host bytes of our last step.
    pub to_host: u64,
}

impl Overhead {
    /// Median step time of ours over the plain loop's.
    pub fn ratio(&self) -> f64 {
        self.median_ours / self.median_plain
    }
}

/// Times `steps` steps of each loop (after [`WARMUP_STEPS`]) on `model`, SGD with learning rate
/// `lr`; `loss(model, j)` is the mean loss of micro-batch `j` of `micro_batches`, each of
/// `samples` samples.
///
/// # Errors
/// A [`Error`] of our loop.
pub fn measure_overhead<M: Module + Clone>(
    model: M,
    micro_batches: usize,
    samples: usize,
    steps: usize,
    lr: f64,
    loss: impl Fn(&M, usize) -> Tensor<1>,
) -> Result<Overhead, Error> {
    let comm = local::world(1, CommOptions::default()).pop().expect("one rank");
    let mut plain = model.clone();
    let (mut ddp, mut ours) = DataParallel::wrap(Box::new(comm), model, DdpOptions::default())?;
    plain = load_params(plain, &flatten_params(&ours));
    let (mut opt_ours, mut opt_plain): (ModuleOptimizer, ModuleOptimizer) =
        (SgdConfig::new().init(), SgdConfig::new().init());
    let (mut t_ours, mut t_plain) = (Vec::new(), Vec::new());
    let mut to_host = 0;
    for i in 0..steps + WARMUP_STEPS {
        for ours_first in [i % 2 == 0, i % 2 != 0] {
            let started = Instant::now();
            let times = if ours_first {
                for j in 0..micro_batches {
                    ddp.backward(&ours, loss(&ours, j), samples)?;
                }
                let (next, stats) = ddp.step(ours, &mut opt_ours, lr)?;
                ours = next;
                to_host = stats.traffic.to_host;
                &mut t_ours
            } else {
                plain = plain_step(plain, &mut opt_plain, lr, micro_batches, &loss);
                &mut t_plain
            };
            if i >= WARMUP_STEPS {
                times.push(started.elapsed().as_secs_f64());
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok(Overhead {
        params: ours.num_params(),
        mean_ours: mean(&t_ours),
        mean_plain: mean(&t_plain),
        median_ours: median(&mut t_ours),
        median_plain: median(&mut t_plain),
        param_rel: relative_difference(&flatten_params(&ours), &flatten_params(&plain)),
        to_host,
    })
}

/// One step of a plain burn loop with gradient accumulation.
fn plain_step<M: Module>(
    model: M,
    optim: &mut ModuleOptimizer,
    lr: f64,
    micro_batches: usize,
    loss: &impl Fn(&M, usize) -> Tensor<1>,
) -> M {
    let mut accumulator = GradientsAccumulator::new();
    let mut loss_sum: Option<Tensor<1>> = None;
    for j in 0..micro_batches {
        let loss = loss(&model, j).div_scalar(micro_batches as f32);
        let value = loss.clone().inner();
        loss_sum = Some(match loss_sum {
            Some(s) => s + value,
            None => value,
        });
        accumulator.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
    }
    let _value: f32 = loss_sum.expect("at least one micro-batch").into_scalar();
    optim.step(lr, model, accumulator.grads())
}
