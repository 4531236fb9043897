//! GPU ranks over NCCL, through `cudarc::nccl` (compiles; not yet run on a GPU).
//!
//! # Bootstrap
//! NCCL needs every rank to hold the same 128-byte unique id. Rank 0 creates it
//! (`ncclGetUniqueId`) and sends it over the **control plane**, any [`Communicator`] spanning
//! the same ranks (in practice the MPI one); every rank then calls `ncclCommInitRankConfig` with
//! a non-blocking configuration and polls it until it has finished, for at most the control
//! plane's timeout (a rank that never joins is an error, not a hang). The control
//! communicator stays in charge of small metadata, handshakes and agreement; NCCL carries only
//! gradient bytes.
//!
//! # Device buffers
//! [`Communicator::all_reduce_sum_buckets`] reduces a step's buckets where they are: a bucket that
//! offers its CUDA memory ([`DeviceBuffer::cuda_region`], as ballast's gradient buckets do on a
//! CUDA device) is summed in place; any other is read once, staged through a device copy and
//! written back once. One handshake on the control plane gathers every rank's bucket cuts and
//! checks the totals; each piece of the common refinement of all ranks' cuts then gets one
//! `ncclAllReduce`, all in one NCCL group, so ranks may cut their buffers differently (the
//! [contract](crate::communicator)'s rule) and NCCL still sees the same calls everywhere.
//!
//! # Sharded collectives
//! [`Communicator::reduce_scatter_sum_device`] and [`Communicator::all_gather_device`] work in
//! the buffers' CUDA memory too, with uneven shards: one rooted `ncclReduce` (or
//! `ncclBroadcast`) per non-empty shard, grouped, after one agreement on the counts on the
//! control plane (NCCL's reduce-scatter and all-gather need equal counts; padding to the
//! largest shard would cost a padded copy of the buffer every step). The host-slice forms
//! ([`Communicator::reduce_scatter_sum_f32`], [`Communicator::all_gather_f32`]) stay on the
//! control plane.
//!
//! # Streams
//! Collectives are enqueued on this communicator's own CUDA stream and waited for before a call
//! returns, so the caller may touch the buffers at once. The caller must have finished writing
//! the buffers on *its* streams before the call: a [`crate::CudaRegion`] promises complete
//! contents (ballast waits for burn's queued work before handing one out).
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

use crate::{
    communicator::{counts_key, device_error, shard_offset, OpKind},
    Communicator, CudaRegion, DeviceBuffer, Error, Result,
};

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
            fix: "install NCCL 2 (package libnccl2 from NVIDIA's CUDA repository, or `pip install nvidia-nccl-cu12`); \
                  ballast's binaries find libnccl.so.2 in the system's library folders, LD_LIBRARY_PATH and \
                  Python's site-packages, and a program of your own calls \
                  ballast::libs::relaunch_with_found_libraries() first, or puts a libnccl.so link on LD_LIBRARY_PATH",
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

