//! The catalogue of bad inputs: each gets a clear error naming the cause and the fix, a non-zero
//! exit, no panic, and leaves every existing file as it was.
//!
//! Configuration and checkpoint cases run the `ballast demo` job (the same loop the example jobs
//! run); data-file cases live with the loaders in `examples/tests/loaders.rs`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use ballast::{
    checkpoint::{Checkpointer, TrainState},
    collectives::{local, CommOptions, Communicator},
    testing::{Mlp, Regressor, WideMlp},
    DataParallel, DdpOptions, Error,
};
use burn::tensor::Device;

fn demo(dir: &Path, args: &[&str]) -> Output {
    let steps: &[&str] = if args.contains(&"--steps") {
        &[]
    } else {
        &["--steps", "4"]
    };
    Command::new(env!("CARGO_BIN_EXE_ballast"))
        .arg("demo")
        .args(steps)
        .args(["--samples", "200"])
        .args(args)
        .current_dir(dir)
        .env("BALLAST_TIMEOUT_SECS", "20")
        .output()
        .expect("running ballast")
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Runs `ballast demo args` in `dir` and checks: exit code 2, stderr holds `expected`, no panic,
/// and no file that existed before changed or disappeared.
fn refused(dir: &Path, args: &[&str], expected: &[&str]) -> String {
    let before = snapshot(dir);
    let out = demo(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let all = format!("{}\n{stderr}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(2), "expected exit 2 for {args:?}:\n{all}");
    assert!(!all.contains("panicked"), "panic for {args:?}:\n{all}");
    for e in expected {
        assert!(stderr.contains(e), "expected {e:?} in the error for {args:?}:\n{all}");
    }
    let after = snapshot(dir);
    for (path, bytes) in &before {
        assert_eq!(after.get(path), Some(bytes), "{} changed or vanished", path.display());
    }
    stderr
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn bad_input_global_batch_zero() {
    let d = tmp();
    refused(
        d.path(),
        &["--global-batch", "0"],
        &["--global-batch must be at least 1"],
    );
}

#[test]
fn bad_input_negative_learning_rate() {
    let d = tmp();
    refused(d.path(), &["--lr=-0.1"], &["--lr must be a positive number (got -0.1)"]);
}

#[test]
fn bad_input_zero_steps() {
    let d = tmp();
    refused(d.path(), &["--steps", "0"], &["--steps/--epochs must be at least 1"]);
}

#[test]
fn bad_input_unknown_device_memory_spec() {
    let d = tmp();
    refused(
        d.path(),
        &["--device-memory", "lots,2MiB,1MiB"],
        &["--device-memory entry 0 (\"lots\") is not a size", "24MiB"],
    );
}

#[test]
fn bad_input_zero_device_memory() {
    let d = tmp();
    refused(
        d.path(),
        &["--device-memory", "0,2MiB,1MiB"],
        &["--device-memory entry 0 is 0 bytes"],
    );
}

#[test]
fn bad_input_negative_speed() {
    let d = tmp();
    refused(d.path(), &["--speeds", "1,-2,1"], &["--speeds entry 1 is -2"]);
}

#[test]
fn bad_input_budgets_too_small_for_any_plan() {
    let d = tmp();
    refused(
        d.path(),
        &["--device-memory", "1KiB,1KiB,1KiB"],
        &["no feasible plan for a global batch of 48"],
    );
}

#[test]
fn bad_input_world_size_disagrees_with_config() {
    let d = tmp();
    refused(
        d.path(),
        &["--ranks", "2", "--device-memory", "4MiB,4MiB,4MiB"],
        &["the job has 2 ranks but --device-memory lists 3 budgets"],
    );
}

#[test]
fn bad_input_unknown_initial_plan() {
    let d = tmp();
    refused(
        d.path(),
        &["--initial-plan", "fastest"],
        &["--initial-plan is \"fastest\"; use `measured` or `equal`"],
    );
}

#[test]
fn bad_input_unknown_micro_batch_policy() {
    let d = tmp();
    refused(
        d.path(),
        &["--micro-batch", "biggest"],
        &["--micro-batch is \"biggest\"; use `fastest` or `largest`"],
    );
}

#[test]
fn bad_input_config_file_missing() {
    let d = tmp();
    refused(
        d.path(),
        &["--config", "nope.toml"],
        &["cannot read config file nope.toml"],
    );
}

#[test]
fn bad_input_config_unknown_key() {
    let d = tmp();
    std::fs::write(d.path().join("job.toml"), "[train]\nglobal_bath = 4\n").unwrap();
    refused(
        d.path(),
        &["--config", "job.toml"],
        &["config file job.toml is invalid", "unknown field `global_bath`"],
    );
}

#[test]
fn bad_input_config_syntax_error() {
    let d = tmp();
    std::fs::write(d.path().join("job.toml"), "[train\nlr = 1\n").unwrap();
    refused(
        d.path(),
        &["--config", "job.toml"],
        &["config file job.toml is invalid"],
    );
}

#[test]
fn bad_input_config_wrong_type() {
    let d = tmp();
    std::fs::write(d.path().join("job.toml"), "[train]\nglobal_batch = \"many\"\n").unwrap();
    refused(
        d.path(),
        &["--config", "job.toml"],
        &["config file job.toml is invalid", "invalid type"],
    );
}

#[test]
fn bad_input_config_value_checked_like_a_flag() {
    let d = tmp();
    std::fs::write(d.path().join("job.toml"), "[train]\nlr = -1.0\n").unwrap();
    refused(d.path(), &["--config", "job.toml"], &["--lr must be a positive number"]);
}

#[test]
fn bad_input_resume_without_checkpoint_dir() {
    let d = tmp();
    refused(d.path(), &["--resume"], &["--resume needs --checkpoint-dir"]);
}

#[test]
fn bad_input_resume_from_empty_directory() {
    let d = tmp();
    std::fs::create_dir(d.path().join("ck")).unwrap();
    refused(
        d.path(),
        &["--resume", "--checkpoint-dir", "ck"],
        &["no complete checkpoint in ck", "run without --resume"],
    );
}

/// A real checkpoint of the demo model at step 4, in `dir/ck`.
fn good_checkpoint(dir: &Path) -> PathBuf {
    let out = demo(dir, &["--checkpoint-dir", "ck", "--checkpoint-every", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = dir.join("ck/step-0000000004.safetensors");
    assert!(path.exists());
    path
}

#[test]
fn bad_input_checkpoint_truncated() {
    let d = tmp();
    let path = good_checkpoint(d.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = refused(
        d.path(),
        &["--resume", "--checkpoint-dir", "ck"],
        &["no complete checkpoint in ck"],
    );
    assert!(
        err.contains("skipping checkpoint") && err.contains("truncated or corrupt"),
        "{err}"
    );
}

#[test]
fn bad_input_checkpoint_wrong_header() {
    let d = tmp();
    let path = good_checkpoint(d.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = refused(
        d.path(),
        &["--resume", "--checkpoint-dir", "ck"],
        &["no complete checkpoint in ck"],
    );
    assert!(err.contains("is not a readable safetensors file"), "{err}");
}

#[test]
fn bad_input_checkpoint_checksum_mismatch() {
    let d = tmp();
    let path = good_checkpoint(d.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = refused(
        d.path(),
        &["--resume", "--checkpoint-dir", "ck"],
        &["no complete checkpoint in ck"],
    );
    assert!(err.contains("checksum mismatch"), "{err}");
}

/// Rewrites the checkpoint at `path` through `edit` (name -> (shape, f32 values)), keeping its
/// metadata and recomputing the checksum, so only the edit is wrong with it.
fn rewrite(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<u8>)>), keep_format: bool) {
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (name, (_, data)) in &tensors {
        h.update(name.as_bytes());
        h.update(data);
    }
    meta.insert("checksum".into(), format!("xxh3:{:016x}", h.digest()));
    if !keep_format {
        meta.remove("format");
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (s, d))| (n.clone(), TensorView::new(Dtype::F32, s.clone(), d).unwrap()))
        .collect();
    std::fs::write(
        path,
        safetensors::serialize(views, Some(meta.into_iter().collect())).unwrap(),
    )
    .unwrap();
}

#[test]
fn bad_input_checkpoint_not_ballast() {
    let d = tmp();
    let path = good_checkpoint(d.path());
    rewrite(&path, |_| {}, false);
    let err = refused(
        d.path(),
        &["--resume", "--checkpoint-dir", "ck"],
        &["no complete checkpoint in ck"],
    );
    assert!(
        err.contains("is a safetensors file but not a ballast checkpoint"),
        "{err}"
    );
}

#[test]
fn bad_input_checkpoint_missing_tensor() {
    let d = tmp();
    let path = good_checkpoint(d.path());
    rewrite(
        &path,
        |t| {
            t.remove("model.l2.bias");
        },
        true,
    );
    refused(
        d.path(),
        &["--resume", "--checkpoint-dir", "ck"],
        &["has no tensor `model.l2.bias`, which the model needs"],
    );
}

#[test]
fn bad_input_checkpoint_wrong_shape() {
    let d = tmp();
    let path = good_checkpoint(d.path());
    rewrite(
        &path,
        |t| {
            let (shape, _) = t.get_mut("model.l1.weight").unwrap();
            shape.reverse();
        },
        true,
    );
    refused(
        d.path(),
        &["--resume", "--checkpoint-dir", "ck"],
        &["tensor `model.l1.weight` has shape [32, 16] but the model's is [16, 32]"],
    );
}

#[test]
fn bad_input_checkpoint_extra_tensor() {
    let d = tmp();
    let path = good_checkpoint(d.path());
    rewrite(
        &path,
        |t| {
            t.insert("model.l3.weight".into(), (vec![2], vec![0; 8]));
        },
        true,
    );
    refused(
        d.path(),
        &["--resume", "--checkpoint-dir", "ck"],
        &["holds parameters this model lacks (model.l3.weight)"],
    );
}

#[test]
fn bad_input_checkpoint_of_another_model() {
    let d = tmp();
    let device = Device::flex();
    let cp = Checkpointer::new(&d.path().join("ck"), 3).unwrap();
    let state = TrainState {
        step: 4,
        seed: 1,
        global_batch: 48,
        world_size: 3,
        job: "demo".into(),
        plan: None,
        shards: None,
    };
    cp.save(&WideMlp::with_width(8, &device), None, &state).unwrap();
    refused(
        d.path(),
        &["--resume", "--checkpoint-dir", "ck"],
        &["has no tensor `model.l1.weight`", "another model"],
    );
}

#[test]
fn bad_input_resume_with_another_global_batch() {
    let d = tmp();
    good_checkpoint(d.path());
    refused(
        d.path(),
        &["--resume", "--checkpoint-dir", "ck", "--global-batch", "24"],
        &["trained with global batch 48 but --global-batch is 24"],
    );
}

#[test]
fn bad_input_report_of_a_file_that_is_not_metrics() {
    let d = tmp();
    std::fs::write(d.path().join("notes.txt"), "hello\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["report", "notes.txt", "--svg", "out.svg"])
        .current_dir(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("notes.txt:1: not a ballast metrics record"), "{err}");
    assert!(!d.path().join("out.svg").exists());
}

#[test]
fn bad_input_ranks_hold_different_models() {
    let results = local::run(3, CommOptions::default(), |comm| {
        let device = Device::flex().autodiff();
        let width = if comm.rank() == 2 { 16 } else { 8 };
        DataParallel::wrap(
            Box::new(comm),
            WideMlp::with_width(width, &device),
            DdpOptions::default(),
        )
        .err()
        .map(|e| (matches!(e, Error::ModelMismatch { .. }), e.to_string()))
    });
    for r in results {
        let (mismatch, msg) = r.expect("wrap must fail on every rank");
        assert!(mismatch, "{msg}");
        assert!(msg.contains("rank 2 holds a different model than rank 0"), "{msg}");
        assert!(msg.contains("a.weight"), "{msg}");
    }
    // The same model everywhere wraps fine (the check is not trigger-happy).
    let ok = local::run(2, CommOptions::default(), |comm| {
        let device = Device::flex().autodiff();
        DataParallel::wrap(Box::new(comm), Mlp::init(&device), DdpOptions::default()).is_ok()
    });
    assert!(ok.into_iter().all(|x| x));
}
