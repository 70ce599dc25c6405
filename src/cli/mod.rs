//! The command layer: one file per command, each its arguments and an `exec` that turns flags
//! into typed options and calls the library (as cargo's `src/bin/cargo/commands/`).

use clap::{Parser, Subcommand};

use kiln::error::Result;

mod args;
mod data;
mod distill;
mod eval;
mod export;
mod generate;
mod init_tiny;
mod inspect;
mod merge;
mod plan;
mod quantize;
mod report;
mod train;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "QLoRA fine-tuning in one binary: NF4 base, LoRA adapters, PEFT adapters, merged models and GGUF for llama.cpp and Ollama"
)]
#[command(
    after_help = "Start with:\n  kiln train recipes/tiny.toml      a real training on a tiny random model (no downloads)\n  kiln init-tiny --arch llama -o /tmp/tiny\n  kiln quantize --model BASE -o BASE-nf4"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Fine-tune with LoRA as a recipe says; writes the PEFT adapter to OUTPUT_DIR/adapter.
    #[command(
        after_help = "Override any recipe key with --set, e.g.\n  kiln train recipes/tiny.toml --set training.max_steps=10 --set lora.r=8"
    )]
    Train(train::Args),
    /// Predict a recipe's peak GPU memory (by part) and step time from config.json and the recipe,
    /// before loading anything; with a device or --gpu-memory, what fits it and what
    /// `gradient_checkpointing = "auto"` would recompute.
    #[command(
        after_help = "Examples:\n  kiln plan recipes/qwen3-8b.toml --gpu-memory 24 --set model.path=tests/fixtures/configs/Qwen3-8B.json   (a config.json is enough)\n  kiln plan recipes/llama-3.2-1b-instruct.toml --device cuda:0 --json\n`kiln train` runs the same check on CUDA and refuses a recipe that cannot fit."
    )]
    Plan(plan::Args),
    /// Write a small random model (config.json, model.safetensors, tokenizer) for smoke runs and tests.
    InitTiny(init_tiny::Args),
    /// Generate text from a model (base, base + adapter, or merged), streaming it.
    #[command(
        after_help = "Examples:\n  kiln generate --model BASE --adapter runs/x/adapter --prompt \"Write a haiku\" --chat\n  kiln generate --model BASE --prompt \"Once upon a time\" --temperature 0.8 --top-p 0.95 --seed 1\n  kiln generate --model BASE --adapter runs/x/adapter --chat     (interactive; /exit or Ctrl-D ends)\nWith an adapter the base is quantized to NF4, as it was trained (--quantize none to use it dense)."
    )]
    Generate(generate::Args),
    /// Evaluate a model on a dataset: loss and perplexity, or exact match of generated answers.
    #[command(
        after_help = "Examples:\n  kiln eval --model BASE --adapter runs/x/adapter --data val.jsonl\n  kiln eval --model BASE --adapter runs/x/adapter --data gsm8k/test.jsonl --field prompt=question --field completion=answer --task exact-match --limit 100\nLoss uses the same templating and masks as training: only assistant / completion tokens count."
    )]
    Eval(eval::Args),
    /// Merge a LoRA adapter into its base: a Hugging Face model directory transformers loads.
    #[command(
        after_help = "--into nf4 (default) merges into the dequantized NF4 weights the adapter was trained on, so the\nmerged model computes what the trained one did; --into original uses the base's original weights.\nWith --eval-data, prints the perplexity of the trained and merged models and their mean KL.\n  kiln merge --model BASE --adapter runs/x/adapter -o runs/x/merged --eval-data val.jsonl"
    )]
    Merge(merge::Args),
    /// Export for llama.cpp and Ollama: GGUF models and LoRA adapters, with a Modelfile.
    #[command(subcommand)]
    Export(export::Command),
    /// Print the metadata and tensor table of a GGUF file, a .safetensors file, a model directory or a PEFT adapter.
    Inspect(inspect::Args),
    /// Look at a recipe's dataset as training will see it.
    #[command(subcommand)]
    Data(data::Command),
    /// Distillation helpers (the [distill] recipe section).
    #[command(subcommand)]
    Distill(distill::Command),
    /// Quantize a model directory or a .safetensors file to bitsandbytes NF4 (double quant).
    Quantize(quantize::Args),
    /// One self-contained HTML page of runs: every metric's curve (several runs overlaid), the
    /// settings and results side by side, and the sample generations. No network when opened.
    #[command(
        after_help = "Examples:\n  kiln report runs/dpo-tiny                       (writes runs/dpo-tiny/report.html)\n  kiln report runs/a runs/b -o compare.html\n`kiln train` writes OUTPUT_DIR/report.html at the end of a run; TensorBoard reads OUTPUT_DIR/tensorboard."
    )]
    Report(report::Args),
}

/// Runs one command.
pub fn exec(command: Command) -> Result<()> {
    match command {
        Command::Train(args) => train::exec(args),
        Command::Plan(args) => plan::exec(args),
        Command::InitTiny(args) => init_tiny::exec(args),
        Command::Generate(args) => generate::exec(args),
        Command::Eval(args) => eval::exec(args),
        Command::Merge(args) => merge::exec(args),
        Command::Export(cmd) => export::exec(cmd),
        Command::Inspect(args) => inspect::exec(args),
        Command::Data(cmd) => data::exec(cmd),
        Command::Distill(cmd) => distill::exec(cmd),
        Command::Quantize(args) => quantize::exec(args),
        Command::Report(args) => report::exec(args),
    }
}
