//! GPU ranks over NCCL, through `cudarc::nccl` (not yet verified on a GPU).
//!
//! # Bootstrap
//! NCCL needs every rank to hold the same 128-byte unique id. Rank 0 creates it
//! (`ncclGetUniqueId`) and sends it over the **control plane**, any [`Communicator`] spanning
//! the same ranks (in practice the MPI one); every rank then calls `ncclCommInitRank`. The control
//! communicator stays in charge of small metadata, handshakes and agreement; NCCL carries only
//! gradient bytes.
//!
//! # Streams
//! Collectives are enqueued on this communicator's own CUDA stream. [`NcclCommunicator::all_reduce_sum_cuda`]
//! synchronises that stream before returning, so the caller may touch the buffer at once. The
//! caller must have finished writing the buffer on *its* streams before the call (burn: sync the
//! device).
//!
//! # Thread safety
//! An NCCL communicator must not be used from two threads at once; `&mut self` enforces it.
//!
//! # Missing libraries
//! With no `libcuda` or `libnccl` on the machine, [`NcclCommunicator::new`] returns
//! [`Error::LibraryMissing`] instead of panicking (cudarc panics on first use otherwise).
//!
//! # Timeouts
//! Before launching a collective the control plane runs the arrival handshake (a barrier with
//! the [contract](crate::communicator)'s checks), so a missing rank is named there and the GPU
//! never waits on it. A peer that dies *during* the transfer is caught by polling: the wait
//! records an event after the collective and checks, until the communicator's timeout, whether
//! it completed and whether `ncclCommGetAsyncError` reports a failure; on either failure the
//! NCCL communicator is aborted (`ncclCommAbort`), every later call fails at once, and the error
//! says which and why.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use cudarc::{
    driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut},
    nccl::{result as nccl_result, sys as nccl_sys, Id},
};

use crate::{Communicator, Error, Result};

/// Whether the CUDA driver library can be loaded on this machine.
pub fn cuda_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the NCCL library can be loaded on this machine.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// Checks both libraries, as a typed error.
///
/// # Errors
/// [`Error::LibraryMissing`] naming the library that is absent.
pub fn require_libraries() -> Result<()> {
    if !cuda_present() {
        return Err(Error::LibraryMissing {
            lib: "libcuda.so (CUDA driver)",
            fix: "install an NVIDIA driver, or run CPU ranks (build without --features cuda)",
        });
    }
    if !nccl_present() {
        return Err(Error::LibraryMissing {
            lib: "libnccl.so",
            fix: "install NCCL (e.g. apt-get install libnccl2) or add its directory to LD_LIBRARY_PATH",
        });
    }
    Ok(())
}

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuDevice {
    /// Its ordinal among the devices this process sees (after `CUDA_VISIBLE_DEVICES`).
    pub ordinal: usize,
    /// The device's name.
    pub name: String,
    /// Free device memory in bytes when asked.
    pub free_bytes: u64,
    /// Total device memory in bytes.
    pub total_bytes: u64,
}

/// What the CUDA driver and NCCL report on this machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuInventory {
    /// The driver's CUDA version, as `cuDriverGetVersion` encodes it (13000 is CUDA 13.0).
    pub driver_cuda_version: i32,
    /// NCCL's version (`ncclGetVersion`, 22703 is 2.27.3), or `None` without libnccl.
    pub nccl_version: Option<i32>,
    /// Every device with its memory.
    pub devices: Vec<GpuDevice>,
}

/// Asks the driver for its version and every device with its memory, and NCCL for its version.
///
/// # Errors
/// [`Error::LibraryMissing`] without libcuda; [`Error::Gpu`] when the driver fails (for example
/// `CUDA_ERROR_NO_DEVICE` on a machine with a driver but no usable GPU).
pub fn inventory() -> Result<GpuInventory> {
    if !cuda_present() {
        return Err(Error::LibraryMissing {
            lib: "libcuda.so (CUDA driver)",
            fix: "install an NVIDIA driver, or run CPU ranks (build without --features cuda)",
        });
    }
    cudarc::driver::result::init().map_err(|e| gpu("cuInit", 0, e))?;
    let mut version = 0;
    // SAFETY: the driver library is loaded (checked above) and initialised; `version` is a valid
    // out-pointer for the duration of the call.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| gpu("cuDriverGetVersion", 0, e))?;
    let count = CudaContext::device_count().map_err(|e| gpu("cuDeviceGetCount", 0, e))?;
    let mut devices = Vec::new();
    for ordinal in 0..count.max(0) as usize {
        let ctx = CudaContext::new(ordinal).map_err(|e| gpu("cuCtxCreate", 0, e))?;
        let (free, total) = ctx.mem_get_info().map_err(|e| gpu("cuMemGetInfo", 0, e))?;
        devices.push(GpuDevice {
            ordinal,
            name: ctx.name().map_err(|e| gpu("cuDeviceGetName", 0, e))?,
            free_bytes: free as u64,
            total_bytes: total as u64,
        });
    }
    let nccl_version = if nccl_present() {
        Some(nccl_result::get_nccl_version().map_err(|e| gpu("ncclGetVersion", 0, e))?)
    } else {
        None
    };
    Ok(GpuInventory {
        driver_cuda_version: version,
        nccl_version,
        devices,
    })
}

