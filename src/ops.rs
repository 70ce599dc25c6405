//! Autograd operations candle lacks, each a custom op with its own backward pass:
//! - [`TensorOp`]: a custom op whose forward is written in candle tensor ops (no graph is kept)
//!   and whose backward is given; the device plumbing is written once here.
//! - [`dropout`]: hashed dropout that stores no mask (the backward regenerates it).
//! - [`Recompute`]: activation checkpointing: a decoder layer run without keeping its
//!   activations, recomputed in the backward pass.
//! - [`lm_head_loss`]: the output projection and cross-entropy over chunks of rows, so the
//!   float32 logits of the whole vocabulary never exist for all tokens at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor,
    TensorId, Var, D,
};

/// A custom op written in candle tensor ops. `forward` sees a fresh tensor with no graph, so
/// nothing it computes stays alive after it returns; `backward` gets the op's input, output and
/// the output's gradient.
pub trait TensorOp: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    fn backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>>;
}

/// Applies `op` to `x`, recording it in the autograd graph when `x` is tracked.
pub fn apply<T: TensorOp>(x: &Tensor, op: T) -> candle_core::Result<Tensor> {
    whole(x)?.apply_op1(AsCustomOp(op))
}

/// `t` itself when it is contiguous from the start of its storage, else such a copy (tracked).
fn whole(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

struct AsCustomOp<T>(T);

/// A tensor (no graph) over `storage`, which holds the input from offset 0 (see [`apply`]).
fn input_tensor(storage: Storage, layout: &Layout) -> candle_core::Result<Tensor> {
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        candle_core::bail!("custom op expects a contiguous input at offset 0")
    }
    Ok(Tensor::from_storage(
        storage,
        layout.shape().clone(),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// A copy of the storage of `t`, contiguous from offset 0.
fn output_storage(t: &Tensor) -> candle_core::Result<(Storage, Shape)> {
    let t = whole(t)?;
    let (storage, layout) = t.storage_and_layout();
    let s = match &*storage {
        Storage::Cpu(s) => Storage::Cpu(s.clone()),
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => Storage::Cuda(s.try_clone(layout)?),
        #[cfg(feature = "metal")]
        Storage::Metal(s) => Storage::Metal(s.try_clone(layout)?),
        #[allow(unreachable_patterns)]
        _ => candle_core::bail!("custom op: unsupported device {:?}", layout),
    };
    Ok((s, t.shape().clone()))
}

impl<T: TensorOp> AsCustomOp<T> {
    fn run(&self, storage: Storage, layout: &Layout) -> candle_core::Result<(Storage, Shape)> {
        let x = input_tensor(storage, layout)?;
        output_storage(&self.0.forward(&x)?)
    }
}

impl<T: TensorOp> CustomOp1 for AsCustomOp<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.run(Storage::Cpu(storage.clone()), layout)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: cpu forward produced a non-cpu tensor", self.name()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match self.run(Storage::Cuda(storage.try_clone(layout)?), layout)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: cuda forward produced a non-cuda tensor", self.name()),
        }
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        storage: &candle_core::MetalStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        match self.run(Storage::Metal(storage.try_clone(layout)?), layout)? {
            (Storage::Metal(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: metal forward produced a non-metal tensor", self.name()),
        }
    }

    /// The backward pass sees detached tensors: what it computes must not join the graph (it
    /// would keep every intermediate alive until the gradients are consumed).
    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.0
            .backward(&arg.detach(), &res.detach(), &grad_res.detach())
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout.

/// Whether element `i` of dropout stream `seed` is kept at drop probability `p`: a 24-bit
/// uniform draw from a counter-based hash (splitmix64), the same on every device.
pub fn dropout_keep(seed: u64, i: u64, p: f32) -> bool {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = (z >> 40) as f32 * (1.0 / 16_777_216.0);
    u >= p
}

/// `x` with each element zeroed with probability `p` and the rest scaled by `1/(1-p)`; the mask
/// is a function of `seed` and the element index only, so no mask is stored.
pub fn dropout(x: &Tensor, seed: u64, p: f32) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let x = x.contiguous()?;
    if x.device().is_metal() {
        // No kernel of ours there: an uploaded mask, multiplied in.
        let scale = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..x.elem_count() as u64)
            .map(|i| if dropout_keep(seed, i, p) { scale } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), &candle_core::Device::Cpu)?
            .to_device(x.device())?
            .to_dtype(x.dtype())?;
        return x * mask;
    }
    x.apply_op1(Dropout { seed, p })
}

