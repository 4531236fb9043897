//! `ballast bench allreduce`: the all-reduce `DataParallel` runs each step against raw
//! `MPI_Allreduce`. Ours is `Communicator::all_reduce_sum_buckets` over the message cut into
//! 25 MiB buckets (host buffers): every bucket read once, one collective for all of them, every
//! bucket written back once, as a step's gradient buckets are reduced on a host communicator.
//!
//! Bandwidths follow nccl-tests' definitions: `algbw = bytes / time` and, for all-reduce,
//! `busbw = algbw * 2 (n - 1) / n`, the bandwidth each link must carry in a ring, comparable
//! across rank counts. Times are the slowest rank's per iteration, averaged.

use std::process::ExitCode;

use anyhow::Result;

/// Options of `ballast bench allreduce`.
#[derive(clap::Args)]
pub struct AllreduceArgs {
    /// Print JSON lines (the last one is the 100 MiB summary).
    #[arg(long)]
    pub json: bool,
    /// Smallest message in bytes.
    #[arg(long, default_value_t = 1 << 10)]
    pub min_bytes: usize,
    /// Largest message in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    pub max_bytes: usize,
    /// Size multiplier between steps.
    #[arg(long, default_value_t = 4)]
    pub step_factor: usize,
    /// Iterations of the 100 MiB summary measurement (each times both paths).
    #[arg(long, default_value_t = 12)]
    pub summary_iters: usize,
}

/// Runs the benchmark (it needs MPI).
#[cfg(not(feature = "mpi"))]
pub fn run(_args: &AllreduceArgs) -> Result<ExitCode> {
    anyhow::bail!(
        "bench allreduce compares against raw MPI_Allreduce: build with `cargo build --release -p ballast \
         --features mpi,cli,testkit` and run under `mpirun -np 2 target/release/ballast bench allreduce --json`"
    )
}

