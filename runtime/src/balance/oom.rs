//! A device out-of-memory reported as a panic, caught at the micro-batch boundary.

/// Runs one micro-batch's forward and backward, containing a device out-of-memory.
///
/// burn reports a failed device allocation by panicking with cubecl's error text (it has no
/// typed error for it), so the panic is caught here, at the micro-batch boundary, and its text
/// returned; the caller discards the micro-batch and retries it smaller, as on a CPU rank over
/// its budget. Any other panic continues unwinding.
pub(super) fn contain_device_oom<T>(run: impl FnOnce() -> T) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(done) => Ok(done),
        Err(payload) => {
            let text = crate::health::panic_message(payload.as_ref());
            if names_out_of_memory(&text) {
                Err(first_line(&text))
            } else {
                std::panic::resume_unwind(payload)
            }
        }
    }
}

/// Whether a backend's panic text reports an exhausted device memory.
pub(super) fn names_out_of_memory(text: &str) -> bool {
    crate::health::names_out_of_memory(text)
}

/// The first line of a backend's message (cubecl's carry a backtrace after it).
pub(super) fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").to_string()
}
