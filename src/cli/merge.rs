//! `kiln merge`: an adapter merged into its base, written as a Hugging Face directory.

use std::path::PathBuf;

use kiln::error::{KilnError, Result};
use kiln::export::merge::{self, MergeInto};

use super::args;

#[derive(clap::Args)]
pub struct Args {
    /// The base model directory the adapter was trained on.
    #[arg(long)]
    pub model: String,
    /// The PEFT adapter directory.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// nf4 or original.
    #[arg(long, default_value = "nf4")]
    pub into: String,
    /// bf16, f16 or f32 (default: the base's dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Where the merged weights are computed: auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub held_out: args::HeldOutArgs,
}

pub fn exec(args: Args) -> Result<()> {
    let into = args::parse_into(&args.into)?;
    let (model, adapter, output) = (&args.model, &args.adapter, &args.output);
    let base = kiln::model::source::resolve_model_path(model)?;
    if kiln::gguf::is_gguf(&base) {
        return Err(KilnError::Usage(format!(
            "{}: merge writes a Hugging Face directory, which a GGUF base has no config.json or tokenizer files for; merge into a new GGUF with `kiln export gguf --model {} --adapter {} -o merged.gguf --quant q4_k_m`",
            base.display(),
            model,
            adapter.display()
        )));
    }
    let loaded = merge::load_for_merge(model, adapter, into, &args.device)?;
    let dtype = match args.dtype.as_deref() {
        None => merge::base_dtype(&loaded.model),
        Some(name) => args::parse_dtype(name)?,
    };
    let files = merge::write_merged(&loaded, output, dtype)?;
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
    if let Some(cfg) = args.held_out.section()? {
        let report = merge::fidelity(model, adapter, output, &cfg, args.held_out.eval_rows)?;
        println!("{report}");
    }
    Ok(())
}
