//! ggml's block quantizers, written to give the bytes of ggml's reference quantizers
//! (`quantize_row_*_ref`, which `llama-quantize` uses when no importance matrix is given) for
//! the types kiln exports: F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
//! Layouts: docs/formats.md C.6. Dequantization uses candle's ggml kernels.
//!
//! Arithmetic follows the reference order of operations in f32, so results are bit-identical
//! where the C compiler does not fuse multiply-adds.

use half::{bf16, f16};
use rayon::prelude::*;

use super::GgmlType;
use crate::error::{KilnError, Result};

/// Blocks per parallel work item.
const BLOCKS_PER_TASK: usize = 64;

/// Quantizes `values` (rows of a multiple of the block size, concatenated) to `ty`.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    let block = ty.block_size();
    if !values.len().is_multiple_of(block) {
        return Err(KilnError::Quant(format!(
            "{} needs a multiple of {block} values, got {}",
            ty.name(),
            values.len()
        )));
    }
    let block_bytes = ty.block_bytes();
    let encode: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::F32 => |x, out| out.copy_from_slice(&x[0].to_le_bytes()),
        GgmlType::F16 => |x, out| out.copy_from_slice(&f16::from_f32(x[0]).to_le_bytes()),
        GgmlType::BF16 => |x, out| out.copy_from_slice(&bf16::from_f32(x[0]).to_le_bytes()),
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        GgmlType::Q4_1 => {
            return Err(KilnError::Quant("kiln does not write Q4_1".into()));
        }
    };
    let mut out = vec![0u8; values.len() / block * block_bytes];
    out.par_chunks_mut(block_bytes * BLOCKS_PER_TASK)
        .zip(values.par_chunks(block * BLOCKS_PER_TASK))
        .for_each(|(out, x)| {
            for (o, xb) in out.chunks_mut(block_bytes).zip(x.chunks(block)) {
                encode(xb, o);
            }
        });
    Ok(out)
}

/// Dequantizes `bytes` of type `ty` to f32.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    use candle_core::quantized::GgmlDType as D;
    let n = bytes.len() / ty.block_bytes() * ty.block_size();
    let dtype = match ty {
        GgmlType::F32 => {
            return Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect())
        }
        GgmlType::F16 => D::F16,
        GgmlType::BF16 => D::BF16,
        GgmlType::Q4_0 => D::Q4_0,
        GgmlType::Q4_1 => D::Q4_1,
        GgmlType::Q5_0 => D::Q5_0,
        GgmlType::Q5_1 => D::Q5_1,
        GgmlType::Q8_0 => D::Q8_0,
        GgmlType::Q2_K => D::Q2K,
        GgmlType::Q3_K => D::Q3K,
        GgmlType::Q4_K => D::Q4K,
        GgmlType::Q5_K => D::Q5K,
        GgmlType::Q6_K => D::Q6K,
    };
    let dev = candle_core::Device::Cpu;
    let q = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, vec![n], &dev)?;
    Ok(q.dequantize(&dev)?.to_vec1::<f32>()?)
}

/// ggml's `nearest_int`: round half to even through the 1.5·2²³ trick.
pub(super) fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

pub(super) fn put_f16(out: &mut [u8], v: f32) {
    out.copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

pub(super) fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// The value with the largest magnitude (the first of equals), and that magnitude.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

pub(super) fn q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut out[..2], d);
    for (o, &v) in out[2..].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
}

fn q4_0(x: &[f32], out: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut out[..2], d);
    for j in 0..16 {
        let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let hi = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        out[2 + j] = lo | (hi << 4);
    }
}

/// The 5-bit types: low nibbles in `qs`, the fifth bits in a u32 `qh`.
pub(super) fn pack_5bit(q: impl Fn(usize) -> u8, out: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..16 {
        let (lo, hi) = (q(j), q(j + 16));
        out[4 + j] = (lo & 0x0f) | ((hi & 0x0f) << 4);
        qh |= (((lo & 0x10) >> 4) as u32) << j;
        qh |= (((hi & 0x10) >> 4) as u32) << (j + 16);
    }
    out[..4].copy_from_slice(&qh.to_le_bytes());
}

