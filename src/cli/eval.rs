//! `kiln eval`: loss and perplexity, or exact match of generated answers, on a dataset.

use std::path::PathBuf;

use kiln::error::{KilnError, Result};
use kiln::infer::evaluate::{Rows, Task};

use super::args;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: args::ModelArgs,
    /// Dataset file(s) (.jsonl, .json, .parquet) or a directory.
    #[arg(long, required = true)]
    pub data: Vec<String>,
    /// auto, alpaca, messages, sharegpt, prompt_completion, text.
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Column names: --field prompt=question (repeatable; as data.fields in a recipe).
    #[arg(long, value_name = "NAME=COLUMN")]
    pub field: Vec<String>,
    /// As data.chat_template in a recipe: auto, model, none, a built-in or a .jinja file.
    #[arg(long, default_value = "auto")]
    pub chat_template: String,
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// As data.add_bos: put BOS in front of plain rows when the tokenizer adds none.
    #[arg(long)]
    pub add_bos: bool,
    /// `loss` (mean loss and perplexity) or `exact-match` (generate and compare final answers).
    #[arg(long, default_value = "loss")]
    pub task: String,
    /// exact-match: the final-answer pattern; its first group is the answer.
    #[arg(long, default_value = kiln::infer::eval::GSM8K_ANSWER)]
    pub answer_regex: String,
    /// Evaluate only the first N rows.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[command(flatten)]
    pub sampling: args::SamplingArgs,
    /// loss: write every token's logits to this .safetensors (logits.N, input_ids.N).
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// loss: also write llama.cpp's importance matrix of these rows (imatrix GGUF), for
    /// `llama-quantize --imatrix FILE` (rows one at a time, so padding is not counted).
    #[arg(long)]
    pub imatrix: Option<PathBuf>,
    /// Machine-readable results.
    #[arg(long)]
    pub json: bool,
    /// exact-match: generate with a draft model (speculative decoding; the same answers).
    #[command(flatten)]
    pub draft: args::DraftArgs,
}

pub fn exec(args: Args) -> Result<()> {
    let mut table = toml::Table::new();
    table.insert("format".into(), args.format.clone().into());
    table.insert("chat_template".into(), args.chat_template.clone().into());
    table.insert("add_bos".into(), args.add_bos.into());
    table.insert("max_seq_len".into(), (args.max_seq_len as i64).into());
    let mut fields = toml::Table::new();
    for f in &args.field {
        let (k, v) = f.split_once('=').ok_or_else(|| {
            KilnError::Usage(format!(
                "--field expects NAME=COLUMN (e.g. prompt=question), got `{f}`"
            ))
        })?;
        fields.insert(k.trim().into(), v.trim().into());
    }
    table.insert("fields".into(), toml::Value::Table(fields));
    let data = kiln::recipe::DataSection::for_command(&args.data, table)?;
    let task = match args.task.as_str() {
        "loss" => Task::Loss {
            batch_size: args.batch_size,
            dump_logits: args.dump_logits.clone(),
            imatrix: args.imatrix.clone(),
        },
        "exact-match" => Task::ExactMatch {
            answer_regex: args.answer_regex.clone(),
            sampling: args.sampling.params()?,
        },
        other => {
            return Err(KilnError::Usage(format!(
                "--task {other}: allowed loss, exact-match"
            )))
        }
    };
    if args.draft.compare_plain {
        return Err(KilnError::Usage(
            "--compare-plain is for kiln generate; eval reports the draft's acceptance rate".into(),
        ));
    }
    let loaded = args.model.load()?;
    let draft = match task {
        Task::ExactMatch { .. } => args.draft.load(&args.model, &loaded.tokenizer)?,
        Task::Loss { .. } => None,
    };
    let rows = Rows {
        files: &args.data,
        data: &data,
        limit: args.limit,
    };
    let draft = draft.as_ref().map(|d| (d, args.draft.draft_tokens));
    let report = kiln::infer::evaluate::evaluate(&loaded, draft, &rows, &task, args.json)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
    }
    Ok(())
}
