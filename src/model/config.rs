//! `config.json` of a Hugging Face Llama-family checkpoint, in both the transformers 4 layout
//! (`rope_theta` + `rope_scaling`) and the transformers 5 layout (`rope_parameters`).

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;

use crate::error::{KilnError, Result};

/// The fields kiln reads; everything else in config.json is ignored.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    use_sliding_window: Option<bool>,
    sliding_window: Option<usize>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    layer_types: Option<Vec<String>>,
    /// Gemma 3 (transformers 4 layout): the RoPE base of local layers, and every N-th layer
    /// global.
    rope_local_base_freq: Option<f64>,
    sliding_window_pattern: Option<usize>,
    /// SmolLM3: which layers rotate (1) and which do not (0), or the interval of those that do not.
    no_rope_layers: Option<Vec<u8>>,
    no_rope_layer_interval: Option<usize>,
    num_local_experts: Option<usize>,
    /// Qwen3-MoE's name for the expert count (transformers 5 saves `num_local_experts`).
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.1+ frequency-dependent scaling (`rope_type = "llama3"`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Position interpolation (`rope_type = "linear"`).
    Linear {
        factor: f64,
    },
    /// Each frequency divided by its own factor (GGUF's `rope_freqs.weight`, which llama.cpp
    /// computes from the `llama3` parameters at conversion).
    Factors(Vec<f32>),
    /// LongRoPE (`rope_type = "longrope"`; Phi-3.5, Phi-4-mini, Phi-3-*-128k): each frequency
    /// divided by its short factor while a sequence fits `original_max_position_embeddings`,
    /// by its long factor beyond, and cos/sin scaled by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The leading dims of each head that RoPE rotates (`head_dim` × `partial_rotary_factor`).
    pub rotary_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint says it is stored in, if it says.
    pub torch_dtype: Option<String>,
    /// Mistral's and Phi-3's sliding-window attention: token i sees token j only when
    /// `i - j < window`.
    pub sliding_window: Option<usize>,
    /// Phi-3's pre-extension context (GGUF `phi3.rope.scaling.original_context_length`).
    pub original_max_position_embeddings: Option<usize>,
    /// The MLP's activation.
    pub activation: Activation,
    /// Attention scores are `q·k · attn_scale` (1/√head_dim; Gemma 2: 1/√query_pre_attn_scalar).
    pub attn_scale: f64,
    /// Gemma 2's soft caps: `cap · tanh(x / cap)` on attention scores and on the final logits.
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// Which layers use the sliding window, when config.json lists `layer_types` (or Gemma 3's
    /// `sliding_window_pattern`).
    pub sliding_layers: Option<Vec<bool>>,
    /// Gemma 3: the RoPE base of the local (sliding) layers, which use no scaling.
    pub local_rope_theta: Option<f64>,
    /// Which layers rotate, where some do not (SmolLM3's NoPE layers); `None`: all do.
    pub rope_layers: Option<Vec<bool>>,
    /// Mixtral and Qwen3-MoE: experts per layer (0: a dense MLP), experts each token is routed
    /// to, each expert's intermediate size, and whether the picked experts' probabilities are
    /// renormalized to sum to 1 (Mixtral always; Qwen3-MoE by `norm_topk_prob`).
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub expert_intermediate_size: usize,
    pub norm_topk_prob: bool,
    /// Qwen 3: each query and key head is RMS-normalized (`self_attn.q_norm` / `k_norm`,
    /// weights of head_dim) before RoPE.
    pub qk_norm: bool,
}

/// The MLP's activation: SiLU (Llama and most) or GELU with the tanh approximation (Gemma 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
}

/// Where a layer's mixture of experts lives in a Hugging Face checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeLayout {
    /// The module under the layer: `block_sparse_moe` (Mixtral) or `mlp` (Qwen3-MoE); its router
    /// is `{module}.gate` and expert e's projections `{module}.experts.{e}.{name}`.
    pub module: &'static str,
    /// Each expert's gate, down and up projections' names.
    pub gate: &'static str,
    pub down: &'static str,
    pub up: &'static str,
}

impl MoeLayout {
    /// Mixtral's: `block_sparse_moe.experts.{e}.w1/w2/w3`.
    pub const MIXTRAL: MoeLayout = MoeLayout {
        module: "block_sparse_moe",
        gate: "w1",
        down: "w2",
        up: "w3",
    };

    /// Qwen3-MoE's: `mlp.experts.{e}.gate_proj/down_proj/up_proj`.
    pub const QWEN3_MOE: MoeLayout = MoeLayout {
        module: "mlp",
        gate: "gate_proj",
        down: "down_proj",
        up: "up_proj",
    };
}

fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

/// `rope_parameters` of a transformers 5 config that gives each layer type its own (Gemma 3:
/// `full_attention`, `sliding_attention`).
fn per_layer_type_rope(raw: &RawConfig) -> Option<&serde_json::Value> {
    raw.rope_parameters
        .as_ref()
        .filter(|p| p.get("full_attention").is_some())
}

/// How many leading dims of each head rotate (`int(head_dim * partial_rotary_factor)`, as
/// transformers takes them), the RoPE base and its scaling; each checked against the head.
fn parse_rotary(
    path: &Path,
    raw: &RawConfig,
    head_dim: usize,
) -> Result<(usize, f64, RopeScaling)> {
    let partial = raw.partial_rotary_factor.or_else(|| {
        raw.rope_parameters
            .as_ref()?
            .get("partial_rotary_factor")?
            .as_f64()
    });
    let partial = partial.unwrap_or(1.0);
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(KilnError::model(
            path,
            format!("partial_rotary_factor = {partial} must be in (0, 1]"),
        ));
    }
    let (rope_theta, rope_scaling) = parse_rope(path, raw)?;
    // transformers: `int(head_dim * partial_rotary_factor)` leading dims of each head rotate.
    let rotary_dim = (head_dim as f64 * partial) as usize;
    if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
        return Err(KilnError::model(
            path,
            format!("partial_rotary_factor {partial} of head_dim {head_dim} rotates {rotary_dim} dims; it must be an even number"),
        ));
    }
    if let RopeScaling::LongRope {
        short_factor,
        long_factor,
        ..
    } = &rope_scaling
    {
        if short_factor.len() != rotary_dim / 2 || long_factor.len() != rotary_dim / 2 {
            return Err(KilnError::model(
                path,
                format!(
                    "longrope short_factor and long_factor need {} values each (half the {rotary_dim} rotated dims), found {} and {}",
                    rotary_dim / 2,
                    short_factor.len(),
                    long_factor.len()
                ),
            ));
        }
    }
    Ok((rotary_dim, rope_theta, rope_scaling))
}

/// The RoPE base and scaling of the (global) layers.
fn parse_rope(path: &Path, raw: &RawConfig) -> Result<(f64, RopeScaling)> {
    // transformers 5 folds rope_theta into rope_parameters (per layer type for Gemma 3);
    // transformers 4 keeps them apart.
    let params = match per_layer_type_rope(raw) {
        Some(p) => p.get("full_attention"),
        None => raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref()),
    };
    let theta = raw
        .rope_theta
        .or_else(|| {
            params
                .and_then(|p| p.get("rope_theta"))
                .and_then(|t| t.as_f64())
        })
        .unwrap_or(10000.0);
    let Some(p) = params.filter(|p| !p.is_null()) else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        p.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
            KilnError::model(
                path,
                format!("rope scaling of type `{kind}` needs a number `{key}`"),
            )
        })
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        },
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        // Phi-3's config class renames the old `su` to `longrope`.
        "longrope" | "su" => {
            let factors = |key: &str| -> Result<Vec<f64>> {
                p.get(key)
                    .and_then(|v| v.as_array())
                    .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| {
                        KilnError::model(path, format!("longrope scaling needs a list of numbers `{key}`"))
                    })
            };
            let original = p
                .get("original_max_position_embeddings")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .or(raw.original_max_position_embeddings)
                .ok_or_else(|| {
                    KilnError::model(path, "longrope scaling needs original_max_position_embeddings")
                })?;
            // As transformers: the factor defaults to the ratio of the two lengths, and the
            // attention factor to sqrt(1 + ln(factor) / ln(original)).
            let factor = p
                .get("factor")
                .and_then(|v| v.as_f64())
                .unwrap_or(raw.max_position_embeddings as f64 / original as f64);
            let attention_factor = p
                .get("attention_factor")
                .and_then(|v| v.as_f64())
                .unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (original as f64).ln()).sqrt()
                });
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            return Err(KilnError::model(
                path,
                format!(
                "rope scaling type `{other}` is not supported; supported: default, llama3, linear, longrope"
            ),
            ))
        }
    };
    Ok((theta, scaling))
}

