//! What crosses between a model's device and the host: the byte counts a step reports, and the
//! one reader of device tensors the step and the sharded optimizer share.

use crate::Error;
use burn::{
    module::{Module, ModuleVisitor, Param},
    tensor::{Device, Tensor},
};

/// Bytes a step moved between the model's device and the host, counted where the copies are
/// made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Device→host bytes.
    pub to_host: u64,
    /// Host→device bytes.
    pub to_device: u64,
}

impl Traffic {
    /// Adds `other`'s bytes to these.
    pub fn add(&mut self, other: Traffic) {
        self.to_host += other.to_host;
        self.to_device += other.to_device;
    }
}

/// Bytes of `n` `f32` values.
pub(crate) fn byte_len(n: usize) -> u64 {
    (n * std::mem::size_of::<f32>()) as u64
}

/// `t`'s values, read to the host; `what` names the tensor in the error.
pub(crate) fn to_host(t: Tensor<1>, what: &str) -> Result<Vec<f32>, crate::Error> {
    let err = |message: String| Error::Tensor {
        path: what.to_string(),
        message,
    };
    t.try_into_data()
        .map_err(|e| err(format!("{e:?}")))?
        .try_into_vec::<f32>()
        .map_err(|e| err(format!("{e:?}")))
}

/// The inner (non-autodiff) device the model's gradients live on.
pub(crate) fn model_device<M: Module>(model: &M) -> Device {
    struct Find(Option<Device>);
    impl ModuleVisitor for Find {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.0.is_none() {
                let t = param.val();
                self.0 = Some(if t.is_require_grad() {
                    t.inner().device()
                } else {
                    t.device()
                });
            }
        }
    }
    let mut f = Find(None);
    model.visit(&mut f);
    f.0.unwrap_or_default()
}
