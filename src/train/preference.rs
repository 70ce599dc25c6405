//! The preference objective: a micro-batch of pairs (sequences `2k` chosen and `2k + 1` rejected)
//! → each pair's loss (`ops::preference`) → the gradient, which reaches the model as a weighted
//! cross-entropy's: a pair's loss depends on the policy only through its completions' summed
//! log-probabilities `s`, and `∂ℓ/∂z = Σ_s (∂ℓ/∂s) · ∂s/∂z`, where `∂s/∂z` is minus the
//! cross-entropy gradient of the completion's tokens. So each sequence's target weights are scaled
//! by `−∂ℓ/∂s` and the output head's fused loss-and-gradient does the rest, a chunk of rows at a
//! time, as for supervised fine-tuning.
//!
//! DPO's reference is the same model with its adapters switched off
//! ([`Decoder::as_reference`]; a refined adapter's reference is its start, frozen): no second base in memory. A step's loss is the mean over its
//! pairs (ORPO adds the NLL of the chosen completions, per chosen token), as TRL's is for a step of
//! one micro-batch.

use candle_core::{DType, Tensor, D};

use crate::data::batch::Batch;
use crate::data::TrainData;
use crate::error::{KilnError, Result};
use crate::model::Decoder;
use crate::ops::distill::LossSums;
use crate::ops::preference::{Kto, PairLogps, PairLoss};
use crate::recipe::{Method, Recipe};
use crate::rng::KilnRng;

/// What a preference step compares: pairs (sequences `2k` chosen and `2k + 1` rejected), or KTO's
/// unpaired examples (sequence `2k` the example, `2k + 1` its KL sequence: the same prompt with
/// another example's completion).
#[derive(Debug, Clone, Copy)]
pub enum Loss {
    Pairs(PairLoss),
    Kto(Kto),
}

impl Loss {
    /// Whether the loss compares with a reference model (DPO, KTO).
    pub fn needs_reference(&self) -> bool {
        match self {
            Loss::Pairs(l) => l.needs_reference(),
            Loss::Kto(_) => true,
        }
    }

    /// The metrics a step logs (TRL's names), from [`PairSums::values`].
    pub fn metric_names(&self) -> &'static [&'static str] {
        match self {
            Loss::Pairs(_) => &METRICS,
            Loss::Kto(_) => &KTO_METRICS,
        }
    }
}

/// KTO's metrics (TRL's names): the KL estimate, and the rewards and log-probabilities of the
/// desirable (`chosen`) and undesirable (`rejected`) examples, means over each kind.
pub const KTO_METRICS: [&str; 6] = [
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

/// A preference method's loss and what it adds.
#[derive(Debug, Clone)]
pub struct Preference {
    pub loss: Loss,
    /// ORPO: the chosen completions' NLL is part of the loss.
    pub chosen_nll: bool,
    /// `precompute_ref_log_probs`: the reference's log-probability of every training sequence,
    /// computed once before the first step, so a step runs one model pass.
    pub reference: Option<std::sync::Arc<Vec<f64>>>,
    /// KTO: whether each training example (sequence `2k` is example `k`) is desirable.
    pub labels: std::sync::Arc<Vec<bool>>,
}

/// The metrics a preference step logs, in the order [`PairSums::values`] holds them: TRL's
/// names. Each is a sum over pairs; the step divides by its pairs.
pub const METRICS: [&str; 7] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
];

/// How a step normalises: its pairs, and (ORPO) its chosen completions' tokens.
#[derive(Debug, Clone, Copy)]
pub struct PairNorm {
    pub pairs: usize,
    pub chosen_tokens: usize,
}

impl PairNorm {
    /// The norm of a step's micro-batches of `data`.
    pub fn of(data: &TrainData, micro_batches: &[Vec<usize>]) -> Self {
        let seqs = micro_batches.iter().flatten();
        Self {
            pairs: (micro_batches.iter().map(Vec::len).sum::<usize>() / 2).max(1),
            chosen_tokens: seqs
                .filter(|&&s| s % 2 == 0)
                .map(|&s| data.num_targets(s))
                .sum::<usize>()
                .max(1),
        }
    }
}

