//! `ballast report METRICS`: per-rank summary of a run's metrics file, and with `--svg` a
//! drawing of per-rank throughput and memory (and the held-out metric) over the steps (see `ballast::report`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use ballast::report;

/// Options of `ballast report`.
#[derive(clap::Args)]
pub struct Args {
    /// Metrics file written by a job (`--metrics`, default runs/<job>/metrics.jsonl).
    metrics: PathBuf,
    /// Draw per-rank throughput and memory over the steps into this SVG file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// The run to report (its `run` field) [default: the newest in the file].
    #[arg(long)]
    run: Option<String>,
}

/// Runs the command.
pub fn run(args: &Args) -> Result<ExitCode> {
    let all = report::read(&args.metrics)?;
    let run = report::select(&all, args.run.as_deref())?;
    println!("run {}: {} ranks", run.id, run.by_rank.len());
    print!("{}", report::table(&run));
    if let Some(svg) = &args.svg {
        report::svg(&args.metrics, Some(&run.id), svg)?;
        println!("wrote {}", svg.display());
    }
    Ok(ExitCode::SUCCESS)
}
