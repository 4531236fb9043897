//! Measuring a device: forward and backward at a sweep of micro-batch sizes, refined around
//! the size the planner would pick, and the device report fitted to them.

use super::*;

/// Runs at the largest probe size before the sweep.
pub(super) const PROBE_WARMUP: usize = 3;

/// Sweeps over the probe sizes, one timed window per size each (the median counts).
pub(super) const PROBE_WINDOWS: usize = 3;

/// How long ranks measured one at a time wait for the rank being measured: a software device
/// (Mesa's Vulkan) takes about a minute to measure a ResNet where a CPU rank takes seconds, which
/// the collectives' 30-second default would take for a dead rank.
pub(super) const SEQUENTIAL_PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Least duration of a timed window.
pub(super) const PROBE_WINDOW: std::time::Duration = std::time::Duration::from_millis(40);

/// Where the probes read a micro-batch's peak bytes.
pub(super) enum ProbeMeter<'a> {
    /// The process heap above this base (ranks as threads on simulated devices, one at a time).
    Heap(u64),
    /// The rank's own device meter.
    Device(&'a DeviceMeter),
}

impl ProbeMeter<'_> {
    pub(super) fn reset(&self) {
        match self {
            Self::Heap(_) => memory::reset_peak(),
            Self::Device(meter) => meter.reset_peak(),
        }
    }

    pub(super) fn read(&self) -> u64 {
        match self {
            Self::Heap(base) => memory::peak().saturating_sub(*base),
            Self::Device(meter) => meter.peak(),
        }
    }
}

/// A copy of `model` for measurements: the same parameters (no bytes copied) and running
/// statistics of its own, so the forward passes a probe runs leave the statistics of the model
/// that trains (a batch norm's running mean, say) as they were, on every rank alike.
pub(super) fn scratch_copy<M: Module>(model: &M) -> M {
    model.valid().train()
}

/// Least runs in a timed window.
pub(super) const PROBE_RUNS: u32 = 2;

/// Sizes timed on each side of the chosen size after the first sweep.
pub(super) const REFINE_SLOTS: usize = 4;

/// What one rank's probes run on: the scratch model, its loss on pool samples, the meter of
/// its peak memory and, when ranks time each size at the same moment, their communicator.
struct Sweep<'s, 'c, M, F> {
    model: &'s M,
    loss_fn: &'s mut F,
    pool: &'s [usize],
    options: &'s BalanceOptions,
    peak: &'s ProbeMeter<'s>,
    together: Option<&'s mut (dyn ballast_collectives::Communicator + 'c)>,
}

impl<M, F> Sweep<'_, '_, M, F>
where
    M: Module,
    F: FnMut(&M, &[usize]) -> Tensor<1>,
{
    /// Times forward and backward at the probe sizes; then, around the size the planner would
    /// pick from those (see [`refine_sizes`]), at a few sizes in between.
    fn points(&mut self, params: u64) -> Result<Vec<ProbePoint>, Error> {
        let (model, pool, options) = (self.model, self.pool, self.options);
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
                drop((self.loss_fn)(model, &pool[..largest]).backward());
            }
        }
        let mut points = self.time(&sizes)?;
        let report = report_from_probes(&points, params, options);
        let mut extra: Vec<usize> = refine_sizes(&report, &options.tunables);
        // Ranks time the same sizes at the same time (every rank's refinements), so a rank that
        // shares a core never times a size while its partner idles.
        if let Some(comm) = self.together.as_deref_mut() {
            extra = comm.all_gather(&extra)?.concat();
        }
        extra.sort_unstable();
        extra.dedup();
        extra.retain(|&m| m <= pool.len() && !sizes.contains(&m));
        points.extend(self.time(&extra)?);
        points.sort_by_key(|p| p.samples);
        Ok(points)
    }

    /// Seconds per micro-batch at each of `sizes` (the same on every rank in `together`, which
    /// start each window at a barrier).
    fn time(&mut self, sizes: &[usize]) -> Result<Vec<ProbePoint>, Error> {
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
                if let Some(comm) = self.together.as_deref_mut() {
                    comm.barrier()?;
                }
                let m = point.samples;
                let started = Instant::now();
                let mut runs = 0u32;
                while runs < PROBE_RUNS || started.elapsed() < PROBE_WINDOW {
                    self.peak.reset();
                    let grads = (self.loss_fn)(self.model, &self.pool[..m]).backward();
                    point.peak_bytes = point.peak_bytes.max(self.peak.read());
                    drop(grads);
                    runs += 1;
                }
                times.push(started.elapsed().as_secs_f64() / f64::from(runs) * self.options.slowdown.max(1.0));
            }
        }
        for (point, mut times) in points.iter_mut().zip(windows) {
            times.sort_by(f64::total_cmp);
            point.seconds = times[times.len() / 2];
        }
        Ok(points)
    }
}

