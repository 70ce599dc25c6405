//! The gradients of one optimizer step: a rank's micro-batches forward and backward, each loss
//! divided by the whole step's target count (ARCHITECTURE.md, decision 4), the LoRA gradients summed.

use candle_core::{Tensor, Var};

use crate::data::TrainData;
use crate::error::Result;
use crate::model;
use crate::rng::KilnRng;

/// The gradients of one optimizer step.
pub struct StepGradients {
    /// One per parameter, already divided by the step's target-token count.
    pub grads: Vec<Tensor>,
    /// Sum of the token losses over all micro-batches.
    pub loss_sum: f64,
    pub target_tokens: usize,
    pub tokens: usize,
    /// With distillation: the sums of the divergence and of the cross-entropy over the targets.
    pub distill_sums: Option<(f64, f64)>,
    /// With a preference method: the sums its metrics are made of
    /// (`train::preference::Preference::metrics`).
    pub pair_sums: Option<Vec<f64>>,
}

/// One rank's part of an optimizer step: its micro-batches (lists of sequence indices), a
/// dropout seed for each, and the target count of the whole step (every rank's micro-batches),
/// which each micro-batch's loss is divided by.
pub struct StepShare<'a> {
    pub micro_batches: &'a [Vec<usize>],
    pub dropout_seeds: &'a [u64],
    pub step_targets: usize,
    /// `[distill]`'s teacher: the loss becomes distillation.
    pub teacher: Option<&'a super::distill::Teacher>,
    /// A preference method: the micro-batches are pairs and the loss theirs.
    pub preference: Option<(
        &'a super::preference::Preference,
        super::preference::PairNorm,
    )>,
}

/// Runs the micro-batches of one step (each a list of example indices) forward and backward and
/// sums their gradients. Each micro-batch's loss is its token-loss sum over the whole step's
/// target count, so the sum is the gradient of the step's token-weighted mean loss.
pub fn accumulate_gradients(
    model: &model::Decoder,
    data: &TrainData,
    micro_batches: &[Vec<usize>],
    pad_id: u32,
    params: &[Var],
    dropout_rng: &mut KilnRng,
) -> Result<StepGradients> {
    accumulate_gradients_on(
        model,
        data,
        micro_batches,
        pad_id,
        params,
        dropout_rng,
        crate::step::StepPath::Auto,
    )
}

/// [`accumulate_gradients`] on the given path (tests compare the explicit step with the
/// reference).
pub fn accumulate_gradients_on(
    model: &model::Decoder,
    data: &TrainData,
    micro_batches: &[Vec<usize>],
    pad_id: u32,
    params: &[Var],
    dropout_rng: &mut KilnRng,
    path: crate::step::StepPath,
) -> Result<StepGradients> {
    let dropout_seeds: Vec<u64> = micro_batches
        .iter()
        .map(|_| dropout_rng.next_seed())
        .collect();
    let share = StepShare {
        micro_batches,
        dropout_seeds: &dropout_seeds,
        step_targets: step_targets(data, micro_batches),
        teacher: None,
        preference: None,
    };
    accumulate_share(model, data, &share, pad_id, params, path)
}

/// The target tokens of `micro_batches` (at least 1, so a step of no targets divides by 1).
pub fn step_targets(data: &TrainData, micro_batches: &[Vec<usize>]) -> usize {
    micro_batches
        .iter()
        .flat_map(|b| b.iter().map(|&s| data.num_targets(s)))
        .sum::<usize>()
        .max(1)
}

