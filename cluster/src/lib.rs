//! Launcher bootstrap: who am I, how many are we, which device is mine, what does this host have.
//!
//! ballast runs one process per device under `mpirun` or `srun`; each launcher tells a process
//! its place through environment variables. [`Launch::from_env`] reads them, first match wins:
//!
//! | launcher | rank | world size | local rank |
//! |---|---|---|---|
//! | Open MPI `mpirun` | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK` |
//! | MPICH / Hydra | `PMI_RANK` | `PMI_SIZE` | `MPI_LOCALRANKID` |
//! | Slurm `srun` | `SLURM_PROCID` | `SLURM_NTASKS` | `SLURM_LOCALID` |
//!
//! With none of them set there is no launcher: ballast runs its ranks as threads.
//!
//! This crate reads the environment and `/proc` only; it starts nothing and links no MPI or CUDA.
//!
//! ```
//! use ballast_cluster::{Launch, Launcher};
//!
//! let env = [("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0")];
//! let launch = Launch::from_vars(|k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).unwrap();
//! assert_eq!((launch.launcher, launch.rank, launch.world_size, launch.local_rank), (Launcher::OpenMpi, 2, 4, 0));
//! ```
#![warn(missing_docs)]

pub mod restart;

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of launcher discovery and host inspection.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A launcher variable holds something that is not a number, or is inconsistent.
    #[error("launcher variable {var}={value:?} is invalid: {reason}")]
    BadVariable {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// `CUDA_VISIBLE_DEVICES` leaves no device for this local rank.
    #[error(
        "local rank {local_rank} has no GPU: CUDA_VISIBLE_DEVICES={visible:?} lists {count} device(s); \
         start at most {count} processes per host (mpirun --map-by ppr:{count}:node) or list more devices"
    )]
    NoDeviceForRank {
        /// This process's local rank.
        local_rank: usize,
        /// The variable's value.
        visible: String,
        /// Devices it lists.
        count: usize,
    },
    /// A `/proc` file could not be read or parsed.
    #[error("cannot read {path}: {reason}")]
    Proc {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A job cannot be started again as asked (see [`restart`]).
    #[error("{reason}")]
    Restart {
        /// Why, and what to change.
        reason: String,
    },
    /// A byte size that cannot be read.
    #[error("{input:?} is not a byte size: {reason}")]
    Bytes {
        /// What was given.
        input: String,
        /// Why, and the accepted forms.
        reason: String,
    },
}

/// Who started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Launcher {
    /// Open MPI's `mpirun`/`mpiexec`.
    OpenMpi,
    /// MPICH's Hydra (`mpiexec.hydra`, `mpirun.mpich`) or another PMI launcher.
    Hydra,
    /// Slurm's `srun`.
    Slurm,
    /// No launcher: ranks run as threads in this process.
    None,
}

impl std::fmt::Display for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Launcher::OpenMpi => "Open MPI mpirun",
            Launcher::Hydra => "MPICH Hydra",
            Launcher::Slurm => "Slurm srun",
            Launcher::None => "none (ranks run as threads)",
        })
    }
}

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// Who started us.
    pub launcher: Launcher,
    /// Global rank.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Rank among the processes on this host (picks the GPU).
    pub local_rank: usize,
}

const LAUNCHERS: [(Launcher, &str, &str, &str); 3] = [
    (
        Launcher::OpenMpi,
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
    ),
    (Launcher::Hydra, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    (Launcher::Slurm, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
];

impl Launch {
    /// Reads the process environment.
    ///
    /// # Errors
    /// [`Error::BadVariable`] when a launcher variable is malformed.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads variables through `get` (for tests and for launchers that pass them otherwise).
    ///
    /// # Errors
    /// [`Error::BadVariable`] when a launcher variable is malformed.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        for (launcher, rank_var, size_var, local_var) in LAUNCHERS {
            let Some(rank_raw) = get(rank_var) else { continue };
            let rank = parse(rank_var, &rank_raw)?;
            let size_raw = get(size_var).ok_or_else(|| Error::BadVariable {
                var: size_var,
                value: String::new(),
                reason: format!("{rank_var} is set but {size_var} is not; is the launcher environment complete?"),
            })?;
            let world_size = parse(size_var, &size_raw)?;
            if world_size == 0 || rank >= world_size {
                return Err(Error::BadVariable {
                    var: rank_var,
                    value: rank_raw,
                    reason: format!("rank must be below {size_var}={world_size}"),
                });
            }
            // Hydra sets MPI_LOCALRANKID only on some versions; Slurm always sets SLURM_LOCALID.
            let local_rank = match get(local_var) {
                Some(raw) => parse(local_var, &raw)?,
                None => 0,
            };
            return Ok(Self {
                launcher,
                rank,
                world_size,
                local_rank,
            });
        }
        Ok(Self {
            launcher: Launcher::None,
            rank: 0,
            world_size: 1,
            local_rank: 0,
        })
    }

    /// Whether a launcher started this process (and the MPI backend should be used).
    pub fn is_launched(&self) -> bool {
        self.launcher != Launcher::None
    }
}

