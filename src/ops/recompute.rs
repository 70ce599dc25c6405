//! Activation checkpointing: a layer run without keeping its activations, recomputed in the
//! backward pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Tensor, TensorId, Var};

use super::TensorOp;

// Activation checkpointing.

/// Gradients of variables computed inside recomputed layers, where the outer backward pass
/// cannot see them. The training loop adds them to the gradients it reads from the graph.
#[derive(Default)]
pub struct GradSink(Mutex<HashMap<TensorId, Tensor>>);

impl GradSink {
    pub fn add(&self, var: &Var, grad: Tensor) -> candle_core::Result<()> {
        let mut map = self.0.lock().expect("grad sink poisoned");
        let sum = match map.remove(&var.id()) {
            Some(acc) => (acc + grad)?,
            None => grad,
        };
        map.insert(var.id(), sum);
        Ok(())
    }

    pub fn take(&self, var: &Var) -> Option<Tensor> {
        self.0.lock().expect("grad sink poisoned").remove(&var.id())
    }

    pub fn clear(&self) {
        self.0.lock().expect("grad sink poisoned").clear();
    }
}

/// A function of one tensor and some variables that can be run again identically (its
/// randomness fixed by a seed).
pub trait Recomputable: Send + Sync + 'static {
    fn run(&self, x: &Tensor) -> crate::error::Result<Tensor>;
    fn variables(&self) -> Vec<Var>;
}

/// Runs `f` without keeping its activations; the backward pass runs it again on the saved
/// input, backpropagates through that copy, hands the variables' gradients to `sink` and
/// returns the input's gradient. Memory: one input per checkpointed layer instead of every
/// activation of every layer.
pub struct Recompute<F> {
    pub f: F,
    pub sink: Arc<GradSink>,
}

impl<F: Recomputable> TensorOp for Recompute<F> {
    fn name(&self) -> &'static str {
        "recompute"
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.f.run(x).map_err(candle_core::Error::wrap)
    }

    fn backward(
        &self,
        x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(x)?;
        let p = crate::profile::scope("recompute.forward", x.device());
        let y = self
            .f
            .run(x.as_tensor())
            .map_err(candle_core::Error::wrap)?;
        drop(p);
        let _p = crate::profile::scope("recompute.backward", x.device());
        // d/dθ Σ(y ⊙ g) = (∂y/∂θ)ᵀ g: the vector-Jacobian product the outer pass asks for.
        let grads = (y * grad_y.detach())?.sum_all()?.backward()?;
        for v in self.f.variables() {
            if let Some(g) = grads.get(v.as_tensor()) {
                self.sink.add(&v, g.clone())?;
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}
