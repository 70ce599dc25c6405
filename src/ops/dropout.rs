//! Hashed dropout: the mask is a function of a seed and the element index, so it is never
//! stored and every device computes the same one.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, Layout, Shape, Tensor};

// Dropout.

/// Whether element `i` of dropout stream `seed` is kept at drop probability `p`: a 16-bit
/// uniform draw, bits `16·(i % 4)..` of a counter-based hash (splitmix64) of the group `i / 4`,
/// the same on every device (one hash serves four elements: the GPU kernel is bound by its
/// 64-bit multiplies otherwise).
pub fn dropout_keep(seed: u64, i: u64, p: f32) -> bool {
    let group = i / 4;
    let mut z = seed.wrapping_add((group + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let draw = (z >> (16 * (i % 4))) & 0xffff;
    draw as f32 * (1.0 / 65_536.0) >= p
}

/// The seed whose mask is `seed`'s from element `offset` on (a multiple of 4): element i of the
/// new stream is element `offset + i` of the old. The hash reads `seed + (i/4 + 1)·φ`, so an
/// offset of `4k` elements is `k·φ` added to the seed. (A tile of rows gets the mask the whole
/// tensor has there.)
pub fn dropout_seed_at(seed: u64, offset: u64) -> u64 {
    assert!(
        offset.is_multiple_of(4),
        "dropout offsets are whole hash groups"
    );
    seed.wrapping_add((offset / 4).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// `x` with each element zeroed with probability `p` and the rest scaled by `1/(1-p)`; the mask
/// is a function of `seed` and the element index only, so no mask is stored.
pub fn dropout(x: &Tensor, seed: u64, p: f32) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let x = x.contiguous()?;
    if x.device().is_metal() {
        // No kernel of ours there: an uploaded mask, multiplied in.
        let scale = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..x.elem_count() as u64)
            .map(|i| if dropout_keep(seed, i, p) { scale } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), &candle_core::Device::Cpu)?
            .to_device(x.device())?
            .to_dtype(x.dtype())?;
        return x * mask;
    }
    x.apply_op1(Dropout { seed, p })
}

struct Dropout {
    seed: u64,
    p: f32,
}

fn dropout_cpu<T: Copy>(
    v: &[T],
    seed: u64,
    p: f32,
    to: impl Fn(T) -> f32,
    from: impl Fn(f32) -> T,
) -> Vec<T> {
    let scale = 1.0f32 / (1.0 - p);
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            if dropout_keep(seed, i as u64, p) {
                from(to(x) * scale)
            } else {
                from(0.0)
            }
        })
        .collect()
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("dropout expects a contiguous input")
        };
        let (seed, p) = (self.seed, self.p);
        let out = match storage {
            CpuStorage::F32(v) => {
                CpuStorage::F32(dropout_cpu(&v[start..end], seed, p, |x| x, |x| x))
            }
            CpuStorage::BF16(v) => CpuStorage::BF16(dropout_cpu(
                &v[start..end],
                seed,
                p,
                half::bf16::to_f32,
                half::bf16::from_f32,
            )),
            CpuStorage::F16(v) => CpuStorage::F16(dropout_cpu(
                &v[start..end],
                seed,
                p,
                half::f16::to_f32,
                half::f16::from_f32,
            )),
            s => candle_core::bail!("dropout: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::dropout(storage, layout, self.seed, self.p)?;
        Ok((out, layout.shape().clone()))
    }

    /// The same mask, applied to the gradient.
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dropout(grad_res, self.seed, self.p)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests_support::randn;
    use candle_core::Var;

    /// Dropout keeps about 1-p of the elements, scales them, and its backward applies the same
    /// mask to the gradient.
    #[test]
    fn dropout_masks_are_seeded_and_reused_by_the_backward_pass() {
        let x = Var::from_tensor(&(randn(&[100_000], 4).abs().unwrap() + 1.0).unwrap()).unwrap();
        let y = dropout(x.as_tensor(), 9, 0.25).unwrap();
        let kept: Vec<f32> = y.to_vec1().unwrap();
        let xs: Vec<f32> = x.as_tensor().to_vec1().unwrap();
        let frac = kept.iter().filter(|&&v| v != 0.0).count() as f64 / kept.len() as f64;
        assert!((frac - 0.75).abs() < 0.01, "kept {frac}");
        for (i, (&k, &v)) in kept.iter().zip(&xs).enumerate() {
            let expect = if dropout_keep(9, i as u64, 0.25) {
                v * (1.0 / 0.75)
            } else {
                0.0
            };
            assert_eq!(k, expect);
        }
        let store = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = store.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        for (&gi, &k) in g.iter().zip(&kept) {
            assert_eq!(gi == 0.0, k == 0.0);
        }
        let other: Vec<f32> = dropout(x.as_tensor(), 10, 0.25).unwrap().to_vec1().unwrap();
        assert_ne!(other, kept, "another seed, another mask");
    }
}

#[cfg(test)]
mod seed_offset_tests {
    use super::*;

    #[test]
    fn a_shifted_seed_continues_the_mask_at_the_offset() {
        for (seed, offset) in [
            (7u64, 0u64),
            (42, 4),
            (u64::MAX - 3, 4096 * 9360),
            (1, 1 << 40),
        ] {
            let shifted = dropout_seed_at(seed, offset);
            for i in 0..4096u64 {
                assert_eq!(
                    dropout_keep(shifted, i, 0.3),
                    dropout_keep(seed, offset + i, 0.3),
                    "seed {seed}, offset {offset}, element {i}"
                );
            }
        }
        // And it can fail: an offset off by one hash group gives another mask.
        let other = dropout_seed_at(7, 4);
        assert!((0..256).any(|i| dropout_keep(other, i, 0.5) != dropout_keep(7, i, 0.5)));
    }
}
