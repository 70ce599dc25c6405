//! Attention: the fused softmax (scale, mask, softmax; one CUDA kernel each way) and the
//! attention core as one autograd op: flash-attention kernels on CUDA where they apply
//! (src/cuda/flash_attention.cu), otherwise over blocks of queries.

use super::batched_matmul::batched_matmul;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

use super::{whole, AsCustomOp3, TensorOp3};
use crate::layout::HeadLayout;

/// The additive causal mask `[T, T]`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(
    t: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
}

// Attention softmax.

/// `softmax(scale · scores + mask)` over the last dimension, for attention scores
/// `[B, H, Tq, Tk]` and an additive mask `[Tq, Tk]` or `[B, 1, Tq, Tk]`. On CUDA one fused kernel
/// each way (f32 arithmetic, scores' dtype in and out); elsewhere candle ops, with the softmax in
/// f32 as transformers computes it.
pub fn attention_softmax(
    scores: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let (tq, tk) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    softmax_rows(scores, mask, scale, causal.then(|| tk.saturating_sub(tq)))
}

/// [`attention_softmax`] where `Some(offset)` says the mask is causal with query i seeing keys
/// up to i + offset.
fn softmax_rows(
    scores: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    causal: Option<usize>,
) -> candle_core::Result<Tensor> {
    if scores.device().is_cuda() {
        // A causal mask is applied by the kernel from indices, without reading it.
        let mask = match mask {
            Some(m) if causal.is_none() => Some(m.to_dtype(scores.dtype())?.contiguous()?),
            _ => None,
        };
        return scores.contiguous()?.apply_op1(AttentionSoftmax {
            mask,
            scale: scale as f32,
            causal,
        });
    }
    // The fused CPU pass records no autograd op: only for untracked scores (inside the attention
    // op, whose backward is written out).
    let fused = scores.device().is_cpu() && scores.dtype() == DType::F32 && !scores.track_op();
    if let (Some(offset), true) = (causal, fused) {
        return causal_softmax_cpu(scores, scale as f32, offset);
    }
    let mut s = (scores * scale)?;
    if let Some(mask) = mask {
        s = s.broadcast_add(mask)?;
    } else if let Some(offset) = causal {
        s = s.broadcast_add(&causal_rows(scores, offset)?)?;
    }
    candle_nn::ops::softmax(&s.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(scores.dtype())
}

/// The additive causal mask of `scores`' last two dims `[tq, tk]`: query i sees keys up to
/// `offset + i` (built per block of queries, never `[T, T]` at once).
fn causal_rows(scores: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
    let dims = scores.dims();
    let (tq, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let dev = scores.device();
    let last = Tensor::arange(offset as u32, (offset + tq) as u32, dev)?.unsqueeze(1)?;
    let keys = Tensor::arange(0u32, tk as u32, dev)?.unsqueeze(0)?;
    let visible = keys.broadcast_le(&last)?;
    let zeros = Tensor::zeros((tq, tk), scores.dtype(), dev)?;
    let blocked = Tensor::full(f32::NEG_INFINITY, (tq, tk), dev)?.to_dtype(scores.dtype())?;
    visible.where_cond(&zeros, &blocked)
}

/// The rows of an f32 CPU tensor's last dimension, read in place, and a fresh output of its
/// shape written row by row in parallel by `f(row index, input row, output row)`.
fn map_rows_cpu(
    x: &Tensor,
    other: Option<&Tensor>,
    f: impl Fn(usize, &[f32], Option<&[f32]>, &mut [f32]) + Sync,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let cols = x.dim(D::Minus1)?;
    let n = x.elem_count();
    let x = x.contiguous()?;
    let other = other.map(|o| o.contiguous()).transpose()?;
    let (xs, xl) = x.storage_and_layout();
    let candle_core::Storage::Cpu(xc) = &*xs else {
        candle_core::bail!("map_rows_cpu needs CPU tensors");
    };
    let xv = &xc.as_slice::<f32>()?[xl.start_offset()..xl.start_offset() + n];
    let guard = other.as_ref().map(|o| o.storage_and_layout());
    let ov = match &guard {
        Some((os, ol)) => match &**os {
            candle_core::Storage::Cpu(oc) => {
                Some(&oc.as_slice::<f32>()?[ol.start_offset()..ol.start_offset() + n])
            }
            _ => candle_core::bail!("map_rows_cpu needs CPU tensors"),
        },
        None => None,
    };
    let mut out = vec![0f32; n];
    out.par_chunks_mut(cols).enumerate().for_each(|(r, o)| {
        let row = &xv[r * cols..(r + 1) * cols];
        f(r, row, ov.map(|v| &v[r * cols..(r + 1) * cols]), o);
    });
    drop(guard);
    drop(xs);
    Tensor::from_vec(out, x.shape(), x.device())
}

/// The CPU's `softmax(scale · s)` over rows of f32 scores `[.., Tq, Tk]` with the causal mask
/// applied from indices (query i sees keys up to i + offset): one pass per row, rows in
/// parallel. The candle-ops path scales, adds the mask and normalizes in five passes.
fn causal_softmax_cpu(scores: &Tensor, scale: f32, offset: usize) -> candle_core::Result<Tensor> {
    let tq = scores.dim(D::Minus2)?;
    map_rows_cpu(scores, None, |r, row, _, out| {
        let seen = (r % tq + offset + 1).min(row.len());
        let max = row[..seen]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
        let mut sum = 0f32;
        for (o, &v) in out[..seen].iter_mut().zip(&row[..seen]) {
            *o = (v * scale - max).exp();
            sum += *o;
        }
        let inv = 1.0 / sum;
        out[..seen].iter_mut().for_each(|o| *o *= inv);
    })
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AttentionSoftmax {
    mask: Option<Tensor>,
    scale: f32,
    causal: Option<usize>,
}

impl CustomOp1 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "attention-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("attention-softmax runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::masked_softmax(
            storage,
            layout,
            self.mask.as_ref(),
            self.scale,
            self.causal,
        )?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(softmax_backward(
            res,
            grad_res,
            self.scale as f64,
            self.causal,
        )?))
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AttentionSoftmaxBackward {
    scale: f32,
    causal: Option<usize>,
}

impl candle_core::CustomOp2 for AttentionSoftmaxBackward {
    fn name(&self) -> &'static str {
        "attention-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("attention-softmax runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        probs: &candle_core::CudaStorage,
        probs_layout: &Layout,
        dprobs: &candle_core::CudaStorage,
        dprobs_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::masked_softmax_backward(
            probs,
            probs_layout,
            dprobs,
            dprobs_layout,
            self.scale,
            self.causal,
        )?;
        Ok((out, probs_layout.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// The attention core as one op: `softmax(scale·q·kᵀ + mask)·v`, with grouped key/value heads.
// Its backward pass recomputes the probabilities instead of keeping them, and computes the
// gradients of q, k and v directly (no graph of transposes, repeats and broadcasts).

/// `softmax(scale·q·kᵀ (soft-capped) + mask)·v` for q `[B, H, T, D]` and k, v `[B, KV, Tk, D]`
/// (each key/value head serves `H / KV` query heads), recorded as one autograd op.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
    causal: bool,
) -> candle_core::Result<Tensor> {
    attention_in_blocks(q, k, v, mask, scale, softcap, causal, SCORES_PER_BLOCK)
}

/// [`attention`] computing at most `block_scores` score elements at once (tests use small blocks).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
    causal: bool,
    block_scores: usize,
) -> candle_core::Result<Tensor> {
    let op = Attention {
        mask: mask.cloned(),
        scale,
        softcap,
        causal,
        n_rep: q.dim(1)? / k.dim(1)?,
        block_scores,
        flash_saved: Default::default(),
        layout: HeadLayout::HeadsMajor,
    };
    whole(q)?.apply_op3(&whole(k)?, &whole(v)?, AsCustomOp3(op))
}

/// The attention core run outside the autograd graph, for the explicit training step
/// (`step/`): the forward keeps what the backward needs (on the flash path, the output
/// and its log-sum-exp; otherwise nothing, the probabilities are recomputed).
pub(crate) struct AttentionCore(Attention);

impl AttentionCore {
    pub fn new(
        q: &Tensor,
        k: &Tensor,
        mask: Option<&Tensor>,
        scale: f64,
        softcap: Option<f64>,
        causal: bool,
        layout: HeadLayout,
    ) -> candle_core::Result<Self> {
        let (heads, kv_heads) = (layout.dims(q)?.1, layout.dims(k)?.1);
        let core = Attention {
            mask: mask.cloned(),
            scale,
            softcap,
            causal,
            n_rep: heads / kv_heads,
            block_scores: SCORES_PER_BLOCK,
            flash_saved: Default::default(),
            layout,
        };
        if layout == HeadLayout::TokenMajor && !core.uses_flash(q) {
            candle_core::bail!("token-major attention runs on the flash kernels only");
        }
        Ok(Self(core))
    }

    /// The layout the explicit step should give q, k and v of `x`'s device and dtype: token-major
    /// where the flash kernels compute this attention (no transposes around it), heads-major
    /// otherwise.
    pub fn layout_for(
        x: &Tensor,
        head_dim: usize,
        softcap: Option<f64>,
        causal: bool,
    ) -> HeadLayout {
        if flash_applies(x, head_dim, softcap, causal) {
            HeadLayout::TokenMajor
        } else {
            HeadLayout::HeadsMajor
        }
    }

    /// The output (q's shape and layout) of contiguous q, k, v.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        TensorOp3::forward(&self.0, q, k, v)
    }

    /// dq, dk, dv given the output's gradient (once: the flash path's saved state is consumed).
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        match TensorOp3::backward(&self.0, q, k, v, grad)? {
            (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
            _ => candle_core::bail!("attention backward returned no gradient"),
        }
    }
}

struct Attention {
    mask: Option<Tensor>,
    scale: f64,
    softcap: Option<f64>,
    /// `mask` is exactly the causal mask.
    causal: bool,
    n_rep: usize,
    /// Score elements computed at once (see [`SCORES_PER_BLOCK`]).
    block_scores: usize,
    /// The fused kernels' output and row statistics, kept from the forward pass for the
    /// backward.
    flash_saved: std::sync::Mutex<Option<FusedSaved>>,
    /// How q, k, v and the output are laid out (token-major on the flash path only).
    layout: HeadLayout,
}

/// Whether the flash kernels compute attention over heads of `head_dim` of `x`'s device and
/// dtype: CUDA, bf16, head size 64, 96 or 128, no soft cap, and a mask that is exactly causal or
/// none at all. Anything else (packed rows, sliding windows, Gemma 2's caps) takes the blocked
/// path.
fn flash_applies(x: &Tensor, head_dim: usize, softcap: Option<f64>, causal_or_none: bool) -> bool {
    flash_enabled()
        && softcap.is_none()
        && causal_or_none
        && x.device().is_cuda()
        && x.dtype() == DType::BF16
        && crate::cuda::FLASH_HEAD_DIMS.contains(&head_dim)
}

/// What the fused attention kernels keep for the backward: the output, and the row statistics
/// of whichever kernels ran (cuDNN's or kiln's flash kernels).
type FusedSaved = (Tensor, crate::cuda::AttentionStats);

/// `KILN_FLASH=0` turns the flash-attention kernels off (the blocked path runs instead).
fn flash_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KILN_FLASH").map_or(true, |v| v != "0"))
}

/// Each key/value head repeated for the query heads that share it: `[B, KV, T, D] -> [B, KV·n, T, D]`.
fn repeat_heads(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, n, t, d))?
        .reshape((b, kv * n, t, d))
}

