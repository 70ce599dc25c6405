//! Launchers for kiln's CUDA kernels (one `.cu` file an op, compiled to PTX by build.rs): NF4
//! dequantization and quantization (`nf4.cu`), hashed dropout (`dropout.cu`), the reference
//! path's attention softmax (`softmax.cu`) and cross-entropy (`cross_entropy.cu`). Each returns candle tensors on the
//! input's device, so the rest of kiln stays written in candle ops.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

mod cudnn;
mod cudnn_attention;
mod device;
mod distill;
mod flash_attention;
mod gemm;
pub mod offload;
mod optimizer;
mod pointwise;
mod shared;
pub use cudnn_attention::{fused_attention_backward, fused_attention_forward};
pub use device::{
    device_count, free_memory, memory_in_use, prepare_device, profiler_start, profiler_stop,
    stream_handle, Event,
};
pub use distill::distill_with_grad;
pub use flash_attention::{
    flash_attention_backward, flash_attention_forward, flash_attention_supported,
};
pub use gemm::gemm_into;
pub use optimizer::{adamw, grad_norm};
pub use shared::*;

pub use pointwise::{add, rms_norm, rms_norm_backward, rope_thd, swiglu_backward, swiglu_forward};

/// A PTX module build.rs compiled from one kernel file: the name it loads under, and its text.
struct Ptx {
    module: &'static str,
    text: &'static str,
}

const NF4: Ptx = Ptx {
    module: "kiln_nf4",
    text: include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx")),
};
const DROPOUT: Ptx = Ptx {
    module: "kiln_dropout",
    text: include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx")),
};
const SOFTMAX: Ptx = Ptx {
    module: "kiln_softmax",
    text: include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx")),
};
const CROSS_ENTROPY: Ptx = Ptx {
    module: "kiln_cross_entropy",
    text: include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx")),
};
const THREADS: u32 = 256;

fn grid(n: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as u64).max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => bail!("kiln cuda kernels: unsupported dtype {d:?}"),
    })
}

/// The device of a CUDA tensor.
pub fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        d => bail!("expected a CUDA tensor, found one on {d:?}"),
    }
}

/// Runs `f` on the CUDA memory of contiguous tensor `t`.
fn with_slice<T: CudaDType, R>(t: &Tensor, f: impl FnOnce(&CudaView<T>) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("kiln cuda kernels expect contiguous tensors");
    };
    match &*storage {
        Storage::Cuda(s) => f(&s.as_cuda_slice::<T>()?.slice(start..end)),
        _ => bail!("expected a CUDA tensor"),
    }
}

/// The device address of contiguous CUDA tensor `t`'s first element, for kernels that take
/// tables of tensors. Kernels may write through it: kiln runs all CUDA work on one stream, so
/// the write is ordered with every other use of the buffer.
pub(crate) fn device_address(t: &Tensor, what: &str) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = t.storage_and_layout();
    let Some((start, _)) = layout.contiguous_offsets() else {
        bail!("{what}: expected contiguous tensors");
    };
    let Storage::Cuda(s) = &*storage else {
        bail!("{what}: expected CUDA tensors");
    };
    let stream = s.device().cuda_stream();
    let (base, elem) = match t.dtype() {
        DType::F32 => (s.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 4),
        DType::BF16 => (s.as_cuda_slice::<bf16>()?.device_ptr(&stream).0, 2),
        DType::F16 => (s.as_cuda_slice::<f16>()?.device_ptr(&stream).0, 2),
        d => bail!("{what}: unsupported dtype {d:?}"),
    };
    Ok(base + (start * elem) as u64)
}

fn wrap<T: CudaDType + DeviceRepr>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// A CUDA tensor of `like`'s dtype and device, shaped `shape`, its memory left uninitialized:
/// for outputs that a kernel or a β = 0 GEMM writes entirely (no zero-fill launch).
pub fn uninit_like(like: &Tensor, shape: impl Into<Shape>) -> Result<Tensor> {
    uninit(&cuda_device(like)?, like.dtype(), shape)
}

