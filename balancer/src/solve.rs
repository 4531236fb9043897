//! The planner: from measured devices to shares, micro-batches and accumulation steps.
//!
//! # Model
//!
//! A device `i` reports a memory budget `M_i`, a fixed footprint `F_i` (parameters, gradients,
//! optimizer state, buffers) and a cost per sample in flight `P_i` (activations), both measured,
//! plus a throughput `v_i` in samples per second. With safety margin `μ`, the largest micro-batch
//! that fits is
//!
//! ```text
//! cap_i = floor((M_i · (1 − μ) − F_i) / P_i)
//! ```
//!
//! A device with `cap_i < 1` cannot hold one sample and gets share 0. The others share the
//! global batch `B`; rank `i` runs `s_i` samples in `k_i = ceil(s_i / cap_i)` micro-batches of
//! nearly equal size, taking `s_i / v_i` seconds. The predicted step time is the slowest rank's
//! compute plus one all-reduce.
//!
//! # Solver
//!
//! Start from shares proportional to speed (largest remainder), then move single samples from
//! the rank that finishes last to the rank that would finish earliest with one more, while that
//! lowers the maximum. The result is within one sample-time of the continuous optimum
//! `B / Σ v_i`, and it is a pure function of its inputs: every rank computes the same plan.

use serde::{Deserialize, Serialize};

use crate::{split_proportional, Error, RankPlan, Result};

/// What one device reports about itself (all measured, none guessed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// Human-readable device name (`cpu`, `cuda:0 NVIDIA ...`).
    pub name: String,
    /// Memory this rank may use, bytes.
    pub budget_bytes: u64,
    /// Bytes used whatever the micro-batch: parameters, gradients, optimizer state, buffers.
    pub fixed_bytes: u64,
    /// Extra bytes per sample in a micro-batch (activations).
    pub bytes_per_sample: u64,
    /// Training throughput, samples per second.
    pub samples_per_sec: f64,
    /// Part of `fixed_bytes` that can move to host memory (optimizer state: 8 bytes per
    /// parameter for Adam).
    #[serde(default)]
    pub offloadable_bytes: u64,
    /// Host this device sits in (devices on one host share its RAM).
    #[serde(default)]
    pub host: String,
    /// `MemAvailable` of that host, when known.
    #[serde(default)]
    pub host_available_bytes: Option<u64>,
}

/// When the planner moves optimizer state to host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum OffloadPolicy {
    /// Never: a device that cannot hold one sample gets share 0.
    Never,
    /// Only when the device could not take part otherwise (default).
    #[default]
    WhenNeeded,
    /// Also when it lets the device run fewer micro-batches per step (larger micro-batches).
    WhenFaster,
}

/// The planner's knobs, in one place.
///
/// The planner optimises **samples per second of the whole job** (equivalently, the predicted
/// step time for a fixed global batch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tunables {
    /// Fraction of each budget kept free for fragmentation and allocator slack (default 0.10;
    /// burn-cuda's pool reserves up to ~10 % above bytes in use on typical models).
    pub memory_margin: f64,
    /// Upper bound on any micro-batch (default 4096): beyond it throughput no longer improves.
    pub max_micro_batch: usize,
    /// Minimum predicted gain before an online re-plan is adopted (default 0.05 = 5 %).
    pub rebalance_threshold: f64,
    /// Consecutive steps the gain must persist before a re-plan (default 3): hysteresis
    /// against noise.
    pub rebalance_patience: u32,
    /// Weight of the newest observation in the smoothed per-rank speed (default 0.3: a shared
    /// machine's step times jitter by 10–20 %).
    pub smoothing: f64,
    /// When to offload optimizer state to the host (default: when needed).
    #[serde(default)]
    pub offload: OffloadPolicy,
    /// Fraction of a host's `MemAvailable` that offloaded state must leave free (default 0.20).
    #[serde(default = "default_host_margin")]
    pub host_memory_margin: f64,
}

