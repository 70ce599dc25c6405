//! Llama-layout architectures in GGUF (docs/formats.md C.2–C.5, C.7): `llama`,
//! `qwen2` (the same tensors, plus q/k/v biases) and `qwen3` (plus per-head q/k norms). Tensor names, the Q/K row permutation (llama
//! only: qwen2 uses NEOX RoPE, as Hugging Face does), hyperparameter keys, `rope_freqs`, and the
//! per-tensor types of llama.cpp's quantization presets.

use super::keys;
use super::{GgmlType, Value};
use crate::model::config::{ModelConfig, RopeScaling};

/// llama.cpp's architecture name for a model type kiln exports, if it exports it (the families'
/// table, `model/family.rs`).
pub fn arch_name(model_type: &str) -> Option<&'static str> {
    crate::model::family::by_model_type(model_type).map(|f| f.gguf_arch)
}

/// GGUF architectures whose blocks have Gemma 2's four norms.
fn sandwich_arch(arch: &str) -> bool {
    arch == "gemma2" || arch == "gemma3"
}

/// The layers llama.cpp's gemma3 makes local when the file does not say: all but every sixth.
pub fn gemma3_default_sliding(layers: usize) -> Vec<bool> {
    (0..layers).map(|i| !(i + 1).is_multiple_of(6)).collect()
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
    let module = match (arch, short, gemma) {
        (_, _, Some((h, _))) => h,
        ("phi3", "ffn_up", _) => "mlp.gate_up_proj",
        // Qwen3-MoE's router and experts live under `mlp`, Mixtral's under `block_sparse_moe`.
        _ => {
            LAYER_NAMES
                .iter()
                .find(|(h, g)| {
                    *g == short && !(arch == "qwen3moe" && h.starts_with("block_sparse_moe."))
                })?
                .0
        }
    };
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
}

