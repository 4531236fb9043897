//! Data parallelism for any burn module, driven from the user's own loop.
//!
//! # A step, in PyTorch's order
//!
//! ```text
//! for each micro-batch of this rank's share:      (no communication, no read to the host)
//!     loss = model.forward(micro_batch)
//!     ddp.backward(&model, loss, micro_batch_len)   // adds sample-weighted gradients on the device
//! let mut grads = ddp.reduce(&model)?                // ONE fused all-reduce, divide once
//! let norm = grads.clip_global_norm(1.0)?            // optional: the same norm on every rank
//! model = optim.step(lr, model, grads.into_params()?) // any burn optimizer
//! ```
//!
//! or, for any [`StepOptimizer`] (burn's, or ballast's sharded and offloaded Adam), with one
//! dispatch: `ddp.step(model, &mut optim, lr)`, which is [`DataParallel::reduce_for`] then
//! [`DataParallel::apply`].
//!
//! Gradients stay where burn computed them: each micro-batch's gradient, scaled by its sample
//! count, is added to a per-parameter sum with tensor operations on the model's device, and the
//! loss sum is a device scalar. [`DataParallel::reduce`] lays the sums out back to back (the
//! same order on every rank), cuts them into buckets and reduces the buckets together through
//! [`Communicator::all_reduce_sum_buckets`], one collective (one agreement between the ranks)
//! per step however many buckets there are; a host communicator (threads, MPI) reads each
//! bucket back once per step and writes the sum back once. The sums are divided once by the
//! global sample count and handed back as burn's `GradientsParams` on the device. The result is
//! the mean gradient of the global batch: exactly what one device computes on the whole batch,
//! up to the order of f32 additions. [`StepStats::traffic`] counts the bytes each step moved
//! between device and host.
//!
//! # Loss convention
//!
//! [`LossReduction::Mean`] (the default, burn's and PyTorch's default): the loss of a micro-batch
//! is the *mean* over its samples; its gradient is multiplied by the micro-batch length before it
//! is added, which turns it back into a sum. [`LossReduction::Sum`]: the loss is already a sum over
//! the micro-batch and is added as is. Both give the global mean gradient.
//!
//! # Ranks with nothing to do
//!
//! A rank whose share is 0 calls [`DataParallel::reduce`] without any `backward`; it
//! contributes zeros and a count of 0, joins the all-reduce (no hang) and applies the same update.
//!
//! # Why not plain averaging
//!
//! Plain DDP divides every rank's gradient by its own batch and averages ranks equally. With
//! unequal shares that weights a sample on a small rank more than one on a big rank.
//! [`Averaging::PerRankMean`] reproduces that behaviour for comparison only.

mod bucket;
mod grads;
mod packed;
mod precision;
mod step;

use std::time::{Duration, Instant};

use burn::{
    module::{Module, ModuleVisitor, Param},
    tensor::{Device, FloatDType, Gradients, Tensor, TensorData},
};

use ballast_collectives::{
    bucket::{BucketLayout, DEFAULT_BUCKET_CAP_BYTES},
    Communicator, CommunicatorExt, DeviceBuffer,
};

use bucket::{bucket_parts, Reduced, TensorBucket};
pub use grads::{GradientForm, ReducedGrads};
use packed::PackedHalves;
use precision::LossScaler;
pub use precision::{cast_params, LossScaling, Precision};

use crate::params::{
    checksum, collect_params, flatten_params, load_params, load_params_from_tensor, params_range, ParamSlot,
};
pub use crate::transfer::Traffic;
use crate::transfer::{byte_len, model_device};
use crate::Error;
pub use step::StepOptimizer;

/// How the loss of a micro-batch was reduced over its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossReduction {
    /// Mean over the micro-batch (default).
    #[default]
    Mean,
    /// Sum over the micro-batch.
    Sum,
}

/// How gradients are combined over ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Averaging {
    /// Sum of per-sample gradients divided once by the global sample count: exact (default).
    #[default]
    BySamples,
    /// Each rank's mean, averaged equally over ranks: what plain DDP computes. Wrong with unequal
    /// shares; kept to demonstrate that.
    PerRankMean,
}

/// Options of [`DataParallel`].
#[derive(Debug, Clone, PartialEq)]
pub struct DdpOptions {
    /// Loss convention of the micro-batch losses passed to [`DataParallel::backward`].
    pub loss: LossReduction,
    /// How ranks are combined.
    pub averaging: Averaging,
    /// Largest fused bucket in bytes (default 25 MiB).
    pub bucket_cap_bytes: usize,
    /// The float type the replica computes in (default f32); see [`Precision`].
    pub precision: Precision,
    /// Dynamic loss scaling, used with [`Precision::F16`].
    pub loss_scaling: LossScaling,
}

impl Default for DdpOptions {
    fn default() -> Self {
        Self {
            loss: LossReduction::Mean,
            averaging: Averaging::BySamples,
            bucket_cap_bytes: DEFAULT_BUCKET_CAP_BYTES,
            precision: Precision::F32,
            loss_scaling: LossScaling::default(),
        }
    }
}

impl DdpOptions {
    /// Sets the loss convention.
    pub fn with_loss(mut self, loss: LossReduction) -> Self {
        self.loss = loss;
        self
    }

