//! One training run's state and the pieces of its loop: setup, resume, one optimizer step,
//! logging, evaluation, checkpoints and the finish. `super::train_loaded_with` is the loop.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Var;
use indicatif::ProgressBar;

use super::optim::{clip_factor, grad_norm, lr_multiplier, AdamW};
use super::{
    accumulate_share, sample_generations, step_targets, total_steps, EvalMetrics, StepMetrics,
    StepShare, TrainInputs, TrainSummary,
};
use super::{checkpoint, distill, fault, fault_kill, log_line, samples_file, say};
use crate::data::{BatchStream, TrainData};
use crate::distributed::Collective;
use crate::error::{KilnError, Result};
use crate::lora::LoraSettings;
use crate::model::peft::save_adapter;
use crate::model::{self, LoadedModel};
use crate::recipe::Recipe;
use crate::report::tensorboard::{self, EventWriter};
use crate::rng::KilnRng;

/// Where a run writes its metrics and shows its progress (rank 0 alone writes).
struct RunLog {
    bar: ProgressBar,
    interactive: bool,
    quiet: bool,
    metrics_path: PathBuf,
    metrics_file: Option<std::fs::File>,
    /// The same lines as TensorBoard scalars (the lead rank, `logging.tensorboard`).
    tensorboard: Option<EventWriter>,
}

impl RunLog {
    fn line(&self, msg: &str) {
        log_line(&self.bar, self.interactive, self.quiet, msg);
    }

    fn metrics(&mut self, line: impl serde::Serialize) -> Result<()> {
        let value = serde_json::to_value(&line).expect("metrics serialize");
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.metrics(&value, tensorboard::now())?;
        }
        match self.metrics_file.as_mut() {
            Some(f) => writeln!(f, "{value}").map_err(|e| KilnError::io(&self.metrics_path, e)),
            None => Ok(()),
        }
    }

    /// A text for TensorBoard's text tab (the recipe, a sample generation).
    fn text(&mut self, step: usize, tag: &str, text: &str) -> Result<()> {
        match self.tensorboard.as_mut() {
            Some(tb) => tb.text(step as u64, tag, text, tensorboard::now()),
            None => Ok(()),
        }
    }
}

/// A training run: the model and data it trains, the optimizer and data order, what it has
/// logged, and what a checkpoint must record.
pub(super) struct Run<'a> {
    recipe: &'a Recipe,
    loaded: &'a LoadedModel,
    inputs: &'a TrainInputs,
    comm: &'a dyn Collective,
    lead: bool,
    quiet: bool,
    params: Vec<Var>,
    optimizer: AdamW,
    stream: BatchStream,
    dropout_rng: KilnRng,
    teacher: Option<distill::Teacher>,
    /// A preference method: the stream draws pairs, each two sequences.
    preference: Option<super::preference::Preference>,
    pub total: usize,
    settings: LoraSettings,
    recipe_hash: String,
    base_identity: String,
    log: Option<RunLog>,
    start: Instant,
    tokens_seen: usize,
    nonfinite_in_a_row: usize,
    best_eval: Option<f64>,
    last_checkpoint: Option<PathBuf>,
    metrics: Vec<StepMetrics>,
    eval_metrics: Vec<EvalMetrics>,
}

