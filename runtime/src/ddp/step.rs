//! One trait for every optimizer a data-parallel step can apply: burn's own (any
//! `ModuleOptimizer`: SGD, Adam, AdamW, ...), ballast's sharded Adam
//! ([`crate::optim::sharded::ShardedAdam`]) and its offloaded Adam ([`crate::optim::offload::HostOffload`]).
//! [`crate::DataParallel::step`] dispatches through it once. The sharded Adam's implementation is
//! in [`crate::optim::sharded`], the offloaded one's in [`crate::optim::offload`].

use burn::{module::Module, optim::ModuleOptimizer};

use super::{DataParallel, GradientForm, ReducedGrads, StepStats};
use crate::Error;

/// An optimizer that updates a data-parallel model from a step's averaged gradients.
pub trait StepOptimizer {
    /// The form it takes the gradients in: this decides the step's collective (an all-reduce for
    /// [`GradientForm::Device`] and [`GradientForm::Host`], a reduce-scatter for
    /// [`GradientForm::Shards`]).
    fn form(&self) -> GradientForm;

    /// Updates `model` with `grads` (reduced in [`StepOptimizer::form`]) at learning rate `lr`;
    /// returns the model and the step's statistics. A sharded optimizer gathers the updated
    /// shards through `ddp`. Every rank calls it once per step.
    ///
    /// # Errors
    /// The optimizer's and the collectives' errors.
    fn apply<M: Module>(
        &mut self,
        ddp: &mut DataParallel,
        model: M,
        grads: ReducedGrads,
        lr: f64,
    ) -> Result<(M, StepStats), Error>;
}

/// Any burn optimizer, on the model's device with every parameter's gradient.
impl StepOptimizer for ModuleOptimizer {
    fn form(&self) -> GradientForm {
        GradientForm::Device
    }

    fn apply<M: Module>(
        &mut self,
        ddp: &mut DataParallel,
        model: M,
        grads: ReducedGrads,
        lr: f64,
    ) -> Result<(M, StepStats), Error> {
        let (grads, stats) = grads.into_params_and_stats()?;
        // In a mixed precision the optimizer steps the f32 master copy (so its state is f32 too).
        let model = ddp.update_master(model, |model| self.step(lr, model, grads))?;
        Ok((model, stats))
    }
}
