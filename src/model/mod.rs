//! Models: config.json -> architecture; weights from safetensors (quantized to NF4 on load, or
//! read as bitsandbytes 4-bit); the tokenizer beside them.

pub mod bitsandbytes;
pub mod config;
pub mod decoder;
pub mod family;
pub mod from_gguf;
pub mod gguf_arch;
pub mod loader;
pub mod peft;
pub mod source;
pub mod tiny;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use crate::tokenizer::TokenizerInfo;
pub use config::{ModelConfig, MoeLayout};
pub use decoder::{Decoder, KvCache};

use crate::error::{KilnError, Result};
use crate::lora::{LoraAdapter, LoraSettings};
use crate::ops::{Nf4Linear, Nf4Weight};
use crate::quant::Nf4Tensor;
use crate::rng::KilnRng;
use decoder::{
    Attention, DecoderLayer, Expert, FeedForward, FrozenWeight, GateUpProj, Linear, Mlp, QkvProj,
    RmsNorm, SparseMoe,
};
use loader::WeightFiles;

/// How to load a base model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of activations and dense weights.
    pub dtype: DType,
    /// Quantize the decoder's linear weights to NF4 (QLoRA). Checkpoints already in the
    /// bitsandbytes 4-bit format are used as stored either way.
    pub quantize: bool,
    /// LoRA adapters to attach, initialised from `seed`.
    pub lora: Option<LoraSettings>,
    pub seed: u64,
    /// Keep only the first N decoder layers (a draft for speculative decoding made of the
    /// model's own first layers; `model.layers`, `--draft-layers`).
    pub layers: Option<usize>,
    /// Hold NF4 weights as their dequantized values in `dtype`: the same model as NF4, at dense
    /// memory, without a dequantization at every call (inference on the CPU, where that
    /// dequantization is most of a decoding step).
    pub nf4_dequantized: bool,
}

pub struct LoadedModel {
    pub dir: PathBuf,
    pub model: Decoder,
    pub tokenizer: TokenizerInfo,
}

/// Loads only the tokenizer of model directory `dir` (config.json, when present, supplies
/// bos/eos ids the tokenizer files do not name).
pub fn load_tokenizer(dir: &Path) -> Result<TokenizerInfo> {
    if crate::gguf::is_gguf(dir) {
        return crate::tokenizer::vocab::tokenizer_from_gguf(&crate::gguf::GgufFile::open(dir)?);
    }
    if !dir.exists() {
        return Err(KilnError::model(dir, "model directory not found"));
    }
    let config_path = dir.join("config.json");
    let config = if config_path.exists() {
        Some(ModelConfig::from_file(&config_path)?)
    } else {
        None
    };
    TokenizerInfo::load(
        dir,
        config
            .as_ref()
            .map(ModelConfig::special_ids)
            .unwrap_or_default(),
    )
}

/// The configuration of a model: a Hugging Face directory's config.json, or a GGUF file's
/// metadata.
pub fn load_config(path: &Path) -> Result<ModelConfig> {
    if crate::gguf::is_gguf(path) {
        return crate::model::from_gguf::config_of(&crate::gguf::GgufFile::open(path)?);
    }
    ModelConfig::from_file(&path.join("config.json"))
}

/// Loads the model in `dir` (a Hugging Face directory) for training or evaluation.
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    if crate::gguf::is_gguf(dir) {
        return crate::model::from_gguf::load(dir, opts);
    }
    if !dir.exists() {
        return Err(KilnError::model(dir, "model directory not found"));
    }
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let tokenizer = TokenizerInfo::load(dir, config.special_ids())?;
    let ckpt = WeightFiles::open(dir)?;
    let model = build_decoder(&ckpt, config, opts)?;
    Ok(LoadedModel {
        dir: dir.to_path_buf(),
        model,
        tokenizer,
    })
}

