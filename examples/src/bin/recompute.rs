//! `recompute`: what burn's op-level recomputation (`Device::autodiff().gradient_checkpointing()`)
//! saves and costs on `flex`, for the models ballast trains: the testkit's MLP and conv net and
//! the example ResNet and Transformer. For each model and setting it measures the heap's peak
//! over one forward and backward pass (the counting allocator) at two micro-batch sizes, and
//! prints one JSON line: bytes per sample (the slope between the two), samples per second at the
//! larger size, and whether every gradient equals the one computed without recomputation bit for
//! bit (the mathematics is the same; only what is kept for backward differs).
//!
//! ```sh
//! cargo run --release -p ballast-examples --features testkit --bin recompute
//! ```

use std::time::Instant;

use ballast::{
    memory::DeviceMeter,
    params::{flatten_params, load_params},
    testing::{ImageConvNet, Regressor, WideMlp, IMAGE_SIDE, TARGETS, WIDE_FEATURES},
};
use ballast_examples::models::{LmShape, ResNet, ResNetShape, TransformerLm};
use burn::{
    module::{Module, ModuleVisitor, Param},
    nn::loss::{CrossEntropyLossConfig, MseLoss, Reduction},
    tensor::{Device, Distribution, Gradients, Int, Tensor},
};
use serde_json::json;

#[global_allocator]
static ALLOC: ballast::memory::CountingAlloc = ballast::memory::CountingAlloc;

/// Micro-batch sizes the slope is taken between.
const SIZES: [usize; 2] = [4, 16];
/// Timed passes at the larger size.
const PASSES: usize = 3;

/// A model, its loss on a seeded batch of `m` samples, and how to build it on a device.
trait Probe: Module + Sized {
    fn name() -> &'static str;
    fn build(device: &Device) -> Self;
    fn loss(&self, m: usize, device: &Device) -> Tensor<1>;
}

impl Probe for WideMlp {
    fn name() -> &'static str {
        "mlp (width 512)"
    }
    fn build(device: &Device) -> Self {
        WideMlp::with_width(512, device)
    }
    fn loss(&self, m: usize, device: &Device) -> Tensor<1> {
        let x = seeded([m, WIDE_FEATURES], device);
        let y = seeded([m, TARGETS], device);
        MseLoss::new().forward(self.forward(x), y, Reduction::Mean)
    }
}

impl Probe for ImageConvNet {
    fn name() -> &'static str {
        "conv net (16 channels, 32x32)"
    }
    fn build(device: &Device) -> Self {
        ImageConvNet::with_channels(16, device)
    }
    fn loss(&self, m: usize, device: &Device) -> Tensor<1> {
        let x = seeded([m, IMAGE_SIDE * IMAGE_SIDE], device);
        let y = seeded([m, TARGETS], device);
        MseLoss::new().forward(Regressor::forward(self, x), y, Reduction::Mean)
    }
}

impl Probe for ResNet {
    fn name() -> &'static str {
        "resnet (the example's: width 16, 3 stages)"
    }
    fn build(device: &Device) -> Self {
        ResNet::new(
            ResNetShape {
                stages: 3,
                ..ResNetShape::resnet18(16, 10)
            },
            device,
        )
    }
    fn loss(&self, m: usize, device: &Device) -> Tensor<1> {
        let x: Tensor<4> = seeded([m, 3, 32, 32], device);
        let y = labels(m, 10, device);
        CrossEntropyLossConfig::new().init(device).forward(self.forward(x), y)
    }
}

impl Probe for TransformerLm {
    fn name() -> &'static str {
        "transformer (the example's: d_model 64, 4 heads, 2 layers, 64 bytes)"
    }
    fn build(device: &Device) -> Self {
        TransformerLm::new(LM, device)
    }
    fn loss(&self, m: usize, device: &Device) -> Tensor<1> {
        let x = labels(m * LM.seq_len, LM.vocab, device).reshape([m, LM.seq_len]);
        let y = labels(m * LM.seq_len, LM.vocab, device);
        CrossEntropyLossConfig::new().init(device).forward(self.forward(x), y)
    }
}

const LM: LmShape = LmShape {
    d_model: 64,
    heads: 4,
    layers: 2,
    seq_len: 64,
    vocab: 256,
};

fn seeded<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn labels(n: usize, classes: usize, device: &Device) -> Tensor<1, Int> {
    let values: Vec<i64> = (0..n).map(|i| ((i * 7 + 3) % classes) as i64).collect();
    Tensor::from_data(burn::tensor::TensorData::new(values, [n]), device)
}

/// Peak heap bytes of one forward and backward pass of `m` samples, and the gradients.
fn peak<M: Probe>(model: &M, m: usize, device: &Device, meter: &DeviceMeter) -> (u64, Gradients) {
    device.seed(5);
    meter.reset_peak();
    let grads = model.loss(m, device).backward();
    (meter.peak(), grads)
}

/// Every parameter's gradient, flattened in parameter order.
fn gradient_values<M: Module>(model: &M, grads: &Gradients) -> Vec<Vec<f32>> {
    struct Each<'a>(&'a Gradients, Vec<Vec<f32>>);
    impl ModuleVisitor for Each<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = param.val().grad(self.0) {
                self.1.push(g.into_data().iter::<f32>().collect());
            }
        }
    }
    let mut each = Each(grads, Vec::new());
    model.visit(&mut each);
    each.1
}

fn measure<M: Probe>() {
    let plain = Device::flex().autodiff();
    let initial = flatten_params(&M::build(&plain));
    let mut results = Vec::new();
    for recompute in [false, true] {
        let device = if recompute {
            plain.clone().gradient_checkpointing()
        } else {
            plain.clone()
        };
        let model = load_params(M::build(&device), &initial);
        let meter = DeviceMeter::for_device(&device);
        let _warm = peak(&model, SIZES[1], &device, &meter);
        let (small, _) = peak(&model, SIZES[0], &device, &meter);
        let (large, grads) = peak(&model, SIZES[1], &device, &meter);
        let values = gradient_values(&model, &grads);
        drop(grads);
        let started = Instant::now();
        for _ in 0..PASSES {
            drop(peak(&model, SIZES[1], &device, &meter));
        }
        let samples_per_s = (PASSES * SIZES[1]) as f64 / started.elapsed().as_secs_f64();
        let per_sample = large.saturating_sub(small) / (SIZES[1] - SIZES[0]) as u64;
        results.push((recompute, per_sample, large, samples_per_s, values));
    }
    let identical = results[0].4 == results[1].4;
    for (recompute, per_sample, large, samples_per_s, _) in &results {
        println!(
            "{}",
            json!({
                "model": M::name(),
                "recompute": recompute,
                "bytes_per_sample": per_sample,
                "peak_bytes_at": {"micro_batch": SIZES[1], "bytes": large},
                "samples_per_s": (samples_per_s * 10.0).round() / 10.0,
                "gradients_identical": identical,
            })
        );
    }
    let saving = 1.0 - results[1].1 as f64 / results[0].1.max(1) as f64;
    println!(
        "{}",
        json!({"model": M::name(), "summary": true, "bytes_per_sample_saved": (saving * 1000.0).round() / 1000.0,
               "speed_ratio": (results[1].3 / results[0].3 * 1000.0).round() / 1000.0, "gradients_identical": identical})
    );
    assert!(identical, "{}: recomputation changed a gradient", M::name());
}

fn main() {
    assert!(
        ballast::memory::is_counting(),
        "the counting allocator is not installed"
    );
    measure::<WideMlp>();
    measure::<ImageConvNet>();
    measure::<ResNet>();
    measure::<TransformerLm>();
}
