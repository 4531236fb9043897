//! Device failures that a backend reports late or aside, brought to the step they belong to.
//!
//! cubecl (the runtime under burn's wgpu and CUDA backends) runs kernels on a device thread of
//! its own and reports failures in two ways, neither of them a panic on the caller's thread:
//!
//! - **On the buffers.** A failed allocation (`IoError::OutOfMemory`) or launch is attached to
//!   the buffers the work did not write, and every later kernel that reads them passes the
//!   failure on to its outputs; it surfaces when one of them is read or checked
//!   (`ComputeClient::sync_buffers`). [`check_tensors`] asks for exactly that, without reading
//!   the values: ballast runs it on a micro-batch's loss and gradients before adding them to the
//!   step's sums (so an out-of-memory can back off and retry), and on a bucket before handing its
//!   CUDA memory to NCCL.
//! - **In the log.** A panic on the device thread (a kernel that does not compile, NVRTC not
//!   found, `CUDA_PATH` unset, wgpu's uncaptured errors) is caught there and written with
//!   `log::warn!` (target `cubecl_common::device::...`); the buffers only say the work was "torn
//!   down". [`DeviceLog`] records cubecl's errors and those warnings. [`install_device_log`]
//!   installs it as the process's logger where none is installed yet; a program with its own
//!   logger wraps it ([`DeviceLog::wrapping`]) instead. [`crate::DataParallel`] fails the step
//!   that follows a recorded report with its text, so a job never trains on outputs that were
//!   never computed.
//!
//! [`canary`] runs one small computation with an exact answer on a device: the check a rank
//! makes before it trains.

use std::sync::{Mutex, OnceLock};

use crate::Error;
use burn::tensor::{DType, Device, Tensor, TensorData};

/// Reports kept at most (the oldest are dropped first).
const KEPT: usize = 64;

/// Every report recorded in this process, with the count of all ever recorded.
static REPORTS: Mutex<(u64, Vec<String>)> = Mutex::new((0, Vec::new()));
static INSTALLED: OnceLock<bool> = OnceLock::new();
static WRAPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A `log` sink that records cubecl's error records and its device thread's warnings (failed
/// tasks: kernels that did not compile or launch), forwarding every record to the logger it
/// wraps, if any.
pub struct DeviceLog {
    inner: Option<Box<dyn log::Log>>,
}

impl DeviceLog {
    /// A sink that records and forwards nothing else (what [`install_device_log`] installs).
    pub fn new() -> Self {
        Self { inner: None }
    }

    /// A sink that records, then hands every record to `inner` (a program's own logger): install
    /// it with `log::set_boxed_logger` in place of `inner`, then call [`device_log_wrapped`].
    pub fn wrapping(inner: Box<dyn log::Log>) -> Self {
        Self { inner: Some(inner) }
    }
}

impl Default for DeviceLog {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a record reports a device failure: an error from cubecl, or a warning from its
/// device thread's channel (where a panicking task is caught and logged).
fn is_device_failure(metadata: &log::Metadata<'_>) -> bool {
    let target = metadata.target();
    match metadata.level() {
        log::Level::Error => target.starts_with("cubecl"),
        log::Level::Warn => target.starts_with("cubecl_common::device"),
        _ => false,
    }
}

impl log::Log for DeviceLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        is_device_failure(metadata) || self.inner.as_ref().is_some_and(|l| l.enabled(metadata))
    }

    fn log(&self, record: &log::Record<'_>) {
        if is_device_failure(record.metadata()) {
            record_report(format!("{}: {}", record.target(), record.args()));
        }
        if let Some(inner) = &self.inner {
            inner.log(record);
        }
    }

    fn flush(&self) {
        if let Some(inner) = &self.inner {
            inner.flush();
        }
    }
}

/// Records one report (for a backend's own failure path, and for tests).
pub fn record_report(text: String) {
    let mut reports = REPORTS.lock().unwrap_or_else(|e| e.into_inner());
    reports.0 += 1;
    reports.1.push(text);
    if reports.1.len() > KEPT {
        reports.1.remove(0);
    }
}

