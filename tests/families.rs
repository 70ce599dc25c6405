//! Each model family through the whole pipeline on a tiny model: train (NF4 + LoRA), merge,
//! export GGUF, and read the GGUF back with the merged model's loss.

use std::path::Path;

use serde_json::Value as Json;

/// Trains `model` for a few steps, merges, exports an F32 GGUF and checks each stage; returns
/// what `kiln export gguf` printed.
fn train_merge_export(model: &str, tmp: &Path, gguf_equals_merged: bool) -> String {
    let (first_loss, merged) = train_and_merge(model, tmp);
    let gguf = tmp.join("gguf/model.gguf");
    let o = common::kiln(&[
        "export",
        "gguf",
        "--model",
        merged.to_str().unwrap(),
        "-o",
        gguf.to_str().unwrap(),
        "--quant",
        "f32",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (m, g) = (eval_loss(&merged), eval_loss(&gguf));
    if gguf_equals_merged {
        assert!((m - g).abs() < 1e-5 * m, "{model}: merged {m} vs GGUF {g}");
    }
    assert!(
        m < first_loss,
        "{model}: the merged model lost the training: {m}"
    );
    common::stderr(&o)
}

/// Trains `model` for a few steps (the loss must fall by a fifth) and merges the adapter into
/// `tmp/merged` (f32); returns the first step's loss and the merged directory.
fn train_and_merge(model: &str, tmp: &Path) -> (f64, std::path::PathBuf) {
    let targets = if model.contains("phi3") || model.contains("phi4") {
        r#"["qkv_proj", "o_proj"]"#
    } else {
        r#"["q_proj", "k_proj", "v_proj", "o_proj"]"#
    };
    let run = tmp.join("run");
    let recipe = tmp.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = \"{model}\"\nquantize = \"nf4\"\ndevice = \"cpu\"\n[data]\npath = \"tests/fixtures/data/eval_text.jsonl\"\n[lora]\nr = 8\nlora_alpha = 16\ntarget_modules = {targets}\n[training]\nmax_steps = 12\nlearning_rate = 1e-2\n[output]\ndir = \"{}\"\n",
            run.display()
        ),
    )
    .unwrap();
    kiln_stdout(&["train", recipe.to_str().unwrap(), "-q"]);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok()?["loss"].as_f64())
        .collect();
    // A fifth of the first loss (of at most 10 nats: random Gemma fixtures start far higher).
    assert!(
        losses.last().unwrap() < &(losses[0] - 0.2 * losses[0].min(10.0)),
        "{model}: loss did not go down: {losses:?}"
    );
    let adapter = run.join("adapter");
    let merged = tmp.join("merged");
    kiln_stdout(&[
        "merge",
        "--model",
        model,
        "--adapter",
        adapter.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    (losses[0], merged)
}

#[test]
fn qwen2_trains_merges_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    train_merge_export("tests/fixtures/qwen2_tiny", tmp.path(), true);
    let f = kiln::gguf::GgufFile::open(&tmp.path().join("gguf/model.gguf")).unwrap();
    assert_eq!(f.require_str("general.architecture").unwrap(), "qwen2");
    assert!(f.tensor("blk.0.attn_q.bias").is_some());
    assert!(f.tensor("blk.0.attn_output.bias").is_none());
}

/// Qwen 3: the per-head q/k norms survive merge and GGUF export (`attn_q_norm`/`attn_k_norm`,
/// architecture `qwen3`), and the GGUF read back computes the merged model's loss.
#[test]
fn qwen3_trains_merges_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    train_merge_export("tests/fixtures/qwen3_tiny", tmp.path(), true);
    let f = kiln::gguf::GgufFile::open(&tmp.path().join("gguf/model.gguf")).unwrap();
    assert_eq!(f.require_str("general.architecture").unwrap(), "qwen3");
    let norm = f.tensor("blk.2.attn_k_norm.weight").unwrap();
    assert_eq!(norm.info.dims, [24]);
    assert!(f.tensor("blk.0.attn_q.bias").is_none());
}

#[test]
fn llama_trains_merges_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    train_merge_export("tests/fixtures/llama_tiny_a", tmp.path(), true);
}

