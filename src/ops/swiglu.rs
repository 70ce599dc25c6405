//! SwiGLU, `silu(gate) ⊙ up`, as one op: on CUDA one kernel each way, keeping only gate and up
//! for the backward pass (autograd of `silu(gate) * up` keeps silu(gate) too and runs a chain
//! of element-wise kernels back); elsewhere candle ops.

use candle_core::{CpuStorage, Layout, Shape, Tensor};

/// `silu(gate) ⊙ up` for tensors of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.device().is_cuda() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

/// The gradients of `gate` and `up` given that of `silu(gate) ⊙ up` (one CUDA kernel,
/// elsewhere candle ops): `d up = dy ⊙ silu(gate)`,
/// `d gate = dy ⊙ up ⊙ σ(gate)·(1 + gate·(1 − σ(gate)))`.
pub fn swiglu_backward(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    if gate.device().is_cuda() {
        return crate::cuda::swiglu_backward(
            &gate.contiguous()?,
            &up.contiguous()?,
            &dy.contiguous()?,
        );
    }
    let sig = candle_nn::ops::sigmoid(gate)?;
    let dup = (dy * gate.silu()?)?;
    let dsilu = (&sig * ((gate * (1.0 - &sig)?)? + 1.0)?)?;
    let dgate = ((dy * up)? * dsilu)?;
    Ok((dgate, dup))
}

struct SwiGlu;

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the swiglu op runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gate: &candle_core::CudaStorage,
        gate_layout: &Layout,
        up: &candle_core::CudaStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::swiglu_forward(gate, gate_layout, up, up_layout)?;
        Ok((out, gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dgate, dup) =
            crate::cuda::swiglu_backward(&gate.detach(), &up.detach(), &grad.detach())?;
        Ok((Some(dgate), Some(dup)))
    }
}
