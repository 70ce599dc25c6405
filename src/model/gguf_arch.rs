//! Llama-layout architectures in GGUF (docs/formats.md C.2–C.5, C.7): `llama`,
//! `qwen2` (the same tensors, plus q/k/v biases) and `qwen3` (plus per-head q/k norms). Tensor names, the Q/K row permutation (llama
//! only: qwen2 uses NEOX RoPE, as Hugging Face does), hyperparameter keys, `rope_freqs`, and the
//! per-tensor types of llama.cpp's quantization presets.

use crate::gguf::keys;
use crate::gguf::Value;
use crate::model::config::{ModelConfig, RopeScaling};
use crate::model::family::{self, Family};

/// llama.cpp's architecture name for a model type kiln exports, if it exports it (the families'
/// table, `model/family.rs`).
pub fn arch_name(model_type: &str) -> Option<&'static str> {
    crate::model::family::by_model_type(model_type).map(|f| f.gguf_arch)
}

/// The family of GGUF architecture `arch` (its dense member: the tensor names are the same).
fn family_of(arch: &str) -> Option<&'static Family> {
    family::by_gguf_arch(arch, false)
}

/// GGUF architectures whose blocks have Gemma 2's four norms.
fn sandwich_arch(arch: &str) -> bool {
    family_of(arch).is_some_and(|f| f.sandwich_norms)
}

/// Gemma 2's norms: its `post_attention_layernorm` follows attention (llama.cpp
/// `post_attention_norm`) and `pre_feedforward_layernorm` is the one before the MLP (`ffn_norm`).
const GEMMA2_NORMS: &[(&str, &str)] = &[
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

/// The GGUF name of a Hugging Face tensor of a model of GGUF architecture `arch`.
pub fn gguf_name(hf: &str, arch: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = part.rsplit_once('.')?;
    let gemma = GEMMA2_NORMS
        .iter()
        .find(|(h, _)| sandwich_arch(arch) && *h == module);
    let short = match gemma {
        Some((_, g)) => g,
        None => LAYER_NAMES.iter().find(|(h, _)| *h == module)?.1,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// Hugging Face module path → GGUF block tensor name.
pub const LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    // Qwen 3's per-head norms of queries and keys.
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    // Phi-3's fused projections; `ffn_up` holds gate rows, then up rows.
    ("self_attn.qkv_proj", "attn_qkv"),
    ("mlp.gate_up_proj", "ffn_up"),
    // Mixtral: the router, and each layer's experts stacked into one tensor per projection
    // (`block_sparse_moe.experts.w1` names the stack of every expert's w1).
    ("block_sparse_moe.gate", "ffn_gate_inp"),
    ("block_sparse_moe.experts.w1", "ffn_gate_exps"),
    ("block_sparse_moe.experts.w2", "ffn_down_exps"),
    ("block_sparse_moe.experts.w3", "ffn_up_exps"),
    // Qwen3-MoE: the same, under `mlp` with Qwen's projection names.
    ("mlp.gate", "ffn_gate_inp"),
    ("mlp.experts.gate_proj", "ffn_gate_exps"),
    ("mlp.experts.down_proj", "ffn_down_exps"),
    ("mlp.experts.up_proj", "ffn_up_exps"),
];

/// The Hugging Face name of a GGUF tensor of architecture `arch` (the inverse of [`gguf_name`]).
pub fn hf_name(gguf: &str, arch: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (short, suffix) = part.rsplit_once('.')?;
    let gemma = GEMMA2_NORMS
        .iter()
        .find(|(_, g)| sandwich_arch(arch) && *g == short);
    let family = family_of(arch);
    let fused = family.is_some_and(|f| f.fused_projections);
    // The experts' module: `mlp` (Qwen3-MoE) or `block_sparse_moe` (Mixtral, and by default).
    let experts_in = family
        .and_then(|f| f.experts)
        .map_or("block_sparse_moe", |e| e.layout.module);
    let module = match (short, gemma) {
        (_, Some((h, _))) => h,
        ("ffn_up", _) if fused => "mlp.gate_up_proj",
        _ => {
            LAYER_NAMES
                .iter()
                .find(|(h, g)| {
                    *g == short
                        && !(h.starts_with("block_sparse_moe.") && experts_in != "block_sparse_moe")
                })?
                .0
        }
    };
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
}

/// Heads whose rows [`permute_rows`] interleaves for this tensor, if it is q or k of a `llama`
/// model.
pub fn permute_heads(cfg: &ModelConfig, hf: &str) -> Option<usize> {
    if !cfg.family().gguf_permuted_qk {
        None
    } else if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
        Some(cfg.num_heads)
    } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias") {
        Some(cfg.num_kv_heads)
    } else {
        None
    }
}

/// Hugging Face's rotate-half row order → llama.cpp's interleaved pairs, per head: row
/// `h·D + 2i + s` of the result is row `h·D + s·D/2 + i` of `w` (`rows × cols`, row-major).
pub fn permute_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    reorder_rows(w, n_head, cols, false)
}

