//! [`StepOptimizer`] for ballast's offloaded Adam: the step's averaged gradients reach it on the
//! host, and the updated parameters are loaded back into the model.

use burn::module::Module;

use crate::ddp::{DataParallel, DdpError, GradientForm, ReducedGrads, StepOptimizer, StepStats};
use crate::offload::HostOffload;
use crate::params::load_params;
use crate::transfer::byte_len;

/// Adam with its state off the device: the master parameters and moments take the averaged
/// gradient from the host copy of the reduced buckets (the host cores update them, or on a GPU
/// rank the GPU chunk by chunk over managed memory), and the updated parameters are loaded back.
impl StepOptimizer for HostOffload {
    fn form(&self) -> GradientForm {
        GradientForm::Host
    }

    fn apply<M: Module>(
        &mut self,
        _ddp: &mut DataParallel,
        model: M,
        grads: ReducedGrads,
        lr: f64,
    ) -> Result<(M, StepStats), DdpError> {
        let (grads, mut stats) = grads.into_host()?;
        let params = self.step(&grads, lr as f32)?;
        stats.traffic.to_device += byte_len(params.len());
        let model = load_params(model, params);
        let (down, up) = self.last_step_transfer();
        stats.traffic.to_device += down;
        stats.traffic.to_host += up;
        Ok((model, stats))
    }
}
