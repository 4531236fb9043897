//! The balancer under real MPI: memory budgets, online rebalancing of pinned ranks, and
//! out-of-memory recovery.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ballast-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `selftest balance` on 3 ranks (optionally through a pinning wrapper) and returns every
/// rank's record, indexed by rank.
fn run_balance(pin: Option<&[&str]>, args: &[&str], dir: &Path) -> Vec<Value> {
    let mut full: Vec<String> = Vec::new();
    let bin = env!("CARGO_BIN_EXE_ballast");
    let pin_script = concat!(env!("CARGO_MANIFEST_DIR"), "/../cluster/pin-by-rank.sh");
    let mut cmd = std::process::Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", "3"]);
    if let Some(cores) = pin {
        cmd.arg(pin_script).args(cores).arg("--");
        full.push("pinned".into());
    }
    cmd.arg(bin)
        .args(["selftest", "balance", "--out-dir"])
        .arg(dir)
        .args(args);
    let out = {
        let _one_at_a_time = common::serial();
        cmd.output().expect("mpirun")
    };
    assert!(out.status.success(), "{}", common::dump(&out));
    (0..3)
        .map(|r| {
            let text = std::fs::read_to_string(dir.join(format!("rank-{r}.json"))).unwrap();
            serde_json::from_str(&text).unwrap()
        })
        .collect()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

/// Budgets 3:2:1: every rank's measured peak stays within its budget and, at its chosen
/// micro-batch, uses at least 80 % of it.
#[test]
fn balance_memory_budgets_3_2_1() {
    let dir = out_dir("budgets");
    let ranks = run_balance(
        None,
        &[
            "--conv",
            "--width",
            "8",
            "--budgets",
            "24MiB,16MiB,8MiB",
            "--global-batch",
            "360",
            "--steps",
            "6",
        ],
        &dir,
    );
    let mut caps_seen = Vec::new();
    for (r, rank) in ranks.iter().enumerate() {
        let budget = u(&rank["budget"]);
        let mut checked = 0;
        for rec in rank["records"].as_array().unwrap() {
            let peak = u(&rec["peak_bytes"]);
            let cap = u(&rec["caps"][r]);
            assert!(
                peak <= budget,
                "rank {r} step {}: peak {peak} > budget {budget}",
                rec["step"]
            );
            let ran_cap = rec["micro_batches"].as_array().unwrap().iter().any(|m| u(m) == cap);
            if ran_cap {
                checked += 1;
                assert!(
                    peak as f64 >= 0.8 * budget as f64,
                    "rank {r} step {}: peak {peak} below 80% of {budget} at micro-batch {cap}",
                    rec["step"]
                );
            }
            println!(
                "rank {r} step {} micro-batch cap {cap}: peak {peak} = {:.3} of budget",
                rec["step"],
                peak as f64 / budget as f64
            );
        }
        assert!(checked >= 3, "rank {r} ran its cap in only {checked} steps");
        caps_seen.push(u(&rank["records"][0]["caps"][r]));
    }
    assert!(
        caps_seen[0] > caps_seen[1] && caps_seen[1] > caps_seen[2],
        "caps {caps_seen:?} must follow budgets"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rank 0 alone on core 0, ranks 1 and 2 sharing core 1 (rank 0 about twice as fast): from
/// equal shares, the plan reaches speed-proportional shares (within 10 %) in at most 10 steps
/// and then stays there.
#[test]
fn balance_rebalances_pinned_ranks() {
    let dir = out_dir("rebalance");
    let ranks = run_balance(
        Some(&["0", "1", "1"]),
        &[
            "--conv",
            "--width",
            "8",
            "--global-batch",
            "360",
            "--steps",
            "18",
            "--initial",
            "equal",
        ],
        &dir,
    );
    let records = ranks[0]["records"].as_array().unwrap();
    let last = records.last().unwrap();
    let speeds: Vec<f64> = last["speeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let total: f64 = speeds.iter().sum();
    assert!(
        speeds[0] > 1.5 * speeds[1] && speeds[0] > 1.5 * speeds[2],
        "pinning did not make rank 0 faster: {speeds:?}"
    );
    let within = |rec: &Value| {
        let shares: Vec<f64> = rec["shares"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let b: f64 = shares.iter().sum();
        shares.iter().zip(&speeds).all(|(s, v)| {
            let ideal = b * v / total;
            (s - ideal).abs() <= 0.10 * ideal
        })
    };
    let first = records
        .iter()
        .position(within)
        .expect("never reached speed-proportional shares");
    for rec in records {
        println!("step {} shares {} speeds {}", rec["step"], rec["shares"], rec["speeds"]);
    }
    assert!(first <= 10, "took {first} steps");
    let after: Vec<&Value> = records[first..].iter().collect();
    assert!(
        after.iter().all(|r| within(r)),
        "left the speed-proportional band after step {first}"
    );
    let changes = after.iter().filter(|r| r["plan_changed"].as_bool().unwrap()).count();
    assert!(
        changes <= 1,
        "the plan kept changing after convergence ({changes} changes)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rank 1's first micro-batch of step 3 fails once as out of memory: the step completes with
/// every sample, the cap halves on every rank's plan, and the final parameters equal the clean
/// run's (within f32 summation-order noise: the micro-batches differ).
#[test]
fn balance_oom_injection_recovers() {
    let common_args = [
        "--conv",
        "--width",
        "8",
        "--global-batch",
        "240",
        "--steps",
        "8",
        "--initial",
        "equal",
        "--no-rebalance",
    ];
    let clean_dir = out_dir("oom-clean");
    let fault_dir = out_dir("oom-fault");
    let clean = run_balance(None, &common_args, &clean_dir);
    let mut args = common_args.to_vec();
    args.extend(["--inject-oom", "1:3"]);
    let fault = run_balance(None, &args, &fault_dir);
    let rec = |run: &[Value], r: usize, s: usize| run[r]["records"][s].clone();
    assert_eq!(u(&rec(&fault, 1, 3)["oom_retries"]), 1);
    assert!(rec(&fault, 1, 3)["plan_changed"].as_bool().unwrap());
    let cap_before = u(&rec(&fault, 0, 3)["caps"][1]);
    assert_eq!(
        u(&rec(&fault, 0, 4)["caps"][1]),
        cap_before / 2,
        "every rank's plan halves rank 1's cap"
    );
    for s in 0..8 {
        assert_eq!(
            rec(&fault, 0, s)["global_samples"],
            rec(&clean, 0, s)["global_samples"],
            "step {s} lost or repeated samples"
        );
    }
    let params = |run: &[Value]| -> Vec<f64> {
        run[0]["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (a, b) = (params(&clean), params(&fault));
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    println!("relative parameter difference after recovery: {:.3e}", diff / norm);
    assert!(diff / norm <= 1e-6, "{}", diff / norm);
    for run in [&clean, &fault] {
        let sums: Vec<&Value> = run.iter().map(|r| &r["params_checksum"]).collect();
        assert!(sums.iter().all(|c| *c == sums[0]), "replicas differ: {sums:?}");
    }
    let _ = std::fs::remove_dir_all(&clean_dir);
    let _ = std::fs::remove_dir_all(&fault_dir);
}