/// Installs [`DeviceLog`] as the process's logger, once, unless another logger is installed;
/// returns whether the sink records (it was installed by this or an earlier call). The level
/// filter is raised to `Warn` where it was lower, so cubecl's warnings reach the sink.
pub fn install_device_log() -> bool {
    *INSTALLED.get_or_init(|| {
        let installed = log::set_boxed_logger(Box::new(DeviceLog::new())).is_ok();
        if installed && log::max_level() < log::LevelFilter::Warn {
            log::set_max_level(log::LevelFilter::Warn);
        }
        installed
    })
}

/// Whether a [`DeviceLog`] records in this process: installed by [`install_device_log`], or
/// wrapped around a program's logger and announced with [`device_log_wrapped`].
pub fn device_log_installed() -> bool {
    INSTALLED.get().copied().unwrap_or(false) || WRAPPED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Tells ballast that a [`DeviceLog::wrapping`] logger is installed, so the step waits for the
/// device and checks the log (call it after `log::set_boxed_logger`).
pub fn device_log_wrapped() {
    WRAPPED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The reports recorded after the first `seen` of all ever recorded, and the new count: each
/// reader keeps its own count, so every rank of a process sees every report.
pub fn reports_since(seen: u64) -> (Vec<String>, u64) {
    let reports = REPORTS.lock().unwrap_or_else(|e| e.into_inner());
    let (total, kept) = (&reports.0, &reports.1);
    let new = (total.saturating_sub(seen) as usize).min(kept.len());
    (kept[kept.len() - new..].to_vec(), *total)
}

/// Reports recorded so far in this process (the count [`reports_since`] takes).
pub fn reports_recorded() -> u64 {
    REPORTS.lock().unwrap_or_else(|e| e.into_inner()).0
}

/// A device failure found by [`check_tensors`] or [`canary`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFault {
    /// The backend's message, with the device log's reports since the check began.
    pub message: String,
}

impl DeviceFault {
    /// Whether the device ran out of memory (cubecl's `OutOfMemory`, CUDA's and Vulkan's words).
    pub fn is_out_of_memory(&self) -> bool {
        names_out_of_memory(&self.message)
    }
}

impl std::fmt::Display for DeviceFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Whether a backend's text reports an exhausted device memory (cubecl's `IoError::OutOfMemory`
/// and `LaunchError::OutOfMemory`, CUDA's and Vulkan's own words).
pub fn names_out_of_memory(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "out of device memory",
        "out-of-memory",
        "out of memory",
        "outofmemory",
        "cuda_error_out_of_memory",
        "error_out_of_host_memory",
        "error_out_of_device_memory",
    ]
    .iter()
    .any(|k| t.contains(k))
}

/// Asks the device whether the work that wrote `tensors` really ran: waits for it, then for any
/// failure cubecl attached to their buffers (an allocation that failed, a kernel that did not
/// compile or launch, or anything upstream of them), and for device-log reports recorded after
/// `seen`. Reads no values. Tensors not on a cubecl device pass at once.
///
/// # Errors
/// The [`DeviceFault`] with cubecl's message and the reports.
pub fn check_tensors(tensors: &[Tensor<1>], seen: u64) -> Result<(), DeviceFault> {
    let pending = pending_error(tensors);
    let (reports, _) = reports_since(seen);
    if pending.is_none() && reports.is_empty() {
        return Ok(());
    }
    let message = pending.unwrap_or_else(|| "the device log reported a failure".to_string());
    Err(DeviceFault {
        message: append_reports(message, &reports),
    })
}

/// cubecl's answer for the buffers of `tensors` (those on cubecl devices), as text.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn pending_error(tensors: &[Tensor<1>]) -> Option<String> {
    use burn::backend::Cube;
    let prims: Vec<_> = tensors
        .iter()
        .filter_map(|t| t.clone().try_into_primitive::<Cube>().ok())
        .collect();
    let first = prims.first()?;
    let handles = prims.iter().filter(|p| p.device == first.device).map(|p| &p.handle);
    cubecl_core::future::block_on(first.client.sync_buffers(handles))
        .err()
        .map(|e| e.to_string())
}

