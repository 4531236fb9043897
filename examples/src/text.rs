//! Text for the byte-level language model: any UTF-8 file, cut into windows of `seq_len + 1`
//! bytes (inputs and the next byte of each position as targets).
//!
//! A file that is not UTF-8 is refused by default, naming the first bad byte: the model would
//! train on it, but such a file is far more often a wrong path (an archive, a binary) than a
//! corpus. `allow_binary` accepts any bytes.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Byte vocabulary.
pub const VOCAB: usize = 256;

/// Why a text file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The path cannot be read.
    #[error("cannot read text at {path}: {source}; pass --data a UTF-8 text file")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not UTF-8.
    #[error(
        "{path} is not UTF-8 text: invalid byte 0x{byte:02x} at offset {offset} (line {line}); pass a text \
         file, or --allow-binary to train on raw bytes"
    )]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first invalid sequence.
        offset: usize,
        /// Its 1-based line.
        line: usize,
        /// The byte there.
        byte: u8,
    },
    /// Too short for one window.
    #[error(
        "{path} has {len} bytes but one training sequence needs {needed} (--seq-len {seq_len} + 1); use a \
         longer text or a smaller --seq-len"
    )]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
        /// Bytes needed.
        needed: usize,
        /// The sequence length.
        seq_len: usize,
    },
    /// A zero sequence length.
    #[error("--seq-len must be at least 1")]
    ZeroSeqLen,
}

/// A text cut into fixed windows.
#[derive(Debug, Clone)]
pub struct TextSet {
    bytes: Vec<u8>,
    seq_len: usize,
}

impl TextSet {
    /// Reads `path` and cuts it into windows of `seq_len + 1` bytes.
    ///
    /// # Errors
    /// [`TextError`] naming the file and the problem.
    pub fn load(path: &Path, seq_len: usize, allow_binary: bool) -> Result<Self, TextError> {
        let bytes = std::fs::read(path).map_err(|source| TextError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(path, bytes, seq_len, allow_binary)
    }

    /// As [`TextSet::load`], from bytes already read (`path` is named in errors).
    ///
    /// # Errors
    /// [`TextError`].
    pub fn from_bytes(path: &Path, bytes: Vec<u8>, seq_len: usize, allow_binary: bool) -> Result<Self, TextError> {
        if seq_len == 0 {
            return Err(TextError::ZeroSeqLen);
        }
        if !allow_binary {
            if let Err(e) = std::str::from_utf8(&bytes) {
                let offset = e.valid_up_to();
                return Err(TextError::NotUtf8 {
                    path: path.to_path_buf(),
                    offset,
                    line: 1 + bytes[..offset].iter().filter(|&&b| b == b'\n').count(),
                    byte: bytes[offset],
                });
            }
        }
        if bytes.len() < seq_len + 1 {
            return Err(TextError::TooShort {
                path: path.to_path_buf(),
                len: bytes.len(),
                needed: seq_len + 1,
                seq_len,
            });
        }
        Ok(Self { bytes, seq_len })
    }

    /// Number of windows (consecutive, sharing one byte at their seams).
    pub fn len(&self) -> usize {
        (self.bytes.len() - 1) / self.seq_len
    }

    /// Whether there are no windows (never true for a loaded set).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequence length.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Window `i`: `seq_len + 1` bytes.
    pub fn window(&self, i: usize) -> &[u8] {
        &self.bytes[i * self.seq_len..i * self.seq_len + self.seq_len + 1]
    }

    /// Splits off the last `round(windows · fraction)` windows as a held-out set. The two sets
    /// share one byte at the seam, an input of the held-out side: no target byte is on both.
    ///
    /// # Errors
    /// [`ballast::Error`] for a bad fraction or a side left empty.
    pub fn split_tail(&self, fraction: f64) -> Result<(Self, Self), ballast::Error> {
        let split = ballast::eval::held_out_tail(self.len(), fraction)?;
        let cut = split.train.len() * self.seq_len;
        let train = Self {
            bytes: self.bytes[..=cut].to_vec(),
            seq_len: self.seq_len,
        };
        let eval = Self {
            bytes: self.bytes[cut..].to_vec(),
            seq_len: self.seq_len,
        };
        Ok((train, eval))
    }

    /// The bytes predicted by this set's windows (every target, once).
    pub fn targets(&self) -> &[u8] {
        &self.bytes[1..=self.len() * self.seq_len]
    }

    /// Mean loss (nats per byte) on `eval`'s targets of a unigram byte model fitted to this set's
    /// targets, with add-one smoothing: the reference a language model has to beat.
    pub fn unigram_loss(&self, eval: &Self) -> f64 {
        let mut counts = [1u64; VOCAB];
        for &b in self.targets() {
            counts[usize::from(b)] += 1;
        }
        let total: u64 = counts.iter().sum();
        let targets = eval.targets();
        let nats: f64 = targets
            .iter()
            .map(|&b| -(counts[usize::from(b)] as f64 / total as f64).ln())
            .sum();
        nats / targets.len().max(1) as f64
    }

    /// Inputs `[n, seq_len]` and next-byte targets `[n * seq_len]` of `indices`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> (Tensor<2, Int>, Tensor<1, Int>) {
        let l = self.seq_len;
        let mut xs = Vec::with_capacity(indices.len() * l);
        let mut ys = Vec::with_capacity(indices.len() * l);
        for &i in indices {
            let w = self.window(i);
            xs.extend(w[..l].iter().map(|&b| i64::from(b)));
            ys.extend(w[1..].iter().map(|&b| i64::from(b)));
        }
        (
            Tensor::from_data(TensorData::new(xs, [indices.len(), l]), device),
            Tensor::from_data(TensorData::new(ys, [indices.len() * l]), device),
        )
    }
}

