//! Training on a GPU-class device: burn's wgpu backend (in CI, Mesa's software Vulkan device).
//!
//! The same `DataParallel` step as on the CPU: gradients summed on the device, one read of each
//! bucket per step, the optimizer on the device. Run with
//! `cargo test --release -p ballast --features wgpu,mpi device_`.

mod common;

#[cfg(feature = "wgpu")]
mod wgpu {
    use ballast::{
        balance::{BalanceOptions, InitialPlan},
        collectives::{local, CommOptions},
        device::DeviceChoice,
        testing::{
            balanced_run, device_cases, device_only::DeviceBuffersOnly, linear_fit, probe_peaks, relative_difference,
            run_ddp, sharded_cases, BalancedRun, Case, ModelKind, OptimKind,
        },
    };

    type BalancedOutcome = (
        Vec<ballast::testing::StepRecord>,
        Vec<f32>,
        Vec<ballast::balancer::DeviceReport>,
    );

    const WGPU: DeviceChoice = DeviceChoice::WgpuCpu;

    /// Held by every test that measures the wgpu device's memory or compares two seeded runs:
    /// the device's pool and the seeded generator are shared by the whole test process.
    static POOL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn pool_lock() -> std::sync::MutexGuard<'static, ()> {
        POOL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn assert_all_ok(lines: &[String], cases: usize) {
        let rank0 = lines.iter().filter(|l| l.starts_with("equivalence rank 0 ")).count();
        assert_eq!(rank0, cases, "{lines:#?}");
        for l in lines {
            assert!(l.ends_with(" OK"), "{l}");
        }
    }

    #[test]
    fn device_wgpu_one_rank_equals_one_device_on_the_whole_batch() {
        let _pool = pool_lock();
        let cases = device_cases(1, &[WGPU]);
        assert_all_ok(&super::common::equivalence_on_threads(1, &cases), cases.len());
    }

    #[test]
    fn device_wgpu_three_ranks_equal_one_device_and_stay_identical() {
        let _pool = pool_lock();
        let cases = device_cases(3, &[WGPU]);
        assert_all_ok(&super::common::equivalence_on_threads(3, &cases), cases.len());
    }

    /// Rank 0 on wgpu, ranks 1 and 2 on flex: within the equivalence bounds of one wgpu device,
    /// and the replicas within `MIXED_REPLICA_TOLERANCE` of each other.
    #[test]
    fn device_mixed_wgpu_and_flex_ranks_agree() {
        let _pool = pool_lock();
        let cases = device_cases(3, &[WGPU, DeviceChoice::Flex, DeviceChoice::Flex]);
        assert_all_ok(&super::common::equivalence_on_threads(3, &cases), cases.len());
    }

    /// Adam's state sharded over rank 0 on wgpu (its shard's moments in the device's memory,
    /// updated by wgpu kernels) and ranks 1 and 2 on flex: every sharded case within 1e-5 of one
    /// device, and the replicas bit-identical although two backends computed the updates. Every
    /// rank's communicator refuses host slices on the data plane
    /// (`testing::device_only::DeviceBuffersOnly`), so the sharded step's tail, reduce-scatter
    /// and all-gather reach the collectives as device buffers, or the run fails.
    #[test]
    fn device_sharded_adam_on_wgpu_and_flex_equals_one_device() {
        let _pool = pool_lock();
        let cases: Vec<Case> = sharded_cases()
            .into_iter()
            .map(|c| c.on(&[WGPU, DeviceChoice::Flex, DeviceChoice::Flex]))
            .collect();
        let reports = local::run(3, CommOptions::default(), |comm| {
            let comm = DeviceBuffersOnly::new(Box::new(comm));
            ballast::testing::equivalence_report(Box::new(comm), &cases).map_err(|e| e.to_string())
        });
        let lines: Vec<String> = reports
            .into_iter()
            .flat_map(|r| r.unwrap_or_else(|e| panic!("{e}")))
            .collect();
        lines.iter().for_each(|l| println!("{l}"));
        assert_all_ok(&lines, cases.len());
        assert!(lines.iter().all(|l| l.contains("replicas identical")), "{lines:#?}");
    }

    /// How far a wgpu replica and flex replicas drift apart over 200 steps of Adam.
    #[test]
    fn device_mixed_replicas_drift_over_200_steps() {
        let _pool = pool_lock();
        let mut case = Case::new(ModelKind::Mlp, OptimKind::Adam, &[5, 2, 1], &[3, 2, 1]).on(&[
            WGPU,
            DeviceChoice::Flex,
            DeviceChoice::Flex,
        ]);
        case.steps = 200;
        let drift: Vec<f64> = local::run(3, CommOptions::default(), |comm| {
            run_ddp(Box::new(comm), &case)
                .map(|(o, _)| o.replica_rel)
                .map_err(|e| e.to_string())
        })
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect();
        println!(
            "mixed wgpu/flex replicas after 200 Adam steps: largest relative difference from rank 0 {:.3e}",
            drift[0]
        );
        assert!(drift.iter().all(|&d| d == drift[0]), "{drift:?}");
        assert!(drift[0] <= 1e-5, "replicas drifted {:.3e} apart", drift[0]);
    }

