//! What a job shows and writes: the metrics lines, rank 0's progress, and the summary.

use super::*;

/// What a rank writes as it runs: the metrics lines of one run id, and the evaluations.
pub(super) struct Output {
    pub(super) run_id: String,
    pub(super) metrics: MetricsWriter,
    pub(super) path: PathBuf,
    pub(super) job: String,
    pub(super) rank: usize,
    pub(super) world: usize,
    pub(super) threads: bool,
    /// The float type the replicas compute in, named on every line.
    pub(super) precision: crate::Precision,
    pub(super) evals: Vec<(u64, EvalTotals)>,
}

impl Output {
    /// Opens the metrics file; rank 0's run id reaches every rank.
    pub(super) fn open(ddp: &mut DataParallel, s: &Settings, threads: bool) -> Result<Self> {
        let id = format!(
            "{}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            std::process::id()
        );
        let run_id: String = ddp.comm().broadcast_value(0, &id)?;
        let metrics = MetricsWriter::append(&s.metrics).map_err(|source| Error::Metrics {
            path: s.metrics.clone(),
            source,
        })?;
        Ok(Self {
            run_id,
            metrics,
            path: s.metrics.clone(),
            job: s.job.clone(),
            rank: ddp.rank(),
            world: ddp.world_size(),
            threads,
            precision: s.precision,
            evals: Vec::new(),
        })
    }

    /// Appends `fields` with the run's identity as one metrics line.
    pub(super) fn record(&mut self, kind: &str, fields: serde_json::Value) -> Result<()> {
        let mut line = json!({
            "run": self.run_id, "job": self.job, "kind": kind, "rank": self.rank, "world_size": self.world,
            "precision": self.precision,
        });
        if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), fields) {
            line.extend(fields);
        }
        self.metrics.record(&line).map_err(|source| Error::Metrics {
            path: self.path.clone(),
            source,
        })
    }
}

/// Rank 0's view: a progress bar on a terminal, a line every `log_every` steps otherwise.
pub(super) struct Progress {
    pub(super) bar: Option<indicatif::ProgressBar>,
    pub(super) log_every: u64,
    pub(super) started: Instant,
}

impl Progress {
    pub(super) fn new(steps: u64, log_every: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(steps);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Self {
            bar,
            log_every,
            started: Instant::now(),
        }
    }

    pub(super) fn update(&self, step: u64, stats: &crate::StepStats, plan: &ballast_balancer::Plan, step_s: f64) {
        let slowest = stats
            .rank_compute
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(r, _)| r);
        let micro: Vec<String> = plan.ranks.iter().map(|r| r.micro_batch.to_string()).collect();
        let memory: Vec<String> = plan
            .ranks
            .iter()
            .map(|r| format!("{:.1}", r.predicted_peak_bytes as f64 / (1u64 << 20) as f64))
            .collect();
        let msg = format!(
            "loss {:.4} | {:.0} samples/s | slowest rank {slowest} | micro-batch {} | memory {} MiB",
            stats.loss,
            stats.global_samples as f64 / step_s.max(1e-9),
            micro.join("/"),
            memory.join("/")
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(msg);
            }
            None => {
                if step % self.log_every == 0 || step == 1 {
                    println!("step {step:>5}  {:>6.1}s  {msg}", self.started.elapsed().as_secs_f64());
                }
            }
        }
    }

    /// A line above the bar (or on its own without one).
    pub(super) fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }

    pub(super) fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }
}

/// Prints rank 0's closing lines: loss at the start and the end, throughput.
pub fn print_summary(summary: &Summary) {
    let k = (summary.losses.len() / 10).clamp(1, 10);
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    if summary.losses.is_empty() {
        if summary.evals.is_empty() {
            println!("nothing to train: already at the last step");
        }
        print_eval_summary(summary);
        return;
    }
    let head = mean(&summary.losses[..k]);
    let tail = mean(&summary.losses[summary.losses.len() - k..]);
    println!(
        "trained steps {}..{} on {} ranks in {:.1}s ({:.1} samples/s); loss {head:.4} -> {tail:.4} (mean of first/last {k} steps); replicas identical (checksum {:016x})",
        summary.first_step,
        summary.first_step + summary.steps,
        summary.world_size,
        summary.seconds,
        summary.samples_per_sec,
        summary.checksum
    );
    if let Some(cp) = &summary.last_checkpoint {
        println!("checkpoint: {}", cp.display());
    }
    print_eval_summary(summary);
}

/// The final held-out line (and the task's reference), and where the model went.
pub(super) fn print_eval_summary(summary: &Summary) {
    if let Some((step, totals)) = summary.evals.last() {
        println!(
            "held-out evaluation at step {step} on {} ranks: {}",
            summary.world_size,
            totals.describe(summary.eval_kind)
        );
        if let Some((name, loss)) = &summary.eval_baseline {
            let extra = match summary.eval_kind {
                EvalKind::LanguageModel => format!(", perplexity {:.3}", loss.exp()),
                _ => String::new(),
            };
            println!("reference on the same held-out set: {name}: loss {loss:.4}{extra}");
        }
    }
    if let Some(path) = &summary.saved_model {
        println!("model weights: {}", path.display());
    }
    if let Some(note) = &summary.note {
        println!("{note}");
    }
}
