//! `kiln data inspect`: what training will see, example by example.

use std::io::IsTerminal;

use serde_json::json;

use super::{encode_files, load_dataset, source, DatasetStats, Example};
use crate::error::Result;
use crate::recipe::Recipe;
use crate::tokenizer::TokenizerInfo;

/// A run of tokens that are all trained or all masked, decoded.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Segment {
    pub text: String,
    pub trained: bool,
}

/// Splits an example into runs of trained / masked tokens.
pub fn segments(example: &Example, tok: &TokenizerInfo) -> Result<Vec<Segment>> {
    let mut out: Vec<Segment> = vec![];
    let mut start = 0;
    let ids = &example.input_ids;
    for i in 1..=ids.len() {
        if i == ids.len() || example.loss_mask[i] != example.loss_mask[start] {
            out.push(Segment {
                text: tok.decode(&ids[start..i])?,
                trained: example.loss_mask[start],
            });
            start = i;
        }
    }
    Ok(out)
}

pub struct InspectReport {
    pub json: serde_json::Value,
    pub text: String,
}

fn stats_lines(s: &DatasetStats, max_seq_len: usize) -> String {
    format!(
        "rows {}  examples {}  validation {}  skipped {}  truncated {}  dropped {}\ntokens {}  target tokens {} ({:.1}%)  longest {} (max_seq_len {max_seq_len})",
        s.rows,
        s.examples,
        s.val_examples,
        s.skipped,
        s.truncated,
        s.dropped,
        s.tokens,
        s.target_tokens,
        100.0 * s.target_tokens as f64 / s.tokens.max(1) as f64,
        s.longest
    )
}

/// Shows the first `n` examples of the recipe's training data and the dataset statistics.
/// `color`: ANSI colours (trained green, masked grey); otherwise trained text is wrapped in ⟦ ⟧.
pub fn inspect(
    recipe: &Recipe,
    tok: &TokenizerInfo,
    n: usize,
    color: bool,
) -> Result<InspectReport> {
    let cfg = &recipe.data;
    if recipe.training.method.is_preference() {
        return inspect_pairs(recipe, tok, n, color);
    }
    let dataset = load_dataset(cfg, tok, recipe.training.seed)?;
    let files = source::resolve_files(&cfg.path.to_vec(), &cfg.split)?;
    let mut scratch = DatasetStats::default();
    let mut formats = vec![];
    let shown = encode_files(
        &files,
        cfg,
        tok,
        &dataset.templating,
        &mut scratch,
        &mut formats,
        Some(n),
    )?;

    let mut text = String::new();
    let file_list: Vec<String> = dataset
        .formats
        .iter()
        .map(|(p, f)| format!("{} ({})", p.display(), f.name()))
        .collect();
    text.push_str(&format!("data: {}\n", file_list.join(", ")));
    text.push_str(&format!(
        "chat template: {}\n",
        dataset
            .templating
            .template
            .as_ref()
            .map_or("none (plain prompt + completion)", |t| t.origin.as_str())
    ));
    if color {
        text.push_str("legend: \x1b[32mtrained (carries loss)\x1b[0m \x1b[90mmasked\x1b[0m\n");
    } else {
        text.push_str("legend: ⟦trained (carries loss)⟧ masked\n");
    }
    let mut examples = vec![];
    for (i, s) in shown.iter().enumerate() {
        let title = format!("example {} ({})", i + 1, s.place.describe());
        let segs = render(&mut text, &title, &s.example, tok, color)?;
        examples.push(json!({
            "source": s.place.describe(),
            "text": s.text,
            "num_tokens": s.example.input_ids.len(),
            "num_targets": s.example.num_targets(),
            "segments": segs,
            "input_ids": s.example.input_ids,
            "loss_mask": s.example.loss_mask.iter().map(|&m| m as u8).collect::<Vec<_>>(),
        }));
    }
    let s = &dataset.stats;
    text.push_str(&format!("\n{}\n", stats_lines(s, cfg.max_seq_len)));
    let mut packing = serde_json::Value::Null;
    if cfg.packing {
        let lengths: Vec<usize> = dataset.train.iter().map(|e| e.input_ids.len()).collect();
        let sequences = super::pack(&lengths, cfg.max_seq_len).len();
        let fill = s.tokens as f64 / (sequences * cfg.max_seq_len) as f64;
        text.push_str(&format!(
            "packing: {} examples into {sequences} sequences of {} tokens ({:.1}% full)\n",
            s.examples,
            cfg.max_seq_len,
            100.0 * fill
        ));
        packing = json!({"sequences": sequences, "fill": fill});
    }
    let json = json!({
        "files": dataset.formats.iter().map(|(p, f)| json!({"path": p, "format": f.name()})).collect::<Vec<_>>(),
        "chat_template": dataset.templating.template.as_ref().map(|t| &t.origin),
        "stats": s,
        "packing": packing,
        "examples": examples,
    });
    Ok(InspectReport { json, text })
}

