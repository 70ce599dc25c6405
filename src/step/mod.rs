//! The training step written out, as llm.c writes it: each decoder layer's forward keeps what
//! its backward needs, and the backward returns the input's gradient and adds the LoRA
//! gradients to one store. No autograd graph: nothing computes a gradient nobody needs (the
//! frozen weights', the embedding's), no gradient buffer is zero-filled and then added to, and
//! no op copies its inputs or output.
//!
//! This is the training path on CUDA and the CPU. candle's autograd over
//! `Llama::forward_hidden_with` and `Llama::loss_sum` stays the reference: Metal trains with it,
//! a model this step does not cover yet trains with it (with a one-line notice on CUDA), and
//! tests compare the two, values and gradients.

mod layer;
mod projection;

pub use layer::mlp_rows;

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Tensor, TensorId, Var, D};

use crate::cuda::offload;
use crate::data::batch::Batch;
use crate::error::Result;
use crate::model::config::Activation;
use crate::model::decoder::{Decoder, FeedForward};
use crate::ops::distill::{head_loss_and_grad, Distill, LossSums};
use crate::rng::KilnRng;

/// The LoRA gradients of a step, summed per variable (f32).
#[derive(Default)]
pub struct LoraGrads(HashMap<TensorId, Tensor>);

impl LoraGrads {
    pub fn add(&mut self, var: &Var, grad: Tensor) -> Result<()> {
        let sum = match self.0.remove(&var.id()) {
            Some(acc) => (acc + grad)?,
            None => grad,
        };
        self.0.insert(var.id(), sum);
        Ok(())
    }

    /// The f32 sum of `var`'s gradients, made (zeros) on first use, for GEMMs to add into.
    pub fn slot(&mut self, var: &Var) -> Result<&Tensor> {
        Ok(match self.0.entry(var.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                var.as_tensor()
                    .zeros_like()?
                    .to_dtype(candle_core::DType::F32)?,
            ),
        })
    }

    pub fn take(&mut self, var: &Var) -> Option<Tensor> {
        self.0.remove(&var.id())
    }
}

/// The adapters' matrices in the compute dtype, cast once for all the micro-batches of an
/// optimizer step (the f32 masters change only when the optimizer steps): a cast is a launch
/// per matrix per use otherwise, four a projection each micro-batch.
#[derive(Default)]
pub struct LoraCasts(RefCell<HashMap<TensorId, Tensor>>);

impl LoraCasts {
    /// `var` in `dtype`, detached (cast on first use).
    pub fn get(&self, var: &Var, dtype: DType) -> Result<Tensor> {
        if let Some(t) = self
            .0
            .borrow()
            .get(&var.id())
            .filter(|t| t.dtype() == dtype)
        {
            return Ok(t.clone());
        }
        let t = var.as_tensor().detach().to_dtype(dtype)?;
        self.0.borrow_mut().insert(var.id(), t.clone());
        Ok(t)
    }
}

/// Why the explicit step cannot train `model` (`None`: it can). What it does not cover yet:
/// Gemma's (1 + w) norms and scaled embeddings, Gemma 2's sandwich norms and soft caps,
/// GELU MLPs, sliding windows shorter than the rows, Gemma 3's local RoPE, mixtures of experts.
pub fn unsupported(model: &Decoder, rows: usize) -> Option<String> {
    let c = &model.config;
    if c.is_gemma() {
        return Some(format!(
            "{}'s scaled embeddings and (1 + w) norms",
            c.model_type
        ));
    }
    if c.final_softcap.is_some() {
        return Some("final logit soft-capping".into());
    }
    if c.sliding_window.is_some_and(|w| rows > w) {
        return Some("a sliding window shorter than the rows".into());
    }
    if model.inv_freq_local.is_some() {
        return Some("local RoPE tables".into());
    }
    for layer in &model.layers {
        if layer.pre_feedforward_layernorm.is_some() || layer.post_feedforward_layernorm.is_some() {
            return Some("sandwich norms".into());
        }
        if layer.self_attn.softcap.is_some() {
            return Some("attention soft-capping".into());
        }
        match &layer.mlp {
            FeedForward::Moe(_) => return Some("mixture-of-experts layers".into()),
            FeedForward::Dense(m) if m.activation != Activation::Silu => {
                return Some("a non-SiLU MLP".into())
            }
            _ => {}
        }
    }
    None
}

/// Which path computes a step's gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPath {
    /// The explicit step on CUDA and the CPU where it covers the model, else the reference
    /// (Metal, which cannot be tested here, keeps the reference); `KILN_STEP=reference` (or
    /// `explicit`) overrides the choice.
    Auto,
    /// candle autograd.
    Reference,
    /// The explicit step wherever it covers the model (CPU included: tests compare the two).
    Explicit,
}

impl StepPath {
    /// Whether rows of length `rows` of `model` take the explicit step.
    pub fn explicit(self, model: &Decoder, rows: usize) -> bool {
        let covered = || unsupported(model, rows).is_none();
        match self {
            StepPath::Reference => false,
            StepPath::Explicit => covered(),
            StepPath::Auto => match std::env::var("KILN_STEP").ok().as_deref() {
                Some("reference") => false,
                Some("explicit") => covered(),
                _ => !model.device.is_metal() && covered(),
            },
        }
    }
}

/// An objective of its own (preference training): the final hidden rows `[B·T, H]` → the loss
/// sums and the gradient of the step's loss share with respect to the rows.
pub type RowsObjective<'a> = &'a dyn Fn(&Tensor) -> Result<(LossSums, Tensor)>;

