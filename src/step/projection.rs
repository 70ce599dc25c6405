//! A projection and its LoRA adapter, forward and backward as two plain calls (no autograd op):
//!
//! ```text
//! y  = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ
//! dx = dy·W + drop(s·dy·B·A)        dA += (s·dy·B)ᵀ·drop(x)        dB += (s·dy)ᵀ·(drop(x)·Aᵀ)
//! ```
//!
//! W is dequantized again in the backward pass and drop(x) regenerated from its seed; the
//! frozen bias gets no gradient.

use candle_core::{DType, Tensor};

use super::{LoraCasts, LoraGrads};
use crate::error::Result;
use crate::model::decoder::{FrozenWeight, Linear};
use crate::ops::linear_with;
use crate::ops::{FrozenMatrix, LoraLinear, TensorOp3};
use crate::rng::KilnRng;

/// A projection as one forward pass calls it: its dropout seed is drawn when the pass is made
/// (in the reference path's order), so the backward pass regenerates the same mask.
#[derive(Clone)]
pub struct Projection<'a> {
    pub linear: &'a Linear,
    dropout: Option<(u64, f32)>,
    /// The adapter's A and B in the compute dtype (the CUDA path's GEMM operands; the
    /// reference op elsewhere takes the f32 masters).
    lora_ab: Option<(Tensor, Tensor)>,
}

impl<'a> Projection<'a> {
    /// Draws the projection's dropout seed from `rng`, as `Linear::forward` does; takes the
    /// adapter's matrices in `dtype` from `casts`.
    pub fn new(
        linear: &'a Linear,
        rng: &mut KilnRng,
        casts: &LoraCasts,
        dtype: DType,
    ) -> Result<Self> {
        let dropout = match linear.active_lora() {
            Some(l) if l.dropout > 0.0 => Some((rng.next_seed(), l.dropout)),
            _ => None,
        };
        let lora_ab = match linear.active_lora() {
            Some(l) => Some((casts.get(&l.a, dtype)?, casts.get(&l.b, dtype)?)),
            None => None,
        };
        Ok(Self {
            linear,
            dropout,
            lora_ab,
        })
    }

