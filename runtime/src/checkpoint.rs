//! Checkpoints: parameters, optimizer state and training position in one safetensors file.
//!
//! # Format
//! A standard safetensors file (readable by Python's `safetensors`):
//! - `model.<path>`: every float parameter, `F32`, named by its module path (`blocks.0.c1.weight`);
//! - `optim.adam.m.<path>`, `optim.adam.v.<path>`: Adam's moments, when the host Adam runs;
//! - `__metadata__`: `format` = `ballast-checkpoint/1`; `state` = [`TrainState`] as JSON (step,
//!   seed, global batch, world size, job, plan); `adam_steps`; `params` = the parameter paths
//!   in model order (JSON); `checksum` = `xxh3:<hex>` over every tensor's name and bytes in
//!   name order.
//!
//! The position in the data is the step: the sampler's global batches are a pure function of
//! (seed, step), so resuming at step s on any number of ranks sees the same batches. There is no
//! other random state (no dropout; the initial weights are replaced by the checkpoint's).
//!
//! # Atomicity
//! Rank 0 writes `.tmp-step-<N>-<pid>.safetensors`, fsyncs it, renames it to
//! `step-<N>.safetensors` and fsyncs the directory. A crash at any point leaves either the old
//! set of checkpoints or the old set plus a complete new one; temporary files are never
//! picked. [`Checkpointer::newest`] still verifies the checksum and skips (naming) any file
//! that fails. Loading maps the file (memmap2) and checks the checksum while copying out.

use std::{
    collections::HashMap,
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

use burn::module::Module;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use xxhash_rust::xxh3::Xxh3;

use crate::Error;
use crate::{
    optim::HostAdam,
    params::{collect_params, flatten_params, load_params},
};

/// The format tag in `__metadata__`.
pub const FORMAT: &str = "ballast-checkpoint/1";

type Result<T> = std::result::Result<T, Error>;

/// Where training stands.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Seed of the data order.
    pub seed: u64,
    /// Global batch.
    pub global_batch: usize,
    /// Ranks when saved.
    pub world_size: usize,
    /// Job name.
    pub job: String,
    /// The plan in force when saved (informational: a resume re-plans).
    #[serde(default)]
    pub plan: Option<serde_json::Value>,
    /// Parameters whose optimizer state each rank held, when it was sharded (a resume on as
    /// many ranks keeps them; on another number of ranks the state is cut anew).
    #[serde(default)]
    pub shards: Option<Vec<usize>>,
}

impl TrainState {
    /// Checks that resuming this state with `job`, `global_batch` and `seed` continues the same
    /// training (the same sequence of global batches).
    ///
    /// # Errors
    /// [`Error::Incompatible`] naming the setting.
    pub fn check_compatible(&self, job: &str, global_batch: usize, seed: u64, path: &Path) -> Result<()> {
        let fail = |detail: String| {
            Err(Error::Incompatible {
                path: path.to_path_buf(),
                detail,
            })
        };
        if self.job != job {
            return fail(format!("it was written by job `{}`, not `{job}`", self.job));
        }
        if self.global_batch != global_batch {
            return fail(format!(
                "it was trained with global batch {} but --global-batch is {global_batch}; resume with the same \
                 global batch (the number of ranks may differ)",
                self.global_batch
            ));
        }
        if self.seed != seed {
            return fail(format!(
                "it was trained with seed {} but --seed is {seed}; the data order would change",
                self.seed
            ));
        }
        Ok(())
    }
}

/// Adam's state as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamMoments {
    /// First moments, flat in model order.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Steps taken.
    pub t: i32,
}

/// Adam's state to write: the whole model's moments, flat in model order, and the steps taken
/// (from a [`HostAdam`], or gathered from the ranks' shards).
#[derive(Debug, Clone, Copy)]
pub struct AdamView<'a> {
    /// First moments.
    pub m: &'a [f32],
    /// Second moments.
    pub v: &'a [f32],
    /// Steps taken.
    pub t: i32,
}

