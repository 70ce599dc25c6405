//! The data pipeline on the tiny model's tokenizer (Llama 3 specials and chat template): formats
//! and their detection, field remapping, Parquet = JSON = JSONL, bad rows, validation split,
//! over-long rows, and packing's loss equivalence.

mod common;

use std::path::{Path, PathBuf};

use kiln::data::{load_dataset, Example, TrainData};
use kiln::error::KilnError;
use kiln::recipe::Recipe;
use kiln::tokenizer::TokenizerInfo;

fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("tiny");
    kiln::model::tiny::init_tiny("llama", &m, 3).unwrap();
    m
}

fn recipe(model: &Path, data: &str, extra: &[&str]) -> Recipe {
    let text = format!(
        "[model]\npath = \"{}\"\ndevice = \"cpu\"\ncompute_dtype = \"f32\"\n[data]\npath = \"{data}\"\nmax_seq_len = 4096\nshuffle = false\n[lora]\nr = 4\nlora_alpha = 8\n[training]\nmax_steps = 1\n[output]\ndir = \"{}\"\n",
        model.display(),
        model.join("out").display()
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Recipe::parse(Path::new("test.toml"), &text, &overrides).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn trained_text(tok: &TokenizerInfo, ex: &Example) -> String {
    tok.decode(&ex.ids_where_trained(true)).unwrap()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    model: PathBuf,
    tok: TokenizerInfo,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let model = tiny_model(&dir);
    let tok = kiln::model::load_tokenizer(&model).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        model,
        tok,
    }
}

#[test]
fn every_format_is_detected_and_trains_on_the_right_tokens() {
    let f = fixture();
    let cases = [
        (
            "alpaca",
            r#"{"instruction": "Add 2 and 3.", "input": "", "output": "5"}"#,
            "5<|end_of_text|>",
        ),
        (
            "messages",
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}"#,
            "Hello<|eot_id|>Ciao<|eot_id|>",
        ),
        (
            "sharegpt",
            r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#,
            "Hello<|eot_id|>",
        ),
        (
            "prompt_completion",
            r#"{"prompt": "The sky is", "completion": " blue."}"#,
            " blue.<|end_of_text|>",
        ),
        (
            "text",
            r#"{"text": "Just text."}"#,
            "<|begin_of_text|>Just text.<|end_of_text|>",
        ),
    ];
    for (format, row, trained) in cases {
        let path = write(&f.dir, &format!("{format}.jsonl"), row);
        for fmt in ["auto", format] {
            let r = recipe(&f.model, &path, &[&format!("data.format=\"{fmt}\"")]);
            let d = load_dataset(&r.data, &f.tok, 0).unwrap();
            assert_eq!(d.formats[0].1.name(), format);
            assert_eq!(
                trained_text(&f.tok, &d.train[0]),
                trained,
                "{format} ({fmt})"
            );
        }
    }
    // Ambiguous rows need data.format.
    let both = write(
        &f.dir,
        "both.jsonl",
        r#"{"instruction": "a", "output": "b", "text": "c"}"#,
    );
    let err = load_dataset(&recipe(&f.model, &both, &[]).data, &f.tok, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("fit several formats") && err.contains("alpaca, text"),
        "{err}"
    );
    let r = recipe(&f.model, &both, &["data.format=\"text\""]);
    assert_eq!(
        trained_text(&f.tok, &load_dataset(&r.data, &f.tok, 0).unwrap().train[0]),
        "<|begin_of_text|>c<|end_of_text|>"
    );
    let none = write(&f.dir, "none.jsonl", r#"{"question": "a", "answer": "b"}"#);
    let err = load_dataset(&recipe(&f.model, &none, &[]).data, &f.tok, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("none.jsonl:1") && err.contains("set data.format"),
        "{err}"
    );
}

#[test]
fn train_on_inputs_trains_every_token_of_a_conversation() {
    let f = fixture();
    let path = write(
        &f.dir,
        "m.jsonl",
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#,
    );
    let r = recipe(&f.model, &path, &["data.train_on_inputs=true"]);
    let ex = &load_dataset(&r.data, &f.tok, 0).unwrap().train[0];
    assert!(ex.loss_mask.iter().all(|&m| m));
    assert_eq!(
        f.tok.decode(&ex.input_ids).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    );
}

#[test]
fn gsm8k_columns_remap_to_prompt_and_completion() {
    let f = fixture();
    let path = "tests/fixtures/data/gsm8k_sample.jsonl";
    let r = recipe(
        &f.model,
        path,
        &[
            "data.fields.prompt=\"question\"",
            "data.fields.completion=\"answer\"",
        ],
    );
    let d = load_dataset(&r.data, &f.tok, 0).unwrap();
    assert_eq!(d.formats[0].1.name(), "prompt_completion");
    assert_eq!(d.train.len(), 16);
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        trained_text(&f.tok, &d.train[0]),
        format!("{}<|end_of_text|>", first["answer"].as_str().unwrap())
    );
    // Through a chat template instead: the question is the user turn, the answer the assistant's.
    let r = recipe(
        &f.model,
        path,
        &[
            "data.fields.prompt=\"question\"",
            "data.fields.completion=\"answer\"",
            "data.chat_template=\"chatml\"",
        ],
    );
    let ex = &load_dataset(&r.data, &f.tok, 0).unwrap().train[0];
    let text = f.tok.decode(&ex.input_ids).unwrap();
    assert!(
        text.starts_with(&format!(
            "<|im_start|>user\n{}<|im_end|>",
            first["question"].as_str().unwrap()
        )),
        "{text}"
    );
    assert_eq!(
        trained_text(&f.tok, ex),
        format!("{}<|im_end|>\n", first["answer"].as_str().unwrap())
    );
}

