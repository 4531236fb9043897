//! Optimizer state in CUDA unified (managed) memory, with placement hints. Not yet verified on
//! a GPU: this machine has none; the code is type-checked in CI.
//!
//! The buffer is allocated with `cuMemAllocManaged`, advised to live on the host
//! (`CU_MEM_ADVISE_SET_PREFERRED_LOCATION` = host) and to be accessed by the device
//! (`CU_MEM_ADVISE_SET_ACCESSED_BY` = device), and moved explicitly with `cuMemPrefetchAsync`
//! on a dedicated stream: to the device before a kernel uses it, back to the host after.
//! Explicit prefetch runs at copy speed; page faults on demand are at least twice as slow and,
//! oversubscribed, far worse. Before allocating, free device memory is checked: asking for more
//! managed memory than the device can hold is refused with an error, never attempted (it can
//! stall a GPU).

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::OffloadError;

/// A managed allocation of `len` f32 values.
pub struct ManagedBuffer {
    ptr: sys::CUdeviceptr,
    len: usize,
    ordinal: i32,
    stream: Arc<CudaStream>,
}

impl ManagedBuffer {
    /// Allocates `len` f32 in managed memory for device `ordinal`, preferring the host.
    ///
    /// # Errors
    /// [`OffloadError::NoCuda`] without the driver; [`OffloadError::DeviceMemory`] when the
    /// device has less free memory than the buffer; [`OffloadError::Cuda`] on driver errors.
    pub fn new(ordinal: usize, len: usize) -> Result<Self, OffloadError> {
        // SAFETY: only tries to load the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(OffloadError::NoCuda);
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| OffloadError::Cuda(format!("{e:?}")))?;
        let (free, _total) = ctx.mem_get_info().map_err(|e| OffloadError::Cuda(format!("{e:?}")))?;
        let bytes = len * std::mem::size_of::<f32>();
        if bytes > free {
            return Err(OffloadError::DeviceMemory {
                needed: bytes as u64,
                free: free as u64,
            });
        }
        let stream = ctx.new_stream().map_err(|e| OffloadError::Cuda(format!("{e:?}")))?;
        // SAFETY: a fresh allocation of `bytes` bytes; it is freed once in Drop.
        let ptr = unsafe { result::malloc_managed(bytes, sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
            .map_err(|e| OffloadError::Cuda(format!("cuMemAllocManaged: {e:?}")))?;
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
            .map_err(|e| OffloadError::Cuda(format!("cuMemAdvise(preferred host): {e:?}")))?;
            result::mem_advise(ptr, bytes, sys::CUmem_advise::CU_MEM_ADVISE_SET_ACCESSED_BY, device)
                .map_err(|e| OffloadError::Cuda(format!("cuMemAdvise(accessed by device): {e:?}")))?;
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
    /// [`OffloadError::Cuda`].
    pub fn prefetch_to_device(&self) -> Result<(), OffloadError> {
        self.prefetch(self.device_location())
    }

    /// Starts moving the buffer back to the host.
    ///
    /// # Errors
    /// [`OffloadError::Cuda`].
    pub fn prefetch_to_host(&self) -> Result<(), OffloadError> {
        self.prefetch(sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
            id: 0,
        })
    }

    fn prefetch(&self, to: sys::CUmemLocation) -> Result<(), OffloadError> {
        // SAFETY: the range is this allocation; the stream is ours.
        unsafe { result::mem_prefetch_async(self.ptr, self.len * 4, to, self.stream.cu_stream()) }
            .map_err(|e| OffloadError::Cuda(format!("cuMemPrefetchAsync: {e:?}")))
    }

    /// Waits for this buffer's prefetches.
    ///
    /// # Errors
    /// [`OffloadError::Cuda`].
    pub fn wait(&self) -> Result<(), OffloadError> {
        self.stream
            .synchronize()
            .map_err(|e| OffloadError::Cuda(format!("{e:?}")))
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
