//! Writing files so a crash never leaves half of one: write to a temporary name beside the
//! target, fsync, rename (ARCHITECTURE.md, decision 6). Also the safetensors writer all exports share.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::error::{KilnError, Result};

/// A temporary name beside `path` (hidden, with the process id), renamed over it when complete.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| KilnError::io(parent, e))?;
    }
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(KilnError::io(path, e));
    }
    Ok(())
}

/// Replaces directory `dst` by the fully written directory `src` (both in the same parent):
/// the old one is moved aside first and removed only after the new one is in place.
pub fn replace_dir(src: &Path, dst: &Path) -> Result<()> {
    let old = dst.with_file_name(format!(
        ".{}.old-{}",
        dst.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    if dst.exists() {
        std::fs::rename(dst, &old).map_err(|e| KilnError::io(dst, e))?;
    }
    std::fs::rename(src, dst).map_err(|e| KilnError::io(dst, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| KilnError::io(&old, e))?;
    }
    Ok(())
}

/// Bytes of one tensor for a safetensors file.
pub struct TensorData {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl safetensors::View for &TensorData {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

impl TensorData {
    pub fn u8(bytes: Vec<u8>, shape: Vec<usize>) -> Self {
        Self {
            dtype: safetensors::Dtype::U8,
            shape,
            bytes,
        }
    }

    pub fn f32(values: &[f32], shape: Vec<usize>) -> Self {
        Self {
            dtype: safetensors::Dtype::F32,
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The bytes of a candle tensor (moved to the CPU), in its own dtype.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let shape = t.dims().to_vec();
        let t = t.to_device(&candle_core::Device::Cpu)?.flatten_all()?;
        let (dtype, bytes): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
            DType::F32 => (
                safetensors::Dtype::F32,
                t.to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                t.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                safetensors::Dtype::F16,
                t.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::U8 => (safetensors::Dtype::U8, t.to_vec1::<u8>()?),
            DType::I64 => (
                safetensors::Dtype::I64,
                t.to_vec1::<i64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            other => {
                return Err(KilnError::Usage(format!(
                    "cannot write tensors of dtype {other:?}"
                )))
            }
        };
        Ok(Self {
            dtype,
            shape,
            bytes,
        })
    }
}

/// Writes a safetensors file atomically; tensors are stored sorted by name, as safetensors does.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, TensorData)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(&str, &TensorData)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| KilnError::Usage(format!("cannot serialize {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Reads a JSON file, naming the file in any error.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| KilnError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| KilnError::model(path, format!("not valid JSON: {e}")))
}
