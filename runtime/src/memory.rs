//! Measuring device memory: burn's memory pool on cubecl devices (wgpu, CUDA), a counting global
//! allocator on CPU ranks ([`DeviceMeter`] picks one).
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

use burn::tensor::Device;
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

/// Memory attributed to one device, above a baseline taken when the meter starts (after
/// datasets and other host-side state are loaded, before the model is built).
///
/// Two sources, chosen by [`DeviceMeter::for_device`]:
/// - **heap** (CPU backends, which have no memory pool to ask): the counting allocator's bytes
///   in use and their peak since [`DeviceMeter::reset_peak`];
/// - **pool** (cubecl devices: wgpu, CUDA): burn's own allocator of that device
///   (`memory_pool_usage`). [`DeviceMeter::reset_peak`] waits for the device and releases the
///   pool's free pages (`memory_cleanup`), so the bytes the pool reserves afterwards are the
///   high-water mark of the work since then. Other processes on the same GPU never count, and
///   neither does what the driver keeps for itself.
#[derive(Debug, Clone)]
pub struct DeviceMeter {
    baseline: u64,
    source: Source,
    cuda: Option<usize>,
}

#[derive(Debug, Clone)]
enum Source {
    Heap,
    Pool(Device),
}

impl DeviceMeter {
    /// Starts metering heap at the current usage.
    pub fn start() -> Self {
        Self {
            baseline: in_use(),
            source: Source::Heap,
            cuda: None,
        }
    }

    /// Starts metering `device`: its memory pool where burn reports one, else the heap.
    pub fn for_device(device: &Device) -> Self {
        match pool_reserved(device, true) {
            Some(reserved) => Self {
                baseline: reserved,
                source: Source::Pool(device.clone()),
                cuda: None,
            },
            None => Self::start(),
        }
    }

    /// Marks the metered device as CUDA GPU `ordinal` (offloaded optimizer state then goes to
    /// managed memory of that GPU).
    pub fn on_cuda(mut self, ordinal: usize) -> Self {
        self.cuda = Some(ordinal);
        self
    }

    /// The CUDA GPU this meter reads, when it meters one.
    pub fn gpu(&self) -> Option<usize> {
        self.cuda
    }

    /// Whether this meter reads a device's memory pool (not the process heap).
    pub fn reads_pool(&self) -> bool {
        matches!(self.source, Source::Pool(_))
    }

    /// Stops counting `bytes` allocated after the start as device memory: buffers that live in
    /// host memory on a real accelerator (offloaded optimizer state) share the heap with the
    /// simulated device on CPU ranks. A pool meter never sees host buffers.
    pub fn exclude(&mut self, bytes: u64) {
        if !self.reads_pool() {
            self.baseline += bytes;
        }
    }

    /// Starts a new peak window: the heap's peak restarts at its current usage; a pool waits
    /// for its device and releases its free pages.
    pub fn reset_peak(&self) {
        match &self.source {
            Source::Heap => reset_peak(),
            Source::Pool(device) => {
                let _ = device.sync();
                device.memory_cleanup();
            }
        }
    }

    /// Bytes in use above the baseline (a pool: bytes its live allocations hold).
    pub fn in_use(&self) -> u64 {
        match &self.source {
            Source::Heap => in_use(),
            Source::Pool(device) => device.memory_pool_usage().map_or(0, |u| u.bytes_in_use),
        }
        .saturating_sub(self.baseline)
    }

    /// Peak above the baseline since the last [`DeviceMeter::reset_peak`] (a pool: the bytes it
    /// reserves once the device has finished the queued work).
    pub fn peak(&self) -> u64 {
        match &self.source {
            Source::Heap => peak(),
            Source::Pool(device) => pool_reserved(device, false).unwrap_or(0),
        }
        .saturating_sub(self.baseline)
    }
}

/// Bytes `device`'s pool reserves after its queued work (and, with `clean`, a release of its
/// free pages); `None` where burn reports no pool (CPU backends).
fn pool_reserved(device: &Device, clean: bool) -> Option<u64> {
    device.memory_pool_usage()?;
    let _ = device.sync();
    if clean {
        device.memory_cleanup();
    }
    device.memory_pool_usage().map(|u| u.bytes_reserved)
}
