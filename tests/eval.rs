//! Held-out evaluation of the example jobs: the split never lets an evaluation sample into a
//! training batch, data-parallel evaluation on unequal ranks gives exactly one rank's totals
//! (threads and `mpirun -np 3`), bad evaluation input is refused before anything is written.

use std::{
    path::Path,
    process::{Command, Output},
};

use ballast::{eval, GlobalSampler};
use ballast_examples::{
    cifar::{self, Cifar10},
    text::TextSet,
};

use ballast_tests::{one_job, text};

/// A single rank with room for any micro-batch (the model flags come first).
const ONE_RANK: [&str; 6] = ["--ranks", "1", "--speeds", "1", "--device-memory", "64MiB"];

fn run(bin: &str, dir: &Path, args: &[&str]) -> Output {
    Command::new(bin).args(args).current_dir(dir).output().unwrap()
}

/// An evaluation record as every rank writes it.
#[derive(Debug, Clone, serde::Deserialize)]
struct Eval {
    rank: usize,
    step: u64,
    eval_samples: usize,
    micro_batch: usize,
    samples: u64,
    units: u64,
    correct: u64,
    loss_sum_fixed: String,
    accuracy: f64,
}

fn evals(metrics: &Path) -> Vec<Eval> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .filter(|l| l.contains(r#""kind":"eval""#))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The totals every rank must agree on: (samples, units, correct, loss sum in fixed point).
fn totals(e: &Eval) -> (u64, u64, u64, String) {
    (e.samples, e.units, e.correct, e.loss_sum_fixed.clone())
}

/// Every training batch of two epochs, mapped back to the images it came from, and the
/// training images themselves: none is a held-out image.
#[test]
fn no_held_out_image_is_ever_in_a_training_batch() {
    let d = tempfile::tempdir().unwrap();
    let dir = cifar::write_synthetic(d.path(), 300, 5).unwrap();
    let all = Cifar10::load(&dir).unwrap();
    let split = eval::held_out(all.len(), 0.1, 5).unwrap();
    assert_eq!(split.eval.len(), 30);
    let train = all.subset(&split.train);
    let held = all.subset(&split.eval);
    let held_images: std::collections::HashSet<&[u8]> = (0..held.len()).map(|i| held.image(i)).collect();
    assert_eq!(held_images.len(), 30, "synthetic images are distinct");
    let sampler = GlobalSampler::new(train.len(), 64, 5).unwrap();
    let mut seen = std::collections::HashSet::new();
    for step in 0..2 * sampler.steps_per_epoch() as u64 {
        for i in sampler.batch(step) {
            let original = split.train[i];
            assert!(
                !split.eval.contains(&original),
                "step {step}: image {original} is held out"
            );
            assert!(
                !held_images.contains(train.image(i)),
                "step {step}: a held-out image in training"
            );
            assert_eq!(train.image(i), all.image(original));
            seen.insert(original);
        }
    }
    assert_eq!(seen.len(), 270, "every training image is trained on");
}

/// The text's held-out tail: no byte is a target on both sides, and the two sides together
/// predict every byte of the text once.
#[test]
fn no_held_out_byte_is_a_training_target() {
    let text: String = ballast_examples::text::synthetic_text(10_001, 3);
    let all = TextSet::from_bytes(Path::new("t"), text.into_bytes(), 16, false).unwrap();
    let (train, held) = all.split_tail(0.2).unwrap();
    assert_eq!(held.len(), 125);
    assert_eq!(train.len() + held.len(), all.len());
    let mut predicted = train.targets().to_vec();
    predicted.extend_from_slice(held.targets());
    assert_eq!(predicted, all.targets(), "each byte is predicted once, by one side");
    assert!(train.unigram_loss(&held) > 1.0, "a unigram model is a weak reference");
}

/// ResNet on 3 threads with unequal shares and micro-batches, then the saved model evaluated by
/// 1 rank: exactly the same held-out totals.
#[test]
fn evaluation_on_three_unequal_ranks_equals_one_rank() {
    let _alone = one_job();
    let d = tempfile::tempdir().unwrap();
    let bin = ballast_tests::bin("resnet");
    let common = ["--synthetic-images", "400", "--width", "8", "--global-batch", "32"];
    let mut args: Vec<&str> = common.to_vec();
    args.extend([
        "--steps",
        "8",
        "--eval-every",
        "4",
        "--speeds",
        "5,2,1",
        "--save-model",
        "m.safetensors",
        "--metrics",
        "three.jsonl",
    ]);
    let out = run(&bin, d.path(), &args);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("held-out evaluation at step 8 on 3 ranks: accuracy"),
        "{stdout}"
    );
    assert!(
        stdout.contains("reference on the same held-out set: chance"),
        "{stdout}"
    );
    let three = evals(&d.path().join("three.jsonl"));
    assert_eq!(three.len(), 6, "steps 4 and 8, on every rank: {three:?}");
    let last: Vec<&Eval> = three.iter().filter(|e| e.step == 8).collect();
    let ranks: std::collections::BTreeSet<usize> = last.iter().map(|e| e.rank).collect();
    assert_eq!(ranks.len(), 3, "one record per rank: {last:?}");
    assert!(last.iter().all(|e| totals(e) == totals(last[0])), "{last:?}");
    assert_eq!(last.iter().map(|e| e.eval_samples as u64).sum::<u64>(), 40);
    assert_eq!(last[0].samples, 40, "a tenth of 400 images is held out");
    let shares: std::collections::BTreeSet<usize> = last.iter().map(|e| e.eval_samples).collect();
    assert!(shares.len() > 1, "unequal evaluation shares: {last:?}");

    let mut args: Vec<&str> = common.to_vec();
    args.extend(ONE_RANK);
    args.extend(["--eval-only", "--load", "m.safetensors", "--metrics", "one.jsonl"]);
    let out = run(&bin, d.path(), &args);
    assert!(out.status.success(), "{}", text(&out));
    let one = evals(&d.path().join("one.jsonl"));
    assert_eq!(one.len(), 1, "{one:?}");
    assert_eq!(one[0].step, 8, "the saved model's step");
    assert_eq!(
        totals(&one[0]),
        totals(last[0]),
        "1 rank {:?} vs 3 ranks {:?}",
        one[0],
        last
    );
    let micro: Vec<usize> = last.iter().map(|e| e.micro_batch).chain([one[0].micro_batch]).collect();
    println!(
        "held-out accuracy {:.4}: 3 ranks (evaluated {:?}, micro-batches {micro:?}) and 1 rank agree exactly: {:?}",
        one[0].accuracy,
        last.iter().map(|e| e.eval_samples).collect::<Vec<_>>(),
        totals(&one[0])
    );
}

/// Bad evaluation input: a clear error, exit code 2, and nothing written.
#[test]
fn bad_input_evaluation_set() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("cut.bin"), vec![0u8; 5000]).unwrap();
    std::fs::write(d.path().join("empty.bin"), b"").unwrap();
    std::fs::create_dir(d.path().join("no-test")).unwrap();
    std::fs::write(d.path().join("short.txt"), "tiny").unwrap();
    let resnet = ballast_tests::bin("resnet");
    let transformer = ballast_tests::bin("transformer");
    let (resnet, transformer) = (resnet.as_str(), transformer.as_str());
    for (bin, args, expected) in [
        (resnet, vec!["--eval-data", "cut.bin"], "not a multiple of 3073"),
        (resnet, vec!["--eval-data", "empty.bin"], "empty.bin is empty"),
        (resnet, vec!["--eval-data", "no-test"], "no test_batch.bin in"),
        (
            resnet,
            vec!["--eval-data", "missing.bin"],
            "cannot read CIFAR-10 data at missing.bin",
        ),
        (transformer, vec!["--eval-data", "short.txt"], "short.txt has 4 bytes"),
        (resnet, vec!["--eval-fraction", "1.5"], "--eval-fraction is 1.5"),
        (resnet, vec!["--eval-fraction", "0.0001"], "holds out 0 and leaves"),
        (resnet, vec!["--eval-only"], "--load"),
        (
            resnet,
            vec!["--eval-data", "cut.bin", "--eval-fraction", "0.1"],
            "cannot be used with",
        ),
        (resnet, vec!["--eval-only", "--load", "cut.bin"], "--load cut.bin"),
    ] {
        let mut all = args.clone();
        all.extend(["--steps", "2", "--work-dir", "w"]);
        let out = run(bin, d.path(), &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        // A --load file is read by the job, after the generated training set is in place.
        if expected != "--load cut.bin" {
            assert!(
                !d.path().join("w").exists(),
                "{args:?}: nothing is written for a refused input"
            );
        }
    }
}

