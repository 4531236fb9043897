//! Data parallelism for any burn module, driven from the user's own loop.
//!
//! # A step
//!
//! ```text
//! for each micro-batch of this rank's share:      (no communication)
//!     loss = model.forward(micro_batch)
//!     ddp.backward(&model, loss, micro_batch_len)   // adds sample-weighted gradients to a host buffer
//! model = ddp.finish_step(model, &mut optim, lr)    // ONE fused all-reduce, divide once, update
//! ```
//!
//! `finish_step` sums, over all ranks, the gradient sums, the sample count and the loss sum in
//! one fused buffer (one collective per bucket, buckets in the same order everywhere), divides
//! the gradient by the global sample count and applies the optimizer. The result is the mean
//! gradient of the global batch: exactly what one device computes on the whole batch, up to the
//! order of f32 additions.
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
//! A rank whose share is 0 calls [`DataParallel::finish_step`] without any `backward`; it
//! contributes zeros and a count of 0, joins the all-reduce (no hang) and applies the same update.
//!
//! # Why not plain averaging
//!
//! Plain DDP divides every rank's gradient by its own batch and averages ranks equally. With
//! unequal shares that weights a sample on a small rank more than one on a big rank.
//! [`Averaging::PerRankMean`] reproduces that behaviour for comparison only.

use std::time::{Duration, Instant};

use burn::{
    module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId},
    optim::{GradientsParams, ModuleOptimizer},
    tensor::{Device, Gradients, Tensor, TensorData},
};

use ballast_collectives::{bucket::FusedBuffer, bucket::DEFAULT_BUCKET_CAP_BYTES, Communicator, CommunicatorExt};

/// Errors of data-parallel training.
#[derive(Debug, thiserror::Error)]
pub enum DdpError {
    /// A collective failed.
    #[error(transparent)]
    Collective(#[from] ballast_collectives::Error),
    /// Ranks hold different model structures.
    #[error(
        "rank {rank} holds a different model than rank 0: {detail}; every rank must build the same \
         model (same layers, sizes and order) before wrapping it"
    )]
    ModelMismatch {
        /// The first rank that differs from rank 0.
        rank: usize,
        /// The first difference.
        detail: String,
    },
    /// The host side of an offloaded optimizer could not be set up.
    #[error(transparent)]
    Offload(#[from] crate::offload::OffloadError),
    /// Replicas diverged (checked with [`DataParallel::verify_replicas`]).
    #[error("replicas diverged: parameter checksums by rank are {checksums:x?}")]
    Diverged {
        /// Each rank's checksum.
        checksums: Vec<u64>,
    },
    /// A step ended with no sample on any rank.
    #[error("step {step} had no samples on any rank; every step needs at least one sample")]
    EmptyStep {
        /// The step.
        step: u64,
    },
    /// A gradient could not be read back from burn.
    #[error("reading the gradient of parameter {path}: {message}")]
    Tensor {
        /// The parameter.
        path: String,
        /// burn's message.
        message: String,
    },
}

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
}

