//! `kiln merge` against PEFT's merge_and_unload (tests/fixtures/peft_merged_a.safetensors, made
//! by scripts/golden/make_merge_golden.py) and against the trained model it came from.

mod common;
use common::{expect_error, kiln};

use candle_core::Device;

const MODEL: &str = "tests/fixtures/llama_tiny_a";
const ADAPTER: &str = "tests/fixtures/peft_adapter_a";

/// `kiln merge --model MODEL --adapter ADAPTER -o OUT EXTRA...`.
fn merge(model: &str, out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["merge", "--model", model, "--adapter", ADAPTER, "-o", out];
    args.extend_from_slice(extra);
    kiln(&args)
}

#[test]
fn merge_into_original_equals_peft_merge_and_unload() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = merge(
        MODEL,
        out.to_str().unwrap(),
        &["--into", "original", "--dtype", "f32"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let golden =
        candle_core::safetensors::load("tests/fixtures/peft_merged_a.safetensors", &Device::Cpu)
            .unwrap();
    assert_eq!(golden.len(), 14);
    for (name, want) in &golden {
        let rel = common::max_abs_diff(&ours[name], want) / common::max_abs(want);
        assert!(rel < 1e-6, "{name}: {rel}");
    }
    // Every base tensor is there, nothing more; config and tokenizer files come along.
    let base =
        candle_core::safetensors::load(format!("{MODEL}/model.safetensors"), &Device::Cpu).unwrap();
    let mut a: Vec<_> = ours.keys().collect();
    let mut b: Vec<_> = base.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert!(out.join("tokenizer.json").exists() && out.join("generation_config.json").exists());
    // The merged model evaluates as transformers + PEFT evaluated base + adapter.
    let o = kiln(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        "tests/fixtures/data/eval_text.jsonl",
        "--dtype",
        "f32",
        "--device",
        "cpu",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/eval_golden.json").unwrap())
            .unwrap();
    let want = golden["adapter"]["loss"].as_f64().unwrap();
    assert!(
        (r["mean_loss"].as_f64().unwrap() - want).abs() / want < 1e-5,
        "{r}"
    );
}

#[test]
fn merge_into_nf4_reproduces_the_trained_model_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Merges with the fidelity report and returns its line and mean KL:
    // "fidelity on 95 held-out tokens: perplexity trained (...) P, merged P (+0.000%), mean KL K nats"
    let report = |out: &str, extra: &[&str]| -> (String, f64) {
        let out = tmp.path().join(out);
        let mut args = vec!["--eval-data", "tests/fixtures/data/eval_text.jsonl"];
        args.extend(extra);
        let o = merge(MODEL, out.to_str().unwrap(), &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        println!("{stdout}");
        let line = stdout
            .lines()
            .find(|l| l.starts_with("fidelity on 95 held-out tokens"))
            .expect(&stdout)
            .to_string();
        let kl = line
            .split("mean KL ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let kl = kl.parse().unwrap();
        (line, kl)
    };
    let (line, kl) = report("merged", &["--dtype", "f32"]);
    assert!(kl < 1e-6, "{line}");
    // Into the original weights instead: a real difference, which the report shows.
    let (line, kl) = report("merged-original", &["--into", "original"]);
    assert!(kl > 1e-3, "{line}");
}

#[test]
fn merge_writes_the_requested_dtype_and_refuses_original_from_a_4bit_base() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    let o = merge(MODEL, out.to_str().unwrap(), &["--dtype", "bf16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert!(cfg.get("quantization_config").is_none());
    let t = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        t["model.layers.0.self_attn.q_proj.weight"].dtype(),
        candle_core::DType::BF16
    );
    // A bitsandbytes 4-bit base has no original weights to merge into.
    let q = tmp.path().join("q");
    let o = kiln(&["quantize", "--model", MODEL, "-o", q.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = merge(
        q.to_str().unwrap(),
        tmp.path().join("x").to_str().unwrap(),
        &["--into", "original"],
    );
    expect_error(&o, &["stored in 4-bit", "--into nf4"]);
    // Into nf4 from the 4-bit base works and equals the merge from the original base.
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    assert!(merge(
        q.to_str().unwrap(),
        a.to_str().unwrap(),
        &["--dtype", "f32"]
    )
    .status
    .success());
    assert!(merge(MODEL, b.to_str().unwrap(), &["--dtype", "f32"])
        .status
        .success());
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
}

fn continue_recipe(out: &std::path::Path, extra: &[&str]) -> kiln::recipe::Recipe {
    let text = format!(
        "[model]\npath = \"{MODEL}\"\nquantize = \"none\"\ndevice = \"cpu\"\ncompute_dtype = \"f32\"\n[data]\npath = \"tests/fixtures/data/eval_text.jsonl\"\n[lora]\nr = 8\nlora_alpha = 16\ntarget_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"down_proj\"]\ninit_adapter = \"{ADAPTER}\"\n[training]\nmax_steps = 2\nlearning_rate = 1e-3\n[output]\ndir = \"{}\"\n",
        out.display()
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    kiln::recipe::Recipe::parse(std::path::Path::new("t.toml"), &text, &overrides).unwrap()
}

#[test]
fn a_peft_adapter_continues_training_and_round_trips_with_peft_names() {
    let tmp = tempfile::tempdir().unwrap();
    let r = continue_recipe(&tmp.path().join("run"), &[]);
    let loaded = kiln::train::load_model(&r).unwrap();
    // Loaded as PEFT saved it: the model is transformers + PEFT's base + adapter.
    let examples = kiln::data::load_dataset(&r.data, &loaded.tokenizer, 0)
        .unwrap()
        .train;
    let report = kiln::infer::eval::eval_loss(
        &loaded.model,
        &examples,
        loaded.tokenizer.pad_id,
        1,
        None,
        &|_| {},
    )
    .unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/eval_golden.json").unwrap())
            .unwrap();
    let want = golden["adapter"]["loss"].as_f64().unwrap();
    assert!(
        (report.mean_loss - want).abs() / want < 1e-5,
        "{} vs {want}",
        report.mean_loss
    );
    // Saved by kiln: the same keys, shapes and values as the PEFT-written file.
    let saved = tmp.path().join("saved");
    kiln::model::peft::save_adapter(
        &saved,
        &loaded.model,
        &kiln::lora::LoraSettings::of(&r),
        MODEL,
    )
    .unwrap();
    let ours =
        candle_core::safetensors::load(saved.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let peft = candle_core::safetensors::load(
        format!("{ADAPTER}/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut a: Vec<_> = ours.keys().collect();
    let mut b: Vec<_> = peft.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for (k, t) in &peft {
        assert_eq!(ours[k].dims(), t.dims(), "{k}");
        assert_eq!(common::max_abs_diff(&ours[k], t), 0.0, "{k}");
    }
    // Training goes on from there.
    let summary = kiln::train::train_loaded(
        &r,
        &loaded,
        &kiln::train::TrainInputs::load(&r, &loaded).unwrap(),
        true,
    )
    .unwrap();
    assert!(
        (summary.first_loss - want).abs() / want < 1e-4,
        "first step starts from the adapter: {}",
        summary.first_loss
    );
    // A recipe that does not match the adapter is refused.
    let r = continue_recipe(&tmp.path().join("run2"), &["lora.r=16"]);
    let err = kiln::train::load_model(&r).err().unwrap().to_string();
    assert!(
        err.contains("init_adapter") && err.contains("r = 8") && err.contains("r = 16"),
        "{err}"
    );
}

#[test]
fn inspect_lists_tensors_of_files_models_and_adapters() {
    let o = kiln(&["inspect", ADAPTER, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["kind"], "PEFT adapter");
    assert_eq!(r["metadata"]["r"], 8);
    let tensors = r["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 36); // 3 layers x 6 modules x (A, B)
    let q_b = tensors
        .iter()
        .find(|t| t["name"] == "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight")
        .unwrap();
    assert_eq!(q_b["shape"], serde_json::json!([32, 8]));
    assert_eq!(q_b["bytes"], 32 * 8 * 4);
    let o = kiln(&["inspect", "tests/fixtures/llama_tiny_b"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("model directory")
            && text.contains("model.embed_tokens.weight")
            && text.contains("BF16"),
        "{text}"
    );
    let o = kiln(&["inspect", &format!("{MODEL}/model.safetensors")]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("lm_head.weight"));
    expect_error(&kiln(&["inspect", "Cargo.toml"]), &["Cargo.toml"]);
}
