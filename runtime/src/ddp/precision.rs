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
//!   Every rank casts the same f32 bits, so the replicas stay bit-identical.
//!
//! This is the recipe of PyTorch AMP with bf16 and of DeepSpeed's bf16 mode (bf16 compute, f32
//! master weights and optimizer state, f32 gradient accumulation). bf16 keeps f32's exponent
//! range, so it needs no loss scaling.

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
}

impl Precision {
    /// The type the replica computes in.
    pub fn compute_dtype(self) -> FloatDType {
        match self {
            Self::F32 => FloatDType::F32,
            Self::Bf16 => FloatDType::BF16,
        }
    }

    /// Whether the replica computes in a type narrower than f32 (and the update runs on a
    /// master copy).
    pub fn is_mixed(self) -> bool {
        self != Self::F32
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

impl FromStr for Precision {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(crate::Error::UnknownPrecision(other.to_string())),
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
