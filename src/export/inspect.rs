//! `kiln inspect FILE`: the metadata and tensor table of a GGUF file, a safetensors file, a
//! sharded model directory or a PEFT adapter directory.

use std::path::Path;

use crate::error::{KilnError, Result};

/// One tensor's row: name, dtype, shape, bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorRow {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    pub kind: &'static str,
    pub metadata: serde_json::Value,
    pub tensors: Vec<TensorRow>,
}

fn read_safetensors_header(path: &Path) -> Result<(serde_json::Value, Vec<TensorRow>)> {
    let bytes = std::fs::read(path).map_err(|e| KilnError::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| KilnError::model(path, format!("not a valid safetensors file: {e}")))?;
    let mut rows: Vec<TensorRow> = meta
        .tensors()
        .iter()
        .map(|(name, info)| TensorRow {
            name: name.clone(),
            dtype: format!("{:?}", info.dtype),
            shape: info.shape.clone(),
            bytes: info.data_offsets.1 - info.data_offsets.0,
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let metadata = serde_json::to_value(meta.metadata()).unwrap_or_default();
    Ok((metadata, rows))
}

/// Reads what `path` holds.
pub fn inspect(path: &Path) -> Result<Inspection> {
    if !path.exists() {
        return Err(KilnError::model(path, "not found"));
    }
    if path.is_dir() {
        if path.join("adapter_config.json").exists() {
            let config = crate::io::read_json(&path.join("adapter_config.json"))?;
            let (_, tensors) = read_safetensors_header(&path.join("adapter_model.safetensors"))?;
            return Ok(Inspection {
                kind: "PEFT adapter",
                metadata: config,
                tensors,
            });
        }
        let files = crate::model::loader::safetensors_files(path)?;
        let mut tensors = vec![];
        for f in &files {
            tensors.extend(read_safetensors_header(f)?.1);
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let config = if path.join("config.json").exists() {
            crate::io::read_json(&path.join("config.json"))?
        } else {
            serde_json::Value::Null
        };
        return Ok(Inspection {
            kind: "model directory",
            metadata: config,
            tensors,
        });
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => {
            let (metadata, tensors) = read_safetensors_header(path)?;
            Ok(Inspection {
                kind: "safetensors",
                metadata,
                tensors,
            })
        }
        _ if crate::gguf::is_gguf(path) => inspect_gguf(path),
        Some("gguf") => Err(KilnError::model(
            path,
            "not a GGUF file: it does not start with the bytes \"GGUF\"",
        )),
        _ => Err(KilnError::Usage(format!(
            "{}: kiln inspects GGUF files, .safetensors files, model directories and PEFT adapter directories",
            path.display()
        ))),
    }
}

/// A GGUF file: metadata (arrays shortened) and its tensors, dims in GGUF order (`ne[0]`
/// first, i.e. `[in, out]`).
fn inspect_gguf(path: &Path) -> Result<Inspection> {
    let f = crate::gguf::GgufFile::open(path)?;
    let mut metadata = serde_json::Map::new();
    metadata.insert("gguf.version".into(), f.version.into());
    for (k, v) in &f.metadata {
        use crate::gguf::Value;
        let shown = match v {
            Value::String(text) if text.chars().count() <= 200 => text.clone().into(),
            Value::Bool(b) => (*b).into(),
            Value::F32(_) | Value::F64(_) => v.as_f64().map(Into::into).unwrap_or_default(),
            Value::Array(..) | Value::String(_) => v.display_short().into(),
            other => other
                .as_u64()
                .map(Into::into)
                .unwrap_or_else(|| other.display_short().into()),
        };
        metadata.insert(k.clone(), shown);
    }
    let tensors = f
        .tensors
        .iter()
        .map(|t| TensorRow {
            name: t.info.name.clone(),
            dtype: t.info.ggml_type.name().to_string(),
            shape: t.info.dims.iter().map(|&d| d as usize).collect(),
            bytes: t.info.nbytes(),
        })
        .collect();
    Ok(Inspection {
        kind: "GGUF (dims as ne: [in, out])",
        metadata: serde_json::Value::Object(metadata),
        tensors,
    })
}

impl Inspection {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!("{}\n", self.kind);
        if !self.metadata.is_null() {
            out.push_str(&serde_json::to_string_pretty(&self.metadata).unwrap_or_default());
            out.push('\n');
        }
        let width = self
            .tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        out.push_str(&format!(
            "\n{:<width$}  {:<6}  {:<16}  {:>12}\n",
            "name", "dtype", "shape", "bytes"
        ));
        for t in &self.tensors {
            out.push_str(&format!(
                "{:<width$}  {:<6}  {:<16}  {:>12}\n",
                t.name,
                t.dtype,
                format!("{:?}", t.shape),
                crate::model::thousands(t.bytes)
            ));
        }
        let total: usize = self.tensors.iter().map(|t| t.bytes).sum();
        out.push_str(&format!(
            "{} tensors, {} bytes\n",
            self.tensors.len(),
            crate::model::thousands(total)
        ));
        out
    }
}
