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
}

impl LoraAdapter {
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
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling: s.scaling(),
            dropout: s.dropout,
        })
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