impl Default for DdpOptions {
    fn default() -> Self {
        Self {
            loss: LossReduction::Mean,
            averaging: Averaging::BySamples,
            bucket_cap_bytes: DEFAULT_BUCKET_CAP_BYTES,
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
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Wall time this rank spent between the previous step's end and this all-reduce.
    pub compute: Duration,
    /// Time in the all-reduce (includes waiting for slower ranks).
    pub all_reduce: Duration,
    /// Collectives this step ran, as the communicator counted them (one per bucket).
    pub collectives: usize,
    /// Every rank's compute seconds, indexed by rank.
    pub rank_compute: Vec<f64>,
    /// Every rank's samples, indexed by rank.
    pub rank_samples: Vec<usize>,
    /// Every rank's note (see [`DataParallel::set_note`]), indexed by rank.
    pub rank_notes: Vec<f32>,
    /// When every rank's compute began (the start of its `compute` interval), in seconds on its
    /// host's monotonic clock modulo [`START_CLOCK_PERIOD_S`], indexed by rank. Comparable only
    /// between ranks of one host, and only through [`start_offset`].
    pub rank_started: Vec<f64>,
}

/// One parameter as laid out in the fused buffer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParamSlot {
    /// Module path, e.g. `l1.weight`.
    pub path: String,
    /// Shape.
    pub dims: Vec<usize>,
    #[serde(skip, default = "ParamId::new")]
    id: ParamId,
}

/// The data-parallel wrapper: owns the communicator and the fused gradient buffer.
pub struct DataParallel {
    comm: Box<dyn Communicator>,
    options: DdpOptions,
    params: Vec<ParamSlot>,
    /// Gradient sums, then two trailing slots: sample count and loss sum.
    fused: FusedBuffer<f32>,
    local_samples: usize,
    micro_batches: usize,
    step: u64,
    note: f32,
    ready_since: Instant,
    ready_clock: f64,
}

/// Per-rank values carried in the tail of the fused buffer: compute seconds, samples, note, start
/// stamp.
const PER_RANK: usize = 4;

/// Period of the start stamps in [`StepStats::rank_started`]: small enough that an `f32` in the
/// all-reduce holds them to a few microseconds.
pub const START_CLOCK_PERIOD_S: f64 = 64.0;

/// `later − earlier` for two start stamps of ranks on one host (see
/// [`StepStats::rank_started`]), taken to lie within half a clock period.
pub fn start_offset(earlier: f64, later: f64) -> f64 {
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
    /// [`DdpError::ModelMismatch`] naming the first differing rank and parameter; collective
    /// errors.
    pub fn wrap<M: Module>(
        mut comm: Box<dyn Communicator>,
        model: M,
        options: DdpOptions,
    ) -> Result<(Self, M), DdpError> {
        let params = collect_params(&model);
        let structure: Vec<(String, Vec<usize>)> = params.iter().map(|p| (p.path.clone(), p.dims.clone())).collect();
        let all = comm.all_gather(&structure)?;
        for (rank, other) in all.iter().enumerate().skip(1) {
            if let Some(detail) = first_difference(&all[0], other) {
                return Err(DdpError::ModelMismatch { rank, detail });
            }
        }
        let mut lens: Vec<usize> = params.iter().map(|p| p.dims.iter().product()).collect();
        // Sample count, loss sum, then per rank: compute seconds, samples, note.
        lens.push(2 + PER_RANK * comm.world_size());
        let fused = FusedBuffer::new(&lens, options.bucket_cap_bytes)?;
        let mut ddp = Self {
            comm,
            options,
            params,
            fused,
            local_samples: 0,
            micro_batches: 0,
            step: 0,
            note: 0.0,
            ready_since: Instant::now(),
            ready_clock: host_clock(),
        };
        let mut flat = flatten_params(&model);
        ddp.comm.broadcast_f32(0, &mut flat)?;
        let model = load_params(model, &flat);
        ddp.verify_replicas(&model)?;
        Ok((ddp, model))
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
    /// to this rank's sums. No communication.
    ///
    /// # Errors
    /// [`DdpError::Tensor`] when a gradient cannot be read.
    pub fn backward<M: Module>(&mut self, model: &M, loss: Tensor<1>, samples: usize) -> Result<(), DdpError> {
        let loss_value: f32 = loss.clone().into_scalar();
        let grads = loss.backward();
        self.add_gradients(model, grads, loss_value, samples)
    }

    /// Adds the gradients of one micro-batch (already back-propagated by the caller, who may
    /// inspect memory or timing in between) to this rank's sums. No communication.
    ///
    /// # Errors
    /// [`DdpError::Tensor`] when a gradient cannot be read.
    pub fn add_gradients<M: Module>(
        &mut self,
        model: &M,
        grads: Gradients,
        loss_value: f32,
        samples: usize,
    ) -> Result<(), DdpError> {
        let scale = match self.options.loss {
            LossReduction::Mean => samples as f32,
            LossReduction::Sum => 1.0,
        };
        self.accumulate(model, grads, scale)?;
        let tail = self.fused.layout().num_tensors() - 1;
        let t = self.fused.tensor_mut(tail);
        if self.micro_batches == 0 {
            t.fill(0.0);
        }
        t[0] += samples as f32;
        t[1] += loss_value * scale;
        self.local_samples += samples;
        self.micro_batches += 1;
        Ok(())
    }

    /// Starts this rank's compute clock for the current step (by default it starts when the
    /// previous step ends). Call it when a step's real work begins.
    pub fn mark_ready(&mut self) {
        (self.ready_since, self.ready_clock) = (Instant::now(), host_clock());
    }

    /// A number this rank shares with all others in the next step's all-reduce (for example a
    /// micro-batch cap it had to lower); read it back in [`StepStats::rank_notes`].
    pub fn set_note(&mut self, note: f32) {
        self.note = note;
    }

    fn accumulate<M: Module>(&mut self, model: &M, mut grads: Gradients, scale: f32) -> Result<(), DdpError> {
        struct Reader<'a> {
            grads: &'a mut Gradients,
            fused: &'a mut FusedBuffer<f32>,
            params: &'a [ParamSlot],
            index: usize,
            scale: f32,
            first: bool,
            error: Option<DdpError>,
        }
        impl ModuleVisitor for Reader<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let i = self.index;
                self.index += 1;
                if self.error.is_some() {
                    return;
                }
                let grad = if param.is_require_grad() {
                    param.val().grad_remove(self.grads)
                } else {
                    None
                };
                let Some(grad) = grad else {
                    if self.first {
                        self.fused.tensor_mut(i).fill(0.0);
                    }
                    return;
                };
                let data = grad.into_data();
                match data.as_slice::<f32>() {
                    Ok(values) => {
                        let acc = self.fused.tensor_mut(i);
                        // The first micro-batch of a step overwrites (the buffer is not zeroed
                        // between steps: that would be one more pass over every gradient).
                        match (self.first, self.scale == 1.0) {
                            (true, true) => acc.copy_from_slice(values),
                            (true, false) => acc.iter_mut().zip(values).for_each(|(a, g)| *a = g * self.scale),
                            (false, true) => acc.iter_mut().zip(values).for_each(|(a, g)| *a += g),
                            (false, false) => acc.iter_mut().zip(values).for_each(|(a, g)| *a += g * self.scale),
                        }
                    }
                    Err(e) => {
                        self.error = Some(DdpError::Tensor {
                            path: self.params[i].path.clone(),
                            message: format!("{e:?}"),
                        })
                    }
                }
            }
        }
        let mut reader = Reader {
            grads: &mut grads,
            fused: &mut self.fused,
            params: &self.params,
            index: 0,
            scale,
            first: self.micro_batches == 0,
            error: None,
        };
        model.visit(&mut reader);
        match reader.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sums gradients, sample counts and losses over ranks in one fused all-reduce, divides once
    /// by the global sample count and applies `optim`. Every rank must call it once per step,
    /// including ranks that processed no sample.
    ///
    /// # Errors
    /// Collective errors; [`DdpError::EmptyStep`] when no rank processed a sample.
    pub fn finish_step<M: Module>(
        &mut self,
        model: M,
        optim: &mut ModuleOptimizer,
        lr: f64,
    ) -> Result<(M, StepStats), DdpError> {
        let (count, stats) = self.reduce()?;
        let device = model_device(&model);
        let mut grads = GradientsParams::new();
        for (i, slot) in self.params.iter().enumerate() {
            let mean: Vec<f32> = self.fused.tensor(i).iter().map(|g| g / count).collect();
            register(&mut grads, slot, mean, &device);
        }
        let model = optim.step(lr, model, grads);
        Ok((model, stats))
    }