fn q5_0(x: &[f32], out: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut out[..2], d);
    pack_5bit(|j| ((x[j] * id + 16.5) as i8).min(31) as u8, &mut out[2..]);
}

fn q5_1(x: &[f32], out: &mut [u8]) {
    let min = x.iter().fold(f32::MAX, |a, &v| if v < a { v } else { a });
    let max = x.iter().fold(-f32::MAX, |a, &v| if v > a { v } else { a });
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut out[..2], d);
    put_f16(&mut out[2..4], min);
    pack_5bit(|j| ((x[j] - min) * id + 0.5) as u8, &mut out[4..]);
}

/// ggml's `make_qkx2_quants`: the scale and (negated) min of `x` with levels 0..=nmax that
/// minimize the weighted error, searched over `nstep` candidate scales. Levels go to `l`.
#[allow(clippy::too_many_arguments)]
pub(super) fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        best_error += weights[i] * err(scale * q as f32 + min - x[i]);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                cur_error += weights[i] * err(this_scale * laux[i] as f32 + this_min - x[i]);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1`: a symmetric scale for levels -nmax..nmax-1
/// (stored +nmax), refined over 18 candidate scales, each value's error weighted by `weights`
/// (an importance matrix's) or, without them, by its square.
pub(super) fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8], weights: Option<&[f32]>) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for (i, &v) in x.iter().enumerate() {
            let q = level(iscale, v) as f32;
            let w = weights.map_or(v * v, |w| w[i]);
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (o, &v) in l.iter_mut().zip(x) {
        *o = (level(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (o, &v) in l.iter_mut().zip(x) {
                *o = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants` with `do_rmse`: levels -nmax..nmax-1 (stored +nmax), refined one
/// value at a time.
fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (o, &v) in l.iter_mut().zip(x) {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *o = q as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for (i, &v) in x.iter().enumerate() {
            let w = v * v;
            let li = l[i] as f32;
            let mut slx = sumlx - w * v * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l[i] as i32 {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as i8;
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
    for o in l.iter_mut() {
        *o += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Packs 2-bit levels of a 256-element block: 32 bytes per 128 elements, 4 shifts.
pub(super) fn pack_2bit(levels: &[u8], qs: &mut [u8]) {
    for (h, q) in levels.chunks(128).zip(qs.chunks_mut(32)) {
        for (i, byte) in q.iter_mut().enumerate() {
            *byte = h[i] | (h[i + 32] << 2) | (h[i + 64] << 4) | (h[i + 96] << 6);
        }
    }
}

fn q2_k(x: &[f32], out: &mut [u8]) {
    // scales[16] | qs[64] | d | dmin
    let mut levels = [0u8; 256];
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 16];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let weights: [f32; 16] = std::array::from_fn(|i| xs[i].abs());
        let (s, m) = make_qkx2_quants(
            3,
            xs,
            &weights,
            &mut levels[16 * j..16 * j + 16],
            -0.5,
            0.1,
            15,
            true,
        );
        scales[j] = s;
        mins[j] = m;
        max_scale = max_scale.max_ggml(s);
        max_min = max_min.max_ggml(m);
    }
    let mut sc = [0u8; 16];
    let mut d = 0f32;
    let mut dmin = 0f32;
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        d = max_scale / 15.0;
    }
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for j in 0..16 {
            sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        dmin = max_min / 15.0;
    }
    finish_q2_k(x, &sc, d, dmin, &mut levels, out);
}

/// A Q2_K block from its packed 4-bit scales and mins, d and dmin: each sub-block's levels
/// recomputed against the stored (f16) scales, then everything packed.
pub(super) fn finish_q2_k(
    x: &[f32],
    sc: &[u8; 16],
    d: f32,
    dmin: f32,
    levels: &mut [u8; 256],
    out: &mut [u8],
) {
    let (d16, dmin16) = (f16_round(d), f16_round(dmin));
    for j in 0..16 {
        let dj = d16 * (sc[j] & 0xf) as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin16 * (sc[j] >> 4) as f32;
        for i in 0..16 {
            levels[16 * j + i] = nearest_int((x[16 * j + i] + dm) / dj).clamp(0, 3) as u8;
        }
    }
    // scales[16] | qs[64] | d | dmin
    out[..16].copy_from_slice(sc);
    pack_2bit(levels, &mut out[16..80]);
    put_f16(&mut out[80..82], d);
    put_f16(&mut out[82..84], dmin);
}

fn q3_k(x: &[f32], out: &mut [u8]) {
    // hmask[32] | qs[64] | scales[12] | d
    let mut l = [0i8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut amax) = (0f32, 0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        if scales[j].abs() > amax {
            amax = scales[j].abs();
            max_scale = scales[j];
        }
    }
    let mut sc = [0u8; 12];
    let mut d = 0f32;
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            let q = ((nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                sc[j] = q & 0xf;
            } else {
                sc[j - 8] |= (q & 0xf) << 4;
            }
            sc[j % 4 + 8] |= (q >> 4) << (2 * (j / 4));
        }
        d = 1.0 / iscale;
    }
    let d16 = f16_round(d);
    for j in 0..16 {
        let low = if j < 8 { sc[j] & 0xf } else { sc[j - 8] >> 4 };
        let s = (low | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32;
        let dj = d16 * s as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / dj).clamp(-4, 3) + 4) as i8;
        }
    }
    let mut levels = [0u8; 256];
    let hmask = &mut out[..32];
    hmask.fill(0);
    for j in 0..256 {
        let mut q = l[j] as u8;
        if q > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            q -= 4;
        }
        levels[j] = q;
    }
    pack_2bit(&levels, &mut out[32..96]);
    out[96..108].copy_from_slice(&sc);
    put_f16(&mut out[108..110], d);
}

