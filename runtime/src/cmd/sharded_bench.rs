//! `ballast bench sharded`: Adam with its state sharded over the ranks (reduce-scatter, each
//! shard updated once on its owner, all-gather) against replicated Adam (one all-reduce, every
//! rank updates the whole model), on the same plan, measured side by side in one run.
//!
//! Run it as `bench hetero` is run, with ranks pinned to unequal core sets:
//! `mpirun -np 3 cluster/pin-by-rank.sh 0 1 1 -- target/release/ballast bench sharded --json`.
//!
//! Both arms train a copy of the same model from the same weights on the same batches, with the
//! shares and micro-batches of one plan (the balancer's, with the state sharded by memory).
//! Replicated blocks finish each step with burn's Adam on the device; sharded blocks with
//! [`ballast::DataParallel::step`] with a [`ballast::optim::sharded::ShardedAdam`] and the shards the balancer placed. Blocks
//! alternate, the order rotating each round, so drift in the machine's load hits both.
//!
//! Bytes on the wire are counted where the collectives are called (a wrapper around the
//! communicator), with nccl-tests' bus factors for a ring of P ranks: an all-reduce of S bytes
//! moves 2(P−1)/P·S per rank, a reduce-scatter or an all-gather (P−1)/P·S, a broadcast S.

