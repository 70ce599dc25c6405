//! Batched matrix products on the CPU with the batch spread over the cores. candle's CPU matmul
//! runs a batch's matrices one after another, each split across threads; for attention's many
//! small matrices (`[B·H, T, T]·[B·H, T, D]`) that is mostly the threads' dispatch. Here each
//! matrix is one single-threaded GEMM (the `gemm` crate, as candle's), the matrices in parallel.

use candle_core::{DType, Device, Layout, Storage, Tensor};

/// `a · b` over the last two dimensions, the leading ones a batch (equal in both). On the CPU in
/// f32 with a batch of at least two, the batch goes across the cores; anything else is candle's
/// matmul. Any strides within a matrix (a transposed view needs no copy).
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let rank = a.rank();
    let fits = a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && rank >= 3
        && b.rank() == rank
        && a.dims()[..rank - 2] == b.dims()[..rank - 2]
        && a.dims()[..rank - 2].iter().product::<usize>() >= 2;
    if !fits {
        return a.matmul(b);
    }
    let (Some(sa), Some(sb)) = (batch_stride(a.layout()), batch_stride(b.layout())) else {
        return a.matmul(b);
    };
    let batch: usize = a.dims()[..rank - 2].iter().product();
    let (m, k) = (a.dims()[rank - 2], a.dims()[rank - 1]);
    let n = b.dims()[rank - 1];
    if b.dims()[rank - 2] != k {
        return a.matmul(b);
    }
    let (a_store, _) = a.storage_and_layout();
    let (b_store, _) = b.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*a_store, &*b_store) else {
        return a.matmul(b);
    };
    let (av, bv) = (ca.as_slice::<f32>()?, cb.as_slice::<f32>()?);
    let (a_off, b_off) = (a.layout().start_offset(), b.layout().start_offset());
    let (a_rs, a_cs) = matrix_strides(a.layout());
    let (b_rs, b_cs) = matrix_strides(b.layout());
    let mut out = vec![0f32; batch * m * n];
    use rayon::prelude::*;
    out.par_chunks_mut(m * n).enumerate().for_each(|(i, dst)| {
        // SAFETY: matrix i of `a` spans offset a_off + i·sa over m rows of stride a_rs and k
        // columns of stride a_cs within `av` (the layout says so), likewise `b`; `dst` is m×n.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                av.as_ptr().add(a_off + i * sa),
                a_cs,
                a_rs,
                bv.as_ptr().add(b_off + i * sb),
                b_cs,
                b_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
    let mut shape = a.dims().to_vec();
    shape[rank - 1] = n;
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// The element distance between consecutive matrices of a layout whose batch dimensions
/// collapse into one (each batch dimension's stride is the next one's times its size).
fn batch_stride(l: &Layout) -> Option<usize> {
    let (dims, strides) = (l.dims(), l.stride());
    let r = dims.len();
    let inner = strides[r - 3];
    for d in (0..r - 3).rev() {
        if dims[d] > 1 && strides[d] != strides[d + 1] * dims[d + 1] {
            return None;
        }
    }
    Some(inner)
}

/// (row stride, column stride) of a layout's matrices.
fn matrix_strides(l: &Layout) -> (isize, isize) {
    let s = l.stride();
    let r = s.len();
    (s[r - 2] as isize, s[r - 1] as isize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests_support::{max_diff, randn};

    /// Equal to candle's matmul (to f32 rounding) for contiguous and transposed operands.
    #[test]
    fn the_batch_in_parallel_equals_candles_matmul() {
        let a = randn(&[2, 3, 5, 7], 1);
        let b = randn(&[2, 3, 7, 4], 2);
        let bt = randn(&[2, 3, 4, 7], 3);
        let at = randn(&[2, 3, 7, 5], 4);
        for (x, y) in [
            (a.clone(), b.clone()),
            (a.clone(), bt.t().unwrap()),
            (at.t().unwrap(), b.clone()),
            (at.t().unwrap(), bt.t().unwrap()),
        ] {
            let got = batched_matmul(&x, &y).unwrap();
            let want = x.matmul(&y).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-5, "{diff}");
        }
    }
}
