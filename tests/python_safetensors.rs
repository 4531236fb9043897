//! A ballast checkpoint read by Python's `safetensors`: same names, shapes and values.
//!
//! Needs `python3` with `safetensors` and `numpy` (CI installs them). Elsewhere, when they are
//! missing, the test prints that it was skipped and why; with `CI` set it fails instead.

use std::process::Command;

use ballast::{
    checkpoint::{self, Checkpointer, TrainState},
    optim::{HostAdam, HostAdamConfig},
    params::collect_params,
    testing::{ConvNet, Regressor},
};
use burn::{module::Module, tensor::Device};

#[test]
fn python_safetensors_reads_a_ballast_checkpoint() {
    let probe = Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .output();
    let available = probe.as_ref().is_ok_and(|o| o.status.success());
    if !available {
        let why = match &probe {
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install Python's safetensors and numpy (pip install safetensors numpy): {why}"
        );
        println!("skipped: python_safetensors_reads_a_ballast_checkpoint: python3 with safetensors and numpy not available ({why}); pip install safetensors numpy");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let model = ConvNet::init(&device);
    let n = model.num_params();
    let mut adam = HostAdam::new(n, HostAdamConfig::default());
    let mut params = ballast::params::flatten_params(&model);
    let grads: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 * 1e-2 - 0.5).collect();
    adam.step(&mut params, &grads, 1e-2);
    let model = ballast::params::load_params(model, &params);
    let state = TrainState {
        step: 7,
        seed: 3,
        global_batch: 8,
        world_size: 3,
        job: "python".into(),
        plan: None,
        shards: None,
    };
    let path = Checkpointer::new(d.path(), 1)
        .unwrap()
        .save(&model, Some((&adam).into()), &state)
        .unwrap();

    // What ballast reads back is what Python must see.
    let loaded = checkpoint::load(&path, &model).unwrap();
    let adam_state = loaded.adam.clone().unwrap();
    let mut expected = serde_json::Map::new();
    let mut offset = 0;
    for slot in collect_params(&model) {
        let len: usize = slot.dims.iter().product();
        for (prefix, values) in [
            ("model.", &loaded.params),
            ("optim.adam.m.", &adam_state.m),
            ("optim.adam.v.", &adam_state.v),
        ] {
            expected.insert(
                format!("{prefix}{}", slot.path),
                serde_json::json!({"shape": slot.dims, "values": values[offset..offset + len]}),
            );
        }
        offset += len;
    }
    assert_eq!(loaded.params, params, "ballast reads back what it wrote");
    let expected_path = d.path().join("expected.json");
    std::fs::write(&expected_path, serde_json::Value::Object(expected).to_string()).unwrap();
    let script = ballast_tests::suite_file("python/read_checkpoint.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&path)
        .arg(&expected_path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("tensors equal; step 7"), "{text}");
}
