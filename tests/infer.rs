//! Inference and evaluation against transformers 5.17 + PEFT 0.21 (tests/fixtures/eval_golden.*,
//! made by scripts/golden/make_eval_golden.py): logits, loss and perplexity with and without a PEFT
//! adapter, greedy generation token for token, the KV cache, exact match, and training's
//! evaluation steps.

mod common;
use common::{expect_error, kiln};

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use kiln::infer::{self, InferenceOptions};

const MODEL: &str = "tests/fixtures/llama_tiny_a";
const ADAPTER: &str = "tests/fixtures/peft_adapter_a";

fn golden() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load("tests/fixtures/eval_golden.safetensors", &Device::Cpu).unwrap()
}

fn golden_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string("tests/fixtures/eval_golden.json").unwrap())
        .unwrap()
}

fn dense_f32() -> InferenceOptions {
    InferenceOptions {
        device: "cpu".into(),
        dtype: Some(DType::F32),
        quantize: Some(false),
        ..Default::default()
    }
}

/// Greedy decoding of `prompt` for at most `max_new_tokens`, stopping at the model's stop tokens.
fn greedy(
    m: &kiln::model::LoadedModel,
    prompt: &[u32],
    max_new_tokens: usize,
) -> infer::generate::Generation {
    let stops = infer::generate::stop_tokens(&m.tokenizer, &m.model, &m.dir);
    let params = infer::generate::SamplingParams {
        max_new_tokens,
        ..Default::default()
    };
    infer::generate::generate(
        &m.model,
        &m.tokenizer,
        prompt,
        &params,
        &stops,
        &[],
        &mut |_| {},
    )
    .unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// The golden rows' token ids as a batch of one.
fn golden_input(g: &std::collections::HashMap<String, Tensor>) -> Tensor {
    Tensor::new(ids(&g["input_ids"]).as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn eval_loss_perplexity_and_logits_equal_transformers_with_and_without_adapter() {
    let g = golden();
    let gj = golden_json();
    let tmp = tempfile::tempdir().unwrap();
    for (name, adapter) in [("base", None), ("adapter", Some(ADAPTER))] {
        let dump = tmp.path().join(format!("{name}.safetensors"));
        let mut args = vec![
            "eval",
            "--model",
            MODEL,
            "--data",
            "tests/fixtures/data/eval_text.jsonl",
            "--quantize",
            "none",
            "--dtype",
            "f32",
            "--device",
            "cpu",
            "--json",
            "--dump-logits",
            dump.to_str().unwrap(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        let o = kiln(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let want_loss = gj[name]["loss"].as_f64().unwrap();
        let want_ppl = gj[name]["perplexity"].as_f64().unwrap();
        assert!(
            rel(r["mean_loss"].as_f64().unwrap(), want_loss) < 1e-5,
            "{name}: {r} vs {want_loss}"
        );
        assert!(
            rel(r["perplexity"].as_f64().unwrap(), want_ppl) < 1e-4,
            "{name}: {r} vs {want_ppl}"
        );
        let dumped = candle_core::safetensors::load(&dump, &Device::Cpu).unwrap();
        assert_eq!(
            ids(&dumped["input_ids.0"]),
            ids(&g["input_ids"]),
            "{name}: token ids"
        );
        let want = &g[&format!("{name}.logits")];
        let got = &dumped["logits.0"];
        let rel_diff = common::max_abs_diff(got, want) / common::max_abs(want);
        assert!(
            rel_diff < 1e-4,
            "{name}: logits differ by {rel_diff} (relative)"
        );
        // The dumped targets and weights say what the loss scores: from the dumped logits, the
        // same mean loss.
        let mut sum = 0f64;
        let mut count = 0f64;
        let targets = ids(&dumped["targets.0"]);
        let weights: Vec<f32> = dumped["weights.0"].to_vec1().unwrap();
        let rows: Vec<Vec<f32>> = got.to_vec2().unwrap();
        for (j, (&t, &w)) in targets.iter().zip(&weights).enumerate() {
            let row = &rows[j];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            sum += w as f64 * (lse - row[t as usize] as f64);
            count += w as f64;
        }
        let dumped_loss = sum / count;
        assert!(
            rel(dumped_loss, r["mean_loss"].as_f64().unwrap()) < 1e-5,
            "{name}: the dump's loss {dumped_loss} vs {r}"
        );
    }
    // The adapter changes the model (so applying it is tested, not a no-op).
    assert!(
        rel(
            gj["adapter"]["loss"].as_f64().unwrap(),
            gj["base"]["loss"].as_f64().unwrap()
        ) > 1e-3
    );
}

/// A draft's adapter added into its dense weights at load (`merge_adapter`) computes
/// transformers + PEFT's adapted logits, as the adapter run beside the base does; held in NF4,
/// the adapter still runs beside the base; an adapter of another rank is refused by module.
#[test]
fn an_adapter_merged_into_the_weights_gives_the_adapted_logits() {
    let g = golden();
    let input = golden_input(&g);
    let merged = InferenceOptions {
        merge_adapter: true,
        ..dense_f32()
    };
    let m = infer::load(MODEL, Some(Path::new(ADAPTER)), &merged).unwrap();
    assert!(
        m.model.adapters().is_empty(),
        "no adapter runs beside the weights"
    );
    let got = m.model.forward(&input).unwrap().squeeze(0).unwrap();
    let want = &g["adapter.logits"];
    let rel_diff = common::max_abs_diff(&got, want) / common::max_abs(want);
    assert!(rel_diff < 1e-4, "merged: logits differ by {rel_diff}");
    let base = &g["base.logits"];
    assert!(common::max_abs_diff(base, want) / common::max_abs(want) > 100.0 * rel_diff.max(1e-7));
    let nf4 = InferenceOptions {
        quantize: Some(true),
        ..merged.clone()
    };
    // Held in NF4, the adapter runs beside the base as usual.
    let q = infer::load(MODEL, Some(Path::new(ADAPTER)), &nf4).unwrap();
    assert!(!q.model.adapters().is_empty());
    // An adapter whose config says another rank than its weights have is refused, by module.
    let tmp = tempfile::tempdir().unwrap();
    let files = ["adapter_config.json", "adapter_model.safetensors"];
    common::copy_files(Path::new(ADAPTER), &files, tmp.path());
    let cfg = tmp.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["r"] = 4.into();
    std::fs::write(&cfg, json.to_string()).unwrap();
    let err = infer::load(MODEL, Some(tmp.path()), &merged)
        .err()
        .expect("a rank that does not fit is refused")
        .to_string();
    assert!(
        err.contains("model.layers.0.") && err.contains("(r = 4)"),
        "{err}"
    );
}

/// Inference on the CPU holds an NF4 base as its dequantized values (dequantized once, not at
/// every call): dense weights computing what the NF4 model computes.
#[test]
fn an_nf4_base_for_inference_on_the_cpu_is_dequantized_once_to_the_same_model() {
    let g = golden();
    let input = golden_input(&g);
    let nf4 = InferenceOptions {
        quantize: Some(true),
        ..dense_f32()
    };
    let held = infer::load(MODEL, None, &nf4).unwrap();
    let dense_layers = held.model.layers[0]
        .linears()
        .iter()
        .all(|(_, l)| matches!(l.base, kiln::model::decoder::FrozenWeight::Dense(_)));
    assert!(dense_layers, "held as dense values");
    let per_call = kiln::model::load(
        Path::new(MODEL),
        &kiln::model::LoadOptions {
            layers: None,
            nf4_dequantized: false,
            device: Device::Cpu,
            dtype: DType::F32,
            quantize: true,
            lora: None,
            seed: 0,
        },
    )
    .unwrap();
    let (a, b) = (
        held.model.forward(&input).unwrap(),
        per_call.model.forward(&input).unwrap(),
    );
    let diff = common::max_abs_diff(&a, &b) / common::max_abs(&b);
    assert!(diff < 1e-6, "{diff}");
    // NF4 is not the dense model: the comparison can fail.
    let dense = infer::load(MODEL, None, &dense_f32()).unwrap();
    let off = common::max_abs_diff(&dense.model.forward(&input).unwrap(), &b) / common::max_abs(&b);
    assert!(off > 1e-3, "{off}");
    // In bf16 the held values would be rounded once more (a merge would change): kept as NF4.
    let bf16 = InferenceOptions {
        dtype: Some(DType::BF16),
        ..nf4
    };
    let kept = infer::load(MODEL, None, &bf16).unwrap();
    assert!(matches!(
        kept.model.layers[0].linears()[0].1.base,
        kiln::model::decoder::FrozenWeight::Nf4(_)
    ));
}

#[test]
fn greedy_generation_equals_transformers_token_for_token() {
    let g = golden();
    let prompt = ids(&g["prompt_ids"]);
    for (name, adapter) in [("base", None), ("adapter", Some(Path::new(ADAPTER)))] {
        let m = infer::load(MODEL, adapter, &dense_f32()).unwrap();
        let out = greedy(&m, &prompt, 24);
        assert_eq!(out.tokens, ids(&g[&format!("{name}.generated")]), "{name}");
    }
    // Through the binary, from the prompt text, streaming.
    let o = kiln(&[
        "generate",
        "--model",
        MODEL,
        "--adapter",
        ADAPTER,
        "--quantize",
        "none",
        "--dtype",
        "f32",
        "--device",
        "cpu",
        "--prompt",
        golden_json()["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "24",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let toks: Vec<u32> = r["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(toks, ids(&g["adapter.generated"]));
    assert_eq!(r["stop_reason"], "max_tokens");
}

#[test]
fn kv_cache_decoding_equals_full_forward_and_stop_strings_cut() {
    let m = infer::load(MODEL, Some(Path::new(ADAPTER)), &dense_f32()).unwrap();
    let ids: Vec<u32> = vec![506, 50, 60, 70, 80, 90, 100, 110];
    let full = m
        .model
        .forward(
            &Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut cache = kiln::model::KvCache::new(m.model.layers.len());
    let step = |cache: &mut kiln::model::KvCache, s: &[u32]| {
        m.model
            .forward_cached(
                &Tensor::new(s, &Device::Cpu).unwrap().unsqueeze(0).unwrap(),
                cache,
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
    };
    let prefill = step(&mut cache, &ids[..4]);
    assert!(common::max_abs_diff(&prefill, &full.get(3).unwrap()) < 1e-4);
    for i in 4..ids.len() {
        let l = step(&mut cache, &ids[i..i + 1]);
        assert!(
            common::max_abs_diff(&l, &full.get(i).unwrap()) < 1e-4,
            "token {i}"
        );
    }
    assert_eq!(cache.len, ids.len());
    // A stop string ends generation and is not part of the text; streamed pieces add up to it.
    let params = infer::generate::SamplingParams {
        max_new_tokens: 24,
        ..Default::default()
    };
    let free =
        infer::generate::generate(&m.model, &m.tokenizer, &ids, &params, &[], &[], &mut |_| {})
            .unwrap();
    let cut = free.text.chars().skip(5).take(3).collect::<String>();
    let mut streamed = String::new();
    let stopped = infer::generate::generate(
        &m.model,
        &m.tokenizer,
        &ids,
        &params,
        &[],
        std::slice::from_ref(&cut),
        &mut |p| streamed.push_str(p),
    )
    .unwrap();
    assert_eq!(stopped.stop_reason, infer::generate::StopReason::StopString);
    assert_eq!(stopped.text, free.text[..free.text.find(&cut).unwrap()]);
    assert_eq!(streamed, stopped.text);
    // A stop token ends it too.
    let stop_at = free.tokens[3];
    let s = infer::generate::generate(
        &m.model,
        &m.tokenizer,
        &ids,
        &params,
        &[stop_at],
        &[],
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(
        s.tokens,
        free.tokens[..free.tokens.iter().position(|&t| t == stop_at).unwrap()]
    );
    assert_eq!(s.stop_reason, infer::generate::StopReason::EndOfTurn);
}

#[test]
fn adapter_on_the_4bit_base_is_close_to_dense_and_mismatched_adapters_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let o = kiln(&[
        "eval",
        "--model",
        MODEL,
        "--adapter",
        ADAPTER,
        "--data",
        "tests/fixtures/data/eval_text.jsonl",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let dense = golden_json()["adapter"]["loss"].as_f64().unwrap();
    let nf4 = r["mean_loss"].as_f64().unwrap();
    assert!(
        rel(nf4, dense) > 1e-6 && rel(nf4, dense) < 0.05,
        "nf4 {nf4} vs dense {dense}"
    );
    // An adapter made for another base: shapes do not fit.
    let tiny = tmp.path().join("tiny");
    kiln::model::tiny::init_tiny("llama", &tiny, 0).unwrap();
    let o = kiln(&[
        "eval",
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        ADAPTER,
        "--data",
        "tests/fixtures/data/eval_text.jsonl",
        "--device",
        "cpu",
    ]);
    expect_error(&o, &["adapter_model.safetensors", "another base model"]);
}

#[test]
fn exact_match_generates_extracts_and_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let m = infer::load(MODEL, None, &dense_f32()).unwrap();
    // References: what the model will answer for the first prompt, something else for the second.
    let prompt_ids = m.tokenizer.encode("Q: 2+2?", true).unwrap();
    let answer = greedy(&m, &prompt_ids, 12).text;
    let rows = [
        serde_json::json!({"prompt": "Q: 2+2?", "completion": answer}),
        serde_json::json!({"prompt": "Q: 3+3?", "completion": "certainly not this"}),
    ];
    let data = tmp.path().join("qa.jsonl");
    std::fs::write(
        &data,
        rows.iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    // The rows scored by exact match, with `extra` flags.
    let scored = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "eval",
            "--model",
            MODEL,
            "--quantize",
            "none",
            "--device",
            "cpu",
            "--data",
            data.to_str().unwrap(),
            "--task",
            "exact-match",
            "--answer-regex",
            "(?s)(.+)",
            "--max-new-tokens",
            "12",
            "--json",
        ];
        args.extend(extra);
        let o = kiln(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let r = scored(&[]);
    assert_eq!(r["rows"], 2);
    assert_eq!(r["accuracy"], 0.5, "{r}");
    assert_eq!(r["items"][0]["correct"], true);
    assert_eq!(r["items"][1]["correct"], false);
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["draft_acceptance"].is_null());
    // With a draft (speculative decoding): the same generations and scores.
    let d = scored(&[
        "--draft",
        "tests/fixtures/llama_tiny_b",
        "--draft-tokens",
        "3",
    ]);
    assert_eq!(d["accuracy"], r["accuracy"]);
    for i in 0..2 {
        assert_eq!(d["items"][i]["generated"], r["items"][i]["generated"]);
    }
    assert!(d["draft_acceptance"].as_f64().is_some());
    // GSM8K layout with the default pattern: the random model is wrong on all of them.
    let o = kiln(&[
        "eval",
        "--model",
        MODEL,
        "--quantize",
        "none",
        "--device",
        "cpu",
        "--data",
        "tests/fixtures/data/gsm8k_sample.jsonl",
        "--field",
        "prompt=question",
        "--field",
        "completion=answer",
        "--task",
        "exact-match",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["rows"], 2);
    assert_eq!(r["items"][0]["reference"], "72");
    assert_eq!(r["accuracy"], 0.0);
}

#[test]
fn training_evaluates_keeps_the_best_adapter_and_prints_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let sets = [
        format!("output.dir=\"{}\"", out.display()),
        "training.max_steps=6".into(),
        "training.num_epochs=1".into(),
        "training.eval_steps=3".into(),
        "training.save_best=true".into(),
        "training.sample_prompts=[\"Who are you?\"]".into(),
        "training.sample_max_new_tokens=8".into(),
    ];
    let mut args = vec!["train", "recipes/tiny-chat.toml"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .env("KILN_CACHE", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("eval at step 3: loss") && err.contains("eval at step 6: loss"),
        "{err}"
    );
    assert!(err.contains("sample › Who are you?"), "{err}");
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 2);
    // best/ holds the adapter of the lower evaluation loss: its loss on the validation rows
    // equals the logged one.
    let last_is_best = evals[1]["eval_loss"].as_f64() < evals[0]["eval_loss"].as_f64();
    let best = std::fs::read(out.join("best/adapter_model.safetensors")).unwrap();
    let last = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(
        best == last,
        last_is_best,
        "best/ must hold the adapter of the lowest eval loss"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("samples.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // Eval without validation data is refused up front.
    let o = kiln(&[
        "train",
        "recipes/tiny.toml",
        "--set",
        "training.eval_steps=5",
    ]);
    expect_error(&o, &["training.eval_steps", "data.val_split"]);
}

#[test]
fn chat_mode_applies_the_template_one_shot_and_interactively() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    kiln::model::tiny::init_tiny("llama", &model, 0).unwrap();
    let m = infer::load(model.to_str().unwrap(), None, &dense_f32()).unwrap();
    // What the model says after the Llama 3 template's rendering of one user turn.
    let rendered = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
    let ids = m.tokenizer.encode_with_offsets(rendered).unwrap().0;
    let want = greedy(&m, &ids, 10);
    let base = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "--chat",
        "--max-new-tokens",
        "10",
    ];
    let mut args = base.to_vec();
    args.extend(["--prompt", "Hi there", "--json"]);
    let o = kiln(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["text"], want.text.as_str());
    assert_eq!(r["prompt_tokens"], ids.len());
    // Interactive: the same first answer, then a second turn, then /exit.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(base)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hi there\nAnd again\n/exit\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.starts_with(&format!("{}\n", want.text)), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stderr)
            .matches("tokens/s")
            .count(),
        2
    );
}

/// Speculative decoding (`kiln generate --draft`) on every family's tiny model: greedy output
/// equals plain greedy decoding token for token, with a draft that mostly agrees (the same
/// model in NF4: partial acceptance, so both KV caches roll back mid-round) and one that
/// does not (another random Llama), for draft lengths 1, 3 and 6; Phi-4-mini's run crosses its
/// LongRoPE switch (original context 32).
#[test]
fn speculative_greedy_equals_plain_greedy_on_every_family() {
    let nf4 = InferenceOptions {
        random_weights: false,
        layers: None,
        quantize: Some(true),
        ..dense_f32()
    };
    let other = infer::load("tests/fixtures/llama_tiny_b", None, &dense_f32()).unwrap();
    let (mut partial, mut rolled_back) = (0, 0);
    for family in [
        "llama_tiny_a",
        "qwen2_tiny",
        "qwen3_tiny",
        "mistral_tiny",
        "phi3_tiny",
        "phi4mini_tiny",
        "gemma_tiny",
        "gemma2_tiny",
        "gemma3_tiny",
        "mixtral_tiny",
        "qwen3moe_tiny",
    ] {
        let dir = format!("tests/fixtures/{family}");
        let target = infer::load(&dir, None, &dense_f32()).unwrap();
        let close = infer::load(&dir, None, &nf4).unwrap();
        let prompt = target
            .tokenizer
            .encode("Give three tips for staying healthy.", true)
            .unwrap();
        let plain = greedy(&target, &prompt, 30);
        let stops = infer::generate::stop_tokens(&target.tokenizer, &target.model, &target.dir);
        let params = infer::generate::SamplingParams {
            max_new_tokens: 30,
            ..Default::default()
        };
        for (draft, name) in [(&close, "nf4"), (&other, "llama_tiny_b")] {
            for k in [1, 3, 6] {
                let (g, stats) = infer::speculative::generate_speculative(
                    &target.model,
                    &draft.model,
                    k,
                    &target.tokenizer,
                    &prompt,
                    &params,
                    &stops,
                    &[],
                    &mut |_| {},
                )
                .unwrap();
                assert_eq!(
                    g.tokens, plain.tokens,
                    "{family}, draft {name}, k {k}: speculative greedy output differs"
                );
                assert_eq!(g.stop_reason, plain.stop_reason);
                if stats.accepted > 0 && stats.accepted < stats.proposed {
                    partial += 1;
                }
                rolled_back += usize::from(stats.accepted < stats.proposed);
            }
        }
    }
    // The runs exercised partial acceptance and rollback, not only all-or-nothing rounds.
    assert!(
        partial > 5 && rolled_back > 20,
        "{partial} partial, {rolled_back} rolled back"
    );
}

/// A KV cache cut back after a pass of several tokens continues as if they had never run, and
/// a draft with another tokenizer is refused by name.
#[test]
fn kv_cache_rollback_and_draft_tokenizer_check() {
    let m = infer::load(MODEL, None, &dense_f32()).unwrap();
    let t = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut cache = kiln::model::KvCache::new(m.model.layers.len());
    m.model
        .forward_cached(&t(&[5, 17, 40]), &mut cache)
        .unwrap();
    m.model
        .forward_cached_all(&t(&[9, 33, 2, 71]), &mut cache)
        .unwrap();
    cache.truncate(4).unwrap();
    let rolled = m.model.forward_cached(&t(&[88]), &mut cache).unwrap();
    let mut fresh = kiln::model::KvCache::new(m.model.layers.len());
    let direct = m
        .model
        .forward_cached(&t(&[5, 17, 40, 9, 88]), &mut fresh)
        .unwrap();
    let d = common::max_abs_diff(&rolled, &direct);
    assert!(d < 1e-4, "rolled-back cache: max |Δlogit| = {d}");
    assert_eq!(cache.len, 5);

    let qwen_dir = tempfile::tempdir().unwrap();
    let qwen_dir = common::tokenizer_dir("qwen2.5", qwen_dir.path());
    let qwen = kiln::tokenizer::TokenizerInfo::load(&qwen_dir, Default::default()).unwrap();
    let why = kiln::tokenizer::check_same_ids(&m.tokenizer, &qwen).unwrap_err();
    assert!(why.contains("tokens against"), "{why}");
    assert!(kiln::tokenizer::check_same_ids(&m.tokenizer, &m.tokenizer).is_ok());
    let o = kiln(&[
        "generate",
        "--model",
        MODEL,
        "--draft",
        "tests/fixtures/llama_tiny_b",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "5",
        "--compare-plain",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("proposed tokens accepted"));
    assert!(common::stderr(&o).contains("the same output"));
}

/// `--random-weights`: a directory of config.json and a tokenizer generates (speed benchmarks on
/// real shapes), the draft random too; without the flag the missing checkpoint is named.
#[test]
fn random_weights_generate_without_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shapes");
    let files = ["config.json", "tokenizer.json"];
    common::copy_files(Path::new("tests/fixtures/llama_tiny_a"), &files, &dir);
    let d = dir.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        d,
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ];
    let o = common::kiln(
        &[
            &args[..],
            &["--random-weights", "--draft", d, "--draft-layers", "1"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("proposed tokens accepted"));
    common::expect_error(&common::kiln(&args), &["shapes", "safetensors"]);
}
