//! The `kiln` command line: parses arguments and calls one library function per command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kiln::error::{KilnError, Result};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "QLoRA fine-tuning in one binary: NF4 base, LoRA adapters, PEFT adapters, merged models and GGUF for llama.cpp and Ollama"
)]
#[command(
    after_help = "Start with:\n  kiln train recipes/tiny.toml      a real training on a tiny random model (no downloads)\n  kiln init-tiny --arch llama -o /tmp/tiny\n  kiln quantize --model BASE -o BASE-nf4"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune with LoRA as a recipe says; writes the PEFT adapter to OUTPUT_DIR/adapter.
    #[command(
        after_help = "Override any recipe key with --set, e.g.\n  kiln train recipes/tiny.toml --set training.max_steps=10 --set lora.r=8"
    )]
    Train {
        /// The recipe (TOML with [model], [data], [lora], [training], [output]).
        recipe: PathBuf,
        /// Override a recipe key: SECTION.KEY=VALUE (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Device, overriding the recipe's model.device (cpu, cuda, cuda:N, metal).
        #[arg(long)]
        device: Option<String>,
        /// No progress bar or messages (metrics.jsonl is still written).
        #[arg(long, short)]
        quiet: bool,
        /// Continue from the newest checkpoint in output.dir: adapter, optimizer, step, data
        /// position and RNG, exactly where it stopped.
        #[arg(long)]
        resume: bool,
        /// With --resume: go on even if the recipe or base model changed since the checkpoint.
        #[arg(long, requires = "resume")]
        force_resume: bool,
        /// Train on N GPUs of this host, one process each (data-parallel over NCCL); each step
        /// takes micro_batch_size x gradient_accumulation_steps x N sequences. Same as
        /// training.gpus. Under torchrun/srun/mpirun leave it out: their WORLD_SIZE decides.
        #[arg(long, value_name = "N")]
        gpus: Option<usize>,
        /// With [distill]: run the teacher on this device (e.g. cuda:1) instead of beside the
        /// student; its final hidden states travel to the student's device. Same as
        /// distill.teacher_device.
        #[arg(long, value_name = "DEVICE")]
        teacher_device: Option<String>,
    },
    /// Predict a recipe's peak GPU memory (by part) and step time from config.json and the recipe,
    /// before loading anything; with a device or --gpu-memory, what fits it and what
    /// `gradient_checkpointing = "auto"` would recompute.
    #[command(
        after_help = "Examples:\n  kiln plan recipes/qwen3-8b.toml --gpu-memory 24 --set model.path=tests/fixtures/configs/Qwen3-8B.json   (a config.json is enough)\n  kiln plan recipes/llama-3.2-1b-instruct.toml --device cuda:0 --json\n`kiln train` runs the same check on CUDA and refuses a recipe that cannot fit."
    )]
    Plan {
        /// The recipe.
        recipe: PathBuf,
        /// Override a recipe key: SECTION.KEY=VALUE (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Read the free memory of this CUDA device (a build with `--features cuda`).
        #[arg(long)]
        device: Option<String>,
        /// Plan for a card with this much free memory (GiB) instead.
        #[arg(long, value_name = "GIB", conflicts_with = "device")]
        gpu_memory: Option<f64>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write a small random model (config.json, model.safetensors, tokenizer) for smoke runs and tests.
    InitTiny {
        /// Architecture of the tiny model.
        #[arg(long, default_value = "llama")]
        arch: String,
        /// A real config.json: make a random model of that architecture instead (benchmarks).
        #[arg(long, conflicts_with = "arch")]
        config: Option<PathBuf>,
        /// Output directory.
        #[arg(short, long)]
        output: PathBuf,
        /// Seed of the random weights; the same seed gives the same files.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Generate text from a model (base, base + adapter, or merged), streaming it.
    #[command(
        after_help = "Examples:\n  kiln generate --model BASE --adapter runs/x/adapter --prompt \"Write a haiku\" --chat\n  kiln generate --model BASE --prompt \"Once upon a time\" --temperature 0.8 --top-p 0.95 --seed 1\n  kiln generate --model BASE --adapter runs/x/adapter --chat     (interactive; /exit or Ctrl-D ends)\nWith an adapter the base is quantized to NF4, as it was trained (--quantize none to use it dense)."
    )]
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt; with --chat it is the user's message.
        #[arg(long, short)]
        prompt: Option<String>,
        /// Apply the chat template (the model's own or --chat-template); without --prompt, an
        /// interactive conversation on stdin.
        #[arg(long)]
        chat: bool,
        /// System message for --chat.
        #[arg(long)]
        system: Option<String>,
        /// `model` (the model's own), a built-in (alpaca, chatml, llama3, phi3, mistral, gemma) or a .jinja file.
        #[arg(long, default_value = "model")]
        chat_template: String,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Stop when this text appears (repeatable); end-of-turn and eos tokens always stop.
        #[arg(long)]
        stop: Vec<String>,
        /// Print the result as JSON (text, tokens, stop reason, tokens/s) instead of streaming.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        draft: DraftArgs,
    },
    /// Evaluate a model on a dataset: loss and perplexity, or exact match of generated answers.
    #[command(
        after_help = "Examples:\n  kiln eval --model BASE --adapter runs/x/adapter --data val.jsonl\n  kiln eval --model BASE --adapter runs/x/adapter --data gsm8k/test.jsonl --field prompt=question --field completion=answer --task exact-match --limit 100\nLoss uses the same templating and masks as training: only assistant / completion tokens count."
    )]
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// Dataset file(s) (.jsonl, .json, .parquet) or a directory.
        #[arg(long, required = true)]
        data: Vec<String>,
        /// auto, alpaca, messages, sharegpt, prompt_completion, text.
        #[arg(long, default_value = "auto")]
        format: String,
        /// Column names: --field prompt=question (repeatable; as data.fields in a recipe).
        #[arg(long, value_name = "NAME=COLUMN")]
        field: Vec<String>,
        /// As data.chat_template in a recipe: auto, model, none, a built-in or a .jinja file.
        #[arg(long, default_value = "auto")]
        chat_template: String,
        #[arg(long, default_value_t = 2048)]
        max_seq_len: usize,
        /// As data.add_bos: put BOS in front of plain rows when the tokenizer adds none.
        #[arg(long)]
        add_bos: bool,
        /// `loss` (mean loss and perplexity) or `exact-match` (generate and compare final answers).
        #[arg(long, default_value = "loss")]
        task: String,
        /// exact-match: the final-answer pattern; its first group is the answer.
        #[arg(long, default_value = kiln::infer::eval::GSM8K_ANSWER)]
        answer_regex: String,
        /// Evaluate only the first N rows.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// loss: write every token's logits to this .safetensors (logits.N, input_ids.N).
        #[arg(long)]
        dump_logits: Option<PathBuf>,
        /// loss: also write llama.cpp's importance matrix of these rows (imatrix GGUF), for
        /// `llama-quantize --imatrix FILE` (rows one at a time, so padding is not counted).
        #[arg(long)]
        imatrix: Option<PathBuf>,
        /// Machine-readable results.
        #[arg(long)]
        json: bool,
        /// exact-match: generate with a draft model (speculative decoding; the same answers).
        #[command(flatten)]
        draft: DraftArgs,
    },
    /// Merge a LoRA adapter into its base: a Hugging Face model directory transformers loads.
    #[command(
        after_help = "--into nf4 (default) merges into the dequantized NF4 weights the adapter was trained on, so the\nmerged model computes what the trained one did; --into original uses the base's original weights.\nWith --eval-data, prints the perplexity of the trained and merged models and their mean KL.\n  kiln merge --model BASE --adapter runs/x/adapter -o runs/x/merged --eval-data val.jsonl"
    )]
    Merge {
        /// The base model directory the adapter was trained on.
        #[arg(long)]
        model: String,
        /// The PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// Output directory.
        #[arg(short, long)]
        output: PathBuf,
        /// nf4 or original.
        #[arg(long, default_value = "nf4")]
        into: String,
        /// bf16, f16 or f32 (default: the base's dtype).
        #[arg(long)]
        dtype: Option<String>,
        /// Where the merged weights are computed: auto, cpu, cuda, cuda:N, metal.
        #[arg(long, default_value = "auto")]
        device: String,
        #[command(flatten)]
        held_out: HeldOutArgs,
    },
    /// Export for llama.cpp and Ollama: GGUF models and LoRA adapters, with a Modelfile.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Print the metadata and tensor table of a GGUF file, a .safetensors file, a model directory or a PEFT adapter.
    Inspect {
        path: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Look at a recipe's dataset as training will see it.
    #[command(subcommand)]
    Data(DataCommand),
    /// Distillation helpers (the [distill] recipe section).
    #[command(subcommand)]
    Distill(DistillCommand),
    /// Quantize a model directory or a .safetensors file to bitsandbytes NF4 (double quant).
    Quantize {
        /// A Hugging Face model directory or a single .safetensors file.
        #[arg(long)]
        model: PathBuf,
        /// Output directory (for a model directory) or .safetensors file.
        #[arg(short, long)]
        output: PathBuf,
        /// Where to quantize: auto, cpu, cuda, cuda:N (the same bytes on each).
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

/// Held-out text for the fidelity report of `merge` and `export gguf`.
#[derive(clap::Args)]
struct HeldOutArgs {
    /// Held-out rows (any dataset format): perplexity and mean KL of the exported model against the trained one.
    #[arg(long)]
    eval_data: Option<String>,
    /// As data.chat_template for --eval-data.
    #[arg(long, default_value = "auto")]
    chat_template: String,
    /// Evaluate at most this many rows of --eval-data.
    #[arg(long, default_value_t = 64)]
    eval_rows: usize,
}

impl HeldOutArgs {
    /// The `[data]` section for --eval-data, if given.
    fn section(&self) -> Result<Option<kiln::recipe::DataSection>> {
        let Some(data) = &self.eval_data else {
            return Ok(None);
        };
        let mut extra = toml::Table::new();
        extra.insert(
            "chat_template".into(),
            toml::Value::String(self.chat_template.clone()),
        );
        Ok(Some(kiln::recipe::DataSection::for_command(
            std::slice::from_ref(data),
            extra,
        )?))
    }
}

/// The `[data]` section of the kiln run an adapter was saved by (`RUN/adapter` or
/// `RUN/checkpoint-N/adapter` beside `RUN/recipe.toml`), if it is one and its data is still
/// there: an export measures fidelity on its rows without being told.
fn run_data(adapter: Option<&std::path::Path>) -> Result<Option<kiln::recipe::DataSection>> {
    let Some(adapter) = adapter else {
        return Ok(None);
    };
    let recipe = adapter
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("recipe.toml"))
        .find(|p| p.is_file());
    let Some(recipe) = recipe else {
        return Ok(None);
    };
    let Ok(r) = kiln::recipe::Recipe::load(&recipe, &[]) else {
        return Ok(None);
    };
    let present = r
        .data
        .path
        .to_vec()
        .iter()
        .all(|p| std::path::Path::new(p).exists());
    Ok(present.then_some(r.data))
}

/// `--into nf4|original`.
fn parse_into(name: &str) -> Result<kiln::export::merge::MergeInto> {
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
fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `bf16`, `f16` or `f32` from a `--dtype` flag.
fn parse_dtype(name: &str) -> Result<candle_core::DType> {
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
struct DraftArgs {
    /// A small model with the same tokenizer (a directory, GGUF file or tiny:llama) that proposes
    /// tokens for the model to check in one pass: the same output (greedy: token for token;
    /// sampled: the same distribution), faster when the draft agrees often.
    #[arg(long)]
    draft: Option<String>,
    /// A PEFT LoRA adapter for the draft.
    #[arg(long, requires = "draft")]
    draft_adapter: Option<PathBuf>,
    /// Tokens the draft proposes a round.
    #[arg(long, default_value_t = 4, requires = "draft")]
    draft_tokens: usize,
    /// Use only the draft's first N decoder layers: with `--draft` the model itself, a draft
    /// made of its own first layers (train its adapter with [distill] and model.layers = N).
    #[arg(long, value_name = "N", requires = "draft")]
    draft_layers: Option<usize>,
    /// generate: also generate without the draft and print both speeds.
    #[arg(long, requires = "draft")]
    compare_plain: bool,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A Hugging Face model directory (or tiny:llama).
    #[arg(long)]
    model: String,
    /// A PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (f32 on CPU, bf16 on GPU), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// auto (nf4 with an adapter, as trained; none without), nf4, none.
    #[arg(long, default_value = "auto")]
    quantize: String,
    /// Random weights of config.json's shapes (for the model and a --draft alike): speed
    /// benchmarks on real architectures without a checkpoint; the text means nothing.
    #[arg(long)]
    random_weights: bool,
}

impl ModelArgs {
    fn options(&self) -> Result<kiln::infer::InferenceOptions> {
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

    fn load(&self) -> Result<kiln::model::LoadedModel> {
        kiln::infer::load(&self.model, self.adapter.as_deref(), &self.options()?)
    }
}

#[derive(clap::Args)]
struct SamplingArgs {
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
    fn params(&self) -> Result<kiln::infer::generate::SamplingParams> {
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

#[derive(Subcommand)]
enum ExportCommand {
    /// Write a model as one GGUF file, with an Ollama Modelfile beside it.
    #[command(
        after_help = "Examples:\n  kiln export gguf --model BASE --adapter runs/x/adapter -o out/model.gguf --quant q4_k_m --eval-data held_out.jsonl\n  kiln export gguf --model BASE --adapter runs/x/adapter -o out/model.gguf --quant q4_k_m --calibrate   # rounded under the run's own rows\n  kiln export gguf --model BASE --adapter runs/x/adapter -o out/model.gguf --quant auto --size q4_k_m  # types by measured KL, Q4_K_M's size\n  kiln export gguf --model merged/ -o model-f16.gguf --quant f16\nThen: llama-cli -m out/model.gguf, or: cd out && ollama create my-model -f Modelfile\nQ4_K_M and Q2_K pick per-tensor types as llama-quantize does (Q6_K for output and some attn_v/ffn_down)."
    )]
    Gguf {
        /// A Hugging Face model directory (a merged model, or the base with --adapter).
        #[arg(long)]
        model: String,
        /// A PEFT adapter to merge in first (into the NF4 weights it was trained against, unless --into original).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The .gguf file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Tensor types, as llama.cpp names its file types.
        #[arg(long, value_enum, default_value = "q4_k_m")]
        quant: kiln::gguf::llama::Preset,
        /// With --adapter: nf4 or original.
        #[arg(long, default_value = "nf4", requires = "adapter")]
        into: String,
        /// llama.cpp pre-tokenizer name, when kiln cannot tell it from tokenizer.json.
        #[arg(long)]
        tokenizer_pre: Option<String>,
        /// general.name (default: the file name).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        held_out: HeldOutArgs,
        /// Calibrate the quantization on these rows (any dataset format; with --adapter from a
        /// kiln run, the run's own data when no file is given): kiln measures the importance of
        /// every weight's input columns on them (llama.cpp's imatrix, written beside the output
        /// as OUTPUT.imatrix.gguf) and rounds each weight under it, as `llama-quantize --imatrix`
        /// does. q4_k_m, q6_k, q2_k and auto.
        #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "DATA")]
        calibrate: Option<String>,
        /// Rows of the calibration data to measure.
        #[arg(long, default_value_t = 64)]
        calibrate_rows: usize,
        /// Quantize under this importance matrix (llama.cpp's imatrix GGUF: `kiln eval
        /// --imatrix`, llama-imatrix) instead of measuring one.
        #[arg(long, conflicts_with = "calibrate")]
        imatrix: Option<PathBuf>,
        /// With --quant auto: the size the weights may take, as a preset's (q4_k_m, q6_k,
        /// q8_0, q4_0) or in bytes (e.g. 90MiB, 4.2GB).
        #[arg(long, default_value = "q4_k_m")]
        size: String,
        /// Do not write the Ollama Modelfile.
        #[arg(long)]
        no_modelfile: bool,
    },
    /// Write a PEFT adapter as a llama.cpp LoRA adapter (llama-cli -m base.gguf --lora FILE).
    GgufAdapter {
        /// The PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// The base model directory the adapter was trained on.
        #[arg(long)]
        model: String,
        /// The .gguf file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// f32, f16, bf16 or q8_0.
        #[arg(long, default_value = "f32")]
        outtype: String,
        /// The base model as Ollama should find it (a GGUF path or an Ollama model name), for the Modelfile.
        #[arg(long)]
        ollama_base: Option<String>,
    },
}

#[derive(Subcommand)]
enum DistillCommand {
    /// Run the teacher once over the recipe's training data and keep its top-k log-probabilities
    /// per target token (safetensors shards); training with `distill.cache = DIR` then reads
    /// them instead of running the teacher (for a teacher too big to sit beside the student).
    #[command(
        after_help = "The mass outside the k most likely tokens is spread evenly over the rest when training reads the cache; k = the vocabulary size gives exactly the live teacher's loss.\n  kiln distill cache recipe.toml --top-k 64 --out teacher-cache\n  kiln train recipe.toml --set distill.cache=teacher-cache"
    )]
    Cache {
        /// The recipe: [model] and [data] as training will use them, [distill] naming the teacher.
        recipe: PathBuf,
        /// Where to write (default: distill.cache, else OUTPUT_DIR/teacher-cache).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Log-probabilities kept per target token (default: distill.top_k, 64).
        #[arg(long)]
        top_k: Option<usize>,
        /// Device, overriding the recipe's model.device (the teacher runs there unless
        /// distill.teacher_device says otherwise).
        #[arg(long)]
        device: Option<String>,
        /// Override a recipe key: SECTION.KEY=VALUE (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Show the first examples with trained and masked tokens told apart, and dataset statistics.
    #[command(
        after_help = "Trained tokens (those that carry loss) are green on a terminal and wrapped in ⟦ ⟧ otherwise.\nOnly the tokenizer is loaded, not the model weights.\n  kiln data inspect recipes/tiny.toml --n 2\n  kiln data inspect recipe.toml --json | jq .stats"
    )]
    Inspect {
        /// The recipe whose [data] and [model] tokenizer to use.
        recipe: PathBuf,
        /// How many examples to show.
        #[arg(long, short, default_value_t = 5)]
        n: usize,
        /// Machine-readable output (examples with input_ids, loss_mask, segments; stats).
        #[arg(long)]
        json: bool,
        /// Override a recipe key: SECTION.KEY=VALUE (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            recipe,
            mut overrides,
            device,
            quiet,
            resume,
            force_resume,
            gpus,
            teacher_device,
        } => {
            if let Some(d) = device {
                overrides.push(format!("model.device=\"{d}\""));
            }
            if let Some(d) = teacher_device {
                overrides.push(format!("distill.teacher_device=\"{d}\""));
            }
            if let Some(n) = gpus {
                overrides.push(format!("training.gpus={n}"));
            }
            if resume {
                overrides.push("training.resume=true".into());
            }
            if force_resume {
                overrides.push("training.force_resume=true".into());
            }
            let recipe = kiln::recipe::Recipe::load(&recipe, &overrides)?;
            let world = kiln::dist::World::from_env()?;
            if world.is_none() && recipe.training.gpus > 1 {
                // This process only launches: one child per GPU runs this same command.
                let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
                return kiln::dist::launch::run_local(recipe.training.gpus, &args);
            }
            if let Some(w) = &world {
                if w.rank == 0 && recipe.training.gpus > 1 && recipe.training.gpus != w.size {
                    eprintln!(
                        "note: training.gpus = {} is ignored: the launcher started {} ranks",
                        recipe.training.gpus, w.size
                    );
                }
            }
            kiln::train::train(&recipe, quiet)?;
        }
        Command::Distill(DistillCommand::Cache {
            recipe,
            out,
            top_k,
            device,
            mut overrides,
            quiet,
        }) => {
            if let Some(d) = device {
                overrides.push(format!("model.device=\"{d}\""));
            }
            if let Some(k) = top_k {
                overrides.push(format!("distill.top_k={k}"));
            }
            let recipe = kiln::recipe::Recipe::load(&recipe, &overrides)?;
            let (dir, s) = kiln::train::distill_cache::cache_command(&recipe, out, quiet)?;
            println!(
                "wrote {}: top {} log-probabilities of {} target tokens in {} sequences ({:.1} MiB)",
                dir.display(),
                s.top_k,
                s.targets,
                s.sequences,
                s.bytes as f64 / (1 << 20) as f64
            );
        }
        Command::Plan {
            recipe,
            overrides,
            device,
            gpu_memory,
            json,
        } => {
            let recipe = kiln::recipe::Recipe::load(&recipe, &overrides)?;
            let free = match (&device, gpu_memory) {
                (_, Some(g)) => Some((g * (1u64 << 30) as f64) as u64),
                (Some(d), None) => kiln::train::plan::free_memory(&kiln::device::open(d)?)?,
                (None, None) => None,
            };
            let report = kiln::train::plan::report(&recipe, free)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("plans serialize")
                );
            } else {
                print!("{}", report.text);
            }
        }
        Command::InitTiny {
            arch,
            config,
            output,
            seed,
        } => {
            match config {
                Some(path) => {
                    let json = kiln::io::read_json(&path)?;
                    kiln::model::tiny::write_random_model(&output, &json, seed, false)?;
                }
                None => kiln::model::tiny::init_tiny(&arch, &output, seed)?,
            }
            eprintln!("wrote a random {arch} model to {}", output.display());
        }
        Command::Generate {
            model,
            prompt,
            chat,
            system,
            chat_template,
            sampling,
            stop,
            json,
            draft,
        } => kiln_generate(
            &model,
            prompt,
            chat,
            system,
            &chat_template,
            &sampling,
            &stop,
            json,
            &draft,
        )?,
        Command::Eval {
            model,
            data,
            format,
            field,
            chat_template,
            max_seq_len,
            add_bos,
            task,
            answer_regex,
            limit,
            batch_size,
            sampling,
            dump_logits,
            imatrix,
            json,
            draft,
        } => {
            let mut table = toml::Table::new();
            table.insert("format".into(), toml::Value::String(format));
            table.insert("chat_template".into(), toml::Value::String(chat_template));
            table.insert("add_bos".into(), toml::Value::Boolean(add_bos));
            table.insert(
                "max_seq_len".into(),
                toml::Value::Integer(max_seq_len as i64),
            );
            let mut fields = toml::Table::new();
            for f in &field {
                let (k, v) = f.split_once('=').ok_or_else(|| {
                    KilnError::Usage(format!(
                        "--field expects NAME=COLUMN (e.g. prompt=question), got `{f}`"
                    ))
                })?;
                fields.insert(k.trim().into(), toml::Value::String(v.trim().into()));
            }
            table.insert("fields".into(), toml::Value::Table(fields));
            let cfg = kiln::recipe::DataSection::for_command(&data, table)?;
            let loaded = model.load()?;
            let report = match task.as_str() {
                "loss" => {
                    let tok = &loaded.tokenizer;
                    let mut dataset = kiln::data::load_dataset(&cfg, tok, 0)?;
                    if let Some(l) = limit {
                        dataset.train.truncate(l);
                    }
                    let bar = progress(dataset.train.len(), "examples", json);
                    let mut dump = dump_logits.as_ref().map(|_| Vec::new());
                    // The importance matrix counts every position of a pass: one row a pass.
                    let batch_size = if imatrix.is_some() { 1 } else { batch_size };
                    let mut run = || {
                        kiln::infer::eval::eval_loss(
                            &loaded.model,
                            &dataset.train,
                            tok.pad_id,
                            batch_size,
                            dump.as_mut(),
                            &|n| bar.inc(n as u64),
                        )
                    };
                    let (r, stats) = match &imatrix {
                        Some(_) => kiln::export::imatrix::collect(&loaded.model, run)?,
                        None => (run()?, vec![]),
                    };
                    bar.finish_and_clear();
                    if let Some(path) = &imatrix {
                        let longest = dataset.train.iter().map(|e| e.input_ids.len()).max();
                        kiln::export::imatrix::write(
                            path,
                            &stats,
                            &data,
                            dataset.train.len() as u32,
                            longest.unwrap_or(0) as u32,
                        )?;
                        if !json {
                            println!(
                                "wrote {} ({} weights, {} tokens); use it with: llama-quantize --imatrix {} MODEL.gguf OUT.gguf Q4_K_M",
                                path.display(),
                                stats.len(),
                                stats.first().map_or(0, |e| e.tokens),
                                path.display()
                            );
                        }
                    }
                    if let (Some(path), Some(tensors)) = (&dump_logits, &dump) {
                        kiln::infer::eval::write_logits(path, tensors)?;
                    }
                    if !json {
                        println!(
                            "loss {:.6}  perplexity {:.4}  ({} examples, {} target tokens)",
                            r.mean_loss, r.perplexity, r.examples, r.target_tokens
                        );
                    }
                    serde_json::to_value(&r).expect("serializable")
                }
                "exact-match" => {
                    let pattern = regex::Regex::new(&answer_regex).map_err(|e| {
                        KilnError::Usage(format!("--answer-regex is not a valid regex: {e}"))
                    })?;
                    let files = kiln::data::source::resolve_files(&cfg.path.to_vec(), &cfg.split)?;
                    let stops = kiln::infer::generate::stop_tokens(
                        &loaded.tokenizer,
                        &loaded.model,
                        &loaded.dir,
                    );
                    if draft.compare_plain {
                        return Err(KilnError::Usage(
                            "--compare-plain is for kiln generate; eval reports the draft's acceptance rate".into(),
                        ));
                    }
                    let draft_model = load_draft(&model, &loaded.tokenizer, &draft)?;
                    let bar = progress(limit.unwrap_or(0), "rows", json);
                    let r = kiln::infer::eval::exact_match(
                        &loaded.model,
                        draft_model.as_ref().map(|d| (&d.model, draft.draft_tokens)),
                        &loaded.tokenizer,
                        &files,
                        &cfg,
                        &pattern,
                        &sampling.params()?,
                        &stops,
                        limit,
                        &|n| bar.inc(n as u64),
                    )?;
                    bar.finish_and_clear();
                    if !json {
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
                    serde_json::to_value(&r).expect("serializable")
                }
                other => {
                    return Err(KilnError::Usage(format!(
                        "--task {other}: allowed loss, exact-match"
                    )))
                }
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serializable")
                );
            }
        }
        Command::Merge {
            model,
            adapter,
            output,
            into,
            dtype,
            device,
            held_out,
        } => {
            use kiln::export::merge::{self, MergeInto};
            let into = parse_into(&into)?;
            let base = kiln::model::tiny::resolve_model_path(&model)?;
            if kiln::gguf::load::is_gguf(&base) {
                return Err(kiln::error::KilnError::Usage(format!(
                    "{}: merge writes a Hugging Face directory, which a GGUF base has no config.json or tokenizer files for; merge into a new GGUF with `kiln export gguf --model {} --adapter {} -o merged.gguf --quant q4_k_m`",
                    base.display(),
                    model,
                    adapter.display()
                )));
            }
            let loaded = merge::load_for_merge(&model, &adapter, into, &device)?;
            let dtype = match dtype.as_deref() {
                None => merge::base_dtype(&loaded.model),
                Some(name) => parse_dtype(name)?,
            };
            let files = merge::write_merged(&loaded, &output, dtype)?;
            eprintln!(
                "merged {} into the {} weights of {}: {} ({} file{})",
                adapter.display(),
                if into == MergeInto::Nf4 {
                    "dequantized NF4"
                } else {
                    "original"
                },
                model,
                output.display(),
                files.len(),
                if files.len() == 1 { "" } else { "s" }
            );
            if let Some(cfg) = held_out.section()? {
                println!(
                    "{}",
                    merge::fidelity(&model, &adapter, &output, &cfg, held_out.eval_rows)?
                );
            }
        }
        Command::Export(cmd) => export(cmd)?,
        Command::Inspect { path, json } => {
            let i = kiln::export::inspect::inspect(&path)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&i).expect("serializable")
                );
            } else {
                print!("{}", i.table());
            }
        }
        Command::Data(DataCommand::Inspect {
            recipe,
            n,
            json,
            overrides,
        }) => {
            let recipe = kiln::recipe::Recipe::load(&recipe, &overrides)?;
            let dir = kiln::model::tiny::resolve_model_path(&recipe.model.path)?;
            let tokenizer = kiln::model::load_tokenizer(&dir)?;
            let color = !json && kiln::data::inspect::stdout_has_color();
            let report = kiln::data::inspect::inspect(&recipe, &tokenizer, n, color)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report.json).expect("JSON values serialize")
                );
            } else {
                print!("{}", report.text);
            }
        }
        Command::Quantize {
            model,
            output,
            device,
        } => {
            if output.exists() && output.canonicalize().ok() == model.canonicalize().ok() {
                return Err(KilnError::Usage("--output must differ from --model".into()));
            }
            let bar = indicatif::ProgressBar::new(0);
            let device = kiln::device::open(&device)?;
            let report =
                kiln::quant::checkpoint::quantize_path(&model, &output, &device, &|i, n, name| {
                    bar.set_length(n as u64);
                    bar.set_position(i as u64);
                    bar.set_message(name.to_string());
                })?;
            bar.finish_and_clear();
            eprintln!(
                "quantized {} tensors to NF4 (kept {}): {:.1} MiB -> {:.1} MiB, written to {}",
                report.quantized,
                report.kept,
                report.bytes_in as f64 / 1048576.0,
                report.bytes_out as f64 / 1048576.0,
                output.display()
            );
        }
    }
    Ok(())
}

