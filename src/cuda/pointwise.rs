//! Launchers of the row-wise and element-wise layer kernels (src/cuda/pointwise.cu): RMSNorm
//! and SwiGLU, both ways.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Tensor, D};
use half::{bf16, f16};

use super::{contiguous_slice, cuda_device, rows_config, suffix, with_slice, wrap};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/pointwise.ptx"));
const MODULE: &str = "kiln_pointwise";

/// RMSNorm `x / rms(x) · w` over the last dimension, in f32 arithmetic, in `x`'s dtype: one
/// block a row, 16-byte vectors (the explicit step's norms; candle-nn's kernel moves one
/// element a thread at a time).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let cols = x.dim(D::Minus1)?;
    let rows = x.elem_count() / cols.max(1);
    if w.elem_count() != cols {
        bail!("rms norm: weight of {} for rows of {cols}", w.elem_count());
    }
    let x = x.contiguous()?;
    let w = w.to_dtype(dtype)?.contiguous()?;
    let dev = cuda_device(&x)?;
    let func =
        dev.get_or_load_custom_func(&format!("rms_norm_fwd_{}", suffix(dtype)?), MODULE, PTX)?;
    let (cols_u, eps_f) = (cols as u32, eps as f32);
    macro_rules! launch {
        ($t:ty) => {{
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<$t>(x.elem_count())? };
            with_slice::<$t, _>(&x, |xs| {
                with_slice::<$t, _>(&w, |ws| {
                    let mut b = func.builder();
                    b.arg(xs).arg(ws).arg(&out).arg(&cols_u).arg(&eps_f);
                    unsafe { b.launch(rows_config(rows, 256)) }.w()?;
                    Ok(())
                })
            })?;
            Ok(wrap(out, &dev, x.shape().clone()))
        }};
    }
    match dtype {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("rms norm: unsupported dtype {d:?}"),
    }
}

/// `dx` of `y = x / rms(x) · w` (over the last dimension) given `g = dy`, plus `residual` when
/// given (the gradient reaching x around the norm), in f32 arithmetic, in `x`'s dtype.
pub fn rms_norm_backward(
    x: &Tensor,
    g: &Tensor,
    w: &Tensor,
    eps: f64,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let cols = x.dim(D::Minus1)?;
    let rows = x.elem_count() / cols.max(1);
    if w.elem_count() != cols {
        bail!(
            "rms norm backward: weight of {} for rows of {cols}",
            w.elem_count()
        );
    }
    let x = x.contiguous()?;
    let g = g.to_dtype(dtype)?.contiguous()?;
    let w = w.to_dtype(dtype)?.contiguous()?;
    let residual = match residual {
        Some(r) if r.shape() == x.shape() => Some(r.to_dtype(dtype)?.contiguous()?),
        Some(r) => bail!(
            "rms norm backward: residual {:?} for {:?}",
            r.shape(),
            x.shape()
        ),
        None => None,
    };
    let dev = cuda_device(&x)?;
    let name = match residual {
        Some(_) => "rms_norm_bwd_add",
        None => "rms_norm_bwd",
    };
    let func = dev.get_or_load_custom_func(&format!("{name}_{}", suffix(dtype)?), MODULE, PTX)?;
    let (cols_u, eps_f) = (cols as u32, eps as f32);
    macro_rules! launch {
        ($t:ty) => {{
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<$t>(x.elem_count())? };
            with_slice::<$t, _>(&x, |xs| {
                with_slice::<$t, _>(&g, |gs| {
                    with_slice::<$t, _>(&w, |ws| {
                        let launch = |res: Option<&CudaView<$t>>| {
                            let mut b = func.builder();
                            b.arg(xs).arg(gs).arg(ws);
                            if let Some(r) = res {
                                b.arg(r);
                            }
                            b.arg(&out).arg(&cols_u).arg(&eps_f);
                            unsafe { b.launch(rows_config(rows, 256)) }.w()?;
                            Ok(())
                        };
                        match &residual {
                            Some(r) => with_slice::<$t, _>(r, |rs| launch(Some(rs))),
                            None => launch(None),
                        }
                    })
                })
            })?;
            Ok(wrap(out, &dev, x.shape().clone()))
        }};
    }
    match dtype {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("rms norm backward: unsupported dtype {d:?}"),
    }
}

