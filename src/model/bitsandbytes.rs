//! The bitsandbytes 4-bit checkpoint format (docs/formats.md A.5), both ways, and
//! `kiln quantize`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::loader::WeightFiles;
use crate::error::{KilnError, Result};
use crate::io::{write_atomic, write_safetensors, TensorData};
use crate::quant::nf4::{Absmax, Nf4Tensor};

const QUANT_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";

use super::config::{dtype_from_torch_name, torch_dtype_name};

/// A float as Python's `repr` writes it (what `json.dumps` emits for bnb's `nested_offset`).
fn python_float(v: f64) -> String {
    let s = format!("{v:?}");
    let exp = if v == 0.0 {
        0
    } else {
        v.abs().log10().floor() as i32
    };
    if (-4..16).contains(&exp) {
        return s;
    }
    // Python switches to scientific notation, with at least two exponent digits.
    let e = format!("{v:e}");
    let (mant, ex) = e.split_once('e').unwrap_or((&e, "0"));
    let ex: i32 = ex.parse().unwrap_or(0);
    format!("{mant}e{}{:02}", if ex < 0 { '-' } else { '+' }, ex.abs())
}

/// The quant-state JSON bitsandbytes stores beside a 4-bit weight, byte for byte as
/// `json.dumps(QuantState.as_dict(packed=True))` writes it.
pub fn quant_state_json(t: &Nf4Tensor) -> String {
    let shape = t
        .shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{shape}]",
        t.blocksize,
        torch_dtype_name(t.dtype)
    );
    if let Absmax::Nested {
        offset,
        nested_blocksize,
        ..
    } = &t.absmax
    {
        s += &format!(
            ", \"nested_blocksize\": {nested_blocksize}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float(*offset as f64)
        );
    }
    s + "}"
}

