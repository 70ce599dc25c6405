//! Preference pairs in TRL 1.15's formats (`trl/trainer/dpo_trainer.py`, `trl/data_utils.py`),
//! tokenized as TRL tokenizes them:
//!
//! - **standard**: `prompt`, `chosen`, `rejected` as text. The tokenizer's end-of-sequence text is
//!   appended to each completion that lacks it; `prompt` and `prompt + completion` are tokenized
//!   with the tokenizer's special tokens (bos);
//! - **conversational**: the three as message lists, rendered through the chat template: the
//!   prompt with the generation prompt, `prompt + completion` without it;
//! - **implicit prompt**: no `prompt`, and `chosen` / `rejected` whole texts or conversations;
//!   their longest common prefix (characters, or messages) is the prompt, less a trailing space.
//!
//! The completion starts where the tokenized prompt and `prompt + completion` diverge (TRL's
//! `common_prefix_length`), so a token merged across the boundary is not lost. A pair becomes two
//! examples, chosen then rejected, whose targets are the completion's tokens; sequences longer
//! than `data.max_seq_len` lose their end (`keep_start`) or their start (`keep_end`), and with
//! `keep_start` a pair whose prompt alone fills the length is dropped, as TRL drops it.

use serde_json::{Map, Value as Json};

use super::template::ChatTemplate;
use super::Example;
use crate::error::{KilnError, Result};
use crate::recipe::{DataSection, Truncation};
use crate::tokenizer::TokenizerInfo;

/// One side of a pair: text, or messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Side {
    Text(String),
    Messages(Vec<Json>),
}

/// A pair as read: the prompt (`None`: implicit, the shared start of the two) and the two
/// completions.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRow {
    pub prompt: Option<Side>,
    pub chosen: Side,
    pub rejected: Side,
    pub tools: Option<Json>,
}

/// A pair's token ids: the prompt's and each completion's.
#[derive(Debug, Clone, PartialEq)]
pub struct PairIds {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

fn side(
    obj: &Map<String, Json>,
    key: &str,
    cfg: &DataSection,
) -> std::result::Result<Option<Side>, String> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(Side::Text(s.clone()))),
        Some(list @ Json::Array(_)) => {
            let role = cfg.fields.role.as_deref().unwrap_or("role");
            let content = cfg.fields.content.as_deref().unwrap_or("content");
            Ok(Some(Side::Messages(super::formats::messages(
                list, key, role, content, cfg,
            )?)))
        }
        Some(_) => Err(format!(
            "field `{key}` must be a string or a list of messages"
        )),
    }
}

/// Whether a row is a preference pair (it has the chosen and rejected fields).
pub fn is_pair(row: &Json, cfg: &DataSection) -> bool {
    let f = &cfg.fields;
    row.get(&f.chosen).is_some() && row.get(&f.rejected).is_some()
}

/// Reads a pair from a row, or says what is wrong with it.
pub fn parse_pair(row: &Json, cfg: &DataSection) -> std::result::Result<PairRow, String> {
    let f = &cfg.fields;
    let Some(obj) = row.as_object() else {
        return Err("each row must be a JSON object".into());
    };
    let needs = |key: &str| {
        format!(
            "row has no `{key}` field (a preference pair needs `{}` and `{}`, and `{}` unless the two share it)",
            f.chosen, f.rejected, f.prompt
        )
    };
    let chosen = side(obj, &f.chosen, cfg)?.ok_or_else(|| needs(&f.chosen))?;
    let rejected = side(obj, &f.rejected, cfg)?.ok_or_else(|| needs(&f.rejected))?;
    let prompt = side(obj, &f.prompt, cfg)?;
    let kinds = [Some(&chosen), Some(&rejected), prompt.as_ref()];
    let texts = kinds
        .iter()
        .flatten()
        .filter(|s| matches!(s, Side::Text(_)))
        .count();
    if texts != 0 && texts != kinds.iter().flatten().count() {
        return Err(format!(
            "`{}`, `{}` and `{}` must all be text or all be message lists",
            f.prompt, f.chosen, f.rejected
        ));
    }
    let empty = |s: &Side| match s {
        Side::Text(t) => t.is_empty(),
        Side::Messages(m) => m.is_empty(),
    };
    if empty(&chosen) || empty(&rejected) {
        return Err(format!("`{}` or `{}` is empty", f.chosen, f.rejected));
    }
    if chosen == rejected {
        return Err(format!(
            "`{}` equals `{}`: the pair prefers nothing",
            f.chosen, f.rejected
        ));
    }
    let tools = match obj.get(&f.tools) {
        Some(Json::String(s)) => serde_json::from_str(s).ok(),
        Some(Json::Null) | None => None,
        Some(v) => Some(v.clone()),
    };
    Ok(PairRow {
        prompt,
        chosen,
        rejected,
        tools,
    })
}

