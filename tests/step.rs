//! The explicit training step (`kiln::step`, the GPU path) against the reference (candle
//! autograd), on the CPU in f32: the same loss and the same LoRA gradients for every family it
//! covers, with dropout, biases, q/k norms, fused projections, packed rows and recomputed
//! layers; the families it does not cover are named and take the reference path.

mod common;

use std::path::Path;

use candle_core::Tensor;
use kiln::recipe::Recipe;
use kiln::rng::KilnRng;
use kiln::step::StepPath;

/// All-linear adapters, or with `attention_only` adapters on q/k/v/o alone (the benchmark's
/// targets: the MLP's projections are frozen and their inputs never recomputed).
fn recipe(model: &str, out: &Path, packing: bool, attention_only: bool) -> Recipe {
    let targets = match attention_only {
        true => r#"["q_proj", "k_proj", "v_proj", "o_proj"]"#,
        false => r#""all-linear""#,
    };
    let text = format!(
        r#"
[model]
path = "{model}"
device = "cpu"
quantize = "nf4"
[data]
path = "datasets/alpaca_tiny.jsonl"
max_seq_len = 256
packing = {packing}
shuffle = false
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.1
target_modules = {targets}
[output]
dir = "{}"
"#,
        out.display()
    );
    Recipe::parse(Path::new("test.toml"), &text, &[]).unwrap()
}

fn max_rel_diff(a: &[Tensor], b: &[Tensor]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| common::max_abs_diff(x, y) / common::max_abs(y).max(1e-12))
        .fold(0.0, f32::max)
}

/// Loss and gradients of two micro-batches on both paths, with `checkpointed` layers
/// recomputed; asserts that they agree.
fn compare(model: &str, packing: bool) {
    compare_targets(model, packing, false)
}

fn compare_targets(model: &str, packing: bool, attention_only: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(model, tmp.path(), packing, attention_only);
    let mut loaded = kiln::train::load_model(&r).unwrap();
    let examples = kiln::data::load_dataset(&r.data, &loaded.tokenizer, 0)
        .unwrap()
        .train;
    let data = kiln::data::TrainData::new(examples, packing, r.data.max_seq_len);
    let params = common::lora_params_moved(&loaded.model);
    assert!(
        StepPath::Explicit.explicit(&loaded.model, r.data.max_seq_len),
        "{model}: {:?}",
        kiln::step::unsupported(&loaded.model, r.data.max_seq_len)
    );
    let layers = loaded.model.layers.len();
    let pad = loaded.tokenizer.pad_id;
    let mut run = |path: StepPath, checkpointed: usize, tile: Option<usize>| {
        loaded.model.recomputed_layers = checkpointed;
        loaded.model.mlp_tile_rows = tile;
        kiln::train::accumulate_gradients_on(
            &loaded.model,
            &data,
            &[vec![0, 1], vec![2, 3]],
            pad,
            &params,
            &mut KilnRng::new(5),
            path,
        )
        .unwrap()
    };
    let reference = run(StepPath::Reference, 0, None);
    // The MLP whole, and in tiles of 12 tokens (rows of two examples in one tile, dropout masks
    // continued across tiles).
    for (checkpointed, tile) in [
        (0, None),
        (layers / 2, None),
        (0, Some(12)),
        (layers, Some(12)),
    ] {
        let explicit = run(StepPath::Explicit, checkpointed, tile);
        let loss_diff = (explicit.loss_sum - reference.loss_sum).abs() / reference.loss_sum;
        assert!(
            loss_diff < 1e-6,
            "{model}: loss differs by {loss_diff} (relative)"
        );
        assert_eq!(explicit.target_tokens, reference.target_tokens);
        let rel = max_rel_diff(&explicit.grads, &reference.grads);
        assert!(
            rel < 1e-4,
            "{model}, {checkpointed} recomputed, MLP tiles {tile:?}: gradients differ by {rel} (relative)"
        );
    }
    assert!(reference.grads.iter().all(|g| common::max_abs(g) > 0.0));
    // No autograd graph: the loss the explicit step returns records no op (a graph would keep
    // every activation of the micro-batch alive).
    let batch = data.batch(&[0, 1], pad, &loaded.model.device).unwrap();
    let loss = kiln::step::micro_batch(
        &loaded.model,
        &batch,
        1.0,
        &mut KilnRng::new(5),
        &mut kiln::step::LoraGrads::default(),
        &kiln::step::LoraCasts::default(),
        None,
        None,
    )
    .unwrap()
    .loss;
    assert!(!loss.track_op(), "{model}: the explicit step built a graph");
    // The comparison can fail: another dropout stream gives other gradients.
    loaded.model.recomputed_layers = 0;
    let other = kiln::train::accumulate_gradients_on(
        &loaded.model,
        &data,
        &[vec![0, 1], vec![2, 3]],
        pad,
        &params,
        &mut KilnRng::new(6),
        StepPath::Explicit,
    )
    .unwrap();
    assert!(max_rel_diff(&other.grads, &reference.grads) > 1e-3);
}

