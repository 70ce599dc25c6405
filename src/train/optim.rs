//! AdamW exactly as `torch.optim.AdamW` computes it, the learning-rate schedules of
//! transformers' `get_*_schedule_with_warmup`, and global gradient-norm clipping as
//! `torch.nn.utils.clip_grad_norm_`. Written here rather than taken from candle-nn because
//! checkpoints must hold the moments (resume) and candle-nn's AdamW keeps them private.

use candle_core::{Tensor, Var};

use crate::error::Result;
use crate::recipe::Scheduler;

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken.
    pub step: usize,
    pub first_moments: Vec<Tensor>,
    pub second_moments: Vec<Tensor>,
}

impl AdamW {
    pub fn new(
        params: &[Var],
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        Ok(Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            first_moments: params
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
            second_moments: params
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// One step over `params` with `grads` each multiplied by `grad_scale` first (the clipping
    /// factor of [`clip_factor`]; 1 leaves them as they are). On CUDA, with f32 parameters, one
    /// fused launch updates every tensor in place; elsewhere candle ops do, per tensor.
    pub fn update(
        &mut self,
        params: &[Var],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        if fused_on_cuda(params.iter().map(|p| p.as_tensor()).chain(grads)) {
            let params: Vec<Tensor> = params.iter().map(|p| p.as_tensor().clone()).collect();
            crate::cuda::adamw(
                &params,
                grads,
                &self.first_moments,
                &self.second_moments,
                &crate::cuda::AdamWStep {
                    beta1: self.beta1,
                    beta2: self.beta2,
                    eps: self.eps,
                    weight_decay: self.weight_decay,
                    lr,
                    step: self.step as i32,
                    grad_scale,
                },
            )?;
            return Ok(());
        }
        let t = self.step as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2 = 1.0 - self.beta2.powi(t);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let scaled;
            let g = if grad_scale == 1.0 {
                g
            } else {
                scaled = (g * grad_scale)?;
                &scaled
            };
            let m = ((&self.first_moments[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.second_moments[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * self.weight_decay))?;
            let denom = ((v.sqrt()? / bias2.sqrt())? + self.eps)?;
            let update = ((&m / denom)? * (lr / bias1))?;
            p.set(&(decayed - update)?)?;
            self.first_moments[i] = m;
            self.second_moments[i] = v;
        }
        Ok(())
    }

    /// Gives the moments storage of their own (fresh copies), so that the fused update, which
    /// writes them in place, touches nothing else (resumed moments are shared with the loaded
    /// checkpoint).
    pub fn own_moments(&mut self) -> Result<()> {
        for m in self
            .first_moments
            .iter_mut()
            .chain(self.second_moments.iter_mut())
        {
            *m = m.copy()?;
        }
        Ok(())
    }
}

/// Whether the fused CUDA kernels apply: f32 contiguous tensors on a CUDA device
/// (`KILN_FUSED_OPTIMIZER=0` turns them off, to compare).
fn fused_on_cuda<'a>(mut tensors: impl Iterator<Item = &'a Tensor>) -> bool {
    std::env::var("KILN_FUSED_OPTIMIZER").as_deref() != Ok("0")
        && tensors.all(|t| {
            t.device().is_cuda() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
        })
}

/// The learning-rate multiplier at optimizer step `step` (0-based) of `total`.
pub fn lr_multiplier(kind: Scheduler, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match kind {
        Scheduler::Constant => 1.0,
        Scheduler::Linear => (1.0 - progress).max(0.0),
        Scheduler::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

/// The global L2 norm of `grads`, as `torch.nn.utils.clip_grad_norm_` measures it: on CUDA one
/// fused reduction over every tensor and one read back.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    if fused_on_cuda(grads.iter()) {
        return Ok(crate::cuda::grad_norm(grads)?);
    }
    let mut sum = 0f64;
    for g in grads {
        sum += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// What clipping multiplies the gradients by: `max_norm / (norm + 1e-6)` when the norm exceeds
/// `max_norm` (> 0), else 1 (torch's `clip_grad_norm_`).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            return coef;
        }
    }
    1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        // get_cosine_schedule_with_warmup(warmup=2, total=10)
        assert_eq!(lr_multiplier(Scheduler::Cosine, 0, 2, 10), 0.0);
        assert_eq!(lr_multiplier(Scheduler::Cosine, 1, 2, 10), 0.5);
        assert_eq!(lr_multiplier(Scheduler::Cosine, 2, 2, 10), 1.0);
        assert!((lr_multiplier(Scheduler::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!(lr_multiplier(Scheduler::Cosine, 10, 2, 10).abs() < 1e-12);
        assert!((lr_multiplier(Scheduler::Linear, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_multiplier(Scheduler::Constant, 9, 2, 10), 1.0);
    }

    #[test]
    fn adamw_first_step_matches_torch() {
        // torch: p=1.0, g=0.5, lr=0.1, wd=0.01 -> p = 1*(1-0.001) - 0.1*1 = 0.899 (first step
        // moves by lr * sign(g) up to eps).
        let p =
            Var::from_tensor(&Tensor::new(&[1.0f32], &candle_core::Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&p), 0.9, 0.999, 1e-8, 0.01).unwrap();
        let g = Tensor::new(&[0.5f32], &candle_core::Device::Cpu).unwrap();
        opt.update(std::slice::from_ref(&p), &[g], 0.1, 1.0)
            .unwrap();
        let v = p.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((v - 0.899).abs() < 1e-6, "{v}");
    }
}
