//! The output projection and cross-entropy over chunks of rows: the f32 logits of the whole
//! vocabulary never exist for all tokens at once.

use candle_core::{DType, Tensor, D};

use super::{apply, TensorOp};

/// Sum of the masked token cross-entropies and the number of target tokens.
/// `logits` `[B, T, V]`; `targets` `[B, T]` (u32); `weights` `[B, T]` (f32, 1 for tokens that
/// count, 0 for the rest).
pub fn masked_cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = log_probs
        .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    (picked * weights)?.sum_all()?.neg()
}

// The output projection and cross-entropy, over chunks of rows.

/// Rows of logits computed at once: about 2^26 values (256 MiB in f32) whatever the vocabulary.
fn chunk_rows(vocab: usize) -> usize {
    ((1usize << 26) / vocab.max(1)).max(1)
}

/// `Σ_i w_i · CE(softcap(h_i · headᵀ), t_i)` for hidden states `h` `[N, H]`, targets `[N]` (u32)
/// and weights `[N]` (f32): a scalar (f32). The backward pass recomputes each chunk's logits,
/// so neither the forward nor the backward holds more than one chunk of them.
pub fn lm_head_loss(
    hidden: &Tensor,
    head: &Tensor,
    softcap: Option<f64>,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<Tensor> {
    let n = hidden.dim(0)?;
    apply(
        hidden,
        LmHeadLoss {
            head: head.clone(),
            softcap,
            targets: targets.reshape(n)?,
            weights: weights.reshape(n)?.to_dtype(DType::F32)?,
            chunk: chunk_rows(head.dim(0)?),
        },
    )
}

/// Each row's log-probability of its target, `log softmax(softcap(h_i · headᵀ))[t_i]`, for hidden
/// states `h` `[N, H]` and targets `[N]` (u32): `[N]` f32, with no gradient (preference losses
/// sum these per sequence). A chunk of rows' logits at a time.
pub fn lm_head_target_logps(
    hidden: &Tensor,
    head: &Tensor,
    softcap: Option<f64>,
    targets: &Tensor,
) -> candle_core::Result<Tensor> {
    let n = hidden.dim(0)?;
    let op = LmHeadLoss {
        head: head.clone(),
        softcap,
        targets: targets.reshape(n)?,
        weights: Tensor::zeros(n, DType::F32, hidden.device())?,
        chunk: chunk_rows(head.dim(0)?),
    };
    let hidden = hidden.detach();
    let mut parts = vec![];
    for (start, len) in op.chunks(n) {
        let z = op.scores(&hidden, start, len)?;
        let t = op.targets.narrow(0, start, len)?;
        if z.device().is_cuda() {
            // The fused cross-entropy kernel (one pass over the logits, in f32) with unit weights
            // gives −log p of each row's target.
            let ones = Tensor::ones(len, DType::F32, z.device())?;
            let cap = softcap.unwrap_or(0.0) as f32;
            parts.push(crate::cuda::cross_entropy(&z, &t, &ones, cap)?.neg()?);
            continue;
        }
        let log_probs = candle_nn::ops::log_softmax(&op.capped(&z)?, D::Minus1)?;
        parts.push(log_probs.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?);
    }
    Tensor::cat(&parts, 0)
}

/// [`lm_head_loss`] and the gradient of `grad_scale` times it with respect to `hidden`, in one
/// pass over the chunks (each chunk's logits computed once, for both), for the explicit
/// training step. Returns (the loss sum, a scalar f32; dh `[N, H]`).
pub fn lm_head_loss_and_grad(
    hidden: &Tensor,
    head: &Tensor,
    softcap: Option<f64>,
    targets: &Tensor,
    weights: &Tensor,
    grad_scale: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let n = hidden.dim(0)?;
    // On the CPU the weights are at hand: rows that carry no loss (prompt tokens, padding) skip
    // the output head's two GEMMs, and their gradient is zero.
    if hidden.device().is_cpu() {
        let w = weights
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let kept: Vec<u32> = (0..n as u32).filter(|&i| w[i as usize] != 0.0).collect();
        if kept.len() < n {
            let dh = Tensor::zeros(hidden.shape(), hidden.dtype(), hidden.device())?;
            if kept.is_empty() {
                return Ok((Tensor::zeros((), DType::F32, hidden.device())?, dh));
            }
            let idx = Tensor::new(kept.as_slice(), hidden.device())?;
            let pick = |t: &Tensor| t.reshape(n)?.index_select(&idx, 0);
            let (loss, dh_kept) = lm_head_loss_and_grad(
                &hidden.index_select(&idx, 0)?,
                head,
                softcap,
                &pick(targets)?,
                &pick(weights)?,
                grad_scale,
            )?;
            return Ok((loss, dh.index_add(&idx, &dh_kept, 0)?));
        }
    }
    let fused_cpu = hidden.device().is_cpu() && hidden.dtype() == DType::F32 && softcap.is_none();
    let op = LmHeadLoss {
        head: head.clone(),
        softcap,
        targets: targets.reshape(n)?,
        weights: weights.reshape(n)?.to_dtype(DType::F32)?,
        chunk: chunk_rows(head.dim(0)?),
    };
    let grad = Tensor::new(grad_scale as f32, hidden.device())?;
    let mut total = Tensor::zeros((), DType::F32, hidden.device())?;
    let mut parts = vec![];
    for (start, len) in op.chunks(n) {
        let z = op.scores(hidden, start, len)?;
        if z.device().is_cuda() {
            let (loss, dz) = crate::cuda::cross_entropy_with_grad(
                z,
                &op.targets.narrow(0, start, len)?,
                &op.weights.narrow(0, start, len)?,
                grad_scale as f32,
                softcap.unwrap_or(0.0) as f32,
            )?;
            total = (total + loss.sum_all()?)?;
            parts.push(dz.matmul(&op.head)?);
            continue;
        }
        let dz = if fused_cpu {
            let t = op.targets.narrow(0, start, len)?.to_vec1::<u32>()?;
            let w = op.weights.narrow(0, start, len)?.to_vec1::<f32>()?;
            let (loss, dz) = cross_entropy_cpu(z, &t, &w, grad_scale as f32)?;
            total = (total + loss)?;
            dz
        } else {
            total = (total + op.chunk_loss(&z, start, len)?)?;
            op.chunk_grad(&z, start, len, &grad)?
        };
        parts.push(dz.matmul(&op.head)?);
    }
    Ok((total, Tensor::cat(&parts, 0)?))
}

/// The CPU's cross-entropy of f32 logits `z` `[rows, V]` and its gradient in one pass over each
/// row, rows in parallel: `Σ w·(lse − z[t])`, and `z` overwritten with its gradient
/// `dz = (softmax(z) − onehot(t))·w·g` (the chunk's logits are not needed after; a second
/// 200 MB buffer per chunk was most of this pass's memory traffic), the row's sums in f64.
/// (The candle-ops path makes six passes over the chunk.)
fn cross_entropy_cpu(
    z: Tensor,
    targets: &[u32],
    weights: &[f32],
    g: f32,
) -> candle_core::Result<(f64, Tensor)> {
    let z = z.contiguous()?;
    let op = CrossEntropyInPlace {
        targets,
        weights,
        g,
        loss: std::sync::Mutex::new(0.0),
    };
    z.inplace_op1(&op)?;
    let loss = *op.loss.lock().expect("loss");
    Ok((loss, z))
}

struct CrossEntropyInPlace<'a> {
    targets: &'a [u32],
    weights: &'a [f32],
    g: f32,
    loss: std::sync::Mutex<f64>,
}