/// A model of `dir/config.json`'s architecture with random weights (see `kiln init-tiny`),
/// made in memory: benchmarks on real shapes without a checkpoint. The directory needs only
/// config.json and a tokenizer.
pub fn load_random(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let tokenizer = TokenizerInfo::load(dir, config.special_ids())?;
    let dtype = config.stored_dtype().unwrap_or(DType::BF16);
    let tensors = tiny::random_tensors(&config, opts.seed, dtype)?;
    let ckpt = WeightFiles::from_tensors(dir, tensors.into_iter().collect());
    let model = build_decoder(&ckpt, config, opts)?;
    Ok(LoadedModel {
        dir: dir.to_path_buf(),
        model,
        tokenizer,
    })
}

/// The frozen weight of projection `name` (`model.layers.N.self_attn.q_proj.weight`), NF4 held
/// as its dequantized values if `opts.nf4_dequantized`.
fn frozen_weight(
    ckpt: &WeightFiles,
    name: &str,
    shape: [usize; 2],
    opts: &LoadOptions,
) -> Result<FrozenWeight> {
    match stored_frozen_weight(ckpt, name, shape, opts)? {
        FrozenWeight::Nf4(q) if opts.nf4_dequantized => Ok(FrozenWeight::Dense(
            q.weight().dequantize(opts.dtype, &opts.device)?,
        )),
        w => Ok(w),
    }
}

/// The frozen weight as the checkpoint and `opts.quantize` make it: NF4 or dense.
fn stored_frozen_weight(
    ckpt: &WeightFiles,
    name: &str,
    shape: [usize; 2],
    opts: &LoadOptions,
) -> Result<FrozenWeight> {
    if bitsandbytes::is_quantized(ckpt, name) {
        let q = bitsandbytes::read_linear4bit(ckpt, name)?;
        if q.shape != shape {
            return Err(KilnError::model(
                &ckpt.dir,
                format!(
                    "4-bit tensor `{name}` has shape {:?} but config.json implies {shape:?}",
                    q.shape
                ),
            ));
        }
        return Ok(FrozenWeight::Nf4(Nf4Linear::new(Nf4Weight::new(
            q,
            &opts.device,
        )?)));
    }
    if opts.quantize && opts.device.is_cuda() {
        // Quantized on the GPU: the same bytes as the CPU quantizer, much sooner.
        let w = ckpt.tensor_shaped(name, &shape, &opts.device)?;
        return Ok(FrozenWeight::Nf4(Nf4Linear::new(Nf4Weight::quantize_cuda(
            &w,
        )?)));
    }
    let w = ckpt.tensor_shaped(name, &shape, &Device::Cpu)?;
    if opts.quantize {
        let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let q = Nf4Tensor::quantize(&values, &shape, w.dtype())?;
        Ok(FrozenWeight::Nf4(Nf4Linear::new(Nf4Weight::new(
            q,
            &opts.device,
        )?)))
    } else {
        Ok(FrozenWeight::Dense(
            w.to_dtype(opts.dtype)?.to_device(&opts.device)?,
        ))
    }
}

fn dense(ckpt: &WeightFiles, name: &str, shape: &[usize], opts: &LoadOptions) -> Result<Tensor> {
    Ok(ckpt
        .tensor_shaped(name, shape, &Device::Cpu)?
        .to_dtype(opts.dtype)?
        .to_device(&opts.device)?)
}

