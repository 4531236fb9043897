//! Trains a ResNet-18-style classifier on CIFAR-10 with ballast.
//!
//! With no `--data`, a small synthetic set in CIFAR-10's binary format is generated under the
//! work directory. Without a launcher the ranks run as threads on simulated unequal devices;
//! under `mpirun` (build with `--features mpi`) each process is one rank.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use ballast::{
    config::{Defaults, TrainArgs},
    eval::{EvalBatch, EvalKind},
    job::Task,
};
use ballast_examples::{
    cifar::{self, Cifar10},
    models::{ResNet, ResNetShape},
};
use burn::{
    module::Module,
    nn::loss::CrossEntropyLossConfig,
    tensor::{Device, FloatDType, Tensor},
};
use serde::Deserialize;

#[global_allocator]
static ALLOC: ballast::memory::CountingAlloc = ballast::memory::CountingAlloc;

/// Train a ResNet on CIFAR-10 (binary files) over unequal devices.
///
/// --data takes a data_batch_*.bin file or the `cifar-10-batches-bin` directory from
/// the CIFAR-10 binary version (www.cs.toronto.edu/~kriz/cifar.html); without it a synthetic set is generated.
#[derive(clap::Parser)]
#[command(name = "resnet", version)]
struct Cli {
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    model: ModelArgs,
}

/// Model settings (the `[model]` table of --config).
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelArgs {
    /// Channels of the first stage, doubled by each later stage (ResNet-18: 64) [default: 16].
    #[arg(long)]
    width: Option<usize>,
    /// Stages (ResNet-18: 4) [default: 3].
    #[arg(long)]
    stages: Option<usize>,
    /// Basic blocks per stage (ResNet-18: 2) [default: 2].
    #[arg(long)]
    blocks: Option<usize>,
    /// Images to generate when no --data is given [default: 2000].
    #[arg(long)]
    synthetic_images: Option<usize>,
}

const DEFAULTS: Defaults = Defaults {
    job: "resnet",
    global_batch: 64,
    lr: 2e-3,
    steps: 200,
    device_memory: &["30MiB", "20MiB", "10MiB"],
    speeds: &[3.0, 2.0, 1.0],
};

struct Resnet {
    data: Cifar10,
    eval: Option<Cifar10>,
    shape: ResNetShape,
    held_out: String,
}

impl Task for Resnet {
    type Model = ResNet;

    fn build(&self, device: &Device) -> ResNet {
        ResNet::new(self.shape, device)
    }

    fn len(&self) -> usize {
        self.data.len()
    }

    fn loss(&self, model: &ResNet, indices: &[usize], device: &Device) -> Tensor<1> {
        let (x, y) = self.data.batch(indices, device);
        // The loss in f32 whatever the replica computes in (as mixed-precision recipes do).
        CrossEntropyLossConfig::new()
            .init(device)
            .forward(model.forward(x).cast(FloatDType::F32), y)
    }

    fn eval_len(&self) -> usize {
        self.eval.as_ref().map_or(0, Cifar10::len)
    }

    fn evaluate(&self, model: &ResNet, indices: &[usize], device: &Device) -> EvalBatch {
        let Some(eval) = &self.eval else {
            return EvalBatch::default();
        };
        let (x, y) = eval.batch(indices, device);
        let logits = model.valid().forward(x.without_autodiff()).cast(FloatDType::F32);
        ballast_examples::score(logits, y.without_autodiff(), 1)
    }

    fn eval_kind(&self) -> EvalKind {
        EvalKind::Classifier
    }

    fn eval_baseline(&self) -> Option<(String, f64)> {
        Some((
            format!(
                "chance (uniform over {} classes, accuracy {:.4})",
                self.shape.classes,
                1.0 / self.shape.classes as f64
            ),
            (self.shape.classes as f64).ln(),
        ))
    }

    fn describe(&self) -> String {
        format!(
            "ResNet: width {}, {} stages x {} blocks, {} classes; data: {} images from {}; held out: {}",
            self.shape.width,
            self.shape.stages,
            self.shape.blocks,
            self.shape.classes,
            self.data.len(),
            self.data
                .files()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            self.held_out
        )
    }
}

fn run(cli: &Cli) -> Result<()> {
    let (launch, settings, file_model) = ballast_examples::settings::<ModelArgs>(&cli.train, &DEFAULTS)?;
    let pick = |a: Option<usize>, b: Option<usize>, d: usize| a.or(b).unwrap_or(d);
    let shape = ResNetShape {
        width: pick(cli.model.width, file_model.width, 16),
        stages: pick(cli.model.stages, file_model.stages, 3),
        blocks: pick(cli.model.blocks, file_model.blocks, 2),
        classes: cifar::CLASSES,
    };
    anyhow::ensure!(shape.width >= 1, "--width must be at least 1");
    anyhow::ensure!(
        (1..=5).contains(&shape.stages),
        "--stages must be 1 to 5 (32x32 images halve per stage)"
    );
    anyhow::ensure!(shape.blocks >= 1, "--blocks must be at least 1");
    // The held-out file is read first: a bad one stops the job before anything is written.
    let eval_file = match &settings.eval_data {
        Some(p) => Some(Cifar10::load_eval(p)?),
        None => None,
    };
    // Generated data: the held-out images are generated beside the training images (same
    // distribution) as the file's last ones, so the training set is that of a run without
    // evaluation. Given data: a seeded choice is held out.
    let mut generated_held = 0;
    let data_path: PathBuf = match &settings.data {
        Some(p) => p.clone(),
        None => {
            let images = pick(cli.model.synthetic_images, file_model.synthetic_images, 2000);
            anyhow::ensure!(images >= 1, "--synthetic-images must be at least 1");
            if let Some(fraction) = ballast_examples::eval_fraction(&settings) {
                // Refused before the set is written.
                generated_held = ballast::eval::held_out_tail(images, fraction)?.eval.len();
            }
            cifar::write_synthetic(
                &settings.work_dir.join("synthetic-cifar10"),
                images + generated_held,
                settings.seed,
            )?
        }
    };
    let all = Cifar10::load(&data_path)?;
    let (data, eval, held_out) = match (eval_file, ballast_examples::eval_fraction(&settings)) {
        (Some(eval), _) => {
            let what = format!("{} images from {}", eval.len(), eval.files()[0].display());
            (all, Some(eval), what)
        }
        (None, Some(_)) if generated_held > 0 => {
            let cut = all.len() - generated_held;
            let train: Vec<usize> = (0..cut).collect();
            let eval: Vec<usize> = (cut..all.len()).collect();
            let what = format!("{generated_held} more generated images");
            (all.subset(&train), Some(all.subset(&eval)), what)
        }
        (None, Some(fraction)) => {
            let split = ballast::eval::held_out(all.len(), fraction, settings.seed)?;
            let what = format!("{} images ({fraction} of the data, seeded)", split.eval.len());
            (all.subset(&split.train), Some(all.subset(&split.eval)), what)
        }
        (None, None) => (
            all,
            None,
            "none (--eval-data or --eval-fraction to evaluate)".to_string(),
        ),
    };
    let task = Resnet {
        data,
        eval,
        shape,
        held_out,
    };
    ballast_examples::train(&task, &settings, &launch)
}

fn main() -> ExitCode {
    ballast_examples::main_with::<Cli>("resnet", &DEFAULTS, run)
}
