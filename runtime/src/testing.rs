//! Small models, synthetic data and the equivalence harness used by ballast's tests, selftests
//! and benchmarks.
//!
//! The harness answers one question: does data-parallel training over unequal shares produce
//! the same model as one device training on the whole batch? [`run_ddp`] trains on any
//! communicator; [`run_reference`] trains the same model from the same initial parameters with a
//! plain burn loop; [`compare`] reports the largest per-tensor relative difference.

use burn::{
    module::Module,
    nn::{
        conv::{Conv2d, Conv2dConfig},
        loss::{MseLoss, Reduction},
        Linear, LinearConfig, PaddingConfig2d, Relu,
    },
    optim::{AdamConfig, GradientsParams, ModuleOptimizer, SgdConfig},
    tensor::{Device, Tensor, TensorData},
};

use ballast_balancer::RankPlan;
use ballast_collectives::Communicator;

use crate::{
    ddp::{flatten_params, load_params, param_values, Averaging, DataParallel, DdpError, DdpOptions},
    GlobalSampler,
};

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

/// A deterministic regression dataset: the same on every rank for the same seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSet {
    x: Vec<f32>,
    y: Vec<f32>,
    len: usize,
}

impl SyntheticSet {
    /// `len` samples generated from `seed`.
    pub fn new(len: usize, seed: u64) -> Self {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..len * FEATURES).map(|_| next()).collect();
        let mut y = Vec::with_capacity(len * TARGETS);
        for s in 0..len {
            let row = &x[s * FEATURES..(s + 1) * FEATURES];
            for t in 0..TARGETS {
                let v: f32 = row.iter().skip(t).step_by(TARGETS).map(|a| a * a - 0.3 * a).sum();
                y.push(v.sin() + 0.05 * next());
            }
        }
        Self { x, y, len }
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
        let mut xs = Vec::with_capacity(indices.len() * FEATURES);
        let mut ys = Vec::with_capacity(indices.len() * TARGETS);
        for &i in indices {
            xs.extend_from_slice(&self.x[i * FEATURES..(i + 1) * FEATURES]);
            ys.extend_from_slice(&self.y[i * TARGETS..(i + 1) * TARGETS]);
        }
        (
            Tensor::from_data(TensorData::new(xs, [indices.len(), FEATURES]), device),
            Tensor::from_data(TensorData::new(ys, [indices.len(), TARGETS]), device),
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
    fn init(self) -> ModuleOptimizer {
        match self {
            OptimKind::Sgd => SgdConfig::new().init(),
            OptimKind::Adam => AdamConfig::new().init(),
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
        }
    }

    /// Global batch.
    pub fn global_batch(&self) -> usize {
        self.shares.iter().sum()
    }

    /// Short label for reports.
    pub fn label(&self) -> String {
        format!(
            "{:?}/{:?}/shares {:?}/caps {:?}/{:?}",
            self.model, self.optim, self.shares, self.caps, self.averaging
        )
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
}

/// Trains `case` data-parallel on `comm` (whose world size must equal the number of shares).
/// Returns the outcome and the communicator for further cases.
///
/// # Errors
/// Any [`DdpError`], including divergence of replicas at the end.
pub fn run_ddp(comm: Box<dyn Communicator>, case: &Case) -> Result<(Outcome, Box<dyn Communicator>), DdpError> {
    match case.model {
        ModelKind::Mlp => run_ddp_with::<Mlp>(comm, case),
        ModelKind::Conv => run_ddp_with::<ConvNet>(comm, case),
    }
}

fn run_ddp_with<M: Regressor>(
    comm: Box<dyn Communicator>,
    case: &Case,
) -> Result<(Outcome, Box<dyn Communicator>), DdpError> {
    let device = Device::flex().autodiff();
    let data = SyntheticSet::new(case.dataset_len, case.seed);
    let options = DdpOptions::default().with_averaging(case.averaging);
    let (mut ddp, mut model) = DataParallel::wrap(comm, M::init(&device), options)?;
    let rank = ddp.rank();
    let initial = flatten_params(&model);
    let mut optim = case.optim.init();
    let sampler = GlobalSampler::new(data.len(), case.global_batch(), case.seed).expect("non-empty case");
    let mut outcome = Outcome {
        params: Vec::new(),
        losses: Vec::new(),
        initial,
        micro_batches: Vec::new(),
        collectives: Vec::new(),
    };
    for step in 0..case.steps {
        let batch = sampler.batch(step);
        let mine = &sampler.split(&batch, &case.shares)[rank];
        let plan = RankPlan::new(mine.len(), case.caps[rank]).expect("cap >= 1");
        let mut offset = 0;
        for m in plan.micro_batches() {
            let (x, y) = data.batch(&mine[offset..offset + m], &device);
            offset += m;
            let loss = MseLoss::new().forward(model.forward(x), y, Reduction::Mean);
            ddp.backward(&model, loss, m)?;
        }
        let (next, stats) = ddp.finish_step(model, &mut optim, case.optim.lr())?;
        model = next;
        outcome.losses.push(stats.loss);
        outcome.micro_batches.push(stats.micro_batches);
        outcome.collectives.push(stats.collectives);
    }
    ddp.verify_replicas(&model)?;
    outcome.params = param_values(&model);
    Ok((outcome, ddp.into_comm()))
}

/// Trains `case` on one device with the whole global batch per step, from `initial`
/// parameters, with a plain burn loop (no ballast code in the step).
pub fn run_reference(case: &Case, initial: &[f32]) -> Outcome {
    match case.model {
        ModelKind::Mlp => run_reference_with::<Mlp>(case, initial),
        ModelKind::Conv => run_reference_with::<ConvNet>(case, initial),
    }
}

fn run_reference_with<M: Regressor>(case: &Case, initial: &[f32]) -> Outcome {
    let device = Device::flex().autodiff();
    let data = SyntheticSet::new(case.dataset_len, case.seed);
    let mut model = load_params(M::init(&device), initial);
    let mut optim = case.optim.init();
    let sampler = GlobalSampler::new(data.len(), case.global_batch(), case.seed).expect("non-empty case");
    let mut losses = Vec::new();
    for step in 0..case.steps {
        let (x, y) = data.batch(&sampler.batch(step), &device);
        let loss = MseLoss::new().forward(model.forward(x), y, Reduction::Mean);
        losses.push(f64::from(loss.clone().into_scalar::<f32>()));
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(case.optim.lr(), model, grads);
    }
    Outcome {
        params: param_values(&model),
        losses,
        initial: initial.to_vec(),
        micro_batches: vec![1; case.steps as usize],
        collectives: vec![0; case.steps as usize],
    }
}

/// Largest per-tensor relative difference `‖a − b‖ / ‖b‖` of the parameters, and the largest
/// relative difference of the per-step losses.
pub fn compare(a: &Outcome, b: &Outcome) -> (f64, f64) {
    let params = a
        .params
        .iter()
        .zip(&b.params)
        .map(|(x, y)| {
            let diff: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| f64::from(p - q).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = y.iter().map(|q| f64::from(*q).powi(2)).sum::<f64>().sqrt();
            diff / norm.max(f64::MIN_POSITIVE)
        })
        .fold(0.0, f64::max);
    let losses = a
        .losses
        .iter()
        .zip(&b.losses)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-12))
        .fold(0.0, f64::max);
    (params, losses)
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
    cases
}

