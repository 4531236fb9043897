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
    solve, solve_sharded, solve_with_shards, split_proportional, DeviceReport, OptimizerState, Plan, RankAssignment,
    RankPlan, Rebalancer, ShardedPlan, Sharding, SpeedPoint, Tunables,
};
use ballast_collectives::CommunicatorExt;

use crate::{
    ddp::{DataParallel, DdpError, StepStats},
    memory::{self, DeviceMeter},
    sampler::split_batch,
    sharded::{ShardPlace, ShardedAdam},
};

/// Errors of balanced training.
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    /// Data-parallel machinery failed.
    #[error(transparent)]
    Ddp(#[from] DdpError),
    /// A collective failed.
    #[error(transparent)]
    Collective(#[from] ballast_collectives::Error),
    /// No plan fits.
    #[error(transparent)]
    Plan(#[from] ballast_balancer::Error),
    /// Offloading could not start.
    #[error(transparent)]
    Offload(#[from] crate::offload::OffloadError),
    /// A single sample does not fit this rank's budget.
    #[error(
        "rank {rank}: one sample needs {peak} bytes at peak but the budget is {budget} bytes; give this \
         device more memory (--device-memory) or a smaller model"
    )]
    OutOfMemory {
        /// The rank.
        rank: usize,
        /// Measured peak.
        peak: u64,
        /// Its budget.
        budget: u64,
    },
    /// The device failed a micro-batch for another reason than memory (a kernel that did not
    /// compile or run): nothing of the step was applied.
    #[error(
        "rank {rank} ({device}), step {step}: the device failed a micro-batch, so nothing of the step was \
         applied: {message}"
    )]
    DeviceFailed {
        /// The rank.
        rank: usize,
        /// The device, as it names itself.
        device: String,
        /// The step.
        step: u64,
        /// The backend's report (cubecl's error and the device log).
        message: String,
    },
    /// The device ran out of memory on a micro-batch of one sample.
    #[error(
        "rank {rank}: the device ran out of memory on a micro-batch of one sample ({message}); give this \
         rank a device with more free memory or a smaller model"
    )]
    DeviceOutOfMemory {
        /// The rank.
        rank: usize,
        /// What the backend said.
        message: String,
    },
    /// A memory budget was given but this process cannot measure its heap.
    #[error(
        "rank {rank}: a memory budget is set but this binary does not count its heap, so every probe would \
         read 0 bytes; install the counting allocator (`#[global_allocator] static ALLOC: \
         ballast::memory::CountingAlloc = ballast::memory::CountingAlloc;`) or drop the budget"
    )]
    NotCounting {
        /// The rank.
        rank: usize,
    },
}

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
    /// shard per rank ([`crate::sharded::ShardedAdam`], Adam), each on its device, where it
    /// counts against the budget (`optimizer_bytes_per_param` per parameter), unless the plan
    /// moves that rank's shard to its host.
    pub optimizer_sharding: Sharding,
    /// Shards to keep instead of planning them (a resumed run's, saved with its checkpoint, so
    /// that it continues bit for bit); used only when they cover this model on this world.
    pub shard_counts: Option<Vec<usize>>,
    /// Hyper-parameters of ballast's own Adam, sharded or offloaded (the one that replaces the
    /// caller's optimizer when state is sharded or on the host).
    pub adam: crate::offload::HostAdamConfig,
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
            adam: crate::offload::HostAdamConfig::default(),
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
    pub swap_warning: Option<crate::offload::SwapWarning>,
}

/// How a step watches memory (see `Balancer::memory_watch`).
#[derive(Clone, Copy)]
struct MemoryWatch {
    /// The device's memory is a pool (wgpu, CUDA), read through the device.
    pool: bool,
    /// The peak is read after every micro-batch and held to the budget.
    check: bool,
}