/// SmolLM3 (Llama with no rotation on every fourth layer): trains, merges, and exports as
/// llama.cpp's `smollm3` with q/k permuted as `llama`'s, read back with the same NoPE layers and
/// equal to the merged model. A pattern llama.cpp cannot run is refused.
#[test]
fn smollm3_trains_merges_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    train_merge_export("tests/fixtures/smollm3_tiny", tmp.path(), true);
    let path = tmp.path().join("gguf/model.gguf");
    let f = kiln::gguf::GgufFile::open(&path).unwrap();
    assert_eq!(f.require_str("general.architecture").unwrap(), "smollm3");
    let cfg = kiln::model::from_gguf::config_of(&f).unwrap();
    assert_eq!(cfg.model_type, "smollm3");
    assert!(!cfg.rotates(3) && !cfg.rotates(7) && cfg.rotates(4));

    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(tmp.path().join("merged").join(file), odd.join(file)).unwrap();
    }
    let config = std::fs::read_to_string(tmp.path().join("merged/config.json")).unwrap();
    let mut config: Json = serde_json::from_str(&config).unwrap();
    config["no_rope_layers"] = serde_json::json!([1, 1, 0, 1, 1, 1, 0, 1]);
    std::fs::write(odd.join("config.json"), config.to_string()).unwrap();
    let o = common::kiln(&[
        "export",
        "gguf",
        "--model",
        odd.to_str().unwrap(),
        "-o",
        tmp.path().join("odd.gguf").to_str().unwrap(),
        "--quant",
        "f32",
    ]);
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("no_rope_layers"),
        "{}",
        common::stderr(&o)
    );
}

/// Mixtral: LoRA on the attention trains through the sparse mixture (top-2 of 4 experts, NF4),
/// merges (router and experts written back), and exports as llama.cpp's `llama` with stacked
/// experts, read back equal to the merged model.
#[test]
fn mixtral_trains_merges_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    train_merge_export("tests/fixtures/mixtral_tiny", tmp.path(), true);
    let f = kiln::gguf::GgufFile::open(&tmp.path().join("gguf/model.gguf")).unwrap();
    assert_eq!(f.require_u64("llama.expert_count").unwrap(), 4);
    let exps = f.tensor("blk.0.ffn_gate_exps.weight").unwrap();
    assert_eq!(exps.info.dims, [64, 96, 4]);
}

/// Qwen3-MoE: LoRA on the attention trains through the mixture (top-3 of 8 experts, NF4),
/// merges, and exports as llama.cpp's `qwen3moe` with stacked experts and their width, read back
/// equal to the merged model.
#[test]
fn qwen3moe_trains_merges_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    train_merge_export("tests/fixtures/qwen3moe_tiny", tmp.path(), true);
    let f = kiln::gguf::GgufFile::open(&tmp.path().join("gguf/model.gguf")).unwrap();
    assert_eq!(f.require_u64("qwen3moe.expert_count").unwrap(), 8);
    assert_eq!(
        f.require_u64("qwen3moe.expert_feed_forward_length")
            .unwrap(),
        40
    );
    let exps = f.tensor("blk.0.ffn_down_exps.weight").unwrap();
    assert_eq!(exps.info.dims, [40, 64, 8]);
}

/// Gemma 2 (local/global layers, soft caps, (1 + w) norms stored +1 in the GGUF); llama.cpp's
/// gemma2 has all of it, so the GGUF read back equals the merged model.
#[test]
fn gemma2_trains_merges_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let said = train_merge_export("tests/fixtures/gemma2_tiny", tmp.path(), false);
    // The fixture's query_pre_attn_scalar (24) differs from head_dim (16), which the export
    // reports: llama.cpp would scale by 1/√16, and kiln reads the file back as llama.cpp does.
    assert!(
        said.contains("query_pre_attn_scalar differs from head_dim 16"),
        "{said}"
    );
    let f = kiln::gguf::GgufFile::open(&tmp.path().join("gguf/model.gguf")).unwrap();
    assert_eq!(f.require_str("general.architecture").unwrap(), "gemma2");
    assert!(f.tensor("blk.0.post_ffw_norm.weight").is_some());
    assert!(f.tensor("output.weight").is_none());
}

/// Gemma (1): (1 + w) norms stored +1 in GGUF architecture `gemma`, tied output, one
/// key/value head; the GGUF read back computes the merged model's loss.
#[test]
fn gemma_trains_merges_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    train_merge_export("tests/fixtures/gemma_tiny", tmp.path(), true);
    let f = kiln::gguf::GgufFile::open(&tmp.path().join("gguf/model.gguf")).unwrap();
    assert_eq!(f.require_str("general.architecture").unwrap(), "gemma");
    assert!(f.tensor("blk.0.post_ffw_norm.weight").is_none());
    assert!(f.tensor("output.weight").is_none());
    assert_eq!(f.require_u64("gemma.attention.head_count_kv").unwrap(), 1);
}