/// A CUDA tensor on `dev`, its memory left uninitialized (see [`uninit_like`]).
pub fn uninit(dev: &CudaDevice, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    macro_rules! alloc {
        ($t:ty) => {{
            // SAFETY: callers write every element before reading any (see above).
            let slice = unsafe { dev.alloc::<$t>(n)? };
            Ok(wrap(slice, dev, shape))
        }};
    }
    match dtype {
        DType::F32 => alloc!(f32),
        DType::BF16 => alloc!(bf16),
        DType::F16 => alloc!(f16),
        d => bail!("uninit: unsupported dtype {d:?}"),
    }
}

/// Dequantizes `n` NF4 values (`packed`: u8, two a byte; `code`: the 16 f32 code values) into
/// a 1-D tensor of `dtype`.
pub fn nf4_dequantize(
    packed: &Tensor,
    code: &Tensor,
    scales: Nf4Scales,
    n: usize,
    blocksize: usize,
    dtype: DType,
) -> Result<Tensor> {
    let dev = cuda_device(packed)?;
    let func = dev.get_or_load_custom_func(
        &format!("nf4_dequant_{}", suffix(dtype)?),
        NF4.module,
        NF4.text,
    )?;
    // One thread per 16 values.
    let cfg = grid(n.div_ceil(16) as u64);
    let (n64, bs) = (n as u64, blocksize as u32);
    macro_rules! launch {
        ($t:ty) => {{
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n)? };
            with_slice::<u8, _>(packed, |p| {
                with_slice::<f32, _>(code, |c| match &scales {
                    Nf4Scales::Plain(absmax) => with_slice::<f32, _>(absmax, |a| {
                        let mut b = func.builder();
                        b.arg(p).arg(a).arg(p).arg(a).arg(a).arg(&0f32).arg(c);
                        b.arg(&out).arg(&n64).arg(&bs).arg(&1u32);
                        unsafe { b.launch(cfg) }.w()?;
                        Ok(())
                    }),
                    Nf4Scales::Nested {
                        codes,
                        nested_absmax,
                        nested_code,
                        offset,
                        nested_blocksize,
                    } => with_slice::<u8, _>(codes, |q| {
                        with_slice::<f32, _>(nested_absmax, |na| {
                            with_slice::<f32, _>(nested_code, |nc| {
                                let nbs = *nested_blocksize as u32;
                                let null = 0u64;
                                let mut b = func.builder();
                                b.arg(p)
                                    .arg(&null)
                                    .arg(q)
                                    .arg(na)
                                    .arg(nc)
                                    .arg(offset)
                                    .arg(c);
                                b.arg(&out).arg(&n64).arg(&bs).arg(&nbs);
                                unsafe { b.launch(cfg) }.w()?;
                                Ok(())
                            })
                        })
                    }),
                })
            })?;
            wrap(out, &dev, n)
        }};
    }
    Ok(match dtype {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("nf4 dequantize: unsupported dtype {d:?}"),
    })
}

/// NF4 codes (u8, two a byte) and f32 absmax of each block of `blocksize` values of the
/// contiguous tensor `x`, exactly as the CPU quantizer computes them.
pub fn nf4_quantize_blocks(x: &Tensor, blocksize: usize) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(x)?;
    let x = x.flatten_all()?.contiguous()?;
    let n = x.elem_count();
    let nblocks = n.div_ceil(blocksize);
    let func = dev.get_or_load_custom_func(
        &format!("nf4_quantize_{}", suffix(x.dtype())?),
        NF4.module,
        NF4.text,
    )?;
    // SAFETY: the kernel writes every packed byte and every absmax.
    let packed = unsafe { dev.alloc::<u8>(n.div_ceil(2))? };
    let absmax = unsafe { dev.alloc::<f32>(nblocks)? };
    let (n64, bs) = (n as u64, blocksize as u32);
    macro_rules! launch {
        ($t:ty) => {
            with_slice::<$t, _>(&x, |xs| {
                let mut b = func.builder();
                b.arg(xs).arg(&packed).arg(&absmax).arg(&n64).arg(&bs);
                unsafe { b.launch(grid(nblocks as u64)) }.w()?;
                Ok(())
            })?
        };
    }
    match x.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("nf4 quantize: unsupported dtype {d:?}"),
    }
    Ok((
        wrap(packed, &dev, n.div_ceil(2)),
        wrap(absmax, &dev, nblocks),
    ))
}

