//! The example models.
//!
//! Both use only per-sample normalisation (group and layer norm, no batch norm) and no dropout,
//! so a sample's gradient does not depend on which micro-batch or rank it lands in: data-parallel
//! training over unequal micro-batches stays the mathematics of one big batch.

use burn::{
    module::Module,
    nn::{
        attention::generate_autoregressive_mask,
        conv::{Conv2d, Conv2dConfig},
        pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig},
        transformer::{TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput},
        Embedding, EmbeddingConfig, GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig,
        PaddingConfig2d, Relu,
    },
    tensor::{Device, FloatDType, Int, Tensor},
};

/// Shape of a [`ResNet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResNetShape {
    /// Channels of the first stage; each later stage doubles them (ResNet-18: 64).
    pub width: usize,
    /// Stages, each halving the resolution after the first (ResNet-18: 4).
    pub stages: usize,
    /// Basic blocks per stage (ResNet-18: 2).
    pub blocks: usize,
    /// Classes.
    pub classes: usize,
}

impl ResNetShape {
    /// ResNet-18's layout at a given base width.
    pub fn resnet18(width: usize, classes: usize) -> Self {
        Self {
            width,
            stages: 4,
            blocks: 2,
            classes,
        }
    }
}

fn norm(channels: usize, device: &Device) -> GroupNorm {
    // Groups of (up to) 8 channels; one group when channels are few.
    let groups = (channels / 8).max(1);
    let groups = if channels % groups == 0 { groups } else { 1 };
    GroupNormConfig::new(groups, channels).init(device)
}

fn conv3(inp: usize, out: usize, stride: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([inp, out], [3, 3])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(device)
}

/// Two 3×3 convolutions with a residual connection (a 1×1 projection when the shape changes).
#[derive(Module, Debug)]
pub struct BasicBlock {
    c1: Conv2d,
    n1: GroupNorm,
    c2: Conv2d,
    n2: GroupNorm,
    project: Option<Conv2d>,
    project_norm: Option<GroupNorm>,
    act: Relu,
}

impl BasicBlock {
    fn new(inp: usize, out: usize, stride: usize, device: &Device) -> Self {
        let reshape = stride != 1 || inp != out;
        Self {
            c1: conv3(inp, out, stride, device),
            n1: norm(out, device),
            c2: conv3(out, out, 1, device),
            n2: norm(out, device),
            project: reshape.then(|| {
                Conv2dConfig::new([inp, out], [1, 1])
                    .with_stride([stride, stride])
                    .with_bias(false)
                    .init(device)
            }),
            project_norm: reshape.then(|| norm(out, device)),
            act: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.act.forward(self.n1.forward(self.c1.forward(x.clone())));
        let h = self.n2.forward(self.c2.forward(h));
        let skip = match (&self.project, &self.project_norm) {
            (Some(p), Some(n)) => n.forward(p.forward(x)),
            _ => x,
        };
        self.act.forward(h + skip)
    }
}

/// A ResNet-18-style classifier for 3×32×32 images (CIFAR stem: one 3×3 convolution, no
/// max-pool), with group normalisation.
#[derive(Module, Debug)]
pub struct ResNet {
    stem: Conv2d,
    stem_norm: GroupNorm,
    blocks: Vec<BasicBlock>,
    pool: AdaptiveAvgPool2d,
    head: Linear,
    act: Relu,
}

impl ResNet {
    /// Builds the net on `device`.
    pub fn new(shape: ResNetShape, device: &Device) -> Self {
        let mut blocks = Vec::new();
        let mut channels = shape.width;
        for stage in 0..shape.stages {
            let out = shape.width << stage;
            for b in 0..shape.blocks {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(channels, out, stride, device));
                channels = out;
            }
        }
        Self {
            stem: conv3(3, shape.width, 1, device),
            stem_norm: norm(shape.width, device),
            blocks,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            head: LinearConfig::new(channels, shape.classes).init(device),
            act: Relu::new(),
        }
    }

