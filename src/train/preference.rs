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
use crate::ops::preference::{PairLogps, PairLoss};
use crate::recipe::{Method, Recipe};
use crate::rng::KilnRng;

/// A preference method's loss and what it adds.
#[derive(Debug, Clone)]
pub struct Preference {
    pub loss: PairLoss,
    /// ORPO: the chosen completions' NLL is part of the loss.
    pub chosen_nll: bool,
    /// `precompute_ref_log_probs`: the reference's log-probability of every training sequence,
    /// computed once before the first step, so a step runs one model pass.
    pub reference: Option<std::sync::Arc<Vec<f64>>>,
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

/// A micro-batch's sums: the loss (in units of pairs: the step divides by its pairs) and the
/// [`METRICS`].
#[derive(Debug, Clone, Default)]
pub struct PairSums {
    pub loss: f64,
    pub values: [f64; METRICS.len()],
}

impl Preference {
    /// The recipe's method, when it is a preference method.
    pub fn of(recipe: &Recipe) -> Option<Self> {
        let p = recipe.preference.clone().unwrap_or_default();
        let loss = match recipe.training.method {
            Method::Sft => return None,
            Method::Dpo => PairLoss::Dpo {
                kind: p.loss_type,
                beta: p.beta,
                label_smoothing: p.label_smoothing,
            },
            Method::Simpo => PairLoss::Simpo {
                beta: p.beta,
                gamma: p.simpo_gamma,
                label_smoothing: p.label_smoothing,
            },
            Method::Orpo => PairLoss::Orpo { lambda: p.beta },
        };
        Some(Self {
            loss,
            chosen_nll: recipe.training.method == Method::Orpo,
            reference: None,
        })
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
        let (policy, tokens) = sequence_logps(model, batch, rows)?;
        let reference = if let (Some(cached), Some(seqs)) = (&self.reference, sequences) {
            seqs.iter().map(|&s| cached[s]).collect()
        } else if self.loss.needs_reference() {
            let hidden = model.as_reference(|| {
                model.forward_hidden_with(&batch.inputs, batch.layout.as_ref(), None)
            })?;
            sequence_logps(model, batch, &hidden.flatten_to(D::Minus2)?)?.0
        } else {
            vec![0.0; policy.len()]
        };
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

    /// One micro-batch on the reference path: the sums, and the gradient store of the step's
    /// loss share (`norm`) with respect to the LoRA parameters.
    pub fn micro_batch(
        &self,
        model: &Decoder,
        batch: &Batch,
        sequences: &[usize],
        norm: PairNorm,
        dropout_rng: &mut KilnRng,
    ) -> Result<(PairSums, candle_core::backprop::GradStore)> {
        if batch.layout.is_some() {
            return Err(KilnError::Recipe(
                "preference methods train on pairs one sequence a row: set data.packing = false"
                    .into(),
            ));
        }
        let hidden =
            model.forward_hidden_with(&batch.inputs, batch.layout.as_ref(), Some(dropout_rng))?;
        let rows = hidden.flatten_to(D::Minus2)?;
        let pairs = self.pair_logps(model, batch, Some(sequences), &rows.detach())?;
        let mut sums = PairSums::default();
        // Per sequence, the factor on its target weights: −∂(step loss)/∂s.
        let mut factor = vec![0f32; 2 * pairs.len()];
        for (k, p) in pairs.iter().enumerate() {
            let o = self.loss.pair(p);
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
        let (b, t) = batch.targets.dims2()?;
        let factor = Tensor::from_vec(factor, (b, 1), &model.device)?;
        let weights = batch.weights.to_dtype(DType::F32)?.broadcast_mul(&factor)?;
        let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
        let (_, d_rows) = crate::ops::lm_head_loss_and_grad(
            &rows.detach(),
            head,
            model.config.final_softcap,
            &batch.targets.reshape(b * t)?,
            &weights.reshape(b * t)?,
            1.0,
        )?;
        let store = (rows * d_rows)?.sum_all()?.backward()?;
        Ok((sums, store))
    }
}

/// Each sequence's summed log-probability of its target tokens and their count, from its rows
/// `[B·T, H]`.
fn sequence_logps(model: &Decoder, batch: &Batch, rows: &Tensor) -> Result<(Vec<f64>, Vec<usize>)> {
    let (b, t) = batch.targets.dims2()?;
    let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
    let logps = crate::ops::lm_head_target_logps(
        rows,
        head,
        model.config.final_softcap,
        &batch.targets.reshape(b * t)?,
    )?
    .to_vec1::<f32>()?;
    let weights = batch
        .weights
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut sums = vec![0.0; b];
    let mut counts = vec![0usize; b];
    for (i, (lp, w)) in logps.iter().zip(&weights).enumerate() {
        if *w != 0.0 {
            sums[i / t] += (*lp as f64) * (*w as f64);
            counts[i / t] += 1;
        }
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
) -> Result<(f64, Vec<(&'static str, f64)>)> {
    let pairs = data.sequences.len() / 2;
    let all: Vec<usize> = (0..2 * pairs).collect();
    let norm = PairNorm::of(data, std::slice::from_ref(&all));
    let mut sums = PairSums::default();
    for chunk in all.chunks(2 * micro_batch_pairs.max(1)) {
        let batch = data.batch(chunk, pad_id, &model.device)?;
        let hidden = model.forward_hidden_with(&batch.inputs, None, None)?;
        for p in pref.pair_logps(model, &batch, None, &hidden.flatten_to(D::Minus2)?.detach())? {
            let o = pref.loss.pair(&p);
            sums.loss += o.loss;
            if pref.chosen_nll {
                sums.loss -= p.chosen * norm.pairs as f64 / norm.chosen_tokens as f64;
            }
            sums.values[2] += (o.reward_chosen > o.reward_rejected) as u8 as f64;
            sums.values[3] += o.reward_chosen - o.reward_rejected;
            sums.values[4] += (p.chosen > p.rejected) as u8 as f64;
        }
    }
    let n = norm.pairs as f64;
    Ok((
        sums.loss / n,
        vec![
            ("eval_rewards/accuracies", sums.values[2] / n),
            ("eval_rewards/margins", sums.values[3] / n),
            // The policy's own preference: the chosen completion the likelier (whatever the
            // reference), which the base model already has before training.
            ("eval_logps/accuracies", sums.values[4] / n),
        ],
    ))
}

/// The reference's log-probability of every sequence of `data` (chosen and rejected of each
/// pair), `micro_batch_pairs` pairs a pass: what `precompute_ref_log_probs` stores. Kept in
/// `dir/reference_logps.json` beside the run, for the data it was computed on (a resumed run
/// reads it back).
pub fn reference_logps(
    model: &Decoder,
    data: &TrainData,
    micro_batch_pairs: usize,
    pad_id: u32,
    dir: &std::path::Path,
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
        let hidden = model.as_reference(|| model.forward_hidden_with(&batch.inputs, None, None))?;
        logps.extend(sequence_logps(model, &batch, &hidden.flatten_to(D::Minus2)?)?.0);
        bar.inc((chunk.len() / 2) as u64);
    }
    bar.finish_and_clear();
    let json = serde_json::json!({"data": fingerprint, "logps": logps});
    crate::io::write_atomic(&path, json.to_string().as_bytes())?;
    Ok(logps)
}
