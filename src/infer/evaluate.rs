//! `kiln eval`'s work: a model scored on a dataset, by loss (with the logits or llama.cpp's
//! importance matrix written on the way, if asked) or by exact match of generated answers.

use std::path::PathBuf;

use super::eval;
use super::generate::SamplingParams;
use crate::error::{KilnError, Result};
use crate::model::LoadedModel;
use crate::recipe::DataSection;

/// What to measure.
pub enum Task {
    /// Mean loss and perplexity over the target tokens, as training scores them.
    Loss {
        batch_size: usize,
        /// Every token's logits, as safetensors.
        dump_logits: Option<PathBuf>,
        /// llama.cpp's importance matrix of the rows (imatrix GGUF).
        imatrix: Option<PathBuf>,
    },
    /// Generated final answers against the reference's.
    ExactMatch {
        answer_regex: String,
        sampling: SamplingParams,
    },
}

/// The rows to score: the dataset files as given and their `[data]` options.
pub struct Rows<'a> {
    pub files: &'a [String],
    pub data: &'a DataSection,
    /// Only the first N rows.
    pub limit: Option<usize>,
}

/// Scores `loaded` (with a speculative `draft` for exact match, if given) and returns the
/// report; unless `quiet`, shows progress and prints a summary line.
pub fn evaluate(
    loaded: &LoadedModel,
    draft: Option<(&LoadedModel, usize)>,
    rows: &Rows,
    task: &Task,
    quiet: bool,
) -> Result<serde_json::Value> {
    match task {
        Task::Loss {
            batch_size,
            dump_logits,
            imatrix,
        } => loss(loaded, rows, *batch_size, dump_logits, imatrix, quiet),
        Task::ExactMatch {
            answer_regex,
            sampling,
        } => exact_match(loaded, draft, rows, answer_regex, sampling, quiet),
    }
}

fn loss(
    loaded: &LoadedModel,
    rows: &Rows,
    batch_size: usize,
    dump_logits: &Option<PathBuf>,
    imatrix: &Option<PathBuf>,
    quiet: bool,
) -> Result<serde_json::Value> {
    let tok = &loaded.tokenizer;
    let mut dataset = crate::data::load_dataset(rows.data, tok, 0)?;
    if let Some(l) = rows.limit {
        dataset.train.truncate(l);
    }
    let bar = crate::progress::bar(dataset.train.len(), "examples", quiet);
    let mut dump = dump_logits.as_ref().map(|_| Vec::new());
    // The importance matrix counts every position of a pass: one row a pass.
    let batch_size = if imatrix.is_some() { 1 } else { batch_size };
    let mut run = || {
        eval::eval_loss(
            &loaded.model,
            &dataset.train,
            tok.pad_id,
            batch_size,
            dump.as_mut(),
            &|n| bar.inc(n as u64),
        )
    };
    let (r, stats) = match imatrix {
        Some(_) => crate::infer::imatrix::collect(&loaded.model, run)?,
        None => (run()?, vec![]),
    };
    bar.finish_and_clear();
    if let Some(path) = imatrix {
        let longest = dataset.train.iter().map(|e| e.input_ids.len()).max();
        crate::infer::imatrix::write(
            path,
            &stats,
            rows.files,
            dataset.train.len() as u32,
            longest.unwrap_or(0) as u32,
        )?;
        if !quiet {
            println!(
                "wrote {} ({} weights, {} tokens); use it with: llama-quantize --imatrix {} MODEL.gguf OUT.gguf Q4_K_M",
                path.display(),
                stats.len(),
                stats.first().map_or(0, |e| e.tokens),
                path.display()
            );
        }
    }
    if let (Some(path), Some(tensors)) = (dump_logits, &dump) {
        eval::write_logits(path, tensors)?;
    }
    if !quiet {
        println!(
            "loss {:.6}  perplexity {:.4}  ({} examples, {} target tokens)",
            r.mean_loss, r.perplexity, r.examples, r.target_tokens
        );
    }
    Ok(serde_json::to_value(&r).expect("serializable"))
}

fn exact_match(
    loaded: &LoadedModel,
    draft: Option<(&LoadedModel, usize)>,
    rows: &Rows,
    answer_regex: &str,
    sampling: &SamplingParams,
    quiet: bool,
) -> Result<serde_json::Value> {
    let pattern = regex::Regex::new(answer_regex)
        .map_err(|e| KilnError::Usage(format!("--answer-regex is not a valid regex: {e}")))?;
    let files = crate::data::source::resolve_files(&rows.data.path.to_vec(), &rows.data.split)?;
    let stops = super::generate::stop_tokens(&loaded.tokenizer, &loaded.model, &loaded.dir);
    let bar = crate::progress::bar(rows.limit.unwrap_or(0), "rows", quiet);
    let r = eval::exact_match(
        &loaded.model,
        draft.map(|(d, k)| (&d.model, k)),
        &loaded.tokenizer,
        &files,
        rows.data,
        &pattern,
        sampling,
        &stops,
        rows.limit,
        &|n| bar.inc(n as u64),
    )?;
    bar.finish_and_clear();
    if !quiet {
        println!(
            "exact match {:.2}%  (flexible {:.2}%)  over {} rows; {:.1} tokens/s",
            100.0 * r.accuracy,
            100.0 * r.accuracy_flexible,
            r.rows,
            r.tokens_per_s
        );
        if let Some(a) = r.draft_acceptance {
            println!("draft: {:.0}% of its proposed tokens accepted", 100.0 * a);
        }
    }
    Ok(serde_json::to_value(&r).expect("serializable"))
}