fn export(cmd: ExportCommand) -> Result<()> {
    use kiln::export::gguf;
    match cmd {
        ExportCommand::Gguf {
            model,
            adapter,
            output,
            quant,
            into,
            tokenizer_pre,
            name,
            held_out,
            calibrate,
            calibrate_rows,
            imatrix,
            size,
            no_modelfile,
        } => {
            // `auto` measures on rows: the run's own when none are named.
            let calibrate = match (quant, calibrate, &imatrix) {
                (kiln::gguf::llama::Preset::Auto, None, None) => Some(String::new()),
                (_, c, _) => c,
            };
            if (calibrate.is_some() || imatrix.is_some()) && !quant.calibrates() {
                return Err(KilnError::Usage(format!(
                    "--calibrate/--imatrix apply to q4_k_m, q6_k, q2_k and auto, not {} (q8_0 and the float types gain nothing from an importance matrix; llama-quantize's q4_0 with a matrix writes Q4_1, which kiln does not write)",
                    quant.name()
                )));
            }
            // The calibration rows, found before any weight loads.
            let calibration = match calibrate.as_deref() {
                None => None,
                Some("") => Some(run_data(adapter.as_deref())?.ok_or_else(|| {
                    KilnError::Usage(
                        "--calibrate (and --quant auto) without a file needs --adapter inside a kiln run (RUN/adapter, whose recipe.toml names the data): give the rows, e.g. --calibrate train.jsonl".into(),
                    )
                })?),
                Some(path) => Some(
                    HeldOutArgs {
                        eval_data: Some(path.into()),
                        chat_template: held_out.chat_template.clone(),
                        eval_rows: calibrate_rows,
                    }
                    .section()?
                    .expect("a path was given"),
                ),
            };
            let importance = match &imatrix {
                Some(path) => Some(kiln::export::imatrix::read(path)?),
                None => None,
            };
            let mut loaded = match &adapter {
                Some(adapter) => {
                    kiln::export::merge::load_for_merge(&model, adapter, parse_into(&into)?, "cpu")?
                }
                None => {
                    let dir = kiln::model::tiny::resolve_model_path(&model)?;
                    let cfg = kiln::model::load_config(&dir)?;
                    kiln::infer::load(
                        &model,
                        None,
                        &kiln::infer::InferenceOptions {
                            device: "cpu".into(),
                            dtype: Some(cfg.stored_dtype().unwrap_or(candle_core::DType::F32)),
                            quantize: Some(false),
                            ..Default::default()
                        },
                    )?
                }
            };
            let (importance, examples) = match &calibration {
                Some(cfg) => {
                    let (imp, rows) = calibrate_on(&loaded, cfg, calibrate_rows, &output)?;
                    (Some(imp), rows)
                }
                None => (importance, vec![]),
            };
            let types = match (quant, &importance) {
                (kiln::gguf::llama::Preset::Auto, Some(imp)) => {
                    if examples.is_empty() {
                        return Err(KilnError::Usage(
                            "--quant auto measures each weight on calibration rows: use --calibrate [DATA] rather than --imatrix".into(),
                        ));
                    }
                    Some(auto_types(&mut loaded, imp, &examples, &size)?)
                }
                _ => None,
            };
            let opts = gguf::GgufOptions {
                preset: quant,
                tokenizer_pre,
                name,
                importance,
                types,
            };
            // Its length is set by the export, which knows how many tensors it writes.
            let bar = progress(0, "tensors", false);
            let summary = gguf::export_model(&loaded, &output, &opts, |i, total| {
                bar.set_length(total as u64);
                bar.set_position(i as u64);
            })?;
            bar.finish_and_clear();
            eprintln!("{summary}");
            if !no_modelfile {
                let stops = kiln::infer::generate::stop_tokens(
                    &loaded.tokenizer,
                    &loaded.model,
                    &loaded.dir,
                );
                let text = gguf::modelfile(
                    &format!("./{}", file_name(&output)),
                    &loaded.tokenizer,
                    &stops,
                    loaded.model.config.max_position_embeddings,
                );
                let path = output.with_file_name("Modelfile");
                kiln::io::write_atomic(&path, text.as_bytes())?;
                eprintln!(
                    "wrote {} (ollama create NAME -f {})",
                    path.display(),
                    path.display()
                );
            }
            drop(loaded);
            // The held-out rows given, or those of the run the adapter comes from.
            let held = match held_out.section()? {
                Some(cfg) => Some((cfg, held_out.eval_rows)),
                None => run_data(adapter.as_deref())?.map(|cfg| {
                    eprintln!("fidelity: on 16 rows of the adapter's run data (its validation rows, if it set some aside; --eval-data names others)");
                    (cfg, 16)
                }),
            };
            if let Some((cfg, rows)) = held {
                let report = gguf::fidelity(&model, adapter.as_deref(), &output, &cfg, rows)?;
                println!("{report}");
                if let Some(advice) = gguf::fidelity_advice(&report, quant.name()) {
                    eprintln!("{advice}");
                }
            } else {
                eprintln!(
                    "fidelity not measured: add --eval-data HELD_OUT.jsonl to compare the GGUF, read back by kiln, with the trained model"
                );
            }
        }
        ExportCommand::GgufAdapter {
            adapter,
            model,
            output,
            outtype,
            ollama_base,
        } => {
            let dir = kiln::model::tiny::resolve_model_path(&model)?;
            let cfg = kiln::model::load_config(&dir)?;
            let peft = kiln::export::peft::read_adapter(&adapter)?;
            kiln::export::peft::check_adapter_shapes(&peft, &cfg)?;
            let ty = gguf::adapter_type(&outtype)?;
            let summary = gguf::export_adapter(&peft, &cfg, &output, ty, None)?;
            eprintln!("{summary}");
            let base = ollama_base.unwrap_or_else(|| model.clone());
            let path = output.with_file_name("Modelfile");
            kiln::io::write_atomic(
                &path,
                gguf::adapter_modelfile(&base, &format!("./{}", file_name(&output))).as_bytes(),
            )?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Measures the importance matrix of `loaded` (the model being exported) on up to `rows` rows
/// of `data`, writes it beside `output` (OUTPUT.imatrix.gguf, for llama-quantize --imatrix) and
/// returns its importance values.
fn calibrate_on(
    loaded: &kiln::model::LoadedModel,
    data: &kiln::recipe::DataSection,
    rows: usize,
    output: &std::path::Path,
) -> Result<(
    std::collections::HashMap<String, Vec<f32>>,
    Vec<kiln::data::Example>,
)> {
    let mut dataset = kiln::data::load_dataset(data, &loaded.tokenizer, 0)?;
    // Validation rows first, as the fidelity check takes them.
    let mut examples = std::mem::take(&mut dataset.val);
    examples.append(&mut dataset.train);
    examples.truncate(rows);
    let bar = progress(examples.len(), "calibration rows", false);
    // One row a pass, so that padding is not counted.
    let (_, entries) = kiln::export::imatrix::collect(&loaded.model, || {
        kiln::infer::eval::eval_loss(
            &loaded.model,
            &examples,
            loaded.tokenizer.pad_id,
            1,
            None,
            &|n| bar.inc(n as u64),
        )
    })?;
    bar.finish_and_clear();
    let path = output.with_extension("imatrix.gguf");
    let longest = examples.iter().map(|e| e.input_ids.len()).max();
    kiln::export::imatrix::write(
        &path,
        &entries,
        &data.path.to_vec(),
        examples.len() as u32,
        longest.unwrap_or(0) as u32,
    )?;
    eprintln!(
        "calibration: {} weights measured on {} rows ({} tokens); wrote {}",
        entries.len(),
        examples.len(),
        entries.first().map_or(0, |e| e.tokens),
        path.display()
    );
    Ok((kiln::export::imatrix::importance(&entries), examples))
}

/// `--quant auto`: every weight's sensitivity measured on the calibration rows, then the types
/// within `size` (a preset's weights, or bytes) that lose the least (src/export/auto_types.rs).
fn auto_types(
    loaded: &mut kiln::model::LoadedModel,
    importance: &std::collections::HashMap<String, Vec<f32>>,
    examples: &[kiln::data::Example],
    size: &str,
) -> Result<std::collections::HashMap<String, kiln::gguf::GgmlType>> {
    use kiln::export::auto_types;
    let (planned, _) = kiln::export::gguf::planned_tensors(loaded)?;
    let bar = progress(0, "weights measured", false);
    let choices = auto_types::price(loaded, &planned, importance, examples, &|i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    // The measured weights' budget: what the preset gives them, or the size less the rest.
    let dims: Vec<(String, Vec<u64>)> = planned
        .iter()
        .map(|(g, d, _)| (g.clone(), d.clone()))
        .collect();
    let bytes_of = |preset: kiln::gguf::llama::Preset, measured: bool| -> u64 {
        let types = kiln::gguf::llama::choose_types(preset, &dims, &loaded.model.config);
        dims.iter()
            .zip(types)
            .filter(|((g, _), _)| choices.iter().any(|c| &c.gguf == g) == measured)
            .map(|((_, d), ty)| ty.bytes_for(d.iter().product::<u64>() as usize) as u64)
            .sum()
    };
    use clap::ValueEnum;
    let budget = match kiln::gguf::llama::Preset::from_str(size, true) {
        Ok(preset) => bytes_of(preset, true),
        Err(_) => {
            parse_size(size)?.saturating_sub(bytes_of(kiln::gguf::llama::Preset::Q4KM, false))
        }
    };
    let (types, kl, bytes) = auto_types::allocate(&choices, budget);
    let mut counts = std::collections::BTreeMap::new();
    for ty in types.values() {
        *counts.entry(ty.name()).or_insert(0usize) += 1;
    }
    eprintln!(
        "auto: {} weights measured; {:.1} MiB of {:.1} MiB for them ({}); predicted KL {:.4} nats",
        choices.len(),
        bytes as f64 / 1048576.0,
        budget as f64 / 1048576.0,
        counts
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join(", "),
        kl
    );
    let mut ranked: Vec<&auto_types::Choice> = choices.iter().collect();
    ranked.sort_by(|a, b| b.kl[0].total_cmp(&a.kl[0]));
    for c in ranked.iter().take(8) {
        eprintln!(
            "  {:<28} {}  (KL at {}: {:.5})",
            c.gguf,
            types[&c.gguf].name(),
            c.types[0].name(),
            c.kl[0]
        );
    }
    Ok(types)
}

/// `90MiB`, `4.2GB`, `1e9` → bytes.
fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1048576.0,
        "gib" => 1073741824.0,
        _ => f64::NAN,
    };
    let value: f64 = number.trim().parse().unwrap_or(f64::NAN) * scale;
    if !value.is_finite() || value <= 0.0 {
        return Err(KilnError::Usage(format!(
            "--size `{text}`: give a preset (q4_k_m, q6_k, q8_0, q4_0) or a size such as 90MiB or 4.2GB"
        )));
    }
    Ok(value as u64)
}

fn progress(total: usize, unit: &str, hidden: bool) -> indicatif::ProgressBar {
    if hidden {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit}  ETA {{eta}}"
        ))
        .expect("valid template"),
    );
    bar
}

