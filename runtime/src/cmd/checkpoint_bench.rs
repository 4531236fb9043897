//! `ballast bench checkpoint`: loading a checkpoint (map, checksum, copy out) against a plain
//! sequential read of the same file, alternated in one run; with a job's command after `--`,
//! what checkpoints cost that job (`checkpoint_overhead`).

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::Result;
use ballast::{
    checkpoint::{self, Checkpointer, TrainState},
    optim::{HostAdam, HostAdamConfig},
    testing::WideMlp,
};
use burn::{module::Module, tensor::Device};
use serde_json::json;

/// Options of `ballast bench checkpoint`.
#[derive(clap::Args)]
pub struct CheckpointArgs {
    /// Print JSON lines (the last one is the summary).
    #[arg(long)]
    json: bool,
    /// Hidden width of the model saved; 4608 gives about 256 MiB with Adam's two moments.
    #[arg(long, default_value_t = 4608)]
    width: usize,
    /// Timed loads (and reads), alternated.
    #[arg(long, default_value_t = 7)]
    iters: usize,
    /// Directory for the checkpoint [default: a temporary directory, removed afterwards].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// With a job's command after `--`: runs per kind (with and without checkpoints).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// A job's launch command (`-- mpirun -np 3 target/release/resnet --steps 40`): measures
    /// its step time with `--checkpoint-every 1` against none, and how long after the step
    /// boundary each checkpoint is durable, instead of the load against a read.
    #[arg(last = true, value_name = "JOB")]
    job: Vec<String>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs the benchmark.
pub fn run(args: &CheckpointArgs) -> Result<ExitCode> {
    if !args.job.is_empty() {
        super::checkpoint_overhead::run(&args.job, args.rounds, args.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    anyhow::ensure!(args.iters >= 1, "--iters must be at least 1");
    let device = Device::flex();
    let model = WideMlp::with_width(args.width, &device);
    let params = model.num_params();
    let mut adam = HostAdam::new(params, HostAdamConfig::default());
    let grads: Vec<f32> = (0..params).map(|i| (i % 97) as f32 * 1e-3).collect();
    let mut master = ballast::params::flatten_params(&model);
    adam.step(&mut master, &grads, 1e-3);
    let temp = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("ballast-bench-checkpoint-{}", std::process::id())),
            true,
        ),
    };
    let cp = Checkpointer::new(&temp.0, 1)?;
    let state = TrainState {
        step: 1,
        seed: 1,
        global_batch: 1,
        world_size: 1,
        job: "bench".into(),
        plan: None,
        shards: None,
    };
    let started = Instant::now();
    let path = cp.save(&model, Some((&adam).into()), &state)?;
    let save_s = started.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&path)?.len();
    let (mut loads, mut reads) = (Vec::new(), Vec::new());
    for i in 0..args.iters + 1 {
        let t = Instant::now();
        let data = std::fs::read(&path)?;
        let read_s = t.elapsed().as_secs_f64();
        drop(std::hint::black_box(data));
        let t = Instant::now();
        let loaded = checkpoint::load(&path, &model)?;
        let load_s = t.elapsed().as_secs_f64();
        anyhow::ensure!(loaded.params.len() == params, "loaded parameter count differs");
        drop(std::hint::black_box(loaded));
        // The first pair warms the page cache.
        if i > 0 {
            reads.push(read_s);
            loads.push(load_s);
            if args.json {
                println!(
                    "{}",
                    json!({"iter": i, "bytes": bytes, "load_s": load_s, "read_s": read_s, "ratio_vs_read": read_s / load_s})
                );
            }
        }
    }
    if temp.1 {
        let _ = std::fs::remove_dir_all(&temp.0);
    }
    let (load, read) = (median(loads), median(reads));
    let gb = bytes as f64 / 1e9;
    let summary = json!({
        "summary": "checkpoint",
        "bytes": bytes,
        "params": params,
        "save_s": save_s,
        "load_s": load,
        "read_s": read,
        "load_gbps": gb / load,
        "read_gbps": gb / read,
        "ratio_vs_read": read / load,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "checkpoint of {:.1} MiB: save {save_s:.3}s, load {load:.3}s ({:.2} GB/s), plain read {read:.3}s ({:.2} GB/s), ratio {:.2}",
            bytes as f64 / (1u64 << 20) as f64,
            gb / load,
            gb / read,
            read / load
        );
    }
    Ok(ExitCode::SUCCESS)
}
