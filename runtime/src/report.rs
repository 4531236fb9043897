//! Reading a job's metrics file back: a per-rank summary, and an SVG of per-rank throughput and
//! memory over the steps (`ballast report`).
//!
//! A metrics file may hold several runs (it is appended to); [`select`] picks one, by default
//! the newest.

use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde::Deserialize;

/// The fields of a metrics record the report reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Record {
    /// Run id.
    pub run: String,
    /// Rank.
    pub rank: usize,
    /// Step.
    pub step: u64,
    /// Samples this rank ran.
    pub samples: usize,
    /// Planned micro-batch.
    pub micro_batch: usize,
    /// Compute seconds.
    pub compute_s: f64,
    /// Step seconds.
    pub step_s: f64,
    /// All-reduces in the step.
    pub all_reduces: usize,
    /// Measured peak (absent with ranks as threads).
    #[serde(default)]
    pub peak_bytes: Option<u64>,
    /// The plan's predicted peak.
    #[serde(default)]
    pub predicted_peak_bytes: Option<u64>,
}

/// One run's records by rank.
pub type ByRank = BTreeMap<usize, Vec<Record>>;

/// Reads every record of `path`, in order.
///
/// # Errors
/// A missing file; a line that is not a metrics record (named by number).
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read metrics file {}; pass the --metrics file of a run",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: Record = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: not a ballast metrics record ({e}); is this the file a job wrote with --metrics?",
                path.display(),
                i + 1
            )
        })?;
        out.push(rec);
    }
    if out.is_empty() {
        bail!("{} has no metrics records; run a job first", path.display());
    }
    Ok(out)
}

/// The records of run `run` (default: the newest in the file), by rank.
///
/// # Errors
/// When the run is not in the records.
pub fn select(all: &[Record], run: Option<&str>) -> Result<(String, ByRank)> {
    let run = match run {
        Some(r) => r.to_string(),
        None => all.last().map(|r| r.run.clone()).unwrap_or_default(),
    };
    let mut by_rank = ByRank::new();
    for r in all.iter().filter(|r| r.run == run) {
        by_rank.entry(r.rank).or_default().push(r.clone());
    }
    if by_rank.is_empty() {
        let runs: std::collections::BTreeSet<&str> = all.iter().map(|r| r.run.as_str()).collect();
        bail!("run {run:?} is not in the metrics; runs there: {runs:?}");
    }
    Ok((run, by_rank))
}

/// A table with one row per rank: steps, samples/s, mean micro-batch, samples, peak memory,
/// all-reduces per step.
pub fn table(by_rank: &ByRank) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:>4} {:>6} {:>12} {:>12} {:>10} {:>12} {:>14}\n",
        "rank", "steps", "samples/s", "micro-batch", "samples", "peak MiB", "all-reduces"
    );
    for (rank, rs) in by_rank {
        let samples: usize = rs.iter().map(|r| r.samples).sum();
        let compute: f64 = rs.iter().map(|r| r.compute_s).sum();
        let mean_micro = rs.iter().map(|r| r.micro_batch as f64).sum::<f64>() / rs.len() as f64;
        let peak = rs.iter().filter_map(memory).max().unwrap_or(0);
        let ar_min = rs.iter().map(|r| r.all_reduces).min().unwrap_or(0);
        let ar_max = rs.iter().map(|r| r.all_reduces).max().unwrap_or(0);
        let _ = writeln!(
            out,
            "{rank:>4} {:>6} {:>12.1} {:>12.1} {:>10} {:>12.1} {:>14}",
            rs.len(),
            samples as f64 / compute.max(1e-9),
            mean_micro,
            samples,
            peak as f64 / (1u64 << 20) as f64,
            if ar_min == ar_max {
                format!("{ar_min}/step")
            } else {
                format!("{ar_min}-{ar_max}/step")
            }
        );
    }
    out
}

/// Writes the SVG of `metrics`' run (default: newest) to `svg`, refusing to write over the
/// metrics file itself.
///
/// # Errors
/// Reading, selecting or drawing failed.
pub fn svg(metrics: &Path, run: Option<&str>, svg: &Path) -> Result<ByRank> {
    if same_file(svg, metrics) {
        bail!(
            "--svg {} is the metrics file itself; choose another output path",
            svg.display()
        );
    }
    let (_, by_rank) = select(&read(metrics)?, run)?;
    draw(&by_rank, svg)?;
    Ok(by_rank)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Measured peak, or the plan's prediction where ranks shared one heap (threads).
fn memory(r: &Record) -> Option<u64> {
    r.peak_bytes.or(r.predicted_peak_bytes)
}

fn throughput(r: &Record) -> f64 {
    if r.compute_s > 0.0 {
        r.samples as f64 / r.compute_s
    } else {
        r.samples as f64 / r.step_s.max(1e-9)
    }
}

/// Draws per-rank throughput (samples per compute second) and memory (measured peak, or the
/// plan's prediction where ranks shared one heap) over the steps into `path`.
///
/// # Errors
/// Drawing or writing failed.
pub fn draw(by_rank: &ByRank, path: &Path) -> Result<()> {
    let steps = by_rank
        .values()
        .flat_map(|rs| rs.iter().map(|r| r.step))
        .fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let x_range = steps.0 as f64..(steps.1 as f64 + 1.0);
    let max_tp = by_rank
        .values()
        .flat_map(|rs| rs.iter().map(throughput))
        .fold(1.0, f64::max);
    let max_mem = by_rank
        .values()
        .flat_map(|rs| rs.iter().filter_map(memory))
        .fold(1, u64::max) as f64
        / (1u64 << 20) as f64;
    let tmp = path.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (900, 700)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(350);
        let series = |area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
                      title: &str,
                      y_label: &str,
                      y_max: f64,
                      value: &dyn Fn(&Record) -> Option<f64>|
         -> Result<()> {
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(x_range.clone(), 0.0..y_max * 1.1)?;
            chart.configure_mesh().x_desc("step").y_desc(y_label).draw()?;
            for (i, (rank, rs)) in by_rank.iter().enumerate() {
                let colour = Palette99::pick(i).to_rgba();
                let points: Vec<(f64, f64)> = rs.iter().filter_map(|r| value(r).map(|v| (r.step as f64, v))).collect();
                chart
                    .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
                    .label(format!("rank {rank}"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
            Ok(())
        };
        series(&top, "throughput per rank", "samples/s", max_tp, &|r| {
            Some(throughput(r))
        })?;
        series(&bottom, "peak memory per rank", "MiB", max_mem, &|r| {
            memory(r).map(|b| b as f64 / (1u64 << 20) as f64)
        })?;
        root.present()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
