//! Exact checks every backend must pass, shared by the thread tests, the `mpirun` tests and
//! `ballast selftest`.
//!
//! Inputs are integers, chosen so every partial sum is exactly representable, and each rank
//! computes the serial reference for all ranks itself. A check returns [`Error::Conformance`]
//! naming the operation, rank and first wrong element; nothing is compared with a tolerance.

use std::time::Duration;

use crate::{bucket::FusedBuffer, CommOptions, Communicator, CommunicatorExt, Error};

/// Tensor lengths the bucket checks use (empty, single, odd, and over a million, which
/// spans several buckets at small caps).
pub const BUCKET_TEST_LENGTHS: [usize; 4] = [0, 1, 7, 1_000_003];

/// The value rank `rank` contributes at index `i`: a small integer, exact in f32 when summed
/// over up to 64 ranks.
pub fn contribution(rank: usize, i: usize) -> u64 {
    (rank as u64 + 1) * (i as u64 % 1021) + (i as u64 % 7)
}

fn expected_sum(world: usize, i: usize) -> u64 {
    (0..world).map(|r| contribution(r, i)).sum()
}

fn check_eq<T: PartialEq + std::fmt::Debug>(
    what: &str,
    rank: usize,
    got: &[T],
    want: impl Fn(usize) -> T,
) -> Result<(), String> {
    for (i, g) in got.iter().enumerate() {
        let w = want(i);
        if *g != w {
            return Err(format!("{what}: rank {rank} element {i}: got {g:?}, expected {w:?}"));
        }
    }
    Ok(())
}

/// Runs every collective with exact inputs and checks the results; returns the names of the
/// checks that passed.
///
/// # Errors
/// [`Error::Conformance`] describing the first wrong result or collective error.
pub fn check_all(comm: &mut dyn Communicator) -> crate::Result<Vec<String>> {
    let rank = comm.rank();
    all(comm).map_err(|detail| Error::Conformance {
        check: "every-collective",
        rank,
        detail,
    })
}

