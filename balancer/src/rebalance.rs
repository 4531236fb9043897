//! Online rebalancing: per-rank speeds from observed step times, and a re-plan only when it
//! pays.
//!
//! Every rank feeds the same observations (the per-rank compute times travel in the step's
//! all-reduce), so every rank's `Rebalancer` reaches the same decision at the same step.
//!
//! Hysteresis has two parts: a candidate plan must beat the current one by
//! [`Tunables::rebalance_threshold`] (default 5 %) under the smoothed speeds, and must keep doing
//! so for [`Tunables::rebalance_patience`] consecutive steps. A plan adopted under the current
//! speeds predicts no gain over itself, so the plan then stays put.

use crate::{solve, DeviceReport, Plan, Tunables};

/// Smoothed per-rank speeds and the re-plan decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebalancer {
    tunables: Tunables,
    sec_per_sample: Vec<Option<f64>>,
    streak: u32,
}

impl Rebalancer {
    /// A rebalancer for `world` ranks.
    pub fn new(world: usize, tunables: Tunables) -> Self {
        Self {
            tunables,
            sec_per_sample: vec![None; world],
            streak: 0,
        }
    }

    /// Records one step: samples and compute seconds of every rank. Ranks that ran no sample
    /// keep their previous estimate.
    pub fn observe(&mut self, samples: &[usize], compute_s: &[f64]) {
        let a = self.tunables.smoothing.clamp(0.0, 1.0);
        for ((est, &n), &t) in self.sec_per_sample.iter_mut().zip(samples).zip(compute_s) {
            if n == 0 || !(t.is_finite() && t > 0.0) {
                continue;
            }
            let x = t / n as f64;
            *est = Some(match *est {
                None => x,
                Some(prev) => a * x + (1.0 - a) * prev,
            });
        }
    }

    /// Smoothed samples/s per rank, falling back to the reports where nothing was observed.
    pub fn speeds(&self, reports: &[DeviceReport]) -> Vec<f64> {
        self.sec_per_sample
            .iter()
            .zip(reports)
            .map(|(e, r)| e.map_or(r.samples_per_sec, |s| 1.0 / s))
            .collect()
    }

    /// A better plan, when one beats `current` by the threshold for `patience` steps in a row.
    pub fn propose(&mut self, current: &Plan, reports: &[DeviceReport]) -> Option<Plan> {
        let speeds = self.speeds(reports);
        let updated: Vec<DeviceReport> = reports
            .iter()
            .zip(&speeds)
            .map(|(r, &v)| DeviceReport {
                samples_per_sec: v,
                ..r.clone()
            })
            .collect();
        let candidate = solve(&updated, current.global_batch, current.allreduce_s, &self.tunables).ok()?;
        let now = current.step_time_with(&speeds);
        let gain = (now - candidate.predicted_step_s) / now;
        if gain > self.tunables.rebalance_threshold && candidate.shares() != current.shares() {
            self.streak += 1;
            if self.streak >= self.tunables.rebalance_patience {
                self.streak = 0;
                return Some(candidate);
            }
        } else {
            self.streak = 0;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reports(n: usize) -> Vec<DeviceReport> {
        (0..n)
            .map(|_| DeviceReport {
                name: "cpu".into(),
                budget_bytes: 1 << 30,
                fixed_bytes: 0,
                bytes_per_sample: 1,
                samples_per_sec: 100.0,
                offloadable_bytes: 0,
                host: String::new(),
                host_available_bytes: None,
            })
            .collect()
    }

    #[test]
    fn converges_to_speed_proportional_shares_and_stays() {
        let t = Tunables::default();
        let reps = reports(3);
        let mut plan = solve(&reps, 120, 0.0, &t).unwrap();
        assert_eq!(plan.shares(), vec![40, 40, 40]);
        let mut rb = Rebalancer::new(3, t);
        let true_speed = [200.0, 100.0, 100.0];
        let mut changes = Vec::new();
        for step in 0..30 {
            let shares = plan.shares();
            let times: Vec<f64> = shares.iter().zip(true_speed).map(|(&s, v)| s as f64 / v).collect();
            rb.observe(&shares, &times);
            if let Some(p) = rb.propose(&plan, &reps) {
                changes.push(step);
                plan = p;
            }
        }
        assert_eq!(plan.shares(), vec![60, 30, 30]);
        assert_eq!(changes.len(), 1, "re-planned at steps {changes:?}");
        assert!(changes[0] < 10);
    }

    #[test]
    fn noise_below_the_threshold_does_not_replan() {
        let t = Tunables::default();
        let reps = reports(2);
        let plan = solve(&reps, 100, 0.0, &t).unwrap();
        let mut rb = Rebalancer::new(2, t);
        for step in 0..50 {
            let jitter = if step % 2 == 0 { 1.03 } else { 0.97 };
            rb.observe(&[50, 50], &[0.5 * jitter, 0.5 / jitter]);
            assert!(rb.propose(&plan, &reps).is_none(), "step {step}");
        }
    }
}
