//! The data pipeline: rows from JSONL/JSON/Parquet -> samples (alpaca, messages, sharegpt,
//! prompt/completion, text) -> chat template -> token ids + loss mask -> training sequences
//! (packed or not) -> micro-batches.

pub mod batch;
pub mod encode;
pub mod formats;
pub mod inspect;
pub mod preference;
pub mod source;
pub mod template;

use std::path::PathBuf;

pub use batch::{make_batch, pack, Batch, BatchStream, Cursor, TrainData};
pub use formats::{alpaca_prompt, Sample};
pub use source::RowPlace;
pub use template::ChatTemplate;

use crate::error::{KilnError, Result};
use crate::recipe::{DataFormat, DataSection, Overlong};
use crate::rng::KilnRng;
use crate::tokenizer::TokenizerInfo;
use encode::Encoder;

/// One tokenized training example. `loss_mask[i]` says whether token `i` is a target.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Example {
    pub fn new(input_ids: Vec<u32>, loss_mask: Vec<bool>) -> Self {
        debug_assert_eq!(input_ids.len(), loss_mask.len());
        Self {
            input_ids,
            loss_mask,
        }
    }

    /// The token ids that carry loss (`trained`) or not.
    pub fn ids_where_trained(&self, trained: bool) -> Vec<u32> {
        self.input_ids
            .iter()
            .zip(&self.loss_mask)
            .filter(|(_, &m)| m == trained)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Tokens that carry loss (the first token never does: nothing predicts it).
    pub fn num_targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// What the pipeline made of the rows.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DatasetStats {
    /// Rows read from the files.
    pub rows: usize,
    /// Rows that could not be read and were skipped (`skip_bad_rows`).
    pub skipped: usize,
    /// Examples kept for training.
    pub examples: usize,
    /// Examples held out for validation.
    pub val_examples: usize,
    /// Training tokens and target tokens (after truncation).
    pub tokens: usize,
    pub target_tokens: usize,
    /// Examples longer than `max_seq_len` that were cut.
    pub truncated: usize,
    /// Examples dropped: too long (with `overlong = "drop"`) or no target token left.
    pub dropped: usize,
    /// Tokens of the longest example before truncation.
    pub longest: usize,
}

/// An encoded example with where it came from and its rendered text.
pub struct SourcedExample {
    pub example: Example,
    pub place: RowPlace,
    pub text: String,
}

/// KTO's labels: whether each training and validation example is desirable.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    pub train: Vec<bool>,
    pub val: Vec<bool>,
}

/// A loaded dataset: training and validation examples.
pub struct Dataset {
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub stats: DatasetStats,
    /// The format of each file, as read or detected.
    pub formats: Vec<(PathBuf, DataFormat)>,
    /// The chat template the rows went through (`None` when none was used), and whether plain
    /// rows did too.
    pub templating: Templating,
}

/// The chat template the recipe asks for, and whether alpaca / prompt_completion rows go
/// through it too.
pub struct Templating {
    pub template: Option<ChatTemplate>,
    pub plain_rows: bool,
}

/// The rows of a file, each a sample or why it is not one.
pub type SampleRows = Vec<(RowPlace, std::result::Result<Sample, String>)>;

pub fn resolve_template(cfg: &DataSection, tok: &TokenizerInfo) -> Result<Templating> {
    let (template, plain_rows) = resolve_template_choice(cfg, tok)?;
    Ok(Templating {
        template,
        plain_rows,
    })
}

