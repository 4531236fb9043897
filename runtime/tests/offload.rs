//! Host offload: the host Adam against burn's, host-RAM refusal, swap warnings in the metrics.

use std::path::{Path, PathBuf};

use ballast::{
    balance::{BalanceOptions, Balancer},
    collectives::{local, CommOptions},
    memory::DeviceMeter,
    metrics::MetricsWriter,
    optim::{offload::check_host_memory, HostAdamConfig, HostOffload},
    testing::{compare, run_ddp, run_reference, Case, Mlp, ModelKind, OptimKind, Regressor, SyntheticSet},
    DataParallel, DdpOptions, Error, GlobalSampler,
};
use burn::{
    nn::loss::{MseLoss, Reduction},
    tensor::Device,
};

/// 50 steps with the optimizer offloaded to the host Adam (3 ranks, shares 5/2/1) against burn's
/// Adam on one device: max per-tensor relative difference ≤ 1e-5, with and without weight decay.
#[test]
fn offload_host_adam_matches_burn_adam_over_50_steps() {
    for model in [ModelKind::Mlp, ModelKind::Conv] {
        for weight_decay in [0.0, 0.01] {
            let mut case = Case::new(model, OptimKind::Adam, &[5, 2, 1], &[3, 2, 1]);
            case.steps = 50;
            case.offload = true;
            case.weight_decay = weight_decay;
            let outcomes = local::run(3, CommOptions::default(), |comm| {
                run_ddp(Box::new(comm), &case)
                    .map(|(o, _)| o)
                    .map_err(|e| e.to_string())
            });
            let ours = outcomes.into_iter().next().unwrap().unwrap();
            let reference = run_reference(&case, &ours.initial);
            let (params, losses) = compare(&ours, &reference);
            println!("{model:?} weight decay {weight_decay}: max rel param {params:.3e}, loss {losses:.3e}");
            assert!(params <= 1e-5, "{model:?} wd {weight_decay}: {params}");
            assert!(losses <= 1e-5, "{model:?} wd {weight_decay}: {losses}");
        }
    }
}

