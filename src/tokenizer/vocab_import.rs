//! A GGUF file's vocabulary (`tokenizer.ggml.*`) rebuilt as a `tokenizers` tokenizer that gives
//! llama.cpp's token ids (`src/llama-vocab.cpp` at llama-cpp-python 0.3.36).
//!
//! What llama.cpp does, and how each step is written here:
//! - **Special pieces first.** Control, unknown and user-defined tokens are cut out of the raw text
//!   before anything else runs, as whole pieces (`tokenizer_st_partition`). They become
//!   `added_tokens` matched on the raw text (`normalized: false`); control and unknown ones are
//!   `special` (llama.cpp matches them only when parsing special text, `tokenizers` unless
//!   `encode_special_tokens` is set), user-defined ones always. Normal, byte and unused tokens are
//!   only reached through the model.
//! - **SPM (`llama`).** Spaces become `▁`, and a `▁` is put before every text fragment that starts
//!   the input or follows a special piece (`add_space_prefix`): a normalizer
//!   (`Prepend`, `Replace`) on each fragment. The pieces are merged best score first: a BPE whose
//!   merges are every split of a token ranked by that token's score, with byte fallback.
//! - **BPE (`gpt2`).** The text is split by the pre-tokenizer's regexes in turn, each keeping
//!   matches and gaps as pieces (`Split`, `Isolated`), then bytes are mapped to GPT-2's
//!   characters. Each `tokenizer.ggml.pre` names one list of regexes ([`BPE_PRES`]), the
//!   `tokenizer.json` originals llama.cpp transcribes. Some also keep a piece whole when it is a
//!   token (`ignore_merges`).
//! - **Gemma 4 (`gemma4`).** SPM-style BPE: spaces become `▁`, the text is split into runs of
//!   newlines and the rest, merges run on UTF-8 characters, unknown characters fall back to
//!   `<0xXX>` byte tokens. llama.cpp keeps a newline run that is a token whole; here Gemma 4's
//!   merges make the same tokens (checked on the gemma-4 inputs, whose runs reach `\n\n\n\n`).
//!
//! A vocabulary model or pre-tokenizer not listed here is refused by name: a guess would
//! tokenize differently without a word. `tests/llama_vocab.rs` checks every vocabulary of
//! llama.cpp's own tokenizer tests.

use crate::gguf::keys;
use serde_json::{json, Value as Json};

use super::vocab::{TOKEN_BYTE, TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED};
use crate::error::{KilnError, Result};
use crate::gguf::{GgufFile, Value};
use crate::tokenizer::TokenizerInfo;

/// GPT-2's split (`tokenizers`' ByteLevel regex).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's split.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's split: Llama 3's with single digits.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 3.5's split: Qwen 2's with combining marks kept in words.
const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One `tokenizer.ggml.pre` family: the names llama.cpp gives it, its split regexes in order,
/// and whether a piece that is already a token skips the merges.
pub struct BpePre {
    pub names: &'static [&'static str],
    pub regexes: &'static [&'static str],
    pub ignore_merges: bool,
}

/// The BPE pre-tokenizers kiln reads; each family is checked against llama.cpp's tests through
/// one of its names. The first name is the one export writes.
pub const BPE_PRES: &[BpePre] = &[
    BpePre {
        names: &[
            "llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
            "lfm2", "jina-v5-nano",
        ],
        regexes: &[LLAMA3],
        ignore_merges: true,
    },
    BpePre {
        names: &[
            "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "hunyuan", "solar-open",
            "megrez",
        ],
        regexes: &[QWEN2],
        ignore_merges: false,
    },
    BpePre {
        names: &["qwen35"],
        regexes: &[QWEN35],
        ignore_merges: false,
    },
    BpePre {
        names: &[
            "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
            "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion",
            "granite-docling", "exaone4",
        ],
        regexes: &[GPT2],
        ignore_merges: false,
    },
    BpePre {
        names: &[
            "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
            "mellum2",
        ],
        regexes: &[r"\p{N}", GPT2],
        ignore_merges: false,
    },
    BpePre {
        names: &["falcon"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9]+", "[0-9][0-9][0-9]"],
        ignore_merges: false,
    },
    BpePre {
        names: &["deepseek-llm"],
        regexes: &[
            "[\u{d}\u{a}]",
            "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
            "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
            "\\s+$",
            "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
            "\\p{N}+",
        ],
        ignore_merges: false,
    },
    BpePre {
        names: &["deepseek-coder"],
        regexes: &[
            "[\u{d}\u{a}]",
            "\\s?\\p{L}+",
            "\\s?\\p{P}+",
            "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
            "\\p{N}",
        ],
        ignore_merges: false,
    },
];

