//! A GGUF file as the training base (`model.path = "base.gguf"`), on a Q8_0 GGUF that kiln
//! exports from a tiny model in the test: training runs and resumes, `eval --adapter` on the
//! GGUF base gives the trained model's loss, the adapter exports against the same GGUF (and
//! llama.cpp with it generates what kiln does: `llllllllllll` where the base alone says
//! ` witholpnt…`), and the merge into a new GGUF keeps the fine-tune.

mod common;

use std::path::Path;

use common::kiln_stdout;
use serde_json::Value as Json;

/// A tiny Llama exported as Q8_0 GGUF, and validation rows (the first 8 Alpaca rows).
fn gguf_base(tmp: &Path) -> (String, String) {
    let tiny = tmp.join("tiny");
    kiln::model::tiny::init_tiny("llama", &tiny, 11).unwrap();
    let base = tmp.join("base.gguf");
    kiln_stdout(&[
        "export",
        "gguf",
        "--model",
        tiny.to_str().unwrap(),
        "-o",
        base.to_str().unwrap(),
        "--quant",
        "q8_0",
        "--no-modelfile",
    ]);
    let rows = std::fs::read_to_string("datasets/alpaca_tiny.jsonl").unwrap();
    let val = tmp.join("val.jsonl");
    std::fs::write(&val, rows.lines().take(8).collect::<Vec<_>>().join("\n")).unwrap();
    (
        base.to_str().unwrap().to_string(),
        val.to_str().unwrap().to_string(),
    )
}

fn recipe(tmp: &Path, base: &str, val: &str, steps: usize) -> std::path::PathBuf {
    let path = tmp.join("recipe.toml");
    let text = std::fs::read_to_string("tests/fixtures/gguf_base/recipe.toml.in")
        .unwrap()
        .replace("{base}", base)
        .replace("{val}", val)
        .replace("{steps}", &steps.to_string())
        .replace("{out}", &tmp.join("run").display().to_string());
    std::fs::write(&path, text).unwrap();
    path
}

fn metrics(run: &Path) -> Vec<Json> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn eval_loss(model: &str, adapter: Option<&Path>, val: &str) -> f64 {
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--data",
        val,
        "--max-seq-len",
        "256",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    args.push("--json");
    let out = kiln_stdout(&args);
    serde_json::from_str::<Json>(&out).unwrap()["mean_loss"]
        .as_f64()
        .unwrap()
}

