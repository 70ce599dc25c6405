//! Training properties on the tiny model: token-weighted accumulation, reproducibility, loss
//! going down, PEFT output.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use kiln::recipe::Recipe;
use kiln::rng::KilnRng;

fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("tiny");
    kiln::model::tiny::init_tiny("llama", &m, 7).unwrap();
    m
}

fn recipe(model: &Path, out: &Path, extra: &[&str]) -> Recipe {
    let text = format!(
        r#"
[model]
path = "{}"
device = "cpu"
[data]
path = "datasets/alpaca_tiny.jsonl"
max_seq_len = 128
shuffle = false
[lora]
r = 4
lora_alpha = 8
[training]
learning_rate = 1e-2
lr_scheduler = "constant"
max_steps = 3
[output]
dir = "{}"
"#,
        model.display(),
        out.display()
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Recipe::parse(Path::new("test.toml"), &text, &overrides).unwrap()
}

fn max_rel_diff(a: &[Tensor], b: &[Tensor]) -> f32 {
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        let d = common::max_abs_diff(x, y);
        let s = common::max_abs(y);
        worst = worst.max(d / s.max(1e-12));
    }
    worst
}

#[test]
fn accumulation_1x4_gives_the_same_gradient_and_update_as_4x1() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(tmp.path());
    let r = recipe(&model_dir, &tmp.path().join("a"), &[]);
    let loaded = kiln::train::load_model(&r).unwrap();
    let examples = kiln::data::load_dataset(&r.data, &loaded.tokenizer, 0)
        .unwrap()
        .train;
    let data = kiln::data::TrainData::new(examples.clone(), false, r.data.max_seq_len);
    let p = loaded.model.lora_vars();
    // Make B non-zero so gradients reach A as well.
    for v in &p {
        v.set(&(v.as_tensor() + 0.01).unwrap()).unwrap();
    }
    let mut rng = KilnRng::new(0);
    let pad = loaded.tokenizer.pad_id;
    // Examples of different lengths, so padding differs between the two splits.
    let one_by_four = kiln::train::accumulate_gradients(
        &loaded.model,
        &data,
        &[vec![0], vec![1], vec![2], vec![3]],
        pad,
        &p,
        &mut rng,
    )
    .unwrap();
    let four_by_one = kiln::train::accumulate_gradients(
        &loaded.model,
        &data,
        &[vec![0, 1, 2, 3]],
        pad,
        &p,
        &mut rng,
    )
    .unwrap();
    assert_eq!(one_by_four.target_tokens, four_by_one.target_tokens);
    assert!((one_by_four.loss_sum - four_by_one.loss_sum).abs() / four_by_one.loss_sum < 1e-6);
    let rel = max_rel_diff(&one_by_four.grads, &four_by_one.grads);
    assert!(rel < 1e-4, "gradients differ by {rel} (relative)");
    // A plain average of per-micro-batch mean losses would weight examples differently.
    let lens: Vec<usize> = (0..4).map(|i| examples[i].num_targets()).collect();
    assert!(
        lens.iter().any(|&l| l != lens[0]),
        "test needs examples of different lengths: {lens:?}"
    );

    // Whole runs: micro_batch 1 x accumulation 4 and micro_batch 4 x 1 end at the same adapter.
    let run = |mb: &str, ga: &str, out: &str| {
        let r = recipe(&model_dir, &tmp.path().join(out), &[mb, ga]);
        let loaded = kiln::train::load_model(&r).unwrap();
        let inputs = kiln::train::TrainInputs::load(&r, &loaded).unwrap();
        kiln::train::train_loaded(&r, &loaded, &inputs, true).unwrap();
        loaded
            .model
            .lora_vars()
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect::<Vec<_>>()
    };
    let a = run(
        "training.micro_batch_size=1",
        "training.gradient_accumulation_steps=4",
        "mb1",
    );
    let b = run(
        "training.micro_batch_size=4",
        "training.gradient_accumulation_steps=1",
        "mb4",
    );
    let rel = max_rel_diff(&a, &b);
    assert!(
        rel < 1e-3,
        "adapters after 3 steps differ by {rel} (relative)"
    );
}

