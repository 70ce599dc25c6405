//! Added tokens in a `tokenizer.json` tokenize as transformers tokenizes them
//! (tests/fixtures/added_tokens_golden.json, made by scripts/golden/make_added_tokens_golden.py
//! with transformers 5.17 and tokenizers 0.23.3): `special` true and false (Qwen 2.5's tool and
//! fill-in-the-middle tokens are plain added words), `rstrip` (Phi-3), `normalized` (GPT-2), and
//! on a GPT-2 variant with extra tokens `lstrip`, `lstrip` + `rstrip`, `single_word`. Each token
//! between words, double spaces and newlines, glued to words, first and last, and the probe text.

use std::path::Path;

use serde_json::Value;

mod common;

fn golden() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/added_tokens_golden.json").unwrap(),
    )
    .unwrap()
}

/// The fixture tokenizer `name`; `gpt2-flags` is GPT-2 with the golden file's extra tokens.
fn tokenizer(name: &str, g: &Value, tmp: &Path) -> kiln::tokenizer::TokenizerInfo {
    let src = if name == "gpt2-flags" { "gpt2" } else { name };
    let dir = common::tokenizer_dir(src, &tmp.join(name));
    if name == "gpt2-flags" {
        let path = dir.join("tokenizer.json");
        let mut tj: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let n = tj["model"]["vocab"].as_object().unwrap().len();
        for (i, extra) in g["extra"].as_array().unwrap().iter().enumerate() {
            let mut t = extra.clone();
            t["id"] = (n + i).into();
            tj["added_tokens"].as_array_mut().unwrap().push(t);
        }
        std::fs::write(&path, tj.to_string()).unwrap();
        let path = dir.join("tokenizer_config.json");
        let mut tc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (i, extra) in g["extra"].as_array().unwrap().iter().enumerate() {
            tc["added_tokens_decoder"][(n + i).to_string()] = extra.clone();
        }
        std::fs::write(&path, tc.to_string()).unwrap();
    }
    kiln::tokenizer::TokenizerInfo::load(&dir, Default::default()).unwrap()
}

#[test]
fn added_tokens_tokenize_as_transformers_does() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let mut bad = vec![];
    let mut checked = 0;
    for (name, cases) in g["tokenizers"].as_object().unwrap() {
        let tok = tokenizer(name, &g, tmp.path());
        let texts = cases["texts"].as_array().unwrap();
        for (text, ids) in texts.iter().zip(cases["ids"].as_array().unwrap()) {
            let text = text.as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
            let got = tok.encode(text, false).unwrap();
            if got != want {
                bad.push(format!(
                    "{name}: {text:?}\n  transformers {want:?}\n  kiln         {got:?}"
                ));
            }
            checked += 1;
        }
    }
    assert!(checked > 500, "{checked}");
    assert!(
        bad.is_empty(),
        "{} of {checked} differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
