//! The `kiln` binary end to end: the smoke recipe, init-tiny, quantize, and clear errors (exit
//! code 2, the file and the key named, no panic or backtrace) for bad input.

mod common;
use common::{expect_error, stderr};

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

fn kiln(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_CACHE", cache)
        .env("RUST_BACKTRACE", "1") // errors must stay clean even when backtraces are on
        .output()
        .expect("run kiln")
}

#[test]
fn smoke_recipe_trains_and_writes_a_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let set = format!("output.dir=\"{}\"", out.display());
    let o = kiln(&["train", "recipes/tiny.toml", "--set", &set], tmp.path());
    let err = stderr(&o);
    assert!(o.status.success(), "kiln train failed:\n{err}");
    assert!(
        err.contains("trainable params: 28,672 || all params: 279,104 || trainable%: 10.2729"),
        "{err}"
    );

    // Loss clearly down (mean of the first and last three steps).
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    // The smoke run shows learning plainly: at least a third off.
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(last < first * 2.0 / 3.0, "loss {first:.3} -> {last:.3}");

    // PEFT layout: keys, shapes, dtype, metadata, config.
    let adapter = out.join("adapter");
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    let mut expected = vec![];
    for layer in 0..4 {
        for (module, out_f) in [
            ("q_proj", 64),
            ("k_proj", 32),
            ("v_proj", 32),
            ("o_proj", 64),
        ] {
            let p = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            let a = st.tensor(&format!("{p}.lora_A.weight")).unwrap();
            let b = st.tensor(&format!("{p}.lora_B.weight")).unwrap();
            assert_eq!(a.shape(), &[16, 64], "{p} lora_A");
            assert_eq!(b.shape(), &[out_f, 16], "{p} lora_B");
            assert_eq!(a.dtype(), safetensors::Dtype::F32);
            expected.push(format!("{p}.lora_A.weight"));
            expected.push(format!("{p}.lora_B.weight"));
        }
    }
    expected.sort();
    assert_eq!(names, expected);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 16);
    assert_eq!(cfg["lora_alpha"], 32.0);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj"])
    );
    // save_steps = 20 wrote an intermediate checkpoint too.
    assert!(out.join("checkpoint-20/adapter_model.safetensors").exists());
    // No temporary files left behind.
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp-"), "leftover {name}");
    }
}

