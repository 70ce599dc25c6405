//! Preference training against TRL 1.15 (tests/fixtures/preference/golden.json, made by
//! scripts/golden/make_preference_golden.py): for DPO (sigmoid, ipo, hinge; text, implicit-prompt
//! and conversational pairs through Llama 3.1's chat template), SimPO and ORPO, the tokenized
//! pairs, the first step's LoRA gradients and logged metrics to 1e-5 relative, and 20 steps of
//! loss to 1e-4.

use std::path::Path;

use kiln::recipe::Recipe;
use kiln::train::preference::{PairNorm, Preference};
use kiln::train::{accumulate_share, StepShare, TrainInputs};
use serde_json::Value as Json;

const FIX: &str = "tests/fixtures/preference";

fn golden() -> Json {
    serde_json::from_str(&std::fs::read_to_string(format!("{FIX}/golden.json")).unwrap()).unwrap()
}

/// The recipe of a golden case: TRL's settings (all pairs one micro-batch, constant learning
/// rate, no decay, no clipping, no dropout) from the PEFT-initialized adapter.
fn recipe(case: &Json, steps: u64, lr: f64, out: &Path) -> Recipe {
    recipe_with(case, steps, lr, out, &[])
}

/// `recipe` with `--set` overrides.
fn recipe_with(case: &Json, steps: u64, lr: f64, out: &Path, sets: &[&str]) -> Recipe {
    let text = format!(
        r#"[model]
path = "{FIX}/model"
quantize = "none"
device = "cpu"
[data]
path = "{FIX}/{data}.jsonl"
max_seq_len = 192
shuffle = false
[lora]
r = 8
lora_alpha = 16
lora_dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
init_adapter = "{FIX}/adapter"
[training]
method = "{method}"
micro_batch_size = {micro}
max_steps = {steps}
learning_rate = {lr}
lr_scheduler = "constant"
max_grad_norm = 0.0
seed = 0
[preference]
beta = {beta}
loss_type = "{loss_type}"
simpo_gamma = {gamma}
[output]
dir = "{out}"
"#,
        data = case["data"].as_str().unwrap(),
        method = case["method"].as_str().unwrap(),
        beta = case["beta"].as_f64().unwrap(),
        loss_type = case["loss_type"].as_str().unwrap_or("sigmoid"),
        gamma = case["simpo_gamma"].as_f64().unwrap_or(0.5),
        micro = case["micro_batch"].as_u64().unwrap_or(4),
        out = out.display(),
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Recipe::parse(Path::new("preference.toml"), &text, &sets).unwrap()
}

/// The golden runs' step count and learning rate.
fn schedule(g: &Json) -> (u64, f64) {
    (
        g["steps"].as_u64().unwrap(),
        g["learning_rate"].as_f64().unwrap(),
    )
}

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(1e-3)
}

#[test]
fn pairs_tokenize_as_trl_does() {
    let g = golden();
    for (name, case) in g["cases"].as_object().unwrap() {
        let tmp = tempfile::tempdir().unwrap();
        let r = recipe(case, 1, 1e-3, tmp.path());
        let loaded = kiln::train::load_model(&r).unwrap();
        let inputs = TrainInputs::load(&r, &loaded).unwrap();
        let ids = |v: &Json| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect()
        };
        if let Some(examples) = case["examples"].as_array() {
            // KTO: each example, then its KL sequence (another example's completion).
            assert_eq!(inputs.data.examples.len(), 2 * examples.len(), "{name}");
            for (k, e) in examples.iter().enumerate() {
                let prompt = ids(&e["prompt_ids"]);
                for (i, key) in [(2 * k, "completion_ids"), (2 * k + 1, "KL_completion_ids")] {
                    let want = [prompt.clone(), ids(&e[key])].concat();
                    assert_eq!(inputs.data.examples[i].input_ids, want, "{name}: {k} {key}");
                }
                assert_eq!(
                    inputs.labels.train[k],
                    e["label"].as_bool().unwrap(),
                    "{name}: {k}"
                );
            }
            continue;
        }
        let pairs = case["pairs"].as_array().unwrap();
        assert_eq!(inputs.data.examples.len(), 2 * pairs.len(), "{name}");
        for (k, p) in pairs.iter().enumerate() {
            let ids = |key: &str| -> Vec<u32> {
                p[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            };
            let prompt = ids("prompt_ids");
            for (i, side) in [(2 * k, "chosen_ids"), (2 * k + 1, "rejected_ids")] {
                let e = &inputs.data.examples[i];
                let want = [prompt.clone(), ids(side)].concat();
                assert_eq!(e.input_ids, want, "{name}: pair {k} {side}");
                let targets: Vec<bool> = (0..want.len()).map(|t| t >= prompt.len()).collect();
                assert_eq!(e.loss_mask, targets, "{name}: pair {k} {side}");
            }
        }
    }
}

