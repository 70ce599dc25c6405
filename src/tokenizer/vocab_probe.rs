//! The check that keeps kiln from training on text a vocabulary does not say: a fixed probe
//! text tokenized at load.
//!
//! - A GGUF vocabulary rebuilt by kiln ([`check_rebuild`]): every user-defined token alone must
//!   give its own id (llama.cpp cuts them out first), and the probe must decode back to itself.
//!   Gemma 3's `"\n"` (user-defined) once came back as `"ꉂ"`; either check names it.
//! - A GGUF vocabulary written from a `tokenizer.json` ([`compare`]): both must give the probe
//!   the same ids, or the export is refused, naming the first token that differs.

use crate::tokenizer::TokenizerInfo;

/// Whitespace runs and newlines (alone, doubled, after spaces, CRLF, tabs), digits in the
/// groupings pre-tokenizers split differently, accents and other scripts, emoji with modifiers
/// and joiners, code, and special-token look-alikes of every family kiln reads (parsed as
/// special where the vocabulary has them, as plain text where it does not).
pub const PROBE: &str = "Hello world\n\nHello World!\n  two spaces\n   three\n\n\n    four    \
spaces and a tab\there\r\nCRLF line \n trailing space\n\t\tindented\n\
Digits: 7 42 123 1234 12345 3.14159 1,000,000 2024-12-07 ½ ⅞ ٣\n\
Accents: Äpfel café naïve façade Ελληνικά Привет мир שלום नमस्ते 日本語 中文 한국어 ไทย\n\
Emoji: 🦙 👍🏽 👨‍👩‍👧 🇫🇷 ❤️ ✅\n\
Code: fn main() { let x = a[i] + b; } // done\n    if x == 1:\n        return {\"k\": [1, 2]}\n\
Look-alikes: <s> </s> <unk> <pad> <bos> <eos> <|endoftext|> <|im_start|>user<|im_end|> \
<|begin_of_text|><|start_header_id|>x<|end_header_id|> <|eot_id|> <start_of_turn>model \
<end_of_turn> [INST] [/INST] <|user|> <|assistant|> <|end|> <|channel|> <mask> <0x0A> ▁x\n\
The end.";

/// The probe without the one character SentencePiece-style vocabularies cannot give back
/// (`▁` decodes as a space).
fn probe_text() -> String {
    PROBE.replace('▁', "_")
}

/// Checks a GGUF vocabulary's rebuild against itself; the message names the first token that
/// is not what the vocabulary says.
pub fn check_rebuild(
    tok: &TokenizerInfo,
    tokens: &[&str],
    user_defined: &[usize],
) -> Result<(), String> {
    let mut plain = tok.tokenizer.clone();
    plain.set_encode_special_tokens(true);
    let encode = |text: &str| -> Result<Vec<u32>, String> {
        plain
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    };
    // Where two tokens share a text the later id wins, as in llama.cpp's `token_to_id`.
    let last: std::collections::HashMap<&str, usize> = match user_defined.is_empty() {
        true => Default::default(),
        false => tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect(),
    };
    for &id in user_defined {
        let text = tokens[id];
        if last.get(text) != Some(&id) {
            continue;
        }
        let got = encode(text)?;
        if got != [id as u32] {
            return Err(format!(
                "the user-defined token {:?} (id {id}) tokenizes as {}",
                text,
                describe(tok, &got)
            ));
        }
    }
    // llama.cpp tokenizes the text between user-defined pieces one fragment at a time (with a
    // prefix space where the vocabulary asks for one), so each fragment must come back as it was.
    let pieces: Vec<&str> = user_defined.iter().map(|&i| tokens[i]).collect();
    for fragment in fragments(&probe_text(), &pieces) {
        let ids = encode(fragment)?;
        let back = tok.decode(&ids).map_err(|e| e.to_string())?;
        if back != fragment {
            let at = first_difference(fragment, &back);
            let token = token_at(tok, &ids, at);
            return Err(format!(
                "the probe text does not decode back to itself: {:?} became {:?}{}",
                snippet(fragment, at),
                snippet(&back, at),
                token.map(|t| format!(" (token {t})")).unwrap_or_default()
            ));
        }
    }
    Ok(())
}

/// Tokenizes the probe with the model's own tokenizer and with a GGUF vocabulary made from it;
/// the first token where they differ.
pub fn compare(reference: &TokenizerInfo, gguf: &TokenizerInfo) -> Result<(), String> {
    // Special-token look-alikes as plain text on both sides: after a parsed special token,
    // transformers 5 and llama.cpp differ on SentencePiece prefix spaces by design.
    let plain = |t: &TokenizerInfo| -> Result<Vec<u32>, String> {
        let mut tok = t.tokenizer.clone();
        tok.set_encode_special_tokens(true);
        tok.encode(probe_text(), false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    };
    let (a, b) = (plain(reference)?, plain(gguf)?);
    let Some(i) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) else {
        return Ok(());
    };
    let name = |t: &TokenizerInfo, id: Option<&u32>| match id {
        Some(&id) => describe(t, &[id]),
        None => "nothing".to_string(),
    };
    Err(format!(
        "token {i} of the probe text (after {:?}): the tokenizer gives {}, the GGUF vocabulary {}",
        reference
            .decode(&a[..i])
            .unwrap_or_default()
            .chars()
            .rev()
            .take(24)
            .collect::<String>()
            .chars()
            .rev()
            .collect::<String>(),
        name(reference, a.get(i)),
        name(gguf, b.get(i)),
    ))
}

fn describe(tok: &TokenizerInfo, ids: &[u32]) -> String {
    ids.iter()
        .map(|&id| {
            format!(
                "{:?} ({id})",
                tok.tokenizer.id_to_token(id).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `text` without the user-defined pieces in it, leftmost-longest: the raw fragments between them.
fn fragments<'a>(text: &'a str, pieces: &[&str]) -> Vec<&'a str> {
    let mut out = vec![];
    let (mut start, mut i) = (0, 0);
    while i < text.len() {
        let hit = pieces
            .iter()
            .filter(|p| !p.is_empty() && text[i..].starts_with(**p))
            .map(|p| p.len())
            .max();
        match hit {
            Some(n) => {
                if start < i {
                    out.push(&text[start..i]);
                }
                i += n;
                start = i;
            }
            None => i += text[i..].chars().next().map_or(1, char::len_utf8),
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

fn first_difference(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or(a.len().min(b.len()))
}

fn snippet(s: &str, at: usize) -> String {
    let start = (0..=at.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    s[start..].chars().take(12).collect()
}

/// The token whose text covers byte `at` of the decoded ids.
fn token_at(tok: &TokenizerInfo, ids: &[u32], at: usize) -> Option<String> {
    let mut len = 0;
    for (i, &id) in ids.iter().enumerate() {
        len = tok.decode(&ids[..=i]).ok()?.len().max(len);
        if len > at {
            return Some(describe(tok, &[id]));
        }
    }
    None
}