/// A micro-batch's sums: the loss (in units of pairs or examples: the step divides by their
/// number) and what the metrics are made of ([`Preference::metrics`]).
#[derive(Debug, Clone, Default)]
pub struct PairSums {
    pub loss: f64,
    pub values: Vec<f64>,
}

impl Preference {
    /// The recipe's method, when it is a preference method.
    pub fn of(recipe: &Recipe) -> Option<Self> {
        let p = recipe.preference.clone().unwrap_or_default();
        let loss = match recipe.training.method {
            Method::Sft => return None,
            Method::Dpo => Loss::Pairs(PairLoss::Dpo {
                kind: p.loss_type,
                beta: p.beta,
                label_smoothing: p.label_smoothing,
            }),
            Method::Simpo => Loss::Pairs(PairLoss::Simpo {
                beta: p.beta,
                gamma: p.simpo_gamma,
                label_smoothing: p.label_smoothing,
            }),
            Method::Orpo => Loss::Pairs(PairLoss::Orpo { lambda: p.beta }),
            Method::Kto => Loss::Kto(Kto {
                beta: p.beta,
                desirable_weight: p.desirable_weight,
                undesirable_weight: p.undesirable_weight,
            }),
        };
        Some(Self {
            loss,
            chosen_nll: recipe.training.method == Method::Orpo,
            reference: None,
            labels: Default::default(),
        })
    }

    /// The recipe's method for a run over `inputs`: the labels (KTO), and with
    /// `precompute_ref_log_probs` the reference's log-probabilities, computed once (or read back).
    pub fn for_run(
        recipe: &Recipe,
        loaded: &crate::model::LoadedModel,
        inputs: &super::TrainInputs,
        lead: bool,
        quiet: bool,
    ) -> Result<Option<Self>> {
        let Some(mut pref) = Self::of(recipe) else {
            return Ok(None);
        };
        pref.labels = std::sync::Arc::new(inputs.labels.train.clone());
        let precompute = recipe
            .preference
            .as_ref()
            .is_some_and(|p| p.precompute_ref_log_probs);
        if precompute && pref.loss.needs_reference() {
            let logps = reference_logps(
                &loaded.model,
                &inputs.data,
                recipe.training.micro_batch_size,
                loaded.tokenizer.pad_id,
                &recipe.output.dir,
                lead,
                quiet,
            )?;
            pref.reference = Some(std::sync::Arc::new(logps));
        }
        Ok(Some(pref))
    }

    /// The step's metrics from the sums of its micro-batches (and ranks) over `items` pairs or
    /// examples.
    pub fn metrics(&self, values: &[f64], items: usize) -> Vec<(String, f64)> {
        let n = items.max(1) as f64;
        let names = self.loss.metric_names();
        match self.loss {
            Loss::Pairs(_) => names
                .iter()
                .zip(values)
                .map(|(k, v)| (k.to_string(), v / n))
                .collect(),
            Loss::Kto(_) => {
                let mean = |sum: f64, count: f64| if count > 0.0 { sum / count } else { 0.0 };
                let (chosen, rejected) = (mean(values[1], values[2]), mean(values[3], values[4]));
                [
                    values[0] / n,
                    chosen,
                    rejected,
                    chosen - rejected,
                    mean(values[5], values[2]),
                    mean(values[6], values[4]),
                ]
                .into_iter()
                .zip(names)
                .map(|(v, k)| (k.to_string(), v))
                .collect()
            }
        }
    }

    /// The method's sums over `pairs` (of the micro-batch `sequences`) and each sequence's factor
    /// `−∂(step loss)/∂s`.
    fn terms(
        &self,
        pairs: &[PairLogps],
        sequences: &[usize],
        norm: PairNorm,
    ) -> (PairSums, Vec<f32>) {
        match self.loss {
            Loss::Pairs(loss) => self.pair_terms(loss, pairs, norm),
            Loss::Kto(kto) => self.kto_terms(kto, pairs, sequences, norm),
        }
    }