/// Runs `cases` on `comm`; on rank 0 compares each with the single-device reference and returns
/// one report line per case (`OK`, or `FAIL` with the reason). Other ranks return their own
/// lines about replica agreement. An unweighted case passes when it *exceeds* the tolerance.
///
/// # Errors
/// A DDP error ends the run.
pub fn equivalence_report(mut comm: Box<dyn Communicator>, cases: &[Case]) -> Result<Vec<String>, DdpError> {
    let rank = comm.rank();
    let mut lines = Vec::new();
    for case in cases {
        let (outcome, back) = run_ddp(comm, case)?;
        comm = back;
        let one_collective_per_step = outcome.collectives.iter().all(|&c| c == 1);
        if rank != 0 {
            lines.push(format!(
                "equivalence rank {rank} {}: replicas identical, micro-batches {:?} OK",
                case.label(),
                outcome.micro_batches.first()
            ));
            continue;
        }
        let reference = run_reference(case, &outcome.initial);
        let (param_rel, loss_rel) = compare(&outcome, &reference);
        let tol = case.optim.tolerance();
        let verdict = match case.averaging {
            Averaging::BySamples if param_rel <= tol && loss_rel <= 1e-5 && one_collective_per_step => "OK",
            Averaging::PerRankMean if param_rel > tol => "OK (differs, as expected)",
            _ => "FAIL",
        };
        lines.push(format!(
            "equivalence rank 0 {}: max_rel_param {param_rel:.3e} tol {tol:.0e} max_rel_loss {loss_rel:.3e} \
             collectives_per_step {:?} micro_batches {:?} final_loss {:.5} {verdict}",
            case.label(),
            outcome.collectives.first(),
            outcome.micro_batches.first(),
            outcome.losses.last().copied().unwrap_or(f64::NAN),
        ));
    }
    Ok(lines)
}