fn parse(var: &'static str, raw: &str) -> Result<usize> {
    raw.trim().parse().map_err(|_| Error::BadVariable {
        var,
        value: raw.to_string(),
        reason: "expected a non-negative integer".into(),
    })
}

/// The CUDA device ordinal for `local_rank`, honouring `CUDA_VISIBLE_DEVICES`.
///
/// When the variable is set, CUDA renumbers the visible devices from 0, so the ordinal is the
/// local rank itself, provided the list is long enough. Unset, all devices are visible and the
/// local rank is used directly; `device_count` (when known) bounds it.
///
/// # Errors
/// [`Error::NoDeviceForRank`] when the local rank has no device.
pub fn device_for_local_rank(local_rank: usize, visible: Option<&str>, device_count: Option<usize>) -> Result<usize> {
    let count = match visible {
        Some(v) => {
            let n = v.split(',').filter(|s| !s.trim().is_empty()).count();
            Some((n, v.to_string()))
        }
        None => device_count.map(|n| (n, "<unset>".to_string())),
    };
    if let Some((n, visible)) = count {
        if local_rank >= n {
            return Err(Error::NoDeviceForRank {
                local_rank,
                visible,
                count: n,
            });
        }
    }
    Ok(local_rank)
}

/// Parses a byte size: `1024`, `512KiB`, `768MiB`, `2GiB`, `1.5GB` (SI units are powers of
/// 1000, IEC units of 1024; case-insensitive).
///
/// # Errors
/// [`Error::Bytes`] naming the input and the accepted forms.
pub fn parse_bytes(input: &str) -> Result<u64> {
    let bad = |reason: String| Error::Bytes {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| bad("use e.g. 512MiB, 2GiB or 1000000".into()))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        other => {
            return Err(bad(format!(
                "unknown unit {other:?}; use B, KB, MB, GB, KiB, MiB or GiB"
            )))
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad("out of range".into()));
    }
    Ok(bytes.round() as u64)
}

/// Host memory facts from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMemory {
    /// `MemTotal`.
    pub total: u64,
    /// `MemAvailable`.
    pub available: u64,
    /// `SwapTotal`.
    pub swap_total: u64,
    /// `SwapFree`.
    pub swap_free: u64,
}

/// Reads [`HostMemory`] from `<root>/proc/meminfo` (`root` is `/` on a real host; tests pass a
/// fake tree).
///
/// # Errors
/// [`Error::Proc`] when the file is missing or lacks a field.
pub fn host_memory(root: &Path) -> Result<HostMemory> {
    let path = root.join("proc/meminfo");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Proc {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| Error::Proc {
                path: path.display().to_string(),
                reason: format!("no {name} line"),
            })
    };
    Ok(HostMemory {
        total: field("MemTotal")?,
        available: field("MemAvailable")?,
        swap_total: field("SwapTotal")?,
        swap_free: field("SwapFree")?,
    })
}

