//! The decoder every family runs on (Llama and the families `model/family.rs` describes as its
//! variations), written to read like the math: pre-norm attention with RoPE and grouped-query
//! heads, then a SwiGLU (or GeGLU) MLP or a mixture of experts. Base projections are frozen
//! (NF4 or dense); LoRA adapters ride on the targeted ones.

pub use crate::layout::PackedLayout;
pub use crate::ops::{causal_mask, masked_cross_entropy_sum};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};

use super::config::{Activation, ModelConfig, MoeLayout};
use crate::error::Result;
use crate::lora::LoraAdapter;
use crate::ops::linear_with;
use crate::ops::Nf4Linear;
use crate::ops::{self, GradSink, HeadLayout, Recomputable, Recompute};
use crate::rng::KilnRng;

/// The frozen part of a projection.
pub enum FrozenWeight {
    Nf4(Nf4Linear),
    Dense(Tensor),
}

/// A projection: frozen base weight, optional bias, optional LoRA adapter, and a tap through
/// which a caller may watch its inputs.
pub struct Linear {
    pub base: FrozenWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    pub tap: InputTap,
}

/// Watches the inputs of one projection while the model runs. The importance matrix
/// (`infer::imatrix`) attaches one per projection for the rows it measures.
pub trait InputObserver: Send + Sync {
    fn observe(&self, x: &Tensor) -> Result<()>;
}

/// A projection's place for an [`InputObserver`]: empty unless a caller has attached one.
#[derive(Default)]
pub struct InputTap(std::sync::RwLock<Option<Arc<dyn InputObserver>>>);

impl InputTap {
    pub fn attach(&self, observer: Arc<dyn InputObserver>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(observer);
    }

    pub fn detach(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn observe(&self, x: &Tensor) -> Result<()> {
        match self.0.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(observer) => observer.observe(x),
            None => Ok(()),
        }
    }
}

impl Linear {
    /// A projection with no adapter and no observer.
    pub fn frozen(base: FrozenWeight, bias: Option<Tensor>) -> Self {
        Self {
            base,
            bias,
            lora: None,
            tap: InputTap::default(),
        }
    }

