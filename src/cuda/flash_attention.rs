//! Launchers of the flash-attention kernels (src/cuda/flash_attention.cu): causal or full
//! attention over bf16 q `[B, H, T, D]` and k, v `[B, KV, Tk, D]` (grouped heads), head sizes 64
//! and 128, with no score matrix in memory.

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, DType, Result, Tensor};
use half::bf16;

use super::{cuda_device, with_slice, wrap};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
const MODULE: &str = "kiln_flash_attention";
/// Queries (forward) or keys (backward) per block, and the tile of the other side.
const TILE: usize = 64;
const THREADS: u32 = 128;

/// Whether the kernels take these tensors: bf16 on CUDA, head size 64 or 128.
pub fn flash_attention_supported(q: &Tensor) -> bool {
    q.device().is_cuda()
        && q.dtype() == DType::BF16
        && q.rank() == 4
        && matches!(q.dims()[3], 64 | 128)
}

/// Shared memory of the forward kernel: q, k and v tiles (bf16, rows padded by 8).
fn forward_shared_bytes(d: usize) -> usize {
    3 * TILE * (d + 8) * 2
}

/// Shared memory of the backward kernel: k, v, q and dO tiles, dSᵀ (bf16), lse and Δ of a query
/// tile (f32).
fn backward_shared_bytes(d: usize) -> usize {
    4 * TILE * (d + 8) * 2 + TILE * (TILE + 8) * 2 + 2 * TILE * 4
}

struct Dims {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    tk: usize,
    d: usize,
}

fn dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Dims> {
    let (b, h, t, d) = q.dims4()?;
    let (bk, kv, tk, dk) = k.dims4()?;
    if bk != b || dk != d || v.dims() != k.dims() || kv == 0 || h % kv != 0 {
        bail!(
            "flash attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    for x in [q, k, v] {
        if x.dtype() != DType::BF16 || !x.is_contiguous() || x.layout().start_offset() != 0 {
            bail!("flash attention expects contiguous bf16 tensors");
        }
    }
    if !matches!(d, 64 | 128) {
        bail!("flash attention: head size {d} (64 or 128 supported)");
    }
    Ok(Dims { b, h, kv, t, tk, d })
}

fn int(x: usize) -> i32 {
    x as i32
}

/// `(o, lse)`: the attention output `[B, H, T, D]` (bf16) and each row's log-sum-exp of its
/// scaled scores in base 2 `[B, H, T]` (f32), which the backward pass needs.
pub fn flash_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    causal: bool,
) -> Result<(Tensor, Tensor)> {
    let Dims { b, h, kv, t, tk, d } = dims(q, k, v)?;
    let dev = cuda_device(q)?;
    let func = dev.get_or_load_custom_func(&format!("flash_fwd_d{d}"), MODULE, PTX)?;
    let smem = forward_shared_bytes(d);
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()?;
    // SAFETY: the kernel writes every element of both.
    let o = unsafe { dev.alloc::<bf16>(b * h * t * d)? };
    let lse = unsafe { dev.alloc::<f32>(b * h * t)? };
    let cfg = LaunchConfig {
        grid_dim: (t.div_ceil(TILE) as u32, (b * h) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (n_rep, offset, causal) = (int(h / kv), int(tk) - int(t), causal as i32);
    let (ti, tki, hi) = (int(t), int(tk), int(h));
    with_slice::<bf16, _>(q, |qs| {
        with_slice::<bf16, _>(k, |ks| {
            with_slice::<bf16, _>(v, |vs| {
                let mut a = func.builder();
                a.arg(qs).arg(ks).arg(vs).arg(&o).arg(&lse);
                a.arg(&ti).arg(&tki).arg(&hi).arg(&n_rep);
                a.arg(&scale).arg(&causal).arg(&offset);
                unsafe { a.launch(cfg) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok((wrap(o, &dev, (b, h, t, d)), wrap(lse, &dev, (b, h, t))))
}

/// `(dq, dk, dv)` of [`flash_attention_forward`] given its output `o`, `lse` and the output's
/// gradient; dk and dv are summed over the query heads that share each key/value head.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
    scale: f32,
    causal: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Dims { b, h, kv, t, tk, d } = dims(q, k, v)?;
    let grad = grad.to_dtype(DType::BF16)?.contiguous()?;
    let dev = cuda_device(q)?;

    // Δ = rowsum(dO ⊙ O), one warp a row.
    let rows = b * h * t;
    let delta = unsafe { dev.alloc::<f32>(rows)? };
    let row_dot = dev.get_or_load_custom_func("flash_row_dot", MODULE, PTX)?;
    let rows_per_block = 8;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(rows_per_block) as u32, 1, 1),
        block_dim: (32 * rows_per_block as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, d_i) = (int(rows), int(d));
    with_slice::<bf16, _>(&grad, |g| {
        with_slice::<bf16, _>(o, |os| {
            let mut a = row_dot.builder();
            a.arg(g).arg(os).arg(&delta).arg(&rows_i).arg(&d_i);
            unsafe { a.launch(cfg) }.w()?;
            Ok(())
        })
    })?;

    let func = dev.get_or_load_custom_func(&format!("flash_bwd_d{d}"), MODULE, PTX)?;
    let smem = backward_shared_bytes(d);
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()?;
    let dq = dev.alloc_zeros::<f32>(b * h * t * d)?;
    // SAFETY: the kernel writes every element of dk and dv.
    let dk = unsafe { dev.alloc::<bf16>(b * kv * tk * d)? };
    let dv = unsafe { dev.alloc::<bf16>(b * kv * tk * d)? };
    let cfg = LaunchConfig {
        grid_dim: (tk.div_ceil(TILE) as u32, (b * kv) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (n_rep, offset, causal) = (int(h / kv), int(tk) - int(t), causal as i32);
    let (ti, tki, hi) = (int(t), int(tk), int(h));
    with_slice::<bf16, _>(q, |qs| {
        with_slice::<bf16, _>(k, |ks| {
            with_slice::<bf16, _>(v, |vs| {
                with_slice::<bf16, _>(&grad, |g| {
                    with_slice::<f32, _>(lse, |l| {
                        let mut a = func.builder();
                        a.arg(qs).arg(ks).arg(vs).arg(g).arg(l).arg(&delta);
                        a.arg(&dq).arg(&dk).arg(&dv);
                        a.arg(&ti).arg(&tki).arg(&hi).arg(&n_rep);
                        a.arg(&scale).arg(&causal).arg(&offset);
                        unsafe { a.launch(cfg) }.w()?;
                        Ok(())
                    })
                })
            })
        })
    })?;
    let dq = wrap(dq, &dev, (b, h, t, d)).to_dtype(DType::BF16)?;
    Ok((
        dq,
        wrap(dk, &dev, (b, kv, tk, d)),
        wrap(dv, &dev, (b, kv, tk, d)),
    ))
}
