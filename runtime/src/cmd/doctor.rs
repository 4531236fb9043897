//! `ballast doctor`: what this process can see, in plain lines, never a panic.

use std::{path::Path, process::ExitCode};

use anyhow::Result;
use ballast::cluster::{self, Launch};
use serde_json::json;

/// Options of `ballast doctor`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs the command.
pub fn run(args: &Args) -> Result<ExitCode> {
    let launch = Launch::from_env();
    let (launcher, rank, world, local_rank) = match &launch {
        Ok(l) => (l.launcher.to_string(), l.rank, l.world_size, l.local_rank),
        Err(e) => (format!("invalid launcher environment: {e}"), 0, 1, 0),
    };
    let mpi = mpi_line();
    let (cuda, nccl, devices) = gpu_lines(local_rank);
    let mem = cluster::host_memory(Path::new("/"));
    let swappiness = cluster::swappiness(Path::new("/"));
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if args.json {
        let v = json!({
            "host": cluster::hostname(),
            "cpus_allowed": cluster::cpu_affinity(),
            "launcher": launcher,
            "rank": rank,
            "world_size": world,
            "local_rank": local_rank,
            "mpi": mpi,
            "cuda": cuda,
            "nccl": nccl,
            "devices": devices,
            "host_memory": mem.as_ref().ok(),
            "swappiness": swappiness,
            "env": cluster::relevant_env(),
        });
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("host         {}", cluster::hostname());
    // Ranks of one host with the same list share those cores: the planner treats them as one
    // compute group.
    println!(
        "cpus         {}",
        cluster::cpu_affinity().unwrap_or_else(|| "unknown".into())
    );
    println!("launcher     {launcher}");
    println!("rank         {rank} of {world} (local rank {local_rank})");
    println!("mpi          {mpi}");
    println!("cuda         {cuda}");
    println!("nccl         {nccl}");
    if devices.is_empty() {
        println!("devices      no GPU: ranks run on CPU");
    }
    for d in &devices {
        println!("device       {d}");
    }
    match &mem {
        Ok(m) => println!(
            "host memory  {:.1} GiB total, {:.1} GiB available; swap {:.1} GiB ({:.1} GiB free), swappiness {}",
            gib(m.total),
            gib(m.available),
            gib(m.swap_total),
            gib(m.swap_free),
            swappiness.map_or("unknown".to_string(), |s| s.to_string())
        ),
        Err(e) => println!("host memory  unknown: {e}"),
    }
    println!(
        "cores        {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (k, v) in cluster::relevant_env() {
        println!("env          {k}={v}");
    }
    Ok(ExitCode::SUCCESS)
}

fn mpi_line() -> String {
    #[cfg(feature = "mpi")]
    {
        let version = ballast::collectives::mpi::MpiCommunicator::library_version();
        version
            .lines()
            .next()
            .unwrap_or("unknown")
            .trim_matches(|c: char| c.is_whitespace() || c == '\0')
            .to_string()
    }
    #[cfg(not(feature = "mpi"))]
    {
        "not built in (rebuild with --features mpi to run under mpirun/srun)".to_string()
    }
}

/// CUDA and NCCL presence and the devices with their memory.
fn gpu_lines(local_rank: usize) -> (String, String, Vec<String>) {
    #[cfg(feature = "cuda")]
    {
        use ballast::collectives::nccl;
        let nccl_line = if nccl::nccl_present() {
            "libnccl found".to_string()
        } else {
            "no NCCL: libnccl.so not found".to_string()
        };
        let inventory = match nccl::inventory() {
            Ok(inventory) => inventory,
            Err(ballast::collectives::Error::LibraryMissing { .. }) => {
                return (
                    "no GPU: libcuda.so (the NVIDIA driver) not found".into(),
                    nccl_line,
                    Vec::new(),
                )
            }
            Err(e) => {
                return (
                    format!("no GPU: driver present but unusable: {e}"),
                    nccl_line,
                    Vec::new(),
                )
            }
        };
        let nccl_line = match inventory.nccl_version {
            Some(v) => format!("NCCL {}.{}.{}", v / 10000, v / 100 % 100, v % 100),
            None => nccl_line,
        };
        let count = inventory.devices.len();
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let mine = cluster::device_for_local_rank(local_rank, visible.as_deref(), Some(count));
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let devices = inventory
            .devices
            .iter()
            .map(|d| {
                format!(
                    "cuda:{} {}: {:.1} GiB free of {:.1} GiB{}",
                    d.ordinal,
                    d.name,
                    gib(d.free_bytes),
                    gib(d.total_bytes),
                    if matches!(mine, Ok(m) if m == d.ordinal) {
                        " (this rank's)"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        let v = inventory.driver_cuda_version;
        (
            format!("driver supports CUDA {}.{}, {count} device(s)", v / 1000, v % 1000 / 10),
            nccl_line,
            devices,
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = local_rank;
        (
            "not built in (CPU ranks only; build with --features cuda for GPUs)".into(),
            "not built in".into(),
            Vec::new(),
        )
    }
}