/// `max` as ggml writes it (`if (v > m) m = v`), which never takes a NaN.
trait MaxGgml {
    fn max_ggml(self, v: f32) -> f32;
}
impl MaxGgml for f32 {
    fn max_ggml(self, v: f32) -> f32 {
        if v > self {
            v
        } else {
            self
        }
    }
}

/// Q4_K and Q5_K: eight 32-element sub-blocks with 6-bit scales and mins (12 bytes), `nmax`
/// 15 or 31. Returns the packed scales, d, dmin and the levels.
fn k_scales_mins(x: &[f32], nmax: i32, rmin: f32, nstep: i32) -> ([u8; 12], f32, f32, [u8; 256]) {
    let mut levels = [0u8; 256];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2 = xs.iter().fold(0f32, |a, v| a + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + xs[i].abs());
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut levels[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        max_scale = max_scale.max_ggml(s);
        max_min = max_min.max_ggml(m);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = max_scale / 63.0;
    let dmin = max_min / 63.0;
    let (d16, dmin16) = (f16_round(d), f16_round(dmin));
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &sc);
        let dj = d16 * s as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin16 * m as f32;
        for i in 0..32 {
            levels[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (sc, d, dmin, levels)
}

/// The 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
pub(super) fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4_k(x: &[f32], out: &mut [u8]) {
    let (sc, d, dmin, l) = k_scales_mins(x, 15, -1.0, 20);
    pack_q4_k(&sc, d, dmin, &l, out);
}

/// A Q4_K block from its packed scales, d, dmin and levels.
pub(super) fn pack_q4_k(sc: &[u8; 12], d: f32, dmin: f32, l: &[u8; 256], out: &mut [u8]) {
    // d | dmin | scales[12] | qs[128]
    put_f16(&mut out[0..2], d);
    put_f16(&mut out[2..4], dmin);
    out[4..16].copy_from_slice(sc);
    for (c, q) in out[16..144].chunks_mut(32).enumerate() {
        for i in 0..32 {
            q[i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
        }
    }
}

fn q5_k(x: &[f32], out: &mut [u8]) {
    // d | dmin | scales[12] | qh[32] | qs[128]
    let (sc, d, dmin, l) = k_scales_mins(x, 31, -0.5, 15);
    put_f16(&mut out[0..2], d);
    put_f16(&mut out[2..4], dmin);
    out[4..16].copy_from_slice(&sc);
    let (qh, qs) = out[16..176].split_at_mut(32);
    qh.fill(0);
    for c in 0..4 {
        for i in 0..32 {
            let mut lo = l[64 * c + i];
            let mut hi = l[64 * c + 32 + i];
            if lo > 15 {
                lo -= 16;
                qh[i] |= 1 << (2 * c);
            }
            if hi > 15 {
                hi -= 16;
                qh[i] |= 2 << (2 * c);
            }
            qs[32 * c + i] = lo | (hi << 4);
        }
    }
}

fn q6_k(x: &[f32], out: &mut [u8]) {
    q6_k_weighted(x, None, out)
}

/// Q6_K with each sub-block's scale fitted under `importance` (ggml's `quantize_row_q6_K_impl`)
/// or, without it, under each value's square (the reference quantizer).
pub(super) fn q6_k_weighted(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
    // ql[128] | qh[64] | scales[16] (i8) | d
    let mut l = [0i8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for (j, scale) in scales.iter_mut().enumerate() {
        let sub = 16 * j..16 * j + 16;
        let w = importance.map(|w| &w[sub.clone()]);
        *scale = make_qx_quants(32, &x[sub.clone()], &mut l[sub], w);
        if scale.abs() > max_abs {
            max_abs = scale.abs();
            max_scale = *scale;
        }
    }
    if max_abs < 1e-15 {
        out.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d16 = f16_round(1.0 / iscale);
    put_f16(&mut out[208..210], 1.0 / iscale);
    let mut sc = [0i8; 16];
    for j in 0..16 {
        sc[j] = nearest_int(iscale * scales[j]).min(127) as i8;
        out[192 + j] = sc[j] as u8;
    }
    for j in 0..16 {
        let dj = d16 * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let (ql, rest) = out.split_at_mut(128);
    let qh = &mut rest[..64];
    for h in 0..2 {
        let (l, ql, qh) = (&l[128 * h..], &mut ql[64 * h..], &mut qh[32 * h..]);
        for i in 0..32 {
            let q = |k: usize| l[i + 32 * k] as u8;
            ql[i] = (q(0) & 0xf) | ((q(2) & 0xf) << 4);
            ql[i + 32] = (q(1) & 0xf) | ((q(3) & 0xf) << 4);
            qh[i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Smooth test values of a weight's scale.
    pub(in crate::gguf) fn wave(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.37 + seed).sin() * 2.0 + (i as f32 * 0.011).cos()) * 0.05)
            .collect()
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.4), 0);
        assert_eq!(nearest_int(7.6), 8);
    }

    /// Every type round-trips through candle's ggml dequantizer within its resolution.
    #[test]
    fn round_trip_error_shrinks_with_bits() {
        let x = wave(1024, 0.3);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
        let mut errors = vec![];
        for ty in [
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_0,
            GgmlType::Q4_K,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::F16,
            GgmlType::BF16,
        ] {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len(), ty.bytes_for(x.len()), "{ty:?}");
            let y = dequantize(ty, &q).unwrap();
            let err = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
                / x.len() as f32)
                .sqrt()
                / rms;
            errors.push((ty, err));
        }
        let bound = |ty| match ty {
            GgmlType::Q2_K => 0.35,
            GgmlType::Q3_K => 0.2,
            GgmlType::Q4_0 | GgmlType::Q4_K => 0.1,
            GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => 0.05,
            GgmlType::Q6_K => 0.025,
            GgmlType::Q8_0 => 0.006,
            _ => 0.005,
        };
        for (ty, err) in &errors {
            assert!(*err < bound(*ty), "{ty:?}: relative RMS error {err}");
            assert!(*err > 0.0 || *ty == GgmlType::F32, "{ty:?} lost nothing?");
        }
        let err = |t| errors.iter().find(|(ty, _)| *ty == t).unwrap().1;
        assert!(err(GgmlType::Q6_K) < err(GgmlType::Q4_K));
        assert!(err(GgmlType::Q4_K) < err(GgmlType::Q2_K));
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let x = vec![0f32; 256];
        for ty in [
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
        ] {
            let y = dequantize(ty, &quantize(ty, &x).unwrap()).unwrap();
            assert!(y.iter().all(|v| *v == 0.0), "{ty:?}");
        }
    }
}
