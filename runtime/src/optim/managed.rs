//! Optimizer state in CUDA unified (managed) memory, with placement hints, and Adam on the GPU
//! over it chunk by chunk. Not yet verified on a GPU: this machine has none; the code is
//! type-checked in CI and the chunk schedule is unit-tested.
//!
//! The buffer is allocated with `cuMemAllocManaged`, advised to live on the host
//! (`CU_MEM_ADVISE_SET_PREFERRED_LOCATION` = host) and to be accessed by the device
//! (`CU_MEM_ADVISE_SET_ACCESSED_BY` = device), and moved explicitly with `cuMemPrefetchAsync`:
//! to the device before a kernel uses it, back to the host after. Explicit prefetch runs at copy
//! speed; page faults on demand are at least twice as slow and, oversubscribed, far worse.
//!
//! [`ChunkedAdam`] updates state larger than the device's free memory: chunk `i + 1` of the
//! parameters, gradients and moments is prefetched to the device on a copy stream while chunk
//! `i` is updated by a kernel on a compute stream, and each chunk is prefetched back to the host
//! once updated ([`super::chunks::chunk_schedule`]), so at most two chunks are on the device at once
//! and the whole state crosses PCIe once each way per step. The kernel is compiled at first use
//! by NVRTC without FMA contraction, with IEEE division and square root, and performs the host
//! Adam's operations in the host Adam's order: its results are meant to equal the host's bit
//! for bit (the GPU kit's `managed` check compares them).
//!
//! A managed allocation may exceed the device's free memory (that is what it is for): on Linux
//! with a Pascal or later GPU, pages migrate on demand and the driver evicts others to the host
//! when the device fills; on Windows and on older GPUs managed memory cannot exceed device
//! memory and the allocation fails with a CUDA error.

use std::sync::Arc;

use crate::Error;
use cudarc::{
    driver::{result, sys, CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg},
    nvrtc::{compile_ptx_with_opts, CompileOptions},
};

/// A managed allocation of `len` f32 values.
pub struct ManagedBuffer {
    ptr: sys::CUdeviceptr,
    len: usize,
    ordinal: i32,
    stream: Arc<CudaStream>,
}

impl ManagedBuffer {
    /// Allocates `len` f32 in managed memory for device `ordinal`, preferring the host. The
    /// buffer may be larger than the device's free memory (see the [module docs](self)).
    ///
    /// # Errors
    /// [`Error::NoCuda`] without the driver; [`Error::Cuda`] on driver errors.
    pub fn new(ordinal: usize, len: usize) -> Result<Self, Error> {
        // SAFETY: only tries to load the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoCuda);
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::Cuda(format!("{e:?}")))?;
        let bytes = len * std::mem::size_of::<f32>();
        let stream = ctx.new_stream().map_err(|e| Error::Cuda(format!("{e:?}")))?;
        // SAFETY: a fresh allocation of `bytes` bytes; it is freed once in Drop.
        let ptr = unsafe { result::malloc_managed(bytes, sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
            .map_err(|e| Error::Cuda(format!("cuMemAllocManaged: {e:?}")))?;
        let buffer = Self {
            ptr,
            len,
            ordinal: ordinal as i32,
            stream,
        };
        let host = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
            id: 0,
        };
        let device = buffer.device_location();
        // SAFETY: the range is the allocation made above.
        unsafe {
            result::mem_advise(
                ptr,
                bytes,
                sys::CUmem_advise::CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
                host,
            )
            .map_err(|e| Error::Cuda(format!("cuMemAdvise(preferred host): {e:?}")))?;
            result::mem_advise(ptr, bytes, sys::CUmem_advise::CU_MEM_ADVISE_SET_ACCESSED_BY, device)
                .map_err(|e| Error::Cuda(format!("cuMemAdvise(accessed by device): {e:?}")))?;
        }
        Ok(buffer)
    }

