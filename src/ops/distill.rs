//! Distillation's loss and its gradient, over chunks of rows as the cross-entropy is computed:
//! neither model's `[tokens, vocabulary]` logits exist whole.
//!
//! For target row i (weight wᵢ), with p the teacher's and q the student's distribution at
//! temperature T, D one of KL(p ‖ q), KL(q ‖ p) or Jensen–Shannon:
//!
//! `loss = Σᵢ wᵢ · [alpha · T² · D(pᵢ, qᵢ) + (1 − alpha) · CE(student logitsᵢ, targetᵢ)]`
//!
//! Every divergence's gradient with respect to the student's logits z follows from
//! gⱼ = ∂D/∂qⱼ: `∂D/∂zₖ = qₖ (gₖ − Σⱼ qⱼ gⱼ) / T`, which gives `(q − p)/T` (forward KL),
//! `q ⊙ (log q − log p − D)/T` (reverse KL) and `q ⊙ (g − ⟨q, g⟩)/T` with
//! `g = ½ log(q/m)`, m = (p + q)/2 (Jensen–Shannon).
//!
//! Teacher and student may differ in padded vocabulary rows (Qwen2.5's 0.5B has 151,936, its 7B
//! 152,064, one tokenizer): the divergence is over the ids both have, the cross-entropy over the
//! student's own.

use candle_core::{DType, Tensor, D};

use crate::recipe::DistillLoss;

/// What distillation needs of the teacher for a micro-batch's rows, on the student's device.
pub enum TeacherRows<'a> {
    /// The teacher's final hidden states `[N, H_teacher]` and its output head `[V_teacher,
    /// H_teacher]`: each chunk's logits are computed here.
    Hidden {
        hidden: Tensor,
        head: &'a Tensor,
        softcap: Option<f64>,
    },
    /// The teacher's top-k log-probabilities at temperature 1 from a cache: `ids` `[N, k]` (u32)
    /// and `log_probs` `[N, k]` (f32), over a vocabulary of `vocab` ids; the mass outside the k
    /// is spread evenly over the other ids (exact when k covers the vocabulary).
    TopK {
        ids: Tensor,
        log_probs: Tensor,
        vocab: usize,
    },
}

/// The `[distill]` settings the loss reads.
#[derive(Debug, Clone, Copy)]
pub struct DistillSpec {
    pub alpha: f64,
    pub temperature: f64,
    pub loss: DistillLoss,
}

/// A micro-batch's distillation loss: sums over its target rows (each weighted), and the
/// gradient of `grad_scale` times `loss` with respect to the student's hidden states.
pub struct DistillOutput {
    /// `alpha · T² · divergence + (1 − alpha) · cross_entropy`, a scalar (f32).
    pub loss: Tensor,
    /// Σ wᵢ D(pᵢ, qᵢ), a scalar (f32).
    pub divergence: Tensor,
    /// Σ wᵢ CEᵢ, a scalar (f32).
    pub cross_entropy: Tensor,
    /// `[N, H]` in the hidden states' dtype.
    pub d_hidden: Tensor,
}

/// Values of a `[rows, V]` f32 chunk: about 2^24 (64 MiB), a handful of them alive at once.
fn chunk_rows(vocab: usize) -> usize {
    ((1usize << 24) / vocab.max(1)).max(1)
}

/// Rows of CUDA's fused chunk: about 2^26 student logits in the model's dtype, the teacher's
/// beside them, nothing else of that size.
fn fused_chunk_rows(vocab: usize) -> usize {
    ((1usize << 26) / vocab.max(1)).max(1)
}

