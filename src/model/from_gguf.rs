//! A GGUF file as a kiln model: hyperparameters from the `llama.*` keys, tensors dequantized
//! (candle's ggml kernels), renamed to Hugging Face names and un-permuted, the tokenizer rebuilt
//! from `tokenizer.ggml.*`. The model then runs through the same code as training.

use crate::gguf::keys;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::gguf_arch::{hf_name, permute_heads, unpermute_rows};
use crate::error::{KilnError, Result};
use crate::gguf::{GgufFile, Value};
use crate::model::config::{ModelConfig, RopeScaling};
use crate::model::family;
use crate::model::loader::WeightFiles;
use crate::model::{LoadOptions, LoadedModel};
use crate::tokenizer::vocab;

pub use crate::gguf::is_gguf;

/// The model configuration a llama GGUF file describes.
pub fn config_of(file: &GgufFile) -> Result<ModelConfig> {
    let arch = file.require_str(keys::general::ARCHITECTURE)?;
    let key = |k: &str| format!("{arch}.{k}");
    let u = |k: &str| file.require_u64(&key(k)).map(|v| v as usize);
    let opt_u = |k: &str| {
        file.get(&key(k))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    };
    let f = |k: &str| file.get(&key(k)).and_then(|v| v.as_f64());
    let family = family::by_gguf_arch(arch, opt_u(keys::llm::EXPERT_COUNT).unwrap_or(0) > 0)
        .ok_or_else(|| {
            KilnError::model(
                &file.path,
                format!(
                    "GGUF architecture `{arch}` is not supported yet (kiln reads {:?})",
                    family::gguf_arches()
                ),
            )
        })?;
    let layers = u(keys::llm::BLOCK_COUNT)?;
    let hidden = u(keys::llm::EMBEDDING_LENGTH)?;
    let heads = u(keys::llm::ATTENTION_HEAD_COUNT)?;
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| KilnError::model(&file.path, "tensor `token_embd.weight` is missing"))?;
    let vocab_size = embd.info.dims.get(1).copied().unwrap_or(0) as usize;
    // Phi-3's rope.dimension_count is the rotated part of a head (Phi-4-mini rotates 3/4 of it).
    let head_dim = opt_u(keys::llm::ATTENTION_KEY_LENGTH)
        .or(opt_u(keys::llm::ROPE_DIMENSION_COUNT).filter(|_| arch != "phi3"))
        .unwrap_or(hidden / heads.max(1));
    let rotary_dim = opt_u(keys::llm::ROPE_DIMENSION_COUNT).unwrap_or(head_dim);
    let rope_scaling = rope_scaling_of(file, arch)?;
    let bos = file
        .get(keys::tokenizer::BOS_ID)
        .and_then(|v| v.as_u64())
        .map(|v| v as u32);
    let eos = file
        .get(keys::tokenizer::EOS_ID)
        .and_then(|v| v.as_u64())
        .map(|v| v as u32);
    Ok(ModelConfig {
        model_type: family.model_type.into(),
        hidden_size: hidden,
        intermediate_size: u(keys::llm::FEED_FORWARD_LENGTH)?,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: opt_u(keys::llm::ATTENTION_HEAD_COUNT_KV).unwrap_or(heads),
        head_dim,
        rotary_dim,
        vocab_size,
        rms_norm_eps: f(keys::llm::ATTENTION_LAYER_NORM_RMS_EPSILON).ok_or_else(|| {
            KilnError::model(
                &file.path,
                "`llama.attention.layer_norm_rms_epsilon` is missing",
            )
        })?,
        rope_theta: f(keys::llm::ROPE_FREQ_BASE).unwrap_or(10000.0),
        rope_scaling,
        max_position_embeddings: u(keys::llm::CONTEXT_LENGTH)?,
        tie_word_embeddings: file.tensor("output.weight").is_none(),
        attention_bias: file.tensor("blk.0.attn_q.bias").is_some(),
        qk_norm: file.tensor("blk.0.attn_q_norm.weight").is_some(),
        // Gemma 3's local layers: their RoPE base (llama.cpp's default 10,000) and which they
        // are (the file's pattern, or every sixth layer global).
        local_rope_theta: family
            .local_rope
            .then(|| f(keys::llm::ROPE_FREQ_BASE_SWA).unwrap_or(10000.0)),
        mlp_bias: false,
        bos_token_id: bos,
        eos_token_ids: eos.into_iter().collect(),
        torch_dtype: None,
        // As llama.cpp runs the file: gemma2 with its window, phi3 without ("Phi SWA is
        // currently disabled"), llama has none.
        sliding_window: file
            .get(&key(keys::llm::ATTENTION_SLIDING_WINDOW))
            .and_then(|v| v.as_u64())
            .filter(|&w| w > 0 && family.gguf_window)
            .map(|w| w as usize),
        original_max_position_embeddings: opt_u(keys::llm::ROPE_SCALING_ORIGINAL_CONTEXT_LENGTH),
        activation: family.activation,
        // llama.cpp's scale (Gemma 2 27B, whose query_pre_attn_scalar is hidden/heads, excepted).
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
        attn_softcap: f(keys::llm::ATTN_LOGIT_SOFTCAPPING),
        final_softcap: f(keys::llm::FINAL_LOGIT_SOFTCAPPING),
        // The file's pattern, or the family's (llama.cpp's gemma3: every sixth layer global).
        sliding_layers: file
            .get(&key(keys::llm::ATTENTION_SLIDING_WINDOW_PATTERN))
            .and_then(|v| v.as_array())
            .map(|items| {
                items
                    .iter()
                    .map(|b| matches!(b, Value::Bool(true)))
                    .collect()
            }),
        // llama.cpp's smollm3 fixes the interval of its layers without rotation.
        rope_layers: family
            .no_rope_every
            .map(|n| (0..layers).map(|i| !(i + 1).is_multiple_of(n)).collect()),
        num_experts: opt_u(keys::llm::EXPERT_COUNT).unwrap_or(0),
        experts_per_token: opt_u(keys::llm::EXPERT_USED_COUNT).unwrap_or(2),
        // Mixtral's experts are as wide as the dense feed-forward length; llama.cpp
        // renormalizes the picked experts' weights of both.
        expert_intermediate_size: match opt_u(keys::llm::EXPERT_FEED_FORWARD_LENGTH) {
            Some(n) => n,
            None => u(keys::llm::FEED_FORWARD_LENGTH)?,
        },
        norm_topk_prob: true,
    })
}