#[cfg(feature = "mpi")]
mod under_mpirun {
    use super::*;

    /// The same model evaluated by 3 processes pinned 0|1|1 (unequal shares) and by 1 process:
    /// exactly the same totals.
    #[test]
    fn evaluation_under_mpirun_equals_one_rank() {
        let _alone = one_job();
        let d = tempfile::tempdir().unwrap();
        let bin = ballast_tests::bin("resnet");
        let common = ["--synthetic-images", "400", "--width", "8", "--global-batch", "32"];
        let mut args: Vec<&str> = common.to_vec();
        args.extend(ONE_RANK);
        args.extend([
            "--steps",
            "4",
            "--save-model",
            "m.safetensors",
            "--metrics",
            "train.jsonl",
        ]);
        let out = run(&bin, d.path(), &args);
        assert!(out.status.success(), "{}", text(&out));
        let one = evals(&d.path().join("train.jsonl"));
        assert_eq!(one.len(), 1, "{one:?}");

        let pin = ballast_tests::workspace_file("cluster/pin-by-rank.sh");
        let out = Command::new("mpirun")
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "-np",
                "3",
                &pin,
                "0",
                "1",
                "1",
                "--",
                &bin,
            ])
            .args(common)
            .args([
                "--eval-only",
                "--load",
                "m.safetensors",
                "--device-memory",
                "30MiB,20MiB,10MiB",
                "--metrics",
                "mpi.jsonl",
            ])
            .current_dir(d.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot start mpirun ({e}); apt-get install -y openmpi-bin libopenmpi-dev"));
        assert!(out.status.success(), "{}", text(&out));
        let three = evals(&d.path().join("mpi.jsonl"));
        assert_eq!(three.len(), 3, "{three:?}");
        assert_eq!(three.iter().map(|e| e.eval_samples as u64).sum::<u64>(), 40);
        for e in &three {
            assert_eq!(totals(e), totals(&one[0]), "rank {} under mpirun vs 1 rank", e.rank);
        }
        println!(
            "mpirun -np 3: evaluated {:?} of 40 in micro-batches {:?}; totals {:?} equal 1 rank's",
            three.iter().map(|e| e.eval_samples).collect::<Vec<_>>(),
            three.iter().map(|e| e.micro_batch).collect::<Vec<_>>(),
            totals(&one[0])
        );
    }
}
