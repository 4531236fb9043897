//! The data plane's traffic: what a step copies between a rank's device and its host.
//!
//! Gradients are summed on the device; a host communicator reads each bucket back once per step
//! and writes the sum back once, however many micro-batches ran. The bytes are counted where
//! `DataParallel` makes the copies ([`ballast::ddp::Traffic`]), and compared here with what the
//! model's size says they must be.

use ballast::{
    collectives::{local, CommOptions},
    ddp::Traffic,
    testing::{run_ddp, Case, ModelKind, OptimKind, Regressor, TAIL_VALUES_PER_RANK},
};
use burn::tensor::Device;

/// Bytes of the fused buffer: every parameter, the loss sum, the shards' squared norm (0 here),
/// the sample count and the values of every rank.
fn fused_bytes<M: Regressor>(world: usize) -> u64 {
    let params = burn::module::Module::num_params(&M::init(&Device::flex()));
    ((params + 3 + TAIL_VALUES_PER_RANK * world) * 4) as u64
}

/// Each rank's traffic per step, for `case` on `world` ranks as threads.
fn traffic(case: &Case, world: usize) -> Vec<Vec<Traffic>> {
    local::run(world, CommOptions::default(), |comm| {
        run_ddp(Box::new(comm), case)
            .map(|(o, _)| o.traffic)
            .map_err(|e| e.to_string())
    })
    .into_iter()
    .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
    .collect()
}

#[test]
fn a_step_reads_the_fused_buffer_once_whatever_the_micro_batches() {
    type FusedBytes = fn(usize) -> u64;
    let models: [(ModelKind, FusedBytes); 2] = [
        (ModelKind::Mlp, fused_bytes::<ballast::testing::Mlp>),
        (ModelKind::Conv, fused_bytes::<ballast::testing::ConvNet>),
    ];
    for (model, fused) in models {
        for world in [1usize, 3] {
            let shares = vec![8; world];
            // One, four and eight micro-batches of the same share.
            for cap in [8usize, 2, 1] {
                let mut case = Case::new(model, OptimKind::Sgd, &shares, &vec![cap; world]);
                case.steps = 3;
                let expected = fused(world);
                for (rank, steps) in traffic(&case, world).iter().enumerate() {
                    for (step, t) in steps.iter().enumerate() {
                        let label = format!("{model:?}, {world} ranks, cap {cap}, rank {rank}, step {step}");
                        assert_eq!(t.to_host, expected, "{label}: device→host bytes");
                        // The sums written back, and the rank's own values uploaded once.
                        assert_eq!(
                            t.to_device,
                            expected + ((1 + TAIL_VALUES_PER_RANK * world) * 4) as u64,
                            "{label}: host→device bytes"
                        );
                    }
                }
                println!(
                    "{model:?}, {world} rank(s), {} micro-batches per step: {expected} bytes device→host per step",
                    8 / cap
                );
            }
        }
    }
}

/// A rank whose share is 0 runs no micro-batch and still reads its (zero) buckets once.
#[test]
fn a_rank_without_samples_moves_the_same_bytes() {
    let mut case = Case::new(ModelKind::Mlp, OptimKind::Adam, &[5, 0, 3], &[2, 1, 3]);
    case.steps = 2;
    let expected = fused_bytes::<ballast::testing::Mlp>(3);
    for steps in traffic(&case, 3) {
        assert!(steps.iter().all(|t| t.to_host == expected), "{steps:?}");
    }
}