fn resolve_template_choice(
    cfg: &DataSection,
    tok: &TokenizerInfo,
) -> Result<(Option<ChatTemplate>, bool)> {
    let model_template = || -> Result<Option<ChatTemplate>> {
        tok.chat_template
            .as_ref()
            .map(|(src, origin)| {
                ChatTemplate::compile(src, origin).map_err(|e| {
                    KilnError::model(origin, format!("{e}; set data.chat_template to a built-in"))
                })
            })
            .transpose()
    };
    let choice = cfg.chat_template.as_str();
    Ok(match choice {
        "auto" => (model_template()?, false),
        "none" => (None, false),
        "model" => match model_template()? {
            Some(t) => (Some(t), true),
            None => {
                return Err(KilnError::Recipe(
                    "data.chat_template = \"model\" but the model has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json); use a built-in: alpaca, chatml, llama3, phi3, mistral, gemma".into(),
                ))
            }
        },
        name if template::BUILTIN_NAMES.contains(&name) => {
            (ChatTemplate::builtin(name), true)
        }
        path => {
            let p = PathBuf::from(path);
            if !p.exists() {
                return Err(KilnError::Recipe(format!(
                    "data.chat_template = \"{path}\": not a built-in ({}, or auto, model, none) and no such file",
                    template::BUILTIN_NAMES.join(", ")
                )));
            }
            let src = std::fs::read_to_string(&p).map_err(|e| KilnError::io(&p, e))?;
            let t = ChatTemplate::compile(&src, &p.display().to_string())
                .map_err(|e| KilnError::data(&p, None, e))?;
            (Some(t), true)
        }
    })
}

/// The rows of one file as samples, in the recipe's format or the one detected from the first
/// readable row. A row that cannot be read or parsed carries the reason.
pub fn read_samples(file: &std::path::Path, cfg: &DataSection) -> Result<(DataFormat, SampleRows)> {
    let rows = source::read_rows(file)?;
    let format = match cfg.format {
        DataFormat::Auto => {
            let first = rows
                .iter()
                .find_map(|(place, r)| r.as_ref().ok().map(|v| (place, v)));
            match first {
                Some((place, v)) => formats::detect(v, cfg).map_err(|m| place.error(m))?,
                None => DataFormat::Auto,
            }
        }
        f => f,
    };
    let samples = rows
        .into_iter()
        .map(|(place, row)| {
            let sample = row.and_then(|v| formats::parse(&v, format, cfg));
            (place, sample)
        })
        .collect();
    Ok((format, samples))
}

/// Reads and encodes the rows of `files`, keeping at most `limit` examples. Bad rows are errors
/// naming the row, or skipped and counted with `skip_bad_rows`.
pub fn encode_files(
    files: &[PathBuf],
    cfg: &DataSection,
    tok: &TokenizerInfo,
    templating: &Templating,
    stats: &mut DatasetStats,
    formats: &mut Vec<(PathBuf, DataFormat)>,
    limit: Option<usize>,
) -> Result<Vec<SourcedExample>> {
    let template = templating.template.as_ref();
    let encoder = Encoder {
        tokenizer: tok,
        chat_template: template,
        template_plain_rows: templating.plain_rows,
        train_on_inputs: cfg.train_on_inputs,
        last_turn_only: cfg.train_turns == crate::recipe::TrainTurns::Last,
        add_bos: cfg.add_bos,
    };
    let mut out = vec![];
    let bar = crate::progress::bar(0, "rows tokenized", false);
    for file in files {
        let (format, samples) = read_samples(file, cfg)?;
        bar.inc_length(samples.len() as u64);
        formats.push((file.clone(), format));
        let conversational = matches!(format, DataFormat::Messages | DataFormat::Sharegpt);
        if conversational && template.is_none() {
            return Err(KilnError::data(
                file,
                None,
                format!(
                    "format `{}` needs a chat template and {}; set data.chat_template to a built-in ({}) or a .jinja file",
                    format.name(),
                    if cfg.chat_template == "none" { "data.chat_template is \"none\"" } else { "the model has none" },
                    template::BUILTIN_NAMES.join(", ")
                ),
            ));
        }
        for (place, sample) in samples {
            if limit.is_some_and(|l| out.len() >= l) {
                return Ok(out);
            }
            stats.rows += 1;
            bar.inc(1);
            let encoded = sample.and_then(|s| encoder.encode(&s));
            let examples = match encoded {
                Ok(e) => e,
                Err(msg) => {
                    place.skip_or_fail(&msg, cfg.skip_bad_rows, &mut stats.skipped)?;
                    continue;
                }
            };
            for encoded in examples {
                let mut ex = encoded.example;
                let len = ex.input_ids.len();
                stats.longest = stats.longest.max(len);
                if len > cfg.max_seq_len {
                    match cfg.overlong {
                        Overlong::Drop => {
                            stats.dropped += 1;
                            continue;
                        }
                        Overlong::Truncate => {
                            stats.truncated += 1;
                            ex.input_ids.truncate(cfg.max_seq_len);
                            ex.loss_mask.truncate(cfg.max_seq_len);
                        }
                    }
                }
                if ex.num_targets() == 0 {
                    stats.dropped += 1;
                    continue;
                }
                out.push(SourcedExample {
                    example: ex,
                    place: place.clone(),
                    text: encoded.text,
                });
            }
        }
    }
    Ok(out)
}

