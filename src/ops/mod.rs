//! Autograd operations candle lacks, each a custom op with its own backward pass:
//! - [`TensorOp`]: a custom op whose forward is written in candle tensor ops (no graph is kept)
//!   and whose backward is given; the device plumbing is written once here.
//! - [`dropout`]: hashed dropout that stores no mask (the backward regenerates it).
//! - [`Recompute`]: activation checkpointing: a decoder layer run without keeping its
//!   activations, recomputed in the backward pass.
//! - [`lm_head_loss`]: the output projection and cross-entropy over chunks of rows, so the
//!   float32 logits of the whole vocabulary never exist for all tokens at once.
//! - [`attention`]: the attention core as one op over blocks of queries, with the fused softmax.
//! - [`rms_norm`], [`rope`]: candle-nn's fused kernels with their backward passes written out.
//! - [`swiglu`]: `silu(gate) ⊙ up`, one CUDA kernel each way.
//! - [`lora_linear`]: a projection and its LoRA adapter with the backward written out (GPU path).
//!
//! Backward passes see detached tensors, so nothing they compute joins the autograd graph.

#[cfg(any(feature = "cuda", feature = "metal"))]
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

mod attention;
mod batched_matmul;
pub mod distill;
mod dropout;
mod lora_linear;
mod loss;
pub mod nf4_linear;
mod norm;
pub mod preference;
mod recompute;
mod swiglu;

pub use crate::layout::HeadLayout;
pub use attention::causal_mask;
pub(crate) use attention::AttentionCore;
pub use attention::{attention, attention_in_blocks, attention_softmax};
pub use dropout::{dropout, dropout_keep, dropout_seed_at};
pub(crate) use lora_linear::LoraLinear;
pub use lora_linear::{lora_linear, FrozenMatrix};
pub use loss::masked_cross_entropy_sum;
pub use loss::{lm_head_loss, lm_head_loss_and_grad, lm_head_target_logps};
pub use nf4_linear::{linear_with, Nf4Linear, Nf4Weight};
pub use norm::{rms_norm, rms_norm_backward, rope};
pub use recompute::{GradSink, Recomputable, Recompute};
pub use swiglu::{swiglu, swiglu_backward};

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
pub(crate) fn whole(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

struct AsCustomOp<T>(T);

/// A tensor (no graph) over `storage`, which holds the input from offset 0 (see [`apply`]).
pub(crate) fn input_tensor(storage: Storage, layout: &Layout) -> candle_core::Result<Tensor> {
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
pub(crate) fn output_storage(t: &Tensor) -> candle_core::Result<(Storage, Shape)> {
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

pub(crate) struct AsCustomOp3<T>(pub(crate) T);

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

#[cfg(test)]
pub(crate) mod tests_support {
    use candle_core::{Device, Tensor};

    pub fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        let v = crate::rng::KilnRng::new(seed).normal(n, 0.0, 1.0);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// max |a − b| (f32 tensors).
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The gradients of `Σ y ⊙ upstream`.
    pub fn vjp(y: &Tensor, upstream: &Tensor) -> candle_core::backprop::GradStore {
        (y * upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }
}