impl<'a> From<&'a HostAdam> for AdamView<'a> {
    fn from(adam: &'a HostAdam) -> Self {
        let (m, v) = adam.moments();
        Self { m, v, t: adam.steps() }
    }
}

impl<'a> From<&'a AdamMoments> for AdamView<'a> {
    fn from(adam: &'a AdamMoments) -> Self {
        Self {
            m: &adam.m,
            v: &adam.v,
            t: adam.t,
        }
    }
}

/// A checkpoint read into memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Where training stood.
    pub state: TrainState,
    /// Parameters, flat in model order.
    pub params: Vec<f32>,
    /// Optimizer state, if saved.
    pub adam: Option<AdamMoments>,
}

impl Loaded {
    /// `model` with the checkpoint's parameters.
    pub fn apply<M: Module>(&self, model: M) -> M {
        load_params(model, &self.params)
    }
}

/// A checkpoint encoded in memory, not yet written ([`Checkpointer::encode_values`]).
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The step it was taken at.
    pub step: u64,
    /// The safetensors file's bytes.
    pub bytes: Vec<u8>,
}

/// Writes, lists and prunes the checkpoints of one directory.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    dir: PathBuf,
    keep: usize,
}

impl Checkpointer {
    /// Checkpoints in `dir` (created if needed), keeping the newest `keep`.
    ///
    /// # Errors
    /// When `dir` cannot be created or is a file.
    pub fn new(dir: &Path, keep: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            action: "creating checkpoint directory",
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            keep: keep.max(1),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of step `step`.
    pub fn path_for(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step-{step:010}.safetensors"))
    }

    /// Complete checkpoints (by name), newest first.
    ///
    /// # Errors
    /// When the directory cannot be read.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| Error::Io {
            action: "listing",
            path: self.dir.clone(),
            source,
        })?;
        let mut found: Vec<(u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let step = name.strip_prefix("step-")?.strip_suffix(".safetensors")?.parse().ok()?;
                Some((step, e.path()))
            })
            .collect();
        found.sort_by_key(|e| std::cmp::Reverse(e.0));
        Ok(found)
    }

    /// The newest checkpoint that verifies; damaged ones are reported on stderr and skipped.
    ///
    /// # Errors
    /// When the directory cannot be read.
    pub fn newest(&self) -> Result<Option<PathBuf>> {
        Ok(self.newest_step()?.map(|(_, path)| path))
    }

    /// As [`Checkpointer::newest`], with the step it was saved at.
    ///
    /// # Errors
    /// When the directory cannot be read.
    pub fn newest_step(&self) -> Result<Option<(u64, PathBuf)>> {
        for (step, path) in self.list()? {
            match verify(&path) {
                Ok(()) => return Ok(Some((step, path))),
                Err(e) => eprintln!("ballast: skipping checkpoint: {e}"),
            }
        }
        Ok(None)
    }

    /// Writes `model`, the optimizer state and `state` as `step-<state.step>.safetensors`,
    /// atomically, then deletes all but the newest `keep` checkpoints.
    ///
    /// # Errors
    /// IO errors, with the path.
    pub fn save<M: Module>(&self, model: &M, adam: Option<AdamView<'_>>, state: &TrainState) -> Result<PathBuf> {
        self.save_values(model, &flatten_params(model), adam, state)
    }

    /// As [`Checkpointer::save`] with the parameters' values given as `params` (flat, in
    /// [`flatten_params`] order, one per parameter of `model`): in a mixed precision, the f32
    /// master values, which the replica holds only rounded.
    ///
    /// # Errors
    /// IO errors, with the path; [`Error::Encode`] when `params` or `adam` do not hold one value
    /// per parameter.
    pub fn save_values<M: Module>(
        &self,
        model: &M,
        params: &[f32],
        adam: Option<AdamView<'_>>,
        state: &TrainState,
    ) -> Result<PathBuf> {
        self.write(Self::encode_values(model, params, adam, state)?)
    }

    /// A checkpoint's bytes, in memory (the copy a background writer takes at the step
    /// boundary); [`Checkpointer::write`] puts them in place. Arguments as for
    /// [`Checkpointer::save_values`].
    ///
    /// # Errors
    /// [`Error::Encode`] when `params` or `adam` do not hold one value per parameter.
    pub fn encode_values<M: Module>(
        model: &M,
        params: &[f32],
        adam: Option<AdamView<'_>>,
        state: &TrainState,
    ) -> Result<Encoded> {
        Ok(Encoded {
            step: state.step,
            bytes: encode(model, params, adam, state)?,
        })
    }

    /// Writes an encoded checkpoint as `step-<step>.safetensors`, atomically (a temporary file,
    /// fsynced, renamed, the directory fsynced), then deletes all but the newest `keep`.
    ///
    /// # Errors
    /// IO errors, with the path.
    pub fn write(&self, encoded: Encoded) -> Result<PathBuf> {
        let Encoded { step, bytes } = encoded;
        let path = self.path_for(step);
        let tmp = self
            .dir
            .join(format!(".tmp-step-{step:010}-{}.safetensors", std::process::id()));
        write_synced(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path).map_err(|source| Error::Io {
            action: "renaming checkpoint into place",
            path: path.clone(),
            source,
        })?;
        sync_dir(&self.dir)?;
        self.prune()?;
        Ok(path)
    }

    fn prune(&self) -> Result<()> {
        for (_, old) in self.list()?.into_iter().skip(self.keep) {
            std::fs::remove_file(&old).map_err(|source| Error::Io {
                action: "deleting old checkpoint",
                path: old.clone(),
                source,
            })?;
        }
        // Temporary files of writers that are gone (crashed mid-save).
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name
                    .strip_prefix(".tmp-step-")
                    .and_then(|r| r.split('-').nth(1))
                    .and_then(|r| r.strip_suffix(".safetensors"))
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        sync_dir(&self.dir)
    }
}