fn fake_proc(name: &str, mem_available_kb: u64, pswpout: u64) -> PathBuf {
    let root = std::env::temp_dir().join(format!("ballast-proc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(root.join("proc/sys/vm")).unwrap();
    write_proc(&root, mem_available_kb, pswpout);
    root
}

fn write_proc(root: &Path, mem_available_kb: u64, pswpout: u64) {
    std::fs::write(
        root.join("proc/meminfo"),
        format!("MemTotal: 33554432 kB\nMemFree: 1000 kB\nMemAvailable: {mem_available_kb} kB\nSwapTotal: 8388608 kB\nSwapFree: 8000000 kB\n"),
    )
    .unwrap();
    std::fs::write(
        root.join("proc/vmstat"),
        format!("nr_free_pages 250\npswpin 17\npswpout {pswpout}\n"),
    )
    .unwrap();
}

/// With little `MemAvailable`, offloading is refused with the numbers, before anything is
/// allocated; with plenty, it goes ahead.
#[test]
fn offload_refuses_low_host_memory() {
    let root = fake_proc("lowmem", 1, 0);
    let device = Device::flex().autodiff();
    let model = Mlp::init(&device);
    let err = HostOffload::new(&model, HostAdamConfig::default(), &root).expect_err("must refuse");
    assert!(matches!(err, Error::HostMemory { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("only 819 are usable (1024 available"), "{msg}");
    assert!(msg.contains("proc/meminfo"), "{msg}");
    assert_eq!(check_host_memory(&root, 800, 0.2).unwrap(), 819);
    write_proc(&root, 16 << 20, 0);
    assert!(HostOffload::new(&model, HostAdamConfig::default(), &root).is_ok());
    std::fs::remove_dir_all(&root).unwrap();
}

/// The balancer reads host RAM from the same tree: planning offload beyond it fails clearly.
#[test]
fn offload_planning_fails_on_low_mem_available() {
    use ballast::balancer::{solve, Tunables};
    let root = fake_proc("plan", 1000, 0);
    let mem = ballast::cluster::host_memory(&root).unwrap();
    let report = ballast::balancer::DeviceReport {
        name: "small".into(),
        budget_bytes: 16_500_000,
        fixed_bytes: 16_000_000,
        bytes_per_sample: 100_000,
        samples_per_sec: 1.0,
        offloadable_bytes: 8_000_000,
        host: "node".into(),
        host_available_bytes: Some(mem.available),
        speed_curve: Vec::new(),
        compute_group: None,
    };
    let err = solve(&[report], 8, 0.0, &Tunables::default()).unwrap_err().to_string();
    assert!(err.contains("MemAvailable 1024000"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// When the host starts swapping during training, the step reports it and the loop records a
/// warning in the metrics file.
#[test]
fn offload_swap_warning_recorded_in_metrics() {
    let root = fake_proc("swap", 16 << 20, 100);
    let metrics_path = root.join("metrics.jsonl");
    let mut metrics = MetricsWriter::append(&metrics_path).unwrap();
    let device = Device::flex().autodiff();
    let data = SyntheticSet::new(64, 1);
    let sampler = GlobalSampler::new(data.len(), 8, 1).unwrap();
    let comm = local::world(1, CommOptions::default()).pop().unwrap();
    let meter = DeviceMeter::start();
    let (mut ddp, mut model) = DataParallel::wrap(Box::new(comm), Mlp::init(&device), DdpOptions::default()).unwrap();
    let mut loss_fn = |m: &Mlp, idx: &[usize]| {
        let (x, y) = data.batch(idx, &device);
        MseLoss::new().forward(m.forward(x), y, Reduction::Mean)
    };
    let options = BalanceOptions {
        proc_root: root.clone(),
        ..BalanceOptions::default()
    };
    let pool: Vec<usize> = (0..8).collect();
    let mut balancer = Balancer::probe(&mut ddp, &model, &mut loss_fn, &pool, 8, meter, options).unwrap();
    let mut optim = burn::optim::AdamConfig::new().init();
    let mut warnings = Vec::new();
    for step in 0..4u64 {
        if step == 2 {
            write_proc(&root, 16 << 20, 180); // 80 pages swapped out during step 2
        }
        let (m, out) = balancer
            .step(&mut ddp, model, &mut optim, 1e-3, &sampler.batch(step), &mut loss_fn)
            .unwrap();
        model = m;
        if let Some(w) = out.swap_warning {
            metrics
                .record(&serde_json::json!({"step": step, "rank": 0, "event": "warning", "kind": "host swapping", "pages_out": w.pages_out}))
                .unwrap();
            warnings.push(step);
        }
    }
    assert_eq!(warnings, vec![2]);
    let text = std::fs::read_to_string(&metrics_path).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["kind"], "host swapping");
    assert_eq!(line["pages_out"], 80);
    std::fs::remove_dir_all(&root).unwrap();
}

/// A budget in a process that cannot count its heap is refused: every probe would read 0 bytes
/// and the plan would treat memory as free. (This test binary has no counting allocator.)
#[test]
fn a_budget_without_the_counting_allocator_is_an_error() {
    assert!(!ballast::memory::is_counting());
    let device = Device::flex().autodiff();
    let data = SyntheticSet::new(16, 1);
    let comm = local::world(1, CommOptions::default()).pop().unwrap();
    let (mut ddp, model) = DataParallel::wrap(Box::new(comm), Mlp::init(&device), DdpOptions::default()).unwrap();
    let mut loss_fn = |m: &Mlp, idx: &[usize]| {
        let (x, y) = data.batch(idx, &device);
        MseLoss::new().forward(m.forward(x), y, Reduction::Mean)
    };
    let options = BalanceOptions {
        budget_bytes: 8 << 20,
        ..BalanceOptions::default()
    };
    let pool: Vec<usize> = (0..8).collect();
    let err = Balancer::probe(&mut ddp, &model, &mut loss_fn, &pool, 8, DeviceMeter::start(), options)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("rank 0: a memory budget is set but this binary does not count its heap"),
        "{err}"
    );
    assert!(err.contains("CountingAlloc"), "{err}");
}
