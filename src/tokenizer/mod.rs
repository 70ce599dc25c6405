//! The tokenizer beside a model: `tokenizer.json` loaded as transformers 5 loads it, the special
//! tokens, and the model's chat template.

pub mod vocab;
pub mod vocab_import;
pub mod vocab_probe;

use std::path::Path;

use serde_json::Value as Json;

use crate::error::{KilnError, Result};

/// Token ids and each token's byte range in the text.
pub type TokensWithOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// The tokenizer, its special tokens and chat template.
pub struct TokenizerInfo {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: u32,
    pub pad_id: u32,
    /// `bos_token`, `eos_token`, ... as strings: what a chat template sees.
    pub special_tokens: Vec<(String, String)>,
    /// The model's own chat template and the file it came from.
    pub chat_template: Option<(String, String)>,
}

fn token_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

const SPECIAL_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// transformers 5 builds Llama-class tokenizers from the class's own pipeline instead of the
/// file's: no normalizer, a Metaspace pre-tokenizer that prepends `▁` only to the first piece of
/// the text. Files converted with the legacy pipeline (`Prepend("▁")` normalizer, as Phi-3 and
/// Llama 2 ship) therefore tokenize differently after special tokens (`<|user|>\nHi` gives
/// `Hi`, not `▁Hi`). kiln follows transformers 5.
fn as_transformers_loads_it(
    tokenizer: &mut tokenizers::Tokenizer,
    tokenizer_class: Option<&str>,
) -> std::result::Result<(), String> {
    let llama_class = matches!(
        tokenizer_class,
        Some(
            "LlamaTokenizer"
                | "LlamaTokenizerFast"
                | "CodeLlamaTokenizer"
                | "CodeLlamaTokenizerFast"
        )
    );
    let bpe = matches!(tokenizer.get_model(), tokenizers::ModelWrapper::BPE(_));
    let legacy_prepend = tokenizer
        .get_normalizer()
        .and_then(|n| serde_json::to_string(n).ok())
        .is_some_and(|n| n.contains("\"Prepend\""));
    if llama_class && bpe && legacy_prepend {
        use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
        tokenizer
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .map_err(|e| e.to_string())?;
        tokenizer.with_pre_tokenizer(Some(Metaspace::new(
            '\u{2581}',
            PrependScheme::First,
            false,
        )));
    }
    Ok(())
}

fn read_optional_json(path: &Path) -> Result<Json> {
    if path.exists() {
        crate::io::read_json(path)
    } else {
        Ok(Json::Null)
    }
}

/// The model's chat template: `chat_template.jinja` (transformers 5), `chat_template.json`, or
/// `chat_template` in tokenizer_config.json (a string, or a list of named templates).
fn find_chat_template(dir: &Path, tokenizer_config: &Json) -> Result<Option<(String, String)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let text = std::fs::read_to_string(&jinja).map_err(|e| KilnError::io(&jinja, e))?;
        return Ok(Some((text, jinja.display().to_string())));
    }
    let json = dir.join("chat_template.json");
    if let Some(t) = read_optional_json(&json)?
        .get("chat_template")
        .and_then(Json::as_str)
    {
        return Ok(Some((t.to_string(), json.display().to_string())));
    }
    let origin = dir.join("tokenizer_config.json").display().to_string();
    Ok(match tokenizer_config.get("chat_template") {
        Some(Json::String(t)) => Some((t.clone(), origin)),
        Some(Json::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template")?.as_str())
            .map(|t| (t.to_string(), origin)),
        _ => None,
    })
}

/// The special ids a model's `config.json` names, used where the tokenizer files name none.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConfigIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

impl TokenizerInfo {
    /// Loads the tokenizer files of model directory `dir`. `config` (config.json's ids) supplies
    /// bos/eos when tokenizer_config.json does not name them.
    pub fn load(dir: &Path, config: ConfigIds) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(KilnError::model(
                &path,
                "tokenizer.json not found; copy the tokenizer files of the base model into the model directory",
            ));
        }
        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_optional_json(&tc_path)?;
        let special_map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let mut tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| KilnError::model(&path, format!("cannot load tokenizer: {e}")))?;
        as_transformers_loads_it(
            &mut tokenizer,
            tc.get("tokenizer_class").and_then(Json::as_str),
        )
        .map_err(|e| KilnError::model(&path, format!("cannot load tokenizer: {e}")))?;
        // tokenizer.json files saved after a `tokenizer(..., truncation=True, padding=...)` call
        // keep those settings; transformers ignores them unless a call asks, and so does kiln:
        // examples are cut at data.max_seq_len and batches padded by kiln itself.
        tokenizer
            .with_truncation(None)
            .map_err(|e| KilnError::model(&path, format!("cannot load tokenizer: {e}")))?;
        tokenizer.with_padding(None);

        let special_tokens: Vec<(String, String)> = SPECIAL_KEYS
            .iter()
            .filter_map(|&k| {
                let v = tc
                    .get(k)
                    .and_then(token_text)
                    .or_else(|| special_map.get(k).and_then(token_text))?;
                Some((k.to_string(), v))
            })
            .collect();
        let named = |key: &str| {
            special_tokens
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, t)| tokenizer.token_to_id(t))
        };
        let eos_id = named("eos_token")
            .or(config.eos)
            .ok_or_else(|| {
                KilnError::model(dir, "no end-of-sequence token: set `eos_token` in tokenizer_config.json or `eos_token_id` in config.json")
            })?;
        let bos_id = named("bos_token").or(config.bos);
        let pad_id = named("pad_token").unwrap_or(eos_id);
        let mut special_tokens = special_tokens;
        // Templates that print `eos_token` need it even when only config.json names it.
        for (key, id) in [("eos_token", Some(eos_id)), ("bos_token", bos_id)] {
            if !special_tokens.iter().any(|(k, _)| k == key) {
                if let Some(text) = id.and_then(|i| tokenizer.id_to_token(i)) {
                    special_tokens.push((key.to_string(), text));
                }
            }
        }
        let chat_template = find_chat_template(dir, &tc)?;
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            special_tokens,
            chat_template,
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (bos).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| KilnError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of `text` (no special tokens added) with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<TokensWithOffsets> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| KilnError::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| KilnError::Tokenizer(e.to_string()))
    }

    pub fn special(&self, key: &str) -> Option<&str> {
        self.special_tokens
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Whether `other` gives every token the id `ours` gives it (the same vocabulary, added and
/// special tokens included), as a draft for speculative decoding and a distillation teacher
/// must; the first difference otherwise, in `other`'s terms.
pub fn check_same_ids(
    ours: &TokenizerInfo,
    other: &TokenizerInfo,
) -> std::result::Result<(), String> {
    let (a, b) = (
        ours.tokenizer.get_vocab(true),
        other.tokenizer.get_vocab(true),
    );
    if a.len() != b.len() {
        return Err(format!("{} tokens against {}", b.len(), a.len()));
    }
    let mut tokens: Vec<(&String, &u32)> = a.iter().collect();
    tokens.sort_by_key(|(_, &id)| id);
    for (token, id) in tokens {
        match b.get(token) {
            Some(other) if other == id => {}
            Some(other) => return Err(format!("`{token}` is id {other}, not {id}")),
            None => return Err(format!("no token `{token}` (id {id})")),
        }
    }
    Ok(())
}
