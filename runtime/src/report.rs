//! Reading a job's metrics file back: a per-rank summary, the held-out evaluations, and an SVG
//! of per-rank throughput and memory (and the held-out metric) over the steps (`ballast report`).
//!
//! A metrics file may hold several runs (it is appended to); [`select`] picks one, by default
//! the newest. Each line is a training record (`"kind": "train"`, or no kind in files written
//! before evaluations existed) or an evaluation record (`"kind": "eval"`).

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
    /// Collectives in the step (one all-reduce; three with the optimizer state sharded).
    /// Metrics written before the sharded step name it `all_reduces`.
    #[serde(alias = "all_reduces")]
    pub collectives: usize,
    /// Measured peak (absent with ranks as threads).
    #[serde(default)]
    pub peak_bytes: Option<u64>,
    /// The plan's predicted peak.
    #[serde(default)]
    pub predicted_peak_bytes: Option<u64>,
}

/// The fields of an evaluation record the report reads (every rank writes one per evaluation,
/// with the same totals).
#[derive(Debug, Clone, Deserialize)]
pub struct EvalRecord {
    /// Run id.
    pub run: String,
    /// Rank.
    pub rank: usize,
    /// Steps trained when it was evaluated.
    pub step: u64,
    /// What the task measures.
    pub eval_kind: crate::eval::EvalKind,
    /// Held-out samples evaluated by all ranks.
    pub samples: u64,
    /// Held-out samples this rank evaluated.
    pub eval_samples: u64,
    /// Units predicted correctly.
    pub correct: u64,
    /// Units evaluated.
    pub units: u64,
    /// Mean loss per unit.
    pub loss: f64,
    /// Fraction of units predicted correctly.
    pub accuracy: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
}

impl EvalRecord {
    /// The number that shows progress for this kind of task, and its name.
    pub fn headline(&self) -> (&'static str, f64) {
        match self.eval_kind {
            crate::eval::EvalKind::Classifier => ("held-out accuracy", self.accuracy),
            crate::eval::EvalKind::LanguageModel => ("held-out perplexity", self.perplexity),
            crate::eval::EvalKind::Loss => ("held-out loss", self.loss),
        }
    }
}

/// Every record of a metrics file, training and evaluation apart, each in file order.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Training records.
    pub train: Vec<Record>,
    /// Evaluation records.
    pub eval: Vec<EvalRecord>,
    /// The run of the file's last record.
    pub newest: String,
}

/// One run's records by rank.
pub type ByRank = BTreeMap<usize, Vec<Record>>;

/// One run of a metrics file.
#[derive(Debug, Clone)]
pub struct Run {
    /// Run id.
    pub id: String,
    /// Training records by rank.
    pub by_rank: ByRank,
    /// Rank 0's evaluation records, in step order.
    pub evals: Vec<EvalRecord>,
}

/// Reads every record of `path`, in order.
///
/// # Errors
/// A missing file; a line that is not a metrics record (named by number).
pub fn read(path: &Path) -> Result<Metrics> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read metrics file {}; pass the --metrics file of a run",
            path.display()
        )
    })?;
    let mut out = Metrics::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |e: serde_json::Error| {
            anyhow::anyhow!(
                "{}:{}: not a ballast metrics record ({e}); is this the file a job wrote with --metrics?",
                path.display(),
                i + 1
            )
        };
        let value: serde_json::Value = serde_json::from_str(line).map_err(bad)?;
        if value.get("kind").and_then(|k| k.as_str()) == Some("eval") {
            let rec: EvalRecord = serde_json::from_value(value).map_err(bad)?;
            out.newest.clone_from(&rec.run);
            out.eval.push(rec);
        } else {
            let rec: Record = serde_json::from_value(value).map_err(bad)?;
            out.newest.clone_from(&rec.run);
            out.train.push(rec);
        }
    }
    if out.train.is_empty() && out.eval.is_empty() {
        bail!("{} has no metrics records; run a job first", path.display());
    }
    Ok(out)
}

/// The records of run `run` (default: the newest in the file), by rank.
///
/// # Errors
/// When the run is not in the records.
pub fn select(all: &Metrics, run: Option<&str>) -> Result<Run> {
    let id = run.unwrap_or(&all.newest).to_string();
    let mut by_rank = ByRank::new();
    for r in all.train.iter().filter(|r| r.run == id) {
        by_rank.entry(r.rank).or_default().push(r.clone());
    }
    let mut evals: Vec<EvalRecord> = all
        .eval
        .iter()
        .filter(|r| r.run == id && r.rank == 0)
        .cloned()
        .collect();
    evals.sort_by_key(|r| r.step);
    if by_rank.is_empty() && evals.is_empty() {
        let runs: std::collections::BTreeSet<&str> = all
            .train
            .iter()
            .map(|r| r.run.as_str())
            .chain(all.eval.iter().map(|r| r.run.as_str()))
            .collect();
        bail!("run {id:?} is not in the metrics; runs there: {runs:?}");
    }
    Ok(Run { id, by_rank, evals })
}