/// The gradient of repeated heads, summed back onto the heads they were repeated from.
fn sum_heads(g: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(g.clone());
    }
    let (b, h, t, d) = g.dims4()?;
    g.reshape((b, h / n, n, t, d))?.sum(2)
}

/// Score elements of one block of queries: about 2^29 (1 GiB in bf16), so long sequences never
/// hold a `[B, H, T, T]` matrix, while 2048-token batches run in one block.
const SCORES_PER_BLOCK: usize = 1 << 29;

impl Attention {
    /// Whether the flash kernels compute this attention ([`flash_applies`]).
    fn uses_flash(&self, q: &Tensor) -> bool {
        q.rank() == 4
            && flash_applies(
                q,
                q.dims()[3],
                self.softcap,
                self.causal || self.mask.is_none(),
            )
    }

    /// Query blocks `(start, len)` over `tq` queries.
    fn blocks(&self, q: &Tensor, tk: usize) -> candle_core::Result<Vec<(usize, usize)>> {
        let (b, h, tq, _) = q.dims4()?;
        let rows = (self.block_scores / (b * h * tk).max(1)).max(1);
        Ok((0..tq)
            .step_by(rows)
            .map(|s| (s, rows.min(tq - s)))
            .collect())
    }

    /// With a causal mask, how far past its own index a query of the block starting at query
    /// `start` may look (`tk − tq` keys precede the queries when decoding after a cache).
    fn causal_offset(&self, tk: usize, tq: usize, start: usize) -> Option<usize> {
        self.causal.then(|| tk - tq + start)
    }

