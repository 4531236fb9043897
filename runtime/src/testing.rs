//! Small models, synthetic data and the equivalence harness used by ballast's tests, selftests
//! and benchmarks.
//!
//! The harness answers one question: does data-parallel training over unequal shares produce
//! the same model as one device training on the whole batch? [`run_ddp`] trains on any
//! communicator; [`run_reference`] trains the same model from the same initial parameters with a
//! plain burn loop; [`compare`] reports the largest per-tensor relative difference.

pub mod device_only;
pub mod fault;
pub mod launch;
pub mod overhead;

use burn::{
    module::{Module, ModuleVisitor, Param},
    nn::{
        conv::{Conv2d, Conv2dConfig},
        loss::{MseLoss, Reduction},
        Linear, LinearConfig, PaddingConfig2d, Relu,
    },
    optim::{AdamConfig, GradientsParams, ModuleOptimizer, SgdConfig},
    tensor::{Device, FloatDType, Tensor, TensorData},
};

use ballast_balancer::RankPlan;
use ballast_collectives::{Communicator, CommunicatorExt};

use crate::Error;
use crate::{
    ddp::{cast_params, Averaging, DataParallel, DdpOptions, Precision},
    device::DeviceChoice,
    params::{flatten_params, load_params, param_values},
    GlobalSampler,
};

/// Per-rank values in the tail of a step's all-reduce (compute seconds, samples, note, start
/// stamp, previous all-reduce seconds), after the loss sum, the squared norm and the sample
/// count: what the data-plane tests count in the bytes a step moves.
pub const TAIL_VALUES_PER_RANK: usize = crate::ddp::TAIL_VALUES_PER_RANK;

/// Input features per sample.
pub const FEATURES: usize = 16;
/// Regression targets per sample.
pub const TARGETS: usize = 4;

/// A model that maps `[batch, FEATURES]` to `[batch, TARGETS]`.
pub trait Regressor: Module + Sized {
    /// Builds the model on `device` (parameters are initialised lazily, randomly).
    fn init(device: &Device) -> Self;
    /// The forward pass.
    fn forward(&self, x: Tensor<2>) -> Tensor<2>;
}

/// Two-layer perceptron.
#[derive(Module, Debug)]
pub struct Mlp {
    l1: Linear,
    act: Relu,
    l2: Linear,
}

impl Regressor for Mlp {
    fn init(device: &Device) -> Self {
        Self {
            l1: LinearConfig::new(FEATURES, 32).init(device),
            act: Relu::new(),
            l2: LinearConfig::new(32, TARGETS).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.l2.forward(self.act.forward(self.l1.forward(x)))
    }
}

/// A small convolutional net: the 16 features as a 4×4 image, two 3×3 convolutions, a head.
#[derive(Module, Debug)]
pub struct ConvNet {
    c1: Conv2d,
    c2: Conv2d,
    act: Relu,
    head: Linear,
}

impl Regressor for ConvNet {
    fn init(device: &Device) -> Self {
        Self {
            c1: Conv2dConfig::new([1, 4], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device),
            c2: Conv2dConfig::new([4, 4], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device),
            act: Relu::new(),
            head: LinearConfig::new(4 * FEATURES, TARGETS).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, _] = x.dims();
        let img: Tensor<4> = x.reshape([n, 1, 4, 4]);
        let h = self.act.forward(self.c1.forward(img));
        let h = self.act.forward(self.c2.forward(h));
        self.head.forward(h.reshape([n, 4 * FEATURES]))
    }
}

/// Inputs of [`WideMlp`].
pub const WIDE_FEATURES: usize = 256;

/// A wider perceptron (256 → width → width → 4) whose compute dominates a step, for the
/// balancer's measurements and benchmarks.
#[derive(Module, Debug)]
pub struct WideMlp {
    a: Linear,
    b: Linear,
    c: Linear,
    act: Relu,
}

impl WideMlp {
    /// A model with hidden width `width`.
    pub fn with_width(width: usize, device: &Device) -> Self {
        Self {
            a: LinearConfig::new(WIDE_FEATURES, width).init(device),
            b: LinearConfig::new(width, width).init(device),
            c: LinearConfig::new(width, TARGETS).init(device),
            act: Relu::new(),
        }
    }
}

impl Regressor for WideMlp {
    fn init(device: &Device) -> Self {
        Self::with_width(256, device)
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = self.act.forward(self.a.forward(x));
        let h = self.act.forward(self.b.forward(h));
        self.c.forward(h)
    }
}

/// Side of the square single-channel images of [`ImageConvNet`].
pub const IMAGE_SIDE: usize = 32;

/// A convolutional regressor on 32×32 images (two 3×3 convolutions of `channels` channels,
/// 4×4 average pooling, a linear head). Few parameters, large activations per sample: the
/// memory profile of vision models, where the micro-batch cap binds.
#[derive(Module, Debug)]
pub struct ImageConvNet {
    c1: Conv2d,
    c2: Conv2d,
    pool: burn::nn::pool::AvgPool2d,
    act: Relu,
    head: Linear,
}

impl ImageConvNet {
    /// A model with `channels` channels.
    pub fn with_channels(channels: usize, device: &Device) -> Self {
        let side = IMAGE_SIDE / 4;
        Self {
            c1: Conv2dConfig::new([1, channels], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device),
            c2: Conv2dConfig::new([channels, channels], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device),
            pool: burn::nn::pool::AvgPool2dConfig::new([4, 4]).with_strides([4, 4]).init(),
            act: Relu::new(),
            head: LinearConfig::new(channels * side * side, TARGETS).init(device),
        }
    }
}

impl Regressor for ImageConvNet {
    fn init(device: &Device) -> Self {
        Self::with_channels(8, device)
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, _] = x.dims();
        let img: Tensor<4> = x.reshape([n, 1, IMAGE_SIDE, IMAGE_SIDE]);
        let h = self.act.forward(self.c1.forward(img));
        let h = self.pool.forward(self.act.forward(self.c2.forward(h)));
        let [_, c, hh, ww] = h.dims();
        self.head.forward(h.reshape([n, c * hh * ww]))
    }
}

