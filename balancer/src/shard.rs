//! Where the optimizer state lives: replicated on every rank, or cut into one shard per rank,
//! evenly or by the memory each device has left.
//!
//! [`solve_sharded`] takes *stateless* reports (their `fixed_bytes` hold parameters, gradients
//! and buffers, not the optimizer state) and the state's size, decides each rank's shard, and
//! plans shares and micro-batches with each shard's bytes added to its device's fixed bytes.
//! With [`Sharding::Memory`]:
//! 1. shards follow the room each device has after its fixed bytes and the micro-batch it would
//!    run without any state;
//! 2. where the rooms are too small for the whole state, the device running the largest
//!    micro-batch gives up one sample at a time, until they suffice or every micro-batch is 1;
//! 3. only then does the device with the least room keep its own shard in host memory (checked
//!    against that host's RAM), the others filling their rooms.
//!
//! Infeasible plans name each device's room and the state's size.

use serde::{Deserialize, Serialize};

use crate::{solve, split_proportional, DeviceReport, Error, OffloadPolicy, Plan, Result, Tunables};

/// How optimizer state is placed over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Sharding {
    /// Every rank holds the whole state (if one rank offloads it, every rank updates on the host).
    Off,
    /// One equal shard per rank.
    Even,
    /// Shards in proportion to the memory each device has left (default).
    #[default]
    Memory,
}

impl std::str::FromStr for Sharding {
    type Err = crate::Error;

    fn from_str(s: &str) -> std::result::Result<Self, crate::Error> {
        match s {
            "off" => Ok(Sharding::Off),
            "even" => Ok(Sharding::Even),
            "memory" => Ok(Sharding::Memory),
            other => Err(crate::Error::UnknownSharding { given: other.into() }),
        }
    }
}

/// The optimizer state to place, and how fast it is updated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    /// Parameters of the model.
    pub params: u64,
    /// State bytes per parameter (8 for Adam's two moments in f32).
    pub bytes_per_param: u64,
    /// Parameters per second one device updates (a stated assumption, not measured).
    pub device_params_per_sec: f64,
    /// Parameters per second the host optimizer updates (ballast's host Adam moves 28 bytes per
    /// parameter; about 1e9 per second on a 27 GB/s host).
    pub host_params_per_sec: f64,
}

impl OptimizerState {
    /// Adam's state (two f32 moments per parameter) for `params` parameters, at the stated
    /// update rates: 2.5e10 parameters per second on a device (a memory-bound kernel moving 28
    /// bytes per parameter on a GPU with about 700 GB/s) and 1e9 on the host.
    pub fn adam(params: u64) -> Self {
        Self {
            params,
            bytes_per_param: 8,
            device_params_per_sec: 2.5e10,
            host_params_per_sec: 1e9,
        }
    }
}

/// A plan with the optimizer state placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardedPlan {
    /// How the state was placed.
    pub sharding: Sharding,
    /// Shares, micro-batches and predicted compute, with each rank's state in its fixed bytes.
    pub plan: Plan,
    /// Parameters whose state each rank holds (every parameter on every rank when `Off`).
    pub counts: Vec<u64>,
    /// Whether each rank's state lives in host memory (and is updated by the host).
    pub on_host: Vec<bool>,
    /// Predicted seconds of the optimizer update: the slowest rank's shard.
    pub optimizer_s: f64,
    /// Predicted step: compute, collectives and optimizer.
    pub step_s: f64,
}

impl ShardedPlan {
    /// State bytes rank `r` holds.
    pub fn state_bytes(&self, r: usize, state: &OptimizerState) -> u64 {
        self.counts[r] * state.bytes_per_param
    }
}