/// The router (dense) and frozen experts of the mixture of the layer at `prefix` (Mixtral's or
/// Qwen3-MoE's names, `layout`).
fn build_moe(
    ckpt: &WeightFiles,
    config: &ModelConfig,
    layout: MoeLayout,
    prefix: &str,
    opts: &LoadOptions,
) -> Result<SparseMoe> {
    let (h, i) = (config.hidden_size, config.expert_intermediate_size);
    let p = format!("{prefix}.{}", layout.module);
    let router = dense(
        ckpt,
        &format!("{p}.gate.weight"),
        &[config.num_experts, h],
        opts,
    )?;
    let frozen = |name: String, shape: [usize; 2]| -> Result<Linear> {
        Ok(Linear::frozen(
            frozen_weight(ckpt, &name, shape, opts)?,
            None,
        ))
    };
    let experts = (0..config.num_experts)
        .map(|e| {
            let name = |w: &str| format!("{p}.experts.{e}.{w}.weight");
            Ok(Expert {
                gate: frozen(name(layout.gate), [i, h])?,
                down: frozen(name(layout.down), [h, i])?,
                up: frozen(name(layout.up), [i, h])?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SparseMoe {
        router,
        experts,
        top_k: config.experts_per_token,
        renormalize: config.norm_topk_prob,
        layout,
    })
}

pub(crate) fn build_decoder(
    ckpt: &WeightFiles,
    config: ModelConfig,
    opts: &LoadOptions,
) -> Result<Decoder> {
    if let Some(lora) = &opts.lora {
        check_lora_targets(&config, lora, &ckpt.dir)?;
    }
    let mut config = config;
    if let Some(n) = opts.layers {
        if n == 0 || n > config.num_layers {
            return Err(KilnError::model(
                &ckpt.dir,
                format!(
                    "cannot keep the first {n} decoder layers: the model has {} (choose 1 to {})",
                    config.num_layers, config.num_layers
                ),
            ));
        }
        config.num_layers = n;
    }
    let mut init_rng = KilnRng::fork(opts.seed, 0);
    let h = config.hidden_size;
    let what = if opts.quantize {
        "layers loaded (NF4)"
    } else {
        "layers loaded"
    };
    let bar = crate::progress::bar(config.num_layers, what, false);
    let layers = (0..config.num_layers)
        .map(|i| {
            let layer = build_layer(ckpt, &config, i, opts, &mut init_rng)?;
            bar.inc(1);
            Ok(std::sync::Arc::new(layer))
        })
        .collect::<Result<Vec<_>>>()?;
    bar.finish_and_clear();
    let embed_tokens = dense(
        ckpt,
        "model.embed_tokens.weight",
        &[config.vocab_size, h],
        opts,
    )?;
    let lm_head = if config.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
        None
    } else {
        Some(dense(
            ckpt,
            "lm_head.weight",
            &[config.vocab_size, h],
            opts,
        )?)
    };
    let norm = RmsNorm {
        weight: dense(ckpt, "model.norm.weight", &[h], opts)?,
        eps: config.rms_norm_eps,
        plus_one: config.is_gemma(),
    };
    let inv_freq = config.rope_inv_freq();
    let inv_freq = Tensor::from_vec(inv_freq.clone(), inv_freq.len(), &opts.device)?;
    let inv_freq_local = config
        .local_rope_inv_freq()
        .map(|f| Tensor::from_vec(f.clone(), f.len(), &opts.device))
        .transpose()?;
    let inv_freq_long = config
        .rope_long()
        .map(|(f, original, _)| {
            Ok::<_, KilnError>((
                Tensor::from_vec(f.clone(), f.len(), &opts.device)?,
                original,
            ))
        })
        .transpose()?;
    let rope_scale = config.rope_attention_factor();
    Ok(Decoder {
        config,
        embed_tokens,
        layers,
        norm,
        lm_head,
        inv_freq,
        inv_freq_local,
        inv_freq_long,
        rope_scale,
        dtype: opts.dtype,
        device: opts.device.clone(),
        recomputed_layers: 0,
        offload_saved_inputs: false,
        mlp_tile_rows: None,
        grad_sink: Default::default(),
    })
}

/// Decoder layer `i` of the checkpoint: its projections (frozen, with a new LoRA adapter where
/// the recipe targets them), norms, attention and feed-forward.
fn build_layer(
    ckpt: &WeightFiles,
    config: &ModelConfig,
    i: usize,
    opts: &LoadOptions,
    init_rng: &mut KilnRng,
) -> Result<DecoderLayer> {
    let h = config.hidden_size;
    let p = format!("model.layers.{i}");
    let mut linears = std::collections::HashMap::new();
    for (group, name, out_f, in_f) in config.layer_linears() {
        let base = frozen_weight(
            ckpt,
            &format!("{p}.{group}.{name}.weight"),
            [out_f, in_f],
            opts,
        )?;
        let bias_name = format!("{p}.{group}.{name}.bias");
        let bias = if ckpt.contains(&bias_name) {
            Some(dense(ckpt, &bias_name, &[out_f], opts)?)
        } else {
            None
        };
        let lora = match &opts.lora {
            Some(s) if s.targets(name) => {
                Some(LoraAdapter::new(in_f, out_f, s, init_rng, &opts.device)?)
            }
            _ => None,
        };
        linears.insert(
            name,
            Linear {
                lora,
                ..Linear::frozen(base, bias)
            },
        );
    }
    let mut take = |n: &str| linears.remove(n).expect("every projection is built above");
    let qkv = if config.fused_projections() {
        QkvProj::Fused {
            qkv_proj: take("qkv_proj"),
        }
    } else {
        QkvProj::Split {
            q_proj: take("q_proj"),
            k_proj: take("k_proj"),
            v_proj: take("v_proj"),
        }
    };
    let head_norm = |n: &str| -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: dense(
                ckpt,
                &format!("{p}.self_attn.{n}.weight"),
                &[config.head_dim],
                opts,
            )?,
            eps: config.rms_norm_eps,
            // Gemma 3's q/k norms multiply by (1 + w), as its other norms do.
            plus_one: config.is_gemma(),
        })
    };
    let qk_norm = match config.qk_norm {
        true => Some((head_norm("q_norm")?, head_norm("k_norm")?)),
        false => None,
    };
    let self_attn = Attention {
        qkv,
        o_proj: take("o_proj"),
        scale: config.attn_scale,
        softcap: config.attn_softcap,
        num_heads: config.num_heads,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
        qk_norm,
    };
    let mlp = if let Some(layout) = config.moe_layout() {
        FeedForward::Moe(build_moe(ckpt, config, layout, &p, opts)?)
    } else {
        let gate_up = if config.fused_projections() {
            GateUpProj::Fused {
                gate_up_proj: take("gate_up_proj"),
            }
        } else {
            GateUpProj::Split {
                gate_proj: take("gate_proj"),
                up_proj: take("up_proj"),
            }
        };
        FeedForward::Dense(Mlp {
            gate_up,
            down_proj: take("down_proj"),
            activation: config.activation,
        })
    };
    let norm = |n: &str| -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: dense(ckpt, &format!("{p}.{n}.weight"), &[h], opts)?,
            eps: config.rms_norm_eps,
            plus_one: config.is_gemma(),
        })
    };
    let gemma_norm = |n: &str| -> Result<Option<RmsNorm>> {
        config.sandwich_norms().then(|| norm(n)).transpose()
    };
    Ok(DecoderLayer {
        input_layernorm: norm("input_layernorm")?,
        self_attn,
        post_attention_layernorm: norm("post_attention_layernorm")?,
        pre_feedforward_layernorm: gemma_norm("pre_feedforward_layernorm")?,
        post_feedforward_layernorm: gemma_norm("post_feedforward_layernorm")?,
        mlp,
    })
}