/// A golden case's model, data and method, and its one micro-batch of every pair.
fn one_step(
    case: &Json,
    out: &Path,
) -> (
    kiln::model::LoadedModel,
    TrainInputs,
    Preference,
    [Vec<usize>; 1],
) {
    let r = recipe(case, 1, 1e-3, out);
    let loaded = kiln::train::load_model(&r).unwrap();
    let inputs = TrainInputs::load(&r, &loaded).unwrap();
    let mut pref = Preference::of(&r).unwrap();
    pref.labels = std::sync::Arc::new(inputs.labels.train.clone());
    let batches = [(0..inputs.data.sequences.len()).collect::<Vec<_>>()];
    (loaded, inputs, pref, batches)
}

#[test]
fn first_step_gradients_and_metrics_equal_trl() {
    let g = golden();
    for (name, case) in g["cases"].as_object().unwrap() {
        let tmp = tempfile::tempdir().unwrap();
        let (loaded, inputs, pref, batches) = one_step(case, tmp.path());
        let share = StepShare {
            micro_batches: &batches,
            dropout_seeds: &[0],
            step_targets: kiln::train::step_targets(&inputs.data, &batches),
            teacher: None,
            preference: Some((&pref, PairNorm::of(&inputs.data, &batches))),
        };
        let params = loaded.model.lora_vars();
        let pad = loaded.tokenizer.pad_id;
        let out = accumulate_share(
            &loaded.model,
            &inputs.data,
            &share,
            pad,
            &params,
            kiln::step::StepPath::Reference,
        )
        .unwrap();
        let pairs = (batches[0].len() / 2) as f64;
        let want_loss = case["loss"][0].as_f64().unwrap();
        assert!(
            close(out.loss_sum / pairs, want_loss, 1e-5),
            "{name}: loss {} vs TRL {want_loss}",
            out.loss_sum / pairs
        );
        let sums = out.pair_sums.unwrap();
        for (metric, got) in pref.metrics(&sums, pairs as usize) {
            if let Some(want) = case["metrics"][0][&metric].as_f64() {
                assert!(
                    close(got, want, 1e-5),
                    "{name}: {metric} {got} vs TRL {want}"
                );
            }
        }
        // Gradients of lora_B (lora_A's are zero while B is).
        let grads = case["grads"].as_object().unwrap();
        let mut checked = 0;
        for ((module, _), k) in loaded.model.adapters().iter().zip(0..) {
            let key = format!("{module}.lora_B.weight");
            let want: Vec<f64> = grads[&key]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
                .collect();
            let got: Vec<f32> = out.grads[2 * k + 1]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (gv, wv) in got.iter().zip(&want) {
                assert!(
                    (*gv as f64 - wv).abs() <= 1e-5 * scale,
                    "{name}: {key}: {gv} vs TRL {wv} (max |g| {scale})"
                );
            }
            checked += 1;
        }
        assert_eq!(checked, grads.len(), "{name}");
    }
}

/// Every step's loss of a run equals TRL's curve for `case` to 1e-4.
fn assert_follows_trl(name: &str, summary: &kiln::train::TrainSummary, case: &Json) {
    let want: Vec<f64> = case["loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let got: Vec<f64> = summary.metrics.iter().map(|m| m.loss).collect();
    assert_eq!(got.len(), want.len(), "{name}");
    for (s, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1e-2),
            "{name}: step {}: loss {a} vs TRL {b}\nkiln {got:?}\nTRL  {want:?}",
            s + 1
        );
    }
}

#[test]
fn twenty_steps_of_loss_follow_trl() {
    let g = golden();
    let (steps, lr) = schedule(&g);
    for (name, case) in g["cases"].as_object().unwrap() {
        let tmp = tempfile::tempdir().unwrap();
        let r = recipe(case, steps, lr, tmp.path());
        let summary = kiln::train::train(&r, true, None).unwrap();
        assert_follows_trl(name, &summary, case);
        // The metrics TRL logs are in metrics.jsonl.
        let last = summary.metrics.last().unwrap();
        assert!(last.method.contains_key("rewards/margins"), "{name}");
    }
}