    fn device_location(&self) -> sys::CUmemLocation {
        sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.ordinal,
        }
    }

    /// Starts moving the buffer to the device (asynchronous on this buffer's stream).
    ///
    /// # Errors
    /// [`Error::Cuda`].
    pub fn prefetch_to_device(&self) -> Result<(), Error> {
        self.prefetch(self.device_location())
    }

    /// Starts moving the buffer back to the host.
    ///
    /// # Errors
    /// [`Error::Cuda`].
    pub fn prefetch_to_host(&self) -> Result<(), Error> {
        self.prefetch(sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
            id: 0,
        })
    }

    fn prefetch(&self, to: sys::CUmemLocation) -> Result<(), Error> {
        self.prefetch_range(0..self.len, to, &self.stream)
    }

    /// Starts moving elements `range` to `to` on `stream`.
    fn prefetch_range(
        &self,
        range: std::ops::Range<usize>,
        to: sys::CUmemLocation,
        stream: &CudaStream,
    ) -> Result<(), Error> {
        assert!(range.end <= self.len, "prefetch past the end of a managed buffer");
        let start = self.ptr + (range.start * std::mem::size_of::<f32>()) as u64;
        let bytes = range.len() * std::mem::size_of::<f32>();
        // SAFETY: the range lies inside this allocation (asserted above) and the stream is a
        // live stream of the same context; prefetching moves pages and changes no value.
        unsafe { result::mem_prefetch_async(start, bytes, to, stream.cu_stream()) }
            .map_err(|e| Error::Cuda(format!("cuMemPrefetchAsync: {e:?}")))
    }

    /// The device address of element `at`.
    fn address(&self, at: usize) -> u64 {
        self.ptr + (at * std::mem::size_of::<f32>()) as u64
    }

    /// Waits for this buffer's prefetches.
    ///
    /// # Errors
    /// [`Error::Cuda`].
    pub fn wait(&self) -> Result<(), Error> {
        self.stream.synchronize().map_err(|e| Error::Cuda(format!("{e:?}")))
    }

    /// The buffer as a host slice (see [`ManagedBuffer::as_mut_slice`]).
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: managed memory is addressable from the host and the allocation holds `len`
        // f32; shared access only reads.
        unsafe { std::slice::from_raw_parts(self.ptr as *const f32, self.len) }
    }

    /// The buffer as a host slice (after [`ManagedBuffer::prefetch_to_host`] and
    /// [`ManagedBuffer::wait`], host access does not fault).
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: managed memory is addressable from the host; the allocation holds `len` f32
        // and `&mut self` excludes other host users. The caller waits for device work first.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut f32, self.len) }
    }
}

impl Drop for ManagedBuffer {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        // SAFETY: allocated by cuMemAllocManaged in `new`, freed once here.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// The CUDA source of one Adam step over `n` elements: [`super::HostAdam`]'s arithmetic, in its
/// order (`decay` 0: none, 1: L2 folded into the gradient, 2: decoupled).
const ADAM_KERNEL: &str = r#"
extern "C" __global__ void ballast_adam_chunk(
    float* p, const float* g, float* m, float* v, unsigned long long n,
    float lr, float b1, float b2, float one_m_b1, float one_m_b2,
    float factor, float eps, float wd, int first, int decay)
{
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float pi = p[i];
    float gi = g[i];
    if (decay == 1) {
        gi += pi * wd;
    } else if (decay == 2) {
        pi -= lr * wd * pi;
    }
    float mi, vi;
    if (first) {
        mi = gi * one_m_b1;
        vi = gi * gi * one_m_b2;
    } else {
        mi = m[i] * b1 + gi * one_m_b1;
        vi = v[i] * b2 + gi * gi * one_m_b2;
    }
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - (mi * factor / (sqrtf(vi) + eps)) * lr;
}
"#;

/// The scalar arguments of one step of the kernel (see `HostAdam`'s constants).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamArgs {
    /// Learning rate.
    pub lr: f32,
    /// β1.
    pub b1: f32,
    /// β2.
    pub b2: f32,
    /// 1 − β1.
    pub one_m_b1: f32,
    /// 1 − β2.
    pub one_m_b2: f32,
    /// Bias correction `sqrt(1 − β2^t) / (1 − β1^t)`.
    pub factor: f32,
    /// ε scaled by `sqrt(1 − β2^t)`.
    pub eps: f32,
    /// Weight decay λ.
    pub wd: f32,
    /// 1 on the first step (the moments start from the gradient), else 0.
    pub first: i32,
    /// 0: no decay, 1: L2 penalty, 2: decoupled (AdamW).
    pub decay: i32,
}