/// Generated English-like text: sentences from a small grammar, `bytes` long.
pub fn synthetic_text(bytes: usize, seed: u64) -> String {
    const SUBJECTS: &[&str] = &[
        "the small card",
        "the large card",
        "every rank",
        "the balancer",
        "a slow device",
        "the host",
    ];
    const VERBS: &[&str] = &["carries", "measures", "sums", "plans", "waits for", "sends"];
    const OBJECTS: &[&str] = &[
        "its share",
        "the gradients",
        "one batch",
        "the micro-batches",
        "all samples",
        "the plan",
    ];
    const ENDS: &[&str] = &[".", " again.", " in step.", " at once."];
    let mut rng = crate::Lcg::new(seed);
    let mut text = String::with_capacity(bytes + 64);
    while text.len() < bytes {
        let pick = |rng: &mut crate::Lcg, words: &[&'static str]| words[rng.below(words.len())];
        let s = pick(&mut rng, SUBJECTS);
        let v = pick(&mut rng, VERBS);
        let o = pick(&mut rng, OBJECTS);
        let e = pick(&mut rng, ENDS);
        text.push_str(s);
        text.push(' ');
        text.push_str(v);
        text.push(' ');
        text.push_str(o);
        text.push_str(e);
        text.push(if rng.below(5) == 0 { '\n' } else { ' ' });
    }
    text.truncate(bytes);
    text
}

/// Writes [`synthetic_text`] to `dir/synthetic.txt` (unless already there) and returns the path.
///
/// # Errors
/// IO errors, with the path.
pub fn write_synthetic(dir: &Path, bytes: usize, seed: u64) -> anyhow::Result<PathBuf> {
    let file = dir.join("synthetic.txt");
    if std::fs::metadata(&file).is_ok_and(|m| m.len() == bytes as u64) {
        return Ok(file);
    }
    std::fs::create_dir_all(dir)?;
    crate::write_atomically(&file, synthetic_text(bytes, seed).as_bytes())?;
    Ok(file)
}
