//! Launching the `ballast` and `ballast-selftest` binaries under `mpirun` from a test.

#![allow(dead_code)]

use std::process::Output;

use ballast::testing::launch;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use ballast::testing::launch::{lines_with, one_job as serial, output_text as dump};

/// Runs `ballast <args>` on `ranks` MPI processes (see [`ballast::testing::launch::mpirun`]).
pub fn mpirun(ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    launch::mpirun(env!("CARGO_BIN_EXE_ballast"), None, ranks, args, envs)
}

/// Runs `ballast-selftest <args>` as [`mpirun`] runs `ballast`.
pub fn selftest(ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    launch::mpirun(env!("CARGO_BIN_EXE_ballast-selftest"), None, ranks, args, envs)
}

/// The equivalence report of `cases` on `ranks` ranks as threads, every rank's lines, printed.
#[cfg(feature = "testkit")]
pub fn equivalence_on_threads(ranks: usize, cases: &[ballast::testing::Case]) -> Vec<String> {
    use ballast::collectives::{local, CommOptions};
    let reports = local::run(ranks, CommOptions::default(), |comm| {
        ballast::testing::equivalence_report(Box::new(comm), cases).map_err(|e| e.to_string())
    });
    let lines: Vec<String> = reports
        .into_iter()
        .flat_map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect();
    for l in &lines {
        println!("{l}");
    }
    lines
}

/// The equivalence report of `ballast-selftest <check>` under `mpirun -np 3`, every rank's
/// lines, printed; the run must succeed and every rank report each of `cases` cases.
pub fn equivalence_under_mpirun(check: &str, cases: usize) -> Vec<String> {
    let out = selftest(3, &[check], &[]);
    assert!(out.status.success(), "{}", dump(&out));
    let lines = lines_with(&out, "equivalence rank");
    for l in &lines {
        println!("{l}");
    }
    assert_eq!(lines.len(), 3 * cases, "{}", dump(&out));
    lines
}

/// One rank's record of an f16 run: per step, whether it overflowed, the scale and the loss.
type F16Run = (Vec<(bool, f32, f64)>, u64);

/// f16 with dynamic loss scaling on three unequal ranks on `choice` (shares 5/2/1, Adam): a first scale of
/// 2^24 overflows f16 (its range ends at 65504), so the first steps are skipped and the scale
/// halves until the gradients are finite; it then grows after every 5 good steps and
/// overflows again. Every rank skips the same steps at the same scales, the replicas stay
/// identical, and training goes on.
#[cfg(feature = "testkit")]
pub fn f16_loss_scaling_run(choice: ballast::device::DeviceChoice) {
    use ballast::{
        collectives::{local, CommOptions, Communicator},
        testing::{Mlp, Regressor, SyntheticSet},
        DataParallel, DdpOptions, Error, GlobalSampler, LossScaling, Precision,
    };
    use burn::{
        nn::loss::{MseLoss, Reduction},
        optim::AdamConfig,
        tensor::FloatDType,
    };
    const STEPS: u64 = 40;
    let shares = [5, 2, 1];
    let results = local::run(3, CommOptions::default(), |comm| {
        let device = choice.device(0)?.autodiff();
        let rank = comm.rank();
        let scaling = LossScaling {
            init_scale: 16_777_216.0,
            growth_interval: 5,
            ..LossScaling::default()
        };
        let options = DdpOptions::default()
            .with_precision(Precision::F16)
            .with_loss_scaling(scaling);
        let (mut ddp, mut model) = DataParallel::wrap(Box::new(comm), Mlp::init(&device), options)?;
        let data = SyntheticSet::new(64, 3);
        let sampler = GlobalSampler::new(data.len(), 8, 3)?;
        let mut adam = AdamConfig::new().init();
        let mut record = Vec::new();
        for step in 0..STEPS {
            let mine = &sampler.split(&sampler.batch(step), &shares)[rank];
            let (x, y) = data.batch(mine, &device);
            let out = model.forward(x.cast(FloatDType::F16));
            let loss = MseLoss::new().forward(out, y.cast(FloatDType::F16), Reduction::Mean);
            ddp.backward(&model, loss, mine.len())?;
            let (next, stats) = ddp.step(model, &mut adam, 1e-2)?;
            model = next;
            record.push((stats.overflow, stats.loss_scale, stats.loss));
        }
        ddp.verify_replicas(&model)?;
        Ok::<F16Run, Error>((record, ballast::params::checksum(&model)))
    });
    let runs: Vec<F16Run> = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let (record, _) = &runs[0];
    for (other, _) in &runs[1..] {
        let flags = |r: &[(bool, f32, f64)]| r.iter().map(|&(o, s, _)| (o, s)).collect::<Vec<_>>();
        assert_eq!(
            flags(other),
            flags(record),
            "every rank skips the same steps at the same scales"
        );
    }
    let skipped: Vec<usize> = (0..record.len()).filter(|&i| record[i].0).collect();
    let applied: Vec<f64> = record.iter().filter(|r| !r.0).map(|r| r.2).collect();
    let scales: Vec<f32> = record.iter().map(|r| r.1).collect();
    println!("f16 on {choice}: skipped steps {skipped:?}; scales {scales:?}");
    println!(
        "f16 on {choice}: loss at the first applied step {:.5}, at the last {:.5}",
        applied[0],
        applied[applied.len() - 1]
    );
    assert!(skipped.len() >= 2, "the first scale overflows f16: {skipped:?}");
    assert!(
        skipped.iter().any(|&s| s > skipped[0] + 5),
        "the scale grows and overflows again: {skipped:?}"
    );
    assert!(applied.len() >= 20, "training went on: {} steps applied", applied.len());
    assert!(
        applied[applied.len() - 1] < 0.7 * applied[0],
        "the loss falls: {applied:?}"
    );
    // Halved after each overflow, doubled after 5 good steps in a row, never otherwise.
    for w in record.windows(2) {
        let (overflow, scale, _) = w[0];
        let next = w[1].1;
        assert!(
            (overflow && next == scale / 2.0) || (!overflow && (next == scale || next == scale * 2.0)),
            "{scales:?}"
        );
    }
}