/// The draft model of `--draft`, loaded on the model's device in its dtype (dense, its adapter
/// merged, unless --quantize says otherwise), if one is given; refused when its tokenizer is
/// not the model's.
fn load_draft(
    model: &ModelArgs,
    tok: &kiln::model::TokenizerInfo,
    args: &DraftArgs,
) -> Result<Option<kiln::model::LoadedModel>> {
    let Some(dir) = &args.draft else {
        return Ok(None);
    };
    if args.draft_tokens == 0 {
        return Err(KilnError::Usage("--draft-tokens must be at least 1".into()));
    }
    // The draft's proposals never change the output, only how many stand, and its speed is the
    // whole point: it is held dense unless --quantize says otherwise (NF4 is dequantized at every
    // call), with its adapter added into the weights rather than run beside them.
    let mut options = kiln::infer::InferenceOptions {
        layers: args.draft_layers,
        merge_adapter: true,
        ..model.options()?
    };
    options.quantize.get_or_insert(false);
    let d = kiln::infer::load(dir, args.draft_adapter.as_deref(), &options)?;
    kiln::model::tokenizer::check_same_ids(tok, &d.tokenizer).map_err(|why| {
        KilnError::Usage(format!(
            "--draft {dir}: its tokenizer differs from the model's ({why}); a draft must share the model's tokenizer"
        ))
    })?;
    Ok(Some(d))
}

