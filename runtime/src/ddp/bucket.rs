//! A step's buckets: the fused buffer cut at bucket boundaries, handed to the communicator as
//! device buffers, and what the reduction leaves on the device and on the host.

use std::ops::Range;

use burn::tensor::{Device, Tensor, TensorData};

use ballast_collectives::{bucket::BucketLayout, BufferError, DeviceBuffer};

use crate::transfer::{byte_len, to_host, Traffic};
use crate::Error;

/// The pieces of the fused buffer (tensors laid out back to back) cut at the bucket boundaries of
/// `layout`: each bucket's parts in order, a piece that straddles a boundary sliced in two.
pub(super) fn bucket_parts(layout: &BucketLayout, pieces: Vec<Tensor<1>>) -> Vec<Vec<Tensor<1>>> {
    let mut out: Vec<Vec<Tensor<1>>> = vec![Vec::new(); layout.num_buckets()];
    let buckets: Vec<Range<usize>> = layout.buckets().collect();
    let mut offset = 0;
    let mut b = 0;
    for piece in pieces {
        let len = piece.shape().num_elements();
        let (start, end) = (offset, offset + len);
        offset = end;
        while b < buckets.len() && buckets[b].end <= start {
            b += 1;
        }
        let mut k = b;
        while k < buckets.len() && buckets[k].start < end {
            let (lo, hi) = (start.max(buckets[k].start), end.min(buckets[k].end));
            out[k].push(if lo == start && hi == end {
                piece.clone()
            } else {
                piece.clone().slice(lo - start..hi - start)
            });
            k += 1;
        }
    }
    out
}

/// One bucket of the fused buffer, for [`Communicator::all_reduce_sum_buckets`]: its parts on the
/// device before the reduction, one tensor after it. Counts the bytes it moves and, when asked
/// to, keeps the host copy of what was written back from a given offset on (the tail, or all of it).
///
/// A bucket is staged for the host as one transfer on an accelerator (its parts concatenated on
/// the device first); on `flex`, whose device memory is host memory, each part is copied out
/// directly, which saves a concatenation pass and a copy. On a CUDA device under NCCL the
/// concatenation is reduced where it is ([`DeviceBuffer::cuda_region`]) and nothing is staged.
pub(super) struct TensorBucket {
    pub(super) parts: Vec<Tensor<1>>,
    pub(super) len: usize,
    /// Only receives a result ([`TensorBucket::receiving`]).
    pub(super) receiving: bool,
    pub(super) reduced: Option<Tensor<1>>,
    pub(super) device: Device,
    pub(super) keep_from: Option<usize>,
    pub(super) written: Option<HostCopy>,
    pub(super) traffic: Traffic,
}

impl TensorBucket {
    pub(super) fn new(parts: Vec<Tensor<1>>, device: Device, keep_from: Option<usize>) -> Self {
        Self {
            len: parts.iter().map(|p| p.shape().num_elements()).sum(),
            parts,
            receiving: false,
            reduced: None,
            device,
            keep_from,
            written: None,
            traffic: Traffic::default(),
        }
    }

    /// A buffer of `len` values that only receives a collective's result (a reduce-scatter's
    /// shard, an all-gather's output): nothing is read from it, and on a CUDA device it is
    /// allocated where the communicator writes.
    pub(super) fn receiving(len: usize, device: Device) -> Self {
        Self {
            receiving: true,
            len,
            ..Self::new(Vec::new(), device, None)
        }
    }

    /// The reduced values on the host: the copy kept when the communicator wrote them back,
    /// else read from the device (counted in `traffic`).
    pub(super) fn into_host(self, traffic: &mut Traffic) -> Result<Vec<f32>, Error> {
        traffic.add(self.traffic);
        if let Some(HostCopy { start: 0, values }) = self.written {
            return Ok(values);
        }
        let Some(reduced) = self.reduced else {
            return Ok(Vec::new());
        };
        let values = to_host(reduced, "the step's reduced values")?;
        traffic.to_host += byte_len(values.len());
        Ok(values)
    }
}

impl DeviceBuffer for TensorBucket {
    fn len(&self) -> usize {
        self.len
    }