/// The tensors of one serialized `Linear4bit` weight under `name` (e.g. `...q_proj.weight`).
pub fn linear4bit_tensors(name: &str, t: &Nf4Tensor) -> Vec<(String, TensorData)> {
    let mut out = vec![
        (
            name.to_string(),
            TensorData::u8(t.packed.clone(), vec![t.packed.len(), 1]),
        ),
        (
            format!("{name}.quant_map"),
            TensorData::f32(&t.code, vec![16]),
        ),
    ];
    match &t.absmax {
        Absmax::Plain(v) => out.push((format!("{name}.absmax"), TensorData::f32(v, vec![v.len()]))),
        Absmax::Nested {
            codes,
            nested_absmax,
            nested_code,
            ..
        } => {
            out.push((
                format!("{name}.absmax"),
                TensorData::u8(codes.clone(), vec![codes.len()]),
            ));
            out.push((
                format!("{name}.nested_absmax"),
                TensorData::f32(nested_absmax, vec![nested_absmax.len()]),
            ));
            out.push((
                format!("{name}.nested_quant_map"),
                TensorData::f32(nested_code, vec![nested_code.len()]),
            ));
        }
    }
    let json = quant_state_json(t).into_bytes();
    let n = json.len();
    out.push((
        format!("{name}{QUANT_STATE_SUFFIX}"),
        TensorData::u8(json, vec![n]),
    ));
    out
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Whether `name` (e.g. `model.layers.0.self_attn.q_proj.weight`) is stored in 4-bit.
pub fn is_quantized(ckpt: &WeightFiles, name: &str) -> bool {
    ckpt.contains(&format!("{name}{QUANT_STATE_SUFFIX}"))
}

/// Reads a 4-bit weight stored under `name` in the bitsandbytes format.
pub fn read_linear4bit(ckpt: &WeightFiles, name: &str) -> Result<Nf4Tensor> {
    let bad = |msg: String| KilnError::model(&ckpt.dir, format!("4-bit weight `{name}`: {msg}"));
    let state_name = format!("{name}{QUANT_STATE_SUFFIX}");
    if !ckpt.contains(&state_name)
        && ckpt.contains(&format!("{name}.quant_state.bitsandbytes__fp4"))
    {
        return Err(bad(
            "FP4 quantization is not supported; re-quantize the model with NF4 (`kiln quantize`)"
                .into(),
        ));
    }
    let (_, _, state) = ckpt.raw(&state_name)?;
    let state: serde_json::Value =
        serde_json::from_slice(state).map_err(|e| bad(format!("quant_state is not JSON: {e}")))?;
    let field = |k: &str| {
        state
            .get(k)
            .ok_or_else(|| bad(format!("quant_state has no `{k}`")))
    };
    if field("quant_type")?.as_str() != Some("nf4") {
        return Err(bad(format!(
            "quant_type {} is not supported; kiln reads nf4",
            field("quant_type")?
        )));
    }
    let blocksize = field("blocksize")?
        .as_u64()
        .ok_or_else(|| bad("blocksize is not a number".into()))? as usize;
    let dtype = dtype_from_torch_name(field("dtype")?.as_str().unwrap_or(""))
        .ok_or_else(|| bad(format!("unknown dtype {}", state["dtype"])))?;
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_u64().map(|d| d as usize))
                .collect()
        })
        .ok_or_else(|| bad("shape is not a list".into()))?;
    let numel: usize = shape.iter().product();
    let (_, _, packed) = ckpt.raw(name)?;
    if packed.len() != numel.div_ceil(2) {
        return Err(bad(format!(
            "{} packed bytes for shape {shape:?}; expected {}",
            packed.len(),
            numel.div_ceil(2)
        )));
    }
    let (_, _, code) = ckpt.raw(&format!("{name}.quant_map"))?;
    let code: [f32; 16] = f32s(code)
        .try_into()
        .map_err(|_| bad("quant_map must hold 16 floats".into()))?;
    let (absmax_dtype, _, absmax_bytes) = ckpt.raw(&format!("{name}.absmax"))?;
    let nblocks = numel.div_ceil(blocksize);
    let absmax = if let Some(offset) = state.get("nested_offset") {
        let offset = offset
            .as_f64()
            .ok_or_else(|| bad("nested_offset is not a number".into()))?
            as f32;
        let nested_blocksize = state
            .get("nested_blocksize")
            .and_then(|v| v.as_u64())
            .unwrap_or(256) as usize;
        let (_, _, nested_absmax) = ckpt.raw(&format!("{name}.nested_absmax"))?;
        let (_, _, nested_code) = ckpt.raw(&format!("{name}.nested_quant_map"))?;
        Absmax::Nested {
            codes: absmax_bytes.to_vec(),
            nested_absmax: f32s(nested_absmax),
            nested_code: f32s(nested_code),
            offset,
            nested_blocksize,
        }
    } else {
        if absmax_dtype != safetensors::Dtype::F32 {
            return Err(bad("absmax of a non-nested weight must be float32".into()));
        }
        Absmax::Plain(f32s(absmax_bytes))
    };
    let n_absmax = match &absmax {
        Absmax::Plain(v) => v.len(),
        Absmax::Nested { codes, .. } => codes.len(),
    };
    if n_absmax != nblocks {
        return Err(bad(format!(
            "{n_absmax} block scales for {numel} values in blocks of {blocksize}"
        )));
    }
    Ok(Nf4Tensor {
        packed: packed.to_vec(),
        absmax,
        code,
        blocksize,
        shape,
        dtype,
    })
}

/// Reads tensor `name` as f32 values with its original dtype.
fn tensor_f32(ckpt: &WeightFiles, name: &str) -> Result<(Vec<f32>, Vec<usize>, DType)> {
    let t = ckpt.tensor(name, &Device::Cpu)?;
    let dtype = t.dtype();
    let shape = t.dims().to_vec();
    Ok((
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        shape,
        dtype,
    ))
}

fn is_float(dtype: safetensors::Dtype) -> bool {
    matches!(
        dtype,
        safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
    )
}

