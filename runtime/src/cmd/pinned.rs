//! What the multi-rank benchmarks (`bench hetero`, `bench sharded`) share: the launcher's world
//! and each rank's budget.

use anyhow::{bail, Result};
use ballast::{
    collectives::{CommOptions, Communicator},
    world::launched_communicator,
};

/// This process's communicator in the launcher's world; outside a launcher, an error saying how
/// to start `ballast bench <name>` on unequal ranks.
///
/// # Errors
/// Launcher variables that are malformed, a world that cannot be joined, or no launcher.
pub fn pinned_world(name: &str) -> Result<Box<dyn Communicator>> {
    let launch = ballast::cluster::Launch::from_env()?;
    match launched_communicator(&launch, CommOptions::from_env()?)? {
        Some(comm) => Ok(comm),
        None => bail!(
            "run this under mpirun with unequal ranks, e.g. mpirun -np 3 cluster/pin-by-rank.sh 0 1 1 -- \
             target/release/ballast bench {name} --json"
        ),
    }
}

/// Rank `rank`'s memory budget from `--budgets` (one value applies to every rank).
///
/// # Errors
/// A value that is not a size, or too few values.
pub fn rank_budget(budgets: &[String], rank: usize) -> Result<u64> {
    let text = match budgets.len() {
        1 => &budgets[0],
        n if n > rank => &budgets[rank],
        n => bail!("--budgets has {n} values but this is rank {rank}; give one per rank or one for all"),
    };
    ballast::cluster::parse_bytes(text).map_err(anyhow::Error::msg)
}