/// `NCCL_CONFIG_INITIALIZER` of the header cudarc binds (every field undefined, so NCCL picks
/// its defaults), with `blocking = 0`. NCCL reads `min(size, its own size)` bytes of it, so an
/// older library takes it too.
fn nonblocking_config() -> nccl_sys::ncclConfig_t {
    const UNDEF: std::ffi::c_int = std::ffi::c_int::MIN;
    nccl_sys::ncclConfig_t {
        size: std::mem::size_of::<nccl_sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // NCCL_VERSION(2, 28, 0): the header version of this layout's first fields.
        version: 22_800,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// Polls a non-blocking communicator's state (`ncclCommGetAsyncError`) until its last call has
/// finished (no longer `ncclInProgress`), for at most `timeout`. On a failure or at the
/// deadline the communicator is aborted and the error names `op`.
fn settle(comm: &mut RawComm, op: &'static str, rank: usize, timeout: Duration) -> Result<()> {
    if comm.0.is_null() {
        return Err(Error::Poisoned {
            rank,
            reason: format!("{op}: the NCCL communicator was aborted earlier"),
        });
    }
    let deadline = Instant::now() + timeout;
    loop {
        let mut state = nccl_sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is a handle NCCL returned and not aborted (`abort` nulls it, checked
        // above, and the loop ends at the abort below); `state` is a valid out-pointer.
        unsafe { nccl_sys::ncclCommGetAsyncError(comm.0, &mut state) };
        let message = match state {
            nccl_sys::ncclResult_t::ncclSuccess => return Ok(()),
            nccl_sys::ncclResult_t::ncclInProgress if Instant::now() <= deadline => {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            nccl_sys::ncclResult_t::ncclInProgress => format!(
                "{op} did not finish within {timeout:?}: a rank never joined or stopped; every rank must \
                 create its NCCL communicator (raise BALLAST_TIMEOUT_SECS if start-up is that slow)"
            ),
            failed => format!("NCCL reported {failed:?} during {op}"),
        };
        comm.abort();
        return Err(Error::Gpu {
            call: op,
            rank,
            message,
        });
    }
}

impl RawComm {
    fn abort(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a communicator created by ncclCommInitRankConfig and not yet aborted.
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
    ordinal: usize,
    aborted: Option<String>,
    /// Waits treat finished work as unfinished (a stall injected by a check).
    stall: bool,
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
        // Non-blocking, so a rank that never joins cannot hold this one forever: the call
        // returns at once and `settle` polls it against the control plane's timeout.
        let mut config = nonblocking_config();
        // SAFETY: `raw` and `config` are valid for the call; NCCL writes the communicator's
        // handle to `raw` before it returns success or ncclInProgress, and copies `config`.
        let comm = unsafe {
            nccl_result::comm_init_rank_config(
                raw.as_mut_ptr(),
                nranks,
                nccl_sys::ncclUniqueId { internal },
                me,
                &mut config,
            )
            .map_err(|e| gpu("ncclCommInitRank", rank, e))?;
            raw.assume_init()
        };
        let mut comm = RawComm(comm);
        settle(&mut comm, "ncclCommInitRank", rank, control.timeout())?;
        Ok(Self {
            control,
            comm,
            stream,
            ordinal,
            aborted: None,
            stall: false,
        })
    }

    /// From now on every wait sees its work as unfinished, as if a peer had stopped after the
    /// handshake: the next collective reaches its deadline, the NCCL communicator is aborted
    /// (`ncclCommAbort`) and later calls fail at once (feature `conformance`, for the GPU kit).
    #[cfg(feature = "conformance")]
    pub fn inject_stall(&mut self) {
        self.stall = true;
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
            if event.try_is_complete().map_err(|e| gpu("cuEventQuery", rank, e))? && !self.stall {
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

    /// Waits until a non-blocking group has put its work on the stream (`ncclGroupEnd` may
    /// return before it has), so the event `wait` records comes after the collectives.
    fn enqueued(&mut self, op: &'static str) -> Result<()> {
        let rank = self.control.rank();
        let timeout = self.control.timeout();
        settle(&mut self.comm, op, rank, timeout).inspect_err(|e| self.aborted = Some(e.to_string()))
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
        self.check_alive()?;
        let len = buf.len();
        let (ptr, written) = buf.device_ptr_mut(&self.stream);
        // The collective runs on this stream, after the work `device_ptr_mut` ordered before it.
        drop(written);
        self.reduce_regions("nccl all_reduce_sum_cuda", &[(ptr, len)])
    }

    /// The arrival handshake of an in-place reduction of this rank's regions of `lens` elements,
    /// on the control plane: every rank's cut points are gathered, the totals must match, and
    /// the common refinement of all ranks' cuts is returned as `(region, offset, len)` segments
    /// of this rank's regions (the same segments, in the same order, on every rank).
    fn handshake(&mut self, op: &'static str, lens: &[usize]) -> Result<Vec<(usize, usize, usize)>> {
        let rank = self.control.rank();
        let total: usize = lens.iter().sum();
        let cuts: Vec<u64> = lens
            .iter()
            .scan(0usize, |end, &len| {
                *end += len;
                Some(*end as u64)
            })
            .collect();
        let mut bytes = (total as u64).to_le_bytes().to_vec();
        cuts.iter().for_each(|c| bytes.extend(c.to_le_bytes()));
        let all = self.control.all_gather_bytes(&bytes)?;
        let words = |b: &[u8]| -> Vec<u64> {
            b.chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                .collect()
        };
        let all: Vec<Vec<u64>> = all.iter().map(|b| words(b)).collect();
        if all.iter().any(|w| w.first() != Some(&(total as u64))) {
            return Err(Error::ShapeMismatch {
                op,
                seq: self.control.collectives_started(),
                rank,
                lengths: all.iter().map(|w| w.first().copied().unwrap_or(0)).collect(),
            });
        }
        let cuts: Vec<&[u64]> = all.iter().map(|w| &w[1..]).collect();
        Ok(common_segments(lens, &cuts))
    }

    /// Sums `regions` (device address and length, on this communicator's GPU, contents
    /// complete) over all ranks in place: one handshake, one ncclAllReduce per segment of the
    /// common refinement in one NCCL group on this communicator's stream, then the wait.
    fn reduce_regions(&mut self, op: &'static str, regions: &[(u64, usize)]) -> Result<()> {
        let rank = self.control.rank();
        let lens: Vec<usize> = regions.iter().map(|&(_, len)| len).collect();
        let segments = self.handshake(op, &lens)?;
        self.check_alive()?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| gpu("cuCtxSetCurrent", rank, e))?;
        nccl_result::group_start().map_err(|e| gpu("ncclGroupStart", rank, e))?;
        let mut launched = Ok(());
        for &(region, offset, count) in &segments {
            let ptr = regions[region].0 + (offset * std::mem::size_of::<f32>()) as u64;
            // SAFETY: `ptr` addresses `count` f32 inside a region the caller holds on this
            // communicator's device, complete before this stream runs (the callers' contract),
            // and untouched by anyone else until `wait` below returns.
            launched = unsafe {
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
            .map(|_| ())
            .map_err(|e| gpu("ncclAllReduce", rank, e));
            if launched.is_err() {
                break;
            }
        }
        // The group is closed whatever happened inside it, so NCCL is left in a sane state.
        let closed = nccl_result::group_end().map_err(|e| gpu("ncclGroupEnd", rank, e));
        launched.and(closed)?;
        self.enqueued("ncclAllReduce")?;
        self.wait("ncclAllReduce")
    }

    /// Copies a host buffer to the device, sums it over ranks and copies it back (the path the
    /// host-side [`Communicator`] methods take).
    fn all_reduce_host(&mut self, buf: &mut [f32]) -> Result<()> {
        self.check_alive()?;
        if buf.is_empty() {
            // Nothing to stage (CUDA allocates no empty buffer); the handshake still runs.
            return self.reduce_regions("nccl all_reduce_sum_f32", &[(0, 0)]);
        }
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

    /// The buckets of one reduction as device regions: each bucket's own CUDA memory where it
    /// offers it ([`DeviceBuffer::cuda_region`]), else a device copy of what it reads (staged
    /// here, written back after the sum).
    fn bucket_regions(&mut self, buckets: &mut [&mut dyn DeviceBuffer]) -> Result<BucketRegions> {
        let rank = self.control.rank();
        let device_error = |op: &'static str| device_error(op, rank);
        let mut out = BucketRegions::default();
        for (index, bucket) in buckets.iter_mut().enumerate() {
            match bucket
                .cuda_region()
                .map_err(device_error("handing a device buffer to NCCL"))?
            {
                Some(region) if region.ordinal() == self.ordinal && region.len() == bucket.len() => {
                    out.regions.push((region.ptr(), region.len()));
                    out.held.push(region);
                }
                Some(region) => {
                    return Err(Error::Device {
                        op: "handing a device buffer to NCCL",
                        rank,
                        message: format!(
                            "bucket {index} is {} values on cuda:{} but NCCL runs on cuda:{} with {} values expected; \
                             keep the model on the GPU this rank's communicator was made for",
                            region.len(),
                            region.ordinal(),
                            self.ordinal,
                            bucket.len()
                        ),
                    });
                }
                None => {
                    let host = bucket.read().map_err(device_error("reading a device buffer"))?;
                    if host.is_empty() {
                        // Nothing to reduce or to stage (CUDA allocates no empty buffer).
                        bucket.write(host).map_err(device_error("writing a device buffer"))?;
                        out.regions.push((0, 0));
                        continue;
                    }
                    let mut dev = self
                        .stream
                        .clone_htod(&host)
                        .map_err(|e| gpu("cuMemcpyHtoD", rank, e))?;
                    let (ptr, written) = dev.device_ptr_mut(&self.stream);
                    drop(written);
                    out.regions.push((ptr, host.len()));
                    out.staged.push((index, dev));
                }
            }
        }
        Ok(out)
    }
}

impl NcclCommunicator {
    /// Copies every staged buffer's result back (all copies queued, then one wait) and writes
    /// it into its buffer; the regions held in place are released first.
    fn write_back(&mut self, staged: BucketRegions, buffers: &mut [&mut dyn DeviceBuffer]) -> Result<()> {
        let rank = self.control.rank();
        drop(staged.held);
        let mut back = Vec::with_capacity(staged.staged.len());
        for (index, dev) in &staged.staged {
            back.push((
                *index,
                self.stream.clone_dtoh(dev).map_err(|e| gpu("cuMemcpyDtoH", rank, e))?,
            ));
        }
        self.stream
            .synchronize()
            .map_err(|e| gpu("cuStreamSynchronize", rank, e))?;
        drop(staged.staged);
        for (index, values) in back {
            buffers[index]
                .write(values)
                .map_err(device_error("writing a device buffer", rank))?;
        }
        Ok(())
    }

    /// Every rank's `counts`, checked on this rank against the buffers and then compared across
    /// ranks through one collective on the control plane (which also names missing ranks).
    fn agree_counts(&mut self, op: OpKind, counts: &[usize], total: usize, part: usize) -> Result<()> {
        let rank = self.control.rank();
        let world = self.control.world_size();
        shard_offset(op, rank, world, counts, total, part)?;
        let seq = self.control.collectives_started();
        let keys = self.control.all_gather_bytes(&counts_key(counts).to_le_bytes())?;
        let mine = counts_key(counts).to_le_bytes();
        if let Some(other_rank) = keys.iter().position(|k| k.as_slice() != mine.as_slice()) {
            return Err(Error::CountsMismatch {
                op: op.name(),
                seq,
                rank,
                other_rank,
            });
        }
        Ok(())
    }

    /// The sharded pair on CUDA memory: a reduce-scatter of `full` into `shard`, or an
    /// all-gather of `shard` into `full`, for shards of `counts` elements in rank order.
    ///
    /// NCCL's own `ncclReduceScatter` and `ncclAllGather` need the same count on every rank;
    /// ballast's shards are uneven by design (sized by each device's memory, a shard of 0
    /// allowed). Padding every shard to the largest would need a padded copy of the full
    /// buffer (up to `world ×` the largest shard, on the device with the least memory too) and
    /// a copy in and out on every step; so this runs one rooted `ncclReduce` (or
    /// `ncclBroadcast`) per non-empty shard instead, grouped so NCCL schedules them together.
    /// Each moves exactly that shard's bytes, so the bytes on the wire are those of the
    /// padded-free collective, and no extra memory is needed.
    fn sharded(
        &mut self,
        op: OpKind,
        full: &mut dyn DeviceBuffer,
        counts: &[usize],
        shard: &mut dyn DeviceBuffer,
    ) -> Result<()> {
        self.check_alive()?;
        let rank = self.control.rank();
        self.agree_counts(op, counts, full.len(), shard.len())?;
        let mut pair: [&mut dyn DeviceBuffer; 2] = [full, shard];
        let staged = self.bucket_regions(&mut pair)?;
        let (full_ptr, shard_ptr) = (staged.regions[0].0, staged.regions[1].0);
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| gpu("cuCtxSetCurrent", rank, e))?;
        let call = if op == OpKind::ReduceScatterF32 {
            "ncclReduce"
        } else {
            "ncclBroadcast"
        };
        nccl_result::group_start().map_err(|e| gpu("ncclGroupStart", rank, e))?;
        let mut launched = Ok(());
        let mut start = 0usize;
        for (root, &count) in counts.iter().enumerate() {
            let at = full_ptr + (start * std::mem::size_of::<f32>()) as u64;
            start += count;
            if count == 0 {
                // Every rank skips the same roots: the counts were agreed above.
                continue;
            }
            let mine = root == rank;
            let stream = self.stream.cu_stream() as _;
            // SAFETY: `at` addresses this root's `count` f32 inside `full`'s region and
            // `shard_ptr` this rank's `counts[rank]` f32 (checked by `agree_counts`); both regions
            // are on this communicator's device with complete contents (a `CudaRegion`'s promise,
            // or a staging copy queued on this stream) and stay allocated and untouched until
            // `wait` below returns: `staged` holds them until `write_back`. `shard_ptr` is only
            // read or written where this rank is the root; elsewhere NCCL ignores the buffer
            // that is not significant and `at` is passed for it.
            launched = unsafe {
                if op == OpKind::ReduceScatterF32 {
                    nccl_result::reduce(
                        at as *const std::ffi::c_void,
                        (if mine { shard_ptr } else { at }) as *mut std::ffi::c_void,
                        count,
                        nccl_sys::ncclDataType_t::ncclFloat32,
                        nccl_sys::ncclRedOp_t::ncclSum,
                        root as i32,
                        self.comm.0,
                        stream,
                    )
                } else {
                    nccl_result::broadcast(
                        (if mine { shard_ptr } else { at }) as *const std::ffi::c_void,
                        at as *mut std::ffi::c_void,
                        count,
                        nccl_sys::ncclDataType_t::ncclFloat32,
                        root as i32,
                        self.comm.0,
                        stream,
                    )
                }
            }
            .map(|_| ())
            .map_err(|e| gpu(call, rank, e));
            if launched.is_err() {
                break;
            }
        }
        // The group is closed whatever happened inside it, so NCCL is left in a sane state.
        let closed = nccl_result::group_end().map_err(|e| gpu("ncclGroupEnd", rank, e));
        let waited = launched
            .and(closed)
            .and_then(|_| self.enqueued(call))
            .and_then(|_| self.wait(call));
        // The staged copies are written back (or dropped) whatever happened.
        let written = self.write_back(staged, &mut pair);
        waited.and(written)
    }
}

/// What [`NcclCommunicator::bucket_regions`] hands out: every bucket's region, in order, with
/// what keeps each alive.
#[derive(Default)]
struct BucketRegions {
    regions: Vec<(u64, usize)>,
    held: Vec<CudaRegion>,
    staged: Vec<(usize, CudaSlice<f32>)>,
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

    /// The buffer's own CUDA memory is reduced in place when it offers it
    /// ([`DeviceBuffer::cuda_region`]); otherwise it is staged through a device copy.
    fn all_reduce_sum_device(&mut self, buf: &mut dyn DeviceBuffer) -> Result<()> {
        self.all_reduce_sum_buckets(&mut [buf])
    }

    /// One handshake on the control plane (every rank's cut points), then one ncclAllReduce
    /// per piece of the common refinement of the ranks' cuts, grouped, in the buckets' own CUDA
    /// memory where they offer it and through device copies where they do not.
    fn all_reduce_sum_buckets(&mut self, buckets: &mut [&mut dyn DeviceBuffer]) -> Result<()> {
        self.check_alive()?;
        let staged = self.bucket_regions(buckets)?;
        self.reduce_regions("nccl all_reduce_sum_buckets", &staged.regions)?;
        self.write_back(staged, buckets)
    }

    /// One agreement on the control plane (the counts' key), then one `ncclReduce` per rank
    /// with a non-empty shard, rooted at that rank, in one NCCL group, from `buf`'s CUDA memory
    /// into `shard`'s (see the module docs for why not `ncclReduceScatter`).
    fn reduce_scatter_sum_device(
        &mut self,
        buf: &mut dyn DeviceBuffer,
        counts: &[usize],
        shard: &mut dyn DeviceBuffer,
    ) -> Result<()> {
        self.sharded(OpKind::ReduceScatterF32, buf, counts, shard)
    }

    /// One agreement on the control plane, then one `ncclBroadcast` per rank with a non-empty
    /// shard, rooted at that rank, in one NCCL group, from its `shard` into every rank's `out`.
    fn all_gather_device(
        &mut self,
        shard: &mut dyn DeviceBuffer,
        counts: &[usize],
        out: &mut dyn DeviceBuffer,
    ) -> Result<()> {
        self.sharded(OpKind::AllGatherF32, out, counts, shard)
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
        // Host slices: the control plane reduces them; device buffers take
        // `reduce_scatter_sum_device`, which runs on NCCL.
        self.control.reduce_scatter_sum_f32(buf, counts, shard)
    }

    fn all_gather_f32(&mut self, shard: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
        self.control.all_gather_f32(shard, counts, out)
    }
}

/// The pieces of the common refinement of every rank's cuts (`cuts[r]`: the end offsets of
/// rank `r`'s regions, in order, the last being the common total) as `(region, offset, len)` of
/// this rank's regions of `lens` elements: every piece lies inside one region on every rank, the
/// pieces follow each other in order, and every rank gets the same piece lengths.
fn common_segments(lens: &[usize], cuts: &[&[u64]]) -> Vec<(usize, usize, usize)> {
    let mut bounds: Vec<u64> = cuts.iter().flat_map(|c| c.iter().copied()).collect();
    bounds.push(0);
    bounds.sort_unstable();
    bounds.dedup();
    let mut segments = Vec::with_capacity(bounds.len());
    let mut region = 0;
    let mut region_start = 0usize;
    for pair in bounds.windows(2) {
        let (lo, hi) = (pair[0] as usize, pair[1] as usize);
        while region_start + lens[region] <= lo {
            region_start += lens[region];
            region += 1;
        }
        segments.push((region, lo - region_start, hi - lo));
    }
    segments
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
    use proptest::prelude::*;

    /// End offsets of regions of these lengths.
    fn ends(lens: &[usize]) -> Vec<u64> {
        lens.iter()
            .scan(0u64, |end, &l| {
                *end += l as u64;
                Some(*end)
            })
            .collect()
    }

    /// Lengths that sum to `total`, cut at `points` (taken modulo `total + 1`), with empty
    /// regions where points repeat.
    fn cut(total: usize, points: &[usize]) -> Vec<usize> {
        let mut at: Vec<usize> = points.iter().map(|p| p % (total + 1)).collect();
        at.sort_unstable();
        let mut lens = Vec::new();
        let mut last = 0;
        for p in at.into_iter().chain([total]) {
            lens.push(p - last);
            last = p;
        }
        lens
    }

    proptest! {
        /// Whatever each rank's cuts, every rank gets the same piece lengths, the pieces tile its
        /// own regions in order, and no piece crosses a region boundary of any rank.
        #[test]
        fn the_common_refinement_tiles_every_rank_s_regions(
            total in 0usize..200,
            points in proptest::collection::vec(proptest::collection::vec(0usize..1000, 0..6), 1..4),
        ) {
            let lens: Vec<Vec<usize>> = points.iter().map(|p| cut(total, p)).collect();
            let cuts: Vec<Vec<u64>> = lens.iter().map(|l| ends(l)).collect();
            let views: Vec<&[u64]> = cuts.iter().map(Vec::as_slice).collect();
            let all: Vec<Vec<(usize, usize, usize)>> = lens.iter().map(|l| common_segments(l, &views)).collect();
            let piece_lens = |s: &[(usize, usize, usize)]| s.iter().map(|p| p.2).collect::<Vec<_>>();
            for (rank, segments) in all.iter().enumerate() {
                prop_assert_eq!(piece_lens(segments), piece_lens(&all[0]));
                prop_assert_eq!(segments.iter().map(|p| p.2).sum::<usize>(), total);
                prop_assert!(segments.iter().all(|p| p.2 > 0));
                let mut at = 0;
                for &(region, offset, len) in segments {
                    let start: usize = lens[rank][..region].iter().sum();
                    prop_assert_eq!(start + offset, at, "rank {} pieces out of order", rank);
                    prop_assert!(offset + len <= lens[rank][region], "rank {} piece crosses a region", rank);
                    at += len;
                }
            }
        }
    }

    #[test]
    fn identical_cuts_give_one_piece_per_region() {
        let lens = [3, 0, 5, 2];
        let c = ends(&lens);
        let views = [c.as_slice(), c.as_slice()];
        assert_eq!(common_segments(&lens, &views), vec![(0, 0, 3), (2, 0, 5), (3, 0, 2)]);
    }

    /// On a machine without libnccl the constructor returns a typed error, not a panic.
    #[test]
    fn missing_nccl_is_a_typed_error() {
        if cuda_present() && nccl_present() {
            println!("skipped: missing_nccl_is_a_typed_error: CUDA and NCCL are installed here, nothing is missing");
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