/// The loss of `hidden` `[N, H]` through `head` `[V, H]` (final soft cap `softcap`) against the
/// teacher's distribution and `targets` `[N]` (u32) weighted by `weights` `[N]`, and its gradient.
#[allow(clippy::too_many_arguments)]
pub fn distill_loss_and_grad(
    hidden: &Tensor,
    head: &Tensor,
    softcap: Option<f64>,
    targets: &Tensor,
    weights: &Tensor,
    teacher: &TeacherRows,
    spec: &DistillSpec,
    grad_scale: f64,
) -> candle_core::Result<DistillOutput> {
    let n = hidden.dim(0)?;
    let vocab = head.dim(0)?;
    let batch = MicroBatch {
        hidden,
        head,
        softcap,
        targets: targets.reshape(n)?,
        weights: weights.reshape(n)?.to_dtype(DType::F32)?,
        teacher,
        spec,
        grad_scale,
        vocab,
        shared: teacher.vocab().min(vocab),
    };
    let fused = cfg!(feature = "cuda") && hidden.device().is_cuda();
    let rows = if fused {
        fused_chunk_rows(vocab)
    } else {
        chunk_rows(vocab)
    };
    let zero = || Tensor::zeros((), DType::F32, hidden.device());
    let (mut divergence, mut cross_entropy, mut parts) = (zero()?, zero()?, vec![]);
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let chunk = batch.chunk(start, len, fused)?;
        divergence = (divergence + chunk.divergence)?;
        cross_entropy = (cross_entropy + chunk.cross_entropy)?;
        parts.push(chunk.d_hidden);
    }
    let t = spec.temperature;
    let loss = ((&divergence * (spec.alpha * t * t))? + (&cross_entropy * (1.0 - spec.alpha))?)?;
    Ok(DistillOutput {
        loss,
        divergence,
        cross_entropy,
        d_hidden: Tensor::cat(&parts, 0)?,
    })
}

/// `distill_loss_and_grad`'s inputs, `targets` and `weights` flattened, `shared` the ids both
/// models have.
struct MicroBatch<'a> {
    hidden: &'a Tensor,
    head: &'a Tensor,
    softcap: Option<f64>,
    targets: Tensor,
    weights: Tensor,
    teacher: &'a TeacherRows<'a>,
    spec: &'a DistillSpec,
    grad_scale: f64,
    vocab: usize,
    shared: usize,
}

/// One chunk's weighted sums (f32 scalars) and its rows' gradient.
struct Chunk {
    divergence: Tensor,
    cross_entropy: Tensor,
    d_hidden: Tensor,
}

