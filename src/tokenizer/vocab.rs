//! The tokenizer as GGUF metadata (`tokenizer.ggml.*`), both ways.
//!
//! Export: byte-level BPE tokenizers become `gpt2` vocabularies (tokens, types, merges) with the
//! `tokenizer.ggml.pre` name llama.cpp uses for their pre-tokenizer regex; SentencePiece-style
//! BPE (`▁`, byte fallback) becomes a `llama` vocabulary with scores from the merge ranks, which
//! llama.cpp's SPM tokenizer merges in the same order. Special ids and `add_bos_token` come from
//! what the tokenizer does, not from guesses; the chat template is copied as is.
//!
//! Import ([`tokenizer_from_gguf`], in `vocab_import.rs`): a `tokenizers` tokenizer rebuilt from
//! that metadata to give llama.cpp's ids, so `kiln generate` and `kiln eval` run on a GGUF file alone.

use crate::gguf::keys;
use std::collections::HashMap;
use std::path::Path;

use serde_json::Value as Json;

use super::vocab_import::BPE_PRES;
use crate::error::{KilnError, Result};
use crate::gguf::{Value, ValueType};
use crate::tokenizer::TokenizerInfo;

/// llama.cpp's token types.
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_UNKNOWN: i32 = 2;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;
pub const TOKEN_BYTE: i32 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VocabKind {
    /// Byte-level BPE (GPT-2, Llama 3, Qwen 2).
    Gpt2,
    /// SentencePiece BPE with byte fallback (Llama 2, Phi-3, Mistral v0.1–0.3).
    Spm,
}

fn contains_type(v: &Json, ty: &str) -> bool {
    match v {
        Json::Object(o) => {
            o.get("type").and_then(Json::as_str) == Some(ty)
                || o.values().any(|x| contains_type(x, ty))
        }
        Json::Array(a) => a.iter().any(|x| contains_type(x, ty)),
        _ => false,
    }
}

fn vocab_kind(path: &Path, tj: &Json) -> Result<VocabKind> {
    let model = &tj["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(KilnError::model(
            path,
            format!(
                "tokenizer model `{}` cannot be exported to GGUF yet (kiln exports BPE tokenizers)",
                model["type"].as_str().unwrap_or("?")
            ),
        ));
    }
    if contains_type(&tj["pre_tokenizer"], "ByteLevel")
        || contains_type(&tj["decoder"], "ByteLevel")
    {
        Ok(VocabKind::Gpt2)
    } else if model["byte_fallback"].as_bool() == Some(true) {
        Ok(VocabKind::Spm)
    } else {
        Err(KilnError::model(
            path,
            "the tokenizer is neither byte-level BPE nor SentencePiece-style BPE with byte fallback; kiln cannot map it to a llama.cpp vocabulary",
        ))
    }
}

/// llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json.
fn detect_pre(path: &Path, tj: &Json) -> Result<String> {
    let pre = &tj["pre_tokenizer"];
    let mut regexes = vec![];
    collect_split_regexes(pre, &mut regexes);
    if let Some(pre) = BPE_PRES.iter().find(|p| p.regexes == regexes.as_slice()) {
        return Ok(pre.names[0].to_string());
    }
    let plain_byte_level =
        pre["type"].as_str() == Some("ByteLevel") && pre["use_regex"].as_bool() != Some(false);
    if regexes.is_empty() && plain_byte_level {
        return Ok("gpt-2".into());
    }
    let digits_then_byte_level = pre["type"].as_str() == Some("Sequence")
        && pre["pretokenizers"][0]["type"].as_str() == Some("Digits")
        && pre["pretokenizers"][0]["individual_digits"].as_bool() == Some(true)
        && pre["pretokenizers"][1]["type"].as_str() == Some("ByteLevel")
        && pre["pretokenizers"].as_array().map(Vec::len) == Some(2);
    if digits_then_byte_level {
        return Ok("smollm".into());
    }
    Err(KilnError::model(
        path,
        format!(
            "kiln does not know llama.cpp's name for this pre-tokenizer ({}); a wrong name silently changes tokenization, so pass --tokenizer-pre NAME (e.g. llama-bpe, qwen2, gpt-2) only if you know it",
            serde_json::to_string(pre).unwrap_or_default().chars().take(160).collect::<String>()
        ),
    ))
}

