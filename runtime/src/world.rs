//! Connecting to the job: the communicator for this process, whatever started it.

use ballast_cluster::Launch;
use ballast_collectives::{CommOptions, Communicator};

use crate::device::DeviceChoice;

/// Why the world could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// The launcher environment is malformed.
    #[error(transparent)]
    Launch(#[from] ballast_cluster::Error),
    /// A collective backend failed to start.
    #[error(transparent)]
    Collectives(#[from] ballast_collectives::Error),
    /// The rank's device is not available in this binary.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
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

/// A rank a launcher started: its communicator, the device it trains on and, on a GPU, the
/// GPU's ordinal.
pub struct LaunchedRank {
    /// The communicator: MPI, or NCCL over MPI on a GPU rank (feature `cuda`).
    pub comm: Box<dyn Communicator>,
    /// The device for this rank's model (with autodiff).
    pub device: burn::tensor::Device,
    /// The GPU ordinal, when the device is a GPU.
    pub gpu: Option<usize>,
}

/// Joins the job as [`launched_communicator`] does and picks this rank's device: with the
/// `cuda` feature and a GPU present, the GPU for this local rank (honouring
/// `CUDA_VISIBLE_DEVICES`), whose gradients are then summed over NCCL with MPI underneath as
/// the control plane; otherwise the CPU (`flex`). `None` when ranks should run as threads.
/// (The GPU branch is not yet verified on a GPU.)
///
/// # Errors
/// As [`launched_communicator`]; no GPU for this local rank; NCCL failing to start.
pub fn join(launch: &Launch, options: CommOptions) -> Result<Option<LaunchedRank>, WorldError> {
    join_on(launch, options, None)
}

/// As [`join`], on the device `choice` names when it names one: `cuda[:N]` takes NCCL over MPI
/// (`cuda` is this local rank's GPU), `wgpu`, `wgpu:cpu` and `flex` take MPI for their data.
///
/// # Errors
/// As [`join`]; [`WorldError::Device`] when this binary lacks the device's backend.
pub fn join_on(
    launch: &Launch,
    options: CommOptions,
    choice: Option<DeviceChoice>,
) -> Result<Option<LaunchedRank>, WorldError> {
    let Some(comm) = launched_communicator(launch, options)? else {
        return Ok(None);
    };
    match choice {
        Some(DeviceChoice::Cuda(ordinal)) => on_gpu(comm, launch, ordinal),
        Some(other) => Ok(Some(LaunchedRank {
            comm,
            device: other.device(launch.local_rank)?.autodiff(),
            gpu: None,
        })),
        #[cfg(feature = "cuda")]
        None if ballast_collectives::nccl::cuda_present() => on_gpu(comm, launch, None),
        None => Ok(Some(LaunchedRank {
            comm,
            device: burn::tensor::Device::flex().autodiff(),
            gpu: None,
        })),
    }
}

/// A launched rank on a GPU (`ordinal`, or this local rank's), with NCCL over `comm`.
#[cfg(feature = "cuda")]
fn on_gpu(
    comm: Box<dyn Communicator>,
    launch: &Launch,
    ordinal: Option<usize>,
) -> Result<Option<LaunchedRank>, WorldError> {
    let gpu = match ordinal {
        Some(gpu) => gpu,
        None => {
            let count = cudarc::driver::CudaContext::device_count().ok().map(|c| c as usize);
            let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
            ballast_cluster::device_for_local_rank(launch.local_rank, visible.as_deref(), count)?
        }
    };
    let comm: Box<dyn Communicator> = Box::new(ballast_collectives::nccl::NcclCommunicator::new(comm, gpu)?);
    Ok(Some(LaunchedRank {
        comm,
        device: burn::tensor::Device::cuda(gpu).autodiff(),
        gpu: Some(gpu),
    }))
}

#[cfg(not(feature = "cuda"))]
fn on_gpu(
    _comm: Box<dyn Communicator>,
    _launch: &Launch,
    ordinal: Option<usize>,
) -> Result<Option<LaunchedRank>, WorldError> {
    Err(WorldError::Device(
        DeviceChoice::Cuda(ordinal).device(0).expect_err("cuda is not built"),
    ))
}