    /// On the device as on the CPU: a step reads each bucket back once, however many
    /// micro-batches ran.
    #[test]
    fn device_wgpu_step_reads_the_fused_buffer_once() {
        let _pool = pool_lock();
        let mut traffic = Vec::new();
        for cap in [8, 1] {
            let mut case = Case::new(ModelKind::Mlp, OptimKind::Sgd, &[8, 8, 8], &[cap; 3]).on(&[WGPU]);
            case.steps = 2;
            let per_rank: Vec<u64> = local::run(3, CommOptions::default(), |comm| {
                run_ddp(Box::new(comm), &case)
                    .map(|(o, _)| o.traffic.iter().map(|t| t.to_host).max().unwrap_or(0))
                    .map_err(|e| e.to_string())
            })
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
            .collect();
            traffic.push(per_rank);
        }
        let params = burn::module::Module::num_params(&<ballast::testing::Mlp as ballast::testing::Regressor>::init(
            &burn::tensor::Device::flex(),
        ));
        let fused = ((params + 3 + ballast::testing::TAIL_VALUES_PER_RANK * 3) * 4) as u64;
        assert_eq!(
            traffic,
            vec![vec![fused; 3]; 2],
            "device→host bytes per step with 1 and 8 micro-batches"
        );
    }

    /// The wgpu meter reads burn's memory pool: a micro-batch's peak grows with its size, so the
    /// planner gets a real bytes-per-sample slope (a high-water mark that never resets would
    /// read the same at every size). The model is wide enough that the activations outgrow the
    /// pool's first pages.
    #[test]
    fn device_wgpu_probe_peaks_grow_with_the_micro_batch() {
        let _pool = pool_lock();
        let device = WGPU.device(0).unwrap().autodiff();
        let points: Vec<(f64, f64)> = probe_peaks(&device, 1024, &[32, 64, 128, 256, 512, 1024])
            .into_iter()
            .map(|(m, peak)| (m as f64, peak as f64))
            .collect();
        let (slope, intercept, r2) = linear_fit(&points);
        println!(
            "wgpu probe peaks {:?}: slope {slope:.0} bytes/sample, intercept {intercept:.0}, R² {r2:.4}",
            points.iter().map(|p| (p.0 as usize, p.1 as u64)).collect::<Vec<_>>()
        );
        assert!(slope > 0.0, "peak does not grow with the micro-batch: {points:?}");
        // The pool reserves pages: small micro-batches fit in the first ones, larger ones add
        // pages in proportion to their size.
        assert!(
            points[5].1 > points[0].1 + 256.0 * slope,
            "the largest micro-batch reserves too little more than the smallest: {points:?}"
        );
    }

    /// Probe sizes where the wide model's activations outgrow the pool's first pages.
    const LARGE_PROBES: [usize; 5] = [128, 256, 512, 768, 1024];

