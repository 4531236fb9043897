//! The command line as a user meets it: plans, their JSON and SVG, and clear errors.

use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Held while a child is spawned. A child forked by one test holds copies of every pipe the
/// process has open until it executes the binary; the closed-pipe test must know that no other
/// process keeps its pipe's read end open, so no spawn overlaps the moment that pipe exists.
static SPAWN: Mutex<()> = Mutex::new(());

fn ballast(args: &[&str]) -> std::process::Output {
    let child = {
        let _spawning = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
        Command::new(env!("CARGO_BIN_EXE_ballast"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    child.wait_with_output().unwrap()
}

const CLUSTER: [&str; 12] = [
    "plan",
    "--device",
    "24GiB:1.0:rtx3090",
    "--device",
    "12GiB:0.55:rtx3060",
    "--device",
    "8GiB:0.3:gtx1080",
    "--params",
    "25M",
    "--bytes-per-sample",
    "150MiB",
    "--global-batch",
];

#[test]
fn plan_json_adds_up_and_svg_is_valid_xml() {
    let svg = std::env::temp_dir().join(format!("ballast-plan-{}.svg", std::process::id()));
    let mut args = CLUSTER.to_vec();
    let svg_arg = svg.to_str().unwrap().to_string();
    args.extend(["256", "--json", "--svg", &svg_arg]);
    let out = ballast(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ranks = v["plan"]["ranks"].as_array().unwrap();
    let shares: Vec<u64> = ranks.iter().map(|r| r["share"].as_u64().unwrap()).collect();
    assert_eq!(shares.iter().sum::<u64>(), 256);
    assert!(shares[0] > shares[1] && shares[1] > shares[2], "{shares:?}");
    for (r, rep) in ranks.iter().zip(v["reports"].as_array().unwrap()) {
        assert!(r["predicted_peak_bytes"].as_u64().unwrap() <= rep["budget_bytes"].as_u64().unwrap());
    }
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("the SVG is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let bars = doc.descendants().filter(|n| n.has_tag_name("rect")).count();
    assert!(
        bars >= 1 + 3 + 3 + 3,
        "background, share bars, budget bars, peak bars: {bars}"
    );
    std::fs::remove_file(&svg).unwrap();
}

#[test]
fn plan_table_names_every_device() {
    let mut args = CLUSTER.to_vec();
    args.push("256");
    let out = ballast(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["rtx3090", "rtx3060", "gtx1080", "predicted step"] {
        assert!(text.contains(name), "{text}");
    }
}

/// `ballast plan` of a 1.3 B-parameter model on 80, 24 and 12 GiB cards.
const BIG_MODEL: [&str; 13] = [
    "plan",
    "--device",
    "80GiB:3:a100",
    "--device",
    "24GiB:1:rtx3090",
    "--device",
    "12GiB:0.5:rtx3060",
    "--params",
    "1.3B",
    "--bytes-per-sample",
    "600MiB",
    "--global-batch",
    "512",
];

/// A 1.3 B-parameter model on 80, 24 and 12 GiB cards: with every rank holding all of Adam's
/// state the 12 GiB card must offload it; sharded by memory every shard stays on a device, the
/// shards cover every parameter, and the 24 GiB card runs a larger micro-batch.
#[test]
fn sharded_plan_keeps_the_state_on_the_devices_where_replication_offloads() {
    let mut args = BIG_MODEL.to_vec();
    args.push("--json");
    let out = ballast(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flags = |p: &serde_json::Value| -> Vec<bool> {
        p["on_host"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_bool().unwrap())
            .collect()
    };
    let micro = |p: &serde_json::Value| -> Vec<u64> {
        p["plan"]["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["micro_batch"].as_u64().unwrap())
            .collect()
    };
    let (replicated, sharded) = (&v["replicated"], &v["optimizer"]);
    assert_eq!(sharded["sharding"], "Memory");
    assert!(flags(replicated).contains(&true), "{replicated}");
    assert_eq!(flags(sharded), [false, false, false], "{sharded}");
    let counts: Vec<u64> = sharded["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 1_300_000_000);
    assert!(
        micro(sharded)[1] > micro(replicated)[1],
        "{:?} vs {:?}",
        micro(sharded),
        micro(replicated)
    );
    for (r, rep) in v["plan"]["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .zip(v["reports"].as_array().unwrap())
    {
        assert!(r["predicted_peak_bytes"].as_u64().unwrap() <= rep["budget_bytes"].as_u64().unwrap());
    }
    // The table shows both plans, each rank's shard and the optimizer's predicted time.
    let out = ballast(&BIG_MODEL);
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "replicated optimizer state",
        "optimizer state sharded (memory)",
        "rank 2: optimizer state for",
        "optimizer",
    ] {
        assert!(text.contains(needle), "{needle:?} in {text}");
    }
}

#[test]
fn infeasible_plan_is_a_clear_error() {
    let out = ballast(&[
        "plan",
        "--device",
        "1GiB:1",
        "--params",
        "200M",
        "--bytes-per-sample",
        "1MiB",
        "--global-batch",
        "8",
        "--optimizer-sharding",
        "off",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no feasible plan") && err.contains("needs 3200000000 fixed"),
        "{err}"
    );
}

#[test]
fn bad_device_spec_is_a_clear_error() {
    let out = ballast(&[
        "plan",
        "--device",
        "lots",
        "--params",
        "1M",
        "--bytes-per-sample",
        "1MiB",
        "--global-batch",
        "8",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MEMORY:RELATIVE_SPEED"), "{err}");
}

/// Output into a closed pipe (`ballast doctor | head -0`) ends the process by SIGPIPE, as for
/// other command-line tools, without a panic message.
#[cfg(unix)]
#[test]
fn closed_stdout_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let child = {
        let _spawning = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
        let mut child = Command::new(env!("CARGO_BIN_EXE_ballast"))
            .arg("doctor")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        child
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?} {stderr}", out.status);
}

/// A CUDA build on a machine without the NVIDIA driver: `doctor` says there is no GPU (and the
/// ranks run on the CPU) instead of failing.
#[cfg(feature = "cuda")]
#[test]
fn doctor_of_a_cuda_build_says_no_gpu_without_a_driver() {
    if ballast::collectives::nccl::cuda_present() {
        println!("skipped: the NVIDIA driver is installed here");
        return;
    }
    let out = ballast(&["doctor", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cuda = v["cuda"].as_str().unwrap();
    assert!(cuda.starts_with("no GPU: libcuda.so"), "{cuda}");
    assert_eq!(v["devices"], serde_json::json!([]));
    let text = ballast(&["doctor"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("devices      no GPU: ranks run on CPU"));
}

/// A folder holding only `libnccl.so.2` (a stub built here with the system's C compiler, whose
/// `ncclGetVersion` answers 2.27.3), put on `LD_LIBRARY_PATH`: `ballast doctor` links it under
/// the name cudarc loads, relaunches itself and reports that NCCL, from that file. Without the
/// link cudarc would not load it (it tries `libnccl.so`, `.so.12`, `.so.11`, ..., never `.so.2`).
#[test]
fn doctor_finds_a_libnccl_installed_as_so_2_only() {
    if !cfg!(feature = "cuda") {
        println!("skipped: doctor_finds_a_libnccl_installed_as_so_2_only: built without the cuda feature");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("stub.c");
    std::fs::write(
        &source,
        "int ncclGetVersion(int *version) { *version = 22703; return 0; }\n",
    )
    .unwrap();
    let lib_dir = dir.path().join("lib");
    std::fs::create_dir(&lib_dir).unwrap();
    let lib = lib_dir.join("libnccl.so.2");
    // The suite's setup installs clang and g++; either builds the stub.
    let compiler = ["cc", "gcc", "clang"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("a C compiler (cc, gcc or clang) builds the stub; install gcc or clang");
    let status = Command::new(compiler)
        .args(["-shared", "-fPIC", "-Wl,-soname,libnccl.so.2", "-o"])
        .arg(&lib)
        .arg(&source)
        .status()
        .unwrap();
    assert!(status.success(), "cc failed to build the stub: {status}");
    let runtime_dir = dir.path().join("run");
    std::fs::create_dir(&runtime_dir).unwrap();
    let out = {
        let _spawning = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
        Command::new(env!("CARGO_BIN_EXE_ballast"))
            .arg("doctor")
            .env("LD_LIBRARY_PATH", &lib_dir)
            .env("XDG_RUNTIME_DIR", &runtime_dir)
            .env_remove("BALLAST_LIBS_RELAUNCHED")
            .output()
            .unwrap()
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().find(|l| l.starts_with("nccl ")).unwrap_or_default();
    assert!(
        line.contains("NCCL 2.27.3") && line.contains(&lib.display().to_string()),
        "doctor did not load the stub from {}: {stdout}",
        lib.display()
    );
    let links: Vec<_> = std::fs::read_dir(&runtime_dir).unwrap().flatten().collect();
    assert_eq!(links.len(), 1, "one private link folder: {links:?}");
    assert_eq!(std::fs::read_link(links[0].path().join("libnccl.so")).unwrap(), lib);
}

/// `ballast plan --precision`: the plan names its precision and counts bf16's bytes per
/// parameter (a 2-byte replica, its 4-byte f32 master, 4 bytes of f32 gradient sums, 8 of
/// Adam's f32 moments: 18, against f32's 16); with activations per sample halved, as measured
/// in bf16, the micro-batches of the memory-bound cards grow.
#[test]
fn plan_counts_the_precision() {
    let plan = |precision: &str, per_sample: &str| {
        let mut args = CLUSTER.to_vec();
        args[10] = per_sample;
        args.extend(["256", "--json", "--optimizer-sharding", "off", "--precision", precision]);
        let out = ballast(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (f32_plan, bf16_plan) = (plan("f32", "1500MiB"), plan("bf16", "750MiB"));
    assert_eq!(f32_plan["precision"], "f32");
    assert_eq!(bf16_plan["precision"], "bf16");
    assert_eq!(f32_plan["bytes_per_param"], 16);
    assert_eq!(bf16_plan["bytes_per_param"], 18);
    let fixed = |v: &serde_json::Value| v["reports"][0]["fixed_bytes"].as_u64().unwrap();
    assert_eq!(
        fixed(&bf16_plan) - fixed(&f32_plan),
        2 * 25_000_000,
        "2 more bytes per parameter"
    );
    let caps = |v: &serde_json::Value| -> Vec<u64> {
        v["plan"]["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["micro_batch"].as_u64().unwrap())
            .collect()
    };
    let (f32_caps, bf16_caps) = (caps(&f32_plan), caps(&bf16_plan));
    assert!(
        bf16_caps.iter().zip(&f32_caps).all(|(b, f)| b >= f) && bf16_caps[2] > f32_caps[2],
        "bf16 caps {bf16_caps:?} against f32's {f32_caps:?}"
    );
    let out = ballast(&[
        "plan",
        "--device",
        "8GiB:1",
        "--params",
        "1M",
        "--bytes-per-sample",
        "1MiB",
        "--global-batch",
        "8",
        "--precision",
        "fp8",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown precision \"fp8\"; use f32, bf16 or f16"));
}