    /// Class logits `[n, classes]` of images `[n, 3, 32, 32]`, computed in the float type of
    /// the net's parameters (the images are cast to it: bf16 for a bf16 replica).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let images = images.cast(FloatDType::from(self.stem.weight.val().dtype()));
        let mut h = self.act.forward(self.stem_norm.forward(self.stem.forward(images)));
        for block in &self.blocks {
            h = block.forward(h);
        }
        let [n, c, _, _] = h.dims();
        self.head.forward(self.pool.forward(h).reshape([n, c]))
    }
}

/// Shape of a [`TransformerLm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LmShape {
    /// Model width.
    pub d_model: usize,
    /// Attention heads.
    pub heads: usize,
    /// Layers.
    pub layers: usize,
    /// Context length.
    pub seq_len: usize,
    /// Vocabulary (256 for bytes).
    pub vocab: usize,
}

/// A decoder-only Transformer language model: token and position embeddings, pre-norm layers
/// with causal self-attention, a final norm and a linear head.
#[derive(Module, Debug)]
pub struct TransformerLm {
    tokens: Embedding,
    positions: Embedding,
    encoder: TransformerEncoder,
    norm: LayerNorm,
    head: Linear,
}

impl TransformerLm {
    /// Builds the model on `device`.
    pub fn new(shape: LmShape, device: &Device) -> Self {
        Self {
            tokens: EmbeddingConfig::new(shape.vocab, shape.d_model).init(device),
            positions: EmbeddingConfig::new(shape.seq_len, shape.d_model).init(device),
            encoder: TransformerEncoderConfig::new(shape.d_model, 4 * shape.d_model, shape.heads, shape.layers)
                .with_dropout(0.0)
                .with_norm_first(true)
                .init(device),
            norm: LayerNormConfig::new(shape.d_model).init(device),
            head: LinearConfig::new(shape.d_model, shape.vocab).init(device),
        }
    }

    /// Next-token logits `[n * seq, vocab]` of tokens `[n, seq]`, in the float type of the
    /// model's parameters.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let [n, seq] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device)
            .reshape([1, seq])
            .repeat_dim(0, n);
        let h = self.tokens.forward(tokens) + self.positions.forward(positions);
        let mask = generate_autoregressive_mask(n, seq, &device);
        let h = self.encoder.forward(TransformerEncoderInput::new(h).mask_attn(mask));
        let h = self.norm.forward(h);
        let [_, _, d] = h.dims();
        self.head.forward(h.reshape([n * seq, d]))
    }
}

impl TransformerLm {
    /// Continues `prompt` by `bytes` bytes, each drawn from the model's next-byte distribution
    /// at `temperature` (0: always the most likely byte), seeded by `seed`; the model sees the
    /// last `context` bytes (at most its training context).
    pub fn generate(
        &self,
        prompt: &[u8],
        bytes: usize,
        temperature: f64,
        context: usize,
        seed: u64,
        device: &Device,
    ) -> Vec<u8> {
        let model = self.valid();
        let mut rng = crate::Lcg::new(seed);
        let mut text: Vec<u8> = if prompt.is_empty() {
            b" ".to_vec()
        } else {
            prompt.to_vec()
        };
        let start = text.len();
        for _ in 0..bytes {
            let window = &text[text.len().saturating_sub(context.max(1))..];
            let tokens: Vec<i64> = window.iter().map(|&b| i64::from(b)).collect();
            let input = Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(tokens, [1, window.len()]), device)
                .without_autodiff();
            let logits = model.forward(input);
            let [rows, vocab] = logits.dims();
            let last: Vec<f32> = logits
                .slice([rows - 1..rows, 0..vocab])
                .into_data()
                .iter::<f32>()
                .collect();
            text.push(pick_byte(&last, temperature, &mut rng));
        }
        text.split_off(start)
    }
}

/// The most likely byte (temperature 0) or one drawn from `softmax(logits / temperature)`.
fn pick_byte(logits: &[f32], temperature: f64, rng: &mut crate::Lcg) -> u8 {
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    if temperature <= 0.0 {
        return best as u8;
    }
    let top = f64::from(logits[best]);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l) - top) / temperature).exp())
        .collect();
    let mut draw = f64::from(rng.unit()) * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        draw -= w;
        if draw < 0.0 {
            return i as u8;
        }
    }
    best as u8
}