/// Writes `model`'s weights alone (no optimizer state) to `path` in the checkpoint format,
/// atomically: under a temporary name in the same directory, fsynced, renamed. [`load`] reads
/// it back (`--load`, `--eval-only`), and so does Python's `safetensors`.
///
/// # Errors
/// IO errors, with the path.
pub fn save_model<M: Module>(path: &Path, model: &M, state: &TrainState) -> Result<()> {
    let bytes = encode(model, &flatten_params(model), None, state)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        action: "creating the directory of",
        path: path.to_path_buf(),
        source,
    })?;
    let name = path.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy());
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    write_synced(&tmp, &bytes)?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        action: "renaming model weights into place",
        path: path.to_path_buf(),
        source,
    })?;
    sync_dir(&dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |action, source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::create(path).map_err(|e| io("creating", e))?;
    #[cfg(feature = "testkit")]
    let bytes = pause_halfway(&mut f, bytes).map_err(|e| io("writing", e))?;
    f.write_all(bytes).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))
}

/// Milliseconds a checkpoint write pauses halfway, so that a test can kill the writer in the
/// middle of it (feature `testkit`).
#[cfg(feature = "testkit")]
pub const WRITE_PAUSE_VAR: &str = "BALLAST_TESTKIT_WRITE_PAUSE_MS";

/// With [`WRITE_PAUSE_VAR`] set, writes the first half of `bytes`, pauses, and returns the rest.
#[cfg(feature = "testkit")]
fn pause_halfway<'a>(f: &mut File, bytes: &'a [u8]) -> std::io::Result<&'a [u8]> {
    let Some(ms) = std::env::var(WRITE_PAUSE_VAR).ok().and_then(|v| v.parse().ok()) else {
        return Ok(bytes);
    };
    let (first, rest) = bytes.split_at(bytes.len() / 2);
    f.write_all(first)?;
    f.flush()?;
    std::thread::sleep(std::time::Duration::from_millis(ms));
    Ok(rest)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| Error::Io {
        action: "syncing directory",
        path: dir.to_path_buf(),
        source,
    })
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The safetensors bytes of a checkpoint.
///
/// # Errors
/// [`Error::Encode`] when the Adam state does not fit the model or a view cannot be
/// built (never for consistent inputs).
fn encode<M: Module>(model: &M, params: &[f32], adam: Option<AdamView<'_>>, state: &TrainState) -> Result<Vec<u8>> {
    encode_bytes(model, params, adam, state).map_err(|reason| Error::Encode { reason })
}

