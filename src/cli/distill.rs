//! `kiln distill cache`: a teacher's top-k log-probabilities kept for training.

use std::path::PathBuf;

use clap::Subcommand;
use kiln::error::Result;

use super::args;

#[derive(Subcommand)]
pub enum Command {
    /// Run the teacher once over the recipe's training data and keep its top-k log-probabilities
    /// per target token (safetensors shards); training with `distill.cache = DIR` then reads
    /// them instead of running the teacher (for a teacher too big to sit beside the student).
    #[command(
        after_help = "The mass outside the k most likely tokens is spread evenly over the rest when training reads the cache; k = the vocabulary size gives exactly the live teacher's loss.\n  kiln distill cache recipe.toml --top-k 64 --out teacher-cache\n  kiln train recipe.toml --set distill.cache=teacher-cache"
    )]
    Cache(CacheArgs),
}

#[derive(clap::Args)]
pub struct CacheArgs {
    #[command(flatten)]
    pub recipe: args::RecipeArgs,
    /// Where to write (default: distill.cache, else OUTPUT_DIR/teacher-cache).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Log-probabilities kept per target token (default: distill.top_k, 64).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Device, overriding the recipe's model.device (the teacher runs there unless
    /// distill.teacher_device says otherwise).
    #[arg(long)]
    pub device: Option<String>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn exec(cmd: Command) -> Result<()> {
    let Command::Cache(args) = cmd;
    let mut typed: Vec<(&str, toml::Value)> = vec![];
    if let Some(d) = args.device {
        typed.push(("model.device", d.into()));
    }
    if let Some(k) = args.top_k {
        typed.push(("distill.top_k", (k as i64).into()));
    }
    let recipe =
        kiln::recipe::Recipe::load_with(&args.recipe.recipe, &args.recipe.overrides, &typed)?;
    let (dir, s) = kiln::train::distill_cache::cache_command(&recipe, args.out, args.quiet)?;
    println!(
        "wrote {}: top {} log-probabilities of {} target tokens in {} sequences ({:.1} MiB)",
        dir.display(),
        s.top_k,
        s.targets,
        s.sequences,
        s.bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}
