//! `gpu-check CHECK`: one check of the GPU kit (`scripts/gpu-kit.sh`), printed as one JSON line.
//!
//! Every check first asks the CUDA driver for a device; without one it reports
//! `"status": "no GPU"` with the reason and exits 0. A check that fails reports `"status":
//! "fail"` with the error (and the step, where there is one) and exits 1; a panic inside burn or
//! the driver is caught and reported the same way. The runner starts one process per check, so
//! a check that crashes or hangs costs only itself.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    process::ExitCode,
    time::Instant,
};

use ballast::{
    balance::{BalanceOptions, InitialPlan},
    balancer::{MicroBatchPolicy, Tunables},
    collectives::{
        conformance, local,
        nccl::{self, GpuInventory, NcclCommunicator},
        CommOptions, Communicator,
    },
    device::DeviceChoice,
    optim::{
        managed::{ChunkedAdam, ManagedBuffer},
        HostAdam, HostAdamConfig, StateBuffer,
    },
    testing::{
        balanced_run, compare, device_cases, device_only::DeviceBuffersOnly, equivalence_report, linear_fit,
        overhead::measure_overhead, probe_peaks, relative_difference, run_ddp, run_reference, sharded_cases,
        BalancedRun, Case, ModelKind, OptimKind,
    },
    DataParallel, DdpOptions, Precision,
};
use ballast_examples::models::{ResNet, ResNetShape};
use burn::{
    nn::loss::CrossEntropyLossConfig,
    tensor::{Distribution, FloatDType, Int, Tensor, TensorData},
};
use clap::{Parser, ValueEnum};
use serde_json::{json, Map, Value};

#[global_allocator]
static ALLOC: ballast::memory::CountingAlloc = ballast::memory::CountingAlloc;

/// Runs one check of the GPU kit and prints one JSON line.
#[derive(Parser)]
#[command(name = "gpu-check", version)]
struct Cli {
    /// The check.
    check: Check,
    /// The device budget of the `probes` check, as `--device-memory` takes it.
    #[arg(long, default_value = "4GiB")]
    device_memory: String,
    /// Steps of each loop in the `resnet` check.
    #[arg(long, default_value_t = 100)]
    steps: usize,
}

/// The checks, in the order the runner runs them.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Check {
    /// Driver, CUDA and NCCL versions, device names and memory, and where NCCL and NVRTC load from.
    Doctor,
    /// The start-up check every rank runs: a matmul and a sum with exact answers on cuda:0.
    Canary,
    /// NCCL on the GPU: exact integer all-reduce in place, the conformance checks, two ranks on one
    /// GPU, and `DataParallel` reducing its device buckets in place.
    Nccl,
    /// Memory probes on cuda:0: peak bytes per micro-batch, the cap under a budget, an injected OOM.
    Probes,
    /// DDP on cuda:0 (1 rank, 4 micro-batches) against the flex reference.
    Equivalence,
    /// Ranks as threads: rank 0 on cuda:0, ranks 1-2 on flex, data plane on the host.
    Hetero,
    /// Adam's state sharded over ranks as threads, rank 0's shard in cuda:0's memory, ranks 1-2
    /// on flex: one device within 1e-5, replicas bit-identical.
    Sharded,
    /// The ResNet example on cuda:0: DataParallel against a plain burn loop.
    Resnet,
    /// Optimizer state in CUDA managed memory, below the card's free memory: prefetch both ways,
    /// and Adam on the GPU chunk by chunk bit-identical to the host Adam.
    Managed,
    /// A real device out-of-memory on a micro-batch, backed off.
    Oom,
    /// The ResNet on cuda:0 in f32 and in bf16 (f32 master and Adam state): samples/s of
    /// DataParallel steps, and the largest micro-batch whose measured peak fits
    /// `--device-memory`.
    Precision,
}

/// Why a check did not pass.
enum Stop {
    /// No usable GPU: the check did not run.
    NoGpu(String),
    /// The check ran and failed.
    Failed(String),
}

impl<E: std::fmt::Display> From<E> for Stop {
    fn from(e: E) -> Self {
        Stop::Failed(e.to_string())
    }
}

impl Stop {
    /// What went wrong, as text (`Stop` cannot be `Display`: its `From` takes every `Display`).
    fn into_message(self) -> String {
        match self {
            Stop::NoGpu(why) => format!("no GPU: {why}"),
            Stop::Failed(why) => why,
        }
    }
}

type Outcome = Result<Map<String, Value>, Stop>;

