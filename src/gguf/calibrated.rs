//! Quantization under an importance matrix (ggml's `quantize_row_*_impl`, which llama-quantize
//! runs when given `--imatrix`): each weight's rounding error counts by the mean square of the
//! activation it multiplies, so the columns the data leans on keep the most precision. Written
//! to give llama-quantize's bytes for the types kiln's calibrated presets use: Q4_K and Q6_K,
//! Q5_0 (Q4_K's fallback for rows that 256 does not divide), and Q8_0 and the float types, which
//! ignore the matrix.
//!
//! `importance` is one value per column of a row (the imatrix's `in_sum2 / counts`); every row
//! of a tensor uses the same values.

use rayon::prelude::*;

use super::quants::{
    f16_round, finish_q2_k, make_qkx2_quants, make_qx_quants, nearest_int, pack_2bit, pack_5bit,
    pack_q4_k, put_f16, q6_k_weighted, quantize, scale_min_k4,
};
use super::GgmlType;
use crate::error::{KilnError, Result};

/// Whether [`quantize_with_importance`] uses the matrix for `ty` (the others ignore it).
pub fn uses_importance(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q6_K
            | GgmlType::Q5_0
            | GgmlType::Q4_0
    )
}

/// Quantizes `values` (rows of `importance.len()` values, concatenated) to `ty` under
/// `importance`.
pub fn quantize_with_importance(
    ty: GgmlType,
    values: &[f32],
    importance: &[f32],
) -> Result<Vec<u8>> {
    let n = importance.len();
    let block = ty.block_size();
    if n == 0 || !values.len().is_multiple_of(n) || !n.is_multiple_of(block) {
        return Err(KilnError::Quant(format!(
            "{}: {} values in rows of {n} (a multiple of {block})",
            ty.name(),
            values.len()
        )));
    }
    let encode_row: fn(&[f32], &[f32], &mut [u8]) = match ty {
        GgmlType::Q2_K => q2_k_row,
        GgmlType::Q3_K => q3_k_row,
        GgmlType::Q4_K => q4_k_row,
        GgmlType::Q6_K => q6_k_row,
        GgmlType::Q5_0 => q5_0_row,
        GgmlType::Q4_0 => q4_0_row,
        GgmlType::Q8_0 | GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            return quantize(ty, values)
        }
        other => {
            return Err(KilnError::Quant(format!(
                "kiln does not quantize {} under an importance matrix",
                other.name()
            )))
        }
    };
    let row_bytes = n / block * ty.block_bytes();
    let mut out = vec![0u8; values.len() / n * row_bytes];
    out.par_chunks_mut(row_bytes)
        .zip(values.par_chunks(n))
        .for_each(|(o, x)| encode_row(x, importance, o));
    Ok(out)
}

/// `Σ x²` in ggml's order (one running f32 sum).
fn sum_squares(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |a, v| a + v * v)
}

