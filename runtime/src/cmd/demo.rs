//! `ballast demo`: the training loop of `ballast::job` on a small regression MLP.
//!
//! Without a launcher the ranks are threads standing for unequal devices (memory budgets and
//! speeds from the flags); under mpirun each process is a rank. Checkpoints, resume, metrics
//! and progress work as in the example jobs; the test suite drives them through this command.

use std::process::ExitCode;

use anyhow::Result;
use ballast::{
    config::{self, Defaults, TrainArgs},
    job::{self, Task},
    testing::{Mlp, Regressor, SyntheticSet},
};
use burn::{
    nn::loss::{MseLoss, Reduction},
    tensor::{Device, Tensor},
};

/// Options of `ballast demo`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    train: TrainArgs,
    /// Samples of the synthetic regression set.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
}

const DEFAULTS: Defaults = Defaults {
    job: "demo",
    global_batch: 48,
    lr: 3e-3,
    steps: 100,
    device_memory: &[],
    speeds: &[3.0, 2.0, 1.0],
};

struct Regression(SyntheticSet);

impl Task for Regression {
    type Model = Mlp;

    fn build(&self, device: &Device) -> Mlp {
        Mlp::init(device)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn loss(&self, model: &Mlp, indices: &[usize], device: &Device) -> Tensor<1> {
        let (x, y) = self.0.batch(indices, device);
        // Inputs in the parameters' float type (bf16 for a bf16 replica), the loss in f32.
        let dtype = ballast::params::float_dtype(model);
        MseLoss::new().forward(
            model.forward(x.cast(dtype)).cast(burn::tensor::FloatDType::F32),
            y,
            Reduction::Mean,
        )
    }

    fn describe(&self) -> String {
        format!("regression MLP (16-32-4) on {} synthetic samples", self.0.len())
    }
}

/// Runs the command.
pub fn run(args: &Args) -> Result<ExitCode> {
    let launch = job::launch()?;
    let (settings, ()) = config::load::<()>(
        &args.train,
        &DEFAULTS,
        launch.is_launched().then_some(launch.world_size),
    )?;
    anyhow::ensure!(args.samples >= 1, "--samples must be at least 1");
    let task = Regression(SyntheticSet::new(args.samples, settings.seed));
    let summary = job::run(&task, &settings, &launch)?;
    if launch.rank == 0 {
        job::print_summary(&summary);
    }
    Ok(ExitCode::SUCCESS)
}