/// Hashed dropout of a CUDA storage (see `dropout_keep` in ops/dropout.rs).
pub fn dropout(storage: &CudaStorage, layout: &Layout, seed: u64, p: f32) -> Result<CudaStorage> {
    let dev = storage.device().clone();
    let n = layout.shape().elem_count();
    macro_rules! launch {
        ($t:ty) => {{
            // SAFETY: the kernel writes every element.
            let mut out = unsafe { dev.alloc::<$t>(n)? };
            launch_dropout::<$t>("dropout", storage, layout, &mut out.slice_mut(..), seed, p)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match storage.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("dropout: unsupported dtype {d:?}"),
    })
}

/// `acc += drop(x)` in place (the same mask as [`dropout`] of `x` with this seed): the explicit
/// step's LoRA input gradient added to the base's without a separate masked tensor.
pub fn dropout_add_into(acc: &Tensor, x: &Tensor, seed: u64, p: f32) -> Result<()> {
    if acc.shape() != x.shape() || acc.dtype() != x.dtype() || !acc.is_contiguous() {
        bail!(
            "dropout_add_into: {:?} {:?} into {:?} {:?} (contiguous)",
            x.shape(),
            x.dtype(),
            acc.shape(),
            acc.dtype()
        );
    }
    acc.inplace_op2(&x.contiguous()?, &DropoutAdd { seed, p })
}

struct DropoutAdd {
    seed: u64,
    p: f32,
}

impl candle_core::InplaceOp2 for DropoutAdd {
    fn name(&self) -> &'static str {
        "dropout-add"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("dropout_add_into runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        acc: &mut CudaStorage,
        acc_l: &Layout,
        x: &CudaStorage,
        x_l: &Layout,
    ) -> Result<()> {
        let Some((start, end)) = acc_l.contiguous_offsets() else {
            bail!("dropout_add_into: the accumulator must be contiguous")
        };
        macro_rules! launch {
            ($t:ty) => {{
                let mut out = acc.as_cuda_slice_mut::<$t>()?.slice_mut(start..end);
                launch_dropout::<$t>("dropout_add", x, x_l, &mut out, self.seed, self.p)
            }};
        }
        match x.dtype() {
            DType::F32 => launch!(f32),
            DType::BF16 => launch!(bf16),
            DType::F16 => launch!(f16),
            d => bail!("dropout: unsupported dtype {d:?}"),
        }
    }
}

/// `kernel` (`dropout` or `dropout_add`) of contiguous `x` into `out`, one thread a group of 4.
fn launch_dropout<T: CudaDType + DeviceRepr>(
    kernel: &str,
    x: &CudaStorage,
    layout: &Layout,
    out: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<T>,
    seed: u64,
    p: f32,
) -> Result<()> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("dropout expects a contiguous input")
    };
    let dev = x.device();
    let func = dev.get_or_load_custom_func(
        &format!("{kernel}_{}", suffix(x.dtype())?),
        DROPOUT.module,
        DROPOUT.text,
    )?;
    let src = x.as_cuda_slice::<T>()?.slice(start..end);
    let (n, scale) = ((end - start) as u64, 1.0f32 / (1.0 - p));
    let mut b = func.builder();
    b.arg(&src).arg(out).arg(&n).arg(&seed).arg(&p).arg(&scale);
    unsafe { b.launch(grid(n.div_ceil(4))) }.w()?;
    Ok(())
}

fn contiguous_slice<'a, T: CudaDType>(
    s: &'a CudaStorage,
    layout: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("kiln cuda kernels expect contiguous inputs")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// `softmax(scale · scores + mask)` over the last dimension of `scores` `[B, H, Tq, Tk]`, with
