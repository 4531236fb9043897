//! Fused buckets: many tensors in one flat buffer, reduced a bucket at a time.
//!
//! A model has hundreds of parameter tensors, many tiny. One collective per tensor pays the
//! per-call latency hundreds of times; one collective over everything cannot start until the
//! last gradient exists and needs one huge message. Buckets sit between: tensors are laid out
//! back to back in a [`FusedBuffer`] (in a fixed order, the same on every rank), and the flat
//! buffer is cut into consecutive buckets of at most [`DEFAULT_BUCKET_CAP_BYTES`]. Each bucket
//! is one all-reduce; buckets are reduced in index order on every rank.
//!
//! A bucket holds one element type on one device by construction: a `FusedBuffer<T>` is a
//! single host (or, with NCCL, device) allocation of `T`. A tensor may straddle two buckets; that
//! costs nothing because the buffer is contiguous.
//!
//! ```
//! use ballast_collectives::{bucket::FusedBuffer, local, CommOptions};
//!
//! let out = local::run(2, CommOptions::default(), |mut comm| {
//!     let mut fused = FusedBuffer::<f32>::new(&[3, 2], 8).unwrap(); // 8-byte buckets
//!     fused.pack(0, &[1.0, 2.0, 3.0]).unwrap();
//!     fused.pack(1, &[4.0, 5.0]).unwrap();
//!     fused.all_reduce_sum(&mut comm).unwrap();
//!     fused.tensor(1).to_vec()
//! });
//! assert_eq!(out[0], vec![8.0, 10.0]);
//! ```

use std::ops::Range;

use crate::{communicator::AllReduceSum, Communicator, Error, Result};

/// Largest bucket, in bytes, unless configured otherwise.
///
/// 25 MiB is PyTorch DDP's `bucket_cap_mb` default, chosen there by experiment as large enough
/// to amortise per-call latency and small enough to pipeline. On this project's reference machine
/// an MPI all-reduce reaches its plateau bandwidth well below 25 MiB (see `ballast bench
/// allreduce`), so the default costs nothing on CPU ranks either.
pub const DEFAULT_BUCKET_CAP_BYTES: usize = 25 * 1024 * 1024;

/// Where each tensor lives in the flat buffer and how the buffer is cut into buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketLayout {
    offsets: Vec<usize>,
    lens: Vec<usize>,
    total: usize,
    bucket_elems: usize,
}

impl BucketLayout {
    /// Lays out tensors of `lens` elements of `elem_bytes` bytes, in order, with buckets of at
    /// most `cap_bytes`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the cap cannot hold one element.
    pub fn new(lens: &[usize], cap_bytes: usize, elem_bytes: usize) -> Result<Self> {
        if elem_bytes == 0 || cap_bytes < elem_bytes {
            return Err(Error::InvalidArgument {
                op: "bucket layout",
                rank: 0,
                reason: format!(
                    "a bucket cap of {cap_bytes} bytes cannot hold one {elem_bytes}-byte element; \
                     use a cap of at least {elem_bytes} bytes (default {DEFAULT_BUCKET_CAP_BYTES})"
                ),
            });
        }
        let mut offsets = Vec::with_capacity(lens.len());
        let mut total = 0usize;
        for &len in lens {
            offsets.push(total);
            total += len;
        }
        Ok(Self {
            offsets,
            lens: lens.to_vec(),
            total,
            bucket_elems: cap_bytes / elem_bytes,
        })
    }

    /// Number of tensors.
    pub fn num_tensors(&self) -> usize {
        self.lens.len()
    }

    /// Total elements over all tensors.
    pub fn total_elems(&self) -> usize {
        self.total
    }

    /// Number of buckets (zero when every tensor is empty).
    pub fn num_buckets(&self) -> usize {
        self.total.div_ceil(self.bucket_elems)
    }

    /// Element range of bucket `i` in the flat buffer.
    ///
    /// # Panics
    /// If `i >= num_buckets()`.
    pub fn bucket(&self, i: usize) -> Range<usize> {
        assert!(i < self.num_buckets(), "bucket {i} out of range");
        let start = i * self.bucket_elems;
        start..(start + self.bucket_elems).min(self.total)
    }

    /// All bucket ranges, in the order they are reduced.
    pub fn buckets(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.num_buckets()).map(|i| self.bucket(i))
    }

    /// Element range of tensor `i` in the flat buffer.
    ///
    /// # Panics
    /// If `i >= num_tensors()`.
    pub fn tensor(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i] + self.lens[i]
    }
}