/// Which tensors of a model directory are linear weights to quantize: the 2-D projection
/// weights inside the decoder layers (embeddings, norms and lm_head stay in 16-bit, as
/// transformers' bitsandbytes integration keeps them).
pub fn is_layer_linear(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.contains(".layers.") && name.ends_with("_proj.weight")
}

pub struct QuantizeReport {
    pub quantized: usize,
    pub kept: usize,
    pub bytes_in: usize,
    pub bytes_out: usize,
    pub outputs: Vec<PathBuf>,
}

/// Tensor `name` of `ckpt` in NF4, quantized on `device` (the bytes do not depend on it).
fn quantize_tensor(
    ckpt: &WeightFiles,
    name: &str,
    device: &candle_core::Device,
) -> Result<Nf4Tensor> {
    if device.is_cuda() {
        let w = ckpt.tensor(name, device)?;
        if matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Ok(crate::quant::nf4::quantize_on_cuda(&w)?.0);
        }
    }
    let _ = device;
    let (values, shape, dtype) = tensor_f32(ckpt, name)?;
    Nf4Tensor::quantize(&values, &shape, dtype)
}

/// `kiln quantize`: a model directory or one .safetensors file, to the bitsandbytes format.
pub fn quantize_path(
    input: &Path,
    output: &Path,
    device: &candle_core::Device,
    progress: &dyn Fn(usize, usize, &str),
) -> Result<QuantizeReport> {
    let (ckpt, single_file) = if input.is_dir() {
        (WeightFiles::open(input)?, false)
    } else if input.extension().is_some_and(|e| e == "safetensors") {
        let dir = input.parent().unwrap_or(Path::new(".")).to_path_buf();
        (
            WeightFiles::open_files(&dir, vec![input.to_path_buf()])?,
            true,
        )
    } else if !input.exists() {
        return Err(KilnError::model(input, "no such file or directory"));
    } else {
        return Err(KilnError::Usage(format!(
            "{}: expected a model directory or a .safetensors file",
            input.display()
        )));
    };
    let mut names = ckpt.names();
    names.sort();
    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    let mut report = QuantizeReport {
        quantized: 0,
        kept: 0,
        bytes_in: 0,
        bytes_out: 0,
        outputs: vec![],
    };
    for (k, name) in names.iter().enumerate() {
        progress(k, names.len(), name);
        let (dtype, shape, bytes) = ckpt.raw(name)?;
        report.bytes_in += bytes.len();
        let quantize = if single_file {
            shape.len() == 2 && is_float(dtype)
        } else {
            is_layer_linear(name, &shape)
        };
        if name.contains(".quant_state.")
            || name.ends_with(".absmax")
            || name.ends_with(".quant_map")
        {
            return Err(KilnError::model(
                &ckpt.dir,
                format!("`{name}`: this checkpoint is already quantized"),
            ));
        }
        if quantize {
            let q = quantize_tensor(&ckpt, name, device)?;
            report.quantized += 1;
            tensors.extend(linear4bit_tensors(name, &q));
        } else {
            report.kept += 1;
            tensors.push((
                name.clone(),
                TensorData {
                    dtype,
                    shape,
                    bytes: bytes.to_vec(),
                },
            ));
        }
    }
    report.bytes_out = tensors.iter().map(|(_, t)| t.bytes.len()).sum();
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    if single_file {
        write_safetensors(output, &tensors, meta)?;
        report.outputs.push(output.to_path_buf());
        return Ok(report);
    }
    std::fs::create_dir_all(output).map_err(|e| KilnError::io(output, e))?;
    report.outputs = write_sharded(output, tensors, meta)?;
    // config.json gains the quantization_config transformers reads; other files are copied.
    let config_path = input.join("config.json");
    let mut config = crate::io::read_json(&config_path)?;
    let compute = config
        .get("torch_dtype")
        .or(config.get("dtype"))
        .and_then(|d| d.as_str())
        .unwrap_or("bfloat16");
    config["quantization_config"] = serde_json::json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "load_in_8bit": false,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true,
        "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_enable_fp32_cpu_offload": false
    });
    write_atomic(
        &output.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap().as_bytes(),
    )?;
    for entry in std::fs::read_dir(input).map_err(|e| KilnError::io(input, e))? {
        let path = entry.map_err(|e| KilnError::io(input, e))?.path();
        let fname = path.file_name().unwrap().to_string_lossy().into_owned();
        let is_weights = fname.ends_with(".safetensors") || fname == "model.safetensors.index.json";
        if path.is_file() && !is_weights && fname != "config.json" {
            let bytes = std::fs::read(&path).map_err(|e| KilnError::io(&path, e))?;
            write_atomic(&output.join(&fname), &bytes)?;
        }
    }
    Ok(report)
}