struct Dropout {
    seed: u64,
    p: f32,
}

fn dropout_cpu<T: Copy>(
    v: &[T],
    seed: u64,
    p: f32,
    to: impl Fn(T) -> f32,
    from: impl Fn(f32) -> T,
) -> Vec<T> {
    let scale = 1.0f32 / (1.0 - p);
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            if dropout_keep(seed, i as u64, p) {
                from(to(x) * scale)
            } else {
                from(0.0)
            }
        })
        .collect()
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("dropout expects a contiguous input")
        };
        let (seed, p) = (self.seed, self.p);
        let out = match storage {
            CpuStorage::F32(v) => {
                CpuStorage::F32(dropout_cpu(&v[start..end], seed, p, |x| x, |x| x))
            }
            CpuStorage::BF16(v) => CpuStorage::BF16(dropout_cpu(
                &v[start..end],
                seed,
                p,
                half::bf16::to_f32,
                half::bf16::from_f32,
            )),
            CpuStorage::F16(v) => CpuStorage::F16(dropout_cpu(
                &v[start..end],
                seed,
                p,
                half::f16::to_f32,
                half::f16::from_f32,
            )),
            s => candle_core::bail!("dropout: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::dropout(storage, layout, self.seed, self.p)?;
        Ok((out, layout.shape().clone()))
    }

    /// The same mask, applied to the gradient.
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dropout(grad_res, self.seed, self.p)?))
    }
}

// ---------------------------------------------------------------------------------------------
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
        let x = Var::from_tensor(&x.detach())?;
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

// ---------------------------------------------------------------------------------------------
// The output projection and cross-entropy, over chunks of rows.

/// Rows of logits computed at once: about 2^26 values (256 MiB in f32) whatever the vocabulary.
fn chunk_rows(vocab: usize) -> usize {
    ((1usize << 26) / vocab.max(1)).max(1)
}

/// `Σ_i w_i · CE(softcap(h_i · headᵀ), t_i)` for hidden states `h` `[N, H]`, targets `[N]` (u32)
/// and weights `[N]` (f32): a scalar (f32). The backward pass recomputes each chunk's logits,
/// so neither the forward nor the backward holds more than one chunk of them.
pub fn lm_head_loss(
    hidden: &Tensor,
    head: &Tensor,
    softcap: Option<f64>,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<Tensor> {
    let n = hidden.dim(0)?;
    apply(
        hidden,
        LmHeadLoss {
            head: head.clone(),
            softcap,
            targets: targets.reshape(n)?,
            weights: weights.reshape(n)?.to_dtype(DType::F32)?,
            chunk: chunk_rows(head.dim(0)?),
        },
    )
}

struct LmHeadLoss {
    head: Tensor,
    softcap: Option<f64>,
    targets: Tensor,
    weights: Tensor,
    chunk: usize,
}

impl LmHeadLoss {
    /// f32 logits of rows `start..start+len`.
    fn logits(&self, h: &Tensor, start: usize, len: usize) -> candle_core::Result<Tensor> {
        let z = h
            .narrow(0, start, len)?
            .matmul(&self.head.t()?)?
            .to_dtype(DType::F32)?;
        match self.softcap {
            Some(cap) => (z / cap)?.tanh()? * cap,
            None => Ok(z),
        }
    }

    fn chunks(&self, n: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..n)
            .step_by(self.chunk)
            .map(move |s| (s, self.chunk.min(n - s)))
    }
}

