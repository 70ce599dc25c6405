//! `c ← α·op(a)·op(b) + β·c` into an existing tensor, with cuBLAS (`cublasGemmEx`, f32
//! accumulation): the explicit step adds a LoRA path to its projection's output, sums the input
//! gradients of projections that share an input, and scales by LoRA's s, inside the GEMMs
//! instead of in separate element-wise passes. bf16/f16/f32 operands; `c` of their dtype or f32
//! (LoRA gradients accumulate in f32 straight from bf16 operands).
//!
//! Row-major matrices, as candle stores them: `a` is `[M, K]` (`[K, M]` with `ta`), `b` is
//! `[K, N]` (`[N, K]` with `tb`: a weight `[out, in]` applied as `x·Wᵀ`), `c` is `[M, N]`. Any
//! leading dimensions fold into the rows. cuBLAS is column-major, so it computes
//! `cᵀ = op(b)ᵀ·op(a)ᵀ` on the same memory.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, DType, InplaceOp3, Layout, Result, Tensor};

/// `c ← alpha·op(a)·op(b) + beta·c` (see the module docs for shapes).
pub fn gemm_into(
    c: &Tensor,
    a: &Tensor,
    ta: bool,
    b: &Tensor,
    tb: bool,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let rows_cols = |t: &Tensor| -> Result<(usize, usize)> {
        let cols = t.dim(candle_core::D::Minus1)?;
        Ok((t.elem_count() / cols.max(1), cols))
    };
    let (ar, ac) = rows_cols(a)?;
    let (br, bc) = rows_cols(b)?;
    let (cr, cc) = rows_cols(c)?;
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let (kb, n) = if tb { (bc, br) } else { (br, bc) };
    if k != kb || cr != m || cc != n {
        bail!(
            "gemm_into: [{ar}x{ac}]{} · [{br}x{bc}]{} into [{cr}x{cc}]",
            if ta { "ᵀ" } else { "" },
            if tb { "ᵀ" } else { "" }
        );
    }
    if a.dtype() != b.dtype() || (c.dtype() != a.dtype() && c.dtype() != DType::F32) {
        bail!(
            "gemm_into: dtypes {:?}·{:?} into {:?}",
            a.dtype(),
            b.dtype(),
            c.dtype()
        );
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    if !c.is_contiguous() {
        bail!("gemm_into: the output must be contiguous");
    }
    c.inplace_op3(
        &a,
        &b,
        &Gemm {
            m,
            n,
            k,
            ta,
            tb,
            alpha,
            beta,
        },
    )
}

struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
}

fn data_type(dtype: DType) -> Result<cublas::cudaDataType> {
    Ok(match dtype {
        DType::BF16 => cublas::cudaDataType::CUDA_R_16BF,
        DType::F16 => cublas::cudaDataType::CUDA_R_16F,
        DType::F32 => cublas::cudaDataType::CUDA_R_32F,
        d => bail!("gemm_into: unsupported dtype {d:?}"),
    })
}

impl InplaceOp3 for Gemm {
    fn name(&self) -> &'static str {
        "gemm-into"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("gemm_into runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        c: &mut CudaStorage,
        lc: &Layout,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<()> {
        let dev = c.device().clone();
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let (a_type, c_type) = (data_type(a.dtype())?, data_type(c.dtype())?);
        let offset = |l: &Layout, dtype: DType| (l.start_offset() * dtype.size_in_bytes()) as u64;
        macro_rules! ptr {
            ($s:expr, $t:ty) => {{
                let (p, guard) = $s.as_cuda_slice::<$t>()?.device_ptr(&stream);
                (p, guard)
            }};
        }
        let (pa, _ga) = match a.dtype() {
            DType::BF16 => ptr!(a, half::bf16),
            DType::F16 => ptr!(a, half::f16),
            _ => ptr!(a, f32),
        };
        let (pb, _gb) = match b.dtype() {
            DType::BF16 => ptr!(b, half::bf16),
            DType::F16 => ptr!(b, half::f16),
            _ => ptr!(b, f32),
        };
        let c_dtype = c.dtype();
        let (pc, _gc) = match c_dtype {
            DType::BF16 => c.as_cuda_slice_mut::<half::bf16>()?.device_ptr_mut(&stream),
            DType::F16 => c.as_cuda_slice_mut::<half::f16>()?.device_ptr_mut(&stream),
            _ => c.as_cuda_slice_mut::<f32>()?.device_ptr_mut(&stream),
        };
        let (pa, pb, pc) = (
            pa + offset(la, a.dtype()),
            pb + offset(lb, b.dtype()),
            pc + offset(lc, c_dtype),
        );
        let op = |t: bool| {
            if t {
                cublas::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (m, n, k) = (self.m as i32, self.n as i32, self.k as i32);
        // Column-major: cᵀ [n x m] = op(b)ᵀ [n x k] · op(a)ᵀ [k x m].
        let ldb = if self.tb { k } else { n };
        let lda = if self.ta { m } else { k };
        // SAFETY: the pointers are live for the call (their guards are held), the shapes were
        // checked against the tensors' element counts, and the handle runs on candle's stream.
        unsafe {
            candle_core::cuda_backend::cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                op(self.tb),
                op(self.ta),
                n,
                m,
                k,
                &self.alpha as *const f32 as *const _,
                pb as *const _,
                a_type,
                ldb,
                pa as *const _,
                a_type,
                lda,
                &self.beta as *const f32 as *const _,
                pc as *mut _,
                c_type,
                n,
                cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .w()?;
        }
        Ok(())
    }
}
