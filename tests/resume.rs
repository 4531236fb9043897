//! Checkpoints and resume: an interrupted run continues bit for bit on the same ranks and
//! within 1e-5 on a different number of ranks, with the optimizer state sharded over the ranks
//! (the jobs' default) and whole on every rank; a writer killed mid-save never leaves a
//! checkpoint that is picked but cannot be loaded.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use ballast::{
    checkpoint::{self, Checkpointer},
    testing::{Mlp, Regressor, WideMlp},
};
use burn::tensor::Device;

/// Flags of every run compared here: equal shares and no re-planning make the arithmetic of a
/// run independent of timing, so "the same" can mean bit-identical.
const FIXED: &[&str] = &[
    "--steps",
    "40",
    "--checkpoint-every",
    "20",
    "--initial-plan",
    "equal",
    "--no-rebalance",
    "--samples",
    "600",
];

fn demo(dir: &Path, args: &[&str]) -> Output {
    Command::new(ballast_tests::bin("ballast"))
        .arg("demo")
        .args(FIXED)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running ballast")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn checksum_line(out: &Output) -> String {
    let s = String::from_utf8_lossy(&out.stdout);
    let at = s
        .find("checksum ")
        .unwrap_or_else(|| panic!("no checksum in\n{}", text(out)));
    s[at..].split(')').next().unwrap().to_string()
}

/// Largest per-tensor relative difference between two checkpoints' parameters.
fn max_rel_diff(a: &Path, b: &Path) -> f64 {
    let model = Mlp::init(&Device::flex());
    let (x, y) = (
        checkpoint::load(a, &model).unwrap(),
        checkpoint::load(b, &model).unwrap(),
    );
    let slots = ballast::params::collect_params(&model);
    let mut worst = 0.0f64;
    let mut offset = 0;
    for slot in slots {
        let n: usize = slot.dims.iter().product();
        let (p, q) = (&x.params[offset..offset + n], &y.params[offset..offset + n]);
        let diff: f64 = p
            .iter()
            .zip(q)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = p.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
        worst = worst.max(diff / norm.max(1e-12));
        offset += n;
    }
    worst
}

fn step40(dir: &Path, name: &str) -> PathBuf {
    dir.join(name).join("step-0000000040.safetensors")
}

/// Where the runs keep Adam's state: sharded by memory (the default), and whole on every rank.
const SHARDINGS: &[&str] = &["memory", "off"];

/// The run says how its optimizer state is kept: one line per rank when it is sharded.
fn assert_sharding(out: &Output, sharding: &str, ranks: usize) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines = stdout.lines().filter(|l| l.contains(": optimizer state for ")).count();
    let expected = if sharding == "off" { 0 } else { ranks };
    assert_eq!(lines, expected, "--optimizer-sharding {sharding}\n{}", text(out));
}

/// In bf16 a checkpoint holds the f32 master parameters (not the replica's rounded values) and
/// Adam's f32 moments: a run killed as step 21 begins and resumed from its step-20 checkpoint
/// ends bit-identical to the run that was never interrupted.
#[test]
fn resume_in_bf16_continues_bit_for_bit_from_the_master() {
    // The master in the optimizer's shards (`memory`), and in the host Adam of every rank
    // (`off`: the whole state on the host).
    for sharding in SHARDINGS {
        resume_in_bf16(sharding);
    }
}

