//! `kiln plan`: a recipe's peak memory and step time, before anything loads.

use kiln::error::Result;

use super::args;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub recipe: args::RecipeArgs,
    /// Read the free memory of this CUDA device (a build with `--features cuda`).
    #[arg(long)]
    pub device: Option<String>,
    /// Plan for a card with this much free memory (GiB) instead.
    #[arg(long, value_name = "GIB", conflicts_with = "device")]
    pub gpu_memory: Option<f64>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub fn exec(args: Args) -> Result<()> {
    let recipe = kiln::recipe::Recipe::load(&args.recipe.recipe, &args.recipe.overrides)?;
    let free = match (&args.device, args.gpu_memory) {
        (_, Some(g)) => Some((g * (1u64 << 30) as f64) as u64),
        (Some(d), None) => kiln::train::plan::free_memory(&kiln::device::open(d)?)?,
        (None, None) => None,
    };
    let report = kiln::train::plan::report(&recipe, free)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("plans serialize")
        );
    } else {
        print!("{}", report.text);
    }
    Ok(())
}
