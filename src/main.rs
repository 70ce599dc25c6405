//! The `kiln` command line: parses arguments and calls one library function per command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kiln::error::{KilnError, Result};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "QLoRA fine-tuning in one binary: NF4 base, LoRA adapters, PEFT output"
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
    /// Look at a recipe's dataset as training will see it.
    #[command(subcommand)]
    Data(DataCommand),
    /// Quantize a model directory or a .safetensors file to bitsandbytes NF4 (double quant).
    Quantize {
        /// A Hugging Face model directory or a single .safetensors file.
        #[arg(long)]
        model: PathBuf,
        /// Output directory (for a model directory) or .safetensors file.
        #[arg(short, long)]
        output: PathBuf,
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
        } => {
            if let Some(d) = device {
                overrides.push(format!("model.device=\"{d}\""));
            }
            let recipe = kiln::recipe::Recipe::load(&recipe, &overrides)?;
            kiln::train::train(&recipe, quiet)?;
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
        Command::Quantize { model, output } => {
            if output.exists() && output.canonicalize().ok() == model.canonicalize().ok() {
                return Err(KilnError::Usage("--output must differ from --model".into()));
            }
            let bar = indicatif::ProgressBar::new(0);
            let report = kiln::quant::checkpoint::quantize_path(&model, &output, &|i, n, name| {
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

fn main() -> ExitCode {
    // Errors are for users: no library backtraces unless asked for with KILN_BACKTRACE=1.
    if std::env::var_os("KILN_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
