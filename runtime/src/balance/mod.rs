//! The balancer at work: measure this device, agree on a plan, run steps by it, adapt.
//!
//! [`Balancer::probe`] runs forward and backward passes at a few micro-batch sizes (1 to 64 by
//! default, after a warm-up at the largest) and measures each: peak memory above the device's
//! baseline (CPU: the counting allocator; GPU: the device's memory in use) and samples/s over a
//! window of runs. A least-squares line through the peaks gives the fixed bytes and the bytes per
//! sample; optimizer state that does not exist yet (Adam: 8 bytes per parameter) is added to the
//! fixed part. The speeds form the device's speed curve, from which the planner picks its
//! micro-batch. CPU ranks report the cores they may run on, so ranks pinned to the same cores
//! are planned as one compute group. Every rank's report is all-gathered and every rank solves
//! the same plan (`ballast_balancer::solve`).
//!
//! [`Balancer::step`] runs this rank's share in micro-batches of the planned size and finishes
//! the step with one all-reduce, which also carries every rank's compute time. Those feed the
//! [`Rebalancer`]; a better plan is adopted by all ranks at the same step boundary.
//!
//! **Out of memory.** A micro-batch whose measured peak exceeds the budget (or an injected
//! fault) is discarded before its gradients are added, split in half and run again; the new cap
//! travels to every rank in the step's all-reduce and becomes part of the plan. No sample is
//! skipped or counted twice and the step completes.

use std::time::Instant;

use burn::{
    module::Module,
    optim::ModuleOptimizer,
    tensor::{Gradients, Tensor},
};

use ballast_balancer::{
    solve, solve_equal, solve_sharded, solve_with_shards, DeviceReport, EqualCaps, OptimizerState, Plan,
    RankAssignment, Rebalancer, ShardedPlan, Sharding, SpeedPoint, Tunables,
};
use ballast_collectives::CommunicatorExt;

use crate::{
    ddp::{DataParallel, StepStats},
    memory::{self, DeviceMeter},
    optim::{ShardPlace, ShardedAdam},
    sampler::split_batch,
};

mod oom;
mod probe;
mod refit;
mod step;
mod table;

use crate::Error;
use oom::{contain_device_oom, first_line};
pub use probe::report_from_probes;
use probe::scratch_copy;
pub use table::{human_bytes, plan_table, shard_table};

/// How the first plan is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialPlan {
    /// From the probes' measured speeds and memory (default).
    Measured,
    /// Equal shares, micro-batches capped by memory (no timing involved, so reproducible): to
    /// watch rebalancing converge.
    Equal,
    /// Naive DDP: equal shares and one micro-batch size everywhere, capped by the smallest
    /// budget. Never rebalanced.
    Naive,
}

