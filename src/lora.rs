//! LoRA: `y = base(x) + (dropout(x) · Aᵀ · Bᵀ) · scaling`, with A `[r, in]` and B `[out, r]` kept
//! in f32 as the only trainable variables (ARCHITECTURE.md, decision 2). Init as PEFT: A from
//! kaiming-uniform(a=√5), i.e. U(−1/√in, 1/√in), and B = 0.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;
use crate::rng::KilnRng;

/// The adapter settings of a run, as PEFT's `LoraConfig` names them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    /// Module names (`q_proj`, ...) that get an adapter.
    pub target_modules: Vec<String>,
}

impl LoraSettings {
    /// The `[lora]` section of a recipe.
    pub fn of(recipe: &crate::recipe::Recipe) -> Self {
        Self {
            r: recipe.lora.r,
            alpha: recipe.lora.lora_alpha,
            dropout: recipe.lora.lora_dropout,
            use_rslora: recipe.lora.use_rslora,
            target_modules: recipe.target_modules().expect("validated on load"),
        }
    }

    /// The settings the adapters train with: a preference method's `disable_dropout` (on by
    /// default, as in TRL) turns their dropout off; `of` keeps the recipe's for the saved config.
    pub fn for_training(recipe: &crate::recipe::Recipe) -> Self {
        let mut s = Self::of(recipe);
        let method = recipe.training.method;
        let pref = recipe.preference.clone().unwrap_or_default();
        if method.is_preference() && pref.disable_dropout {
            s.dropout = 0.0;
        }
        s
    }
}

impl LoraSettings {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|m| m == module)
    }
}

pub struct LoraAdapter {
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
    pub dropout: f32,
    /// Switched off, the projection computes its base alone, or with a frozen copy of the
    /// adapter when it has one: DPO's reference (the decoder's `as_reference`), not a
    /// second model.
    off: std::sync::atomic::AtomicBool,
    /// The adapter as training found it (`lora.init_adapter`), which is then the reference.
    frozen: std::sync::OnceLock<(Tensor, Tensor)>,
}

impl LoraAdapter {
    /// An adapter of the given matrices, switched on.
    pub fn from_parts(a: Var, b: Var, scaling: f64, dropout: f32) -> Self {
        Self {
            a,
            b,
            scaling,
            dropout,
            off: Default::default(),
            frozen: Default::default(),
        }
    }

    /// Keeps a copy of the current matrices as the reference (once).
    pub fn freeze_reference(&self) -> Result<()> {
        let copy = (self.a.as_tensor().copy()?, self.b.as_tensor().copy()?);
        let _ = self.frozen.set(copy);
        Ok(())
    }

    /// Whether [`Self::freeze_reference`] kept a copy (the reference is then not the base).
    pub fn has_frozen_reference(&self) -> bool {
        self.frozen.get().is_some()
    }

    /// With the adapter switched off, the frozen reference's update for `x` (none without one).
    pub fn reference_forward(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.frozen.get() else {
            return Ok(None);
        };
        let dtype = x.dtype();
        let h = crate::ops::linear_with(x, &a.to_dtype(dtype)?)?;
        let y = crate::ops::linear_with(&h, &b.to_dtype(dtype)?)?;
        Ok(Some((y * self.scaling)?))
    }

    /// Whether the adapter takes part in the projection.
    pub fn is_on(&self) -> bool {
        !self.off.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn switch(&self, on: bool) {
        self.off.store(!on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn new(
        in_f: usize,
        out_f: usize,
        s: &LoraSettings,
        rng: &mut KilnRng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_f as f32).sqrt();
        let a = Tensor::from_vec(rng.uniform(s.r * in_f, -bound, bound), (s.r, in_f), device)?;
        let b = Tensor::zeros((out_f, s.r), DType::F32, device)?;
        Ok(Self::from_parts(
            Var::from_tensor(&a)?,
            Var::from_tensor(&b)?,
            s.scaling(),
            s.dropout,
        ))
    }

    /// The low-rank update for input `x` (any rank, last dim `in`), in `x`'s dtype.
    /// `dropout_rng` is given only in training.
    pub fn forward(&self, x: &Tensor, dropout_rng: Option<&mut KilnRng>) -> Result<Tensor> {
        let _p = crate::profile::scope("lora", x.device());
        let x = match dropout_rng {
            Some(rng) if self.dropout > 0.0 => {
                crate::ops::dropout(x, rng.next_seed(), self.dropout)?
            }
            _ => x.clone(),
        };
        let dtype = x.dtype();
        let a = self.a.as_tensor().to_dtype(dtype)?;
        let b = self.b.as_tensor().to_dtype(dtype)?;
        let h = crate::ops::linear_with(&x, &a)?;
        let y = crate::ops::linear_with(&h, &b)?;
        Ok((y * self.scaling)?)
    }

    pub fn num_params(&self) -> usize {
        self.a.elem_count() + self.b.elem_count()
    }
}
