//! Tokenization of GGUF vocabularies against llama.cpp's own tokenizer tests
//! (`models/ggml-vocab-*.gguf` with `.inp`/`.out`, vendored by llama-cpp-python 0.3.36;
//! `scripts/fetch_llama_vocab.sh` brings the GGUF files, the `.inp`/`.out` files are committed).
//! llama.cpp's test-tokenizer-0 encodes each input without added special tokens and without
//! parsing control tokens; the `.out` ids are what it must produce.

use std::path::{Path, PathBuf};

const DIR: &str = "tests/fixtures/llama_vocab";

/// Each input of `name`'s `.inp` with the ids of its `.out` line.
fn cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(format!("{DIR}/ggml-vocab-{name}.gguf.inp")).unwrap();
    let out = std::fs::read_to_string(format!("{DIR}/ggml-vocab-{name}.gguf.out")).unwrap();
    let inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let outputs: Vec<&str> = out.split('\n').collect();
    assert!(outputs.len() >= inputs.len(), "{name}: fewer outputs than inputs");
    inputs
        .iter()
        .zip(&outputs)
        .map(|(i, o)| {
            let ids = o.split_whitespace().map(|t| t.parse().unwrap()).collect();
            (i.to_string(), ids)
        })
        .collect()
}

fn gguf(name: &str) -> PathBuf {
    let p = Path::new(DIR).join(format!("ggml-vocab-{name}.gguf"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch_llama_vocab.sh (it downloads llama-cpp-python 0.3.36's sdist from PyPI)",
        p.display()
    );
    p
}

/// The inputs of `name` on which kiln's rebuild differs from llama.cpp, as messages.
fn mismatches(name: &str) -> Vec<String> {
    let file = kiln::gguf::GgufFile::open(&gguf(name)).unwrap();
    let mut tok = match kiln::gguf::vocab::tokenizer_from_gguf(&file) {
        Ok(t) => t,
        Err(e) => return vec![format!("{name}: {e}")],
    };
    // llama.cpp's test tokenizes without parsing control tokens (`parse_special = false`).
    tok.tokenizer.set_encode_special_tokens(true);
    let mut bad = vec![];
    for (text, want) in cases(name) {
        let got = tok.encode(&text, false).unwrap();
        if got != want {
            bad.push(format!("{name}: {text:?}\n  llama.cpp {want:?}\n  kiln      {got:?}"));
        }
    }
    bad
}

#[test]
fn every_vocab_kiln_reads_tokenizes_as_llama_cpp() {
    let names = std::env::var("KILN_VOCABS").unwrap_or_else(|_| "llama-spm,phi-3,llama-bpe,qwen2,qwen35,gemma-4,gpt-2,deepseek-llm,deepseek-coder,command-r,falcon,mpt,starcoder,refact,bert-bge".into());
    let mut all = vec![];
    for n in names.split(',') {
        let m = mismatches(n);
        eprintln!("{n}: {} mismatches", m.len());
        all.extend(m);
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
}