#[test]
fn same_seed_gives_bit_identical_adapters_and_another_seed_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(tmp.path());
    let run = |out: &str, seed: &str| {
        let r = recipe(
            &model_dir,
            &tmp.path().join(out),
            &["lora.lora_dropout=0.1", "data.shuffle=true", seed],
        );
        kiln::train::train(&r, true, None).unwrap();
        std::fs::read(
            tmp.path()
                .join(out)
                .join("adapter/adapter_model.safetensors"),
        )
        .unwrap()
    };
    let a = run("a", "training.seed=5");
    let b = run("b", "training.seed=5");
    let c = run("c", "training.seed=6");
    assert!(
        a == b,
        "two runs with the same seed wrote different adapters"
    );
    assert!(a != c, "a different seed must change the run");
}

#[test]
fn training_lowers_the_loss_and_writes_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(tmp.path());
    let r = recipe(
        &model_dir,
        &tmp.path().join("run"),
        &[
            "training.max_steps=30",
            "lora.target_modules=\"all-linear\"",
        ],
    );
    let summary = kiln::train::train(&r, true, None).unwrap();
    let m = &summary.metrics;
    let first: f64 = m[..3].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    let last: f64 = m[m.len() - 3..].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    assert!(
        last < first - 0.3,
        "loss {first:.3} -> {last:.3} did not go down clearly"
    );
    let lines = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 30);
    let row: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for key in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(row.get(key).is_some(), "metrics.jsonl lacks {key}");
    }
    // all-linear: 7 projections per layer, A and B each.
    assert_eq!(
        summary.trainable_params,
        kiln::model::lora_param_count(
            &kiln::model::ModelConfig::from_file(&model_dir.join("config.json")).unwrap(),
            &kiln::lora::LoraSettings::of(&r)
        )
    );
}

#[test]
fn prompt_tokens_are_masked_unless_train_on_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(tmp.path());
    let r = recipe(
        &model_dir,
        &tmp.path().join("x"),
        &["data.max_seq_len=4096"],
    );
    let loaded = kiln::train::load_model(&r).unwrap();
    let masked = kiln::data::load_dataset(&r.data, &loaded.tokenizer, 0)
        .unwrap()
        .train;
    let r2 = recipe(
        &model_dir,
        &tmp.path().join("x"),
        &["data.max_seq_len=4096", "data.train_on_inputs=true"],
    );
    let all = kiln::data::load_dataset(&r2.data, &loaded.tokenizer, 0)
        .unwrap()
        .train;
    let ex = &masked[0];
    let tok = &loaded.tokenizer.tokenizer;
    let trained = ex.ids_where_trained(true);
    let text = tok.decode(&trained, false).unwrap();
    let row: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string("datasets/alpaca_tiny.jsonl")
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    // Exactly the response and the end-of-sequence token carry loss.
    assert_eq!(
        text,
        format!("{}<|end_of_text|>", row["output"].as_str().unwrap())
    );
    assert_eq!(*ex.input_ids.last().unwrap(), loaded.tokenizer.eos_id);
    assert!(!ex.loss_mask[0]);
    assert!(all[0].loss_mask.iter().all(|&m| m));
    assert_eq!(all[0].input_ids, ex.input_ids);
}

#[test]
fn gradient_checkpointing_gives_the_gradients_of_the_plain_graph() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(tmp.path());
    let r = recipe(
        &model_dir,
        &tmp.path().join("a"),
        &[
            "lora.lora_dropout=0.2",
            "lora.target_modules=\"all-linear\"",
        ],
    );
    let mut loaded = kiln::train::load_model(&r).unwrap();
    // `auto` on the CPU recomputes every layer.
    assert_eq!(loaded.model.recomputed_layers, loaded.model.layers.len());
    let examples = kiln::data::load_dataset(&r.data, &loaded.tokenizer, 0)
        .unwrap()
        .train;
    let data = kiln::data::TrainData::new(examples, false, r.data.max_seq_len);
    let p = loaded.model.lora_vars();
    for v in &p {
        v.set(&(v.as_tensor() + 0.01).unwrap()).unwrap();
    }
    let pad = loaded.tokenizer.pad_id;
    let layers = loaded.model.layers.len();
    assert!(layers >= 2);
    let per_layer = loaded.model.layers[0].linears().len() * 2;
    let mut grads = |checkpointed: usize| {
        loaded.model.recomputed_layers = checkpointed;
        let before = kiln::ops::nf4_linear::dequantizations();
        let g = kiln::train::accumulate_gradients(
            &loaded.model,
            &data,
            &[vec![0, 1], vec![2, 3]],
            pad,
            &p,
            &mut KilnRng::new(3),
        )
        .unwrap();
        let after = kiln::ops::nf4_linear::dequantizations();
        (g, after - before)
    };
    let (plain, plain_deq) = grads(0);
    let (ckpt, ckpt_deq) = grads(layers);
    // `auto` on a GPU recomputes only the first layers: the rest keep their activations.
    let (part, part_deq) = grads(layers / 2);
    // Same dropout masks, same arithmetic: the same loss and gradients.
    for other in [&ckpt, &part] {
        assert_eq!(plain.loss_sum, other.loss_sum);
        let rel = max_rel_diff(&other.grads, &plain.grads);
        assert!(rel < 1e-5, "gradients differ by {rel} (relative)");
    }
    assert!(plain.grads.iter().all(|g| common::max_abs(g) > 0.0));
    // Forward, recomputed forward and backward each dequantize every weight once per
    // micro-batch (2 here); without recomputation only the forward and backward do.
    let weights = layers * per_layer;
    assert_eq!(ckpt_deq, 3 * weights);
    assert_eq!(part_deq, 2 * weights + (layers / 2) * per_layer);
    assert!(plain_deq <= 2 * weights, "{plain_deq}");
}