    /// The pairs' losses: the sums and each sequence's factor `−∂(step loss)/∂s`.
    fn pair_terms(
        &self,
        loss: PairLoss,
        pairs: &[PairLogps],
        norm: PairNorm,
    ) -> (PairSums, Vec<f32>) {
        let mut sums = PairSums {
            loss: 0.0,
            values: vec![0.0; METRICS.len()],
        };
        let mut factor = vec![0f32; 2 * pairs.len()];
        for (k, p) in pairs.iter().enumerate() {
            let o = loss.pair(p);
            sums.loss += o.loss;
            factor[2 * k] = (-o.d_chosen / norm.pairs as f64) as f32;
            factor[2 * k + 1] = (-o.d_rejected / norm.pairs as f64) as f32;
            if self.chosen_nll {
                // NLL = −Σ chosen logps / chosen tokens, in units of pairs.
                sums.loss -= p.chosen * norm.pairs as f64 / norm.chosen_tokens as f64;
                sums.values[6] -= p.chosen * norm.pairs as f64 / norm.chosen_tokens as f64;
                factor[2 * k] += 1.0 / norm.chosen_tokens as f32;
            }
            let v = &mut sums.values;
            v[0] += o.reward_chosen;
            v[1] += o.reward_rejected;
            v[2] += (o.reward_chosen > o.reward_rejected) as u8 as f64;
            v[3] += o.reward_chosen - o.reward_rejected;
            v[4] += o.logp_chosen;
            v[5] += o.logp_rejected;
        }
        (sums, factor)
    }

    /// KTO's examples (`pairs[k]`: the example as `chosen`, its KL sequence as `rejected`): the
    /// batch's KL estimate (mean over its examples of policy − reference on the KL sequences, at
    /// least 0, no gradient), each example's loss, and the factors (none on KL sequences).
    fn kto_terms(
        &self,
        kto: Kto,
        pairs: &[PairLogps],
        sequences: &[usize],
        norm: PairNorm,
    ) -> (PairSums, Vec<f32>) {
        let n = pairs.len().max(1) as f64;
        let kl = (pairs
            .iter()
            .map(|p| p.rejected - p.ref_rejected)
            .sum::<f64>()
            / n)
            .max(0.0);
        let mut sums = PairSums {
            loss: 0.0,
            values: vec![0.0; 7],
        };
        sums.values[0] = kl * pairs.len() as f64;
        let mut factor = vec![0f32; 2 * pairs.len()];
        for (k, p) in pairs.iter().enumerate() {
            let desirable = self.labels[sequences[2 * k] / 2];
            let (loss, d, reward) = kto.example(p.chosen, p.ref_chosen, kl, desirable);
            sums.loss += loss;
            factor[2 * k] = (-d / norm.pairs as f64) as f32;
            let (r, count, logp) = if desirable { (1, 2, 5) } else { (3, 4, 6) };
            sums.values[r] += reward;
            sums.values[count] += 1.0;
            sums.values[logp] += p.chosen;
        }
        (sums, factor)
    }

    /// Each pair's log-probabilities: the policy's from `rows` `[B·T, H]`, the reference's from a
    /// pass with the adapters off (DPO only).
    fn pair_logps(
        &self,
        model: &Decoder,
        batch: &Batch,
        sequences: Option<&[usize]>,
        rows: &Tensor,
    ) -> Result<Vec<PairLogps>> {
        let reference = self.reference_of(model, batch, sequences)?;
        pair_logps_of(model, &Completions::of(batch)?, rows, &reference)
    }