/// ggml's `make_qp_quants`: a scale for non-negative `x` on levels 0..=nmax minimizing the
/// `w`-weighted squared error (nine candidate scales, then up to five passes moving one level at
/// a time). Levels go to `l`.
fn make_qp_quants(nmax: i32, x: &[f32], l: &mut [u8], w: &[f32]) -> f32 {
    let max = x.iter().fold(0f32, |m, &v| if m > v { m } else { v });
    if max < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for (o, &v) in l.iter_mut().zip(x) {
        *o = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0f32;
    for i in 0..x.len() {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += w[i] * diff * diff;
    }
    for is in -4i32..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0f32;
        for i in 0..x.len() {
            let q = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * q as f32;
            mse += w[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..x.len() {
        let q = nearest_int(iscale * x[i]).min(nmax);
        l[i] = q as u8;
        sumlx += w[i] * x[i] * q as f32;
        suml2 += w[i] * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for i in 0..x.len() {
            let li = l[i] as f32;
            let mut slx = sumlx - w[i] * x[i] * li;
            let mut sl2 = suml2 - w[i] * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l[i] as i32 {
                    slx += w[i] * x[i] * new_l as f32;
                    sl2 += w[i] * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// A 256-value block's `SUB` sub-blocks of `LEN` values: each one's scale and (negated) min
/// on levels 0..=nmax under `importance · sqrt(σ² + x²)`, with the levels and each sub-block's
/// total weight.
#[allow(clippy::type_complexity)]
fn fit_scales_and_mins<const SUB: usize, const LEN: usize>(
    xb: &[f32],
    qw: &[f32],
    sigma2: f32,
    nmax: i32,
) -> ([u8; 256], [f32; SUB], [f32; SUB], [f32; SUB]) {
    let mut levels = [0u8; 256];
    let (mut scales, mut mins, mut sw) = ([0f32; SUB], [0f32; SUB], [0f32; SUB]);
    for j in 0..SUB {
        let sub = LEN * j..LEN * j + LEN;
        let xs = &xb[sub.clone()];
        let weights: [f32; LEN] =
            std::array::from_fn(|i| qw[LEN * j + i] * (sigma2 + xs[i] * xs[i]).sqrt());
        sw[j] = weights.iter().fold(0f32, |a, &w| a + w);
        (scales[j], mins[j]) =
            make_qkx2_quants(nmax, xs, &weights, &mut levels[sub], -0.9, 0.05, 36, false);
    }
    (levels, scales, mins, sw)
}

/// Q4_K blocks of a row: each 32-value sub-block's scale and min fitted under
/// `importance · sqrt(σ² + x²)` (σ² twice the block's mean square), then the eight scales and
/// mins themselves quantized to 6 bits under the sub-blocks' total weights.
fn q4_k_row(x: &[f32], importance: &[f32], out: &mut [u8]) {
    for ((xb, qw), o) in x
        .chunks(256)
        .zip(importance.chunks(256))
        .zip(out.chunks_mut(144))
    {
        let sigma2 = 2.0 * sum_squares(xb) / 256.0;
        let (mut levels, scales, mins, sw) = fit_scales_and_mins::<8, 32>(xb, qw, sigma2, 15);
        let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
        let d = make_qp_quants(63, &scales, &mut ls, &sw);
        let dmin = make_qp_quants(63, &mins, &mut lm, &sw);
        // The packing of ggml's block_q4_K, in u32 so that out-of-range levels truncate as C's
        // uint8_t arithmetic does.
        let mut sc = [0u8; 12];
        for j in 0..8 {
            let (s, m) = (ls[j] as u32, lm[j] as u32);
            if j < 4 {
                sc[j] = s as u8;
                sc[j + 4] = m as u8;
            } else {
                sc[j + 4] = ((s & 0xf) | ((m & 0xf) << 4)) as u8;
                sc[j - 4] |= ((s >> 4) << 6) as u8;
                sc[j] |= ((m >> 4) << 6) as u8;
            }
        }
        let (d16, dmin16) = (f16_round(d), f16_round(dmin));
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, &sc);
            let dj = d16 * s as f32;
            if dj == 0.0 {
                continue;
            }
            let dm = dmin16 * m as f32;
            for i in 0..32 {
                levels[32 * j + i] = nearest_int((xb[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
            }
        }
        pack_q4_k(&sc, d, dmin, &levels, o);
    }
}

/// Q2_K blocks of a row: each 16-value sub-block's scale and min fitted under
/// `importance · sqrt(σ² + x²)` (σ² the block's mean square), then the sixteen scales and mins
/// quantized to 4 bits under the sub-blocks' total weights.
fn q2_k_row(x: &[f32], importance: &[f32], out: &mut [u8]) {
    for ((xb, qw), o) in x
        .chunks(256)
        .zip(importance.chunks(256))
        .zip(out.chunks_mut(84))
    {
        let sigma2 = sum_squares(xb) / 256.0;
        let (mut levels, scales, mins, sw) = fit_scales_and_mins::<16, 16>(xb, qw, sigma2, 3);
        let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
        let d = make_qp_quants(15, &scales, &mut ls, &sw);
        let dmin = make_qp_quants(15, &mins, &mut lm, &sw);
        let sc: [u8; 16] = std::array::from_fn(|j| (ls[j] as u32 | ((lm[j] as u32) << 4)) as u8);
        finish_q2_k(xb, &sc, d, dmin, &mut levels, o);
    }
}

/// Q3_K blocks of a row: each 16-value sub-block's symmetric scale fitted under
/// `importance · sqrt(σ² + x²)` (σ² twice the block's mean square), the sixteen scales
/// quantized to 6 bits under the sub-blocks' total weights.
fn q3_k_row(x: &[f32], importance: &[f32], out: &mut [u8]) {
    for ((xb, qw), o) in x
        .chunks(256)
        .zip(importance.chunks(256))
        .zip(out.chunks_mut(110))
    {
        let sigma2 = 2.0 * sum_squares(xb) / 256.0;
        let mut l = [0i8; 256];
        let (mut scales, mut sw) = ([0f32; 16], [0f32; 16]);
        for j in 0..16 {
            let sub = 16 * j..16 * j + 16;
            let xs = &xb[sub.clone()];
            let weights: [f32; 16] =
                std::array::from_fn(|i| qw[16 * j + i] * (sigma2 + xs[i] * xs[i]).sqrt());
            sw[j] = weights.iter().fold(0f32, |a, &w| a + w);
            scales[j] = make_qx_quants(4, xs, &mut l[sub], Some(&weights));
        }
        let mut ls = [0i8; 16];
        let d = make_qx_quants(32, &scales, &mut ls, Some(&sw));
        let mut sc = [0u8; 12];
        for (j, &level) in ls.iter().enumerate() {
            let v = level as i32;
            if j < 8 {
                sc[j] = (v & 0xf) as u8;
            } else {
                sc[j - 8] |= ((v & 0xf) << 4) as u8;
            }
            sc[j % 4 + 8] |= ((v >> 4) << (2 * (j / 4))) as u8;
        }
        let d16 = f16_round(d);
        for j in 0..16 {
            let low = if j < 8 { sc[j] & 0xf } else { sc[j - 8] >> 4 } as i8;
            let high = ((sc[8 + j % 4] >> (2 * (j / 4))) & 3) as i8;
            let s = (low | (high << 4)).wrapping_sub(32);
            let dj = d16 * s as f32;
            if dj == 0.0 {
                continue;
            }
            for i in 0..16 {
                l[16 * j + i] = (nearest_int(xb[16 * j + i] / dj).clamp(-4, 3) + 4) as i8;
            }
        }
        // hmask[32] | qs[64] | scales[12] | d
        let (hmask, rest) = o.split_at_mut(32);
        hmask.fill(0);
        let mut levels = [0u8; 256];
        for (j, &v) in l.iter().enumerate() {
            let mut v = v as u8;
            if v > 3 {
                hmask[j % 32] |= 1 << (j / 32);
                v -= 4;
            }
            levels[j] = v;
        }
        pack_2bit(&levels, &mut rest[..64]);
        rest[64..76].copy_from_slice(&sc);
        put_f16(&mut rest[76..78], d);
    }
}

/// Q6_K blocks of a row, each 16-value sub-block's scale fitted under the importance alone.
fn q6_k_row(x: &[f32], importance: &[f32], out: &mut [u8]) {
    for ((xb, qw), o) in x
        .chunks(256)
        .zip(importance.chunks(256))
        .zip(out.chunks_mut(210))
    {
        q6_k_weighted(xb, Some(qw), o);
    }
}

/// Q5_0 blocks of a row: each block's scale fitted under `importance · sqrt(σ² + x²)`, σ² the
/// whole row's mean square.
fn q5_0_row(x: &[f32], importance: &[f32], out: &mut [u8]) {
    legacy_row(x, importance, 16, 22, out, |l, o| {
        pack_5bit(|j| l[j] as u8, o)
    });
}

/// Q4_0 blocks of a row, as Q5_0's with 16 levels.
fn q4_0_row(x: &[f32], importance: &[f32], out: &mut [u8]) {
    legacy_row(x, importance, 8, 18, out, |l, o| {
        for j in 0..16 {
            o[j] = l[j] as u8 | ((l[j + 16] as u8) << 4);
        }
    });
}

/// The legacy symmetric types (levels -nmax..nmax-1 a 32-value block, an f16 scale first):
/// each block's scale fitted under `importance · sqrt(σ² + x²)`, σ² the whole row's mean
/// square; `pack` writes the levels after the scale.
fn legacy_row(
    x: &[f32],
    importance: &[f32],
    nmax: i32,
    block_bytes: usize,
    out: &mut [u8],
    pack: impl Fn(&[i8; 32], &mut [u8]),
) {
    let sigma2 = sum_squares(x) / x.len() as f32;
    let blocks = x.chunks(32).zip(importance.chunks(32));
    for ((xb, qw), o) in blocks.zip(out.chunks_mut(block_bytes)) {
        let weights: [f32; 32] = std::array::from_fn(|i| qw[i] * (sigma2 + xb[i] * xb[i]).sqrt());
        let mut l = [0i8; 32];
        let d = make_qx_quants(nmax, xb, &mut l, Some(&weights));
        put_f16(&mut o[..2], d);
        pack(&l, &mut o[2..]);
    }
}

#[cfg(test)]
mod tests {
    use super::super::quants::tests::wave;
    use super::*;

    /// With an importance matrix, the error the matrix weighs is smaller than the reference
    /// quantizer's on the columns it favours (the point of calibration), for every type.
    #[test]
    fn importance_lowers_the_weighted_error() {
        let (rows, n) = (8, 512);
        let x = wave(rows * n, 0.3);
        // Columns 0..64 of every 256 matter a hundred times more.
        let imp: Vec<f32> = (0..n)
            .map(|i| if i % 256 < 64 { 100.0 } else { 1.0 })
            .collect();
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q5_0,
            GgmlType::Q4_0,
        ] {
            let weighted_err = |bytes: &[u8]| {
                let y = super::super::quants::dequantize(ty, bytes).unwrap();
                x.iter()
                    .zip(&y)
                    .enumerate()
                    .map(|(i, (a, b))| imp[i % n] * (a - b) * (a - b))
                    .sum::<f32>()
            };
            let plain = weighted_err(&quantize(ty, &x).unwrap());
            let calibrated = weighted_err(&quantize_with_importance(ty, &x, &imp).unwrap());
            assert!(calibrated < plain, "{}: {calibrated} vs {plain}", ty.name());
        }
    }
}
