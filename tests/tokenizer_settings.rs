//! What a tokenizer file says must not change the training data behind the user's back, and
//! plain rows get exactly the ids transformers gives (tests/fixtures/tokenizer_settings_golden.json,
//! made by scripts/golden/make_tokenizer_settings_golden.py with transformers 5.17).
//!
//! - `truncation` and `padding` saved in tokenizer.json are ignored, as transformers ignores them
//!   unless a call asks: each tokenizer is tested as shipped, with truncation (max_length 50),
//!   with padding (Fixed 64), and with both.
//! - Text rows are `tok(text) + [eos]` and prompt/completion rows `tok(prompt) +
//!   tok(completion, add_special_tokens=False) + [eos]`: no BOS the tokenizer does not add itself
//!   (Qwen 2.5's config.json names a bos_token_id its tokenizer never adds; Phi-3's and GPT-2's
//!   tokenizer configs name one too), unless `data.add_bos` asks for it.
//! - `kiln data inspect` counts the tokens transformers counts.

use std::path::{Path, PathBuf};

use kiln::data::load_dataset;
use kiln::recipe::{DataSection, Recipe};
use kiln::tokenizer::TokenizerInfo;
use serde_json::Value;

mod common;
use common::{kiln_stdout, tokenizer_dir};

const NAMES: [&str; 4] = ["phi3", "qwen2.5", "llama3-instruct", "gpt2"];
const VARIANTS: [&str; 4] = ["as_shipped", "truncation", "padding", "both"];

fn golden() -> Value {
    let text = std::fs::read_to_string("tests/fixtures/tokenizer_settings_golden.json").unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The config.json a real model ships beside the tokenizer, where the test has one: it names a
/// bos_token_id (Qwen 2.5: `<|endoftext|>`) that the tokenizer does not add.
fn real_config(name: &str) -> Option<&'static str> {
    match name {
        "qwen2.5" => Some("tests/fixtures/configs/Qwen2.5-0.5B-Instruct.json"),
        "llama3-instruct" => Some("tests/fixtures/configs/Llama-3.2-1B.json"),
        _ => None,
    }
}

/// A model directory with tokenizer `name`, its tokenizer.json edited as `variant` says.
fn model_dir(name: &str, variant: &str, g: &Value, into: &Path) -> PathBuf {
    let dir = tokenizer_dir(name, &into.join(variant));
    let path = dir.join("tokenizer.json");
    let mut tj: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    if matches!(variant, "truncation" | "both") {
        tj["truncation"] = g["truncation"].clone();
    }
    if matches!(variant, "padding" | "both") {
        tj["padding"] = g["padding"].clone();
    }
    std::fs::write(&path, serde_json::to_string(&tj).unwrap()).unwrap();
    if let Some(cfg) = real_config(name) {
        std::fs::copy(cfg, dir.join("config.json")).unwrap();
    }
    dir
}

/// Data files in `dir`: GSM8K as text rows, GSM8K as prompt/completion, 6 FastChat conversations.
fn data_files(dir: &Path) -> [(PathBuf, &'static str); 3] {
    let text = dir.join("gsm8k_text.jsonl");
    let rows: Vec<Value> = std::fs::read_to_string("tests/fixtures/data/gsm8k_sample.jsonl")
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lines: Vec<String> = rows
        .iter()
        .map(|r| {
            let t = format!(
                "{}\n{}",
                r["question"].as_str().unwrap(),
                r["answer"].as_str().unwrap()
            );
            serde_json::json!({ "text": t }).to_string()
        })
        .collect();
    std::fs::write(&text, lines.join("\n")).unwrap();
    let chat = dir.join("fastchat6.json");
    let all: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/data/fastchat_sample.json").unwrap(),
    )
    .unwrap();
    std::fs::write(&chat, serde_json::to_string(&all[..6]).unwrap()).unwrap();
    [
        (text, "format = 'text'"),
        (
            PathBuf::from("tests/fixtures/data/gsm8k_sample.jsonl"),
            "format = 'prompt_completion'\nfields = { prompt = 'question', completion = 'answer' }",
        ),
        (chat, "format = 'sharegpt'"),
    ]
}

fn recipe_text(model: &Path, data: &Path, data_keys: &str) -> String {
    format!(
        "[model]\npath = '{}'\n[data]\npath = '{}'\n{data_keys}\nshuffle = false\n[output]\ndir = 'unused'\n",
        model.display(),
        data.display()
    )
}