    /// The mask rows of queries `start..start+len`.
    fn mask_rows(&self, start: usize, len: usize) -> candle_core::Result<Option<Tensor>> {
        self.mask
            .as_ref()
            .map(|m| m.narrow(D::Minus2, start, len))
            .transpose()
    }

    /// The probabilities of queries `start..start+len` (`q` holds just those), and the
    /// soft-capped scores when there is a cap (for its gradient).
    fn probs(
        &self,
        q: &Tensor,
        k: &Tensor,
        start: usize,
        tq: usize,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let p = crate::profile::scope("attention.qk", q.device());
        let scores = batched_matmul(q, &k.t()?)?;
        drop(p);
        let _p = crate::profile::scope("attention.softmax", q.device());
        let mask = self.mask_rows(start, q.dim(2)?)?;
        let causal = self.causal_offset(k.dim(2)?, tq, start);
        match self.softcap {
            None => Ok((
                softmax_rows(&scores, mask.as_ref(), self.scale, causal)?,
                None,
            )),
            Some(cap) => {
                let capped = (((scores * self.scale)? / cap)?.tanh()? * cap)?;
                let p = softmax_rows(&capped, mask.as_ref(), 1.0, causal)?;
                Ok((p, Some(capped)))
            }
        }
    }
}

/// `p ⊙ (dp − Σ_j dp_j p_j) · scale`: the gradient of softmax inputs from the probabilities `p`
/// and their gradient.
fn softmax_backward(
    p: &Tensor,
    dp: &Tensor,
    scale: f64,
    causal: Option<usize>,
) -> candle_core::Result<Tensor> {
    if p.device().is_cuda() {
        return p.contiguous()?.apply_op2_no_bwd(
            &dp.contiguous()?,
            &AttentionSoftmaxBackward {
                scale: scale as f32,
                causal,
            },
        );
    }
    if p.device().is_cpu() && p.dtype() == DType::F32 && dp.dtype() == DType::F32 {
        let scale = scale as f32;
        return map_rows_cpu(p, Some(dp), |_, pr, dpr, out| {
            let dpr = dpr.expect("given");
            let dot: f32 = pr.iter().zip(dpr).map(|(a, b)| a * b).sum();
            for ((o, &a), &b) in out.iter_mut().zip(pr).zip(dpr) {
                *o = a * (b - dot) * scale;
            }
        });
    }
    let (p32, dp32) = (p.to_dtype(DType::F32)?, dp.to_dtype(DType::F32)?);
    let dot = (&p32 * &dp32)?.sum_keepdim(D::Minus1)?;
    ((p32 * dp32.broadcast_sub(&dot)?)? * scale)?.to_dtype(p.dtype())
}

