//! CIFAR-10 in its binary form (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`).
//!
//! Each file is a run of 3 073-byte records: one label byte (0–9), then the 32×32 image as
//! 1 024 red, 1 024 green and 1 024 blue bytes, row-major. [`Cifar10::load`] reads one file or
//! every `data_batch_*.bin` of a directory and checks sizes and labels; [`write_synthetic`]
//! writes a small learnable set in the same format, so a fresh machine trains with nothing
//! downloaded.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Image side in pixels.
pub const SIDE: usize = 32;
/// Colour channels.
pub const CHANNELS: usize = 3;
/// Classes.
pub const CLASSES: usize = 10;
/// Bytes of one image.
pub const IMAGE_BYTES: usize = CHANNELS * SIDE * SIDE;
/// Bytes of one record: the label and the image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;

/// Why a CIFAR-10 file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CifarError {
    /// The path cannot be read.
    #[error("cannot read CIFAR-10 data at {path}: {source}; pass --data a data_batch_*.bin file or the directory holding them")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A directory without any batch file.
    #[error("no data_batch_*.bin file in {0}; pass the extracted `cifar-10-batches-bin` directory, or omit --data to train on generated data")]
    NoFiles(PathBuf),
    /// A file whose size is not a whole number of records.
    #[error(
        "{path} is {len} bytes, not a multiple of {RECORD_BYTES} (one record: 1 label byte + 3072 pixel bytes); \
         the file is truncated or not CIFAR-10 binary (the Python pickles `data_batch_1` without .bin are a different format)"
    )]
    Size {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// A held-out directory without `test_batch.bin`.
    #[error("no test_batch.bin in {0}; pass --eval-data the test_batch.bin file or the `cifar-10-batches-bin` directory holding it")]
    NoTestFile(PathBuf),
    /// An empty file.
    #[error("{0} is empty; a CIFAR-10 batch file holds 3073-byte records")]
    Empty(PathBuf),
    /// A label outside 0–9.
    #[error("{path}: record {record} has label {label}, but CIFAR-10 labels are 0-9; is this CIFAR-100 (2 label bytes per record)?")]
    Label {
        /// The file.
        path: PathBuf,
        /// Record index in the file.
        record: usize,
        /// The byte found.
        label: u8,
    },
}

/// Images and labels in memory.
#[derive(Debug, Clone)]
pub struct Cifar10 {
    labels: Vec<u8>,
    pixels: Vec<u8>,
    files: Vec<PathBuf>,
}

