//! Checkpoints: where training starts (step 0 or the newest complete checkpoint), the
//! optimizer state saved and restored, and the barriers that wait for rank 0's writes.

use super::*;

/// Adam's state per parameter on the device when it is sharded: two f32 moments.
pub(super) const ADAM_BYTES_PER_PARAM: u64 = 8;

/// The slowest write a barrier behind rank 0's save allows for, in bytes per second: a
/// multi-gigabyte checkpoint on a slow disk must not trip the collective timeout.
pub(super) const SLOWEST_WRITE_BYTES_PER_S: f64 = 20e6;

/// At most what a checkpoint of `model` writes: its parameters and two Adam moments, in f32.
pub(super) fn checkpoint_bytes<M: burn::module::Module>(model: &M) -> u64 {
    model.num_params() as u64 * 4 * 3
}

/// A barrier that waits for rank 0's write of up to `bytes` bytes: the collective timeout plus
/// the write at [`SLOWEST_WRITE_BYTES_PER_S`], restored afterwards.
pub(super) fn barrier_after_write(comm: &mut dyn Communicator, bytes: u64) -> Result<()> {
    let usual = comm.timeout();
    comm.set_timeout(usual + std::time::Duration::from_secs_f64(bytes as f64 / SLOWEST_WRITE_BYTES_PER_S));
    let waited = comm.barrier();
    comm.set_timeout(usual);
    Ok(waited?)
}

/// Puts a checkpoint's Adam state where this run keeps it: this rank's shard of it (cut out of
/// the whole model's moments, whatever number of ranks saved them), or the host Adam that runs
/// on every rank when the state is not sharded.
pub(super) fn restore_optimizer(balancer: &mut Balancer, path: PathBuf, saved: checkpoint::AdamMoments) -> Result<()> {
    if let Some(shard) = balancer.shard_mut() {
        return shard.restore(&saved).map_err(|e| Error::OptimizerState {
            path,
            reason: e.to_string(),
        });
    }
    let host = balancer.host_mut().ok_or_else(|| Error::OptimizerState {
        path: path.clone(),
        reason: "the host optimizer is not running".into(),
    })?;
    host.adam_mut()
        .restore(saved.m, saved.v, saved.t)
        .map_err(|e| Error::OptimizerState {
            path,
            reason: e.to_string(),
        })
}

/// The whole model's Adam moments, all-gathered from every rank's shard, on rank 0 (every rank
/// must call it; the others drop each moment as soon as the collective returns). `None` when
/// the state is not sharded.
pub(super) fn gather_shards(
    comm: &mut dyn Communicator,
    balancer: &Balancer,
) -> Result<Option<checkpoint::AdamMoments>> {
    let Some(shard) = balancer.shard() else {
        return Ok(None);
    };
    let n: usize = shard.counts().iter().sum();
    let (m, v) = shard.moments()?;
    let mut gather = |mine: Vec<f32>| -> Result<Vec<f32>> {
        let mut all = vec![0.0; n];
        comm.all_gather_f32(&mine, shard.counts(), &mut all)?;
        Ok(if comm.rank() == 0 { all } else { Vec::new() })
    };
    let m = gather(m)?;
    let v = gather(v)?;
    Ok((comm.rank() == 0).then(|| checkpoint::AdamMoments { m, v, t: shard.steps() }))
}

/// In a mixed precision, the f32 master parameters on rank 0, which a checkpoint holds in place
/// of the replica's rounded values (every rank must call it): all-gathered from the optimizer's
/// shards, the host Adam's, or the copy `DataParallel` keeps. `None` in f32 and on the other ranks.
pub(super) fn gather_master(ddp: &mut DataParallel, balancer: &Balancer) -> Result<Option<Vec<f32>>> {
    if !ddp.precision().is_mixed() {
        return Ok(None);
    }
    let all = match (
        balancer.shard(),
        balancer.host().and_then(crate::optim::HostOffload::master),
    ) {
        (Some(shard), _) => {
            let mut all = vec![0.0; shard.counts().iter().sum()];
            ddp.comm()
                .all_gather_f32(&shard.master_shard()?, shard.counts(), &mut all)?;
            all
        }
        // The host Adam took the whole master over (every rank holds all of it).
        (None, Some(master)) => master.to_vec(),
        (None, None) => ddp.master_params()?.unwrap_or_default(),
    };
    Ok((ddp.rank() == 0).then_some(all))
}

