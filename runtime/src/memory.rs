//! Measuring memory on CPU ranks: a counting global allocator.
//!
//! CPU backends have no device memory pool to ask, so a binary that wants exact numbers installs
//! [`CountingAlloc`] as its global allocator; every heap allocation of the process then updates
//! two counters, bytes in use and the peak since the last [`reset_peak`]. The `ballast` binary
//! and the examples install it. Without it, [`is_counting`] is false and measurements report
//! zero.
//!
//! ```text
//! #[global_allocator]
//! static ALLOC: ballast::memory::CountingAlloc = ballast::memory::CountingAlloc;
//! ```
//!
//! The counters are process-wide: with ranks as threads they add up all ranks, so the balancer
//! probes such worlds before the threads start (one model, one measurement).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

static IN_USE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting bytes in use and their peak.
pub struct CountingAlloc;

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size() as u64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size() as u64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's arguments.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grow((new_size - layout.size()) as u64);
            } else {
                IN_USE.fetch_sub((layout.size() - new_size) as u64, Ordering::Relaxed);
            }
        }
        p
    }
}

fn grow(bytes: u64) {
    ACTIVE.store(true, Ordering::Relaxed);
    let now = IN_USE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// Heap bytes in use now.
pub fn in_use() -> u64 {
    IN_USE.load(Ordering::Relaxed)
}

/// Highest heap bytes in use since the last [`reset_peak`].
pub fn peak() -> u64 {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new peak window at the current usage.
pub fn reset_peak() {
    PEAK.store(IN_USE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Whether [`CountingAlloc`] is this process's global allocator.
pub fn is_counting() -> bool {
    drop(std::hint::black_box(Vec::<u8>::with_capacity(16)));
    ACTIVE.load(Ordering::Relaxed)
}

/// Memory attributed to one device: on CPU ranks, heap above a baseline taken when the device
/// "starts" (after datasets and other host-side state are loaded); on a GPU (feature `cuda`),
/// device memory in use above the baseline (`cuMemGetInfo`: burn's memory pool keeps what it
/// once reserved, so usage after a pass is its high-water mark; not yet verified on a GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMeter {
    baseline: u64,
    gpu: Option<usize>,
}

impl DeviceMeter {
    /// Starts metering heap at the current usage.
    pub fn start() -> Self {
        Self {
            baseline: in_use(),
            gpu: None,
        }
    }

    /// Starts metering the memory of CUDA device `ordinal` at its current usage.
    ///
    /// # Errors
    /// When the device cannot be queried.
    #[cfg(feature = "cuda")]
    pub fn start_gpu(ordinal: usize) -> Result<Self, String> {
        let used = gpu_used(ordinal).ok_or_else(|| format!("cannot query the memory of cuda:{ordinal}"))?;
        Ok(Self {
            baseline: used,
            gpu: Some(ordinal),
        })
    }

    /// The GPU this meter reads, when it meters one.
    pub fn gpu(&self) -> Option<usize> {
        self.gpu
    }

    /// Stops counting `bytes` allocated after the start as device memory: buffers that live in
    /// host memory on a real accelerator (offloaded optimizer state) share the heap with the
    /// simulated device on CPU ranks.
    pub fn exclude(&mut self, bytes: u64) {
        if self.gpu.is_none() {
            self.baseline += bytes;
        }
    }

    fn now(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(ordinal) = self.gpu {
            return gpu_used(ordinal);
        }
        None
    }

    /// Bytes in use above the baseline.
    pub fn in_use(&self) -> u64 {
        self.now().unwrap_or_else(in_use).saturating_sub(self.baseline)
    }

    /// Peak above the baseline since the last [`reset_peak`] (GPU: usage now, the pool's
    /// high-water mark).
    pub fn peak(&self) -> u64 {
        self.now().unwrap_or_else(peak).saturating_sub(self.baseline)
    }
}

#[cfg(feature = "cuda")]
fn gpu_used(ordinal: usize) -> Option<u64> {
    let ctx = cudarc::driver::CudaContext::new(ordinal).ok()?;
    let (free, total) = ctx.mem_get_info().ok()?;
    Some((total - free) as u64)
}
