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
    let GpuLines {
        cuda,
        nccl,
        nvrtc,
        devices,
    } = gpu_lines(local_rank);
    let canaries = canary_lines(!devices.is_empty());
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
            "nvrtc": nvrtc,
            "devices": devices,
            "canary": canaries,
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
    println!("nvrtc        {nvrtc}");
    if devices.is_empty() {
        println!("devices      no GPU: ranks run on CPU");
    }
    for d in &devices {
        println!("device       {d}");
    }
    for c in &canaries {
        println!("canary       {c}");
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

/// The start-up check every rank runs ([`ballast::health::canary`]) on each device this binary
/// can drive here: `flex`, `wgpu:cpu` with the wgpu feature, and `cuda:0` when a GPU is there.
fn canary_lines(gpu: bool) -> Vec<String> {
    use ballast::device::DeviceChoice;
    ballast::health::install_device_log();
    let mut choices = vec![DeviceChoice::Flex];
    if cfg!(feature = "wgpu") {
        choices.push(DeviceChoice::WgpuCpu);
    }
    if gpu {
        choices.push(DeviceChoice::Cuda(Some(0)));
    }
    choices
        .into_iter()
        .map(|choice| {
            let verdict = match choice.device(0) {
                Ok(device) => match ballast::health::canary(&device) {
                    Ok(()) => "ok (products, matmul and sums exact)".to_string(),
                    Err(e) => format!("FAILED: {e}"),
                },
                Err(e) => format!("not available: {e}"),
            };
            format!("{choice}: {verdict}")
        })
        .collect()
}

/// What `doctor` says about the GPU side.
struct GpuLines {
    cuda: String,
    nccl: String,
    nvrtc: String,
    devices: Vec<String>,
}

/// The driver, NCCL and NVRTC (each present with its version and file, or absent with the fix)
/// and the devices with their memory.
fn gpu_lines(local_rank: usize) -> GpuLines {
    #[cfg(feature = "cuda")]
    {
        use ballast::collectives::nccl;
        let (nccl_line, nvrtc_line, nvrtc_version) = library_lines();
        let inventory = match nccl::inventory() {
            Ok(inventory) => inventory,
            Err(e) => {
                let cuda = match e {
                    ballast::collectives::Error::LibraryMissing { .. } => {
                        "no GPU: libcuda.so (the NVIDIA driver) not found".to_string()
                    }
                    e => format!("no GPU: driver present but unusable: {e}"),
                };
                return GpuLines {
                    cuda,
                    nccl: nccl_line,
                    nvrtc: nvrtc_line,
                    devices: Vec::new(),
                };
            }
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
        let (major, minor) = (v / 1000, v % 1000 / 10);
        let mut nvrtc = nvrtc_line;
        if let Some((n_major, n_minor)) = nvrtc_version {
            if (n_major, n_minor) > (major, minor) {
                nvrtc.push_str(&format!(
                    "; warning: NVRTC {n_major}.{n_minor} is newer than the driver's CUDA {major}.{minor}, so every \
                     kernel fails to load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION): install an NVRTC no newer than \
                     CUDA {major}.{minor}, or a newer driver"
                ));
            }
        }
        GpuLines {
            cuda: format!("driver supports CUDA {major}.{minor}, {count} device(s)"),
            nccl: nccl_line,
            nvrtc,
            devices,
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = local_rank;
        GpuLines {
            cuda: "not built in (CPU ranks only; build with --features cuda for GPUs)".into(),
            nccl: "not built in".into(),
            nvrtc: "not built in".into(),
            devices: Vec::new(),
        }
    }
}

/// NCCL's and NVRTC's lines (version and the file loaded, or what to install), and NVRTC's
/// version. Neither needs a GPU or the driver.
#[cfg(all(feature = "cuda", target_os = "linux"))]
fn library_lines() -> (String, String, Option<(i32, i32)>) {
    use ballast::libs::{self, CudaLibrary};
    let loaded = libs::loaded_paths();
    let at = |lib: CudaLibrary| -> String {
        match loaded.iter().find(|(l, _)| *l == lib).and_then(|(_, p)| p.clone()) {
            Some(path) => format!(" at {}", path.display()),
            None => String::new(),
        }
    };
    let absent = |lib: CudaLibrary| format!("not found (looked for {}): {}", lib.file_names.join(", "), lib.fix);
    let nccl = if ballast::collectives::nccl::nccl_present() {
        match cudarc::nccl::result::get_nccl_version() {
            Ok(v) => format!("NCCL {}.{}.{}{}", v / 10000, v / 100 % 100, v % 100, at(libs::NCCL)),
            Err(e) => format!("NCCL loaded{} but ncclGetVersion failed: {e:?}", at(libs::NCCL)),
        }
    } else {
        absent(libs::NCCL)
    };
    // SAFETY: only tries to load the library.
    let (nvrtc, version) = if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is loaded (checked above); both out-pointers are valid for the call.
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        if status == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            (
                format!("NVRTC {major}.{minor}{}", at(libs::NVRTC)),
                Some((major, minor)),
            )
        } else {
            (
                format!("NVRTC loaded{} but nvrtcVersion failed: {status:?}", at(libs::NVRTC)),
                None,
            )
        }
    } else {
        (absent(libs::NVRTC), None)
    };
    (nccl, nvrtc, version)
}