fn resume_in_bf16(sharding: &str) {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let bf16 = |args: &[&str]| {
        let mut all = vec!["--precision", "bf16", "--optimizer-sharding", sharding];
        all.extend_from_slice(args);
        demo(dir, &all)
    };
    let full = bf16(&["--checkpoint-dir", "full"]);
    assert!(full.status.success(), "{}", text(&full));
    let crashed = bf16(&["--checkpoint-dir", "cut", "--crash-at-step", "21"]);
    assert!(
        !crashed.status.success(),
        "the crash must fail the run\n{}",
        text(&crashed)
    );
    let resumed = bf16(&["--checkpoint-dir", "cut", "--resume"]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert!(String::from_utf8_lossy(&resumed.stdout).contains("trained steps 20..40"));
    assert_sharding(&full, sharding, 3);
    assert_eq!(
        checksum_line(&full),
        checksum_line(&resumed),
        "bf16 {sharding}: bit-identical"
    );
    assert_eq!(max_rel_diff(&step40(dir, "full"), &step40(dir, "cut")), 0.0);
    let saved = checkpoint::load(
        &dir.join("cut/step-0000000020.safetensors"),
        &Mlp::init(&Device::flex()),
    )
    .unwrap();
    let unrounded = saved.params.iter().filter(|v| v.to_bits() & 0xffff != 0).count();
    println!(
        "bf16 resume, optimizer sharding {sharding}: {} ({unrounded} of {} saved values are not bf16 values: the master)",
        checksum_line(&resumed),
        saved.params.len()
    );
    assert!(
        unrounded > 0,
        "the checkpoint holds the replica's bf16 values, not the f32 master"
    );
}

#[test]
fn resume_on_threads_is_bit_identical_and_close_on_other_ranks() {
    for sharding in SHARDINGS {
        resume_on_threads(sharding);
    }
}

fn resume_on_threads(sharding: &str) {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let demo = |dir: &Path, args: &[&str]| {
        let mut all = vec!["--optimizer-sharding", sharding];
        all.extend_from_slice(args);
        demo(dir, &all)
    };
    let full = demo(dir, &["--checkpoint-dir", "full"]);
    assert_sharding(&full, sharding, 3);
    assert!(full.status.success(), "{}", text(&full));

    // Killed (abort) as step 21 begins: the step-20 checkpoint is the newest.
    let crashed = demo(dir, &["--checkpoint-dir", "cut", "--crash-at-step", "21"]);
    assert!(
        !crashed.status.success(),
        "the crash must fail the run\n{}",
        text(&crashed)
    );
    assert!(dir.join("cut/step-0000000020.safetensors").exists());
    assert!(!dir.join("cut/step-0000000040.safetensors").exists());
    let resumed = demo(dir, &["--checkpoint-dir", "cut", "--resume"]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    let out = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        out.contains("resuming from cut/step-0000000020.safetensors (step 20"),
        "{out}"
    );
    assert!(out.contains("trained steps 20..40"), "{out}");
    assert_eq!(
        checksum_line(&full),
        checksum_line(&resumed),
        "same ranks: bit-identical"
    );
    assert_eq!(max_rel_diff(&step40(dir, "full"), &step40(dir, "cut")), 0.0);

    // The step-20 checkpoint resumed on 2 ranks and on 1 rank: re-planned, same batches.
    for ranks in ["2", "1"] {
        let name = format!("on{ranks}");
        std::fs::create_dir(dir.join(&name)).unwrap();
        std::fs::copy(
            dir.join("cut/step-0000000020.safetensors"),
            dir.join(&name).join("step-0000000020.safetensors"),
        )
        .unwrap();
        let speeds = if ranks == "2" { "2,1" } else { "1" };
        let other = demo(
            dir,
            &[
                "--checkpoint-dir",
                &name,
                "--resume",
                "--ranks",
                ranks,
                "--speeds",
                speeds,
            ],
        );
        assert!(other.status.success(), "{}", text(&other));
        assert_sharding(&other, sharding, ranks.parse().unwrap());
        let rel = max_rel_diff(&step40(dir, "full"), &step40(dir, &name));
        println!(
            "--optimizer-sharding {sharding}: resumed on {ranks} ranks: max per-tensor relative difference {rel:.3e}"
        );
        assert!(rel <= 1e-5, "resumed on {ranks} ranks differs by {rel:e}");
    }
}

#[cfg(feature = "mpi")]
#[test]
fn resume_under_mpirun_is_bit_identical_and_close_on_other_ranks() {
    for sharding in SHARDINGS {
        resume_under_mpirun(sharding);
    }
}

#[cfg(feature = "mpi")]
fn resume_under_mpirun(sharding: &str) {
    use ballast_tests::{mpirun_in, text};
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["demo", "--optimizer-sharding", sharding]
            .iter()
            .chain(FIXED)
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let full = mpirun_in(dir, 3, &args(&["--checkpoint-dir", "full"]), &[]);
    assert!(full.status.success(), "{}", text(&full));
    assert_sharding(&full, sharding, 3);
    let crashed = mpirun_in(
        dir,
        3,
        &args(&["--checkpoint-dir", "cut", "--crash-at-step", "21"]),
        &[],
    );
    assert!(!crashed.status.success(), "{}", text(&crashed));
    assert!(!dir.join("cut/step-0000000040.safetensors").exists());
    let resumed = mpirun_in(dir, 3, &args(&["--checkpoint-dir", "cut", "--resume"]), &[]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert_eq!(
        checksum_line(&full),
        checksum_line(&resumed),
        "same ranks: bit-identical"
    );
    assert_eq!(max_rel_diff(&step40(dir, "full"), &step40(dir, "cut")), 0.0);

    std::fs::create_dir(dir.join("on2")).unwrap();
    std::fs::copy(
        dir.join("cut/step-0000000020.safetensors"),
        dir.join("on2/step-0000000020.safetensors"),
    )
    .unwrap();
    let other = mpirun_in(dir, 2, &args(&["--checkpoint-dir", "on2", "--resume"]), &[]);
    assert!(other.status.success(), "{}", text(&other));
    assert_sharding(&other, sharding, 2);
    let rel = max_rel_diff(&step40(dir, "full"), &step40(dir, "on2"));
    println!(
        "mpirun, --optimizer-sharding {sharding}: resumed on 2 ranks: max per-tensor relative difference {rel:.3e}"
    );
    assert!(rel <= 1e-5, "resumed on 2 ranks differs by {rel:e}");
}

/// A small generator for the kill delays (the same trials every run).
fn delays(n: usize) -> Vec<Duration> {
    let mut s: u64 = 0x5eed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            Duration::from_millis(150 + (s >> 33) % 900)
        })
        .collect()
}

