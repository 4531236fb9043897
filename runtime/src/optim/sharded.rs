//! Optimizer state sharded over the ranks, unevenly (ZeRO-1 with shards sized per device).
//!
//! The model's float parameters, flattened in [`crate::params`] order, are cut into one
//! contiguous shard per rank: `counts[r]` values for rank `r`, in rank order, a count of 0
//! allowed. Each rank keeps Adam's moments (and a master copy of the values) for its own shard
//! only, so the 8 bytes of state per parameter are spread over the ranks instead of repeated on
//! each. [`crate::DataParallel::step`] drives a step through its [`StepOptimizer`]: the gradient sums are
//! reduce-scattered, each rank updates its shard, and the updated shards are all-gathered into
//! every replica. Each parameter's update is computed once, on one rank, so the replicas are
//! bit-identical whatever device computed each shard.
//!
//! Where a rank keeps its shard is a [`ShardPlace`]: on the model's device (Adam's two moments
//! as device tensors, 8 bytes per parameter of the shard, updated with tensor operations on the
//! shard's values sliced from the model: nothing but the shard's gradient and its new values
//! crosses to the host), or in host memory ([`HostOffload`] of the shard: the fast host Adam,
//! with the host-RAM check), for a device that cannot hold even its shard. Both compute burn's
//! Adam step for step, in the same order of operations.

use std::path::Path;

use burn::{
    module::Module,
    tensor::{Device, Tensor, TensorData},
};

use crate::Error;
use crate::{
    balancer::split_proportional,
    checkpoint::AdamMoments,
    ddp::{DataParallel, GradientForm, ReducedGrads, StepOptimizer, StepStats},
    optim::{HostAdamConfig, HostOffload},
    params::{flatten_params, load_params_from_tensor, params_range},
    transfer::{model_device, to_host, Traffic},
};

/// Cuts `params` values into one shard per rank in proportion to `weights` (for example each
/// device's free memory), exactly: the counts add up to `params` (largest remainder, ties to the
/// lower rank). A weight of 0 gives that rank no shard.
///
/// # Errors
/// [`Error::Shards`] for negative, non-finite or all-zero weights.
pub fn shard_counts(params: usize, weights: &[f64]) -> Result<Vec<usize>, Error> {
    split_proportional(params, weights).map_err(|e| Error::Shards { reason: e.to_string() })
}

/// Where a rank keeps the optimizer state of its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardPlace {
    /// On the model's device, next to the parameters.
    Device,
    /// In host memory, updated by the host Adam (this rank only).
    Host,
}

/// Adam for this rank's shard of the parameters (see the module docs).
#[derive(Debug, Clone)]
pub struct ShardedAdam {
    rank: usize,
    counts: Vec<usize>,
    offset: usize,
    state: ShardState,
    /// In a mixed precision, this shard's f32 master values, taken from the
    /// [`crate::DataParallel`]'s master copy at the first step (`None` for an empty shard and in
    /// f32, where the shard's values are read from the replica).
    master: Option<Tensor<1>>,
    /// Whether the master copy was taken over (every rank takes it, empty shards too).
    master_taken: bool,
}

#[derive(Debug, Clone)]
enum ShardState {
    /// Boxed: burn's tensors make the moments far larger than a host shard's handle.
    Device(Box<DeviceAdam>),
    Host(HostOffload),
}