use std::{
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use ballast::{
    balance::{BalanceOptions, Balancer},
    balancer::{RankPlan, Sharding},
    collectives::{Communicator, CommunicatorExt, Result as CommResult},
    memory::DeviceMeter,
    optim::ShardedAdam,
    sampler::split_batch,
    testing::{Regressor, SyntheticSet, WideMlp, TARGETS, WIDE_FEATURES},
    DataParallel, DdpOptions, GlobalSampler, StepStats,
};
use burn::{
    nn::loss::{MseLoss, Reduction},
    optim::{AdamConfig, ModuleOptimizer},
    tensor::{Device, Tensor},
};
use serde_json::json;

/// Options of `ballast bench sharded`.
#[derive(clap::Args)]
pub struct ShardedArgs {
    /// Print JSON lines (the last one is the summary).
    #[arg(long)]
    pub json: bool,
    /// Hidden width of the perceptron (256 → width → width → 4): 1024 gives 1.3 M parameters.
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// Memory budget per rank (comma-separated; one value applies to all): the shards follow
    /// the room each leaves.
    #[arg(long, value_delimiter = ',', default_value = "48MiB,32MiB,24MiB")]
    pub budgets: Vec<String>,
    /// Samples per optimizer step.
    #[arg(long, default_value_t = 96)]
    pub global_batch: usize,
    /// Rounds of one replicated and one sharded block.
    #[arg(long, default_value_t = 6)]
    pub blocks: usize,
    /// Steps per block.
    #[arg(long, default_value_t = 10)]
    pub steps_per_block: u64,
}

/// Runs the benchmark.
pub fn run(args: &ShardedArgs) -> Result<ExitCode> {
    let comm = super::pinned::pinned_world("sharded")?;
    let wire = Arc::new(AtomicU64::new(0));
    let comm = Box::new(WireCounter {
        inner: comm,
        bytes: wire.clone(),
    });
    let rank = comm.rank();
    let budget = super::pinned::rank_budget(&args.budgets, rank)?;
    let emit = |v: serde_json::Value| {
        if rank == 0 && args.json {
            println!("{v}");
        }
    };
    let device = Device::flex().autodiff();
    device.seed(5);
    let samples = 4096usize.div_ceil(args.global_batch.max(1)) * args.global_batch.max(1);
    let data = SyntheticSet::with_dims(samples, WIDE_FEATURES, TARGETS, 5);
    let sampler = GlobalSampler::new(data.len(), args.global_batch, 5)?;
    let meter = DeviceMeter::start();
    let (mut ddp, model) = DataParallel::wrap(comm, WideMlp::with_width(args.width, &device), DdpOptions::default())?;
    let mut loss_fn = |m: &WideMlp, idx: &[usize]| {
        let (x, y) = data.batch(idx, &device);
        MseLoss::new().forward(m.forward(x), y, Reduction::Mean)
    };
    let pool: Vec<usize> = (0..64).collect();
    let options = BalanceOptions {
        budget_bytes: budget,
        rebalance: false,
        optimizer_sharding: Sharding::Memory,
        ..BalanceOptions::default()
    };
    let mut balancer = Balancer::probe(&mut ddp, &model, &mut loss_fn, &pool, args.global_batch, meter, options)?;
    let plan = balancer.plan().clone();
    let shards = balancer.shard_plan().map(|p| p.counts.clone()).unwrap_or_default();
    let Some(shard) = balancer.shard_mut() else {
        bail!("the balancer did not shard the optimizer state");
    };
    let mut arms = [
        Arm::new(
            "replicated",
            model.clone(),
            Optimizer::Replicated(AdamConfig::new().init()),
        ),
        Arm::new("sharded", model, Optimizer::Sharded(shard)),
    ];
    let mut step = 0u64;
    // One step of each first: allocations and first-touch costs stay out of the blocks.
    for arm in arms.iter_mut() {
        arm.run(&mut ddp, &plan, &sampler, step, 1, &mut loss_fn, &wire)?;
    }
    step += 1;
    let mut rounds = Vec::with_capacity(args.blocks);
    for block in 0..args.blocks {
        let mut round = [0.0f64; 2];
        for phase in 0..2 {
            let which = (phase + block) % 2;
            let arm = &mut arms[which];
            ddp.comm().barrier()?;
            let block_stats = arm.run(
                &mut ddp,
                &plan,
                &sampler,
                step,
                args.steps_per_block,
                &mut loss_fn,
                &wire,
            )?;
            round[which] = block_stats.seconds / args.steps_per_block as f64;
            emit(json!({
                "bench": "sharded", "phase": arm.name, "block": block, "steps": args.steps_per_block,
                "seconds": block_stats.seconds, "step_s": round[which],
                "collectives_per_step": block_stats.collectives as f64 / args.steps_per_block as f64,
                "wire_bytes_per_step": block_stats.wire_bytes as f64 / args.steps_per_block as f64,
            }));
        }
        step += args.steps_per_block;
        rounds.push(round);
    }
    let per_step = |arm: &Arm| arm.seconds / arm.steps.max(1) as f64;
    let wire_per_step = |arm: &Arm| arm.wire_bytes as f64 / arm.steps.max(1) as f64;
    let (replicated, sharded) = (&arms[0], &arms[1]);
    let mut ratios: Vec<f64> = rounds.iter().map(|r| r[0] / r[1]).collect();
    ratios.sort_by(f64::total_cmp);
    let params = shards.iter().sum::<u64>();
    // Every rank's wire bytes, summed: what the whole ring carried.
    let wire_all: Vec<[f64; 2]> = ddp
        .comm()
        .all_gather(&[wire_per_step(replicated), wire_per_step(sharded)])?;
    let [wire_replicated, wire_sharded] = wire_all
        .iter()
        .fold([0.0, 0.0], |acc, w| [acc[0] + w[0], acc[1] + w[1]]);
    emit(json!({
        "bench": "sharded", "summary": true, "ranks": ddp.world_size(), "params": params,
        "shares": plan.shares(), "micro_batches": plan.micro_batches(), "shards": shards,
        "replicated_step_s": per_step(replicated), "sharded_step_s": per_step(sharded),
        "sharded_vs_replicated": per_step(replicated) / per_step(sharded),
        "rounds_sharded_vs_replicated": {"min": ratios.first(), "median": ratios.get(ratios.len() / 2), "max": ratios.last()},
        "replicated_wire_bytes_per_step": wire_replicated, "sharded_wire_bytes_per_step": wire_sharded,
        "wire_bytes_ratio": wire_sharded / wire_replicated,
        "replicated_collectives_per_step": replicated.collectives as f64 / replicated.steps.max(1) as f64,
        "sharded_collectives_per_step": sharded.collectives as f64 / sharded.steps.max(1) as f64,
        "targets": {"sharded_vs_replicated": 0.95, "wire_bytes_ratio": 1.05},
    }));
    if !args.json && rank == 0 {
        println!(
            "{} parameters on {} ranks, shards {shards:?}: replicated {:.1} ms/step, sharded {:.1} ms/step \
             (sharded/replicated throughput {:.3}); bus bytes per step {:.0} vs {:.0} (ratio {:.3})",
            params,
            ddp.world_size(),
            per_step(replicated) * 1e3,
            per_step(sharded) * 1e3,
            per_step(replicated) / per_step(sharded),
            wire_replicated,
            wire_sharded,
            wire_sharded / wire_replicated
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// How an arm finishes its steps.
enum Optimizer<'a> {
    /// burn's Adam on the whole model, on every rank.
    Replicated(ModuleOptimizer),
    /// This rank's shard of Adam.
    Sharded(&'a mut ShardedAdam),
}

/// One side of the comparison: its own copy of the model, its optimizer and its totals.
struct Arm<'a> {
    name: &'static str,
    model: Option<WideMlp>,
    optimizer: Optimizer<'a>,
    steps: u64,
    seconds: f64,
    collectives: usize,
    wire_bytes: u64,
}

/// What one block of an arm measured.
struct Block {
    seconds: f64,
    collectives: usize,
    wire_bytes: u64,
}

impl<'a> Arm<'a> {
    fn new(name: &'static str, model: WideMlp, optimizer: Optimizer<'a>) -> Self {
        Self {
            name,
            model: Some(model),
            optimizer,
            steps: 0,
            seconds: 0.0,
            collectives: 0,
            wire_bytes: 0,
        }
    }

    /// `steps` steps from `first` by `plan`; the totals count all but the warm-up (`steps` 1
    /// before any block).
    #[allow(clippy::too_many_arguments)]
    fn run<F>(
        &mut self,
        ddp: &mut DataParallel,
        plan: &ballast::balancer::Plan,
        sampler: &GlobalSampler,
        first: u64,
        steps: u64,
        loss_fn: &mut F,
        wire: &AtomicU64,
    ) -> Result<Block>
    where
        F: FnMut(&WideMlp, &[usize]) -> Tensor<1>,
    {
        let rank = ddp.rank();
        let wire_before = wire.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut collectives = 0;
        for step in first..first + steps {
            let mut model = self.model.take().expect("the arm holds its model between steps");
            let parts = split_batch(&sampler.batch(step), &plan.shares());
            let mine = &parts[rank];
            let micro = RankPlan::new(mine.len(), plan.ranks[rank].micro_batch.max(1))?;
            let mut offset = 0;
            for m in micro.micro_batches() {
                let loss = loss_fn(&model, &mine[offset..offset + m]);
                ddp.backward(&model, loss, m)?;
                offset += m;
            }
            let stats: StepStats;
            (model, stats) = match &mut self.optimizer {
                Optimizer::Replicated(optim) => ddp.step(model, optim, 1e-3)?,
                Optimizer::Sharded(shard) => ddp.step(model, &mut **shard, 1e-3)?,
            };
            collectives += stats.collectives;
            self.model = Some(model);
        }
        let block = Block {
            seconds: started.elapsed().as_secs_f64(),
            collectives,
            wire_bytes: wire.load(Ordering::Relaxed) - wire_before,
        };
        if first > 0 {
            self.steps += steps;
            self.seconds += block.seconds;
            self.collectives += block.collectives;
            self.wire_bytes += block.wire_bytes;
        }
        Ok(block)
    }
}

/// A communicator that adds up the bus bytes of every collective it forwards (see the module
/// docs), for this rank.
struct WireCounter {
    inner: Box<dyn Communicator>,
    bytes: Arc<AtomicU64>,
}

impl WireCounter {
    /// Adds `factor`·`bytes` with `factor` = `num`(P−1)/P.
    fn count(&self, bytes: usize, num: u64) {
        let p = self.inner.world_size() as u64;
        let bus = bytes as u64 * num * p.saturating_sub(1) / p.max(1);
        self.bytes.fetch_add(bus, Ordering::Relaxed);
    }
}

impl Communicator for WireCounter {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.inner.set_timeout(timeout);
    }

    fn collectives_started(&self) -> u64 {
        self.inner.collectives_started()
    }

    fn barrier(&mut self) -> CommResult<()> {
        self.inner.barrier()
    }

    fn broadcast_f32(&mut self, root: usize, buf: &mut [f32]) -> CommResult<()> {
        self.bytes.fetch_add(4 * buf.len() as u64, Ordering::Relaxed);
        self.inner.broadcast_f32(root, buf)
    }

    fn broadcast_bytes(&mut self, root: usize, buf: &mut Vec<u8>) -> CommResult<()> {
        self.inner.broadcast_bytes(root, buf)?;
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> CommResult<()> {
        self.count(4 * buf.len(), 2);
        self.inner.all_reduce_sum_f32(buf)
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> CommResult<()> {
        self.count(8 * buf.len(), 2);
        self.inner.all_reduce_sum_f64(buf)
    }

    fn all_reduce_sum_u64(&mut self, buf: &mut [u64]) -> CommResult<()> {
        self.count(8 * buf.len(), 2);
        self.inner.all_reduce_sum_u64(buf)
    }

    fn all_gather_bytes(&mut self, data: &[u8]) -> CommResult<Vec<Vec<u8>>> {
        let all = self.inner.all_gather_bytes(data)?;
        self.count(all.iter().map(Vec::len).sum(), 1);
        Ok(all)
    }

    fn reduce_scatter_sum_f32(&mut self, buf: &[f32], counts: &[usize], shard: &mut [f32]) -> CommResult<()> {
        self.count(4 * buf.len(), 1);
        self.inner.reduce_scatter_sum_f32(buf, counts, shard)
    }

    fn all_gather_f32(&mut self, shard: &[f32], counts: &[usize], out: &mut [f32]) -> CommResult<()> {
        self.count(4 * out.len(), 1);
        self.inner.all_gather_f32(shard, counts, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast::collectives::{local, CommOptions};

    /// The bus factors of a ring of 3: an all-reduce of 12 bytes counts 16, a reduce-scatter and
    /// an all-gather of the same buffer 8 each, so the pair costs what the all-reduce does.
    #[test]
    fn counts_bus_bytes_of_a_ring() {
        let counted = local::run(3, CommOptions::default(), |comm| {
            let bytes = Arc::new(AtomicU64::new(0));
            let mut c = WireCounter {
                inner: Box::new(comm),
                bytes: bytes.clone(),
            };
            let mut buf = vec![1.0f32; 3];
            c.all_reduce_sum_f32(&mut buf).unwrap();
            let after_all_reduce = bytes.load(Ordering::Relaxed);
            let mut shard = vec![0.0f32; 1];
            c.reduce_scatter_sum_f32(&buf, &[1, 1, 1], &mut shard).unwrap();
            let mut out = vec![0.0f32; 3];
            c.all_gather_f32(&shard, &[1, 1, 1], &mut out).unwrap();
            (after_all_reduce, bytes.load(Ordering::Relaxed) - after_all_reduce, out)
        });
        for (all_reduce, pair, out) in counted {
            assert_eq!(all_reduce, 8 * 2);
            assert_eq!(pair, 8 + 8);
            assert_eq!(out, vec![9.0, 9.0, 9.0]);
        }
    }
}
