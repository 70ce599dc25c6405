//! Launchers of LoRA's fused low-rank path (src/cuda/lora.cu): for up to three rank-16 adapters
//! sharing one input (q, k and v), the down projection of the dropped input, A's gradient and
//! the dropped input gradient, each one kernel that reads the input once and never writes a
//! dropped copy of it. The unfused path (dropout kernel, then cuBLAS) stays for everything
//! else: other ranks, widths that are not a multiple of 64, f32/f16.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, DType, Result, Tensor};
use half::bf16;

use super::{cuda_device, device_address, wrap};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
const MODULE: &str = "kiln_lora";
const RANK: usize = 16;
const CHUNK: usize = 64;
const WARPS: u32 = 4;

/// The adapters of one fused call and their dropout: each adapter's A `[16, K]` (bf16) and its
/// mask's seed, one probability for all.
pub struct LoraDropout<'a> {
    pub a: Vec<&'a Tensor>,
    pub seeds: Vec<u64>,
    pub p: f32,
}

/// `Adapters` in lora.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct Adapters {
    a: [u64; 3],
    seed: [u64; 3],
}

// SAFETY: plain integers, laid out as the C struct.
unsafe impl DeviceRepr for Adapters {}

/// Whether the fused kernels take input `x` (`[.., K]`) with these adapters.
pub fn lora_fused_supported(x: &Tensor, adapters: &LoraDropout) -> bool {
    let k = x.dim(candle_core::D::Minus1).unwrap_or(0);
    std::env::var("KILN_FUSED_LORA").as_deref() != Ok("0")
        && x.device().is_cuda()
        && x.dtype() == DType::BF16
        && x.is_contiguous()
        && k % CHUNK == 0
        && (1..=3).contains(&adapters.a.len())
        && adapters.seeds.len() == adapters.a.len()
        && adapters
            .a
            .iter()
            .all(|a| a.dtype() == DType::BF16 && a.is_contiguous() && a.dims() == [RANK, k])
}

impl LoraDropout<'_> {
    fn table(&self) -> Result<Adapters> {
        let mut t = Adapters {
            a: [0; 3],
            seed: [0; 3],
        };
        for (i, (a, seed)) in self.a.iter().zip(&self.seeds).enumerate() {
            t.a[i] = device_address(a, "fused LoRA")?;
            t.seed[i] = *seed;
        }
        Ok(t)
    }

    fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }
}

/// Rows and width of `x` as a matrix.
fn rows_k(x: &Tensor) -> Result<(usize, usize)> {
    let k = x.dim(candle_core::D::Minus1)?;
    Ok((x.elem_count() / k.max(1), k))
}

/// Up to three addresses of tensors shaped `[rows, 16]` (bf16) or `[16, K]` (f32), zeros for
/// the adapters that are not there.
fn addresses(ts: &[&Tensor], dims: &[usize], dtype: DType) -> Result<[u64; 3]> {
    let mut out = [0u64; 3];
    for (i, t) in ts.iter().enumerate() {
        if t.dims() != dims || t.dtype() != dtype || !t.is_contiguous() {
            bail!(
                "fused LoRA: expected a contiguous {dtype:?} {dims:?}, found {:?} {:?}",
                t.dtype(),
                t.dims()
            );
        }
        out[i] = device_address(t, "fused LoRA")?;
    }
    Ok(out)
}