    /// The adapter, when there is one and it is switched on.
    pub fn active_lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref().filter(|l| l.is_on())
    }

    pub fn forward(&self, x: &Tensor, rng: &mut Option<&mut KilnRng>) -> Result<Tensor> {
        self.tap.observe(x)?;
        if let (Some(lora), true) = (self.active_lora(), x.device().is_cuda()) {
            return self.forward_fused(x, lora, rng);
        }
        let mut y = match &self.base {
            FrozenWeight::Nf4(q) => q.forward(x)?,
            FrozenWeight::Dense(w) => linear_with(x, w)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(lora) = self.active_lora() {
            y = (y + lora.forward(x, rng.as_deref_mut())?)?;
        } else if let Some(frozen) = self.lora.as_ref().map(|l| l.reference_forward(x)) {
            if let Some(update) = frozen? {
                y = (y + update)?;
            }
        }
        Ok(y)
    }

    /// The GPU path: base and adapter as one op with its backward written out
    /// ([`ops::lora_linear`]); the same dropout seed is drawn as [`LoraAdapter::forward`] draws.
    fn forward_fused(
        &self,
        x: &Tensor,
        lora: &LoraAdapter,
        rng: &mut Option<&mut KilnRng>,
    ) -> Result<Tensor> {
        let dropout = match rng.as_deref_mut() {
            Some(r) if lora.dropout > 0.0 => Some((r.next_seed(), lora.dropout)),
            _ => None,
        };
        let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
        let mut y = match &self.base {
            FrozenWeight::Nf4(q) => ops::lora_linear(x, q.clone(), a, b, lora.scaling, dropout)?,
            FrozenWeight::Dense(w) => ops::lora_linear(x, w.clone(), a, b, lora.scaling, dropout)?,
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        Ok(y)
    }

    pub fn shape(&self) -> (usize, usize) {
        match &self.base {
            FrozenWeight::Nf4(q) => (q.weight().out_features(), q.weight().in_features()),
            FrozenWeight::Dense(w) => w.dims2().unwrap_or((0, 0)),
        }
    }
}

/// `x / rms(x) * w`, computed in f32 as transformers' `LlamaRMSNorm`.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    /// Gemma's norms multiply by (1 + w), in f32, as `Gemma2RMSNorm` does.
    pub plus_one: bool,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _p = crate::profile::scope("rms_norm", x.device());
        if x.device().is_cuda() && !self.plus_one {
            return Ok(ops::rms_norm(x, &self.weight, self.eps)?);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        if self.plus_one {
            let scale = (self.weight.to_dtype(DType::F32)? + 1.0)?;
            return Ok(x.broadcast_mul(&scale)?.to_dtype(dtype)?);
        }
        Ok(x.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}

#[derive(Clone)]
/// cos and sin of the rotary angles: `[T, head_dim]` for positions `0..T`, or `[B, 1, T, head_dim]`
/// for per-row positions (packed rows).
pub struct Rotary {
    pub cos: Tensor,
    pub sin: Tensor,
    /// On CUDA, the first halves (`[T, D/2]` or `[B, T, D/2]`) the fused kernel takes, made
    /// once per forward pass rather than per projection.
    half: Option<(Tensor, Tensor)>,
    /// −sin (and its half on CUDA) for the inverse rotation, made on first use, once a pass.
    neg_sin: std::sync::OnceLock<(Tensor, Option<Tensor>)>,
}

impl Rotary {
    /// The tables of `positions` for `inv_freq` (`[rotary_dim / 2]`), cos and sin multiplied by
    /// `scale` (LongRoPE's attention factor; 1 otherwise) as transformers does.
    pub fn new(inv_freq: &Tensor, positions: &Tensor, dtype: DType, scale: f64) -> Result<Self> {
        let freqs = positions
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&inv_freq.unsqueeze(0)?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        let (mut cos, mut sin) = (emb.cos()?, emb.sin()?);
        if scale != 1.0 {
            cos = (cos * scale)?;
            sin = (sin * scale)?;
        }
        Self::from_tables(cos.to_dtype(dtype)?, sin.to_dtype(dtype)?)
    }

    /// No rotation, for layers without a positional embedding (SmolLM3's NoPE layers): tables
    /// that rotate no dimension of a head, which [`Self::rotate`] and [`Self::apply`] pass
    /// through unchanged.
    pub fn none(dtype: DType, device: &Device) -> Result<Self> {
        let empty = Tensor::zeros((1, 0), dtype, device)?;
        Ok(Self {
            cos: empty.clone(),
            sin: empty,
            half: None,
            neg_sin: Default::default(),
        })
    }

    /// The rotation of the given cos/sin tables.
    pub fn from_tables(cos: Tensor, sin: Tensor) -> Result<Self> {
        let half = |t: &Tensor| -> Result<Tensor> {
            let h = t.narrow(D::Minus1, 0, t.dim(D::Minus1)? / 2)?;
            let h = if h.rank() == 4 { h.squeeze(1)? } else { h };
            Ok(h.contiguous()?)
        };
        let half = if cos.device().is_cuda() {
            Some((half(&cos)?, half(&sin)?))
        } else {
            None
        };
        Ok(Self {
            cos,
            sin,
            half,
            neg_sin: Default::default(),
        })
    }

    /// The rotation of `x` (heads in `layout`; or with `inverse`, the opposite rotation: a
    /// rotation's transpose, which is its backward pass) for untracked tensors: candle-nn's fused
    /// kernels on CUDA with no autograd op around them, as the explicit training step
    /// (`step/`) runs them. Token-major heads `[B, T, H, D]` are rotated on CUDA only.
    pub fn rotate(&self, x: &Tensor, inverse: bool, layout: HeadLayout) -> Result<Tensor> {
        self.on_rotated_dims(x, |x| self.rotate_all(x, inverse, layout))
    }

    /// `f` on the leading dims the tables cover, the rest of each head passed through
    /// (Phi-4-mini and Phi-3.5 rotate 3/4 of a head, as transformers' `partial_rotary_factor`).
    fn on_rotated_dims(&self, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (rd, d) = (self.cos.dim(D::Minus1)?, x.dim(D::Minus1)?);
        if rd == d {
            return f(x);
        }
        if rd == 0 {
            return Ok(x.clone());
        }
        let rotated = f(&x.narrow(D::Minus1, 0, rd)?)?;
        Ok(Tensor::cat(
            &[&rotated, &x.narrow(D::Minus1, rd, d - rd)?],
            D::Minus1,
        )?)
    }

    fn rotate_all(&self, x: &Tensor, inverse: bool, layout: HeadLayout) -> Result<Tensor> {
        let (sin, half_sin) = if inverse {
            let neg = match self.neg_sin.get() {
                Some(n) => n,
                None => {
                    let half = self.half.as_ref().map(|(_, s)| s.neg()).transpose()?;
                    let _ = self.neg_sin.set((self.sin.neg()?, half));
                    self.neg_sin.get().expect("just set")
                }
            };
            (&neg.0, neg.1.as_ref())
        } else {
            (&self.sin, self.half.as_ref().map(|(_, s)| s))
        };
        let x = x.contiguous()?;
        match (&self.half, half_sin, layout) {
            (Some((cos, _)), Some(half_sin), HeadLayout::HeadsMajor) => {
                Ok(candle_nn::rotary_emb::rope(&x, cos, half_sin)?)
            }
            (Some((cos, _)), Some(half_sin), HeadLayout::TokenMajor) => {
                if x.device().is_cuda() {
                    return Ok(crate::cuda::rope_thd(&x, cos, half_sin)?);
                }
                Ok(candle_nn::rotary_emb::rope_thd(&x, cos, half_sin)?)
            }
            (_, _, HeadLayout::HeadsMajor) => rotate_half_formula(&x, &self.cos, sin),
            (_, _, HeadLayout::TokenMajor) => Err(crate::error::KilnError::Train(
                "token-major heads are rotated on CUDA only".into(),
            )),
        }
    }

    /// `x·cos + rotate_half(x)·sin` for `x` of shape `[B, H, T, D]` (on the rotated dims).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.on_rotated_dims(x, |x| self.apply_all(x))
    }

    fn apply_all(&self, x: &Tensor) -> Result<Tensor> {
        if let Some((cos, sin)) = &self.half {
            return Ok(ops::rope(&x.contiguous()?, cos, sin)?);
        }
        rotate_half_formula(x, &self.cos, &self.sin)
    }
}

/// `x·cos + rotate_half(x)·sin` in candle ops (the CPU's and Metal's rotation).
fn rotate_half_formula(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// The query/key/value projections: separate (Llama, Mistral, Qwen 2) or one fused
/// `qkv_proj` whose output rows are q, then k, then v (Phi-3).
// One per layer, built once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum QkvProj {
    Split {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    Fused {
        qkv_proj: Linear,
    },
}

pub struct Attention {
    pub qkv: QkvProj,
    pub o_proj: Linear,
    /// Scores are `q·k · scale`, then soft-capped if `softcap` (Gemma 2).
    pub scale: f64,
    pub softcap: Option<f64>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Qwen 3: RMSNorm over each query and key head, before RoPE.
    pub qk_norm: Option<(RmsNorm, RmsNorm)>,
}

/// Keys and values of the tokens seen so far by one layer (`[B, kv_heads, T, head_dim]`).
#[derive(Default, Clone)]
pub struct LayerKv {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

impl LayerKv {
    /// Appends the new keys and values and returns the whole sequence's.
    fn extend(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match (self.k.take(), self.v.take()) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            _ => (k, v),
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }
}

/// The KV cache of a decoding session: one [`LayerKv`] per layer and the cached length.
#[derive(Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    pub len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
            len: 0,
        }
    }

    /// Forgets every position from `len` on (speculative decoding's rollback of rejected
    /// tokens); a longer `len` than cached changes nothing.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        for layer in &mut self.layers {
            for t in [&mut layer.k, &mut layer.v] {
                if let Some(x) = t.take() {
                    *t = Some(x.narrow(2, 0, len)?);
                }
            }
        }
        self.len = len;
        Ok(())
    }
}

