//! A communicator that refuses host slices on the data plane: proof that a step hands the
//! collectives device buffers only.
//!
//! [`DeviceBuffersOnly`] forwards every call to the communicator it wraps, except the three
//! data-plane collectives over host slices (`all_reduce_sum_f32`, `reduce_scatter_sum_f32`,
//! `all_gather_f32`), which fail with [`Error::InvalidArgument`] and are counted. The
//! device-buffer collectives go to the wrapped backend as they are, so a host backend still
//! reads each buffer once and writes each result once behind them, as it does in a job.
//! Control-plane calls (barrier, bytes, `u64`/`f64` sums) and `broadcast_f32` pass:
//! [`crate::DataParallel::wrap`] broadcasts rank 0's initial weights once, before any step.
//!
//! It also adds up the bytes each device-buffer all-gather delivers (4 per word of the
//! gathered buffer) into a counter the caller keeps ([`DeviceBuffersOnly::gathered_bytes`]).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use ballast_collectives::{Communicator, DeviceBuffer, Error, Result};

/// Wraps a communicator and refuses host slices on the data plane (see the module docs).
pub struct DeviceBuffersOnly {
    inner: Box<dyn Communicator>,
    refused: usize,
    gathered: Arc<AtomicU64>,
}

impl DeviceBuffersOnly {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Communicator>) -> Self {
        Self {
            inner,
            refused: 0,
            gathered: Arc::default(),
        }
    }

    /// The counter of bytes delivered by device-buffer all-gathers, which outlives the wrapper
    /// (a step takes the communicator over).
    pub fn gathered_bytes(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.gathered)
    }

    /// Host-slice calls refused so far.
    pub fn refused(&self) -> usize {
        self.refused
    }

    fn refuse(&mut self, op: &'static str) -> Error {
        self.refused += 1;
        Error::InvalidArgument {
            op,
            rank: self.inner.rank(),
            reason: "a host slice was passed on the data plane, where the step must hand over device buffers"
                .to_string(),
        }
    }
}

impl Communicator for DeviceBuffersOnly {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.inner.set_timeout(timeout);
    }

    fn collectives_started(&self) -> u64 {
        self.inner.collectives_started()
    }

    fn barrier(&mut self) -> Result<()> {
        self.inner.barrier()
    }

    fn broadcast_f32(&mut self, root: usize, buf: &mut [f32]) -> Result<()> {
        self.inner.broadcast_f32(root, buf)
    }

    fn broadcast_bytes(&mut self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.broadcast_bytes(root, buf)
    }

    fn all_reduce_sum_f32(&mut self, _buf: &mut [f32]) -> Result<()> {
        Err(self.refuse("all_reduce_sum_f32"))
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        self.inner.all_reduce_sum_f64(buf)
    }

    fn all_reduce_sum_u64(&mut self, buf: &mut [u64]) -> Result<()> {
        self.inner.all_reduce_sum_u64(buf)
    }

    fn all_gather_bytes(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.inner.all_gather_bytes(data)
    }

    fn reduce_scatter_sum_f32(&mut self, _buf: &[f32], _counts: &[usize], _shard: &mut [f32]) -> Result<()> {
        Err(self.refuse("reduce_scatter_sum_f32"))
    }

    fn all_gather_f32(&mut self, _shard: &[f32], _counts: &[usize], _out: &mut [f32]) -> Result<()> {
        Err(self.refuse("all_gather_f32"))
    }

    fn all_reduce_sum_device(&mut self, buf: &mut dyn DeviceBuffer) -> Result<()> {
        self.inner.all_reduce_sum_device(buf)
    }

    fn all_reduce_sum_buckets(&mut self, buckets: &mut [&mut dyn DeviceBuffer]) -> Result<()> {
        self.inner.all_reduce_sum_buckets(buckets)
    }

    fn reduce_scatter_sum_device(
        &mut self,
        buf: &mut dyn DeviceBuffer,
        counts: &[usize],
        shard: &mut dyn DeviceBuffer,
    ) -> Result<()> {
        self.inner.reduce_scatter_sum_device(buf, counts, shard)
    }

    fn all_gather_device(
        &mut self,
        shard: &mut dyn DeviceBuffer,
        counts: &[usize],
        out: &mut dyn DeviceBuffer,
    ) -> Result<()> {
        self.gathered.fetch_add(4 * out.len() as u64, Ordering::Relaxed);
        self.inner.all_gather_device(shard, counts, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_collectives::{local, CommOptions};

    /// The wrapper really refuses host slices (so a step that passes one fails), and passes
    /// device buffers through to exact sums.
    #[test]
    fn host_slices_are_refused_and_device_buffers_pass() {
        let results = local::run(2, CommOptions::default(), |comm| {
            let mut comm = DeviceBuffersOnly::new(Box::new(comm));
            let refused = comm.all_reduce_sum_f32(&mut [1.0]).is_err();
            let mut buf = vec![comm.rank() as f32 + 1.0; 3];
            comm.all_reduce_sum_device(&mut buf)
                .map(|()| (refused, comm.refused(), buf))
        });
        for r in results {
            let (refused, count, buf) = r.unwrap();
            assert!(refused);
            assert_eq!(count, 1);
            assert_eq!(buf, vec![3.0; 3]);
        }
    }
}
