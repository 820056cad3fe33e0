//! Safetensors checkpoints through memmap2: a single `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, both key-name styles (see [`names`]), bf16/f16/f32.
//!
//! `Checkpoint::open` refuses anything structurally wrong (unreadable or truncated files, corrupt headers,
//! an index that disagrees with its shards, unsupported dtypes, a tensor stored twice); `validate` then checks
//! the names and shapes against what the config implies. Both run before any compute, and nothing is read
//! into memory beyond the headers until a tensor is converted.

pub mod names;
mod shard;
pub mod summary;
pub mod tensor;
mod weights;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use crate::config::{ModelConfig, ModelKind};
use crate::{Error, Result};
pub use names::{canonical_name, expected_tensors, Expected};
use shard::{Shard, StoredTensor};
pub use summary::{Component, ComponentSummary, Summary};
pub use tensor::{DType, TensorView};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Entry {
    shard: usize,
    stored_name: String,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

pub struct Checkpoint {
    dir: PathBuf,
    /// The file that lists the tensors: the single file or the index.
    source: PathBuf,
    shards: Vec<Shard>,
    /// Keyed by canonical name.
    tensors: BTreeMap<String, Entry>,
    ignored: Vec<String>,
}

/// Loads `config.json`, opens the checkpoint and validates it against the config.
pub fn open_model(dir: impl AsRef<Path>) -> Result<(ModelConfig, Checkpoint)> {
    let config = ModelConfig::load(dir.as_ref())?;
    let ckpt = Checkpoint::open(dir.as_ref(), config.kind())?;
    ckpt.validate(&expected_tensors(&config))?;
    Ok((config, ckpt))
}

impl Checkpoint {
    /// Opens `<dir>/model.safetensors`, or, when absent, the shards of `<dir>/model.safetensors.index.json`
    /// (the order transformers tries them). `kind` selects the name mapping.
    pub fn open(dir: impl AsRef<Path>, kind: ModelKind) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::Checkpoint { file: dir.display().to_string(), msg: "model folder not found".into() });
        }
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let (source, files) = if single.exists() {
            let (shard, stored) = shard::open(&single)?;
            (single, vec![(shard, stored)])
        } else if index.exists() {
            let files = open_indexed(dir, &index)?;
            (index, files)
        } else {
            let hint = if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
                " (PyTorch .bin checkpoints are not supported: convert to safetensors)"
            } else {
                ""
            };
            return Err(Error::Checkpoint {
                file: dir.display().to_string(),
                msg: format!("no {SINGLE_FILE} or {INDEX_FILE}{hint}"),
            });
        };
        let mut ckpt = Checkpoint {
            dir: dir.to_path_buf(),
            source,
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            ignored: Vec::new(),
        };
        for (shard, stored) in files {
            ckpt.add_shard(kind, shard, stored)?;
        }
        Ok(ckpt)
    }

    fn add_shard(&mut self, kind: ModelKind, shard: Shard, stored: Vec<StoredTensor>) -> Result<()> {
        let idx = self.shards.len();
        for t in stored {
            if names::is_ignored(&t.name) {
                self.ignored.push(t.name);
                continue;
            }
            let dtype = DType::from_safetensors(t.dtype).ok_or_else(|| Error::Tensor {
                file: shard.path.display().to_string(),
                tensor: t.name.clone(),
                msg: format!("unsupported dtype {} (supported: BF16, F16, F32)", t.dtype),
            })?;
            let canonical = canonical_name(kind, &t.name);
            if let Some(prev) = self.tensors.get(&canonical) {
                return Err(Error::Tensor {
                    file: shard.path.display().to_string(),
                    tensor: t.name,
                    msg: format!(
                        "stored twice: also as `{}` in {} (both map to `{canonical}`)",
                        prev.stored_name,
                        self.shards.get(prev.shard).map_or(shard.path.as_path(), |s| s.path.as_path()).display()
                    ),
                });
            }
            let entry = Entry { shard: idx, stored_name: t.name, dtype, shape: t.shape, start: t.start, end: t.end };
            self.tensors.insert(canonical, entry);
        }
        self.shards.push(shard);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The safetensors files, in the order they were opened.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Canonical names of all tensors (ignored buffers excluded), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Stored names skipped by the allow-list (`names::is_ignored`).
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// The name a canonical tensor has on disk.
    pub fn stored_name(&self, name: &str) -> Option<&str> {
        self.tensors.get(name).map(|e| e.stored_name.as_str())
    }

    fn entry(&self, name: &str) -> Option<(&Entry, &Shard)> {
        let e = self.tensors.get(name)?;
        Some((e, self.shards.get(e.shard)?))
    }

    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let (key, e) = self.tensors.get_key_value(name)?;
        let shard = self.shards.get(e.shard)?;
        Some(TensorView {
            name: key,
            dtype: e.dtype,
            shape: &e.shape,
            bytes: shard.mmap.get(e.start..e.end)?,
            file: &shard.path,
        })
    }

    /// A tensor by canonical name.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.get(name).ok_or_else(|| Error::Tensor {
            file: self.source.display().to_string(),
            tensor: name.to_string(),
            msg: "not in checkpoint".into(),
        })
    }

    /// The output projection: the stored `lm_head.weight`, or the input embeddings when the checkpoint has
    /// none (tied; `validate` has checked the config allows it).
    pub fn lm_head(&self) -> Result<TensorView<'_>> {
        self.get(names::LM_HEAD).map_or_else(|| self.tensor(names::EMBED_TOKENS), Ok)
    }

    /// Checks every expected tensor is present with its shape and nothing unexpected is stored. Returns the
    /// first problem (missing, then mis-shaped, then unexpected), noting how many more there are.
    pub fn validate(&self, expected: &Expected) -> Result<()> {
        let mut problems = self.problems(expected).into_iter();
        match problems.next() {
            None => Ok(()),
            Some(first) => {
                let more = problems.count();
                Err(if more == 0 { first } else { with_suffix(first, &format!(" (and {more} more problems)")) })
            }
        }
    }

    /// Every mismatch between the checkpoint and `expected`, for reporting them all.
    pub fn problems(&self, expected: &Expected) -> Vec<Error> {
        let mut missing = Vec::new();
        let mut misshaped = Vec::new();
        let mut known = HashSet::new();
        for (name, shape, required) in expected
            .required
            .iter()
            .map(|(n, s)| (n, s, true))
            .chain(expected.optional.iter().map(|(n, s)| (n, s, false)))
        {
            known.insert(name.as_str());
            match self.get(name) {
                None if required => missing.push(Error::Tensor {
                    file: self.source.display().to_string(),
                    tensor: name.clone(),
                    msg: format!("missing (config implies shape {shape:?})"),
                }),
                None => {}
                Some(view) if view.shape != shape.as_slice() => misshaped.push(Error::Tensor {
                    file: view.file.display().to_string(),
                    tensor: name.clone(),
                    msg: format!("shape {:?} but the config implies {shape:?}", view.shape),
                }),
                Some(_) => {}
            }
        }
        let unexpected = self.tensors.iter().filter(|(name, _)| !known.contains(name.as_str())).map(|(name, e)| {
            let shown = if *name == e.stored_name { String::new() } else { format!(" (read as `{name}`)") };
            Error::Tensor {
                file: self.shard_path(e.shard).display().to_string(),
                tensor: e.stored_name.clone(),
                msg: format!("unexpected tensor{shown}: not part of the model config.json describes"),
            }
        });
        missing.into_iter().chain(misshaped).chain(unexpected).collect()
    }

    /// Total bytes of the shard files.
    pub fn file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.mmap.len() as u64).sum()
    }

    /// Reads every page of the shards once, so the weights are resident before the first forward pass;
    /// `progress(done, total)` is called after every chunk (a progress bar for big checkpoints).
    pub fn prefetch(&self, progress: &mut dyn FnMut(u64, u64)) {
        const PAGE: usize = 4096;
        const CHUNK: usize = 64 << 20;
        let total = self.file_bytes();
        let mut done = 0u64;
        for shard in &self.shards {
            for chunk in shard.mmap.chunks(CHUNK) {
                let touched = chunk.iter().step_by(PAGE).fold(0u8, |acc, &b| acc ^ b);
                std::hint::black_box(touched);
                done += chunk.len() as u64;
                progress(done, total);
            }
        }
    }

    /// Parameters and bytes per component, as stored.
    pub fn summary(&self) -> Summary {
        Summary::from_tensors(self.tensors.iter().map(|(n, e)| (n.as_str(), e.shape.as_slice(), e.dtype.size())))
    }

    fn shard_path(&self, idx: usize) -> &Path {
        self.shards.get(idx).map_or(self.source.as_path(), |s| s.path.as_path())
    }
}

