//! A step's averaged gradients, between the reduction and the optimizer: what a user clips,
//! logs or hands to any burn optimizer.

use std::ops::Range;

use burn::{
    optim::GradientsParams,
    tensor::{Device, Tensor},
};

use super::StepStats;
use crate::params::ParamSlot;
use crate::transfer::{byte_len, to_host};
use crate::Error;

/// Where an optimizer wants a step's averaged gradients ([`crate::StepOptimizer::form`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GradientForm {
    /// Every parameter's gradient, on the model's device (burn's optimizers).
    Device,
    /// Every parameter's gradient, in host memory (an optimizer whose state is offloaded).
    Host,
    /// One shard of the flat gradient per rank, `counts[r]` parameters on rank `r` in parameter
    /// order, on the model's device (an optimizer whose state is sharded over the ranks); `rank`
    /// is the rank whose shard the optimizer holds.
    Shards {
        /// Parameters in each rank's shard.
        counts: Vec<usize>,
        /// The rank whose shard this is.
        rank: usize,
    },
}

/// Clipping adds this to the norm before dividing, as PyTorch's `clip_grad_norm_` does.
const CLIP_EPSILON: f32 = 1e-6;

/// This rank's averaged gradients of one step: the mean gradient of the global batch (the
/// same on every rank), in the form the optimizer asked for. Returned by
/// [`crate::DataParallel::reduce`] and [`crate::DataParallel::reduce_for`]; consumed by
/// [`ReducedGrads::into_params`] (any burn optimizer) or [`crate::DataParallel::apply`].
pub struct ReducedGrads {
    held: Held,
    /// The global L2 norm, once computed.
    norm: Option<f32>,
    stats: StepStats,
    device: Device,
}

enum Held {
    /// Every gradient, flat, on the device; each parameter's slot and range in it.
    Device {
        flat: Tensor<1>,
        slots: Vec<(ParamSlot, Range<usize>)>,
    },
    Host(Vec<f32>),
    /// This rank's shard (`None` when empty) and the global squared norm, summed over every
    /// rank's shard in the step's tail.
    Shard {
        counts: Vec<usize>,
        rank: usize,
        values: Option<Tensor<1>>,
        squared_norm: f32,
    },
}

impl ReducedGrads {
    pub(super) fn on_device(flat: Tensor<1>, slots: Vec<(ParamSlot, Range<usize>)>, stats: StepStats) -> Self {
        let device = flat.device();
        Self {
            held: Held::Device { flat, slots },
            norm: None,
            stats,
            device,
        }
    }

    pub(super) fn on_host(values: Vec<f32>, device: Device, stats: StepStats) -> Self {
        Self {
            held: Held::Host(values),
            norm: None,
            stats,
            device,
        }
    }

    pub(super) fn sharded(
        (counts, rank): (Vec<usize>, usize),
        values: Option<Tensor<1>>,
        squared_norm: f32,
        device: Device,
        stats: StepStats,
    ) -> Self {
        Self {
            held: Held::Shard {
                counts,
                rank,
                values,
                squared_norm,
            },
            norm: None,
            stats,
            device,
        }
    }

    /// The form these gradients are held in.
    pub fn form(&self) -> GradientForm {
        match &self.held {
            Held::Device { .. } => GradientForm::Device,
            Held::Host(_) => GradientForm::Host,
            Held::Shard { counts, rank, .. } => GradientForm::Shards {
                counts: counts.clone(),
                rank: *rank,
            },
        }
    }

    /// What the step did so far (loss, samples, collectives, traffic).
    pub fn stats(&self) -> &StepStats {
        &self.stats
    }

    /// The global L2 norm of the averaged gradient (all parameters as one vector), the same on
    /// every rank. Gradients on the device are reduced there and one value is read to the host
    /// (counted in the step's traffic); sharded gradients need no read and no collective: every
    /// rank's squared norm travelled in the step's all-reduced tail.
    ///
    /// # Errors
    /// [`Error::Tensor`] when the device cannot give the value back.
    pub fn norm(&mut self) -> Result<f32, Error> {
        if let Some(norm) = self.norm {
            return Ok(norm);
        }
        let norm = match &self.held {
            Held::Device { flat, .. } => {
                let squares = flat.clone().mul(flat.clone()).sum();
                let value = to_host(squares, "the gradient norm")?;
                self.stats.traffic.to_host += byte_len(value.len());
                value[0].sqrt()
            }
            Held::Host(values) => values.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt() as f32,
            Held::Shard { squared_norm, .. } => squared_norm.sqrt(),
        };
        self.norm = Some(norm);
        Ok(norm)
    }

