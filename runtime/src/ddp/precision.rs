//! Mixed precision: the replica computes in a low float type, everything that accumulates stays
//! in f32.
//!
//! With [`Precision::Bf16`] ([`super::DdpOptions::with_precision`]):
//! - [`super::DataParallel::wrap`] keeps rank 0's f32 parameters as the **master copy** (one flat
//!   f32 tensor on the model's device) and hands back the replica cast to bf16; the forward and
//!   backward passes run in bf16.
//! - Each micro-batch's gradients are cast to f32 *before* they are scaled by the micro-batch's
//!   sample count and added to the f32 sums: nothing is summed in bf16. The all-reduce carries f32.
//! - The update runs in f32 on the master copy: burn's optimizer (through
//!   [`super::DataParallel::step`] or [`super::DataParallel::apply`]) steps an f32 view of the
//!   model, whose moments are therefore f32, and the replica is the updated master cast to bf16.
//!   Every rank casts the same f32 bits, so the replicas stay bit-identical. With ballast's
//!   [`crate::optim::ShardedAdam`] each rank keeps only its shard of the master (f32 values and
//!   moments), updates it in f32, and the shards' casts are all-gathered in the low type: half
//!   the bytes of f32.
//!
//! This is the recipe of PyTorch AMP with bf16 and of DeepSpeed's bf16 mode (bf16 compute, f32
//! master weights and optimizer state, f32 gradient accumulation). bf16 keeps f32's exponent
//! range, so it needs no loss scaling.
//!
//! [`Precision::F16`] is the same recipe in f16, whose range ends at 65504 and whose small
//! gradients underflow, so it adds **dynamic loss scaling** ([`LossScaling`], PyTorch's
//! `GradScaler` defaults): each micro-batch's loss is multiplied by the scale before backward,
//! and the f32 gradients are divided by it again as they are summed. The reduced gradients are
//! checked once per step: if any is infinite or NaN, the step is skipped (nothing is applied;
//! [`super::StepStats::overflow`]) and the scale is halved; after `growth_interval` good steps in
//! a row it doubles. The reduced gradients are the same on every rank, so every rank skips the
//! same steps and holds the same scale.

use std::{fmt, str::FromStr};

use burn::{
    module::{Module, ModuleMapper, Param},
    tensor::{FloatDType, Tensor},
};

/// The float type a replica computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Precision {
    /// Everything in f32 (the default).
    #[default]
    F32,
    /// bf16 forward and backward; f32 gradient sums, master parameters and optimizer state.
    Bf16,
    /// As [`Precision::Bf16`] in f16, with dynamic loss scaling ([`LossScaling`]).
    F16,
}

impl Precision {
    /// The type the replica computes in.
    pub fn compute_dtype(self) -> FloatDType {
        match self {
            Self::F32 => FloatDType::F32,
            Self::Bf16 => FloatDType::BF16,
            Self::F16 => FloatDType::F16,
        }
    }

    /// Whether losses are scaled (f16's narrow range).
    pub fn scales_loss(self) -> bool {
        self == Self::F16
    }

    /// Whether the replica computes in a type narrower than f32 (and the update runs on a
    /// master copy).
    pub fn is_mixed(self) -> bool {
        self != Self::F32
    }

    /// Bytes per parameter that stay on the device whatever the micro-batch, besides the
    /// gradient sums and the optimizer state: the replica's parameter in the compute type, and
    /// in a mixed precision its f32 master (2 + 4 in bf16 and f16, 4 in f32).
    pub fn resident_bytes_per_param(self) -> u64 {
        self.replica_bytes_per_param() + if self.is_mixed() { 4 } else { 0 }
    }

    /// Bytes of one parameter of the replica: the size of the compute type.
    pub fn replica_bytes_per_param(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl FromStr for Precision {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(crate::Error::UnknownPrecision(other.to_string())),
        }
    }
}

/// Dynamic loss scaling for [`Precision::F16`] (the defaults are PyTorch `GradScaler`'s).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaling {
    /// The first scale.
    pub init_scale: f32,
    /// Factor the scale grows by after `growth_interval` steps without overflow.
    pub growth_factor: f32,
    /// Factor the scale shrinks by after an overflow.
    pub backoff_factor: f32,
    /// Steps without overflow before the scale grows.
    pub growth_interval: u32,
}

impl Default for LossScaling {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// The scale in force and the good steps since it last changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LossScaler {
    config: LossScaling,
    scale: f32,
    good_steps: u32,
}

impl LossScaler {
    pub(crate) fn new(config: LossScaling) -> Self {
        Self {
            config,
            scale: config.init_scale,
            good_steps: 0,
        }
    }

    pub(crate) fn scale(&self) -> f32 {
        self.scale
    }

    /// After a step's reduced gradients were checked: shrinks the scale on an overflow, grows
    /// it after `growth_interval` good steps in a row.
    pub(crate) fn update(&mut self, overflow: bool) {
        if overflow {
            self.scale *= self.config.backoff_factor;
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= self.config.growth_interval {
                self.scale *= self.config.growth_factor;
                self.good_steps = 0;
            }
        }
    }
}

/// `model` with every float parameter cast to `dtype`, each still a leaf of its own (the cast
/// is not recorded in any autodiff graph) that keeps its id and whether it requires a gradient.
/// A no-op for parameters already of that type.
pub fn cast_params<M: Module>(model: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = self.0;
            param.map(|t| {
                if t.dtype() == dtype.into() {
                    return t;
                }
                let require_grad = t.is_require_grad();
                t.cast(dtype).detach().set_require_grad(require_grad)
            })
        }
    }
    model.map(&mut Cast(dtype))
}