impl TensorOp for LmHeadLoss {
    fn name(&self) -> &'static str {
        "lm-head-loss"
    }

    fn forward(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let mut total = Tensor::zeros((), DType::F32, h.device())?;
        #[cfg(feature = "cuda")]
        if h.device().is_cuda() {
            for (start, len) in self.chunks(h.dim(0)?) {
                let z = h.narrow(0, start, len)?.matmul(&self.head.t()?)?;
                let loss = crate::cuda::cross_entropy(
                    &z,
                    &self.targets.narrow(0, start, len)?,
                    &self.weights.narrow(0, start, len)?,
                    self.softcap.unwrap_or(0.0) as f32,
                )?;
                total = (total + loss.sum_all()?)?;
            }
            return Ok(total);
        }
        for (start, len) in self.chunks(h.dim(0)?) {
            let logits = self.logits(h, start, len)?;
            let lse = logits.log_sum_exp(D::Minus1)?;
            let t = self.targets.narrow(0, start, len)?;
            let picked = logits.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?;
            let w = self.weights.narrow(0, start, len)?;
            total = (total + ((lse - picked)? * w)?.sum_all()?)?;
        }
        Ok(total)
    }

    /// `dh = ((softmax(z) − onehot(t)) ⊙ w ⊙ g ⊙ softcap') · head`, chunk by chunk.
    fn backward(
        &self,
        h: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let _p = crate::profile::scope("loss.backward", h.device());
        let mut parts = vec![];
        #[cfg(feature = "cuda")]
        if h.device().is_cuda() {
            for (start, len) in self.chunks(h.dim(0)?) {
                let z = h.narrow(0, start, len)?.matmul(&self.head.t()?)?;
                let dz = crate::cuda::cross_entropy_backward(
                    &z,
                    &self.targets.narrow(0, start, len)?,
                    &self.weights.narrow(0, start, len)?,
                    grad,
                    self.softcap.unwrap_or(0.0) as f32,
                )?;
                parts.push(dz.matmul(&self.head)?);
            }
            return Ok(Some(Tensor::cat(&parts, 0)?));
        }
        for (start, len) in self.chunks(h.dim(0)?) {
            let logits = self.logits(h, start, len)?;
            let probs = candle_nn::ops::softmax_last_dim(&logits)?;
            let t = self.targets.narrow(0, start, len)?.unsqueeze(1)?;
            let minus_one = Tensor::full(-1f32, (len, 1), h.device())?;
            let dlogits = probs.scatter_add(&t, &minus_one, 1)?;
            let scale = self
                .weights
                .narrow(0, start, len)?
                .broadcast_mul(&grad.to_dtype(DType::F32)?)?
                .unsqueeze(1)?;
            let mut dz = dlogits.broadcast_mul(&scale)?;
            if let Some(cap) = self.softcap {
                // logits = cap·tanh(z/cap), so dlogits/dz = 1 − (logits/cap)².
                dz = (dz * (1.0 - (logits / cap)?.sqr()?)?)?;
            }
            parts.push(dz.to_dtype(h.dtype())?.matmul(&self.head)?);
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}

// ---------------------------------------------------------------------------------------------
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
    let mut s = (scores * scale)?;
    if let Some(mask) = mask {
        s = s.broadcast_add(mask)?;
    }
    candle_nn::ops::softmax(&s.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(scores.dtype())
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
        let grad = grad_res.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(
            &grad,
            &AttentionSoftmaxBackward {
                scale: self.scale,
                causal: self.causal,
            },
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

/// A custom op of three tensors written in candle tensor ops, as [`TensorOp`] is for one.
pub trait TensorOp3: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn forward(&self, a: &Tensor, b: &Tensor, c: &Tensor) -> candle_core::Result<Tensor>;
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>;
}

struct AsCustomOp3<T>(T);

impl<T: TensorOp3> AsCustomOp3<T> {
    fn run(&self, inputs: [(Storage, &Layout); 3]) -> candle_core::Result<(Storage, Shape)> {
        let [a, b, c] = inputs.map(|(s, l)| input_tensor(s, l));
        output_storage(&self.0.forward(&a?, &b?, &c?)?)
    }
}

impl<T: TensorOp3> candle_core::CustomOp3 for AsCustomOp3<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inputs = [
            (Storage::Cpu(s1.clone()), l1),
            (Storage::Cpu(s2.clone()), l2),
            (Storage::Cpu(s3.clone()), l3),
        ];
        match self.run(inputs)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: cpu forward produced a non-cpu tensor", self.name()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let inputs = [
            (Storage::Cuda(s1.try_clone(l1)?), l1),
            (Storage::Cuda(s2.try_clone(l2)?), l2),
            (Storage::Cuda(s3.try_clone(l3)?), l3),
        ];
        match self.run(inputs)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: cuda forward produced a non-cuda tensor", self.name()),
        }
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        let inputs = [
            (Storage::Metal(s1.try_clone(l1)?), l1),
            (Storage::Metal(s2.try_clone(l2)?), l2),
            (Storage::Metal(s3.try_clone(l3)?), l3),
        ];
        match self.run(inputs)? {
            (Storage::Metal(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: metal forward produced a non-metal tensor", self.name()),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached, as for one input: nothing the backward pass computes joins the graph.
        self.0
            .backward(&a.detach(), &b.detach(), &c.detach(), &grad.detach())
    }
}

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
    };
    whole(q)?.apply_op3(&whole(k)?, &whole(v)?, AsCustomOp3(op))
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
    /// Query blocks `(start, len)` over `tq` queries.
    fn blocks(&self, q: &Tensor, tk: usize) -> candle_core::Result<Vec<(usize, usize)>> {
        let (b, h, tq, _) = q.dims4()?;
        let rows = (self.block_scores / (b * h * tk).max(1)).max(1);
        Ok((0..tq)
            .step_by(rows)
            .map(|s| (s, rows.min(tq - s)))
            .collect())
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
        let scores = q.matmul(&k.t()?)?;
        drop(p);
        let _p = crate::profile::scope("attention.softmax", q.device());
        let len = q.dim(2)?;
        let mask = self.mask_rows(start, len)?;
        let causal = self.causal.then(|| k.dim(2).unwrap_or(0) - tq + start);
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
        let k = repeat_heads(k, self.n_rep)?.contiguous()?;
        let v = repeat_heads(v, self.n_rep)?.contiguous()?;
        let tq = q.dim(2)?;
        let mut out = vec![];
        for (start, len) in self.blocks(q, k.dim(2)?)? {
            let qb = q.narrow(2, start, len)?;
            out.push(self.probs(&qb, &k, start, tq)?.0.matmul(&v)?);
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
            dv = add(dv, p.t()?.matmul(&gb)?)?;
            let dp = gb.matmul(&v_r.t()?)?;
            let causal = self.causal.then(|| k_r.dim(2).unwrap_or(0) - tq + start);
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
            dq.push(ds.matmul(&k_r)?);
            dk = add(dk, ds.t()?.matmul(&qb)?)?;
        }
        let dq = Tensor::cat(&dq, 2)?;
        let dk = sum_heads(&dk.expect("at least one query block"), self.n_rep)?;
        let dv = sum_heads(&dv.expect("at least one query block"), self.n_rep)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm and rotary embeddings as single ops on CUDA (candle-nn's fused forward kernels, with
// the backward passes written out).

/// `x / rms(x) · w` over the last dimension: candle-nn's fused kernel forward (f32 arithmetic),
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

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)
    }

    fn backward(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _p = crate::profile::scope("rms_norm.backward", x.device());
        let xf = x.to_dtype(DType::F32)?;
        let gw = g
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?;
        let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let dot = (&xf * &gw)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - xf.broadcast_mul(&(r.powf(3.0)? * dot)?)?)?;
        Ok(Some(dx.to_dtype(x.dtype())?))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        let v = crate::rng::KilnRng::new(seed).normal(n, 0.0, 1.0);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The chunked loss and its gradient equal log-softmax over full logits, with and without
    /// a final soft cap, over several chunks.
    #[test]
    fn chunked_loss_equals_the_full_cross_entropy() {
        let (n, h, v) = (7, 5, 11);
        let head = randn(&[v, h], 1);
        let targets = Tensor::new(&[3u32, 0, 10, 4, 4, 9, 1], &Device::Cpu).unwrap();
        let weights = Tensor::new(&[1f32, 1., 0., 1., 1., 0., 1.], &Device::Cpu).unwrap();
        for softcap in [None, Some(2.0)] {
            let x = Var::from_tensor(&randn(&[n, h], 2)).unwrap();
            let op = LmHeadLoss {
                head: head.clone(),
                softcap,
                targets: targets.clone(),
                weights: weights.clone(),
                chunk: 3,
            };
            let loss = apply(x.as_tensor(), op).unwrap();
            let g = loss.backward().unwrap();
            let mut logits = x.as_tensor().matmul(&head.t().unwrap()).unwrap();
            if let Some(cap) = softcap {
                logits = ((logits / cap).unwrap().tanh().unwrap() * cap).unwrap();
            }
            let reference = crate::model::llama::masked_cross_entropy_sum(
                &logits.unsqueeze(0).unwrap(),
                &targets.unsqueeze(0).unwrap(),
                &weights.unsqueeze(0).unwrap(),
            )
            .unwrap();
            let gr = reference.backward().unwrap();
            let (a, b) = (
                loss.to_scalar::<f32>().unwrap(),
                reference.to_scalar::<f32>().unwrap(),
            );
            assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
            let d = (g.get(x.as_tensor()).unwrap() - gr.get(x.as_tensor()).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "gradient differs by {d}");
        }
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
        let mask = crate::model::llama::causal_mask(t, DType::F32, &Device::Cpu).unwrap();
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
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(diff(&fused, &plain) < 1e-5);
            // In blocks of 2 queries (3 blocks), with the causal mask from indices: the same.
            let blocked = whole(q.as_tensor())
                .unwrap()
                .apply_op3(
                    k.as_tensor(),
                    v.as_tensor(),
                    AsCustomOp3(Attention {
                        mask: Some(mask.clone()),
                        scale: 0.3,
                        softcap,
                        causal: true,
                        n_rep: 2,
                        block_scores: b * h * t * 2,
                    }),
                )
                .unwrap();
            assert!(diff(&blocked, &plain) < 1e-5);
            let gb = (&blocked * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gp2 = (&plain * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for x in [&q, &k, &v] {
                let d = diff(
                    gb.get(x.as_tensor()).unwrap(),
                    gp2.get(x.as_tensor()).unwrap(),
                );
                assert!(d < 1e-5, "blocks: gradient differs by {d}");
            }
            let gf = (&fused * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gp = (&plain * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for x in [&q, &k, &v] {
                let d = diff(
                    gf.get(x.as_tensor()).unwrap(),
                    gp.get(x.as_tensor()).unwrap(),
                );
                assert!(d < 1e-5, "softcap {softcap:?}: gradient differs by {d}");
            }
        }
    }

    /// Dropout keeps about 1-p of the elements, scales them, and its backward applies the same
    /// mask to the gradient.
    #[test]
    fn dropout_masks_are_seeded_and_reused_by_the_backward_pass() {
        let x = Var::from_tensor(&(randn(&[100_000], 4).abs().unwrap() + 1.0).unwrap()).unwrap();
        let y = dropout(x.as_tensor(), 9, 0.25).unwrap();
        let kept: Vec<f32> = y.to_vec1().unwrap();
        let xs: Vec<f32> = x.as_tensor().to_vec1().unwrap();
        let frac = kept.iter().filter(|&&v| v != 0.0).count() as f64 / kept.len() as f64;
        assert!((frac - 0.75).abs() < 0.01, "kept {frac}");
        for (i, (&k, &v)) in kept.iter().zip(&xs).enumerate() {
            let expect = if dropout_keep(9, i as u64, 0.25) {
                v * (1.0 / 0.75)
            } else {
                0.0
            };
            assert_eq!(k, expect);
        }
        let store = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = store.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        for (&gi, &k) in g.iter().zip(&kept) {
            assert_eq!(gi == 0.0, k == 0.0);
        }
        let other: Vec<f32> = dropout(x.as_tensor(), 10, 0.25).unwrap().to_vec1().unwrap();
        assert_ne!(other, kept, "another seed, another mask");
    }
}
