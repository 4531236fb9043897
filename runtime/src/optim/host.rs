//! Adam and AdamW on flat host buffers, multi-threaded and vectorisable.
//!
//! The arithmetic follows burn 0.22's `Adam` step for step, so an offloaded run and a run with
//! burn's optimizer agree to f32 rounding:
//!
//! ```text
//! g  ← g + λ·θ                          (Adam: L2 penalty folded into the gradient)
//! m  ← β1·m + (1−β1)·g
//! v  ← β2·v + (1−β2)·g²
//! c2 ← sqrt(1 − β2^t),  c ← c2 / (1 − β1^t)
//! θ  ← θ − lr · (m·c) / (sqrt(v) + ε·c2)
//! ```
//!
//! AdamW decouples the decay instead: `θ ← θ − lr·λ·θ` before the Adam update, and `g` is left
//! alone.
//!
//! Each step touches 28 bytes per parameter (reads θ, g, m, v; writes θ, m, v): it is bound by
//! memory bandwidth, so the work is cut into cache-sized chunks spread over a rayon pool and the
//! inner loop is a plain slice loop the compiler vectorises.

use rayon::prelude::*;

use super::state::StateBuffer;
use crate::Error;

/// Elements per parallel chunk: 16 Ki f32 = 64 KiB per buffer, four buffers fit in L2.
const CHUNK: usize = 16 * 1024;

/// Hyper-parameters (burn's `AdamConfig` defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostAdamConfig {
    /// β1 (default 0.9).
    pub beta_1: f32,
    /// β2 (default 0.999).
    pub beta_2: f32,
    /// ε (default 1e-5, as burn).
    pub epsilon: f32,
    /// Weight decay λ (default 0).
    pub weight_decay: f32,
    /// Decoupled decay (AdamW) instead of an L2 penalty (Adam).
    pub decoupled: bool,
}

impl Default for HostAdamConfig {
    fn default() -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay: 0.0,
            decoupled: false,
        }
    }
}

/// Adam state (two moments) for `len` parameters, in host-visible memory.
#[derive(Clone, PartialEq)]
pub struct HostAdam {
    config: HostAdamConfig,
    m: StateBuffer,
    v: StateBuffer,
    t: i32,
}

impl std::fmt::Debug for HostAdam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAdam")
            .field("config", &self.config)
            .field("params", &self.m.len())
            .field("t", &self.t)
            .finish()
    }
}

impl HostAdam {
    /// Zeroed moments for `len` parameters, in host memory.
    pub fn new(len: usize, config: HostAdamConfig) -> Self {
        Self::with_buffers(StateBuffer::host(len), StateBuffer::host(len), config)
    }

    /// Zeroed moments in the given buffers (host or, with `cuda`, managed memory).
    ///
    /// # Panics
    /// If the buffers differ in length.
    pub fn with_buffers(mut m: StateBuffer, mut v: StateBuffer, config: HostAdamConfig) -> Self {
        assert_eq!(m.len(), v.len(), "moment buffers differ in length");
        m.fill(0.0);
        v.fill(0.0);
        Self { config, m, v, t: 0 }
    }

    /// Whether the moments live in CUDA managed memory.
    pub fn managed(&self) -> bool {
        self.m.is_managed()
    }

    /// Bytes of optimizer state held (8 per parameter).
    pub fn state_bytes(&self) -> u64 {
        (self.m.len() + self.v.len()) as u64 * 4
    }

    /// Steps taken.
    pub fn steps(&self) -> i32 {
        self.t
    }

    /// The first and second moments, flat in parameter order.
    pub fn moments(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }

    /// Replaces the state with saved moments and step count (a resume).
    ///
    /// # Errors
    /// [`Error::StateMismatch`] when the lengths differ from this optimizer's
    /// parameter count.
    pub fn restore(&mut self, m: Vec<f32>, v: Vec<f32>, t: i32) -> Result<(), Error> {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            return Err(Error::StateMismatch {
                m: m.len(),
                v: v.len(),
                params: self.m.len(),
            });
        }
        // Copied into the existing buffers, so managed state stays where it was placed.
        self.m.copy_from_slice(&m);
        self.v.copy_from_slice(&v);
        self.t = t;
        Ok(())
    }

    /// One update of `params` with `grads` (same length as the state), on the current rayon
    /// pool.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32) {
        assert_eq!(params.len(), self.m.len(), "parameter count changed");
        assert_eq!(grads.len(), self.m.len(), "gradient count differs from parameters");
        self.m.prepare_for_host();
        self.v.prepare_for_host();
        let (k, first, decay) = self.next_step(lr);
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(self.m.par_chunks_mut(CHUNK))
            .zip(self.v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| update(p, g, m, v, &k, first, decay));
    }

    /// One update on the GPU of `params` with `grads`, all four buffers in managed memory,
    /// streamed through the device chunk by chunk by `gpu` (see [`super::managed::ChunkedAdam`]).
    /// The same arithmetic as [`HostAdam::step`], in the same order.
    ///
    /// # Errors
    /// [`Error::Cuda`] when a buffer is not managed memory or a CUDA call fails (the
    /// step count is not advanced when a buffer is not managed).
    ///
    /// # Panics
    /// If the lengths differ.
    #[cfg(feature = "cuda")]
    pub fn step_on_gpu(
        &mut self,
        gpu: &super::managed::ChunkedAdam,
        params: &mut StateBuffer,
        grads: &StateBuffer,
        lr: f32,
    ) -> Result<super::managed::ChunkStats, Error> {
        assert_eq!(params.len(), self.m.len(), "parameter count changed");
        assert_eq!(grads.len(), self.m.len(), "gradient count differs from parameters");
        let (StateBuffer::Managed(p), StateBuffer::Managed(g)) = (params, grads) else {
            return Err(Error::Cuda(
                "the GPU update needs the parameters and gradients in managed memory".into(),
            ));
        };
        let (StateBuffer::Managed(m), StateBuffer::Managed(v)) = (&mut self.m, &mut self.v) else {
            return Err(Error::Cuda(
                "the GPU update needs Adam's moments in managed memory".into(),
            ));
        };
        let t = self.t + 1;
        let (k, first, decay) = step_constants(&self.config, t, lr);
        let stats = gpu.step(p, g, m, v, &k.kernel_args(first, decay))?;
        self.t = t;
        Ok(stats)
    }

    /// Advances the step count and returns the constants of that step.
    fn next_step(&mut self, lr: f32) -> (Consts, bool, Decay) {
        self.t += 1;
        step_constants(&self.config, self.t, lr)
    }
}

/// The constants of step `t` (from 1), whether it is the first, and the kind of decay.
fn step_constants(c: &HostAdamConfig, t: i32, lr: f32) -> (Consts, bool, Decay) {
    let bc2 = (1.0 - c.beta_2.powi(t)).sqrt();
    let factor = bc2 / (1.0 - c.beta_1.powi(t));
    let k = Consts {
        lr,
        b1: c.beta_1,
        b2: c.beta_2,
        one_m_b1: 1.0 - c.beta_1,
        one_m_b2: 1.0 - c.beta_2,
        factor,
        eps: c.epsilon * bc2,
        wd: c.weight_decay,
    };
    let decay = match (c.weight_decay != 0.0, c.decoupled) {
        (false, _) => Decay::None,
        (true, false) => Decay::L2,
        (true, true) => Decay::Decoupled,
    };
    (k, t == 1, decay)
}

#[derive(Clone, Copy)]
struct Consts {
    lr: f32,
    b1: f32,
    b2: f32,
    one_m_b1: f32,
    one_m_b2: f32,
    factor: f32,
    eps: f32,
    wd: f32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Decay {
    None,
    L2,
    Decoupled,
}

#[cfg(feature = "cuda")]
impl Consts {
    /// The GPU kernel's scalar arguments for this step.
    fn kernel_args(&self, first: bool, decay: Decay) -> super::managed::AdamArgs {
        super::managed::AdamArgs {
            lr: self.lr,
            b1: self.b1,
            b2: self.b2,
            one_m_b1: self.one_m_b1,
            one_m_b2: self.one_m_b2,
            factor: self.factor,
            eps: self.eps,
            wd: self.wd,
            first: i32::from(first),
            decay: match decay {
                Decay::None => 0,
                Decay::L2 => 1,
                Decay::Decoupled => 2,
            },
        }
    }
}

/// Picks the widest vector unit the CPU has (AVX-512, AVX2, else the baseline), then the loop specialised for this step's shape.
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Consts, first: bool, decay: Decay) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            unsafe { update_avx512(p, g, m, v, k, first, decay) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { update_avx2(p, g, m, v, k, first, decay) };
            return;
        }
    }
    update_generic(p, g, m, v, k, first, decay);
}

/// The same loops compiled for AVX2: 8 lanes instead of SSE2's 4. No FMA contraction happens
/// (Rust never fuses separate multiplies and adds), so results are bit-identical to the generic
/// build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2")]
unsafe fn update_avx2(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Consts, first: bool, decay: Decay) {
    update_generic(p, g, m, v, k, first, decay);
}

/// As [`update_avx2`] with 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn update_avx512(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Consts, first: bool, decay: Decay) {
    update_generic(p, g, m, v, k, first, decay);
}