/// Benchmarks train on random weights of a config and pre-tokenized rows: no checkpoint, no
/// tokenization. Labels of -100 take tokens out of the loss.
#[test]
fn random_weights_and_pretokenized_rows_train() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tiny_model(tmp.path());
    let dir = tmp.path().join("config_only");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(full.join(f), dir.join(f)).unwrap();
    }
    let mut rng = KilnRng::new(1);
    let mut rows = String::new();
    for i in 0..8 {
        let ids: Vec<u32> = rng
            .uniform(33, 0.0, 500.0)
            .iter()
            .map(|&v| v as u32)
            .collect();
        let row = if i == 0 {
            // Only the last 10 tokens carry loss.
            let labels: Vec<i64> = ids
                .iter()
                .enumerate()
                .map(|(k, &t)| if k < 23 { -100 } else { t as i64 })
                .collect();
            serde_json::json!({"input_ids": ids, "labels": labels})
        } else {
            serde_json::json!({"input_ids": ids})
        };
        rows.push_str(&format!("{row}\n"));
    }
    let data = tmp.path().join("tokens.jsonl");
    std::fs::write(&data, rows).unwrap();
    let r = recipe(
        &dir,
        &tmp.path().join("run"),
        &[
            "model.random_weights=true",
            &format!("data.path=\"{}\"", data.display()),
            "training.micro_batch_size=2",
            "training.gradient_accumulation_steps=2",
            "training.max_steps=4",
        ],
    );
    let loaded = kiln::train::load_model(&r).unwrap();
    let inputs = kiln::train::TrainInputs::load(&r, &loaded).unwrap();
    assert_eq!(inputs.stats.target_tokens, 7 * 32 + 10);
    let summary = kiln::train::train_loaded(&r, &loaded, &inputs, true).unwrap();
    assert_eq!(summary.metrics[0].tokens, 4 * 32);
    // Random weights are those of `init-tiny` with the same seed: the first loss is the same.
    let on_disk = recipe(
        &full,
        &tmp.path().join("disk"),
        &[
            &format!("data.path=\"{}\"", data.display()),
            "training.micro_batch_size=2",
            "training.gradient_accumulation_steps=2",
            "training.max_steps=1",
            "training.seed=7",
        ],
    );
    let mut in_memory = r.clone();
    in_memory.training.seed = 7;
    in_memory.training.max_steps = 1;
    in_memory.output.dir = tmp.path().join("mem");
    let a = kiln::train::train(&on_disk, true, None).unwrap().first_loss;
    let b = kiln::train::train(&in_memory, true, None)
        .unwrap()
        .first_loss;
    assert_eq!(a, b);

    // Bad rows name the field and the fix.
    for (row, needle) in [
        (
            r#"{"input_ids": [1, "x"]}"#,
            "`input_ids[1]` must be an integer",
        ),
        (
            r#"{"input_ids": [1, 2], "labels": [1]}"#,
            "give one label per token",
        ),
        (
            r#"{"input_ids": [1, 2], "labels": [-100, 5]}"#,
            "neither -100 nor the token 2",
        ),
        (
            r#"{"input_ids": [1, 9999]}"#,
            "outside the tokenizer's vocabulary",
        ),
    ] {
        std::fs::write(&data, format!("{row}\n")).unwrap();
        let err = match kiln::train::TrainInputs::load(&r, &loaded) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{row} was accepted"),
        };
        assert!(
            err.contains(needle) && err.contains("tokens.jsonl"),
            "{err}"
        );
    }
}