    /// The reference's log-probability of each sequence of `batch`: stored
    /// (`precompute_ref_log_probs`), computed with the adapters off (no variable takes part, so
    /// no autograd graph is kept), or zeros for methods without a reference.
    fn reference_of(
        &self,
        model: &Decoder,
        batch: &Batch,
        sequences: Option<&[usize]>,
    ) -> Result<Vec<f64>> {
        if let (Some(cached), Some(seqs)) = (&self.reference, sequences) {
            return Ok(seqs.iter().map(|&s| cached[s]).collect());
        }
        if !self.loss.needs_reference() {
            return Ok(vec![0.0; batch.targets.dim(0)?]);
        }
        let hidden = reference_hidden(model, batch)?;
        Ok(sequence_logps(model, batch, &hidden.flatten_to(D::Minus2)?)?.0)
    }

    /// One micro-batch: the sums, and the LoRA gradients of the step's loss share (`norm`): in
    /// `explicit` (the fused step's gradients, its casts) when given, else in the returned
    /// store (the reference autograd path). Both paths share the objective: the final hidden
    /// rows → the pairs' losses → the rows' gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn micro_batch(
        &self,
        model: &Decoder,
        batch: &Batch,
        sequences: &[usize],
        norm: PairNorm,
        dropout_rng: &mut KilnRng,
        explicit: Option<(&mut crate::step::LoraGrads, &crate::step::LoraCasts)>,
    ) -> Result<(PairSums, Option<candle_core::backprop::GradStore>)> {
        if batch.layout.is_some() {
            return Err(KilnError::Recipe(
                "preference methods train on pairs one sequence a row: set data.packing = false"
                    .into(),
            ));
        }
        // The reference first: its pass is done before the policy's activations are held.
        let reference = self.reference_of(model, batch, Some(sequences))?;
        let sums = std::cell::RefCell::new(PairSums::default());
        let completions = Completions::of(batch)?;
        let objective = |rows: &Tensor| -> Result<(LossSums, Tensor)> {
            let pairs = pair_logps_of(model, &completions, rows, &reference)?;
            let (s, d_rows) =
                self.rows_gradient(model, &completions, rows, &pairs, sequences, norm)?;
            let loss = Tensor::new(s.loss as f32, &model.device)?;
            *sums.borrow_mut() = s;
            Ok((LossSums { loss, parts: None }, d_rows))
        };
        let store = match explicit {
            Some((grads, casts)) => {
                crate::step::micro_batch(
                    model,
                    batch,
                    1.0,
                    dropout_rng,
                    grads,
                    casts,
                    None,
                    Some(&objective),
                )?;
                None
            }
            None => {
                let hidden = model.forward_hidden_with(&batch.inputs, None, Some(dropout_rng))?;
                let rows = hidden.flatten_to(D::Minus2)?;
                let (_, d_rows) = objective(&rows.detach())?;
                Some((rows * d_rows)?.sum_all()?.backward()?)
            }
        };
        Ok((sums.into_inner(), store))
    }

    /// The pairs' (or examples') sums and the gradient of the step's loss share with respect to
    /// the rows: each sequence's target weights times `−∂ℓ/∂s`, through the head's fused
    /// cross-entropy gradient.
    fn rows_gradient(
        &self,
        model: &Decoder,
        completions: &Completions,
        rows: &Tensor,
        pairs: &[PairLogps],
        sequences: &[usize],
        norm: PairNorm,
    ) -> Result<(PairSums, Tensor)> {
        let (sums, factor) = self.terms(pairs, sequences, norm);
        if completions.weights.is_empty() {
            return Ok((sums, rows.zeros_like()?));
        }
        let weights: Vec<f32> = completions
            .weights
            .iter()
            .zip(&completions.sequence)
            .map(|(w, &s)| w * factor[s])
            .collect();
        let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
        let (_, d_completions) = crate::ops::lm_head_loss_and_grad(
            &completions.rows(rows)?,
            head,
            model.config.final_softcap,
            &completions.targets,
            &Tensor::new(weights.as_slice(), rows.device())?,
            1.0,
        )?;
        let d_rows = rows
            .zeros_like()?
            .index_add(&completions.index, &d_completions, 0)?;
        Ok((sums, d_rows))
    }
}

