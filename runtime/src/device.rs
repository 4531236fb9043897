//! Which burn device a rank trains on: `flex` (the CPU), `wgpu` (burn's wgpu backend: Vulkan,
//! Metal or DX12, and Mesa's software Vulkan device on machines without a GPU) or `cuda`.
//!
//! Every backend runs the same [`crate::DataParallel`] step; only the device differs. A choice
//! names a backend that this binary may not have been built with: asking for it is an error that
//! names the cargo feature to add, never a silent fallback to the CPU.
//!
//! ```
//! use ballast::device::DeviceChoice;
//!
//! let choices = DeviceChoice::parse_list("wgpu,flex,flex").unwrap();
//! assert_eq!(choices[0], DeviceChoice::Wgpu);
//! assert_eq!(DeviceChoice::for_rank(&choices, 2), DeviceChoice::Flex);
//! assert!(DeviceChoice::parse_list("tpu").is_err());
//! ```

use std::fmt;

use crate::Error;
use burn::tensor::Device;

/// One rank's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// burn's `flex` CPU backend (the default).
    #[default]
    Flex,
    /// burn's wgpu backend on the best adapter wgpu finds (`CUBECL_WGPU_DEFAULT_DEVICE`
    /// overrides it).
    Wgpu,
    /// burn's wgpu backend on a CPU adapter (Mesa's software Vulkan device, lavapipe).
    WgpuCpu,
    /// A CUDA GPU: the given ordinal, or the one of this process's local rank.
    Cuda(Option<usize>),
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flex => write!(f, "flex"),
            Self::Wgpu => write!(f, "wgpu"),
            Self::WgpuCpu => write!(f, "wgpu:cpu"),
            Self::Cuda(None) => write!(f, "cuda"),
            Self::Cuda(Some(i)) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "flex" | "cpu" => Self::Flex,
            "wgpu" => Self::Wgpu,
            "wgpu:cpu" => Self::WgpuCpu,
            "cuda" => Self::Cuda(None),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Self::Cuda(Some(i)),
                _ => return Err(Error::UnknownDevice(s.to_string())),
            },
        })
    }
}

impl DeviceChoice {
    /// Parses a comma-separated list, one device per rank (one entry applies to every rank).
    ///
    /// # Errors
    /// [`Error::UnknownDevice`] naming the first entry that is not a device.
    pub fn parse_list(s: &str) -> Result<Vec<Self>, Error> {
        s.split(',').map(str::parse).collect()
    }

    /// `rank`'s device from a list as [`DeviceChoice::parse_list`] returns it: one entry is every
    /// rank's; an empty list, or a rank past its end, is `flex`.
    pub fn for_rank(list: &[Self], rank: usize) -> Self {
        match list {
            [one] => *one,
            _ => list.get(rank).copied().unwrap_or_default(),
        }
    }

    /// Whether the device is an accelerator (not host memory).
    pub fn is_gpu(self) -> bool {
        !matches!(self, Self::Flex)
    }

    /// The burn device (without autodiff), or why this binary cannot provide it. `local_rank`
    /// picks the GPU of [`DeviceChoice::Cuda`]`(None)`.
    ///
    /// # Errors
    /// [`Error::NotBuilt`] when the backend's feature is missing.
    pub fn device(self, local_rank: usize) -> Result<Device, Error> {
        let _ = local_rank;
        match self {
            Self::Flex => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "wgpu")]
            Self::WgpuCpu => Ok(Device::wgpu(burn::tensor::DeviceKind::Cpu)),
            #[cfg(feature = "cuda")]
            Self::Cuda(index) => Ok(Device::cuda(index.unwrap_or(local_rank))),
            #[allow(unreachable_patterns)]
            other => Err(Error::NotBuilt {
                choice: other.to_string(),
                feature: if matches!(other, Self::Cuda(_)) { "cuda" } else { "wgpu" },
            }),
        }
    }
}

/// What a device is called in plans and reports: `cpu (flex)`, or the backend and the name the
/// adapter or GPU gives itself (`wgpu: llvmpipe (LLVM 19.1.7, 256 bits)`, `cuda:0: NVIDIA H100`).
pub fn device_name(device: &Device) -> String {
    let device = device.clone().inner();
    if device == Device::flex() {
        return "cpu (flex)".to_string();
    }
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let probe = burn::tensor::Tensor::<1>::zeros([1], &device);
        if let Ok(prim) = probe.try_into_primitive::<burn::backend::Cube>() {
            let runtime = format!("{:?}", prim.device).to_ascii_lowercase();
            let kind = if runtime.contains("cuda") { "cuda" } else { "wgpu" };
            return format!("{kind}: {}", prim.client.properties().identity.name);
        }
    }
    format!("{device:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print_back() {
        for text in ["flex", "wgpu", "wgpu:cpu", "cuda", "cuda:3"] {
            let c: DeviceChoice = text.parse().unwrap();
            assert_eq!(c.to_string(), text);
        }
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Flex);
        for bad in ["", "gpu", "cuda:x", "wgpu:2"] {
            assert!(
                matches!(bad.parse::<DeviceChoice>(), Err(Error::UnknownDevice(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn one_entry_is_every_rank_s() {
        let one = DeviceChoice::parse_list("wgpu").unwrap();
        assert_eq!(DeviceChoice::for_rank(&one, 5), DeviceChoice::Wgpu);
        let three = DeviceChoice::parse_list("wgpu, flex ,cuda:1").unwrap();
        assert_eq!(DeviceChoice::for_rank(&three, 2), DeviceChoice::Cuda(Some(1)));
        assert_eq!(DeviceChoice::for_rank(&[], 0), DeviceChoice::Flex);
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn a_backend_not_built_names_its_feature() {
        let err = DeviceChoice::Wgpu.device(0).unwrap_err();
        assert!(err.to_string().contains("--features wgpu"), "{err}");
    }
}
