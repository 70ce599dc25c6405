//! Launcher of distillation's fused loss-and-gradient kernel (src/cuda/distill.cu).

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, DType, Result, Tensor};
use half::{bf16, f16};

use super::{cuda_device, rows_config, suffix, with_slice, wrap, DistillKernelSpec};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/distill.ptx"));
const MODULE: &str = "kiln_distill";

/// One chunk of distillation at once: the student's logits `[rows, V]` (contiguous, consumed)
/// come back as the gradient of `grad · Σ w·[alpha·T²·D + (1 − alpha)·CE]` with respect to
/// them, beside each row's `w·D` and `w·CE` (f32 `[rows]`). `teacher` `[rows, V_t]` holds the
/// teacher's logits (the student's dtype) or log-probabilities (f32); the divergence is over
/// the first `shared` ids.
pub fn distill_with_grad(
    student: Tensor,
    teacher: &Tensor,
    shared: usize,
    targets: &Tensor,
    weights: &Tensor,
    spec: &DistillKernelSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = cuda_device(&student)?;
    let (rows, cols) = student.dims2()?;
    let (teacher_rows, teacher_cols) = teacher.dims2()?;
    if !student.is_contiguous() || teacher_rows != rows || shared > cols.min(teacher_cols) {
        bail!("distill_with_grad: student {student:?} and teacher {teacher:?} rows do not match (shared {shared})");
    }
    let func = dev.get_or_load_custom_func(
        &format!(
            "distill_grad_inplace_{}_{}",
            suffix(student.dtype())?,
            suffix(teacher.dtype())?
        ),
        MODULE,
        PTX,
    )?;
    // SAFETY: the kernel writes every row's sums.
    let divergence = unsafe { dev.alloc::<f32>(rows)? };
    let cross_entropy = unsafe { dev.alloc::<f32>(rows)? };
    let (cols, teacher_cols, shared) = (cols as u32, teacher_cols as u32, shared as u32);
    macro_rules! launch {
        ($s:ty, $u:ty) => {
            // The student's logits are owned here (taken by value): the kernel writes their
            // gradient over them.
            with_slice::<$s, _>(&student, |z| {
                with_slice::<$u, _>(teacher, |y| {
                    with_slice::<u32, _>(targets, |t| {
                        with_slice::<f32, _>(weights, |w| {
                            let mut b = func.builder();
                            b.arg(z).arg(y).arg(t).arg(w);
                            b.arg(&divergence).arg(&cross_entropy);
                            b.arg(&cols).arg(&teacher_cols).arg(&shared);
                            b.arg(&spec.temperature).arg(&spec.alpha).arg(&spec.grad);
                            b.arg(&spec.cap).arg(&spec.teacher_cap).arg(&spec.kind);
                            unsafe { b.launch(rows_config(rows, 1024)) }.w()?;
                            Ok(())
                        })
                    })
                })
            })?
        };
    }
    match (student.dtype(), teacher.dtype()) {
        (DType::F32, DType::F32) => launch!(f32, f32),
        (DType::BF16, DType::BF16) => launch!(bf16, bf16),
        (DType::BF16, DType::F32) => launch!(bf16, f32),
        (DType::F16, DType::F16) => launch!(f16, f16),
        (DType::F16, DType::F32) => launch!(f16, f32),
        (s, u) => bail!("distillation: student logits {s:?} with teacher rows {u:?}"),
    }
    Ok((
        wrap(divergence, &dev, rows),
        wrap(cross_entropy, &dev, rows),
        student,
    ))
}
