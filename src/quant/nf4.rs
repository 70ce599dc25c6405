//! NF4 with double quantization, byte-compatible with bitsandbytes' CUDA quantizer.
//!
//! Layout (docs/formats.md A): the weight is flattened row-major into blocks of
//! `blocksize` (64) values; each block stores its absmax and 4-bit codes, two per byte, the even
//! element in the high nibble. With double quantization the f32 absmax vector is shifted by its
//! mean (`offset`) and quantized to 8 bits in blocks of 256 with the signed dynamic map.

use super::tables::{DYNAMIC_CODE_BITS, NF4_CODE_BITS};
use crate::error::{KilnError, Result};

pub const BLOCKSIZE: usize = 64;
pub const NESTED_BLOCKSIZE: usize = 256;

pub fn nf4_code() -> [f32; 16] {
    NF4_CODE_BITS.map(f32::from_bits)
}

pub fn dynamic_code() -> [f32; 256] {
    DYNAMIC_CODE_BITS.map(f32::from_bits)
}

/// The midpoints of the NF4 table, as bitsandbytes' `dQuantizeNF4` hard-codes them.
const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_43,
    -0.234_607_4,
    -0.137_911_73,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_77,
    0.389_312_54,
    0.501_663_4,
    0.642_786_9,
    0.861_478_4,
];

/// The code of one scaled value: the number of thresholds it is strictly above. NaN (an
/// all-zero block, where CUDA computes 0 * inf) is above none, so it gets code 0 as on CUDA.
#[inline]
fn nf4_encode(x: f32) -> u8 {
    NF4_THRESHOLDS.iter().filter(|&&t| x > t).count() as u8
}

/// bitsandbytes' `dQuantize<0>`: a 7-step binary search over the 256-entry dynamic map, then
/// a choice between neighbours by the f32 midpoint, with its exact tie rules.
fn dynamic_encode(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot: i32 = 127;
    let mut upper_pivot: i32 = 255;
    let mut lower_pivot: i32 = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot as usize];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot as usize];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[255];
    }
    if lower_pivot == 0 {
        lower = code[0];
    }
    if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint {
            upper_pivot as u8
        } else {
            pivot as u8
        }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint {
            lower_pivot as u8
        } else {
            pivot as u8
        }
    }
}

/// `tensor.mean()` of a contiguous f32 CUDA tensor, in torch's summation order (Reduce.cuh), so
/// the double-quantization offset has bitsandbytes' bits.
///
/// One thread block of `w` threads (a power of two up to 512) reduces the input: without
/// vectorization thread t sums elements t, t+w, t+2w, ... into 4 rotating accumulators; with it
/// (more than 128 elements), thread t sums the 4-vectors t, t+w, ... lane by lane. The threads'
/// sums are then folded by halving (shared memory, then warp shuffles), and the mean is the sum
/// times `1/n`. Beyond 131,072 elements torch splits the work over several blocks in a
/// GPU-dependent way; there the correctly rounded mean is used, which can differ from bnb's
/// offset by one ulp.
pub fn torch_cuda_mean(x: &[f32]) -> f32 {
    let n = x.len();
    if n == 0 {
        return f32::NAN;
    }
    if n >= 512 * 256 {
        return (x.iter().map(|&v| v as f64).sum::<f64>() / n as f64) as f32;
    }
    let vectorize = n > 128;
    let dim0 = if vectorize { n / 4 } else { n };
    let width = if dim0 < 512 {
        1usize << (usize::BITS - 1 - dim0.leading_zeros())
    } else {
        512
    };
    let mut partial = vec![0f32; width];
    for (t, p) in partial.iter_mut().enumerate() {
        let mut acc = [0f32; 4];
        if vectorize {
            let mut idx = t;
            while idx * 4 + 3 < n {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a += x[idx * 4 + k];
                }
                idx += width;
            }
            let tail = n - n % 4 + t;
            if tail < n {
                acc[0] += x[tail];
            }
        } else {
            let mut idx = t;
            while idx + 3 * width < n {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a += x[idx + k * width];
                }
                idx += 4 * width;
            }
            for (k, a) in acc.iter_mut().enumerate() {
                if idx + k * width < n {
                    *a += x[idx + k * width];
                }
            }
        }
        *p = ((acc[0] + acc[1]) + acc[2]) + acc[3];
    }
    // Pairwise halving: shared memory down to a warp, then shuffles with offsets 16, 8, 4, 2, 1.
    let mut dim = width;
    while dim > 1 {
        dim /= 2;
        for t in 0..dim {
            partial[t] += partial[t + dim];
        }
    }
    partial[0] * (1.0f32 / n as f32)
}

/// The per-block scales of a 4-bit weight, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested {
        codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        nested_code: Vec<f32>,
        offset: f32,
        nested_blocksize: usize,
    },
}

impl Absmax {
    /// The f32 scale of every block (`nested_code[q] * nested_absmax[i/256] + offset`).
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => codes
                .iter()
                .enumerate()
                .map(|(i, &q)| {
                    nested_code[q as usize] * nested_absmax[i / nested_blocksize] + offset
                })
                .collect(),
        }
    }
}

/// A 4-bit weight exactly as bitsandbytes stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// `(numel + 1) / 2` bytes, element 2j in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    pub code: [f32; 16],
    pub blocksize: usize,
    /// Logical shape, e.g. `[out, in]` for a linear weight.
    pub shape: Vec<usize>,
    /// The dtype the weight had before quantization (bnb's `quant_state.dtype`).
    pub dtype: candle_core::DType,
}