    /// Sets the averaging.
    pub fn with_averaging(mut self, averaging: Averaging) -> Self {
        self.averaging = averaging;
        self
    }

    /// Sets the bucket cap.
    pub fn with_bucket_cap_bytes(mut self, bytes: usize) -> Self {
        self.bucket_cap_bytes = bytes;
        self
    }

    /// Sets the precision the replica computes in: with [`Precision::Bf16`] the forward and
    /// backward passes run in bf16, while gradient sums, the all-reduce, the master parameters
    /// and the optimizer's state stay f32 (see [`Precision`]).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Sets the dynamic loss scaling of [`Precision::F16`].
    pub fn with_loss_scaling(mut self, loss_scaling: LossScaling) -> Self {
        self.loss_scaling = loss_scaling;
        self
    }
}

/// What one step did, on this rank and globally.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Step index (0-based).
    pub step: u64,
    /// Samples this rank processed.
    pub local_samples: usize,
    /// Micro-batches this rank ran.
    pub micro_batches: usize,
    /// Samples over all ranks.
    pub global_samples: usize,
    /// Whether the reduced gradients held an infinite or NaN value under [`Precision::F16`]'s
    /// loss scaling: the step was skipped on every rank (nothing applied) and the scale lowered.
    pub overflow: bool,
    /// The scale this step's losses were multiplied by before backward (1 without scaling).
    pub loss_scale: f32,
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Wall time this rank spent between the previous step's end and this all-reduce.
    pub compute: Duration,
    /// Time in the all-reduce (includes waiting for slower ranks).
    pub all_reduce: Duration,
    /// Collectives this step ran, as the communicator counted them (one per step: the buckets
    /// are reduced together).
    pub collectives: usize,
    /// Buckets this step's gradient sums were cut into and handed to the communicator.
    pub buckets: usize,
    /// Bytes this step copied between this rank's device and its host: the buckets read back
    /// for a host communicator, the small tail of per-rank values, and on an offloaded rank the
    /// parameters loaded back. Nothing is read between micro-batches.
    pub traffic: Traffic,
    /// Every rank's compute seconds, indexed by rank.
    pub rank_compute: Vec<f64>,
    /// Every rank's samples, indexed by rank.
    pub rank_samples: Vec<usize>,
    /// What the balancer reads from the step's all-reduce.
    pub(crate) balancer: BalancerTail,
}

/// The per-rank values only the balancer reads, carried in the tail of the step's all-reduce.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct BalancerTail {
    /// Every rank's note (see [`DataParallel::set_note`]), indexed by rank.
    pub(crate) notes: Vec<f32>,
    /// When every rank's compute began (the start of its `compute` interval), in seconds on its
    /// host's monotonic clock modulo `START_CLOCK_PERIOD_S`, indexed by rank. Comparable only
    /// between ranks of one host, and only through [`start_offset`].
    pub(crate) started: Vec<f64>,
    /// Every rank's all-reduce seconds of the *previous* step (0 at the first), indexed by rank.
    /// A rank's figure includes its wait for the last rank to arrive, so the smallest is the
    /// communication itself; the balancer plans with it.
    pub(crate) prev_all_reduce: Vec<f64>,
}

/// The data-parallel wrapper: owns the communicator, the bucket layout and this step's
/// gradient sums (on the model's device).
pub struct DataParallel {
    comm: Box<dyn Communicator>,
    options: DdpOptions,
    params: Vec<ParamSlot>,
    /// Every parameter, then the tail (loss sum, sample count, per-rank values), cut into buckets.
    layout: BucketLayout,
    /// This step's sample-weighted gradient sum of each parameter, flattened, on the device where
    /// burn computed it; `None` while the parameter has no gradient this step.
    grads: Vec<Option<Tensor<1>>>,
    /// This step's sample-weighted loss sum, a one-element tensor on the model's device.
    loss_sum: Option<Tensor<1>>,
    /// With a mixed [`Precision`], the f32 master parameters, flat in [`crate::params`] order
    /// on the model's device; `None` in f32, where the replica is its own master.
    master: Option<Tensor<1>>,
    /// Whether a sharded optimizer took the master copy over, each rank keeping its shard's
    /// ([`DataParallel::take_master_range`]).
    master_sharded: bool,
    /// With [`Precision::F16`], the loss scale in force.
    scaler: Option<LossScaler>,
    /// Bytes this step moved between device and host.
    traffic: Traffic,
    local_samples: usize,
    micro_batches: usize,
    step: u64,
    note: f32,
    ready_since: Instant,
    ready_clock: f64,
    /// This rank's all-reduce seconds of the previous step.
    last_all_reduce: f32,
    /// Device-log reports seen so far ([`crate::health::reports_since`]).
    log_seen: u64,
}

/// Per-rank values carried in the tail of the fused buffer (after the loss sum and the sample
/// count): compute seconds, samples, note, start stamp, the previous step's all-reduce seconds.
pub(crate) const TAIL_VALUES_PER_RANK: usize = 5;

/// Period of the start stamps in [`BalancerTail::started`]: small enough that an `f32` in the
/// all-reduce holds them to a few microseconds.
const START_CLOCK_PERIOD_S: f64 = 64.0;

