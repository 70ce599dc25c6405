//! The frozen 4-bit linear layer: `y = x · deq(W)ᵀ`, with a backward pass that recomputes
//! `dx = dy · deq(W)` from the packed weight, so no dequantized copy of a weight is ever kept
//! alive by the autograd graph (ARCHITECTURE.md, decision 1).
//!
//! It is a candle `CustomOp1` on the activation `x`; the op owns the packed weight. On the CPU
//! the weight is dequantized by plain Rust on all cores; on other devices by generic candle ops
//! over tensors kept on that device (the dedicated CUDA kernel is a later step).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::ops::{self, TensorOp};
use crate::quant::nf4::{Absmax, Nf4Tensor};

thread_local! {
    static DEQUANTIZATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times this thread dequantized an NF4 weight (tests use it to see the backward
/// recompute).
pub fn dequantizations() -> usize {
    DEQUANTIZATIONS.with(|c| c.get())
}

/// The packed weight as tensors on a non-CPU device, for the generic dequantization: 4 bits a
/// value plus the double-quantized block scales, as stored.
struct DeviceCopy {
    packed: Tensor,
    code: Tensor,
    scales: DeviceScales,
}

enum DeviceScales {
    Plain(Tensor),
    Nested {
        codes: Tensor,
        nested_absmax: Tensor,
        nested_code: Tensor,
        offset: f64,
        nested_blocksize: usize,
    },
}

pub struct Nf4Weight {
    pub host: Nf4Tensor,
    device: Option<DeviceCopy>,
}

impl Nf4Weight {
    /// On the CPU the weight is dequantized from `host` by plain Rust; elsewhere from a copy on
    /// the device.
    pub fn new(host: Nf4Tensor, device: &Device) -> Result<Self> {
        if device.is_cpu() {
            return Ok(Self { host, device: None });
        }
        Self::with_device_copy(host, device)
    }

    /// Always dequantizes with generic candle ops on `device` (tests use it on the CPU to check
    /// the path GPUs take).
    pub fn with_device_copy(host: Nf4Tensor, device: &Device) -> Result<Self> {
        let packed = Tensor::from_slice(&host.packed, host.packed.len(), device)?;
        Self::with_packed_on(host, packed, device)
    }

    /// As [`Self::with_device_copy`], with the packed codes already on `device`.
    fn with_packed_on(host: Nf4Tensor, packed: Tensor, device: &Device) -> Result<Self> {
        let code = Tensor::from_slice(&host.code, 16, device)?;
        let scales = match &host.absmax {
            Absmax::Plain(v) => DeviceScales::Plain(Tensor::from_slice(v, v.len(), device)?),
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => DeviceScales::Nested {
                codes: Tensor::from_slice(codes, codes.len(), device)?,
                nested_absmax: Tensor::from_slice(nested_absmax, nested_absmax.len(), device)?,
                nested_code: Tensor::from_slice(nested_code, nested_code.len(), device)?,
                offset: *offset as f64,
                nested_blocksize: *nested_blocksize,
            },
        };
        Ok(Self {
            host,
            device: Some(DeviceCopy {
                packed,
                code,
                scales,
            }),
        })
    }

    /// Quantizes the weight `w` (on a CUDA device, in its stored dtype) on the GPU: codes and
    /// block absmax there, the double quantization of the absmax on the host, exactly as the
    /// CPU quantizer does.
    pub fn quantize_cuda(w: &Tensor) -> Result<Self> {
        let (host, packed) = crate::quant::nf4::quantize_on_cuda(w)?;
        // The packed codes stay where the kernel wrote them; only the scales go back up.
        Self::with_packed_on(host, packed, w.device())
    }

    pub fn out_features(&self) -> usize {
        self.host.dims2().0
    }

    pub fn in_features(&self) -> usize {
        self.host.dims2().1
    }

    /// The dequantized weight `[out, in]` in `dtype` on `device`, rounded through the weight's
    /// original dtype exactly as bitsandbytes' `dequantize_4bit` returns it.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        DEQUANTIZATIONS.with(|c| c.set(c.get() + 1));
        let _p = crate::profile::scope("nf4.dequantize", device);
        let (rows, cols) = self.host.dims2();
        let w = match (&self.device, device) {
            (Some(copy), Device::Cuda(_)) => {
                // The kernel writes the stored dtype (bnb's rounding) directly.
                let w = crate::cuda::nf4_dequantize(
                    &copy.packed,
                    &copy.code,
                    copy.scales.for_kernel(),
                    rows * cols,
                    self.host.blocksize,
                    self.host.dtype,
                )?;
                return Ok(w.reshape((rows, cols))?.to_dtype(dtype)?);
            }
            (Some(copy), _) => {
                // Generic ops: split nibbles, look codes up, scale by block.
                let p = copy.packed.to_dtype(DType::F32)?;
                let hi = (&p / 16.0)?.floor()?;
                let lo = (&p - (&hi * 16.0)?)?;
                let idx = Tensor::stack(&[&hi, &lo], 1)?
                    .flatten_all()?
                    .to_dtype(DType::U32)?;
                let idx = idx.narrow(0, 0, rows * cols)?;
                let vals = copy.code.index_select(&idx, 0)?;
                let bs = self.host.blocksize;
                let absmax = copy.scales.dequantize()?;
                let nblocks = absmax.dim(0)?;
                let vals = pad_to_multiple(vals, bs)?;
                let w = vals
                    .reshape((nblocks, bs))?
                    .broadcast_mul(&absmax.unsqueeze(1)?)?;
                w.flatten_all()?
                    .narrow(0, 0, rows * cols)?
                    .reshape((rows, cols))?
            }
            _ => Tensor::from_vec(dequantize_parallel(&self.host), (rows, cols), &Device::Cpu)?
                .to_device(device)?,
        };
        // Round through the stored dtype (bf16/f16) as bnb does, then to the compute dtype.
        let w = if self.host.dtype != DType::F32 {
            w.to_dtype(self.host.dtype)?
        } else {
            w
        };
        Ok(w.to_dtype(dtype)?)
    }
}

/// Pads a 1-D tensor with zeros to a multiple of `k`.
fn pad_to_multiple(t: Tensor, k: usize) -> Result<Tensor> {
    let n = t.dim(0)?;
    let padded = n.div_ceil(k) * k;
    if padded == n {
        return Ok(t);
    }
    Ok(Tensor::cat(
        &[&t, &Tensor::zeros(padded - n, t.dtype(), t.device())?],
        0,
    )?)
}

impl DeviceScales {
    fn for_kernel(&self) -> crate::cuda::Nf4Scales<'_> {
        match self {
            DeviceScales::Plain(t) => crate::cuda::Nf4Scales::Plain(t),
            DeviceScales::Nested {
                codes,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => crate::cuda::Nf4Scales::Nested {
                codes,
                nested_absmax,
                nested_code,
                offset: *offset as f32,
                nested_blocksize: *nested_blocksize,
            },
        }
    }

    /// f32 block scales: `nested_code[q] * nested_absmax[i / 256] + offset`.
    fn dequantize(&self) -> Result<Tensor> {
        match self {
            DeviceScales::Plain(t) => Ok(t.clone()),
            DeviceScales::Nested {
                codes,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => {
                let n = codes.dim(0)?;
                let vals = nested_code.index_select(&codes.to_dtype(DType::U32)?, 0)?;
                let vals =
                    pad_to_multiple(vals, *nested_blocksize)?.reshape(((), *nested_blocksize))?;
                let scaled = vals
                    .broadcast_mul(&nested_absmax.unsqueeze(1)?)?
                    .flatten_all()?
                    .narrow(0, 0, n)?;
                Ok((scaled + *offset)?)
            }
        }
    }
}

/// Dequantizes on all CPU cores, in chunks aligned to blocks.
fn dequantize_parallel(t: &Nf4Tensor) -> Vec<f32> {
    use rayon::prelude::*;
    let scales = t.absmax.dequantize();
    let mut out = vec![0f32; t.numel()];
    // Pieces of about 64k values (whole pairs of blocks: two values a byte) on rayon's threads;
    // a small weight is one piece (a thread per call cost more than the work on small models).
    let pair = t.blocksize * 2;
    let chunk = (1usize << 16).div_ceil(pair) * pair;
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(k, part)| t.dequantize_range_into(&scales, k * chunk, part));
    out
}

/// The matmul against the packed weight, as an autograd op on the activation.
struct Nf4Matmul {
    weight: Arc<Nf4Weight>,
}

/// `x · wᵀ` for `x` of any rank `[..., in]`.
pub fn linear_with(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    let m: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((m, in_f))?.matmul(&w.t()?)?;
    *dims.last_mut().unwrap() = out_f;
    y.reshape(dims)
}

impl TensorOp for Nf4Matmul {
    fn name(&self) -> &'static str {
        "nf4-linear"
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self
            .weight
            .dequantize(x.dtype(), x.device())
            .map_err(candle_core::Error::wrap)?;
        linear_with(x, &w)
    }

    /// `dx = dy · deq(W)`: the weight is dequantized again here and dropped right after.
    fn backward(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let w = self
            .weight
            .dequantize(grad_res.dtype(), grad_res.device())
            .map_err(candle_core::Error::wrap)?;
        let (out_f, in_f) = w.dims2()?;
        let m = grad_res.elem_count() / out_f;
        let dx = grad_res.reshape((m, out_f))?.matmul(&w)?;
        debug_assert_eq!(dx.dim(1)?, in_f);
        Ok(Some(dx.reshape(arg.shape())?.to_dtype(arg.dtype())?))
    }
}

/// A frozen linear layer whose weight is stored in NF4.
#[derive(Clone)]
pub struct Nf4Linear {
    weight: Arc<Nf4Weight>,
}

impl Nf4Linear {
    pub fn new(weight: Nf4Weight) -> Self {
        Self {
            weight: Arc::new(weight),
        }
    }

    pub fn weight(&self) -> &Nf4Weight {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::apply(
            x,
            Nf4Matmul {
                weight: self.weight.clone(),
            },
        )?)
    }
}

impl ops::FrozenMatrix for Nf4Linear {
    fn matrix(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.weight
            .dequantize(dtype, device)
            .map_err(candle_core::Error::wrap)
    }
}
