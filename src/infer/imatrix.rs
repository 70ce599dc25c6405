//! llama.cpp's importance matrix ("imatrix") measured by kiln on the user's rows: for every
//! linear layer, the sum over tokens of each input column's squared activation, and the token
//! count — what `llama-imatrix` collects and `llama-quantize --imatrix` weights its rounding
//! with. Written in llama.cpp's imatrix GGUF format (`general.type = imatrix`, tensors
//! `<weight>.in_sum2` and `<weight>.counts`), keyed by the GGUF weight names the exported model
//! uses. `kiln eval --imatrix FILE` collects it from the rows it evaluates.
//!
//! The sums are taken where the model applies each projection (each `Linear`'s input tap carries
//! an observer while a collection runs), so they follow the model kiln evaluates: the adapter's path
//! is part of the layer's output, not of its input, and inputs are what the matrix measures.

use crate::gguf::keys;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::gguf::{GgmlType, TensorInfo, Value};
use crate::model::decoder::{Decoder, FeedForward, GateUpProj, InputObserver, Linear, QkvProj};

/// One projection's running sums: Σ x² per input column, and the rows seen.
#[derive(Default)]
struct ColumnSums(Mutex<(Vec<f64>, u64)>);

impl InputObserver for ColumnSums {
    fn observe(&self, x: &Tensor) -> Result<()> {
        let cols = x.dim(D::Minus1)?;
        let rows = x.elem_count() / cols.max(1);
        let sq = x
            .to_dtype(DType::F32)?
            .reshape((rows, cols))?
            .sqr()?
            .sum(0)?
            .to_vec1::<f32>()?;
        let mut sums = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if sums.0.is_empty() {
            sums.0 = vec![0.0; cols];
        }
        for (acc, v) in sums.0.iter_mut().zip(sq) {
            *acc += v as f64;
        }
        sums.1 += rows as u64;
        Ok(())
    }
}

/// One weight's statistics: its GGUF name, Σ x² per input column, and the tokens seen.
#[derive(Debug, Clone)]
pub struct ImatrixEntry {
    pub name: String,
    pub sum_squares: Vec<f64>,
    pub tokens: u64,
}