    /// As [`DataParallel::finish_step`], but the optimizer runs on the host: `host` holds the
    /// master parameters and Adam moments, takes the averaged gradient straight from the fused
    /// buffer, and the updated parameters are loaded back into `model`.
    ///
    /// # Errors
    /// As [`DataParallel::finish_step`].
    pub fn finish_step_offloaded<M: Module>(
        &mut self,
        model: M,
        host: &mut crate::offload::HostOffload,
        lr: f64,
    ) -> Result<(M, StepStats), DdpError> {
        let (count, stats) = self.reduce()?;
        let n: usize = (0..self.params.len()).map(|i| self.fused.tensor(i).len()).sum();
        let grads = &mut self.fused.as_mut_slice()[..n];
        grads.iter_mut().for_each(|g| *g /= count);
        let params = host.step(grads, lr as f32);
        Ok((load_params(model, params), stats))
    }

    /// The all-reduce of a step and its bookkeeping; leaves the gradient sums in the buffer and
    /// returns the global sample count (the divisor).
    fn reduce(&mut self) -> Result<(f32, StepStats), DdpError> {
        let tail = self.fused.layout().num_tensors() - 1;
        let world = self.comm.world_size();
        let rank = self.comm.rank();
        if self.micro_batches == 0 {
            // Nothing was written this step (share 0): contribute zeros.
            self.fused.zero();
        }
        if self.options.averaging == Averaging::PerRankMean && self.local_samples > 0 {
            let n = self.local_samples as f32;
            for i in 0..tail {
                self.fused.tensor_mut(i).iter_mut().for_each(|g| *g /= n);
            }
            // Each rank that has samples counts as one; the loss becomes the rank's mean.
            let t = self.fused.tensor_mut(tail);
            t[0] = 1.0;
            t[1] /= n;
        }
        // Wall time since this rank was last ready: forward, backward, data and any waiting in
        // the caller's loop. This is what a slower device costs the step.
        let busy = self.ready_since.elapsed();
        {
            let t = self.fused.tensor_mut(tail);
            t[2..].fill(0.0);
            t[2 + PER_RANK * rank] = busy.as_secs_f32();
            t[2 + PER_RANK * rank + 1] = self.local_samples as f32;
            t[2 + PER_RANK * rank + 2] = self.note;
            t[2 + PER_RANK * rank + 3] = self.ready_clock as f32;
        }
        let started = Instant::now();
        let before = self.comm.collectives_started();
        self.fused.all_reduce_sum(self.comm.as_mut())?;
        let all_reduce = started.elapsed();
        let collectives = (self.comm.collectives_started() - before) as usize;
        let t = self.fused.tensor(tail);
        let [count, loss_sum] = [t[0], t[1]];
        let rank_compute: Vec<f64> = (0..world).map(|r| f64::from(t[2 + PER_RANK * r])).collect();
        let rank_samples: Vec<usize> = (0..world).map(|r| t[2 + PER_RANK * r + 1] as usize).collect();
        let rank_notes: Vec<f32> = (0..world).map(|r| t[2 + PER_RANK * r + 2]).collect();
        let rank_started: Vec<f64> = (0..world).map(|r| f64::from(t[2 + PER_RANK * r + 3])).collect();
        if count <= 0.0 {
            return Err(DdpError::EmptyStep { step: self.step });
        }
        let stats = StepStats {
            step: self.step,
            local_samples: self.local_samples,
            micro_batches: self.micro_batches,
            global_samples: rank_samples.iter().sum(),
            loss: f64::from(loss_sum) / f64::from(count),
            compute: busy,
            all_reduce,
            collectives,
            rank_compute,
            rank_samples,
            rank_notes,
            rank_started,
        };
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
    /// [`DdpError::Diverged`] with every rank's checksum; collective errors.
    pub fn verify_replicas<M: Module>(&mut self, model: &M) -> Result<(), DdpError> {
        let mine = checksum(model);
        let all: Vec<u64> = self.comm.all_gather(&mine)?;
        if all.iter().any(|&c| c != all[0]) {
            return Err(DdpError::Diverged { checksums: all });
        }
        Ok(())
    }
}

fn register(grads: &mut GradientsParams, slot: &ParamSlot, values: Vec<f32>, device: &Device) {
    macro_rules! by_rank {
        ($($d:literal)*) => {
            match slot.dims.len() {
                $($d => grads.register::<$d>(slot.id, Tensor::<$d>::from_data(TensorData::new(values, slot.dims.clone()), device)),)*
                n => panic!("parameters of rank {n} are not supported (1 to 6 are)"),
            }
        };
    }
    by_rank!(1 2 3 4 5 6);
}

/// The inner (non-autodiff) device the model's gradients live on.
fn model_device<M: Module>(model: &M) -> Device {
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

/// The float parameters of `model` in visiting order, with their paths.
pub fn collect_params<M: Module>(model: &M) -> Vec<ParamSlot> {
    struct Collect {
        path: Vec<String>,
        out: Vec<ParamSlot>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out.push(ParamSlot {
                path: self
                    .path
                    .iter()
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("."),
                dims: param.lazy_shape().dims::<D>().to_vec(),
                id: param.id,
            });
        }
    }
    let mut c = Collect {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut c);
    c.out
}

/// Every float parameter's values, concatenated in visiting order.
pub fn flatten_params<M: Module>(model: &M) -> Vec<f32> {
    struct Flatten(Vec<f32>);
    impl ModuleVisitor for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data();
            self.0.extend(data.iter::<f32>());
        }
    }
    let mut f = Flatten(Vec::new());
    model.visit(&mut f);
    f.0
}