impl ShardedAdam {
    /// This rank's shard of `model`'s parameters, with zeroed moments kept at `place`. `counts`
    /// holds one count per rank (the same on every rank) and covers every parameter; `model`
    /// must be the replica [`crate::DataParallel::wrap`] returned, so every rank starts from the
    /// same values.
    ///
    /// # Errors
    /// [`Error::Shards`] when `counts` has no entry for `rank` or does not add up to the
    /// model's parameters; [`Error::HostMemory`] when host RAM cannot hold a host shard's state.
    pub fn new<M: Module>(
        model: &M,
        rank: usize,
        counts: Vec<usize>,
        config: HostAdamConfig,
        place: ShardPlace,
    ) -> Result<Self, Error> {
        let params = model.num_params();
        let total: usize = counts.iter().sum();
        if rank >= counts.len() || total != params {
            return Err(Error::Shards {
                reason: format!(
                    "{} shards of {total} parameters in all for rank {rank} of a model with {params} parameters",
                    counts.len(),
                ),
            });
        }
        let offset: usize = counts[..rank].iter().sum();
        let len = counts[rank];
        let state = match place {
            ShardPlace::Device => ShardState::Device(Box::new(DeviceAdam::new(len, config, &model_device(model)))),
            ShardPlace::Host => {
                let master = flatten_params(model)[offset..offset + len].to_vec();
                ShardState::Host(HostOffload::from_values(master, config, Path::new("/"))?)
            }
        };
        Ok(Self {
            rank,
            counts,
            offset,
            state,
            master: None,
            master_taken: false,
        })
    }

    /// Every rank's shard size, in rank order.
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// The rank this shard belongs to.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Where this rank's shard starts in the flat parameters.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Parameters in this rank's shard.
    pub fn len(&self) -> usize {
        self.counts[self.rank]
    }

    /// Whether this rank's shard is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where this rank keeps its shard's state.
    pub fn place(&self) -> ShardPlace {
        match self.state {
            ShardState::Device(_) => ShardPlace::Device,
            ShardState::Host(_) => ShardPlace::Host,
        }
    }

    /// One Adam step of this rank's shard of `model` with its averaged gradient (`None` for an
    /// empty shard), on the device the reduce-scatter left it on; returns the shard's updated
    /// values there, for the all-gather. A device shard never leaves the device; a host shard's
    /// gradient is read to the host and its new values written back, and those bytes are added
    /// to `traffic`.
    ///
    /// # Errors
    /// [`Error::Tensor`] when the device cannot give a host shard's gradient back;
    /// [`Error::Shards`] when `grads` is not as long as this rank's shard.
    pub fn step<M: Module>(
        &mut self,
        model: &M,
        grads: Option<Tensor<1>>,
        lr: f32,
        traffic: &mut Traffic,
    ) -> Result<Option<Tensor<1>>, Error> {
        let given = grads.as_ref().map_or(0, |g| g.shape().num_elements());
        if given != self.len() {
            return Err(Error::Shards {
                reason: format!(
                    "rank {} was given {given} averaged gradients for a shard of {} parameters",
                    self.rank,
                    self.len()
                ),
            });
        }
        let Some(grads) = grads else {
            // An empty shard still counts the step: its count is the one a checkpoint saves
            // when this is rank 0.
            match &mut self.state {
                ShardState::Device(adam) => adam.t += 1,
                ShardState::Host(host) => {
                    host.step(&[], lr)?;
                }
            }
            return Ok(None);
        };
        let range = self.offset..self.offset + self.len();
        match &mut self.state {
            ShardState::Host(host) => {
                let device = grads.device();
                let grads = to_host(grads, "the averaged gradients of the optimizer shard")?;
                traffic.to_host += 4 * grads.len() as u64;
                let values = host.step(&grads, lr)?.to_vec();
                traffic.to_device += 4 * values.len() as u64;
                let n = values.len();
                Ok(Some(Tensor::from_data(TensorData::new(values, [n]), &device)))
            }
            ShardState::Device(adam) => {
                let values = match self.master.take() {
                    Some(master) => master,
                    None => params_range(model, range)
                        .expect("a non-empty shard covers parameters (checked at construction)"),
                };
                let updated = adam.step(values, grads, lr);
                if self.master_taken {
                    self.master = Some(updated.clone());
                }
                Ok(Some(updated))
            }
        }
    }

    /// Bytes of optimizer state this rank holds for its shard: Adam's two moments (8 per
    /// parameter), plus the master values of a host shard (4 more).
    pub fn state_bytes(&self) -> u64 {
        match &self.state {
            ShardState::Device(adam) => adam.state_bytes(),
            ShardState::Host(host) => host.host_bytes(),
        }
    }