/// What running this rank's share did.
#[derive(Default)]
struct ShareRun {
    ran: Vec<usize>,
    peak_bytes: u64,
    oom_retries: usize,
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
    swap: crate::offload::SwapMonitor,
    host: Option<crate::offload::HostOffload>,
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
    /// Measures this device with `loss_fn` on the first samples of `pool`, all-gathers every
    /// rank's report and solves the first plan for `global_batch`.
    ///
    /// `meter` must have been started before the model was built, so the model's own memory
    /// counts as device memory.
    ///
    /// # Errors
    /// Collective errors; [`BalanceError::Plan`] when no plan fits.
    pub fn probe<M, F>(
        ddp: &mut DataParallel,
        model: &M,
        loss_fn: &mut F,
        pool: &[usize],
        global_batch: usize,
        meter: DeviceMeter,
        options: BalanceOptions,
    ) -> Result<Self, BalanceError>
    where
        M: Module,
        F: FnMut(&M, &[usize]) -> Tensor<1>,
    {
        if options.budget_bytes != u64::MAX && !meter.reads_pool() && !memory::is_counting() {
            return Err(BalanceError::NotCounting { rank: ddp.rank() });
        }
        let params = model.num_params() as u64;
        let scratch = scratch_copy(model);
        let mut points = if options.shared_heap {
            // One rank at a time; the others wait at the barrier with constant memory, as long
            // as a slow device takes to measure (every rank raises the deadline alike).
            let timeout = ddp.comm().timeout();
            ddp.comm().set_timeout(timeout.max(SEQUENTIAL_PROBE_WAIT));
            let mut mine = Vec::new();
            for turn in 0..ddp.world_size() {
                if turn == ddp.rank() {
                    // A device with a pool of its own is measured there; a simulated one is the
                    // shared heap above what every rank holds now, less this model's copy.
                    let base = memory::in_use().saturating_sub(4 * params);
                    let source = if meter.reads_pool() {
                        ProbeMeter::Device(&meter)
                    } else {
                        ProbeMeter::Heap(base)
                    };
                    mine = probe_points(&scratch, loss_fn, pool, params, &options, &source, None)?;
                }
                ddp.comm().barrier()?;
            }
            ddp.comm().set_timeout(timeout);
            mine
        } else {
            // Every rank times each size at the same time, so ranks that share a core measure
            // it under the load they will run under.
            probe_points(
                &scratch,
                loss_fn,
                pool,
                params,
                &options,
                &ProbeMeter::Device(&meter),
                Some(ddp.comm()),
            )?
        };
        let simulated = options.simulated_speed(ddp.rank());
        if let Some(speed) = simulated {
            for p in &mut points {
                p.seconds = p.samples as f64 / speed;
            }
        }
        let sharding = options.optimizer_sharding;
        // Sharded state is placed by the planner (solve_sharded), not added whole to each device.
        let stateless = BalanceOptions {
            optimizer_bytes_per_param: 0,
            ..options.clone()
        };
        let mut report = report_from_probes(
            &points,
            params,
            if sharding == Sharding::Off {
                &options
            } else {
                &stateless
            },
        );
        // The plan table names the device itself: the adapter or GPU, or the CPU.
        report.name = crate::device::device_name(&crate::transfer::model_device(model));
        // CPU ranks pinned to the same cores share them (ranks as threads stand for separate
        // simulated devices; GPU ranks each have their own device).
        if !options.shared_heap && !meter.reads_pool() && simulated.is_none() {
            report.compute_group = ballast_cluster::cpu_affinity().map(|cpus| format!("{}:cpus {cpus}", report.host));
        }
        let mut reports: Vec<DeviceReport> = ddp.comm().all_gather(&report)?;
        let sharded_plan = match sharding {
            Sharding::Off => None,
            _ => {
                let placed = place_shards(&reports, global_batch, params, &options)?;
                // From here on each device's report carries its own shard, so every later plan
                // (rebalancing, out-of-memory caps) keeps room for it.
                for (r, &c) in reports.iter_mut().zip(&placed.counts) {
                    r.fixed_bytes += c * options.optimizer_bytes_per_param;
                    r.offloadable_bytes = c * options.optimizer_bytes_per_param;
                }
                Some(placed)
            }
        };
        let world = reports.len();
        let mut balancer = Self {
            plan: Plan {
                global_batch,
                ranks: Vec::new(),
                allreduce_s: 0.0,
                predicted_step_s: 0.0,
                groups: Vec::new(),
            },
            rebalancer: Rebalancer::for_reports(&reports, options.tunables.clone()),
            cap_limits: vec![None; world],
            reports,
            meter,
            injected: false,
            refitted: false,
            refitted_cap: None,
            plan_changes: Vec::new(),
            swap: crate::offload::SwapMonitor::new(&options.proc_root),
            host: None,
            sharded: None,
            options,
        };
        balancer.swap.poll();
        balancer.plan = balancer.initial_plan(global_batch)?;
        if let Some(placed) = sharded_plan {
            balancer.start_shard(ddp.rank(), model, placed)?;
            return Ok(balancer);
        }
        // If any rank keeps its optimizer state on the host, every rank runs the host Adam's
        // arithmetic (a GPU rank with it on the GPU, chunk by chunk over managed memory): the
        // replicas must apply bit-identical updates, and burn's Adam rounds differently.
        if balancer.options.host_optimizer || balancer.plan.ranks.iter().any(|r| r.offload) {
            let host = crate::offload::HostOffload::for_device(
                model,
                balancer.options.adam,
                &balancer.options.proc_root,
                balancer.meter.gpu(),
            )?;
            balancer.meter.exclude(host.host_bytes());
            balancer.host = Some(host);
        }
        Ok(balancer)
    }