/// The inverse of [`permute_rows`].
pub fn unpermute_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    reorder_rows(w, n_head, cols, true)
}

fn reorder_rows(w: &[f32], n_head: usize, cols: usize, inverse: bool) -> Vec<f32> {
    let rows = w.len() / cols;
    let d = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..d / 2 {
            for s in 0..2 {
                let interleaved = h * d + 2 * i + s;
                let halves = h * d + s * (d / 2) + i;
                let (dst, src) = if inverse {
                    (halves, interleaved)
                } else {
                    (interleaved, halves)
                };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The rotary tensors a GGUF file carries before the model's own, as convert_hf_to_gguf.py
/// writes them: `rope_freqs.weight` (Llama 3.1+ scaling), or Phi-3's LongRoPE
/// `rope_factors_long.weight` and `rope_factors_short.weight`.
pub fn rope_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<f32>)> {
    if let RopeScaling::LongRope {
        short_factor,
        long_factor,
        ..
    } = &cfg.rope_scaling
    {
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
        return vec![
            ("rope_factors_long.weight".into(), f32s(long_factor)),
            ("rope_factors_short.weight".into(), f32s(short_factor)),
        ];
    }
    rope_freqs(cfg)
        .map(|f| vec![("rope_freqs.weight".into(), f)])
        .unwrap_or_default()
}

/// `rope_freqs.weight` for Llama 3.1+ rope scaling: the factor each frequency is divided by,
/// computed in f32 in the order convert_hf_to_gguf.py computes it.
pub fn rope_freqs(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = cfg.rope_scaling
    else {
        return None;
    };
    let dim = cfg.head_dim;
    let old_ctx = original_max_position_embeddings as f64;
    let low_wavelen = (old_ctx / low_freq_factor) as f32;
    let high_wavelen = (old_ctx / high_freq_factor) as f32;
    Some(
        (0..dim)
            .step_by(2)
            .map(|i| {
                // torch's float32 pow rounds the exact power: compute it in f64, round once.
                let exponent = i as f32 / dim as f32;
                let freq = 1.0f32 / cfg.rope_theta.powf(exponent as f64) as f32;
                // Python scalar / tensor is torch's `reciprocal(t) * scalar`, in f32.
                let wavelen = (1.0 / freq) * (2.0 * std::f64::consts::PI) as f32;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor as f32
                } else {
                    let smooth = ((1.0 / wavelen) * old_ctx as f32 - low_freq_factor as f32)
                        / (high_freq_factor - low_freq_factor) as f32;
                    1.0 / ((1.0 - smooth) / factor as f32 + smooth)
                }
            })
            .collect(),
    )
}

/// `{arch}.*` hyperparameters with llama.cpp's key types.
pub fn hparams(cfg: &ModelConfig) -> Vec<(String, Value)> {
    let arch = arch_name(&cfg.model_type).unwrap_or("llama");
    let k = |key: &str| format!("{arch}.{key}");
    let mut out = vec![
        (k(keys::llm::VOCAB_SIZE), Value::U32(cfg.vocab_size as u32)),
        (
            k(keys::llm::CONTEXT_LENGTH),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        (
            k(keys::llm::EMBEDDING_LENGTH),
            Value::U32(cfg.hidden_size as u32),
        ),
        (k(keys::llm::BLOCK_COUNT), Value::U32(cfg.num_layers as u32)),
        (
            k(keys::llm::FEED_FORWARD_LENGTH),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            k(keys::llm::ATTENTION_HEAD_COUNT),
            Value::U32(cfg.num_heads as u32),
        ),
        (
            k(keys::llm::ATTENTION_HEAD_COUNT_KV),
            Value::U32(cfg.num_kv_heads as u32),
        ),
        (
            k(keys::llm::ROPE_FREQ_BASE),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            k(keys::llm::ATTENTION_LAYER_NORM_RMS_EPSILON),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            k(keys::llm::ATTENTION_KEY_LENGTH),
            Value::U32(cfg.head_dim as u32),
        ),
        (
            k(keys::llm::ATTENTION_VALUE_LENGTH),
            Value::U32(cfg.head_dim as u32),
        ),
        (
            k(keys::llm::ROPE_DIMENSION_COUNT),
            Value::U32(cfg.rotary_dim as u32),
        ),
    ];
    if arch == "gemma2" {
        if let Some(cap) = cfg.attn_softcap {
            out.push((k(keys::llm::ATTN_LOGIT_SOFTCAPPING), Value::F32(cap as f32)));
        }
        if let Some(cap) = cfg.final_softcap {
            out.push((
                k(keys::llm::FINAL_LOGIT_SOFTCAPPING),
                Value::F32(cap as f32),
            ));
        }
        if let Some(w) = cfg.sliding_window {
            out.push((k(keys::llm::ATTENTION_SLIDING_WINDOW), Value::U32(w as u32)));
        }
    }
    if arch == "gemma3" {
        if let Some(w) = cfg.sliding_window {
            out.push((k(keys::llm::ATTENTION_SLIDING_WINDOW), Value::U32(w as u32)));
        }
        if let Some(cap) = cfg.final_softcap {
            out.push((
                k(keys::llm::FINAL_LOGIT_SOFTCAPPING),
                Value::F32(cap as f32),
            ));
        }
        if let Some(theta) = cfg.local_rope_theta {
            out.push((k(keys::llm::ROPE_FREQ_BASE_SWA), Value::F32(theta as f32)));
        }
        // llama.cpp makes every sixth layer global unless the file lists the pattern.
        let sliding: Vec<bool> = (0..cfg.num_layers)
            .map(|i| cfg.is_sliding_layer(i))
            .collect();
        let by_family = ModelConfig {
            sliding_layers: None,
            ..cfg.clone()
        };
        if (0..cfg.num_layers).any(|i| sliding[i] != by_family.is_sliding_layer(i)) {
            out.push((
                k(keys::llm::ATTENTION_SLIDING_WINDOW_PATTERN),
                Value::Array(
                    crate::gguf::ValueType::Bool,
                    sliding.into_iter().map(Value::Bool).collect(),
                ),
            ));
        }
    }
    if arch == "phi3" {
        out.push((
            k(keys::llm::ROPE_SCALING_ORIGINAL_CONTEXT_LENGTH),
            Value::U32(
                cfg.original_max_position_embeddings
                    .unwrap_or(cfg.max_position_embeddings) as u32,
            ),
        ));
        out.push((
            k(keys::llm::ATTENTION_SLIDING_WINDOW),
            Value::U32(cfg.sliding_window.unwrap_or(0) as u32),
        ));
        if let RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        } = cfg.rope_scaling
        {
            // convert_hf_to_gguf.py's factor: from the two lengths, whatever the config says.
            let original = original_max_position_embeddings as f64;
            let scale = cfg.max_position_embeddings as f64 / original;
            let attn_factor = if scale > 1.0 {
                (1.0 + scale.ln() / original.ln()).sqrt()
            } else {
                1.0
            };
            out.push((
                k(keys::llm::ROPE_SCALING_ATTN_FACTOR),
                Value::F32(attn_factor as f32),
            ));
        }
    }
    if cfg.num_experts > 0 {
        out.push((
            k(keys::llm::EXPERT_COUNT),
            Value::U32(cfg.num_experts as u32),
        ));
        out.push((
            k(keys::llm::EXPERT_USED_COUNT),
            Value::U32(cfg.experts_per_token as u32),
        ));
    }
    if arch == "qwen3moe" {
        out.push((
            k(keys::llm::EXPERT_FEED_FORWARD_LENGTH),
            Value::U32(cfg.expert_intermediate_size as u32),
        ));
    }
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        out.push((
            k(keys::llm::ROPE_SCALING_TYPE),
            Value::String("linear".into()),
        ));
        out.push((k(keys::llm::ROPE_SCALING_FACTOR), Value::F32(factor as f32)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for hf in [
            "model.embed_tokens.weight",
            "model.layers.12.self_attn.k_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.3.mlp.down_proj.weight",
            "model.layers.1.post_attention_layernorm.weight",
            "lm_head.weight",
        ] {
            let g = gguf_name(hf, "llama").unwrap();
            assert_eq!(hf_name(&g, "llama").as_deref(), Some(hf), "{g}");
        }
        assert_eq!(
            gguf_name("model.layers.7.self_attn.o_proj.weight", "llama").unwrap(),
            "blk.7.attn_output.weight"
        );
        assert_eq!(
            gguf_name("model.layers.x.mlp.up_proj.weight", "llama"),
            None
        );
        for (hf, g) in [
            (
                "model.layers.1.post_attention_layernorm.weight",
                "blk.1.post_attention_norm.weight",
            ),
            (
                "model.layers.1.pre_feedforward_layernorm.weight",
                "blk.1.ffn_norm.weight",
            ),
            (
                "model.layers.1.post_feedforward_layernorm.weight",
                "blk.1.post_ffw_norm.weight",
            ),
        ] {
            assert_eq!(gguf_name(hf, "gemma2").as_deref(), Some(g));
            assert_eq!(hf_name(g, "gemma2").as_deref(), Some(hf));
        }
        let fused = "model.layers.2.mlp.gate_up_proj.weight";
        assert_eq!(gguf_name(fused, "phi3").unwrap(), "blk.2.ffn_up.weight");
        assert_eq!(
            hf_name("blk.2.ffn_up.weight", "phi3").as_deref(),
            Some(fused)
        );
    }

    #[test]
    fn permutation_interleaves_head_halves_and_inverts() {
        // 2 heads of dim 4, 1 column: rows [a0 a1 b0 b1 | c0 c1 d0 d1] → [a0 b0 a1 b1 | c0 d0 c1 d1]
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let p = permute_rows(&w, 2, 1);
        assert_eq!(p, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(unpermute_rows(&p, 2, 1), w);
    }
}
