//! Fine-tuning: one readable loop ([`train_loaded_with`]; the run's pieces in `run.rs`). Each
//! optimizer step runs
//! `gradient_accumulation_steps` micro-batches; the step's loss is the sum of their token losses
//! divided by the step's target-token count (ARCHITECTURE.md, decision 4), so any split of the same
//! examples into micro-batches gives the same update.

pub mod checkpoint;
pub mod distill;
pub mod distill_cache;
mod gradients;
pub mod memory;
pub mod optim;
pub mod plan;
pub mod preference;
mod run;

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

use crate::data::{self, ChatTemplate, DatasetStats, Example, TrainData};
use crate::error::{KilnError, Result};
use crate::model::{self, LoadOptions, LoadedModel};
use crate::recipe::{Quantize, Recipe};

pub use gradients::{
    accumulate_gradients, accumulate_gradients_on, accumulate_share, step_targets, StepGradients,
    StepShare,
};

/// One line of metrics.jsonl.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub target_tokens: usize,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub epoch: f64,
    pub elapsed_s: f64,
    /// A preference method's metrics (TRL's names: `rewards/chosen`, `logps/rejected`, ...),
    /// means over the step's pairs.
    #[serde(flatten)]
    pub method: std::collections::BTreeMap<String, f64>,
    /// With `[distill]`: the divergence from the teacher (per target token, at the
    /// temperature; KL or Jensen–Shannon as `distill.loss` says) and the cross-entropy on the
    /// data, the two parts `loss` weighs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ce: Option<f64>,
    /// CUDA: the device memory in use after the step, as the driver counts it. The allocator's
    /// pool keeps what the step freed, so this is the step's peak (what `nvidia-smi` shows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory_gib: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    pub first_loss: f64,
    pub final_loss: f64,
    pub trainable_params: usize,
    pub all_params: usize,
    pub dataset: DatasetStats,
    pub adapter_dir: PathBuf,
    pub metrics: Vec<StepMetrics>,
    pub eval_metrics: Vec<EvalMetrics>,
}

fn samples_file(out_dir: &std::path::Path) -> Result<std::fs::File> {
    let path = out_dir.join("samples.jsonl");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| KilnError::io(&path, e))
}

/// Steps a run makes: `max_steps`, or enough for `num_epochs` passes when each step takes
/// `gradient_accumulation_steps` micro-batches on each of `ranks` processes.
pub fn total_steps(recipe: &Recipe, micro_batches_per_epoch: usize, ranks: usize) -> usize {
    let t = &recipe.training;
    if t.max_steps > 0 {
        t.max_steps
    } else {
        (micro_batches_per_epoch * t.num_epochs).div_ceil(t.gradient_accumulation_steps * ranks)
    }
}

/// Loads the recipe's model with fresh LoRA adapters.
pub fn load_model(recipe: &Recipe) -> Result<LoadedModel> {
    load_model_on(recipe, crate::device::open(&recipe.model.device)?)
}

/// [`load_model`] on a device already opened (a rank of a distributed run opens its own GPU).
pub fn load_model_on(recipe: &Recipe, device: candle_core::Device) -> Result<LoadedModel> {
    let dtype = recipe.model.compute_dtype.on(&device);
    let dir = model::source::resolve_model_path(&recipe.model.path)?;
    // Before any weight loads: a recipe that cannot fit the device stops here.
    plan::check_fits(recipe, &device)?;
    if crate::gguf::is_gguf(&dir) && recipe.model.quantize == Quantize::Nf4 {
        eprintln!(
            "note: {} is held in NF4, a second quantization of its weights (SmolLM2-135M's Q4_1 GGUF: mean KL 0.24 nats from the file's own weights, against 0.0014 in bf16; BENCHMARKS.md); set model.quantize = \"none\" to train on the file's weights as they are, if memory allows",
            dir.display()
        );
    }
    let init = recipe
        .lora
        .init_adapter
        .as_deref()
        .map(crate::model::peft::read_adapter)
        .transpose()?;
    if let Some(a) = &init {
        let ours = crate::lora::LoraSettings::of(recipe);
        let mut theirs_targets = a.settings.target_modules.clone();
        let mut our_targets = ours.target_modules.clone();
        theirs_targets.sort();
        our_targets.sort();
        if a.settings.r != ours.r
            || theirs_targets != our_targets
            || a.settings.use_rslora != ours.use_rslora
        {
            return Err(KilnError::Recipe(format!(
                "lora.init_adapter {}: the adapter has r = {}, target_modules = {:?}, use_rslora = {}, but [lora] says r = {}, target_modules = {:?}, use_rslora = {}; make them equal",
                a.dir.display(), a.settings.r, theirs_targets, a.settings.use_rslora, ours.r, our_targets, ours.use_rslora
            )));
        }
    }
    let opts = LoadOptions {
        layers: recipe.model.layers,
        nf4_dequantized: false,
        device,
        dtype,
        quantize: recipe.model.quantize == Quantize::Nf4,
        lora: Some(crate::lora::LoraSettings::for_training(recipe)),
        seed: recipe.training.seed,
    };
    let mut loaded = if recipe.model.random_weights {
        model::load_random(&dir, &opts)?
    } else {
        model::load(&dir, &opts)?
    };
    let explicit_step =
        crate::step::StepPath::Auto.explicit(&loaded.model, recipe.data.max_seq_len);
    let (recomputed, why) = memory::recomputed_layers(recipe, &loaded.model, explicit_step)?;
    loaded.model.recomputed_layers = recomputed;
    if let Some(line) = why {
        eprintln!("{line}");
    }
    if recipe.training.gradient_checkpointing == crate::recipe::Checkpointing::Offload {
        let offloads = loaded.model.device.is_cuda() && explicit_step;
        loaded.model.offload_saved_inputs = offloads;
        if offloads {
            loaded.model.embeddings_to_host()?;
        }
        if !offloads {
            eprintln!("note: gradient_checkpointing = \"offload\" keeps layer inputs in host memory only on CUDA's fast training step; this run recomputes every layer with its inputs on the device");
        }
    }
    if loaded.model.device.is_cuda() {
        if let Some(what) = crate::step::unsupported(&loaded.model, recipe.data.max_seq_len) {
            eprintln!("note: the fast GPU training step does not cover {what} yet; this run takes the slower reference (autograd) path");
        }
    }
    if let Some(a) = &init {
        crate::model::peft::apply_adapter(&loaded.model, a)?;
        if recipe.training.method.is_preference() {
            loaded.model.freeze_reference()?;
        }
    }
    Ok(loaded)
}

