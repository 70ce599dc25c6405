//! Merging a LoRA adapter into its base: `W' = W + scaling · B·A` for every adapted projection,
//! written as a Hugging Face model directory (config.json, safetensors shards, tokenizer files).
//!
//! `into = Nf4` merges into the dequantized NF4 weights the adapter was trained against (what the
//! trained model computed); `Original` into the base's original weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{KilnError, Result};
use crate::infer::{self, InferenceOptions};
use crate::io::{write_atomic, TensorData};
use crate::model::decoder::{FrozenWeight, Linear};
use crate::model::{Decoder, LoadedModel};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeInto {
    Nf4,
    Original,
}

/// Files copied from the base directory beside the merged weights.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
];

/// The projection's weight with the adapter merged in, in f32 on the CPU (computed on the
/// device the model was loaded on).
fn merged_weight(linear: &Linear) -> Result<Tensor> {
    let device = match (&linear.lora, &linear.base) {
        (Some(lora), _) => lora.a.device().clone(),
        (None, FrozenWeight::Dense(w)) => w.device().clone(),
        (None, FrozenWeight::Nf4(_)) => Device::Cpu,
    };
    let w = match &linear.base {
        FrozenWeight::Nf4(q) => q.weight().dequantize(DType::F32, &device)?,
        FrozenWeight::Dense(w) => w.to_dtype(DType::F32)?,
    };
    let w = match &linear.lora {
        Some(lora) => (w + (lora.b.as_tensor().matmul(lora.a.as_tensor())? * lora.scaling)?)?,
        None => w,
    };
    Ok(w.to_device(&Device::Cpu)?)
}

/// One tensor of the merged model: stored as is, or a projection with its adapter merged in.
pub enum Part<'a> {
    Dense(&'a Tensor),
    Merged(&'a Linear),
}

impl Part<'_> {
    /// The tensor's values in f32 on the CPU (merged projections computed now).
    pub fn to_f32(&self) -> Result<Tensor> {
        match self {
            Part::Dense(t) => Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?),
            Part::Merged(linear) => merged_weight(linear),
        }
    }

    /// PyTorch-order shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Part::Dense(t) => t.dims().to_vec(),
            Part::Merged(linear) => {
                let (out_f, in_f) = linear.shape();
                vec![out_f, in_f]
            }
        }
    }
}

/// Every tensor of the merged model by its Hugging Face name, computed when asked for, so an
/// export holds one merged tensor at a time.
pub fn merged_parts(model: &Decoder) -> Vec<(String, Part<'_>)> {
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        Part::Dense(&model.embed_tokens),
    )];
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push((
            format!("{p}.input_layernorm.weight"),
            Part::Dense(&layer.input_layernorm.weight),
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            Part::Dense(&layer.post_attention_layernorm.weight),
        ));
        for (name, norm) in [
            (
                "pre_feedforward_layernorm",
                &layer.pre_feedforward_layernorm,
            ),
            (
                "post_feedforward_layernorm",
                &layer.post_feedforward_layernorm,
            ),
        ] {
            if let Some(norm) = norm {
                out.push((format!("{p}.{name}.weight"), Part::Dense(&norm.weight)));
            }
        }
        if let Some((q_norm, k_norm)) = &layer.self_attn.qk_norm {
            for (name, norm) in [("q_norm", q_norm), ("k_norm", k_norm)] {
                out.push((
                    format!("{p}.self_attn.{name}.weight"),
                    Part::Dense(&norm.weight),
                ));
            }
        }
        if let crate::model::decoder::FeedForward::Moe(moe) = &layer.mlp {
            out.push((
                format!("{p}.{}.gate.weight", moe.layout.module),
                Part::Dense(&moe.router),
            ));
        }
        for (name, linear) in layer.linears() {
            out.push((format!("{p}.{name}.weight"), Part::Merged(linear)));
            if let Some(b) = &linear.bias {
                out.push((format!("{p}.{name}.bias"), Part::Dense(b)));
            }
        }
    }
    out.push((
        "model.norm.weight".to_string(),
        Part::Dense(&model.norm.weight),
    ));
    if let Some(head) = &model.lm_head {
        out.push(("lm_head.weight".to_string(), Part::Dense(head)));
    }
    out
}

/// The dtype the base was stored in (config.json), bf16 when it does not say.
pub fn base_dtype(model: &Decoder) -> DType {
    model.config.stored_dtype().unwrap_or(DType::BF16)
}

/// Loads base + adapter as merging needs them: on `device`, dense weights in the dtype the base
/// is stored in (each merged weight is computed in f32 one at a time), NF4 base for
/// `MergeInto::Nf4`.
pub fn load_for_merge(
    base: &str,
    adapter: &Path,
    into: MergeInto,
    device: &str,
) -> Result<LoadedModel> {
    let dir = crate::model::source::resolve_model_path(base)?;
    let config = crate::model::load_config(&dir)?;
    let stored = config.stored_dtype().unwrap_or(DType::F32);
    let loaded = infer::load(
        base,
        Some(adapter),
        &InferenceOptions {
            device: device.into(),
            dtype: Some(stored),
            quantize: Some(into == MergeInto::Nf4),
            ..Default::default()
        },
    )?;
    let stored_4bit = loaded
        .model
        .layers
        .iter()
        .flat_map(|l| l.linears())
        .any(|(_, lin)| matches!(lin.base, FrozenWeight::Nf4(_)));
    if into == MergeInto::Original && stored_4bit {
        return Err(KilnError::model(
            &loaded.dir,
            "the base is stored in 4-bit, so its original weights are not here; use --into nf4, or --model with the unquantized base",
        ));
    }
    Ok(loaded)
}