fn with_suffix(err: Error, suffix: &str) -> Error {
    match err {
        Error::Tensor { file, tensor, msg } => Error::Tensor { file, tensor, msg: msg + suffix },
        Error::Checkpoint { file, msg } => Error::Checkpoint { file, msg: msg + suffix },
        other => other,
    }
}

/// Opens every shard an index lists and checks the index and the shards agree tensor by tensor.
fn open_indexed(dir: &Path, index: &Path) -> Result<Vec<(Shard, Vec<StoredTensor>)>> {
    let index_err = |msg: String| Error::Checkpoint { file: index.display().to_string(), msg };
    let value = crate::config::read_json_file(index)?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| index_err("no `weight_map` object".into()))?;
    let mut listed: BTreeMap<&str, &str> = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| index_err(format!("weight_map entry `{tensor}` is not a file name")))?;
        listed.insert(tensor, file);
    }
    let shard_names: BTreeSet<&str> = listed.values().copied().collect();
    let mut out = Vec::new();
    for name in shard_names {
        // Shards live beside the index; a path would let an index point anywhere on disk.
        if name.contains(['/', '\\']) || name == ".." || name.is_empty() {
            return Err(index_err(format!("shard name `{name}` must be a plain file name in the same folder")));
        }
        let path = dir.join(name);
        if !path.is_file() {
            return Err(index_err(format!("lists shard `{name}`, which does not exist in {}", dir.display())));
        }
        let (shard, stored) = shard::open(&path)?;
        let here: HashSet<&str> = stored.iter().map(|t| t.name.as_str()).collect();
        for (tensor, _) in listed.iter().filter(|(_, f)| **f == name) {
            if !here.contains(tensor) {
                return Err(Error::Tensor {
                    file: path.display().to_string(),
                    tensor: tensor.to_string(),
                    msg: format!("{INDEX_FILE} lists it in this shard, but the shard does not hold it"),
                });
            }
        }
        for t in &stored {
            if listed.get(t.name.as_str()) != Some(&name) && !names::is_ignored(&t.name) {
                let msg = match listed.get(t.name.as_str()) {
                    Some(other) => format!("stored here but {INDEX_FILE} lists it in `{other}`"),
                    None => format!("stored here but not listed in {INDEX_FILE}"),
                };
                return Err(Error::Tensor { file: path.display().to_string(), tensor: t.name.clone(), msg });
            }
        }
        out.push((shard, stored));
    }
    Ok(out)
}
