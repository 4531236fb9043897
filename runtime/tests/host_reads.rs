//! Reads from the device to the host, counted where they happen: wgpu-core logs every buffer
//! mapping it is asked for (`Buffer::map_async ... host: Read`), whoever asks (cubecl, burn,
//! ballast). This test process installs its own `log` sink that counts those records, so it
//! counts every read of the wgpu device, not what ballast says it read.
//!
//! A `DataParallel` step on Mesa's software Vulkan device must read nothing while the
//! micro-batches run (forward, backward, gradients added on the device) and read its buckets at
//! the reduction.

#[cfg(feature = "wgpu")]
mod wgpu {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ballast::{
        collectives::{local, CommOptions},
        device::DeviceChoice,
        testing::{Mlp, Regressor, SyntheticSet},
        DataParallel, DdpOptions,
    };
    use burn::{
        nn::loss::{MseLoss, Reduction},
        optim::SgdConfig,
    };

    /// Buffer mappings for reading that wgpu-core has logged so far.
    static READS: AtomicUsize = AtomicUsize::new(0);

    struct ReadProbe;

    impl log::Log for ReadProbe {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.target().starts_with("wgpu_core")
        }

        fn log(&self, record: &log::Record<'_>) {
            if !self.enabled(record.metadata()) {
                return;
            }
            let message = record.args().to_string();
            if message.starts_with("Buffer::map_async") && message.contains("Read") {
                READS.fetch_add(1, Ordering::SeqCst);
            }
        }

        fn flush(&self) {}
    }

    fn reads() -> usize {
        READS.load(Ordering::SeqCst)
    }

    #[test]
    fn a_step_reads_nothing_from_the_device_during_its_micro_batches() {
        log::set_logger(&ReadProbe).expect("this test process has no other logger");
        log::set_max_level(log::LevelFilter::Trace);
        let device = DeviceChoice::WgpuCpu
            .device(0)
            .expect("wgpu:cpu (Mesa's lavapipe)")
            .autodiff();
        let data = SyntheticSet::new(256, 5);
        let comm = local::world(1, CommOptions::default()).remove(0);
        let (mut ddp, mut model) =
            DataParallel::wrap(Box::new(comm), Mlp::init(&device), DdpOptions::default()).unwrap();
        let mut optim = SgdConfig::new().init();
        let before_any = reads();
        let mut at_reduce = Vec::new();
        for step in 0..3 {
            let started = reads();
            for micro_batch in 0..4 {
                let indices: Vec<usize> = (0..16)
                    .map(|i| (step * 64 + micro_batch * 16 + i) % data.len())
                    .collect();
                let (x, y) = data.batch(&indices, &device);
                let loss = MseLoss::new().forward(model.forward(x), y, Reduction::Mean);
                ddp.backward(&model, loss, indices.len()).unwrap();
            }
            assert_eq!(
                reads() - started,
                0,
                "step {step}: the device was read during the micro-batches"
            );
            let before = reads();
            let grads = ddp.reduce(&model).unwrap();
            at_reduce.push(reads() - before);
            model = optim.step(0.01, model, grads.into_params().unwrap());
        }
        println!(
            "device reads per step at the reduction: {at_reduce:?} (all reads: {})",
            reads() - before_any
        );
        // The probe sees reads: the thread communicator reads the step's bucket to the host.
        assert!(at_reduce.iter().all(|&n| n >= 1), "{at_reduce:?}");
    }
}

#[cfg(not(feature = "wgpu"))]
#[test]
fn host_read_tests_need_the_wgpu_feature() {
    println!("skipped: the host-read test needs ballast built with `--features wgpu` (and a Vulkan driver, e.g. Mesa's lavapipe)");
}