/// One example's heading and tokens, trained ones marked; returns its segments.
fn render(
    text: &mut String,
    title: &str,
    example: &Example,
    tok: &TokenizerInfo,
    color: bool,
) -> Result<Vec<Segment>> {
    let segs = segments(example, tok)?;
    text.push_str(&format!(
        "\n── {title} · {} tokens, {} trained\n",
        example.input_ids.len(),
        example.num_targets()
    ));
    for seg in &segs {
        match (color, seg.trained) {
            (true, true) => text.push_str(&format!("\x1b[32m{}\x1b[0m", seg.text)),
            (true, false) => text.push_str(&format!("\x1b[90m{}\x1b[0m", seg.text)),
            (false, true) => text.push_str(&format!("⟦{}⟧", seg.text)),
            (false, false) => text.push_str(&seg.text),
        }
    }
    text.push('\n');
    Ok(segs)
}

/// `kiln data inspect` of preference pairs: the first `n` pairs' chosen and rejected sequences
/// as training sees them (the completions trained), and the statistics.
fn inspect_pairs(
    recipe: &Recipe,
    tok: &TokenizerInfo,
    n: usize,
    color: bool,
) -> Result<InspectReport> {
    let truncation = recipe
        .preference
        .clone()
        .unwrap_or_default()
        .truncation_mode;
    let dataset =
        super::preference::load_pairs(&recipe.data, truncation, tok, recipe.training.seed)?;
    let mut text = format!(
        "pairs: {} ({}), chat template: {}\n",
        recipe.data.path.to_vec().join(", "),
        recipe.training.method.name(),
        dataset
            .templating
            .template
            .as_ref()
            .map_or("none", |t| t.origin.as_str())
    );
    text.push_str(if color {
        "legend: \x1b[32mtrained (carries loss)\x1b[0m \x1b[90mmasked\x1b[0m\n"
    } else {
        "legend: ⟦trained (carries loss)⟧ masked\n"
    });
    let mut pairs = vec![];
    for (k, pair) in dataset.train.chunks(2).take(n).enumerate() {
        let mut sides = serde_json::Map::new();
        for (side, example) in ["chosen", "rejected"].iter().zip(pair) {
            let title = format!("pair {}, {side}", k + 1);
            let segs = render(&mut text, &title, example, tok, color)?;
            sides.insert(
                side.to_string(),
                json!({"segments": segs, "input_ids": example.input_ids, "num_targets": example.num_targets()}),
            );
        }
        pairs.push(serde_json::Value::Object(sides));
    }
    text.push_str(&format!(
        "\n{}\n",
        stats_lines(&dataset.stats, recipe.data.max_seq_len)
    ));
    let json = json!({"stats": dataset.stats, "pairs": pairs});
    Ok(InspectReport { json, text })
}

/// Whether to colour output on stdout.
pub fn stdout_has_color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}