const GPU: DeviceChoice = DeviceChoice::Cuda(Some(0));

fn main() -> ExitCode {
    ballast::libs::relaunch_with_found_libraries();
    let cli = Cli::parse();
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| run(&cli))).unwrap_or_else(|panic| {
        let text = ballast::health::panic_message(panic.as_ref());
        Err(Stop::Failed(format!("panicked: {text}")))
    });
    let name = format!("{:?}", cli.check).to_lowercase();
    let (status, mut fields, code) = match result {
        Ok(fields) => {
            let pass = fields.get("pass").and_then(Value::as_bool).unwrap_or(true);
            (if pass { "pass" } else { "fail" }, fields, u8::from(!pass))
        }
        Err(Stop::NoGpu(reason)) => ("no GPU", Map::from_iter([("reason".into(), json!(reason))]), 0),
        Err(Stop::Failed(error)) => ("fail", Map::from_iter([("error".into(), json!(error))]), 1),
    };
    fields.remove("pass");
    fields.insert("check".into(), json!(name));
    fields.insert("status".into(), json!(status));
    fields.insert(
        "seconds".into(),
        json!((started.elapsed().as_secs_f64() * 100.0).round() / 100.0),
    );
    println!("{}", Value::Object(fields));
    ExitCode::from(code)
}

fn run(cli: &Cli) -> Outcome {
    let inventory = gpu()?;
    match cli.check {
        Check::Doctor => Ok(object(json!({
            "driver_cuda_version": inventory.driver_cuda_version,
            "nccl_version": inventory.nccl_version,
            "devices": inventory.devices,
            "loaded": ballast::libs::loaded_paths()
                .into_iter()
                .map(|(lib, path)| (lib.what.to_string(), json!(path.map(|p| p.display().to_string()))))
                .collect::<Map<String, Value>>(),
            "cuda_path": std::env::var("CUDA_PATH").ok(),
        }))),
        Check::Canary => {
            let device = GPU.device(0)?;
            ballast::health::install_device_log();
            let started = Instant::now();
            ballast::health::canary(&device)?;
            Ok(object(
                json!({"canary": "exact", "seconds_first_kernels": started.elapsed().as_secs_f64()}),
            ))
        }
        Check::Nccl => check_nccl(),
        Check::Probes => check_probes(&cli.device_memory),
        Check::Equivalence => check_equivalence(),
        Check::Hetero => check_hetero(),
        Check::Sharded => check_sharded(),
        Check::Resnet => check_resnet(cli.steps),
        Check::Managed => check_managed(&inventory),
        Check::Oom => check_real_oom(&inventory),
        Check::Precision => check_precision(cli.steps, &cli.device_memory),
    }
}

/// The driver's inventory, or why there is no GPU to check.
fn gpu() -> Result<GpuInventory, Stop> {
    let inventory = nccl::inventory().map_err(|e| match e {
        ballast::collectives::Error::LibraryMissing { .. } => {
            Stop::NoGpu("libcuda.so (the NVIDIA driver) not found".into())
        }
        other => Stop::NoGpu(format!("the CUDA driver is present but reports no usable GPU: {other}")),
    })?;
    if inventory.devices.is_empty() {
        return Err(Stop::NoGpu("the CUDA driver reports no device".into()));
    }
    Ok(inventory)
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => Map::from_iter([("value".into(), other)]),
    }
}

/// Exact integers through NCCL on cuda:0: a world of one, then two ranks (threads) on the same
/// GPU, which NCCL may refuse.
fn check_nccl() -> Outcome {
    let options = CommOptions::default();
    let one = local::world(1, options.clone()).pop().expect("one rank");
    let mut comm = NcclCommunicator::new(Box::new(one), 0)?;
    let in_place = device_all_reduce(&mut comm, 1)?;
    let passed = conformance::check_all(&mut comm).map_err(|e| Stop::Failed(e.to_string()))?;
    drop(comm);
    let two: Vec<Result<String, String>> = local::run(2, options, |control| {
        let mut comm = NcclCommunicator::new(Box::new(control), 0).map_err(|e| e.to_string())?;
        device_all_reduce(&mut comm, 2).map_err(Stop::into_message)?;
        conformance::check_all(&mut comm)
            .map(|p| format!("{} checks", p.len()))
            .map_err(|e| e.to_string())
    });
    let two_ranks = match two.iter().find_map(|r| r.as_ref().err()) {
        None => json!("passed: in-place all-reduce and the conformance checks on 2 ranks of one GPU"),
        Some(e) => json!(format!("refused or failed: {e}")),
    };
    let data_parallel = ddp_over_nccl()?;
    let sharded = sharded_over_nccl()?;
    let init_deadline = nccl_init_without_a_peer();
    let abort = abort_at_an_injected_deadline();
    let ok = |v: &Value| v.get("ok").and_then(Value::as_bool).unwrap_or(false);
    Ok(object(json!({
        "pass": ok(&data_parallel) && ok(&sharded) && ok(&init_deadline) && ok(&abort),
        "init_without_a_peer": init_deadline,
        "abort_at_deadline": abort,
        "data_parallel_device_buckets": data_parallel,
        "sharded_step_device_buffers": sharded,
        "world_1_in_place_all_reduce": in_place,
        "world_1_conformance": passed,
        "world_2_one_gpu": two_ranks,
        "async_error_poll": "every NCCL wait polls ncclCommGetAsyncError until the deadline",
    })))
}