/// A deterministic regression dataset: the same on every rank for the same seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSet {
    x: Vec<f32>,
    y: Vec<f32>,
    len: usize,
    features: usize,
    targets: usize,
}

impl SyntheticSet {
    /// `len` samples of [`FEATURES`] inputs and [`TARGETS`] targets generated from `seed`.
    pub fn new(len: usize, seed: u64) -> Self {
        Self::with_dims(len, FEATURES, TARGETS, seed)
    }

    /// `len` samples of `features` inputs and `targets` targets generated from `seed`.
    pub fn with_dims(len: usize, features: usize, targets: usize, seed: u64) -> Self {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..len * features).map(|_| next()).collect();
        let mut y = Vec::with_capacity(len * targets);
        for s in 0..len {
            let row = &x[s * features..(s + 1) * features];
            for t in 0..targets {
                let v: f32 = row.iter().skip(t).step_by(targets).map(|a| a * a - 0.3 * a).sum();
                y.push(v.sin() + 0.05 * next());
            }
        }
        Self {
            x,
            y,
            len,
            features,
            targets,
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The inputs and targets of `indices` as tensors on `device`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> (Tensor<2>, Tensor<2>) {
        let (f, t) = (self.features, self.targets);
        let mut xs = Vec::with_capacity(indices.len() * f);
        let mut ys = Vec::with_capacity(indices.len() * t);
        for &i in indices {
            xs.extend_from_slice(&self.x[i * f..(i + 1) * f]);
            ys.extend_from_slice(&self.y[i * t..(i + 1) * t]);
        }
        (
            Tensor::from_data(TensorData::new(xs, [indices.len(), f]), device),
            Tensor::from_data(TensorData::new(ys, [indices.len(), t]), device),
        )
    }
}

/// Which model a case trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// [`Mlp`].
    Mlp,
    /// [`ConvNet`].
    Conv,
}

/// Which optimizer a case uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimKind {
    /// Plain SGD.
    Sgd,
    /// Adam with burn's defaults.
    Adam,
}

impl OptimKind {
    fn init(self, weight_decay: f32) -> ModuleOptimizer {
        let decay = (weight_decay != 0.0).then(|| burn::optim::decay::WeightDecayConfig::new(weight_decay));
        match self {
            OptimKind::Sgd => SgdConfig::new().with_weight_decay(decay).init(),
            OptimKind::Adam => AdamConfig::new().with_weight_decay(decay).init(),
        }
    }

    /// Learning rate used with this optimizer.
    pub fn lr(self) -> f64 {
        match self {
            OptimKind::Sgd => 0.05,
            OptimKind::Adam => 0.005,
        }
    }

    /// The acceptance bound on per-tensor relative parameter difference.
    pub fn tolerance(self) -> f64 {
        match self {
            OptimKind::Sgd => 1e-6,
            // Adam divides by sqrt(v): tiny differences in small gradients are amplified.
            OptimKind::Adam => 1e-4,
        }
    }
}

/// One equivalence case.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// The model.
    pub model: ModelKind,
    /// The optimizer.
    pub optim: OptimKind,
    /// Samples per rank per step (sum = global batch).
    pub shares: Vec<usize>,
    /// Micro-batch cap per rank.
    pub caps: Vec<usize>,
    /// Optimizer steps.
    pub steps: u64,
    /// How ranks are combined.
    pub averaging: Averaging,
    /// Dataset length (not a multiple of the batch, so epochs end in a partial batch).
    pub dataset_len: usize,
    /// Seed of data and sampler.
    pub seed: u64,
    /// Run the optimizer on the host ([`crate::optim::offload::HostOffload`]) instead of burn's
    /// (Adam only; weight decay from [`Case::weight_decay`]).
    pub offload: bool,
    /// L2 weight decay for Adam (0 = none).
    pub weight_decay: f32,
    /// Each rank's device (see [`DeviceChoice::for_rank`]); empty: `flex` everywhere.
    pub devices: Vec<DeviceChoice>,
    /// A bucket cap small enough to cut the gradients into several buckets (`None`: the
    /// default cap, one bucket for these models); such a case also checks that the step still
    /// ran one collective.
    pub bucket_cap_bytes: Option<usize>,
    /// Shard the optimizer state over the ranks in proportion to these weights (one per rank;
    /// [`crate::optim::sharded::ShardedAdam`], Adam only, weight decay from [`Case::weight_decay`]);
    /// empty: every rank holds the whole state.
    pub shards: Vec<f64>,
    /// Ranks that keep their shard of the optimizer state in host memory (the host Adam)
    /// instead of on their device; the others keep it on the device.
    pub host_shards: Vec<usize>,
    /// Replace the model's random initial parameters with values drawn from this seed (uniform
    /// in ±0.25) before the first broadcast, so that separate runs start from the same point;
    /// `None`: burn's random initialisation, which differs from run to run.
    pub init_seed: Option<u64>,
    /// The float type the replicas compute in ([`crate::DdpOptions::with_precision`]); the
    /// reference runs the same recipe on one device.
    pub precision: Precision,
}

