//! Data-parallel training with unequal shares equals one device on the whole batch.
//!
//! Run with `cargo test --release -p ballast --features mpi equivalence`.

mod common;

use ballast::{
    collectives::{local, CommOptions, Communicator},
    testing::{three_rank_cases, Mlp, Regressor},
    DataParallel, DdpOptions, Error,
};
use burn::tensor::Device;

fn assert_report(lines: &[String]) {
    let rank0: Vec<&String> = lines.iter().filter(|l| l.starts_with("equivalence rank 0 ")).collect();
    assert_eq!(rank0.len(), three_rank_cases().len(), "{lines:#?}");
    for line in lines {
        assert!(
            line.ends_with("OK") || line.ends_with("OK (differs, as expected)"),
            "{line}"
        );
        if line.contains("BySamples") && line.starts_with("equivalence rank 0 ") {
            assert!(line.contains("collectives_per_step Some(1)"), "{line}");
        }
    }
    // The unweighted counter-examples must be among the lines, and must fail the tolerance.
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.ends_with("OK (differs, as expected)"))
            .count(),
        2,
        "{lines:#?}"
    );
}

#[test]
fn equivalence_on_threads() {
    assert_report(&common::equivalence_on_threads(3, &three_rank_cases()));
}

#[cfg(feature = "mpi")]
#[test]
fn equivalence_under_mpirun() {
    assert_report(&common::equivalence_under_mpirun(
        "equivalence",
        three_rank_cases().len(),
    ));
}

/// Ranks that build different models are refused at wrap time, on every rank.
#[test]
fn equivalence_refuses_mismatched_models() {
    use ballast::testing::ConvNet;
    let results = local::run(2, CommOptions::default(), |comm| {
        let device = Device::flex().autodiff();
        let outcome = if comm.rank() == 0 {
            DataParallel::wrap(Box::new(comm), Mlp::init(&device), DdpOptions::default()).map(drop)
        } else {
            DataParallel::wrap(Box::new(comm), ConvNet::init(&device), DdpOptions::default()).map(drop)
        };
        outcome
            .err()
            .map(|e| (matches!(e, Error::ModelMismatch { .. }), e.to_string()))
    });
    for r in results {
        let (is_mismatch, msg) = r.expect("wrap must fail");
        assert!(is_mismatch, "{msg}");
        assert!(msg.contains("rank 1 holds a different model than rank 0"), "{msg}");
        assert!(msg.contains("l1.weight"), "{msg}");
    }
}

/// A replica that drifts is caught by the checksum comparison.
#[test]
fn equivalence_detects_diverged_replicas() {
    let results = local::run(2, CommOptions::default(), |comm| {
        let device = Device::flex().autodiff();
        let rank = comm.rank() == 0;
        let (mut ddp, model) = DataParallel::wrap(Box::new(comm), Mlp::init(&device), DdpOptions::default()).unwrap();
        let model = if rank {
            model
        } else {
            let mut flat = ballast::params::flatten_params(&model);
            flat[0] += 1e-3;
            ballast::params::load_params(model, &flat)
        };
        ddp.verify_replicas(&model).err().map(|e| e.to_string())
    });
    for r in results {
        assert!(r.expect("must diverge").contains("replicas diverged"));
    }
}
