//! Adam with its state sharded unevenly over the ranks equals one device on the whole batch.
//!
//! Run with `cargo test --release -p ballast --features mpi,cli,testkit sharded`.

mod common;

use ballast::{
    collectives::{conformance, local, CommOptions},
    optim::{shard_counts, HostAdamConfig, ShardPlace, ShardedAdam},
    testing::{run_ddp, sharded_cases, Case, Mlp, ModelKind, OptimKind, Regressor},
    DataParallel, DdpOptions, Error,
};
use burn::tensor::Device;

/// Every case passes within 1e-5 of burn's Adam on one device, with three collectives per step,
/// and the replicas are identical.
fn assert_sharded_report(lines: &[String]) {
    let rank0: Vec<&String> = lines.iter().filter(|l| l.starts_with("equivalence rank 0 ")).collect();
    assert_eq!(rank0.len(), sharded_cases().len(), "{lines:#?}");
    for line in lines {
        assert!(line.ends_with("OK"), "{line}");
        assert!(line.contains("/sharded ["), "{line}");
        assert!(line.contains("replicas identical"), "{line}");
    }
    for line in rank0 {
        assert!(line.contains("tol 1e-5"), "{line}");
        assert!(line.contains("collectives_per_step Some(3)"), "{line}");
    }
}

#[test]
fn sharded_adam_on_threads_equals_one_device() {
    assert_sharded_report(&common::equivalence_on_threads(3, &sharded_cases()));
}

#[cfg(feature = "mpi")]
#[test]
fn sharded_adam_under_mpirun_equals_one_device() {
    assert_sharded_report(&common::equivalence_under_mpirun("sharded", sharded_cases().len()));
}

/// On threads every sum is taken in rank order, so sharding changes nothing but where each
/// update is computed: the sharded run ends bit for bit where the replicated host Adam does,
/// with every shard on the host and with every shard on its device (the device update follows
/// the host Adam's order of operations).
#[test]
fn sharded_state_ends_where_replicated_state_does_bit_for_bit() {
    let run = |case: &Case| {
        local::run(3, CommOptions::default(), |comm| {
            run_ddp(Box::new(comm), case).map(|(o, _)| o).map_err(|e| e.to_string())
        })
        .into_iter()
        .next()
        .unwrap()
        .unwrap()
    };
    for model in [ModelKind::Mlp, ModelKind::Conv] {
        let mut replicated = Case::new(model, OptimKind::Adam, &[5, 2, 1], &[3, 2, 1]);
        replicated.weight_decay = 0.01;
        replicated.offload = true;
        replicated.init_seed = Some(11);
        let a = run(&replicated);
        for host_shards in [vec![0, 1, 2], vec![]] {
            let mut sharded = replicated.clone();
            sharded.offload = false;
            sharded.shards = vec![6.0, 3.0, 1.0];
            sharded.host_shards = host_shards.clone();
            let b = run(&sharded);
            assert_eq!(a.initial, b.initial);
            assert_eq!(a.params, b.params, "{model:?}, host shards {host_shards:?}");
            assert_eq!(a.losses, b.losses, "{model:?}, host shards {host_shards:?}");
            assert!(b.collectives.iter().all(|&c| c == 3), "{:?}", b.collectives);
        }
    }
}

