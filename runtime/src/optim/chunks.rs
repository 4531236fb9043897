//! The schedule of the chunked GPU update of offloaded Adam state: which chunk is loaded,
//! updated and unloaded when, and how large a chunk the device's free memory allows. Pure
//! arithmetic, tested here; `managed::ChunkedAdam` runs it.

/// One operation of the chunked GPU update of offloaded state (see [`chunk_schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkOp {
    /// Prefetch chunk `i` of every buffer to the device (copy stream).
    Load(usize),
    /// Update chunk `i` on the device once it is loaded (compute stream).
    Update(usize),
    /// Prefetch chunk `i` back to the host once it is updated (copy stream).
    Unload(usize),
}

/// Device bytes one element of the chunked update occupies: parameter, gradient and two moments.
pub const CHUNK_BYTES_PER_ELEMENT: u64 = 16;

/// The order the chunked update issues its operations for `chunks` chunks: chunk `i + 1` is
/// loaded while chunk `i` is updated, and chunk `i` is unloaded before chunk `i + 2` is loaded,
/// so at most two chunks are on the device at once. The copy stream runs the loads and unloads
/// in this order; the compute stream runs the updates, each after its load.
pub fn chunk_schedule(chunks: usize) -> Vec<ChunkOp> {
    let mut ops = Vec::with_capacity(3 * chunks);
    for i in 0..chunks {
        ops.push(ChunkOp::Load(i));
        ops.push(ChunkOp::Update(i));
        if i > 0 {
            ops.push(ChunkOp::Unload(i - 1));
        }
    }
    if chunks > 0 {
        ops.push(ChunkOp::Unload(chunks - 1));
    }
    ops
}

/// Elements per chunk of the chunked update of `len` values with `free` device bytes: two
/// chunks take at most a quarter of the free memory, a chunk holds at most 16 Mi elements (256
/// MiB on the device) and at least 64 Ki, and never more than `len`. `None` when two chunks of
/// the smallest size do not fit in the quarter.
pub fn chunk_len(free: u64, len: usize) -> Option<usize> {
    const MIN: u64 = 64 * 1024;
    const MAX: u64 = 16 * 1024 * 1024;
    let fits = free / 4 / (2 * CHUNK_BYTES_PER_ELEMENT);
    if fits < MIN {
        return None;
    }
    Some(fits.min(MAX).min(len.max(1) as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays a schedule: every chunk is loaded, then updated, then unloaded, once each, and
    /// no load finds two chunks already on the device.
    fn replay(ops: &[ChunkOp], chunks: usize) -> usize {
        let mut state = vec![0u8; chunks];
        let mut resident = 0;
        let mut most = 0;
        for op in ops {
            match *op {
                ChunkOp::Load(i) => {
                    assert_eq!(state[i], 0, "chunk {i} loaded twice: {ops:?}");
                    state[i] = 1;
                    resident += 1;
                }
                ChunkOp::Update(i) => {
                    assert_eq!(state[i], 1, "chunk {i} updated before its load: {ops:?}");
                    state[i] = 2;
                }
                ChunkOp::Unload(i) => {
                    assert_eq!(state[i], 2, "chunk {i} unloaded before its update: {ops:?}");
                    state[i] = 3;
                    resident -= 1;
                }
            }
            most = most.max(resident);
        }
        assert!(state.iter().all(|&s| s == 3), "a chunk was left out: {ops:?}");
        most
    }

    #[test]
    fn the_schedule_keeps_two_chunks_on_the_device_and_overlaps_them() {
        assert!(chunk_schedule(0).is_empty());
        assert_eq!(replay(&chunk_schedule(1), 1), 1);
        for chunks in 2..40 {
            let ops = chunk_schedule(chunks);
            assert_eq!(replay(&ops, chunks), 2, "{chunks} chunks");
            // The next chunk's load is issued before this chunk's unload waits for its update.
            for i in 0..chunks - 1 {
                let load_next = ops.iter().position(|&o| o == ChunkOp::Load(i + 1)).unwrap();
                let unload = ops.iter().position(|&o| o == ChunkOp::Unload(i)).unwrap();
                assert!(load_next < unload, "{chunks} chunks: {ops:?}");
            }
        }
    }

    #[test]
    fn chunks_take_a_quarter_of_free_memory_within_bounds() {
        let gib = 1u64 << 30;
        // 8 GiB free: a quarter is 2 GiB, two chunks of 16 B per element: 64 Mi, capped at 16 Mi.
        assert_eq!(chunk_len(8 * gib, usize::MAX), Some(16 << 20));
        // 256 MiB free: 64 MiB for two chunks, 2 Mi elements each.
        assert_eq!(chunk_len(gib / 4, usize::MAX), Some(2 << 20));
        // Never more than the state itself.
        assert_eq!(chunk_len(8 * gib, 1000), Some(1000));
        // Too little free memory for two of the smallest chunks.
        assert_eq!(chunk_len(4 << 20, usize::MAX), None);
        let two_smallest = 4 * 2 * CHUNK_BYTES_PER_ELEMENT * 64 * 1024;
        assert_eq!(chunk_len(two_smallest, usize::MAX), Some(64 * 1024));
    }
}
