//! Arguments several commands share: the model to load, sampling, a speculative draft, held-out
//! rows; and the parsing of small typed flags.

use std::path::PathBuf;

use kiln::error::{KilnError, Result};

/// Held-out text for the fidelity report of `merge` and `export gguf`.
#[derive(clap::Args)]
pub struct HeldOutArgs {
    /// Held-out rows (any dataset format): perplexity and mean KL of the exported model against the trained one.
    #[arg(long)]
    pub eval_data: Option<String>,
    /// As data.chat_template for --eval-data.
    #[arg(long, default_value = "auto")]
    pub chat_template: String,
    /// Evaluate at most this many rows of --eval-data.
    #[arg(long, default_value_t = 64)]
    pub eval_rows: usize,
}

impl HeldOutArgs {
    /// The `[data]` section for --eval-data, if given.
    pub fn section(&self) -> Result<Option<kiln::recipe::DataSection>> {
        let Some(data) = &self.eval_data else {
            return Ok(None);
        };
        held_out_rows(data, &self.chat_template).map(Some)
    }
}

/// `--into nf4|original`.
pub fn parse_into(name: &str) -> Result<kiln::export::merge::MergeInto> {
    use kiln::export::merge::MergeInto;
    match name {
        "nf4" => Ok(MergeInto::Nf4),
        "original" => Ok(MergeInto::Original),
        other => Err(KilnError::Usage(format!(
            "--into {other}: allowed nf4, original"
        ))),
    }
}

/// The file name of `path`, for a Modelfile beside it.
pub fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `bf16`, `f16` or `f32` from a `--dtype` flag.
pub fn parse_dtype(name: &str) -> Result<candle_core::DType> {
    match name {
        "bf16" => Ok(candle_core::DType::BF16),
        "f16" => Ok(candle_core::DType::F16),
        "f32" => Ok(candle_core::DType::F32),
        other => Err(KilnError::Usage(format!(
            "--dtype {other}: allowed bf16, f16, f32 (and auto for eval/generate)"
        ))),
    }
}

/// Speculative decoding: a small draft proposes tokens, the model checks them in one pass.
#[derive(clap::Args, Debug, Clone)]
pub struct DraftArgs {
    /// A small model with the same tokenizer (a directory, GGUF file or tiny:llama) that proposes
    /// tokens for the model to check in one pass: the same output (greedy: token for token;
    /// sampled: the same distribution), faster when the draft agrees often.
    #[arg(long)]
    pub draft: Option<String>,
    /// A PEFT LoRA adapter for the draft.
    #[arg(long, requires = "draft")]
    pub draft_adapter: Option<PathBuf>,
    /// Tokens the draft proposes a round.
    #[arg(long, default_value_t = 4, requires = "draft")]
    pub draft_tokens: usize,
    /// Use only the draft's first N decoder layers: with `--draft` the model itself, a draft
    /// made of its own first layers (train its adapter with [distill] and model.layers = N).
    #[arg(long, value_name = "N", requires = "draft")]
    pub draft_layers: Option<usize>,
    /// generate: also generate without the draft and print both speeds.
    #[arg(long, requires = "draft")]
    pub compare_plain: bool,
}

#[derive(clap::Args)]
pub struct ModelArgs {
    /// A Hugging Face model directory (or tiny:llama).
    #[arg(long)]
    pub model: String,
    /// A PEFT LoRA adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (f32 on CPU, bf16 on GPU), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// auto (nf4 with an adapter, as trained; none without), nf4, none.
    #[arg(long, default_value = "auto")]
    pub quantize: String,
    /// Random weights of config.json's shapes (for the model and a --draft alike): speed
    /// benchmarks on real architectures without a checkpoint; the text means nothing.
    #[arg(long)]
    pub random_weights: bool,
}

impl ModelArgs {
    pub fn options(&self) -> Result<kiln::infer::InferenceOptions> {
        let dtype = match self.dtype.as_str() {
            "auto" => None,
            name => Some(parse_dtype(name)?),
        };
        let quantize = match self.quantize.as_str() {
            "auto" => None,
            "nf4" => Some(true),
            "none" => Some(false),
            other => {
                return Err(KilnError::Usage(format!(
                    "--quantize {other}: allowed auto, nf4, none"
                )))
            }
        };
        Ok(kiln::infer::InferenceOptions {
            random_weights: self.random_weights,
            device: self.device.clone(),
            dtype,
            quantize,
            ..Default::default()
        })
    }

    pub fn load(&self) -> Result<kiln::model::LoadedModel> {
        kiln::infer::load(&self.model, self.adapter.as_deref(), &self.options()?)
    }
}

#[derive(clap::Args)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample from the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample from the smallest set of tokens reaching this probability (1 = all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Penalise tokens already in the text (1 = off; 1.1 is common).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<kiln::infer::generate::SamplingParams> {
        if self.temperature < 0.0
            || !(self.top_p > 0.0 && self.top_p <= 1.0)
            || self.repetition_penalty <= 0.0
        {
            return Err(KilnError::Usage(
                "--temperature must be >= 0, --top-p in (0, 1], --repetition-penalty > 0".into(),
            ));
        }
        Ok(kiln::infer::generate::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
        })
    }
}

impl DraftArgs {
    /// The draft of `--draft`, loaded as `model` is (refused when its tokenizer is not `tok`).
    pub fn load(
        &self,
        model: &ModelArgs,
        tok: &kiln::model::TokenizerInfo,
    ) -> Result<Option<kiln::model::LoadedModel>> {
        let Some(dir) = &self.draft else {
            return Ok(None);
        };
        let spec = kiln::infer::speculative::DraftSpec {
            model: dir.clone(),
            adapter: self.draft_adapter.clone(),
            tokens: self.draft_tokens,
            layers: self.draft_layers,
        };
        kiln::infer::speculative::load_draft(&spec, &model.options()?, tok).map(Some)
    }
}

/// The `[data]` section of held-out or calibration rows given on the command line.
pub fn held_out_rows(path: &str, chat_template: &str) -> Result<kiln::recipe::DataSection> {
    let mut extra = toml::Table::new();
    extra.insert("chat_template".into(), chat_template.into());
    kiln::recipe::DataSection::for_command(&[path.to_string()], extra)
}

/// The recipe a command reads, with its `--set` overrides.
#[derive(clap::Args)]
pub struct RecipeArgs {
    /// The recipe (TOML: [model], [data], [lora], [training], [output], and [distill] to distil).
    pub recipe: PathBuf,
    /// Override a recipe key: SECTION.KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}
