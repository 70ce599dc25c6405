//! `kiln init-tiny`: a small random model for smoke runs, tests and benchmarks.

use std::path::PathBuf;

use kiln::error::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Architecture of the tiny model.
    #[arg(long, default_value = "llama")]
    pub arch: String,
    /// A real config.json: make a random model of that architecture instead (benchmarks).
    #[arg(long, conflicts_with = "arch")]
    pub config: Option<PathBuf>,
    /// Output directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Seed of the random weights; the same seed gives the same files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn exec(args: Args) -> Result<()> {
    match &args.config {
        Some(path) => {
            let json = kiln::io::read_json(path)?;
            kiln::model::tiny::write_random_model(&args.output, &json, args.seed, false)?;
        }
        None => kiln::model::tiny::init_tiny(&args.arch, &args.output, args.seed)?,
    }
    eprintln!(
        "wrote a random {} model to {}",
        args.arch,
        args.output.display()
    );
    Ok(())
}