    /// Reads the parts once: they are handed to the host (without a copy where the backend can
    /// give up a buffer it alone holds, as `flex` does), and a second read is an error.
    fn read(&mut self) -> Result<Vec<f32>, BufferError> {
        if self.receiving && self.parts.is_empty() {
            // Nothing to send: a communicator that stages buffers reads this one as zeros.
            return Ok(vec![0.0; self.len]);
        }
        if self.parts.is_empty() && self.len > 0 {
            return Err("a gradient bucket was read twice in one step".into());
        }
        let parts = std::mem::take(&mut self.parts);
        let staged = if self.device == Device::flex() || parts.len() == 1 {
            parts
        } else {
            vec![Tensor::cat(parts, 0)]
        };
        let values = if let [_] = staged.as_slice() {
            let part = staged.into_iter().next().expect("one part");
            let data = part.try_into_data().map_err(|e| format!("{e:?}"))?;
            data.try_into_vec::<f32>().map_err(|e| format!("{e:?}"))?
        } else {
            let mut values = Vec::with_capacity(self.len);
            for part in staged {
                let data = part.try_into_data().map_err(|e| format!("{e:?}"))?;
                values.extend_from_slice(data.as_slice::<f32>().map_err(|e| format!("{e:?}"))?);
            }
            values
        };
        self.traffic.to_host += byte_len(values.len());
        Ok(values)
    }

    fn write(&mut self, values: Vec<f32>) -> Result<(), BufferError> {
        let n = values.len();
        self.traffic.to_device += byte_len(n);
        if let Some(start) = self.keep_from {
            self.written = Some(HostCopy {
                start,
                values: values[start.min(n)..].to_vec(),
            });
        }
        // An empty result needs no tensor (an empty shard).
        self.reduced = (n > 0).then(|| Tensor::from_data(TensorData::new(values, [n]), &self.device));
        Ok(())
    }

    /// On a CUDA device: the parts laid out in one fresh device tensor, which the communicator
    /// then reduces in place and which becomes the reduced bucket (no host copy at all).
    #[cfg(feature = "cuda")]
    fn cuda_region(&mut self) -> Result<Option<ballast_collectives::CudaRegion>, BufferError> {
        if self.receiving && self.parts.is_empty() && self.len > 0 {
            self.parts = vec![Tensor::zeros([self.len], &self.device)];
        }
        if self.parts.is_empty() || self.len == 0 {
            return Ok(None);
        }
        let mut parts = std::mem::take(&mut self.parts);
        let flat = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(parts, 0)
        };
        match crate::cuda::region_of(flat)? {
            Ok((tensor, region)) => {
                self.reduced = Some(tensor);
                Ok(Some(region))
            }
            Err(flat) => {
                self.parts = vec![flat];
                Ok(None)
            }
        }
    }
}

/// The reduced values of a bucket from `start` (an offset in the bucket) to its end, kept on the
/// host when the communicator wrote them back from there.
pub(super) struct HostCopy {
    pub(super) start: usize,
    pub(super) values: Vec<f32>,
}

/// A step's reduced buckets: on the device, and on the host where the communicator left a copy.
pub(super) struct Reduced {
    pub(super) layout: BucketLayout,
    pub(super) buckets: Vec<Tensor<1>>,
    pub(super) host: Vec<Option<HostCopy>>,
    pub(super) count: f32,
}

impl Reduced {
    /// The reduced values in `range` of the fused buffer, from the host copies where they exist,
    /// else read from the device (counted in `traffic`).
    pub(super) fn host_range(&mut self, range: Range<usize>, traffic: &mut Traffic) -> Result<Vec<f32>, Error> {
        let mut out = Vec::with_capacity(range.len());
        for (b, bucket) in self.layout.buckets().enumerate() {
            let (lo, hi) = (range.start.max(bucket.start), range.end.min(bucket.end));
            if lo >= hi {
                continue;
            }
            let local = lo - bucket.start..hi - bucket.start;
            match &self.host[b] {
                Some(copy) if copy.start <= local.start => {
                    out.extend_from_slice(&copy.values[local.start - copy.start..local.end - copy.start]);
                }
                _ => {
                    let values = to_host(self.buckets[b].clone().slice(local), "the reduced gradient buckets")?;
                    traffic.to_host += byte_len(values.len());
                    out.extend_from_slice(&values);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    /// A bucket off CUDA memory offers no region and still reads its parts afterwards, on the
    /// host backend and (with `wgpu`) on a cubecl device that is not CUDA.
    #[test]
    fn a_bucket_off_cuda_offers_no_region_and_keeps_its_values() {
        let mut devices = vec![Device::flex()];
        if cfg!(feature = "wgpu") {
            devices.extend(crate::device::DeviceChoice::WgpuCpu.device(0).ok());
        }
        for device in devices {
            let part = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), &device);
            let mut bucket = TensorBucket::new(vec![part(vec![1.0, 2.0]), part(vec![3.0])], device.clone(), None);
            assert!(bucket.cuda_region().unwrap().is_none(), "{device:?}");
            assert_eq!(bucket.read().unwrap(), vec![1.0, 2.0, 3.0], "{device:?}");
            assert!(bucket.read().is_err(), "a second read must fail on {device:?}");
        }
    }
}