    /// Scales the gradients so that their global L2 norm is at most `max_norm`, as PyTorch's
    /// `clip_grad_norm_`: when the norm exceeds it, every gradient is multiplied by
    /// `max_norm / (norm + 1e-6)`. Returns the norm before clipping. Every rank computes the same
    /// norm, so replicas take the same decision.
    ///
    /// # Errors
    /// As [`ReducedGrads::norm`].
    pub fn clip_global_norm(&mut self, max_norm: f32) -> Result<f32, Error> {
        let norm = self.norm()?;
        let coefficient = max_norm / (norm + CLIP_EPSILON);
        if coefficient < 1.0 {
            match &mut self.held {
                Held::Device { flat, .. } => *flat = flat.clone().mul_scalar(coefficient),
                Held::Host(values) => values.iter_mut().for_each(|g| *g *= coefficient),
                Held::Shard {
                    values, squared_norm, ..
                } => {
                    *values = values.take().map(|v| v.mul_scalar(coefficient));
                    *squared_norm *= coefficient * coefficient;
                }
            }
            self.norm = Some(norm * coefficient);
        }
        Ok(norm)
    }

    /// burn's gradients, for any burn optimizer: `optim.step(lr, model, grads.into_params()?)`.
    ///
    /// # Errors
    /// [`Error::GradientForm`] when these gradients are held on the host or sharded (reduced
    /// for an offloaded or sharded optimizer: apply them with [`crate::DataParallel::apply`]).
    pub fn into_params(self) -> Result<GradientsParams, Error> {
        Ok(self.into_params_and_stats()?.0)
    }

    /// As [`ReducedGrads::into_params`], with the step's statistics.
    ///
    /// # Errors
    /// As [`ReducedGrads::into_params`].
    pub fn into_params_and_stats(self) -> Result<(GradientsParams, StepStats), Error> {
        let form = self.form();
        let Held::Device { flat, slots } = self.held else {
            return Err(Error::GradientForm {
                wanted: GradientForm::Device,
                held: form,
            });
        };
        let mut grads = GradientsParams::new();
        for (slot, range) in &slots {
            register(&mut grads, slot, flat.clone().slice(range.clone()));
        }
        Ok((grads, self.stats))
    }

    /// Every averaged gradient in host memory, flat in parameter order, with the step's
    /// statistics (an offloaded optimizer's input).
    ///
    /// # Errors
    /// [`Error::GradientForm`] unless held on the host.
    pub fn into_host(self) -> Result<(Vec<f32>, StepStats), Error> {
        match self.held {
            Held::Host(values) => Ok((values, self.stats)),
            _ => Err(Error::GradientForm {
                wanted: GradientForm::Host,
                held: self.form(),
            }),
        }
    }

    /// This rank's shard of the averaged gradient on the device (`None` when the shard is
    /// empty), the shard counts, the model's device and the step's statistics (a sharded
    /// optimizer's input).
    ///
    /// # Errors
    /// [`Error::GradientForm`] unless sharded.
    pub fn into_shard(self) -> Result<(Option<Tensor<1>>, Vec<usize>, Device, StepStats), Error> {
        let form = self.form();
        match self.held {
            Held::Shard { values, counts, .. } => Ok((values, counts, self.device, self.stats)),
            _ => Err(Error::GradientForm {
                wanted: GradientForm::Shards {
                    counts: Vec::new(),
                    rank: 0,
                },
                held: form,
            }),
        }
    }
}

/// Registers a flat gradient under `slot`'s parameter, in the parameter's shape.
fn register(grads: &mut GradientsParams, slot: &ParamSlot, flat: Tensor<1>) {
    macro_rules! by_rank {
        ($($d:literal)*) => {
            match slot.dims.len() {
                $($d => {
                    let dims: [usize; $d] = slot.dims.as_slice().try_into().expect("rank checked");
                    grads.register::<$d>(slot.id, flat.reshape(dims))
                })*
                n => panic!("parameters of rank {n} are not supported (1 to 6 are)"),
            }
        };
    }
    by_rank!(1 2 3 4 5 6);
}