impl<'a> Run<'a> {
    /// The output folder, the teacher, the optimizer and the data order of a new run.
    pub fn setup(
        recipe: &'a Recipe,
        loaded: &'a LoadedModel,
        inputs: &'a TrainInputs,
        quiet: bool,
        comm: &'a dyn Collective,
    ) -> Result<Self> {
        let (t, model, out_dir) = (&recipe.training, &loaded.model, &recipe.output.dir);
        if model.device.is_cpu() {
            crate::device::reuse_freed_host_memory();
        }
        let lead = comm.rank() == 0;
        let quiet = quiet || !lead;
        if lead {
            std::fs::create_dir_all(out_dir).map_err(|e| KilnError::io(out_dir, e))?;
            crate::io::write_atomic(
                &out_dir.join("recipe.toml"),
                toml::to_string(recipe).unwrap_or_default().as_bytes(),
            )?;
        }
        crate::distributed::check_same_data(comm, &inputs.data)?;
        let teacher = distill::Teacher::load(recipe, loaded, &inputs.data)?;
        announce(
            recipe,
            loaded,
            inputs,
            teacher.is_some(),
            comm.size(),
            quiet,
        );
        let params = model.lora_vars();
        let optimizer = AdamW::new(
            &params,
            t.adam_beta1,
            t.adam_beta2,
            t.adam_epsilon,
            t.weight_decay,
        )?;
        let preference =
            super::preference::Preference::for_run(recipe, loaded, inputs, lead, quiet)?;
        let items = match preference {
            Some(_) => inputs.data.sequences.len() / 2,
            None => inputs.data.sequences.len(),
        };
        let stream = BatchStream::new(items, t.micro_batch_size, t.seed, recipe.data.shuffle);
        let total = total_steps(recipe, stream.micro_batches_per_epoch(), comm.size());
        let base_dir = model::source::resolve_model_path(&recipe.model.path)?;
        Ok(Self {
            recipe,
            loaded,
            inputs,
            comm,
            lead,
            quiet,
            params,
            optimizer,
            stream,
            dropout_rng: KilnRng::fork(t.seed, 2),
            teacher,
            preference,
            total,
            settings: crate::lora::LoraSettings::of(recipe),
            recipe_hash: checkpoint::recipe_hash(recipe, comm.size()),
            base_identity: checkpoint::base_identity(&base_dir)?,
            log: None,
            start: Instant::now(),
            tokens_seen: 0,
            nonfinite_in_a_row: 0,
            best_eval: None,
            last_checkpoint: None,
            metrics: vec![],
            eval_metrics: vec![],
        })
    }

    /// With `training.resume`, continues from the newest complete checkpoint (checked against
    /// this recipe and base); opens the metrics and the progress bar. Returns the first step.
    pub fn resume(&mut self) -> Result<usize> {
        let out_dir = &self.recipe.output.dir;
        let resumed = if self.recipe.training.resume {
            self.read_checkpoint()?
        } else {
            None
        };
        let start_step = resumed.as_ref().map_or(0, |r| r.state.step);
        if let Some(r) = &resumed {
            self.optimizer.step = r.state.optimizer_step;
            self.optimizer.first_moments = r.first_moments.clone();
            self.optimizer.second_moments = r.second_moments.clone();
            self.optimizer.own_moments()?;
            self.stream.restore(r.state.cursor);
            self.dropout_rng = r.state.dropout_rng.clone();
            self.best_eval = r.state.best_eval;
            self.last_checkpoint = Some(r.dir.clone());
        }
        // Every rank begins from rank 0's adapter.
        crate::distributed::broadcast_vars(self.comm, &self.params)?;
        let metrics_path = out_dir.join("metrics.jsonl");
        let metrics_file = if self.lead {
            // A resumed run keeps the metrics of the steps before its checkpoint.
            let kept = match resumed {
                Some(_) => metrics_up_to(&metrics_path, start_step),
                None => {
                    let _ = std::fs::remove_file(out_dir.join("samples.jsonl"));
                    String::new()
                }
            };
            let mut f = std::fs::File::create(&metrics_path)
                .map_err(|e| KilnError::io(&metrics_path, e))?;
            f.write_all(kept.as_bytes())
                .map_err(|e| KilnError::io(&metrics_path, e))?;
            Some(f)
        } else {
            None
        };
        if self.lead {
            crate::profile::write_to(&out_dir.join("profile.txt"));
        }
        let tensorboard = match self.lead && self.recipe.logging.tensorboard {
            true => Some(self.open_tensorboard(&metrics_path)?),
            false => None,
        };
        let bar = super::progress_bar(self.total, self.quiet, "steps");
        bar.inc(start_step as u64);
        self.log = Some(RunLog {
            interactive: !self.quiet && !bar.is_hidden(),
            bar,
            quiet: self.quiet,
            metrics_path,
            metrics_file,
            tensorboard,
        });
        self.start = Instant::now();
        Ok(start_step)
    }