/// A flat buffer of tensors laid out by a [`BucketLayout`].
#[derive(Debug, Clone, PartialEq)]
pub struct FusedBuffer<T> {
    layout: BucketLayout,
    data: Vec<T>,
}

impl<T: AllReduceSum> FusedBuffer<T> {
    /// A zeroed buffer for tensors of `lens` elements with buckets of at most `cap_bytes`.
    ///
    /// # Errors
    /// As [`BucketLayout::new`].
    pub fn new(lens: &[usize], cap_bytes: usize) -> Result<Self> {
        let layout = BucketLayout::new(lens, cap_bytes, std::mem::size_of::<T>())?;
        let data = vec![T::default(); layout.total_elems()];
        Ok(Self { layout, data })
    }

    /// The layout.
    pub fn layout(&self) -> &BucketLayout {
        &self.layout
    }

    /// Copies `values` into tensor `i`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `values` has the wrong length or `i` is out of range.
    pub fn pack(&mut self, i: usize, values: &[T]) -> Result<()> {
        self.check_index(i)?;
        let range = self.layout.tensor(i);
        if values.len() != range.len() {
            return Err(Error::InvalidArgument {
                op: "pack",
                rank: 0,
                reason: format!(
                    "tensor {i} has {} elements but {} were given",
                    range.len(),
                    values.len()
                ),
            });
        }
        self.data[range].copy_from_slice(values);
        Ok(())
    }

    /// Tensor `i`'s elements.
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn tensor(&self, i: usize) -> &[T] {
        &self.data[self.layout.tensor(i)]
    }

    /// Tensor `i`'s elements, mutable (fill gradients in place without [`FusedBuffer::pack`]).
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn tensor_mut(&mut self, i: usize) -> &mut [T] {
        let range = self.layout.tensor(i);
        &mut self.data[range]
    }

    /// The whole flat buffer.
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }

    /// The whole flat buffer, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// Sets every element to zero.
    pub fn zero(&mut self) {
        self.data.fill(T::default());
    }

    /// Sums the buffer over all ranks, one collective per bucket, buckets in index order.
    ///
    /// # Errors
    /// The first error of any bucket's collective; later buckets are not attempted.
    pub fn all_reduce_sum(&mut self, comm: &mut dyn Communicator) -> Result<()> {
        for range in self.layout.buckets() {
            T::all_reduce_sum(comm, &mut self.data[range])?;
        }
        Ok(())
    }

    fn check_index(&self, i: usize) -> Result<()> {
        if i >= self.layout.num_tensors() {
            return Err(Error::InvalidArgument {
                op: "pack",
                rank: 0,
                reason: format!("tensor index {i} out of range ({} tensors)", self.layout.num_tensors()),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Every element sits in exactly one bucket, buckets are contiguous, none exceeds the cap,
        /// and tensors tile the buffer in order.
        #[test]
        fn layout_invariants(lens in proptest::collection::vec(0usize..5000, 0..40), cap_elems in 1usize..3000) {
            let layout = BucketLayout::new(&lens, cap_elems * 4, 4).unwrap();
            let mut next = 0;
            for b in layout.buckets() {
                prop_assert_eq!(b.start, next);
                prop_assert!(!b.is_empty() && b.len() <= cap_elems);
                next = b.end;
            }
            prop_assert_eq!(next, lens.iter().sum::<usize>());
            let mut off = 0;
            for (i, &len) in lens.iter().enumerate() {
                prop_assert_eq!(layout.tensor(i), off..off + len);
                off += len;
            }
        }
    }

    #[test]
    fn cap_below_one_element_is_an_error() {
        let err = BucketLayout::new(&[1], 2, 4).unwrap_err();
        assert!(err.to_string().contains("cannot hold one 4-byte element"), "{err}");
    }

    #[test]
    fn pack_checks_length() {
        let mut f = FusedBuffer::<f32>::new(&[2], 64).unwrap();
        assert!(f.pack(0, &[1.0]).is_err());
        assert!(f.pack(1, &[1.0, 2.0]).is_err());
        f.pack(0, &[1.0, 2.0]).unwrap();
        assert_eq!(f.tensor(0), &[1.0, 2.0]);
    }
}