impl Case {
    /// The standard case: 20 steps of a batch given by `shares`, on 60 samples.
    pub fn new(model: ModelKind, optim: OptimKind, shares: &[usize], caps: &[usize]) -> Self {
        Self {
            model,
            optim,
            shares: shares.to_vec(),
            caps: caps.to_vec(),
            steps: 20,
            averaging: Averaging::BySamples,
            dataset_len: 60,
            seed: 7,
            offload: false,
            weight_decay: 0.0,
            devices: Vec::new(),
            bucket_cap_bytes: None,
            shards: Vec::new(),
            host_shards: Vec::new(),
            init_seed: None,
            precision: Precision::F32,
        }
    }

    /// The acceptance bound on per-tensor relative parameter difference: the optimizer's, or
    /// 1e-5 where ballast's host Adam replaces burn's (offloaded or sharded state).
    pub fn tolerance(&self) -> f64 {
        if self.offload || !self.shards.is_empty() {
            1e-5
        } else {
            self.optim.tolerance()
        }
    }

    /// Collectives each step runs: one fused all-reduce, or with sharded state the tail's
    /// all-reduce, the gradients' reduce-scatter and the parameters' all-gather.
    pub fn collectives_per_step(&self) -> usize {
        if self.shards.is_empty() {
            1
        } else {
            3
        }
    }

    /// The case with each rank on `devices` (one entry: every rank).
    pub fn on(mut self, devices: &[DeviceChoice]) -> Self {
        self.devices = devices.to_vec();
        self
    }

    /// Whether ranks run on different backends (their optimizer kernels may round differently).
    pub fn mixed(&self) -> bool {
        let world = self.shares.len();
        (1..world).any(|r| DeviceChoice::for_rank(&self.devices, r) != DeviceChoice::for_rank(&self.devices, 0))
    }

    /// Whether the replicas must end bit-identical: on one backend, or with the optimizer state
    /// sharded (each parameter is updated once and its bits reach every rank through the
    /// all-gather, whatever device computed them). Otherwise they are compared within a
    /// tolerance.
    pub fn replicas_bitwise(&self) -> bool {
        !self.mixed() || !self.shards.is_empty()
    }

    /// Global batch.
    pub fn global_batch(&self) -> usize {
        self.shares.iter().sum()
    }

    /// Short label for reports.
    pub fn label(&self) -> String {
        let mut label = format!(
            "{:?}/{:?}/shares {:?}/caps {:?}/{:?}",
            self.model, self.optim, self.shares, self.caps, self.averaging
        );
        if !self.devices.is_empty() {
            let devices: Vec<String> = self.devices.iter().map(ToString::to_string).collect();
            label.push_str(&format!("/on {}", devices.join(",")));
        }
        if let Some(cap) = self.bucket_cap_bytes {
            label.push_str(&format!("/buckets of {cap} B"));
        }
        if !self.shards.is_empty() {
            label.push_str(&format!("/sharded {:?}", self.shards));
        }
        if !self.host_shards.is_empty() {
            label.push_str(&format!("/host shards {:?}", self.host_shards));
        }
        if self.offload {
            label.push_str("/offloaded");
        }
        if self.weight_decay != 0.0 {
            label.push_str(&format!("/decay {}", self.weight_decay));
        }
        if self.precision.is_mixed() {
            label.push_str(&format!("/{}", self.precision));
        }
        label
    }
}

/// What a training run ends with.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Final parameters, per tensor.
    pub params: Vec<Vec<f32>>,
    /// Mean loss of each step's global batch.
    pub losses: Vec<f64>,
    /// Parameters after the initial broadcast.
    pub initial: Vec<f32>,
    /// Micro-batches this rank ran per step.
    pub micro_batches: Vec<usize>,
    /// Collective calls per step.
    pub collectives: Vec<usize>,
    /// Buckets reduced per step.
    pub buckets: Vec<usize>,
    /// Bytes copied between this rank's device and its host per step.
    pub traffic: Vec<crate::ddp::Traffic>,
    /// Largest relative difference `‖p_r − p_0‖ / ‖p_0‖` of any rank's final parameters from
    /// rank 0's: 0 when the replicas were verified bit-identical (every case on one backend).
    pub replica_rel: f64,
    /// The final f32 master parameters of a mixed-precision run, flat; empty in f32, where
    /// [`Outcome::params`] are the master.
    pub master: Vec<f32>,
}

/// Trains `case` data-parallel on `comm` (whose world size must equal the number of shares).
/// Returns the outcome and the communicator for further cases.
///
/// # Errors
/// Any [`Error`], including divergence of replicas at the end.
pub fn run_ddp(comm: Box<dyn Communicator>, case: &Case) -> Result<(Outcome, Box<dyn Communicator>), Error> {
    match case.model {
        ModelKind::Mlp => run_ddp_with::<Mlp>(comm, case),
        ModelKind::Conv => run_ddp_with::<ConvNet>(comm, case),
    }
}