/// `h_p = drop_p(x)·A_pᵀ` for every adapter: `[rows, 16]` each (bf16).
pub fn lora_down(x: &Tensor, adapters: &LoraDropout) -> Result<Vec<Tensor>> {
    let (rows, k) = rows_k(x)?;
    let dev = cuda_device(x)?;
    let n = adapters.a.len();
    let hs: Vec<Tensor> = (0..n)
        .map(|_| {
            // SAFETY: the kernel writes every element.
            let slice = unsafe { dev.alloc::<bf16>(rows * RANK)? };
            Ok(wrap(slice, &dev, (rows, RANK)))
        })
        .collect::<Result<_>>()?;
    let outs = addresses(&hs.iter().collect::<Vec<_>>(), &[rows, RANK], DType::BF16)?;
    let func = dev.get_or_load_custom_func("lora_down_r16", MODULE, PTX)?;
    let (table, x_addr) = (adapters.table()?, device_address(x, "fused LoRA")?);
    let (rows_i, k_i, n_i, scale) = (rows as i32, k as i32, n as i32, adapters.scale());
    let mut b = func.builder();
    b.arg(&x_addr).arg(&table);
    for o in &outs {
        b.arg(o);
    }
    b.arg(&rows_i).arg(&k_i).arg(&n_i).arg(&adapters.p).arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(16) as u32, 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.w()?;
    Ok(hs)
}

/// `dA_p += dh_pᵀ·drop_p(x)` for every adapter, into the f32 gradients `da` (`[16, K]`).
pub fn lora_grad_a(x: &Tensor, adapters: &LoraDropout, dh: &[&Tensor], da: &[&Tensor]) -> Result<()> {
    let (rows, k) = rows_k(x)?;
    let n = adapters.a.len();
    if dh.len() != n || da.len() != n {
        bail!("fused LoRA: {n} adapters, {} dh, {} dA", dh.len(), da.len());
    }
    let dev = cuda_device(x)?;
    let dh_addr = addresses(dh, &[rows, RANK], DType::BF16)?;
    let da_addr = addresses(da, &[RANK, k], DType::F32)?;
    let func = dev.get_or_load_custom_func("lora_grad_a_r16", MODULE, PTX)?;
    let (table, x_addr) = (adapters.table()?, device_address(x, "fused LoRA")?);
    let (rows_i, k_i, n_i, scale) = (rows as i32, k as i32, n as i32, adapters.scale());
    let mut b = func.builder();
    b.arg(&x_addr).arg(&table);
    for a in dh_addr.iter().chain(&da_addr) {
        b.arg(a);
    }
    b.arg(&rows_i).arg(&k_i).arg(&n_i).arg(&adapters.p).arg(&scale);
    // About four blocks a multiprocessor: column chunks times shares of the rows.
    let chunks = k / CHUNK;
    let shares = (600usize.div_ceil(chunks)).clamp(1, rows.div_ceil(16 * WARPS as usize));
    let cfg = LaunchConfig {
        grid_dim: (chunks as u32, shares as u32, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// `dx += Σ_p drop_p(dh_p·A_p)` in place (`dx`: `[rows, K]` bf16, contiguous).
pub fn lora_up_add(dx: &Tensor, adapters: &LoraDropout, dh: &[&Tensor]) -> Result<()> {
    let (rows, k) = rows_k(dx)?;
    let n = adapters.a.len();
    if dh.len() != n || dx.dtype() != DType::BF16 || !dx.is_contiguous() {
        bail!("fused LoRA: dx {:?} {:?} with {} dh for {n} adapters", dx.dtype(), dx.dims(), dh.len());
    }
    let dev = cuda_device(dx)?;
    let dh_addr = addresses(dh, &[rows, RANK], DType::BF16)?;
    let func = dev.get_or_load_custom_func("lora_up_add_r16", MODULE, PTX)?;
    let (table, dx_addr) = (adapters.table()?, device_address(dx, "fused LoRA")?);
    let (rows_i, k_i, n_i, scale) = (rows as i32, k as i32, n as i32, adapters.scale());
    let mut b = func.builder();
    b.arg(&dx_addr).arg(&table);
    for a in &dh_addr {
        b.arg(a);
    }
    b.arg(&rows_i).arg(&k_i).arg(&n_i).arg(&adapters.p).arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: ((k / CHUNK) as u32, rows.div_ceil(16 * WARPS as usize) as u32, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}
