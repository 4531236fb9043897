//! An all-gather in a 2-byte float type (bf16, f16) over communicators that move f32 words: each
//! rank's shard is carried two values to a word, so the wire and the device transfers hold half
//! the bytes of f32. Nothing is computed on the words: they are bits, copied.

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};

use ballast_collectives::{BufferError, DeviceBuffer};

use crate::transfer::Traffic;

/// f32 words that hold `n` 2-byte values (the last word padded with zeros when `n` is odd).
pub(super) fn words_for(n: usize) -> usize {
    n.div_ceil(2)
}

/// One side of a packed all-gather: this rank's shard (sending) or every rank's shards
/// (receiving), as 2-byte values of `dtype` on `device`.
pub(super) struct PackedHalves {
    dtype: FloatDType,
    device: Device,
    /// The 2-byte values of each rank in the buffer (one entry for this rank's shard; every
    /// rank's in rank order for the gathered buffer).
    counts: Vec<usize>,
    /// The shard to send (`None` for an empty shard, or when receiving).
    tensor: Option<Tensor<1>>,
    /// The gathered values, once written.
    pub(super) gathered: Option<Tensor<1>>,
    /// Bytes this buffer moved between the device and the host.
    pub(super) traffic: Traffic,
}

impl PackedHalves {
    /// This rank's shard `tensor` (in `dtype`, 2 bytes a value) to send.
    pub(super) fn sending(tensor: Option<Tensor<1>>, dtype: FloatDType, device: Device) -> Self {
        let n = tensor.as_ref().map_or(0, |t| t.shape().num_elements());
        Self {
            dtype,
            device,
            counts: vec![n],
            tensor,
            gathered: None,
            traffic: Traffic::default(),
        }
    }

    /// A buffer that receives every rank's shard, `counts[r]` values of rank `r`.
    pub(super) fn receiving(counts: &[usize], dtype: FloatDType, device: Device) -> Self {
        Self {
            dtype,
            device,
            counts: counts.to_vec(),
            tensor: None,
            gathered: None,
            traffic: Traffic::default(),
        }
    }

    /// Words per rank in the gathered buffer, for the collective's counts.
    pub(super) fn word_counts(counts: &[usize]) -> Vec<usize> {
        counts.iter().map(|&c| words_for(c)).collect()
    }
}

impl DeviceBuffer for PackedHalves {
    fn len(&self) -> usize {
        self.counts.iter().map(|&c| words_for(c)).sum()
    }

    /// The shard's bytes as read from the device, two values to a word.
    fn read(&mut self) -> Result<Vec<f32>, BufferError> {
        let Some(tensor) = self.tensor.take() else {
            return Ok(vec![0.0; self.len()]);
        };
        let data = tensor.try_into_data().map_err(|e| format!("{e:?}"))?;
        if data.dtype() != DType::from(self.dtype) {
            return Err(format!("a {:?} shard was packed as {:?}", data.dtype(), self.dtype).into());
        }
        let bytes = data.as_bytes();
        self.traffic.to_host += bytes.len() as u64;
        Ok(bytes
            .chunks(4)
            .map(|c| {
                let mut word = [0u8; 4];
                word[..c.len()].copy_from_slice(c);
                f32::from_bits(u32::from_le_bytes(word))
            })
            .collect())
    }

    /// Every rank's words unpacked to its values, the padding dropped, as one tensor in the
    /// 2-byte type on the device.
    fn write(&mut self, words: Vec<f32>) -> Result<(), BufferError> {
        let total: usize = self.counts.iter().sum();
        let mut bytes = Vec::with_capacity(2 * total);
        let mut at = 0;
        for &c in &self.counts {
            let mine = &words[at..at + words_for(c)];
            at += words_for(c);
            let start = bytes.len();
            bytes.extend(mine.iter().flat_map(|w| w.to_bits().to_le_bytes()));
            bytes.truncate(start + 2 * c);
        }
        self.traffic.to_device += bytes.len() as u64;
        let dtype = DType::from(self.dtype);
        self.gathered = (total > 0)
            .then(|| Tensor::from_data(TensorData::from_bytes_vec(bytes, [total], dtype), (&self.device, dtype)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards of odd and even lengths, an empty one among them, packed, gathered by a copy of
    /// the words and unpacked: every value comes back bit for bit.
    #[test]
    fn packed_shards_come_back_bit_for_bit() {
        let device = Device::flex();
        for dtype in [FloatDType::BF16, FloatDType::F16] {
            let counts = [3usize, 0, 4, 1];
            let values: Vec<Vec<f32>> = counts
                .iter()
                .enumerate()
                .map(|(r, &c)| (0..c).map(|i| (r * 10 + i) as f32 * 0.37 - 1.5).collect())
                .collect();
            let mut words = Vec::new();
            for v in &values {
                let tensor = (!v.is_empty())
                    .then(|| Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), &device).cast(dtype));
                let mut shard = PackedHalves::sending(tensor, dtype, device.clone());
                let read = shard.read().unwrap();
                assert_eq!(read.len(), shard.len());
                assert_eq!(shard.traffic.to_host, 2 * v.len() as u64);
                words.extend(read);
            }
            let mut all = PackedHalves::receiving(&counts, dtype, device.clone());
            assert_eq!(all.len(), words.len());
            all.write(words).unwrap();
            let got = all.gathered.unwrap();
            assert_eq!(got.dtype(), DType::from(dtype));
            let want: Vec<f32> = values.concat();
            let want = Tensor::<1>::from_data(TensorData::new(want.clone(), [want.len()]), &device).cast(dtype);
            assert_eq!(got.into_data().as_bytes(), want.into_data().as_bytes());
        }
    }
}