/// Plans `global_batch` over `reports` (stateless, see the module docs) with the optimizer
/// state placed as `sharding` says.
///
/// # Errors
/// As [`solve`]; [`Error::Infeasible`] when the state fits neither the devices nor the hosts.
pub fn solve_sharded(
    reports: &[DeviceReport],
    global_batch: usize,
    allreduce_s: f64,
    t: &Tunables,
    state: &OptimizerState,
    sharding: Sharding,
) -> Result<ShardedPlan> {
    let n = reports.len() as u64;
    let counts: Vec<u64> = match sharding {
        Sharding::Off => return solve_replicated(reports, global_batch, allreduce_s, t, state),
        Sharding::Even => (0..n)
            .map(|r| state.params / n.max(1) + u64::from(r < state.params % n.max(1)))
            .collect(),
        Sharding::Memory => memory_counts(reports, global_batch, allreduce_s, t, state)?,
    };
    solve_with_shards(reports, global_batch, allreduce_s, t, state, sharding, counts)
}

/// Plans `global_batch` over `reports` (stateless) with the state already cut into `counts`
/// (one per rank, adding up to the state's parameters; for example a resumed run's shards):
/// each shard joins its device's fixed bytes, and one that does not fit beside a sample moves
/// to its host.
///
/// # Errors
/// As [`solve`]; [`Error::Infeasible`] when `counts` does not match the reports or the state,
/// or a host cannot hold its shard.
pub fn solve_with_shards(
    reports: &[DeviceReport],
    global_batch: usize,
    allreduce_s: f64,
    t: &Tunables,
    state: &OptimizerState,
    sharding: Sharding,
    counts: Vec<u64>,
) -> Result<ShardedPlan> {
    if counts.len() != reports.len() || counts.iter().sum::<u64>() != state.params {
        return Err(Error::Infeasible {
            global_batch,
            details: format!(
                "{} optimizer shards of {} parameters in all for {} devices and {} parameters; cut the state \
                 into one shard per device covering every parameter",
                counts.len(),
                counts.iter().sum::<u64>(),
                reports.len(),
                state.params
            ),
        });
    }
    // Each shard joins its device's fixed bytes; one that does not fit beside a sample may move
    // to the host (under the offload policy), its own shard only.
    let with_state: Vec<DeviceReport> = reports
        .iter()
        .zip(&counts)
        .map(|(r, &c)| DeviceReport {
            fixed_bytes: r.fixed_bytes + c * state.bytes_per_param,
            offloadable_bytes: c * state.bytes_per_param,
            ..r.clone()
        })
        .collect();
    let plan = solve(&with_state, global_batch, allreduce_s, t)?;
    let on_host: Vec<bool> = with_state
        .iter()
        .zip(&plan.ranks)
        .map(|(r, a)| a.offload || (r.offloadable_bytes > 0 && !fits(r, r.fixed_bytes, t)))
        .collect();
    check_hosts(&with_state, &on_host, global_batch, t)?;
    let optimizer_s = counts
        .iter()
        .zip(&on_host)
        .map(|(&c, &host)| c as f64 / rate(state, host))
        .fold(0.0, f64::max);
    Ok(ShardedPlan {
        sharding,
        step_s: plan.predicted_step_s + optimizer_s,
        plan,
        counts,
        on_host,
        optimizer_s,
    })
}

fn solve_replicated(
    reports: &[DeviceReport],
    global_batch: usize,
    allreduce_s: f64,
    t: &Tunables,
    state: &OptimizerState,
) -> Result<ShardedPlan> {
    let bytes = state.params * state.bytes_per_param;
    let with_state: Vec<DeviceReport> = reports
        .iter()
        .map(|r| DeviceReport {
            fixed_bytes: r.fixed_bytes + bytes,
            offloadable_bytes: bytes,
            ..r.clone()
        })
        .collect();
    let plan = solve(&with_state, global_batch, allreduce_s, t)?;
    // One rank offloading puts every rank on the host optimizer, so replicas stay identical.
    let host = plan.ranks.iter().any(|r| r.offload);
    let on_host: Vec<bool> = plan.ranks.iter().map(|r| r.offload).collect();
    let optimizer_s = state.params as f64 / rate(state, host);
    Ok(ShardedPlan {
        sharding: Sharding::Off,
        step_s: plan.predicted_step_s + optimizer_s,
        plan,
        counts: vec![state.params; reports.len()],
        on_host,
        optimizer_s,
    })
}