fn encode_bytes<M: Module>(
    model: &M,
    flat: &[f32],
    adam: Option<AdamView<'_>>,
    state: &TrainState,
) -> std::result::Result<Vec<u8>, String> {
    if flat.len() != model.num_params() {
        return Err(format!(
            "{} parameter values given for a model of {} parameters",
            flat.len(),
            model.num_params()
        ));
    }
    if let Some(adam) = adam {
        let n = model.num_params();
        if adam.m.len() != n || adam.v.len() != n {
            return Err(format!(
                "the Adam state holds {} and {} moments for a model of {n} parameters",
                adam.m.len(),
                adam.v.len()
            ));
        }
    }
    let slots = collect_params(model);
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut offset = 0;
    for slot in &slots {
        let n: usize = slot.dims.iter().product();
        named.push((
            format!("model.{}", slot.path),
            slot.dims.clone(),
            f32_bytes(&flat[offset..offset + n]),
        ));
        if let Some(AdamView { m, v, .. }) = adam {
            named.push((
                format!("optim.adam.m.{}", slot.path),
                slot.dims.clone(),
                f32_bytes(&m[offset..offset + n]),
            ));
            named.push((
                format!("optim.adam.v.{}", slot.path),
                slot.dims.clone(),
                f32_bytes(&v[offset..offset + n]),
            ));
        }
        offset += n;
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Xxh3::new();
    for (name, _, bytes) in &named {
        hasher.update(name.as_bytes());
        hasher.update(bytes);
    }
    let paths: Vec<&str> = slots.iter().map(|s| s.path.as_str()).collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert(
        "state".to_string(),
        serde_json::to_string(state).map_err(|e| e.to_string())?,
    );
    meta.insert(
        "params".to_string(),
        serde_json::to_string(&paths).map_err(|e| e.to_string())?,
    );
    meta.insert("adam_steps".to_string(), adam.map_or(-1, |a| a.t).to_string());
    meta.insert("checksum".to_string(), format!("xxh3:{:016x}", hasher.digest()));
    let views: Vec<(String, TensorView<'_>)> = named
        .iter()
        .map(|(name, dims, bytes)| {
            TensorView::new(Dtype::F32, dims.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<std::result::Result<_, _>>()?;
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}

fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|source| Error::Io {
        action: "opening checkpoint",
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: checkpoint files are only ever created under a temporary name and renamed into
    // place complete; nothing writes to a published file while it is mapped.
    unsafe { memmap2::MmapOptions::new().populate().map(&file) }.map_err(|source| Error::Io {
        action: "mapping checkpoint",
        path: path.to_path_buf(),
        source,
    })
}

struct Parsed<'a> {
    tensors: SafeTensors<'a>,
    meta: HashMap<String, String>,
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<Parsed<'a>> {
    let malformed = |reason: String| Error::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| malformed(format!("{e:?}")))?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(Error::NotBallast {
            path: path.to_path_buf(),
        });
    }
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| malformed(format!("{e:?}")))?;
    Ok(Parsed { tensors, meta })
}

fn check_sum(path: &Path, parsed: &Parsed<'_>, mut each: impl FnMut(&str, &[u8])) -> Result<()> {
    let mut names = parsed.tensors.names();
    names.sort_unstable();
    let mut hasher = Xxh3::new();
    for name in names {
        let view = parsed.tensors.tensor(name).map_err(|e| Error::Malformed {
            path: path.to_path_buf(),
            reason: format!("{e:?}"),
        })?;
        hasher.update(name.as_bytes());
        // In slices, so each piece is hashed and then copied while it is in cache.
        for chunk in view.data().chunks(1 << 18) {
            hasher.update(chunk);
            each(name, chunk);
        }
    }
    let computed = format!("xxh3:{:016x}", hasher.digest());
    let stored = parsed.meta.get("checksum").cloned().unwrap_or_default();
    if computed != stored {
        return Err(Error::Checksum {
            path: path.to_path_buf(),
            stored,
            computed,
        });
    }
    Ok(())
}

/// Checks that `path` is a complete ballast checkpoint whose checksum matches.
///
/// # Errors
/// [`Error`] naming the file and the problem.
pub fn verify(path: &Path) -> Result<()> {
    let bytes = map(path)?;
    let parsed = parse(path, &bytes)?;
    check_sum(path, &parsed, |_, _| {})
}

/// Reads the checkpoint at `path` for `model` (whose parameters give the expected names and
/// shapes), verifying the checksum.
///
/// # Errors
/// [`Error`] naming the file and the problem: damaged, not ballast's, or of another
/// model.
pub fn load<M: Module>(path: &Path, model: &M) -> Result<Loaded> {
    let bytes = map(path)?;
    let parsed = parse(path, &bytes)?;
    let slots = collect_params(model);
    let has_adam = parsed
        .meta
        .get("adam_steps")
        .and_then(|s| s.parse::<i32>().ok())
        .unwrap_or(-1)
        >= 0;
    // Where each tensor's values go: (destination, next offset into it).
    let mut targets: HashMap<String, (usize, usize)> = HashMap::new();
    let mut offset = 0;
    for slot in &slots {
        let n: usize = slot.dims.iter().product();
        let mut expect = vec![(format!("model.{}", slot.path), 0)];
        if has_adam {
            expect.push((format!("optim.adam.m.{}", slot.path), 1));
            expect.push((format!("optim.adam.v.{}", slot.path), 2));
        }
        for (name, dest) in expect {
            let view = parsed.tensors.tensor(&name).map_err(|_| Error::MissingTensor {
                path: path.to_path_buf(),
                name: name.clone(),
            })?;
            if view.dtype() != Dtype::F32 {
                return Err(Error::Dtype {
                    path: path.to_path_buf(),
                    name,
                    found: view.dtype(),
                });
            }
            if view.shape() != slot.dims.as_slice() {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    name,
                    found: view.shape().to_vec(),
                    expected: slot.dims.clone(),
                });
            }
            targets.insert(name, (dest, offset));
        }
        offset += n;
    }
    let extra: Vec<&str> = parsed
        .tensors
        .names()
        .into_iter()
        .filter(|n| !targets.contains_key(*n))
        .collect();
    if !extra.is_empty() {
        let mut some: Vec<&str> = extra.iter().take(3).copied().collect();
        some.sort_unstable();
        return Err(Error::ExtraTensors {
            path: path.to_path_buf(),
            names: format!("{}{}", some.join(", "), if extra.len() > 3 { ", …" } else { "" }),
        });
    }
    let mut out = [
        vec![0f32; offset],
        vec![0f32; if has_adam { offset } else { 0 }],
        vec![0f32; if has_adam { offset } else { 0 }],
    ];
    check_sum(path, &parsed, |name, chunk| {
        let Some((dest, at)) = targets.get_mut(name) else {
            return;
        };
        let n = chunk.len() / 4;
        for (d, b) in out[*dest][*at..*at + n].iter_mut().zip(chunk.chunks_exact(4)) {
            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        *at += n;
    })?;
    let state: TrainState = parsed
        .meta
        .get("state")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| Error::Malformed {
            path: path.to_path_buf(),
            reason: "the `state` metadata is missing or not valid JSON".into(),
        })?;
    let [params, m, v] = out;
    let adam = has_adam.then(|| AdamMoments {
        m,
        v,
        t: parsed.meta.get("adam_steps").and_then(|s| s.parse().ok()).unwrap_or(0),
    });
    Ok(Loaded { state, params, adam })
}