/// Runs `f` (forward passes of `model`) with a [`ColumnSums`] on each of its projections, and
/// returns what they measured.
pub fn collect<R>(
    model: &Decoder,
    f: impl FnOnce() -> Result<R>,
) -> Result<(R, Vec<ImatrixEntry>)> {
    let watched: Vec<(String, &Linear, Arc<ColumnSums>)> = projections(model)
        .into_iter()
        .filter_map(|(hf, linear)| {
            let name = crate::model::gguf_arch::gguf_name(&hf, "llama")?;
            Some((name, linear, Arc::new(ColumnSums::default())))
        })
        .collect();
    for (_, linear, sums) in &watched {
        linear.tap.attach(sums.clone());
    }
    let out = f();
    for (_, linear, _) in &watched {
        linear.tap.detach();
    }
    let out = out?;
    let mut entries: Vec<ImatrixEntry> = watched
        .into_iter()
        .filter_map(|(name, _, sums)| {
            let (sum_squares, tokens) = sums.0.lock().ok()?.clone();
            (tokens > 0).then_some(ImatrixEntry {
                name,
                sum_squares,
                tokens,
            })
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((out, entries))
}

/// Every dense projection of `model` with its Hugging Face weight name (experts are left out:
/// llama.cpp keeps one matrix a stack of experts, with per-expert counts).
fn projections(model: &Decoder) -> Vec<(String, &Linear)> {
    let mut out: Vec<(String, &Linear)> = vec![];
    for (i, layer) in model.layers.iter().enumerate() {
        let name = |module: &str| format!("model.layers.{i}.{module}.weight");
        match &layer.self_attn.qkv {
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            } => {
                out.push((name("self_attn.q_proj"), q_proj));
                out.push((name("self_attn.k_proj"), k_proj));
                out.push((name("self_attn.v_proj"), v_proj));
            }
            QkvProj::Fused { qkv_proj } => out.push((name("self_attn.qkv_proj"), qkv_proj)),
        }
        out.push((name("self_attn.o_proj"), &layer.self_attn.o_proj));
        if let FeedForward::Dense(mlp) = &layer.mlp {
            match &mlp.gate_up {
                GateUpProj::Split { gate_proj, up_proj } => {
                    out.push((name("mlp.gate_proj"), gate_proj));
                    out.push((name("mlp.up_proj"), up_proj));
                }
                GateUpProj::Fused { gate_up_proj } => {
                    out.push((name("mlp.gate_up_proj"), gate_up_proj))
                }
            }
            out.push((name("mlp.down_proj"), &mlp.down_proj));
        }
    }
    out
}

/// Writes `entries` as llama.cpp's imatrix GGUF: `general.type = imatrix`, the datasets, the
/// number of chunks and their size, and per weight `<name>.in_sum2` (`[columns, 1]` f32) and
/// `<name>.counts` (`[1, 1]` f32), tensors sorted by name as `llama-imatrix` writes them.
pub fn write(
    path: &Path,
    entries: &[ImatrixEntry],
    datasets: &[String],
    chunks: u32,
    chunk_size: u32,
) -> Result<()> {
    let metadata = vec![
        (
            keys::general::TYPE.to_string(),
            Value::String("imatrix".into()),
        ),
        (
            keys::imatrix::DATASETS.to_string(),
            Value::strings(datasets.iter().cloned()),
        ),
        (keys::imatrix::CHUNK_COUNT.to_string(), Value::U32(chunks)),
        (
            keys::imatrix::CHUNK_SIZE.to_string(),
            Value::U32(chunk_size),
        ),
    ];
    let mut infos = vec![];
    let mut data: Vec<Vec<f32>> = vec![];
    for e in entries {
        infos.push(TensorInfo {
            name: format!("{}.in_sum2", e.name),
            dims: vec![e.sum_squares.len() as u64, 1],
            ggml_type: GgmlType::F32,
        });
        data.push(e.sum_squares.iter().map(|&v| v as f32).collect());
        infos.push(TensorInfo {
            name: format!("{}.counts", e.name),
            dims: vec![1, 1],
            ggml_type: GgmlType::F32,
        });
        data.push(vec![e.tokens as f32]);
    }
    crate::gguf::write(path, &metadata, &infos, |i| {
        Ok(data[i].iter().flat_map(|v| v.to_le_bytes()).collect())
    })
}

/// Per GGUF weight name, the importance llama-quantize weighs each input column's rounding by:
/// the mean square `in_sum2 / counts`, in f32 as llama-quantize computes it from the file (so
/// kiln's calibrated export and `llama-quantize --imatrix` on the written file agree).
pub fn importance(entries: &[ImatrixEntry]) -> HashMap<String, Vec<f32>> {
    entries
        .iter()
        .map(|e| {
            let sums: Vec<f32> = e.sum_squares.iter().map(|&v| v as f32).collect();
            (e.name.clone(), mean_squares(&sums, e.tokens as f32))
        })
        .collect()
}

/// `sums / count`, or ones where nothing was counted (as llama-quantize does).
fn mean_squares(sums: &[f32], count: f32) -> Vec<f32> {
    if count > 0.0 {
        sums.iter().map(|s| s / count).collect()
    } else {
        vec![1.0; sums.len()]
    }
}

/// Reads an imatrix GGUF (`kiln eval --imatrix`, `llama-imatrix`) as [`importance`] values.
/// Stacked experts (several counts) are not read: kiln quantizes dense weights under a matrix.
pub fn read(path: &Path) -> Result<HashMap<String, Vec<f32>>> {
    let file = crate::gguf::GgufFile::open(path)?;
    if file.get(keys::general::TYPE).and_then(|v| v.as_str()) != Some("imatrix") {
        return Err(crate::error::KilnError::Usage(format!(
            "{}: not an importance matrix (general.type is not `imatrix`); make one with `kiln eval --imatrix FILE` or llama-imatrix",
            path.display()
        )));
    }
    let mut out = HashMap::new();
    for entry in &file.tensors {
        let Some(name) = entry.info.name.strip_suffix(".in_sum2") else {
            continue;
        };
        let counts_name = format!("{name}.counts");
        let counts = file.tensor(&counts_name).ok_or_else(|| {
            crate::error::KilnError::Usage(format!(
                "{}: `{}` has no `{counts_name}`",
                path.display(),
                entry.info.name
            ))
        })?;
        let counts = file.tensor_f32(counts)?;
        if counts.len() != 1 {
            continue;
        }
        let sums = file.tensor_f32(entry)?;
        out.insert(name.to_string(), mean_squares(&sums, counts[0]));
    }
    Ok(out)
}
