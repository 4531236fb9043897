//! Training on a GPU-class device: burn's wgpu backend (in CI, Mesa's software Vulkan device).
//!
//! The same `DataParallel` step as on the CPU: gradients summed on the device, one read of each
//! bucket per step, the optimizer on the device. Run with
//! `cargo test --release -p ballast --features wgpu,mpi device_`.

mod common;

#[cfg(feature = "wgpu")]
mod wgpu {
    use ballast::{
        collectives::{local, CommOptions},
        device::DeviceChoice,
        testing::{device_cases, equivalence_report, run_ddp, Case, ModelKind, OptimKind},
    };

    const WGPU: DeviceChoice = DeviceChoice::WgpuCpu;

    /// Every rank's report lines for `cases` on `world` ranks as threads.
    fn report(world: usize, cases: &[Case]) -> Vec<String> {
        let lines: Vec<String> = local::run(world, CommOptions::default(), |comm| {
            equivalence_report(Box::new(comm), cases).map_err(|e| e.to_string())
        })
        .into_iter()
        .flat_map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect();
        for l in &lines {
            println!("{l}");
        }
        lines
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
        let cases = device_cases(1, &[WGPU]);
        assert_all_ok(&report(1, &cases), cases.len());
    }

    #[test]
    fn device_wgpu_three_ranks_equal_one_device_and_stay_identical() {
        let cases = device_cases(3, &[WGPU]);
        assert_all_ok(&report(3, &cases), cases.len());
    }

    /// Rank 0 on wgpu, ranks 1 and 2 on flex: within the equivalence bounds of one wgpu device,
    /// and the replicas within `MIXED_REPLICA_TOLERANCE` of each other.
    #[test]
    fn device_mixed_wgpu_and_flex_ranks_agree() {
        let cases = device_cases(3, &[WGPU, DeviceChoice::Flex, DeviceChoice::Flex]);
        assert_all_ok(&report(3, &cases), cases.len());
    }

    /// How far a wgpu replica and flex replicas drift apart over 200 steps of Adam.
    #[test]
    fn device_mixed_replicas_drift_over_200_steps() {
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
        let fused = ((params + 2 + 4 * 3) * 4) as u64;
        assert_eq!(
            traffic,
            vec![vec![fused; 3]; 2],
            "device→host bytes per step with 1 and 8 micro-batches"
        );
    }

    #[cfg(feature = "mpi")]
    #[test]
    fn device_wgpu_under_mpirun() {
        for devices in ["wgpu:cpu", "wgpu:cpu,flex,flex"] {
            let out = super::common::mpirun(3, &["selftest", "equivalence", "--device", devices], &[]);
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