fn data_section(model: &Path, data: &Path, data_keys: &str) -> DataSection {
    Recipe::parse(
        Path::new("t.toml"),
        &recipe_text(model, data, data_keys),
        &[],
    )
    .unwrap()
    .data
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The golden examples of each format: token ids and how many of them are trained (counted as
/// kiln counts targets: positions after the first).
fn expected(g: &Value, format: usize) -> Option<Vec<(Vec<u32>, usize)>> {
    let eos = g["eos"].as_u64().unwrap() as u32;
    match format {
        0 => Some(
            g["text"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    let t = ids(t);
                    let n = t.len() - 1;
                    (t, n)
                })
                .collect(),
        ),
        1 => Some(
            g["prompt_completion"]
                .as_array()
                .unwrap()
                .iter()
                .map(|pc| {
                    let mut all = ids(&pc["prompt"]);
                    let completion = ids(&pc["completion"]);
                    let n = completion.len() + 1;
                    all.extend(completion);
                    all.push(eos);
                    (all, n)
                })
                .collect(),
        ),
        _ => g["chat"]
            .as_array()
            .map(|c| c.iter().map(|t| (ids(t), usize::MAX)).collect()),
    }
}

#[test]
fn tokenizer_json_truncation_and_padding_never_change_the_data_and_plain_rows_match_transformers() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let files = data_files(tmp.path());
    let mut checked = 0;
    for name in NAMES {
        let gt = &g["tokenizers"][name];
        for variant in VARIANTS {
            let dir = model_dir(name, variant, &g, &tmp.path().join(name));
            let tok = kiln::model::load_tokenizer(&dir).unwrap();
            for (format, (file, keys)) in files.iter().enumerate() {
                let Some(want) = expected(gt, format) else {
                    continue; // GPT-2 has no chat template
                };
                let cfg = data_section(&dir, file, keys);
                let ds = load_dataset(&cfg, &tok, 0).unwrap();
                assert_eq!(ds.train.len(), want.len(), "{name} {variant} {keys}");
                for (i, (ex, (want_ids, want_targets))) in ds.train.iter().zip(&want).enumerate() {
                    assert_eq!(
                        &ex.input_ids, want_ids,
                        "{name}, tokenizer.json {variant}, {keys}, row {i}: ids differ from transformers'"
                    );
                    if *want_targets != usize::MAX {
                        assert_eq!(
                            ex.num_targets(),
                            *want_targets,
                            "{name} {variant} {keys} row {i}"
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    // 4 tokenizers x 4 variants x (16 text + 16 prompt/completion) + 3 x 4 x 6 conversations.
    assert_eq!(checked, 4 * 4 * 32 + 3 * 4 * 6);
}

#[test]
fn the_truncating_padding_tokenizer_would_change_the_ids_if_honoured() {
    // The edits bite: the tokenizers crate applies them to every encode when left in place, so
    // the test above would see them.
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May.";
    for (variant, long, short) in [("truncation", 50, 1), ("padding", 64, 64), ("both", 64, 64)] {
        let dir = model_dir("qwen2.5", variant, &g, tmp.path());
        let raw = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        assert_eq!(
            raw.encode(text, true).unwrap().get_ids().len(),
            long,
            "{variant}"
        );
        assert_eq!(
            raw.encode("Hi", true).unwrap().get_ids().len(),
            short,
            "{variant}"
        );
        let tok = TokenizerInfo::load(&dir, Default::default()).unwrap();
        assert_eq!(tok.encode(text, true).unwrap().len(), 55, "{variant}");
        assert_eq!(tok.encode("Hi", true).unwrap().len(), 1, "{variant}");
    }
}

#[test]
fn data_add_bos_puts_bos_in_front_of_plain_rows_once() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let files = data_files(tmp.path());
    for (name, bos) in [
        ("qwen2.5", 151643u32),
        ("phi3", 1),
        ("llama3-instruct", 128000),
    ] {
        let dir = model_dir(name, "as_shipped", &g, &tmp.path().join(name));
        let tok = kiln::model::load_tokenizer(&dir).unwrap();
        for (format, (file, keys)) in files.iter().enumerate().take(2) {
            let want = expected(&g["tokenizers"][name], format).unwrap();
            let cfg = data_section(&dir, file, &format!("{keys}\nadd_bos = true"));
            let ds = load_dataset(&cfg, &tok, 0).unwrap();
            for (ex, (want_ids, _)) in ds.train.iter().zip(&want) {
                let mut with_bos = want_ids.clone();
                if with_bos[0] != bos {
                    with_bos.insert(0, bos);
                }
                assert_eq!(ex.input_ids, with_bos, "{name} {keys}");
                assert_eq!(ex.input_ids.iter().filter(|&&t| t == bos).count(), 1);
            }
        }
    }
}

#[test]
fn data_inspect_counts_the_tokens_transformers_counts() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let files = data_files(tmp.path());
    for name in NAMES {
        let gt = &g["tokenizers"][name];
        for variant in ["as_shipped", "both"] {
            let dir = model_dir(name, variant, &g, &tmp.path().join(name));
            for (format, (file, keys)) in files.iter().enumerate() {
                let Some(want) = expected(gt, format) else {
                    continue;
                };
                let recipe = tmp.path().join(format!("{name}-{variant}-{format}.toml"));
                std::fs::write(&recipe, recipe_text(&dir, file, keys)).unwrap();
                let out = kiln_stdout(&["data", "inspect", recipe.to_str().unwrap(), "--json"]);
                let report: Value = serde_json::from_str(&out).unwrap();
                let stats = &report["stats"];
                let tokens: usize = want.iter().map(|(t, _)| t.len()).sum();
                assert_eq!(stats["tokens"], tokens, "{name} {variant} {keys}");
                assert_eq!(stats["truncated"], 0);
                if format < 2 {
                    let targets: usize = want.iter().map(|(_, n)| n).sum();
                    assert_eq!(stats["target_tokens"], targets, "{name} {variant} {keys}");
                }
            }
        }
    }
}