impl Attention {
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rotary,
        mask: Option<&AttnMask>,
        cache: Option<&mut LayerKv>,
        rng: &mut Option<&mut KilnRng>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let p = crate::profile::scope("attn.qkv", x.device());
        let (q, k, v) = match &self.qkv {
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            } => (
                q_proj.forward(x, rng)?,
                k_proj.forward(x, rng)?,
                v_proj.forward(x, rng)?,
            ),
            QkvProj::Fused { qkv_proj } => {
                let qkv = qkv_proj.forward(x, rng)?;
                let (q_dim, kv_dim) = (
                    self.num_heads * self.head_dim,
                    self.num_kv_heads * self.head_dim,
                );
                (
                    qkv.narrow(D::Minus1, 0, q_dim)?,
                    qkv.narrow(D::Minus1, q_dim, kv_dim)?,
                    qkv.narrow(D::Minus1, q_dim + kv_dim, kv_dim)?,
                )
            }
        };
        drop(p);
        let p = crate::profile::scope("attn.rope", x.device());
        let (mut q, mut k) = (heads(q, self.num_heads)?, heads(k, self.num_kv_heads)?);
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let v = heads(v, self.num_kv_heads)?;
        let (k, v) = match cache {
            Some(c) => c.extend(k, v)?,
            None => (k, v),
        };
        drop(p);
        let p = crate::profile::scope("attn.core", x.device());
        let attended = ops::attention(
            &q,
            &k,
            &v,
            mask.and_then(|m| m.additive.as_ref()),
            self.scale,
            self.softcap,
            mask.is_some_and(|m| m.causal),
        )?;
        let out = attended
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        drop(p);
        let _p = crate::profile::scope("attn.o_proj", x.device());
        self.o_proj.forward(&out, rng)
    }
}

/// The gate and up projections: separate, or one fused `gate_up_proj` whose output rows are
/// gate, then up (Phi-3).
pub enum GateUpProj {
    Split { gate_proj: Linear, up_proj: Linear },
    Fused { gate_up_proj: Linear },
}

pub struct Mlp {
    pub gate_up: GateUpProj,
    pub down_proj: Linear,
    pub activation: Activation,
}

