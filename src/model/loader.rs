//! Finding and memory-mapping the safetensors of a Hugging Face model directory: one
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use crate::error::{KilnError, Result};

/// A model's weights by Hugging Face name: its safetensors files, memory-mapped, or tensors made in
/// memory (a GGUF file dequantized, a tiny model). Not resume state (`train/checkpoint.rs`) and not
/// recomputation (`Decoder::recomputed_layers`).
pub struct WeightFiles {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    st: Store,
}

/// Where the tensors are: memory-mapped safetensors, or tensors already in memory (a GGUF
/// file's, dequantized and renamed).
enum Store {
    Mapped(MmapedSafetensors),
    Memory(HashMap<String, Tensor>),
}

/// The safetensors files of `dir`, in the order the index names them.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| KilnError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| KilnError::model(&index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                KilnError::model(
                    &index,
                    "no `weight_map` object: this is not a safetensors shard index",
                )
            })?;
        let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        for f in &files {
            if !f.exists() {
                return Err(KilnError::model(
                    f,
                    "shard listed in model.safetensors.index.json is missing; download the complete checkpoint",
                ));
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| KilnError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(KilnError::model(
            dir,
            "no model.safetensors or model.safetensors.index.json; kiln reads Hugging Face safetensors checkpoints",
        ));
    }
    Ok(found)
}

impl WeightFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        let files = safetensors_files(dir)?;
        Self::open_files(dir, files)
    }

    pub fn open_files(dir: &Path, files: Vec<PathBuf>) -> Result<Self> {
        // Validate each file's header first, so a truncated shard is named in the error.
        for f in &files {
            // SAFETY: the file is only read; kiln never writes into a checkpoint it has mapped.
            unsafe { MmapedSafetensors::new(f) }.map_err(|e| {
                KilnError::model(
                    f,
                    format!("cannot read safetensors (truncated or corrupt download?): {e}"),
                )
            })?;
        }
        // SAFETY: as above.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| KilnError::model(dir, format!("cannot map safetensors: {e}")))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            st: Store::Mapped(st),
        })
    }

    /// Weights held in memory by Hugging Face name, read from `origin`.
    pub fn from_tensors(origin: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            dir: origin.to_path_buf(),
            files: vec![origin.to_path_buf()],
            st: Store::Memory(tensors),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.st {
            Store::Mapped(st) => st.get(name).is_ok(),
            Store::Memory(m) => m.contains_key(name),
        }
    }

    pub fn names(&self) -> Vec<String> {
        match &self.st {
            Store::Mapped(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Store::Memory(m) => m.keys().cloned().collect(),
        }
    }

    /// Tensor `name` on `device` in its stored dtype.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(KilnError::model(
                &self.dir,
                format!("tensor `{name}` is missing from the checkpoint"),
            ));
        }
        match &self.st {
            Store::Mapped(st) => st.load(name, device).map_err(|e| {
                KilnError::model(&self.dir, format!("cannot read tensor `{name}`: {e}"))
            }),
            Store::Memory(m) => Ok(m[name].to_device(device)?),
        }
    }

    /// Tensor `name`, checked against the shape the config implies.
    pub fn tensor_shaped(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self.tensor(name, device)?;
        if t.dims() != shape {
            return Err(KilnError::model(
                &self.dir,
                format!(
                    "tensor `{name}` has shape {:?} but config.json implies {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t)
    }

    /// The raw bytes, dtype and shape of tensor `name`.
    pub fn raw(&self, name: &str) -> Result<(safetensors::Dtype, Vec<usize>, &[u8])> {
        let Store::Mapped(st) = &self.st else {
            return Err(KilnError::model(
                &self.dir,
                format!("tensor `{name}` has no raw safetensors bytes here"),
            ));
        };
        let v = st.get(name).map_err(|_| {
            KilnError::model(
                &self.dir,
                format!("tensor `{name}` is missing from the checkpoint"),
            )
        })?;
        Ok((v.dtype(), v.shape().to_vec(), v.data()))
    }
}