/// Sizes worth timing after the first sweep: around the micro-batch the planner would choose
/// from the sweep, at offsets of 1, 2, 4, … (up to [`REFINE_SLOTS`] on each side), strictly
/// between the nearest measured sizes below and above it (above: or the memory cap, if
/// smaller), and the cap itself when it lies in the gap above. The sweep's sizes are a factor
/// of two apart, and the fastest size often lies in between: on a CPU just below the size whose
/// activations leave the caches, and seldom at a power of two, whose strides contend for the
/// same cache sets.
pub(super) fn refine_sizes(report: &DeviceReport, t: &Tunables) -> Vec<usize> {
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

/// A device report from probe measurements: the memory line through (samples, peak)
/// ([`ballast_balancer::fit_memory_line`]), plus
/// optimizer state that does not exist yet; the probes' speeds as the device's speed curve, and
/// the fastest of them as its speed. The fixed bytes add the optimizer state and the gradient
/// sums ([`GRADIENT_SUM_BYTES_PER_PARAM`]) to the fitted line's intercept.
pub fn report_from_probes(points: &[ProbePoint], params: u64, options: &BalanceOptions) -> DeviceReport {
    let peaks: Vec<(usize, u64)> = points.iter().map(|p| (p.samples, p.peak_bytes)).collect();
    let (fixed, per_sample) = ballast_balancer::fit_memory_line(&peaks);
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

impl Balancer {
    /// Measures this device with `loss_fn` on the first samples of `pool`, all-gathers every
    /// rank's report and solves the first plan for `global_batch`.
    ///
    /// `meter` must have been started before the model was built, so the model's own memory
    /// counts as device memory.
    ///
    /// # Errors
    /// Collective errors; [`Error::Plan`] when no plan fits.
    pub fn probe<M, F>(
        ddp: &mut DataParallel,
        model: &M,
        loss_fn: &mut F,
        pool: &[usize],
        global_batch: usize,
        meter: DeviceMeter,
        options: BalanceOptions,
    ) -> Result<Self, Error>
    where
        M: Module,
        F: FnMut(&M, &[usize]) -> Tensor<1>,
    {
        if options.budget_bytes != u64::MAX && !meter.reads_pool() && !memory::is_counting() {
            return Err(Error::NotCounting { rank: ddp.rank() });
        }
        let params = model.num_params() as u64;
        let points = measure(ddp, &scratch_copy(model), loss_fn, pool, params, &options, &meter)?;
        let report = own_report(ddp.rank(), model, &points, params, &options, &meter);
        let mut reports: Vec<DeviceReport> = ddp.comm().all_gather(&report)?;
        let sharded_plan = match options.optimizer_sharding {
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
        let mut balancer = Self::planned(reports, meter, options, global_batch)?;
        match sharded_plan {
            Some(placed) => balancer.start_shard(ddp.rank(), model, placed)?,
            None => balancer.start_host_optimizer(model)?,
        }
        Ok(balancer)
    }

    /// A balancer over every rank's report, with its first plan.
    fn planned(
        reports: Vec<DeviceReport>,
        meter: DeviceMeter,
        options: BalanceOptions,
        global_batch: usize,
    ) -> Result<Self, Error> {
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
            swap: crate::optim::offload::SwapMonitor::new(&options.proc_root),
            host: None,
            sharded: None,
            options,
        };
        balancer.swap.poll();
        balancer.plan = balancer.initial_plan(global_batch)?;
        Ok(balancer)
    }

    /// If any rank keeps its optimizer state on the host, every rank runs the host Adam's
    /// arithmetic (a GPU rank with it on the GPU, chunk by chunk over managed memory): the
    /// replicas must apply bit-identical updates, and burn's Adam rounds differently.
    ///
    /// In a mixed precision the host Adam takes the f32 master over at its first step.
    fn start_host_optimizer<M: Module>(&mut self, model: &M) -> Result<(), Error> {
        if self.options.host_optimizer || self.plan.ranks.iter().any(|r| r.offload) {
            let host = crate::optim::offload::HostOffload::for_device(
                model,
                self.options.adam,
                &self.options.proc_root,
                self.meter.gpu(),
            )?;
            self.meter.exclude(host.host_bytes());
            self.host = Some(host);
        }
        Ok(())
    }
}

/// This rank's probe points on `scratch`. On a shared heap (ranks as threads on simulated
/// devices) the ranks are measured one at a time; otherwise every rank times each size at the
/// same time, so ranks that share a core measure it under the load they will run under. A
/// simulated speed replaces the measured seconds.
fn measure<M, F>(
    ddp: &mut DataParallel,
    scratch: &M,
    loss_fn: &mut F,
    pool: &[usize],
    params: u64,
    options: &BalanceOptions,
    meter: &DeviceMeter,
) -> Result<Vec<ProbePoint>, Error>
where
    M: Module,
    F: FnMut(&M, &[usize]) -> Tensor<1>,
{
    let mut points = if options.shared_heap {
        // The others wait at the barrier with constant memory, as long as a slow device takes
        // to measure (every rank raises the deadline alike).
        let timeout = ddp.comm().timeout();
        ddp.comm().set_timeout(timeout.max(SEQUENTIAL_PROBE_WAIT));
        let mut mine = Vec::new();
        for turn in 0..ddp.world_size() {
            if turn == ddp.rank() {
                // A device with a pool of its own is measured there; a simulated one is the
                // shared heap above what every rank holds now, less this rank's parameters
                // (the replica, and its f32 master in a mixed precision), which a pool counts.
                let base = memory::in_use().saturating_sub(ddp.precision().resident_bytes_per_param() * params);
                let source = if meter.reads_pool() {
                    ProbeMeter::Device(meter)
                } else {
                    ProbeMeter::Heap(base)
                };
                mine = Sweep {
                    model: scratch,
                    loss_fn: &mut *loss_fn,
                    pool,
                    options,
                    peak: &source,
                    together: None,
                }
                .points(params)?;
            }
            ddp.comm().barrier()?;
        }
        ddp.comm().set_timeout(timeout);
        mine
    } else {
        let source = ProbeMeter::Device(meter);
        Sweep {
            model: scratch,
            loss_fn,
            pool,
            options,
            peak: &source,
            together: Some(ddp.comm()),
        }
        .points(params)?
    };
    if let Some(speed) = options.simulated_speed(ddp.rank()) {
        for p in &mut points {
            p.seconds = p.samples as f64 / speed;
        }
    }
    Ok(points)
}

/// This rank's device report from its probe points, named after its device. Sharded state is
/// placed by the planner (`solve_sharded`), so it is not added whole to the device's fixed
/// bytes. CPU ranks pinned to the same cores share them (ranks as threads stand for separate
/// simulated devices; GPU ranks each have their own device).
fn own_report<M: Module>(
    rank: usize,
    model: &M,
    points: &[ProbePoint],
    params: u64,
    options: &BalanceOptions,
    meter: &DeviceMeter,
) -> DeviceReport {
    let stateless = BalanceOptions {
        optimizer_bytes_per_param: 0,
        ..options.clone()
    };
    let state = if options.optimizer_sharding == Sharding::Off {
        options
    } else {
        &stateless
    };
    let mut report = report_from_probes(points, params, state);
    report.name = crate::device::device_name(&crate::transfer::model_device(model));
    if !options.shared_heap && !meter.reads_pool() && options.simulated_speed(rank).is_none() {
        report.compute_group = ballast_cluster::cpu_affinity().map(|cpus| format!("{}:cpus {cpus}", report.host));
    }
    report
}
