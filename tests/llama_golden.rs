//! The Llama forward pass against transformers' logits (tests/fixtures/llama_logits.safetensors,
//! made by scripts/golden/make_llama_golden.py), and the real configs of shared/data/configs.

mod common;

use common::max_abs_diff;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use kiln::lora::LoraSettings;
use kiln::model::{self, LoadOptions, ModelConfig};

fn load(dir: &str, quantize: bool, lora: Option<LoraSettings>) -> model::LoadedModel {
    let opts = LoadOptions {
        layers: None,
        nf4_dequantized: false,
        device: Device::Cpu,
        dtype: DType::F32,
        quantize,
        lora,
        seed: 0,
    };
    model::load(Path::new(dir), &opts).unwrap()
}

/// Decoding the first row of `ids` with the KV cache (a `prefix`-token prompt, then one token at
/// a time) gives the full pass's logits `want` at every step.
fn check_cached_decoding(
    model: &model::Decoder,
    ids: &Tensor,
    want: &Tensor,
    prefix: usize,
    tol: f32,
) {
    let row = ids.narrow(0, 0, 1).unwrap();
    let mut cache = kiln::model::KvCache::new(model.layers.len());
    let mut step = model
        .forward_cached(&row.narrow(1, 0, prefix).unwrap(), &mut cache)
        .unwrap();
    for pos in prefix..ids.dim(1).unwrap() {
        let at = want
            .get(0)
            .unwrap()
            .get(pos - 1)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let d = max_abs_diff(&step, &at);
        assert!(d < tol, "cached step at {pos}: max |Δlogit| = {d}");
        step = model
            .forward_cached(&row.narrow(1, pos, 1).unwrap(), &mut cache)
            .unwrap();
    }
}

/// `base` with the PEFT adapter in `adapter`, dense f32 on the CPU.
fn with_adapter(base: &str, adapter: &str) -> model::LoadedModel {
    kiln::infer::load(
        base,
        Some(Path::new(adapter)),
        &kiln::infer::InferenceOptions {
            device: "cpu".into(),
            dtype: Some(DType::F32),
            quantize: Some(false),
            ..Default::default()
        },
    )
    .unwrap()
}

fn golden() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load("tests/fixtures/llama_logits.safetensors", &Device::Cpu).unwrap()
}

#[test]
fn logits_match_transformers_f32_llama3_rope_gqa() {
    let g = golden();
    let m = load("tests/fixtures/llama_tiny_a", false, None);
    assert!(matches!(
        m.model.config.rope_scaling,
        model::config::RopeScaling::Llama3 { .. }
    ));
    let ids = g["a.input_ids"].to_dtype(DType::U32).unwrap();
    let logits = m.model.forward(&ids).unwrap();
    let want = &g["a.logits"];
    let scale = common::max_abs(want);
    let diff = max_abs_diff(&logits, want);
    assert!(scale > 1.0, "logits too flat to test anything: {scale}");
    assert!(diff < 1e-4, "max |Δlogit| = {diff} (logits up to {scale})");
}

#[test]
fn logits_match_transformers_bf16_sharded_tied_head_dim() {
    let g = golden();
    let m = load("tests/fixtures/llama_tiny_b", false, None);
    assert!(
        m.model.lm_head.is_none(),
        "tied embeddings use embed_tokens as the head"
    );
    assert_eq!(m.model.config.head_dim, 24);
    let ids = g["b.input_ids"].to_dtype(DType::U32).unwrap();
    let diff = max_abs_diff(&m.model.forward(&ids).unwrap(), &g["b.logits"]);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
}

