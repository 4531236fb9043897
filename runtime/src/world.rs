//! Connecting to the job: the communicator for this process, whatever started it.

use ballast_cluster::Launch;
use ballast_collectives::{CommOptions, Communicator};

use crate::device::DeviceChoice;
use crate::Error;

/// This process's communicator when a launcher started it (MPI), or `None` when ranks should
/// run as threads.
///
/// # Errors
/// [`Error::NoMpi`] when launched but built without the `mpi` feature; backend errors.
pub fn launched_communicator(launch: &Launch, options: CommOptions) -> Result<Option<Box<dyn Communicator>>, Error> {
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
        Err(Error::NoMpi {
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
pub fn join(launch: &Launch, options: CommOptions) -> Result<Option<LaunchedRank>, Error> {
    join_on(launch, options, None)
}

/// As [`join`], on the device `choice` names when it names one: `cuda[:N]` takes NCCL over MPI
/// (`cuda` is this local rank's GPU), `wgpu`, `wgpu:cpu` and `flex` take MPI for their data.
///
/// # Errors
/// As [`join`]; [`Error::NotBuilt`] when this binary lacks the device's backend.
pub fn join_on(
    launch: &Launch,
    options: CommOptions,
    choice: Option<DeviceChoice>,
) -> Result<Option<LaunchedRank>, Error> {
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
fn on_gpu(comm: Box<dyn Communicator>, launch: &Launch, ordinal: Option<usize>) -> Result<Option<LaunchedRank>, Error> {
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
) -> Result<Option<LaunchedRank>, Error> {
    Err(DeviceChoice::Cuda(ordinal).device(0).expect_err("cuda is not built"))
}
