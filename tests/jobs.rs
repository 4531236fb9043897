//! The example jobs end to end: the README's main command on simulated devices, and both jobs
//! under `mpirun -np 3` with memory budgets 3:2:1, read back from their metrics files.

use std::{
    process::{Command, Output},
    time::Instant,
};

use ballast_tests::{one_job, text};

/// (first, last) from the summary line "loss A -> B".
fn loss_change(out: &Output) -> (f64, f64) {
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s
        .lines()
        .find(|l| l.starts_with("trained steps"))
        .unwrap_or_else(|| panic!("no summary line\n{}", text(out)));
    let after = &line[line.find("loss ").unwrap() + 5..];
    let mut parts = after.split(" -> ");
    let first: f64 = parts.next().unwrap().parse().unwrap();
    let last: f64 = parts
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (first, last)
}

/// How long it takes is a speed figure, printed here and kept out of the verdict: this test
/// must pass on a loaded machine.
#[test]
fn main_command_trains_resnet_on_simulated_devices() {
    let _alone = one_job();
    let d = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(ballast_tests::bin("resnet"))
        .current_dir(d.path())
        .output()
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("rank  device"),
        "the plan table is printed first\n{stdout}"
    );
    assert!(stdout.contains("3 ranks (threads on simulated devices)"), "{stdout}");
    let (first, last) = loss_change(&out);
    println!("main command: {secs:.1}s, loss {first:.4} -> {last:.4}");
    assert!(last < 0.5 * first, "loss must go down clearly: {first} -> {last}");
    let accuracy = held_out_number(&stdout, "accuracy ");
    println!("main command: held-out accuracy {accuracy:.4}");
    assert!(
        accuracy >= 0.9,
        "held-out accuracy {accuracy} on the generated set\n{stdout}"
    );
    // The report of this run too (threads: memory is the plan's per-rank prediction).
    let svg = d.path().join("run.svg");
    ballast::report::svg(&d.path().join("runs/resnet/metrics.jsonl"), None, &svg).unwrap();
    assert_eq!(svg_series(&std::fs::read_to_string(&svg).unwrap(), 200), vec![3, 3]);
}

/// The number after `label` on rank 0's final held-out line.
fn held_out_number(stdout: &str, label: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("held-out evaluation at step"))
        .unwrap_or_else(|| panic!("no held-out line\n{stdout}"));
    number_after(line, label)
}