/// Options of the balancer on this rank.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceOptions {
    /// Memory this rank may use, bytes.
    pub budget_bytes: u64,
    /// Planner knobs.
    pub tunables: Tunables,
    /// Micro-batch sizes probed (ascending).
    pub probe_sizes: Vec<usize>,
    /// Optimizer state per parameter not yet allocated at probe time (Adam: 8, SGD: 0).
    pub optimizer_bytes_per_param: u64,
    /// The first plan.
    pub initial: InitialPlan,
    /// Re-plan online from observed speeds.
    pub rebalance: bool,
    /// Fail this rank's first micro-batch of this step once, as if out of memory (feature
    /// `testkit`).
    #[cfg(feature = "testkit")]
    pub inject_oom_at_step: Option<u64>,
    /// Simulated slowness for ranks as threads: after each micro-batch, sleep so that it takes
    /// this many times as long (1.0 = none). Real heterogeneity comes from real devices or
    /// pinned cores; this exists for the single-machine demo.
    pub slowdown: f64,
    /// A simulated clock (feature `testkit`): rank `r` computes `simulated_speeds[r]` samples
    /// per second whatever the machine does. Probes and steps are timed by it instead of the
    /// wall clock, each rank counts as a device of its own, and the all-reduce costs nothing,
    /// so plans depend on these numbers alone. Empty: the wall clock.
    #[cfg(feature = "testkit")]
    pub simulated_speeds: Vec<f64>,
    /// Root of the `/proc` tree read for host RAM and swap (`/`; tests pass a fake tree).
    pub proc_root: std::path::PathBuf,
    /// Ranks share one heap (ranks as threads): the counting allocator cannot tell them apart,
    /// so ranks probe one at a time (each measuring its transient memory plus its own
    /// parameters) and steps do not check peaks against the budget.
    pub shared_heap: bool,
    /// Run the optimizer on the host (the fast host Adam) on every rank, whether or not a
    /// device needs its state offloaded: its state can then be checkpointed exactly. Ignored
    /// when the state is sharded (`optimizer_sharding`), which places each shard itself.
    pub host_optimizer: bool,
    /// Where the optimizer state lives. `Off` (default): whole on every rank (burn's optimizer,
    /// or the host Adam with `host_optimizer` or when a rank offloads). `Even` and `Memory`: one
    /// shard per rank ([`crate::optim::sharded::ShardedAdam`], Adam), each on its device, where it
    /// counts against the budget (`optimizer_bytes_per_param` per parameter), unless the plan
    /// moves that rank's shard to its host.
    pub optimizer_sharding: Sharding,
    /// Shards to keep instead of planning them (a resumed run's, saved with its checkpoint, so
    /// that it continues bit for bit); used only when they cover this model on this world.
    pub shard_counts: Option<Vec<usize>>,
    /// Hyper-parameters of ballast's own Adam, sharded or offloaded (the one that replaces the
    /// caller's optimizer when state is sharded or on the host).
    pub adam: crate::optim::HostAdamConfig,
}

impl Default for BalanceOptions {
    fn default() -> Self {
        Self {
            budget_bytes: u64::MAX,
            tunables: Tunables::default(),
            probe_sizes: vec![1, 2, 4, 8, 16, 32, 64],
            optimizer_bytes_per_param: 8,
            initial: InitialPlan::Measured,
            rebalance: true,
            #[cfg(feature = "testkit")]
            inject_oom_at_step: None,
            slowdown: 1.0,
            #[cfg(feature = "testkit")]
            simulated_speeds: Vec::new(),
            proc_root: std::path::PathBuf::from("/"),
            shared_heap: false,
            host_optimizer: false,
            optimizer_sharding: Sharding::Off,
            shard_counts: None,
            adam: crate::optim::HostAdamConfig::default(),
        }
    }
}

impl BalanceOptions {
    /// Rank `rank`'s speed on the simulated clock, if one runs.
    fn simulated_speed(&self, rank: usize) -> Option<f64> {
        #[cfg(feature = "testkit")]
        let speed = self.simulated_speeds.get(rank).copied().filter(|&v| v > 0.0);
        #[cfg(not(feature = "testkit"))]
        let speed = {
            let _ = rank;
            None
        };
        speed
    }

    /// Every rank's speed on the simulated clock, if one runs.
    fn simulated_clock(&self, world: usize) -> Option<Vec<f64>> {
        (0..world).map(|r| self.simulated_speed(r)).collect()
    }
}

/// What one balanced step did.
#[derive(Debug, Clone, PartialEq)]
pub struct BalancedStep {
    /// The data-parallel statistics (global loss, per-rank times and samples).
    pub stats: StepStats,
    /// Micro-batch sizes this rank ran, in order (after any out-of-memory split).
    pub micro_batches: Vec<usize>,
    /// Peak device memory on this rank during the step, bytes (0 without a counting allocator).
    pub peak_bytes: u64,
    /// Micro-batches this rank had to split because they ran out of memory.
    pub oom_retries: usize,
    /// Whether the plan changed at the end of this step.
    pub plan_changed: bool,
    /// The host swapped pages out during this step.
    pub swap_warning: Option<crate::optim::offload::SwapWarning>,
}

/// Plans and runs balanced steps on one rank.
pub struct Balancer {
    options: BalanceOptions,
    reports: Vec<DeviceReport>,
    plan: Plan,
    rebalancer: Rebalancer,
    meter: DeviceMeter,
    cap_limits: Vec<Option<usize>>,
    injected: bool,
    /// Whether this rank has re-measured its micro-batch cap with the optimizer state in place
    /// (see [`Balancer::refit_cap`]).
    refitted: bool,
    /// This rank's cap from that measurement, in force until the other ranks have it too.
    refitted_cap: Option<usize>,
    plan_changes: Vec<u64>,
    swap: crate::optim::offload::SwapMonitor,
    host: Option<crate::optim::offload::HostOffload>,
    sharded: Option<Sharded>,
}