/// A world of one whose waits see their work as unfinished (`inject_stall`, as if a peer had
/// stopped after the handshake): the all-reduce must come back after the control plane's 2 s
/// deadline as the GPU error that aborted the NCCL communicator (`ncclCommAbort`), the next call
/// must be refused as poisoned, and the job's exit code for it must be the lost-rank code.
fn abort_at_an_injected_deadline() -> Value {
    let timeout = std::time::Duration::from_secs(2);
    let control = local::world(1, CommOptions::default().with_timeout(timeout))
        .pop()
        .expect("one rank");
    let mut comm = match NcclCommunicator::new(Box::new(control), 0) {
        Ok(comm) => comm,
        Err(e) => return json!({ "ok": false, "error": e.to_string() }),
    };
    comm.inject_stall();
    let mut values = vec![1.0f32; 1 << 16];
    let started = Instant::now();
    let first = comm.all_reduce_sum_f32(&mut values);
    let seconds = started.elapsed().as_secs_f64();
    let second = comm.all_reduce_sum_f32(&mut values);
    // The code a job ends with after this error.
    let code = first
        .as_ref()
        .err()
        .map(|e| ballast::Error::from(e.clone()).exit_code());
    let first_text = match &first {
        Ok(()) => "succeeded".to_string(),
        Err(e) => e.to_string(),
    };
    // It waited out the deadline, then aborted; the next call is refused without a collective.
    let aborted = matches!(first, Err(ballast::collectives::Error::Gpu { .. }))
        && first_text.contains("did not complete within")
        && seconds >= 2.0;
    let poisoned = matches!(second, Err(ballast::collectives::Error::Poisoned { .. }));
    json!({
        "ok": aborted && poisoned && code == Some(ballast::collectives::EXIT_LOST_RANK),
        "first_call": first_text, "seconds_to_abort": seconds,
        "next_call": format!("{second:?}"), "exit_code": code,
    })
}