/// Every LoRA target must be a projection of this architecture (all of `all-linear`'s names
/// excepted: the model keeps those it has).
fn check_lora_targets(config: &ModelConfig, lora: &LoraSettings, dir: &Path) -> Result<()> {
    let modules: Vec<&str> = config.layer_linears().iter().map(|l| l.1).collect();
    let all_linear = crate::recipe::LINEAR_MODULES
        .iter()
        .all(|m| lora.targets(m));
    if all_linear {
        return Ok(());
    }
    for t in &lora.target_modules {
        if !modules.contains(&t.as_str()) {
            let hint = if config.fused_projections() {
                " (Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`)"
            } else if t == "qkv_proj" || t == "gate_up_proj" {
                " (only Phi-3 models fuse projections)"
            } else {
                ""
            };
            return Err(KilnError::model(
                dir,
                format!(
                    "LoRA target `{t}` is not a projection of this {} model{hint}; its projections: {}",
                    config.model_type,
                    modules.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// LoRA parameters PEFT would count for `config` (without building the model).
pub fn lora_param_count(config: &ModelConfig, lora: &LoraSettings) -> usize {
    config
        .layer_linears()
        .iter()
        .filter(|(_, name, _, _)| lora.targets(name))
        .map(|(_, _, out_f, in_f)| lora.r * (in_f + out_f))
        .sum::<usize>()
        * config.num_layers
}

/// PEFT's `print_trainable_parameters` line.
pub fn trainable_params_line(trainable: usize, all: usize) -> String {
    format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        thousands(trainable),
        thousands(all),
        100.0 * trainable as f64 / all as f64
    )
}

pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