/// The optimizer state cut over the ranks: the placement every rank agreed on and this rank's
/// shard.
#[derive(Debug, Clone)]
struct Sharded {
    plan: ShardedPlan,
    adam: ShardedAdam,
    /// Bytes the shard's state took when it was allocated, as the device meter saw them
    /// (`None` on a shared heap, which cannot tell ranks apart).
    measured_bytes: Option<u64>,
}

/// One probe measurement.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbePoint {
    /// Micro-batch size.
    pub samples: usize,
    /// Peak bytes above the baseline.
    pub peak_bytes: u64,
    /// Seconds for forward and backward.
    pub seconds: f64,
}

impl Balancer {
    /// Allocates this rank's shard where `placed` (and the first plan, which may move a shard
    /// that does not fit beside a sample) puts it, measuring the bytes it takes.
    fn start_shard<M: Module>(&mut self, rank: usize, model: &M, mut placed: ShardedPlan) -> Result<(), Error> {
        // The first plan has the last word on which shards leave their devices.
        for (host, r) in placed.on_host.iter_mut().zip(&self.plan.ranks) {
            *host |= r.offload;
        }
        let place = if placed.on_host[rank] {
            ShardPlace::Host
        } else {
            ShardPlace::Device
        };
        let counts: Vec<usize> = placed.counts.iter().map(|&c| c as usize).collect();
        let before = self.meter.in_use();
        let adam = ShardedAdam::new(model, rank, counts, self.options.adam, place)?;
        let measured = self.meter.in_use().saturating_sub(before);
        if place == ShardPlace::Host {
            self.meter.exclude(adam.state_bytes());
        }
        self.sharded = Some(Sharded {
            plan: placed,
            adam,
            measured_bytes: (!self.options.shared_heap).then_some(measured),
        });
        Ok(())
    }

    fn initial_plan(&self, global_batch: usize) -> Result<Plan, Error> {
        let t = &self.options.tunables;
        // Solved in every case: it also checks the reports.
        let measured = solve(&self.reports, global_batch, 0.0, t)?;
        Ok(match self.options.initial {
            InitialPlan::Measured => measured,
            InitialPlan::Equal => solve_equal(&self.reports, global_batch, EqualCaps::PerDevice, t)?,
            InitialPlan::Naive => solve_equal(&self.reports, global_batch, EqualCaps::Smallest, t)?,
        })
    }

    /// Another balancer over the same measurements with a different first plan (for side-by-side
    /// comparisons such as naive against balanced DDP). Every rank must call it.
    ///
    /// # Errors
    /// [`Error::Plan`] when no plan fits.
    pub fn variant(&self, initial: InitialPlan, rebalance: bool) -> Result<Self, Error> {
        let options = BalanceOptions {
            initial,
            rebalance,
            ..self.options.clone()
        };
        let mut other = Self {
            options,
            reports: self.reports.clone(),
            plan: self.plan.clone(),
            rebalancer: Rebalancer::for_reports(&self.reports, self.options.tunables.clone()),
            meter: self.meter.clone(),
            cap_limits: vec![None; self.reports.len()],
            injected: false,
            refitted: false,
            refitted_cap: None,
            plan_changes: Vec::new(),
            swap: self.swap.clone(),
            host: self.host.clone(),
            sharded: self.sharded.clone(),
        };
        other.plan = other.initial_plan(self.plan.global_batch)?;
        Ok(other)
    }

    /// The plan in force.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether the optimizer runs on the host (some rank's plan offloads its state; all ranks
    /// then use the host Adam, and `optim` passed to [`Balancer::step`] is not used).
    pub fn offloaded(&self) -> bool {
        self.host.is_some()
    }