impl candle_core::InplaceOp1 for CrossEntropyInPlace<'_> {
    fn name(&self) -> &'static str {
        "cross-entropy-in-place"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(v) = storage else {
            candle_core::bail!("cross_entropy_cpu needs f32 logits");
        };
        let (Some((start, end)), [_, cols]) = (layout.contiguous_offsets(), layout.dims()) else {
            candle_core::bail!("cross_entropy_cpu needs contiguous [rows, V] logits");
        };
        let g = self.g;
        let loss: f64 = v[start..end]
            .par_chunks_mut(*cols)
            .enumerate()
            .map(|(r, row)| {
                let w = self.weights[r];
                if w == 0.0 {
                    row.fill(0.0);
                    return 0.0;
                }
                let t = self.targets[r] as usize;
                let target_logit = row[t];
                let (max, sum) = softmax_scaled(row, (w * g) as f64);
                row[t] -= w * g;
                w as f64 * (max as f64 + sum.ln() - target_logit as f64)
            })
            .sum();
        *self.loss.lock().expect("loss") = loss;
        Ok(())
    }
}

/// `exp(x)` in f32 to about 1 ulp on the range a softmax sees, in plain arithmetic that the
/// compiler vectorizes (a libm call per element is most of the CPU loss otherwise): x = n·ln2 + r
/// with |r| ≤ ln2/2 (Cody–Waite), eʳ by its Taylor polynomial to r⁶ (error below r⁷/7! ≈ 1.2e-7),
/// 2ⁿ from the exponent bits. Below −87.3 (where f32's exp leaves the normal range) the result is
/// e^−87.3 ≈ 1e−38 instead of a denormal or 0; NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2²³ rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.3 { -87.3 } else { x };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let two_n = f32::from_bits((((t.to_bits() as i32) - 0x4B40_0000 + 127) << 23) as u32);
    p * two_n
}