#[test]
fn llama_explicit_step_equals_autograd() {
    compare("tests/fixtures/llama_tiny_a", false);
}

#[test]
fn llama_explicit_step_equals_autograd_on_packed_rows() {
    compare("tests/fixtures/llama_tiny_a", true);
}

/// Adapters on the attention only: the frozen MLP's backward runs without its inputs.
#[test]
fn llama_explicit_step_equals_autograd_with_attention_adapters() {
    compare_targets("tests/fixtures/llama_tiny_a", false, true);
}

/// Qwen 2: biases on q, k and v.
#[test]
fn qwen2_explicit_step_equals_autograd() {
    compare("tests/fixtures/qwen2_tiny", false);
}

/// Qwen 3: per-head q/k norms before RoPE.
#[test]
fn qwen3_explicit_step_equals_autograd() {
    compare("tests/fixtures/qwen3_tiny", false);
}

/// Phi-3: fused qkv_proj and gate_up_proj (the fixture's window of 16 taken out, as real Phi-3
/// windows are longer than these rows).
#[test]
fn phi3_explicit_step_equals_autograd() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("phi3");
    std::fs::create_dir(&dir).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(Path::new("tests/fixtures/phi3_tiny").join(f), dir.join(f)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/phi3_tiny/config.json").unwrap(),
    )
    .unwrap();
    config["sliding_window"] = serde_json::Value::Null;
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    compare(dir.to_str().unwrap(), false);
}

/// Phi-4-mini's RoPE: 3/4 of each head rotated, LongRoPE's long factors on these rows.
#[test]
fn phi4mini_explicit_step_equals_autograd() {
    compare("tests/fixtures/phi4mini_tiny", false);
}

/// What the explicit step does not cover yet is named, and such models take the reference.
#[test]
fn uncovered_families_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    for (model, why) in [
        ("tests/fixtures/gemma_tiny", "(1 + w) norms"),
        ("tests/fixtures/gemma2_tiny", "(1 + w) norms"),
        ("tests/fixtures/mistral_tiny", "sliding window"),
        ("tests/fixtures/mixtral_tiny", "mixture-of-experts"),
        ("tests/fixtures/qwen3moe_tiny", "mixture-of-experts"),
    ] {
        let loaded = kiln::train::load_model(&recipe(model, tmp.path(), false, false)).unwrap();
        let reason = kiln::step::unsupported(&loaded.model, 256).unwrap_or_default();
        assert!(reason.contains(why), "{model}: {reason}");
        assert!(!StepPath::Explicit.explicit(&loaded.model, 256));
    }
    // Mistral's window of 8 covers rows of 8: the explicit step takes those.
    let loaded = kiln::train::load_model(&recipe(
        "tests/fixtures/mistral_tiny",
        tmp.path(),
        false,
        false,
    ))
    .unwrap();
    assert!(StepPath::Explicit.explicit(&loaded.model, 8));
}
