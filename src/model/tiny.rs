//! `kiln init-tiny`: small random models written as normal Hugging Face directories, for smoke
//! runs and tests; and random models of any real architecture from its config.json.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use crate::error::{KilnError, Result};
use crate::io::{write_atomic, TensorData};
use crate::rng::KilnRng;

/// The byte-level BPE tokenizer of tiny models (scripts/golden/make_tiny_tokenizer.py).
pub const TINY_TOKENIZER_JSON: &str = include_str!("tiny_tokenizer.json");

/// Llama 3's chat template, shortened to what tiny models need.
const LLAMA3_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

pub const TINY_ARCHES: &[&str] = &["llama"];

/// config.json of the tiny Llama: 4 layers, hidden 64, GQA 4/2, 512-token vocabulary.
pub fn tiny_llama_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 506,
        "eos_token_id": 507,
        "torch_dtype": "bfloat16"
    })
}

/// Random weights for `config`, scaled so that every part of the network matters: embeddings
/// N(0,1), linear weights N(0, 1/fan_in), norms 1 + N(0, 0.1²).
fn random_weights(cfg: &ModelConfig, seed: u64, dtype: DType) -> Result<Vec<(String, TensorData)>> {
    random_tensors(cfg, seed, dtype)?
        .into_iter()
        .map(|(name, t)| Ok((name, TensorData::from_tensor(&t)?)))
        .collect()
}

/// The tensors of [`random_weights`], on the CPU in `dtype`.
pub fn random_tensors(cfg: &ModelConfig, seed: u64, dtype: DType) -> Result<Vec<(String, Tensor)>> {
    let mut rng = KilnRng::fork(seed, 1);
    let mut tensors = vec![];
    let mut add = |name: String, values: Vec<f32>, shape: Vec<usize>| -> Result<()> {
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?;
        tensors.push((name, t));
        Ok(())
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    add(
        "model.embed_tokens.weight".into(),
        rng.normal(v * h, 0.0, 1.0),
        vec![v, h],
    )?;
    for i in 0..cfg.num_layers {
        for (group, name, out_f, in_f) in cfg.layer_linears() {
            let std = 1.0 / (in_f as f32).sqrt();
            add(
                format!("model.layers.{i}.{group}.{name}.weight"),
                rng.normal(out_f * in_f, 0.0, std),
                vec![out_f, in_f],
            )?;
            if cfg.biased_projections().contains(&name) {
                add(
                    format!("model.layers.{i}.{group}.{name}.bias"),
                    rng.normal(out_f, 0.0, 0.5),
                    vec![out_f],
                )?;
            }
        }
        if let Some(l) = cfg.moe_layout() {
            let (h, inter) = (cfg.hidden_size, cfg.expert_intermediate_size);
            let p = format!("model.layers.{i}.{}", l.module);
            add(
                format!("{p}.gate.weight"),
                rng.normal(cfg.num_experts * h, 0.0, 1.0 / (h as f32).sqrt()),
                vec![cfg.num_experts, h],
            )?;
            for e in 0..cfg.num_experts {
                for (w, out_f, in_f) in [(l.gate, inter, h), (l.down, h, inter), (l.up, inter, h)] {
                    add(
                        format!("{p}.experts.{e}.{w}.weight"),
                        rng.normal(out_f * in_f, 0.0, 1.0 / (in_f as f32).sqrt()),
                        vec![out_f, in_f],
                    )?;
                }
            }
        }
        if cfg.qk_norm {
            for norm in ["q_norm", "k_norm"] {
                add(
                    format!("model.layers.{i}.self_attn.{norm}.weight"),
                    rng.normal(cfg.head_dim, 1.0, 0.1),
                    vec![cfg.head_dim],
                )?;
            }
        }
        let gemma_norms: &[&str] = if cfg.sandwich_norms() {
            &["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        } else {
            &[]
        };
        for norm in ["input_layernorm", "post_attention_layernorm"]
            .iter()
            .chain(gemma_norms)
        {
            add(
                format!("model.layers.{i}.{norm}.weight"),
                rng.normal(h, 1.0, 0.1),
                vec![h],
            )?;
        }
    }
    add("model.norm.weight".into(), rng.normal(h, 1.0, 0.1), vec![h])?;
    if !cfg.tie_word_embeddings {
        add(
            "lm_head.weight".into(),
            rng.normal(v * h, 0.0, 1.0 / (h as f32).sqrt()),
            vec![v, h],
        )?;
    }
    Ok(tensors)
}

/// Writes a random model of `config` (a config.json value) into `dir`, with the tiny tokenizer
/// when `with_tiny_tokenizer` (its vocabulary must then be 512).
pub fn write_random_model(
    dir: &Path,
    config: &serde_json::Value,
    seed: u64,
    with_tiny_tokenizer: bool,
) -> Result<()> {
    let cfg_path = dir.join("config.json");
    let cfg = ModelConfig::from_json(&cfg_path, &config.to_string())?;
    let dtype = cfg.stored_dtype().unwrap_or(DType::BF16);
    std::fs::create_dir_all(dir).map_err(|e| KilnError::io(dir, e))?;
    let tensors = random_weights(&cfg, seed, dtype)?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    super::bitsandbytes::write_sharded(dir, tensors, Some(meta))?;
    write_atomic(
        &cfg_path,
        serde_json::to_string_pretty(config).unwrap().as_bytes(),
    )?;
    if with_tiny_tokenizer {
        write_atomic(&dir.join("tokenizer.json"), TINY_TOKENIZER_JSON.as_bytes())?;
        let tok_config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "pad_token": "<|pad|>",
            "model_max_length": cfg.max_position_embeddings,
            "chat_template": LLAMA3_CHAT_TEMPLATE,
        });
        write_atomic(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tok_config)
                .unwrap()
                .as_bytes(),
        )?;
    }
    Ok(())
}

/// `kiln init-tiny --arch ARCH -o DIR --seed N`.
pub fn init_tiny(arch: &str, dir: &Path, seed: u64) -> Result<()> {
    if !TINY_ARCHES.contains(&arch) {
        return Err(KilnError::Usage(format!(
            "unknown tiny architecture `{arch}`; available: {}",
            TINY_ARCHES.join(", ")
        )));
    }
    write_random_model(dir, &tiny_llama_config(), seed, true)
}

/// Where `tiny:ARCH` models are kept: `$KILN_CACHE`, else `$XDG_CACHE_HOME/kiln`, else
/// `~/.cache/kiln`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kiln");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache")
        .join("kiln")
}