#[test]
fn parquet_json_and_jsonl_give_the_same_tokens() {
    let f = fixture();
    let json = "tests/fixtures/data/fastchat_sample.json";
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    let jsonl = write(&f.dir, "fastchat.jsonl", &lines.join("\n"));
    let load = |p: &str| load_dataset(&recipe(&f.model, p, &[]).data, &f.tok, 0).unwrap();
    let a = load(json);
    let b = load("tests/fixtures/data/fastchat_sample.parquet");
    let c = load(&jsonl);
    assert_eq!(a.train.len(), 24);
    assert_eq!(a.train, b.train);
    assert_eq!(a.train, c.train);
    assert_eq!(b.formats[0].1.name(), "sharegpt");
}

#[test]
fn a_directory_reads_its_split() {
    let f = fixture();
    let d = f.dir.join("ds");
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::write(
        d.join("data/train-00000-of-00001.jsonl"),
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("data/test-00000-of-00001.jsonl"),
        "{\"text\": \"c\"}\n",
    )
    .unwrap();
    let p = d.display().to_string();
    assert_eq!(
        load_dataset(&recipe(&f.model, &p, &[]).data, &f.tok, 0)
            .unwrap()
            .train
            .len(),
        2
    );
    let r = recipe(&f.model, &p, &["data.split=\"test\""]);
    assert_eq!(load_dataset(&r.data, &f.tok, 0).unwrap().train.len(), 1);
    let r = recipe(&f.model, &p, &["data.split=\"validation\""]);
    let err = load_dataset(&r.data, &f.tok, 0).err().unwrap().to_string();
    assert!(
        err.contains("no files of split `validation`")
            && err.contains("train-00000-of-00001.jsonl"),
        "{err}"
    );
}

