//! Tokenization of GGUF vocabularies against llama.cpp's own tokenizer tests
//! (`models/ggml-vocab-*.gguf` with `.inp`/`.out`, vendored by llama-cpp-python 0.3.36, llama.cpp
//! 0c1e570). `scripts/golden/fetch_llama_vocab.sh` brings the GGUF files (70 MB, checked against
//! `tests/fixtures/llama_vocab/SHA256SUMS`); the `.inp`/`.out` files are committed. llama.cpp's
//! test-tokenizer-0 encodes each input without added special tokens and without parsing control
//! tokens; the `.out` ids are what it must produce.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln::gguf::{GgufFile, Value, ValueType};
use kiln::tokenizer::TokenizerInfo;

const DIR: &str = "tests/fixtures/llama_vocab";

/// Every vocabulary of llama.cpp's test set that kiln reads.
const READ: [&str; 14] = [
    "llama-spm",
    "phi-3",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "gemma-4",
    "gpt-2",
    "deepseek-llm",
    "deepseek-coder",
    "command-r",
    "falcon",
    "mpt",
    "starcoder",
    "refact",
];

/// The rest of the set, with the words kiln's refusal must contain: an encoder's WordPiece, a
/// T5 unigram model, and two BPE files that name no pre-tokenizer (llama.cpp falls back to a
/// default it warns degrades generation).
const REFUSED: [(&str, &str); 4] = [
    ("bert-bge", "`bert` vocabulary"),
    ("nomic-bert-moe", "`t5` vocabulary"),
    ("aquila", "pre-tokenizer `default`"),
    ("gpt-neox", "pre-tokenizer `default`"),
];

fn gguf(name: &str) -> PathBuf {
    let p = Path::new(DIR).join(format!("ggml-vocab-{name}.gguf"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/golden/fetch_llama_vocab.sh (it downloads llama-cpp-python 0.3.36's sdist from PyPI)",
        p.display()
    );
    p
}

/// Each input of `name`'s `.inp` with the ids of its `.out` line.
fn cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(format!("{DIR}/ggml-vocab-{name}.gguf.inp")).unwrap();
    let out = std::fs::read_to_string(format!("{DIR}/ggml-vocab-{name}.gguf.out")).unwrap();
    let inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let outputs: Vec<&str> = out.split('\n').collect();
    assert!(
        outputs.len() >= inputs.len(),
        "{name}: fewer outputs than inputs"
    );
    inputs
        .iter()
        .zip(&outputs)
        .map(|(i, o)| {
            let ids = o.split_whitespace().map(|t| t.parse().unwrap()).collect();
            (i.to_string(), ids)
        })
        .collect()
}

/// `tok` as llama.cpp's tests call it: control-token text is text (`parse_special = false`).
fn plain(mut tok: TokenizerInfo) -> TokenizerInfo {
    tok.tokenizer.set_encode_special_tokens(true);
    tok
}

/// The inputs of `cases` on which `tok` differs from llama.cpp, as messages.
fn mismatches(name: &str, tok: &TokenizerInfo, cases: &[(String, Vec<u32>)]) -> Vec<String> {
    let mut bad = vec![];
    for (text, want) in cases {
        let got = tok.encode(text, false).unwrap();
        if &got != want {
            bad.push(format!(
                "{name}: {text:?}\n  llama.cpp {want:?}\n  kiln      {got:?}"
            ));
        }
    }
    bad
}

#[test]
fn every_vocabulary_kiln_reads_tokenizes_as_llama_cpp() {
    let mut bad = vec![];
    for name in READ {
        let file = GgufFile::open(&gguf(name)).unwrap();
        let tok = kiln::tokenizer::vocab::tokenizer_from_gguf(&file)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        bad.extend(mismatches(name, &plain(tok), &cases(name)));
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn every_other_vocabulary_is_refused_by_name() {
    for (name, words) in REFUSED {
        let file = GgufFile::open(&gguf(name)).unwrap();
        let err = match kiln::tokenizer::vocab::tokenizer_from_gguf(&file) {
            Ok(_) => panic!("{name}: read, but llama.cpp's ids for it were never checked"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(words), "{name}: {err}");
        assert!(err.contains(&format!("ggml-vocab-{name}.gguf")), "{err}");
    }
}

/// A metadata value of `file`.
fn get<'a>(file: &'a GgufFile, key: &str) -> &'a Value {
    file.get(key).unwrap_or_else(|| panic!("no {key}"))
}

/// The Gemma-3-style vocabulary of scripts/golden/make_gemma3_style_vocab_golden.py, derived the
/// same way from llama.cpp's gemma-4 vocabulary: SentencePiece without a prefix space, newline
/// and tab runs user-defined, scores from the merge ranks.
fn gemma3_style() -> GgufFile {
    let g4 = GgufFile::open(&gguf("gemma-4")).unwrap();
    let strings = |key: &str| -> Vec<String> {
        get(&g4, key)
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (i, m) in strings("tokenizer.ggml.merges").iter().enumerate() {
        let (a, b) = m.split_once(' ').unwrap();
        rank.entry(format!("{a}{b}")).or_insert(i);
    }
    let Value::Array(_, types) = get(&g4, "tokenizer.ggml.token_type") else {
        panic!("token types")
    };
    let types: Vec<Value> = types
        .iter()
        .zip(&tokens)
        .map(|(ty, t)| {
            let run = |c: char| !t.is_empty() && t.chars().all(|x| x == c);
            if run('\n') || run('\t') {
                Value::I32(4)
            } else {
                ty.clone()
            }
        })
        .collect();
    let scores: Vec<Value> = tokens
        .iter()
        .map(|t| Value::F32(rank.get(t).map_or(-1e9, |&r| -(r as f32))))
        .collect();
    let metadata = vec![
        (
            "general.architecture".into(),
            Value::String("gemma3".into()),
        ),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                ValueType::String,
                tokens.into_iter().map(Value::String).collect(),
            ),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(ValueType::F32, scores),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(ValueType::I32, types),
        ),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(3)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(0)),
    ];
    GgufFile {
        path: PathBuf::from("gemma3-style.gguf"),
        version: 3,
        metadata,
        tensors: vec![],
        alignment: 32,
        data_start: 0,
    }
}