#[test]
fn nf4_model_computes_with_exactly_the_dequantized_weights() {
    // Loading with quantize=true must equal a dense model whose projections hold deq(W).
    let g = golden();
    let src = Path::new("tests/fixtures/llama_tiny_a");
    let ckpt = kiln::model::loader::WeightFiles::open(src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = vec![];
    for name in ckpt.names() {
        let t = ckpt.tensor(&name, &Device::Cpu).unwrap();
        let t = if kiln::model::bitsandbytes::is_layer_linear(&name, t.dims()) {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = kiln::quant::Nf4Tensor::quantize(&v, t.dims(), t.dtype()).unwrap();
            Tensor::from_vec(q.dequantize(), t.dims(), &Device::Cpu).unwrap()
        } else {
            t
        };
        tensors.push((name, kiln::io::TensorData::from_tensor(&t).unwrap()));
    }
    kiln::io::write_safetensors(&dir.path().join("model.safetensors"), &tensors, None).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let dense_deq = load(dir.path().to_str().unwrap(), false, None);
    let nf4 = load("tests/fixtures/llama_tiny_a", true, None);
    let ids = g["a.input_ids"].to_dtype(DType::U32).unwrap();
    let (a, b) = (
        dense_deq.model.forward(&ids).unwrap(),
        nf4.model.forward(&ids).unwrap(),
    );
    let diff = max_abs_diff(&a, &b);
    assert!(
        diff < 1e-4,
        "NF4 forward vs dense forward on deq(W): {diff}"
    );
    // And quantization did change the function (the test would pass trivially otherwise).
    let original = load("tests/fixtures/llama_tiny_a", false, None)
        .model
        .forward(&ids)
        .unwrap();
    assert!(max_abs_diff(&original, &b) > 1e-2);
}

fn q_k_v_o(r: usize) -> LoraSettings {
    LoraSettings {
        r,
        alpha: 2.0 * r as f64,
        dropout: 0.0,
        use_rslora: false,
        target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
            .map(String::from)
            .to_vec(),
    }
}

#[test]
fn real_configs_parse_with_the_right_shapes_and_peft_counts() {
    let cfg = |name: &str| {
        ModelConfig::from_file(Path::new(&format!("tests/fixtures/configs/{name}.json"))).unwrap()
    };
    let l1 = cfg("Llama-3.2-1B");
    assert_eq!(
        (
            l1.hidden_size,
            l1.num_layers,
            l1.num_heads,
            l1.num_kv_heads,
            l1.head_dim
        ),
        (2048, 16, 32, 8, 64)
    );
    assert!(l1.tie_word_embeddings);
    assert!(
        matches!(l1.rope_scaling, model::config::RopeScaling::Llama3 { factor, .. } if factor == 32.0)
    );
    assert_eq!(l1.rope_theta, 500000.0);
    assert_eq!(model::lora_param_count(&l1, &q_k_v_o(16)), 3_407_872);
    // PEFT: all params of Llama-3.2-1B with the adapter = 1,235,814,400 + 3,407,872.
    assert_eq!(l1.num_params(), 1_235_814_400);

    let l8 = cfg("Llama-3.1-8B");
    assert_eq!(
        (
            l8.hidden_size,
            l8.num_layers,
            l8.head_dim,
            l8.intermediate_size
        ),
        (4096, 32, 128, 14336)
    );
    assert!(!l8.tie_word_embeddings);
    assert_eq!(model::lora_param_count(&l8, &q_k_v_o(16)), 13_631_488);
    assert_eq!(l8.num_params(), 8_030_261_248);

    let l3 = cfg("Llama-3.2-3B");
    assert_eq!((l3.head_dim, l3.num_layers), (128, 28));
    for smol in ["SmolLM2-135M-Instruct", "SmolLM2-360M-Instruct"] {
        let c = cfg(smol);
        assert!(
            c.tie_word_embeddings && c.rope_scaling == model::config::RopeScaling::None,
            "{smol}"
        );
    }
    assert_eq!(cfg("SmolLM2-135M-Instruct").num_params(), 134_515_008);
}

#[test]
fn llama3_rope_scaling_matches_transformers_inv_freq() {
    // transformers' _compute_llama3_parameters for Llama-3.2-1B, first/last and a smoothed one.
    let c = ModelConfig::from_file(Path::new("tests/fixtures/configs/Llama-3.2-1B.json")).unwrap();
    let f = c.rope_inv_freq();
    assert_eq!(f.len(), 32);
    assert!((f[0] - 1.0).abs() < 1e-7);
    // Low frequencies are divided by the factor (32): base 500000^(-62/64) / 32.
    let last = 500000f64.powf(-62.0 / 64.0) / 32.0;
    assert!(
        ((f[31] as f64) - last).abs() / last < 1e-5,
        "{} vs {last}",
        f[31]
    );
}

#[test]
fn smollm2_builds_from_its_real_config_and_runs() {
    // A random model of a real architecture, built, quantized to NF4, with LoRA, and run.
    let dir = tempfile::tempdir().unwrap();
    let mut json = kiln::io::read_json(Path::new(
        "tests/fixtures/configs/SmolLM2-135M-Instruct.json",
    ))
    .unwrap();
    json["num_hidden_layers"] = 2.into(); // same shapes per layer, fewer layers for CI time
    kiln::model::tiny::write_random_model(dir.path(), &json, 1, false).unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        kiln::model::tiny::TINY_TOKENIZER_JSON,
    )
    .unwrap();
    let m = load(dir.path().to_str().unwrap(), true, Some(q_k_v_o(16)));
    let layer = &m.model.layers[0];
    assert_eq!(
        layer.linear("self_attn.q_proj").unwrap().shape(),
        (576, 576)
    );
    assert_eq!(
        layer.linear("self_attn.k_proj").unwrap().shape(),
        (192, 576)
    );
    assert_eq!(layer.linear("mlp.down_proj").unwrap().shape(), (576, 1536));
    let (trainable, _) = m.model.param_counts();
    assert_eq!(
        trainable,
        model::lora_param_count(&m.model.config, &q_k_v_o(16))
    );
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    assert_eq!(m.model.forward(&ids).unwrap().dims(), &[1, 5, 49152]);
}