    fn balanced(
        device_oom_at_step: Option<u64>,
        oom_in_device_log: bool,
        budget_bytes: u64,
        global_batch: usize,
        width: usize,
        probe_sizes: &[usize],
    ) -> BalancedOutcome {
        let run = BalancedRun {
            global_batch,
            steps: 4,
            width,
            conv: false,
            lr: 1e-3,
            device: WGPU,
            device_oom_at_step,
            oom_in_device_log,
            precision: ballast::Precision::F32,
            balance: BalanceOptions {
                budget_bytes,
                initial: InitialPlan::Equal,
                rebalance: false,
                probe_sizes: probe_sizes.to_vec(),
                // Deterministic: the micro-batch follows from memory alone, not from timings.
                tunables: ballast::balancer::Tunables {
                    micro_batch_policy: ballast::balancer::MicroBatchPolicy::Largest,
                    ..Default::default()
                },
                ..BalanceOptions::default()
            },
        };
        local::run(1, CommOptions::default(), |comm| balanced_run(Box::new(comm), &run))
            .pop()
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `--device-memory` on a wgpu rank: every micro-batch that ran kept its measured peak within
    /// the budget, and the cap in force at the end uses at least 70 % of it. The budget is the
    /// first run's fixed bytes plus 700 samples, so memory, not speed, sets the micro-batch.
    ///
    /// Once Adam's moments exist the pool reserves more than the planned 8 bytes per parameter
    /// (its pages are coarser than the moments), so the first plan's cap would overshoot; the
    /// balancer measures the cap again after the first step, with the state in place, and no
    /// micro-batch of any step goes over the budget (no back-off).
    #[test]
    fn device_wgpu_cap_keeps_the_peak_within_the_budget() {
        let _pool = pool_lock();
        let (_, _, reports) = balanced(None, false, u64::MAX, 256, 1024, &LARGE_PROBES);
        let r = &reports[0];
        let budget = r.fixed_bytes + 700 * r.bytes_per_sample;
        let (records, _, reports) = balanced(None, false, budget, 1400, 1024, &LARGE_PROBES);
        println!(
            "wgpu budget {budget} B (planned fixed {} B + {} B/sample)",
            reports[0].fixed_bytes, reports[0].bytes_per_sample,
        );
        for s in &records {
            println!(
                "step {}: planned cap {}, micro-batches {:?}, peak {} B = {:.1} % of the budget, back-offs {}",
                s.step,
                s.caps[0],
                s.micro_batches,
                s.peak_bytes,
                100.0 * s.peak_bytes as f64 / budget as f64,
                s.oom_retries
            );
            assert!(
                s.peak_bytes <= budget,
                "step {}: peak {} over budget {budget}",
                s.step,
                s.peak_bytes
            );
        }
        let last = records.last().unwrap();
        assert!(records[0].caps[0] < 1400, "the budget did not limit the micro-batch");
        assert!(
            records.iter().all(|s| s.oom_retries == 0),
            "a micro-batch went over the budget and backed off"
        );
        assert!(
            last.peak_bytes as f64 >= 0.7 * budget as f64,
            "peak {} uses under 70 % of {budget}",
            last.peak_bytes
        );
    }

    /// A device out-of-memory on a micro-batch is contained, in both ways a backend reports it:
    /// as a panic on the caller's thread (burn with cubecl's text, injected in the loss
    /// function), and as wgpu and cubecl really report it, a panic on cubecl's device thread
    /// that it only logs (injected through the `log` facade under cubecl's target, which the
    /// installed device log records; the balancer's check after the micro-batch finds it). The
    /// micro-batch is retried at half the size, the step completes with every sample, and the
    /// parameters equal the clean run's.
    #[test]
    fn device_wgpu_out_of_memory_backs_off() {
        let _pool = pool_lock();
        assert!(
            ballast::health::install_device_log(),
            "the test process has no other logger"
        );
        let probes = [1, 2, 4, 8, 16, 32];
        let (clean, clean_params, _) = balanced(None, false, u64::MAX, 32, 256, &probes);
        for in_log in [false, true] {
            let (fault, fault_params, _) = balanced(Some(2), in_log, u64::MAX, 32, 256, &probes);
            let how = if in_log { "in the device log" } else { "as a panic" };
            println!(
                "wgpu injected device OOM at step 2 {how}: micro-batches {:?} → {:?}, retries {}",
                clean[2].micro_batches, fault[2].micro_batches, fault[2].oom_retries
            );
            assert_eq!(fault[2].oom_retries, 1, "{how}");
            assert!(fault[2].micro_batches.len() > clean[2].micro_batches.len(), "{how}");
            for (a, b) in clean.iter().zip(&fault) {
                assert_eq!(
                    a.global_samples, b.global_samples,
                    "step {} lost or repeated samples ({how})",
                    a.step
                );
            }
            let rel = relative_difference(&clean_params, &fault_params);
            println!("relative parameter difference after the back-off ({how}): {rel:.3e}");
            assert!(rel <= 1e-6, "{rel} ({how})");
        }
    }

    /// A kernel that cubecl cannot compile on this device, for real: wgpu on Mesa's software
    /// Vulkan device has no `bf16`, so cubecl's compiler panics on its device thread
    /// (`UnsupportedType("cube.bf16")`) and only logs it, while a read of the output returns
    /// values. The device log records it and the canary in `bf16` refuses the device with that
    /// text; the same canary passes on `flex` and in `f32` on this device.
    #[test]
    fn device_wgpu_canary_refuses_kernels_that_do_not_compile() {
        let _pool = pool_lock();
        assert!(
            ballast::health::install_device_log(),
            "the test process has no other logger"
        );
        let device = WGPU.device(0).unwrap();
        ballast::health::canary(&device).unwrap();
        ballast::health::canary_in(&burn::tensor::Device::flex(), burn::tensor::DType::BF16).unwrap();
        let err = ballast::health::canary_in(&device, burn::tensor::DType::BF16).unwrap_err();
        println!("{err}");
        let text = err.to_string();
        assert!(
            text.contains("the device log reported a failure while computing in BF16"),
            "{text}"
        );
        assert!(text.contains("UnsupportedType"), "{text}");
        assert!(text.contains("check the Vulkan driver"), "{text}");
    }

    /// Mesa's Vulkan device has no bf16 arithmetic (Vulkan allows conversions only), and burn
    /// says so: a bf16 replica on it is refused when wrapped, on every rank, naming the fix,
    /// before any kernel runs in bf16.
    #[test]
    fn device_wgpu_refuses_a_bf16_replica() {
        use ballast::{testing::Regressor, DataParallel, DdpOptions, Precision};
        let _pool = pool_lock();
        let device = WGPU.device(0).unwrap();
        assert!(!device.supports_dtype(burn::tensor::FloatDType::BF16));
        println!(
            "wgpu:cpu: bf16 {}, f16 (shader-f16) {}",
            device.supports_dtype(burn::tensor::FloatDType::BF16),
            device.supports_dtype(burn::tensor::FloatDType::F16)
        );
        let results = local::run(2, CommOptions::default(), |comm| {
            let model = ballast::testing::Mlp::init(&device.clone().autodiff());
            let options = DdpOptions::default().with_precision(Precision::Bf16);
            DataParallel::wrap(Box::new(comm), model, options).map(drop)
        });
        for r in results {
            let text = r.expect_err("wgpu:cpu cannot compute in bf16").to_string();
            println!("{text}");
            assert!(text.contains("cannot compute in bf16"), "{text}");
            assert!(text.contains("train it in f32"), "{text}");
        }
    }

    /// Mesa's Vulkan device computes in f16 (burn reports shader-f16): the f16 run with dynamic
    /// loss scaling on three ranks of it skips the same steps on every rank and trains on.
    #[test]
    fn device_wgpu_f16_loss_scaling_skips_the_same_steps_and_trains_on() {
        let _pool = pool_lock();
        super::common::f16_loss_scaling_run(WGPU);
    }

    /// A user's own loop: a kernel that cubecl cannot compile runs during a step (a `bf16`
    /// computation on Mesa's Vulkan device, which panics on cubecl's device thread and is only
    /// logged), and `DataParallel` refuses to finish that step, naming the rank, the step and
    /// cubecl's words; the step after it, with nothing failing, finishes.
    #[test]
    fn device_wgpu_step_after_a_failed_kernel_is_not_applied() {
        use ballast::{
            testing::{Mlp, Regressor, SyntheticSet},
            DataParallel, DdpOptions, Error,
        };
        use burn::{
            nn::loss::{MseLoss, Reduction},
            optim::AdamConfig,
            tensor::{DType, Tensor},
        };
        let _pool = pool_lock();
        assert!(
            ballast::health::install_device_log(),
            "the test process has no other logger"
        );
        let device = WGPU.device(0).unwrap().autodiff();
        let data = SyntheticSet::new(16, 5);
        let outcomes = local::run(1, CommOptions::default(), |comm| {
            let (mut ddp, mut model) = DataParallel::wrap(Box::new(comm), Mlp::init(&device), DdpOptions::default())?;
            let mut optim = AdamConfig::new().init();
            let mut results = Vec::new();
            for step in 0..2 {
                let (x, y) = data.batch(&[0, 1, 2, 3], &device);
                let loss = MseLoss::new().forward(model.forward(x), y, Reduction::Mean);
                ddp.backward(&model, loss, 4)?;
                if step == 0 {
                    // Something of the step's own, in a type this device cannot compile.
                    let side = Tensor::<1>::ones([8], &device.clone().inner()).cast(DType::BF16).exp();
                    drop(side);
                }
                match ddp.step(model.clone(), &mut optim, 1e-3) {
                    Ok((next, _)) => {
                        model = next;
                        results.push(Ok(()));
                    }
                    Err(e) => results.push(Err(e)),
                }
            }
            Ok::<_, Error>(results)
        });
        let results = outcomes.into_iter().next().unwrap().unwrap();
        let err = results[0]
            .as_ref()
            .expect_err("the step with a failed kernel must not finish");
        println!("{err}");
        let text = err.to_string();
        assert!(matches!(err, Error::DeviceFailed { rank: 0, step: 0, .. }), "{text}");
        assert!(text.contains("UnsupportedType"), "{text}");
        assert!(results[1].is_ok(), "{:?}", results[1]);
    }

    #[cfg(feature = "mpi")]
    #[test]
    fn device_wgpu_under_mpirun() {
        for devices in ["wgpu:cpu", "wgpu:cpu,flex,flex"] {
            let out = super::common::selftest(3, &["equivalence", "--device", devices], &[]);
            assert!(out.status.success(), "{}", super::common::dump(&out));
            let lines = super::common::lines_with(&out, "equivalence rank");
            for l in &lines {
                println!("{l}");
            }
            assert_all_ok(&lines, device_cases(3, &[]).len());
        }
    }
}

#[cfg(not(feature = "wgpu"))]
#[test]
fn device_tests_need_the_wgpu_feature() {
    println!("skipped: the device tests need ballast built with `--features wgpu` (and a Vulkan driver, e.g. Mesa's lavapipe)");
}