/// TRL's `extract_prompt`: the longest shared start of the two completions becomes the prompt
/// (for text, a space just before the split goes with the completions).
fn split_implicit(chosen: &Side, rejected: &Side) -> (Side, Side, Side) {
    match (chosen, rejected) {
        (Side::Text(c), Side::Text(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let mut idx = cc.iter().zip(&rc).take_while(|(a, b)| a == b).count();
            if idx < cc.len().min(rc.len()) && idx > 0 && cc[idx - 1] == ' ' {
                idx -= 1;
            }
            let text = |s: &[char]| Side::Text(s.iter().collect());
            (text(&cc[..idx]), text(&cc[idx..]), text(&rc[idx..]))
        }
        (Side::Messages(c), Side::Messages(r)) => {
            let idx = c.iter().zip(r).take_while(|(a, b)| a == b).count();
            (
                Side::Messages(c[..idx].to_vec()),
                Side::Messages(c[idx..].to_vec()),
                Side::Messages(r[idx..].to_vec()),
            )
        }
        _ => unreachable!("parse_pair checks the sides are alike"),
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// `prompt` alone and `prompt + completion`, tokenized as TRL does: text with the tokenizer's
/// special tokens and the end-of-sequence text appended to the completion; messages through the
/// chat template (the prompt with the generation prompt).
fn tokenize_prompted(
    prompt: &Side,
    completion: &Side,
    tools: Option<&Json>,
    tok: &TokenizerInfo,
    template: Option<&ChatTemplate>,
) -> std::result::Result<(Vec<u32>, Vec<u32>), String> {
    let err = |e: crate::error::KilnError| e.to_string();
    match (prompt, completion) {
        (Side::Text(p), Side::Text(c)) => {
            let eos = tok
                .tokenizer
                .id_to_token(tok.eos_id)
                .ok_or("the tokenizer has no end-of-sequence token text")?;
            let c = if c.ends_with(&eos) {
                c.clone()
            } else {
                format!("{c}{eos}")
            };
            let ids = |s: &str| tok.encode(s, true).map_err(err);
            Ok((ids(p)?, ids(&format!("{p}{c}"))?))
        }
        (Side::Messages(p), Side::Messages(c)) => {
            let template = template.ok_or(
                "conversational rows need a chat template: set data.chat_template to a built-in or a .jinja file",
            )?;
            let render =
                |msgs: &[Json], generation: bool| -> std::result::Result<Vec<u32>, String> {
                    let text = template
                        .render(msgs, tools, generation, &tok.special_tokens)
                        .map_err(|e| format!("chat template ({}): {e}", template.origin))?;
                    tok.encode(&text, false).map_err(err)
                };
            Ok((
                render(p, true)?,
                render(&[p.as_slice(), c].concat(), false)?,
            ))
        }
        _ => Err("the prompt and the completion must both be text or both be messages".into()),
    }
}

/// A pair's token ids, as TRL's DPO tokenizes them.
pub fn encode_pair(
    row: &PairRow,
    tok: &TokenizerInfo,
    template: Option<&ChatTemplate>,
) -> std::result::Result<PairIds, String> {
    let (prompt, chosen, rejected) = match &row.prompt {
        Some(p) => (p.clone(), row.chosen.clone(), row.rejected.clone()),
        None => split_implicit(&row.chosen, &row.rejected),
    };
    let tools = row.tools.as_ref();
    let (p, pc) = tokenize_prompted(&prompt, &chosen, tools, tok, template)?;
    let (_, pr) = tokenize_prompted(&prompt, &rejected, tools, tok, template)?;
    let n = common_prefix(&p, &pc).min(common_prefix(&p, &pr));
    Ok(PairIds {
        prompt: p[..n].to_vec(),
        chosen: pc[n..].to_vec(),
        rejected: pr[n..].to_vec(),
    })
}

/// The pair's two training examples (chosen, rejected), cut to `max_len` as `mode` says; `None`
/// when `keep_start` leaves a completion nothing (the prompt fills the length).
pub fn pair_examples(ids: &PairIds, max_len: usize, mode: Truncation) -> Option<[Example; 2]> {
    if mode == Truncation::KeepStart && ids.prompt.len() >= max_len {
        return None;
    }
    let example = |completion: &[u32]| {
        let mut input_ids = [ids.prompt.as_slice(), completion].concat();
        let mut loss_mask: Vec<bool> = (0..input_ids.len())
            .map(|i| i >= ids.prompt.len())
            .collect();
        if input_ids.len() > max_len {
            let cut = match mode {
                Truncation::KeepStart => 0..max_len,
                Truncation::KeepEnd => input_ids.len() - max_len..input_ids.len(),
            };
            input_ids = input_ids[cut.clone()].to_vec();
            loss_mask = loss_mask[cut].to_vec();
        }
        Example::new(input_ids, loss_mask)
    };
    Some([example(&ids.chosen), example(&ids.rejected)])
}

/// Reads, tokenizes, cuts and splits the recipe's pairs: `train` and `val` hold each pair's two
/// examples in turn (chosen at even indices, rejected after it).
pub fn load_pairs(
    cfg: &DataSection,
    truncation: Truncation,
    tok: &TokenizerInfo,
    seed: u64,
) -> Result<super::Dataset> {
    let templating = super::resolve_template(cfg, tok)?;
    let files = super::source::resolve_files(&cfg.path.to_vec(), &cfg.split)?;
    let mut stats = super::DatasetStats::default();
    let mut pairs = read_pairs(&files, cfg, truncation, tok, &templating, &mut stats)?;
    let mut val = match &cfg.val_path {
        Some(paths) => {
            let files = super::source::resolve_files(&paths.to_vec(), "validation")?;
            read_pairs(
                &files,
                cfg,
                truncation,
                tok,
                &templating,
                &mut Default::default(),
            )?
        }
        None => {
            let n_val = super::val_count(cfg.val_split, pairs.len());
            if n_val >= pairs.len() && n_val > 0 {
                return Err(KilnError::Recipe(format!(
                    "data.val_split = {} holds out {n_val} of {} pairs, leaving none to train on",
                    cfg.val_split,
                    pairs.len()
                )));
            }
            let mut order: Vec<usize> = (0..pairs.len()).collect();
            crate::rng::KilnRng::fork(seed, 3).shuffle(&mut order);
            let held: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
            let (v, t): (Vec<_>, Vec<_>) = std::mem::take(&mut pairs)
                .into_iter()
                .enumerate()
                .partition(|(i, _)| held.contains(i));
            pairs = t.into_iter().map(|(_, p)| p).collect();
            v.into_iter().map(|(_, p)| p).collect()
        }
    };
    if pairs.is_empty() {
        return Err(KilnError::data(
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
            None,
            format!(
                "no pair left to train on ({} rows read, {} skipped, {} dropped: the prompt fills data.max_seq_len)",
                stats.rows, stats.skipped, stats.dropped
            ),
        ));
    }
    let flat = |p: &mut Vec<[Example; 2]>| -> Vec<Example> {
        std::mem::take(p).into_iter().flatten().collect()
    };
    let train = flat(&mut pairs);
    stats.examples = train.len();
    stats.tokens = train.iter().map(|e| e.input_ids.len()).sum();
    stats.target_tokens = train.iter().map(Example::num_targets).sum();
    let val = flat(&mut val);
    stats.val_examples = val.len();
    Ok(super::Dataset {
        train,
        val,
        stats,
        formats: vec![],
        templating,
    })
}

/// The pairs of `files`, each two examples; bad rows are errors naming the row, or skipped and
/// counted with `skip_bad_rows`.
fn read_pairs(
    files: &[std::path::PathBuf],
    cfg: &DataSection,
    truncation: Truncation,
    tok: &TokenizerInfo,
    templating: &super::Templating,
    stats: &mut super::DatasetStats,
) -> Result<Vec<[Example; 2]>> {
    let mut out = vec![];
    for file in files {
        for (place, row) in super::source::read_rows(file)? {
            stats.rows += 1;
            let ids = row
                .and_then(|r| parse_pair(&r, cfg))
                .and_then(|pair| encode_pair(&pair, tok, templating.template.as_ref()));
            let ids = match ids {
                Ok(ids) => ids,
                Err(msg) => {
                    place.skip_or_fail(&msg, cfg.skip_bad_rows, &mut stats.skipped)?;
                    continue;
                }
            };
            let longest = ids.prompt.len() + ids.chosen.len().max(ids.rejected.len());
            stats.longest = stats.longest.max(longest);
            if longest > cfg.max_seq_len {
                stats.truncated += 1;
            }
            match pair_examples(&ids, cfg.max_seq_len, truncation) {
                Some(pair) => out.push(pair),
                None => stats.dropped += 1,
            }
        }
    }
    Ok(out)
}

/// An unpaired example (KTO): a prompt, a completion, and whether the completion is desirable.
#[derive(Debug, Clone, PartialEq)]
pub struct Unpaired {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub desirable: bool,
}

/// KTO's rows as TRL reads them: `prompt`, `completion` and a boolean `label`; or preference
/// pairs, unpaired as TRL's `unpair_preference_dataset` does (in blocks of 1,000 rows, the
/// chosen completions, desirable, then the rejected).
fn read_unpaired(
    files: &[std::path::PathBuf],
    cfg: &DataSection,
    tok: &TokenizerInfo,
    templating: &super::Templating,
    stats: &mut super::DatasetStats,
) -> Result<Vec<Unpaired>> {
    let f = &cfg.fields;
    let template = templating.template.as_ref();
    let mut out = vec![];
    for file in files {
        let mut block: Vec<(Unpaired, Unpaired)> = vec![];
        let flush = |block: &mut Vec<(Unpaired, Unpaired)>, out: &mut Vec<Unpaired>| {
            let (c, r): (Vec<_>, Vec<_>) = block.drain(..).unzip();
            out.extend(c);
            out.extend(r);
        };
        for (place, row) in super::source::read_rows(file)? {
            stats.rows += 1;
            let parsed = row.and_then(|r| -> std::result::Result<_, String> {
                if is_pair(&r, cfg) {
                    let row = parse_pair(&r, cfg)?;
                    let (prompt, chosen, rejected) = match &row.prompt {
                        Some(p) => (p.clone(), row.chosen.clone(), row.rejected.clone()),
                        None => split_implicit(&row.chosen, &row.rejected),
                    };
                    // Each side tokenized on its own, as TRL tokenizes the unpaired rows.
                    let side = |completion: &Side, desirable| -> std::result::Result<_, String> {
                        let (p, pc) = tokenize_prompted(
                            &prompt,
                            completion,
                            row.tools.as_ref(),
                            tok,
                            template,
                        )?;
                        let n = common_prefix(&p, &pc);
                        Ok(Unpaired {
                            prompt: p[..n].to_vec(),
                            completion: pc[n..].to_vec(),
                            desirable,
                        })
                    };
                    return Ok(Err((side(&chosen, true)?, side(&rejected, false)?)));
                }
                let obj = r.as_object().ok_or("each row must be a JSON object")?;
                let needs = format!(
                    "an unpaired row needs `{}`, `{}` and a boolean `{}`",
                    f.prompt, f.completion, f.label
                );
                let prompt = side(obj, &f.prompt, cfg)?.ok_or(needs.clone())?;
                let completion = side(obj, &f.completion, cfg)?.ok_or(needs.clone())?;
                let desirable = obj.get(&f.label).and_then(Json::as_bool).ok_or(needs)?;
                let tools = obj.get(&f.tools);
                let (p, pc) = tokenize_prompted(&prompt, &completion, tools, tok, template)?;
                let n = common_prefix(&p, &pc);
                Ok(Ok(Unpaired {
                    prompt: p[..n].to_vec(),
                    completion: pc[n..].to_vec(),
                    desirable,
                }))
            });
            match parsed {
                Ok(Ok(one)) => out.push(one),
                Ok(Err(two)) => {
                    block.push(two);
                    if block.len() == 1000 {
                        flush(&mut block, &mut out);
                    }
                }
                Err(msg) => place.skip_or_fail(&msg, cfg.skip_bad_rows, &mut stats.skipped)?,
            }
        }
        flush(&mut block, &mut out);
    }
    Ok(out)
}

/// KTO's examples: each unpaired example and its KL sequence (the same prompt with the previous
/// example's completion, rotating within blocks of `micro_batch` examples, as TRL builds them), cut
/// to `max_len`; the labels beside them.
fn kto_examples(
    items: &[Unpaired],
    micro_batch: usize,
    max_len: usize,
    mode: Truncation,
) -> (Vec<Example>, Vec<bool>) {
    let mut examples = vec![];
    let mut labels = vec![];
    for block in items.chunks(micro_batch.max(1)) {
        for (i, item) in block.iter().enumerate() {
            let previous = &block[(i + block.len() - 1) % block.len()];
            let ids = PairIds {
                prompt: item.prompt.clone(),
                chosen: item.completion.clone(),
                rejected: previous.completion.clone(),
            };
            if let Some(pair) = pair_examples(&ids, max_len, mode) {
                examples.extend(pair);
                labels.push(item.desirable);
            }
        }
    }
    (examples, labels)
}

/// Reads, tokenizes and splits KTO's unpaired examples: `train` and `val` hold each example and
/// its KL sequence in turn; `labels` says which are desirable.
pub fn load_unpaired(
    cfg: &DataSection,
    truncation: Truncation,
    micro_batch: usize,
    tok: &TokenizerInfo,
    seed: u64,
) -> Result<(super::Dataset, super::Labels)> {
    let templating = super::resolve_template(cfg, tok)?;
    let files = super::source::resolve_files(&cfg.path.to_vec(), &cfg.split)?;
    let mut stats = super::DatasetStats::default();
    let keep = |items: Vec<Unpaired>, stats: &mut super::DatasetStats| -> Vec<Unpaired> {
        let before = items.len();
        let kept: Vec<Unpaired> = items
            .into_iter()
            .filter(|u| truncation == Truncation::KeepEnd || u.prompt.len() < cfg.max_seq_len)
            .collect();
        stats.dropped += before - kept.len();
        kept
    };
    let items = read_unpaired(&files, cfg, tok, &templating, &mut stats)?;
    let mut items = keep(items, &mut stats);
    let val_items = match &cfg.val_path {
        Some(paths) => {
            let files = super::source::resolve_files(&paths.to_vec(), "validation")?;
            let read = read_unpaired(&files, cfg, tok, &templating, &mut Default::default())?;
            keep(read, &mut Default::default())
        }
        None => {
            let n_val = super::val_count(cfg.val_split, items.len());
            let mut order: Vec<usize> = (0..items.len()).collect();
            crate::rng::KilnRng::fork(seed, 3).shuffle(&mut order);
            let held: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
            let (v, t): (Vec<_>, Vec<_>) = std::mem::take(&mut items)
                .into_iter()
                .enumerate()
                .partition(|(i, _)| held.contains(i));
            items = t.into_iter().map(|(_, u)| u).collect();
            v.into_iter().map(|(_, u)| u).collect()
        }
    };
    if items.is_empty() {
        return Err(KilnError::data(
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            None,
            format!("no example left to train on ({} rows read)", stats.rows),
        ));
    }
    let (train, train_labels) = kto_examples(&items, micro_batch, cfg.max_seq_len, truncation);
    let (val, val_labels) = kto_examples(&val_items, micro_batch, cfg.max_seq_len, truncation);
    stats.examples = train.len();
    stats.tokens = train.iter().map(|e| e.input_ids.len()).sum();
    stats.target_tokens = train.iter().map(Example::num_targets).sum();
    stats.val_examples = val.len();
    let dataset = super::Dataset {
        train,
        val,
        stats,
        formats: vec![],
        templating,
    };
    Ok((
        dataset,
        super::Labels {
            train: train_labels,
            val: val_labels,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implicit_prompts_split_as_trl_does() {
        let (p, c, r) = split_implicit(
            &Side::Text("The sky is blue.".into()),
            &Side::Text("The sky is green.".into()),
        );
        assert_eq!(
            (p, c, r),
            (
                Side::Text("The sky is".into()),
                Side::Text(" blue.".into()),
                Side::Text(" green.".into())
            )
        );
    }

    #[test]
    fn keep_start_drops_a_pair_whose_prompt_fills_the_length() {
        let ids = PairIds {
            prompt: vec![1, 2, 3],
            chosen: vec![4, 5],
            rejected: vec![6],
        };
        assert!(pair_examples(&ids, 3, Truncation::KeepStart).is_none());
        let [c, r] = pair_examples(&ids, 4, Truncation::KeepStart).unwrap();
        assert_eq!(c.input_ids, [1, 2, 3, 4]);
        assert_eq!(c.loss_mask, [false, false, false, true]);
        assert_eq!(r.input_ids, [1, 2, 3, 6]);
        let [c, _] = pair_examples(&ids, 3, Truncation::KeepEnd).unwrap();
        assert_eq!(
            (c.input_ids, c.loss_mask),
            (vec![3, 4, 5], vec![false, true, true])
        );
    }
}
