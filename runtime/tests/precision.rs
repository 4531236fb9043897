//! Mixed precision: replicas that compute in bf16, with f32 gradient sums, master parameters
//! and Adam state, against one device running the same recipe on the whole batch.
//!
//! The bound. On one rank with the whole batch as one micro-batch, ballast's step performs the
//! recipe's operations in the recipe's order, so it must equal the recipe bit for bit (replica,
//! f32 master and losses). On unequal ranks the batch is cut into other micro-batches, and bf16
//! rounds each micro-batch's forward and backward: the results differ the way the recipe
//! itself differs from a run of it in other micro-batches on one device (`micro_batch_spread`:
//! micro-batches of 1 and of 3). The 3-rank run is held to twice that spread. The spread is
//! printed with every result.
//!
//! Run with `cargo test --release -p ballast --features testkit,mpi,cli --test precision`.

mod common;

use ballast::{
    collectives::{local, CommOptions, Communicator},
    optim::{shard_counts, HostAdamConfig, ShardPlace, ShardedAdam},
    testing::{precision_cases, relative_difference, run_ddp, run_reference, Mlp, Regressor, SyntheticSet},
    DataParallel, DdpOptions, Error, Precision,
};
use burn::{
    module::{Module, ModuleVisitor, Param},
    nn::loss::{MseLoss, Reduction},
    optim::GradientsParams,
    tensor::{DType, Device, FloatDType, Tensor},
};

/// Back-propagates one bf16 micro-batch of 4 samples into `ddp`'s sums.
fn one_micro_batch(ddp: &mut DataParallel, model: &Mlp, device: &Device) -> Result<(), Error> {
    let (x, y) = SyntheticSet::new(8, 1).batch(&[0, 1, 2, 3], device);
    let out = model.forward(x.cast(FloatDType::BF16));
    let loss = MseLoss::new().forward(out, y.cast(FloatDType::BF16), Reduction::Mean);
    ddp.backward(model, loss, 4)
}

fn assert_report(lines: &[String]) {
    let rank0: Vec<&String> = lines.iter().filter(|l| l.starts_with("equivalence rank 0 ")).collect();
    assert_eq!(rank0.len(), precision_cases().len(), "{lines:#?}");
    for line in lines {
        assert!(line.ends_with(" OK"), "{line}");
        assert!(line.contains("replicas identical"), "{line}");
    }
}

#[test]
fn bf16_one_rank_whole_batch_is_the_recipe_bit_for_bit() {
    // burn's optimizer on one rank (the sharded and offloaded cases' Adam is ballast's own: not
    // burn's bits).
    for mut case in precision_cases()
        .into_iter()
        .filter(|c| c.shards.is_empty() && !c.offload)
    {
        (case.shares, case.caps) = (vec![case.global_batch()], vec![case.global_batch()]);
        let runs = local::run(1, CommOptions::default(), |comm| {
            run_ddp(Box::new(comm), &case)
                .map(|(o, _)| o)
                .map_err(|e| e.to_string())
        });
        let ours = runs.into_iter().next().unwrap().unwrap_or_else(|e| panic!("{e}"));
        let reference = run_reference(&case, &ours.initial);
        assert_eq!(
            ours.master.len(),
            ours.initial.len(),
            "the run keeps an f32 master copy"
        );
        assert_eq!(ours.master, reference.master, "{}: f32 master", case.label());
        assert_eq!(ours.params, reference.params, "{}: bf16 replica", case.label());
        assert_eq!(ours.losses, reference.losses, "{}: losses", case.label());
        // The replica holds the master rounded to bf16: not the f32 values themselves.
        let replica: Vec<f32> = ours.params.concat();
        assert_ne!(replica, ours.master, "{}: the replica computes in bf16", case.label());
        assert!(
            relative_difference(&replica, &ours.master) < 2f64.powi(-8),
            "{}",
            case.label()
        );
        println!(
            "{}: one rank, whole batch: master, replica and losses equal the recipe's bits",
            case.label()
        );
    }
}

#[test]
fn bf16_on_three_unequal_ranks_as_threads_equals_the_recipe_within_its_micro_batch_spread() {
    assert_report(&common::equivalence_on_threads(3, &precision_cases()));
}

#[cfg(feature = "mpi")]
#[test]
fn bf16_on_three_unequal_ranks_under_mpirun_equals_the_recipe_within_its_micro_batch_spread() {
    assert_report(&common::equivalence_under_mpirun("precision", precision_cases().len()));
}