/// Shard sizes by memory (stages 1–3 of the module docs).
fn memory_counts(
    reports: &[DeviceReport],
    global_batch: usize,
    allreduce_s: f64,
    t: &Tunables,
    state: &OptimizerState,
) -> Result<Vec<u64>> {
    let need = state.params * state.bytes_per_param;
    if state.params == 0 || state.bytes_per_param == 0 {
        return Ok(vec![0; reports.len()]);
    }
    let stateless = solve(
        reports,
        global_batch,
        allreduce_s,
        &Tunables {
            offload: OffloadPolicy::Never,
            ..t.clone()
        },
    )?;
    let mut micro: Vec<u64> = stateless.ranks.iter().map(|r| r.micro_batch as u64).collect();
    let room = |r: &DeviceReport, m: u64| usable(r, t).saturating_sub(r.fixed_bytes + m * r.bytes_per_sample);
    loop {
        let rooms: Vec<u64> = reports.iter().zip(&micro).map(|(r, &m)| room(r, m)).collect();
        let total: u64 = rooms.iter().sum();
        if total >= need {
            return proportional(state.params, &rooms);
        }
        // The largest micro-batch above 1 gives up a sample (lowest rank on a tie).
        let largest = (0..micro.len())
            .filter(|&i| micro[i] > 1)
            .max_by(|&a, &b| micro[a].cmp(&micro[b]).then(b.cmp(&a)));
        match largest {
            Some(i) => micro[i] -= 1,
            None => return host_remainder(reports, &rooms, global_batch, t, state),
        }
    }
}

/// Stage 3: the device with the least room keeps the rest of the state in its host's memory.
fn host_remainder(
    reports: &[DeviceReport],
    rooms: &[u64],
    global_batch: usize,
    t: &Tunables,
    state: &OptimizerState,
) -> Result<Vec<u64>> {
    let bpp = state.bytes_per_param;
    let least = (0..rooms.len())
        .min_by_key(|&i| (rooms[i], i))
        .expect("at least one device");
    let mut counts: Vec<u64> = rooms.iter().map(|&b| b / bpp).collect();
    let elsewhere: u64 = (0..rooms.len()).filter(|&i| i != least).map(|i| counts[i]).sum();
    counts[least] = state.params.saturating_sub(elsewhere);
    // The other devices may hold more than the whole state in all: trim from the last rank.
    let mut over = counts.iter().sum::<u64>().saturating_sub(state.params);
    for c in counts.iter_mut().rev() {
        let cut = over.min(*c);
        *c -= cut;
        over -= cut;
    }
    let host_bytes = counts[least] * bpp;
    let r = &reports[least];
    let host_ok = t.offload != OffloadPolicy::Never
        && r.host_available_bytes
            .is_none_or(|avail| host_bytes as f64 <= avail as f64 * (1.0 - t.host_memory_margin));
    if host_ok {
        return Ok(counts);
    }
    let details = reports
        .iter()
        .zip(rooms)
        .enumerate()
        .map(|(i, (r, room))| format!("rank {i} ({}) has {room} bytes of room for state", r.name))
        .collect::<Vec<_>>()
        .join("; ");
    Err(Error::Infeasible {
        global_batch,
        details: format!(
            "the optimizer state takes {} bytes: {details}; rank {least} would keep {host_bytes} bytes in host \
             memory, which {}; give the devices more memory, shrink the model or free host memory",
            state.params * bpp,
            if t.offload == OffloadPolicy::Never {
                "offload policy `never` forbids".to_string()
            } else {
                format!("its host cannot hold ({:?} available)", r.host_available_bytes)
            }
        ),
    })
}

/// `params` split in proportion to `rooms`, exactly.
fn proportional(params: u64, rooms: &[u64]) -> Result<Vec<u64>> {
    let weights: Vec<f64> = rooms.iter().map(|&b| b as f64).collect();
    Ok(split_proportional(params as usize, &weights)?
        .into_iter()
        .map(|c| c as u64)
        .collect())
}

fn usable(r: &DeviceReport, t: &Tunables) -> u64 {
    (r.budget_bytes as f64 * (1.0 - t.memory_margin)).max(0.0) as u64
}