/// Per-parameter values in visiting order.
pub fn param_values<M: Module>(model: &M) -> Vec<Vec<f32>> {
    struct Each(Vec<Vec<f32>>);
    impl ModuleVisitor for Each {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().into_data().iter::<f32>().collect());
        }
    }
    let mut e = Each(Vec::new());
    model.visit(&mut e);
    e.0
}

/// Replaces every float parameter with the next values of `flat` (as from [`flatten_params`]).
///
/// # Panics
/// If `flat` is shorter than the model's parameters.
pub fn load_params<M: Module>(model: M, flat: &[f32]) -> M {
    struct Load<'a> {
        flat: &'a [f32],
        offset: usize,
    }
    impl ModuleMapper for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dims: Vec<usize> = param.lazy_shape().dims::<D>().to_vec();
            let n: usize = dims.iter().product();
            let values = self.flat[self.offset..self.offset + n].to_vec();
            self.offset += n;
            param.map(|t| {
                let require_grad = t.is_require_grad();
                let device = t.device();
                Tensor::<D>::from_data(TensorData::new(values, dims), &device).set_require_grad(require_grad)
            })
        }
    }
    model.map(&mut Load { flat, offset: 0 })
}

/// FNV-1a over the bits of every parameter, in visiting order.
pub fn checksum<M: Module>(model: &M) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in flatten_params(model) {
        for b in v.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
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
