//! `kiln train`: a recipe's run, or the launcher of one process per GPU.

use kiln::error::Result;

use super::args;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub recipe: args::RecipeArgs,
    /// Device, overriding the recipe's model.device (cpu, cuda, cuda:N, metal).
    #[arg(long)]
    pub device: Option<String>,
    /// No progress bar or messages (metrics.jsonl is still written).
    #[arg(long, short)]
    pub quiet: bool,
    /// Continue from the newest checkpoint in output.dir: adapter, optimizer, step, data
    /// position and RNG, exactly where it stopped.
    #[arg(long)]
    pub resume: bool,
    /// With --resume: go on even if the recipe or base model changed since the checkpoint.
    #[arg(long, requires = "resume")]
    pub force_resume: bool,
    /// Train on N GPUs of this host, one process each (data-parallel over NCCL); each step
    /// takes micro_batch_size x gradient_accumulation_steps x N sequences. Same as
    /// training.gpus. Under torchrun/srun/mpirun leave it out: their WORLD_SIZE decides.
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
    /// With [distill]: run the teacher on this device (e.g. cuda:1) instead of beside the
    /// student; its final hidden states travel to the student's device. Same as
    /// distill.teacher_device.
    #[arg(long, value_name = "DEVICE")]
    pub teacher_device: Option<String>,
}

pub fn exec(args: Args) -> Result<()> {
    let mut typed: Vec<(&str, toml::Value)> = vec![];
    if let Some(d) = args.device {
        typed.push(("model.device", d.into()));
    }
    if let Some(d) = args.teacher_device {
        typed.push(("distill.teacher_device", d.into()));
    }
    if let Some(n) = args.gpus {
        typed.push(("training.gpus", (n as i64).into()));
    }
    if args.resume {
        typed.push(("training.resume", true.into()));
    }
    if args.force_resume {
        typed.push(("training.force_resume", true.into()));
    }
    let recipe =
        kiln::recipe::Recipe::load_with(&args.recipe.recipe, &args.recipe.overrides, &typed)?;
    let world = kiln::distributed::World::from_env()?;
    if world.is_none() && recipe.training.gpus > 1 {
        // This process only launches: one child per GPU runs this same command.
        let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        return kiln::distributed::launch::run_local(recipe.training.gpus, &argv);
    }
    if let Some(w) = &world {
        if w.rank == 0 && recipe.training.gpus > 1 && recipe.training.gpus != w.size {
            eprintln!(
                "note: training.gpus = {} is ignored: the launcher started {} ranks",
                recipe.training.gpus, w.size
            );
        }
    }
    // One rank draws the bars of loading and tokenizing; `-q` hides them all.
    kiln::progress::set_quiet(args.quiet || world.as_ref().is_some_and(|w| w.rank != 0));
    kiln::train::train(&recipe, args.quiet, world.as_ref())?;
    Ok(())
}