/// Gemma 3 (text): trains, merges (q/k norms written back) and exports as llama.cpp's `gemma3`
/// with the fixture's own local/global pattern ([local, local, global, local, global], not
/// llama.cpp's every-sixth default) and local RoPE base in the file. Its query_pre_attn_scalar
/// (24) differs from head_dim (16), which the export reports, so the GGUF read back (as llama.cpp
/// runs it) differs from the merged model.
#[test]
fn gemma3_trains_merges_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let said = train_merge_export("tests/fixtures/gemma3_tiny", tmp.path(), false);
    assert!(
        said.contains("query_pre_attn_scalar differs from head_dim 16"),
        "{said}"
    );
    let f = kiln::gguf::GgufFile::open(&tmp.path().join("gguf/model.gguf")).unwrap();
    assert_eq!(f.require_str("general.architecture").unwrap(), "gemma3");
    assert!(f.tensor("blk.0.attn_q_norm.weight").is_some());
    assert!(f.tensor("blk.0.post_ffw_norm.weight").is_some());
    let pattern: Vec<bool> = f
        .get("gemma3.attention.sliding_window_pattern")
        .and_then(|v| v.as_array())
        .unwrap()
        .iter()
        .map(|b| matches!(b, kiln::gguf::Value::Bool(true)))
        .collect();
    assert_eq!(pattern, [true, true, false, true, false]);
    assert_eq!(
        f.get("gemma3.rope.freq_base_swa").and_then(|v| v.as_f64()),
        Some(10000.0)
    );
}

/// Phi-3 with LoRA on the fused qkv_proj (the usual Phi-3 recipe). llama.cpp runs phi3 without
/// its sliding window (16 here, the eval text is 95 tokens), which the export says.
#[test]
fn phi3_trains_merges_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let said = train_merge_export("tests/fixtures/phi3_tiny", tmp.path(), false);
    assert!(
        said.contains(
            "sliding window of 16 tokens, which llama.cpp's `phi3` architecture does not apply"
        ),
        "{said}"
    );
    let f = kiln::gguf::GgufFile::open(&tmp.path().join("gguf/model.gguf")).unwrap();
    assert_eq!(f.require_str("general.architecture").unwrap(), "phi3");
    assert!(f.tensor("blk.0.attn_qkv.weight").is_some());
    assert_eq!(f.require_u64("phi3.attention.sliding_window").unwrap(), 16);
}

/// Mistral with a sliding window of 8 trains with the window (the eval text is 95 tokens); its
/// GGUF is `llama`, which llama.cpp runs without a window, and the export says so.
#[test]
fn mistral_trains_merges_and_exports_with_a_window_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let said = train_merge_export("tests/fixtures/mistral_tiny", tmp.path(), false);
    assert!(
        said.contains("warning: the model attends to a sliding window of 8 tokens"),
        "{said}"
    );
    let f = kiln::gguf::GgufFile::open(&tmp.path().join("gguf/model.gguf")).unwrap();
    assert_eq!(f.require_str("general.architecture").unwrap(), "llama");
}

mod common;
use common::{eval_loss, kiln_stdout};

/// `kiln data inspect RECIPE --json -n 1` with the fixture tokenizer `tokenizer` as the model:
/// the report, the first example's text and its trained token ids.
fn inspect_recipe(recipe: &str, tokenizer: &str) -> (Json, String, Vec<u64>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tokenizer_dir(tokenizer, tmp.path());
    let set = format!("model.path={}", dir.display());
    let out = kiln_stdout(&[
        "data", "inspect", recipe, "--set", &set, "--json", "-n", "1",
    ]);
    let j: Json = serde_json::from_str(&out).unwrap();
    let ex = &j["examples"][0];
    let text = ex["text"].as_str().unwrap().to_string();
    let ids: Vec<u64> = serde_json::from_value(ex["input_ids"].clone()).unwrap();
    let mask: Vec<u8> = serde_json::from_value(ex["loss_mask"].clone()).unwrap();
    let trained = ids
        .iter()
        .zip(&mask)
        .filter(|(_, m)| **m == 1)
        .map(|(id, _)| *id)
        .collect();
    (j, text, trained)
}