/// Heads whose rows [`permute_rows`] interleaves for this tensor, if it is q or k of a `llama`
/// model.
pub fn permute_heads(cfg: &ModelConfig, hf: &str) -> Option<usize> {
    if arch_name(&cfg.model_type) != Some("llama") {
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
        if sliding != gemma3_default_sliding(cfg.num_layers) {
            out.push((
                k(keys::llm::ATTENTION_SLIDING_WINDOW_PATTERN),
                Value::Array(
                    super::ValueType::Bool,
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

/// What `kiln export gguf --quant` accepts: llama.cpp's file types of the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k_m")]
    Q4KM,
    #[value(name = "q6_k")]
    Q6K,
    #[value(name = "q2_k")]
    Q2K,
    /// Per-tensor types measured under a size budget (`--size`, Q4_K_M's by default).
    Auto,
}

impl Preset {
    /// Whether kiln quantizes this preset under an importance matrix (its types' weighted
    /// quantizers are in `calibrated`).
    pub fn calibrates(self) -> bool {
        matches!(
            self,
            Preset::Q4KM | Preset::Q6K | Preset::Q2K | Preset::Auto
        )
    }

    /// `general.file_type` (llama_ftype).
    pub fn file_type(self) -> u32 {
        match self {
            Preset::F32 => 0,
            Preset::F16 => 1,
            Preset::Q4_0 => 2,
            Preset::Q8_0 => 7,
            Preset::Q2K => 10,
            Preset::Q4KM => 15,
            Preset::Q6K => 18,
            Preset::Bf16 => 32,
            // LLAMA_FTYPE_GUESSED: no one type describes a mix chosen per tensor.
            Preset::Auto => 1024,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::F32 => "F32",
            Preset::F16 => "F16",
            Preset::Bf16 => "BF16",
            Preset::Q8_0 => "Q8_0",
            Preset::Q4_0 => "Q4_0",
            Preset::Q4KM => "Q4_K_M",
            Preset::Q6K => "Q6_K",
            Preset::Q2K => "Q2_K",
            Preset::Auto => "auto",
        }
    }

    fn default_type(self) -> GgmlType {
        match self {
            Preset::F32 => GgmlType::F32,
            Preset::F16 => GgmlType::F16,
            Preset::Bf16 => GgmlType::BF16,
            Preset::Q8_0 => GgmlType::Q8_0,
            Preset::Q4_0 => GgmlType::Q4_0,
            Preset::Q4KM => GgmlType::Q4_K,
            Preset::Q6K => GgmlType::Q6_K,
            Preset::Q2K => GgmlType::Q2_K,
            Preset::Auto => GgmlType::Q4_K,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Preset::F32 | Preset::F16 | Preset::Bf16)
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of layers and every third between.
fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// A 256-block type's replacement when rows are not a multiple of 256, then F16.
fn fallback(ty: GgmlType, row: u64) -> GgmlType {
    if row.is_multiple_of(ty.block_size() as u64) {
        return ty;
    }
    let alt = match ty {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if row.is_multiple_of(alt.block_size() as u64) {
        alt
    } else {
        GgmlType::F16
    }
}

/// The storage type of every tensor (GGUF names and dims, in file order), as convert_hf_to_gguf
/// (float presets) or llama-quantize (quantized presets) choose them: 1-D tensors and norms
/// F32; `output` Q6_K; `attn_v` and `ffn_down` Q6_K in the layers `use_more_bits` picks for
/// Q4_K_M; Q2_K's Q3_K/Q4_K exceptions; fallbacks for rows that blocks do not divide.
/// The per-layer counters advance in llama-quantize's order, which is not file order: its model
/// loader sorts tensors by block number, then by name (`weight_name_comparer`), so `blk.10`
/// comes after `blk.9` whatever order the file holds them in.
pub fn choose_types(
    preset: Preset,
    tensors: &[(String, Vec<u64>)],
    cfg: &ModelConfig,
) -> Vec<GgmlType> {
    // `auto` starts from Q4_K_M's choices; the export replaces the weights it measured.
    let preset = if preset == Preset::Auto {
        Preset::Q4KM
    } else {
        preset
    };
    let mut chooser = TypeChooser {
        preset,
        n_attn_v: tensors.iter().filter(|(n, _)| is_attn_v(n)).count() as i64,
        n_layer: cfg.num_layers as i64,
        n_gqa: cfg.num_heads / cfg.num_kv_heads.max(1),
        n_expert: cfg.num_experts,
        has_output: tensors.iter().any(|(n, _)| n == "output.weight"),
        i_attn_v: 0,
        i_ffn_down: 0,
    };
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| (block_of(&tensors[i].0).unwrap_or(-1), &tensors[i].0));
    let mut types = vec![GgmlType::F32; tensors.len()];
    for i in order {
        types[i] = chooser.type_of(&tensors[i].0, &tensors[i].1);
    }
    types
}

/// Whether llama-quantize quantizes this tensor (matrices; not norms or a router).
pub fn quantizable(name: &str, dims: &[u64]) -> bool {
    dims.len() >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
}

/// llama-quantize counts the fused attn_qkv as an attn_v (`category_is_attn_v`).
fn is_attn_v(name: &str) -> bool {
    name.contains("attn_v.weight") || name.contains("attn_qkv.weight")
}

/// N of a `blk.N.` tensor name.
fn block_of(name: &str) -> Option<i64> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// llama-quantize's type rules and the counters they read, fed tensors in its order.
struct TypeChooser {
    preset: Preset,
    n_attn_v: i64,
    n_layer: i64,
    n_gqa: usize,
    n_expert: usize,
    has_output: bool,
    i_attn_v: i64,
    i_ffn_down: i64,
}

impl TypeChooser {
    fn type_of(&mut self, name: &str, dims: &[u64]) -> GgmlType {
        if !quantizable(name, dims) {
            return GgmlType::F32;
        }
        let preset = self.preset;
        if preset.is_float() {
            return preset.default_type();
        }
        let mut ty = preset.default_type();
        let row = dims[0];
        let is_output =
            name == "output.weight" || (!self.has_output && name == "token_embd.weight");
        if is_output {
            ty = if !row.is_multiple_of(ty.block_size() as u64) {
                GgmlType::Q8_0
            } else if ty != GgmlType::Q8_0 {
                GgmlType::Q6_K
            } else {
                ty
            };
        } else if is_attn_v(name) {
            match preset {
                Preset::Q2K => {
                    ty = if self.n_gqa >= 4 {
                        GgmlType::Q4_K
                    } else {
                        GgmlType::Q3_K
                    }
                }
                Preset::Q4KM if use_more_bits(self.i_attn_v, self.n_attn_v) => ty = GgmlType::Q6_K,
                _ => {}
            }
            if self.n_expert == 8 {
                ty = GgmlType::Q8_0; // ~128 MB on Mixtral 8x7B, as llama-quantize does
            }
            self.i_attn_v += 1;
        } else if name.contains("attn_k.weight") && self.n_expert == 8 {
            ty = GgmlType::Q8_0;
        } else if name.contains("ffn_down") {
            // With experts, llama-quantize takes ffn_down's layer from the name, else it counts.
            let i = match block_of(name) {
                Some(l) if self.n_expert > 1 => l,
                _ => self.i_ffn_down,
            };
            match preset {
                Preset::Q2K => ty = GgmlType::Q3_K,
                Preset::Q4KM if use_more_bits(i, self.n_layer) => ty = GgmlType::Q6_K,
                _ => {}
            }
            self.i_ffn_down += 1;
        } else if name.contains("attn_output.weight") {
            match preset {
                Preset::Q2K | Preset::Q4KM if self.n_expert == 8 => ty = GgmlType::Q5_K,
                Preset::Q2K => ty = GgmlType::Q3_K,
                _ => {}
            }
        }
        fallback(ty, row)
    }
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

    #[test]
    fn use_more_bits_matches_llama_cpp_on_32_layers() {
        let picked: Vec<i64> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            picked,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }
}