/// Shards that do not cover the model, or were made for another rank, are refused with what
/// does not fit, before any collective runs.
#[test]
fn sharded_layouts_that_do_not_fit_are_clear_errors() {
    let device = Device::flex().autodiff();
    let model = Mlp::init(&device);
    let n = ballast::params::flatten_params(&model).len();
    let err = ShardedAdam::new(&model, 0, vec![n - 1, 0], HostAdamConfig::default(), ShardPlace::Device).unwrap_err();
    assert!(matches!(err, Error::Shards { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!(
            "2 shards of {} parameters in all for rank 0 of a model with {n}",
            n - 1
        )),
        "{err}"
    );
    // Rank 0 goes on to the step's collectives, where it learns at once that rank 1 has left.
    let results = local::run(2, conformance::short_timeout_options(), |comm| {
        let device = Device::flex().autodiff();
        let (mut ddp, model) = DataParallel::wrap(Box::new(comm), Mlp::init(&device), DdpOptions::default()).unwrap();
        let counts = shard_counts(ddp.param_count(), &[1.0, 1.0]).unwrap();
        // Both ranks build rank 0's shard: rank 1's is refused before its first collective.
        let mut shard = ShardedAdam::new(&model, 0, counts, HostAdamConfig::default(), ShardPlace::Device).unwrap();
        let before = ddp.comm().collectives_started();
        let outcome = ddp.step(model, &mut shard, 1e-3).map(drop);
        (ddp.comm().rank(), before, outcome)
    });
    for (rank, before, outcome) in results {
        assert!(before > 0, "wrap ran collectives");
        let err = outcome.unwrap_err().to_string();
        if rank == 1 {
            assert!(err.contains("made for rank 0, on rank 1"), "{err}");
        } else {
            assert!(
                err.contains("rank(s) [1] left the group without joining it (it returned)"),
                "{err}"
            );
        }
    }
}

/// `ballast bench sharded` runs end to end under `mpirun -np 3` and ends with its JSON summary:
/// uneven shards covering the model, one collective per replicated step and three per sharded
/// step, and the bytes the collectives carried per step, counted where they were called: the
/// reduce-scatter and all-gather carry what the all-reduce does (timings are the benchmark's
/// to report, not this test's).
#[cfg(feature = "mpi")]
#[test]
fn bench_sharded_prints_a_json_summary_last() {
    let out = common::mpirun(
        3,
        &[
            "bench",
            "sharded",
            "--json",
            "--width",
            "256",
            "--blocks",
            "2",
            "--steps-per-block",
            "2",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", common::dump(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("some output");
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    assert_eq!(v["summary"], true, "{last}");
    let shards: Vec<u64> = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(shards.iter().sum::<u64>(), v["params"].as_u64().unwrap(), "{last}");
    assert!(shards[0] > shards[2], "budgets 48/32/24 MiB give uneven shards: {last}");
    assert_eq!(v["replicated_collectives_per_step"], 1.0, "{last}");
    assert_eq!(v["sharded_collectives_per_step"], 3.0, "{last}");
    let ratio = v["wire_bytes_ratio"].as_f64().unwrap();
    assert!((0.95..=1.05).contains(&ratio), "{last}");
    assert!(v["sharded_vs_replicated"].as_f64().unwrap() > 0.0, "{last}");
    assert_eq!(
        stdout.lines().count(),
        5,
        "2 rounds of 2 blocks, then the summary:\n{stdout}"
    );
}

/// Every rank counts the steps, an empty shard's included (rank 0's count is the one a
/// checkpoint saves), on the device and on the host.
#[test]
fn an_empty_shard_counts_its_steps() {
    for place in [ShardPlace::Device, ShardPlace::Host] {
        let counts = local::run(2, CommOptions::default(), |comm| {
            let device = Device::flex().autodiff();
            let (mut ddp, mut model) =
                DataParallel::wrap(Box::new(comm), Mlp::init(&device), DdpOptions::default()).unwrap();
            let n = ddp.param_count();
            let rank = ddp.rank();
            let mut shard = ShardedAdam::new(&model, rank, vec![0, n], HostAdamConfig::default(), place).unwrap();
            for _ in 0..3 {
                let (x, y) = ballast::testing::SyntheticSet::new(8, 1).batch(&[0, 1, 2, 3], &device);
                let loss = burn::nn::loss::MseLoss::new().forward(model.forward(x), y, burn::nn::loss::Reduction::Mean);
                ddp.backward(&model, loss, 4).unwrap();
                model = ddp.step(model, &mut shard, 1e-3).unwrap().0;
            }
            (shard.len(), shard.steps())
        });
        assert_eq!(
            counts,
            vec![
                (0, 3),
                (ballast::params::flatten_params(&Mlp::init(&Device::flex())).len(), 3)
            ],
            "{place:?}"
        );
    }
}