fn default_host_margin() -> f64 {
    0.20
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            memory_margin: 0.10,
            max_micro_batch: 4096,
            rebalance_threshold: 0.05,
            rebalance_patience: 3,
            smoothing: 0.3,
            offload: OffloadPolicy::WhenNeeded,
            host_memory_margin: default_host_margin(),
        }
    }
}

/// One rank's part of a plan, with predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankAssignment {
    /// Samples per step.
    pub share: usize,
    /// Largest micro-batch this rank may run (its memory cap, or its share if smaller).
    pub micro_batch: usize,
    /// Micro-batches per step.
    pub accumulation: usize,
    /// Predicted peak memory at the largest micro-batch actually run, bytes.
    pub predicted_peak_bytes: u64,
    /// Predicted compute seconds per step.
    pub predicted_compute_s: f64,
    /// Optimizer state lives in host memory.
    #[serde(default)]
    pub offload: bool,
}

impl RankAssignment {
    /// As a [`RankPlan`] (share and cap), for the micro-batch sizes.
    pub fn rank_plan(&self) -> RankPlan {
        RankPlan {
            share: self.share,
            micro_batch_cap: self.micro_batch.max(1),
        }
    }
}

/// The micro-batch cap of device `r`, and whether it needs its optimizer state offloaded to get
/// it, under the tunables' offload policy.
pub fn cap_with_offload(r: &DeviceReport, t: &Tunables, share_hint: usize) -> (usize, bool) {
    let on_device = memory_cap(r, t);
    if t.offload == OffloadPolicy::Never || r.offloadable_bytes == 0 {
        return (on_device, false);
    }
    let lighter = DeviceReport {
        fixed_bytes: r.fixed_bytes.saturating_sub(r.offloadable_bytes),
        ..r.clone()
    };
    let offloaded = memory_cap(&lighter, t);
    let k = |cap: usize| if cap == 0 { usize::MAX } else { share_hint.div_ceil(cap) };
    let worth = match t.offload {
        OffloadPolicy::Never => false,
        OffloadPolicy::WhenNeeded => on_device == 0 && offloaded > 0,
        OffloadPolicy::WhenFaster => offloaded > 0 && (on_device == 0 || k(offloaded) < k(on_device)),
    };
    if worth {
        (offloaded, true)
    } else {
        (on_device, false)
    }
}

/// Every rank's assignment for one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Samples per step over all ranks.
    pub global_batch: usize,
    /// Indexed by rank.
    pub ranks: Vec<RankAssignment>,
    /// Predicted all-reduce seconds per step.
    pub allreduce_s: f64,
    /// Predicted step seconds: slowest rank plus all-reduce.
    pub predicted_step_s: f64,
}

impl Plan {
    /// Shares by rank.
    pub fn shares(&self) -> Vec<usize> {
        self.ranks.iter().map(|r| r.share).collect()
    }

    /// Micro-batch caps by rank.
    pub fn micro_batches(&self) -> Vec<usize> {
        self.ranks.iter().map(|r| r.micro_batch).collect()
    }

    /// Predicted step time of these shares under other speeds (for re-planning decisions).
    pub fn step_time_with(&self, samples_per_sec: &[f64]) -> f64 {
        self.ranks
            .iter()
            .zip(samples_per_sec)
            .map(|(r, v)| if r.share == 0 { 0.0 } else { r.share as f64 / v })
            .fold(0.0, f64::max)
            + self.allreduce_s
    }
}

/// The largest micro-batch device `r` can hold (0 if not even one sample fits).
pub fn memory_cap(r: &DeviceReport, t: &Tunables) -> usize {
    let usable = r.budget_bytes as f64 * (1.0 - t.memory_margin) - r.fixed_bytes as f64;
    if usable < r.bytes_per_sample as f64 || usable <= 0.0 {
        return 0;
    }
    let cap = if r.bytes_per_sample == 0 {
        t.max_micro_batch
    } else {
        (usable / r.bytes_per_sample as f64).floor() as usize
    };
    cap.min(t.max_micro_batch)
}