    /// Allocates this rank's shard where `placed` (and the first plan, which may move a shard
    /// that does not fit beside a sample) puts it, measuring the bytes it takes.
    fn start_shard<M: Module>(&mut self, rank: usize, model: &M, mut placed: ShardedPlan) -> Result<(), BalanceError> {
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

    fn initial_plan(&self, global_batch: usize) -> Result<Plan, BalanceError> {
        let t = &self.options.tunables;
        let measured = solve(&self.reports, global_batch, 0.0, t)?;
        match self.options.initial {
            InitialPlan::Measured => Ok(measured),
            InitialPlan::Equal | InitialPlan::Naive => {
                let n = self.reports.len();
                let shares = split_proportional(global_batch, &vec![1.0; n])?;
                let caps: Vec<usize> = self
                    .reports
                    .iter()
                    .map(|r| ballast_balancer::memory_cap(r, t))
                    .collect();
                let naive_cap = caps.iter().copied().min().unwrap_or(1).max(1);
                if caps.contains(&0) {
                    return Err(BalanceError::Plan(ballast_balancer::Error::Infeasible {
                        global_batch,
                        details: format!("equal shares need every device to hold a sample; caps are {caps:?}"),
                    }));
                }
                let ranks = shares
                    .iter()
                    .enumerate()
                    .map(|(i, &share)| {
                        let cap = if self.options.initial == InitialPlan::Naive {
                            naive_cap
                        } else {
                            caps[i]
                        };
                        assignment(&self.reports[i], share, cap.min(share.max(1)), t)
                    })
                    .collect();
                let mut plan = Plan {
                    global_batch,
                    ranks,
                    allreduce_s: 0.0,
                    predicted_step_s: 0.0,
                    groups: ballast_balancer::compute_groups(&self.reports),
                };
                let speeds: Vec<f64> = plan.ranks.iter().map(|r| r.samples_per_sec).collect();
                plan.predicted_step_s = plan.step_time_with(&speeds);
                Ok(plan)
            }
        }
    }

    /// Another balancer over the same measurements with a different first plan (for side-by-side
    /// comparisons such as naive against balanced DDP). Every rank must call it.
    ///
    /// # Errors
    /// [`BalanceError::Plan`] when no plan fits.
    pub fn variant(&self, initial: InitialPlan, rebalance: bool) -> Result<Self, BalanceError> {
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
    pub fn host(&self) -> Option<&crate::offload::HostOffload> {
        self.host.as_ref()
    }

    /// The host optimizer, to restore its state.
    pub fn host_mut(&mut self) -> Option<&mut crate::offload::HostOffload> {
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

    /// Whether the test hook asks this step's first micro-batch to fail (once).
    fn injects_oom(&self, step: u64) -> bool {
        #[cfg(feature = "testkit")]
        let asked = self.options.inject_oom_at_step == Some(step);
        #[cfg(not(feature = "testkit"))]
        let asked = {
            let _ = step;
            false
        };
        asked && !self.injected
    }

    /// Plans with the measured all-reduce: the previous step's, as the rank that waited least
    /// for the others saw it. It adds the same to every candidate plan's step time, so the
    /// rebalancer's gain is a share of the whole step, not of compute alone.
    fn observe_all_reduce(&mut self, stats: &StepStats) {
        if stats.step == 0 {
            return;
        }
        let comm_s = stats.rank_prev_all_reduce.iter().copied().fold(f64::INFINITY, f64::min);
        if comm_s.is_finite() {
            self.plan.predicted_step_s += comm_s - self.plan.allreduce_s;
            self.plan.allreduce_s = comm_s;
        }
    }

    /// Smoothed samples/s of every rank, as the rebalancer sees them.
    pub fn observed_speeds(&self) -> Vec<f64> {
        self.rebalancer.speeds(&self.reports)
    }

    /// Runs one step: this rank's share of `batch` in planned micro-batches, one all-reduce,
    /// the optimizer update, and possibly a new plan for the next step.
    ///
    /// # Errors
    /// [`BalanceError::OutOfMemory`] when one sample does not fit; DDP and collective errors.
    pub fn step<M, F>(
        &mut self,
        ddp: &mut DataParallel,
        model: M,
        optim: &mut ModuleOptimizer,
        lr: f64,
        batch: &[usize],
        loss_fn: &mut F,
    ) -> Result<(M, BalancedStep), BalanceError>
    where
        M: Module,
        F: FnMut(&M, &[usize]) -> Tensor<1>,
    {
        ddp.mark_ready();
        let parts = split_batch(batch, &self.plan.shares());
        let watch = self.memory_watch();
        let share = self.run_share(ddp, &model, &parts[ddp.rank()], loss_fn, watch)?;
        let (model, stats) = match (self.host.as_mut(), self.sharded.as_mut()) {
            (Some(host), _) => ddp.step(model, host, lr)?,
            (None, Some(sharded)) => ddp.step(model, &mut sharded.adam, lr)?,
            (None, None) => ddp.step(model, optim, lr)?,
        };
        let plan_changed = self.learn_from(&stats);
        if watch.pool && watch.check && !self.refitted {
            self.refitted = true;
            self.refit_cap(ddp, &model, loss_fn, batch);
        }
        Ok((
            model,
            BalancedStep {
                stats,
                micro_batches: share.ran,
                peak_bytes: share.peak_bytes,
                oom_retries: share.oom_retries,
                plan_changed,
                swap_warning: self.swap.poll(),
            },
        ))
    }

    /// How this step watches memory: a pool (wgpu, CUDA) is read after each micro-batch only
    /// against a budget, since reading waits for the device; a simulated device on a shared heap
    /// cannot be read per rank. A watched pool starts the step with its peak reset, so the pages
    /// the previous step freed (optimizer temporaries, buckets) do not count.
    fn memory_watch(&mut self) -> MemoryWatch {
        let pool = self.meter.reads_pool();
        let check = if pool {
            self.options.budget_bytes != u64::MAX
        } else {
            !self.options.shared_heap
        };
        if pool && check {
            self.meter.reset_peak();
        }
        MemoryWatch { pool, check }
    }

    /// Runs `mine` (this rank's share) in micro-batches of the planned size and adds each one's
    /// gradients to the step's sums. A micro-batch over the budget, or one whose device ran out
    /// of memory, is discarded; the rest of the share is re-laid at half its size (as the
    /// following steps will lay it out) and the new cap is noted for the step's all-reduce.
    fn run_share<M, F>(
        &mut self,
        ddp: &mut DataParallel,
        model: &M,
        mine: &[usize],
        loss_fn: &mut F,
        watch: MemoryWatch,
    ) -> Result<ShareRun, BalanceError>
    where
        M: Module,
        F: FnMut(&M, &[usize]) -> Tensor<1>,
    {
        let (rank, step) = (ddp.rank(), ddp.steps());
        let cap = self.plan.ranks[rank]
            .micro_batch
            .min(self.refitted_cap.unwrap_or(usize::MAX))
            .max(1);
        let mut queue =
            ballast_balancer::micro_batch_schedule(&self.reports[rank], mine.len(), cap, &self.options.tunables);
        let mut run = ShareRun::default();
        let (mut offset, mut i) = (0, 0);
        while i < queue.len() {
            let m = queue[i];
            if !watch.pool {
                memory::reset_peak();
            }
            let started = Instant::now();
            let attempt = self.micro_batch(ddp, model, &mine[offset..offset + m], loss_fn, watch.pool)?;
            let peak = if watch.check { self.meter.peak() } else { 0 };
            let inject = self.injects_oom(step);
            match attempt {
                Ok((grads, loss_value)) if peak <= self.options.budget_bytes && !inject => {
                    run.peak_bytes = run.peak_bytes.max(peak);
                    ddp.add_weighted_gradients(model, grads, loss_value, m)?;
                    if self.options.slowdown > 1.0 {
                        std::thread::sleep(started.elapsed().mul_f64(self.options.slowdown - 1.0));
                    }
                    run.ran.push(m);
                    offset += m;
                    i += 1;
                }
                failed => {
                    self.injected |= inject;
                    if watch.pool {
                        // The failed attempt's pages go back before the smaller retry is measured.
                        self.meter.reset_peak();
                    }
                    if m == 1 {
                        return Err(match failed.err() {
                            Some(message) => BalanceError::DeviceOutOfMemory { rank, message },
                            None => BalanceError::OutOfMemory {
                                rank,
                                peak,
                                budget: self.options.budget_bytes,
                            },
                        });
                    }
                    run.oom_retries += 1;
                    let rest: usize = queue[i..].iter().sum();
                    queue.truncate(i);
                    queue.extend(ballast_balancer::micro_batch_schedule(
                        &self.reports[rank],
                        rest,
                        m / 2,
                        &self.options.tunables,
                    ));
                    ddp.set_note((m / 2) as f32);
                }
            }
        }
        if watch.pool && !watch.check {
            run.peak_bytes = self.meter.peak();
        }
        Ok(run)
    }

    /// One micro-batch's forward and backward. `Ok(Err(message))` is an out-of-memory to back
    /// off from: a panic (as the testkit and flex report one), or, on a pool device, a failed
    /// allocation that cubecl recorded on the buffers it did not write instead of panicking.
    /// That one is asked for now, before the gradients join the step's sums (it waits for the
    /// device, as reading the pool's peak does under a budget); any other device failure ends
    /// the step.
    fn micro_batch<M, F>(
        &self,
        ddp: &mut DataParallel,
        model: &M,
        idx: &[usize],
        loss_fn: &mut F,
        pool: bool,
    ) -> Result<Result<(Gradients, Tensor<1>), String>, BalanceError>
    where
        M: Module,
        F: FnMut(&M, &[usize]) -> Tensor<1>,
    {
        let seen = crate::health::reports_recorded();
        let attempt = contain_device_oom(|| {
            let loss = loss_fn(model, idx);
            let loss_value = loss.clone().inner();
            let grads: Gradients = ddp.weighted_loss(loss, idx.len()).backward();
            (grads, loss_value)
        });
        let Ok((grads, loss_value)) = attempt else {
            return Ok(attempt);
        };
        if !pool {
            return Ok(Ok((grads, loss_value)));
        }
        let tensors = DataParallel::micro_batch_tensors(model, &grads, &loss_value);
        match crate::health::check_tensors(&tensors, seen) {
            Ok(()) => Ok(Ok((grads, loss_value))),
            Err(fault) if fault.is_out_of_memory() => {
                // Handled here: the step need not fail on the device log's report.
                ddp.acknowledge_device_log();
                Ok(Err(first_line(&fault.message)))
            }
            Err(fault) => Err(BalanceError::DeviceFailed {
                rank: ddp.rank(),
                device: crate::device::device_name(&crate::transfer::model_device(model)),
                step: ddp.steps(),
                message: fault.message,
            }),
        }
    }

    /// What the step's all-reduce taught every rank, applied alike on each: caps lowered by
    /// out-of-memory retries, the measured all-reduce, and a better plan from the observed
    /// speeds. Returns whether the plan changed.
    fn learn_from(&mut self, stats: &StepStats) -> bool {
        let mut plan_changed = false;
        for (r, &note) in stats.rank_notes.iter().enumerate() {
            if note >= 1.0 {
                let limit = note as usize;
                self.cap_limits[r] = Some(self.cap_limits[r].map_or(limit, |l| l.min(limit)));
                plan_changed = true;
            }
        }
        let clock = self.options.simulated_clock(stats.rank_samples.len());
        if clock.is_none() {
            self.observe_all_reduce(stats);
        }
        if self.options.rebalance && self.options.initial != InitialPlan::Naive {
            let (started, compute) = match &clock {
                // Every rank starts together and takes exactly its samples over its speed.
                Some(speeds) => (
                    vec![0.0; speeds.len()],
                    stats
                        .rank_samples
                        .iter()
                        .zip(speeds)
                        .map(|(&n, v)| n as f64 / v)
                        .collect(),
                ),
                // Start stamps as offsets from rank 0's: meaningful between ranks of one host,
                // which is all a compute group compares.
                None => (
                    stats
                        .rank_started
                        .iter()
                        .map(|&s| crate::ddp::start_offset(stats.rank_started[0], s))
                        .collect(),
                    stats.rank_compute.clone(),
                ),
            };
            self.rebalancer.observe_timed(&stats.rank_samples, &started, &compute);
            if let Some(better) = self.rebalancer.propose(&self.plan, &self.reports) {
                self.plan = better;
                plan_changed = true;
            }
        }
        if plan_changed {
            self.apply_cap_limits();
            self.plan_changes.push(stats.step);
        }
        plan_changed
    }

    /// Once, after the first step, on a device whose pool is held to a budget: the optimizer's
    /// state now exists (burn's optimizers create it in their first step) and the pool holds it
    /// in pages of its own size, which the probes, run before any state existed, could not see.
    /// The cap in force is measured again as a step runs it (two micro-batches, the first one's
    /// gradients alive while the second runs, then summed), halved until its peak fits the
    /// budget, then raised by bisection towards the smallest size found over it. A lower cap
    /// applies to this rank from the next step on and reaches the other ranks in that step's
    /// all-reduce, as an out-of-memory cap does. Gradients of these measurements are dropped.
    fn refit_cap<M, F>(&mut self, ddp: &mut DataParallel, model: &M, loss_fn: &mut F, batch: &[usize])
    where
        M: Module,
        F: FnMut(&M, &[usize]) -> Tensor<1>,
    {
        let rank = ddp.rank();
        let planned = self.plan.ranks[rank].micro_batch;
        if planned == 0 || batch.is_empty() {
            return;
        }
        let budget = self.options.budget_bytes;
        let scratch = scratch_copy(model);
        let mut fits = |m: usize| {
            let idx: Vec<usize> = batch.iter().copied().cycle().take(m).collect();
            self.meter.reset_peak();
            let seen = crate::health::reports_recorded();
            let ran = contain_device_oom(|| {
                let mut sums = burn::optim::GradientsAccumulator::new();
                for _ in 0..2 {
                    let loss = loss_fn(&scratch, &idx);
                    let grads = loss.clone().backward();
                    // A failed allocation arrives on the buffers: this size does not fit.
                    crate::health::check_tensors(&DataParallel::micro_batch_tensors(&scratch, &grads, &loss), seen)?;
                    sums.accumulate(&scratch, burn::optim::GradientsParams::from_grads(grads, &scratch));
                }
                Ok::<(), crate::health::DeviceFault>(())
            });
            let peak = self.meter.peak();
            self.meter.reset_peak();
            let ran = match ran {
                Ok(Err(fault)) if fault.is_out_of_memory() => {
                    ddp.acknowledge_device_log();
                    false
                }
                Ok(done) => done.is_ok(),
                Err(_) => false,
            };
            ran && peak <= budget
        };
        if fits(planned) {
            return;
        }
        let (mut good, mut bad) = (planned / 2, planned);
        while good > 0 && !fits(good) {
            (good, bad) = (good / 2, good);
        }
        if good == 0 {
            // Not even one sample fits: the step's own check reports it.
            return;
        }
        for _ in 0..REFIT_BISECTIONS {
            let mid = good + (bad - good) / 2;
            if mid == good {
                break;
            }
            if fits(mid) {
                good = mid;
            } else {
                bad = mid;
            }
        }
        self.refitted_cap = Some(good);
        ddp.set_note(good as f32);
    }

    fn apply_cap_limits(&mut self) {
        for (i, limit) in self.cap_limits.iter().enumerate() {
            if let Some(limit) = *limit {
                let r = &mut self.plan.ranks[i];
                if r.micro_batch > limit {
                    *r = assignment(&self.reports[i], r.share, limit, &self.options.tunables);
                }
            }
        }
    }
}

/// The plan as a table, one row per device, and a summary line.
pub fn plan_table(plan: &Plan, reports: &[DeviceReport]) -> String {
    use std::fmt::Write;
    // As wide as the longest device name (an adapter's name can be long).
    let w = reports
        .iter()
        .map(|d| d.name.chars().count())
        .max()
        .unwrap_or(0)
        .max(14);
    let mut out = format!(
        "{:>4}  {:<w$} {:>10} {:>8} {:>6} {:>6} {:>12} {:>10} {:>10} {:>8}\n",
        "rank", "device", "memory", "speed", "share", "micro", "accumulate", "peak", "compute", "offload"
    );
    for (i, (r, d)) in plan.ranks.iter().zip(reports).enumerate() {
        let _ = writeln!(
            out,
            "{i:>4}  {:<w$} {:>10} {:>8.1} {:>6} {:>6} {:>12} {:>10} {:>9.3}s {:>8}",
            d.name,
            human_bytes(d.budget_bytes),
            // The speed the plan assumes at this rank's micro-batch.
            if r.samples_per_sec > 0.0 {
                r.samples_per_sec
            } else {
                d.samples_per_sec
            },
            r.share,
            r.micro_batch,
            r.accumulation,
            human_bytes(r.predicted_peak_bytes),
            r.predicted_compute_s,
            if r.offload { "host" } else { "-" }
        );
    }
    for (leader, report) in reports.iter().enumerate() {
        let members: Vec<String> = (0..plan.ranks.len())
            .filter(|&i| plan.group_of(i) == leader)
            .map(|i| i.to_string())
            .collect();
        if members.len() > 1 {
            let _ = writeln!(
                out,
                "ranks {} share one device ({}): planned as one, their speeds added",
                members.join(", "),
                report.compute_group.as_deref().unwrap_or("same cores")
            );
        }
    }
    let _ = writeln!(
        out,
        "global batch {}; predicted step {:.3}s ({:.1} samples/s)",
        plan.global_batch,
        plan.predicted_step_s,
        plan.global_batch as f64 / plan.predicted_step_s.max(1e-12)
    );
    out
}

/// One line per rank: the parameters whose optimizer state it holds, their share of the model,
/// the bytes (`bytes_per_param` each) and whether they live in device or host memory.
pub fn shard_table(plan: &ShardedPlan, bytes_per_param: u64) -> String {
    use std::fmt::Write;
    let params: u64 = match plan.sharding {
        Sharding::Off => plan.counts.first().copied().unwrap_or(0),
        _ => plan.counts.iter().sum(),
    };
    let mut out = String::new();
    for (i, (&count, &host)) in plan.counts.iter().zip(&plan.on_host).enumerate() {
        let _ = writeln!(
            out,
            "rank {i}: optimizer state for {count} parameters ({:.1} %), {} in {} memory",
            100.0 * count as f64 / params.max(1) as f64,
            human_bytes(count * bytes_per_param),
            if host { "host" } else { "device" }
        );
    }
    out
}

/// Bytes as MiB or GiB with one decimal (`unlimited` for `u64::MAX`).
pub fn human_bytes(bytes: u64) -> String {
    if bytes == u64::MAX {
        return "unlimited".into();
    }
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1}GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1}MiB", b / (1u64 << 20) as f64)
    }
}