impl Mlp {
    /// `down(silu(gate(x)) ⊙ up(x))`
    pub fn forward(&self, x: &Tensor, rng: &mut Option<&mut KilnRng>) -> Result<Tensor> {
        let _p = crate::profile::scope("mlp", x.device());
        let (gate, up) = match &self.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => {
                (gate_proj.forward(x, rng)?, up_proj.forward(x, rng)?)
            }
            GateUpProj::Fused { gate_up_proj } => {
                let y = gate_up_proj.forward(x, rng)?;
                let half = y.dim(D::Minus1)? / 2;
                (
                    y.narrow(D::Minus1, 0, half)?,
                    y.narrow(D::Minus1, half, half)?,
                )
            }
        };
        let hidden = match self.activation {
            Activation::Silu => ops::swiglu(&gate, &up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        self.down_proj.forward(&hidden, rng)
    }
}

/// One expert of a sparse mixture: `down(silu(gate x) ⊙ up x)` (Mixtral's w2, w1, w3).
pub struct Expert {
    pub gate: Linear,
    pub down: Linear,
    pub up: Linear,
}

/// A sparse mixture of experts (Mixtral, Qwen3-MoE): a router picks the top-k experts of each
/// token from the softmax of its logits, and their outputs are summed weighted by the picked
/// probabilities, renormalized to sum to 1 when `renormalize` (Mixtral; Qwen3-MoE's
/// `norm_topk_prob`). The router stays dense; experts are frozen (NF4 under QLoRA).
pub struct SparseMoe {
    /// `[experts, hidden]`
    pub router: Tensor,
    pub experts: Vec<Expert>,
    pub top_k: usize,
    pub renormalize: bool,
    /// The checkpoint names of the module and its experts' projections.
    pub layout: MoeLayout,
}

impl SparseMoe {
    pub fn forward(&self, x: &Tensor, rng: &mut Option<&mut KilnRng>) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let xs = x.reshape((b * t, h))?;
        let logits = linear_with(&xs, &self.router)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        // The choice of experts is discrete (made on the host); the weights stay on the device
        // so gradients flow through the router's probabilities as in transformers.
        let rows = probs.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        let n_exp = self.experts.len();
        // Per expert, the tokens routed to it; and the 0/1 choice matrix for the weights.
        let mut routed: Vec<Vec<u32>> = vec![vec![]; n_exp];
        let mut chosen = vec![0f32; rows.len() * n_exp];
        for (i, row) in rows.iter().enumerate() {
            let mut order: Vec<usize> = (0..n_exp).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for &e in &order[..self.top_k] {
                chosen[i * n_exp + e] = 1.0;
                routed[e].push(i as u32);
            }
        }
        let chosen = Tensor::from_vec(chosen, (rows.len(), n_exp), xs.device())?;
        let mut picked = (&probs * &chosen)?;
        if self.renormalize {
            picked = picked.broadcast_div(&picked.sum_keepdim(D::Minus1)?)?;
        }
        let weights = picked.to_dtype(xs.dtype())?;
        let mut out = xs.zeros_like()?;
        for ((e, expert), idx) in self.experts.iter().enumerate().zip(routed) {
            if idx.is_empty() {
                continue;
            }
            let n = idx.len();
            let idx = Tensor::from_vec(idx, n, xs.device())?;
            let xe = xs.index_select(&idx, 0)?;
            let hidden = ops::swiglu(
                &expert.gate.forward(&xe, rng)?,
                &expert.up.forward(&xe, rng)?,
            )?;
            let ye = expert.down.forward(&hidden, rng)?;
            let we = weights
                .narrow(1, e, 1)?
                .contiguous()?
                .index_select(&idx, 0)?;
            out = out.index_add(&idx, &ye.broadcast_mul(&we)?, 0)?;
        }
        Ok(out.reshape((b, t, h))?)
    }
}

/// The feed-forward part of a block: one MLP, or a sparse mixture of experts (Mixtral,
/// Qwen3-MoE).
// One per layer, built once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum FeedForward {
    Dense(Mlp),
    Moe(SparseMoe),
}

impl FeedForward {
    pub fn forward(&self, x: &Tensor, rng: &mut Option<&mut KilnRng>) -> Result<Tensor> {
        match self {
            FeedForward::Dense(mlp) => mlp.forward(x, rng),
            FeedForward::Moe(moe) => moe.forward(x, rng),
        }
    }
}

/// A decoder block. Llama layout: `h = x + attn(norm₁(x)); h + mlp(norm₂(h))` with norm₂ =
/// `post_attention_layernorm`. Gemma 2's sandwich (when `pre_feedforward_layernorm` is set):
/// `h = x + post_attention_layernorm(attn(input_layernorm(x)));
///  h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`.
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    pub post_feedforward_layernorm: Option<RmsNorm>,
    pub mlp: FeedForward,
}