fn run_ddp_with<M: Regressor>(
    comm: Box<dyn Communicator>,
    case: &Case,
) -> Result<(Outcome, Box<dyn Communicator>), Error> {
    let rank = comm.rank();
    let device = DeviceChoice::for_rank(&case.devices, rank).device(0)?.autodiff();
    let data = SyntheticSet::new(case.dataset_len, case.seed);
    let mut options = DdpOptions::default()
        .with_averaging(case.averaging)
        .with_precision(case.precision);
    let dtype = case.precision.compute_dtype();
    if let Some(cap) = case.bucket_cap_bytes {
        options = options.with_bucket_cap_bytes(cap);
    }
    let mut model = M::init(&device);
    if let Some(seed) = case.init_seed {
        let values = seeded_values(flatten_params(&model).len(), seed);
        model = load_params(model, &values);
    }
    let (mut ddp, mut model) = DataParallel::wrap(comm, model, options)?;
    // The f32 values the run starts from: the master copy in a mixed precision.
    let initial = match ddp.master_params()? {
        Some(master) => master,
        None => flatten_params(&model),
    };
    let mut optim = case.optim.init(case.weight_decay);
    let config = crate::optim::HostAdamConfig {
        weight_decay: case.weight_decay,
        ..Default::default()
    };
    // A rank on a CUDA device keeps its offloaded state in managed memory, updated by the GPU.
    let gpu = match DeviceChoice::for_rank(&case.devices, rank) {
        DeviceChoice::Cuda(index) => Some(index.unwrap_or(0)),
        _ => None,
    };
    let mut host = if case.offload {
        Some(crate::optim::offload::HostOffload::for_device(
            &model,
            config,
            std::path::Path::new("/"),
            gpu,
        )?)
    } else {
        None
    };
    let mut sharded = if case.shards.is_empty() {
        None
    } else {
        let counts = crate::optim::sharded::shard_counts(initial.len(), &case.shards)?;
        let place = if case.host_shards.contains(&rank) {
            crate::optim::sharded::ShardPlace::Host
        } else {
            crate::optim::sharded::ShardPlace::Device
        };
        Some(crate::optim::sharded::ShardedAdam::new(
            &model, rank, counts, config, place,
        )?)
    };
    let sampler = GlobalSampler::new(data.len(), case.global_batch(), case.seed).expect("non-empty case");
    let mut outcome = Outcome {
        params: Vec::new(),
        losses: Vec::new(),
        initial,
        micro_batches: Vec::new(),
        collectives: Vec::new(),
        buckets: Vec::new(),
        traffic: Vec::new(),
        replica_rel: 0.0,
        master: Vec::new(),
    };
    for step in 0..case.steps {
        let batch = sampler.batch(step);
        let mine = &sampler.split(&batch, &case.shares)[rank];
        let plan = RankPlan::new(mine.len(), case.caps[rank]).expect("cap >= 1");
        let mut offset = 0;
        for m in plan.micro_batches() {
            let (x, y) = data.batch(&mine[offset..offset + m], &device);
            offset += m;
            let loss = MseLoss::new().forward(model.forward(x.cast(dtype)), y.cast(dtype), Reduction::Mean);
            ddp.backward(&model, loss, m)?;
        }
        let (next, stats) = match (host.as_mut(), sharded.as_mut()) {
            (Some(h), _) => ddp.step(model, h, case.optim.lr())?,
            (None, Some(shard)) => ddp.step(model, shard, case.optim.lr())?,
            (None, None) => ddp.step(model, &mut optim, case.optim.lr())?,
        };
        model = next;
        outcome.losses.push(stats.loss);
        outcome.micro_batches.push(stats.micro_batches);
        outcome.collectives.push(stats.collectives);
        outcome.buckets.push(stats.buckets);
        outcome.traffic.push(stats.traffic);
    }
    if !case.replicas_bitwise() {
        let all: Vec<Vec<f32>> = ddp.comm().all_gather(&flatten_params(&model))?;
        outcome.replica_rel = all.iter().map(|p| relative_difference(p, &all[0])).fold(0.0, f64::max);
    } else {
        ddp.verify_replicas(&model)?;
    }
    outcome.params = param_values(&model);
    outcome.master = match (
        &sharded,
        host.as_ref().and_then(crate::optim::offload::HostOffload::master),
    ) {
        // Each rank holds its shard of the master: all of them, in rank order, are the model's.
        (Some(shard), _) if case.precision.is_mixed() => ddp.comm().all_gather(&shard.master_shard()?)?.concat(),
        // The host Adam took the whole master over.
        (_, Some(master)) => master.to_vec(),
        _ => ddp.master_params()?.unwrap_or_default(),
    };
    Ok((outcome, ddp.into_comm()))
}

/// `len` values uniform in ±0.25 from `seed` (SplitMix64), the same on every machine.
fn seeded_values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
        })
        .collect()
}

/// Trains `case` on one device (rank 0's) with the whole global batch per step, from `initial`
/// parameters, with a plain burn loop (no ballast code in the step but the parameter cast). In a
/// mixed [`Precision`] it runs the recipe by hand: the f32 master cast to the compute type,
/// forward and backward in it on the whole batch, the gradients cast to f32, and burn's optimizer
/// on the f32 master.
///
/// # Panics
/// When rank 0's device is not built into this binary (the DDP run fails first).
pub fn run_reference(case: &Case, initial: &[f32]) -> Outcome {
    match case.model {
        ModelKind::Mlp => run_reference_with::<Mlp>(case, initial),
        ModelKind::Conv => run_reference_with::<ConvNet>(case, initial),
    }
}