fn collect_split_regexes(v: &Json, out: &mut Vec<String>) {
    match v {
        Json::Object(o) => {
            if o.get("type").and_then(Json::as_str) == Some("Split") {
                if let Some(re) = o
                    .get("pattern")
                    .and_then(|p| p.get("Regex"))
                    .and_then(Json::as_str)
                {
                    out.push(re.to_string());
                }
            }
            o.values().for_each(|x| collect_split_regexes(x, out));
        }
        Json::Array(a) => a.iter().for_each(|x| collect_split_regexes(x, out)),
        _ => {}
    }
}

/// Merges as "A B" strings; a space inside a part is written as U+0120 ('Ġ'), as gguf-py does.
fn merges_of(tj: &Json) -> Vec<String> {
    let Some(merges) = tj["model"]["merges"].as_array() else {
        return vec![];
    };
    merges
        .iter()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) if pair.len() == 2 => {
                let part = |p: &Json| p.as_str().map(|s| s.replace(' ', "\u{120}"));
                Some(format!("{} {}", part(&pair[0])?, part(&pair[1])?))
            }
            _ => None,
        })
        .collect()
}

fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
}

/// The tokens the tokenizer's post-processor puts before and after a text (bos, eos), if any.
fn added_tokens(info: &TokenizerInfo) -> Result<(Option<u32>, Option<u32>)> {
    let with = info.encode("a", true)?;
    let without = info.encode("a", false)?;
    let added = with.len() > without.len();
    let first = (added && with.first() != without.first()).then(|| with[0]);
    let last = (added && with.last() != without.last()).then(|| with[with.len() - 1]);
    Ok((first, last))
}