    /// `OUTPUT_DIR/tensorboard/`'s event file, begun with the recipe and the metrics a resumed
    /// run keeps (`metrics_path` as rewritten), so its curves go on without the steps it dropped.
    fn open_tensorboard(&self, metrics_path: &std::path::Path) -> Result<EventWriter> {
        let dir = self.recipe.output.dir.join("tensorboard");
        let mut tb = EventWriter::create(&dir, tensorboard::now())?;
        let recipe = toml::to_string(self.recipe).unwrap_or_default();
        tb.text(
            0,
            "recipe",
            &format!("```toml\n{recipe}```"),
            tensorboard::now(),
        )?;
        let kept = std::fs::read_to_string(metrics_path).unwrap_or_default();
        for line in kept.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                tb.metrics(&v, tensorboard::now())?;
            }
        }
        Ok(tb)
    }

    fn read_checkpoint(&self) -> Result<Option<checkpoint::Resumed>> {
        let (out_dir, quiet) = (&self.recipe.output.dir, self.quiet);
        checkpoint::remove_partial(out_dir);
        let Some((_, dir)) = checkpoint::latest(out_dir) else {
            say(
                quiet,
                format!(
                    "no checkpoint to resume in {}; starting from the beginning",
                    out_dir.display()
                ),
            );
            return Ok(None);
        };
        let model = &self.loaded.model;
        let r = checkpoint::read(&dir, self.params.len(), &model.device)?;
        let mismatch = [
            (r.state.recipe_hash != self.recipe_hash, "the recipe"),
            (
                r.state.base_identity != self.base_identity,
                "the base model",
            ),
        ];
        if let Some((_, what)) = mismatch.iter().find(|(m, _)| *m) {
            if !self.recipe.training.force_resume {
                return Err(KilnError::Train(format!(
                    "{}: {what} differs from the one this checkpoint was trained with; resume with the same recipe and base (on another number of GPUs, keep micro_batch_size x gradient_accumulation_steps x GPUs the same), or pass --force-resume",
                    dir.display()
                )));
            }
            say(quiet, format!("warning: {what} differs from the checkpoint's; resuming anyway (--force-resume)"));
        }
        let adapter = crate::model::peft::read_adapter(&dir)?;
        crate::model::peft::apply_adapter(model, &adapter)?;
        say(
            quiet,
            format!("resuming from {} (step {})", dir.display(), r.state.step),
        );
        Ok(Some(r))
    }

    fn log(&self) -> &RunLog {
        self.log.as_ref().expect("resume() opens the log")
    }

    /// Optimizer step `step` (0-based): this rank's micro-batches, the gradients summed over
    /// the ranks, the update. A step whose loss or gradient is not finite is skipped (or stops
    /// the run, as `training.on_nonfinite` says): `None`.
    pub fn step(&mut self, step: usize) -> Result<Option<StepMetrics>> {
        let t = &self.recipe.training;
        let (model, data) = (&self.loaded.model, &self.inputs.data);
        let (rank, ranks, accum) = (
            self.comm.rank(),
            self.comm.size(),
            t.gradient_accumulation_steps,
        );
        let _capture = crate::profile::capture_step(step + 1, &model.device);
        let step_start = Instant::now();
        // The step's micro-batches (every rank's) are drawn first: the loss is normalised by
        // all their targets. Each has its own dropout seed, whichever rank runs it.
        let batches: Vec<Vec<usize>> = (0..accum * ranks)
            .map(|_| self.stream.next_indices())
            .map(|items| match self.preference {
                // Pair k is sequences 2k (chosen) and 2k + 1 (rejected).
                Some(_) => items.iter().flat_map(|&k| [2 * k, 2 * k + 1]).collect(),
                None => items,
            })
            .collect();
        let pair_norm = self
            .preference
            .as_ref()
            .map(|_| super::preference::PairNorm::of(data, &batches));
        let seeds: Vec<u64> = batches
            .iter()
            .map(|_| self.dropout_rng.next_seed())
            .collect();
        let mine = rank * accum..(rank + 1) * accum;
        let share = StepShare {
            micro_batches: &batches[mine.clone()],
            dropout_seeds: &seeds[mine],
            step_targets: step_targets(data, &batches),
            teacher: self.teacher.as_ref(),
            preference: self.preference.as_ref().zip(pair_norm),
        };
        let pad = self.loaded.tokenizer.pad_id;
        let step_grads = accumulate_share(
            model,
            data,
            &share,
            pad,
            &self.params,
            crate::step::StepPath::Auto,
        )?;
        let p = (ranks > 1).then(|| crate::profile::scope("all-reduce", &model.device));
        let mut sums = vec![step_grads.loss_sum];
        if let Some((d, c)) = step_grads.distill_sums {
            sums.extend([d, c]);
        }
        let pair_metrics = step_grads.pair_sums.as_ref().map_or(0, Vec::len);
        sums.extend(step_grads.pair_sums.iter().flatten());
        let (grads, sums) = crate::distributed::sum_step(self.comm, step_grads.grads, sums)?;
        drop(p);
        let step_tokens: usize = batches.iter().flatten().map(|&s| data.num_tokens(s)).sum();
        let targets = step_grads.target_tokens;
        // The loss is per target token, or with a preference method per pair.
        let per = pair_norm.map_or(targets, |n| n.pairs);
        let mut loss = sums[0] / per as f64;
        let method = match &self.preference {
            Some(pref) => pref
                .metrics(&sums[sums.len() - pair_metrics..], per)
                .into_iter()
                .collect(),
            None => Default::default(),
        };
        if fault("nan", step + 1) {
            loss = f64::NAN;
        }
        let optimizer_start = Instant::now();
        let grad_norm = grad_norm(&grads)?;
        let lr = t.learning_rate * lr_multiplier(t.lr_scheduler, step, t.warmup_steps, self.total);
        if !loss.is_finite() || !grad_norm.is_finite() {
            self.skip_nonfinite(step, loss, grad_norm)?;
            return Ok(None);
        }
        self.nonfinite_in_a_row = 0;
        let clip = clip_factor(grad_norm, t.max_grad_norm);
        self.optimizer.update(&self.params, &grads, lr, clip)?;
        crate::profile::host_report(&[("optimizer", optimizer_start.elapsed())]);
        self.tokens_seen += step_tokens;
        Ok(Some(StepMetrics {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            target_tokens: targets,
            tokens: step_tokens,
            tokens_per_s: step_tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9),
            epoch: self.stream.epoch_progress(),
            elapsed_s: self.start.elapsed().as_secs_f64(),
            method,
            kl: step_grads.distill_sums.map(|_| sums[1] / targets as f64),
            ce: step_grads.distill_sums.map(|_| sums[2] / targets as f64),
            gpu_memory_gib: crate::cuda::memory_in_use(&self.loaded.model.device)
                .map(|b| b as f64 / (1u64 << 30) as f64),
        }))
    }

    /// `training.on_nonfinite`: a warning and the step skipped, or the run stopped.
    fn skip_nonfinite(&mut self, step: usize, loss: f64, grad_norm: f64) -> Result<()> {
        let t = &self.recipe.training;
        self.nonfinite_in_a_row += 1;
        let n = self.nonfinite_in_a_row;
        let what = format!(
            "step {}: loss {loss}, gradient norm {grad_norm}; last good checkpoint: {}",
            step + 1,
            self.last_checkpoint
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none yet (set training.save_steps)".into())
        );
        if t.on_nonfinite == crate::recipe::OnNonFinite::Stop || n > t.max_nonfinite_steps {
            return Err(KilnError::Train(format!(
                "{what}; stopped ({n} such step(s) in a row). Lower training.learning_rate or check the data; resume from the checkpoint"
            )));
        }
        let log = self.log();
        log.line(&format!(
            "warning: {what}; the step is skipped ({n} in a row, stopping after {})",
            t.max_nonfinite_steps
        ));
        log.bar.inc(1);
        Ok(())
    }

    /// Shows a finished step and writes it to metrics.jsonl every `logging_steps`.
    pub fn record(&mut self, m: StepMetrics) -> Result<()> {
        let (total, t) = (self.total, &self.recipe.training);
        let overall_tps = self.tokens_seen as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let log = self.log.as_mut().expect("resume() opens the log");
        let accuracy = match m.method.get("rewards/accuracies") {
            Some(a) => format!("  acc {a:.2}"),
            None => String::new(),
        };
        log.bar.set_message(format!(
            "loss {:.4}{accuracy}  lr {:.2e}  {overall_tps:.0} tok/s",
            m.loss, m.lr
        ));
        log.bar.inc(1);
        if m.step.is_multiple_of(t.logging_steps) || m.step == total {
            log.metrics(&m)?;
            if !log.interactive && !log.quiet {
                let parts = match (m.kl, m.ce) {
                    (Some(kl), Some(ce)) => format!("  (kl {kl:.4}  ce {ce:.4})"),
                    _ => accuracy,
                };
                eprintln!(
                    "step {}/{total}  loss {:.4}{parts}  lr {:.3e}  grad_norm {:.3}  {overall_tps:.0} tok/s",
                    m.step, m.loss, m.lr, m.grad_norm
                );
            }
        }
        self.metrics.push(m);
        Ok(())
    }

    /// Whether something done every `every` steps is due after step `done` (and at the end).
    pub fn due(&self, every: usize, done: usize) -> bool {
        every > 0 && (done.is_multiple_of(every) || done == self.total)
    }

    /// Whether a checkpoint is due after step `done` (never at the end: the adapter is saved).
    pub fn checkpoint_due(&self, done: usize) -> bool {
        let every = self.recipe.training.save_steps;
        every > 0 && done.is_multiple_of(every) && done < self.total
    }

    /// The held-out loss after step `done`, the best adapter kept, and the sample generations.
    pub fn evaluate(&mut self, done: usize) -> Result<()> {
        if !self.lead {
            return Ok(());
        }
        let (t, model) = (&self.recipe.training, &self.loaded.model);
        let pad = self.loaded.tokenizer.pad_id;
        let em = match &self.preference {
            Some(pref) => {
                let val = TrainData::new(self.inputs.val.clone(), false, usize::MAX);
                let labels = &self.inputs.labels.val;
                let (loss, metrics) = super::preference::evaluate(
                    pref,
                    model,
                    &val,
                    t.micro_batch_size,
                    pad,
                    labels,
                )?;
                EvalMetrics {
                    step: done,
                    eval_loss: loss,
                    eval_perplexity: loss.exp(),
                    eval_target_tokens: self.inputs.val.iter().map(|e| e.num_targets()).sum(),
                    method: metrics.into_iter().collect(),
                }
            }
            None => {
                let bar =
                    crate::progress::bar(self.inputs.val.len(), "examples evaluated", self.quiet);
                let report = crate::infer::eval::eval_loss(
                    model,
                    &self.inputs.val,
                    pad,
                    t.micro_batch_size,
                    None,
                    &|n| bar.inc(n as u64),
                )?;
                bar.finish_and_clear();
                EvalMetrics {
                    step: done,
                    eval_loss: report.mean_loss,
                    eval_perplexity: report.perplexity,
                    eval_target_tokens: report.target_tokens,
                    method: Default::default(),
                }
            }
        };
        self.log.as_mut().expect("log").metrics(&em)?;
        let mut note = match em.method.get("eval_rewards/accuracies") {
            Some(acc) => format!(
                "eval at step {done}: loss {:.4}, preference accuracy {:.3}",
                em.eval_loss, acc
            ),
            None => format!(
                "eval at step {done}: loss {:.4}, perplexity {:.2}",
                em.eval_loss, em.eval_perplexity
            ),
        };
        if self.best_eval.is_none_or(|b| em.eval_loss < b) {
            self.best_eval = Some(em.eval_loss);
            if t.save_best {
                let dir = self.recipe.output.dir.join("best");
                save_adapter(&dir, model, &self.settings, &self.recipe.model.path)?;
                note.push_str(" (best so far, saved to best/)");
            }
        }
        self.log().line(&note);
        self.eval_metrics.push(em);
        self.write_samples(done)
    }

    fn write_samples(&mut self, done: usize) -> Result<()> {
        let out_dir = &self.recipe.output.dir;
        let template = self.inputs.chat_template.as_ref();
        for (prompt, text) in sample_generations(self.recipe, self.loaded, template)? {
            let line = serde_json::json!({"step": done, "prompt": prompt, "text": text});
            writeln!(samples_file(out_dir)?, "{line}")
                .map_err(|e| KilnError::io(out_dir.join("samples.jsonl"), e))?;
            let shown = format!("**{prompt}**\n\n{text}");
            self.log
                .as_mut()
                .expect("log")
                .text(done, "samples", &shown)?;
            self.log().line(&format!("sample › {prompt}\n{text}\n"));
        }
        Ok(())
    }

    /// `checkpoint-DONE`: the adapter, the optimizer's moments and where the run stands, once
    /// every rank has shown it holds the same adapter.
    pub fn checkpoint(&mut self, done: usize) -> Result<()> {
        let ranks = self.comm.size();
        // Every rank takes part in the check; rank 0 writes.
        if let Some(hash) = crate::distributed::check_same_adapter(self.comm, &self.params, done)? {
            self.log().line(&format!(
                "checkpoint-{done}: adapter {hash:016x}, the same on all {ranks} ranks"
            ));
        }
        if !self.lead {
            return Ok(());
        }
        let out_dir = &self.recipe.output.dir;
        let dir = out_dir.join(format!("checkpoint-{done}"));
        let state = checkpoint::TrainerState {
            step: done,
            optimizer_step: self.optimizer.step,
            cursor: self.stream.cursor,
            dropout_rng: self.dropout_rng.clone(),
            best_eval: self.best_eval,
            recipe_hash: self.recipe_hash.clone(),
            base_identity: self.base_identity.clone(),
        };
        let (model, base) = (&self.loaded.model, &self.recipe.model.path);
        let optimizer = &self.optimizer;
        crate::model::peft::save_adapter_with(&dir, model, &self.settings, base, |tmp| {
            fault_kill("kill-save", done);
            checkpoint::write_state(
                tmp,
                &state,
                &optimizer.first_moments,
                &optimizer.second_moments,
            )
        })?;
        self.last_checkpoint = Some(dir);
        checkpoint::prune(out_dir, self.recipe.training.save_total_limit)
    }

    /// The final adapter (once the ranks agree on it) and the run's summary.
    pub fn finish(self) -> Result<TrainSummary> {
        self.log().bar.finish_and_clear();
        let adapter_dir = self.recipe.output.dir.join("adapter");
        // The ranks agree on the final adapter before rank 0 writes it (and a dead peer is noticed).
        crate::distributed::check_same_adapter(self.comm, &self.params, self.total)?;
        let model = &self.loaded.model;
        let mut report = String::new();
        if self.lead {
            save_adapter(&adapter_dir, model, &self.settings, &self.recipe.model.path)?;
            let out = &self.recipe.output.dir;
            crate::report::html::write_report(std::slice::from_ref(out), &out.join("report.html"))?;
            report = format!("\nreport: {}", out.join("report.html").display());
            if self.recipe.logging.tensorboard {
                report += &format!(
                    " (and `tensorboard --logdir {}`)",
                    out.join("tensorboard").display()
                );
            }
        }
        let first_loss = self.metrics.first().map_or(f64::NAN, |m| m.loss);
        let final_loss = self.metrics.last().map_or(f64::NAN, |m| m.loss);
        say(
            self.quiet,
            format!(
                "done: {} steps in {:.1}s, loss {first_loss:.4} -> {final_loss:.4}; adapter saved to {}{report}",
                self.total,
                self.start.elapsed().as_secs_f64(),
                adapter_dir.display()
            ),
        );
        let (trainable, all) = model.param_counts();
        Ok(TrainSummary {
            steps: self.total,
            first_loss,
            final_loss,
            trainable_params: trainable,
            all_params: all,
            dataset: self.inputs.stats.clone(),
            adapter_dir,
            metrics: self.metrics,
            eval_metrics: self.eval_metrics,
        })
    }
}