/// Qwen3-MoE places experts in every `decoder_sparse_step`-th layer except `mlp_only_layers`;
/// kiln runs the layout every released Qwen3-MoE uses (step 1, no dense layers) and names the
/// key of any other.
fn check_every_layer_sparse(path: &Path, raw: &RawConfig) -> Result<()> {
    if let Some(step) = raw.decoder_sparse_step.filter(|&s| s != 1) {
        return Err(KilnError::model(
            path,
            format!("decoder_sparse_step = {step}: kiln runs Qwen3-MoE with experts in every layer (decoder_sparse_step = 1)"),
        ));
    }
    if let Some(dense) = raw.mlp_only_layers.as_ref().filter(|l| !l.is_empty()) {
        return Err(KilnError::model(
            path,
            format!("mlp_only_layers = {dense:?}: kiln runs Qwen3-MoE with experts in every layer (mlp_only_layers = [])"),
        ));
    }
    Ok(())
}

/// SmolLM3's `no_rope_layers` (1: the layer rotates, 0: it does not), or every
/// `no_rope_layer_interval`-th layer without rotation when the list is absent.
fn rope_layers(
    path: &Path,
    raw: &RawConfig,
    family: &super::family::Family,
) -> Result<Option<Vec<bool>>> {
    let Some(every) = family.no_rope_every else {
        return Ok(None);
    };
    let layers = raw.num_hidden_layers;
    let rotates: Vec<bool> = match &raw.no_rope_layers {
        Some(list) if list.len() != layers => {
            return Err(KilnError::model(
                path,
                format!(
                    "no_rope_layers has {} entries for {layers} layers; it needs one per layer (1: the layer rotates, 0: it does not)",
                    list.len()
                ),
            ))
        }
        Some(list) => list.iter().map(|&r| r != 0).collect(),
        None => {
            let n = raw.no_rope_layer_interval.unwrap_or(every).max(1);
            (0..layers).map(|i| !(i + 1).is_multiple_of(n)).collect()
        }
    };
    Ok(Some(rotates))
}

