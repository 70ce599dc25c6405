//! `crate::cuda` in a build without CUDA: the names the rest of kiln calls, with the same
//! signatures, each answering that kiln was built without CUDA. Every caller checks the device
//! first (a tensor on the CPU or Metal never reaches them), so none of these runs; they exist so
//! that the code around them is one program in every build, compiled and linted everywhere.

use std::ffi::c_void;

use candle_core::{DType, Device, Result, Shape, Tensor};

use crate::layout::HeadLayout;

#[path = "shared.rs"]
mod shared;
pub use shared::*;

fn off<T>() -> Result<T> {
    candle_core::bail!("kiln was built without CUDA: build it with `--features cuda`")
}

pub fn device_count() -> usize {
    0
}

pub fn prepare_device(_: &Device) {}

pub fn free_memory(_: &Device) -> Result<Option<usize>> {
    Ok(None)
}

pub fn memory_in_use(_: &Device) -> Option<usize> {
    None
}

/// No event is ever recorded without CUDA.
pub enum Event {}

impl Event {
    pub fn record(_: &Device) -> Option<Event> {
        None
    }

    pub fn elapsed_ms(&self, _: &Event) -> f64 {
        match *self {}
    }
}

pub fn profiler_start() {}

pub fn profiler_stop() {}

pub fn stream_handle(_: &Device) -> Result<*mut c_void> {
    off()
}

pub fn rope_thd(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
    off()
}

pub fn rms_norm(_: &Tensor, _: &Tensor, _: f64) -> Result<Tensor> {
    off()
}

pub fn rms_norm_backward(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: f64,
    _: Option<&Tensor>,
) -> Result<Tensor> {
    off()
}

pub fn add(_: &Tensor, _: &Tensor) -> Result<Tensor> {
    off()
}

pub fn swiglu_backward(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<(Tensor, Tensor)> {
    off()
}

pub fn cross_entropy(_: &Tensor, _: &Tensor, _: &Tensor, _: f32) -> Result<Tensor> {
    off()
}

pub fn cross_entropy_backward(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: f32,
) -> Result<Tensor> {
    off()
}

pub fn cross_entropy_with_grad(
    _: Tensor,
    _: &Tensor,
    _: &Tensor,
    _: f32,
    _: f32,
) -> Result<(Tensor, Tensor)> {
    off()
}

pub fn distill_with_grad(
    _: Tensor,
    _: &Tensor,
    _: usize,
    _: &Tensor,
    _: &Tensor,
    _: &DistillKernelSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    off()
}

pub fn adamw(_: &[Tensor], _: &[Tensor], _: &[Tensor], _: &[Tensor], _: &AdamWStep) -> Result<()> {
    off()
}

pub fn grad_norm(_: &[Tensor]) -> Result<f64> {
    off()
}

pub fn gemm_into(
    _: &Tensor,
    _: &Tensor,
    _: bool,
    _: &Tensor,
    _: bool,
    _: f32,
    _: f32,
) -> Result<()> {
    off()
}

pub fn fused_attention_forward(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: f32,
    _: bool,
    _: HeadLayout,
) -> Result<(Tensor, AttentionStats)> {
    off()
}

#[allow(clippy::too_many_arguments)]
pub fn fused_attention_backward(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &AttentionStats,
    _: &Tensor,
    _: f32,
    _: bool,
    _: HeadLayout,
) -> Result<(Tensor, Tensor, Tensor)> {
    off()
}

pub fn nf4_dequantize(
    _: &Tensor,
    _: &Tensor,
    _: Nf4Scales,
    _: usize,
    _: usize,
    _: DType,
) -> Result<Tensor> {
    off()
}

pub fn nf4_quantize_blocks(_: &Tensor, _: usize) -> Result<(Tensor, Tensor)> {
    off()
}

pub fn dropout_add_into(_: &Tensor, _: &Tensor, _: u64, _: f32) -> Result<()> {
    off()
}

pub fn uninit_like(_: &Tensor, _: impl Into<Shape>) -> Result<Tensor> {
    off()
}

pub(crate) fn device_address(_: &Tensor, _: &str) -> Result<u64> {
    off()
}

/// Offloaded checkpoints need pinned host memory and a second CUDA stream.
pub mod offload {
    use candle_core::{Device, Tensor};

    use crate::error::{KilnError, Result};

    pub enum Offload {}
    pub enum Stored {}
    pub enum Fetched {}

    impl Offload {
        pub fn new(_: &Device) -> Result<Self> {
            Err(KilnError::Train(
                "offloaded checkpoints need a CUDA device".into(),
            ))
        }
        pub fn store(&self, _: &Tensor) -> Result<Stored> {
            match *self {}
        }
        pub fn release(&self, _: &mut Stored) -> Result<()> {
            match *self {}
        }
        pub fn fetch(&self, _: &Stored) -> Result<Fetched> {
            match *self {}
        }
        pub fn ready(&self, _: Fetched) -> Result<Tensor> {
            match *self {}
        }
    }
}