/// What a run is about to do: the teacher, the trainable share, the data, packing and the
/// global batch.
fn announce(
    recipe: &Recipe,
    loaded: &LoadedModel,
    inputs: &TrainInputs,
    distilling: bool,
    ranks: usize,
    quiet: bool,
) {
    let (t, stats, data) = (&recipe.training, &inputs.stats, &inputs.data);
    if let (Some(d), true) = (&recipe.distill, distilling) {
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
    let (trainable, all) = loaded.model.param_counts();
    say(quiet, model::trainable_params_line(trainable, all));
    say(
        quiet,
        format!(
            "data: {} examples ({} rows, {} skipped, {} truncated, {} dropped, {} held out), {} tokens, {} target tokens, longest {}",
            stats.examples, stats.rows, stats.skipped, stats.truncated, stats.dropped, stats.val_examples, stats.tokens, stats.target_tokens, stats.longest
        ),
    );
    if data.packed {
        say(
            quiet,
            format!(
                "packing: {} examples into {} sequences of up to {} tokens",
                data.examples.len(),
                data.sequences.len(),
                recipe.data.max_seq_len
            ),
        );
    }
    if ranks > 1 {
        let accum = t.gradient_accumulation_steps;
        say(
            quiet,
            format!(
                "batch: {} sequences x {accum} micro-batches x {ranks} ranks = {} sequences a step",
                t.micro_batch_size,
                t.micro_batch_size * accum * ranks
            ),
        );
    }
}

/// The lines of metrics.jsonl up to step `last`, as a resumed run keeps them.
fn metrics_up_to(path: &std::path::Path, last: usize) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= last)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}