impl TensorOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let _p = crate::profile::scope("attention.op.forward", q.device());
        if self.uses_flash(q) {
            let (o, stats) = crate::cuda::fused_attention_forward(
                q,
                k,
                v,
                self.scale as f32,
                self.causal,
                self.layout,
            )?;
            *self.flash_saved.lock().unwrap() = Some((o.clone(), stats));
            return Ok(o);
        }
        let k = repeat_heads(k, self.n_rep)?.contiguous()?;
        let v = repeat_heads(v, self.n_rep)?.contiguous()?;
        let tq = q.dim(2)?;
        let mut out = vec![];
        for (start, len) in self.blocks(q, k.dim(2)?)? {
            let qb = q.narrow(2, start, len)?;
            out.push(batched_matmul(&self.probs(&qb, &k, start, tq)?.0, &v)?);
        }
        Tensor::cat(&out, 2)
    }

    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("attention.op.backward", q.device());
        if let Some((o, stats)) = self.flash_saved.lock().unwrap().take() {
            let (dq, dk, dv) = crate::cuda::fused_attention_backward(
                q,
                k,
                v,
                &o,
                &stats,
                grad,
                self.scale as f32,
                self.causal,
                self.layout,
            )?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let k_r = repeat_heads(k, self.n_rep)?.contiguous()?;
        let v_r = repeat_heads(v, self.n_rep)?.contiguous()?;
        let grad = grad.contiguous()?;
        let tq = q.dim(2)?;
        let (mut dq, mut dk, mut dv) = (vec![], None::<Tensor>, None::<Tensor>);
        let add = |acc: Option<Tensor>, x: Tensor| -> candle_core::Result<Option<Tensor>> {
            Ok(Some(match acc {
                Some(a) => (a + x)?,
                None => x,
            }))
        };
        for (start, len) in self.blocks(q, k_r.dim(2)?)? {
            let qb = q.narrow(2, start, len)?.contiguous()?;
            let gb = grad.narrow(2, start, len)?.contiguous()?;
            let (p, capped) = self.probs(&qb, &k_r, start, tq)?;
            dv = add(dv, batched_matmul(&p.t()?, &gb)?)?;
            let dp = batched_matmul(&gb, &v_r.t()?)?;
            let causal = self.causal_offset(k_r.dim(2)?, tq, start);
            let ds = match (&capped, self.softcap) {
                (Some(capped), Some(cap)) => {
                    let d_capped = softmax_backward(&p, &dp, 1.0, causal)?;
                    // capped = cap·tanh(scale·s/cap): d/ds = scale·(1 − (capped/cap)²).
                    let dtanh = (1.0 - (capped / cap)?.sqr()?)?;
                    ((d_capped * dtanh)? * self.scale)?
                }
                _ => softmax_backward(&p, &dp, self.scale, causal)?,
            };
            drop((p, dp));
            dq.push(batched_matmul(&ds, &k_r)?);
            dk = add(dk, batched_matmul(&ds.t()?, &qb)?)?;
        }
        let dq = Tensor::cat(&dq, 2)?;
        let dk = sum_heads(&dk.expect("at least one query block"), self.n_rep)?;
        let dv = sum_heads(&dv.expect("at least one query block"), self.n_rep)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests_support::{max_diff as diff, randn, vjp};
    use candle_core::{Device, Var};

    /// `attention_softmax` with the causal mask on the CPU: the fused pass (untracked scores)
    /// and autograd's composition (tracked scores) give the same probabilities, and tracked
    /// scores get their gradient.
    #[test]
    fn causal_softmax_is_fused_only_where_no_gradient_flows() {
        let (t, scale) = (6, 0.7);
        let s = randn(&[2, 3, t, t], 4);
        let mask = causal_mask(t, DType::F32, &Device::Cpu).unwrap();
        let fused = attention_softmax(&s, Some(&mask), scale, true).unwrap();
        let plain = candle_nn::ops::softmax(
            &(&s * scale).unwrap().broadcast_add(&mask).unwrap(),
            D::Minus1,
        )
        .unwrap();
        assert!(diff(&fused, &plain) < 1e-6);
        let v = Var::from_tensor(&s).unwrap();
        let tracked = attention_softmax(v.as_tensor(), Some(&mask), scale, true).unwrap();
        assert!(diff(&tracked, &plain) < 1e-6);
        let g = vjp(&tracked, &randn(&[2, 3, t, t], 5));
        assert!(g.get(v.as_tensor()).is_some());
    }

    /// The attention op's output and gradients equal those of the same computation in plain
    /// candle ops (grouped heads, a causal mask, with and without a soft cap).
    #[test]
    fn attention_op_gradients_equal_autograd() {
        let (b, h, kv, t, d) = (2, 4, 2, 6, 8);
        let q = Var::from_tensor(&randn(&[b, h, t, d], 1)).unwrap();
        let k = Var::from_tensor(&randn(&[b, kv, t, d], 2)).unwrap();
        let v = Var::from_tensor(&randn(&[b, kv, t, d], 3)).unwrap();
        let up = randn(&[b, h, t, d], 4);
        let mask = causal_mask(t, DType::F32, &Device::Cpu).unwrap();
        for softcap in [None, Some(1.5)] {
            let fused = attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                Some(&mask),
                0.3,
                softcap,
                true,
            )
            .unwrap();
            let kr = repeat_heads(k.as_tensor(), 2).unwrap();
            let vr = repeat_heads(v.as_tensor(), 2).unwrap();
            let mut s = (q.as_tensor().matmul(&kr.t().unwrap()).unwrap() * 0.3).unwrap();
            if let Some(cap) = softcap {
                s = ((s / cap).unwrap().tanh().unwrap() * cap).unwrap();
            }
            let p = candle_nn::ops::softmax(&s.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
            let plain = p.matmul(&vr).unwrap();
            assert!(diff(&fused, &plain) < 1e-5);
            // In blocks of 2 queries (3 blocks), with the causal mask from indices: the same.
            let blocked = attention_in_blocks(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                Some(&mask),
                0.3,
                softcap,
                true,
                b * h * t * 2,
            )
            .unwrap();
            assert!(diff(&blocked, &plain) < 1e-5);
            let gb = vjp(&blocked, &up);
            let gp2 = vjp(&plain, &up);
            for x in [&q, &k, &v] {
                let d = diff(
                    gb.get(x.as_tensor()).unwrap(),
                    gp2.get(x.as_tensor()).unwrap(),
                );
                assert!(d < 1e-5, "blocks: gradient differs by {d}");
            }
            let gf = vjp(&fused, &up);
            let gp = vjp(&plain, &up);
            for x in [&q, &k, &v] {
                let d = diff(
                    gf.get(x.as_tensor()).unwrap(),
                    gp.get(x.as_tensor()).unwrap(),
                );
                assert!(d < 1e-5, "softcap {softcap:?}: gradient differs by {d}");
            }
        }
    }
}