impl ModelConfig {
    /// The bos/eos ids this config names, for a tokenizer whose files name none.
    pub fn special_ids(&self) -> crate::tokenizer::ConfigIds {
        crate::tokenizer::ConfigIds {
            bos: self.bos_token_id,
            eos: self.eos_token_ids.first().copied(),
        }
    }
    /// The checkpoint layout of this model's experts (None for a dense model).
    pub fn moe_layout(&self) -> Option<MoeLayout> {
        match (self.num_experts, self.family().experts) {
            (0, _) => None,
            (_, Some(e)) => Some(e.layout),
            (_, None) => Some(MoeLayout::MIXTRAL),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KilnError::model(
                path,
                "config.json not found: a model directory needs the config.json, *.safetensors and tokenizer.json of a Hugging Face checkpoint",
            ),
            _ => KilnError::io(path, e),
        })?;
        Self::from_json(path, &text)
    }

    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| KilnError::model(path, format!("not a valid model config: {e}")))?;
        let model_type = raw.model_type.clone().unwrap_or_else(|| "llama".into());
        let family = super::family::by_model_type(&model_type).ok_or_else(|| {
            KilnError::model(
                path,
                format!(
                    "model_type `{model_type}` is not supported yet; supported: {}",
                    super::family::model_types().join(", ")
                ),
            )
        })?;
        if raw.use_sliding_window == Some(true) {
            return Err(KilnError::model(
                path,
                "use_sliding_window = true: sliding-window attention is not supported yet; set it to false to train with full attention (Qwen 2.5 ships it false)",
            ));
        }
        // Gemma 2 names its MLP activation `hidden_activation`; `hidden_act` is the legacy key.
        let act_name = raw
            .hidden_activation
            .as_deref()
            .or(raw.hidden_act.as_deref())
            .unwrap_or("silu");
        let activation = match act_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            other => {
                return Err(KilnError::model(
                    path,
                    format!("activation `{other}` is not supported; kiln runs `silu` and `gelu_pytorch_tanh`"),
                ))
            }
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads == 0
            || num_kv_heads == 0
            || !raw.num_attention_heads.is_multiple_of(num_kv_heads)
        {
            return Err(KilnError::model(
                path,
                format!(
                    "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({num_kv_heads})",
                    raw.num_attention_heads
                ),
            ));
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return Err(KilnError::model(
                path,
                format!("head_dim {head_dim} must be even for rotary embeddings"),
            ));
        }
        let (rotary_dim, rope_theta, rope_scaling) = parse_rotary(path, &raw, head_dim)?;
        if family.experts.is_some_and(|e| e.layout.module == "mlp") {
            check_every_layer_sparse(path, &raw)?;
        }
        // Gemma 3's local layers rotate with their own base and no scaling.
        let local_rope_theta = family.local_rope.then(|| {
            per_layer_type_rope(&raw)
                .and_then(|p| p.get("sliding_attention")?.get("rope_theta")?.as_f64())
                .or(raw.rope_local_base_freq)
                .unwrap_or(10000.0)
        });
        let sliding_layers = match (&raw.layer_types, raw.sliding_window_pattern) {
            (Some(t), _) => Some(t.iter().map(|l| l == "sliding_attention").collect()),
            // transformers 4's Gemma 3: every `pattern`-th layer is global.
            (None, Some(pattern)) if family.global_every.is_some() && pattern > 0 => Some(
                (0..raw.num_hidden_layers)
                    .map(|i| !(i + 1).is_multiple_of(pattern))
                    .collect(),
            ),
            _ => None,
        };
        let rope_layers = rope_layers(path, &raw, family)?;
        Ok(Self {
            model_type,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(family.tied_by_default),
            attention_bias: raw.attention_bias || family.qkv_bias,
            mlp_bias: raw.mlp_bias,
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            torch_dtype: raw.dtype.or(raw.torch_dtype),
            original_max_position_embeddings: raw.original_max_position_embeddings,
            activation,
            attn_scale: 1.0 / raw.query_pre_attn_scalar.unwrap_or(head_dim as f64).sqrt(),
            attn_softcap: raw.attn_logit_softcapping,
            final_softcap: raw.final_logit_softcapping,
            qk_norm: family.qk_norm,
            num_experts: family.experts.map_or(0, |e| {
                raw.num_experts
                    .or(raw.num_local_experts)
                    .unwrap_or(e.experts)
            }),
            experts_per_token: raw
                .num_experts_per_tok
                .unwrap_or(family.experts.map_or(2, |e| e.per_token)),
            expert_intermediate_size: match family.experts.and_then(|e| e.width) {
                Some(width) => raw.moe_intermediate_size.unwrap_or(width),
                None => raw.intermediate_size,
            },
            norm_topk_prob: match family.experts.and_then(|e| e.renormalize) {
                Some(default) => raw.norm_topk_prob.unwrap_or(default),
                None => true,
            },
            sliding_layers,
            local_rope_theta,
            sliding_window: raw.sliding_window.filter(|_| family.sliding_window),
            rope_layers,
        })
    }

    /// Inverse frequencies of the rotary embedding, `[rotary_dim / 2]`, with the scaling applied
    /// as transformers' `_compute_llama3_parameters` does (LongRoPE: the short factors).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let base = self.rope_base_inv_freq();
        let scaled: Vec<f64> = match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::LongRope { short_factor, .. } => {
                return self.longrope_inv_freq(short_factor)
            }
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Factors(factors) => base
                .iter()
                .zip(factors)
                .map(|(f, &s)| f / s as f64)
                .collect(),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }

    /// `1 / theta^(2i / rotary_dim)`, before any scaling.
    fn rope_base_inv_freq(&self) -> Vec<f64> {
        let d = self.rotary_dim;
        (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect()
    }

    /// LongRoPE: the inverse frequencies for sequences longer than the original context (long
    /// factors), that length, and the factor cos and sin are scaled by.
    pub fn rope_long(&self) -> Option<(Vec<f32>, usize, f64)> {
        let RopeScaling::LongRope {
            long_factor,
            original_max_position_embeddings,
            attention_factor,
            ..
        } = &self.rope_scaling
        else {
            return None;
        };
        Some((
            self.longrope_inv_freq(long_factor),
            *original_max_position_embeddings,
            *attention_factor,
        ))
    }

    /// `1 / (factor · theta^(2i / rotary_dim))` in f32 as transformers computes it: the power
    /// rounded once to f32, then the product and the reciprocal in f32.
    fn longrope_inv_freq(&self, factors: &[f64]) -> Vec<f32> {
        let d = self.rotary_dim;
        factors
            .iter()
            .enumerate()
            .map(|(i, &e)| {
                let exponent = (2 * i) as f32 / d as f32;
                let power = self.rope_theta.powf(exponent as f64) as f32;
                1.0f32 / (e as f32 * power)
            })
            .collect()
    }

    /// The factor RoPE's cos and sin are multiplied by (LongRoPE's attention factor; else 1).
    pub fn rope_attention_factor(&self) -> f64 {
        match &self.rope_scaling {
            RopeScaling::LongRope {
                attention_factor, ..
            } => *attention_factor,
            _ => 1.0,
        }
    }

    /// Gemma, Gemma 2 and Gemma 3: RMSNorm multiplies by (1 + w); embeddings are scaled by
    /// √hidden.
    pub fn is_gemma(&self) -> bool {
        self.family().gemma_norms
    }

    /// The family of `model_type` (Llama's for a type no family names).
    pub fn family(&self) -> &'static super::family::Family {
        super::family::by_model_type(&self.model_type).unwrap_or(&super::family::FAMILIES[0])
    }

    /// Gemma 2 and 3: each block has four norms (a sandwich around attention and the MLP).
    pub fn sandwich_norms(&self) -> bool {
        self.family().sandwich_norms
    }

    /// Whether layer `i` applies the rotary embedding.
    pub fn rotates(&self, i: usize) -> bool {
        self.rope_layers
            .as_ref()
            .is_none_or(|l| l.get(i).copied().unwrap_or(true))
    }

    /// Whether layer `i` is a local (sliding-window) layer, whatever the sequence length.
    pub fn is_sliding_layer(&self, i: usize) -> bool {
        match &self.sliding_layers {
            Some(layers) => layers.get(i).copied().unwrap_or(false),
            None => self
                .family()
                .global_every
                .is_none_or(|n| !(i + 1).is_multiple_of(n)),
        }
    }

    /// Inverse frequencies of Gemma 3's local layers (their own base, no scaling).
    pub fn local_rope_inv_freq(&self) -> Option<Vec<f32>> {
        let theta = self.local_rope_theta?;
        let d = self.head_dim;
        Some(
            (0..d / 2)
                .map(|i| (1.0 / theta.powf((2 * i) as f64 / d as f64)) as f32)
                .collect(),
        )
    }

    /// The attention window of layer `i`: every layer for Mistral and Phi-3, the even ones
    /// (local attention) for Gemma 2.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.is_sliding_layer(i))
    }

    /// Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`.
    pub fn fused_projections(&self) -> bool {
        self.family().fused_projections
    }

    /// Shapes `[out, in]` of the linear projections of one decoder layer, by module name.
    pub fn layer_linears(&self) -> Vec<(&'static str, &'static str, usize, usize)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        if self.num_experts > 0 {
            // The experts and router are built apart (frozen, never LoRA targets here).
            return vec![
                ("self_attn", "q_proj", q, h),
                ("self_attn", "k_proj", kv, h),
                ("self_attn", "v_proj", kv, h),
                ("self_attn", "o_proj", h, q),
            ];
        }
        if self.fused_projections() {
            return vec![
                ("self_attn", "qkv_proj", q + 2 * kv, h),
                ("self_attn", "o_proj", h, q),
                ("mlp", "gate_up_proj", 2 * i, h),
                ("mlp", "down_proj", h, i),
            ];
        }
        vec![
            ("self_attn", "q_proj", q, h),
            ("self_attn", "k_proj", kv, h),
            ("self_attn", "v_proj", kv, h),
            ("self_attn", "o_proj", h, q),
            ("mlp", "gate_proj", i, h),
            ("mlp", "up_proj", i, h),
            ("mlp", "down_proj", h, i),
        ]
    }

    /// Parameters of the full model (embeddings, layers, norms, lm_head unless tied).
    /// The projections of a layer that have a bias.
    pub fn biased_projections(&self) -> &'static [&'static str] {
        match (self.attention_bias, self.family().qkv_bias) {
            (false, _) => &[],
            (true, true) => &["q_proj", "k_proj", "v_proj"],
            (true, false) => &["q_proj", "k_proj", "v_proj", "o_proj"],
        }
    }

    pub fn num_params(&self) -> usize {
        let per_layer: usize = self
            .layer_linears()
            .iter()
            .map(|(_, _, o, i)| o * i)
            .sum::<usize>()
            + if self.sandwich_norms() { 4 } else { 2 } * self.hidden_size
            + if self.qk_norm { 2 * self.head_dim } else { 0 }
            + self.num_experts
                * (3 * self.hidden_size * self.expert_intermediate_size + self.hidden_size)
            + self
                .layer_linears()
                .iter()
                .filter(|(_, name, _, _)| self.biased_projections().contains(name))
                .map(|(_, _, out_f, _)| out_f)
                .sum::<usize>();
        let embed = self.vocab_size * self.hidden_size;
        embed
            + self.num_layers * per_layer
            + self.hidden_size
            + if self.tie_word_embeddings { 0 } else { embed }
    }
}

/// torch's name of a dtype (`bfloat16`, `float16`, `float32`), as config.json and bitsandbytes
/// write it.
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// The dtype of a torch dtype name (with or without `torch.`).
pub fn dtype_from_torch_name(name: &str) -> Option<DType> {
    match name.trim_start_matches("torch.") {
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

impl ModelConfig {
    /// The dtype config.json says the weights are stored in.
    pub fn stored_dtype(&self) -> Option<DType> {
        self.torch_dtype.as_deref().and_then(dtype_from_torch_name)
    }
}