    /// Adopts `plan` (a saved one, on resume) if it is for this world and global batch and every
    /// rank's micro-batch fits its measured memory; returns whether it did.
    pub fn adopt(&mut self, plan: Plan) -> bool {
        let t = &self.options.tunables;
        let fits = plan.global_batch == self.plan.global_batch
            && plan.ranks.len() == self.reports.len()
            && plan.ranks.iter().map(|r| r.share).sum::<usize>() == plan.global_batch
            && plan
                .ranks
                .iter()
                .zip(&self.reports)
                .zip(&self.plan.ranks)
                .all(|((r, report), now)| {
                    r.offload == now.offload
                        && r.micro_batch <= ballast_balancer::memory_cap(report, t).max(now.micro_batch)
                });
        if fits {
            self.plan = plan;
        }
        fits
    }

    /// The placement of the sharded optimizer state every rank agreed on (`None` when the state
    /// is not sharded).
    pub fn shard_plan(&self) -> Option<&ShardedPlan> {
        self.sharded.as_ref().map(|s| &s.plan)
    }

    /// This rank's shard of the optimizer state, when it is sharded.
    pub fn shard(&self) -> Option<&ShardedAdam> {
        self.sharded.as_ref().map(|s| &s.adam)
    }

    /// This rank's shard, to restore its state on resume.
    pub fn shard_mut(&mut self) -> Option<&mut ShardedAdam> {
        self.sharded.as_mut().map(|s| &mut s.adam)
    }

    /// Bytes this rank's shard took on its device (or host) when it was allocated, as measured
    /// (`None` on a shared heap or without sharding).
    pub fn shard_measured_bytes(&self) -> Option<u64> {
        self.sharded.as_ref().and_then(|s| s.measured_bytes)
    }

    /// The host optimizer, when one runs.
    pub fn host(&self) -> Option<&crate::optim::offload::HostOffload> {
        self.host.as_ref()
    }

    /// The host optimizer, to restore its state.
    pub fn host_mut(&mut self) -> Option<&mut crate::optim::offload::HostOffload> {
        self.host.as_mut()
    }

    /// Every rank's report, indexed by rank.
    pub fn reports(&self) -> &[DeviceReport] {
        &self.reports
    }

    /// Steps after which the plan changed.
    pub fn plan_changes(&self) -> &[u64] {
        &self.plan_changes
    }
}

/// Bytes per parameter of the step's gradient sums ([`DataParallel`] adds each micro-batch's
/// gradient to an `f32` sum on the device): they exist from the first micro-batch of a step to
/// its all-reduce, and the probes, which run forward and backward alone, never see them.
pub const GRADIENT_SUM_BYTES_PER_PARAM: u64 = 4;

/// Cuts the optimizer state of `params` parameters over the ranks of `reports` (stateless) as
/// `options` ask: the saved shards when they fit, else the planner's.
fn place_shards(
    reports: &[DeviceReport],
    global_batch: usize,
    params: u64,
    options: &BalanceOptions,
) -> Result<ShardedPlan, Error> {
    let state = OptimizerState {
        bytes_per_param: options.optimizer_bytes_per_param,
        ..OptimizerState::adam(params)
    };
    let t = &options.tunables;
    let saved = options
        .shard_counts
        .as_ref()
        .filter(|c| c.len() == reports.len() && c.iter().sum::<usize>() as u64 == params);
    Ok(match saved {
        Some(counts) => solve_with_shards(
            reports,
            global_batch,
            0.0,
            t,
            &state,
            options.optimizer_sharding,
            counts.iter().map(|&c| c as u64).collect(),
        )?,
        None => solve_sharded(reports, global_batch, 0.0, t, &state, options.optimizer_sharding)?,
    })
}

#[cfg(test)]
mod tests {
    use super::{oom::*, probe::*, *};
    use ballast_balancer::SpeedPoint;

    fn report(curve: &[(usize, f64)], budget_bytes: u64) -> DeviceReport {
        DeviceReport {
            name: "cpu".into(),
            budget_bytes,
            fixed_bytes: 0,
            bytes_per_sample: 1 << 20,
            samples_per_sec: curve.iter().map(|p| p.1).fold(0.0, f64::max),
            offloadable_bytes: 0,
            host: String::new(),
            host_available_bytes: None,
            speed_curve: curve
                .iter()
                .map(|&(micro_batch, samples_per_sec)| SpeedPoint {
                    micro_batch,
                    samples_per_sec,
                })
                .collect(),
            compute_group: None,
        }
    }

