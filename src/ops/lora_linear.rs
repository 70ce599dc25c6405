//! A projection with a LoRA adapter as one autograd op on `(x, A, B)`, the GPU path's form of
//! `base(x) + lora(x)`:
//!
//! ```text
//! y  = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ
//! dx = dy·W + drop(s·dy·B·A)        dA = (s·dy·B)ᵀ·drop(x)        dB = (s·dy)ᵀ·(drop(x)·Aᵀ)
//! ```
//!
//! W (dequantized from NF4, or dense) and drop(x) are recomputed in the backward pass, never
//! kept; the dropout mask is a hash of the seed (`ops::dropout`), so the backward regenerates
//! it. candle's autograd of the same expression keeps both and runs a chain of casts, scalings,
//! zero-filled gradient buffers and additions back; the reference path (CPU, Metal) still runs
//! that chain, and tests compare the two.

use candle_core::{DType, Device, Tensor};

use super::{AsCustomOp3, TensorOp3};
use crate::ops::linear_with;

/// The frozen `[out, in]` matrix of a projection, made on demand (dequantized, or a dense tensor).
pub trait FrozenMatrix: Send + Sync + 'static {
    fn matrix(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor>;
}

impl FrozenMatrix for Tensor {
    fn matrix(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.to_device(device)?.to_dtype(dtype)
    }
}

/// `x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ`, with `a` `[r, in]` and `b` `[out, r]` (f32 variables; computed in
/// `x`'s dtype), dropout `p` drawn from `seed` (`None`: no dropout).
pub fn lora_linear<W: FrozenMatrix>(
    x: &Tensor,
    base: W,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    dropout: Option<(u64, f32)>,
) -> candle_core::Result<Tensor> {
    let op = LoraLinear {
        base,
        scaling,
        dropout: dropout.filter(|&(_, p)| p > 0.0),
    };
    super::whole(x)?.apply_op3(a, b, AsCustomOp3(op))
}

pub(crate) struct LoraLinear<W> {
    pub base: W,
    pub scaling: f64,
    pub dropout: Option<(u64, f32)>,
}

impl<W: FrozenMatrix> LoraLinear<W> {
    fn dropped(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.dropout {
            Some((seed, p)) => super::dropout(x, seed, p),
            None => Ok(x.clone()),
        }
    }
}

impl<W: FrozenMatrix> TensorOp3 for LoraLinear<W> {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let y = linear_with(x, &self.base.matrix(dtype, x.device())?)?;
        let _p = crate::profile::scope("lora", x.device());
        let h = linear_with(&self.dropped(x)?, &a.to_dtype(dtype)?)?;
        y + (linear_with(&h, &b.to_dtype(dtype)?)? * self.scaling)?
    }

    fn backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("lora_linear.backward", x.device());
        let dtype = x.dtype();
        let (a_c, b_c) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
        let in_f = a.dim(1)?;
        let out_f = b.dim(0)?;
        let rows = x.elem_count() / in_f;
        let dy = dy.to_dtype(dtype)?.reshape((rows, out_f))?;
        let w = self.base.matrix(dtype, x.device())?;
        let mut dx = dy.matmul(&w)?;
        drop(w);
        let xd = self.dropped(x)?.reshape((rows, in_f))?;
        let h = xd.matmul(&a_c.t()?)?;
        let dy_s = (dy * self.scaling)?;
        let db = dy_s.t()?.matmul(&h)?;
        let dh = dy_s.matmul(&b_c)?;
        let da = dh.t()?.matmul(&xd)?;
        dx = (dx + self.dropped(&dh.matmul(&a_c)?)?)?;
        Ok((
            Some(dx.reshape(x.shape())?),
            Some(da.to_dtype(a.dtype())?),
            Some(db.to_dtype(b.dtype())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests_support::{max_diff as diff, randn, vjp};
    use candle_core::Var;

    /// The op's output and its gradients of x, A and B equal candle autograd of the same
    /// expression (dense base, dropout on), as the reference path computes it.
    #[test]
    fn lora_linear_gradients_equal_autograd() {
        let (rows, in_f, out_f, r) = (13, 24, 20, 4);
        let w = randn(&[out_f, in_f], 1);
        let x = Var::from_tensor(&randn(&[rows, in_f], 2)).unwrap();
        let a = Var::from_tensor(&randn(&[r, in_f], 3)).unwrap();
        let b = Var::from_tensor(&randn(&[out_f, r], 4)).unwrap();
        let up = randn(&[rows, out_f], 5);
        let (seed, p, s) = (11, 0.3, 1.5);
        let fused = lora_linear(
            x.as_tensor(),
            w.clone(),
            a.as_tensor(),
            b.as_tensor(),
            s,
            Some((seed, p)),
        )
        .unwrap();
        let xd = crate::ops::dropout(x.as_tensor(), seed, p).unwrap();
        let plain = (linear_with(x.as_tensor(), &w).unwrap()
            + (linear_with(&linear_with(&xd, a.as_tensor()).unwrap(), b.as_tensor()).unwrap() * s)
                .unwrap())
        .unwrap();
        assert!(diff(&fused, &plain) < 1e-5);
        let (gf, gp) = (vjp(&fused, &up), vjp(&plain, &up));
        for v in [&x, &a, &b] {
            let d = diff(
                gf.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "gradient differs by {d}");
        }
        // Dropout is on: the masked input changes the result.
        let undropped =
            lora_linear(x.as_tensor(), w, a.as_tensor(), b.as_tensor(), s, None).unwrap();
        assert!(diff(&fused, &undropped) > 1e-3);
    }
}
