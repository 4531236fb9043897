//! The conformance checks on the thread backend with 2, 3 and 4 ranks. The same checks run
//! under `mpirun` in `runtime/tests/mpi_collectives.rs`.

use ballast_collectives::{conformance, local, CommOptions};

macro_rules! local_cases {
    ($($name:ident: $ranks:expr,)*) => {$(
        mod $name {
            use super::*;

            #[test]
            fn every_collective_is_exact() {
                let results = local::run($ranks, CommOptions::default(), |mut comm| conformance::check_all(&mut comm));
                for (rank, r) in results.into_iter().enumerate() {
                    let passed = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                    assert!(passed.len() >= 7, "rank {rank} ran only {passed:?}");
                }
            }

            #[test]
            fn wrong_length_is_an_error_on_every_rank() {
                let results = local::run($ranks, conformance::short_timeout_options(), |mut comm| {
                    conformance::check_wrong_length(&mut comm)
                });
                for (rank, r) in results.into_iter().enumerate() {
                    let msg = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                    assert!(msg.contains("buffer lengths differ"), "{msg}");
                }
            }

            #[test]
            fn different_shard_counts_are_an_error_on_every_rank() {
                let results = local::run($ranks, conformance::short_timeout_options(), |mut comm| {
                    conformance::check_counts_mismatch(&mut comm)
                });
                for (rank, r) in results.into_iter().enumerate() {
                    let msg = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                    assert!(msg.contains("passed other shard counts than this rank"), "{msg}");
                }
            }

            #[test]
            fn a_raised_timeout_lets_a_late_rank_join() {
                let results = local::run($ranks, conformance::short_timeout_options(), |mut comm| {
                    conformance::check_longer_deadline(&mut comm)
                });
                for (rank, r) in results.into_iter().enumerate() {
                    let msg = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                    assert!(msg.contains("raised to"), "{msg}");
                }
            }

            #[test]
            fn missing_rank_is_named_in_a_timeout() {
                let missing = $ranks - 1;
                let results = local::run($ranks, conformance::short_timeout_options(), |mut comm| {
                    conformance::check_missing_rank(&mut comm, missing)
                });
                for (rank, r) in results.into_iter().enumerate() {
                    let msg = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                    if rank != missing {
                        assert!(msg.contains(&format!("rank(s) [{missing}] never arrived")), "{msg}");
                    }
                }
            }
        }
    )*};
}

local_cases! {
    two_ranks: 2,
    three_ranks: 3,
    four_ranks: 4,
}

/// Ranks that call different collectives at the same position get an order error, not a hang.
#[test]
fn different_call_order_is_an_error() {
    use ballast_collectives::{Communicator, Error};
    let results = local::run(2, conformance::short_timeout_options(), |mut comm| {
        if comm.rank() == 0 {
            comm.barrier()
        } else {
            comm.all_reduce_sum_f32(&mut [1.0])
        }
    });
    for r in results {
        assert!(matches!(r, Err(Error::OrderMismatch { .. })), "{r:?}");
    }
}

/// Shard counts that do not fit the buffers are refused on the rank that passed them, with
/// what is wrong, before any data moves.
#[test]
fn shard_counts_that_do_not_fit_are_clear_errors() {
    use ballast_collectives::Communicator;
    let mut comm = local::world(1, CommOptions::default()).pop().unwrap();
    let buf = [1.0f32; 4];
    let mut shard = [0.0f32; 4];
    let cases: [(&[usize], &str); 3] = [
        (&[2, 2], "2 counts for a world of 1"),
        (&[3], "the counts sum to 3 but the full buffer has 4"),
        (&[4], ""),
    ];
    for (counts, want) in cases {
        let mut fresh = local::world(1, CommOptions::default()).pop().unwrap();
        let result = fresh.reduce_scatter_sum_f32(&buf, counts, &mut shard);
        if want.is_empty() {
            result.unwrap();
        } else {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }
    let err = comm
        .all_gather_f32(&[1.0; 3], &[4], &mut [0.0; 4])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("this rank's count is 4 but its shard has 3 elements"),
        "{err}"
    );
}