/// The pre-tokenizer family llama.cpp gives `name`.
pub fn bpe_pre(name: &str) -> Option<&'static BpePre> {
    BPE_PRES.iter().find(|p| p.names.contains(&name))
}

/// The vocabulary models kiln reads, as `tokenizer.ggml.model` names them.
pub const MODELS: &[&str] = &["llama", "gpt2", "gemma4"];

/// What the rebuild needs of the file's token list.
struct Vocab<'a> {
    tokens: Vec<&'a str>,
    types: Vec<i64>,
}

impl Vocab<'_> {
    fn is(&self, id: usize, ty: i32) -> bool {
        self.types[id] == ty as i64
    }

    /// Every token by its text; where two tokens share a text the later id wins, as in
    /// llama.cpp's `token_to_id`.
    fn map(&self) -> serde_json::Map<String, Json> {
        let mut map = serde_json::Map::new();
        for (i, t) in self.tokens.iter().enumerate() {
            map.insert(t.to_string(), json!(i));
        }
        map
    }

    /// Control, unknown and user-defined tokens as `added_tokens`, cut from the raw text first.
    /// `rstrip` names the tokens that swallow the whitespace after them.
    fn added(&self, rstrip: impl Fn(usize, &str) -> bool) -> Vec<Json> {
        self.tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                self.is(*i, TOKEN_CONTROL)
                    || self.is(*i, TOKEN_UNKNOWN)
                    || self.is(*i, TOKEN_USER_DEFINED)
            })
            .filter(|(_, t)| !t.is_empty())
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": rstrip(i, t), "normalized": false,
                       "special": !self.is(i, TOKEN_USER_DEFINED)})
            })
            .collect()
    }
}