    #[test]
    fn device_out_of_memory_is_told_from_other_panics() {
        // cubecl's IoError and LaunchError texts, and CUDA's own name.
        for text in [
            "out of device memory allocating 1073741824 bytes",
            "An out-of-memory error happened during launch",
            "CUDA_ERROR_OUT_OF_MEMORY",
        ] {
            assert!(names_out_of_memory(text), "{text}");
            let caught = contain_device_oom(|| -> () { panic!("{text}") });
            assert_eq!(caught.unwrap_err(), text);
        }
        assert!(!names_out_of_memory("index out of bounds"));
        let other = std::panic::catch_unwind(|| contain_device_oom(|| -> () { panic!("index out of bounds") }));
        assert!(other.is_err(), "a panic that is not out of memory must keep unwinding");
        assert_eq!(contain_device_oom(|| 7), Ok(7));
    }

    /// Around the chosen size (16: within the tolerance of 8, the fastest), at offsets of 1, 2,
    /// 4, 8 on both sides, strictly between the measured neighbours 8 and 32.
    #[test]
    fn refines_on_both_sides_of_the_chosen_size() {
        let curve = [
            (1, 500.0),
            (2, 1000.0),
            (4, 1000.0),
            (8, 2300.0),
            (16, 2200.0),
            (32, 2000.0),
            (64, 1500.0),
        ];
        let t = Tunables::default();
        let r = report(&curve, 1 << 40);
        assert_eq!(ballast_balancer::operating_point(&r, 1 << 20, &t).0, 16);
        assert_eq!(refine_sizes(&r, &t), vec![12, 14, 15, 17, 18, 20, 24]);
    }

    /// The memory cap bounds the sizes above, and is itself timed when it lies in the gap.
    #[test]
    fn refines_up_to_an_unmeasured_cap() {
        let curve = [(1, 500.0), (2, 900.0), (4, 2300.0), (8, 2200.0), (16, 2000.0)];
        let t = Tunables::default();
        // Room for 11 samples after the 10 % margin: cap 11; 8 is within the tolerance of 4.
        let r = report(&curve, (11.5 * (1u64 << 20) as f64 / 0.9) as u64);
        assert_eq!(ballast_balancer::memory_cap(&r, &t), 11);
        assert_eq!(ballast_balancer::operating_point(&r, 11, &t).0, 8);
        assert_eq!(refine_sizes(&r, &t), vec![6, 7, 9, 10, 11]);
    }

    /// The probes run forward passes in training mode, yet a batch norm's running statistics in
    /// the model that trains are what they were before: the probes ran on a scratch copy.
    #[test]
    fn probes_leave_running_statistics_alone() {
        use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
        use burn::tensor::Device;

        use crate::{
            collectives::{local, CommOptions},
            DdpOptions,
        };

        #[derive(Module, Debug)]
        struct Normed {
            norm: BatchNorm,
            head: Linear,
        }
        let device = Device::flex().autodiff();
        let normed = Normed {
            norm: BatchNormConfig::new(4).init(&device),
            head: LinearConfig::new(4, 1).init(&device),
        };
        let comm = local::world(1, CommOptions::default()).pop().unwrap();
        let (mut ddp, model) = DataParallel::wrap(Box::new(comm), normed, DdpOptions::default()).unwrap();
        let mut loss_fn = |m: &Normed, idx: &[usize]| {
            let x = Tensor::<2>::ones([idx.len(), 4], &device).mul_scalar(3.0);
            m.head.forward(m.norm.forward(x)).mean()
        };
        let pool: Vec<usize> = (0..8).collect();
        let meter = DeviceMeter::start();
        Balancer::probe(
            &mut ddp,
            &model,
            &mut loss_fn,
            &pool,
            8,
            meter,
            BalanceOptions::default(),
        )
        .unwrap();
        let running_mean = |m: &Normed| {
            m.norm
                .running_mean
                .value_sync()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        assert_eq!(running_mean(&model), vec![0.0; 4], "a probe moved the running mean");
        // The same forward pass on the model itself does move it: the check can fail.
        drop(loss_fn(&model, &pool));
        let moved = running_mean(&model);
        assert!(moved.iter().all(|&v| v > 0.0), "{moved:?}");
    }
}
