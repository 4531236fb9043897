//! `ballast plan`: a dry run of the planner for a described cluster.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context, Result};
use ballast::{
    balancer::{solve_sharded, DeviceReport, OffloadPolicy, OptimizerState, Plan, ShardedPlan, Sharding, Tunables},
    cluster::parse_bytes,
};
use plotters::prelude::*;
use serde_json::json;

/// Options of `ballast plan`.
#[derive(clap::Args)]
pub struct Args {
    /// A device as MEMORY:RELATIVE_SPEED[:NAME], e.g. 24GiB:1.0:rtx3090; repeat per device.
    #[arg(long = "device", required = true)]
    devices: Vec<String>,
    /// Model parameters (e.g. 25000000 or 25M).
    #[arg(long)]
    params: String,
    /// Activation memory per sample in a micro-batch (e.g. 40MiB).
    #[arg(long)]
    bytes_per_sample: String,
    /// Samples per optimizer step over all devices.
    #[arg(long)]
    global_batch: usize,
    /// Optimizer: adam (16 bytes per parameter with gradients in f32) or sgd (8).
    #[arg(long, default_value = "adam")]
    optimizer: String,
    /// The float type the replicas compute in: f32, bf16 or f16. A low type adds an f32 master
    /// copy (4 bytes per parameter) to a 2-byte replica, while the gradient sums and the
    /// optimizer's moments stay f32; give `--bytes-per-sample` as measured in that type.
    #[arg(long, default_value = "f32")]
    precision: ballast::Precision,
    /// Samples per second of a device with relative speed 1.0.
    #[arg(long, default_value_t = 100.0)]
    samples_per_sec: f64,
    /// Predicted all-reduce seconds per step.
    #[arg(long, default_value_t = 0.0)]
    allreduce_s: f64,
    /// Fraction of each device's memory kept free.
    #[arg(long, default_value_t = 0.10)]
    margin: f64,
    /// When to move optimizer state to host memory: never, when-needed, when-faster.
    #[arg(long, default_value = "when-needed")]
    offload: String,
    /// Host RAM available for offloaded state (e.g. 64GiB); unchecked when absent.
    #[arg(long)]
    host_memory: Option<String>,
    /// Where Adam's moments live: off (every rank holds all of them), even (one equal shard per
    /// rank) or memory (shards in proportion to the memory each device has left).
    #[arg(long, default_value = "memory")]
    optimizer_sharding: Sharding,
    /// Parameters per second a device's optimizer updates (an assumption: about 28 bytes move
    /// per parameter, so 2.5e10 stands for some 700 GB/s).
    #[arg(long, default_value_t = 2.5e10)]
    optimizer_rate: f64,
    /// Parameters per second the host optimizer updates (`ballast bench adam` measures it; 1e9
    /// is about 27 GB/s).
    #[arg(long, default_value_t = 1e9)]
    host_optimizer_rate: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also draw the plan as an SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// Runs the command.
pub fn run(args: &Args) -> Result<ExitCode> {
    let params = parse_count(&args.params)?;
    // The replica's parameters (and master), the f32 gradient sums, and Adam's two f32 moments.
    let stateless_per_param =
        args.precision.resident_bytes_per_param() + ballast::balance::GRADIENT_SUM_BYTES_PER_PARAM;
    let moments_per_param = match args.optimizer.as_str() {
        "adam" | "adamw" => 8,
        "sgd" => 0,
        other => bail!("unknown optimizer {other:?}: use adam, adamw or sgd"),
    };
    let per_sample = parse_bytes(&args.bytes_per_sample).map_err(anyhow::Error::msg)?;
    if !(0.0..1.0).contains(&args.margin) {
        bail!("--margin must be in [0, 1), got {}", args.margin);
    }
    if args.samples_per_sec.is_nan() || args.samples_per_sec <= 0.0 {
        bail!("--samples-per-sec must be positive, got {}", args.samples_per_sec);
    }
    for (flag, rate) in [
        ("--optimizer-rate", args.optimizer_rate),
        ("--host-optimizer-rate", args.host_optimizer_rate),
    ] {
        if rate.is_nan() || rate <= 0.0 {
            bail!("{flag} must be positive, got {rate}");
        }
    }
    // Adam's two moments are the state to place; the reports carry the rest (parameters,
    // gradients) as fixed bytes.
    let state = OptimizerState {
        params,
        bytes_per_param: moments_per_param,
        device_params_per_sec: args.optimizer_rate,
        host_params_per_sec: args.host_optimizer_rate,
    };
    let stateless = params * stateless_per_param;
    let offload = match args.offload.as_str() {
        "never" => OffloadPolicy::Never,
        "when-needed" => OffloadPolicy::WhenNeeded,
        "when-faster" => OffloadPolicy::WhenFaster,
        other => bail!("--offload {other:?}: use never, when-needed or when-faster"),
    };
    let host_available = match &args.host_memory {
        Some(h) => Some(parse_bytes(h).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let reports = args
        .devices
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let r = parse_device(i, spec, stateless, per_sample, args.samples_per_sec)?;
            Ok(DeviceReport {
                host_available_bytes: host_available,
                ..r
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let tunables = Tunables {
        memory_margin: args.margin,
        offload,
        ..Tunables::default()
    };
    let solve = |sharding| {
        solve_sharded(
            &reports,
            args.global_batch,
            args.allreduce_s,
            &tunables,
            &state,
            sharding,
        )
    };
    let chosen = solve(args.optimizer_sharding)?;
    // The replicated plan beside a sharded one: what sharding changes (it may be infeasible).
    let replicated = match args.optimizer_sharding {
        Sharding::Off => None,
        _ => Some(solve(Sharding::Off)),
    };
    // Reports as the chosen plan sees them: each rank's state in its fixed bytes.
    let planned = with_state(&reports, &chosen, &state);
    if let Some(path) = &args.svg {
        draw(&chosen.plan, &planned, path).with_context(|| format!("drawing {}", path.display()))?;
    }
    if args.json {
        let replicated = match &replicated {
            Some(Ok(p)) => json!(p),
            Some(Err(e)) => json!({"infeasible": e.to_string()}),
            None => json!(null),
        };
        println!(
            "{}",
            json!({"reports": planned, "plan": chosen.plan, "optimizer": chosen, "replicated": replicated,
                   "state": state, "tunables": tunables, "precision": args.precision,
                   "bytes_per_param": stateless_per_param + moments_per_param})
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "precision {}: {} bytes per parameter ({} replica{}, 4 gradient sums, {moments_per_param} optimizer state)",
        args.precision,
        stateless_per_param + moments_per_param,
        args.precision.replica_bytes_per_param(),
        if args.precision.is_mixed() {
            " + 4 f32 master"
        } else {
            ""
        }
    );
    match &replicated {
        Some(Ok(p)) => {
            println!("replicated optimizer state (--optimizer-sharding off):");
            print!(
                "{}",
                ballast::balance::plan_table(&p.plan, &with_state(&reports, p, &state))
            );
            print!("{}", optimizer_lines(p, &state, args.allreduce_s));
            println!();
        }
        Some(Err(e)) => println!("replicated optimizer state (--optimizer-sharding off): {e}\n"),
        None => {}
    }
    if replicated.is_some() {
        println!("optimizer state sharded ({}):", sharding_name(chosen.sharding));
    }
    print!("{}", ballast::balance::plan_table(&chosen.plan, &planned));
    print!("{}", optimizer_lines(&chosen, &state, args.allreduce_s));
    Ok(ExitCode::SUCCESS)
}

fn sharding_name(s: Sharding) -> &'static str {
    match s {
        Sharding::Off => "off",
        Sharding::Even => "even",
        Sharding::Memory => "memory",
    }
}

/// `reports` with each rank's optimizer state in its fixed bytes, as `plan` placed it.
fn with_state(reports: &[DeviceReport], plan: &ShardedPlan, state: &OptimizerState) -> Vec<DeviceReport> {
    reports
        .iter()
        .enumerate()
        .map(|(i, r)| DeviceReport {
            fixed_bytes: r.fixed_bytes + plan.state_bytes(i, state),
            offloadable_bytes: plan.state_bytes(i, state),
            ..r.clone()
        })
        .collect()
}

/// Each rank's optimizer state and the predicted optimizer, collective and step times.
fn optimizer_lines(plan: &ShardedPlan, state: &OptimizerState, allreduce_s: f64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if state.bytes_per_param == 0 {
        return "optimizer without state (sgd): nothing to shard\n".into();
    }
    out.push_str(&ballast::balance::shard_table(plan, state.bytes_per_param));
    let _ = writeln!(
        out,
        "predicted per step: compute and collectives {:.3}s (collectives {allreduce_s:.3}s, --allreduce-s), \
         optimizer {:.3}s, step {:.3}s ({:.1} samples/s)",
        plan.plan.predicted_step_s,
        plan.optimizer_s,
        plan.step_s,
        plan.plan.global_batch as f64 / plan.step_s.max(1e-12)
    );
    out
}

fn parse_count(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('b' | 'B' | 'g' | 'G') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--params {s:?} is not a count; use e.g. 25000000 or 25M"))?;
    if v <= 0.0 || !v.is_finite() {
        bail!("--params must be positive, got {s:?}");
    }
    Ok((v * mult).round() as u64)
}

fn parse_device(i: usize, spec: &str, fixed: u64, per_sample: u64, base_speed: f64) -> Result<DeviceReport> {
    let parts: Vec<&str> = spec.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        bail!("--device {spec:?}: use MEMORY:RELATIVE_SPEED[:NAME], e.g. 24GiB:1.0:rtx3090");
    }
    let budget = parse_bytes(parts[0]).map_err(|e| anyhow::anyhow!("--device {spec:?}: {e}"))?;
    let speed: f64 = parts[1]
        .parse()
        .map_err(|_| anyhow::anyhow!("--device {spec:?}: relative speed {:?} is not a number", parts[1]))?;
    if !(speed > 0.0 && speed.is_finite()) {
        bail!("--device {spec:?}: relative speed must be positive");
    }
    Ok(DeviceReport {
        name: parts.get(2).map_or_else(|| format!("device{i}"), |n| n.to_string()),
        budget_bytes: budget,
        fixed_bytes: fixed,
        bytes_per_sample: per_sample,
        samples_per_sec: speed * base_speed,
        offloadable_bytes: 0,
        host: "host".into(),
        host_available_bytes: None,
        speed_curve: Vec::new(),
        compute_group: None,
    })
}

/// Draws shares and predicted memory against budgets, one group of bars per device.
pub fn draw(plan: &Plan, reports: &[DeviceReport], path: &std::path::Path) -> Result<()> {
    let n = plan.ranks.len();
    let root = SVGBackend::new(path, (320 + 120 * n as u32, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(60 + 60 * n as u32 + 100);
    let max_share = plan.ranks.iter().map(|r| r.share).max().unwrap_or(1).max(1) as f64;
    let mut chart = ChartBuilder::on(&left)
        .caption("share of the global batch", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..n as f64, 0f64..max_share * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("rank")
        .y_desc("samples per step")
        .draw()?;
    chart.draw_series(plan.ranks.iter().enumerate().map(|(i, r)| {
        Rectangle::new(
            [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, r.share as f64)],
            BLUE.mix(0.6).filled(),
        )
    }))?;
    let max_mem = reports.iter().map(|r| r.budget_bytes).max().unwrap_or(1) as f64 / (1u64 << 20) as f64;
    let mut mem = ChartBuilder::on(&right)
        .caption("memory: budget (grey) and predicted peak", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n as f64, 0f64..max_mem * 1.1)?;
    mem.configure_mesh().x_desc("rank").y_desc("MiB").draw()?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    mem.draw_series(reports.iter().enumerate().map(|(i, d)| {
        Rectangle::new(
            [(i as f64 + 0.1, 0.0), (i as f64 + 0.9, mib(d.budget_bytes))],
            BLACK.mix(0.2).filled(),
        )
    }))?;
    mem.draw_series(plan.ranks.iter().enumerate().map(|(i, r)| {
        Rectangle::new(
            [(i as f64 + 0.25, 0.0), (i as f64 + 0.75, mib(r.predicted_peak_bytes))],
            RED.mix(0.6).filled(),
        )
    }))?;
    root.present()?;
    Ok(())
}
