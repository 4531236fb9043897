//! The conformance checks under real MPI, one process per rank, 2 to 4 ranks (oversubscribed on
//! small machines). The same checks run on threads in `collectives/tests/local_collectives.rs`.
#![cfg(feature = "mpi")]

mod common;

use common::{dump, lines_with, mpirun, selftest};

fn every_rank_ok(ranks: usize, check: &str, envs: &[(&str, &str)]) -> Vec<String> {
    let out = selftest(ranks, &[check], envs);
    let lines = lines_with(&out, "selftest rank");
    assert!(out.status.success(), "{}", dump(&out));
    assert_eq!(lines.len(), ranks, "one line per rank expected\n{}", dump(&out));
    for line in &lines {
        assert!(line.contains(&format!("/{ranks} mpi: OK")), "{line}\n{}", dump(&out));
    }
    lines
}

macro_rules! mpi_cases {
    ($($name:ident: $ranks:expr,)*) => {$(
        mod $name {
            use super::*;

            #[test]
            fn every_collective_is_exact() {
                for line in every_rank_ok($ranks, "collectives", &[]) {
                    assert!(line.contains("lengths [0, 1, 7, 1000003], cap 1048576 B, 4 buckets"), "{line}");
                    assert!(line.contains("reduce_scatter_sum_f32 and all_gather_f32"), "{line}");
                }
            }

            #[test]
            fn wrong_length_is_an_error_on_every_rank() {
                let want = format!("sees lengths {:?}", {
                    let mut v = vec![10; $ranks];
                    v[$ranks - 1] = 11;
                    v
                });
                for line in every_rank_ok($ranks, "wrong-length", &[]) {
                    assert!(line.contains(&want), "{line}");
                }
            }

            #[test]
            fn different_shard_counts_are_an_error_on_every_rank() {
                for line in every_rank_ok($ranks, "counts-mismatch", &[]) {
                    assert!(line.contains("passed other shard counts than this rank"), "{line}");
                }
            }

            #[test]
            fn a_raised_timeout_lets_a_late_rank_join() {
                for line in every_rank_ok($ranks, "longer-deadline", &[("BALLAST_TIMEOUT_SECS", "1")]) {
                    assert!(line.contains("raised to 4s"), "{line}");
                }
            }

            #[test]
            fn missing_rank_is_named_in_a_timeout() {
                let lines = every_rank_ok($ranks, "missing-rank", &[("BALLAST_TIMEOUT_SECS", "1.5")]);
                let missing = $ranks - 1;
                for line in &lines {
                    if line.starts_with(&format!("selftest rank {missing}/")) {
                        assert!(line.ends_with("OK skipped"), "{line}");
                    } else {
                        assert!(line.contains(&format!("rank(s) [{missing}] never arrived")), "{line}");
                        assert!(line.contains("timed out after 1.5s"), "{line}");
                    }
                }
            }
        }
    )*};
}

mpi_cases! {
    two_ranks: 2,
    three_ranks: 3,
    four_ranks: 4,
}

/// A binary started by a launcher but used without a world that matches fails cleanly: the
/// allreduce benchmark refuses to run outside mpirun.
#[test]
fn bench_outside_mpirun_is_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["bench", "allreduce", "--json"])
        .env_remove("OMPI_COMM_WORLD_RANK")
        .env_remove("PMI_RANK")
        .env_remove("SLURM_PROCID")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", dump(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("run this under a launcher"),
        "{}",
        dump(&out)
    );
}

/// The benchmark runs end to end on a small sweep and its last line is the JSON summary of the
/// path `DataParallel` takes: the message in buckets, one collective per iteration.
#[test]
fn bench_allreduce_prints_a_json_summary_last() {
    let out = mpirun(
        2,
        &[
            "bench",
            "allreduce",
            "--json",
            "--max-bytes",
            "65536",
            "--summary-iters",
            "3",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", dump(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("some output");
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    assert_eq!(v["summary"], true);
    // DataParallel's path: 100 MiB in four 25 MiB buckets, reduced in one collective per
    // iteration (as the communicator counted them).
    assert_eq!(v["buckets"], 4, "{last}");
    assert_eq!(v["collectives_per_iter"], 1.0, "{last}");
    assert_eq!(
        stdout.lines().count(),
        5,
        "4 sizes from 1 KiB to 64 KiB (x4 steps), then the summary:\n{stdout}"
    );
}

/// The handshake's cost is counted, not assumed: the busiest rank of the tree handshake sends and
/// receives 2 messages per round plus 2 where n is not a power of two (at most 2·⌈log2 n⌉ + 2),
/// the all-to-all exchange 2·(n − 1).
#[test]
fn bench_handshake_counts_messages_per_rank() {
    for (ranks, tree, all_to_all) in [(3usize, 4.0, 4.0), (4, 4.0, 6.0), (5, 6.0, 8.0)] {
        let out = mpirun(
            ranks,
            &["bench", "handshake", "--json", "--iters", "5", "--rounds", "2"],
            &[],
        );
        assert!(out.status.success(), "{}", dump(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().expect("some output");
        let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
        println!("{ranks} ranks: {last}");
        assert_eq!(v["ranks"], ranks, "{last}");
        assert_eq!(v["tree"]["messages_per_rank"].as_f64(), Some(tree), "{last}");
        assert_eq!(
            v["all_to_all"]["messages_per_rank"].as_f64(),
            Some(all_to_all),
            "{last}"
        );
        assert!(tree <= v["target_messages_per_rank"].as_f64().unwrap(), "{last}");
        assert!(v["latency_ratio_vs_old"].as_f64().unwrap() > 0.0, "{last}");
    }
}