fn run_reference_with<M: Regressor>(case: &Case, initial: &[f32]) -> Outcome {
    let device = DeviceChoice::for_rank(&case.devices, 0)
        .device(0)
        .unwrap_or_else(|e| panic!("{e}"))
        .autodiff();
    let data = SyntheticSet::new(case.dataset_len, case.seed);
    let dtype = case.precision.compute_dtype();
    let mut master = load_params(M::init(&device), initial);
    let mut optim = case.optim.init(case.weight_decay);
    let sampler = GlobalSampler::new(data.len(), case.global_batch(), case.seed).expect("non-empty case");
    let mut losses = Vec::new();
    for step in 0..case.steps {
        let model = cast_params(master.clone(), dtype);
        let (x, y) = data.batch(&sampler.batch(step), &device);
        let loss = MseLoss::new().forward(model.forward(x.cast(dtype)), y.cast(dtype), Reduction::Mean);
        losses.push(f64::from(loss.clone().cast(FloatDType::F32).into_scalar::<f32>()));
        let grads = grads_in_f32(GradientsParams::from_grads(loss.backward(), &model), &model);
        master = optim.step(case.optim.lr(), master, grads);
    }
    let model = cast_params(master.clone(), dtype);
    Outcome {
        master: if case.precision.is_mixed() {
            flatten_params(&master)
        } else {
            Vec::new()
        },
        params: param_values(&model),
        losses,
        initial: initial.to_vec(),
        micro_batches: vec![1; case.steps as usize],
        collectives: vec![0; case.steps as usize],
        buckets: vec![0; case.steps as usize],
        traffic: vec![crate::ddp::Traffic::default(); case.steps as usize],
        replica_rel: 0.0,
    }
}

/// `grads` with every gradient of `model`'s parameters cast to f32.
fn grads_in_f32<M: Module>(mut grads: GradientsParams, model: &M) -> GradientsParams {
    struct ToF32<'a>(&'a mut GradientsParams);
    impl ModuleVisitor for ToF32<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.remove::<D>(param.id) {
                self.0.register(param.id, g.cast(FloatDType::F32));
            }
        }
    }
    model.visit(&mut ToF32(&mut grads));
    grads
}

/// Largest per-tensor relative difference `‖a − b‖ / ‖b‖` of the parameters, and the largest
/// relative difference of the per-step losses.
pub fn compare(a: &Outcome, b: &Outcome) -> (f64, f64) {
    let params = a
        .params
        .iter()
        .zip(&b.params)
        .map(|(x, y)| relative_difference(x, y))
        .fold(0.0, f64::max);
    let losses = a
        .losses
        .iter()
        .zip(&b.losses)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-12))
        .fold(0.0, f64::max);
    (params, losses)
}

/// How far replicas on different backends may drift apart in a case (relative to rank 0's
/// parameters): they receive the same reduced gradient bits, but each backend's optimizer
/// kernels round in their own way.
pub const MIXED_REPLICA_TOLERANCE: f64 = 1e-6;

/// `‖x − y‖ / ‖y‖`.
pub fn relative_difference(x: &[f32], y: &[f32]) -> f64 {
    let diff: f64 = x
        .iter()
        .zip(y)
        .map(|(p, q)| f64::from(p - q).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = y.iter().map(|q| f64::from(*q).powi(2)).sum::<f64>().sqrt();
    diff / norm.max(f64::MIN_POSITIVE)
}

/// The equivalence cases of the DDP issue on `devices` (one per rank, or one for all): both
/// models, both optimizers, shares 5/2/1 and 8/0/0 with caps 3/2/1 (on three ranks), or the
/// whole batch of 8 in micro-batches of 3 (on one), 20 steps each.
pub fn device_cases(world: usize, devices: &[DeviceChoice]) -> Vec<Case> {
    let layouts: Vec<(Vec<usize>, Vec<usize>)> = if world == 1 {
        vec![(vec![8], vec![3])]
    } else {
        vec![(vec![5, 2, 1], vec![3, 2, 1]), (vec![8, 0, 0], vec![3, 2, 1])]
    };
    let mut cases = Vec::new();
    for model in [ModelKind::Mlp, ModelKind::Conv] {
        for optim in [OptimKind::Sgd, OptimKind::Adam] {
            for (shares, caps) in &layouts {
                cases.push(Case::new(model, optim, shares, caps).on(devices));
            }
        }
    }
    cases
}

/// The equivalence matrix of the DDP issue for three ranks: both models, both optimizers,
/// shares 5/2/1, 3/3/2 and 8/0/0 with caps 3/2/1, plus the unweighted-averaging counter-examples.
pub fn three_rank_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for model in [ModelKind::Mlp, ModelKind::Conv] {
        for optim in [OptimKind::Sgd, OptimKind::Adam] {
            for shares in [[5, 2, 1], [3, 3, 2], [8, 0, 0]] {
                cases.push(Case::new(model, optim, &shares, &[3, 2, 1]));
            }
        }
        let mut plain = Case::new(model, OptimKind::Sgd, &[5, 2, 1], &[3, 2, 1]);
        plain.averaging = Averaging::PerRankMean;
        cases.push(plain);
    }
    // Gradients in buckets of 64 values, reduced together as one collective per step.
    let mut bucketed = Case::new(ModelKind::Mlp, OptimKind::Adam, &[5, 2, 1], &[3, 2, 1]);
    bucketed.bucket_cap_bytes = Some(256);
    cases.push(bucketed);
    cases
}

/// The sharded-optimizer cases for three ranks: Adam on both models, with and without weight
/// decay, the state sharded 60/30/10 % and 70/30/0 % (a rank without a shard) on the devices,
/// and 60/30/10 % with rank 1's shard in host memory; shares 5/2/1, 50 steps each.
pub fn sharded_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for model in [ModelKind::Mlp, ModelKind::Conv] {
        for weight_decay in [0.0, 0.01] {
            for shards in [[6.0, 3.0, 1.0], [7.0, 3.0, 0.0]] {
                let mut case = Case::new(model, OptimKind::Adam, &[5, 2, 1], &[3, 2, 1]);
                case.steps = 50;
                case.weight_decay = weight_decay;
                case.shards = shards.to_vec();
                cases.push(case);
            }
        }
        let mut host = Case::new(model, OptimKind::Adam, &[5, 2, 1], &[3, 2, 1]);
        host.steps = 50;
        host.weight_decay = 0.01;
        host.shards = vec![6.0, 3.0, 1.0];
        host.host_shards = vec![1];
        cases.push(host);
    }
    cases
}

