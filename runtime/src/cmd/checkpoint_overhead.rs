//! `ballast bench checkpoint -- <job command>`: what checkpoints cost a running job. The job
//! runs without checkpoints and with `--checkpoint-every 1`, alternated, `--rounds` times each:
//! the step time is the training loop's wall time per step on rank 0 (its train lines' `loop_s`,
//! after the first steps), and rank 0's metrics give, per checkpoint, the time from the step
//! boundary to the file being durable (written in the background).

use std::{path::Path, process::Command};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// Steps left out at the start of each run (first allocations, the plan's settling).
const WARMUP_STEPS: u64 = 3;

/// One run's figures from its metrics file.
struct RunFigures {
    step_s: f64,
    durable_s: Vec<f64>,
}

/// Runs `command` (a job's launch command) `rounds` times with and without checkpoints and
/// prints one JSON line per run and a summary (`step_time_ratio`: with over without).
pub fn run(command: &[String], rounds: usize, json_out: bool) -> Result<()> {
    ensure!(rounds >= 1, "--rounds must be at least 1");
    ensure!(!command.is_empty(), "give the job's command after `--`");
    let dir = std::env::temp_dir().join(format!("ballast-bench-checkpoint-{}", std::process::id()));
    let (mut without, mut with, mut durable) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for checkpoints in [false, true] {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let figures = run_once(command, &dir, checkpoints)?;
            if json_out {
                println!(
                    "{}",
                    json!({"round": round, "checkpoint_every": checkpoints.then_some(1), "step_s": figures.step_s,
                           "checkpoints": figures.durable_s.len(), "durable_s_median": median(&figures.durable_s)})
                );
            }
            if checkpoints {
                with.push(figures.step_s);
                durable.extend(figures.durable_s);
            } else {
                without.push(figures.step_s);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (a, b) = (median(&without).unwrap_or(f64::NAN), median(&with).unwrap_or(f64::NAN));
    durable.sort_by(f64::total_cmp);
    let summary = json!({
        "summary": "checkpoint_overhead",
        "rounds": rounds,
        "step_s_without": a,
        "step_s_every_step": b,
        "step_time_ratio": b / a,
        "durable_s_min": durable.first(),
        "durable_s_median": median(&durable),
        "durable_s_max": durable.last(),
        "checkpoints": durable.len(),
    });
    if json_out {
        println!("{summary}");
    } else {
        println!(
            "step time {a:.4}s without checkpoints, {b:.4}s with one every step (ratio {:.3}); durable {:.3}s after the step boundary (median of {})",
            b / a,
            median(&durable).unwrap_or(f64::NAN),
            durable.len()
        );
    }
    Ok(())
}

/// One run of the job, with its metrics (and checkpoints) in `dir`.
fn run_once(command: &[String], dir: &Path, checkpoints: bool) -> Result<RunFigures> {
    let metrics = dir.join("metrics.jsonl");
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]).arg("--metrics").arg(&metrics);
    if checkpoints {
        cmd.args(["--checkpoint-every", "1", "--checkpoint-dir"])
            .arg(dir.join("ck"));
    }
    let out = cmd.output().with_context(|| format!("cannot start `{}`", command[0]))?;
    ensure!(
        out.status.success(),
        "the job failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&metrics).with_context(|| format!("reading {}", metrics.display()))?;
    let rank0: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["rank"] == 0)
        .collect();
    // The loop's wall time between rank 0's train lines, after the first steps: the
    // checkpoints' copies and hand-overs count (the lines' own `step_s` would leave them out).
    let loop_at: Vec<(u64, f64)> = rank0
        .iter()
        .filter(|v| v["kind"] == "train")
        .filter_map(|v| Some((v["step"].as_u64()?, v["loop_s"].as_f64()?)))
        .filter(|(step, _)| *step >= WARMUP_STEPS)
        .collect();
    let (Some(first), Some(last)) = (loop_at.first(), loop_at.last()) else {
        bail!("the job's metrics hold no train line past step {WARMUP_STEPS}: give it more --steps");
    };
    ensure!(last.0 > first.0, "the job trained too few steps: give it more --steps");
    let durable_s = rank0
        .iter()
        .filter(|v| v["kind"] == "checkpoint")
        .filter_map(|v| v["durable_s"].as_f64())
        .collect();
    Ok(RunFigures {
        step_s: (last.1 - first.1) / (last.0 - first.0) as f64,
        durable_s,
    })
}

fn median(xs: &[f64]) -> Option<f64> {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied()
}