/// Gemma 3's GGUF files are SentencePiece vocabularies whose whitespace runs are user-defined
/// tokens: llama.cpp cuts them out first, so a lone "\n" is its own token, never a piece the
/// merges make ("\n" once became "ꉂ" in kiln). Multi-line GSM8K rows, the gemma-4 inputs and
/// the probe text give llama-tokenize's ids (tests/fixtures/llama_vocab/gemma3_style.json).
#[test]
fn gemma3_style_user_defined_whitespace_tokenizes_as_llama_cpp() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/gemma3_style.json")).unwrap())
            .unwrap();
    let cases: Vec<(String, Vec<u32>)> = golden["texts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(golden["ids"].as_array().unwrap())
        .map(|(t, ids)| {
            (
                t.as_str().unwrap().to_string(),
                serde_json::from_value(ids.clone()).unwrap(),
            )
        })
        .collect();
    assert!(cases.iter().filter(|(t, _)| t.contains("\n\n")).count() >= 24);
    let file = gemma3_style();
    // Control tokens parsed, as llama-tokenize does by default and kiln's training does.
    let tok = kiln::tokenizer::vocab::tokenizer_from_gguf(&file).unwrap();
    let bad = mismatches("gemma3-style", &tok, &cases);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // The lone newline is the user-defined token, as in Gemma 3 (id 107 there too).
    assert_eq!(tok.encode("a\nb", false).unwrap()[1], 107);
}

/// The check at load names a user-defined token the rebuild does not honour: the same
/// vocabulary with the "\n" token left to the merges is refused, naming it.
#[test]
fn the_load_check_names_a_user_defined_token_the_rebuild_loses() {
    let file = gemma3_style();
    let tok = kiln::tokenizer::vocab::tokenizer_from_gguf(&file).unwrap();
    let tokens: Vec<&str> = match file.get("tokenizer.ggml.tokens").unwrap() {
        Value::Array(_, t) => t.iter().map(|v| v.as_str().unwrap()).collect(),
        _ => unreachable!(),
    };
    let newline = tokens.iter().position(|t| *t == "\n").unwrap();
    assert!(kiln::tokenizer::vocab_probe::check_rebuild(&tok, &tokens, &[newline]).is_ok());
    // The rebuild as kiln made it before: "\n" neither cut out first nor in the model's pieces
    // (which held only normal, byte and unknown tokens).
    let mut json: serde_json::Value =
        serde_json::from_str(&tok.tokenizer.to_string(false).unwrap()).unwrap();
    json["added_tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|a| a["content"] != "\n");
    json["model"]["vocab"].as_object_mut().unwrap().remove("\n");
    json["model"]["merges"]
        .as_array_mut()
        .unwrap()
        .retain(|m| !m.to_string().contains("\\n"));
    let lost = TokenizerInfo {
        tokenizer: serde_json::from_value(json).unwrap(),
        ..tok
    };
    let err = kiln::tokenizer::vocab_probe::check_rebuild(&lost, &tokens, &[newline]).unwrap_err();
    assert!(err.contains(&format!("\"\\n\" (id {newline})")), "{err}");
}