/// `row ← scale · softmax(row)` in place; returns the row's max and Σ exp(row − max) (f64 over
/// 16 f32 lanes), every pass in 16 lanes the compiler vectorizes.
#[inline(always)]
fn softmax_scaled_lanes(row: &mut [f32], scale: f64) -> (f32, f64) {
    let mut maxes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for r in &mut chunks {
        for j in 0..16 {
            maxes[j] = if r[j] > maxes[j] { r[j] } else { maxes[j] };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&maxes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for o in &mut chunks {
        for j in 0..16 {
            let e = exp_f32(o[j] - max);
            o[j] = e;
            lanes[j] += e;
        }
    }
    let mut sum: f64 = lanes.iter().map(|&l| l as f64).sum();
    for o in chunks.into_remainder() {
        *o = exp_f32(*o - max);
        sum += *o as f64;
    }
    let s = (scale / sum) as f32;
    for o in row.iter_mut() {
        *o *= s;
    }
    (max, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_scaled_avx2(row: &mut [f32], scale: f64) -> (f32, f64) {
    softmax_scaled_lanes(row, scale)
}

/// [`softmax_scaled_lanes`] with AVX2 where the CPU has it (the same arithmetic: no contraction
/// into FMAs, so the results are identical).
fn softmax_scaled(row: &mut [f32], scale: f64) -> (f32, f64) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { softmax_scaled_avx2(row, scale) };
    }
    softmax_scaled_lanes(row, scale)
}

struct LmHeadLoss {
    head: Tensor,
    softcap: Option<f64>,
    targets: Tensor,
    weights: Tensor,
    chunk: usize,
}

impl LmHeadLoss {
    /// Logits of rows `start..start+len` in the compute dtype (before any soft cap).
    fn scores(&self, h: &Tensor, start: usize, len: usize) -> candle_core::Result<Tensor> {
        h.narrow(0, start, len)?.matmul(&self.head.t()?)
    }

    /// f32 logits after the soft cap.
    fn capped(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = z.to_dtype(DType::F32)?;
        match self.softcap {
            Some(cap) => (z / cap)?.tanh()? * cap,
            None => Ok(z),
        }
    }

    fn chunks(&self, n: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..n)
            .step_by(self.chunk)
            .map(move |s| (s, self.chunk.min(n - s)))
    }

    /// The summed weighted loss of one chunk's raw logits `z` (rows `start..start+len`).
    fn chunk_loss(&self, z: &Tensor, start: usize, len: usize) -> candle_core::Result<Tensor> {
        let t = self.targets.narrow(0, start, len)?;
        let w = self.weights.narrow(0, start, len)?;
        if z.device().is_cuda() {
            let cap = self.softcap.unwrap_or(0.0) as f32;
            return crate::cuda::cross_entropy(z, &t, &w, cap)?.sum_all();
        }
        let logits = self.capped(z)?;
        let lse = logits.log_sum_exp(D::Minus1)?;
        let picked = logits.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?;
        ((lse - picked)? * w)?.sum_all()
    }

    /// `(softmax(z) − onehot(t)) ⊙ w ⊙ g ⊙ softcap'` for one chunk, in `z`'s dtype.
    fn chunk_grad(
        &self,
        z: &Tensor,
        start: usize,
        len: usize,
        grad: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let t = self.targets.narrow(0, start, len)?;
        let w = self.weights.narrow(0, start, len)?;
        if z.device().is_cuda() {
            let cap = self.softcap.unwrap_or(0.0) as f32;
            return crate::cuda::cross_entropy_backward(z, &t, &w, grad, cap);
        }
        let logits = self.capped(z)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let minus_one = Tensor::full(-1f32, (len, 1), z.device())?;
        let dlogits = probs.scatter_add(&t.unsqueeze(1)?, &minus_one, 1)?;
        let scale = w.broadcast_mul(&grad.to_dtype(DType::F32)?)?.unsqueeze(1)?;
        let mut dz = dlogits.broadcast_mul(&scale)?;
        if let Some(cap) = self.softcap {
            // logits = cap·tanh(z/cap), so dlogits/dz = 1 − (logits/cap)².
            dz = (dz * (1.0 - (logits / cap)?.sqr()?)?)?;
        }
        dz.to_dtype(z.dtype())
    }
}

impl TensorOp for LmHeadLoss {
    fn name(&self) -> &'static str {
        "lm-head-loss"
    }

    fn forward(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let mut total = Tensor::zeros((), DType::F32, h.device())?;
        for (start, len) in self.chunks(h.dim(0)?) {
            let z = self.scores(h, start, len)?;
            total = (total + self.chunk_loss(&z, start, len)?)?;
        }
        Ok(total)
    }

    /// `dh = chunk_grad · head`, chunk by chunk: the logits are computed again, never kept.
    fn backward(
        &self,
        h: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let _p = crate::profile::scope("loss.backward", h.device());
        let mut parts = vec![];
        for (start, len) in self.chunks(h.dim(0)?) {
            let z = self.scores(h, start, len)?;
            parts.push(self.chunk_grad(&z, start, len, grad)?.matmul(&self.head)?);
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}

#[cfg(test)]
mod exp_tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_libm_where_a_softmax_looks() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 10.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
        assert_eq!(exp_f32(0.0), 1.0);
        // The vectorized row: the max, the f64 sum, and scale · softmax.
        let row: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let mut out = row.clone();
        let (max, sum) = softmax_scaled(&mut out, 0.5);
        assert_eq!(max, row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let want: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        assert!(((sum - want) / want).abs() < 1e-6, "{sum} vs {want}");
        for (&o, &v) in out.iter().zip(&row) {
            let p = 0.5 * ((v - max) as f64).exp() / want;
            assert!((o as f64 - p).abs() <= 1e-6 * p + 1e-12, "{o} vs {p}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests_support::randn;
    use candle_core::{Device, Var};

    /// The chunked loss and its gradient equal log-softmax over full logits, with and without
    /// a final soft cap, over several chunks.
    #[test]
    fn chunked_loss_equals_the_full_cross_entropy() {
        let (n, h, v) = (7, 5, 11);
        let head = randn(&[v, h], 1);
        let targets = Tensor::new(&[3u32, 0, 10, 4, 4, 9, 1], &Device::Cpu).unwrap();
        let weights = Tensor::new(&[1f32, 1., 0., 1., 1., 0., 1.], &Device::Cpu).unwrap();
        for softcap in [None, Some(2.0)] {
            let x = Var::from_tensor(&randn(&[n, h], 2)).unwrap();
            let op = LmHeadLoss {
                head: head.clone(),
                softcap,
                targets: targets.clone(),
                weights: weights.clone(),
                chunk: 3,
            };
            let loss = apply(x.as_tensor(), op).unwrap();
            let g = loss.backward().unwrap();
            let mut logits = x.as_tensor().matmul(&head.t().unwrap()).unwrap();
            if let Some(cap) = softcap {
                logits = ((logits / cap).unwrap().tanh().unwrap() * cap).unwrap();
            }
            let reference = masked_cross_entropy_sum(
                &logits.unsqueeze(0).unwrap(),
                &targets.unsqueeze(0).unwrap(),
                &weights.unsqueeze(0).unwrap(),
            )
            .unwrap();
            let gr = reference.backward().unwrap();
            let (a, b) = (
                loss.to_scalar::<f32>().unwrap(),
                reference.to_scalar::<f32>().unwrap(),
            );
            assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
            let d = crate::ops::tests_support::max_diff(
                g.get(x.as_tensor()).unwrap(),
                gr.get(x.as_tensor()).unwrap(),
            );
            assert!(d < 1e-5, "gradient differs by {d}");
        }
    }
}
