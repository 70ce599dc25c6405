//! The CUDA seam's data, the same in every build: what callers outside `src/cuda/` build or
//! hold to call the kernels (and `off.rs`'s stand-ins name in their signatures).

use candle_core::Tensor;

/// The row statistics of a forward pass, by the kernels that computed it.
pub enum AttentionStats {
    /// kiln's flash kernels: log-sum-exp in base 2, `[B, H, T]`.
    Flash(Tensor),
    /// cuDNN: natural log-sum-exp, `[B, H, T]`.
    Cudnn(Tensor),
}

/// What the kernel needs besides the rows: the divergence (0 forward KL, 1 reverse KL,
/// 2 Jensen–Shannon), the temperature, alpha, the gradient's scale and both soft caps (0: none).
#[derive(Debug, Clone, Copy)]
pub struct DistillKernelSpec {
    pub kind: u32,
    pub temperature: f32,
    pub alpha: f32,
    pub grad: f32,
    pub cap: f32,
    pub teacher_cap: f32,
}

/// The hyper-parameters of one AdamW step over LoRA tensors.
pub struct AdamWStep {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub lr: f64,
    /// 1-based optimizer step (bias corrections).
    pub step: i32,
    /// Multiplies every gradient first (the clipping factor; 1 when not clipping).
    pub grad_scale: f64,
}

/// The head sizes the kernels are built for (`FLASH` in the kernel file).
pub const FLASH_HEAD_DIMS: [usize; 3] = [64, 96, 128];

/// The block scales of a 4-bit weight on the device.
pub enum Nf4Scales<'a> {
    Plain(&'a Tensor),
    Nested {
        codes: &'a Tensor,
        nested_absmax: &'a Tensor,
        nested_code: &'a Tensor,
        offset: f32,
        nested_blocksize: usize,
    },
}