/// The RoPE scaling a GGUF file stores: `rope_freqs` factors (Llama 3), Phi-3's LongRoPE factor
/// pairs with their original context and attention factor, or a named type (`linear`).
fn rope_scaling_of(file: &GgufFile, arch: &str) -> Result<RopeScaling> {
    let key = |k: &str| format!("{arch}.{k}");
    let opt_u = |k: &str| {
        file.get(&key(k))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    };
    let f = |k: &str| file.get(&key(k)).and_then(|v| v.as_f64());
    let long_short = (
        file.tensor("rope_factors_long.weight"),
        file.tensor("rope_factors_short.weight"),
    );
    Ok(match file.tensor("rope_freqs.weight") {
        Some(t) => RopeScaling::Factors(file.tensor_f32(t)?),
        // Phi-3's LongRoPE: both factor lists, the original context, the attention factor.
        None if long_short.0.is_some() && long_short.1.is_some() => {
            let to_f64 = |v: Vec<f32>| v.into_iter().map(f64::from).collect();
            RopeScaling::LongRope {
                long_factor: to_f64(file.tensor_f32(long_short.0.expect("checked"))?),
                short_factor: to_f64(file.tensor_f32(long_short.1.expect("checked"))?),
                original_max_position_embeddings: opt_u(
                    keys::llm::ROPE_SCALING_ORIGINAL_CONTEXT_LENGTH,
                )
                .ok_or_else(|| {
                    KilnError::model(
                        &file.path,
                        "rope factors without rope.scaling.original_context_length",
                    )
                })?,
                attention_factor: f(keys::llm::ROPE_SCALING_ATTN_FACTOR).unwrap_or(1.0),
            }
        }
        None => match file
            .get(&key(keys::llm::ROPE_SCALING_TYPE))
            .and_then(|v| v.as_str())
        {
            Some("linear") => RopeScaling::Linear {
                factor: f(keys::llm::ROPE_SCALING_FACTOR).unwrap_or(1.0),
            },
            Some("none") | None => RopeScaling::None,
            Some(other) => {
                return Err(KilnError::model(
                    &file.path,
                    format!("rope scaling `{other}` is not supported"),
                ))
            }
        },
    })
}

/// Loads the GGUF file at `path` for inference (dense, or re-quantized to NF4 if asked).
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let config = config_of(&file)?;
    let tokenizer = vocab::tokenizer_from_gguf(&file)?;
    let keep = if opts.quantize {
        DType::F32
    } else {
        opts.dtype
    };
    let arch = file.require_str(keys::general::ARCHITECTURE)?.to_string();
    let mut tensors = HashMap::new();
    for entry in &file.tensors {
        if matches!(
            entry.info.name.as_str(),
            "rope_freqs.weight" | "rope_factors_long.weight" | "rope_factors_short.weight"
        ) {
            continue;
        }
        let name = hf_name(&entry.info.name, &arch).ok_or_else(|| {
            KilnError::model(
                path,
                format!("unexpected tensor `{}` for a llama model", entry.info.name),
            )
        })?;
        let shape = entry.info.torch_shape();
        let mut values = file.tensor_f32(entry)?;
        if config.is_gemma() && name.ends_with("norm.weight") {
            values.iter_mut().for_each(|v| *v -= 1.0); // stored as 1 + w
        }
        if let Some(n_head) = permute_heads(&config, &name) {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            values = unpermute_rows(&values, n_head, cols);
        }
        // Stacked experts `[experts, out, in]` back to one tensor per expert (Mixtral's
        // `block_sparse_moe`, Qwen3-MoE's `mlp`).
        let module = config.moe_layout().map(|l| l.module).unwrap_or("");
        if let Some((layer, w)) = name
            .strip_suffix(".weight")
            .and_then(|n| n.split_once(&format!(".{module}.experts.")))
            .filter(|_| shape.len() == 3)
        {
            let per = shape[1] * shape[2];
            for e in 0..shape[0] {
                let t = Tensor::from_vec(
                    values[e * per..(e + 1) * per].to_vec(),
                    (shape[1], shape[2]),
                    &Device::Cpu,
                )?
                .to_dtype(keep)?;
                tensors.insert(format!("{layer}.{module}.experts.{e}.{w}.weight"), t);
            }
            continue;
        }
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(keep)?;
        tensors.insert(name, t);
    }
    let ckpt = WeightFiles::from_tensors(path, tensors);
    let model = crate::model::build_decoder(&ckpt, config, opts)?;
    Ok(LoadedModel {
        dir: path.to_path_buf(),
        model,
        tokenizer,
    })
}