/// The gradients of one rank's share of a step ([`StepShare`]); `loss_sum` and `tokens` are this
/// share's, `target_tokens` the whole step's.
pub fn accumulate_share(
    model: &model::Decoder,
    data: &TrainData,
    share: &StepShare,
    pad_id: u32,
    params: &[Var],
    path: crate::step::StepPath,
) -> Result<StepGradients> {
    let target_tokens = share.step_targets;
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    // Summed on the device and read once, after the last micro-batch: no sync inside the step.
    let zero = || Tensor::zeros((), candle_core::DType::F32, &model.device);
    let mut loss_sum = zero()?;
    let mut parts_sum = match share.teacher {
        Some(_) => Some((zero()?, zero()?)),
        None => None,
    };
    let mut tokens = 0usize;
    let mut pair_sums: Option<Vec<f64>> = None;
    model.grad_sink.clear();
    let mut explicit_grads = crate::step::LoraGrads::default();
    let lora_casts = crate::step::LoraCasts::default();
    let enqueue_start = std::time::Instant::now();
    for (sequences, &seed) in share.micro_batches.iter().zip(share.dropout_seeds) {
        let dropout_rng = &mut KilnRng::new(seed);
        let batch = data.batch(sequences, pad_id, &model.device)?;
        tokens += batch.num_tokens;
        let teacher_rows = share
            .teacher
            .map(|t| t.rows(data, sequences, pad_id, Some(&batch)))
            .transpose()?;
        let distill = share
            .teacher
            .zip(teacher_rows.as_ref())
            .map(|(t, rows)| (rows, &t.spec));
        let sums = if let Some((pref, norm)) = share.preference {
            let explicit = path
                .explicit(model, batch.inputs.dim(1)?)
                .then_some((&mut explicit_grads, &lora_casts));
            let (sums, store) =
                pref.micro_batch(model, &batch, sequences, norm, dropout_rng, explicit)?;
            if let Some(store) = store {
                add_grads(&mut grads, params, &store, model)?;
            }
            let acc = pair_sums.get_or_insert_with(|| vec![0.0; sums.values.len()]);
            for (a, v) in acc.iter_mut().zip(sums.values) {
                *a += v;
            }
            crate::ops::distill::LossSums {
                loss: Tensor::new(sums.loss as f32, &model.device)?,
                parts: None,
            }
        } else if path.explicit(model, batch.inputs.dim(1)?) {
            crate::step::micro_batch(
                model,
                &batch,
                1.0 / target_tokens as f64,
                dropout_rng,
                &mut explicit_grads,
                &lora_casts,
                distill,
                None,
            )?
        } else {
            let (sums, store) =
                reference_micro_batch(model, &batch, target_tokens, dropout_rng, distill)?;
            add_grads(&mut grads, params, &store, model)?;
            sums
        };
        loss_sum = (loss_sum + sums.loss)?;
        if let (Some((d, c)), Some((dd, dc))) = (parts_sum.as_mut(), sums.parts) {
            *d = (&*d + dd)?;
            *c = (&*c + dc)?;
        }
    }
    for (k, p) in params.iter().enumerate() {
        if let Some(g) = explicit_grads.take(p) {
            grads[k] = Some(match grads[k].take() {
                Some(acc) => (acc + g)?,
                None => g,
            });
        }
    }
    let enqueued = enqueue_start.elapsed();
    let read =
        |t: Tensor| -> Result<f64> { Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?) };
    let loss_sum = read(loss_sum)?;
    let distill_sums = match parts_sum {
        Some((d, c)) => Some((read(d)?, read(c)?)),
        None => None,
    };
    crate::profile::report();
    crate::profile::host_report(&[
        ("enqueue", enqueued),
        ("wait", enqueue_start.elapsed() - enqueued),
    ]);
    let grads = grads
        .into_iter()
        .zip(params)
        .map(|(g, p)| g.map(Ok).unwrap_or_else(|| p.as_tensor().zeros_like()))
        .collect::<candle_core::Result<_>>()?;
    Ok(StepGradients {
        grads,
        loss_sum,
        target_tokens,
        tokens,
        distill_sums,
        pair_sums,
    })
}

/// Adds a micro-batch's gradients to `grads`: from the graph's store, and from layers recomputed
/// in the backward pass.
fn add_grads(
    grads: &mut [Option<Tensor>],
    params: &[Var],
    store: &candle_core::backprop::GradStore,
    model: &model::Decoder,
) -> Result<()> {
    for (k, p) in params.iter().enumerate() {
        for g in [store.get(p.as_tensor()).cloned(), model.grad_sink.take(p)]
            .into_iter()
            .flatten()
        {
            grads[k] = Some(match grads[k].take() {
                Some(acc) => (acc + g)?,
                None => g,
            });
        }
    }
    Ok(())
}

/// One micro-batch on the reference path: candle's autograd through the model. Returns the loss
/// sums and the gradient store of `sum / target_tokens`. Distillation's loss is computed with
/// its gradient (`ops::distill`) and reaches the graph as `Σ hidden ⊙ dhidden`, whose gradient
/// with respect to the hidden states is exactly that one.
fn reference_micro_batch(
    model: &model::Decoder,
    batch: &crate::data::batch::Batch,
    target_tokens: usize,
    dropout_rng: &mut KilnRng,
    distill: Option<crate::ops::distill::Distill>,
) -> Result<(
    crate::ops::distill::LossSums,
    candle_core::backprop::GradStore,
)> {
    let p = crate::profile::scope("forward", &model.device);
    let hidden = model.forward_hidden_with(
        &batch.inputs,
        batch.layout.as_ref(),
        Some(&mut *dropout_rng),
    )?;
    drop(p);
    let p = crate::profile::scope("loss.forward", &model.device);
    let Some(distill) = distill else {
        let sum = model.loss_sum(&hidden, &batch.targets, &batch.weights)?;
        drop(p);
        let _p = crate::profile::scope("backward", &model.device);
        let store = (&sum / target_tokens as f64)?.backward()?;
        let sums = crate::ops::distill::LossSums {
            loss: sum.detach(),
            parts: None,
        };
        return Ok((sums, store));
    };
    let rows = hidden.flatten_to(candle_core::D::Minus2)?;
    let (sums, d_rows) = crate::ops::distill::head_loss_and_grad(
        &rows.detach(),
        model.lm_head.as_ref().unwrap_or(&model.embed_tokens),
        model.config.final_softcap,
        &batch.targets.flatten_all()?,
        &batch.weights.flatten_all()?,
        1.0 / target_tokens as f64,
        Some(distill),
    )?;
    drop(p);
    let _p = crate::profile::scope("backward", &model.device);
    let store = (rows * d_rows)?.sum_all()?.backward()?;
    Ok((sums, store))
}