#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
fn pending_error(_tensors: &[Tensor<1>]) -> Option<String> {
    None
}

/// Side of the canary's matrices.
const CANARY_N: usize = 16;

/// Runs one small computation with an exact answer on `device`: a 16×16 matmul of small
/// integers and the sum of its result, read back and compared with the host's. A device whose
/// kernels do not compile or run, or compute wrong values, fails it; ranks run it before they
/// train, and `ballast doctor` runs it on every device it knows.
///
/// # Errors
/// [`Error`] naming the device, what went wrong and the likely cause.
pub fn canary(device: &Device) -> Result<(), Error> {
    canary_in(device, DType::F32)
}

/// [`canary`] computed in `dtype` (the inputs are cast to it on the device, the result cast back
/// to `f32`): whether the device runs kernels of that float type. In `f32` and `f64` every value
/// must be exact; in a half-precision type the inputs are -1, 0 and 1 and the values must be
/// within 1 % (the sum of 256 values is rounded there).
///
/// # Errors
/// As [`canary`].
pub fn canary_in(device: &Device, dtype: DType) -> Result<(), Error> {
    let n = CANARY_N;
    let exact = matches!(dtype, DType::F32 | DType::F64);
    let value = |k: usize, m: usize, r: usize| -> f32 {
        if exact {
            ((k * m) % r) as f32 - (r / 2) as f32
        } else {
            ((k * m) % 3) as f32 - 1.0
        }
    };
    let a: Vec<f32> = (0..n * n).map(|k| value(k, 7, 11)).collect();
    let b: Vec<f32> = (0..n * n).map(|k| value(k, 5, 9)).collect();
    // The elementwise products' sum first (the simplest kernels: a device that cannot compile
    // them reports it here), then the matmul and the sum of its result.
    let mut want = vec![a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()];
    let mut c = vec![0.0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            c[i * n + j] = (0..n).map(|k| a[i * n + k] * b[k * n + j]).sum();
        }
    }
    want.push(c.iter().sum());
    want.extend(c);
    let seen = reports_recorded();
    let name =
        std::panic::catch_unwind(|| crate::device::device_name(device)).unwrap_or_else(|_| format!("{device:?}"));
    let fail = |reason: String| Error::Canary {
        device: name.clone(),
        likely_cause: likely_cause(device, &reason),
        reason,
    };
    let logged = || {
        (!reports_since(seen).0.is_empty()).then(|| {
            with_reports(
                format!("the device log reported a failure while computing in {dtype:?}"),
                seen,
            )
        })
    };
    let read = |t: Tensor<1>| -> Result<Vec<f32>, String> {
        let values = t
            .cast(DType::F32)
            .try_into_data()
            .map_err(|e| format!("{e}"))
            .and_then(|d| d.try_into_vec::<f32>().map_err(|e| format!("{e:?}")));
        match logged() {
            Some(report) => Err(report),
            None => values.map_err(|e| with_reports(e, seen)),
        }
    };
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let upload = |v: &[f32]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [n, n]), device).cast(dtype);
        let (ta, tb) = (upload(&a), upload(&b));
        let mut values = read((ta.clone() * tb.clone()).sum().reshape([1]))?;
        let c = ta.matmul(tb);
        let sum = c.clone().sum().reshape([1]);
        values.extend(read(Tensor::cat(vec![sum, c.reshape([n * n])], 0))?);
        Ok::<_, String>(values)
    }));
    let values = match run {
        Ok(Ok(values)) => values,
        Ok(Err(e)) => return Err(fail(e)),
        Err(payload) => {
            let text = panic_message(payload.as_ref());
            return Err(fail(with_reports(format!("the backend panicked: {text}"), seen)));
        }
    };
    let wrong = |x: f32, y: f32| {
        if exact {
            x.to_bits() != y.to_bits()
        } else {
            // NaN is wrong too: it compares as nothing.
            !matches!(
                (x - y).abs().partial_cmp(&(0.01 * y.abs().max(1.0))),
                Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
            )
        }
    };
    match values.iter().zip(&want).position(|(&x, &y)| wrong(x, y)) {
        None if values.len() == want.len() => Ok(()),
        None => Err(fail(format!("{} values came back for {}", values.len(), want.len()))),
        Some(k) => Err(fail(format!(
            "value {k} is {} where {} is right (the kernels ran in {dtype:?} but computed wrong values)",
            values[k], want[k]
        ))),
    }
}