/// Qwen 2 against transformers' Qwen2ForCausalLM (tests/fixtures/qwen2_logits.safetensors, made
/// by scripts/golden/make_qwen2_golden.py): q/k/v biases, tied embeddings, rope_theta 1e6.
#[test]
fn qwen2_logits_match_transformers_and_its_biases_matter() {
    let g = candle_core::safetensors::load("tests/fixtures/qwen2_logits.safetensors", &Device::Cpu)
        .unwrap();
    let m = load("tests/fixtures/qwen2_tiny", false, None);
    assert_eq!(m.model.config.model_type, "qwen2");
    let layer = &m.model.layers[0];
    let bias = |p: &str| layer.linear(p).unwrap().bias.is_some();
    assert!(bias("self_attn.q_proj") && bias("self_attn.v_proj"));
    assert!(!bias("self_attn.o_proj"), "Qwen 2 has no o_proj bias");
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = m.model.forward(&ids).unwrap();
    let diff = max_abs_diff(&logits, &g["logits"]);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    // Without the biases the logits move far beyond that tolerance.
    let mut unbiased = load("tests/fixtures/qwen2_tiny", false, None);
    for l in &mut unbiased.model.layers {
        if let kiln::model::decoder::QkvProj::Split {
            q_proj,
            k_proj,
            v_proj,
        } = &mut std::sync::Arc::get_mut(l)
            .expect("unshared layer")
            .self_attn
            .qkv
        {
            q_proj.bias = None;
            k_proj.bias = None;
            v_proj.bias = None;
        }
    }
    let off = max_abs_diff(&unbiased.model.forward(&ids).unwrap(), &g["logits"]);
    assert!(off > 0.1, "biases do not matter? {off}");
}

#[test]
fn qwen2_5_config_parses_and_counts_as_peft_does() {
    let q = ModelConfig::from_file(Path::new(
        "tests/fixtures/configs/Qwen2.5-0.5B-Instruct.json",
    ))
    .unwrap();
    assert_eq!(
        (
            q.hidden_size,
            q.num_layers,
            q.num_heads,
            q.num_kv_heads,
            q.head_dim
        ),
        (896, 24, 14, 2, 64)
    );
    assert!(q.tie_word_embeddings && q.attention_bias);
    assert_eq!(q.rope_theta, 1_000_000.0);
    // transformers: 494,032,768 parameters; PEFT r=16 on q/k/v/o: 2,162,688 trainable.
    assert_eq!(q.num_params(), 494_032_768);
    assert_eq!(model::lora_param_count(&q, &q_k_v_o(16)), 2_162_688);
}

/// A PEFT-written Qwen 2 adapter on the Qwen 2 base gives PEFT's logits.
#[test]
fn qwen2_with_a_peft_adapter_matches_peft() {
    let g = candle_core::safetensors::load("tests/fixtures/qwen2_logits.safetensors", &Device::Cpu)
        .unwrap();
    let loaded = with_adapter(
        "tests/fixtures/qwen2_tiny",
        "tests/fixtures/peft_adapter_qwen2",
    );
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = loaded.model.forward(&ids).unwrap();
    let diff = max_abs_diff(&logits, &g["adapter.logits"]);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    assert!(
        max_abs_diff(&logits, &g["logits"]) > 0.1,
        "the adapter changes nothing?"
    );
}

/// Mistral with a sliding window of 8 tokens against transformers' MistralForCausalLM on 40
/// tokens (tests/fixtures/mistral_logits.safetensors, scripts/golden/make_mistral_golden.py); the
/// window matters at this length (full attention gives other logits), and KV-cache decoding
/// past the window equals the full forward pass.
#[test]
fn mistral_sliding_window_matches_transformers_with_and_without_cache() {
    let g =
        candle_core::safetensors::load("tests/fixtures/mistral_logits.safetensors", &Device::Cpu)
            .unwrap();
    let m = load("tests/fixtures/mistral_tiny", false, None);
    assert_eq!(m.model.config.sliding_window, Some(8));
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = m.model.forward(&ids).unwrap();
    let diff = max_abs_diff(&logits, &g["logits"]);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    assert!(max_abs_diff(&logits, &g["full_logits"]) > 1e-2);

    check_cached_decoding(&m.model, &ids, &g["logits"], 5, 1e-4);
}

/// Phi-3 (fused qkv_proj and gate_up_proj, sliding window 16 on 40 tokens) against transformers'
/// Phi3ForCausalLM, and with a PEFT adapter on the fused qkv_proj and o_proj against PEFT
/// (tests/fixtures/phi3_logits.safetensors, scripts/golden/make_phi3_golden.py).
#[test]
fn phi3_fused_projections_match_transformers_and_peft() {
    let g = candle_core::safetensors::load("tests/fixtures/phi3_logits.safetensors", &Device::Cpu)
        .unwrap();
    let m = load("tests/fixtures/phi3_tiny", false, None);
    assert!(m.model.layers[0].linear("self_attn.qkv_proj").is_some());
    assert!(m.model.layers[0].linear("mlp.gate_up_proj").is_some());
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let diff = max_abs_diff(&m.model.forward(&ids).unwrap(), &g["logits"]);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");

    let adapted = with_adapter(
        "tests/fixtures/phi3_tiny",
        "tests/fixtures/peft_adapter_phi3",
    );
    let logits = adapted.model.forward(&ids).unwrap();
    let diff = max_abs_diff(&logits, &g["adapter.logits"]);
    assert!(diff < 1e-4, "with the adapter: max |Δlogit| = {diff}");
    assert!(max_abs_diff(&logits, &g["logits"]) > 0.1);
}