impl MicroBatch<'_> {
    /// Rows `start..start+len`: CUDA's fused kernel where asked, else candle ops.
    fn chunk(&self, start: usize, len: usize, fused: bool) -> candle_core::Result<Chunk> {
        if fused {
            return self.fused_chunk(start, len);
        }
        self.candle_chunk(start, len)
    }

    /// Rows `start..start+len` through candle ops in f32 (the CPU's path and the reference).
    fn candle_chunk(&self, start: usize, len: usize) -> candle_core::Result<Chunk> {
        let (spec, shared, vocab, t) = (self.spec, self.shared, self.vocab, self.spec.temperature);
        let device = self.hidden.device();
        let w = self.weights.narrow(0, start, len)?;
        let targets = self.targets.narrow(0, start, len)?.unsqueeze(1)?;
        let raw = self.hidden.narrow(0, start, len)?.matmul(&self.head.t()?)?;
        let z = capped(&raw.to_dtype(DType::F32)?, self.softcap)?;

        // The student's log-probabilities: at temperature 1 over its whole vocabulary (the
        // cross-entropy), at T over the ids both models have (the divergence) — one softmax
        // where the two are the same.
        let log_q1 = candle_nn::ops::log_softmax(&z, D::Minus1)?;
        let log_q = if t == 1.0 && shared == vocab {
            log_q1.clone()
        } else {
            candle_nn::ops::log_softmax(&(z.narrow(1, 0, shared)? / t)?, D::Minus1)?
        };
        let (y, teacher_cap) = self.teacher.logits(start, len, shared)?;
        let y = capped(&y.to_dtype(DType::F32)?, teacher_cap)?.narrow(1, 0, shared)?;
        let log_p = (y / t)?;
        let log_p = candle_nn::ops::log_softmax(&log_p, D::Minus1)?;
        let (d, dd) = divergence_and_grad(spec.loss, &log_p, &log_q, t)?;
        let divergence = (&d * &w)?.sum_all()?;

        let picked = log_q1.gather(&targets, 1)?.squeeze(1)?;
        let cross_entropy = (&picked * &w)?.sum_all()?.neg()?;
        let minus_one = Tensor::full(-1f32, (len, 1), device)?;
        let dce = log_q1.exp()?.scatter_add(&targets, &minus_one, 1)?;

        // dz = w · g · [(1 − alpha) · dCE + alpha · T² · dD], dD zero past the shared ids.
        let mut dz = (dce * (1.0 - spec.alpha))?;
        let dd = (dd * (spec.alpha * t * t))?;
        dz = if shared < vocab {
            let pad = Tensor::zeros((len, vocab - shared), DType::F32, device)?;
            (dz + Tensor::cat(&[&dd, &pad], 1)?)?
        } else {
            (dz + dd)?
        };
        dz = dz.broadcast_mul(&(&w * self.grad_scale)?.unsqueeze(1)?)?;
        if let Some(cap) = self.softcap {
            // z = cap·tanh(raw/cap): dz/draw = 1 − (z/cap)².
            dz = (dz * (1.0 - (&z / cap)?.sqr()?)?)?;
        }
        Ok(Chunk {
            divergence,
            cross_entropy,
            d_hidden: dz.to_dtype(self.hidden.dtype())?.matmul(self.head)?,
        })
    }

    /// Rows `start..start+len` on CUDA: the two output heads' GEMMs and one kernel that computes
    /// the three log-sum-exps, the divergence, the cross-entropy and the gradient, written over
    /// the student's logits (`cuda::distill_with_grad`), in place of some twenty passes of
    /// candle ops over f32 copies.
    fn fused_chunk(&self, start: usize, len: usize) -> candle_core::Result<Chunk> {
        let z = self.hidden.narrow(0, start, len)?.matmul(&self.head.t()?)?;
        let (y, teacher_cap) = self.teacher.logits(start, len, self.shared)?;
        // The kernel reads the teacher in the student's dtype or in f32.
        let y = if y.dtype() == z.dtype() {
            y
        } else {
            y.to_dtype(DType::F32)?
        };
        let spec = crate::cuda::DistillKernelSpec {
            kind: match self.spec.loss {
                DistillLoss::ForwardKl => 0,
                DistillLoss::ReverseKl => 1,
                DistillLoss::Jsd => 2,
            },
            temperature: self.spec.temperature as f32,
            alpha: self.spec.alpha as f32,
            grad: self.grad_scale as f32,
            cap: self.softcap.unwrap_or(0.0) as f32,
            teacher_cap: teacher_cap.unwrap_or(0.0) as f32,
        };
        let (d, ce, dz) = crate::cuda::distill_with_grad(
            z,
            &y.contiguous()?,
            self.shared,
            &self.targets.narrow(0, start, len)?,
            &self.weights.narrow(0, start, len)?.contiguous()?,
            &spec,
        )?;
        Ok(Chunk {
            divergence: d.sum_all()?,
            cross_entropy: ce.sum_all()?,
            d_hidden: dz.matmul(self.head)?,
        })
    }
}

/// The teacher's rows and the settings: what turns a micro-batch's loss into distillation.
pub type Distill<'a> = (&'a TeacherRows<'a>, &'a DistillSpec);

/// A micro-batch's loss sums: the total, and with distillation its divergence and
/// cross-entropy parts (all f32 scalars on the device).
pub struct LossSums {
    pub loss: Tensor,
    pub parts: Option<(Tensor, Tensor)>,
}