/// `tokenizer.ggml.*` metadata for the tokenizer of model directory `dir`, padded to
/// `vocab_size` entries (the embedding's rows). `pre_override` replaces the detected pre name.
/// When `dir` is a GGUF file (a GGUF training base), its own `tokenizer.*` metadata, as it is.
pub fn export_metadata(
    dir: &Path,
    info: &TokenizerInfo,
    vocab_size: usize,
    pre_override: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    if crate::gguf::is_gguf(dir) {
        let file = crate::gguf::GgufFile::open(dir)?;
        let mut out: Vec<(String, Value)> = file
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .cloned()
            .collect();
        if let Some(pre) = pre_override {
            for (k, v) in out.iter_mut() {
                if k == keys::tokenizer::PRE {
                    *v = Value::String(pre.into());
                }
            }
        }
        return Ok(out);
    }
    let path = dir.join("tokenizer.json");
    let tj = crate::io::read_json(&path)?;
    let kind = vocab_kind(&path, &tj)?;
    let tok = &info.tokenizer;
    let added = tok.get_added_tokens_decoder();
    let n_tokenizer = tok.get_vocab_size(true);
    if n_tokenizer > vocab_size {
        return Err(KilnError::model(
            &path,
            format!(
                "the tokenizer has {n_tokenizer} tokens but the model's vocab_size is {vocab_size}"
            ),
        ));
    }
    let merges = merges_of(&tj);
    // SentencePiece scores: the rank of the merge that makes the token (earlier = higher).
    let mut merge_rank: HashMap<String, usize> = HashMap::new();
    if kind == VocabKind::Spm {
        for (rank, m) in merges.iter().enumerate() {
            if let Some((a, b)) = m.split_once(' ') {
                merge_rank.entry(format!("{a}{b}")).or_insert(rank);
            }
        }
    }
    let unk = tj["model"]["unk_token"].as_str();
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    let mut scores = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size as u32 {
        let Some(mut text) = tok.id_to_token(id) else {
            tokens.push(format!("[PAD{id}]"));
            types.push(TOKEN_UNUSED);
            scores.push(-1000.0f32);
            continue;
        };
        let (ty, score) = if let Some(a) = added.get(&id) {
            if a.special || looks_special(&text) {
                (TOKEN_CONTROL, 0.0)
            } else {
                text = text.replace('\u{2581}', " ");
                (TOKEN_USER_DEFINED, 0.0)
            }
        } else if kind == VocabKind::Spm && Some(text.as_str()) == unk {
            (TOKEN_UNKNOWN, 0.0)
        } else if kind == VocabKind::Spm && is_byte_token(&text) {
            (TOKEN_BYTE, 0.0)
        } else {
            let score = merge_rank
                .get(&text)
                .map(|&r| -(r as f32))
                .unwrap_or(-1e6 - id as f32);
            (TOKEN_NORMAL, score)
        };
        tokens.push(text);
        types.push(ty);
        scores.push(score);
    }
    let mut meta: Vec<(String, Value)> = vec![];
    let mut put = |k: &str, v: Value| meta.push((k.to_string(), v));
    match kind {
        VocabKind::Gpt2 => {
            let pre = match pre_override {
                Some(p) => p.to_string(),
                None => detect_pre(&path, &tj)?,
            };
            put(keys::tokenizer::MODEL, Value::String("gpt2".into()));
            put(keys::tokenizer::PRE, Value::String(pre));
            put(keys::tokenizer::TOKENS, Value::strings(tokens));
            put(keys::tokenizer::TOKEN_TYPE, int_array(&types));
            put(keys::tokenizer::MERGES, Value::strings(merges));
        }
        VocabKind::Spm => {
            put(keys::tokenizer::MODEL, Value::String("llama".into()));
            put(
                keys::tokenizer::PRE,
                Value::String(pre_override.unwrap_or("default").into()),
            );
            put(keys::tokenizer::TOKENS, Value::strings(tokens));
            put(
                keys::tokenizer::SCORES,
                Value::Array(ValueType::F32, scores.into_iter().map(Value::F32).collect()),
            );
            put(keys::tokenizer::TOKEN_TYPE, int_array(&types));
        }
    }
    // The BOS llama.cpp adds must be the token the tokenizer's post-processor adds, even when
    // config.json names another one.
    let (added_first, added_last) = added_tokens(info)?;
    let bos = added_first.or(info.bos_id);
    if let Some(bos) = bos {
        put(keys::tokenizer::BOS_ID, Value::U32(bos));
    }
    put(keys::tokenizer::EOS_ID, Value::U32(info.eos_id));
    if let Some(unk_id) = unk.and_then(|u| tok.token_to_id(u)) {
        put(keys::tokenizer::UNK_ID, Value::U32(unk_id));
    }
    if info.special("pad_token").is_some() {
        put(keys::tokenizer::PAD_ID, Value::U32(info.pad_id));
    }
    put(keys::tokenizer::ADD_BOS, Value::Bool(added_first.is_some()));
    put(
        keys::tokenizer::ADD_EOS,
        Value::Bool(added_last == Some(info.eos_id)),
    );
    if kind == VocabKind::Spm {
        let prefix = contains_type(&tj["pre_tokenizer"], "Metaspace")
            || contains_type(&tj["normalizer"], "Prepend");
        put(keys::tokenizer::ADD_PREFIX, Value::Bool(prefix));
    }
    if let Some((template, _)) = &info.chat_template {
        put(
            keys::tokenizer::CHAT_TEMPLATE,
            Value::String(template.clone()),
        );
    }
    Ok(meta)
}

/// Refuses a GGUF file's metadata (`meta`, `general.name` included: llama.cpp reads Phi-3's
/// rules from it) whose vocabulary tokenizes the probe text differently from the tokenizer it
/// was written from, naming the first token that differs.
pub fn check_export(path: &Path, info: &TokenizerInfo, meta: &[(String, Value)]) -> Result<()> {
    let file = crate::gguf::GgufFile {
        path: path.to_path_buf(),
        version: 3,
        metadata: meta.to_vec(),
        tensors: vec![],
        alignment: 32,
        data_start: 0,
    };
    let gguf = super::vocab_import::tokenizer_from_gguf(&file)?;
    super::vocab_probe::compare(info, &gguf).map_err(|m| {
        KilnError::model(
            path,
            format!("the GGUF vocabulary kiln would write does not tokenize as this tokenizer does: {m}; llama.cpp and Ollama would read different text, so kiln refuses to write it"),
        )
    })
}

fn int_array(v: &[i32]) -> Value {
    Value::Array(ValueType::I32, v.iter().map(|&t| Value::I32(t)).collect())
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && u8::from_str_radix(&t[3..5], 16).is_ok()
}

pub use super::vocab_import::tokenizer_from_gguf;