#[allow(clippy::too_many_arguments)]
fn kiln_generate(
    model: &ModelArgs,
    prompt: Option<String>,
    chat: bool,
    system: Option<String>,
    chat_template: &str,
    sampling: &SamplingArgs,
    stop: &[String],
    json: bool,
    draft_args: &DraftArgs,
) -> Result<()> {
    use std::io::Write;
    let params = sampling.params()?;
    if !chat && prompt.is_none() {
        return Err(KilnError::Usage(
            "give --prompt TEXT, or --chat for a conversation".into(),
        ));
    }
    let loaded = model.load()?;
    let tok = &loaded.tokenizer;
    let draft = load_draft(model, tok, draft_args)?;
    let stops = kiln::infer::generate::stop_tokens(tok, &loaded.model, &loaded.dir);
    let template = if chat {
        let mut extra = toml::Table::new();
        extra.insert(
            "chat_template".into(),
            toml::Value::String(chat_template.to_string()),
        );
        let cfg = kiln::recipe::DataSection::for_command(&[], extra)?;
        let t = kiln::data::resolve_template(&cfg, tok)?.template;
        Some(t.ok_or_else(|| {
            KilnError::Usage(
                "the model has no chat template; pass --chat-template chatml (or another built-in)"
                    .into(),
            )
        })?)
    } else {
        None
    };
    let mut stdout = std::io::stdout();
    let mut run = |ids: Vec<u32>| -> Result<kiln::infer::generate::Generation> {
        let mut print = |piece: &str| {
            if !json {
                print!("{piece}");
                let _ = stdout.flush();
            }
        };
        let (g, stats) = kiln::infer::speculative::generate_with(
            &loaded.model,
            draft.as_ref().map(|d| (&d.model, draft_args.draft_tokens)),
            tok,
            &ids,
            &params,
            &stops,
            stop,
            &mut print,
        )?;
        if !json {
            println!();
            eprintln!(
                "[{} prompt tokens, {} new tokens, {:.1} tokens/s, stopped: {:?}]",
                g.prompt_tokens,
                g.tokens.len(),
                g.tokens_per_s(),
                g.stop_reason
            );
        }
        if let Some(s) = stats {
            let mut line = format!(
                "[draft: {} of {} proposed tokens accepted ({:.0}%), {} target passes for {} tokens",
                s.accepted,
                s.proposed,
                100.0 * s.acceptance_rate(),
                s.target_passes,
                g.tokens.len()
            );
            if draft_args.compare_plain {
                let plain = kiln::infer::generate::generate(
                    &loaded.model,
                    tok,
                    &ids,
                    &params,
                    &stops,
                    stop,
                    &mut |_| {},
                )?;
                line.push_str(&format!(
                    "; without the draft {:.1} tokens/s ({:.2}x), {} output",
                    plain.tokens_per_s(),
                    g.tokens_per_s() / plain.tokens_per_s().max(1e-9),
                    if plain.tokens == g.tokens {
                        "the same"
                    } else {
                        "another (sampled)"
                    }
                ));
            }
            eprintln!("{line}]");
        }
        Ok(g)
    };
    let render = |messages: &[serde_json::Value]| -> Result<Vec<u32>> {
        template
            .as_ref()
            .expect("chat mode has a template")
            .prompt_ids(tok, messages, None)
            .map_err(KilnError::Usage)
    };
    let mut messages = vec![];
    if let Some(s) = &system {
        messages.push(serde_json::json!({"role": "system", "content": s}));
    }
    match (chat, prompt) {
        (false, Some(p)) => {
            let g = run(tok.encode(&p, true)?)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&g).expect("serializable")
                );
            }
        }
        (true, Some(p)) => {
            messages.push(serde_json::json!({"role": "user", "content": p}));
            let g = run(render(&messages)?)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&g).expect("serializable")
                );
            }
        }
        (true, None) => {
            eprintln!("chat: type a message and press Enter; /exit or Ctrl-D ends");
            let stdin = std::io::stdin();
            loop {
                eprint!("> ");
                let mut line = String::new();
                if stdin
                    .read_line(&mut line)
                    .map_err(|e| KilnError::io("stdin", e))?
                    == 0
                {
                    break;
                }
                let line = line.trim_end_matches(['\n', '\r']);
                if line == "/exit" {
                    break;
                }
                messages.push(serde_json::json!({"role": "user", "content": line}));
                let g = run(render(&messages)?)?;
                messages.push(serde_json::json!({"role": "assistant", "content": g.text}));
            }
        }
        (false, None) => unreachable!("checked above"),
    }
    Ok(())
}

fn main() -> ExitCode {
    // Errors are for users: no library backtraces unless asked for with KILN_BACKTRACE=1.
    if std::env::var_os("KILN_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match kiln::dist::World::from_env().ok().flatten().map(|w| w.rank) {
                Some(rank) => eprintln!("error: rank {rank}: {e}"),
                None => eprintln!("error: {e}"),
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