/// the additive `mask` `[Tq, Tk]` or `[B, 1, Tq, Tk]` (contiguous, `scores`' dtype).
pub fn masked_softmax(
    scores: &CudaStorage,
    layout: &Layout,
    mask: Option<&Tensor>,
    scale: f32,
    causal: Option<usize>,
) -> Result<CudaStorage> {
    let dims = layout.dims();
    let [b, h, tq, tk] = dims else {
        bail!("masked softmax expects [B, H, Tq, Tk] scores, got {dims:?}")
    };
    let dev = scores.device().clone();
    let func = dev.get_or_load_custom_func(
        &format!("masked_softmax_{}", suffix(scores.dtype())?),
        SOFTMAX.module,
        SOFTMAX.text,
    )?;
    let rows = (b * h * tq) as u32;
    let cfg = rows_config(rows as usize, 256);
    let mask_batches = match mask {
        Some(m) if m.rank() == 4 => m.dim(0)? as u32,
        _ => 1u32,
    };
    let (cols, queries, heads) = (*tk as u32, *tq as u32, *h as u32);
    let (causal, offset) = (causal.is_some() as u32, causal.unwrap_or(0) as u32);
    let n = b * h * tq * tk;
    macro_rules! launch {
        ($t:ty) => {{
            let x = contiguous_slice::<$t>(scores, layout)?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let go = |m: Option<&CudaView<$t>>| -> Result<()> {
                let null = 0u64;
                let mut bld = func.builder();
                bld.arg(&x);
                match m {
                    Some(m) => bld.arg(m),
                    None => bld.arg(&null),
                };
                bld.arg(&out)
                    .arg(&cols)
                    .arg(&queries)
                    .arg(&heads)
                    .arg(&mask_batches)
                    .arg(&scale)
                    .arg(&causal)
                    .arg(&offset);
                unsafe { bld.launch(cfg) }.w()?;
                Ok(())
            };
            match mask {
                Some(m) => with_slice::<$t, _>(m, |ms| go(Some(ms)))?,
                None => go(None)?,
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match scores.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("masked softmax: unsupported dtype {d:?}"),
    })
}

/// The gradient of the scores from the probabilities and their gradient (same shapes).
pub fn masked_softmax_backward(
    probs: &CudaStorage,
    probs_layout: &Layout,
    dprobs: &CudaStorage,
    dprobs_layout: &Layout,
    scale: f32,
    causal: Option<usize>,
) -> Result<CudaStorage> {
    let dims = probs_layout.dims();
    let cols = *dims.last().unwrap_or(&1) as u32;
    let queries = dims[dims.len().saturating_sub(2)] as u32;
    let (causal, offset) = (causal.is_some() as u32, causal.unwrap_or(0) as u32);
    let n = probs_layout.shape().elem_count();
    let rows = (n / cols as usize) as u32;
    let dev = probs.device().clone();
    let func = dev.get_or_load_custom_func(
        &format!("masked_softmax_{}_bwd", suffix(probs.dtype())?),
        SOFTMAX.module,
        SOFTMAX.text,
    )?;
    let cfg = rows_config(rows as usize, 256);
    macro_rules! launch {
        ($t:ty) => {{
            let p = contiguous_slice::<$t>(probs, probs_layout)?;
            let dp = contiguous_slice::<$t>(dprobs, dprobs_layout)?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let mut bld = func.builder();
            bld.arg(&p)
                .arg(&dp)
                .arg(&out)
                .arg(&cols)
                .arg(&queries)
                .arg(&scale)
                .arg(&causal)
                .arg(&offset);
            unsafe { bld.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match probs.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("masked softmax: unsupported dtype {d:?}"),
    })
}

/// Per-row weighted cross-entropy `w·(logsumexp(z) − z[t])` of `logits` `[rows, V]`, with
/// `z = cap·tanh(logits/cap)` when `cap > 0`: f32 `[rows]`.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    cap: f32,
) -> Result<Tensor> {
    let dev = cuda_device(logits)?;
    let (rows, cols) = logits.dims2()?;
    let func = dev.get_or_load_custom_func(
        &format!("cross_entropy_{}_fwd", suffix(logits.dtype())?),
        CROSS_ENTROPY.module,
        CROSS_ENTROPY.text,
    )?;
    // SAFETY: the kernel writes every row's loss.
    let loss = unsafe { dev.alloc::<f32>(rows)? };
    let cols32 = cols as u32;
    macro_rules! launch {
        ($t:ty) => {
            with_slice::<$t, _>(logits, |z| {
                with_slice::<u32, _>(targets, |t| {
                    with_slice::<f32, _>(weights, |w| {
                        let mut b = func.builder();
                        b.arg(z).arg(t).arg(w).arg(&loss).arg(&cols32).arg(&cap);
                        unsafe { b.launch(rows_config(rows, 1024)) }.w()?;
                        Ok(())
                    })
                })
            })?
        };
    }
    match logits.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("cross entropy: unsupported dtype {d:?}"),
    }
    Ok(wrap(loss, &dev, rows))
}

/// The gradient of `grad · Σ cross_entropy(...)` with respect to `logits` (same dtype), where
/// `grad` is an f32 scalar on the device (read there: no host synchronization).
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    grad: &Tensor,
    cap: f32,
) -> Result<Tensor> {
    let dev = cuda_device(logits)?;
    let (rows, cols) = logits.dims2()?;
    let func = dev.get_or_load_custom_func(
        &format!("cross_entropy_{}_bwd", suffix(logits.dtype())?),
        CROSS_ENTROPY.module,
        CROSS_ENTROPY.text,
    )?;
    let grad = grad.to_dtype(DType::F32)?.reshape(1)?.contiguous()?;
    let cols32 = cols as u32;
    macro_rules! launch {
        ($t:ty) => {{
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<$t>(rows * cols)? };
            with_slice::<$t, _>(logits, |z| {
                with_slice::<u32, _>(targets, |t| {
                    with_slice::<f32, _>(weights, |w| {
                        with_slice::<f32, _>(&grad, |g| {
                            let mut b = func.builder();
                            b.arg(z)
                                .arg(t)
                                .arg(w)
                                .arg(g)
                                .arg(&out)
                                .arg(&cols32)
                                .arg(&cap);
                            unsafe { b.launch(rows_config(rows, 1024)) }.w()?;
                            Ok(())
                        })
                    })
                })
            })?;
            wrap(out, &dev, (rows, cols))
        }};
    }
    Ok(match logits.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("cross entropy: unsupported dtype {d:?}"),
    })
}