impl DecoderLayer {
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rotary,
        mask: Option<&AttnMask>,
        cache: Option<&mut LayerKv>,
        rng: &mut Option<&mut KilnRng>,
    ) -> Result<Tensor> {
        let attn =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, rope, mask, cache, rng)?;
        match (
            &self.pre_feedforward_layernorm,
            &self.post_feedforward_layernorm,
        ) {
            (Some(pre_ff), Some(post_ff)) => {
                let h = (x + self.post_attention_layernorm.forward(&attn)?)?;
                let ff = self.mlp.forward(&pre_ff.forward(&h)?, rng)?;
                Ok((&h + post_ff.forward(&ff)?)?)
            }
            _ => {
                let h = (x + attn)?;
                Ok((&h
                    + self
                        .mlp
                        .forward(&self.post_attention_layernorm.forward(&h)?, rng)?)?)
            }
        }
    }

    /// The projections of this layer with their HF module paths relative to the layer.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out: Vec<(String, &Linear)> = self
            .attention_and_mlp_linears()
            .into_iter()
            .map(|(n, l)| (n.to_string(), l))
            .collect();
        if let FeedForward::Moe(moe) = &self.mlp {
            let l = moe.layout;
            for (e, ex) in moe.experts.iter().enumerate() {
                for (w, lin) in [(l.gate, &ex.gate), (l.down, &ex.down), (l.up, &ex.up)] {
                    out.push((format!("{}.experts.{e}.{w}", l.module), lin));
                }
            }
        }
        out
    }

    fn attention_and_mlp_linears(&self) -> Vec<(&'static str, &Linear)> {
        let mut out = match &self.self_attn.qkv {
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            } => vec![
                ("self_attn.q_proj", q_proj),
                ("self_attn.k_proj", k_proj),
                ("self_attn.v_proj", v_proj),
            ],
            QkvProj::Fused { qkv_proj } => vec![("self_attn.qkv_proj", qkv_proj)],
        };
        out.push(("self_attn.o_proj", &self.self_attn.o_proj));
        let FeedForward::Dense(mlp) = &self.mlp else {
            return out;
        };
        match &mlp.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => {
                out.push(("mlp.gate_proj", gate_proj));
                out.push(("mlp.up_proj", up_proj));
            }
            GateUpProj::Fused { gate_up_proj } => out.push(("mlp.gate_up_proj", gate_up_proj)),
        }
        out.push(("mlp.down_proj", &mlp.down_proj));
        out
    }

    /// The projection at `path` (`self_attn.q_proj`, `mlp.gate_up_proj`, ...), if the layer has it.
    pub fn linear(&self, path: &str) -> Option<&Linear> {
        self.linears()
            .into_iter()
            .find(|(p, _)| *p == path)
            .map(|(_, l)| l)
    }
}

pub struct Decoder {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    /// Shared so that a recomputed layer can be run again in the backward pass.
    pub layers: Vec<Arc<DecoderLayer>>,
    pub norm: RmsNorm,
    /// `None` when the output projection is tied to the embeddings.
    pub lm_head: Option<Tensor>,
    pub inv_freq: Tensor,
    /// Gemma 3: the inverse frequencies of the local layers.
    pub inv_freq_local: Option<Tensor>,
    /// LongRoPE: the inverse frequencies for sequences longer than the original context, and
    /// that context length.
    pub inv_freq_long: Option<(Tensor, usize)>,
    /// What RoPE's cos and sin are multiplied by (LongRoPE's attention factor; else 1).
    pub rope_scale: f64,
    pub dtype: DType,
    pub device: Device,
    /// Training recomputes the first `recomputed_layers` layers in the backward pass instead
    /// of keeping their activations (`gradient_checkpointing`: all, none, or as many as memory
    /// requires); the LoRA gradients found there are collected in `grad_sink`.
    pub recomputed_layers: usize,
    /// The recomputed layers' inputs wait in pinned host memory, not on the device
    /// (`gradient_checkpointing = "offload"`; the explicit step on CUDA).
    pub offload_saved_inputs: bool,
    /// The most tokens the explicit step's MLP computes at once (`None`: as many as keep one
    /// `[tokens, intermediate]` tensor within 2^27 elements; tests force small tiles).
    pub mlp_tile_rows: Option<usize>,
    pub grad_sink: Arc<GradSink>,
}

/// One decoder layer applied to its input, with everything else it needs fixed, so that it can
/// be run again identically in the backward pass (recomputation, "activation checkpointing").
struct LayerCall {
    layer: Arc<DecoderLayer>,
    rope: Rotary,
    mask: Option<AttnMask>,
    /// Seed of the layer's dropout stream (training only).
    dropout_seed: Option<u64>,
}

impl Recomputable for LayerCall {
    fn run(&self, x: &Tensor) -> Result<Tensor> {
        let mut rng = self.dropout_seed.map(KilnRng::new);
        self.layer
            .forward(x, &self.rope, self.mask.as_ref(), None, &mut rng.as_mut())
    }