/// The output head's loss on rows `hidden` `[N, H]` and the gradient of `grad_scale` times it:
/// the cross-entropy on the data (`ops::lm_head_loss_and_grad`), or with `distill`, the
/// distillation loss.
#[allow(clippy::too_many_arguments)]
pub fn head_loss_and_grad(
    hidden: &Tensor,
    head: &Tensor,
    softcap: Option<f64>,
    targets: &Tensor,
    weights: &Tensor,
    grad_scale: f64,
    distill: Option<Distill>,
) -> candle_core::Result<(LossSums, Tensor)> {
    match distill {
        None => {
            let (loss, dh) =
                super::lm_head_loss_and_grad(hidden, head, softcap, targets, weights, grad_scale)?;
            Ok((LossSums { loss, parts: None }, dh))
        }
        Some((teacher, spec)) => {
            let out = distill_loss_and_grad(
                hidden, head, softcap, targets, weights, teacher, spec, grad_scale,
            )?;
            Ok((
                LossSums {
                    loss: out.loss,
                    parts: Some((out.divergence, out.cross_entropy)),
                },
                out.d_hidden,
            ))
        }
    }
}

/// `cap · tanh(z / cap)`, or `z`.
fn capped(z: &Tensor, softcap: Option<f64>) -> candle_core::Result<Tensor> {
    match softcap {
        Some(cap) => (z / cap)?.tanh()? * cap,
        None => Ok(z.clone()),
    }
}

/// Per row, D(p, q) `[rows]` and ∂D/∂z `[rows, V]` of the student's logits z (at temperature
/// `t`) given both distributions' log-probabilities.
fn divergence_and_grad(
    loss: DistillLoss,
    log_p: &Tensor,
    log_q: &Tensor,
    t: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (p, q) = (log_p.exp()?, log_q.exp()?);
    match loss {
        DistillLoss::ForwardKl => {
            let d = (&p * (log_p - log_q)?)?.sum(D::Minus1)?;
            Ok((d, ((q - p)? / t)?))
        }
        DistillLoss::ReverseKl => {
            let a = (log_q - log_p)?;
            let d = (&q * &a)?.sum(D::Minus1)?;
            let grad = (&q * a.broadcast_sub(&d.unsqueeze(1)?)?)?;
            Ok((d, (grad / t)?))
        }
        DistillLoss::Jsd => {
            // log m = log((p + q)/2) = max + log(1 + e^−|log p − log q|) − ln 2: finite where p
            // and q both underflow.
            let log_m = ((log_p.maximum(log_q)?
                + ((log_p - log_q)?.abs()?.neg()?.exp()? + 1.0)?.log()?)?
                - std::f64::consts::LN_2)?;
            let d = (((&p * (log_p - &log_m)?)?.sum(D::Minus1)?
                + (&q * (log_q - &log_m)?)?.sum(D::Minus1)?)?
                * 0.5)?;
            let g = ((log_q - &log_m)? * 0.5)?;
            let mean = (&q * &g)?.sum_keepdim(D::Minus1)?;
            let grad = (&q * g.broadcast_sub(&mean)?)?;
            Ok((d, (grad / t)?))
        }
    }
}

impl TeacherRows<'_> {
    /// The ids the teacher's distribution covers.
    fn vocab(&self) -> usize {
        match self {
            TeacherRows::Hidden { head, .. } => head.dim(0).unwrap_or(0),
            TeacherRows::TopK { vocab, .. } => *vocab,
        }
    }

    /// Rows `start..start+len` of the teacher: its raw logits (the model's dtype) and the soft
    /// cap still to apply, or a cache's log-probabilities at temperature 1 (f32, the first
    /// `shared` ids; the same softmax at any temperature up to a per-row constant) and none.
    fn logits(
        &self,
        start: usize,
        len: usize,
        shared: usize,
    ) -> candle_core::Result<(Tensor, Option<f64>)> {
        match self {
            TeacherRows::Hidden {
                hidden,
                head,
                softcap,
            } => Ok((hidden.narrow(0, start, len)?.matmul(&head.t()?)?, *softcap)),
            TeacherRows::TopK {
                ids,
                log_probs,
                vocab,
            } => Ok((
                dense_log_probs(ids, log_probs, *vocab, start, len, shared)?,
                None,
            )),
        }
    }
}