/// One micro-batch forward and backward. Returns the summed token loss (f32 scalars on the
/// device: with `distill`, the distillation loss and its parts; with `objective`, the loss it
/// gives); adds the LoRA gradients of `grad_scale` times that sum (an objective's rows gradient
/// is its own) to `grads`. Draws dropout seeds from `rng` exactly as the reference path does, so
/// both give the same numbers.
#[allow(clippy::too_many_arguments)]
pub fn micro_batch(
    model: &Decoder,
    batch: &Batch,
    grad_scale: f64,
    rng: &mut KilnRng,
    grads: &mut LoraGrads,
    casts: &LoraCasts,
    distill: Option<Distill>,
    objective: Option<RowsObjective>,
) -> Result<LossSums> {
    let (b, t) = batch.inputs.dims2()?;
    let setup = model.pass_setup(b, t, batch.layout.as_ref())?;
    let seeds: Vec<u64> = model.layers.iter().map(|_| rng.next_seed()).collect();
    let mlp_rows = layer::mlp_rows(model.config.intermediate_size, model.mlp_tile_rows);

    // Forward: layers below `recomputed_layers` keep only their input (on the device, or
    // offloaded to the host) and run again in the backward pass.
    let offload = if model.offload_saved_inputs && model.recomputed_layers > 0 {
        Some(offload::Offload::new(&model.device)?)
    } else {
        None
    };
    let p = crate::profile::scope("forward", &model.device);
    let mut x = model.embed(&batch.inputs)?;
    let mut saved = Vec::with_capacity(model.layers.len());
    for (i, layer) in model.layers.iter().enumerate() {
        let (rope, mask) = model.layer_setup(i, &setup);
        let recomputed = i < model.recomputed_layers;
        // The copy to the host runs beside this layer's forward.
        let stored = match &offload {
            Some(o) if recomputed => Some(o.store(&x)?),
            _ => None,
        };
        let rng = &mut KilnRng::new(seeds[i]);
        let (y, s) = layer::forward(layer, &x, rope, mask, rng, casts, mlp_rows)?;
        if let (Some(o), Some(mut stored)) = (&offload, stored) {
            o.release(&mut stored)?;
            saved.push(Kept::Host(stored));
            x = y;
            continue;
        }
        saved.push(if recomputed {
            Kept::Input(x)
        } else {
            Kept::Saved(Box::new(s))
        });
        x = y;
    }
    // The last offloaded input comes back while the head and the loss run.
    let mut fetched = match (&offload, saved.last()) {
        (Some(o), Some(Kept::Host(top))) => Some(o.fetch(top)?),
        _ => None,
    };
    drop(p);

    let p = crate::profile::scope("loss", &model.device);
    let hidden = layer::norm(&model.norm, &x)?;
    let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
    let rows = hidden.flatten_to(D::Minus2)?;
    let (loss, d_hidden) = match objective {
        Some(objective) => objective(&rows)?,
        None => head_loss_and_grad(
            &rows,
            head,
            model.config.final_softcap,
            &batch.targets.flatten_all()?,
            &batch.weights.flatten_all()?,
            grad_scale,
            distill,
        )?,
    };
    drop((p, hidden));

    let _p = crate::profile::scope("backward", &model.device);
    let mut dx = crate::ops::rms_norm_backward(
        &x,
        &d_hidden.reshape(x.shape())?,
        &model.norm.weight,
        model.norm.eps,
        None,
    )?;
    drop((x, d_hidden));
    for (i, layer) in model.layers.iter().enumerate().rev() {
        let (rope, mask) = model.layer_setup(i, &setup);
        let input = match saved.pop().expect("one saved entry per layer") {
            Kept::Saved(s) => {
                dx = layer::backward(layer, *s, &dx, rope, grads)?;
                continue;
            }
            Kept::Input(x) => x,
            Kept::Host(stored) => {
                let o = offload.as_ref().expect("offloading");
                let x = o.ready(match fetched.take() {
                    Some(f) => f,
                    None => o.fetch(&stored)?,
                })?;
                // The next layer down's input comes back while this one is recomputed.
                if let Some(Kept::Host(next)) = saved.last() {
                    fetched = Some(o.fetch(next)?);
                }
                x
            }
        };
        let rng = &mut KilnRng::new(seeds[i]);
        let s = layer::replay(layer, &input, rope, mask, rng, casts, mlp_rows)?;
        drop(input);
        dx = layer::backward(layer, s, &dx, rope, grads)?;
    }
    Ok(loss)
}

/// The final hidden states (after the last norm) of a frozen model over `batch`, by the same
/// layer code the training step runs, keeping nothing for a backward: a distillation teacher's
/// pass. No dropout (a frozen model's adapter is loaded with none).
pub fn forward_hidden(model: &Decoder, batch: &Batch) -> Result<Tensor> {
    let (b, t) = batch.inputs.dims2()?;
    let setup = model.pass_setup(b, t, batch.layout.as_ref())?;
    let mlp_rows = layer::mlp_rows(model.config.intermediate_size, model.mlp_tile_rows);
    let casts = LoraCasts::default();
    // Dropout's generator, never drawn from (the adapter has no dropout).
    let rng = &mut KilnRng::new(0);
    let mut x = model.embed(&batch.inputs)?;
    for (i, layer) in model.layers.iter().enumerate() {
        let (rope, mask) = model.layer_setup(i, &setup);
        x = layer::forward(layer, &x, rope, mask, rng, &casts, mlp_rows)?.0;
    }
    layer::norm(&model.norm, &x)
}

/// What the forward pass left for a layer's backward.
enum Kept<'a> {
    /// Everything its backward needs (boxed: the other variants are a tensor).
    Saved(Box<layer::Saved<'a>>),
    /// Its input, to run it again.
    Input(Tensor),
    /// Its input in host memory, to bring back and run it again.
    Host(offload::Stored),
}