/// `later − earlier` for two start stamps of ranks on one host (see
/// [`BalancerTail::started`]), taken to lie within half a clock period.
pub(crate) fn start_offset(earlier: f64, later: f64) -> f64 {
    let d = (later - earlier).rem_euclid(START_CLOCK_PERIOD_S);
    if d > START_CLOCK_PERIOD_S / 2.0 {
        d - START_CLOCK_PERIOD_S
    } else {
        d
    }
}

/// Now on the host's monotonic clock (shared by all processes of the host), modulo
/// [`START_CLOCK_PERIOD_S`].
fn host_clock() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9).rem_euclid(START_CLOCK_PERIOD_S)
}

impl DataParallel {
    /// Wraps `model`: checks every rank holds the same structure, broadcasts rank 0's parameters
    /// (burn initialises lazily, so seeds alone do not make replicas equal) and checks the
    /// replicas agree bit for bit. Returns the wrapper and the synchronised model.
    ///
    /// # Errors
    /// [`Error::ModelMismatch`] naming the first differing rank and parameter; collective
    /// errors.
    pub fn wrap<M: Module>(mut comm: Box<dyn Communicator>, model: M, options: DdpOptions) -> Result<(Self, M), Error> {
        let params = collect_params(&model);
        let structure: Vec<(String, Vec<usize>)> = params.iter().map(|p| (p.path.clone(), p.dims.clone())).collect();
        let all = comm.all_gather(&structure)?;
        for (rank, other) in all.iter().enumerate().skip(1) {
            if let Some(detail) = first_difference(&all[0], other) {
                return Err(Error::ModelMismatch { rank, detail });
            }
        }
        let mut lens: Vec<usize> = params.iter().map(|p| p.dims.iter().product()).collect();
        // Loss sum, squared gradient norm (sharded steps), sample count, then per rank: compute
        // seconds, samples, note, start stamp, the previous all-reduce's seconds.
        lens.push(3 + TAIL_VALUES_PER_RANK * comm.world_size());
        let layout = BucketLayout::new(&lens, options.bucket_cap_bytes, std::mem::size_of::<f32>())?;
        let grads = vec![None; params.len()];
        let scaler = options
            .precision
            .scales_loss()
            .then(|| LossScaler::new(options.loss_scaling));
        let mut ddp = Self {
            comm,
            options,
            params,
            layout,
            grads,
            loss_sum: None,
            master: None,
            master_sharded: false,
            scaler,
            traffic: Traffic::default(),
            local_samples: 0,
            micro_batches: 0,
            step: 0,
            note: 0.0,
            ready_since: Instant::now(),
            ready_clock: host_clock(),
            last_all_reduce: 0.0,
            log_seen: crate::health::reports_recorded(),
        };
        let mut flat = flatten_params(&model);
        ddp.comm.broadcast_f32(0, &mut flat)?;
        let model = load_params(model, &flat);
        ddp.verify_replicas(&model)?;
        let model = ddp.keep_master(model)?;
        Ok((ddp, model))
    }

    /// With a mixed precision, keeps `model`'s f32 parameters as the master copy and returns
    /// the replica in the compute type, after checking the device computes in it.
    fn keep_master<M: Module>(&mut self, model: M) -> Result<M, Error> {
        let precision = self.options.precision;
        if !precision.is_mixed() {
            return Ok(model);
        }
        let device = model_device(&model);
        if !device.supports_dtype(precision.compute_dtype()) {
            return Err(Error::PrecisionNotSupported {
                device: crate::device::device_name(&device),
                precision,
            });
        }
        self.master = params_range(&model, 0..self.param_count());
        Ok(cast_params(model, precision.compute_dtype()))
    }

    /// Updates the f32 master copy with `update` (an optimizer step on an f32 view of `model`
    /// that shares its parameter ids) and returns the replica: the updated master cast to the
    /// compute type. In f32 it is `update(model)`.
    ///
    /// # Errors
    /// [`Error::MasterSharded`] when a sharded optimizer holds the master copy in shards.
    pub(crate) fn update_master<M: Module>(&mut self, model: M, update: impl FnOnce(M) -> M) -> Result<M, Error> {
        if self.master_sharded {
            return Err(Error::MasterSharded);
        }
        let Some(master) = self.master.take() else {
            return Ok(update(model));
        };
        let full = update(load_params_from_tensor(model, master));
        self.master = params_range(&full, 0..self.param_count());
        Ok(cast_params(full, self.options.precision.compute_dtype()))
    }

    /// Keeps `model`'s f32 parameters (a checkpoint's, loaded before the first step) as the
    /// master copy and returns the replica in the compute type; `model` itself in f32.
    ///
    /// # Errors
    /// [`Error::MasterSharded`] after a sharded optimizer took the master over.
    pub(crate) fn restore_master<M: Module>(&mut self, model: M) -> Result<M, Error> {
        if self.master_sharded {
            return Err(Error::MasterSharded);
        }
        self.keep_master(model)
    }