/// Phi-4-mini's and Phi-3.5's RoPE against transformers' Phi3ForCausalLM
/// (tests/fixtures/phi4mini_logits.safetensors, scripts/golden/make_phi4mini_golden.py): 12 of each
/// head's 16 dims rotate (partial_rotary_factor 0.75), LongRoPE with an original context of 32:
/// short factors for 24 tokens, long factors for 40, cos/sin scaled by sqrt(1 + ln 4 / ln 32);
/// KV-cache decoding from a 24-token prompt to 40 tokens (the cache keeps the keys rotated with
/// the short factors, as transformers' does); tied embeddings; a PEFT adapter on qkv_proj and
/// o_proj.
#[test]
fn phi4mini_partial_rotary_and_longrope_match_transformers() {
    let g =
        candle_core::safetensors::load("tests/fixtures/phi4mini_logits.safetensors", &Device::Cpu)
            .unwrap();
    let m = load("tests/fixtures/phi4mini_tiny", false, None);
    let c = &m.model.config;
    assert_eq!((c.head_dim, c.rotary_dim), (16, 12));
    let want_scale = (1.0 + 4f64.ln() / 32f64.ln()).sqrt();
    assert!((c.rope_attention_factor() - want_scale).abs() < 1e-12);
    assert!(c.tie_word_embeddings && m.model.lm_head.is_none());
    let short = g["short.input_ids"].to_dtype(DType::U32).unwrap();
    let d = max_abs_diff(&m.model.forward(&short).unwrap(), &g["short.logits"]);
    assert!(d < 1e-4, "24 tokens (short factors): max |Δlogit| = {d}");
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = m.model.forward(&ids).unwrap();
    let d = max_abs_diff(&logits, &g["logits"]);
    assert!(d < 1e-4, "40 tokens (long factors): max |Δlogit| = {d}");
    // The two regimes differ: the first 24 positions of the long pass are not the short pass's.
    assert!(max_abs_diff(&logits.narrow(1, 0, 24).unwrap(), &g["short.logits"]) > 1e-2);

    // Cached decoding, both rows: 24 prompt tokens, then one at a time.
    let mut cache = kiln::model::KvCache::new(m.model.layers.len());
    m.model.forward_cached(&short, &mut cache).unwrap();
    for (i, pos) in (24..40).enumerate() {
        let step = m
            .model
            .forward_cached(&ids.narrow(1, pos, 1).unwrap(), &mut cache)
            .unwrap();
        let want = g["cached.logits"]
            .narrow(1, i, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let d = max_abs_diff(&step, &want);
        assert!(d < 1e-4, "cached step at {pos}: max |Δlogit| = {d}");
    }

    let adapted = with_adapter(
        "tests/fixtures/phi4mini_tiny",
        "tests/fixtures/peft_adapter_phi4mini",
    );
    let with = adapted.model.forward(&ids).unwrap();
    let d = max_abs_diff(&with, &g["adapter.logits"]);
    assert!(d < 1e-4, "with the adapter: max |Δlogit| = {d}");
    assert!(max_abs_diff(&with, &g["logits"]) > 0.1);
}

/// Phi-3-mini-4k-instruct's architecture (hidden 3072, 32 layers, 32 heads, vocabulary 32064):
/// LoRA r=8 on qkv_proj and o_proj counts 4,718,592 trainable parameters, as PEFT does.
#[test]
fn phi3_mini_lora_count_equals_peft() {
    let cfg = ModelConfig::from_json(
        Path::new("phi3-mini.json"),
        r#"{"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "sliding_window": 2047, "hidden_act": "silu"}"#,
    )
    .unwrap();
    let lora = LoraSettings {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: vec!["qkv_proj".into(), "o_proj".into()],
    };
    assert_eq!(model::lora_param_count(&cfg, &lora), 4_718_592);
    assert_eq!(cfg.sliding_window, Some(2047));
    // Phi-4 (shared/data/configs/phi-4) is a phi3 model too: fused projections, GQA 40/10.
    let phi4 = ModelConfig::from_file(Path::new("tests/fixtures/configs/phi-4.json")).unwrap();
    assert!(phi4.fused_projections());
    assert_eq!(
        (phi4.num_heads, phi4.num_kv_heads, phi4.head_dim),
        (40, 10, 128)
    );
}

/// Gemma 2 against transformers' Gemma2ForCausalLM (eager attention) and PEFT
/// (tests/fixtures/gemma2_logits.safetensors, scripts/golden/make_gemma2_golden.py): (1 + w) norms, the
/// four-norm sandwich, scaled embeddings, GELU, query_pre_attn_scalar, soft caps that bite, and
/// alternating local/global layers on 40 tokens; KV-cache decoding equals the full pass.
#[test]
fn gemma2_matches_transformers_and_peft() {
    let g =
        candle_core::safetensors::load("tests/fixtures/gemma2_logits.safetensors", &Device::Cpu)
            .unwrap();
    let m = load("tests/fixtures/gemma2_tiny", false, None);
    let c = &m.model.config;
    assert_eq!((c.layer_window(0), c.layer_window(1)), (Some(8), None));
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = m.model.forward(&ids).unwrap();
    let diff = max_abs_diff(&logits, &g["logits"]);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    assert!(common::max_abs(&logits) <= 8.0, "final soft cap");
    // Each Gemma specific moves the logits: without the attention cap, without the final cap.
    let mut uncapped = load("tests/fixtures/gemma2_tiny", false, None);
    for l in &mut uncapped.model.layers {
        std::sync::Arc::get_mut(l)
            .expect("unshared layer")
            .self_attn
            .softcap = None;
    }
    assert!(max_abs_diff(&uncapped.model.forward(&ids).unwrap(), &logits) > 1e-2);
    uncapped.model.config.final_softcap = None;
    assert!(common::max_abs(&uncapped.model.forward(&ids).unwrap()) > 8.0);

    check_cached_decoding(&m.model, &ids, &g["logits"], 3, 1e-4);

    let adapted = with_adapter(
        "tests/fixtures/gemma2_tiny",
        "tests/fixtures/peft_adapter_gemma2",
    );
    let diff = max_abs_diff(&adapted.model.forward(&ids).unwrap(), &g["adapter.logits"]);
    assert!(diff < 1e-4, "with the adapter: max |Δlogit| = {diff}");
}

/// Mixtral's sparse mixture (4 experts, top-2) against transformers' MixtralForCausalLM, and
/// with a PEFT adapter on the attention against PEFT (tests/fixtures/mixtral_logits.safetensors,
/// scripts/golden/make_mixtral_golden.py); experts quantized to NF4 stay close to dense.
#[test]
fn mixtral_matches_transformers_and_peft() {
    let g =
        candle_core::safetensors::load("tests/fixtures/mixtral_logits.safetensors", &Device::Cpu)
            .unwrap();
    let m = load("tests/fixtures/mixtral_tiny", false, None);
    assert_eq!(
        (m.model.config.num_experts, m.model.config.experts_per_token),
        (4, 2)
    );
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = m.model.forward(&ids).unwrap();
    let diff = max_abs_diff(&logits, &g["logits"]);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");

    let adapted = with_adapter(
        "tests/fixtures/mixtral_tiny",
        "tests/fixtures/peft_adapter_mixtral",
    );
    let diff = max_abs_diff(&adapted.model.forward(&ids).unwrap(), &g["adapter.logits"]);
    assert!(diff < 1e-4, "with the adapter: max |Δlogit| = {diff}");

    // QLoRA: attention and experts in NF4 (frozen), the router dense; 4 experts × 3
    // projections + 4 attention projections per layer. (On a random tiny model NF4 noise flips
    // routing choices, so only the structure and finiteness are checked here.)
    let q = load("tests/fixtures/mixtral_tiny", true, None);
    assert_eq!(q.model.layers[0].linears().len(), 16);
    assert!(q.model.layers[0]
        .linears()
        .iter()
        .all(|(_, l)| matches!(l.base, kiln::model::decoder::FrozenWeight::Nf4(_))));
    let ql = q
        .model
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(ql.iter().all(|v| v.is_finite()));
}

/// Real Gemma 2 and Mistral configs (shared/data/configs): parameter totals and PEFT's LoRA
/// counts as transformers 5.17 + PEFT 0.21 report them (r=16).
#[test]
fn gemma2_and_mistral_configs_count_as_transformers_and_peft() {
    let cfg = |name: &str| {
        ModelConfig::from_file(Path::new(&format!("tests/fixtures/configs/{name}.json"))).unwrap()
    };
    let all7 = |r| LoraSettings {
        target_modules: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        ..q_k_v_o(r)
    };
    let g2 = cfg("gemma-2-2b-it");
    assert_eq!(g2.num_params(), 2_614_341_888);
    assert_eq!(model::lora_param_count(&g2, &q_k_v_o(16)), 6_389_760);
    assert_eq!((g2.layer_window(0), g2.layer_window(1)), (Some(4096), None));
    let g9 = cfg("gemma-2-9b");
    assert_eq!(g9.num_params(), 9_241_705_984);
    assert_eq!(model::lora_param_count(&g9, &all7(16)), 54_018_048);
    let m7 = cfg("Mistral-7B-v0.3");
    assert_eq!(m7.num_params(), 7_248_023_552);
    assert_eq!(model::lora_param_count(&m7, &q_k_v_o(16)), 13_631_488);
    // Mistral Nemo 12B: head_dim 128 with hidden 5120 and 32 heads (q is 4096 wide), no window.
    let nemo = cfg("Mistral-Nemo-Base-2407");
    assert_eq!(
        (
            nemo.hidden_size,
            nemo.num_heads,
            nemo.num_kv_heads,
            nemo.head_dim
        ),
        (5120, 32, 8, 128)
    );
    assert_eq!((nemo.sliding_window, nemo.rope_theta), (None, 1_000_000.0));
    assert_eq!(nemo.num_params(), 12_247_782_400);
    // PEFT, r=16 on q/k/v/o: 40 × 16 × ((5120 + 4096) × 2 + (5120 + 1024) × 2).
    assert_eq!(model::lora_param_count(&nemo, &q_k_v_o(16)), 19_660_800);
}

/// Qwen 3 against transformers' Qwen3ForCausalLM and PEFT (tests/fixtures/qwen3_logits.safetensors,
/// made by scripts/golden/make_qwen3_golden.py): per-head q/k norms before RoPE, head_dim 24 with a
/// hidden size of 64 and 4 heads, GQA 4/2; the norms matter; KV-cache decoding equals the full
/// pass.
#[test]
fn qwen3_matches_transformers_and_peft() {
    let g = candle_core::safetensors::load("tests/fixtures/qwen3_logits.safetensors", &Device::Cpu)
        .unwrap();
    let m = load("tests/fixtures/qwen3_tiny", false, None);
    assert_eq!(m.model.config.model_type, "qwen3");
    assert!(m.model.config.qk_norm && m.model.config.head_dim == 24);
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = m.model.forward(&ids).unwrap();
    let diff = max_abs_diff(&logits, &g["logits"]);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    // Without the q/k norms the logits move far beyond that tolerance.
    let mut unnormed = load("tests/fixtures/qwen3_tiny", false, None);
    for l in &mut unnormed.model.layers {
        std::sync::Arc::get_mut(l)
            .expect("unshared layer")
            .self_attn
            .qk_norm = None;
    }
    let off = max_abs_diff(&unnormed.model.forward(&ids).unwrap(), &g["logits"]);
    assert!(off > 0.1, "q/k norms do not matter? {off}");

    check_cached_decoding(&m.model, &ids, &g["logits"], 3, 1e-4);

    let adapted = with_adapter(
        "tests/fixtures/qwen3_tiny",
        "tests/fixtures/peft_adapter_qwen3",
    );
    let diff = max_abs_diff(&adapted.model.forward(&ids).unwrap(), &g["adapter.logits"]);
    assert!(diff < 1e-4, "with the adapter: max |Δlogit| = {diff}");
}

/// The real Qwen3 configs (shared/data, written from the published config.json) parse with
/// their shapes and count the parameters transformers counts (8,190,735,360 and 596,049,920).
#[test]
fn qwen3_configs_parse_and_count_as_transformers_does() {
    let big = ModelConfig::from_file(Path::new("tests/fixtures/configs/Qwen3-8B.json")).unwrap();
    assert_eq!(
        (
            big.hidden_size,
            big.num_layers,
            big.num_heads,
            big.num_kv_heads,
            big.head_dim
        ),
        (4096, 36, 32, 8, 128)
    );
    assert!(big.qk_norm && !big.attention_bias && !big.tie_word_embeddings);
    assert_eq!(big.num_params(), 8_190_735_360);
    let small =
        ModelConfig::from_file(Path::new("tests/fixtures/configs/Qwen3-0.6B.json")).unwrap();
    assert_eq!(
        (small.hidden_size, small.num_heads, small.head_dim),
        (1024, 16, 128)
    );
    assert!(small.tie_word_embeddings);
    assert_eq!(small.num_params(), 596_049_920);
}

/// Gemma (1) against transformers' GemmaForCausalLM and PEFT (tests/fixtures/gemma_logits.safetensors,
/// made by scripts/golden/make_gemma_golden.py): (1 + w) norms, two a block; embeddings scaled by
/// √hidden; GELU (tanh); head_dim 32 with hidden 64 and 4 heads; one key/value head (MQA);
/// KV-cache decoding equals the full pass.
#[test]
fn gemma_matches_transformers_and_peft() {
    let g = candle_core::safetensors::load("tests/fixtures/gemma_logits.safetensors", &Device::Cpu)
        .unwrap();
    let m = load("tests/fixtures/gemma_tiny", false, None);
    let c = &m.model.config;
    assert!(c.is_gemma() && !c.sandwich_norms() && c.tie_word_embeddings);
    assert_eq!((c.num_kv_heads, c.head_dim), (1, 32));
    assert!(m.model.layers[0].pre_feedforward_layernorm.is_none());
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = m.model.forward(&ids).unwrap();
    let diff = max_abs_diff(&logits, &g["logits"]);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    check_cached_decoding(&m.model, &ids, &g["logits"], 3, 1e-4);
    let adapted = with_adapter(
        "tests/fixtures/gemma_tiny",
        "tests/fixtures/peft_adapter_gemma",
    );
    let diff = max_abs_diff(&adapted.model.forward(&ids).unwrap(), &g["adapter.logits"]);
    assert!(diff < 1e-4, "with the adapter: max |Δlogit| = {diff}");
}

/// The real Gemma 2B and 7B configs (shared/data) parse with their shapes and count the
/// parameters transformers counts (2,506,172,416 and 8,537,680,896).
#[test]
fn gemma_configs_parse_and_count_as_transformers_does() {
    let two = ModelConfig::from_file(Path::new("tests/fixtures/configs/gemma-2b.json")).unwrap();
    assert_eq!(
        (
            two.hidden_size,
            two.num_layers,
            two.num_heads,
            two.num_kv_heads,
            two.head_dim
        ),
        (2048, 18, 8, 1, 256)
    );
    assert!(two.tie_word_embeddings && two.is_gemma() && !two.sandwich_norms());
    assert_eq!(two.num_params(), 2_506_172_416);
    let seven = ModelConfig::from_file(Path::new("tests/fixtures/configs/gemma-7b.json")).unwrap();
    assert_eq!(
        (seven.num_heads, seven.num_kv_heads, seven.head_dim),
        (16, 16, 256)
    );
    assert_eq!(seven.num_params(), 8_537_680_896);
}

/// Gemma 3 (text) against transformers' Gemma3ForCausalLM and PEFT
/// (tests/fixtures/gemma3_logits.safetensors, scripts/golden/make_gemma3_golden.py): (1 + w) norms,
/// four a block, and (1 + w) q/k norms; query_pre_attn_scalar; local layers (window 8 on 40
/// tokens) with their own RoPE base and global ones with linear scaling, from `layer_types`;
/// each specific moves the logits; KV-cache decoding equals the full pass.
#[test]
fn gemma3_matches_transformers_and_peft() {
    let g =
        candle_core::safetensors::load("tests/fixtures/gemma3_logits.safetensors", &Device::Cpu)
            .unwrap();
    let m = load("tests/fixtures/gemma3_tiny", false, None);
    let c = &m.model.config;
    assert!(c.is_gemma() && c.sandwich_norms() && c.qk_norm);
    assert_eq!(c.local_rope_theta, Some(10000.0));
    let windows: Vec<_> = (0..5).map(|i| c.layer_window(i)).collect();
    assert_eq!(windows, [Some(8), Some(8), None, Some(8), None]);
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = m.model.forward(&ids).unwrap();
    let diff = max_abs_diff(&logits, &g["logits"]);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    // The local layers' own RoPE base matters: with the global tables everywhere the logits move.
    let mut one_rope = load("tests/fixtures/gemma3_tiny", false, None);
    one_rope.model.inv_freq_local = None;
    let off = max_abs_diff(&one_rope.model.forward(&ids).unwrap(), &logits);
    assert!(off > 1e-2, "local RoPE base does not matter? {off}");

    check_cached_decoding(&m.model, &ids, &g["logits"], 3, 1e-4);

    let adapted = with_adapter(
        "tests/fixtures/gemma3_tiny",
        "tests/fixtures/peft_adapter_gemma3",
    );
    let diff = max_abs_diff(&adapted.model.forward(&ids).unwrap(), &g["adapter.logits"]);
    assert!(diff < 1e-4, "with the adapter: max |Δlogit| = {diff}");
}

/// The real Gemma 3 1B config (transformers 4 layout: `sliding_window_pattern`,
/// `rope_local_base_freq`) parses with five local layers to each global one and counts the
/// parameters transformers counts (999,885,952).
#[test]
fn gemma3_config_parses_and_counts_as_transformers_does() {
    let c = ModelConfig::from_file(Path::new("tests/fixtures/configs/gemma-3-1b-it.json")).unwrap();
    assert_eq!(
        (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
        (26, 4, 1, 256)
    );
    assert_eq!(
        (c.local_rope_theta, c.rope_theta),
        (Some(10000.0), 1_000_000.0)
    );
    let global: Vec<usize> = (0..c.num_layers)
        .filter(|&i| !c.is_sliding_layer(i))
        .collect();
    assert_eq!(global, [5, 11, 17, 23]);
    assert_eq!(c.layer_window(0), Some(512));
    assert!(c.tie_word_embeddings && c.final_softcap.is_none());
    assert_eq!(c.num_params(), 999_885_952);
}

/// Qwen3-MoE (8 experts, top-3, `norm_topk_prob`, experts narrower than the dense
/// intermediate size, per-head q/k norms) against transformers' Qwen3MoeForCausalLM, with a
/// PEFT adapter on the attention against PEFT, and the same weights routed without
/// renormalizing the picked probabilities (tests/fixtures/qwen3moe_logits.safetensors,
/// scripts/golden/make_qwen3moe_golden.py).
#[test]
fn qwen3moe_matches_transformers_and_peft() {
    let g =
        candle_core::safetensors::load("tests/fixtures/qwen3moe_logits.safetensors", &Device::Cpu)
            .unwrap();
    let m = load("tests/fixtures/qwen3moe_tiny", false, None);
    let c = &m.model.config;
    assert_eq!(
        (
            c.num_experts,
            c.experts_per_token,
            c.expert_intermediate_size,
            c.norm_topk_prob,
            c.qk_norm
        ),
        (8, 3, 40, true, true)
    );
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let diff = max_abs_diff(&m.model.forward(&ids).unwrap(), &g["logits"]);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    check_cached_decoding(&m.model, &ids, &g["logits"], 3, 1e-4);

    let adapted = with_adapter(
        "tests/fixtures/qwen3moe_tiny",
        "tests/fixtures/peft_adapter_qwen3moe",
    );
    let diff = max_abs_diff(&adapted.model.forward(&ids).unwrap(), &g["adapter.logits"]);
    assert!(diff < 1e-4, "with the adapter: max |Δlogit| = {diff}");

    // norm_topk_prob = false: the picked probabilities weigh the experts as they are.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(
            Path::new("tests/fixtures/qwen3moe_tiny").join(f),
            tmp.path().join(f),
        )
        .unwrap();
    }
    let config = std::fs::read_to_string("tests/fixtures/qwen3moe_tiny/config.json").unwrap();
    let config = config.replace("\"norm_topk_prob\": true", "\"norm_topk_prob\": false");
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    let u = load(tmp.path().to_str().unwrap(), false, None);
    assert!(!u.model.config.norm_topk_prob);
    let diff = max_abs_diff(&u.model.forward(&ids).unwrap(), &g["unnormalized.logits"]);
    assert!(diff < 1e-4, "norm_topk_prob = false: max |Δlogit| = {diff}");
    let renormalized = max_abs_diff(&m.model.forward(&ids).unwrap(), &g["unnormalized.logits"]);
    assert!(renormalized > 1e-2, "the two routings should differ");

    // QLoRA: attention and experts in NF4, the router dense: 8 experts × 3 + 4 per layer.
    let q = load("tests/fixtures/qwen3moe_tiny", true, None);
    assert_eq!(q.model.layers[0].linears().len(), 28);
    assert!(q.model.layers[0]
        .linears()
        .iter()
        .any(|(n, _)| n == "mlp.experts.7.up_proj"));
}