/// Each pair's log-probabilities: the policy's from `rows` `[B·T, H]`, the reference's given.
fn pair_logps_of(
    model: &Decoder,
    completions: &Completions,
    rows: &Tensor,
    reference: &[f64],
) -> Result<Vec<PairLogps>> {
    let (policy, tokens) = sequence_logps_of(model, completions, rows)?;
    Ok((0..policy.len() / 2)
        .map(|k| PairLogps {
            chosen: policy[2 * k],
            rejected: policy[2 * k + 1],
            ref_chosen: reference[2 * k],
            ref_rejected: reference[2 * k + 1],
            chosen_tokens: tokens[2 * k],
            rejected_tokens: tokens[2 * k + 1],
        })
        .collect())
}

/// The reference's final hidden states over `batch`: the adapters switched off, through the
/// explicit step's layer code where it covers the model (the fused kernels, nothing kept for a
/// backward), else the decoder's own forward. A frozen adapter as the reference (a refined
/// adapter's start) takes the decoder's forward, which applies it.
fn reference_hidden(model: &Decoder, batch: &Batch) -> Result<Tensor> {
    let (_, t) = batch.inputs.dims2()?;
    let explicit = crate::step::StepPath::Auto.explicit(model, t) && model.reference_is_base();
    model.as_reference(|| {
        if explicit {
            crate::step::forward_hidden(model, batch)
        } else {
            model.forward_hidden_with(&batch.inputs, batch.layout.as_ref(), None)
        }
    })
}

/// The rows of a micro-batch that carry a loss (its completions' tokens): only they go through
/// the output head, whose cost is the vocabulary's width a row. A pair's prompt rows (often most
/// of it) reach the loss only through the attention of the rows after them.
struct Completions {
    /// Their indices among the batch's `B·T` rows, on the device.
    index: Tensor,
    targets: Tensor,
    /// Their target weights, and the sequence (batch row) of each.
    weights: Vec<f32>,
    sequence: Vec<usize>,
    sequences: usize,
}

impl Completions {
    fn of(batch: &Batch) -> Result<Self> {
        let (b, t) = batch.targets.dims2()?;
        let all = batch
            .weights
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let kept: Vec<u32> = (0..(b * t) as u32)
            .filter(|&i| all[i as usize] != 0.0)
            .collect();
        let index = Tensor::new(kept.as_slice(), batch.targets.device())?;
        Ok(Self {
            targets: batch.targets.reshape(b * t)?.index_select(&index, 0)?,
            weights: kept.iter().map(|&i| all[i as usize]).collect(),
            sequence: kept.iter().map(|&i| i as usize / t).collect(),
            index,
            sequences: b,
        })
    }

    /// The completion rows of `rows` `[B·T, H]`.
    fn rows(&self, rows: &Tensor) -> Result<Tensor> {
        Ok(rows.index_select(&self.index, 0)?)
    }
}

/// Each sequence's summed log-probability of its target tokens and their count, from its rows
/// `[B·T, H]`.
fn sequence_logps(model: &Decoder, batch: &Batch, rows: &Tensor) -> Result<(Vec<f64>, Vec<usize>)> {
    sequence_logps_of(model, &Completions::of(batch)?, rows)
}

fn sequence_logps_of(
    model: &Decoder,
    completions: &Completions,
    rows: &Tensor,
) -> Result<(Vec<f64>, Vec<usize>)> {
    let mut sums = vec![0.0; completions.sequences];
    let mut counts = vec![0usize; completions.sequences];
    if completions.weights.is_empty() {
        return Ok((sums, counts));
    }
    let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
    let logps = crate::ops::lm_head_target_logps(
        &completions.rows(rows)?,
        head,
        model.config.final_softcap,
        &completions.targets,
    )?
    .to_vec1::<f32>()?;
    for ((lp, w), &s) in logps
        .iter()
        .zip(&completions.weights)
        .zip(&completions.sequence)
    {
        sums[s] += (*lp as f64) * (*w as f64);
        counts[s] += 1;
    }
    Ok((sums, counts))
}

