//! Where optimizer state lives: a host vector, or CUDA managed memory advised to the host.

#[cfg(feature = "cuda")]
use crate::Error;

/// Optimizer state memory the host Adam works on: a host vector, or (with `cuda`, on a GPU rank)
/// CUDA managed memory advised to live on the host and be accessed by the device.
///
/// The host Adam is the state's only user, so managed state is prefetched to the host before each
/// update (explicit prefetch runs at copy speed; faulting page by page does not). A clone is a
/// host copy.
pub enum StateBuffer {
    /// Plain host memory.
    Host(Vec<f32>),
    /// CUDA managed memory (not yet verified on a GPU).
    #[cfg(feature = "cuda")]
    Managed(super::managed::ManagedBuffer),
}

impl StateBuffer {
    /// `len` zeros in host memory.
    pub fn host(len: usize) -> Self {
        Self::Host(vec![0.0; len])
    }

    /// `len` values in managed memory for GPU `ordinal`, after checking the device can hold
    /// them.
    ///
    /// # Errors
    /// [`Error::NoCuda`], [`Error::DeviceMemory`] or [`Error::Cuda`].
    #[cfg(feature = "cuda")]
    pub fn managed(ordinal: usize, len: usize) -> Result<Self, Error> {
        super::managed::ManagedBuffer::new(ordinal, len).map(Self::Managed)
    }

    /// Whether this is managed memory.
    pub fn is_managed(&self) -> bool {
        !matches!(self, Self::Host(_))
    }

    /// Moves managed memory to the host and waits (a no-op for host memory). A failed
    /// prefetch only costs speed: host access still works, by page faults.
    pub fn prepare_for_host(&mut self) {
        #[cfg(feature = "cuda")]
        if let Self::Managed(b) = self {
            if b.prefetch_to_host().and_then(|()| b.wait()).is_err() {
                eprintln!(
                    "ballast: warning: prefetching optimizer state to the host failed; it will fault in page by page"
                );
            }
        }
    }
}

impl std::ops::Deref for StateBuffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Self::Host(v) => v,
            #[cfg(feature = "cuda")]
            Self::Managed(b) => b.as_slice(),
        }
    }
}

impl std::ops::DerefMut for StateBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            Self::Host(v) => v,
            #[cfg(feature = "cuda")]
            Self::Managed(b) => b.as_mut_slice(),
        }
    }
}

impl Clone for StateBuffer {
    fn clone(&self) -> Self {
        Self::Host(self.to_vec())
    }
}

impl PartialEq for StateBuffer {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}
