//! Plans that do not weigh speed: the baselines the balanced plan is compared against, and the
//! rank assignment they (and a cap lowered after an out-of-memory) are built from.

use crate::{
    compute_groups, memory_cap, solve::accumulation_and_peak, speed_at, split_proportional, DeviceReport, Error, Plan,
    RankAssignment, Result, Tunables,
};

/// Which baseline [`solve_equal`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EqualCaps {
    /// Equal shares, each device at its own memory cap.
    PerDevice,
    /// Equal shares, every device at the smallest device's cap: what data-parallel training
    /// without a balancer does on unequal cards.
    Smallest,
}

impl RankAssignment {
    /// `share` samples of `report`'s device in micro-batches of at most `cap`, predicted at the
    /// speed measured nearest below `cap`.
    pub fn at_cap(report: &DeviceReport, share: usize, cap: usize, t: &Tunables) -> Self {
        let (accumulation, predicted_peak_bytes) = accumulation_and_peak(report, share, cap, report.fixed_bytes, t);
        let speed = speed_at(report, cap.max(1));
        RankAssignment {
            share,
            micro_batch: if share == 0 { 0 } else { cap.min(share) },
            accumulation,
            predicted_peak_bytes,
            predicted_compute_s: share as f64 / speed,
            offload: false,
            samples_per_sec: speed,
        }
    }
}

/// Equal shares of `global_batch` (they differ by at most one sample), with micro-batch caps
/// as `caps` says, and the step time those speeds predict.
///
/// # Errors
/// [`Error::Infeasible`] when a device cannot hold one sample; [`Error::BadWeights`] with no
/// device.
pub fn solve_equal(reports: &[DeviceReport], global_batch: usize, caps: EqualCaps, t: &Tunables) -> Result<Plan> {
    let shares = split_proportional(global_batch, &vec![1.0; reports.len()])?;
    let own: Vec<usize> = reports.iter().map(|r| memory_cap(r, t)).collect();
    if own.contains(&0) {
        return Err(Error::Infeasible {
            global_batch,
            details: format!("equal shares need every device to hold a sample; caps are {own:?}"),
        });
    }
    let smallest = own.iter().copied().min().unwrap_or(1);
    let ranks = shares
        .iter()
        .zip(reports.iter().zip(&own))
        .map(|(&share, (report, &cap))| {
            let cap = match caps {
                EqualCaps::PerDevice => cap,
                EqualCaps::Smallest => smallest,
            };
            RankAssignment::at_cap(report, share, cap.min(share.max(1)), t)
        })
        .collect();
    let mut plan = Plan {
        global_batch,
        ranks,
        allreduce_s: 0.0,
        predicted_step_s: 0.0,
        groups: compute_groups(reports),
    };
    let speeds: Vec<f64> = plan.ranks.iter().map(|r| r.samples_per_sec).collect();
    plan.predicted_step_s = plan.step_time_with(&speeds);
    Ok(plan)
}

