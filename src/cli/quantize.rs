//! `kiln quantize`: a model written in bitsandbytes' NF4 format.

use std::path::PathBuf;

use kiln::error::{KilnError, Result};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory or a single .safetensors file.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (for a model directory) or .safetensors file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Where to quantize: auto, cpu, cuda, cuda:N (the same bytes on each).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn exec(args: Args) -> Result<()> {
    let (model, output) = (&args.model, &args.output);
    if output.exists() && output.canonicalize().ok() == model.canonicalize().ok() {
        return Err(KilnError::Usage("--output must differ from --model".into()));
    }
    let bar = indicatif::ProgressBar::new(0);
    let device = kiln::device::open(&args.device)?;
    let report =
        kiln::model::bitsandbytes::quantize_path(model, output, &device, &|i, n, name| {
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
    Ok(())
}