fn number_after(line: &str, label: &str) -> f64 {
    let at = line.find(label).unwrap_or_else(|| panic!("no {label:?} in {line:?}")) + label.len();
    line[at..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn transformer_main_run_beats_a_unigram_model_and_writes_text() {
    let _alone = one_job();
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(ballast_tests::bin("transformer"))
        .args(["--sample", "200"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let perplexity = held_out_number(&stdout, "perplexity ");
    let reference = stdout
        .lines()
        .find(|l| l.starts_with("reference on the same held-out set: unigram byte model"))
        .unwrap_or_else(|| panic!("no unigram reference\n{stdout}"));
    let unigram = number_after(reference, "perplexity ");
    println!("transformer: held-out perplexity {perplexity:.3}, unigram byte model {unigram:.3}");
    assert!(perplexity < unigram, "{perplexity} vs unigram {unigram}\n{stdout}");
    let generated = stdout
        .split_once("generated (temperature 0.7, 200 bytes after \"the \"):\n")
        .unwrap_or_else(|| panic!("no generated text\n{stdout}"))
        .1;
    assert!(generated.len() >= 200, "{generated:?}");
    println!("generated: {:?}", generated.chars().take(240).collect::<String>());
}

/// Lines of at least `points` points in each chart of a report SVG, counted by colour: parses
/// the SVG as XML and returns the number of distinct series per chart (top, bottom).
pub fn svg_series(svg: &str, points: usize) -> Vec<usize> {
    let doc = roxmltree::Document::parse(svg).expect("the report is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let labels: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    let mut charts: Vec<std::collections::BTreeSet<String>> = Vec::new();
    let mut last_y_was_top = None;
    for n in doc.descendants().filter(|n| n.has_tag_name("polyline")) {
        let pts: Vec<&str> = n.attribute("points").unwrap_or("").split_whitespace().collect();
        if pts.len() < points {
            continue;
        }
        let y: f64 = pts[0].split(',').nth(1).unwrap().parse().unwrap();
        let top = y < 350.0;
        if last_y_was_top != Some(top) {
            charts.push(Default::default());
            last_y_was_top = Some(top);
        }
        charts
            .last_mut()
            .unwrap()
            .insert(n.attribute("stroke").unwrap_or("").to_string());
    }
    for k in 0..charts.first().map_or(0, |c| c.len()) {
        assert!(
            labels.contains(&format!("rank {k}").as_str()),
            "legend lacks rank {k}: {labels:?}"
        );
    }
    charts.iter().map(|c| c.len()).collect()
}

#[cfg(feature = "mpi")]
mod under_mpirun {
    use std::path::Path;

    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Rec {
        run: String,
        rank: usize,
        step: u64,
        loss: f64,
        micro_batch: usize,
        micro_batches: Vec<usize>,
        samples: usize,
        global_samples: usize,
        collectives: usize,
        peak_bytes: Option<u64>,
        budget_bytes: Option<u64>,
    }

    fn mpirun(bin: &str, dir: &Path, args: &[&str]) -> Output {
        Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "-np", "3", bin])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot start mpirun ({e}); apt-get install -y openmpi-bin libopenmpi-dev"))
    }

    fn check_job(bin: &str, budgets: &str) {
        let _alone = one_job();
        let d = tempfile::tempdir().unwrap();
        let out = mpirun(
            bin,
            d.path(),
            &[
                "--device-memory",
                budgets,
                "--steps",
                "200",
                "--metrics",
                "m.jsonl",
                "--log-every",
                "50",
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
        let lines = std::fs::read_to_string(d.path().join("m.jsonl")).unwrap();
        let recs: Vec<Rec> = lines
            .lines()
            .filter(|l| l.contains(r#""kind":"train""#))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // Held-out evaluations at steps 50, 100, 150 and 200, every rank the same totals.
        let evals: Vec<serde_json::Value> = lines
            .lines()
            .filter(|l| l.contains(r#""kind":"eval""#))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(evals.len(), 12, "4 evaluations x 3 ranks");
        for step in [50, 100, 150, 200] {
            let at: Vec<&serde_json::Value> = evals.iter().filter(|e| e["step"] == step).collect();
            assert_eq!(at.len(), 3, "step {step}");
            let sum: u64 = at.iter().map(|e| e["eval_samples"].as_u64().unwrap()).sum();
            assert_eq!(sum, at[0]["samples"].as_u64().unwrap());
            assert!(at
                .iter()
                .all(|e| e["loss_sum_fixed"] == at[0]["loss_sum_fixed"] && e["correct"] == at[0]["correct"]));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let held = stdout
            .lines()
            .find(|l| l.starts_with("held-out evaluation at step 200"))
            .unwrap_or_else(|| panic!("{stdout}"));
        println!("{bin}: {held}");
        assert_eq!(recs.len(), 600, "200 steps x 3 ranks");
        assert!(recs.iter().all(|r| r.run == recs[0].run));
        let mut unequal_steps = 0;
        for step in 0..200u64 {
            let at: Vec<&Rec> = recs.iter().filter(|r| r.step == step).collect();
            assert_eq!(at.len(), 3, "step {step}");
            // Adam's state is sharded by default: exactly three collectives per step on every
            // rank (the loss and counts all-reduced, the gradients reduce-scattered, the
            // parameters all-gathered), and all samples accounted for.
            assert!(at.iter().all(|r| r.collectives == 3), "step {step}: {at:?}");
            assert_eq!(at.iter().map(|r| r.samples).sum::<usize>(), at[0].global_samples);
            for r in &at {
                assert_eq!(r.micro_batches.iter().sum::<usize>(), r.samples);
                assert!(r.micro_batches.iter().all(|&m| m <= r.micro_batch.max(1)));
                // Measured peaks stay within each process's budget.
                assert!(r.peak_bytes.unwrap() <= r.budget_bytes.unwrap(), "{r:?}");
            }
            let mut micro: Vec<usize> = at.iter().map(|r| r.micro_batch).collect();
            micro.sort_unstable();
            micro.dedup();
            unequal_steps += usize::from(micro.len() > 1);
        }
        assert_eq!(unequal_steps, 200, "micro-batches differ between ranks at every step");
        let rank0: Vec<f64> = recs.iter().filter(|r| r.rank == 0).map(|r| r.loss).collect();
        let head = rank0[..20].iter().sum::<f64>() / 20.0;
        let tail = rank0[180..].iter().sum::<f64>() / 20.0;
        let micro: Vec<usize> = (0..3)
            .map(|k| recs.iter().find(|r| r.rank == k).unwrap().micro_batch)
            .collect();
        println!("{bin}: budgets {budgets}, micro-batches {micro:?}, loss (mean of 20 steps) {head:.4} -> {tail:.4}");
        assert!(tail < 0.5 * head, "loss must go down: {head} -> {tail}");

        // The operator's report of this run: a valid SVG with one series per rank per chart.
        let svg = d.path().join("run.svg");
        ballast::report::svg(&d.path().join("m.jsonl"), None, &svg).unwrap();
        let series = svg_series(&std::fs::read_to_string(&svg).unwrap(), 200);
        assert_eq!(series, vec![3, 3], "one line per rank in each chart");
    }

    #[test]
    fn resnet_under_mpirun_with_budgets_3_2_1() {
        check_job(&ballast_tests::bin("resnet"), "30MiB,20MiB,10MiB");
    }

    #[test]
    fn transformer_under_mpirun_with_budgets_3_2_1() {
        check_job(&ballast_tests::bin("transformer"), "12MiB,8MiB,4MiB");
    }
}

/// A device whose kernels do not compile is refused before step 0: rank 0 on Mesa's software
/// Vulkan device runs its start-up check in `bf16`, which cubecl cannot compile there (a real
/// failure on cubecl's device thread, reported only in its log). Every rank stops at once, the
/// job exits with code 2 naming rank 0, the check and cubecl's words, and no step is trained.
#[cfg(feature = "wgpu")]
#[test]
fn a_device_whose_kernels_do_not_compile_stops_the_job_before_step_0() {
    let _alone = one_job();
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(ballast_tests::bin("resnet"))
        .args([
            "--device",
            "wgpu:cpu,flex,flex",
            "--canary-dtype",
            "bf16",
            "--metrics",
            "m.jsonl",
        ])
        .current_dir(d.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stderr}");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr.contains("resnet: error: rank 0: "), "{stderr}");
    assert!(stderr.contains("the start-up check"), "{stderr}");
    assert!(stderr.contains("UnsupportedType"), "{stderr}");
    assert!(stderr.contains("nothing was trained"), "{stderr}");
    assert!(!stdout.lines().any(|l| l.starts_with("step ")), "{stdout}");
    let metrics = std::fs::read_to_string(d.path().join("m.jsonl")).unwrap_or_default();
    assert!(!metrics.contains("\"kind\":\"train\""), "{metrics}");
}

/// `--precision bf16`: the job trains in bf16 (the header and every metrics line name it, the
/// loss goes down) with its Adam state sharded as by default.
#[test]
fn resnet_in_bf16_trains_and_names_its_precision() {
    let _alone = one_job();
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(ballast_tests::bin("resnet"))
        .args(["--precision", "bf16", "--steps", "30", "--metrics", "m.jsonl"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("steps 0..30, precision bf16"), "{stdout}");
    let (first, last) = loss_change(&out);
    println!("resnet bf16, 30 steps: loss {first:.4} -> {last:.4}");
    assert!(last < 0.8 * first, "loss must go down: {first} -> {last}");
    let metrics = std::fs::read_to_string(d.path().join("m.jsonl")).unwrap();
    let train: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["kind"] == "train")
        .collect();
    assert_eq!(train.len(), 3 * 30, "one line per rank and step");
    assert!(train.iter().all(|v| v["precision"] == "bf16"), "{metrics}");
}