/// Writes the merged model of `loaded` (base + adapter) to `out` as a Hugging Face directory.
pub fn write_merged(loaded: &LoadedModel, out: &Path, dtype: DType) -> Result<Vec<PathBuf>> {
    if out.exists() && out.canonicalize().ok() == loaded.dir.canonicalize().ok() {
        return Err(KilnError::Usage("-o must differ from --model".into()));
    }
    std::fs::create_dir_all(out).map_err(|e| KilnError::io(out, e))?;
    // One shard of merged tensors in memory at a time.
    let named = merged_parts(&loaded.model);
    let plan: Vec<(String, usize)> = named
        .iter()
        .map(|(name, part)| {
            (
                name.clone(),
                part.shape().iter().product::<usize>() * dtype.size_in_bytes(),
            )
        })
        .collect();
    let parts: HashMap<String, Part> = named.into_iter().collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bar = crate::progress::bar(plan.len(), "tensors merged", false);
    let files = crate::model::bitsandbytes::write_sharded_with(out, &plan, Some(meta), |name| {
        bar.inc(1);
        TensorData::from_tensor(&parts[name].to_f32()?.to_dtype(dtype)?)
    })?;
    bar.finish_and_clear();
    let mut config = crate::io::read_json(&loaded.dir.join("config.json"))?;
    if let Some(obj) = config.as_object_mut() {
        obj.remove("quantization_config");
        let name = serde_json::Value::String(crate::model::config::torch_dtype_name(dtype).into());
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), name.clone());
        }
        obj.insert("torch_dtype".into(), name);
    }
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)
            .expect("JSON values serialize")
            .as_bytes(),
    )?;
    for f in TOKENIZER_FILES {
        let src = loaded.dir.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| KilnError::io(&src, e))?;
            write_atomic(&out.join(f), &bytes)?;
        }
    }
    Ok(files)
}

/// How far the merged model is from the trained one (adapter on its base) on held-out rows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    /// What was compared: the reference (trained) model and the exported one.
    pub reference: String,
    pub candidate: String,
    pub target_tokens: usize,
    pub trained_perplexity: f64,
    pub merged_perplexity: f64,
    /// Mean over target tokens of KL(trained ‖ merged), in nats.
    pub mean_kl: f64,
}

impl std::fmt::Display for MergeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fidelity on {} held-out tokens: perplexity {} {:.4}, {} {:.4} ({:+.3}%), mean KL {:.3e} nats",
            self.target_tokens,
            self.reference,
            self.trained_perplexity,
            self.candidate,
            self.merged_perplexity,
            100.0 * (self.merged_perplexity / self.trained_perplexity - 1.0),
            self.mean_kl
        )
    }
}

fn cpu_f32(quantize: Option<bool>) -> InferenceOptions {
    InferenceOptions {
        device: "cpu".into(),
        dtype: Some(DType::F32),
        quantize,
        ..Default::default()
    }
}

/// Compares the trained model (`adapter` on `base`, NF4 as trained) with the merged directory
/// on the first `rows` examples of `data`, in f32 on the CPU.
pub fn fidelity(
    base: &str,
    adapter: &Path,
    merged: &Path,
    data: &crate::recipe::DataSection,
    rows: usize,
) -> Result<MergeReport> {
    let trained = infer::load(base, Some(adapter), &cpu_f32(None))?;
    let mut examples = crate::data::load_dataset(data, &trained.tokenizer, 0)?.train;
    examples.truncate(rows);
    let merged = infer::load(&merged.to_string_lossy(), None, &cpu_f32(Some(false)))?;
    let mut report = compare(&trained.model, &merged.model, &examples)?;
    report.reference = "trained (adapter on NF4 base)".into();
    report.candidate = "merged".into();
    Ok(report)
}

/// Compares `trained` and `merged` token distributions on `examples`' target tokens.
pub fn compare(
    trained: &Decoder,
    merged: &Decoder,
    examples: &[crate::data::Example],
) -> Result<MergeReport> {
    let mut nll_t = 0f64;
    let mut nll_m = 0f64;
    let mut kl = 0f64;
    let mut n = 0usize;
    for ex in examples {
        let ids = &ex.input_ids[..ex.input_ids.len() - 1];
        let log_probs = |m: &Decoder| -> Result<Tensor> {
            let x = Tensor::new(ids, &m.device)?.unsqueeze(0)?;
            let logits = m.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)?;
            Ok(candle_nn::ops::log_softmax(&logits, 1)?.to_device(&Device::Cpu)?)
        };
        let lt = log_probs(trained)?.to_vec2::<f32>()?;
        let lm = log_probs(merged)?.to_vec2::<f32>()?;
        for (j, (rt, rm)) in lt.iter().zip(&lm).enumerate() {
            if !ex.loss_mask[j + 1] {
                continue;
            }
            let target = ex.input_ids[j + 1] as usize;
            nll_t -= rt[target] as f64;
            nll_m -= rm[target] as f64;
            kl += rt
                .iter()
                .zip(rm)
                .map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64))
                .sum::<f64>();
            n += 1;
        }
    }
    let n_f = n.max(1) as f64;
    Ok(MergeReport {
        reference: "reference".into(),
        candidate: "candidate".into(),
        target_tokens: n,
        trained_perplexity: (nll_t / n_f).exp(),
        merged_perplexity: (nll_m / n_f).exp(),
        mean_kl: kl / n_f,
    })
}