/// Rebuilds the tokenizer stored in a GGUF file's metadata.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<TokenizerInfo> {
    let bad = |m: String| KilnError::model(&file.path, m);
    let model = file.require_str(keys::tokenizer::MODEL)?;
    if !MODELS.contains(&model) {
        return Err(bad(format!(
            "kiln cannot read the `{model}` vocabulary (tokenizer.ggml.model); it reads {} — refusing rather than tokenizing differently from llama.cpp",
            MODELS.join(", ")
        )));
    }
    let tokens = string_array(file, keys::tokenizer::TOKENS)?;
    let types = token_types(file, tokens.len())?;
    let vocab = Vocab { tokens, types };
    let rstrip = phi3_rstrip(file, &vocab);
    let added = vocab.added(|i, t| rstrip.as_ref().is_some_and(|f| f(i, t)));
    let bos = file.get(keys::tokenizer::BOS_ID).and_then(Value::as_u64);
    let eos = file.require_u64(keys::tokenizer::EOS_ID)? as u32;
    let token_text = |id: Option<u64>| {
        id.and_then(|i| vocab.tokens.get(i as usize))
            .map(|t| t.to_string())
    };
    let add_bos = file
        .get(keys::tokenizer::ADD_BOS)
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let post_processor = match (add_bos, token_text(bos)) {
        (true, Some(b)) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.clone(): {"id": b, "ids": [bos], "tokens": [b]}}}),
        _ => Json::Null,
    };
    let mut tj = match model {
        "gpt2" => {
            let pre_name = file
                .get(keys::tokenizer::PRE)
                .and_then(Value::as_str)
                .unwrap_or("default");
            let pre = bpe_pre(pre_name).ok_or_else(|| {
                bad(format!(
                    "kiln cannot tokenize with llama.cpp's pre-tokenizer `{pre_name}` (tokenizer.ggml.pre); it reads {} — refusing rather than tokenizing differently from llama.cpp",
                    BPE_PRES.iter().flat_map(|p| p.names.iter().copied()).collect::<Vec<_>>().join(", ")
                ))
            })?;
            let merges = string_array(file, keys::tokenizer::MERGES)?;
            byte_level_bpe(&vocab, pre, &merges)
        }
        "gemma4" => {
            let merges = string_array(file, keys::tokenizer::MERGES)?;
            gemma4_bpe(&vocab, &merges)
        }
        _ => {
            let scores: Vec<f64> = match file.get(keys::tokenizer::SCORES) {
                Some(Value::Array(_, s)) => s.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                _ => return Err(bad("`tokenizer.ggml.scores` is missing".into())),
            };
            let unk = file
                .get(keys::tokenizer::UNK_ID)
                .and_then(Value::as_u64)
                .and_then(|i| vocab.tokens.get(i as usize).copied());
            let prefix = file
                .get(keys::tokenizer::ADD_PREFIX)
                .and_then(Value::as_bool)
                .unwrap_or(true);
            spm(&vocab, &scores, unk, prefix)
        }
    };
    tj["added_tokens"] = Json::Array(added);
    tj["post_processor"] = post_processor;
    let tokenizer: tokenizers::Tokenizer = serde_json::from_value::<tokenizers::Tokenizer>(tj)
        .map_err(|e| {
            bad(format!(
                "cannot rebuild the tokenizer from its metadata: {e}"
            ))
        })?;
    let mut special_tokens = vec![];
    if let Some(b) = token_text(bos) {
        special_tokens.push(("bos_token".to_string(), b));
    }
    if let Some(e) = token_text(Some(eos as u64)) {
        special_tokens.push(("eos_token".to_string(), e));
    }
    let pad = file.get(keys::tokenizer::PAD_ID).and_then(Value::as_u64);
    if let Some(p) = token_text(pad) {
        special_tokens.push(("pad_token".to_string(), p));
    }
    let chat_template = file
        .get(keys::tokenizer::CHAT_TEMPLATE)
        .and_then(Value::as_str)
        .map(|t| {
            (
                t.to_string(),
                format!("{} (tokenizer.chat_template)", file.path.display()),
            )
        });
    let info = TokenizerInfo {
        tokenizer,
        bos_id: bos.map(|b| b as u32),
        eos_id: eos,
        pad_id: pad.map(|p| p as u32).unwrap_or(eos),
        special_tokens,
        chat_template,
    };
    let user_defined: Vec<usize> = (0..vocab.tokens.len())
        .filter(|&i| vocab.is(i, TOKEN_USER_DEFINED))
        .collect();
    super::vocab_probe::check_rebuild(&info, &vocab.tokens, &user_defined).map_err(|m| {
        bad(format!(
            "kiln's rebuild of this `{model}` vocabulary does not tokenize as the file says ({m}); refusing rather than training on text nobody wrote"
        ))
    })?;
    Ok(info)
}

/// A string array of the file, or an error naming the key.
fn string_array<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    file.require(key)?
        .as_array()
        .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
        .ok_or_else(|| KilnError::model(&file.path, format!("`{key}` is not an array of strings")))
}