/// A cache's top-k log-probabilities of rows `start..start+len` over the whole vocabulary
/// (the first `shared` ids), f32: the mass outside the k spread evenly over the other ids.
fn dense_log_probs(
    ids: &Tensor,
    log_probs: &Tensor,
    vocab: usize,
    start: usize,
    len: usize,
    shared: usize,
) -> candle_core::Result<Tensor> {
    let ids = ids.narrow(0, start, len)?;
    let lp = log_probs.narrow(0, start, len)?.to_dtype(DType::F32)?;
    let k = ids.dim(1)?;
    if k >= vocab {
        let dense = Tensor::zeros((len, vocab), DType::F32, lp.device())?;
        return dense.scatter_add(&ids, &lp, 1)?.narrow(1, 0, shared);
    }
    // Each id outside the k gets an even share of the rest of the mass.
    let kept = lp.exp()?.sum_keepdim(1)?;
    let rest = (kept.neg()? + 1.0)?.maximum(1e-30)?;
    let rest = (rest / (vocab - k) as f64)?.log()?;
    let dense = rest.broadcast_as((len, vocab))?.contiguous()?;
    let dense = dense.scatter_add(&ids, &lp.broadcast_sub(&rest)?, 1)?;
    dense.narrow(1, 0, shared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests_support::{max_diff, randn};
    use candle_core::{Device, Var};

    /// The chunked loss and its hand-written gradient equal autograd over full f32 logits, for
    /// every divergence, with a soft cap, a teacher with fewer ids, and a top-k teacher whose k
    /// covers the vocabulary (which must equal the live one).
    #[test]
    fn distillation_loss_and_gradient_equal_autograd() {
        let (n, h, ht, v) = (9, 6, 5, 13);
        let head = randn(&[v, h], 1);
        let t_hidden = randn(&[n, ht], 3);
        let targets = Tensor::new(&[3u32, 0, 12, 4, 4, 9, 1, 7, 2], &Device::Cpu).unwrap();
        let weights = Tensor::new(&[1f32, 1., 0., 1., 2., 0., 1., 1., 1.], &Device::Cpu).unwrap();
        for loss in [
            DistillLoss::ForwardKl,
            DistillLoss::ReverseKl,
            DistillLoss::Jsd,
        ] {
            for (softcap, teacher_vocab) in [(None, v), (Some(3.0), v - 2)] {
                let t_head = randn(&[teacher_vocab, ht], 4);
                let spec = DistillSpec {
                    alpha: 0.7,
                    temperature: 1.7,
                    loss,
                };
                let x = Var::from_tensor(&randn(&[n, h], 2)).unwrap();
                let teacher = TeacherRows::Hidden {
                    hidden: t_hidden.clone(),
                    head: &t_head,
                    softcap: None,
                };
                let out = distill_loss_and_grad(
                    x.as_tensor(),
                    &head,
                    softcap,
                    &targets,
                    &weights,
                    &teacher,
                    &spec,
                    0.25,
                )
                .unwrap();

                // The reference: whole logits, candle's autograd.
                let z =
                    capped(&x.as_tensor().matmul(&head.t().unwrap()).unwrap(), softcap).unwrap();
                let zt = t_hidden.matmul(&t_head.t().unwrap()).unwrap();
                let s = teacher_vocab;
                let lp = candle_nn::ops::log_softmax(&(zt / 1.7).unwrap(), D::Minus1).unwrap();
                let lq = candle_nn::ops::log_softmax(
                    &(z.narrow(1, 0, s).unwrap() / 1.7).unwrap(),
                    D::Minus1,
                )
                .unwrap();
                let (p, q) = (lp.exp().unwrap(), lq.exp().unwrap());
                let kl = |a: &Tensor, la: &Tensor, lb: &Tensor| {
                    (a * (la - lb).unwrap()).unwrap().sum(1).unwrap()
                };
                let d = match loss {
                    DistillLoss::ForwardKl => kl(&p, &lp, &lq),
                    DistillLoss::ReverseKl => kl(&q, &lq, &lp),
                    DistillLoss::Jsd => {
                        let lm = (((&p + &q).unwrap() * 0.5).unwrap()).log().unwrap();
                        ((kl(&p, &lp, &lm) + kl(&q, &lq, &lm)).unwrap() * 0.5).unwrap()
                    }
                };
                let ce = crate::ops::masked_cross_entropy_sum(
                    &z.unsqueeze(0).unwrap(),
                    &targets.unsqueeze(0).unwrap(),
                    &weights.unsqueeze(0).unwrap(),
                )
                .unwrap();
                let div = (d * &weights).unwrap().sum_all().unwrap();
                let reference =
                    ((&div * (0.7 * 1.7 * 1.7)).unwrap() + (&ce * 0.3).unwrap()).unwrap();
                let g = (&reference * 0.25).unwrap().backward().unwrap();
                let close = |a: &Tensor, b: &Tensor| {
                    let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
                    assert!(
                        (a - b).abs() < 1e-5 * b.abs().max(1.0),
                        "{loss:?}: {a} vs {b}"
                    );
                };
                close(&out.loss, &reference);
                close(&out.divergence, &div);
                close(&out.cross_entropy, &ce);
                let diff = max_diff(&out.d_hidden, g.get(x.as_tensor()).unwrap());
                assert!(
                    diff < 1e-5,
                    "{loss:?} {softcap:?}: gradient differs by {diff}"
                );

                // A top-k teacher with k = the whole vocabulary: the same numbers.
                let log_probs = candle_nn::ops::log_softmax(
                    &t_hidden.matmul(&t_head.t().unwrap()).unwrap(),
                    D::Minus1,
                )
                .unwrap();
                let ids = Tensor::arange(0u32, teacher_vocab as u32, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
                    .repeat((n, 1))
                    .unwrap();
                let cached = TeacherRows::TopK {
                    ids,
                    log_probs,
                    vocab: teacher_vocab,
                };
                let again = distill_loss_and_grad(
                    x.as_tensor(),
                    &head,
                    softcap,
                    &targets,
                    &weights,
                    &cached,
                    &spec,
                    0.25,
                )
                .unwrap();
                close(&again.loss, &out.loss);
                let diff = max_diff(&again.d_hidden, &out.d_hidden);
                assert!(diff < 1e-5, "top-k = V differs by {diff}");
            }
        }
    }

    /// With the teacher's k most likely ids only, the rest of its mass is spread evenly: the
    /// reconstructed distribution sums to one and keeps the k values.
    #[test]
    fn top_k_rows_spread_the_rest_evenly() {
        let lp = candle_nn::ops::log_softmax(&randn(&[2, 10], 5), D::Minus1).unwrap();
        let ids = Tensor::new(&[[4u32, 0, 7], [9, 1, 2]], &Device::Cpu).unwrap();
        let kept = lp.gather(&ids, 1).unwrap();
        let rows = TeacherRows::TopK {
            ids: ids.clone(),
            log_probs: kept.clone(),
            vocab: 10,
        };
        let dense = rows.logits(0, 2, 10).unwrap().0;
        let total = dense
            .exp()
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for s in total {
            assert!((s - 1.0).abs() < 1e-5, "sums to {s}");
        }
        assert!(max_diff(&dense.gather(&ids, 1).unwrap(), &kept) < 1e-6);
    }
}