/// Runs at the largest probe size before the sweep.
const PROBE_WARMUP: usize = 3;
/// Sweeps over the probe sizes, one timed window per size each (the median counts).
const PROBE_WINDOWS: usize = 3;
/// How long ranks measured one at a time wait for the rank being measured: a software device
/// (Mesa's Vulkan) takes about a minute to measure a ResNet where a CPU rank takes seconds, which
/// the collectives' 30-second default would take for a dead rank.
const SEQUENTIAL_PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);
/// Least duration of a timed window.
const PROBE_WINDOW: std::time::Duration = std::time::Duration::from_millis(40);
/// Runs one micro-batch's forward and backward, containing a device out-of-memory.
///
/// burn reports a failed device allocation by panicking with cubecl's error text (it has no
/// typed error for it), so the panic is caught here, at the micro-batch boundary, and its text
/// returned; the caller discards the micro-batch and retries it smaller, as on a CPU rank over
/// its budget. Any other panic continues unwinding.
fn contain_device_oom<T>(run: impl FnOnce() -> T) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(done) => Ok(done),
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()));
            match text {
                Some(text) if names_out_of_memory(&text) => Err(first_line(&text)),
                _ => std::panic::resume_unwind(payload),
            }
        }
    }
}

/// Whether a backend's panic text reports an exhausted device memory.
fn names_out_of_memory(text: &str) -> bool {
    crate::health::names_out_of_memory(text)
}