/// A table with one row per rank (steps, samples/s, mean micro-batch, samples, peak memory,
/// collectives per step), then one row per held-out evaluation.
pub fn table(run: &Run) -> String {
    use std::fmt::Write;
    let mut out = train_table(&run.by_rank);
    if !run.evals.is_empty() {
        let _ = writeln!(
            out,
            "\nheld-out evaluations\n{:>6} {:>8} {:>10} {:>10} {:>11}",
            "step", "samples", "accuracy", "loss", "perplexity"
        );
        for e in &run.evals {
            let _ = writeln!(
                out,
                "{:>6} {:>8} {:>10.4} {:>10.4} {:>11.3}",
                e.step, e.samples, e.accuracy, e.loss, e.perplexity
            );
        }
    }
    out
}

fn train_table(by_rank: &ByRank) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:>4} {:>6} {:>12} {:>12} {:>10} {:>12} {:>14}\n",
        "rank", "steps", "samples/s", "micro-batch", "samples", "peak MiB", "collectives"
    );
    for (rank, rs) in by_rank {
        let samples: usize = rs.iter().map(|r| r.samples).sum();
        let compute: f64 = rs.iter().map(|r| r.compute_s).sum();
        let mean_micro = rs.iter().map(|r| r.micro_batch as f64).sum::<f64>() / rs.len() as f64;
        let peak = rs.iter().filter_map(memory).max().unwrap_or(0);
        let ar_min = rs.iter().map(|r| r.collectives).min().unwrap_or(0);
        let ar_max = rs.iter().map(|r| r.collectives).max().unwrap_or(0);
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
pub fn svg(metrics: &Path, run: Option<&str>, svg: &Path) -> Result<Run> {
    if same_file(svg, metrics) {
        bail!(
            "--svg {} is the metrics file itself; choose another output path",
            svg.display()
        );
    }
    let run = select(&read(metrics)?, run)?;
    draw(&run, svg)?;
    Ok(run)
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
/// plan's prediction where ranks shared one heap) over the steps into `path`, and below them the
/// held-out metric (accuracy, perplexity or loss) when the run evaluated.
///
/// # Errors
/// Drawing or writing failed.
pub fn draw(run: &Run, path: &Path) -> Result<()> {
    let by_rank = &run.by_rank;
    let steps = by_rank
        .values()
        .flat_map(|rs| rs.iter().map(|r| r.step))
        .chain(run.evals.iter().map(|e| e.step))
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
        let height = if run.evals.is_empty() { 700 } else { 1000 };
        let root = SVGBackend::new(&tmp, (900, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, rest) = root.split_vertically(350);
        let (bottom, eval_area) = rest.split_vertically(350);
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
        if let Some(first) = run.evals.first() {
            let (name, _) = first.headline();
            let y_max = run.evals.iter().map(|e| e.headline().1).fold(1e-9, f64::max);
            let mut chart = ChartBuilder::on(&eval_area)
                .caption(name, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(x_range.clone(), 0.0..y_max * 1.1)?;
            chart.configure_mesh().x_desc("step").y_desc(name).draw()?;
            let points: Vec<(f64, f64)> = run.evals.iter().map(|e| (e.step as f64, e.headline().1)).collect();
            chart.draw_series(LineSeries::new(points.clone(), BLACK.stroke_width(2)))?;
            chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, BLACK.filled())))?;
        }
        root.present()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train_line(run: &str, rank: usize, step: u64) -> String {
        serde_json::json!({
            "run": run, "kind": "train", "rank": rank, "step": step, "samples": 8, "micro_batch": 4,
            "compute_s": 0.01, "step_s": 0.02, "collectives": 1, "predicted_peak_bytes": 1u64 << 20,
        })
        .to_string()
    }

    fn eval_line(run: &str, rank: usize, step: u64, accuracy: f64) -> String {
        serde_json::json!({
            "run": run, "kind": "eval", "rank": rank, "step": step, "eval_kind": "classifier",
            "samples": 40, "eval_samples": 20, "correct": (accuracy * 40.0) as u64, "units": 40,
            "loss": 1.5, "accuracy": accuracy, "perplexity": 1.5f64.exp(),
        })
        .to_string()
    }

    #[test]
    fn evaluations_are_read_apart_tabled_and_drawn() {
        let d = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        for step in 0..4 {
            for rank in 0..2 {
                lines.push(train_line("a", rank, step));
            }
            if step % 2 == 1 {
                for rank in 0..2 {
                    lines.push(eval_line("a", rank, step + 1, 0.25 * step as f64));
                }
            }
        }
        lines.push(eval_line("b", 0, 9, 0.5));
        let path = d.path().join("m.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        let all = read(&path).unwrap();
        assert_eq!((all.train.len(), all.eval.len()), (8, 5));
        let run = select(&all, Some("a")).unwrap();
        assert_eq!(run.by_rank.len(), 2);
        assert_eq!(run.evals.iter().map(|e| e.step).collect::<Vec<_>>(), vec![2, 4]);
        let table = table(&run);
        assert!(table.contains("held-out evaluations"), "{table}");
        assert!(table.contains("     4       40     0.7500"), "{table}");
        // A run with evaluations only (an --eval-only run) is a run too.
        let only = select(&all, None).unwrap();
        assert_eq!((only.id.as_str(), only.by_rank.len(), only.evals.len()), ("b", 0, 1));
        let svg_path = d.path().join("r.svg");
        svg(&path, Some("a"), &svg_path).unwrap();
        let text = std::fs::read_to_string(&svg_path).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap();
        assert!(doc
            .descendants()
            .filter_map(|n| n.text())
            .any(|t| t.contains("held-out accuracy")));
    }
}