fn all(comm: &mut dyn Communicator) -> Result<Vec<String>, String> {
    let rank = comm.rank();
    let n = comm.world_size();
    let mut passed = Vec::new();
    let e = |op: &str, err: Error| format!("{op} failed on rank {rank}: {err}");

    comm.barrier().map_err(|x| e("barrier", x))?;
    passed.push("barrier".to_string());

    for root in 0..n {
        let mut buf: Vec<f32> = (0..1000)
            .map(|i| if rank == root { (root * 1000 + i) as f32 } else { -1.0 })
            .collect();
        comm.broadcast_f32(root, &mut buf).map_err(|x| e("broadcast_f32", x))?;
        check_eq("broadcast_f32", rank, &buf, |i| (root * 1000 + i) as f32)?;

        let root_bytes: Vec<u8> = (0..10 + 3 * root).map(|i| (i * 7 + root) as u8).collect();
        let mut bytes = if rank == root {
            root_bytes.clone()
        } else {
            vec![0xee; 2]
        };
        comm.broadcast_bytes(root, &mut bytes)
            .map_err(|x| e("broadcast_bytes", x))?;
        if bytes != root_bytes {
            return Err(format!(
                "broadcast_bytes: rank {rank} got {bytes:?}, expected {root_bytes:?}"
            ));
        }
    }
    passed.push(format!("broadcast from each of {n} roots"));

    for &len in &BUCKET_TEST_LENGTHS {
        let mut f: Vec<f32> = (0..len).map(|i| contribution(rank, i) as f32).collect();
        comm.all_reduce_sum_f32(&mut f)
            .map_err(|x| e("all_reduce_sum_f32", x))?;
        check_eq("all_reduce_sum_f32", rank, &f, |i| expected_sum(n, i) as f32)?;

        let mut d: Vec<f64> = (0..len).map(|i| contribution(rank, i) as f64 * 0.5).collect();
        comm.all_reduce_sum_f64(&mut d)
            .map_err(|x| e("all_reduce_sum_f64", x))?;
        check_eq("all_reduce_sum_f64", rank, &d, |i| expected_sum(n, i) as f64 * 0.5)?;

        // Large integers: exact in u64, not in f64, so a float detour would be caught.
        let big = 1u64 << 60;
        let mut u: Vec<u64> = (0..len).map(|i| big / 64 + contribution(rank, i) * 3).collect();
        comm.all_reduce_sum_u64(&mut u)
            .map_err(|x| e("all_reduce_sum_u64", x))?;
        check_eq("all_reduce_sum_u64", rank, &u, |i| {
            (big / 64) * n as u64 + expected_sum(n, i) * 3
        })?;
    }
    passed.push(format!("all_reduce f32/f64/u64 over lengths {BUCKET_TEST_LENGTHS:?}"));

    let mine: Vec<u8> = (0..rank * 5 + 1).map(|i| (i + rank) as u8).collect();
    let gathered = comm.all_gather_bytes(&mine).map_err(|x| e("all_gather_bytes", x))?;
    for (r, got) in gathered.iter().enumerate() {
        let want: Vec<u8> = (0..r * 5 + 1).map(|i| (i + r) as u8).collect();
        if *got != want {
            return Err(format!(
                "all_gather_bytes: rank {rank} slot {r}: got {got:?}, expected {want:?}"
            ));
        }
    }
    let values = comm
        .all_gather(&(rank, format!("rank-{rank}")))
        .map_err(|x| e("all_gather", x))?;
    if values != (0..n).map(|r| (r, format!("rank-{r}"))).collect::<Vec<_>>() {
        return Err(format!("all_gather: rank {rank} got {values:?}"));
    }
    passed.push("all_gather bytes and values".to_string());

    // Fused buckets: the default cap, a 1 MiB cap (the big tensor spans several buckets) and a
    // 28-byte cap on small tensors (tensors straddle bucket boundaries).
    for (lens, cap) in [
        (&BUCKET_TEST_LENGTHS[..], crate::bucket::DEFAULT_BUCKET_CAP_BYTES),
        (&BUCKET_TEST_LENGTHS[..], 1 << 20),
        (&[0usize, 1, 7, 20][..], 28),
    ] {
        let mut fused = FusedBuffer::<f32>::new(lens, cap).map_err(|x| e("bucket layout", x))?;
        for (t, &len) in lens.iter().enumerate() {
            let vals: Vec<f32> = (0..len).map(|i| contribution(rank, i + t) as f32).collect();
            fused.pack(t, &vals).map_err(|x| e("pack", x))?;
        }
        fused.all_reduce_sum(comm).map_err(|x| e("fused all_reduce", x))?;
        for t in 0..lens.len() {
            check_eq(
                &format!("fused bucket (cap {cap} B) tensor {t}"),
                rank,
                fused.tensor(t),
                |i| expected_sum(n, i + t) as f32,
            )?;
        }
        passed.push(format!(
            "fused buckets: lengths {lens:?}, cap {cap} B, {} buckets",
            fused.layout().num_buckets()
        ));
    }
    passed.push(check_buckets_as_one(comm)?);
    passed.push(check_shards(comm)?);
    Ok(passed)
}

/// Shard layouts of `total` elements over `n` ranks: uneven (about 60/30/10 %, the remainder
/// to the last rank), one rank with nothing, everything on the last rank, and even.
pub fn shard_layouts(n: usize, total: usize) -> Vec<Vec<usize>> {
    let mut layouts = Vec::new();
    let weights: Vec<usize> = (0..n).map(|r| [6, 3, 1][r % 3]).collect();
    let sum: usize = weights.iter().sum();
    let mut uneven: Vec<usize> = weights.iter().map(|w| total * w / sum).collect();
    uneven[n - 1] += total - uneven.iter().sum::<usize>();
    layouts.push(uneven);
    if n > 1 {
        let mut hole = vec![total / (n - 1); n];
        hole[0] = 0;
        hole[n - 1] += total - hole.iter().sum::<usize>();
        layouts.push(hole);
    }
    let mut last = vec![0; n];
    last[n - 1] = total;
    layouts.push(last);
    let mut even = vec![total / n; n];
    even[n - 1] += total % n;
    layouts.push(even);
    layouts
}