#[test]
fn a_gguf_base_trains_evaluates_resumes_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, val) = gguf_base(tmp.path());
    let run = tmp.path().join("run");

    // Train 6 steps from the GGUF file.
    let r = recipe(tmp.path(), &base, &val, 6);
    kiln_stdout(&["train", r.to_str().unwrap(), "-q"]);
    let m = metrics(&run);
    let losses: Vec<f64> = m.iter().filter_map(|x| x["loss"].as_f64()).collect();
    let evals: Vec<f64> = m.iter().filter_map(|x| x["eval_loss"].as_f64()).collect();
    assert_eq!((losses.len(), evals.len()), (6, 2), "{m:?}");
    assert!(
        evals[1] < evals[0],
        "validation loss did not fall: {evals:?}"
    );

    // The adapter has Hugging Face module names.
    let adapter = run.join("adapter");
    let cfg: Json = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["target_modules"][0], "q_proj");
    let weights = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(weights
        .keys()
        .any(|k| k == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));

    // `eval --adapter` on the GGUF base gives the trained model's validation loss.
    let with_adapter = eval_loss(&base, Some(&adapter), &val);
    assert!(
        (with_adapter - evals[1]).abs() < 1e-5 * evals[1],
        "eval --adapter {with_adapter} vs the run's {}",
        evals[1]
    );
    assert!(eval_loss(&base, None, &val) > with_adapter + 0.05);

    // Killed at step 5 and resumed from the step-3 checkpoint: the uninterrupted run's losses
    // and adapter.
    let resumed = tmp.path().join("run-resume");
    let set_dir = format!("output.dir=\"{}\"", resumed.display());
    let bin = std::env::var("KILN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kiln").into());
    let o = std::process::Command::new(&bin)
        .args(["train", r.to_str().unwrap(), "-q", "--set", &set_dir])
        .env("KILN_FAULT", "kill-step:5")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        None,
        "killed by a signal: {}",
        common::stderr(&o)
    );
    kiln_stdout(&[
        "train",
        r.to_str().unwrap(),
        "-q",
        "--set",
        &set_dir,
        "--resume",
    ]);
    let again: Vec<f64> = metrics(&resumed)
        .iter()
        .filter_map(|x| x["loss"].as_f64())
        .collect();
    assert_eq!(again, losses);
    let bytes = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&resumed), bytes(&run));

    // The adapter exports against the same GGUF (names llama.cpp's), and merges into a new GGUF
    // whose loss is the fine-tune's.
    let lora = tmp.path().join("lora/adapter.gguf");
    kiln_stdout(&[
        "export",
        "gguf-adapter",
        "--adapter",
        adapter.to_str().unwrap(),
        "--model",
        &base,
        "-o",
        lora.to_str().unwrap(),
    ]);
    let f = kiln::gguf::GgufFile::open(&lora).unwrap();
    assert_eq!(f.require_str("general.type").unwrap(), "adapter");
    assert!(f.tensor("blk.0.attn_q.weight.lora_a").is_some());
    let modelfile = std::fs::read_to_string(lora.with_file_name("Modelfile")).unwrap();
    assert!(
        modelfile.contains(&format!("FROM {base}")) && modelfile.contains("ADAPTER ./adapter.gguf"),
        "{modelfile}"
    );
    let merged = tmp.path().join("merged/model.gguf");
    kiln_stdout(&[
        "export",
        "gguf",
        "--model",
        &base,
        "--adapter",
        adapter.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
        "--quant",
        "f32",
        "--no-modelfile",
    ]);
    // F32 of the NF4-held base with the adapter merged: the fine-tune, within NF4's rounding of
    // the merged weights' base part.
    let merged_loss = eval_loss(merged.to_str().unwrap(), None, &val);
    assert!(
        (merged_loss - with_adapter).abs() < 0.02 * with_adapter,
        "merged GGUF {merged_loss} vs base + adapter {with_adapter}"
    );

    // `merge` to a Hugging Face directory is refused, naming what to run instead.
    let o = common::kiln(&[
        "merge",
        "--model",
        &base,
        "--adapter",
        adapter.to_str().unwrap(),
        "-o",
        tmp.path().join("hf").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(common::stderr(&o).contains("kiln export gguf --model"));

    // llama.cpp with the exported adapter on the same GGUF generates what kiln generates from
    // base + adapter (tests/fixtures/gguf_base/golden.json, scripts/golden/make_gguf_base_golden.py:
    // the same model, rows and recipe; kiln's base dense from the Q8_0 file, llama.cpp's in
    // Q8_0 with 8-bit activations, so the texts must agree on their first third at least, as
    // tests/gguf.rs asks of Q8_0 files).
    let golden: Json = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/gguf_base/golden.json").unwrap(),
    )
    .unwrap();
    let theirs = common::llama_cpp_text(golden["llama_cpp_greedy_with_adapter"].as_str().unwrap());
    let ours = common::generated_text(&[
        "--model",
        &base,
        "--adapter",
        adapter.to_str().unwrap(),
        "--quantize",
        "none",
        "--dtype",
        "f32",
        "--max-new-tokens",
        "12",
        "--prompt",
        golden["prompt"].as_str().unwrap(),
    ])
    .replace('\0', "");
    let same = ours
        .chars()
        .zip(theirs.chars())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        same * 3 >= theirs.chars().count() && !theirs.is_empty(),
        "kiln {ours:?} vs llama.cpp {theirs:?}"
    );

    // data inspect reads the GGUF's tokenizer.
    let out = kiln_stdout(&["data", "inspect", r.to_str().unwrap(), "--json", "-n", "1"]);
    let j: Json = serde_json::from_str(&out).unwrap();
    assert!(j["stats"]["rows"].as_u64().unwrap() > 0);
}