/// The first line of a backend's message (cubecl's carry a backtrace after it).
fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").to_string()
}

/// Where the probes read a micro-batch's peak bytes.
enum ProbeMeter<'a> {
    /// The process heap above this base (ranks as threads on simulated devices, one at a time).
    Heap(u64),
    /// The rank's own device meter.
    Device(&'a DeviceMeter),
}

impl ProbeMeter<'_> {
    fn reset(&self) {
        match self {
            Self::Heap(_) => memory::reset_peak(),
            Self::Device(meter) => meter.reset_peak(),
        }
    }

    fn read(&self) -> u64 {
        match self {
            Self::Heap(base) => memory::peak().saturating_sub(*base),
            Self::Device(meter) => meter.peak(),
        }
    }
}

/// A copy of `model` for measurements: the same parameters (no bytes copied) and running
/// statistics of its own, so the forward passes a probe runs leave the statistics of the model
/// that trains (a batch norm's running mean, say) as they were, on every rank alike.
fn scratch_copy<M: Module>(model: &M) -> M {
    model.valid().train()
}

/// Bisection steps of [`Balancer::refit_cap`] between the largest size that fits and the
/// smallest that does not.
const REFIT_BISECTIONS: usize = 3;

/// Least runs in a timed window.
const PROBE_RUNS: u32 = 2;