/// The raw NCCL communicator: aborted on drop or on a failed wait, and null after that.
struct RawComm(nccl_sys::ncclComm_t);

impl RawComm {
    fn abort(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a communicator created by ncclCommInitRank and not yet aborted.
            let _ = unsafe { nccl_result::comm_abort(self.0) };
            self.0 = std::ptr::null_mut();
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        self.abort();
    }
}

/// One GPU rank of an NCCL communicator.
pub struct NcclCommunicator {
    control: Box<dyn Communicator>,
    comm: RawComm,
    stream: Arc<CudaStream>,
    aborted: Option<String>,
}

// SAFETY: the NCCL communicator and CUDA stream are only used through `&mut self`, one thread at
// a time; NCCL allows a communicator to move between threads.
unsafe impl Send for NcclCommunicator {}

impl NcclCommunicator {
    /// Creates the NCCL communicator on CUDA device `ordinal`, exchanging the unique id over
    /// `control` (which must span the same ranks).
    ///
    /// # Errors
    /// [`Error::LibraryMissing`] without CUDA or NCCL; [`Error::Gpu`] when CUDA or NCCL fail;
    /// control-plane errors.
    pub fn new(mut control: Box<dyn Communicator>, ordinal: usize) -> Result<Self> {
        require_libraries()?;
        let rank = control.rank();
        let world = control.world_size();
        let ctx = CudaContext::new(ordinal).map_err(|e| gpu("cuCtxCreate", rank, e))?;
        let stream = ctx.new_stream().map_err(|e| gpu("cuStreamCreate", rank, e))?;
        let mut id_bytes = if rank == 0 {
            let id = Id::new().map_err(|e| gpu("ncclGetUniqueId", rank, e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        control.broadcast_bytes(0, &mut id_bytes)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id_bytes.len() != internal.len() {
            return Err(Error::Gpu {
                call: "nccl id exchange",
                rank,
                message: format!("received {} bytes, expected 128", id_bytes.len()),
            });
        }
        for (dst, src) in internal.iter_mut().zip(&id_bytes) {
            *dst = *src as std::ffi::c_char;
        }
        let mut raw = std::mem::MaybeUninit::uninit();
        let nranks = i32::try_from(world).map_err(|e| gpu("ncclCommInitRank", rank, e))?;
        let me = i32::try_from(rank).map_err(|e| gpu("ncclCommInitRank", rank, e))?;
        ctx.bind_to_thread().map_err(|e| gpu("cuCtxSetCurrent", rank, e))?;
        // SAFETY: `raw` is written by ncclCommInitRank on success and read only then.
        let comm = unsafe {
            nccl_result::comm_init_rank(raw.as_mut_ptr(), nranks, nccl_sys::ncclUniqueId { internal }, me)
                .map_err(|e| gpu("ncclCommInitRank", rank, e))?;
            raw.assume_init()
        };
        Ok(Self {
            control,
            comm: RawComm(comm),
            stream,
            aborted: None,
        })
    }

    /// Waits for the work enqueued on the stream, polling NCCL's asynchronous error state,
    /// until the control communicator's timeout; aborts the NCCL communicator on failure.
    fn wait(&mut self, op: &'static str) -> Result<()> {
        let rank = self.control.rank();
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| gpu("cuEventRecord", rank, e))?;
        let timeout = self.control.timeout();
        let deadline = Instant::now() + timeout;
        loop {
            if event.try_is_complete().map_err(|e| gpu("cuEventQuery", rank, e))? {
                return Ok(());
            }
            let mut state = nccl_sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator (checked by the callers) and a valid out-pointer.
            unsafe { nccl_sys::ncclCommGetAsyncError(self.comm.0, &mut state) };
            let code = state as u32;
            let failure = if code != 0 && code != 7 {
                Some(format!("NCCL reported {state:?} during {op}"))
            } else if Instant::now() > deadline {
                Some(format!(
                    "{op} did not complete within {timeout:?}: a peer stopped or died during the transfer (every \
                     rank had arrived at the handshake); raise BALLAST_TIMEOUT_SECS if transfers are that slow"
                ))
            } else {
                None
            };
            if let Some(message) = failure {
                self.comm.abort();
                self.aborted = Some(message.clone());
                return Err(Error::Gpu {
                    call: op,
                    rank,
                    message,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn check_alive(&self) -> Result<()> {
        match &self.aborted {
            Some(reason) => Err(Error::Poisoned {
                rank: self.control.rank(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Sums a device buffer over all ranks in place, then waits for the result.
    ///
    /// # Errors
    /// Handshake errors (timeouts naming missing ranks, length mismatches) and [`Error::Gpu`].
    pub fn all_reduce_sum_cuda(&mut self, buf: &mut CudaSlice<f32>) -> Result<()> {
        let rank = self.control.rank();
        let mut len = vec![buf.len() as u64];
        // The handshake: lengths and arrival, checked on the control plane before the GPU waits.
        let lens = self.control.all_gather_bytes(&len[0].to_le_bytes())?;
        if lens.iter().any(|l| l.as_slice() != len[0].to_le_bytes()) {
            len = lens
                .iter()
                .map(|l| u64::from_le_bytes(l.as_slice().try_into().unwrap_or([0; 8])))
                .collect();
            return Err(Error::ShapeMismatch {
                op: "nccl all_reduce_sum_cuda",
                seq: 0,
                rank,
                lengths: len,
            });
        }
        self.check_alive()?;
        let count = buf.len();
        let (ptr, written) = buf.device_ptr_mut(&self.stream);
        // SAFETY: `ptr` addresses `count` f32 on this communicator's device; the stream orders
        // the collective after earlier work on the buffer (`device_ptr_mut`'s contract).
        unsafe {
            nccl_result::all_reduce(
                ptr as *const std::ffi::c_void,
                ptr as *mut std::ffi::c_void,
                count,
                nccl_sys::ncclDataType_t::ncclFloat32,
                nccl_sys::ncclRedOp_t::ncclSum,
                self.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| gpu("ncclAllReduce", rank, e))?;
        drop(written);
        self.wait("ncclAllReduce")
    }

    /// Copies a host buffer to the device, sums it over ranks and copies it back (the path the
    /// host-side [`Communicator`] methods take).
    fn all_reduce_host(&mut self, buf: &mut [f32]) -> Result<()> {
        self.check_alive()?;
        let rank = self.control.rank();
        let mut dev = self.stream.clone_htod(buf).map_err(|e| gpu("cuMemcpyHtoD", rank, e))?;
        self.all_reduce_sum_cuda(&mut dev)?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| gpu("cuMemcpyDtoH", rank, e))?;
        self.stream
            .synchronize()
            .map_err(|e| gpu("cuStreamSynchronize", rank, e))
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn world_size(&self) -> usize {
        self.control.world_size()
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn timeout(&self) -> Duration {
        self.control.timeout()
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.control.set_timeout(timeout);
    }

    fn collectives_started(&self) -> u64 {
        // Every NCCL transfer starts with a handshake on the control plane.
        self.control.collectives_started()
    }

    fn barrier(&mut self) -> Result<()> {
        self.control.barrier()
    }

    fn broadcast_f32(&mut self, root: usize, buf: &mut [f32]) -> Result<()> {
        self.control.broadcast_f32(root, buf)
    }

    fn broadcast_bytes(&mut self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.control.broadcast_bytes(root, buf)
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_host(buf)
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        // Counters and checksums are small: the control plane carries them.
        self.control.all_reduce_sum_f64(buf)
    }

    fn all_reduce_sum_u64(&mut self, buf: &mut [u64]) -> Result<()> {
        self.control.all_reduce_sum_u64(buf)
    }

    fn all_gather_bytes(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.control.all_gather_bytes(data)
    }

    fn reduce_scatter_sum_f32(&mut self, buf: &[f32], counts: &[usize], shard: &mut [f32]) -> Result<()> {
        // Host buffers: the control plane reduces them (a device shard over NCCL is not built).
        self.control.reduce_scatter_sum_f32(buf, counts, shard)
    }

    fn all_gather_f32(&mut self, shard: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
        self.control.all_gather_f32(shard, counts, out)
    }
}

fn gpu(call: &'static str, rank: usize, e: impl std::fmt::Debug) -> Error {
    // cudarc's NcclError has no Display; its Debug names the result code.
    Error::Gpu {
        call,
        rank,
        message: format!("{e:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{local, CommOptions};

    /// On a machine without libnccl the constructor returns a typed error, not a panic.
    #[test]
    fn missing_nccl_is_a_typed_error() {
        if cuda_present() && nccl_present() {
            eprintln!("SKIPPED missing_nccl_is_a_typed_error: CUDA and NCCL are installed here, nothing is missing");
            return;
        }
        let comm = local::world(1, CommOptions::default()).pop().unwrap();
        let err = NcclCommunicator::new(Box::new(comm), 0)
            .err()
            .expect("must fail without the libraries");
        assert!(matches!(err, Error::LibraryMissing { .. }), "{err}");
        assert!(err.to_string().contains("could not be loaded"), "{err}");
    }
}