    fn variables(&self) -> Vec<Var> {
        self.layer
            .linears()
            .into_iter()
            .filter_map(|(_, l)| l.lora.as_ref())
            .flat_map(|a| [a.a.clone(), a.b.clone()])
            .collect()
    }
}

/// An additive attention mask `[Tq, Tk]` or `[B, 1, Tq, Tk]`, and whether it is exactly the
/// causal mask (query i sees keys up to i + Tk − Tq), which CUDA kernels apply without reading it.
#[derive(Clone)]
pub struct AttnMask {
    /// The additive mask; `None` for plain causal attention, which every attention path applies
    /// from indices (a `[T, T]` tensor would be 8 GiB at 64k tokens).
    pub additive: Option<Tensor>,
    pub causal: bool,
}

/// The additive band mask `[T, T]` of a sliding window: -inf where `i - j >= window`. Added to a
/// causal (or packed) mask; within one packed example, index and position differences agree.
pub fn window_mask(t: usize, window: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                if i >= j && i - j >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)?)
}

/// The rotary tables and attention masks of one forward pass.
pub(crate) struct PassSetup {
    pub rope: Rotary,
    /// Gemma 3's local layers' tables.
    pub local_rope: Option<Rotary>,
    /// The tables of layers that do not rotate, where some do not.
    pub no_rope: Option<Rotary>,
    pub mask: AttnMask,
    /// The mask of layers with a sliding window, when the window is shorter than the rows.
    pub windowed: Option<AttnMask>,
}

impl Decoder {
    /// The rotary tables and attention masks of a pass over `input_ids` `[B, T]` (packed rows:
    /// per-row positions and the block mask).
    pub(crate) fn pass_setup(
        &self,
        b: usize,
        t: usize,
        layout: Option<&PackedLayout>,
    ) -> Result<PassSetup> {
        // The rotary tables for these positions (per row for packed rows).
        let rotary = |inv_freq: &Tensor| -> Result<Rotary> {
            match layout {
                None => {
                    let positions = Tensor::arange(0u32, t as u32, &self.device)?;
                    Rotary::new(inv_freq, &positions, self.dtype, self.rope_scale)
                }
                Some(l) => {
                    let rope = Rotary::new(
                        inv_freq,
                        &l.positions.flatten_all()?,
                        self.dtype,
                        self.rope_scale,
                    )?;
                    let per_row = |x: &Tensor| x.reshape((b, 1, t, ()));
                    Rotary::from_tables(per_row(&rope.cos)?, per_row(&rope.sin)?)
                }
            }
        };
        let rope = rotary(self.inv_freq_for(layout.map_or(t, |l| l.positions_end)))?;
        let local_rope = self.inv_freq_local.as_ref().map(rotary).transpose()?;
        let mask = match layout {
            None => AttnMask {
                additive: None,
                causal: true,
            },
            Some(l) => AttnMask {
                additive: Some(l.mask.to_dtype(self.dtype)?),
                causal: false,
            },
        };
        // Layers with a sliding window (all, or Gemma 2's local ones) add a band to the mask.
        let windowed = match self.config.sliding_window {
            Some(w) if t > w => {
                let window = window_mask(t, w, self.dtype, &self.device)?;
                let base = match &mask.additive {
                    Some(m) => m.clone(),
                    None => causal_mask(t, self.dtype, &self.device)?,
                };
                Some(AttnMask {
                    additive: Some(base.broadcast_add(&window)?),
                    causal: false,
                })
            }
            _ => None,
        };
        Ok(PassSetup {
            rope,
            local_rope,
            no_rope: self.no_rope()?,
            mask,
            windowed,
        })
    }

    /// The inverse frequencies for positions up to `len` (LongRoPE: the long factors once `len`
    /// passes the original context, as transformers switches by the largest position + 1).
    fn inv_freq_for(&self, len: usize) -> &Tensor {
        match &self.inv_freq_long {
            Some((long, original)) if len > *original => long,
            _ => &self.inv_freq,
        }
    }

    /// Tokens a cached pass starting at position `start` may run while every one of them gets
    /// the rotation a pass of its own would (LongRoPE switches factors once the length passes
    /// the original context); `usize::MAX` when nothing switches ahead.
    pub fn same_rotation_run(&self, start: usize) -> usize {
        match &self.inv_freq_long {
            Some((_, original)) if start < *original => original - start,
            _ => usize::MAX,
        }
    }