/// The replica's parameters are bf16 and the reduced gradients that reach the optimizer are
/// f32 (the sums were never bf16), read from the tensors themselves.
#[test]
fn bf16_replica_hands_the_optimizer_f32_gradients() {
    struct Dtypes<'a>(&'a GradientsParams, Vec<(DType, DType)>);
    impl ModuleVisitor for Dtypes<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let grad = self.0.get::<D>(param.id).expect("every parameter has a gradient");
            self.1.push((param.val().dtype(), grad.dtype()));
        }
    }
    let results = local::run(2, CommOptions::default(), |comm| {
        let device = Device::flex().autodiff();
        let options = DdpOptions::default().with_precision(Precision::Bf16);
        let (mut ddp, model) = DataParallel::wrap(Box::new(comm), Mlp::init(&device), options)?;
        assert_eq!(ddp.precision(), Precision::Bf16);
        one_micro_batch(&mut ddp, &model, &device)?;
        let grads = ddp.reduce(&model)?.into_params()?;
        let mut seen = Dtypes(&grads, Vec::new());
        model.visit(&mut seen);
        Ok::<_, Error>(seen.1)
    });
    for r in results {
        let dtypes = r.unwrap();
        assert_eq!(dtypes.len(), 4, "{dtypes:?}");
        for (param, grad) in dtypes {
            assert_eq!((param, grad), (DType::BF16, DType::F32));
        }
    }
}

/// A shard kept in host memory takes its f32 master values over from the `DataParallel` at the
/// first step and updates them on the host: after a step its master holds values a bf16
/// replica cannot (low 16 bits set), the replica stays bf16, and both ranks' replicas agree.
#[test]
fn bf16_with_a_host_shard_updates_the_f32_master_on_the_host() {
    let results = local::run(2, CommOptions::default(), |comm| {
        let device = Device::flex().autodiff();
        let rank = comm.rank();
        let options = DdpOptions::default().with_precision(Precision::Bf16);
        let (mut ddp, model) = DataParallel::wrap(Box::new(comm), Mlp::init(&device), options)?;
        let counts = shard_counts(ddp.param_count(), &[1.0, 1.0])?;
        let place = if rank == 1 {
            ShardPlace::Host
        } else {
            ShardPlace::Device
        };
        let mut adam = ShardedAdam::new(&model, rank, counts, HostAdamConfig::default(), place)?;
        one_micro_batch(&mut ddp, &model, &device)?;
        let (model, _) = ddp.step(model, &mut adam, 1e-3)?;
        ddp.verify_replicas(&model)?;
        struct Dtypes(Vec<DType>);
        impl ModuleVisitor for Dtypes {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0.push(param.val().dtype());
            }
        }
        let mut dtypes = Dtypes(Vec::new());
        model.visit(&mut dtypes);
        Ok::<_, Error>((adam.master_shard()?, adam.len(), dtypes.0))
    });
    for (rank, r) in results.into_iter().enumerate() {
        let (master, len, dtypes) = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        assert_eq!(master.len(), len, "rank {rank}: the shard's master");
        assert!(
            master.iter().any(|v| v.to_bits() & 0xffff != 0),
            "rank {rank}: the master holds f32 values"
        );
        assert!(dtypes.iter().all(|&d| d == DType::BF16), "rank {rank}: {dtypes:?}");
    }
}

#[test]
fn precision_parses_and_names_the_choices() {
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    assert_eq!("f32".parse::<Precision>().unwrap(), Precision::F32);
    let text = "fp8".parse::<Precision>().unwrap_err().to_string();
    assert!(
        text.contains("unknown precision \"fp8\"; use f32, bf16 or f16"),
        "{text}"
    );
}

/// f16 with dynamic loss scaling on three unequal ranks of `flex` (see
/// `common::f16_loss_scaling_run`).
#[test]
fn f16_loss_scaling_skips_the_same_steps_on_every_rank_and_trains_on() {
    common::f16_loss_scaling_run(ballast::device::DeviceChoice::Flex);
}

/// The sharded step in bf16 all-gathers the replicas' new values in bf16: counted where the
/// collective is called (`DeviceBuffersOnly` adds up the bytes each device-buffer all-gather
/// delivers, and refuses host slices), per step, at most 0.55 of the f32 step's. The odd shard
/// lengths of shares 6:3:1 pad one 2-byte value each.
#[test]
fn bf16_sharded_all_gather_carries_at_most_055_of_the_f32_bytes() {
    use ballast::testing::device_only::DeviceBuffersOnly;
    use std::sync::atomic::Ordering;
    let bytes_per_step = |precision: Precision| -> f64 {
        let mut case = precision_cases()
            .into_iter()
            .find(|c| !c.shards.is_empty())
            .expect("a sharded case");
        case.precision = precision;
        case.steps = 3;
        let counted = local::run(3, CommOptions::default(), |comm| {
            let comm = DeviceBuffersOnly::new(Box::new(comm));
            let gathered = comm.gathered_bytes();
            run_ddp(Box::new(comm), &case).map_err(|e| e.to_string())?;
            Ok::<u64, String>(gathered.load(Ordering::Relaxed))
        });
        let total: u64 = counted.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{e}"))).sum();
        total as f64 / (3 * case.steps) as f64
    };
    let (f32_bytes, bf16_bytes) = (bytes_per_step(Precision::F32), bytes_per_step(Precision::Bf16));
    let ratio = bf16_bytes / f32_bytes;
    println!("all-gather bytes per rank and step: f32 {f32_bytes}, bf16 {bf16_bytes} ({ratio:.4})");
    assert!(
        f32_bytes > 0.0 && ratio <= 0.55,
        "f32 {f32_bytes}, bf16 {bf16_bytes}: ratio {ratio}"
    );
}