/// Plans a global batch of `global_batch` over the devices in `reports` (indexed by rank).
///
/// # Errors
/// [`Error::BadReport`] for an unusable report; [`Error::Infeasible`] when no device can hold one
/// sample, with every device's need and budget.
pub fn solve(reports: &[DeviceReport], global_batch: usize, allreduce_s: f64, t: &Tunables) -> Result<Plan> {
    for (rank, r) in reports.iter().enumerate() {
        if !(r.samples_per_sec.is_finite() && r.samples_per_sec > 0.0) {
            return Err(Error::BadReport {
                rank,
                reason: format!("throughput must be a positive number, got {}", r.samples_per_sec),
            });
        }
    }
    if global_batch == 0 || reports.is_empty() {
        return Err(Error::Infeasible {
            global_batch,
            details: "need a global batch of at least 1 and at least one device".into(),
        });
    }
    // The share hint for the "fewer micro-batches" test: an even split of the batch.
    let hint = global_batch.div_ceil(reports.len());
    let decided: Vec<(usize, bool)> = reports.iter().map(|r| cap_with_offload(r, t, hint)).collect();
    let caps: Vec<usize> = decided.iter().map(|d| d.0).collect();
    if caps.iter().all(|&c| c == 0) {
        let details = reports
            .iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "rank {i} ({}) needs {} fixed + {} per sample = {} bytes for one sample but has {} \
                     ({} after the {:.0}% margin)",
                    r.name,
                    r.fixed_bytes,
                    r.bytes_per_sample,
                    r.fixed_bytes + r.bytes_per_sample,
                    r.budget_bytes,
                    (r.budget_bytes as f64 * (1.0 - t.memory_margin)) as u64,
                    t.memory_margin * 100.0
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let hint = if t.offload == OffloadPolicy::Never || reports.iter().all(|r| r.offloadable_bytes == 0) {
            "give the devices more memory, shrink the model, or enable offload"
        } else {
            "give the devices more memory or shrink the model (offloading the optimizer state is not enough)"
        };
        return Err(Error::Infeasible {
            global_batch,
            details: format!("{details}; {hint}"),
        });
    }
    // Offloaded state must fit the hosts' RAM.
    let mut per_host: Vec<(&str, u64, Option<u64>)> = Vec::new();
    for (r, &(_, off)) in reports.iter().zip(&decided) {
        if !off {
            continue;
        }
        match per_host.iter_mut().find(|h| h.0 == r.host) {
            Some(h) => h.1 += r.offloadable_bytes,
            None => per_host.push((&r.host, r.offloadable_bytes, r.host_available_bytes)),
        }
    }
    for (host, needed, available) in per_host {
        if let Some(avail) = available {
            let usable = (avail as f64 * (1.0 - t.host_memory_margin)) as u64;
            if needed > usable {
                return Err(Error::Infeasible {
                    global_batch,
                    details: format!(
                        "offloading optimizer state needs {needed} bytes of RAM on host {host:?} but only {usable} \
                         are usable (MemAvailable {avail} minus a {:.0}% margin); free host memory or give the \
                         devices more memory",
                        t.host_memory_margin * 100.0
                    ),
                });
            }
        }
    }
    let speeds: Vec<f64> = reports
        .iter()
        .zip(&caps)
        .map(|(r, &c)| if c == 0 { 0.0 } else { r.samples_per_sec })
        .collect();
    let mut shares = split_proportional(global_batch, &speeds)?;
    // Greedy refinement: move one sample from the last finisher to the earliest finisher.
    let time = |i: usize, s: usize| s as f64 / speeds[i];
    loop {
        let (slow, t_slow) = (0..shares.len())
            .filter(|&i| shares[i] > 0)
            .map(|i| (i, time(i, shares[i])))
            .fold((usize::MAX, f64::MIN), |a, b| if b.1 > a.1 { b } else { a });
        let best = (0..shares.len())
            .filter(|&i| speeds[i] > 0.0 && i != slow)
            .map(|i| (i, time(i, shares[i] + 1)))
            .fold((usize::MAX, f64::MAX), |a, b| if b.1 < a.1 { b } else { a });
        if best.0 == usize::MAX || best.1 >= t_slow - 1e-12 {
            break;
        }
        shares[slow] -= 1;
        shares[best.0] += 1;
    }
    let ranks: Vec<RankAssignment> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let share = shares[i];
            let micro_batch = if share == 0 { 0 } else { caps[i].min(share) };
            let plan = RankPlan {
                share,
                micro_batch_cap: micro_batch.max(1),
            };
            let largest = plan.micro_batches().into_iter().max().unwrap_or(0);
            let offload = decided[i].1 && share > 0;
            let fixed = if offload {
                r.fixed_bytes - r.offloadable_bytes
            } else {
                r.fixed_bytes
            };
            RankAssignment {
                share,
                micro_batch,
                accumulation: plan.accumulation_steps(),
                predicted_peak_bytes: fixed + largest as u64 * r.bytes_per_sample,
                predicted_compute_s: if share == 0 { 0.0 } else { time(i, share) },
                offload,
            }
        })
        .collect();
    let slowest = ranks.iter().map(|r| r.predicted_compute_s).fold(0.0, f64::max);
    Ok(Plan {
        global_batch,
        ranks,
        allreduce_s,
        predicted_step_s: slowest + allreduce_s,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn report(budget: u64, fixed: u64, per: u64, speed: f64) -> DeviceReport {
        DeviceReport {
            name: "test".into(),
            budget_bytes: budget,
            fixed_bytes: fixed,
            bytes_per_sample: per,
            samples_per_sec: speed,
            offloadable_bytes: 0,
            host: String::new(),
            host_available_bytes: None,
        }
    }

    /// A device whose budget cannot hold optimizer state plus one sample gets offload and a
    /// share; with offload disabled it gets share 0.
    #[test]
    fn offload_gives_a_small_device_a_share() {
        // 1M params with Adam: 4 MB params+grads... fixed 16 MB of which 8 MB is Adam state.
        let small = DeviceReport {
            offloadable_bytes: 8_000_000,
            ..report(16_500_000, 16_000_000, 100_000, 1.0)
        };
        let big = report(100_000_000, 16_000_000, 100_000, 2.0);
        let with = solve(&[big.clone(), small.clone()], 30, 0.0, &Tunables::default()).unwrap();
        assert!(with.ranks[1].offload && with.ranks[1].share > 0, "{with:?}");
        assert!(!with.ranks[0].offload);
        let never = Tunables {
            offload: OffloadPolicy::Never,
            ..Tunables::default()
        };
        let without = solve(&[big, small], 30, 0.0, &never).unwrap();
        assert_eq!(without.ranks[1].share, 0);
        assert!(!without.ranks[1].offload);
    }

    #[test]
    fn offload_beyond_host_ram_is_refused_with_numbers() {
        let small = DeviceReport {
            offloadable_bytes: 8_000_000,
            host: "node1".into(),
            host_available_bytes: Some(5_000_000),
            ..report(16_500_000, 16_000_000, 100_000, 1.0)
        };
        let err = solve(&[small], 8, 0.0, &Tunables::default()).unwrap_err().to_string();
        assert!(
            err.contains("needs 8000000 bytes of RAM on host \"node1\" but only 4000000"),
            "{err}"
        );
        assert!(err.contains("MemAvailable 5000000"), "{err}");
    }

    prop_compose! {
        fn device()(budget in 1u64..10_000_000, fixed in 0u64..2_000_000, per in 1u64..200_000, speed in 0.1f64..1000.0) -> DeviceReport {
            report(budget, fixed, per, speed)
        }
    }

    proptest! {
        #[test]
        fn plans_keep_every_invariant(devices in proptest::collection::vec(device(), 1..8), b in 1usize..2000) {
            let t = Tunables::default();
            match solve(&devices, b, 0.001, &t) {
                Err(Error::Infeasible { .. }) => {
                    prop_assert!(devices.iter().all(|d| memory_cap(d, &t) == 0));
                }
                Err(e) => prop_assert!(false, "{}", e),
                Ok(plan) => {
                    // Shares add up to the batch exactly.
                    prop_assert_eq!(plan.shares().iter().sum::<usize>(), b);
                    for (d, r) in devices.iter().zip(&plan.ranks) {
                        if r.share == 0 { continue; }
                        // The micro-batch fits the budget with its margin.
                        prop_assert!(!r.offload);
                        let need = d.fixed_bytes as f64 + r.micro_batch as f64 * d.bytes_per_sample as f64;
                        prop_assert!(need <= d.budget_bytes as f64 * (1.0 - t.memory_margin) + 1e-6);
                        prop_assert!(r.predicted_peak_bytes as f64 <= d.budget_bytes as f64 * (1.0 - t.memory_margin) + 1e-6);
                        // Accumulation covers the share.
                        prop_assert!(r.accumulation * r.micro_batch >= r.share);
                    }
                    // Within one sample-time (of the slowest eligible device) of the continuous optimum.
                    let eligible: Vec<&DeviceReport> = devices.iter().filter(|d| memory_cap(d, &t) > 0).collect();
                    let total_speed: f64 = eligible.iter().map(|d| d.samples_per_sec).sum();
                    let optimum = b as f64 / total_speed;
                    let slowest_sample = eligible.iter().map(|d| 1.0 / d.samples_per_sec).fold(0.0, f64::max);
                    let compute = plan.predicted_step_s - plan.allreduce_s;
                    prop_assert!(compute <= optimum + slowest_sample + 1e-9, "{} > {} + {}", compute, optimum, slowest_sample);
                    // Deterministic.
                    prop_assert_eq!(solve(&devices, b, 0.001, &t).unwrap(), plan);
                }
            }
        }

        #[test]
        fn shares_follow_throughput(speeds in proptest::collection::vec(1.0f64..100.0, 2..6), b in 100usize..5000) {
            let devices: Vec<DeviceReport> = speeds.iter().map(|&v| report(1 << 40, 0, 1, v)).collect();
            let plan = solve(&devices, b, 0.0, &Tunables::default()).unwrap();
            let total: f64 = speeds.iter().sum();
            for (r, v) in plan.ranks.iter().zip(&speeds) {
                let quota = b as f64 * v / total;
                prop_assert!((r.share as f64 - quota).abs() <= 1.0 + quota * 1e-9 + 1.0, "share {} quota {}", r.share, quota);
            }
        }
    }

    #[test]
    fn a_device_without_room_for_one_sample_gets_nothing() {
        let devices = [report(1000, 100, 10, 1.0), report(100, 95, 10, 5.0)];
        let plan = solve(&devices, 10, 0.0, &Tunables::default()).unwrap();
        assert_eq!(plan.shares(), vec![10, 0]);
        assert_eq!(plan.ranks[0].micro_batch, 10);
        assert_eq!(plan.ranks[1].accumulation, 0);
    }

    #[test]
    fn infeasible_plans_name_every_device() {
        let devices = [report(100, 95, 10, 1.0), report(50, 60, 1, 1.0)];
        let err = solve(&devices, 8, 0.0, &Tunables::default()).unwrap_err().to_string();
        assert!(
            err.contains("rank 0 (test) needs 95 fixed + 10 per sample = 105 bytes"),
            "{err}"
        );
        assert!(err.contains("rank 1"), "{err}");
        assert!(err.contains("enable offload"), "{err}");
    }

    #[test]
    fn bad_reports_are_errors() {
        let err = solve(&[report(100, 0, 1, 0.0)], 8, 0.0, &Tunables::default()).unwrap_err();
        assert!(
            err.to_string().contains("throughput must be a positive number"),
            "{err}"
        );
    }

    #[test]
    fn memory_caps_the_micro_batch_and_accumulation_covers_the_rest() {
        // 3:2:1 budgets, equal speeds.
        let devices = [
            report(3000, 500, 100, 1.0),
            report(2000, 500, 100, 1.0),
            report(1000, 500, 100, 1.0),
        ];
        let plan = solve(&devices, 30, 0.0, &Tunables::default()).unwrap();
        assert_eq!(plan.micro_batches(), vec![10, 10, 4]);
        assert_eq!(plan.shares(), vec![10, 10, 10]);
        assert_eq!(plan.ranks[2].accumulation, 3);
    }
}