/// [`Communicator::reduce_scatter_sum_f32`] then [`Communicator::all_gather_f32`], and their
/// device-buffer forms, on exact integers, for every layout of [`shard_layouts`] over 0, 1, 7 and 100 003 elements: each rank's
/// shard is its slice of the serial sum, and the gather returns every rank's shard in order.
fn check_shards(comm: &mut dyn Communicator) -> Result<String, String> {
    let rank = comm.rank();
    let n = comm.world_size();
    let mut layouts_run = 0;
    for total in [0, 1, 7, 100_003] {
        for counts in shard_layouts(n, total) {
            let offset: usize = counts[..rank].iter().sum();
            let buf: Vec<f32> = (0..total).map(|i| contribution(rank, i) as f32).collect();
            let mut shard = vec![-1.0f32; counts[rank]];
            comm.reduce_scatter_sum_f32(&buf, &counts, &mut shard)
                .map_err(|x| format!("reduce_scatter_sum_f32 {counts:?} failed on rank {rank}: {x}"))?;
            check_eq(&format!("reduce_scatter_sum_f32 {counts:?}"), rank, &shard, |i| {
                expected_sum(n, offset + i) as f32
            })?;
            // Each rank gathers its own shard of a marked sequence: the result is the sequence.
            let mine: Vec<f32> = (offset..offset + counts[rank]).map(|i| (i % 65_521) as f32).collect();
            let mut out = vec![-1.0f32; total];
            comm.all_gather_f32(&mine, &counts, &mut out)
                .map_err(|x| format!("all_gather_f32 {counts:?} failed on rank {rank}: {x}"))?;
            check_eq(&format!("all_gather_f32 {counts:?}"), rank, &out, |i| {
                (i % 65_521) as f32
            })?;
            // The same pair over device buffers (host vectors here): the same results.
            let mut full = buf.clone();
            let mut shard = vec![-1.0f32; counts[rank]];
            comm.reduce_scatter_sum_device(&mut full, &counts, &mut shard)
                .map_err(|x| format!("reduce_scatter_sum_device {counts:?} failed on rank {rank}: {x}"))?;
            check_eq(&format!("reduce_scatter_sum_device {counts:?}"), rank, &shard, |i| {
                expected_sum(n, offset + i) as f32
            })?;
            let mut mine = mine;
            let mut out = vec![-1.0f32; total];
            comm.all_gather_device(&mut mine, &counts, &mut out)
                .map_err(|x| format!("all_gather_device {counts:?} failed on rank {rank}: {x}"))?;
            check_eq(&format!("all_gather_device {counts:?}"), rank, &out, |i| {
                (i % 65_521) as f32
            })?;
            layouts_run += 1;
        }
    }
    Ok(format!(
        "reduce_scatter_sum_f32 and all_gather_f32, on host slices and device buffers: {layouts_run} uneven \
         layouts (shards of 0 included)"
    ))
}

/// Rank 0 passes other (consistent) shard counts than the rest: every rank gets
/// [`Error::CountsMismatch`] from the reduce-scatter (needs two ranks or more).
///
/// # Errors
/// [`Error::Conformance`] when any rank succeeds or gets another error.
pub fn check_counts_mismatch(comm: &mut dyn Communicator) -> crate::Result<String> {
    let rank = comm.rank();
    counts_mismatch(comm).map_err(|detail| Error::Conformance {
        check: "counts-mismatch",
        rank,
        detail,
    })
}