/// Swappiness from `<root>/proc/sys/vm/swappiness`, if readable.
pub fn swappiness(root: &Path) -> Option<u32> {
    std::fs::read_to_string(root.join("proc/sys/vm/swappiness"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The CPUs this process may run on (`Cpus_allowed_list` of `/proc/self/status`, e.g. `0-3,8`),
/// or `None` where the kernel does not say.
pub fn cpu_affinity() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// This host's name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Environment variables that change how MPI, NCCL and ballast behave, with their values, for
/// `ballast doctor` and error reports.
pub fn relevant_env() -> Vec<(String, String)> {
    const PREFIXES: [&str; 8] = ["BALLAST_", "OMPI_", "PMI_", "SLURM_", "NCCL_", "CUDA_", "MPI_", "UCX_"];
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| PREFIXES.iter().any(|p| k.starts_with(p)))
        .collect();
    vars.sort();
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn each_launcher_is_recognised() {
        let ompi = Launch::from_vars(vars(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ]))
        .unwrap();
        assert_eq!(
            (ompi.launcher, ompi.rank, ompi.world_size, ompi.local_rank),
            (Launcher::OpenMpi, 1, 3, 1)
        );
        let hydra = Launch::from_vars(vars(&[("PMI_RANK", "3"), ("PMI_SIZE", "4"), ("MPI_LOCALRANKID", "1")])).unwrap();
        assert_eq!(
            (hydra.launcher, hydra.rank, hydra.world_size, hydra.local_rank),
            (Launcher::Hydra, 3, 4, 1)
        );
        let slurm = Launch::from_vars(vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
        ]))
        .unwrap();
        assert_eq!(
            (slurm.launcher, slurm.rank, slurm.world_size, slurm.local_rank),
            (Launcher::Slurm, 5, 8, 1)
        );
        let none = Launch::from_vars(vars(&[])).unwrap();
        assert_eq!((none.launcher, none.rank, none.world_size), (Launcher::None, 0, 1));
        assert!(!none.is_launched());
    }

    #[test]
    fn bad_launcher_variables_are_errors() {
        let err = Launch::from_vars(vars(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")])).unwrap_err();
        assert!(err.to_string().contains("PMI_RANK=\"x\""), "{err}");
        let err = Launch::from_vars(vars(&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")])).unwrap_err();
        assert!(err.to_string().contains("rank must be below SLURM_NTASKS=4"), "{err}");
        let err = Launch::from_vars(vars(&[("OMPI_COMM_WORLD_RANK", "0")])).unwrap_err();
        assert!(err.to_string().contains("OMPI_COMM_WORLD_SIZE is not"), "{err}");
    }

    #[test]
    fn device_choice_honours_cuda_visible_devices() {
        assert_eq!(device_for_local_rank(1, Some("4,5"), Some(8)).unwrap(), 1);
        let err = device_for_local_rank(2, Some("4,5"), Some(8)).unwrap_err();
        assert!(err.to_string().contains("lists 2 device(s)"), "{err}");
        assert_eq!(device_for_local_rank(3, None, None).unwrap(), 3);
        assert!(device_for_local_rank(3, None, Some(2)).is_err());
        assert!(device_for_local_rank(0, Some(""), None).is_err());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("768MiB").unwrap(), 768 << 20);
        assert_eq!(parse_bytes("2gib").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert!(parse_bytes("12 parsecs")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_bytes("MiB")
            .unwrap_err()
            .to_string()
            .contains("is not a byte size"));
        assert!(parse_bytes("-5MiB").is_err());
    }

    #[test]
    fn meminfo_from_a_fake_root() {
        let dir = std::env::temp_dir().join(format!("ballast-meminfo-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("proc/sys/vm")).unwrap();
        std::fs::write(
            dir.join("proc/meminfo"),
            "MemTotal:       1000 kB\nMemFree: 10 kB\nMemAvailable:    500 kB\nSwapTotal: 64 kB\nSwapFree: 32 kB\n",
        )
        .unwrap();
        std::fs::write(dir.join("proc/sys/vm/swappiness"), "60\n").unwrap();
        let m = host_memory(&dir).unwrap();
        assert_eq!(
            m,
            HostMemory {
                total: 1_024_000,
                available: 512_000,
                swap_total: 65_536,
                swap_free: 32_768
            }
        );
        assert_eq!(swappiness(&dir), Some(60));
        std::fs::write(dir.join("proc/meminfo"), "MemTotal: 1 kB\n").unwrap();
        assert!(host_memory(&dir)
            .unwrap_err()
            .to_string()
            .contains("no MemAvailable line"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