/// TRL turns dropout off for DPO (`disable_dropout`, default on), so an adapter's dropout leaves
/// its curve as it is; kiln does the same, and with `disable_dropout = false` the curve moves.
#[test]
fn dropout_is_off_in_preference_training_as_in_trl() {
    let g = golden();
    let (steps, lr) = schedule(&g);
    let case = &g["cases"]["dpo_sigmoid_text"];
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe_with(case, steps, lr, tmp.path(), &["lora.lora_dropout=0.3"]);
    let summary = kiln::train::train(&r, true, None).unwrap();
    assert_follows_trl("dpo_sigmoid with lora_dropout 0.3", &summary, case);
    // The saved adapter keeps the recipe's dropout, as PEFT's does under TRL.
    let config: Json = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["lora_dropout"].as_f64(), Some(0.3));

    let tmp = tempfile::tempdir().unwrap();
    let sets = ["lora.lora_dropout=0.3", "preference.disable_dropout=false"];
    let r = recipe_with(case, steps, lr, tmp.path(), &sets);
    let with_dropout = kiln::train::train(&r, true, None).unwrap();
    let last = with_dropout.metrics.last().unwrap().loss;
    let want = summary.metrics.last().unwrap().loss;
    assert!(
        (last - want).abs() > 1e-3 * want.abs(),
        "dropout on: {last} vs off {want}"
    );
}

/// The fused step (`step/`, the GPU's path, which the CPU also takes by default) gives the
/// reference autograd path's loss and gradients for every method, to f32 precision.
#[test]
fn the_fused_step_equals_the_reference_path() {
    let g = golden();
    for (name, case) in g["cases"].as_object().unwrap() {
        let tmp = tempfile::tempdir().unwrap();
        let (loaded, inputs, pref, batches) = one_step(case, tmp.path());
        let share = StepShare {
            micro_batches: &batches,
            dropout_seeds: &[3],
            step_targets: kiln::train::step_targets(&inputs.data, &batches),
            teacher: None,
            preference: Some((&pref, PairNorm::of(&inputs.data, &batches))),
        };
        let params = loaded.model.lora_vars();
        let run = |path| {
            let pad = loaded.tokenizer.pad_id;
            accumulate_share(&loaded.model, &inputs.data, &share, pad, &params, path).unwrap()
        };
        let (reference, fused) = (
            run(kiln::step::StepPath::Reference),
            run(kiln::step::StepPath::Explicit),
        );
        assert!(
            close(fused.loss_sum, reference.loss_sum, 1e-5),
            "{name}: loss {} vs {}",
            fused.loss_sum,
            reference.loss_sum
        );
        for (k, (a, b)) in fused.grads.iter().zip(&reference.grads).enumerate() {
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            let diff = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-4 * scale,
                "{name}: parameter {k}: {diff} (max |g| {scale})"
            );
        }
    }
}

/// `precompute_ref_log_probs`: the reference computed once before training (kept beside the run)
/// gives TRL's curve too, and a second run reads the file rather than computing it again.
#[test]
fn precomputed_reference_follows_trl_and_is_reused() {
    let g = golden();
    let (steps, lr) = schedule(&g);
    let case = &g["cases"]["dpo_sigmoid_text"];
    let tmp = tempfile::tempdir().unwrap();
    let mut r = recipe(case, steps, lr, tmp.path());
    r.preference.as_mut().unwrap().precompute_ref_log_probs = true;
    let summary = kiln::train::train(&r, true, None).unwrap();
    assert_follows_trl("precomputed", &summary, case);
    let file = tmp.path().join("reference_logps.json");
    let saved: Json = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(saved["logps"].as_array().unwrap().len(), 8);
    // The chosen sides' values made wrong on purpose: a second run that reads them trains
    // differently.
    let mut wrong = saved.clone();
    for v in wrong["logps"].as_array_mut().unwrap().iter_mut().step_by(2) {
        *v = serde_json::json!(v.as_f64().unwrap() - 5.0);
    }
    std::fs::write(&file, wrong.to_string()).unwrap();
    r.training.max_steps = 1;
    let again = kiln::train::train(&r, true, None).unwrap();
    assert!(
        (again.metrics[0].loss - summary.metrics[0].loss).abs() > 1e-3,
        "the stored reference was not read"
    );
}

mod common;

