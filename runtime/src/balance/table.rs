//! The plan and the shards as tables for people.

use super::*;

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