/// The mixed-precision cases for three ranks: bf16 compute with f32 sums, master and Adam
/// state, on the MLP and the conv net, shares 5/2/1 in micro-batches of at most 3/2/1, 50 steps,
/// from seeded parameters; the reference runs the same recipe on one device.
///
/// Then the same with Adam's state sharded (ballast's `ShardedAdam`: f32 master values and
/// moments per shard, the all-gather in bf16): the MLP with an empty shard on rank 2, the conv
/// net with shards 60/30/10 %. Then with the host Adam: the MLP with rank 1's shard in host
/// memory, the conv net with the whole state offloaded.
pub fn precision_cases() -> Vec<Case> {
    let plain: Vec<Case> = [ModelKind::Mlp, ModelKind::Conv]
        .into_iter()
        .map(|model| {
            let mut case = Case::new(model, OptimKind::Adam, &[5, 2, 1], &[3, 2, 1]);
            case.steps = 50;
            case.precision = Precision::Bf16;
            case.init_seed = Some(11);
            case
        })
        .collect();
    let sharded = plain
        .iter()
        .zip([[7.0, 3.0, 0.0], [6.0, 3.0, 1.0]])
        .map(|(case, shards)| Case {
            shards: shards.to_vec(),
            ..case.clone()
        });
    // The host Adam: rank 1's shard in host memory (the MLP), and the whole state offloaded
    // (the conv net); each takes the f32 master over at its first step.
    let on_host = [
        Case {
            shards: vec![6.0, 3.0, 1.0],
            host_shards: vec![1],
            ..plain[0].clone()
        },
        Case {
            offload: true,
            ..plain[1].clone()
        },
    ];
    plain.clone().into_iter().chain(sharded).chain(on_host).collect()
}

/// How far the mixed-precision recipe on one device moves when only its micro-batching
/// changes: the largest relative difference from [`run_reference`] (the whole batch at once) of
/// the same case on one rank in micro-batches of 1 and of 3. bf16 rounds each micro-batch's
/// forward and backward, so a different cut of the same batch gives other bits; this spread is
/// what the recipe itself cannot tell apart, and the bound a run on unequal ranks (whose
/// micro-batches are other cuts) is held to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Largest per-tensor relative difference of the parameters, replica or f32 master.
    pub params: f64,
    /// Largest relative difference of a step's loss.
    pub losses: f64,
}

/// The [`Spread`] of `case`'s recipe, from `initial` (run on a world of one thread).
///
/// # Errors
/// Any [`Error`] of the runs.
pub fn micro_batch_spread(case: &Case, initial: &[f32]) -> Result<Spread, Error> {
    let mut spread = Spread {
        params: 0.0,
        losses: 0.0,
    };
    let reference = run_reference(case, initial);
    for cap in [1, 3] {
        let mut one = case.clone();
        (one.shares, one.caps) = (vec![case.global_batch()], vec![cap]);
        // The recipe's spread: burn's optimizer on one device, whatever the case shards.
        (one.shards, one.host_shards) = (Vec::new(), Vec::new());
        let runs = ballast_collectives::local::run(1, ballast_collectives::CommOptions::default(), |comm| {
            run_ddp(Box::new(comm), &one).map(|(outcome, _)| outcome)
        });
        let outcome = runs.into_iter().next().expect("one rank")?;
        debug_assert_eq!(outcome.initial, initial, "seeded cases start alike");
        let (params, losses) = compare(&outcome, &reference);
        let master = relative_difference(&outcome.master, &reference.master);
        spread.params = spread.params.max(params).max(master);
        spread.losses = spread.losses.max(losses);
    }
    Ok(spread)
}

/// Runs `cases` on `comm`; on rank 0 compares each with the single-device reference and returns
/// one report line per case (`OK`, or `FAIL` with the reason). Other ranks return their own
/// lines about replica agreement. An unweighted case passes when it *exceeds* the tolerance.
///
/// # Errors
/// A DDP error ends the run.
pub fn equivalence_report(mut comm: Box<dyn Communicator>, cases: &[Case]) -> Result<Vec<String>, Error> {
    let rank = comm.rank();
    let mut lines = Vec::new();
    for case in cases {
        let (outcome, back) = run_ddp(comm, case)?;
        comm = back;
        // One collective per step (three with sharded state), however many buckets; a bucketed
        // case must have had several.
        let collectives_as_planned = outcome.collectives.iter().all(|&c| c == case.collectives_per_step())
            && (case.bucket_cap_bytes.is_none() || outcome.buckets.iter().all(|&b| b > 1));
        let replicas_ok = outcome.replica_rel <= MIXED_REPLICA_TOLERANCE;
        let replicas = if !case.replicas_bitwise() {
            format!("replicas within {:.3e} of rank 0's", outcome.replica_rel)
        } else {
            "replicas identical".to_string()
        };
        if rank != 0 {
            lines.push(format!(
                "equivalence rank {rank} {}: {replicas}, micro-batches {:?} {}",
                case.label(),
                outcome.micro_batches.first(),
                if replicas_ok { "OK" } else { "FAIL" },
            ));
            continue;
        }
        let reference = run_reference(case, &outcome.initial);
        let (param_rel, loss_rel) = compare(&outcome, &reference);
        let param_rel = param_rel.max(relative_difference(&outcome.master, &reference.master));
        let (tol, loss_tol) = if case.precision.is_mixed() {
            let spread = micro_batch_spread(case, &outcome.initial)?;
            (2.0 * spread.params, 2.0 * spread.losses)
        } else {
            (case.tolerance(), 1e-5)
        };
        let tol_text = if case.precision.is_mixed() {
            format!("{tol:.2e} (twice the recipe's micro-batch spread)")
        } else {
            format!("{tol:.0e}")
        };
        let verdict = match case.averaging {
            Averaging::BySamples
                if param_rel <= tol && loss_rel <= loss_tol && collectives_as_planned && replicas_ok =>
            {
                "OK"
            }
            Averaging::PerRankMean if param_rel > tol => "OK (differs, as expected)",
            _ => "FAIL",
        };
        lines.push(format!(
            "equivalence rank 0 {}: max_rel_param {param_rel:.3e} tol {tol_text} max_rel_loss {loss_rel:.3e} \
             collectives_per_step {:?} buckets_per_step {:?} micro_batches {:?} final_loss {:.5} {replicas} {verdict}",
            case.label(),
            outcome.collectives.first(),
            outcome.buckets.first(),
            outcome.micro_batches.first(),
            outcome.losses.last().copied().unwrap_or(f64::NAN),
        ));
    }
    Ok(lines)
}

