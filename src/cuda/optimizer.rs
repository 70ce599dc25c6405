//! Launchers of the optimizer kernels (src/cuda/optimizer.cu): the gradient norm and AdamW over
//! every LoRA tensor, one launch each instead of a handful of candle ops per tensor (about
//! 1,500 launches and 128 host syncs a step on a 1B model with q/k/v/o adapters).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, DType, Result, Tensor};

use super::{cuda_device, device_address, AdamWStep};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optimizer.ptx"));
const MODULE: &str = "kiln_optimizer";
const THREADS: u32 = 256;

/// One AdamW step's constants, as the kernel reads them (`AdamWArgs` in optimizer.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamWArgs {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
    inv_bias2_sqrt: f32,
    grad_scale: f32,
}

// SAFETY: plain f32 fields, laid out as the C struct.
unsafe impl DeviceRepr for AdamWArgs {}

/// The device addresses and lengths of contiguous f32 CUDA tensors.
fn table(tensors: &[Tensor], what: &str) -> Result<(Vec<u64>, Vec<u64>)> {
    let mut ptrs = Vec::with_capacity(tensors.len());
    let mut lens = Vec::with_capacity(tensors.len());
    for t in tensors {
        if t.dtype() != DType::F32 {
            bail!("{what}: expected f32 tensors, found {:?}", t.dtype());
        }
        ptrs.push(device_address(t, what)?);
        lens.push(t.elem_count() as u64);
    }
    Ok((ptrs, lens))
}

/// Blocks over x for the longest tensor (4 elements a thread at least), one row a tensor.
fn config(lens: &[u64]) -> Result<LaunchConfig> {
    let longest = lens.iter().copied().max().unwrap_or(0);
    if lens.len() > 65_535 {
        bail!(
            "optimizer: {} tensors in one launch (at most 65,535)",
            lens.len()
        );
    }
    Ok(LaunchConfig {
        grid_dim: (
            longest.div_ceil(THREADS as u64 * 4).clamp(1, 1024) as u32,
            lens.len() as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The global L2 norm of `grads` (f32 CUDA tensors): one kernel, one read back.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let Some(first) = grads.first() else {
        return Ok(0.0);
    };
    let dev = cuda_device(first)?;
    let (ptrs, lens) = table(grads, "grad_norm")?;
    let stream = dev.cuda_stream();
    let ptrs_d = stream.clone_htod(&ptrs).w()?;
    let lens_d = stream.clone_htod(&lens).w()?;
    let out = dev.alloc_zeros::<f64>(1)?;
    let func = dev.get_or_load_custom_func("sum_squares_f32", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&ptrs_d).arg(&lens_d).arg(&out);
    unsafe { b.launch(config(&lens)?) }.w()?;
    let sum = stream.clone_dtoh(&out).w()?[0];
    Ok(sum.sqrt())
}

/// One AdamW step in place over every tensor of `params` (f32 CUDA tensors; the moments
/// likewise, shaped as their parameters), in one launch.
pub fn adamw(
    params: &[Tensor],
    grads: &[Tensor],
    first_moments: &[Tensor],
    second_moments: &[Tensor],
    step: &AdamWStep,
) -> Result<()> {
    let Some(first) = params.first() else {
        return Ok(());
    };
    for (k, p) in params.iter().enumerate() {
        for (t, what) in [
            (&grads[k], "gradient"),
            (&first_moments[k], "first moment"),
            (&second_moments[k], "second moment"),
        ] {
            if t.shape() != p.shape() {
                bail!(
                    "adamw: {what} {:?} for a parameter {:?}",
                    t.shape(),
                    p.shape()
                );
            }
        }
    }
    let dev = cuda_device(first)?;
    let (p, lens) = table(params, "adamw")?;
    let (g, _) = table(grads, "adamw")?;
    let (m, _) = table(first_moments, "adamw")?;
    let (v, _) = table(second_moments, "adamw")?;
    let stream = dev.cuda_stream();
    let upload = |t: &Vec<u64>| stream.clone_htod(t).w();
    let (p, g, m, v, lens_d) = (
        upload(&p)?,
        upload(&g)?,
        upload(&m)?,
        upload(&v)?,
        upload(&lens)?,
    );
    let bias1 = 1.0 - step.beta1.powi(step.step);
    let bias2 = 1.0 - step.beta2.powi(step.step);
    let args = AdamWArgs {
        beta1: step.beta1 as f32,
        one_minus_beta1: (1.0 - step.beta1) as f32,
        beta2: step.beta2 as f32,
        one_minus_beta2: (1.0 - step.beta2) as f32,
        eps: step.eps as f32,
        decay: (1.0 - step.lr * step.weight_decay) as f32,
        step_size: (step.lr / bias1) as f32,
        inv_bias2_sqrt: (1.0 / bias2.sqrt()) as f32,
        grad_scale: step.grad_scale as f32,
    };
    let func = dev.get_or_load_custom_func("adamw_f32", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&p).arg(&g).arg(&m).arg(&v).arg(&lens_d).arg(&args);
    unsafe { b.launch(config(&lens)?) }.w()?;
    Ok(())
}
