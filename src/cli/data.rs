//! `kiln data inspect`: a recipe's dataset as training will see it.

use clap::Subcommand;
use kiln::error::Result;

use super::args;

#[derive(Subcommand)]
pub enum Command {
    /// Show the first examples with trained and masked tokens told apart, and dataset statistics.
    #[command(
        after_help = "Trained tokens (those that carry loss) are green on a terminal and wrapped in ⟦ ⟧ otherwise.\nOnly the tokenizer is loaded, not the model weights.\n  kiln data inspect recipes/tiny.toml --n 2\n  kiln data inspect recipe.toml --json | jq .stats"
    )]
    Inspect(InspectArgs),
}

#[derive(clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub recipe: args::RecipeArgs,
    /// How many examples to show.
    #[arg(long, short, default_value_t = 5)]
    pub n: usize,
    /// Machine-readable output (examples with input_ids, loss_mask, segments; stats).
    #[arg(long)]
    pub json: bool,
}

pub fn exec(cmd: Command) -> Result<()> {
    let Command::Inspect(args) = cmd;
    let recipe = kiln::recipe::Recipe::load(&args.recipe.recipe, &args.recipe.overrides)?;
    let dir = kiln::model::source::resolve_model_path(&recipe.model.path)?;
    let tokenizer = kiln::model::load_tokenizer(&dir)?;
    let color = !args.json && kiln::data::inspect::stdout_has_color();
    let report = kiln::data::inspect::inspect(&recipe, &tokenizer, args.n, color)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.json).expect("JSON values serialize")
        );
    } else {
        print!("{}", report.text);
    }
    Ok(())
}