/// Options of [`balanced_run`].
#[derive(Debug, Clone)]
pub struct BalancedRun {
    /// Global batch.
    pub global_batch: usize,
    /// Steps.
    pub steps: u64,
    /// Which model: [`WideMlp`] of this hidden width, or with `conv` an [`ImageConvNet`] of
    /// this many channels.
    pub width: usize,
    /// Train the [`ImageConvNet`] instead of the [`WideMlp`].
    pub conv: bool,
    /// Balancer options of this rank.
    pub balance: crate::balance::BalanceOptions,
    /// Learning rate (Adam).
    pub lr: f64,
    /// This rank's device.
    pub device: DeviceChoice,
    /// Make this rank's first micro-batch of this step fail with cubecl's out-of-memory text:
    /// as a panic in the loss function (a backend that panics), or, with
    /// [`BalancedRun::oom_in_device_log`], the way a wgpu device reports it.
    pub device_oom_at_step: Option<u64>,
    /// Report the injected out-of-memory as wgpu and cubecl do instead of panicking: wgpu's
    /// uncaptured-error handler panics on cubecl's device thread, which catches the panic and
    /// writes it with `log::warn!` under its own target; the caller's thread sees no panic, and
    /// the micro-batch's outputs look computed.
    pub oom_in_device_log: bool,
    /// The float type the replicas compute in ([`crate::DdpOptions::with_precision`]).
    pub precision: Precision,
}

/// The panic text of [`BalancedRun::device_oom_at_step`]: cubecl's `IoError::OutOfMemory`.
pub const INJECTED_DEVICE_OOM: &str = "out of device memory allocating 1073741824 bytes (injected by the test)";

/// One step of a [`balanced_run`], as every rank sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepRecord {
    /// Step index.
    pub step: u64,
    /// Shares in force during the step.
    pub shares: Vec<usize>,
    /// Micro-batch caps in force during the step.
    pub caps: Vec<usize>,
    /// Micro-batches this rank ran.
    pub micro_batches: Vec<usize>,
    /// Peak device bytes on this rank.
    pub peak_bytes: u64,
    /// This rank's budget.
    pub budget_bytes: u64,
    /// Mean loss of the global batch.
    pub loss: f64,
    /// Samples over all ranks in this step.
    pub global_samples: usize,
    /// Whether the plan changed after this step.
    pub plan_changed: bool,
    /// Smoothed samples/s per rank after the step.
    pub speeds: Vec<f64>,
    /// Every rank's compute seconds.
    pub rank_compute: Vec<f64>,
    /// Out-of-memory retries on this rank.
    pub oom_retries: usize,
    /// Whether each rank keeps its optimizer state on the host.
    pub offload: Vec<bool>,
    /// Parameters whose optimizer state each rank holds, when it is sharded (empty otherwise).
    pub shards: Vec<u64>,
    /// Bytes of optimizer state the plan gives this rank's shard (0 when not sharded).
    pub planned_state_bytes: u64,
    /// Bytes this rank's shard took on its device when it was allocated, as the meter measured
    /// them (`None` when not sharded, or on a shared heap).
    pub measured_state_bytes: Option<u64>,
    /// Seconds of the whole step on this rank.
    pub seconds: f64,
}

/// Trains a [`WideMlp`] on synthetic data with the balancer on `comm` and records every step.
/// Returns the records, the final parameters and the device reports.
///
/// # Errors
/// Balancer, DDP and collective errors.
pub fn balanced_run(comm: Box<dyn Communicator>, run: &BalancedRun) -> Result<BalancedOutcome, crate::Error> {
    let device = run.device.device(0)?.autodiff();
    // Runs are compared with each other (e.g. with and without an injected fault): rank 0's
    // initial weights, which every rank receives, must not depend on the run.
    device.seed(3);
    if run.conv {
        let data = SyntheticSet::with_dims(1024, IMAGE_SIDE * IMAGE_SIDE, TARGETS, 3);
        let meter = crate::memory::DeviceMeter::for_device(&device);
        let model = ImageConvNet::with_channels(run.width, &device);
        balanced_loop(comm, run, model, &data, meter, &device)
    } else {
        let data = SyntheticSet::with_dims(4096, WIDE_FEATURES, TARGETS, 3);
        let meter = crate::memory::DeviceMeter::for_device(&device);
        let model = WideMlp::with_width(run.width, &device);
        balanced_loop(comm, run, model, &data, meter, &device)
    }
}