/// Blocks of 256 threads over `n` elements, at most 8 a multiprocessor's worth (grid-stride).
fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 132 * 8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `silu(gate) ⊙ up` for contiguous `gate` and `up` of one shape and dtype.
pub fn swiglu_forward(
    gate: &CudaStorage,
    gate_layout: &Layout,
    up: &CudaStorage,
    up_layout: &Layout,
) -> Result<CudaStorage> {
    if gate_layout.shape() != up_layout.shape() || gate.dtype() != up.dtype() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate_layout.shape(),
            up_layout.shape()
        );
    }
    let dev = gate.device().clone();
    let func = dev.get_or_load_custom_func(
        &format!("swiglu_fwd_{}", suffix(gate.dtype())?),
        MODULE,
        PTX,
    )?;
    let n = gate_layout.shape().elem_count();
    let n64 = n as u64;
    macro_rules! launch {
        ($t:ty) => {{
            let g = contiguous_slice::<$t>(gate, gate_layout)?;
            let u = contiguous_slice::<$t>(up, up_layout)?;
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let mut b = func.builder();
            b.arg(&g).arg(&u).arg(&out).arg(&n64);
            unsafe { b.launch(elementwise_config(n)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match gate.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("swiglu: unsupported dtype {d:?}"),
    })
}

/// `(d gate, d up)` of `silu(gate) ⊙ up` given the output's gradient `dy`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let dtype = gate.dtype();
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let dy = dy.to_dtype(dtype)?.contiguous()?;
    let dev = cuda_device(&gate)?;
    let func =
        dev.get_or_load_custom_func(&format!("swiglu_bwd_{}", suffix(dtype)?), MODULE, PTX)?;
    let n = gate.elem_count();
    let n64 = n as u64;
    macro_rules! launch {
        ($t:ty) => {{
            // SAFETY: the kernel writes every element of both.
            let dg = unsafe { dev.alloc::<$t>(n)? };
            let du = unsafe { dev.alloc::<$t>(n)? };
            with_slice::<$t, _>(&gate, |g| {
                with_slice::<$t, _>(&up, |u| {
                    with_slice::<$t, _>(&dy, |d| {
                        let mut b = func.builder();
                        b.arg(g).arg(u).arg(d).arg(&dg).arg(&du).arg(&n64);
                        unsafe { b.launch(elementwise_config(n)) }.w()?;
                        Ok(())
                    })
                })
            })?;
            (
                wrap(dg, &dev, gate.shape().clone()),
                wrap(du, &dev, gate.shape().clone()),
            )
        }};
    }
    Ok(match dtype {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("swiglu: unsupported dtype {d:?}"),
    })
}

/// `a + b` for contiguous tensors of one shape and dtype (the residual adds of the explicit
/// step; candle's binary kernel moves one element a thread).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        bail!(
            "add: {:?} {:?} and {:?} {:?}",
            a.shape(),
            a.dtype(),
            b.shape(),
            b.dtype()
        );
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let dev = cuda_device(&a)?;
    let func = dev.get_or_load_custom_func(&format!("add_{}", suffix(a.dtype())?), MODULE, PTX)?;
    let n = a.elem_count();
    let n64 = n as u64;
    macro_rules! launch {
        ($t:ty) => {{
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<$t>(n)? };
            with_slice::<$t, _>(&a, |x| {
                with_slice::<$t, _>(&b, |y| {
                    let mut l = func.builder();
                    l.arg(x).arg(y).arg(&out).arg(&n64);
                    unsafe { l.launch(elementwise_config(n)) }.w()?;
                    Ok(())
                })
            })?;
            Ok(wrap(out, &dev, a.shape().clone()))
        }};
    }
    match a.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("add: unsupported dtype {d:?}"),
    }
}

/// RoPE on token-major heads `x` `[B, T, H, D]` (contiguous): `x·cos + rotate_half(x)·sin` with
/// `cos`, `sin` of `[T', D/2]` or `[B, T', D/2]` (T' ≥ T, rows by position), as candle-nn's
/// `rope_thd` computes it, with 16-byte vectors.
pub fn rope_thd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, h, d) = x.dims4()?;
    let (cs_rows, half) = (cos.dim(D::Minus2)?, cos.dim(D::Minus1)?);
    let batched = cos.rank() == 3;
    if half * 2 != d
        || cs_rows < t
        || cos.shape() != sin.shape()
        || (batched && cos.dim(0)? != b)
        || cos.dtype() != x.dtype()
        || sin.dtype() != x.dtype()
    {
        bail!(
            "rope: x {:?} {:?} with cos {:?} {:?}",
            x.shape(),
            x.dtype(),
            cos.shape(),
            cos.dtype()
        );
    }
    let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let cs_batch = if batched { (cs_rows * half) as u64 } else { 0 };
    let dev = cuda_device(&x)?;
    let func =
        dev.get_or_load_custom_func(&format!("rope_thd_{}", suffix(x.dtype())?), MODULE, PTX)?;
    let n = x.elem_count();
    let dims = [b, t, h, d].map(|v| v as u32);
    macro_rules! launch {
        ($t:ty) => {{
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<$t>(n)? };
            with_slice::<$t, _>(&x, |xs| {
                with_slice::<$t, _>(&cos, |c| {
                    with_slice::<$t, _>(&sin, |s| {
                        let mut l = func.builder();
                        l.arg(xs).arg(c).arg(s).arg(&out);
                        for v in &dims {
                            l.arg(v);
                        }
                        l.arg(&cs_batch);
                        unsafe { l.launch(elementwise_config(n / 2)) }.w()?;
                        Ok(())
                    })
                })
            })?;
            Ok(wrap(out, &dev, x.shape().clone()))
        }};
    }
    match x.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => bail!("rope: unsupported dtype {d:?}"),
    }
}