/// Scaled 4-bit codes and f32 absmax of `values`, as `kQuantizeBlockwise` computes them.
pub fn quantize_blocks(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let n = values.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
    let mut codes = vec![0u8; n + 1];
    for (b, block) in values.chunks(blocksize).enumerate() {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(amax);
        let inv = 1.0f32 / amax;
        for (j, &v) in block.iter().enumerate() {
            codes[b * blocksize + j] = nf4_encode(v * inv);
        }
    }
    // An odd element count pads with 0.0, which NF4 encodes as code 7.
    if n % 2 == 1 {
        codes[n] = 7;
    }
    for (j, byte) in packed.iter_mut().enumerate() {
        *byte = (codes[2 * j] << 4) | codes[2 * j + 1];
    }
    (packed, absmax)
}

/// Double quantization of the block scales: `offset = mean(absmax)`, then 8-bit blockwise
/// quantization of `absmax - offset` in blocks of 256.
pub fn double_quantize(absmax: &[f32]) -> Absmax {
    let code = dynamic_code();
    let offset = torch_cuda_mean(absmax);
    let shifted: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let mut codes = Vec::with_capacity(shifted.len());
    let mut nested_absmax = Vec::new();
    for block in shifted.chunks(NESTED_BLOCKSIZE) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        nested_absmax.push(amax);
        let inv = 1.0f32 / amax;
        codes.extend(block.iter().map(|&v| dynamic_encode(&code, v * inv)));
    }
    Absmax::Nested {
        codes,
        nested_absmax,
        nested_code: code.to_vec(),
        offset,
        nested_blocksize: NESTED_BLOCKSIZE,
    }
}

impl Nf4Tensor {
    /// Quantizes `values` (already converted to f32 from `dtype`) with double quantization.
    pub fn quantize(values: &[f32], shape: &[usize], dtype: candle_core::DType) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != values.len() || numel == 0 {
            return Err(KilnError::Quant(format!(
                "cannot quantize: shape {shape:?} has {numel} elements but {} values were given",
                values.len()
            )));
        }
        let (packed, absmax) = quantize_blocks(values, BLOCKSIZE);
        Ok(Self {
            packed,
            absmax: double_quantize(&absmax),
            code: nf4_code(),
            blocksize: BLOCKSIZE,
            shape: shape.to_vec(),
            dtype,
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows and columns of a 2-D weight.
    pub fn dims2(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [r, c] => (*r, *c),
            s => (
                s.iter().take(s.len().saturating_sub(1)).product(),
                *s.last().unwrap_or(&1),
            ),
        }
    }

    /// The 4-bit code of element `i`.
    #[inline]
    pub fn code_at(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// Dequantizes elements `[start, end)` into `out` (f32), with block scales `scales`.
    pub fn dequantize_range_into(&self, scales: &[f32], start: usize, out: &mut [f32]) {
        for (k, o) in out.iter_mut().enumerate() {
            let i = start + k;
            *o = self.code[self.code_at(i) as usize] * scales[i / self.blocksize];
        }
    }

    /// All values in f32, as `dequantize_4bit` computes them before its cast to `dtype`.
    pub fn dequantize(&self) -> Vec<f32> {
        let scales = self.absmax.dequantize();
        let mut out = vec![0f32; self.numel()];
        self.dequantize_range_into(&scales, 0, &mut out);
        out
    }

    /// Bytes held by the quantized weight and its scales.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(v) => v.len() * 4,
                Absmax::Nested {
                    codes,
                    nested_absmax,
                    ..
                } => codes.len() + nested_absmax.len() * 4,
            }
    }
}

/// Quantizes `w` with the CUDA kernel: the NF4 codes and block absmax computed on the GPU, the
/// double quantization of the absmax on the host, exactly as the CPU quantizer does. Returns the
/// host tensor and the packed codes where the kernel wrote them.
pub fn quantize_on_cuda(
    w: &candle_core::Tensor,
) -> crate::error::Result<(Nf4Tensor, candle_core::Tensor)> {
    let (packed, absmax) = crate::cuda::nf4_quantize_blocks(w, BLOCKSIZE)?;
    let host = Nf4Tensor {
        packed: packed.to_vec1::<u8>()?,
        absmax: double_quantize(&absmax.to_vec1::<f32>()?),
        code: nf4_code(),
        blocksize: BLOCKSIZE,
        shape: w.dims().to_vec(),
        dtype: w.dtype(),
    };
    Ok((host, packed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_midpoints_of_the_code() {
        let code = nf4_code();
        for k in 0..15 {
            let mid = (code[k] + code[k + 1]) / 2.0;
            assert!((mid - NF4_THRESHOLDS[k]).abs() < 1e-6, "threshold {k}");
        }
    }

    #[test]
    fn every_code_value_encodes_to_itself() {
        let code = nf4_code();
        for (k, &c) in code.iter().enumerate() {
            assert_eq!(nf4_encode(c) as usize, k);
        }
        let dcode = dynamic_code();
        for (k, &c) in dcode.iter().enumerate() {
            assert_eq!(
                dynamic_encode(&dcode, c) as usize,
                k,
                "dynamic code {k} = {c}"
            );
        }
    }

    #[test]
    fn zero_block_gets_code_zero_like_cuda() {
        let mut v = vec![0.5f32; 128];
        v[..64].iter_mut().for_each(|x| *x = 0.0);
        let (packed, absmax) = quantize_blocks(&v, BLOCKSIZE);
        assert!(packed[..32].iter().all(|&b| b == 0));
        assert_eq!(absmax, vec![0.0, 0.5]);
    }
}
