//! Supervised fine-tuning: one readable loop. Each optimizer step runs
//! `gradient_accumulation_steps` micro-batches; the step's loss is the sum of their token losses
//! divided by the step's target-token count (DESIGN.md decision 4), so any split of the same
//! examples into micro-batches gives the same update.

pub mod checkpoint;
pub mod distill;
pub mod distill_cache;
mod gradients;
pub mod memory;
pub mod optim;
pub mod plan;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::data::{self, BatchStream, ChatTemplate, DatasetStats, Example, TrainData};
use crate::error::{KilnError, Result};
use crate::export::peft::save_adapter;
use crate::model::{self, LoadOptions, LoadedModel};
use crate::recipe::{Quantize, Recipe};
use crate::rng::KilnRng;
use optim::{clip_factor, grad_norm, lr_multiplier, AdamW};

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
    /// With `[distill]`: the divergence from the teacher (per target token, at the
    /// temperature; KL or Jensen–Shannon as `distill.loss` says) and the cross-entropy on the
    /// data, the two parts `loss` weighs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ce: Option<f64>,
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
    let dtype = crate::device::compute_dtype(recipe.model.compute_dtype, &device);
    let dir = model::tiny::resolve_model_path(&recipe.model.path)?;
    // Before any weight loads: a recipe that cannot fit the device stops here.
    plan::check_fits(recipe, &device)?;
    if crate::gguf::load::is_gguf(&dir) && recipe.model.quantize == Quantize::Nf4 {
        eprintln!(
            "note: {} is held in NF4, a second quantization of its weights (SmolLM2-135M's Q4_1 GGUF: mean KL 0.24 nats from the file's own weights, against 0.0014 in bf16; BENCHMARKS.md); set model.quantize = \"none\" to train on the file's weights as they are, if memory allows",
            dir.display()
        );
    }
    let init = recipe
        .lora
        .init_adapter
        .as_deref()
        .map(crate::export::peft::read_adapter)
        .transpose()?;
    if let Some(a) = &init {
        let ours = recipe.lora_settings();
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
        lora: Some(recipe.lora_settings()),
        seed: recipe.training.seed,
    };
    let mut loaded = if recipe.model.random_weights {
        model::load_random(&dir, &opts)?
    } else {
        model::load(&dir, &opts)?
    };
    let explicit_step =
        crate::step::StepPath::Auto.explicit(&loaded.model, recipe.data.max_seq_len);
    let (recomputed, why) = memory::checkpointed_layers(recipe, &loaded.model, explicit_step)?;
    loaded.model.checkpointed_layers = recomputed;
    if let Some(line) = why {
        eprintln!("{line}");
    }
    if recipe.training.gradient_checkpointing == crate::recipe::Checkpointing::Offload {
        let offloads = loaded.model.device.is_cuda() && explicit_step;
        loaded.model.offload_checkpoints = offloads;
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
        crate::export::peft::apply_adapter(&loaded.model, a)?;
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

/// Runs the recipe to the end and saves the adapter in `output.dir/adapter`. Under a launcher's
/// variables (torchrun, srun, mpirun, `kiln train --gpus N`) this process is one rank of a
/// data-parallel run ([`crate::dist`]).
pub fn train(recipe: &Recipe, quiet: bool) -> Result<TrainSummary> {
    if let Some(world) = crate::dist::World::from_env()? {
        return crate::dist::train_rank(recipe, quiet, &world);
    }
    let loaded = load_model(recipe)?;
    let inputs = TrainInputs::load(recipe, &loaded)?;
    train_loaded(recipe, &loaded, &inputs, quiet)
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
    pub stats: DatasetStats,
    /// The chat template the data went through (sample prompts use it too).
    pub chat_template: Option<ChatTemplate>,
}

impl TrainInputs {
    pub fn load(recipe: &Recipe, loaded: &LoadedModel) -> Result<Self> {
        let dataset = data::load_dataset(&recipe.data, &loaded.tokenizer, recipe.training.seed)?;
        Ok(Self {
            data: TrainData::new(dataset.train, recipe.data.packing, recipe.data.max_seq_len),
            val: dataset.val,
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
    train_loaded_with(recipe, loaded, inputs, quiet, &crate::dist::Alone)
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
    comm: &dyn crate::dist::Collective,
) -> Result<TrainSummary> {
    let train_data = &inputs.data;
    let stats = inputs.stats.clone();
    let t = &recipe.training;
    let model = &loaded.model;
    let out_dir = &recipe.output.dir;
    let (rank, ranks) = (comm.rank(), comm.size());
    if model.device.is_cpu() {
        crate::device::reuse_freed_host_memory();
    }
    let lead = rank == 0;
    let quiet = quiet || !lead;
    if lead {
        std::fs::create_dir_all(out_dir).map_err(|e| KilnError::io(out_dir, e))?;
        crate::io::write_atomic(
            &out_dir.join("recipe.toml"),
            toml::to_string(recipe).unwrap_or_default().as_bytes(),
        )?;
    }
    crate::dist::check_same_data(comm, train_data)?;
    let teacher = distill::Teacher::load(recipe, loaded, train_data)?;
    if let (Some(d), Some(_)) = (&recipe.distill, &teacher) {
        say(
            quiet,
            format!(
                "distilling from {}: loss = {} · {}² · {} + {} · cross-entropy",
                d.teacher.as_deref().unwrap_or("the cache"),
                d.alpha,
                d.temperature,
                d.loss.name(),
                1.0 - d.alpha
            ),
        );
    }

    let (trainable, all) = model.param_counts();
    say(quiet, model::trainable_params_line(trainable, all));
    say(
        quiet,
        format!(
            "data: {} examples ({} rows, {} skipped, {} truncated, {} dropped, {} held out), {} tokens, {} target tokens, longest {}",
            stats.examples, stats.rows, stats.skipped, stats.truncated, stats.dropped, stats.val_examples, stats.tokens, stats.target_tokens, stats.longest
        ),
    );
    if train_data.packed {
        say(
            quiet,
            format!(
                "packing: {} examples into {} sequences of up to {} tokens",
                train_data.examples.len(),
                train_data.sequences.len(),
                recipe.data.max_seq_len
            ),
        );
    }

    let params = model.lora_vars();
    let mut optimizer = AdamW::new(
        &params,
        t.adam_beta1,
        t.adam_beta2,
        t.adam_epsilon,
        t.weight_decay,
    )?;
    let mut stream = BatchStream::new(
        train_data.sequences.len(),
        t.micro_batch_size,
        t.seed,
        recipe.data.shuffle,
    );
    let total = total_steps(recipe, stream.micro_batches_per_epoch(), ranks);
    let accum = t.gradient_accumulation_steps;
    if ranks > 1 {
        say(
            quiet,
            format!(
                "batch: {} sequences x {accum} micro-batches x {ranks} ranks = {} sequences a step",
                t.micro_batch_size,
                t.micro_batch_size * accum * ranks
            ),
        );
    }
    let mut dropout_rng = KilnRng::fork(t.seed, 2);

    // Resuming: the newest complete checkpoint, checked against this recipe and base.
    let base_dir = model::tiny::resolve_model_path(&recipe.model.path)?;
    let recipe_hash = checkpoint::recipe_hash(recipe, ranks);
    let base_identity = checkpoint::base_identity(&base_dir)?;
    let resumed = if t.resume {
        checkpoint::remove_partial(out_dir);
        match checkpoint::latest(out_dir) {
            Some((_, dir)) => {
                let r = checkpoint::read(&dir, params.len(), &model.device)?;
                let mismatch = [
                    (r.state.recipe_hash != recipe_hash, "the recipe"),
                    (r.state.base_identity != base_identity, "the base model"),
                ];
                if let Some((_, what)) = mismatch.iter().find(|(m, _)| *m) {
                    if !t.force_resume {
                        return Err(KilnError::Train(format!(
                            "{}: {what} differs from the one this checkpoint was trained with; resume with the same recipe and base (on another number of GPUs, keep micro_batch_size x gradient_accumulation_steps x GPUs the same), or pass --force-resume",
                            dir.display()
                        )));
                    }
                    say(quiet, format!("warning: {what} differs from the checkpoint's; resuming anyway (--force-resume)"));
                }
                let adapter = crate::export::peft::read_adapter(&dir)?;
                crate::export::peft::apply_adapter(model, &adapter)?;
                say(
                    quiet,
                    format!("resuming from {} (step {})", dir.display(), r.state.step),
                );
                Some(r)
            }
            None => {
                say(
                    quiet,
                    format!(
                        "no checkpoint to resume in {}; starting from the beginning",
                        out_dir.display()
                    ),
                );
                None
            }
        }
    } else {
        None
    };
    let start_step = resumed.as_ref().map_or(0, |r| r.state.step);
    if let Some(r) = &resumed {
        optimizer.step = r.state.optimizer_step;
        optimizer.first_moments = r.first_moments.clone();
        optimizer.second_moments = r.second_moments.clone();
        optimizer.own_moments()?;
        stream.restore(r.state.cursor);
        dropout_rng = r.state.dropout_rng.clone();
    }
    // Every rank begins from rank 0's adapter.
    crate::dist::broadcast_vars(comm, &params)?;

    let metrics_path = out_dir.join("metrics.jsonl");
    // A resumed run keeps the metrics of the steps before its checkpoint.
    let kept_metrics: String = if resumed.is_some() {
        std::fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= start_step)
            })
            .map(|l| format!("{l}\n"))
            .collect()
    } else {
        String::new()
    };
    let mut metrics_file = if lead {
        let mut f =
            std::fs::File::create(&metrics_path).map_err(|e| KilnError::io(&metrics_path, e))?;
        f.write_all(kept_metrics.as_bytes())
            .map_err(|e| KilnError::io(&metrics_path, e))?;
        Some(f)
    } else {
        None
    };
    let mut write_metrics = |line: String| -> Result<()> {
        match metrics_file.as_mut() {
            Some(f) => writeln!(f, "{line}").map_err(|e| KilnError::io(&metrics_path, e)),
            None => Ok(()),
        }
    };
    if resumed.is_none() && lead {
        let _ = std::fs::remove_file(out_dir.join("samples.jsonl"));
    }
    let bar = progress_bar(total, quiet, "steps");
    let interactive = !quiet && !bar.is_hidden();
    let start = Instant::now();
    let mut metrics = vec![];
    let mut tokens_seen = 0usize;
    let base_name = recipe.model.path.clone();
    let settings = recipe.lora_settings();
    let mut best_eval: Option<f64> = resumed.as_ref().and_then(|r| r.state.best_eval);
    let mut eval_metrics = vec![];

    let mut nonfinite_in_a_row = 0usize;
    let mut last_checkpoint: Option<std::path::PathBuf> = resumed.as_ref().map(|r| r.dir.clone());
    if start_step > 0 {
        bar.inc(start_step as u64);
    }
    for step in start_step..total {
        fault_kill("kill-step", step + 1);
        if fault("stall-step", step + 1) {
            // A rank alive but stuck (the watchdog's collective timeout ends the run).
            std::thread::sleep(std::time::Duration::from_secs(120));
        }
        let _capture = crate::profile::capture_step(step + 1, &model.device);
        let step_start = Instant::now();
        // The step's micro-batches (every rank's) are drawn first: the loss is normalised by
        // all their targets. Each has its own dropout seed, whichever rank runs it.
        let batches: Vec<Vec<usize>> = (0..accum * ranks).map(|_| stream.next_indices()).collect();
        let seeds: Vec<u64> = batches.iter().map(|_| dropout_rng.next_seed()).collect();
        let mine = rank * accum..(rank + 1) * accum;
        let share = StepShare {
            micro_batches: &batches[mine.clone()],
            dropout_seeds: &seeds[mine],
            step_targets: step_targets(train_data, &batches),
            teacher: teacher.as_ref(),
        };
        let step_grads = accumulate_share(
            model,
            train_data,
            &share,
            loaded.tokenizer.pad_id,
            &params,
            crate::step::StepPath::Auto,
        )?;
        let p = (ranks > 1).then(|| crate::profile::scope("all-reduce", &model.device));
        let mut sums = vec![step_grads.loss_sum];
        if let Some((d, c)) = step_grads.distill_sums {
            sums.extend([d, c]);
        }
        let (grads, sums) = crate::dist::sum_step(comm, step_grads.grads, sums)?;
        let loss_sum = sums[0];
        drop(p);
        let step_tokens: usize = batches
            .iter()
            .flatten()
            .map(|&s| train_data.num_tokens(s))
            .sum();
        let step_targets = step_grads.target_tokens;
        let mut loss = loss_sum / step_targets as f64;
        if fault("nan", step + 1) {
            loss = f64::NAN;
        }
        let optimizer_start = Instant::now();
        let grad_norm = grad_norm(&grads)?;
        let lr = t.learning_rate * lr_multiplier(t.lr_scheduler, step, t.warmup_steps, total);
        if !loss.is_finite() || !grad_norm.is_finite() {
            nonfinite_in_a_row += 1;
            let what = format!(
                "step {}: loss {loss}, gradient norm {grad_norm}; last good checkpoint: {}",
                step + 1,
                last_checkpoint
                    .as_ref()
                    .map(|p: &std::path::PathBuf| p.display().to_string())
                    .unwrap_or_else(|| "none yet (set training.save_steps)".into())
            );
            let give_up = t.on_nonfinite == crate::recipe::OnNonFinite::Stop
                || nonfinite_in_a_row > t.max_nonfinite_steps;
            if give_up {
                return Err(KilnError::Train(format!(
                    "{what}; stopped ({nonfinite_in_a_row} such step(s) in a row). Lower training.learning_rate or check the data; resume from the checkpoint"
                )));
            }
            log_line(
                &bar,
                interactive,
                quiet,
                &format!("warning: {what}; the step is skipped ({nonfinite_in_a_row} in a row, stopping after {})", t.max_nonfinite_steps),
            );
            bar.inc(1);
            continue;
        }
        nonfinite_in_a_row = 0;
        optimizer.update(&params, &grads, lr, clip_factor(grad_norm, t.max_grad_norm))?;
        crate::profile::host_report(&[("optimizer", optimizer_start.elapsed())]);

        tokens_seen += step_tokens;
        let elapsed = start.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            target_tokens: step_targets,
            tokens: step_tokens,
            tokens_per_s: step_tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9),
            epoch: stream.epoch_progress(),
            elapsed_s: elapsed,
            kl: sums.get(1).map(|d| d / step_targets as f64),
            ce: sums.get(2).map(|c| c / step_targets as f64),
        };
        let overall_tps = tokens_seen as f64 / elapsed.max(1e-9);
        bar.set_message(format!(
            "loss {loss:.4}  lr {lr:.2e}  {overall_tps:.0} tok/s"
        ));
        bar.inc(1);
        if (step + 1) % t.logging_steps == 0 || step + 1 == total {
            write_metrics(serde_json::to_string(&m).expect("metrics serialize"))?;
            if !interactive && !quiet {
                let parts = match (m.kl, m.ce) {
                    (Some(kl), Some(ce)) => format!("  (kl {kl:.4}  ce {ce:.4})"),
                    _ => String::new(),
                };
                eprintln!("step {}/{total}  loss {loss:.4}{parts}  lr {lr:.3e}  grad_norm {grad_norm:.3}  {overall_tps:.0} tok/s", step + 1);
            }
        }
        metrics.push(m);
        if lead && t.eval_steps > 0 && ((step + 1) % t.eval_steps == 0 || step + 1 == total) {
            let report = crate::infer::eval::eval_loss(
                model,
                &inputs.val,
                loaded.tokenizer.pad_id,
                t.micro_batch_size,
                None,
                &|_| {},
            )?;
            let em = EvalMetrics {
                step: step + 1,
                eval_loss: report.mean_loss,
                eval_perplexity: report.perplexity,
                eval_target_tokens: report.target_tokens,
            };
            write_metrics(serde_json::to_string(&em).expect("metrics serialize"))?;
            let improved = best_eval.is_none_or(|b| em.eval_loss < b);
            let mut note = format!(
                "eval at step {}: loss {:.4}, perplexity {:.2}",
                step + 1,
                em.eval_loss,
                em.eval_perplexity
            );
            if improved {
                best_eval = Some(em.eval_loss);
                if t.save_best {
                    save_adapter(&out_dir.join("best"), model, &settings, &base_name)?;
                    note.push_str(" (best so far, saved to best/)");
                }
            }
            log_line(&bar, interactive, quiet, &note);
            eval_metrics.push(em);
            for (prompt, text) in sample_generations(recipe, loaded, inputs.chat_template.as_ref())?
            {
                let line = serde_json::json!({"step": step + 1, "prompt": prompt, "text": text});
                writeln!(samples_file(out_dir)?, "{line}")
                    .map_err(|e| KilnError::io(out_dir.join("samples.jsonl"), e))?;
                log_line(
                    &bar,
                    interactive,
                    quiet,
                    &format!("sample › {prompt}\n{text}\n"),
                );
            }
        }
        if t.save_steps > 0 && (step + 1) % t.save_steps == 0 && step + 1 < total {
            // Every rank takes part in the check; rank 0 writes.
            if let Some(hash) = crate::dist::check_same_adapter(comm, &params, step + 1)? {
                log_line(
                    &bar,
                    interactive,
                    quiet,
                    &format!(
                        "checkpoint-{}: adapter {hash:016x}, the same on all {ranks} ranks",
                        step + 1
                    ),
                );
            }
        }
        if lead && t.save_steps > 0 && (step + 1) % t.save_steps == 0 && step + 1 < total {
            let dir = out_dir.join(format!("checkpoint-{}", step + 1));
            let state = checkpoint::TrainerState {
                step: step + 1,
                optimizer_step: optimizer.step,
                cursor: stream.cursor,
                dropout_rng: dropout_rng.clone(),
                best_eval,
                recipe_hash: recipe_hash.clone(),
                base_identity: base_identity.clone(),
            };
            crate::export::peft::save_adapter_with(&dir, model, &settings, &base_name, |tmp| {
                fault_kill("kill-save", step + 1);
                checkpoint::write_state(
                    tmp,
                    &state,
                    &optimizer.first_moments,
                    &optimizer.second_moments,
                )
            })?;
            last_checkpoint = Some(dir);
            checkpoint::prune(out_dir, t.save_total_limit)?;
        }
    }
    bar.finish_and_clear();
    let adapter_dir = out_dir.join("adapter");
    // The ranks agree on the final adapter before rank 0 writes it (and a dead peer is noticed).
    crate::dist::check_same_adapter(comm, &params, total)?;
    if lead {
        save_adapter(&adapter_dir, model, &settings, &base_name)?;
    }
    let first_loss = metrics.first().map(|m| m.loss).unwrap_or(f64::NAN);
    let final_loss = metrics.last().map(|m| m.loss).unwrap_or(f64::NAN);
    say(
        quiet,
        format!(
            "done: {total} steps in {:.1}s, loss {first_loss:.4} -> {final_loss:.4}; adapter saved to {}",
            start.elapsed().as_secs_f64(),
            adapter_dir.display()
        ),
    );
    Ok(TrainSummary {
        steps: total,
        first_loss,
        final_loss,
        trainable_params: trainable,
        all_params: all,
        dataset: stats,
        adapter_dir,
        metrics,
        eval_metrics,
    })
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