#[inline(always)]
fn update_generic(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Consts, first: bool, decay: Decay) {
    match (first, decay) {
        (true, Decay::None) => kernel::<true, 0>(p, g, m, v, k),
        (true, Decay::L2) => kernel::<true, 1>(p, g, m, v, k),
        (true, Decay::Decoupled) => kernel::<true, 2>(p, g, m, v, k),
        (false, Decay::None) => kernel::<false, 0>(p, g, m, v, k),
        (false, Decay::L2) => kernel::<false, 1>(p, g, m, v, k),
        (false, Decay::Decoupled) => kernel::<false, 2>(p, g, m, v, k),
    }
}

/// One branch-free loop per (first step, decay kind), in blocks of 16 lanes the compiler turns
/// into vector instructions, then the tail.
#[inline(always)]
fn kernel<const FIRST: bool, const DECAY: u8>(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Consts) {
    const LANES: usize = 16;
    let blocks = p.len() / LANES * LANES;
    let (p_main, p_tail) = p.split_at_mut(blocks);
    let (g_main, g_tail) = g.split_at(blocks);
    let (m_main, m_tail) = m.split_at_mut(blocks);
    let (v_main, v_tail) = v.split_at_mut(blocks);
    for (((p, g), m), v) in p_main
        .chunks_exact_mut(LANES)
        .zip(g_main.chunks_exact(LANES))
        .zip(m_main.chunks_exact_mut(LANES))
        .zip(v_main.chunks_exact_mut(LANES))
    {
        let p: &mut [f32; LANES] = p.try_into().expect("exact chunk");
        let g: &[f32; LANES] = g.try_into().expect("exact chunk");
        let m: &mut [f32; LANES] = m.try_into().expect("exact chunk");
        let v: &mut [f32; LANES] = v.try_into().expect("exact chunk");
        for i in 0..LANES {
            element::<FIRST, DECAY>(&mut p[i], g[i], &mut m[i], &mut v[i], k);
        }
    }
    for (((p, &g), m), v) in p_tail
        .iter_mut()
        .zip(g_tail)
        .zip(m_tail.iter_mut())
        .zip(v_tail.iter_mut())
    {
        element::<FIRST, DECAY>(p, g, m, v, k);
    }
}

#[inline(always)]
fn element<const FIRST: bool, const DECAY: u8>(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, k: &Consts) {
    let mut gi = g;
    if DECAY == 1 {
        // burn: θ·λ + g.
        gi += *p * k.wd;
    } else if DECAY == 2 {
        *p -= k.lr * k.wd * *p;
    }
    // burn starts the moments from the first gradient; the operation order matches it.
    let (mi, vi) = if FIRST {
        (gi * k.one_m_b1, gi * gi * k.one_m_b2)
    } else {
        (*m * k.b1 + gi * k.one_m_b1, *v * k.b2 + gi * gi * k.one_m_b2)
    };
    *m = mi;
    *v = vi;
    *p -= (mi * k.factor / (vi.sqrt() + k.eps)) * k.lr;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_scalar_formula() {
        let mut adam = HostAdam::new(3, HostAdamConfig::default());
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = vec![0.1f32, -0.3, 0.0];
        adam.step(&mut p, &g, 0.01);
        // The first step of Adam moves each parameter by about lr against its gradient's sign.
        assert!((p[0] - 0.99).abs() < 1e-4, "{}", p[0]);
        assert!((p[1] + 1.99).abs() < 1e-4, "{}", p[1]);
        assert_eq!(p[2], 0.5);
        assert_eq!(adam.state_bytes(), 24);
    }

    /// Buffers handed in are zeroed; a restore copies into them and keeps the step count.
    #[test]
    fn given_buffers_are_zeroed_and_restored_in_place() {
        let m = StateBuffer::Host(vec![7.0; 4]);
        let v = StateBuffer::Host(vec![9.0; 4]);
        let mut adam = HostAdam::with_buffers(m, v, HostAdamConfig::default());
        assert!(!adam.managed());
        assert_eq!(adam.moments(), (&[0.0f32; 4][..], &[0.0f32; 4][..]));
        adam.restore(vec![1.0, 2.0, 3.0, 4.0], vec![5.0; 4], 12).unwrap();
        assert_eq!(adam.moments().0, &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(adam.steps(), 12);
        let copy = adam.clone();
        assert_eq!(copy, adam);
        let err = adam.restore(vec![0.0; 3], vec![0.0; 4], 1).unwrap_err();
        assert!(
            err.to_string()
                .contains("3 and 4 values but the model has 4 parameters"),
            "{err}"
        );
    }
}