/// The number of validation rows `val_split` asks for out of `n`.
pub(crate) fn val_count(val_split: f64, n: usize) -> usize {
    if val_split <= 0.0 {
        0
    } else if val_split < 1.0 {
        ((n as f64 * val_split).round() as usize).max(1)
    } else {
        val_split as usize
    }
}

/// Loads, encodes, truncates and splits the recipe's data.
pub fn load_dataset(cfg: &DataSection, tok: &TokenizerInfo, seed: u64) -> Result<Dataset> {
    let templating = resolve_template(cfg, tok)?;
    let files = source::resolve_files(&cfg.path.to_vec(), &cfg.split)?;
    let mut stats = DatasetStats::default();
    let mut formats = vec![];
    let mut train: Vec<Example> = encode_files(
        &files,
        cfg,
        tok,
        &templating,
        &mut stats,
        &mut formats,
        None,
    )?
    .into_iter()
    .map(|s| s.example)
    .collect();
    let mut val = vec![];
    if let Some(val_paths) = &cfg.val_path {
        let val_files = source::resolve_files(&val_paths.to_vec(), "validation")?;
        let mut val_stats = DatasetStats::default();
        val = encode_files(
            &val_files,
            cfg,
            tok,
            &templating,
            &mut val_stats,
            &mut formats,
            None,
        )?
        .into_iter()
        .map(|s| s.example)
        .collect();
    } else {
        let n_val = val_count(cfg.val_split, train.len());
        if n_val > 0 {
            if n_val >= train.len() {
                return Err(KilnError::Recipe(format!(
                    "data.val_split = {} holds out {n_val} of {} examples, leaving none to train on",
                    cfg.val_split,
                    train.len()
                )));
            }
            let mut order: Vec<usize> = (0..train.len()).collect();
            KilnRng::fork(seed, 3).shuffle(&mut order);
            let mut is_val = vec![false; train.len()];
            for &i in &order[..n_val] {
                is_val[i] = true;
            }
            let (v, t): (Vec<_>, Vec<_>) = train
                .into_iter()
                .zip(is_val)
                .partition(|(_, is_val)| *is_val);
            val = v.into_iter().map(|(e, _)| e).collect();
            train = t.into_iter().map(|(e, _)| e).collect();
        }
    }
    if train.is_empty() {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        return Err(KilnError::data(
            names.join(", "),
            None,
            if stats.rows == 0 {
                "the dataset is empty: no rows to train on".to_string()
            } else {
                format!(
                    "none of the {} rows is left to train on ({} skipped as unreadable, {} dropped: too long or no target token; raise data.max_seq_len?)",
                    stats.rows, stats.skipped, stats.dropped
                )
            },
        ));
    }
    let template_used = templating.plain_rows
        || formats
            .iter()
            .any(|(_, f)| matches!(f, DataFormat::Messages | DataFormat::Sharegpt));
    stats.examples = train.len();
    stats.val_examples = val.len();
    stats.tokens = train.iter().map(|e| e.input_ids.len()).sum();
    stats.target_tokens = train.iter().map(Example::num_targets).sum();
    Ok(Dataset {
        train,
        val,
        stats,
        formats,
        templating: Templating {
            template: templating.template.filter(|_| template_used),
            plain_rows: templating.plain_rows,
        },
    })
}