fn progress_bar(total: usize, quiet: bool, unit: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:30.cyan/blue}} {{pos}}/{{len}} {unit}  {{msg}}  ETA {{eta}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Runs the recipe to the end and saves the adapter in `output.dir/adapter`. With `world` (a
/// launcher's variables: torchrun, srun, mpirun, `kiln train --gpus N`) this process is one rank
/// of a data-parallel run, and every rank runs this same loop.
pub fn train(
    recipe: &Recipe,
    quiet: bool,
    world: Option<&crate::distributed::World>,
) -> Result<TrainSummary> {
    let Some(world) = world else {
        let loaded = load_model(recipe)?;
        let inputs = TrainInputs::load(recipe, &loaded)?;
        return train_loaded(recipe, &loaded, &inputs, quiet);
    };
    let member = crate::distributed::Member::join(&recipe.model.device, world, quiet)?;
    let run = || {
        let loaded = load_model_on(recipe, member.device.clone())?;
        let inputs = TrainInputs::load(recipe, &loaded)?;
        train_loaded_with(recipe, &loaded, &inputs, quiet, member.comm.as_ref())
    };
    let result = run();
    member.finish(result)
}

/// A message above the progress bar (or on its own line when there is no bar).
fn log_line(bar: &ProgressBar, interactive: bool, quiet: bool, msg: &str) {
    if quiet {
        return;
    }
    if interactive {
        bar.println(msg);
    } else {
        eprintln!("{msg}");
    }
}

fn say(quiet: bool, msg: impl AsRef<str>) {
    if !quiet {
        eprintln!("{}", msg.as_ref());
    }
}

/// What a run trains and evaluates on.
pub struct TrainInputs {
    pub data: TrainData,
    pub val: Vec<Example>,
    /// KTO: which examples are desirable.
    pub labels: data::Labels,
    pub stats: DatasetStats,
    /// The chat template the data went through (sample prompts use it too).
    pub chat_template: Option<ChatTemplate>,
}

impl TrainInputs {
    pub fn load(recipe: &Recipe, loaded: &LoadedModel) -> Result<Self> {
        let (tok, seed) = (&loaded.tokenizer, recipe.training.seed);
        let pairs = recipe.training.method.is_preference();
        let truncation = recipe
            .preference
            .clone()
            .unwrap_or_default()
            .truncation_mode;
        let mut labels = data::Labels::default();
        let dataset = match recipe.training.method {
            crate::recipe::Method::Kto => {
                let micro = recipe.training.micro_batch_size;
                let (dataset, l) =
                    data::preference::load_unpaired(&recipe.data, truncation, micro, tok, seed)?;
                labels = l;
                dataset
            }
            _ if pairs => data::preference::load_pairs(&recipe.data, truncation, tok, seed)?,
            _ => data::load_dataset(&recipe.data, tok, seed)?,
        };
        // A preference micro-batch holds its pairs' sequences side by side, never packed.
        let packing = recipe.data.packing && !pairs;
        Ok(Self {
            data: TrainData::new(dataset.train, packing, recipe.data.max_seq_len),
            val: dataset.val,
            labels,
            stats: dataset.stats,
            chat_template: dataset.templating.template,
        })
    }
}

/// One line of metrics.jsonl for an evaluation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalMetrics {
    pub step: usize,
    pub eval_loss: f64,
    pub eval_perplexity: f64,
    pub eval_target_tokens: usize,
    /// A preference method's held-out metrics (`eval_rewards/accuracies`, ...).
    #[serde(flatten)]
    pub method: std::collections::BTreeMap<String, f64>,
}

/// Greedy generations from the recipe's sample prompts.
fn sample_generations(
    recipe: &Recipe,
    loaded: &LoadedModel,
    template: Option<&ChatTemplate>,
) -> Result<Vec<(String, String)>> {
    let tok = &loaded.tokenizer;
    let stops = crate::infer::generate::stop_tokens(tok, &loaded.model, &loaded.dir);
    let params = crate::infer::generate::SamplingParams {
        max_new_tokens: recipe.training.sample_max_new_tokens,
        ..Default::default()
    };
    let mut out = vec![];
    for prompt in &recipe.training.sample_prompts {
        let ids = match template {
            Some(t) => t
                .prompt_ids(
                    tok,
                    &[serde_json::json!({"role": "user", "content": prompt})],
                    None,
                )
                .map_err(|e| KilnError::Train(format!("sample prompt: {e}")))?,
            None => tok.encode(prompt, true)?,
        };
        let g = crate::infer::generate::generate(
            &loaded.model,
            tok,
            &ids,
            &params,
            &stops,
            &[],
            &mut |_| {},
        )?;
        out.push((prompt.clone(), g.text));
    }
    Ok(out)
}

/// Trains a loaded model as the only process of the run.
pub fn train_loaded(
    recipe: &Recipe,
    loaded: &LoadedModel,
    inputs: &TrainInputs,
    quiet: bool,
) -> Result<TrainSummary> {
    train_loaded_with(recipe, loaded, inputs, quiet, &crate::distributed::Alone)
}

/// Trains a loaded model as rank `comm.rank()` of `comm.size()`: each step's micro-batches are
/// `gradient_accumulation_steps × size` consecutive ones of the seeded order, this rank runs its
/// `gradient_accumulation_steps` of them, and the summed gradients update every rank alike.
/// Only rank 0 prints and writes (metrics, samples, checkpoints, the adapter).
pub fn train_loaded_with(
    recipe: &Recipe,
    loaded: &LoadedModel,
    inputs: &TrainInputs,
    quiet: bool,
    comm: &dyn crate::distributed::Collective,
) -> Result<TrainSummary> {
    let mut run = run::Run::setup(recipe, loaded, inputs, quiet, comm)?;
    let t = &recipe.training;
    let first = run.resume()?;
    if t.eval_on_start && first == 0 {
        run.evaluate(0)?;
    }
    for step in first..run.total {
        let done = step + 1;
        inject_faults(done);
        let Some(metrics) = run.step(step)? else {
            continue; // not finite: skipped, as training.on_nonfinite allows
        };
        run.record(metrics)?;
        // once in a while
        if run.due(t.eval_steps, done) {
            run.evaluate(done)?;
        }
        if run.checkpoint_due(done) {
            run.checkpoint(done)?;
        }
    }
    run.finish()
}

/// The faults `KILN_FAULT` asks for as step `done` begins: this process killed, or stalled (a
/// rank alive but stuck; the watchdog's collective timeout ends the run).
fn inject_faults(done: usize) {
    fault_kill("kill-step", done);
    if fault("stall-step", done) {
        std::thread::sleep(std::time::Duration::from_secs(120));
    }
}

/// Fault injection for the reliability tests: `KILN_FAULT` lists `point:step` items. `nan:5`
/// makes step 5's loss NaN; `kill-step:5` sends this process SIGKILL as step 5 begins;
/// `kill-save:4` does so halfway through writing checkpoint-4; `stall-step:5` sleeps two minutes
/// there. `kill-step:5@1` applies to rank 1 of a distributed run only.
fn fault(point: &str, step: usize) -> bool {
    let rank = std::env::var("RANK").unwrap_or_else(|_| "0".into());
    std::env::var("KILN_FAULT").is_ok_and(|spec| {
        spec.split(',').any(|item| {
            let (what, only) = match item.trim().split_once('@') {
                Some((w, r)) => (w, Some(r)),
                None => (item.trim(), None),
            };
            what == format!("{point}:{step}") && only.is_none_or(|r| r == rank)
        })
    })
}

/// SIGKILL to this process where `KILN_FAULT` asks for it (see [`fault`]).
fn fault_kill(point: &str, step: usize) {
    if fault(point, step) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &std::process::id().to_string()])
            .status();
        std::thread::sleep(std::time::Duration::from_secs(5));
    }
}