/// Largest shard kiln writes.
const SHARD_BYTES: usize = 4 << 30;

/// Writes `tensors` as `model.safetensors`, or as shards with an index when they exceed 4 GiB.
pub fn write_sharded(
    dir: &Path,
    tensors: Vec<(String, TensorData)>,
    meta: Option<HashMap<String, String>>,
) -> Result<Vec<PathBuf>> {
    let plan: Vec<(String, usize)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.bytes.len()))
        .collect();
    let mut by_name: HashMap<String, TensorData> = tensors.into_iter().collect();
    write_sharded_with(dir, &plan, meta, |name| {
        Ok(by_name.remove(name).expect("planned above"))
    })
}

/// As [`write_sharded`], for tensors planned by name and byte size and produced one shard at a
/// time by `produce`: at most one shard (≤ 4 GiB) of tensors is in memory.
pub fn write_sharded_with(
    dir: &Path,
    plan: &[(String, usize)],
    meta: Option<HashMap<String, String>>,
    produce: impl FnMut(&str) -> Result<TensorData>,
) -> Result<Vec<PathBuf>> {
    write_shards(dir, plan, meta, SHARD_BYTES, produce)
}

fn write_shards(
    dir: &Path,
    plan: &[(String, usize)],
    meta: Option<HashMap<String, String>>,
    shard_bytes: usize,
    mut produce: impl FnMut(&str) -> Result<TensorData>,
) -> Result<Vec<PathBuf>> {
    let total: usize = plan.iter().map(|(_, b)| b).sum();
    let mut shards: Vec<Vec<&str>> = vec![vec![]];
    let mut size = 0;
    for (name, bytes) in plan {
        if size + bytes > shard_bytes && !shards.last().unwrap().is_empty() {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        shards.last_mut().unwrap().push(name);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut paths = vec![];
    for (i, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let tensors = shard
            .iter()
            .map(|name| Ok((name.to_string(), produce(name)?)))
            .collect::<Result<Vec<_>>>()?;
        for (name, _) in &tensors {
            weight_map.insert(name.clone(), serde_json::Value::String(fname.clone()));
        }
        let path = dir.join(&fname);
        write_safetensors(&path, &tensors, meta.clone())?;
        paths.push(path);
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(
            &dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap().as_bytes(),
        )?;
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards are produced one at a time, named as transformers names them, indexed, and load
    /// back as one checkpoint.
    #[test]
    fn shards_are_written_one_at_a_time_and_load_back() {
        let tmp = tempfile::tempdir().unwrap();
        let plan: Vec<(String, usize)> = (0..5).map(|i| (format!("t{i}"), 40)).collect();
        let mut produced = vec![];
        let files = write_shards(tmp.path(), &plan, None, 100, |name| {
            produced.push(name.to_string());
            let i: f32 = name[1..].parse().unwrap();
            Ok(TensorData::f32(&[i; 10], vec![10]))
        })
        .unwrap();
        assert_eq!(produced, ["t0", "t1", "t2", "t3", "t4"]);
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors"
            ]
        );
        let ckpt = WeightFiles::open(tmp.path()).unwrap();
        let t3 = ckpt
            .tensor("t3", &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(t3, vec![3.0; 10]);
    }
}