/// The shipped Phi-3 recipe with the real Phi-3 tokenizer: its own template, `<|end|>` trained,
/// LoRA on the fused qkv_proj.
#[test]
fn phi3_recipe_sees_the_phi3_template_with_the_real_tokenizer() {
    let (_, text, trained) = inspect_recipe("recipes/phi3-mini.toml", "phi3");
    assert!(text.contains("<|assistant|>\n"), "{text}");
    assert!(trained.contains(&32007), "<|end|> is trained");
    let r = kiln::recipe::Recipe::load(Path::new("recipes/phi3-mini.toml"), &[]).unwrap();
    assert_eq!(r.target_modules().unwrap(), ["qkv_proj", "o_proj"]);
    // Every shipped recipe parses, with the targets of its family.
    for (recipe, targets) in [
        ("recipes/mistral-7b-instruct.toml", 7),
        ("recipes/gemma-2-2b-it.toml", 7),
        ("recipes/gemma-2b-it.toml", 7),
        ("recipes/gemma-3-1b-it.toml", 7),
        ("recipes/mixtral-8x7b-instruct.toml", 4),
        ("recipes/qwen2.5-0.5b-instruct.toml", 7),
        ("recipes/qwen3-8b.toml", 7),
        ("recipes/qwen3-30b-a3b.toml", 4),
        ("recipes/llama-3.2-1b-instruct.toml", 7),
        ("recipes/phi-4-mini-instruct.toml", 2),
    ] {
        let r = kiln::recipe::Recipe::load(Path::new(recipe), &[]).unwrap();
        assert_eq!(r.target_modules().unwrap().len(), targets, "{recipe}");
    }
}

/// The shipped Qwen 2.5 recipe with the real Qwen tokenizer: ChatML from the model's own
/// template, and the loss on assistant turns through `<|im_end|>`, where generation stops (the
/// template's newline after it is never generated, so it is not trained).
#[test]
fn qwen_recipe_sees_chatml_with_the_real_tokenizer() {
    let (j, text, trained) = inspect_recipe("recipes/qwen2.5-0.5b-instruct.toml", "qwen2.5");
    assert_eq!(j["stats"]["rows"], 120);
    assert!(text.contains("<|im_start|>assistant\n"), "{text}");
    let im_end = 151645;
    assert!(trained.contains(&im_end), "<|im_end|> is trained");
    // The trained turn ends with <|im_end|>; the template's newline (198) after it is not
    // trained.
    assert_eq!(trained.last(), Some(&im_end));
    assert!(text.contains("<|im_end|>\n"), "{text}");
}

/// Phi-4-mini's and Phi-3.5's RoPE (3/4 of each head rotated, LongRoPE past an original context
/// of 32, tied embeddings): trains, merges, and its F32 GGUF (with rope_factors_long/short and
/// the attention factor) computes the merged model's loss.
#[test]
fn phi4mini_trains_merges_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    train_merge_export("tests/fixtures/phi4mini_tiny", tmp.path(), true);
    let f = kiln::gguf::GgufFile::open(&tmp.path().join("gguf/model.gguf")).unwrap();
    assert_eq!(f.require_str("general.architecture").unwrap(), "phi3");
    assert_eq!(f.tensor("rope_factors_long.weight").unwrap().info.dims, [6]);
    assert!(f.tensor("output.weight").is_none());
}

/// LoRA targets are checked against the architecture: Llama names on Phi-3 (or Phi-3's fused
/// names on Llama) are refused with the names to use; `all-linear` takes what each model has.
#[test]
fn lora_targets_must_exist_in_the_architecture() {
    use kiln::lora::LoraSettings;
    use kiln::model::{self, LoadOptions};
    let settings = |targets: &[&str]| LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
    };
    let load = |dir: &str, lora: LoraSettings| {
        model::load(
            Path::new(dir),
            &LoadOptions {
                layers: None,
                nf4_dequantized: false,
                device: candle_core::Device::Cpu,
                dtype: candle_core::DType::F32,
                quantize: false,
                lora: Some(lora),
                seed: 0,
            },
        )
    };
    let err = load("tests/fixtures/phi3_tiny", settings(&["q_proj", "v_proj"]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`q_proj` is not a projection of this phi3 model") && err.contains("qkv_proj"),
        "{err}"
    );
    let err = load("tests/fixtures/llama_tiny_a", settings(&["qkv_proj"]))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("only Phi-3 models fuse projections"), "{err}");
    let all: Vec<&str> = kiln::recipe::LINEAR_MODULES.to_vec();
    let phi3 = load("tests/fixtures/phi3_tiny", settings(&all)).unwrap();
    assert_eq!(phi3.model.adapters().len(), 4 * phi3.model.layers.len());
    let llama = load("tests/fixtures/llama_tiny_a", settings(&all)).unwrap();
    assert_eq!(llama.model.adapters().len(), 7 * llama.model.layers.len());
}