impl Cifar10 {
    /// Loads a batch file, or every `data_batch_*.bin` in a directory (in name order).
    ///
    /// # Errors
    /// [`CifarError`] naming the file and what is wrong with it.
    pub fn load(path: &Path) -> Result<Self, CifarError> {
        let io = |source| CifarError::Io {
            path: path.to_path_buf(),
            source,
        };
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("data_batch_") && n.ends_with(".bin"))
                })
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(CifarError::NoFiles(path.to_path_buf()));
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut set = Self {
            labels: Vec::new(),
            pixels: Vec::new(),
            files: files.clone(),
        };
        for file in &files {
            let bytes = std::fs::read(file).map_err(|source| CifarError::Io {
                path: file.clone(),
                source,
            })?;
            set.append(file, &bytes)?;
        }
        Ok(set)
    }

    /// Held-out images: a `test_batch.bin` file (or any batch file), or the directory holding
    /// `test_batch.bin`.
    ///
    /// # Errors
    /// As [`Cifar10::load`]; a directory without `test_batch.bin` is [`CifarError::NoTestFile`].
    pub fn load_eval(path: &Path) -> Result<Self, CifarError> {
        if path.is_dir() {
            let file = path.join("test_batch.bin");
            if !file.is_file() {
                return Err(CifarError::NoTestFile(path.to_path_buf()));
            }
            return Self::load(&file);
        }
        Self::load(path)
    }

    /// The images `indices` (in that order) as a set of their own.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let mut pixels = Vec::with_capacity(indices.len() * IMAGE_BYTES);
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
        }
        Self {
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            pixels,
            files: self.files.clone(),
        }
    }

    /// Parses records from `bytes` (read from `path`, named in errors).
    ///
    /// # Errors
    /// [`CifarError::Size`], [`CifarError::Empty`], [`CifarError::Label`].
    pub fn append(&mut self, path: &Path, bytes: &[u8]) -> Result<(), CifarError> {
        if bytes.is_empty() {
            return Err(CifarError::Empty(path.to_path_buf()));
        }
        if bytes.len() % RECORD_BYTES != 0 {
            return Err(CifarError::Size {
                path: path.to_path_buf(),
                len: bytes.len() as u64,
            });
        }
        for (record, chunk) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
            if usize::from(chunk[0]) >= CLASSES {
                return Err(CifarError::Label {
                    path: path.to_path_buf(),
                    record,
                    label: chunk[0],
                });
            }
        }
        self.labels.extend(bytes.chunks_exact(RECORD_BYTES).map(|c| c[0]));
        self.pixels.reserve(bytes.len() / RECORD_BYTES * IMAGE_BYTES);
        for chunk in bytes.chunks_exact(RECORD_BYTES) {
            self.pixels.extend_from_slice(&chunk[1..]);
        }
        Ok(())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The files read.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Label of image `i`.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// Raw bytes of image `i` (channel-major).
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// Images `[n, 3, 32, 32]` scaled to [-1, 1] and labels `[n]` of `indices`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
        let mut xs = Vec::with_capacity(indices.len() * IMAGE_BYTES);
        let mut ys = Vec::with_capacity(indices.len());
        for &i in indices {
            xs.extend(self.image(i).iter().map(|&b| f32::from(b) / 127.5 - 1.0));
            ys.push(i64::from(self.labels[i]));
        }
        (
            Tensor::from_data(TensorData::new(xs, [indices.len(), CHANNELS, SIDE, SIDE]), device),
            Tensor::from_data(TensorData::new(ys, [indices.len()]), device),
        )
    }
}

/// Encodes `(label, image)` records in CIFAR-10's binary layout.
pub fn encode(records: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.len() * RECORD_BYTES);
    for (label, image) in records {
        assert_eq!(image.len(), IMAGE_BYTES, "a CIFAR-10 image is {IMAGE_BYTES} bytes");
        out.push(*label);
        out.extend_from_slice(image);
    }
    out
}

/// A learnable synthetic image of class `label`: each class has its own colour and stripe
/// direction and frequency, under per-image noise and a random phase.
pub fn synthetic_image(label: u8, seed: u64) -> Vec<u8> {
    let mut rng = crate::Lcg::new(seed ^ (u64::from(label) << 32));
    let c = f32::from(label);
    let angle = c * std::f32::consts::PI / CLASSES as f32;
    let (dx, dy) = (angle.cos(), angle.sin());
    let freq = 0.25 + 0.05 * (c % 3.0);
    let phase = rng.unit() * std::f32::consts::TAU;
    let tint = [(c * 0.7).sin(), (c * 1.3).cos(), (c * 0.4 + 1.0).sin()];
    let mut image = vec![0u8; IMAGE_BYTES];
    for ch in 0..CHANNELS {
        for y in 0..SIDE {
            for x in 0..SIDE {
                let wave = ((x as f32 * dx + y as f32 * dy) * freq + phase).sin();
                let v = 128.0 + 60.0 * wave + 50.0 * tint[ch] + 40.0 * (rng.unit() - 0.5);
                image[ch * SIDE * SIDE + y * SIDE + x] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    image
}

/// Writes `images` synthetic records into `dir/data_batch_1.bin` (if not already there with
/// that many records) and returns the directory.
///
/// # Errors
/// IO errors, with the path.
pub fn write_synthetic(dir: &Path, images: usize, seed: u64) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let file = dir.join("data_batch_1.bin");
    if std::fs::metadata(&file).is_ok_and(|m| m.len() == (images * RECORD_BYTES) as u64) {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let records: Vec<(u8, Vec<u8>)> = (0..images)
        .map(|i| {
            let label = (i % CLASSES) as u8;
            (label, synthetic_image(label, seed.wrapping_add(i as u64)))
        })
        .collect();
    crate::write_atomically(&file, &encode(&records))?;
    Ok(dir.to_path_buf())
}