fn fits(r: &DeviceReport, bytes: u64, t: &Tunables) -> bool {
    bytes <= usable(r, t)
}

fn rate(state: &OptimizerState, host: bool) -> f64 {
    if host {
        state.host_params_per_sec
    } else {
        state.device_params_per_sec
    }
}

/// Host-resident shards must fit their hosts' RAM (summed per host).
fn check_hosts(reports: &[DeviceReport], on_host: &[bool], global_batch: usize, t: &Tunables) -> Result<()> {
    let mut per_host: Vec<(&str, u64, Option<u64>)> = Vec::new();
    for (r, _) in reports.iter().zip(on_host).filter(|(_, &h)| h) {
        match per_host.iter_mut().find(|h| h.0 == r.host) {
            Some(h) => h.1 += r.offloadable_bytes,
            None => per_host.push((&r.host, r.offloadable_bytes, r.host_available_bytes)),
        }
    }
    for (host, needed, available) in per_host {
        let Some(avail) = available else { continue };
        let usable = (avail as f64 * (1.0 - t.host_memory_margin)) as u64;
        if needed > usable {
            return Err(Error::Infeasible {
                global_batch,
                details: format!(
                    "optimizer shards kept in host memory need {needed} bytes on host {host:?} but only {usable} are \
                     usable (MemAvailable {avail} minus a {:.0}% margin); free host memory or give the devices more \
                     memory",
                    t.host_memory_margin * 100.0
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn device(name: &str, budget: u64, fixed: u64, per_sample: u64, speed: f64) -> DeviceReport {
        DeviceReport {
            name: name.into(),
            budget_bytes: budget,
            fixed_bytes: fixed,
            bytes_per_sample: per_sample,
            samples_per_sec: speed,
            offloadable_bytes: 0,
            host: "h".into(),
            host_available_bytes: None,
            speed_curve: Vec::new(),
            compute_group: None,
        }
    }

    fn adam(params: u64) -> OptimizerState {
        OptimizerState {
            params,
            bytes_per_param: 8,
            device_params_per_sec: 25e9,
            host_params_per_sec: 1e9,
        }
    }

    /// The 1.3 B case of `ballast plan`: 80/24/12 GiB, speeds 3:1:0.5, 600 MiB per sample,
    /// parameters and gradients 8 bytes per parameter on every device.
    fn big() -> (Vec<DeviceReport>, OptimizerState) {
        let p = 1_300_000_000;
        let reports = vec![
            device("a100", 80 * GIB, 8 * p, 600 * MIB, 300.0),
            device("rtx3090", 24 * GIB, 8 * p, 600 * MIB, 100.0),
            device("rtx3060", 12 * GIB, 8 * p, 600 * MIB, 50.0),
        ];
        (reports, adam(p))
    }

    #[test]
    fn memory_sharding_keeps_every_state_on_a_device_where_replication_offloads() {
        let (reports, state) = big();
        let t = Tunables::default();
        let off = solve_sharded(&reports, 512, 0.0, &t, &state, Sharding::Off).unwrap();
        let mem = solve_sharded(&reports, 512, 0.0, &t, &state, Sharding::Memory).unwrap();
        assert!(off.on_host.iter().any(|&h| h), "{off:?}");
        assert!(mem.on_host.iter().all(|&h| !h), "{mem:?}");
        assert_eq!(mem.counts.iter().sum::<u64>(), state.params);
        // The 24 GiB card runs a larger micro-batch once it no longer holds the whole state.
        assert!(
            mem.plan.ranks[1].micro_batch > off.plan.ranks[1].micro_batch,
            "{mem:?} {off:?}"
        );
        assert!(mem.step_s < off.step_s, "{} {}", mem.step_s, off.step_s);
    }

    #[test]
    fn micro_batches_give_way_before_any_shard_moves_to_the_host() {
        // Rooms without state: 9/10·100 − 40 = 50 MiB each at micro-batch 0; state of 80 MiB.
        let reports = vec![
            device("a", 100 * MIB, 40 * MIB, MIB, 1.0),
            device("b", 100 * MIB, 40 * MIB, MIB, 1.0),
        ];
        let state = adam(10 * MIB);
        let plan = solve_sharded(&reports, 64, 0.0, &Tunables::default(), &state, Sharding::Memory).unwrap();
        assert!(plan.on_host.iter().all(|&h| !h), "{plan:?}");
        assert_eq!(plan.counts.iter().sum::<u64>(), state.params);
        for (r, a) in reports.iter().zip(&plan.plan.ranks) {
            assert!(
                a.predicted_peak_bytes <= usable(r, &Tunables::default()) + 8,
                "{plan:?}"
            );
        }
        // A larger state does not fit beside one sample each: one device keeps its shard on
        // the host, and the other fills its room.
        let huge = adam(13 * MIB);
        let plan = solve_sharded(&reports, 64, 0.0, &Tunables::default(), &huge, Sharding::Memory).unwrap();
        assert_eq!(plan.on_host.iter().filter(|&&h| h).count(), 1, "{plan:?}");
        assert_eq!(plan.counts.iter().sum::<u64>(), huge.params);
    }

    #[test]
    fn state_that_fits_nowhere_names_every_room() {
        let reports = vec![device("a", 100 * MIB, 80 * MIB, MIB, 1.0)];
        let t = Tunables {
            offload: OffloadPolicy::Never,
            ..Tunables::default()
        };
        let err = solve_sharded(&reports, 8, 0.0, &t, &adam(10 * MIB), Sharding::Memory).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("rank 0 (a) has"), "{msg}");
        assert!(msg.contains("offload policy `never` forbids"), "{msg}");
    }

    #[test]
    fn even_shards_differ_by_at_most_one_parameter() {
        let reports = vec![device("a", GIB, 0, MIB, 1.0); 3];
        let plan = solve_sharded(&reports, 8, 0.0, &Tunables::default(), &adam(10), Sharding::Even).unwrap();
        assert_eq!(plan.counts, vec![4, 3, 3]);
    }

    proptest! {
        /// Whatever the devices: shards cover every parameter, every device-resident shard fits
        /// beside its micro-batch, and sharding by memory never moves more ranks' state to the
        /// host than replication does.
        #[test]
        fn shards_cover_the_state_and_fit(
            budgets in prop::collection::vec(64u64..512, 1..5),
            fixed in 0u64..40,
            per_sample in 1u64..8,
            speeds in prop::collection::vec(1.0f64..10.0, 4),
            params in 0u64..(8 * MIB),
            batch in 1usize..200,
        ) {
            let reports: Vec<DeviceReport> = budgets
                .iter()
                .enumerate()
                .map(|(i, &b)| device(&format!("d{i}"), b * MIB, fixed * MIB, per_sample * MIB, speeds[i % 4]))
                .collect();
            let state = adam(params);
            let t = Tunables::default();
            let Ok(mem) = solve_sharded(&reports, batch, 0.0, &t, &state, Sharding::Memory) else {
                // Infeasible by memory means replication is infeasible too.
                prop_assert!(solve_sharded(&reports, batch, 0.0, &t, &state, Sharding::Off).is_err());
                return Ok(());
            };
            prop_assert_eq!(mem.counts.iter().sum::<u64>(), params);
            prop_assert_eq!(mem.plan.ranks.iter().map(|r| r.share).sum::<usize>(), batch);
            for (i, (r, a)) in reports.iter().zip(&mem.plan.ranks).enumerate() {
                if !mem.on_host[i] {
                    let state_bytes = mem.counts[i] * state.bytes_per_param;
                    let peak = r.fixed_bytes + state_bytes + a.micro_batch as u64 * r.bytes_per_sample;
                    prop_assert!(peak <= usable(r, &t) + state.bytes_per_param, "rank {} {:?}", i, mem);
                }
            }
            if let Ok(off) = solve_sharded(&reports, batch, 0.0, &t, &state, Sharding::Off) {
                let hosted = |p: &ShardedPlan| p.on_host.iter().filter(|&&h| h).count();
                prop_assert!(hosted(&mem) <= hosted(&off), "{:?} {:?}", mem, off);
            }
        }
    }
}
