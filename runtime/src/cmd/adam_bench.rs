//! `ballast bench adam`: the host Adam's memory bandwidth against a STREAM-like triad, on 1 and
//! 2 threads, measured alternately in one run.
//!
//! Adam moves 28 bytes per parameter per step (f32: reads θ, g, m, v; writes θ, m, v); the triad
//! `a[i] = b[i] + s·c[i]` runs on f64 as STREAM's does and moves 24 bytes per element (STREAM's
//! count, without write-allocate traffic). Both byte counts come from the element types. Both are
//! reported as GB/s from the best of the repetitions, as STREAM does (medians beside them);
//! `ratio_vs_stream` is Adam's GB/s over the triad's.

use std::{process::ExitCode, time::Instant};

use anyhow::Result;
use ballast::optim::{HostAdam, HostAdamConfig};
use rayon::prelude::*;
use serde_json::json;

/// Options of `ballast bench adam`.
#[derive(clap::Args)]
pub struct AdamArgs {
    /// Print JSON lines (the last one is the summary).
    #[arg(long)]
    pub json: bool,
    /// Parameters (and triad elements); 16 Mi = 448 MiB of Adam traffic per step.
    #[arg(long, default_value_t = 16 << 20)]
    pub params: usize,
    /// Timed repetitions per kernel and thread count.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
}

/// Runs the benchmark.
pub fn run(args: &AdamArgs) -> Result<ExitCode> {
    let n = args.params;
    let mut params = vec![0.5f32; n];
    let grads = vec![1e-3f32; n];
    let mut adam = HostAdam::new(n, HostAdamConfig::default());
    let mut a = vec![0.0f64; n];
    let b = vec![1.0f64; n];
    let c = vec![2.0f64; n];
    let mut last = None;
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        let (mut t_adam, mut t_triad) = (Vec::new(), Vec::new());
        pool.install(|| {
            // Warm up both (page faults, caches).
            adam.step(&mut params, &grads, 1e-4);
            triad(&mut a, &b, &c);
            for rep in 0..args.reps {
                for adam_first in [rep % 2 == 0, rep % 2 != 0] {
                    let started = Instant::now();
                    if adam_first {
                        adam.step(&mut params, &grads, 1e-4);
                        t_adam.push(started.elapsed().as_secs_f64());
                    } else {
                        triad(&mut a, &b, &c);
                        t_triad.push(started.elapsed().as_secs_f64());
                    }
                }
            }
        });
        // STREAM reports the best of its repetitions; the median is printed beside it.
        let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let adam_bytes = ADAM_BYTES_PER_PARAM as f64 * n as f64;
        let triad_bytes = TRIAD_BYTES_PER_ELEMENT as f64 * n as f64;
        let adam_gbs = adam_bytes / best(&t_adam) / 1e9;
        let triad_gbs = triad_bytes / best(&t_triad) / 1e9;
        let adam_median_gbs = adam_bytes / median(&mut t_adam) / 1e9;
        let triad_median_gbs = triad_bytes / median(&mut t_triad) / 1e9;
        let line = json!({
            "bench": "adam", "summary": false, "threads": threads, "params": n, "reps": args.reps,
            "adam_gbs": adam_gbs, "triad_gbs": triad_gbs, "ratio_vs_stream": adam_gbs / triad_gbs,
            "adam_median_gbs": adam_median_gbs, "triad_median_gbs": triad_median_gbs,
            "ratio_vs_stream_median": adam_median_gbs / triad_median_gbs,
            // The triad also reads each line of `a` before writing it (write-allocate): 32 bytes
            // really move per element. Adam writes only what it has read.
            "triad_gbs_with_write_allocate": triad_gbs * 4.0 / 3.0,
            "ratio_vs_stream_with_write_allocate": adam_gbs / (triad_gbs * 4.0 / 3.0),
            "adam_params_per_sec": adam_gbs * 1e9 / ADAM_BYTES_PER_PARAM as f64,
        });
        if args.json {
            println!("{line}");
        } else {
            println!(
                "{threads} thread(s): host Adam {adam_gbs:.2} GB/s, triad {triad_gbs:.2} GB/s, ratio {:.3}",
                adam_gbs / triad_gbs
            );
        }
        last = Some((threads, adam_gbs, triad_gbs));
    }
    let (threads, adam_gbs, triad_gbs) = last.expect("two thread counts");
    if args.json {
        println!(
            "{}",
            json!({"bench": "adam", "summary": true, "threads": threads, "adam_gbs": adam_gbs, "triad_gbs": triad_gbs,
                   "ratio_vs_stream": adam_gbs / triad_gbs, "target": 0.70})
        );
    }
    std::hint::black_box((&params, &a));
    Ok(ExitCode::SUCCESS)
}

/// Bytes the host Adam moves per parameter: four f32 reads (θ, g, m, v), three f32 writes.
const ADAM_BYTES_PER_PARAM: usize = 7 * std::mem::size_of::<f32>();
/// Bytes the triad moves per element: two f64 reads (b, c), one f64 write (a).
const TRIAD_BYTES_PER_ELEMENT: usize = 3 * std::mem::size_of::<f64>();

fn triad(a: &mut [f64], b: &[f64], c: &[f64]) {
    const CHUNK: usize = 8 * 1024;
    let s = 3.0f64;
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .zip(c.par_chunks(CHUNK))
        .for_each(|((a, b), c)| {
            for i in 0..a.len() {
                a[i] = b[i] + s * c[i];
            }
        });
}