#[test]
fn init_tiny_is_deterministic_for_a_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n);
    for (name, seed) in [("a", "3"), ("b", "3"), ("c", "4")] {
        let o = kiln(
            &[
                "init-tiny",
                "--arch",
                "llama",
                "-o",
                dir(name).to_str().unwrap(),
                "--seed",
                seed,
            ],
            tmp.path(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let read = |n: &str| std::fs::read(dir(n).join("model.safetensors")).unwrap();
    assert!(read("a") == read("b"));
    assert!(read("a") != read("c"));
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(dir("a").join(f).exists(), "{f}");
    }
    let o = kiln(
        &[
            "init-tiny",
            "--arch",
            "gpt9",
            "-o",
            dir("d").to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown tiny architecture `gpt9`; available: llama"));
}

#[test]
fn quantize_writes_a_bitsandbytes_checkpoint_that_loads_back_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let q = tmp.path().join("base-nf4");
    kiln::model::tiny::init_tiny("llama", &base, 1).unwrap();
    let o = kiln(
        &[
            "quantize",
            "--model",
            base.to_str().unwrap(),
            "-o",
            q.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("quantized 28 tensors"),
        "{}",
        stderr(&o)
    );
    let cfg = kiln::io::read_json(&q.join("config.json")).unwrap();
    let qc = &cfg["quantization_config"];
    assert_eq!(qc["quant_method"], "bitsandbytes");
    assert_eq!(qc["bnb_4bit_quant_type"], "nf4");
    assert_eq!(qc["bnb_4bit_use_double_quant"], true);
    assert!(q.join("tokenizer.json").exists());
    let ckpt = kiln::model::loader::WeightFiles::open(&q).unwrap();
    let p = "model.layers.0.self_attn.q_proj.weight";
    for suffix in [
        "",
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        ".quant_state.bitsandbytes__nf4",
    ] {
        assert!(
            ckpt.contains(&format!("{p}{suffix}")),
            "missing {p}{suffix}"
        );
    }
    assert!(
        ckpt.contains("model.embed_tokens.weight")
            && !ckpt.contains("model.embed_tokens.weight.absmax")
    );

    // The stored 4-bit model computes exactly what quantizing on load computes.
    let opts = |quantize| kiln::model::LoadOptions {
        layers: None,
        nf4_dequantized: false,
        device: Device::Cpu,
        dtype: DType::F32,
        quantize,
        lora: None,
        seed: 0,
    };
    let from_file = kiln::model::load(&q, &opts(false)).unwrap();
    let on_load = kiln::model::load(&base, &opts(true)).unwrap();
    let ids = Tensor::new(&[[506u32, 40, 41, 42, 43, 44]], &Device::Cpu).unwrap();
    let d = common::max_abs_diff(
        &from_file.model.forward(&ids).unwrap(),
        &on_load.model.forward(&ids).unwrap(),
    );
    assert_eq!(d, 0.0);

    // A single file: every 2-D float tensor, embeddings included.
    let single = tmp.path().join("single-nf4.safetensors");
    let o = kiln(
        &[
            "quantize",
            "--model",
            base.join("model.safetensors").to_str().unwrap(),
            "-o",
            single.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&single).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .names()
        .contains(&"model.embed_tokens.weight.quant_state.bitsandbytes__nf4"));
    assert_eq!(
        st.tensor("model.norm.weight").unwrap().dtype(),
        safetensors::Dtype::BF16
    );
}

/// A recipe for the bad-input cases, with `model`, `data` and extra TOML appended.
fn write_recipe(dir: &Path, model: &str, data: &str, extra: &str) -> String {
    let path = dir.join("r.toml");
    let text = format!(
        "[model]\npath = \"{model}\"\ndevice = \"cpu\"\n[data]\npath = \"{data}\"\n[training]\nmax_steps = 1\n{extra}\n[output]\ndir = \"{}\"\n",
        dir.join("out").display()
    );
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn bad_input_gives_clear_errors_and_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = t.join("m");
    kiln::model::tiny::init_tiny("llama", &model, 0).unwrap();
    let m = model.to_str().unwrap();
    let good = "datasets/alpaca_tiny.jsonl";
    let run = |recipe: &str| kiln(&["train", recipe, "-q"], t);

    // Case table: what goes wrong, and what the message must name.
    let r = write_recipe(t, "/nonexistent/model", good, "");
    expect_error(
        &run(&r),
        &["/nonexistent/model", "model directory not found"],
    );

    std::fs::write(t.join("broken.toml"), "[model\npath = 1").unwrap();
    expect_error(
        &run(t.join("broken.toml").to_str().unwrap()),
        &["broken.toml", "line 1"],
    );

    let r = write_recipe(t, m, good, "learning_rat = 0.1");
    expect_error(
        &run(&r),
        &["r.toml", "unknown field `learning_rat`", "learning_rate"],
    );

    let r = write_recipe(t, m, good, "lr_scheduler = \"exponential\"");
    expect_error(&run(&r), &["unknown variant `exponential`", "cosine"]);

    let r = write_recipe(t, m, good, "[lora]\nr = 0");
    expect_error(&run(&r), &["`lora.r` must be at least 1"]);

    let r = write_recipe(t, m, good, "[lora]\ntarget_modules = [\"q_proj\", \"qkv\"]");
    expect_error(&run(&r), &["unknown module `qkv`", "all-linear"]);

    let r = write_recipe(t, m, good, "[optimizer]\nname = \"adam\"");
    expect_error(&run(&r), &["unknown section `[optimizer]`"]);

    std::fs::write(
        t.join("no-output.toml"),
        format!("[model]\npath = \"{m}\"\n[data]\npath = \"{good}\"\n"),
    )
    .unwrap();
    expect_error(
        &run(t.join("no-output.toml").to_str().unwrap()),
        &["missing section `[output]`"],
    );

    expect_error(
        &run(t.join("missing.toml").to_str().unwrap()),
        &["missing.toml", "recipe file not found"],
    );

    let r = write_recipe(t, m, good, "");
    expect_error(
        &kiln(&["train", &r, "--set", "training.max_steps"], t),
        &["--set expects KEY=VALUE"],
    );
    expect_error(
        &kiln(&["train", &r, "--set", "training.warmup=3"], t),
        &["unknown field `warmup`"],
    );

    let bad = t.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"only\"}\n",
    )
    .unwrap();
    let r = write_recipe(t, m, bad.to_str().unwrap(), "");
    expect_error(&run(&r), &["bad.jsonl:2", "no `output` field"]);

    std::fs::write(
        &bad,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"a\" \"output\"}\n",
    )
    .unwrap();
    expect_error(&run(&r), &["bad.jsonl:3", "not valid JSON"]);

    std::fs::write(&bad, "{\"instruction\": \"a\", \"output\": 42}\n").unwrap();
    expect_error(
        &run(&r),
        &[
            "bad.jsonl:1",
            "field `output` must be a string, found a number",
        ],
    );

    std::fs::write(&bad, "").unwrap();
    expect_error(&run(&r), &["bad.jsonl", "the dataset is empty"]);

    let r = write_recipe(t, m, "/nonexistent/data.jsonl", "");
    expect_error(
        &run(&r),
        &["/nonexistent/data.jsonl", "dataset file not found"],
    );

    // Model directories: no tokenizer, truncated weights, unknown architecture, wrong shapes.
    let broken = t.join("broken-model");
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
    };
    copy(&model, &broken);
    std::fs::remove_file(broken.join("tokenizer.json")).unwrap();
    let r = write_recipe(t, broken.to_str().unwrap(), good, "");
    expect_error(&run(&r), &["tokenizer.json not found"]);

    copy(&model, &broken);
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    std::fs::write(
        broken.join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    expect_error(&run(&r), &["model.safetensors", "truncated or corrupt"]);

    copy(&model, &broken);
    let mut cfg = kiln::io::read_json(&model.join("config.json")).unwrap();
    cfg["model_type"] = "mamba".into();
    std::fs::write(broken.join("config.json"), cfg.to_string()).unwrap();
    expect_error(
        &run(&r),
        &[
            "config.json",
            "model_type `mamba` is not supported",
            "llama",
        ],
    );

    cfg["model_type"] = "llama".into();
    cfg["intermediate_size"] = 200.into();
    std::fs::write(broken.join("config.json"), cfg.to_string()).unwrap();
    expect_error(
        &run(&r),
        &[
            "gate_proj.weight",
            "has shape [176, 64] but config.json implies [200, 64]",
        ],
    );

    std::fs::remove_file(broken.join("config.json")).unwrap();
    expect_error(&run(&r), &["config.json not found"]);

    // Command line.
    expect_error(
        &kiln(
            &[
                "quantize",
                "--model",
                "/nonexistent",
                "-o",
                t.join("q").to_str().unwrap(),
            ],
            t,
        ),
        &["/nonexistent"],
    );
    let o = kiln(&["train"], t);
    assert_eq!(o.status.code(), Some(2), "clap usage errors exit with 2");
}

#[test]
fn data_inspect_shows_trained_tokens_and_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    // JSON: examples with their masks, and the statistics.
    let o = kiln(
        &[
            "data",
            "inspect",
            "recipes/tiny-chat.toml",
            "--n",
            "2",
            "--json",
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let examples = report["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 2);
    assert_eq!(report["files"][0]["format"], "sharegpt");
    assert_eq!(report["stats"]["rows"], 120);
    assert_eq!(report["stats"]["val_examples"], 12);
    assert_eq!(report["stats"]["examples"], 108);
    assert!(report["packing"]["sequences"].as_u64().unwrap() < 108);
    for ex in examples {
        let mask = ex["loss_mask"].as_array().unwrap();
        assert_eq!(mask.len(), ex["input_ids"].as_array().unwrap().len());
        let trained: String = ex["segments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["trained"] == true)
            .map(|s| s["text"].as_str().unwrap())
            .collect();
        // The first conversation's assistant turns, each with its end-of-turn token.
        assert!(trained.ends_with("<|eot_id|>"), "{trained}");
        assert!(!trained.contains("<|start_header_id|>"), "{trained}");
    }
    assert!(examples[0]["text"].as_str().unwrap().starts_with(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
    ));

    // Text (not a terminal): trained spans marked with ⟦ ⟧, statistics at the end.
    let o = kiln(
        &[
            "data",
            "inspect",
            "recipes/tiny.toml",
            "-n",
            "1",
            "--set",
            "data.train_on_inputs=false",
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.contains("── example 1 (datasets/alpaca_tiny.jsonl:1)"),
        "{text}"
    );
    assert!(
        text.contains("### Response:\n⟦1.Eat a balanced diet"),
        "{text}"
    );
    assert!(text.contains("rows 100  examples 98"), "{text}");
    assert!(text.contains("truncated 45  dropped 2"), "{text}");
    assert!(text.contains("chat template: none"), "{text}");

    // Bad input to inspect is reported like training's.
    let r = write_recipe(tmp.path(), "tiny:llama", "/nonexistent/rows.jsonl", "");
    expect_error(
        &kiln(&["data", "inspect", &r], tmp.path()),
        &["/nonexistent/rows.jsonl", "dataset file not found"],
    );
}

/// More of the bad-input table (with the one above, 33 cases): GGUF files, adapters that do not
/// fit their base, LoRA targets the architecture lacks, export options, conflicting flags and
/// an unwritable output. Each: exit code 2, `error: ` and the file or flag named, no panic.
#[test]
fn bad_gguf_adapter_and_cli_input_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let base = "tests/fixtures/llama_tiny_a";
    let gguf = t.join("model.gguf");
    let o = kiln(
        &[
            "export",
            "gguf",
            "--model",
            base,
            "-o",
            gguf.to_str().unwrap(),
            "--quant",
            "q8_0",
        ],
        t,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&gguf).unwrap();

    // GGUF: wrong magic (inspect), truncated (generate), a tensor offset moved (eval).
    let bad = t.join("bad.gguf");
    std::fs::write(&bad, [b"GGML".as_slice(), &bytes[4..]].concat()).unwrap();
    expect_error(
        &kiln(&["inspect", bad.to_str().unwrap()], t),
        &["bad.gguf", "not a GGUF file"],
    );
    // A file without the GGUF magic given as --model: named as neither a GGUF file nor a model
    // directory, for every command that takes a model (not "junk.gguf/config.json: Not a directory").
    let junk = t.join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let j = junk.to_str().unwrap();
    for args in [
        vec!["eval", "--model", j, "--data", "x.jsonl"],
        vec!["generate", "--model", j, "--prompt", "hi"],
        vec!["export", "gguf", "--model", j, "-o", "o.gguf"],
        vec!["merge", "--model", j, "--adapter", "a", "-o", "m"],
    ] {
        let o = kiln(&args, t);
        expect_error(
            &o,
            &["junk.gguf", "neither a GGUF file", "nor a model directory"],
        );
        assert!(!stderr(&o).contains("Not a directory"), "{args:?}");
    }
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(
        &kiln(
            &[
                "generate",
                "--model",
                bad.to_str().unwrap(),
                "--prompt",
                "hi",
            ],
            t,
        ),
        &["bad.gguf", "truncated"],
    );
    let f = kiln::gguf::GgufFile::open(&gguf).unwrap();
    let last = f.tensors.last().unwrap();
    let name = last.info.name.as_bytes();
    let at = bytes.windows(name.len()).rposition(|w| w == name).unwrap()
        + name.len()
        + 4
        + 8 * last.info.dims.len()
        + 4;
    let mut moved = bytes.clone();
    moved[at..at + 8].copy_from_slice(&(last.offset + 64).to_le_bytes());
    std::fs::write(&bad, moved).unwrap();
    expect_error(
        &kiln(
            &[
                "eval",
                "--model",
                bad.to_str().unwrap(),
                "--data",
                "tests/fixtures/data/eval_text.jsonl",
            ],
            t,
        ),
        &["bad.gguf", "bad tensor offsets"],
    );

    // Adapters: another rank than the weights say; another architecture's modules.
    let wrong_rank = t.join("wrong-rank");
    std::fs::create_dir_all(&wrong_rank).unwrap();
    std::fs::copy(
        "tests/fixtures/peft_adapter_a/adapter_model.safetensors",
        wrong_rank.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg = kiln::io::read_json(Path::new(
        "tests/fixtures/peft_adapter_a/adapter_config.json",
    ))
    .unwrap();
    cfg["r"] = 4.into();
    std::fs::write(wrong_rank.join("adapter_config.json"), cfg.to_string()).unwrap();
    expect_error(
        &kiln(
            &[
                "generate",
                "--model",
                base,
                "--adapter",
                wrong_rank.to_str().unwrap(),
                "--prompt",
                "hi",
            ],
            t,
        ),
        &["adapter_model.safetensors", "another rank"],
    );
    expect_error(
        &kiln(
            &[
                "export",
                "gguf-adapter",
                "--adapter",
                "tests/fixtures/peft_adapter_phi3",
                "--model",
                base,
                "-o",
                t.join("a.gguf").to_str().unwrap(),
            ],
            t,
        ),
        &[
            "adapter_model.safetensors",
            "qkv_proj",
            "does not exist in the base model",
        ],
    );

    // A Llama recipe's targets on a Phi-3 model.
    let recipe = t.join("phi3.toml");
    std::fs::write(&recipe, format!("[model]\npath = \"tests/fixtures/phi3_tiny\"\n[data]\npath = \"tests/fixtures/data/eval_text.jsonl\"\n[lora]\ntarget_modules = [\"q_proj\", \"v_proj\"]\n[output]\ndir = \"{}\"\n", t.join("run").display())).unwrap();
    expect_error(
        &kiln(&["train", recipe.to_str().unwrap(), "-q"], t),
        &[
            "phi3_tiny",
            "`q_proj` is not a projection of this phi3 model",
            "qkv_proj",
        ],
    );

    // Export options: an unknown preset (clap lists the ones there are), an adapter type.
    let o = kiln(
        &[
            "export", "gguf", "--model", base, "-o", "x.gguf", "--quant", "q5_k_m",
        ],
        t,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("q4_k_m"), "{}", stderr(&o));
    expect_error(
        &kiln(
            &[
                "export",
                "gguf-adapter",
                "--adapter",
                "tests/fixtures/peft_adapter_a",
                "--model",
                base,
                "-o",
                t.join("a.gguf").to_str().unwrap(),
                "--outtype",
                "q4_0",
            ],
            t,
        ),
        &["--outtype q4_0", "f32, f16, bf16 or q8_0"],
    );

    // Conflicting flags.
    let o = kiln(
        &[
            "init-tiny",
            "--arch",
            "llama",
            "--config",
            "c.json",
            "-o",
            "x",
        ],
        t,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));

    // An output below a file: the path is named, nothing half-written is left.
    let file = t.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = file.join("sub/model.gguf");
    expect_error(
        &kiln(
            &[
                "export",
                "gguf",
                "--model",
                base,
                "-o",
                out.to_str().unwrap(),
            ],
            t,
        ),
        &["a-file"],
    );
}

/// Checkpoints (save_steps, save_total_limit keeping the newest). A NaN loss (injected at chosen
/// steps) skips the step's update and says so, naming the step
/// and the last good checkpoint; `max_nonfinite_steps` in a row, or `on_nonfinite = "stop"`,
/// stops training with exit code 1 and the same names.
#[test]
fn checkpoints_are_pruned_and_nonfinite_steps_skipped_or_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], nan_steps: &str| -> (Output, std::path::PathBuf) {
        let out = tmp.path().join(format!("run-{}", extra.len()));
        let mut args = vec![
            "train".to_string(),
            "recipes/tiny.toml".into(),
            "--set".into(),
            format!("output.dir=\"{}\"", out.display()),
            "--set".into(),
            "training.max_steps=8".into(),
            "--set".into(),
            "training.save_steps=2".into(),
        ];
        for e in extra {
            args.push("--set".into());
            args.push(e.to_string());
        }
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .env("KILN_CACHE", tmp.path())
            .env("KILN_FAULT", nan_steps)
            .output()
            .unwrap();
        (o, out)
    };
    // Skipped: training finishes; the step is named with the checkpoint before it.
    let (o, out) = run(&[], "nan:5");
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("step 5: loss NaN"), "{err}");
    assert!(
        err.contains("checkpoint-4") && err.contains("skipped"),
        "{err}"
    );
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    assert!(!steps.contains(&5) && steps.contains(&6), "{steps:?}");
    assert!(out.join("adapter/adapter_model.safetensors").exists());

    // save_steps 2 over 8 steps wrote checkpoints 2, 4 and 6; all are kept by default.
    for n in [2, 4, 6] {
        assert!(out
            .join(format!("checkpoint-{n}/adapter_model.safetensors"))
            .exists());
    }
    let (o, out_limited) = run(
        &[
            "training.save_total_limit=2",
            "training.seed=7",
            "training.logging_steps=2",
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let mut kept: Vec<String> = std::fs::read_dir(&out_limited)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        ["checkpoint-4", "checkpoint-6"],
        "save_total_limit keeps the newest"
    );

    // Too many in a row: stop, exit code 1, no adapter from the broken run.
    let (o, out) = run(&["training.max_nonfinite_steps=1"], "nan:3,nan:4");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("step 4: loss NaN") && err.contains("checkpoint-2"),
        "{err}"
    );
    assert!(err.contains("stopped (2 such step(s) in a row)"), "{err}");
    assert!(!out.join("adapter").exists());

    // `stop`: at the first one.
    let (o, _) = run(
        &["training.on_nonfinite=\"stop\"", "training.seed=1"],
        "nan:1",
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("step 1: loss NaN") && err.contains("none yet"),
        "{err}"
    );
}

/// Network system calls (socket, connect, sendto, ...) that `cmd` makes, as strace reports them.
fn network_calls(cmd: &mut Command, trace: &Path) -> Vec<String> {
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let envs: Vec<_> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
        .collect();
    let o = Command::new("strace")
        .args(["-f", "-e", "trace=network", "-o"])
        .arg(trace)
        .arg(program)
        .args(args)
        .envs(envs)
        .output()
        .expect("this test needs strace (apt-get install strace)");
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::read_to_string(trace)
        .unwrap()
        .lines()
        // Exits and signals are no calls; nor is `???(`, which strace prints for a thread it
        // cannot decode a call of any more as the process tears it down (it traces network
        // calls only; a real one is named).
        .filter(|l| !l.contains("+++ exited") && !l.contains("--- SIG") && !l.contains("???"))
        .map(String::from)
        .collect()
}

/// Privacy: training, export and generation make no network system call at all (traced with
/// strace, which the first check shows does see a TCP connection attempt).
#[test]
fn kiln_makes_no_network_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let probe = network_calls(
        Command::new("bash").args(["-c", "exec 3<>/dev/tcp/127.0.0.1/9 || true"]),
        &t.join("probe.txt"),
    );
    assert!(
        probe.iter().any(|l| l.contains("connect(")),
        "strace sees nothing: {probe:?}"
    );

    let run = t.join("run");
    let mut train = Command::new(env!("CARGO_BIN_EXE_kiln"));
    train
        .args(["train", "recipes/tiny.toml", "-q", "--set"])
        .arg(format!("output.dir=\"{}\"", run.display()))
        .args(["--set", "training.max_steps=2"])
        .env("KILN_CACHE", t);
    assert_eq!(
        network_calls(&mut train, &t.join("train.txt")),
        Vec::<String>::new()
    );
    let gguf = t.join("out/model.gguf");
    let model = t.join("tiny-llama-seed0");
    let mut export = Command::new(env!("CARGO_BIN_EXE_kiln"));
    export
        .args(["export", "gguf", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(run.join("adapter"))
        .arg("-o")
        .arg(&gguf);
    assert_eq!(
        network_calls(&mut export, &t.join("export.txt")),
        Vec::<String>::new()
    );
    let mut generate = Command::new(env!("CARGO_BIN_EXE_kiln"));
    generate.args(["generate", "--model"]).arg(&gguf).args([
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(
        network_calls(&mut generate, &t.join("generate.txt")),
        Vec::<String>::new()
    );
}

/// A full disk (a 900 KiB tmpfs, mounted in a user and mount namespace; a checkpoint with its
/// optimizer state is about 350 KiB): the checkpoint that
/// does not fit fails with a clear error and exit code 2, leaves no half-written directory, and
/// the checkpoints before it stay readable.
#[test]
fn full_disk_gives_a_clear_error_and_keeps_earlier_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let kiln_bin = env!("CARGO_BIN_EXE_kiln");
    let run = disk.join("run");
    let script = format!(
        "mount -t tmpfs -o size=900k tmpfs {disk} || exit 99
{kiln_bin} train recipes/tiny.toml -q --set 'output.dir=\"{run}\"' --set training.max_steps=8 --set training.save_steps=1
echo \"rc=$?\"
ls -a {run}
for d in {run}/checkpoint-*; do {kiln_bin} inspect $d > /dev/null && echo \"readable $(basename $d)\"; done",
        disk = disk.display(),
        run = run.display(),
    );
    let o = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .env("KILN_CACHE", tmp.path().join("cache"))
        .output()
        .expect("this test needs unshare (util-linux)");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = stderr(&o);
    assert_ne!(
        o.status.code(),
        Some(99),
        "cannot mount a tmpfs here: {err}"
    );
    assert!(out.contains("rc=2"), "{out}\n{err}");
    assert!(
        err.contains("No space left on device") && err.contains("the disk is full"),
        "{err}"
    );
    assert!(
        !out.contains(".tmp-"),
        "a half-written checkpoint was left: {out}"
    );
    assert!(
        out.contains("readable checkpoint-1") && out.contains("readable checkpoint-2"),
        "{out}"
    );
}

/// Resume: a run killed with SIGKILL mid-step, or mid-save of a checkpoint, and resumed with
/// `--resume` ends with an adapter bit-identical to an uninterrupted run's (optimizer moments,
/// step, data position and dropout RNG restored), with each step in metrics.jsonl once.
/// Resuming with another recipe is refused unless forced.
#[test]
fn resume_after_sigkill_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let train = |out: &Path, kill: Option<&str>, extra: &[&str]| -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(["train", "recipes/tiny.toml", "--set"])
            .arg(format!("output.dir=\"{}\"", out.display()))
            .args([
                "--set",
                "training.max_steps=10",
                "--set",
                "training.save_steps=2",
            ])
            .args(extra)
            .env("KILN_CACHE", tmp.path());
        // Quiet unless resuming, whose messages the test reads.
        if !extra.contains(&"--resume") {
            cmd.arg("-q");
        }
        if let Some(k) = kill {
            cmd.env("KILN_FAULT", k);
        }
        cmd.output().unwrap()
    };
    let adapter =
        |out: &Path| std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let whole = tmp.path().join("whole");
    let o = train(&whole, None, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = adapter(&whole);

    for kill in ["kill-step:5", "kill-save:6"] {
        let out = tmp.path().join(kill.replace(':', "-"));
        let o = train(&out, Some(kill), &[]);
        assert_eq!(
            o.status.code(),
            None,
            "{kill}: killed by a signal: {}",
            stderr(&o)
        );
        assert!(!out.join("adapter").exists());
        let o = train(&out, None, &["--resume"]);
        let err = stderr(&o);
        assert!(o.status.success(), "{kill}: {err}");
        assert!(
            err.contains("resuming from") && err.contains("checkpoint-4"),
            "{kill}: {err}"
        );
        assert_eq!(adapter(&out), want, "{kill}: the resumed adapter differs");
        let leftovers: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{kill}: {leftovers:?}");
        let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
            .collect();
        assert_eq!(steps, (1..=10).collect::<Vec<u64>>(), "{kill}");
    }

    // Another recipe: refused, then forced.
    let out = tmp.path().join("kill-step-5");
    let changed = ["--set", "training.learning_rate=1e-3"];
    let o = train(&out, None, &["--resume", changed[0], changed[1]]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the recipe differs") && stderr(&o).contains("--force-resume"),
        "{}",
        stderr(&o)
    );
    let o = train(
        &out,
        None,
        &["--resume", "--force-resume", changed[0], changed[1]],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `--device metal` on a build without the `metal` feature (every Linux build, CI's included)
/// stops before loading anything, naming the feature to build with.
#[cfg(not(feature = "metal"))]
#[test]
fn metal_without_the_feature_is_refused_with_the_build_to_use() {
    let o = common::kiln(&[
        "generate",
        "--model",
        "tests/fixtures/llama_tiny_a",
        "--device",
        "metal",
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(
        err.contains("cannot open metal:0") && err.contains("--features metal"),
        "{err}"
    );
    let err = kiln::device::open("metal:1").unwrap_err().to_string();
    assert!(err.contains("--features metal"), "{err}");
}

/// `kiln plan` from a config.json alone (no weights): the parts add up to the peak, `auto`
/// keeps every layer of Llama-3.1-8B on an H200's free memory and recomputes some on 24 GiB, and
/// a card too small for even the fully recomputed run is told what fits.
#[test]
fn plan_predicts_memory_from_a_config_alone() {
    let plan = |gib: &str, extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "plan",
            "recipes/llama-3.2-1b-instruct.toml",
            "--set",
            "model.path=\"tests/fixtures/configs/Llama-3.1-8B.json\"",
            "--set",
            "data.max_seq_len=2048",
            "--set",
            "training.micro_batch_size=4",
            "--set",
            "training.gradient_checkpointing=\"auto\"",
            "--gpu-memory",
            gib,
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&common::kiln_stdout(&args)).unwrap()
    };
    let big = plan("139", &[]);
    assert_eq!(big["plan"]["recomputed_layers"], 0);
    let sum: u64 = big["plan"]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, big["plan"]["peak_bytes"].as_u64().unwrap());
    let mid = plan("24", &[]);
    let r = mid["plan"]["recomputed_layers"].as_u64().unwrap();
    assert!(r > 0 && r < 32, "{r}");
    assert_eq!(mid["fits"], true);
    let small = plan("6", &[]);
    assert_eq!(small["fits"], false);
    assert!(small["largest_micro_batch"].as_u64().unwrap() < 4);
    // The text names the parts and what to change.
    let out = common::kiln_stdout(&[
        "plan",
        "recipes/llama-3.2-1b-instruct.toml",
        "--set",
        "model.path=\"tests/fixtures/configs/Llama-3.1-8B.json\"",
        "--gpu-memory",
        "6",
    ]);
    assert!(
        out.contains("activations") && out.contains("does not fit"),
        "{out}"
    );
}