/// The real Qwen3-30B-A3B config (shared/data): 128 experts of 768, top-8, every layer sparse;
/// it counts the parameters transformers counts (30,532,122,624) and PEFT's 13,369,344 for r=16
/// on q/k/v/o.
#[test]
fn qwen3moe_config_parses_and_counts_as_transformers_does() {
    let c = ModelConfig::from_file(Path::new("tests/fixtures/configs/Qwen3-30B-A3B.json")).unwrap();
    assert_eq!(
        (
            c.num_layers,
            c.num_experts,
            c.experts_per_token,
            c.expert_intermediate_size,
            c.head_dim
        ),
        (48, 128, 8, 768, 128)
    );
    assert!(c.norm_topk_prob && c.qk_norm && !c.tie_word_embeddings);
    assert_eq!(c.num_params(), 30_532_122_624);
    assert_eq!(model::lora_param_count(&c, &q_k_v_o(16)), 13_369_344);
    // A layout with dense layers is refused by the key that asks for it.
    let text = std::fs::read_to_string("tests/fixtures/configs/Qwen3-30B-A3B.json")
        .unwrap()
        .replace("\"mlp_only_layers\": []", "\"mlp_only_layers\": [0, 47]");
    let err = ModelConfig::from_json(Path::new("config.json"), &text)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mlp_only_layers"), "{err}");
}

