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

/// A rank whose thread panics is named by the ranks waiting for it at once, even under a
/// deadline raised to minutes as the sequential probes raise it, and its panic comes back as its
/// result instead of unwinding through the caller.
#[test]
fn a_panicking_rank_is_named_at_once_under_a_raised_deadline() {
    use ballast_collectives::{Communicator, Error};
    let long = std::time::Duration::from_secs(600);
    let results = local::run_watched(
        3,
        CommOptions::default(),
        long,
        |stuck| panic!("ranks {:?} were called stuck", stuck.ranks),
        |mut comm| {
            comm.set_timeout(long);
            comm.barrier()?;
            if comm.rank() == 2 {
                panic!("rank 2 fails while the others wait");
            }
            comm.barrier()
        },
    );
    // The ranks are named as having left (a timeout would be `Error::Timeout`, ten minutes on).
    for (rank, result) in results.iter().enumerate().take(2) {
        match result {
            Ok(Err(Error::RankLeft { left, how, .. })) => {
                assert_eq!(
                    (left.as_slice(), *how),
                    (&[2][..], "its thread panicked"),
                    "rank {rank}"
                );
            }
            other => panic!("rank {rank}: expected RankLeft naming rank 2, got {other:?}"),
        }
    }
    let panic = results[2].as_ref().expect_err("rank 2 panicked");
    assert_eq!(
        panic.downcast_ref::<&str>(),
        Some(&"rank 2 fails while the others wait")
    );
}

/// A rank that returns without joining a collective the others entered is named as having
/// returned, and the others' communicators are poisoned from then on.
#[test]
fn a_rank_that_returns_early_is_named() {
    use ballast_collectives::{Communicator, Error};
    let results = local::run(
        2,
        CommOptions::default().with_timeout(std::time::Duration::from_secs(600)),
        |mut comm| {
            if comm.rank() == 1 {
                return Ok(());
            }
            let first = comm.all_reduce_sum_f32(&mut [1.0]);
            assert!(matches!(comm.barrier(), Err(Error::Poisoned { .. })));
            first
        },
    );
    match &results[0] {
        Err(e @ Error::RankLeft { left, how, .. }) => {
            assert_eq!((left.as_slice(), *how), (&[1][..], "it returned"));
            assert!(e.to_string().contains("rank(s) [1] left the group"), "{e}");
            assert!(e.is_consequence() && e.may_pass_on_restart());
        }
        other => panic!("expected RankLeft, got {other:?}"),
    }
}

/// A rank stuck outside the collectives: the others time out naming it, and `grace` later the
/// watcher hands the stuck rank and the others' results over (here it panics; a job ends the
/// process) instead of waiting for a thread that does not end. Rank 1 blocks until the
/// hand-over releases it, so the hand-over cannot wait for it.
#[test]
fn a_stuck_rank_is_handed_over_after_the_grace() {
    use ballast_collectives::Communicator;
    use std::{
        sync::{mpsc, Mutex},
        time::Duration,
    };
    // The stuck ranks and the others' errors.
    type Handover = (Vec<usize>, Vec<String>);
    let seen: Mutex<Option<Handover>> = Mutex::new(None);
    let (release, stuck_until) = mpsc::channel::<()>();
    let stuck_until = Mutex::new(stuck_until);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        local::run_watched(
            3,
            CommOptions::default().with_timeout(Duration::from_millis(500)),
            Duration::from_millis(500),
            |stuck| {
                let errors = stuck
                    .ended
                    .iter()
                    .map(|(rank, r)| match r {
                        Ok(Err(e)) => format!("{rank}: {e}"),
                        _ => format!("{rank}: no error"),
                    })
                    .collect();
                *seen.lock().unwrap() = Some((stuck.ranks, errors));
                release.send(()).unwrap();
                panic!("handed over")
            },
            |mut comm| {
                if comm.rank() == 1 {
                    let _ = stuck_until.lock().unwrap().recv();
                    return Ok(());
                }
                comm.barrier()
            },
        )
    }));
    assert!(outcome.is_err(), "the watcher must hand the stuck rank over");
    let (ranks, errors) = seen.lock().unwrap().take().expect("the stuck ranks were handed over");
    assert_eq!(ranks, vec![1]);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors.iter().all(|e| e.contains("rank(s) [1] never arrived")),
        "{errors:?}"
    );
}