/// What one chunked update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ChunkStats {
    /// Chunks the state was cut into.
    pub chunks: usize,
    /// Elements per chunk (the last may be shorter).
    pub chunk_len: usize,
    /// Bytes prefetched to the device (parameters, gradients and both moments, once).
    pub to_device_bytes: u64,
    /// Bytes prefetched back to the host.
    pub to_host_bytes: u64,
}

/// Adam on the GPU over state in managed memory, streamed through the device in chunks (see
/// the [module docs](self)).
pub struct ChunkedAdam {
    ordinal: i32,
    copy: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    kernel: CudaFunction,
    chunk_len: usize,
}

impl std::fmt::Debug for ChunkedAdam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkedAdam")
            .field("ordinal", &self.ordinal)
            .field("chunk_len", &self.chunk_len)
            .finish_non_exhaustive()
    }
}

impl ChunkedAdam {
    /// Compiles the kernel for GPU `ordinal` and sizes the chunks of a state of `len` values
    /// by the device's free memory now ([`super::chunks::chunk_len`]).
    ///
    /// # Errors
    /// [`Error::NoCuda`] without the driver; [`Error::DeviceMemory`] when not even
    /// two of the smallest chunks fit; [`Error::Cuda`] when NVRTC or the driver fail.
    pub fn new(ordinal: usize, len: usize) -> Result<Self, Error> {
        let ctx = context(ordinal)?;
        let (free, _total) = ctx.mem_get_info().map_err(cuda("cuMemGetInfo"))?;
        let chunk_len = super::chunks::chunk_len(free as u64, len).ok_or(Error::DeviceMemory {
            needed: 4 * 2 * super::chunks::CHUNK_BYTES_PER_ELEMENT * 64 * 1024,
            free: free as u64,
        })?;
        Self::with_chunk_len(ordinal, chunk_len)
    }