    /// Hands the f32 master values of `range` (a sharded optimizer's shard) to the caller and
    /// drops the whole copy: from here on each rank keeps only its shard's master. `None` in
    /// f32, where the replica is its own master, and for an empty range.
    ///
    /// # Errors
    /// [`Error::MasterSharded`] when the master copy was handed over before.
    pub(crate) fn take_master_range(&mut self, range: std::ops::Range<usize>) -> Result<Option<Tensor<1>>, Error> {
        if self.master_sharded {
            return Err(Error::MasterSharded);
        }
        let Some(master) = self.master.take() else {
            return Ok(None);
        };
        self.master_sharded = true;
        Ok((!range.is_empty()).then(|| master.slice(range)))
    }

    /// The precision the replica computes in.
    pub fn precision(&self) -> Precision {
        self.options.precision
    }

    /// The f32 master parameters, flat in [`crate::params::flatten_params`] order, read to the
    /// host (for checkpoints and checks; not part of a step): `None` in f32, where the replica's
    /// own parameters are the master.
    ///
    /// # Errors
    /// [`Error::Tensor`] when the device cannot be read; [`Error::MasterSharded`] when a sharded
    /// optimizer holds the master in shards (each rank's is
    /// [`crate::optim::ShardedAdam::master_shard`]).
    pub fn master_params(&self) -> Result<Option<Vec<f32>>, Error> {
        if self.master_sharded {
            return Err(Error::MasterSharded);
        }
        self.master
            .clone()
            .map(|m| crate::transfer::to_host(m, "the master parameters"))
            .transpose()
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The communicator, for the caller's own control-plane messages (same-order rule applies).
    pub fn comm(&mut self) -> &mut dyn Communicator {
        self.comm.as_mut()
    }

    /// The parameters in fused-buffer order.
    pub fn params(&self) -> &[ParamSlot] {
        &self.params
    }

    /// Gives the communicator back (to wrap another model on the same ranks).
    pub fn into_comm(self) -> Box<dyn Communicator> {
        self.comm
    }

    /// Steps finished so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Back-propagates the loss of one micro-batch of `samples` samples and adds its gradients
    /// to this rank's sums, on the model's device. No communication and no read to the host: the
    /// host can queue the next micro-batch while the device still computes this one.
    ///
    /// # Errors
    /// None today; the signature leaves room for device errors.
    pub fn backward<M: Module>(&mut self, model: &M, loss: Tensor<1>, samples: usize) -> Result<(), Error> {
        let value = loss.clone().inner();
        let grads = self.weighted_loss(loss, samples).backward();
        self.add_weighted_gradients(model, grads, value, samples)
    }

    /// `loss` weighted by its micro-batch's sample count as the loss convention asks: back-
    /// propagating it gives gradients ready for [`DataParallel::add_weighted_gradients`], with
    /// the weighting done once on the scalar instead of once per gradient element.
    /// In a mixed precision the loss is left as it is and the weight is applied to the f32
    /// gradients instead, so that the weighting adds no rounding in the low type.
    pub(crate) fn weighted_loss(&self, loss: Tensor<1>, samples: usize) -> Tensor<1> {
        if let Some(scaler) = &self.scaler {
            loss.mul_scalar(scaler.scale())
        } else if self.options.precision.is_mixed() {
            loss
        } else {
            scaled(loss, self.loss_scale(samples))
        }
    }

    /// Adds the gradients of one micro-batch's [`DataParallel::weighted_loss`] (the balancer
    /// back-propagates it itself, to check memory and device errors in between) and the
    /// unweighted `loss` to this rank's sums, on the device. No communication.
    pub(crate) fn add_weighted_gradients<M: Module>(
        &mut self,
        model: &M,
        grads: Gradients,
        loss: Tensor<1>,
        samples: usize,
    ) -> Result<(), Error> {
        let grad_scale = if self.options.precision.is_mixed() {
            self.loss_scale(samples) / self.scaler.map_or(1.0, |s| s.scale())
        } else {
            1.0
        };
        self.add(model, grads, grad_scale, loss, samples);
        Ok(())
    }

    fn loss_scale(&self, samples: usize) -> f32 {
        match self.options.loss {
            LossReduction::Mean => samples as f32,
            LossReduction::Sum => 1.0,
        }
    }

    fn add<M: Module>(&mut self, model: &M, grads: Gradients, grad_scale: f32, loss: Tensor<1>, samples: usize) {
        if self.micro_batches == 0 {
            // A new step: the previous step's sums were consumed by its all-reduce.
            self.grads.iter_mut().for_each(|g| *g = None);
            self.loss_sum = None;
        }
        self.accumulate(model, grads, grad_scale);
        let loss = scaled(
            loss.inner().cast(FloatDType::F32).reshape([1]),
            self.loss_scale(samples),
        );
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(sum) => sum + loss,
            None => loss,
        });
        self.local_samples += samples;
        self.micro_batches += 1;
    }

    /// Starts this rank's compute clock for the current step (by default it starts when the
    /// previous step ends); the balancer calls it when a step's real work begins.
    pub(crate) fn mark_ready(&mut self) {
        (self.ready_since, self.ready_clock) = (Instant::now(), host_clock());
    }

    /// A number this rank shares with all others in the next step's all-reduce (for example a
    /// micro-batch cap it had to lower); read back in the step's [`BalancerTail::notes`].
    pub(crate) fn set_note(&mut self, note: f32) {
        self.note = note;
    }

    /// Adds `scale` times each gradient of `grads` to its parameter's device-side sum.
    fn accumulate<M: Module>(&mut self, model: &M, mut grads: Gradients, scale: f32) {
        struct Adder<'a> {
            grads: &'a mut Gradients,
            sums: &'a mut [Option<Tensor<1>>],
            index: usize,
            scale: f32,
        }
        impl ModuleVisitor for Adder<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let i = self.index;
                self.index += 1;
                let grad = if param.is_require_grad() {
                    param.val().grad_remove(self.grads)
                } else {
                    None
                };
                let Some(grad) = grad else { return };
                let n = grad.shape().num_elements();
                // Summed in f32 whatever the compute type (a no-op in f32).
                let grad = scaled(grad.cast(FloatDType::F32).reshape([n]), self.scale);
                self.sums[i] = Some(match self.sums[i].take() {
                    Some(sum) => sum + grad,
                    None => grad,
                });
            }
        }
        model.visit(&mut Adder {
            grads: &mut grads,
            sums: &mut self.grads,
            index: 0,
            scale,
        });
    }

    /// The step's averaged gradients, every parameter on the model's device, for any burn
    /// optimizer: sums gradients, sample counts and losses over ranks in one fused all-reduce and
    /// divides once by the global sample count. Every rank must call it (or
    /// [`DataParallel::reduce_for`]) once per step, including ranks that processed no sample.
    ///
    /// ```text
    /// let mut grads = ddp.reduce(&model)?;
    /// let norm = grads.clip_global_norm(1.0)?;
    /// model = optim.step(lr, model, grads.into_params()?);
    /// ```
    ///
    /// # Errors
    /// Collective errors; [`Error::EmptyStep`] when no rank processed a sample;
    /// [`Error::DeviceFailed`] when the device reported a failure during the step.
    pub fn reduce<M: Module>(&mut self, model: &M) -> Result<ReducedGrads, Error> {
        self.reduce_as(model, GradientForm::Device)
    }

    /// The step's averaged gradients in the form `optim` takes them
    /// ([`StepOptimizer::form`]): every parameter's on the device, on the host, or this rank's
    /// shard only (a reduce-scatter instead of an all-reduce). Apply them with
    /// [`DataParallel::apply`].
    ///
    /// # Errors
    /// As [`DataParallel::reduce`]; [`Error::Shards`] when a sharded optimizer's layout does
    /// not fit this model and world.
    pub fn reduce_for<M: Module, O: StepOptimizer>(&mut self, model: &M, optim: &O) -> Result<ReducedGrads, Error> {
        self.reduce_as(model, optim.form())
    }

    /// Applies `optim` to `model` with this step's reduced gradients (from
    /// [`DataParallel::reduce_for`] with the same optimizer, clipped or not); returns the
    /// updated model and the step's statistics.
    ///
    /// # Errors
    /// [`Error::GradientForm`] when `grads` were reduced for another form; the optimizer's
    /// errors.
    pub fn apply<M: Module, O: StepOptimizer>(
        &mut self,
        model: M,
        optim: &mut O,
        grads: ReducedGrads,
        lr: f64,
    ) -> Result<(M, StepStats), Error> {
        let wanted = optim.form();
        if grads.form() != wanted {
            return Err(Error::GradientForm {
                wanted,
                held: grads.form(),
            });
        }
        if let Some(scaler) = &mut self.scaler {
            let overflow = grads.stats().overflow;
            scaler.update(overflow);
            if overflow {
                // Every rank reduced the same gradients, so every rank skips this step.
                return Ok((model, grads.stats().clone()));
            }
        }
        optim.apply(self, model, grads, lr)
    }

    /// One whole step after the micro-batches: [`DataParallel::reduce_for`] then
    /// [`DataParallel::apply`].
    ///
    /// # Errors
    /// As those two.
    pub fn step<M: Module, O: StepOptimizer>(
        &mut self,
        model: M,
        optim: &mut O,
        lr: f64,
    ) -> Result<(M, StepStats), Error> {
        let grads = self.reduce_for(&model, optim)?;
        self.apply(model, optim, grads, lr)
    }

    fn reduce_as<M: Module>(&mut self, model: &M, form: GradientForm) -> Result<ReducedGrads, Error> {
        let device = model_device(model);
        match form {
            GradientForm::Device => {
                let (reduced, stats) = self.reduce_buckets(&device, false)?;
                // One division over the whole buffer (in place where the backend owns it
                // alone), then each parameter's gradient is a slice of it.
                let flat = Tensor::cat(reduced.buckets, 0)
                    .slice(0..self.param_count())
                    .div_scalar(reduced.count);
                let mut stats = stats;
                if self.scaler.is_some() {
                    // One value read per step: whether every reduced gradient is finite.
                    stats.overflow = !flat.clone().is_finite().all().into_scalar::<bool>();
                    stats.traffic.to_host += 1;
                }
                let slots = (0..self.params.len())
                    .map(|i| (self.params[i].clone(), self.layout.tensor(i)))
                    .collect();
                Ok(ReducedGrads::on_device(flat, slots, stats))
            }
            GradientForm::Host => {
                let (mut reduced, mut stats) = self.reduce_buckets(&device, true)?;
                let mut grads = reduced.host_range(0..self.param_count(), &mut stats.traffic)?;
                grads.iter_mut().for_each(|g| *g /= reduced.count);
                Ok(ReducedGrads::on_host(grads, device, stats))
            }
            GradientForm::Shards { counts, rank } => {
                self.check_shards(&counts, rank)?;
                let (shard, count, squared, stats) = self.reduce_sharded(&device, &counts)?;
                let shard = shard.map(|g| g.div_scalar(count));
                Ok(ReducedGrads::sharded(
                    (counts, rank),
                    shard,
                    squared / (count * count),
                    device,
                    stats,
                ))
            }
        }
    }

    /// Fails unless `counts` cut this model's parameters into one shard per rank and the shard
    /// was made for this rank (`owner`), before any collective runs.
    fn check_shards(&self, counts: &[usize], owner: usize) -> Result<(), Error> {
        let n = self.param_count();
        let rank = self.comm.rank();
        if counts.len() == self.comm.world_size() && counts.iter().sum::<usize>() == n && owner == rank {
            return Ok(());
        }
        Err(Error::Shards {
            reason: format!(
                "{} shards of {} parameters in all, made for rank {owner}, on rank {rank} of a world of {} \
                 and a model of {n} parameters",
                counts.len(),
                counts.iter().sum::<usize>(),
                self.comm.world_size()
            ),
        })
    }

    /// Every rank's updated shard (this rank's `mine`, `None` when empty) all-gathered into the
    /// whole flat parameter vector on `device`, counted in `stats`.
    pub(crate) fn gather_shards(
        &mut self,
        mine: Option<Tensor<1>>,
        counts: &[usize],
        device: &Device,
        stats: &mut StepStats,
    ) -> Result<Tensor<1>, Error> {
        let before = self.comm.collectives_started();
        let mut mine = TensorBucket::new(mine.into_iter().collect(), device.clone(), None);
        let mut params = TensorBucket::receiving(self.param_count(), device.clone());
        self.comm.all_gather_device(&mut mine, counts, &mut params)?;
        stats.collectives += (self.comm.collectives_started() - before) as usize;
        stats.traffic.add(mine.traffic);
        stats.traffic.add(params.traffic);
        Ok(params.reduced.expect("written by the all-gather"))
    }

    /// As [`DataParallel::gather_shards`] for shards in a 2-byte type (`dtype`: bf16 or f16),
    /// carried two values to a word: half the bytes on the wire and across the device.
    pub(crate) fn gather_shards_packed(
        &mut self,
        mine: Option<Tensor<1>>,
        counts: &[usize],
        device: &Device,
        dtype: FloatDType,
        stats: &mut StepStats,
    ) -> Result<Tensor<1>, Error> {
        let before = self.comm.collectives_started();
        let mut mine = PackedHalves::sending(mine, dtype, device.clone());
        let mut params = PackedHalves::receiving(counts, dtype, device.clone());
        self.comm
            .all_gather_device(&mut mine, &PackedHalves::word_counts(counts), &mut params)?;
        stats.collectives += (self.comm.collectives_started() - before) as usize;
        stats.traffic.add(mine.traffic);
        stats.traffic.add(params.traffic);
        Ok(params.gathered.expect("written by the all-gather"))
    }

    /// Parameters of the model (the fused buffer without its tail).
    pub fn param_count(&self) -> usize {
        self.layout.total_elems() - self.layout.tensor(self.params.len()).len()
    }

    /// The all-reduce of a step and its bookkeeping: lays this step's sums and the tail out as
    /// device buckets, reduces each through the communicator, and returns the reduced buckets
    /// with the global sample count (the divisor). The host copies a host communicator leaves
    /// are kept for the tail, and for every bucket when `keep_host` (the host optimizer's input).
    fn reduce_buckets(&mut self, device: &Device, keep_host: bool) -> Result<(Reduced, StepStats), Error> {
        self.check_device(device)?;
        let (pieces, busy, mut traffic) = self.take_step(device);
        let started = Instant::now();
        let before = self.comm.collectives_started();
        let tail_range = self.layout.tensor(self.params.len());
        let mut buckets: Vec<TensorBucket> = self
            .layout
            .buckets()
            .zip(bucket_parts(&self.layout, pieces))
            .map(|(range, parts)| {
                // The host optimizer needs every bucket on the host; otherwise only the tail is read.
                let keep_from = if keep_host {
                    Some(0)
                } else {
                    (range.end > tail_range.start).then(|| tail_range.start.saturating_sub(range.start))
                };
                TensorBucket::new(parts, device.clone(), keep_from)
            })
            .collect();
        // The whole step's buckets in one collective: one agreement between the ranks per step.
        let mut views: Vec<&mut dyn DeviceBuffer> = buckets.iter_mut().map(|b| b as &mut dyn DeviceBuffer).collect();
        self.comm.all_reduce_sum_buckets(&mut views)?;
        let bucket_count = views.len();
        for bucket in &buckets {
            traffic.add(bucket.traffic);
        }
        let all_reduce = started.elapsed();
        let collectives = (self.comm.collectives_started() - before) as usize;
        let mut reduced = Reduced {
            layout: self.layout.clone(),
            buckets: Vec::new(),
            host: Vec::new(),
            count: 0.0,
        };
        for b in buckets {
            reduced.host.push(b.written);
            reduced.buckets.push(b.reduced.expect("written by the all-reduce"));
        }
        let t = reduced.host_range(tail_range, &mut traffic)?;
        let (count, stats) = self.conclude(&t, busy, all_reduce, collectives, bucket_count, traffic)?;
        reduced.count = count;
        Ok((reduced, stats))
    }

    /// The collectives of a sharded step, on device buffers: the gradient sums reduce-scattered
    /// by `counts`, then the tail all-reduced with each rank's squared norm of its shard of the
    /// sums. Returns this rank's shard of the sums on the device (`None` for an empty shard),
    /// the global sample count and the global squared norm of the sums.
    fn reduce_sharded(
        &mut self,
        device: &Device,
        counts: &[usize],
    ) -> Result<(Option<Tensor<1>>, f32, f32, StepStats), Error> {
        self.check_device(device)?;
        let (mut grads, busy, mut traffic) = self.take_step(device);
        let mut tail = grads.split_off(self.params.len());
        let started = Instant::now();
        let before = self.comm.collectives_started();
        let mut sums = TensorBucket::new(grads, device.clone(), None);
        let mut shard = TensorBucket::receiving(counts[self.comm.rank()], device.clone());
        self.comm.reduce_scatter_sum_device(&mut sums, counts, &mut shard)?;
        if let Some(mine) = &shard.reduced {
            // Added to the tail on the device: the global norm costs no read and no collective.
            tail[1] = mine.clone().mul(mine.clone()).sum();
        }
        let mut tail = TensorBucket::new(tail, device.clone(), Some(0));
        self.comm.all_reduce_sum_device(&mut tail)?;
        for bucket in [&sums, &shard] {
            traffic.add(bucket.traffic);
        }
        let t = tail.into_host(&mut traffic)?;
        let collectives = (self.comm.collectives_started() - before) as usize;
        let (count, stats) = self.conclude(&t, busy, started.elapsed(), collectives, 1, traffic)?;
        Ok((shard.reduced, count, t[1], stats))
    }

    /// Where a [`crate::health::DeviceLog`] records (the job runner installs one), waits for this
    /// rank's queued device work, then fails the step when the device reported a fault or its
    /// log recorded a failure since the last check: the step's sums were then never computed,
    /// so they are dropped before any collective runs.
    fn check_device(&mut self, device: &Device) -> Result<(), Error> {
        if !crate::health::device_log_installed() {
            // Nothing records the device log: the buffers' own errors surface when the
            // collective reads them.
            return Ok(());
        }
        // cubecl compiles and launches on its own thread: a failure is in the log only once that
        // thread has reached it, which the barrier guarantees.
        let fault = device.sync().err().map(|e| e.to_string());
        let (reports, seen) = crate::health::reports_since(self.log_seen);
        self.log_seen = seen;
        if fault.is_none() && reports.is_empty() {
            return Ok(());
        }
        let mut reports = reports;
        reports.extend(fault);
        // The step's sums may hold what was never computed: the next step starts afresh.
        self.grads.iter_mut().for_each(|g| *g = None);
        self.loss_sum = None;
        self.local_samples = 0;
        self.micro_batches = 0;
        Err(Error::DeviceFailed {
            rank: self.comm.rank(),
            step: self.step,
            message: reports.join("\n  "),
        })
    }

    /// Takes every device-log report recorded so far as handled (a caller that recovered from
    /// it, as the balancer does from an out-of-memory): the step does not fail on them.
    pub(crate) fn acknowledge_device_log(&mut self) {
        self.log_seen = crate::health::reports_recorded();
    }

    /// The loss and every gradient of one micro-batch's `grads` (without taking them), for
    /// [`crate::health::check_tensors`] before they are added.
    pub(crate) fn micro_batch_tensors<M: Module>(model: &M, grads: &Gradients, loss: &Tensor<1>) -> Vec<Tensor<1>> {
        struct Collect<'a> {
            grads: &'a Gradients,
            out: Vec<Tensor<1>>,
        }
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if param.is_require_grad() {
                    if let Some(g) = param.val().grad(self.grads) {
                        let n = g.shape().num_elements();
                        self.out.push(g.reshape([n]));
                    }
                }
            }
        }
        let mut c = Collect {
            grads,
            out: vec![loss.clone().inner().reshape([1])],
        };
        model.visit(&mut c);
        c.out
    }

    /// Ends this rank's part of a step: this step's pieces of the fused buffer (each parameter's
    /// gradient sum, zeros where none, then the loss sum, then the tail values), the wall time
    /// since the rank was last ready, and the traffic so far.
    fn take_step(&mut self, device: &Device) -> (Vec<Tensor<1>>, Duration, Traffic) {
        let world = self.comm.world_size();
        let rank = self.comm.rank();
        let mut traffic = std::mem::take(&mut self.traffic);
        if self.micro_batches == 0 {
            // Nothing was added this step (share 0): contribute zeros.
            self.grads.iter_mut().for_each(|g| *g = None);
            self.loss_sum = None;
        }
        let mut count = self.local_samples as f32;
        if self.options.averaging == Averaging::PerRankMean && self.local_samples > 0 {
            // Each rank that has samples counts as one; gradient and loss become the rank's mean.
            let inv = 1.0 / count;
            for g in self.grads.iter_mut().flatten() {
                *g = g.clone().mul_scalar(inv);
            }
            self.loss_sum = self.loss_sum.take().map(|l| l.mul_scalar(inv));
            count = 1.0;
        }
        // Wall time since this rank was last ready: forward, backward, data and any waiting in
        // the caller's loop. This is what a slower device costs the step.
        let busy = self.ready_since.elapsed();
        let mut values = vec![0.0; 1 + TAIL_VALUES_PER_RANK * world];
        values[0] = count;
        values[1 + TAIL_VALUES_PER_RANK * rank] = busy.as_secs_f32();
        values[1 + TAIL_VALUES_PER_RANK * rank + 1] = self.local_samples as f32;
        values[1 + TAIL_VALUES_PER_RANK * rank + 2] = self.note;
        values[1 + TAIL_VALUES_PER_RANK * rank + 3] = self.ready_clock as f32;
        values[1 + TAIL_VALUES_PER_RANK * rank + 4] = self.last_all_reduce;
        traffic.to_device += byte_len(values.len());
        let mut pieces: Vec<Tensor<1>> = Vec::with_capacity(self.params.len() + 2);
        for (i, g) in self.grads.iter_mut().enumerate() {
            pieces.push(
                g.take()
                    .unwrap_or_else(|| Tensor::zeros([self.layout.tensor(i).len()], device)),
            );
        }
        pieces.push(self.loss_sum.take().unwrap_or_else(|| Tensor::zeros([1], device)));
        // The squared norm of this rank's shard of the reduced gradient, set by a sharded step.
        pieces.push(Tensor::zeros([1], device));
        let values_len = values.len();
        pieces.push(Tensor::from_data(TensorData::new(values, [values_len]), device));
        (pieces, busy, traffic)
    }

    /// Reads the reduced tail `t` (loss sum, global count, per-rank values) into the step's
    /// statistics and starts the next step. Returns the global sample count.
    fn conclude(
        &mut self,
        t: &[f32],
        busy: Duration,
        all_reduce: Duration,
        collectives: usize,
        buckets: usize,
        traffic: Traffic,
    ) -> Result<(f32, StepStats), Error> {
        let world = self.comm.world_size();
        let [loss_sum, count] = [t[0], t[2]];
        let per_rank = |r: usize, k: usize| t[3 + TAIL_VALUES_PER_RANK * r + k];
        if count <= 0.0 {
            return Err(Error::EmptyStep { step: self.step });
        }
        let rank_samples: Vec<usize> = (0..world).map(|r| per_rank(r, 1) as usize).collect();
        let stats = StepStats {
            step: self.step,
            local_samples: self.local_samples,
            micro_batches: self.micro_batches,
            global_samples: rank_samples.iter().sum(),
            overflow: false,
            loss_scale: self.scaler.map_or(1.0, |s| s.scale()),
            loss: f64::from(loss_sum) / f64::from(count),
            compute: busy,
            all_reduce,
            collectives,
            buckets,
            traffic,
            rank_compute: (0..world).map(|r| f64::from(per_rank(r, 0))).collect(),
            rank_samples,
            balancer: BalancerTail {
                notes: (0..world).map(|r| per_rank(r, 2)).collect(),
                started: (0..world).map(|r| f64::from(per_rank(r, 3))).collect(),
                prev_all_reduce: (0..world).map(|r| f64::from(per_rank(r, 4))).collect(),
            },
        };
        self.last_all_reduce = all_reduce.as_secs_f32();
        self.local_samples = 0;
        self.micro_batches = 0;
        self.note = 0.0;
        self.step += 1;
        self.mark_ready();
        Ok((count, stats))
    }

    /// All-gathers a checksum of every parameter's bits and fails if any rank differs.
    ///
    /// # Errors
    /// [`Error::ReplicasDiverged`] with every rank's checksum; collective errors.
    pub fn verify_replicas<M: Module>(&mut self, model: &M) -> Result<(), Error> {
        let mine = checksum(model);
        let all: Vec<u64> = self.comm.all_gather(&mine)?;
        if all.iter().any(|&c| c != all[0]) {
            return Err(Error::ReplicasDiverged { checksums: all });
        }
        Ok(())
    }
}

/// `t` times `scale`, without a kernel when the scale is one.
fn scaled(t: Tensor<1>, scale: f32) -> Tensor<1> {
    if scale == 1.0 {
        t
    } else {
        t.mul_scalar(scale)
    }
}

fn first_difference(a: &[(String, Vec<usize>)], b: &[(String, Vec<usize>)]) -> Option<String> {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            return Some(format!(
                "parameter #{i} is {} {:?} on rank 0 but {} {:?} there",
                x.0, x.1, y.0, y.1
            ));
        }
    }
    (a.len() != b.len()).then(|| format!("rank 0 has {} parameters, it has {}", a.len(), b.len()))
}