/// A world of two where rank 1 takes NCCL's id and never creates its communicator: rank 0's
/// `ncclCommInitRankConfig` (non-blocking) must come back as an error naming the start-up
/// within the control plane's 3 s timeout, not wait forever.
fn nccl_init_without_a_peer() -> Value {
    let timeout = std::time::Duration::from_secs(3);
    let started = std::time::Instant::now();
    let results: Vec<Option<String>> = local::run(2, CommOptions::default().with_timeout(timeout), |mut control| {
        if control.rank() == 1 {
            let mut id = Vec::new();
            return control
                .broadcast_bytes(0, &mut id)
                .err()
                .map(|e| format!("rank 1: {e}"));
        }
        match NcclCommunicator::new(Box::new(control), 0) {
            Ok(_) => Some("rank 0: the communicator was created without rank 1".into()),
            Err(e) => Some(e.to_string()),
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let message = results.into_iter().flatten().collect::<Vec<_>>().join("; ");
    json!({
        "ok": message.contains("ncclCommInitRank did not finish within") && seconds < 60.0,
        "error": message, "seconds": seconds,
    })
}

/// `DataParallel` on cuda:0 with an NCCL communicator (world 1), gradients cut into several
/// buckets: NCCL reduces the buckets' own device memory, so per step only the tail (loss, counts,
/// per-rank values) is read to the host, never the gradients; parameters against the flex
/// reference.
fn ddp_over_nccl() -> Result<Value, Stop> {
    let mut case = Case::new(ModelKind::Mlp, OptimKind::Adam, &[8], &[2]).on(&[GPU]);
    case.bucket_cap_bytes = Some(4096);
    let control = local::world(1, CommOptions::default()).pop().expect("one rank");
    let comm = NcclCommunicator::new(Box::new(control), 0)?;
    let (outcome, _) = run_ddp(Box::new(comm), &case)?;
    let reference = run_reference(&case.clone().on(&[DeviceChoice::Flex]), &outcome.initial);
    let (param_rel, loss_rel) = compare(&outcome, &reference);
    let params = outcome.initial.len() as u64;
    let to_host: Vec<u64> = outcome.traffic.iter().map(|t| t.to_host).collect();
    let gradients_stayed = to_host.iter().all(|&b| b < 4 * params);
    let ok = param_rel <= OptimKind::Adam.tolerance() && gradients_stayed;
    Ok(json!({
        "ok": ok, "params": params, "buckets_per_step": outcome.buckets.first(),
        "collectives_per_step": outcome.collectives.first(),
        "device_to_host_bytes_per_step": to_host.first(), "gradient_bytes": 4 * params,
        "max_rel_param_vs_flex": param_rel, "max_rel_loss_vs_flex": loss_rel,
    }))
}

/// The sharded step (Adam's state in one shard on cuda:0) over NCCL in a world of one, through a
/// communicator that refuses host slices: the tail, the reduce-scatter and the all-gather reach
/// NCCL as device buffers; parameters against the flex reference.
fn sharded_over_nccl() -> Result<Value, Stop> {
    let mut case = Case::new(ModelKind::Mlp, OptimKind::Adam, &[8], &[2]).on(&[GPU]);
    case.shards = vec![1.0];
    let control = local::world(1, CommOptions::default()).pop().expect("one rank");
    let comm = DeviceBuffersOnly::new(Box::new(NcclCommunicator::new(Box::new(control), 0)?));
    let (outcome, _) = run_ddp(Box::new(comm), &case)?;
    let reference = run_reference(&case.clone().on(&[DeviceChoice::Flex]), &outcome.initial);
    let (param_rel, loss_rel) = compare(&outcome, &reference);
    let params = outcome.initial.len() as u64;
    let to_host: Vec<u64> = outcome.traffic.iter().map(|t| t.to_host).collect();
    let ok = param_rel <= case.tolerance() && to_host.iter().all(|&b| b < 4 * params);
    Ok(json!({
        "ok": ok, "params": params, "collectives_per_step": outcome.collectives.first(),
        "device_to_host_bytes_per_step": to_host.first(), "gradient_bytes": 4 * params,
        "max_rel_param_vs_flex": param_rel, "max_rel_loss_vs_flex": loss_rel,
    }))
}

/// Sums exact integers in a device buffer in place over `world` ranks and checks every value.
fn device_all_reduce(comm: &mut NcclCommunicator, world: usize) -> Result<String, Stop> {
    let len = 1 << 20;
    let rank = comm.rank();
    let contribution = |i: usize| ((i % 4096) * (rank + 1)) as f32;
    let ctx = cudarc::driver::CudaContext::new(0).map_err(|e| Stop::Failed(format!("{e:?}")))?;
    let stream = ctx.default_stream();
    let host: Vec<f32> = (0..len).map(contribution).collect();
    let mut buffer = stream.clone_htod(&host).map_err(|e| Stop::Failed(format!("{e:?}")))?;
    // The copy runs on this stream, NCCL on its own: the values are complete before NCCL starts.
    stream.synchronize().map_err(|e| Stop::Failed(format!("{e:?}")))?;
    comm.all_reduce_sum_cuda(&mut buffer)?;
    let back = stream.clone_dtoh(&buffer).map_err(|e| Stop::Failed(format!("{e:?}")))?;
    let ranks_sum: usize = (1..=world).sum();
    match (0..len).find(|&i| back[i] != ((i % 4096) * ranks_sum) as f32) {
        None => Ok(format!("{len} values exact")),
        Some(i) => Err(Stop::Failed(format!(
            "rank {rank}: element {i} is {}, expected {}",
            back[i],
            (i % 4096) * ranks_sum
        ))),
    }
}

/// The balancer on cuda:0 with one rank: four steps of a wide MLP.
fn balanced(budget_bytes: u64, global_batch: usize, probe_sizes: &[usize], oom_at: Option<u64>) -> BalancedRun {
    BalancedRun {
        global_batch,
        steps: 4,
        width: 1024,
        conv: false,
        lr: 1e-3,
        device: GPU,
        device_oom_at_step: oom_at,
        oom_in_device_log: false,
        precision: ballast::Precision::F32,
        balance: BalanceOptions {
            budget_bytes,
            initial: InitialPlan::Equal,
            rebalance: false,
            probe_sizes: probe_sizes.to_vec(),
            tunables: Tunables {
                micro_batch_policy: MicroBatchPolicy::Largest,
                ..Default::default()
            },
            ..BalanceOptions::default()
        },
    }
}

fn run_balanced(run: &BalancedRun) -> Result<ballast::testing::BalancedOutcome, Stop> {
    local::run(1, CommOptions::default(), |comm| balanced_run(Box::new(comm), run))
        .pop()
        .expect("one rank")
        .map_err(Stop::from)
}

/// Peaks per micro-batch, the cap under `--device-memory`, an injected out-of-memory.
fn check_probes(device_memory: &str) -> Outcome {
    let budget = ballast::cluster::parse_bytes(device_memory)?;
    let device = GPU.device(0)?.autodiff();
    let sizes = [256, 512, 1024, 2048, 4096];
    let peaks = probe_peaks(&device, 1024, &sizes);
    let points: Vec<(f64, f64)> = peaks.iter().map(|&(m, p)| (m as f64, p as f64)).collect();
    let (slope, intercept, r2) = linear_fit(&points);

    // The planner's own fit, then a global batch large enough that the budget sets the cap.
    let probe_sizes = [1024, 2048, 4096, 8192];
    let (_, _, reports) = run_balanced(&balanced(u64::MAX, 8192, &probe_sizes, None))?;
    let r = &reports[0];
    let fits = budget.saturating_sub(r.fixed_bytes) / r.bytes_per_sample.max(1);
    let global_batch = (fits as usize * 3 / 2).clamp(8192, 1 << 20);
    let (records, _, _) = run_balanced(&balanced(budget, global_batch, &probe_sizes, None))?;
    let steps: Vec<Value> = records
        .iter()
        .map(|s| {
            json!({"step": s.step, "cap": s.caps[0], "micro_batches": s.micro_batches.len(),
                   "peak_bytes": s.peak_bytes, "peak_of_budget": s.peak_bytes as f64 / budget as f64,
                   "back_offs": s.oom_retries})
        })
        .collect();
    let within = records.iter().all(|s| s.peak_bytes <= budget);
    let last = records.last().expect("four steps");
    let used = last.peak_bytes as f64 / budget as f64;

    let small = [1, 2, 4, 8, 16, 32];
    let (clean, clean_params, _) = run_balanced(&balanced(u64::MAX, 32, &small, None))?;
    let (fault, fault_params, _) = run_balanced(&balanced(u64::MAX, 32, &small, Some(2)))?;
    let samples_kept = clean
        .iter()
        .zip(&fault)
        .all(|(a, b)| a.global_samples == b.global_samples);
    let rel = relative_difference(&clean_params, &fault_params);
    let injected_ok = fault[2].oom_retries == 1 && samples_kept && rel <= 1e-6;
    Ok(object(json!({
        "pass": slope > 0.0 && within && used >= 0.7 && injected_ok,
        "probe_peaks": peaks, "slope_bytes_per_sample": slope, "intercept_bytes": intercept, "r2": r2,
        "planned_fixed_bytes": r.fixed_bytes, "planned_bytes_per_sample": r.bytes_per_sample,
        "budget_bytes": budget, "global_batch": global_batch, "steps": steps,
        "peaks_within_budget": within, "last_peak_of_budget": used,
        "injected_oom": {"retries": fault[2].oom_retries, "samples_kept": samples_kept,
                         "rel_param_diff_vs_clean": rel},
    })))
}

/// A micro-batch larger than the card's free memory: the first step backs off, no crash.
fn check_real_oom(inventory: &GpuInventory) -> Outcome {
    let free = inventory.devices[0].free_bytes;
    let probe_sizes = [1024, 2048, 4096];
    let (_, _, reports) = run_balanced(&balanced(u64::MAX, 4096, &probe_sizes, None))?;
    let per_sample = reports[0].bytes_per_sample.max(1);
    let global_batch = (free / per_sample * 2).min(1 << 24) as usize;
    let mut run = balanced(u64::MAX, global_batch, &probe_sizes, None);
    run.steps = 1;
    let (records, _, _) = run_balanced(&run)?;
    let s = &records[0];
    Ok(object(json!({
        "pass": s.oom_retries > 0 && s.global_samples == global_batch,
        "free_bytes": free, "planned_bytes_per_sample": per_sample, "global_batch": global_batch,
        "back_offs": s.oom_retries, "micro_batches": s.micro_batches.len(), "peak_bytes": s.peak_bytes,
    })))
}

/// 1 rank on cuda:0, batch 8 in 4 micro-batches, 20 steps, against one flex device on the
/// whole batch from the same initial weights.
fn check_equivalence() -> Outcome {
    let mut cases = Vec::new();
    let mut pass = true;
    let mut offloaded = Case::new(ModelKind::Mlp, OptimKind::Adam, &[8], &[2]).on(&[GPU]);
    offloaded.offload = true;
    let plain = [ModelKind::Mlp, ModelKind::Conv].into_iter().flat_map(|model| {
        [OptimKind::Sgd, OptimKind::Adam].map(|optim| Case::new(model, optim, &[8], &[2]).on(&[GPU]))
    });
    for case in plain.chain([offloaded]) {
        {
            let comm = local::world(1, CommOptions::default()).pop().expect("one rank");
            let (outcome, _) = run_ddp(Box::new(comm), &case)?;
            let reference = run_reference(&case.clone().on(&[DeviceChoice::Flex]), &outcome.initial);
            let (param_rel, loss_rel) = compare(&outcome, &reference);
            let ok = param_rel <= case.tolerance();
            pass &= ok;
            cases.push(
                json!({"case": case.label(), "max_rel_param": param_rel, "max_rel_loss": loss_rel,
                              "tolerance": case.tolerance(), "offloaded": case.offload,
                              "micro_batches": outcome.micro_batches[0],
                              "device_to_host_bytes_per_step": outcome.traffic[0].to_host, "ok": ok}),
            );
        }
    }
    Ok(object(json!({"pass": pass, "reference": "flex", "cases": cases})))
}

/// Ranks as threads, rank 0 on the GPU and ranks 1-2 on flex.
fn check_hetero() -> Outcome {
    let devices = [GPU, DeviceChoice::Flex, DeviceChoice::Flex];
    let lines = threads_report(&device_cases(3, &devices))?;
    let pass = lines.iter().all(|l| l.ends_with(" OK"));
    let case = Case::new(ModelKind::Mlp, OptimKind::Adam, &[5, 2, 1], &[3, 2, 1]).on(&devices);
    let losses = local::run(3, CommOptions::default(), |comm| {
        run_ddp(Box::new(comm), &case)
            .map(|(o, _)| o.losses)
            .map_err(|e| e.to_string())
    });
    let losses = losses.into_iter().next().expect("rank 0").map_err(Stop::Failed)?;
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    Ok(object(json!({
        "pass": pass && last < first,
        "devices": ["cuda:0", "flex", "flex"], "shares": [5, 2, 1], "caps": [3, 2, 1],
        "loss_first": first, "loss_last": last, "lines": lines,
    })))
}

/// Every rank's equivalence lines for `cases`, run on three ranks as threads.
fn threads_report(cases: &[Case]) -> Result<Vec<String>, Stop> {
    let reports = local::run(3, CommOptions::default(), |comm| {
        equivalence_report(Box::new(comm), cases).map_err(|e| e.to_string())
    });
    let mut lines = Vec::new();
    for r in reports {
        lines.extend(r.map_err(Stop::Failed)?);
    }
    Ok(lines)
}

/// The sharded-optimizer cases with rank 0 on cuda:0 (its shard's Adam moments in GPU memory,
/// updated by CUDA kernels; one case keeps rank 1's shard on the host) and ranks 1-2 on flex.
fn check_sharded() -> Outcome {
    let devices = [GPU, DeviceChoice::Flex, DeviceChoice::Flex];
    let cases: Vec<Case> = sharded_cases().into_iter().map(|c| c.on(&devices)).collect();
    let lines = threads_report(&cases)?;
    let pass = lines
        .iter()
        .all(|l| l.ends_with(" OK") && l.contains("replicas identical"));
    Ok(object(json!({
        "pass": pass, "devices": ["cuda:0", "flex", "flex"], "cases": cases.len(), "lines": lines,
    })))
}

/// Samples of the ResNet checks' batch.
const RESNET_BATCH: usize = 128;

/// The ResNet checks' model shape and one batch of random images with fixed labels on `device`.
fn resnet_batch(device: &burn::tensor::Device) -> (ResNetShape, Tensor<4>, Tensor<1, Int>) {
    let shape = ResNetShape {
        width: 16,
        stages: 3,
        blocks: 2,
        classes: 10,
    };
    let images = Tensor::<4>::random([RESNET_BATCH, 3, 32, 32], Distribution::Uniform(-1.0, 1.0), device);
    let labels: Vec<i64> = (0..RESNET_BATCH as i64).map(|i| i * 7 % 10).collect();
    let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [RESNET_BATCH]), device);
    (shape, images, labels)
}

/// The ResNet example's model on cuda:0, batch 128 in 4 micro-batches.
fn check_resnet(steps: usize) -> Outcome {
    let device = GPU.device(0)?.autodiff();
    let (batch, k) = (RESNET_BATCH, 4);
    let m = batch / k;
    let (shape, images, labels) = resnet_batch(&device);
    let loss = CrossEntropyLossConfig::new().init(&device);
    let measured = measure_overhead(ResNet::new(shape, &device), k, m, steps, 1e-2, |net: &ResNet, j| {
        let x = images.clone().narrow(0, j * m, m);
        let y = labels.clone().narrow(0, j * m, m);
        loss.forward(net.forward(x), y)
    })?;
    Ok(object(json!({
        "model": format!("ResNet width {} x {} stages x {} blocks", shape.width, shape.stages, shape.blocks),
        "params": measured.params, "batch": batch, "micro_batches": k, "steps": steps,
        "ours_samples_per_s": batch as f64 / measured.median_ours,
        "plain_samples_per_s": batch as f64 / measured.median_plain,
        "overhead_ratio": measured.ratio(),
        "device_to_host_bytes_per_step": measured.to_host,
        "max_rel_param_diff": measured.param_rel,
    })))
}

/// The ResNet on cuda:0 in f32 and in bf16: see [`Check::Precision`].
fn check_precision(steps: usize, device_memory: &str) -> Outcome {
    let budget = ballast::cluster::parse_bytes(device_memory)?;
    let mut out = Map::new();
    for precision in [Precision::F32, Precision::Bf16] {
        out.insert(precision.to_string(), resnet_in(precision, steps, budget)?);
    }
    let speed = |p: &str| out[p]["samples_per_s"].as_f64().unwrap_or(0.0);
    let cap = |p: &str| out[p]["largest_micro_batch"].as_f64().unwrap_or(0.0);
    let (speedup, capacity) = (speed("bf16") / speed("f32"), cap("bf16") / cap("f32").max(1.0));
    out.insert("bf16_speedup".into(), json!(speedup));
    out.insert("bf16_micro_batch_ratio".into(), json!(capacity));
    out.insert("device_memory".into(), json!(device_memory));
    Ok(out)
}

/// One precision of [`check_precision`]: the peak bytes of forward and backward at micro-batches
/// of 16 and 64 (the cuda pool's meter), the largest micro-batch the line through them fits in
/// `budget` (with the planner's 10 % margin), and `steps` DataParallel steps of 128 samples in 4
/// micro-batches with Adam, timed after 3 warm-up steps.
fn resnet_in(precision: Precision, steps: usize, budget: u64) -> Result<Value, Stop> {
    let device = GPU.device(0)?.autodiff();
    let meter = ballast::memory::DeviceMeter::for_device(&device).on_cuda(0);
    let (batch, k) = (RESNET_BATCH, 4usize);
    let (shape, images, labels) = resnet_batch(&device);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let loss = |net: &ResNet, from: usize, m: usize| {
        loss_fn.forward(
            net.forward(images.clone().narrow(0, from, m)).cast(FloatDType::F32),
            labels.clone().narrow(0, from, m),
        )
    };
    let comm = local::world(1, CommOptions::default()).pop().expect("one rank");
    let options = DdpOptions::default().with_precision(precision);
    let (mut ddp, mut net) = DataParallel::wrap(Box::new(comm), ResNet::new(shape, &device), options)?;
    let mut peaks = Vec::new();
    for m in [16usize, 64] {
        let _ = loss(&net, 0, m).backward();
        meter.reset_peak();
        drop(loss(&net, 0, m).backward());
        peaks.push((m, meter.peak()));
    }
    let (fixed, per_sample) = ballast::balancer::fit_memory_line(&peaks);
    let largest = ((budget as f64 * 0.9 - fixed) / per_sample.max(1.0)).floor().max(0.0);
    let mut optim = burn::optim::AdamConfig::new().init();
    let mut timed = Vec::new();
    let mut last_loss = f64::NAN;
    for step in 0..steps + 3 {
        let started = Instant::now();
        for j in 0..k {
            ddp.backward(&net, loss(&net, j * batch / k, batch / k), batch / k)?;
        }
        let (next, stats) = ddp.step(net, &mut optim, 1e-3)?;
        net = next;
        last_loss = stats.loss;
        if step >= 3 {
            timed.push(started.elapsed().as_secs_f64());
        }
    }
    timed.sort_by(f64::total_cmp);
    let median = timed.get(timed.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(json!({
        "samples_per_s": batch as f64 / median,
        "median_step_s": median,
        "peak_bytes": peaks,
        "bytes_per_sample": per_sample,
        "fixed_bytes": fixed,
        "largest_micro_batch": largest,
        "final_loss": last_loss,
        "steps": steps,
    }))
}

/// A managed buffer of at most an eighth of the free memory (and at most 1 GiB): written on the
/// host, prefetched to the device and back, read back exactly.
fn check_managed(inventory: &GpuInventory) -> Outcome {
    let free = inventory.devices[0].free_bytes;
    let bytes = (free / 8).min(1 << 30);
    let len = (bytes / 4) as usize;
    let mut buffer = ManagedBuffer::new(0, len)?;
    for (i, v) in buffer.as_mut_slice().iter_mut().enumerate() {
        *v = (i % 65_536) as f32;
    }
    let started = Instant::now();
    buffer.prefetch_to_device()?;
    buffer.wait()?;
    let to_device = started.elapsed().as_secs_f64();
    let started = Instant::now();
    buffer.prefetch_to_host()?;
    buffer.wait()?;
    let to_host = started.elapsed().as_secs_f64();
    let exact = buffer
        .as_slice()
        .iter()
        .enumerate()
        .all(|(i, &v)| v == (i % 65_536) as f32);
    drop(buffer);
    let chunked = chunked_update(free)?;
    let chunked_ok = chunked.get("ok").and_then(Value::as_bool).unwrap_or(false);
    Ok(object(json!({
        "pass": exact && chunked_ok, "bytes": len * 4, "free_bytes": free, "values_exact": exact,
        "prefetch_to_device_gb_per_s": (len * 4) as f64 / to_device / 1e9,
        "prefetch_to_host_gb_per_s": (len * 4) as f64 / to_host / 1e9,
        "chunked_device_update": chunked,
    })))
}

/// Adam on the GPU over managed state in several chunks against the host Adam on the same
/// values: three steps each of Adam with an L2 penalty and of AdamW, every parameter and moment
/// compared bit for bit. The four managed buffers take at most a sixteenth of the free memory.
fn chunked_update(free: u64) -> Result<Value, Stop> {
    let len = ((free / 16 / 16) as usize).min(1 << 24);
    let chunk_len = len.div_ceil(5);
    let gpu = ChunkedAdam::with_chunk_len(0, chunk_len)?;
    let mut results = Vec::new();
    let mut ok = true;
    for decoupled in [false, true] {
        let config = HostAdamConfig {
            weight_decay: 0.01,
            decoupled,
            ..Default::default()
        };
        let value = |i: usize, salt: usize| (((i * 7919 + salt * 104_729) % 20_011) as f32 - 10_005.0) * 1e-4;
        let mut host_params: Vec<f32> = (0..len).map(|i| value(i, 1)).collect();
        let mut host = HostAdam::new(len, config);
        let mut params = StateBuffer::managed(0, len)?;
        params.copy_from_slice(&host_params);
        let mut grads = StateBuffer::managed(0, len)?;
        let mut device = HostAdam::with_buffers(StateBuffer::managed(0, len)?, StateBuffer::managed(0, len)?, config);
        let mut seconds = 0.0;
        let mut stats = None;
        for step in 0..3 {
            let g: Vec<f32> = (0..len).map(|i| value(i, step + 2)).collect();
            host.step(&mut host_params, &g, 1e-3);
            grads.copy_from_slice(&g);
            let started = Instant::now();
            stats = Some(device.step_on_gpu(&gpu, &mut params, &grads, 1e-3)?);
            seconds += started.elapsed().as_secs_f64();
        }
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        let (hm, hv) = host.moments();
        let (dm, dv) = device.moments();
        let differing = [same(&host_params, &params), same(hm, dm), same(hv, dv)];
        ok &= differing == [0, 0, 0];
        results.push(json!({
            "decoupled": decoupled, "elements": len, "stats": stats,
            "differing_params_m_v": differing,
            "gb_per_s_through_pcie": stats.map(|s| (s.to_device_bytes + s.to_host_bytes) as f64 * 3.0 / seconds / 1e9),
        }));
    }
    Ok(json!({"ok": ok, "runs": results}))
}