/// The shipped recipe teaches a tiny random model the pairs' preference (lowercase answers over
/// the same in capitals) with each method: held-out preference accuracy ends at 0.9 or more and
/// the training loss falls; metrics.jsonl carries TRL's metric names.
#[test]
fn the_tiny_recipe_learns_the_preference_with_each_method() {
    for (method, beta) in [
        ("dpo", "0.1"),
        ("orpo", "0.1"),
        ("simpo", "2.0"),
        ("kto", "0.1"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let sets = [
            format!("output.dir=\"{}\"", out.display()),
            format!("training.method=\"{method}\""),
            format!("preference.beta={beta}"),
            "training.max_steps=12".to_string(),
            "training.eval_steps=12".to_string(),
            "model.device=\"cpu\"".to_string(),
        ];
        let mut args = vec!["train", "recipes/dpo-tiny.toml", "-q"];
        for s in &sets {
            args.extend(["--set", s.as_str()]);
        }
        common::kiln_stdout(&args);
        let lines: Vec<Json> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let steps: Vec<&Json> = lines.iter().filter(|l| l.get("lr").is_some()).collect();
        let (first, last) = (
            steps[0]["loss"].as_f64().unwrap(),
            steps.last().unwrap()["loss"].as_f64().unwrap(),
        );
        assert!(last < first, "{method}: loss {first} -> {last}");
        for key in ["rewards/chosen", "rewards/margins", "logps/rejected"] {
            assert!(
                steps[0].get(key).is_some(),
                "{method}: no {key} in {}",
                steps[0]
            );
        }
        let eval = lines
            .iter()
            .rev()
            .find(|l| l.get("eval_loss").is_some())
            .unwrap();
        if method == "kto" {
            // Unpaired: the held-out desirable completions' rewards above the undesirable ones'.
            let margin = eval["eval_rewards/margins"].as_f64().unwrap();
            assert!(margin > 0.5, "{method}: held-out reward margin {margin}");
            continue;
        }
        let acc = eval["eval_rewards/accuracies"].as_f64().unwrap();
        assert!(acc >= 0.9, "{method}: held-out preference accuracy {acc}");
    }
}

/// Pairs where supervised fine-tuning expects other rows are named for what they are, and a
/// `[preference]` section needs a preference method.
#[test]
fn pairs_and_preference_settings_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let o = common::kiln(&[
        "train",
        "recipes/dpo-tiny.toml",
        "--set",
        "training.method=\"sft\"",
        "--set",
        &format!("output.dir=\"{}\"", tmp.path().join("r").display()),
    ]);
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(err.contains("preference"), "{err}");
    // KTO's KL estimate needs a second example in the micro-batch.
    let o = common::kiln(&[
        "train",
        "recipes/dpo-tiny.toml",
        "--set",
        "training.method=\"kto\"",
        "--set",
        "training.micro_batch_size=1",
        "--set",
        &format!("output.dir=\"{}\"", tmp.path().join("k").display()),
    ]);
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(
        err.contains("training.micro_batch_size") && err.contains("KTO"),
        "{err}"
    );
    let rows = tmp.path().join("rows.jsonl");
    std::fs::write(
        &rows,
        "{\"prompt\": \"a\", \"chosen\": \" b\", \"rejected\": \" b\"}\n",
    )
    .unwrap();
    let o = common::kiln(&[
        "train",
        "recipes/dpo-tiny.toml",
        "--set",
        &format!("data.path=\"{}\"", rows.display()),
        "--set",
        "data.val_split=0",
        "--set",
        "training.eval_steps=0",
        "--set",
        &format!("output.dir=\"{}\"", tmp.path().join("r2").display()),
    ]);
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(
        err.contains("rows.jsonl") && err.contains("prefers nothing"),
        "{err}"
    );
}

/// Each method has a recipe for a real model: it parses, trains the method its name says, and
/// `kiln plan` prices it on Llama-3.2-1B's config (pairs as two sequences) within a 24 GiB card.
#[test]
fn each_method_has_a_recipe_for_a_real_model() {
    for method in ["dpo", "orpo", "simpo", "kto"] {
        let path = format!("recipes/{method}-llama-3.2-1b-instruct.toml");
        let sets = ["model.path=\"tests/fixtures/configs/Llama-3.2-1B.json\"".to_string()];
        let r = Recipe::load(Path::new(&path), &sets).unwrap();
        assert_eq!(r.training.method.name(), method, "{path}");
        let report = kiln::train::plan::report(&r, Some(24 << 30)).unwrap();
        assert_eq!(report.fits, Some(true), "{path}: {}", report.text);
        assert!(
            report.text.contains("8184 tokens a micro-batch"),
            "{path}: {}",
            report.text
        );
    }
}
