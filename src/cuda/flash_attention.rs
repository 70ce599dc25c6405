//! Launchers of the flash-attention kernels (src/cuda/flash_attention.cu): causal or full
//! attention over bf16 q of H heads and k, v of KV heads (grouped), head sizes 64 and 128, with
//! no score matrix in memory. Heads are laid out `[B, heads, T, D]` ([`HeadLayout::HeadsMajor`],
//! candle's attention layout) or `[B, T, heads, D]` ([`HeadLayout::TokenMajor`]: a projection's
//! output `[B, T, heads·D]` viewed as heads, so the training step never transposes).

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, DType, Result, Tensor};
use half::bf16;

use super::{cuda_device, with_slice, wrap, FLASH_HEAD_DIMS};
use crate::layout::HeadLayout;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
const MODULE: &str = "kiln_flash_attention";
/// Queries (forward) or keys (backward) per block, and the tile of the other side.
const TILE: usize = 64;
const THREADS: u32 = 128;

/// The element strides (batch, head, row) of a contiguous tensor of `heads` heads of `rows` rows
/// of `d` in `layout`, as the kernels take them.
pub(super) fn head_strides(layout: HeadLayout, heads: usize, rows: usize, d: usize) -> [i64; 3] {
    let (h, r, d) = (heads as i64, rows as i64, d as i64);
    match layout {
        HeadLayout::HeadsMajor => [h * r * d, r * d, d],
        HeadLayout::TokenMajor => [r * h * d, d, h * d],
    }
}

/// Whether the kernels take these tensors: bf16 on CUDA, head size 64, 96 or 128 (q of rank 4 in
/// either layout: the head size is the last dimension).
pub fn flash_attention_supported(q: &Tensor) -> bool {
    q.device().is_cuda()
        && q.dtype() == DType::BF16
        && q.rank() == 4
        && FLASH_HEAD_DIMS.contains(&q.dims()[3])
}

/// Bytes of a bf16 tile of TILE rows of `d` (rows padded by 8).
fn tile_bytes(d: usize) -> usize {
    TILE * (d + 8) * 2
}

/// Shared memory of the forward kernel: the q tile and two stages of k and v tiles.
fn forward_shared_bytes(d: usize) -> usize {
    tile_bytes(d) + 2 * 2 * tile_bytes(d)
}

/// Shared memory of the backward kernel: the k and v tiles, dSᵀ (bf16), and per stage (two at
/// d = 64, one at 96 and 128: `Stages` in the kernel file) a query tile's q and dO tiles with its lse
/// and Δ (f32).
fn backward_shared_bytes(d: usize) -> usize {
    let stages = if d <= 64 { 2 } else { 1 };
    2 * tile_bytes(d) + TILE * (TILE + 8) * 2 + stages * (2 * tile_bytes(d) + 2 * TILE * 4)
}

struct Dims {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    tk: usize,
    d: usize,
    layout: HeadLayout,
}

impl Dims {
    /// The q-side and k-side strides, as kernel arguments.
    fn strides(&self) -> [i64; 6] {
        let [a, b, c] = head_strides(self.layout, self.h, self.t, self.d);
        let [x, y, z] = head_strides(self.layout, self.kv, self.tk, self.d);
        [a, b, c, x, y, z]
    }
}

fn dims(q: &Tensor, k: &Tensor, v: &Tensor, layout: HeadLayout) -> Result<Dims> {
    let (b, h, t, d) = layout.dims(q)?;
    let (bk, kv, tk, dk) = layout.dims(k)?;
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
    if !FLASH_HEAD_DIMS.contains(&d) {
        bail!("flash attention: head size {d} (64, 96 or 128 supported)");
    }
    Ok(Dims {
        b,
        h,
        kv,
        t,
        tk,
        d,
        layout,
    })
}

fn int(x: usize) -> i32 {
    x as i32
}

/// `(o, lse)`: the attention output (bf16, q's shape and layout) and each row's log-sum-exp of
/// its scaled scores in base 2 `[B, H, T]` (f32), which the backward pass needs.
pub fn flash_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    causal: bool,
    layout: HeadLayout,
) -> Result<(Tensor, Tensor)> {
    let dims = dims(q, k, v, layout)?;
    let strides = dims.strides();
    let Dims {
        b, h, kv, t, tk, d, ..
    } = dims;
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
                for s in &strides {
                    a.arg(s);
                }
                a.arg(&ti).arg(&tki).arg(&hi).arg(&n_rep);
                a.arg(&scale).arg(&causal).arg(&offset);
                unsafe { a.launch(cfg) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok((
        wrap(o, &dev, layout.shape(b, h, t, d)),
        wrap(lse, &dev, (b, h, t)),
    ))
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
    layout: HeadLayout,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = dims(q, k, v, layout)?;
    let strides = dims.strides();
    let Dims {
        b, h, kv, t, tk, d, ..
    } = dims;
    let grad = grad.to_dtype(DType::BF16)?.contiguous()?;
    let dev = cuda_device(q)?;

    // Δ = rowsum(dO ⊙ O), one warp a row.
    let rows = b * h * t;
    let delta = unsafe { dev.alloc::<f32>(rows)? };
    let row_dot = dev.get_or_load_custom_func("flash_row_dot", MODULE, PTX)?;
    // Eight elements a thread, a power of two of threads a row (within a warp).
    let lanes = (d / 8).next_power_of_two().min(32);
    let cfg = LaunchConfig {
        grid_dim: ((rows * lanes).div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, d_i, t_i, h_i, lanes_i) = (int(rows), int(d), int(t), int(h), int(lanes));
    with_slice::<bf16, _>(&grad, |g| {
        with_slice::<bf16, _>(o, |os| {
            let mut a = row_dot.builder();
            a.arg(g).arg(os).arg(&delta);
            for s in &strides[..3] {
                a.arg(s);
            }
            a.arg(&rows_i).arg(&t_i).arg(&h_i).arg(&d_i).arg(&lanes_i);
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
                        for s in &strides {
                            a.arg(s);
                        }
                        a.arg(&ti).arg(&tki).arg(&hi).arg(&n_rep);
                        a.arg(&scale).arg(&causal).arg(&offset);
                        unsafe { a.launch(cfg) }.w()?;
                        Ok(())
                    })
                })
            })
        })
    })?;
    let dq = wrap(dq, &dev, layout.shape(b, h, t, d)).to_dtype(DType::BF16)?;
    Ok((
        dq,
        wrap(dk, &dev, layout.shape(b, kv, tk, d)),
        wrap(dv, &dev, layout.shape(b, kv, tk, d)),
    ))
}