fn counts_mismatch(comm: &mut dyn Communicator) -> Result<String, String> {
    let rank = comm.rank();
    let n = comm.world_size();
    let total = 10 * n;
    let counts: Vec<usize> = if rank == 0 && n > 1 {
        let mut c = vec![10; n];
        c[0] = 11;
        c[1] = 9;
        c
    } else {
        vec![10; n]
    };
    let buf = vec![1.0f32; total];
    let mut shard = vec![0.0f32; counts[rank]];
    match comm.reduce_scatter_sum_f32(&buf, &counts, &mut shard) {
        Err(err @ Error::CountsMismatch { .. }) => Ok(err.to_string()),
        Err(other) => Err(format!("rank {rank}: expected a counts mismatch, got: {other}")),
        Ok(()) => Err(format!("rank {rank}: reduce_scatter with mismatched counts succeeded")),
    }
}

/// [`Communicator::all_reduce_sum_buckets`]: 1 000 values in three buffers cut at other places
/// on every rank, and one buffer alone; the sums are the concatenation's, and each call is one
/// collective.
fn check_buckets_as_one(comm: &mut dyn Communicator) -> Result<String, String> {
    let rank = comm.rank();
    let n = comm.world_size();
    let total = 1000;
    let cuts = [rank * 37 % 400, 400 + rank * 91 % 500];
    for pieces in [vec![0, cuts[0], cuts[1], total], vec![0, total]] {
        let mut buffers: Vec<Vec<f32>> = pieces
            .windows(2)
            .map(|w| (w[0]..w[1]).map(|i| contribution(rank, i) as f32).collect())
            .collect();
        let before = comm.collectives_started();
        let mut views: Vec<&mut dyn crate::DeviceBuffer> =
            buffers.iter_mut().map(|b| b as &mut dyn crate::DeviceBuffer).collect();
        comm.all_reduce_sum_buckets(&mut views)
            .map_err(|x| format!("all_reduce_sum_buckets failed on rank {rank}: {x}"))?;
        let calls = comm.collectives_started() - before;
        if calls != 1 {
            return Err(format!(
                "all_reduce_sum_buckets: rank {rank} ran {calls} collectives for {} buffers, expected 1",
                buffers.len()
            ));
        }
        check_eq("all_reduce_sum_buckets", rank, &buffers.concat(), |i| {
            expected_sum(n, i) as f32
        })?;
    }
    Ok("all_reduce_sum_buckets: three buffers cut differently on each rank, one collective".to_string())
}

/// The last rank passes one element too many; every rank must get [`Error::ShapeMismatch`].
///
/// # Errors
/// [`Error::Conformance`] when any rank succeeds or gets another error.
pub fn check_wrong_length(comm: &mut dyn Communicator) -> crate::Result<String> {
    let rank = comm.rank();
    wrong_length(comm).map_err(|detail| Error::Conformance {
        check: "wrong-length",
        rank,
        detail,
    })
}

fn wrong_length(comm: &mut dyn Communicator) -> Result<String, String> {
    let rank = comm.rank();
    let n = comm.world_size();
    let len = if rank == n - 1 { 11 } else { 10 };
    let mut buf = vec![1.0f32; len];
    match comm.all_reduce_sum_f32(&mut buf) {
        Err(err @ Error::ShapeMismatch { .. }) => {
            let Error::ShapeMismatch { lengths, .. } = &err else {
                unreachable!()
            };
            let want: Vec<u64> = (0..n).map(|r| if r == n - 1 { 11 } else { 10 }).collect();
            if *lengths != want {
                return Err(format!("rank {rank}: lengths {lengths:?}, expected {want:?}"));
            }
            Ok(err.to_string())
        }
        Err(other) => Err(format!("rank {rank}: expected a shape mismatch, got: {other}")),
        Ok(()) => Err(format!("rank {rank}: all_reduce with mismatched lengths succeeded")),
    }
}

