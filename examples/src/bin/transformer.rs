//! Trains a decoder-only byte-level Transformer language model on a text file with ballast.
//!
//! With no `--data`, a synthetic English-like text is generated under the work directory.
//! Without a launcher the ranks run as threads on simulated unequal devices; under `mpirun`
//! (build with `--features mpi`) each process is one rank.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use ballast::{
    config::{Defaults, TrainArgs},
    job::Task,
};
use ballast_examples::{
    models::{LmShape, TransformerLm},
    text::{self, TextSet},
};
use burn::{
    nn::loss::CrossEntropyLossConfig,
    tensor::{Device, Tensor},
};
use serde::Deserialize;

#[global_allocator]
static ALLOC: ballast::memory::CountingAlloc = ballast::memory::CountingAlloc;

/// Train a byte-level Transformer language model on a UTF-8 text file over unequal devices.
#[derive(clap::Parser)]
#[command(name = "transformer", version)]
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
    /// Model width [default: 64].
    #[arg(long)]
    d_model: Option<usize>,
    /// Attention heads; must divide --d-model [default: 4].
    #[arg(long)]
    heads: Option<usize>,
    /// Layers [default: 2].
    #[arg(long)]
    layers: Option<usize>,
    /// Context length in bytes [default: 64].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Accept a --data file that is not UTF-8 and train on its raw bytes.
    #[arg(long)]
    #[serde(default)]
    allow_binary: bool,
    /// Bytes of text to generate when no --data is given [default: 200000].
    #[arg(long)]
    synthetic_bytes: Option<usize>,
}

const DEFAULTS: Defaults = Defaults {
    job: "transformer",
    global_batch: 64,
    lr: 2e-3,
    steps: 200,
    device_memory: &["12MiB", "8MiB", "4MiB"],
    speeds: &[3.0, 2.0, 1.0],
};

struct Lm {
    data: TextSet,
    shape: LmShape,
    source: PathBuf,
}

impl Task for Lm {
    type Model = TransformerLm;

    fn build(&self, device: &Device) -> TransformerLm {
        TransformerLm::new(self.shape, device)
    }

    fn len(&self) -> usize {
        self.data.len()
    }

    fn loss(&self, model: &TransformerLm, indices: &[usize], device: &Device) -> Tensor<1> {
        let (x, y) = self.data.batch(indices, device);
        CrossEntropyLossConfig::new().init(device).forward(model.forward(x), y)
    }

    fn describe(&self) -> String {
        format!(
            "Transformer LM: d_model {}, {} heads, {} layers, context {} bytes; data: {} sequences from {}",
            self.shape.d_model,
            self.shape.heads,
            self.shape.layers,
            self.shape.seq_len,
            self.data.len(),
            self.source.display()
        )
    }
}

fn run(cli: &Cli) -> Result<()> {
    let (launch, settings, file_model) = ballast_examples::settings::<ModelArgs>(&cli.train, &DEFAULTS)?;
    let pick = |a: Option<usize>, b: Option<usize>, d: usize| a.or(b).unwrap_or(d);
    let shape = LmShape {
        d_model: pick(cli.model.d_model, file_model.d_model, 64),
        heads: pick(cli.model.heads, file_model.heads, 4),
        layers: pick(cli.model.layers, file_model.layers, 2),
        seq_len: pick(cli.model.seq_len, file_model.seq_len, 64),
        vocab: text::VOCAB,
    };
    anyhow::ensure!(
        shape.d_model >= 1 && shape.layers >= 1,
        "--d-model and --layers must be at least 1"
    );
    anyhow::ensure!(
        shape.heads >= 1 && shape.d_model % shape.heads == 0,
        "--heads ({}) must divide --d-model ({})",
        shape.heads,
        shape.d_model
    );
    let source: PathBuf = match &settings.data {
        Some(p) => p.clone(),
        None => {
            let bytes = pick(cli.model.synthetic_bytes, file_model.synthetic_bytes, 200_000);
            text::write_synthetic(&settings.work_dir.join("synthetic-text"), bytes, settings.seed)?
        }
    };
    let data = TextSet::load(
        &source,
        shape.seq_len,
        cli.model.allow_binary || file_model.allow_binary,
    )?;
    ballast_examples::train(&Lm { data, shape, source }, &settings, &launch)
}

fn main() -> ExitCode {
    ballast_examples::main_with::<Cli>("transformer", &DEFAULTS, run)
}