/// `message` followed by the device log's reports after `seen`.
fn with_reports(message: String, seen: u64) -> String {
    append_reports(message, &reports_since(seen).0)
}

/// `message` followed by `reports`, one per line, a report repeated in a row given once with
/// its count.
fn append_reports(mut message: String, reports: &[String]) -> String {
    let mut i = 0;
    while i < reports.len() {
        let same = reports[i..].iter().take_while(|r| **r == reports[i]).count();
        message.push_str("\n  device log: ");
        message.push_str(&reports[i]);
        if same > 1 {
            message.push_str(&format!(" ({same} times)"));
        }
        i += same;
    }
    message
}

/// What usually makes a device fail the canary, by kind of device and by what was said.
fn likely_cause(device: &Device, reason: &str) -> String {
    let name = format!("{device:?}").to_ascii_lowercase();
    let r = reason.to_ascii_lowercase();
    if name.contains("cuda") {
        if r.contains("unsupported_ptx_version") || r.contains("ptx") {
            "the NVRTC library is newer than the driver's CUDA: install an NVRTC no newer than the driver \
             (`ballast doctor` prints both versions) or a newer driver"
                .into()
        } else if r.contains("cuda_path") || r.contains("include") {
            "cubecl compiles kernels with NVRTC and needs the CUDA headers: set CUDA_PATH to the CUDA toolkit \
             (or to the folder of NVIDIA's cuda-runtime wheel that holds include/)"
                .into()
        } else if r.contains("nvrtc") {
            "NVRTC (libnvrtc) was not found or failed: install the CUDA toolkit's NVRTC or NVIDIA's \
             nvidia-cuda-nvrtc wheel (`ballast doctor` says where it looked)"
                .into()
        } else {
            "likely causes: NVRTC missing or newer than the driver, CUDA_PATH unset, or a driver too old for \
             this GPU; run `ballast doctor`"
                .into()
        }
    } else if name.contains("wgpu") {
        "the wgpu adapter could not run burn's kernels: check the Vulkan driver (`vulkaninfo`), or pick \
         another device with --device"
            .into()
    } else {
        "the CPU backend computed a wrong result, which points at a miscompiled binary or a memory fault".into()
    }
}

/// The text a panic carried (`panic!` with a literal or a formatted message), or a placeholder
/// for a payload of another type.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canary_passes_on_the_cpu() {
        canary(&Device::flex()).unwrap();
        canary_in(&Device::flex(), DType::BF16).unwrap();
    }

    #[test]
    fn reports_reach_every_reader_after_its_count() {
        let before = reports_recorded();
        record_report("cubecl: a kernel failed".into());
        let (new, after) = reports_since(before);
        assert_eq!(new, vec!["cubecl: a kernel failed".to_string()]);
        assert_eq!(reports_since(after).0, Vec::<String>::new());
        // Another reader that had not looked yet still sees it.
        assert!(reports_since(before).0.contains(&"cubecl: a kernel failed".to_string()));
    }

    #[test]
    fn only_device_failures_are_recorded() {
        let meta = |level, target| log::Metadata::builder().level(level).target(target).build();
        assert!(is_device_failure(&meta(log::Level::Error, "cubecl_wgpu::compute")));
        assert!(is_device_failure(&meta(
            log::Level::Warn,
            "cubecl_common::device::handle::channel"
        )));
        assert!(!is_device_failure(&meta(log::Level::Warn, "cubecl_runtime::tune")));
        assert!(!is_device_failure(&meta(log::Level::Error, "wgpu_hal::vulkan")));
        assert!(!is_device_failure(&meta(log::Level::Info, "cubecl_common::device")));
    }
}
