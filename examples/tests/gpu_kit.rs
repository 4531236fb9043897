//! The GPU kit on a machine without a GPU: every check of `gpu-check` and the runner
//! `scripts/gpu-kit.sh run` report "no GPU" as JSON and succeed, which proves the error paths,
//! the runner and its library lookup. On a machine with a GPU these tests say they were skipped
//! (the kit is run there instead).

#[cfg(all(feature = "cuda", feature = "testkit"))]
mod kit {
    use std::{path::Path, process::Command};

    use serde_json::Value;

    const CHECKS: [&str; 11] = [
        "doctor",
        "canary",
        "nccl",
        "probes",
        "equivalence",
        "hetero",
        "sharded",
        "resnet",
        "managed",
        "oom",
        "precision",
    ];

    fn gpu_here() -> bool {
        ballast::collectives::nccl::inventory().is_ok_and(|i| !i.devices.is_empty())
    }

    fn json_lines(stdout: &[u8]) -> Vec<Value> {
        String::from_utf8_lossy(stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    #[test]
    fn every_check_reports_no_gpu_as_json() {
        if gpu_here() {
            println!("skipped: a GPU is present here; run scripts/gpu-kit.sh run instead");
            return;
        }
        for check in CHECKS {
            let out = Command::new(env!("CARGO_BIN_EXE_gpu-check"))
                .arg(check)
                .output()
                .unwrap();
            let lines = json_lines(&out.stdout);
            assert!(out.status.success(), "{check}: {}", super::common::text(&out));
            assert_eq!(lines.len(), 1, "{check}: {}", super::common::text(&out));
            let line = &lines[0];
            println!("{line}");
            assert_eq!(line["check"], check);
            assert_eq!(line["status"], "no GPU", "{line}");
            assert!(
                line["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("libcuda.so") || r.contains("driver")),
                "{line}"
            );
        }
    }

    #[test]
    fn runner_runs_every_check_and_sums_them_up() {
        if gpu_here() {
            println!("skipped: a GPU is present here; run scripts/gpu-kit.sh run instead");
            return;
        }
        // Compressing the binary takes both cores: not beside a training job of another test.
        let _alone = super::common::one_job();
        let kit = tempfile::tempdir().unwrap();
        let packed = std::fs::File::create(kit.path().join("gpu-check.xz")).unwrap();
        let xz = Command::new("xz")
            .args(["-0", "-T0", "-c", env!("CARGO_BIN_EXE_gpu-check")])
            .stdout(packed)
            .status()
            .unwrap();
        assert!(xz.success());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let started = std::time::Instant::now();
        let out = Command::new(root.join("scripts/gpu-kit.sh"))
            .arg("run")
            .env("GPU_KIT_DIR", kit.path())
            .output()
            .unwrap();
        println!("gpu-kit.sh run took {:.1}s", started.elapsed().as_secs_f64());
        assert!(out.status.success(), "{}", super::common::text(&out));
        let lines = json_lines(&out.stdout);
        for l in &lines {
            println!("{l}");
        }
        assert!(lines[0]["library_dirs"].is_array(), "{}", lines[0]);
        let checks: Vec<&str> = lines[1..lines.len() - 1]
            .iter()
            .map(|l| l["check"].as_str().unwrap())
            .collect();
        assert_eq!(checks, CHECKS);
        assert!(lines[1..lines.len() - 1].iter().all(|l| l["status"] == "no GPU"));
        let summary = &lines[lines.len() - 1];
        assert_eq!(summary["kit"], "summary");
        assert_eq!(summary["no_gpu"], CHECKS.len());
        assert_eq!(summary["failed"], 0);
    }

    /// A kit folder without the binary is a clear error with its own exit code.
    #[test]
    fn runner_without_a_kit_says_how_to_build_one() {
        let empty = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(root.join("scripts/gpu-kit.sh"))
            .arg("run")
            .env("GPU_KIT_DIR", empty.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", super::common::text(&out));
        let lines = json_lines(&out.stdout);
        assert_eq!(lines[0]["status"], "missing");
        assert!(lines[0]["fix"].as_str().unwrap().contains("gpu-kit.sh build"));
    }
}

#[cfg(all(feature = "cuda", feature = "testkit"))]
mod common;

#[cfg(not(all(feature = "cuda", feature = "testkit")))]
#[test]
fn gpu_kit_tests_need_cuda_and_testkit() {
    println!("skipped: the GPU kit tests need ballast-examples built with `--features cuda,testkit`");
}