    /// As [`ChunkedAdam::new`] with chunks of `chunk_len` elements (at least 1).
    ///
    /// # Errors
    /// As [`ChunkedAdam::new`], without the free-memory check.
    pub fn with_chunk_len(ordinal: usize, chunk_len: usize) -> Result<Self, Error> {
        let ctx = context(ordinal)?;
        let options = CompileOptions {
            fmad: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            ftz: Some(false),
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(ADAM_KERNEL, options)
            .map_err(|e| Error::Cuda(format!("compiling the Adam kernel with NVRTC: {e:?}")))?;
        let module = ctx.load_module(ptx).map_err(cuda("cuModuleLoadData"))?;
        let kernel = module
            .load_function("ballast_adam_chunk")
            .map_err(cuda("cuModuleGetFunction"))?;
        Ok(Self {
            ordinal: ordinal as i32,
            copy: ctx.new_stream().map_err(cuda("cuStreamCreate"))?,
            compute: ctx.new_stream().map_err(cuda("cuStreamCreate"))?,
            kernel,
            chunk_len: chunk_len.max(1),
        })
    }

    /// Elements per chunk.
    pub fn chunk_len(&self) -> usize {
        self.chunk_len
    }

    /// One Adam step over `p` with `g`, moments `m` and `v` (all the same length), chunk by
    /// chunk on the device; on return every buffer is back on the host and the step is done.
    ///
    /// # Errors
    /// [`Error::Cuda`] when a prefetch, the launch or the final wait fails.
    ///
    /// # Panics
    /// If the buffers differ in length.
    pub fn step(
        &self,
        p: &mut ManagedBuffer,
        g: &ManagedBuffer,
        m: &mut ManagedBuffer,
        v: &mut ManagedBuffer,
        args: &AdamArgs,
    ) -> Result<ChunkStats, Error> {
        let n = p.len;
        assert!(
            g.len == n && m.len == n && v.len == n,
            "the chunked Adam's buffers differ in length"
        );
        let chunks = n.div_ceil(self.chunk_len);
        let issued = self.issue(p, g, m, v, chunks, args);
        // Every exit waits for both streams, the failing ones included: after an error some
        // prefetches or kernels may still be queued on the buffers, and the caller may touch
        // them from the host as soon as this returns.
        let compute = self.compute.synchronize().map_err(cuda("cuStreamSynchronize"));
        let copy = self.copy.synchronize().map_err(cuda("cuStreamSynchronize"));
        issued.and(compute).and(copy)?;
        let bytes = (4 * n * std::mem::size_of::<f32>()) as u64;
        Ok(ChunkStats {
            chunks,
            chunk_len: self.chunk_len,
            to_device_bytes: bytes,
            to_host_bytes: bytes,
        })
    }

    /// Queues the chunk schedule's prefetches and kernels on the two streams (without waiting
    /// for them).
    fn issue(
        &self,
        p: &ManagedBuffer,
        g: &ManagedBuffer,
        m: &ManagedBuffer,
        v: &ManagedBuffer,
        chunks: usize,
        args: &AdamArgs,
    ) -> Result<(), Error> {
        let n = p.len;
        let range = |i: usize| i * self.chunk_len..((i + 1) * self.chunk_len).min(n);
        let device = p.device_location();
        let host = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
            id: 0,
        };
        let mut loaded = Vec::with_capacity(chunks);
        let mut updated = Vec::with_capacity(chunks);
        for op in super::chunks::chunk_schedule(chunks) {
            match op {
                super::chunks::ChunkOp::Load(i) => {
                    for b in [p, g, m, v] {
                        b.prefetch_range(range(i), device, &self.copy)?;
                    }
                    loaded.push(self.copy.record_event(None).map_err(cuda("cuEventRecord"))?);
                }
                super::chunks::ChunkOp::Update(i) => {
                    self.compute.wait(&loaded[i]).map_err(cuda("cuStreamWaitEvent"))?;
                    self.launch(p, g, m, v, range(i), args)?;
                    updated.push(self.compute.record_event(None).map_err(cuda("cuEventRecord"))?);
                }
                super::chunks::ChunkOp::Unload(i) => {
                    self.copy.wait(&updated[i]).map_err(cuda("cuStreamWaitEvent"))?;
                    for b in [p, g, m, v] {
                        b.prefetch_range(range(i), host, &self.copy)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Launches the kernel over elements `range` of the four buffers on the compute stream.
    fn launch(
        &self,
        p: &ManagedBuffer,
        g: &ManagedBuffer,
        m: &ManagedBuffer,
        v: &ManagedBuffer,
        range: std::ops::Range<usize>,
        a: &AdamArgs,
    ) -> Result<(), Error> {
        let n = range.len() as u64;
        let [pp, gp, mp, vp] = [p, g, m, v].map(|b| b.address(range.start));
        let threads = 256u32;
        let config = LaunchConfig {
            grid_dim: (range.len().div_ceil(threads as usize) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.compute.launch_builder(&self.kernel);
        launch
            .arg(&pp)
            .arg(&gp)
            .arg(&mp)
            .arg(&vp)
            .arg(&n)
            .arg(&a.lr)
            .arg(&a.b1)
            .arg(&a.b2)
            .arg(&a.one_m_b1)
            .arg(&a.one_m_b2)
            .arg(&a.factor)
            .arg(&a.eps)
            .arg(&a.wd)
            .arg(&a.first)
            .arg(&a.decay);
        // SAFETY: the kernel's parameters are, in order, four device addresses of `n` f32 each
        // inside live managed allocations (the ranges lie within the buffers: `range` comes
        // from `step`, cut from their common length), `n` as u64, nine f32 and two i32, matching
        // the pushed arguments; no other user writes these ranges until the copy stream's
        // unload, which waits for this launch's event, and `step` waits for both streams on
        // every path before the caller can touch the buffers again.
        unsafe { launch.launch(config) }
            .map(|_| ())
            .map_err(|e| Error::Cuda(format!("launching the Adam kernel: {e:?}")))
    }
}

/// The primary context of GPU `ordinal`, once the driver is known to be there.
fn context(ordinal: usize) -> Result<Arc<CudaContext>, Error> {
    // SAFETY: only tries to load the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoCuda);
    }
    CudaContext::new(ordinal).map_err(cuda("cuCtxCreate"))
}

/// Turns a driver error into [`Error::Cuda`] naming the call.
fn cuda(call: &'static str) -> impl Fn(result::DriverError) -> Error {
    move |e| Error::Cuda(format!("{call}: {e:?}"))
}