/// SmolLM3 against transformers' SmolLM3ForCausalLM and PEFT (tests/fixtures/smollm3_logits.safetensors,
/// made by scripts/golden/make_smollm3_golden.py): Llama with no rotation on every fourth layer
/// (config.json's `no_rope_layers`), eight layers so two of them are NoPE; the NoPE layers matter;
/// KV-cache decoding equals the full pass.
#[test]
fn smollm3_nope_layers_match_transformers_and_peft() {
    let g =
        candle_core::safetensors::load("tests/fixtures/smollm3_logits.safetensors", &Device::Cpu)
            .unwrap();
    let m = load("tests/fixtures/smollm3_tiny", false, None);
    let rotates: Vec<bool> = (0..8).map(|i| m.model.config.rotates(i)).collect();
    assert_eq!(rotates, [true, true, true, false, true, true, true, false]);
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    // Tied N(0, 1) embeddings make logits up to 46: f32 agreement is relative to that.
    let scale = g["logits"]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let tol = 1e-5 * scale;
    let diff = max_abs_diff(&m.model.forward(&ids).unwrap(), &g["logits"]);
    assert!(diff < tol, "max |Δlogit| = {diff} (tolerance {tol})");
    // Rotating every layer moves the logits far beyond that tolerance.
    let mut all_rotate = load("tests/fixtures/smollm3_tiny", false, None);
    all_rotate.model.config.rope_layers = None;
    let off = max_abs_diff(&all_rotate.model.forward(&ids).unwrap(), &g["logits"]);
    assert!(off > 1.0, "NoPE layers do not matter? {off}");

    check_cached_decoding(&m.model, &ids, &g["logits"], 3, tol);

    let adapted = with_adapter(
        "tests/fixtures/smollm3_tiny",
        "tests/fixtures/peft_adapter_smollm3",
    );
    let diff = max_abs_diff(&adapted.model.forward(&ids).unwrap(), &g["adapter.logits"]);
    assert!(diff < tol, "with the adapter: max |Δlogit| = {diff}");
}