/// Sizes timed on each side of the chosen size after the first sweep.
const REFINE_SLOTS: usize = 4;

/// Times forward and backward at the probe sizes; then, around the size the planner would
/// pick from those (see [`refine_sizes`]), at a few sizes in between.
#[allow(clippy::too_many_arguments)]
fn probe_points<'c, M, F>(
    model: &M,
    loss_fn: &mut F,
    pool: &[usize],
    params: u64,
    options: &BalanceOptions,
    peak: &ProbeMeter<'_>,
    mut together: Option<&mut (dyn ballast_collectives::Communicator + 'c)>,
) -> Result<Vec<ProbePoint>, BalanceError>
where
    M: Module,
    F: FnMut(&M, &[usize]) -> Tensor<1>,
{
    let sizes: Vec<usize> = options
        .probe_sizes
        .iter()
        .copied()
        .filter(|&m| m <= pool.len())
        .collect();
    // Warm up at the largest size first: the allocator's pools (and its threshold for handing
    // big blocks straight to the OS) settle, so the sweep sees steady-state speeds.
    if let Some(&largest) = sizes.iter().max() {
        for _ in 0..PROBE_WARMUP {
            drop(loss_fn(model, &pool[..largest]).backward());
        }
    }
    let mut points = time_sizes(model, loss_fn, pool, &sizes, options, peak, together.as_deref_mut())?;
    let report = report_from_probes(&points, params, options);
    let mut extra: Vec<usize> = refine_sizes(&report, &options.tunables);
    // Ranks time the same sizes at the same time (every rank's refinements), so a rank that
    // shares a core never times a size while its partner idles.
    if let Some(comm) = together.as_deref_mut() {
        extra = comm.all_gather(&extra)?.concat();
    }
    extra.sort_unstable();
    extra.dedup();
    extra.retain(|&m| m <= pool.len() && !sizes.contains(&m));
    points.extend(time_sizes(model, loss_fn, pool, &extra, options, peak, together)?);
    points.sort_by_key(|p| p.samples);
    Ok(points)
}