/// Runs the benchmark under a launcher.
#[cfg(feature = "mpi")]
pub fn run(args: &AllreduceArgs) -> Result<ExitCode> {
    use std::time::Instant;

    use anyhow::{bail, ensure};
    use ballast::collectives::{
        bucket::{BucketLayout, DEFAULT_BUCKET_CAP_BYTES},
        mpi::{raw_all_reduce_sum_f32, MpiCommunicator},
        CommOptions, Communicator, CommunicatorExt, DeviceBuffer,
    };
    use serde_json::json;

    ensure!(args.step_factor >= 2, "--step-factor must be at least 2");
    ensure!(
        args.min_bytes >= 4 && args.min_bytes <= args.max_bytes,
        "need 4 <= --min-bytes <= --max-bytes"
    );
    let launch = ballast::cluster::Launch::from_env()?;
    if !launch.is_launched() {
        bail!("run this under a launcher: mpirun --allow-run-as-root --oversubscribe -np 2 target/release/ballast bench allreduce --json");
    }
    let mut comm = MpiCommunicator::init(CommOptions::from_env()?)?;
    let n = comm.world_size();
    let rank = comm.rank();
    let bus_factor = 2.0 * (n as f64 - 1.0) / n as f64;

    // Times one size; returns (ours, raw) mean seconds of the slowest rank per iteration, the
    // buckets, and the collectives ours started per iteration (counted by the communicator).
    let mut measure = |bytes: usize, iters: usize| -> Result<(f64, f64, usize, f64)> {
        let elems = bytes / 4;
        let layout = BucketLayout::new(&[elems], DEFAULT_BUCKET_CAP_BYTES, 4)?;
        let mut buckets: Vec<Vec<f32>> = layout.buckets().map(|r| vec![0.0f32; r.len()]).collect();
        let mut ours_once = |comm: &mut MpiCommunicator| -> Result<()> {
            let mut views: Vec<&mut dyn DeviceBuffer> =
                buckets.iter_mut().map(|b| b as &mut dyn DeviceBuffer).collect();
            comm.all_reduce_sum_buckets(&mut views)?;
            Ok(())
        };
        let mut raw = vec![0.0f32; elems];
        for _ in 0..2 {
            ours_once(&mut comm)?;
            raw_all_reduce_sum_f32(&comm, &mut raw)?;
        }
        let mut collectives = 0;
        let mut ours = Vec::with_capacity(iters);
        let mut mpi = Vec::with_capacity(iters);
        for i in 0..iters {
            // Alternate which goes first so drift in machine load hits both equally.
            for first_ours in [i % 2 == 0, i % 2 != 0] {
                comm.barrier()?;
                let t = Instant::now();
                if first_ours {
                    let before = comm.collectives_started();
                    ours_once(&mut comm)?;
                    ours.push(t.elapsed().as_secs_f64());
                    collectives += comm.collectives_started() - before;
                } else {
                    raw_all_reduce_sum_f32(&comm, &mut raw)?;
                    mpi.push(t.elapsed().as_secs_f64());
                }
            }
        }
        // Slowest rank per iteration.
        let all: Vec<(Vec<f64>, Vec<f64>)> = comm.all_gather(&(ours, mpi))?;
        let slowest = |which: usize| -> f64 {
            (0..iters)
                .map(|i| {
                    all.iter()
                        .map(|(o, m)| if which == 0 { o[i] } else { m[i] })
                        .fold(0.0, f64::max)
                })
                .sum::<f64>()
                / iters as f64
        };
        Ok((
            slowest(0),
            slowest(1),
            layout.num_buckets(),
            collectives as f64 / iters as f64,
        ))
    };

    let report =
        |bytes: usize, iters: usize, (ours, raw, buckets, collectives): (f64, f64, usize, f64), summary: bool| {
            let gbs = |t: f64| bytes as f64 / t / 1e9;
            let line = json!({
                "bench": "allreduce",
                "summary": summary,
                "bytes": bytes,
                "ranks": n,
                "iters": iters,
                "buckets": buckets,
                "collectives_per_iter": collectives,
                "bucket_cap_bytes": DEFAULT_BUCKET_CAP_BYTES,
                "ours": {"time_us": ours * 1e6, "algbw_gbs": gbs(ours), "busbw_gbs": gbs(ours) * bus_factor},
                "mpi": {"time_us": raw * 1e6, "algbw_gbs": gbs(raw), "busbw_gbs": gbs(raw) * bus_factor},
                "ratio_vs_mpi": raw / ours,
                "target_ratio": 0.90,
            });
            line
        };

    if rank == 0 && !args.json {
        println!(
            "{:>12} {:>6} {:>12} {:>10} {:>12} {:>10} {:>8}",
            "bytes", "iters", "ours us", "busbw", "mpi us", "busbw", "ratio"
        );
    }
    let mut bytes = args.min_bytes;
    while bytes <= args.max_bytes {
        // Enough iterations for about 0.5 s of traffic per path, between 3 and 200.
        let iters = ((512usize << 20) / bytes).clamp(3, 200);
        let measured = measure(bytes, iters)?;
        let (ours, raw) = (measured.0, measured.1);
        if rank == 0 {
            let line = report(bytes, iters, measured, false);
            if args.json {
                println!("{line}");
            } else {
                println!(
                    "{bytes:>12} {iters:>6} {:>12.1} {:>10.3} {:>12.1} {:>10.3} {:>8.3}",
                    ours * 1e6,
                    line["ours"]["busbw_gbs"].as_f64().unwrap_or(0.0),
                    raw * 1e6,
                    line["mpi"]["busbw_gbs"].as_f64().unwrap_or(0.0),
                    raw / ours
                );
            }
        }
        bytes *= args.step_factor;
    }
    let summary_bytes = 100 << 20;
    let measured = measure(summary_bytes, args.summary_iters.max(3))?;
    let (ours, raw) = (measured.0, measured.1);
    if rank == 0 {
        let line = report(summary_bytes, args.summary_iters.max(3), measured, true);
        if args.json {
            println!("{line}");
        } else {
            println!("100 MiB: ratio_vs_mpi {:.3} (target >= 0.90)", raw / ours);
        }
    }
    Ok(ExitCode::SUCCESS)
}