fn rows_config(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The explicit step's loss and gradient of one logits chunk at once: returns each row's
/// weighted cross-entropy `w·(logsumexp(z) − z[t])` (f32 `[rows]`, `z = cap·tanh(logits/cap)`
/// when `cap > 0`) and the chunk's gradient `(softmax(z) − onehot(t))·w·grad` (times the cap's
/// derivative), written over `logits` in place: the chunk is consumed and comes back as its
/// gradient, in one kernel that reads it twice and writes it once.
pub fn cross_entropy_with_grad(
    logits: Tensor,
    targets: &Tensor,
    weights: &Tensor,
    grad: f32,
    cap: f32,
) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(&logits)?;
    let (rows, cols) = logits.dims2()?;
    if !logits.is_contiguous() {
        bail!("cross_entropy_with_grad: the logits must be contiguous");
    }
    let func = dev.get_or_load_custom_func(
        &format!("cross_entropy_{}_grad_inplace", suffix(logits.dtype())?),
        CROSS_ENTROPY.module,
        CROSS_ENTROPY.text,
    )?;
    // SAFETY: the kernel writes every row's loss.
    let loss = unsafe { dev.alloc::<f32>(rows)? };
    let cols32 = cols as u32;
    macro_rules! launch {
        ($t:ty) => {
            // The logits are owned here (taken by value): writing their gradient over them
            // through the view is the point of the kernel.
            with_slice::<$t, _>(&logits, |z| {
                with_slice::<u32, _>(targets, |t| {
                    with_slice::<f32, _>(weights, |w| {
                        let mut b = func.builder();
                        b.arg(z).arg(t).arg(w).arg(&loss);
                        b.arg(&cols32).arg(&grad).arg(&cap);
                        unsafe { b.launch(rows_config(rows, 1024)) }.w()?;
                        Ok(())
                    })
                })
            })?
        };
    }
    match logits.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("cross entropy: unsupported dtype {d:?}"),
    }
    Ok((wrap(loss, &dev, rows), logits))
}
