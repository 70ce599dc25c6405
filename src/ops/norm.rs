//! RMSNorm and rotary embeddings as single ops (fused forward kernels: kiln's RMSNorm and
//! candle-nn's rotation on CUDA; the backward passes written out).

use candle_core::{DType, Tensor, D};

use super::{apply, TensorOp};

/// `x / rms(x) · w` over the last dimension: one fused kernel forward (f32 arithmetic),
/// and `dx = r·(g⊙w) − x·r³·mean(x⊙g⊙w)` backward, with `r = 1/rms(x)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    apply(
        x,
        RmsNormOp {
            weight: w.clone(),
            eps,
        },
    )
}

struct RmsNormOp {
    weight: Tensor,
    eps: f64,
}

impl TensorOp for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    /// kiln's kernel on CUDA (the one the explicit step runs, so both paths normalize
    /// identically), candle-nn's elsewhere.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cuda() {
            return crate::cuda::rms_norm(x, &self.weight, self.eps);
        }
        candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)
    }

    fn backward(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(rms_norm_backward(x, g, &self.weight, self.eps, None)?))
    }
}

/// The gradient of [`rms_norm`]'s input `x` given its output's gradient `g`, plus `residual`
/// when given (the gradient reaching `x` around the norm: a pre-norm block's input gradient in
/// one pass). One CUDA kernel; elsewhere candle ops in f32.
pub fn rms_norm_backward(
    x: &Tensor,
    g: &Tensor,
    w: &Tensor,
    eps: f64,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let _p = crate::profile::scope("rms_norm.backward", x.device());
    if x.device().is_cuda() {
        return crate::cuda::rms_norm_backward(x, g, w, eps, residual);
    }
    let dx = rms_norm_backward_f32(x, g, w, eps)?.to_dtype(x.dtype())?;
    match residual {
        Some(r) => dx + r,
        None => Ok(dx),
    }
}

/// [`rms_norm_backward`]'s norm term in candle ops, in f32.
fn rms_norm_backward_f32(
    x: &Tensor,
    g: &Tensor,
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let gw = g
        .to_dtype(DType::F32)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let dot = (&xf * &gw)?.mean_keepdim(D::Minus1)?;
    gw.broadcast_mul(&r)? - xf.broadcast_mul(&(r.powf(3.0)? * dot)?)?
}

/// Rotary embedding of `x` `[B, H, T, D]` with `cos`, `sin` `[T, D/2]` or `[B, T, D/2]`
/// (rotate-half layout): candle-nn's fused kernel, and its inverse rotation backward.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    apply(
        x,
        RopeOp {
            cos: cos.clone(),
            sin: sin.clone(),
        },
    )
}

struct RopeOp {
    cos: Tensor,
    sin: Tensor,
}

impl TensorOp for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::rotary_emb::rope(x, &self.cos, &self.sin)
    }

    /// A rotation's transpose is the rotation by the opposite angle.
    fn backward(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(candle_nn::rotary_emb::rope(
            &g.contiguous()?,
            &self.cos,
            &self.sin.neg()?,
        )?))
    }
}