/// What [`balanced_run`] returns: every step's record, the final parameters, the device reports.
pub type BalancedOutcome = (Vec<StepRecord>, Vec<f32>, Vec<ballast_balancer::DeviceReport>);

fn balanced_loop<M: Regressor>(
    comm: Box<dyn Communicator>,
    run: &BalancedRun,
    model: M,
    data: &SyntheticSet,
    meter: crate::memory::DeviceMeter,
    device: &Device,
) -> Result<BalancedOutcome, crate::Error> {
    let (mut ddp, model) = DataParallel::wrap(comm, model, DdpOptions::default().with_precision(run.precision))?;
    let outcome = balanced_steps(&mut ddp, run, model, data, meter, device);
    if let Err(e) = &outcome {
        // Said while the communicator still lives: dropping it finalises MPI, which waits for
        // ranks that are still inside a collective and may end this process first.
        eprintln!("ballast: rank {} stopped: {e}", ddp.rank());
    }
    outcome
}

fn balanced_steps<M: Regressor>(
    ddp: &mut DataParallel,
    run: &BalancedRun,
    mut model: M,
    data: &SyntheticSet,
    meter: crate::memory::DeviceMeter,
    device: &Device,
) -> Result<BalancedOutcome, crate::Error> {
    use crate::balance::Balancer;
    let sampler = GlobalSampler::new(data.len(), run.global_batch, 3).expect("non-empty");
    let armed = std::cell::Cell::new(false);
    let mut loss_fn = |m: &M, idx: &[usize]| {
        if armed.replace(false) {
            if !run.oom_in_device_log {
                panic!("{INJECTED_DEVICE_OOM}");
            }
            log::warn!(
                target: "cubecl_common::device::handle::channel::task",
                "CallError(task panicked on device runner thread: wgpu error: {INJECTED_DEVICE_OOM})"
            );
        }
        let (x, y) = data.batch(idx, device);
        let dtype = run.precision.compute_dtype();
        MseLoss::new().forward(m.forward(x.cast(dtype)), y.cast(dtype), Reduction::Mean)
    };
    let largest_probe = run.balance.probe_sizes.iter().copied().max().unwrap_or(0);
    let pool: Vec<usize> = (0..largest_probe.max(64)).collect();
    let mut balancer = Balancer::probe(
        ddp,
        &model,
        &mut loss_fn,
        &pool,
        run.global_batch,
        meter,
        run.balance.clone(),
    )?;
    let mut optim = AdamConfig::new().init();
    let mut records = Vec::new();
    for step in 0..run.steps {
        let shares = balancer.plan().shares();
        let caps = balancer.plan().micro_batches();
        let started = std::time::Instant::now();
        armed.set(run.device_oom_at_step == Some(step));
        let (next, out) = balancer.step(ddp, model, &mut optim, run.lr, &sampler.batch(step), &mut loss_fn)?;
        model = next;
        records.push(StepRecord {
            step,
            shares,
            caps,
            micro_batches: out.micro_batches,
            peak_bytes: out.peak_bytes,
            budget_bytes: run.balance.budget_bytes,
            loss: out.stats.loss,
            global_samples: out.stats.global_samples,
            plan_changed: out.plan_changed,
            speeds: balancer.observed_speeds(),
            rank_compute: out.stats.rank_compute,
            oom_retries: out.oom_retries,
            offload: balancer.plan().ranks.iter().map(|r| r.offload).collect(),
            shards: balancer.shard_plan().map(|p| p.counts.clone()).unwrap_or_default(),
            planned_state_bytes: balancer
                .shard_plan()
                .map_or(0, |p| p.counts[ddp.rank()] * run.balance.optimizer_bytes_per_param),
            measured_state_bytes: balancer.shard_measured_bytes(),
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    ddp.verify_replicas(&model)?;
    Ok((records, flatten_params(&model), balancer.reports().to_vec()))
}

/// Least-squares line through `(x, y)`: slope, intercept and R².
pub fn linear_fit(points: &[(f64, f64)]) -> (f64, f64, f64) {
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    let slope = sxy / sxx;
    (slope, my - slope * mx, sxy * sxy / (sxx * syy))
}

/// The measured peak bytes of one forward and backward pass of a [`WideMlp`] of `width` on
/// `device`, per micro-batch size in `sizes` (after one pass at the largest size, as the
/// balancer's warm-up does: later sizes must not read its peak).
///
/// # Panics
/// When `device` reports no memory pool (CPU backends).
pub fn probe_peaks(device: &Device, width: usize, sizes: &[usize]) -> Vec<(usize, u64)> {
    let meter = crate::memory::DeviceMeter::for_device(device);
    assert!(meter.reads_pool(), "the device reports no memory pool");
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let data = SyntheticSet::with_dims(largest, WIDE_FEATURES, TARGETS, 3);
    let model = WideMlp::with_width(width, device);
    let idx: Vec<usize> = (0..largest).collect();
    let peak_at = |m: usize| {
        meter.reset_peak();
        let (x, y) = data.batch(&idx[..m], device);
        let grads = MseLoss::new().forward(model.forward(x), y, Reduction::Mean).backward();
        let peak = meter.peak();
        drop(grads);
        peak
    };
    let _ = peak_at(largest);
    sizes.iter().map(|&m| (m, peak_at(m))).collect()
}