/// Sizes worth timing after the first sweep: around the micro-batch the planner would choose
/// from the sweep, at offsets of 1, 2, 4, … (up to [`REFINE_SLOTS`] on each side), strictly
/// between the nearest measured sizes below and above it (above: or the memory cap, if
/// smaller), and the cap itself when it lies in the gap above. The sweep's sizes are a factor
/// of two apart, and the fastest size often lies in between: on a CPU just below the size whose
/// activations leave the caches, and seldom at a power of two, whose strides contend for the
/// same cache sets.
fn refine_sizes(report: &DeviceReport, t: &Tunables) -> Vec<usize> {
    let cap = ballast_balancer::memory_cap(report, t);
    if cap == 0 || t.micro_batch_policy == ballast_balancer::MicroBatchPolicy::Largest {
        return Vec::new();
    }
    let (chosen, _) = ballast_balancer::operating_point(report, cap, t);
    let measured = || report.speed_curve.iter().map(|p| p.micro_batch);
    let upper = measured().filter(|&m| m > chosen).min().map_or(cap, |m| m.min(cap));
    let lower = measured().filter(|&m| m < chosen).max().unwrap_or(0);
    let offsets = || (0..REFINE_SLOTS).map(|k| 1usize << k);
    let mut sizes: Vec<usize> = offsets()
        .map(|d| chosen + d)
        .take_while(|&m| m < upper)
        .chain(
            offsets()
                .filter_map(|d| chosen.checked_sub(d))
                .take_while(|&m| m > lower),
        )
        .collect();
    if upper == cap && cap > chosen && !measured().any(|m| m == cap) {
        sizes.push(cap);
    }
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// Seconds per micro-batch at each of `sizes` (the same on every rank in `together`, which
/// start each window at a barrier).
fn time_sizes<'c, M, F>(
    model: &M,
    loss_fn: &mut F,
    pool: &[usize],
    sizes: &[usize],
    options: &BalanceOptions,
    peak: &ProbeMeter<'_>,
    mut together: Option<&mut (dyn ballast_collectives::Communicator + 'c)>,
) -> Result<Vec<ProbePoint>, BalanceError>
where
    M: Module,
    F: FnMut(&M, &[usize]) -> Tensor<1>,
{
    // Seconds per micro-batch over a window of several runs, the median of three windows: a
    // slow spell of the machine spoils one window, and so does a lucky one (a rank sharing a
    // core whose partner is briefly idle runs up to twice as fast). All ranks start each window
    // together, and a window spans several runs and the scheduler's time slices, so ranks that
    // share a core measure the speed they get when both run. The sizes are swept three times,
    // so a spell costs one window of several sizes, not every window of one.
    let mut points: Vec<ProbePoint> = sizes
        .iter()
        .map(|&m| ProbePoint {
            samples: m,
            peak_bytes: 0,
            seconds: 0.0,
        })
        .collect();
    let mut windows = vec![Vec::with_capacity(PROBE_WINDOWS); points.len()];
    for _ in 0..PROBE_WINDOWS {
        for (point, times) in points.iter_mut().zip(&mut windows) {
            if let Some(comm) = together.as_deref_mut() {
                comm.barrier()?;
            }
            let m = point.samples;
            let started = Instant::now();
            let mut runs = 0u32;
            while runs < PROBE_RUNS || started.elapsed() < PROBE_WINDOW {
                peak.reset();
                let grads = loss_fn(model, &pool[..m]).backward();
                point.peak_bytes = point.peak_bytes.max(peak.read());
                drop(grads);
                runs += 1;
            }
            times.push(started.elapsed().as_secs_f64() / f64::from(runs) * options.slowdown.max(1.0));
        }
    }
    for (point, mut times) in points.iter_mut().zip(windows) {
        times.sort_by(f64::total_cmp);
        point.seconds = times[times.len() / 2];
    }
    Ok(points)
}

/// `share` samples in micro-batches of at most `cap`, at the speed measured nearest below `cap`.
fn assignment(report: &DeviceReport, share: usize, cap: usize, t: &Tunables) -> RankAssignment {
    let plan = RankPlan {
        share,
        micro_batch_cap: cap.max(1),
    };
    let largest = ballast_balancer::micro_batch_schedule(report, share, plan.micro_batch_cap, t)
        .into_iter()
        .max()
        .unwrap_or(0);
    let speed = ballast_balancer::speed_at(report, cap.max(1));
    RankAssignment {
        share,
        micro_batch: if share == 0 { 0 } else { cap.min(share) },
        accumulation: plan.accumulation_steps(),
        predicted_peak_bytes: report.fixed_bytes + largest as u64 * report.bytes_per_sample,
        predicted_compute_s: share as f64 / speed,
        offload: false,
        samples_per_sec: speed,
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
) -> Result<ShardedPlan, BalanceError> {
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

/// A device report from probe measurements: least-squares line through (samples, peak), plus
/// optimizer state that does not exist yet; the probes' speeds as the device's speed curve, and
/// the fastest of them as its speed. The fixed bytes add the optimizer state and the gradient
/// sums ([`GRADIENT_SUM_BYTES_PER_PARAM`]) to the fitted line's intercept.
pub fn report_from_probes(points: &[ProbePoint], params: u64, options: &BalanceOptions) -> DeviceReport {
    // The smallest micro-batches hit one-time allocations (kernel workspaces that appear from
    // batch 2 on); fit the line through the larger half, where the plan will operate.
    let upper: Vec<ProbePoint> = {
        let big: Vec<ProbePoint> = points.iter().copied().filter(|p| p.samples >= 4).collect();
        if big.len() >= 2 {
            big
        } else {
            points.to_vec()
        }
    };
    let n = upper.len() as f64;
    let (fixed, per_sample) = if upper.len() >= 2 {
        let mx = upper.iter().map(|p| p.samples as f64).sum::<f64>() / n;
        let my = upper.iter().map(|p| p.peak_bytes as f64).sum::<f64>() / n;
        let sxx: f64 = upper.iter().map(|p| (p.samples as f64 - mx).powi(2)).sum();
        let sxy: f64 = upper
            .iter()
            .map(|p| (p.samples as f64 - mx) * (p.peak_bytes as f64 - my))
            .sum();
        let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        // The line must not promise less than any measured point.
        let intercept = upper
            .iter()
            .map(|p| p.peak_bytes as f64 - slope * p.samples as f64)
            .fold(my - slope * mx, f64::max);
        (intercept, slope)
    } else {
        (upper.first().map_or(0.0, |p| p.peak_bytes as f64), 0.0)
    };
    let speed_curve: Vec<SpeedPoint> = points
        .iter()
        .map(|p| SpeedPoint {
            micro_batch: p.samples,
            samples_per_sec: p.samples as f64 / p.seconds.max(1e-9),
        })
        .collect();
    let speed = speed_curve.iter().map(|p| p.samples_per_sec).fold(0.0, f64::max);
    DeviceReport {
        name: "cpu".into(),
        budget_bytes: options.budget_bytes,
        fixed_bytes: fixed.max(0.0) as u64
            + (options.optimizer_bytes_per_param + GRADIENT_SUM_BYTES_PER_PARAM) * params,
        bytes_per_sample: per_sample.max(1.0).ceil() as u64,
        samples_per_sec: speed.max(1e-9),
        offloadable_bytes: options.optimizer_bytes_per_param * params,
        host: ballast_cluster::hostname(),
        host_available_bytes: ballast_cluster::host_memory(&options.proc_root)
            .ok()
            .map(|m| m.available),
        speed_curve,
        compute_group: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