/// Rank `missing` never joins an all-reduce; every other rank must get [`Error::Timeout`]
/// naming it within about the communicator's timeout. The missing rank sleeps half a second
/// past the deadline (so it is late, but alive to shut down with the others) and returns
/// `Ok("skipped")`.
///
/// # Errors
/// [`Error::Conformance`] when a rank succeeds, gets another error, or waits far longer than
/// the timeout.
pub fn check_missing_rank(comm: &mut dyn Communicator, missing: usize) -> crate::Result<String> {
    let rank = comm.rank();
    missing_rank(comm, missing).map_err(|detail| Error::Conformance {
        check: "missing-rank",
        rank,
        detail,
    })
}

fn missing_rank(comm: &mut dyn Communicator, missing: usize) -> Result<String, String> {
    let rank = comm.rank();
    let timeout = comm.timeout();
    if rank == missing {
        std::thread::sleep(timeout + Duration::from_millis(500));
        return Ok("skipped".into());
    }
    let started = std::time::Instant::now();
    let mut buf = vec![1.0f32; 16];
    let result = comm.all_reduce_sum_f32(&mut buf);
    let waited = started.elapsed();
    match result {
        Err(err @ Error::Timeout { .. }) => {
            let Error::Timeout { missing: named, .. } = &err else {
                unreachable!()
            };
            if *named != vec![missing] {
                return Err(format!("rank {rank}: timeout named {named:?}, expected [{missing}]"));
            }
            if waited > timeout * 3 + Duration::from_secs(1) {
                return Err(format!(
                    "rank {rank}: timed out only after {waited:?} (timeout {timeout:?})"
                ));
            }
            // The communicator is poisoned from now on.
            match comm.barrier() {
                Err(Error::Poisoned { .. }) => Ok(err.to_string()),
                other => Err(format!(
                    "rank {rank}: a call after a timeout returned {other:?}, expected Poisoned"
                )),
            }
        }
        Err(other) => Err(format!("rank {rank}: expected a timeout, got: {other}")),
        Ok(()) => Err(format!("rank {rank}: all_reduce without rank {missing} succeeded")),
    }
}

/// Rank 0 joins a barrier later than the communicator's timeout, but every rank raised the
/// timeout for it first ([`Communicator::set_timeout`]): the barrier succeeds, and the timeout
/// reads back as set, then as before once restored.
///
/// # Errors
/// [`Error::Conformance`] when the barrier fails or a timeout does not read back.
pub fn check_longer_deadline(comm: &mut dyn Communicator) -> crate::Result<String> {
    let rank = comm.rank();
    longer_deadline(comm).map_err(|detail| Error::Conformance {
        check: "longer-deadline",
        rank,
        detail,
    })
}

fn longer_deadline(comm: &mut dyn Communicator) -> Result<String, String> {
    let rank = comm.rank();
    let usual = comm.timeout();
    let longer = usual * 4;
    comm.set_timeout(longer);
    if comm.timeout() != longer {
        return Err(format!(
            "rank {rank}: timeout reads {:?} after setting {longer:?}",
            comm.timeout()
        ));
    }
    // Everyone starts together, so every other rank waits the whole of rank 0's lateness: a
    // deadline that was not raised would expire during it.
    comm.barrier()
        .map_err(|e| format!("rank {rank}: the barrier before the late one failed: {e}"))?;
    let late = usual + usual / 2;
    if rank == 0 {
        std::thread::sleep(late);
    }
    let started = std::time::Instant::now();
    let result = comm.barrier();
    let waited = started.elapsed();
    comm.set_timeout(usual);
    result.map_err(|e| format!("rank {rank}: a barrier within {longer:?} failed: {e}"))?;
    if comm.timeout() != usual {
        return Err(format!("rank {rank}: timeout not restored to {usual:?}"));
    }
    comm.barrier()
        .map_err(|e| format!("rank {rank}: a barrier after restoring failed: {e}"))?;
    Ok(format!(
        "waited {:.1}s for rank 0 with a timeout of {usual:?} raised to {longer:?}",
        waited.as_secs_f64()
    ))
}

/// Options with a short timeout for the failure checks.
pub fn short_timeout_options() -> CommOptions {
    CommOptions::default().with_timeout(Duration::from_millis(1500))
}
