//! Connecting to the job: the communicator for this process, whatever started it.

use ballast_cluster::Launch;
use ballast_collectives::{CommOptions, Communicator};

/// Why the world could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// The launcher environment is malformed.
    #[error(transparent)]
    Launch(#[from] ballast_cluster::Error),
    /// A collective backend failed to start.
    #[error(transparent)]
    Collectives(#[from] ballast_collectives::Error),
    /// A launcher started us but this binary has no MPI support.
    #[error(
        "this process was started by {launcher} (rank {rank} of {world_size}) but ballast was built \
         without MPI; rebuild with `cargo build --release -p ballast --features mpi`"
    )]
    NoMpi {
        /// The launcher found.
        launcher: ballast_cluster::Launcher,
        /// Rank from the environment.
        rank: usize,
        /// World size from the environment.
        world_size: usize,
    },
}

/// This process's communicator when a launcher started it (MPI), or `None` when ranks should
/// run as threads.
///
/// # Errors
/// [`WorldError::NoMpi`] when launched but built without the `mpi` feature; backend errors.
pub fn launched_communicator(
    launch: &Launch,
    options: CommOptions,
) -> Result<Option<Box<dyn Communicator>>, WorldError> {
    if !launch.is_launched() {
        return Ok(None);
    }
    #[cfg(feature = "mpi")]
    {
        let comm = ballast_collectives::mpi::MpiCommunicator::init(options)?;
        Ok(Some(Box::new(comm)))
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = options;
        Err(WorldError::NoMpi {
            launcher: launch.launcher,
            rank: launch.rank,
            world_size: launch.world_size,
        })
    }
}