/// The held-out pairs' loss and metrics, as the step computes them without the gradient.
pub fn evaluate(
    pref: &Preference,
    model: &Decoder,
    data: &TrainData,
    micro_batch_pairs: usize,
    pad_id: u32,
    labels: &[bool],
) -> Result<(f64, Vec<(String, f64)>)> {
    let pref = &Preference {
        labels: std::sync::Arc::new(labels.to_vec()),
        reference: None,
        ..pref.clone()
    };
    let pairs = data.sequences.len() / 2;
    let all: Vec<usize> = (0..2 * pairs).collect();
    let norm = PairNorm::of(data, std::slice::from_ref(&all));
    let mut sums = PairSums::default();
    // Pairs in which the policy itself finds the chosen completion the likelier (whatever the
    // reference): a preference the base model may already have before training.
    let mut likelier = 0.0;
    for chunk in all.chunks(2 * micro_batch_pairs.max(1)) {
        let batch = data.batch(chunk, pad_id, &model.device)?;
        let hidden = model.forward_hidden_with(&batch.inputs, None, None)?;
        let pairs =
            pref.pair_logps(model, &batch, None, &hidden.flatten_to(D::Minus2)?.detach())?;
        let (s, _) = pref.terms(&pairs, chunk, norm);
        sums.loss += s.loss;
        sums.values.resize(s.values.len(), 0.0);
        sums.values
            .iter_mut()
            .zip(&s.values)
            .for_each(|(a, v)| *a += v);
        likelier += pairs.iter().filter(|p| p.chosen > p.rejected).count() as f64;
    }
    let mut metrics: Vec<(String, f64)> = pref
        .metrics(&sums.values, norm.pairs)
        .into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v))
        .collect();
    if let Loss::Pairs(_) = pref.loss {
        metrics.push(("eval_logps/accuracies".into(), likelier / norm.pairs as f64));
    }
    Ok((sums.loss / norm.pairs as f64, metrics))
}

/// The reference's log-probability of every sequence of `data` (chosen and rejected of each
/// pair), `micro_batch_pairs` pairs a pass: what `precompute_ref_log_probs` stores. Kept in
/// `dir/reference_logps.json` beside the run (written by the rank that writes, `lead`), for the
/// data it was computed on (a resumed run reads it back).
pub fn reference_logps(
    model: &Decoder,
    data: &TrainData,
    micro_batch_pairs: usize,
    pad_id: u32,
    dir: &std::path::Path,
    lead: bool,
    quiet: bool,
) -> Result<Vec<f64>> {
    let path = dir.join("reference_logps.json");
    let fingerprint = format!("{:016x}", data.fingerprint());
    if let Ok(saved) = crate::io::read_json(&path) {
        if saved["data"].as_str() == Some(fingerprint.as_str()) {
            if let Some(values) = saved["logps"].as_array() {
                let logps: Vec<f64> = values.iter().filter_map(|v| v.as_f64()).collect();
                if logps.len() == data.sequences.len() {
                    return Ok(logps);
                }
            }
        }
    }
    let all: Vec<usize> = (0..data.sequences.len()).collect();
    let bar = crate::progress::bar(all.len() / 2, "pairs (reference log-probabilities)", quiet);
    let mut logps = Vec::with_capacity(all.len());
    for chunk in all.chunks(2 * micro_batch_pairs.max(1)) {
        let batch = data.batch(chunk, pad_id, &model.device)?;
        let hidden = reference_hidden(model, &batch)?;
        logps.extend(sequence_logps(model, &batch, &hidden.flatten_to(D::Minus2)?)?.0);
        bar.inc((chunk.len() / 2) as u64);
    }
    bar.finish_and_clear();
    if lead {
        let json = serde_json::json!({"data": fingerprint, "logps": logps});
        crate::io::write_atomic(&path, json.to_string().as_bytes())?;
    }
    Ok(logps)
}