/// Each bad row: the error names the file and the row; with skip_bad_rows it is counted.
#[test]
fn bad_rows_name_the_file_and_row_or_are_skipped_and_counted() {
    let f = fixture();
    let good = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;
    let cases = [
        (
            "unparsable",
            r#"{"messages": [{"role": "user""#,
            "not valid JSON",
        ),
        ("missing field", r#"{"msgs": []}"#, "no `messages` field"),
        (
            "unknown role",
            r#"{"messages": [{"role": "narrator", "content": "x"}]}"#,
            "unknown role `narrator`",
        ),
        (
            "empty conversation",
            r#"{"messages": []}"#,
            "empty conversation",
        ),
        (
            "content not a string",
            r#"{"messages": [{"role": "user", "content": 3}]}"#,
            "must be a string, found a number",
        ),
        ("row not an object", r#"[1, 2]"#, "must be a JSON object"),
        (
            "role missing",
            r#"{"messages": [{"content": "x"}]}"#,
            "has no `role` field",
        ),
    ];
    for (what, bad, expect) in cases {
        let path = write(
            &f.dir,
            "bad.jsonl",
            &format!("{good}\n{good}\n{bad}\n{good}\n"),
        );
        let r = recipe(&f.model, &path, &["data.format=\"messages\""]);
        let err = load_dataset(&r.data, &f.tok, 0).err().expect(what);
        assert!(matches!(err, KilnError::Data { .. }), "{what}: {err:?}");
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(msg.contains("bad.jsonl:3:"), "{what}: {msg}");
        assert!(msg.contains(expect), "{what}: {msg}");
        assert!(msg.contains("skip_bad_rows"), "{what}: {msg}");
        let r = recipe(
            &f.model,
            &path,
            &["data.format=\"messages\"", "data.skip_bad_rows=true"],
        );
        let d = load_dataset(&r.data, &f.tok, 0).unwrap();
        assert_eq!(
            (d.stats.rows, d.stats.skipped, d.stats.examples),
            (4, 1, 3),
            "{what}"
        );
    }
    // In a JSON array file the error names the row.
    let arr = write(
        &f.dir,
        "bad.json",
        &format!("[{good}, {{\"messages\": []}}]"),
    );
    let r = recipe(&f.model, &arr, &["data.format=\"messages\""]);
    let msg = load_dataset(&r.data, &f.tok, 0).err().unwrap().to_string();
    assert!(msg.contains("bad.json: row 2: empty conversation"), "{msg}");
    // An empty file, and a file of only bad rows with skipping on.
    let empty = write(&f.dir, "empty.jsonl", "\n");
    let msg = load_dataset(
        &recipe(&f.model, &empty, &["data.format=\"text\""]).data,
        &f.tok,
        0,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        msg.contains("empty.jsonl") && msg.contains("dataset is empty"),
        "{msg}"
    );
    let all_bad = write(&f.dir, "all_bad.jsonl", "{\"x\": 1}\nnot json\n");
    let r = recipe(
        &f.model,
        &all_bad,
        &["data.format=\"text\"", "data.skip_bad_rows=true"],
    );
    let msg = load_dataset(&r.data, &f.tok, 0).err().unwrap().to_string();
    assert!(msg.contains("2 skipped as unreadable"), "{msg}");
    // A conversation needs a chat template.
    let m = write(&f.dir, "m.jsonl", good);
    let r = recipe(&f.model, &m, &["data.chat_template=\"none\""]);
    let msg = load_dataset(&r.data, &f.tok, 0).err().unwrap().to_string();
    assert!(
        msg.contains("needs a chat template") && msg.contains("chatml"),
        "{msg}"
    );
    // A template that raises names the row and carries the template's message.
    let alt = write(
        &f.dir,
        "alt.jsonl",
        r#"{"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
    );
    let r = recipe(&f.model, &alt, &["data.chat_template=\"mistral\""]);
    let msg = load_dataset(&r.data, &f.tok, 0).err().unwrap().to_string();
    assert!(
        msg.contains("alt.jsonl:1") && msg.contains("roles must alternate"),
        "{msg}"
    );
}

#[test]
fn validation_split_is_held_out_by_seed() {
    let f = fixture();
    let path = "datasets/alpaca_tiny.jsonl";
    let r = recipe(&f.model, path, &["data.val_split=0.1"]);
    let a = load_dataset(&r.data, &f.tok, 5).unwrap();
    assert_eq!((a.train.len(), a.val.len()), (90, 10));
    assert_eq!((a.stats.examples, a.stats.val_examples), (90, 10));
    let b = load_dataset(&r.data, &f.tok, 5).unwrap();
    assert_eq!(a.val, b.val);
    let c = load_dataset(&r.data, &f.tok, 6).unwrap();
    assert_ne!(a.val, c.val);
    for v in &a.val {
        assert!(!a.train.contains(v));
    }
    let r = recipe(&f.model, path, &["data.val_split=7"]);
    assert_eq!(load_dataset(&r.data, &f.tok, 5).unwrap().val.len(), 7);
    let r = recipe(
        &f.model,
        path,
        &[
            "data.val_path=\"tests/fixtures/data/gsm8k_sample.jsonl\"",
            "data.format=\"auto\"",
            "data.fields.prompt=\"question\"",
            "data.fields.completion=\"answer\"",
        ],
    );
    let d = load_dataset(&r.data, &f.tok, 5).unwrap();
    assert_eq!((d.train.len(), d.val.len()), (100, 16));
}

#[test]
fn overlong_rows_are_truncated_or_dropped_and_counted() {
    let f = fixture();
    let path = "datasets/alpaca_tiny.jsonl";
    let full = load_dataset(&recipe(&f.model, path, &[]).data, &f.tok, 0).unwrap();
    let long = full
        .train
        .iter()
        .filter(|e| e.input_ids.len() > 200)
        .count();
    assert!(long > 0 && long < 100);
    let t = load_dataset(
        &recipe(&f.model, path, &["data.max_seq_len=200"]).data,
        &f.tok,
        0,
    )
    .unwrap();
    assert_eq!(t.stats.truncated, long);
    assert!(t.train.iter().all(|e| e.input_ids.len() <= 200));
    assert_eq!(t.stats.longest, full.stats.longest);
    let d = load_dataset(
        &recipe(
            &f.model,
            path,
            &["data.max_seq_len=200", "data.overlong=\"drop\""],
        )
        .data,
        &f.tok,
        0,
    )
    .unwrap();
    assert_eq!(
        (d.stats.dropped, d.stats.truncated, d.train.len()),
        (long, 0, 100 - long)
    );
}

#[test]
fn packed_loss_and_gradients_equal_the_token_weighted_unpacked_ones() {
    let f = fixture();
    let r = recipe(
        &f.model,
        "tests/fixtures/data/fastchat_sample.json",
        &[
            "data.max_seq_len=512",
            "model.quantize=\"nf4\"",
            "lora.lora_dropout=0.0",
        ],
    );
    let loaded = kiln::train::load_model(&r).unwrap();
    let examples = load_dataset(&r.data, &loaded.tokenizer, 0).unwrap().train;
    let examples: Vec<Example> = examples.into_iter().take(12).collect();
    let packed = TrainData::new(examples.clone(), true, 512);
    let unpacked = TrainData::new(examples, false, 512);
    assert!(packed.sequences.len() < 6, "{:?}", packed.sequences);
    assert!(packed.sequences.iter().any(|s| s.len() >= 3));
    let params = common::lora_params_moved(&loaded.model);
    let mut rng = kiln::rng::KilnRng::new(0);
    let pad = loaded.tokenizer.pad_id;
    let all = |d: &TrainData| vec![(0..d.sequences.len()).collect::<Vec<_>>()];
    let p = kiln::train::accumulate_gradients(
        &loaded.model,
        &packed,
        &all(&packed),
        pad,
        &params,
        &mut rng,
    )
    .unwrap();
    let u = kiln::train::accumulate_gradients(
        &loaded.model,
        &unpacked,
        &all(&unpacked),
        pad,
        &params,
        &mut rng,
    )
    .unwrap();
    assert_eq!(p.target_tokens, u.target_tokens);
    let rel = (p.loss_sum - u.loss_sum).abs() / u.loss_sum;
    assert!(
        rel < 1e-5,
        "packed loss {} vs unpacked {} (rel {rel})",
        p.loss_sum,
        u.loss_sum
    );
    let mut worst = 0f32;
    for (a, b) in p.grads.iter().zip(&u.grads) {
        let scale = common::max_abs(b).max(1e-12);
        worst = worst.max(common::max_abs_diff(a, b) / scale);
    }
    assert!(worst < 1e-4, "gradients differ by {worst} (relative)");

    // Without the block-diagonal mask (plain causal attention over the packed row) the loss
    // differs: the test would catch attention leaking across examples.
    let batch = packed.batch(&[0], pad, &loaded.model.device).unwrap();
    let leaky_layout = kiln::model::decoder::PackedLayout {
        positions: batch.layout.as_ref().unwrap().positions.clone(),
        positions_end: batch.layout.as_ref().unwrap().positions_end,
        mask: kiln::model::decoder::causal_mask(
            batch.inputs.dim(1).unwrap(),
            candle_core::DType::F32,
            &loaded.model.device,
        )
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .unsqueeze(0)
        .unwrap(),
    };
    let loss = |layout: &kiln::model::decoder::PackedLayout| {
        let h = loaded
            .model
            .forward_hidden_with(&batch.inputs, Some(layout), None)
            .unwrap();
        let logits = loaded.model.logits(&h).unwrap();
        kiln::model::decoder::masked_cross_entropy_sum(&logits, &batch.targets, &batch.weights)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let right = loss(batch.layout.as_ref().unwrap());
    let leaky = loss(&leaky_layout);
    assert!((right - leaky).abs() / right > 1e-4, "{right} vs {leaky}");
}

#[test]
fn template_sources_and_builtins_render_their_formats() {
    let f = fixture();
    let conv = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;
    let path = write(&f.dir, "c.jsonl", conv);
    let render = |model: &Path, extra: &[&str]| {
        let tok = kiln::model::load_tokenizer(model).unwrap();
        let r = recipe(model, &path, extra);
        let d = load_dataset(&r.data, &tok, 0).unwrap();
        (
            tok.decode(&d.train[0].input_ids).unwrap(),
            trained_text(&tok, &d.train[0]),
            d.templating.template.unwrap().origin,
        )
    };
    // The trained text ends at an end-of-turn special token: a template's whitespace after it
    // is never generated. (This tiny tokenizer has Llama 3's special tokens only: `<|im_end|>`
    // and `<end_of_turn>` are plain text to it, so ChatML's and Gemma's newline stays.)
    let cases = [
        ("alpaca", "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello<|end_of_text|>\n\n", "Hello<|end_of_text|>"),
        ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n", "Hello<|im_end|>\n"),
        ("llama3", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>", "Hello<|eot_id|>"),
        ("phi3", "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|end_of_text|>", "Hello<|end|>\n<|end_of_text|>"),
        ("mistral", "<|begin_of_text|>[INST] Be brief.\n\nHi [/INST]Hello<|end_of_text|>", "Hello<|end_of_text|>"),
        ("gemma", "<|begin_of_text|><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n", "Hello<end_of_turn>\n"),
    ];
    for (name, text, trained) in cases {
        let (t, tr, origin) = render(&f.model, &[&format!("data.chat_template=\"{name}\"")]);
        assert_eq!(t, text, "{name}");
        assert_eq!(tr, trained, "{name}");
        assert!(origin.contains(name));
    }
    // The model's own: tokenizer_config.json, overridden by chat_template.jinja (transformers 5).
    let (_, tr, origin) = render(&f.model, &[]);
    assert!(
        origin.ends_with("tokenizer_config.json") && tr == "Hello<|eot_id|>",
        "{origin} {tr}"
    );
    std::fs::write(
        f.model.join("chat_template.jinja"),
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
    )
    .unwrap();
    let (t, tr, origin) = render(&f.model, &[]);
    assert!(origin.ends_with("chat_template.jinja"), "{origin}");
    assert_eq!(t, "[system] Be brief.\n[user] Hi\n[assistant] Hello\n");
    // No generation prompt in this template: the turn's loss starts at its content (the space
    // before it is part of the first token), not at the `[assistant]` header.
    assert_eq!(tr, " Hello\n");
    // A template file named in the recipe.
    let file = write(&f.dir, "mine.jinja", "{% for m in messages %}<{{ m.role }}>{{ m.content | upper }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}");
    let (t, tr, _) = render(&f.model, &[&format!("data.chat_template=\"{file}\"")]);
    assert_eq!(t, "<system>BE BRIEF.<user>HI<assistant>HELLO");
    assert_eq!(tr, "HELLO");
    // A template that does not parse is reported with its file.
    let broken = write(&f.dir, "broken.jinja", "{% for m in messages %}");
    let r = recipe(
        &f.model,
        &path,
        &[&format!("data.chat_template=\"{broken}\"")],
    );
    let msg = load_dataset(&r.data, &f.tok, 0).err().unwrap().to_string();
    assert!(
        msg.contains("broken.jinja") && msg.contains("cannot parse"),
        "{msg}"
    );
}