/// `tokenizer.ggml.token_type`, one per token (all normal when the file has none).
fn token_types(file: &GgufFile, n: usize) -> Result<Vec<i64>> {
    let bad = |m: String| KilnError::model(&file.path, m);
    let types: Vec<i64> = match file.get(keys::tokenizer::TOKEN_TYPE) {
        Some(Value::Array(_, items)) => items
            .iter()
            .map(|v| match v {
                Value::I32(t) => Ok(*t as i64),
                other => other.as_u64().map(|t| t as i64).ok_or(()),
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad("`tokenizer.ggml.token_type` is not an integer array".into()))?,
        _ => vec![super::vocab::TOKEN_NORMAL as i64; n],
    };
    if types.len() != n {
        return Err(bad(format!("{} token types for {n} tokens", types.len())));
    }
    Ok(types)
}

/// llama.cpp recognises Phi-3 by `general.name` and strips the whitespace after its special
/// pieces, except after `<unk>`, `<s>` and `<|endoftext|>`, and after `</s>` too.
fn phi3_rstrip<'a>(file: &GgufFile, vocab: &'a Vocab) -> Option<impl Fn(usize, &str) -> bool + 'a> {
    let name = file
        .get(keys::general::NAME)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_lowercase();
    (name.contains("phi-3") || name.contains("phi3")).then_some(move |i: usize, t: &str| {
        t == "</s>"
            || (!vocab.is(i, super::vocab::TOKEN_NORMAL)
                && !vocab.is(i, TOKEN_BYTE)
                && !matches!(t, "<unk>" | "<s>" | "<|endoftext|>"))
    })
}

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn bpe_model(vocab: &Vocab, merges: &[&str], byte_fallback: bool, ignore_merges: bool) -> Json {
    json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": byte_fallback,
        "ignore_merges": ignore_merges, "vocab": vocab.map(), "merges": merges})
}

/// `gpt2`: the pre-tokenizer's splits, GPT-2's byte mapping, rank-ordered merges.
fn byte_level_bpe(vocab: &Vocab, pre: &BpePre, merges: &[&str]) -> Json {
    let mut steps: Vec<Json> = pre.regexes.iter().map(|re| split(re)).collect();
    steps.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
    json!({"version": "1.0", "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": bpe_model(vocab, merges, false, pre.ignore_merges)})
}

/// The decoder of `▁`-for-space vocabularies with byte tokens; `strip` drops a prefix space.
fn metaspace_decoder(strip: bool) -> Json {
    json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": if strip { 1 } else { 0 }, "stop": 0}]})
}

/// `gemma4`: `▁` for spaces, runs of newlines split from the rest, merges on UTF-8 characters,
/// `<0xXX>` for what no token covers.
fn gemma4_bpe(vocab: &Vocab, merges: &[&str]) -> Json {
    json!({"version": "1.0",
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        "pre_tokenizer": split(r"[^\n]+|[\n]+"),
        "decoder": metaspace_decoder(false),
        "model": bpe_model(vocab, merges, true, false)})
}

/// `llama` (SentencePiece): `▁` for spaces and before each fragment, merges best score first.
fn spm(vocab: &Vocab, scores: &[f64], unk: Option<&str>, add_space_prefix: bool) -> Json {
    let map = vocab.map();
    // Every split of a token into two tokens is a merge, ranked by the merged token's score
    // (llama.cpp merges the best-scoring pair first, the leftmost among equals).
    let mut merges: Vec<(f64, usize, String)> = vec![];
    for (id, t) in vocab.tokens.iter().enumerate() {
        if map.get(*t).and_then(Json::as_u64) != Some(id as u64) {
            continue;
        }
        for (cut, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(cut);
            if map.contains_key(a) && map.contains_key(b) {
                let score = scores.get(id).copied().unwrap_or(0.0);
                merges.push((-score, id, format!("{a} {b}")));
            }
        }
    }
    merges.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    let merges: Vec<String> = merges.into_iter().map(|m| m.2).collect();
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    json!({"version": "1.0", "normalizer": normalizer, "pre_tokenizer": null,
        "decoder": metaspace_decoder(add_space_prefix),
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": map, "merges": merges}})
}