    /// In a mixed precision, this rank's shard of the f32 master parameters, read to the host
    /// (every rank's, all-gathered in rank order, are the whole model's master); empty in f32,
    /// before the first step and for an empty shard.
    ///
    /// # Errors
    /// [`Error::Tensor`] when the device cannot give it back.
    pub fn master_shard(&self) -> Result<Vec<f32>, Error> {
        match &self.state {
            ShardState::Host(host) => Ok(host.master().map(<[f32]>::to_vec).unwrap_or_default()),
            ShardState::Device(_) => read(&self.master, "the optimizer shard's f32 master values"),
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> i32 {
        match &self.state {
            ShardState::Device(adam) => adam.t,
            ShardState::Host(host) => host.adam().steps(),
        }
    }

    /// This rank's moments, read to the host (for a checkpoint: every rank's moments, all-
    /// gathered in rank order, are the whole model's).
    ///
    /// # Errors
    /// [`Error::Tensor`] when the device cannot give them back.
    pub fn moments(&self) -> Result<(Vec<f32>, Vec<f32>), Error> {
        match &self.state {
            ShardState::Host(host) => {
                let (m, v) = host.adam().moments();
                Ok((m.to_vec(), v.to_vec()))
            }
            ShardState::Device(adam) => Ok((
                read(&adam.m, "the optimizer shard's moment m")?,
                read(&adam.v, "the optimizer shard's moment v")?,
            )),
        }
    }

    /// Restores this rank's shard from the whole model's saved moments (saved by any number of
    /// ranks: the shard is cut out of them here).
    ///
    /// # Errors
    /// [`Error::Shards`] when `saved` does not hold one moment per parameter.
    pub fn restore(&mut self, saved: &AdamMoments) -> Result<(), Error> {
        let total: usize = self.counts.iter().sum();
        if saved.m.len() != total || saved.v.len() != total {
            return Err(Error::Shards {
                reason: format!(
                    "the saved Adam state holds {} and {} moments for a model of {total} parameters",
                    saved.m.len(),
                    saved.v.len()
                ),
            });
        }
        let range = self.offset..self.offset + self.len();
        let (m, v) = (saved.m[range.clone()].to_vec(), saved.v[range].to_vec());
        match &mut self.state {
            ShardState::Host(host) => host
                .adam_mut()
                .restore(m, v, saved.t)
                .map_err(|e| Error::Shards { reason: e.to_string() }),
            ShardState::Device(adam) => {
                adam.restore(m, v, saved.t);
                Ok(())
            }
        }
    }
}

/// Reads a shard's tensor (`what`) to the host (empty for an empty shard).
fn read(t: &Option<Tensor<1>>, what: &str) -> Result<Vec<f32>, Error> {
    match t {
        Some(t) => to_host(t.clone(), what),
        None => Ok(Vec::new()),
    }
}

/// Adam's moments for one shard as tensors on the model's device, updated with tensor
/// operations in [`crate::optim::HostAdam`]'s order of operations (burn's).
#[derive(Debug, Clone)]
struct DeviceAdam {
    config: HostAdamConfig,
    device: Device,
    len: usize,
    /// `None` for an empty shard.
    m: Option<Tensor<1>>,
    v: Option<Tensor<1>>,
    t: i32,
}

impl DeviceAdam {
    fn new(len: usize, config: HostAdamConfig, device: &Device) -> Self {
        let zeros = || (len > 0).then(|| Tensor::<1>::zeros([len], device));
        Self {
            config,
            device: device.clone(),
            len,
            m: zeros(),
            v: zeros(),
            t: 0,
        }
    }

    fn state_bytes(&self) -> u64 {
        8 * self.len as u64
    }

    fn restore(&mut self, m: Vec<f32>, v: Vec<f32>, t: i32) {
        let n = self.len;
        let upload = |values: Vec<f32>| (n > 0).then(|| Tensor::from_data(TensorData::new(values, [n]), &self.device));
        self.m = upload(m);
        self.v = upload(v);
        self.t = t;
    }

    /// One step of `p` (the shard's values, on the device) with the gradient `g` (on the same
    /// device); returns the new values.
    fn step(&mut self, p: Tensor<1>, g: Tensor<1>, lr: f32) -> Tensor<1> {
        let c = self.config;
        self.t += 1;
        let bc2 = (1.0 - c.beta_2.powi(self.t)).sqrt();
        let factor = bc2 / (1.0 - c.beta_1.powi(self.t));
        let eps = c.epsilon * bc2;
        let mut p = p;
        let mut g = g;
        if c.weight_decay != 0.0 {
            if c.decoupled {
                p = p.clone() - p.mul_scalar(lr * c.weight_decay);
            } else {
                // burn: θ·λ + g.
                g = g + p.clone().mul_scalar(c.weight_decay);
            }
        }
        let g2 = g.clone() * g.clone();
        // burn starts the moments from the first gradient.
        let (m, v) = match (self.m.take(), self.v.take()) {
            (Some(m), Some(v)) if self.t > 1 => (
                m.mul_scalar(c.beta_1) + g.mul_scalar(1.0 - c.beta_1),
                v.mul_scalar(c.beta_2) + g2.mul_scalar(1.0 - c.beta_2),
            ),
            _ => (g.mul_scalar(1.0 - c.beta_1), g2.mul_scalar(1.0 - c.beta_2)),
        };
        let delta = (m.clone().mul_scalar(factor) / v.clone().sqrt().add_scalar(eps)).mul_scalar(lr);
        self.m = Some(m);
        self.v = Some(v);
        p - delta
    }
}

/// The sharded step: the gradient sums are reduce-scattered (each rank receives the global sum of
/// its own shard only, divided once by the global sample count), this rank's shard is updated
/// (on the device or on the host, where it lives) and the updated shards are all-gathered into
/// every replica. Three collectives per step: the reduce-scatter, the small tail (loss, counts,
/// per-rank values, the shards' squared norms) and the all-gather.
impl StepOptimizer for ShardedAdam {
    fn form(&self) -> GradientForm {
        GradientForm::Shards {
            counts: self.counts.clone(),
            rank: self.rank,
        }
    }

    fn apply<M: Module>(
        &mut self,
        ddp: &mut DataParallel,
        model: M,
        grads: ReducedGrads,
        lr: f64,
    ) -> Result<(M, StepStats), Error> {
        let precision = ddp.precision();
        if precision.is_mixed() && !self.master_taken {
            let master = ddp.take_master_range(self.offset..self.offset + self.len())?;
            self.master_taken = true;
            match (&mut self.state, master) {
                // A host shard updates its master on the host.
                (ShardState::Host(host), Some(master)) => {
                    host.take_master(&to_host(master, "the optimizer shard's f32 master values")?);
                }
                (_, master) => self.master = master,
            }
        }
        // The counts and the rank were checked against the world before the collectives.
        let (shard, counts, device, mut stats) = grads.into_shard()?;
        let mine = self.step(&model, shard, lr as f32, &mut stats.traffic)?;
        let flat = if precision.is_mixed() {
            // The replicas take the cast of the f32 shards: the all-gather carries the low type.
            let dtype = precision.compute_dtype();
            ddp.gather_shards_packed(mine.map(|t| t.cast(dtype)), &counts, &device, dtype, &mut stats)?
        } else {
            ddp.gather_shards(mine, &counts, &device, &mut stats)?
        };
        Ok((load_params_from_tensor(model, flat), stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cover_every_parameter_and_follow_the_weights() {
        assert_eq!(shard_counts(100, &[6.0, 3.0, 1.0]).unwrap(), vec![60, 30, 10]);
        assert_eq!(shard_counts(10, &[7.0, 3.0, 0.0]).unwrap(), vec![7, 3, 0]);
        assert_eq!(shard_counts(7, &[1.0, 1.0, 1.0]).unwrap(), vec![3, 2, 2]);
        let err = shard_counts(7, &[0.0, 0.0]).unwrap_err().to_string();
        assert!(err.contains("the optimizer shards do not fit"), "{err}");
    }
}