#[test]
fn resume_after_crash_during_save_never_picks_a_partial_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ck");
    let width = 1024;
    let model = WideMlp::with_width(width, &Device::flex());
    let mut mid_write = 0;
    let mut checked = 0;
    for (trial, delay) in delays(20).into_iter().enumerate() {
        let mut child = Command::new(ballast_tests::bin("ballast-selftest"))
            .args(["checkpoint-writer", "--width", &width.to_string(), "--out-dir"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.strip_prefix("saved ").and_then(|s| s.parse::<u64>().ok()))
                .last()
        });
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
        let announced = reader.join().unwrap();
        let tmp_left = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            })
            .unwrap_or(false);
        mid_write += usize::from(tmp_left);
        let cp = Checkpointer::new(&dir, 3).unwrap();
        let newest = cp.newest().unwrap();
        checked += usize::from(announced.is_some());
        match (announced, &newest) {
            // Killed before its first announced save: an earlier trial's file may be newest,
            // and it must load; there is no step to compare it with.
            (None, Some(path)) => {
                checkpoint::load(path, &model).unwrap_or_else(|e| panic!("trial {trial}: {e}"));
            }
            (None, None) => {}
            (Some(step), None) => panic!("trial {trial}: step {step} was announced but no checkpoint loads"),
            (Some(step), Some(path)) => {
                let loaded = checkpoint::load(path, &model).unwrap_or_else(|e| panic!("trial {trial}: {e}"));
                assert!(
                    loaded.state.step >= step,
                    "trial {trial}: newest is step {} but step {step} was complete",
                    loaded.state.step
                );
                assert!(!path.file_name().unwrap().to_string_lossy().starts_with(".tmp-"));
                let adam = loaded.adam.expect("optimizer state");
                assert_eq!(adam.t as u64, loaded.state.step, "trial {trial}: state of another step");
            }
        }
        println!(
            "trial {trial}: killed after {delay:?}; last announced {announced:?}; newest {:?}; partial temp file left: {tmp_left}",
            newest.as_ref().map(|p| p.file_name().unwrap().to_owned())
        );
    }
    println!(
        "{mid_write} of 20 kills left a partial temporary file; none was picked; {checked} trials had announced a save"
    );
    // A trial killed before its first save checks little: at least half must have saved first.
    assert!(
        checked >= 10,
        "only {checked} of 20 trials were killed after a save; lengthen the delays"
    );

    // A damaged file under a checkpoint's name (say, copied by hand and cut short) is skipped,
    // named, in favour of the newest good one.
    let cp = Checkpointer::new(&dir, 3).unwrap();
    let good = cp.newest().unwrap().expect("a good checkpoint after 20 trials");
    let good_step = checkpoint::load(&good, &model).unwrap().state.step;
    let bytes = std::fs::read(&good).unwrap();
    let fake = cp.path_for(good_step + 1000);
    std::fs::write(&fake, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(cp.newest().unwrap().as_deref(), Some(good.as_path()));
    checkpoint::verify(&good).unwrap();
    assert!(checkpoint::verify(&fake).is_err());
}