/// The memory line through measured `(micro-batch, peak bytes)` points: `(fixed, per_sample)`
/// by least squares over the points of 4 samples or more (the smallest micro-batches hit
/// one-time allocations, such as kernel workspaces that appear from batch 2 on), or over all
/// points when fewer than two are that large. The intercept is raised until the line promises
/// no less than any point it was fitted to. One point gives a flat line at its peak; none, 0.
pub fn fit_memory_line(points: &[(usize, u64)]) -> (f64, f64) {
    let big: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.0 >= 4)
        .map(|&(n, b)| (n as f64, b as f64))
        .collect();
    let fit: Vec<(f64, f64)> = if big.len() >= 2 {
        big
    } else {
        points.iter().map(|&(n, b)| (n as f64, b as f64)).collect()
    };
    if fit.len() < 2 {
        return (fit.first().map_or(0.0, |p| p.1), 0.0);
    }
    let n = fit.len() as f64;
    let mx = fit.iter().map(|p| p.0).sum::<f64>() / n;
    let my = fit.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = fit.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = fit.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let intercept = fit.iter().map(|p| p.1 - slope * p.0).fold(my - slope * mx, f64::max);
    (intercept, slope)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::SpeedPoint;

    fn report(budget_bytes: u64, bytes_per_sample: u64, samples_per_sec: f64) -> DeviceReport {
        DeviceReport {
            name: "test".into(),
            budget_bytes,
            fixed_bytes: 1000,
            bytes_per_sample,
            samples_per_sec,
            offloadable_bytes: 0,
            host: String::new(),
            host_available_bytes: None,
            speed_curve: vec![SpeedPoint {
                micro_batch: 1,
                samples_per_sec,
            }],
            compute_group: None,
        }
    }

    proptest! {
        #[test]
        fn equal_plans_split_evenly_within_each_cap(
            batch in 1usize..2000,
            devices in proptest::collection::vec((1u64..64, 1.0f64..100.0), 1..8),
        ) {
            let t = Tunables::default();
            // Budgets that hold `cap` samples after the fixed bytes and the margin.
            let budget = |cap: u64| ((1000.0 + (cap as f64 + 0.5) * 100.0) / (1.0 - t.memory_margin)) as u64;
            let reports: Vec<DeviceReport> =
                devices.iter().map(|&(cap, speed)| report(budget(cap), 100, speed)).collect();
            let own: Vec<usize> = reports.iter().map(|r| memory_cap(r, &t)).collect();
            for caps in [EqualCaps::PerDevice, EqualCaps::Smallest] {
                let plan = solve_equal(&reports, batch, caps, &t).unwrap();
                let shares: Vec<usize> = plan.ranks.iter().map(|r| r.share).collect();
                prop_assert_eq!(shares.iter().sum::<usize>(), batch);
                let (lo, hi) = (*shares.iter().min().unwrap(), *shares.iter().max().unwrap());
                prop_assert!(hi - lo <= 1, "shares {:?}", shares);
                for (r, cap) in plan.ranks.iter().zip(&own) {
                    let limit = match caps {
                        EqualCaps::PerDevice => *cap,
                        EqualCaps::Smallest => *own.iter().min().unwrap(),
                    };
                    prop_assert!(r.micro_batch <= limit && r.micro_batch <= r.share);
                    prop_assert!(r.share == 0 || r.micro_batch >= 1);
                    prop_assert!(r.accumulation * r.micro_batch.max(1) >= r.share);
                }
                prop_assert!(plan.predicted_step_s > 0.0);
            }
        }

        #[test]
        fn the_memory_line_covers_every_fitted_point(
            points in proptest::collection::vec((1usize..256, 0u64..1 << 30), 0..12),
        ) {
            let (fixed, per_sample) = fit_memory_line(&points);
            let fitted: Vec<&(usize, u64)> = if points.iter().filter(|p| p.0 >= 4).count() >= 2 {
                points.iter().filter(|p| p.0 >= 4).collect()
            } else {
                points.iter().collect()
            };
            for &&(n, bytes) in &fitted {
                let line = fixed + per_sample * n as f64;
                prop_assert!(line >= bytes as f64 - 1e-6 * bytes as f64, "{} < {} at {}", line, bytes, n);
            }
        }
    }

    #[test]
    fn a_device_that_holds_no_sample_is_refused() {
        let t = Tunables::default();
        let reports = [report(1_000_000, 100, 10.0), report(500, 100, 10.0)];
        let err = solve_equal(&reports, 8, EqualCaps::PerDevice, &t).unwrap_err();
        assert!(
            err.to_string()
                .contains("equal shares need every device to hold a sample"),
            "{err}"
        );
    }

    #[test]
    fn an_exact_line_is_recovered() {
        let points: Vec<(usize, u64)> = [1, 2, 4, 8, 16].iter().map(|&n| (n, 5000 + 300 * n as u64)).collect();
        let (fixed, per_sample) = fit_memory_line(&points);
        assert!(
            (fixed - 5000.0).abs() < 1e-6 && (per_sample - 300.0).abs() < 1e-9,
            "{fixed} {per_sample}"
        );
    }
}
