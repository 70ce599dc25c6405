//! `kiln inspect`: what a GGUF file, safetensors file, model directory or adapter holds.

use std::path::PathBuf;

use kiln::error::Result;

#[derive(clap::Args)]
pub struct Args {
    pub path: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub fn exec(args: Args) -> Result<()> {
    let i = kiln::export::inspect::inspect(&args.path)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&i).expect("serializable")
        );
    } else {
        print!("{}", i.table());
    }
    Ok(())
}