    /// Layer `i`'s rotary tables and mask in a pass.
    pub(crate) fn layer_setup<'a>(
        &self,
        i: usize,
        setup: &'a PassSetup,
    ) -> (&'a Rotary, &'a AttnMask) {
        let mask = match (&setup.windowed, self.config.layer_window(i)) {
            (Some(w), Some(_)) => w,
            _ => &setup.mask,
        };
        (
            self.layer_rope(
                i,
                &setup.rope,
                setup.local_rope.as_ref(),
                setup.no_rope.as_ref(),
            ),
            mask,
        )
    }

    /// Final hidden states `[B, T, hidden]` of `input_ids` `[B, T]`. Pass `rng` in training
    /// (LoRA dropout), `None` in evaluation.
    pub fn forward_hidden(&self, input_ids: &Tensor, rng: Option<&mut KilnRng>) -> Result<Tensor> {
        self.forward_hidden_with(input_ids, None, rng)
    }

    /// As [`Self::forward_hidden`], with the positions and attention mask of packed rows.
    pub fn forward_hidden_with(
        &self,
        input_ids: &Tensor,
        layout: Option<&PackedLayout>,
        mut rng: Option<&mut KilnRng>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let setup = self.pass_setup(b, t, layout)?;
        let mut h = self.embed(input_ids)?;
        let recomputed = if rng.is_some() {
            self.recomputed_layers
        } else {
            0
        };
        if recomputed > 0 {
            // The first recomputed layer must see a tracked input to be part of the graph.
            h = Var::from_tensor(&h)?.into_inner();
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let (rope, mask) = self.layer_setup(i, &setup);
            let call = LayerCall {
                layer: layer.clone(),
                rope: rope.clone(),
                mask: Some(mask.clone()),
                dropout_seed: rng.as_mut().map(|r| r.next_seed()),
            };
            h = if i < recomputed {
                ops::apply(
                    &h,
                    Recompute {
                        f: call,
                        sink: self.grad_sink.clone(),
                    },
                )?
            } else {
                call.run(&h)?
            };
        }
        self.norm.forward(&h)
    }

    /// The summed cross-entropy of `targets` `[B, T]` weighted by `weights` `[B, T]` after
    /// `hidden` `[B, T, hidden]`, computed over chunks of rows (no full f32 logits).
    pub fn loss_sum(&self, hidden: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let rows = hidden.flatten_to(D::Minus2)?;
        Ok(ops::lm_head_loss(
            &rows,
            head,
            self.config.final_softcap,
            &targets.flatten_all()?,
            &weights.flatten_all()?,
        )?)
    }

    /// Moves the input embedding table to host memory when the output head has its own matrix
    /// (the table is then read only to look up a micro-batch's rows): the device keeps
    /// `vocab × hidden` bf16 fewer (1 GiB on Llama-3.1-8B). `gradient_checkpointing = "offload"`
    /// does this. Returns whether it moved.
    pub fn embeddings_to_host(&mut self) -> Result<bool> {
        if self.lm_head.is_none() || !self.device.is_cuda() {
            return Ok(false);
        }
        self.embed_tokens = self.embed_tokens.to_device(&Device::Cpu)?;
        Ok(true)
    }

    /// Token embeddings `[B, T, hidden]` (times √hidden for Gemma, in the compute dtype). A
    /// table held in host memory ([`Llama::embeddings_to_host`]) is gathered there and only the
    /// rows travel.
    pub(crate) fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let table = &self.embed_tokens;
        let ids = input_ids.flatten_all()?.to_device(table.device())?;
        let h = table
            .index_select(&ids, 0)?
            .to_device(&self.device)?
            .reshape((b, t, ()))?;
        if self.config.is_gemma() {
            let normalizer = Tensor::new(&[(self.config.hidden_size as f32).sqrt()], &self.device)?
                .to_dtype(self.dtype)?;
            return Ok(h.broadcast_mul(&normalizer)?);
        }
        Ok(h)
    }

    /// Layer `i`'s rotary tables: Gemma 3's local layers have their own, and SmolLM3's NoPE
    /// layers rotate nothing.
    fn layer_rope<'a>(
        &self,
        i: usize,
        global: &'a Rotary,
        local: Option<&'a Rotary>,
        none: Option<&'a Rotary>,
    ) -> &'a Rotary {
        match (local, none) {
            (_, Some(none)) if !self.config.rotates(i) => none,
            (Some(local), _) if self.config.is_sliding_layer(i) => local,
            _ => global,
        }
    }

    /// The no-rotation tables, when some layer does not rotate.
    fn no_rope(&self) -> Result<Option<Rotary>> {
        match self.config.rope_layers {
            Some(_) => Ok(Some(Rotary::none(self.dtype, &self.device)?)),
            None => Ok(None),
        }
    }

    /// Decoding with a KV cache: runs the new tokens `input_ids` `[B, T]` after the `cache.len`
    /// cached ones and returns the logits of the last new token `[B, vocab]` (f32).
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.hidden_cached(input_ids, cache)?;
        let t = h.dim(1)?;
        let last = self.norm.forward(&h.narrow(1, t - 1, 1)?)?;
        Ok(self.logits(&last)?.squeeze(1)?.to_dtype(DType::F32)?)
    }

    /// As [`Self::forward_cached`], with the logits of every new token `[B, T, vocab]` (f32):
    /// speculative decoding checks a draft's tokens in one pass.
    pub fn forward_cached_all(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.hidden_cached(input_ids, cache)?;
        Ok(self.logits(&self.norm.forward(&h)?)?.to_dtype(DType::F32)?)
    }

    /// The last layer's hidden states of the new tokens, the cache extended by them.
    fn hidden_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let start = cache.len;
        let positions = Tensor::arange(start as u32, (start + t) as u32, &self.device)?;
        let rope = Rotary::new(
            self.inv_freq_for(start + t),
            &positions,
            self.dtype,
            self.rope_scale,
        )?;
        let local_rope = self
            .inv_freq_local
            .as_ref()
            .map(|f| Rotary::new(f, &positions, self.dtype, 1.0))
            .transpose()?;
        let no_rope = self.no_rope()?;
        // New token i (at start + i) sees cached tokens and new tokens up to itself, and with a
        // sliding window only the last `window` of them.
        let total = start + t;
        let mask_for = |window: usize| -> Result<Option<AttnMask>> {
            if t == 1 && total <= window {
                return Ok(None);
            }
            if window == usize::MAX {
                // Plain causal after the cache: applied from indices.
                return Ok(Some(AttnMask {
                    additive: None,
                    causal: true,
                }));
            }
            let m: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..total).map(move |j| {
                        if j <= start + i && start + i - j < window {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            Ok(Some(AttnMask {
                additive: Some(
                    Tensor::from_vec(m, (t, total), &self.device)?.to_dtype(self.dtype)?,
                ),
                causal: false,
            }))
        };
        let full = mask_for(usize::MAX)?;
        let windowed = match self.config.sliding_window {
            Some(w) => mask_for(w)?,
            None => None,
        };
        let mut h = self.embed(input_ids)?;
        for (i, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let mask = match self.config.layer_window(i) {
                Some(_) => windowed.as_ref(),
                None => full.as_ref(),
            };
            let rope = self.layer_rope(i, &rope, local_rope.as_ref(), no_rope.as_ref());
            h = layer.forward(&h, rope, mask, Some(kv), &mut None)?;
        }
        cache.len += t;
        Ok(h)
    }

    /// Logits `[B, T, vocab]` (in the compute dtype) from hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        if let Some(cap) = self.config.final_softcap {
            let logits = linear_with(hidden, head)?;
            return Ok(((logits / cap)?.tanh()? * cap)?);
        }
        Ok(linear_with(hidden, head)?)
    }

    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.logits(&self.forward_hidden(input_ids, None)?)
    }

    /// Every adapter's A and B, in [`Llama::adapters`]' order: what training updates.
    pub fn lora_vars(&self) -> Vec<Var> {
        self.adapters()
            .iter()
            .flat_map(|(_, a)| [a.a.clone(), a.b.clone()])
            .collect()
    }

    /// Every LoRA adapter with its PEFT module path (`base_model.model.model.layers.N.self_attn.q_proj`).
    pub fn adapters(&self) -> Vec<(String, &LoraAdapter)> {
        let mut out = vec![];
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, lin) in layer.linears() {
                if let Some(lora) = &lin.lora {
                    out.push((format!("base_model.model.model.layers.{i}.{name}"), lora));
                }
            }
        }
        out
    }

    /// Makes the adapters as they are now the reference [`Self::as_reference`] computes (a
    /// refined adapter's reference is its start, as TRL's).
    pub fn freeze_reference(&self) -> Result<()> {
        for (_, a) in self.adapters() {
            a.freeze_reference()?;
        }
        Ok(())
    }

    /// Whether [`Self::as_reference`] is the base alone (no adapter was frozen as the reference).
    pub fn reference_is_base(&self) -> bool {
        self.adapters()
            .iter()
            .all(|(_, a)| !a.has_frozen_reference())
    }

    /// `f` run as the reference model: every adapter switched off, so the base alone, or the
    /// base with the frozen adapters of [`Self::freeze_reference`]. The adapters are switched
    /// back on whatever `f` returns.
    pub fn as_reference<R>(&self, f: impl FnOnce() -> R) -> R {
        struct On<'a>(Vec<(String, &'a LoraAdapter)>);
        impl Drop for On<'_> {
            fn drop(&mut self) {
                for (_, a) in &self.0 {
                    a.switch(true);
                }
            }
        }
        let adapters = On(self.adapters());
        for (_, a) in &adapters.0 {
            a.switch(false);
        }
        f()
    }

    /// Trainable (LoRA) parameters and all parameters, counted as PEFT counts them.
    pub fn param_counts(&self) -> (usize, usize) {
        let trainable: usize = self.adapters().iter().map(|(_, a)| a.num_params()).sum();
        (trainable, self.config.num_params() + trainable)
    }
}