    /// This projection applied to rows `first..` of its input alone (a tile of tokens): the
    /// dropout mask those rows have in the whole input (`first` a multiple of 4).
    pub fn rows_from(&self, first: usize) -> Result<Projection<'a>> {
        let mut p = self.clone();
        if let (Some((seed, prob)), Some(lora)) = (self.dropout, self.linear.active_lora()) {
            let in_features = lora.a.as_tensor().dim(1)?;
            let offset = (first * in_features) as u64;
            p.dropout = Some((crate::ops::dropout_seed_at(seed, offset), prob));
        }
        Ok(p)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cuda() {
            return self.forward_cuda(x);
        }
        let mut y = match (self.linear.active_lora(), &self.linear.base) {
            // Detached: a variable would make every op downstream record an autograd graph.
            (Some(lora), FrozenWeight::Nf4(q)) => self.with_lora(q.clone(), lora.scaling).forward(
                x,
                &lora.a.as_tensor().detach(),
                &lora.b.as_tensor().detach(),
            )?,
            (Some(lora), FrozenWeight::Dense(w)) => {
                self.with_lora(w.clone(), lora.scaling).forward(
                    x,
                    &lora.a.as_tensor().detach(),
                    &lora.b.as_tensor().detach(),
                )?
            }
            (None, FrozenWeight::Nf4(q)) => q.forward(x)?,
            (None, FrozenWeight::Dense(w)) => linear_with(x, w)?,
        };
        if let Some(bias) = &self.linear.bias {
            y = y.broadcast_add(bias)?;
        }
        Ok(y)
    }

    /// Whether the backward pass reads the forward's input: only for the adapter's gradients
    /// (a frozen projection's input gradient is `dy·W`), so callers recompute it only then.
    pub fn needs_input(&self) -> bool {
        self.linear.active_lora().is_some()
    }

    /// The input's gradient given the output's, added to `dx` when given (projections that
    /// share an input sum their gradients there); the adapter's gradients are added to `grads`.
    /// `x`, the forward's input, may be `None` where [`Self::needs_input`] says so.
    pub fn backward(
        &self,
        x: Option<&Tensor>,
        dy: &Tensor,
        dx: Option<Tensor>,
        grads: &mut LoraGrads,
    ) -> Result<Tensor> {
        if dy.device().is_cuda() {
            return self.backward_cuda(x, dy, dx, grads);
        }
        let own = self.backward_reference(x, dy, grads)?;
        Ok(match dx {
            Some(acc) => (acc + own)?,
            None => own,
        })
    }

    /// The CPU's (and any non-CUDA device's) backward: the reference op's written-out backward.
    fn backward_reference(
        &self,
        x: Option<&Tensor>,
        dy: &Tensor,
        grads: &mut LoraGrads,
    ) -> Result<Tensor> {
        let Some(lora) = self.linear.active_lora() else {
            return self.frozen_input_grad(dy);
        };
        let x = self.input(x)?;
        let (a, b) = (lora.a.as_tensor().detach(), lora.b.as_tensor().detach());
        let (dx, da, db) = match &self.linear.base {
            FrozenWeight::Nf4(q) => self
                .with_lora(q.clone(), lora.scaling)
                .backward(x, &a, &b, dy)?,
            FrozenWeight::Dense(w) => self
                .with_lora(w.clone(), lora.scaling)
                .backward(x, &a, &b, dy)?,
        };
        let missing = || crate::error::KilnError::Train("LoRA backward gave no gradient".into());
        grads.add(&lora.a, da.ok_or_else(missing)?)?;
        grads.add(&lora.b, db.ok_or_else(missing)?)?;
        dx.ok_or_else(missing)
    }

    /// The frozen matrix `[out, in]` in `x`'s dtype, on its device (dequantized on demand).
    fn matrix(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.linear.base {
            FrozenWeight::Nf4(q) => q.matrix(x.dtype(), x.device())?,
            FrozenWeight::Dense(w) => w.matrix(x.dtype(), x.device())?,
        })
    }

    /// The forward's input, which the adapter's gradients need.
    fn input<'x>(&self, x: Option<&'x Tensor>) -> Result<&'x Tensor> {
        x.ok_or_else(|| {
            crate::error::KilnError::Train("a LoRA projection's backward needs its input".into())
        })
    }

    /// `dy·W` shaped as the input (`dy`'s leading dimensions, W's input features).
    fn frozen_input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        let w = self.matrix(dy)?;
        let (out_f, in_f) = w.dims2()?;
        let rows = dy.elem_count() / out_f;
        Ok(dy
            .reshape((rows, out_f))?
            .matmul(&w)?
            .reshape(input_shape(dy, in_f))?)
    }

    /// `drop(x)`, regenerated from the pass's seed.
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.dropout {
            Some((seed, p)) => crate::ops::dropout(x, seed, p)?,
            None => x.clone(),
        })
    }

    /// CUDA: the adapter's path is added into the base GEMM's output by a second GEMM (β = 1,
    /// α = s); no element-wise pass.
    fn forward_cuda(&self, x: &Tensor) -> Result<Tensor> {
        use crate::cuda::gemm_into;
        let in_f = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / in_f;
        let x2 = x.reshape((rows, in_f))?;
        let w = self.matrix(x)?;
        let mut y = x2.matmul(&w.t()?)?;
        drop(w);
        if let (Some(lora), Some((a, b))) = (self.linear.active_lora(), &self.lora_ab) {
            let h = self.dropped(&x2)?.matmul(&a.t()?)?;
            gemm_into(&y, &h, false, b, true, lora.scaling as f32, 1.0)?;
        }
        if let Some(bias) = &self.linear.bias {
            y = y.broadcast_add(bias)?;
        }
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("a matrix") = y.dim(1)?;
        Ok(y.reshape(shape)?)
    }

    /// CUDA: dx (+)= dy·W + drop(s·dy·B·A), dB += s·dyᵀ·(drop(x)·Aᵀ), dA += (s·dy·B)ᵀ·drop(x),
    /// each a GEMM accumulating into its output (the LoRA gradients in f32), the masked term
    /// added in place by the dropout kernel.
    fn backward_cuda(
        &self,
        x: Option<&Tensor>,
        dy: &Tensor,
        dx: Option<Tensor>,
        grads: &mut LoraGrads,
    ) -> Result<Tensor> {
        use crate::cuda::gemm_into;
        let w = self.matrix(dy)?;
        let (out_f, in_f) = w.dims2()?;
        let rows = dy.elem_count() / out_f;
        let shape = input_shape(dy, in_f);
        let dy = dy.reshape((rows, out_f))?.contiguous()?;
        let dx = match dx {
            Some(acc) => {
                let acc = acc.reshape((rows, in_f))?;
                gemm_into(&acc, &dy, false, &w, false, 1.0, 1.0)?;
                acc
            }
            None => dy.matmul(&w)?,
        };
        drop(w);
        if let (Some(lora), Some((a, b))) = (self.linear.active_lora(), &self.lora_ab) {
            let x = self.input(x)?;
            let s = lora.scaling as f32;
            let xd = self.dropped(&x.reshape((rows, in_f))?)?;
            let h = xd.matmul(&a.t()?)?;
            gemm_into(grads.slot(&lora.b)?, &dy, true, &h, false, s, 1.0)?;
            drop(h);
            // dh = s·dy·B, the scale inside the GEMM (β = 0: the new buffer is not read).
            let dh = crate::cuda::uninit_like(&dy, (rows, b.dim(1)?))?;
            gemm_into(&dh, &dy, false, b, false, s, 0.0)?;
            gemm_into(grads.slot(&lora.a)?, &dh, true, &xd, false, 1.0, 1.0)?;
            drop(xd);
            match self.dropout {
                None => gemm_into(&dx, &dh, false, a, false, 1.0, 1.0)?,
                Some((seed, p)) => crate::cuda::dropout_add_into(&dx, &dh.matmul(a)?, seed, p)?,
            }
        }
        Ok(dx.reshape(shape)?)
    }

    fn with_lora<W: FrozenMatrix>(&self, base: W, scaling: f64) -> LoraLinear<W> {
        LoraLinear {
            base,
            scaling,
            dropout: self.dropout,
        }
    }
}

/// The shape of a projection's input given its output's gradient: `dy`'s leading dimensions and
/// `in_f` features.
fn input_shape(dy: &Tensor, in_f: usize) -> Vec<usize> {
    let mut shape = dy.dims().to_vec();
    *shape
        .last_mut()
        .expect("a projection's gradient has a feature dimension") = in_f;
    shape
}