/// Where training starts: the model, the step, and what a resumed checkpoint carried.
pub(super) struct Start<M> {
    pub(super) model: M,
    pub(super) state: TrainState,
    /// The checkpoint's optimizer state, with the checkpoint's path.
    pub(super) optimizer: Option<(PathBuf, checkpoint::AdamMoments)>,
    /// The checkpoint's plan, when it was saved by a world of this size.
    pub(super) plan: Option<serde_json::Value>,
    /// The checkpoint's optimizer shards, when it was saved by a world of this size.
    pub(super) shards: Option<Vec<usize>>,
}

/// With `--resume`, every rank loads the newest complete checkpoint (rank 0 picks it, the
/// others open that file); otherwise training starts at step 0 (`--eval-only`: at the step of
/// the loaded weights).
pub(super) fn resume<M: Module>(
    ddp: &mut DataParallel,
    model: M,
    s: &Settings,
    checkpointer: Option<&Checkpointer>,
    loaded_step: u64,
) -> Result<Start<M>> {
    let world = ddp.world_size();
    let mut state = TrainState {
        step: if s.eval_only { loaded_step } else { 0 },
        seed: s.seed,
        global_batch: s.global_batch,
        world_size: world,
        job: s.job.clone(),
        plan: None,
        shards: None,
    };
    if !s.resume {
        return Ok(Start {
            model,
            state,
            optimizer: None,
            plan: None,
            shards: None,
        });
    }
    let cp = checkpointer.ok_or(Error::ResumeWithoutDirectory)?;
    let chosen = if ddp.rank() == 0 { cp.newest()? } else { None };
    let chosen: Option<PathBuf> = ddp.comm().broadcast_value(0, &chosen)?;
    let path = chosen.ok_or_else(|| Error::NothingToResume {
        dir: cp.dir().to_path_buf(),
    })?;
    let loaded = checkpoint::load(&path, &model)?;
    loaded.state.check_compatible(&s.job, s.global_batch, s.seed, &path)?;
    state.step = loaded.state.step;
    let same_world = loaded.state.world_size == world;
    let plan = same_world.then(|| loaded.state.plan.clone()).flatten();
    let shards = same_world.then(|| loaded.state.shards.clone()).flatten();
    if ddp.rank() == 0 {
        println!(
            "resuming from {} (step {}, saved by {} ranks, now {world})",
            path.display(),
            state.step,
            loaded.state.world_size
        );
    }
    let optimizer = loaded.adam.clone().map(|adam| (path, adam));
    // The checkpoint's f32 values become the master copy in a mixed precision (the replica their
    // cast), as they were when it was saved.
    let model = ddp.restore_master(loaded.apply(model))?;
    Ok(Start {
        model,
        state,
        optimizer,
        plan,
        shards,
    })
}

/// `--save-model`: rank 0 writes the final weights; nobody reports success before the file is
/// in place.
pub(super) fn save_model<M: Module>(
    ddp: &mut DataParallel,
    model: &M,
    s: &Settings,
    state: &TrainState,
) -> Result<Option<PathBuf>> {
    let Some(path) = &s.save_model else {
        return Ok(None);
    };
    if ddp.rank() == 0 {
        checkpoint::save_model(path, model, state)?;
    }
    barrier_after_write(ddp.comm(), checkpoint_bytes(model))?;
    Ok(Some(path.clone()))
}
