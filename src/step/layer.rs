//! One decoder layer (Llama layout), forward and backward written out:
//!
//! ```text
//! n₁ = norm₁(x)          q, k, v = proj(n₁)       o = attn(rope(q), rope(k), v)
//! h  = x + o_proj(o)     n₂ = norm₂(h)           y = h + down(silu(gate(n₂)) ⊙ up(n₂))
//! ```
//!
//! The forward keeps x, q, k (rotated; before their norms and RoPE where the model has q/k
//! norms), v, the attention output and its statistics, h, gate and up; the backward recomputes
//! the cheap rest (the norms, silu(gate) ⊙ up where an adapter needs them) and walks the same
//! lines back, adding the LoRA gradients to one store.
//!
//! Where the flash kernels compute the attention, q, k, v and the attention output stay in the
//! projections' token-major layout `[B, T, heads, D]` (views, no transposes); elsewhere they are
//! transposed to `[B, heads, T, D]` for candle's attention.

use candle_core::{DType, Tensor, D};

use super::projection::Projection;
use super::{LoraCasts, LoraGrads};
use crate::error::Result;
use crate::model::decoder::{
    Attention, AttnMask, DecoderLayer, FeedForward, GateUpProj, Mlp, QkvProj, RmsNorm, Rotary,
};
use crate::ops::{self, AttentionCore, HeadLayout};
use crate::rng::KilnRng;

/// What a layer's backward pass needs from its forward pass.
pub struct Saved<'a> {
    x: Tensor,
    /// Projected queries and keys (heads in `layout`): rotated when the model has no q/k norms
    /// (the backward needs nothing before RoPE then), before the norms and RoPE otherwise; and
    /// the values.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention: AttentionCore,
    /// The attention output (heads in `layout`).
    o: Tensor,
    layout: HeadLayout,
    h: Tensor,
    /// The MLP's gate and up; `None` where the MLP runs in tiles of `mlp_rows` rows (the
    /// backward recomputes them a tile at a time).
    gate: Option<Tensor>,
    up: Option<Tensor>,
    mlp_rows: usize,
    projections: Projections<'a>,
}

/// The layer's projections with the dropout seeds of one pass.
struct Projections<'a> {
    qkv: Vec<Projection<'a>>,
    o: Projection<'a>,
    gate_up: Vec<Projection<'a>>,
    down: Projection<'a>,
}

impl<'a> Projections<'a> {
    /// Drawn in the order the reference forward draws: q, k, v, o, gate, up, down.
    fn new(
        layer: &'a DecoderLayer,
        rng: &mut KilnRng,
        casts: &LoraCasts,
        dtype: DType,
    ) -> Result<Self> {
        let mut new =
            |linear: &'a crate::model::decoder::Linear| Projection::new(linear, rng, casts, dtype);
        let attn = &layer.self_attn;
        let mlp = dense_mlp(layer)?;
        let qkv = match &attn.qkv {
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            } => vec![new(q_proj)?, new(k_proj)?, new(v_proj)?],
            QkvProj::Fused { qkv_proj } => vec![new(qkv_proj)?],
        };
        let o = new(&attn.o_proj)?;
        let gate_up = match &mlp.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => {
                vec![new(gate_proj)?, new(up_proj)?]
            }
            GateUpProj::Fused { gate_up_proj } => vec![new(gate_up_proj)?],
        };
        let down = new(&mlp.down_proj)?;
        Ok(Self {
            qkv,
            o,
            gate_up,
            down,
        })
    }
}

fn dense_mlp(layer: &DecoderLayer) -> Result<&Mlp> {
    match &layer.mlp {
        FeedForward::Dense(mlp) => Ok(mlp),
        FeedForward::Moe(_) => Err(crate::error::KilnError::Train(
            "the explicit step has no mixture-of-experts layer yet".into(),
        )),
    }
}

/// RMSNorm of untracked tensors: kiln's kernel on CUDA (no autograd op around it), the
/// reference computation elsewhere.
pub(super) fn norm(n: &RmsNorm, x: &Tensor) -> Result<Tensor> {
    if x.device().is_cuda() && !n.plus_one {
        return Ok(crate::cuda::rms_norm(x, &n.weight, n.eps)?);
    }
    n.forward(x)
}

/// `x + branch`: the residual stream (one vectorized kernel on CUDA).
fn residual_add(x: &Tensor, branch: &Tensor) -> Result<Tensor> {
    if x.device().is_cuda() {
        return Ok(crate::cuda::add(x, branch)?);
    }
    Ok((x + branch)?)
}

/// The gradient of the norm's input `x` given its output's, plus `residual` when given.
fn norm_backward(n: &RmsNorm, x: &Tensor, g: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    Ok(ops::rms_norm_backward(x, g, &n.weight, n.eps, residual)?)
}

/// `[B, T, n·D]` → n heads in `layout`, contiguous (a view when token-major).
fn to_heads(y: &Tensor, n: usize, d: usize, layout: HeadLayout) -> Result<Tensor> {
    let (b, t, _) = y.dims3()?;
    let heads = y.reshape((b, t, n, d))?;
    Ok(match layout {
        HeadLayout::TokenMajor => heads.contiguous()?,
        HeadLayout::HeadsMajor => heads.transpose(1, 2)?.contiguous()?,
    })
}

/// Heads in `layout` → `[B, T, n·D]`, contiguous (a view when token-major).
fn from_heads(y: &Tensor, layout: HeadLayout) -> Result<Tensor> {
    let (b, n, t, d) = layout.dims(y)?;
    let tokens = match layout {
        HeadLayout::TokenMajor => y.contiguous()?,
        HeadLayout::HeadsMajor => y.transpose(1, 2)?.contiguous()?,
    };
    Ok(tokens.reshape((b, t, n * d))?)
}

/// Queries or keys as attention sees them: the per-head norm (Qwen 3), then RoPE.
fn rotated(
    norm_: Option<&RmsNorm>,
    x: &Tensor,
    rope: &Rotary,
    layout: HeadLayout,
) -> Result<Tensor> {
    match norm_ {
        Some(n) => rope.rotate(&norm(n, x)?, false, layout),
        None => rope.rotate(x, false, layout),
    }
}

/// The gradient of [`rotated`]'s input given its output's.
fn rotated_backward(
    norm_: Option<&RmsNorm>,
    x: &Tensor,
    g: &Tensor,
    rope: &Rotary,
    layout: HeadLayout,
) -> Result<Tensor> {
    let g = rope.rotate(g, true, layout)?;
    match norm_ {
        Some(n) => norm_backward(n, x, &g, None),
        None => Ok(g),
    }
}

/// The projections' shared input, recomputed by `input` only when one of them needs it for its
/// adapter's gradients.
fn input_if_needed(
    projections: &[&Projection],
    input: impl FnOnce() -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    match projections.iter().any(|p| p.needs_input()) {
        true => input().map(Some),
        false => Ok(None),
    }
}

/// Sum of the projections' outputs' backward passes onto their shared input (recomputed by
/// `input` if an adapter needs it).
fn backward_all(
    projections: &[Projection],
    input: impl FnOnce() -> Result<Tensor>,
    dys: &[Tensor],
    grads: &mut LoraGrads,
) -> Result<Tensor> {
    let x = input_if_needed(&projections.iter().collect::<Vec<_>>(), input)?;
    let mut dx: Option<Tensor> = None;
    for (p, dy) in projections.iter().zip(dys) {
        dx = Some(p.backward(x.as_ref(), dy, dx, grads)?);
    }
    Ok(dx.expect("a layer has projections"))
}

/// The layer's output and what its backward pass needs. `rng` is the layer's own dropout
/// stream (seeded as the reference path seeds it). The MLP computes at most `mlp_rows` tokens
/// at once (see [`mlp_rows`]).
pub fn forward<'a>(
    layer: &'a DecoderLayer,
    x: &Tensor,
    rope: &Rotary,
    mask: &AttnMask,
    rng: &mut KilnRng,
    casts: &LoraCasts,
    mlp_rows: usize,
) -> Result<(Tensor, Saved<'a>)> {
    let (y, saved) = run(layer, x, rope, mask, rng, casts, mlp_rows, true)?;
    Ok((y.expect("asked for the output"), saved))
}

/// What [`forward`] saves, for a layer recomputed in the backward pass: its output is not
/// needed, so a tiled MLP is not run at all (the backward runs it a tile at a time).
pub fn replay<'a>(
    layer: &'a DecoderLayer,
    x: &Tensor,
    rope: &Rotary,
    mask: &AttnMask,
    rng: &mut KilnRng,
    casts: &LoraCasts,
    mlp_rows: usize,
) -> Result<Saved<'a>> {
    Ok(run(layer, x, rope, mask, rng, casts, mlp_rows, false)?.1)
}

/// Elements of one `[rows, intermediate]` MLP tensor above which the MLP runs in tiles of rows:
/// 2^27 (256 MiB in bf16). The shared bench job (8,192 tokens a micro-batch of Llama-3.1-8B:
/// 117M) stays whole; at 128k tokens the 8B's four backward buffers would be 14 GiB.
const MLP_TILE_ELEMENTS: usize = 1 << 27;

/// The most tokens a layer's MLP computes at once: `forced` (tests), else as many as keep one
/// `[rows, intermediate]` tensor within [`MLP_TILE_ELEMENTS`], a multiple of 4 (dropout masks
/// are hashed in groups of 4 elements).
pub fn mlp_rows(intermediate: usize, forced: Option<usize>) -> usize {
    let rows = forced.unwrap_or(MLP_TILE_ELEMENTS / intermediate.max(1));
    (rows / 4).max(1) * 4
}

#[allow(clippy::too_many_arguments)]
fn run<'a>(
    layer: &'a DecoderLayer,
    x: &Tensor,
    rope: &Rotary,
    mask: &AttnMask,
    rng: &mut KilnRng,
    casts: &LoraCasts,
    mlp_rows: usize,
    need_output: bool,
) -> Result<(Option<Tensor>, Saved<'a>)> {
    let attn = &layer.self_attn;
    let projections = Projections::new(layer, rng, casts, x.dtype())?;
    let layout = AttentionCore::layout_for(x, attn.head_dim, attn.softcap, mask.causal);
    let n1 = norm(&layer.input_layernorm, x)?;
    let (q, k, v) = split_qkv(attn, &projections.qkv, &n1, layout)?;
    drop(n1);
    let qk_norm = attn.qk_norm.as_ref();
    let (qr, kr) = (
        rotated(qk_norm.map(|n| &n.0), &q, rope, layout)?,
        rotated(qk_norm.map(|n| &n.1), &k, rope, layout)?,
    );
    let attention = AttentionCore::new(
        &qr,
        &kr,
        mask.additive.as_ref(),
        attn.scale,
        attn.softcap,
        mask.causal,
        layout,
    )?;
    let o = attention.forward(&qr, &kr, &v)?;
    // Without q/k norms the backward needs only the rotated queries and keys: keep those (as
    // big as the unrotated ones) rather than rotate again.
    let (q, k) = match qk_norm {
        None => (qr, kr),
        Some(_) => (q, k),
    };
    let h = residual_add(x, &projections.o.forward(&from_heads(&o, layout)?)?)?;
    let (y, gate, up) = if token_rows(&h)? <= mlp_rows {
        let (y, gate, up) = mlp_forward(layer, &projections.gate_up, &projections.down, &h)?;
        (Some(y), Some(gate), Some(up))
    } else if need_output {
        (
            Some(mlp_forward_tiled(layer, &projections, &h, mlp_rows)?),
            None,
            None,
        )
    } else {
        (None, None, None)
    };
    Ok((
        y,
        Saved {
            x: x.clone(),
            q,
            k,
            v,
            attention,
            o,
            layout,
            h,
            gate,
            up,
            mlp_rows,
            projections,
        },
    ))
}

/// Tokens (rows) of a `[.., features]` activation.
fn token_rows(x: &Tensor) -> Result<usize> {
    Ok(x.elem_count() / x.dim(D::Minus1)?)
}

/// The rows of `x` as a `[rows, features]` matrix, a tile of them at a time: `(first, tile)`.
fn row_tiles(x: &Tensor, rows_per_tile: usize) -> Result<Vec<(usize, Tensor)>> {
    let features = x.dim(D::Minus1)?;
    let rows = x.elem_count() / features;
    let m = x.reshape((rows, features))?;
    (0..rows)
        .step_by(rows_per_tile)
        .map(|first| Ok((first, m.narrow(0, first, rows_per_tile.min(rows - first))?)))
        .collect()
}

/// The projections of the MLP for rows `first..` alone (their dropout masks shifted there).
fn mlp_tile<'a>(
    p: &Projections<'a>,
    first: usize,
) -> Result<(Vec<Projection<'a>>, Projection<'a>)> {
    let gate_up = p
        .gate_up
        .iter()
        .map(|q| q.rows_from(first))
        .collect::<Result<_>>()?;
    Ok((gate_up, p.down.rows_from(first)?))
}

/// `h + down(silu(gate(n₂)) ⊙ up(n₂))` a tile of rows at a time: no `[T, intermediate]` tensor
/// exists whole.
fn mlp_forward_tiled(
    layer: &DecoderLayer,
    p: &Projections,
    h: &Tensor,
    rows: usize,
) -> Result<Tensor> {
    let mut out = vec![];
    for (first, ht) in row_tiles(h, rows)? {
        let (gate_up, down) = mlp_tile(p, first)?;
        out.push(mlp_forward(layer, &gate_up, &down, &ht)?.0);
    }
    Ok(Tensor::cat(&out, 0)?.reshape(h.shape())?)
}

/// `h + down(silu(gate(n₂)) ⊙ up(n₂))` with `n₂ = norm(h)`, and gate and up.
fn mlp_forward(
    layer: &DecoderLayer,
    gate_up: &[Projection],
    down: &Projection,
    h: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n2 = norm(&layer.post_attention_layernorm, h)?;
    let (gate, up) = split_gate_up(gate_up, &n2)?;
    drop(n2);
    let y = residual_add(h, &down.forward(&ops::swiglu(&gate, &up)?)?)?;
    Ok((y, gate, up))
}

/// The MLP's backward a tile of rows at a time (gate and up recomputed per tile): the gradient
/// of `h` given `dy`'s, the residual included.
fn mlp_backward_tiled(
    layer: &DecoderLayer,
    p: &Projections,
    h: &Tensor,
    dy: &Tensor,
    rows: usize,
    grads: &mut LoraGrads,
) -> Result<Tensor> {
    let dy = dy.contiguous()?;
    let dy_tiles = row_tiles(&dy, rows)?;
    let mut dh = vec![];
    for ((first, ht), (_, dyt)) in row_tiles(h, rows)?.into_iter().zip(dy_tiles) {
        let (gate_up, down) = mlp_tile(p, first)?;
        let n2 = norm(&layer.post_attention_layernorm, &ht)?;
        let (gate, up) = split_gate_up(&gate_up, &n2)?;
        let n2_again = || Ok(n2.clone());
        dh.push(mlp_backward(
            layer, &gate_up, &down, &ht, n2_again, gate, up, &dyt, grads,
        )?);
    }
    Ok(Tensor::cat(&dh, 0)?.reshape(h.shape())?)
}

/// `y = h + down(silu(gate) ⊙ up)` backward: the gradient of `h` (its norm's input and the
/// residual), LoRA gradients to `grads`; `n2` gives the norm's output, called only where an
/// adapter of gate/up needs it.
#[allow(clippy::too_many_arguments)]
fn mlp_backward(
    layer: &DecoderLayer,
    gate_up: &[Projection],
    down: &Projection,
    h: &Tensor,
    n2: impl FnOnce() -> Result<Tensor>,
    gate: Tensor,
    up: Tensor,
    dy: &Tensor,
    grads: &mut LoraGrads,
) -> Result<Tensor> {
    let s = input_if_needed(&[down], || Ok(ops::swiglu(&gate, &up)?))?;
    let ds = down.backward(s.as_ref(), dy, None, grads)?;
    drop(s);
    let (dgate, dup) = ops::swiglu_backward(&gate, &up, &ds)?;
    drop((ds, gate, up));
    let dn2 = match gate_up.len() {
        2 => backward_all(gate_up, n2, &[dgate, dup], grads)?,
        _ => backward_all(
            gate_up,
            n2,
            &[Tensor::cat(&[&dgate, &dup], D::Minus1)?],
            grads,
        )?,
    };
    norm_backward(&layer.post_attention_layernorm, h, &dn2, Some(dy))
}

fn split_qkv(
    attn: &Attention,
    projections: &[Projection],
    n1: &Tensor,
    layout: HeadLayout,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = attn.head_dim;
    let (hq, hkv) = (attn.num_heads, attn.num_kv_heads);
    if let [q, k, v] = projections {
        return Ok((
            to_heads(&q.forward(n1)?, hq, d, layout)?,
            to_heads(&k.forward(n1)?, hkv, d, layout)?,
            to_heads(&v.forward(n1)?, hkv, d, layout)?,
        ));
    }
    let qkv = projections[0].forward(n1)?;
    let part = |start: usize, heads: usize| {
        to_heads(
            &qkv.narrow(D::Minus1, start * d, heads * d)?,
            heads,
            d,
            layout,
        )
    };
    Ok((part(0, hq)?, part(hq, hkv)?, part(hq + hkv, hkv)?))
}

fn split_gate_up(projections: &[Projection], n2: &Tensor) -> Result<(Tensor, Tensor)> {
    if let [gate, up] = projections {
        return Ok((gate.forward(n2)?, up.forward(n2)?));
    }
    let y = projections[0].forward(n2)?;
    let half = y.dim(D::Minus1)? / 2;
    Ok((
        y.narrow(D::Minus1, 0, half)?.contiguous()?,
        y.narrow(D::Minus1, half, half)?.contiguous()?,
    ))
}

/// The gradient of the layer's input given its output's; LoRA gradients go to `grads`.
pub fn backward(
    layer: &DecoderLayer,
    saved: Saved,
    dy: &Tensor,
    rope: &Rotary,
    grads: &mut LoraGrads,
) -> Result<Tensor> {
    let Saved {
        x,
        q,
        k,
        v,
        attention,
        o,
        layout,
        h,
        gate,
        up,
        mlp_rows,
        projections: p,
    } = saved;
    let attn = &layer.self_attn;

    // y = h + down(silu(gate) ⊙ up)
    let dh = match (gate, up) {
        (Some(gate), Some(up)) => {
            let n2 = || norm(&layer.post_attention_layernorm, &h);
            mlp_backward(layer, &p.gate_up, &p.down, &h, n2, gate, up, dy, grads)?
        }
        _ => mlp_backward_tiled(layer, &p, &h, dy, mlp_rows, grads)?,
    };
    drop(h);

    // h = x + o_proj(attn(rope(q), rope(k), v))
    let d_o = to_heads(
        &p.o.backward(Some(&from_heads(&o, layout)?), &dh, None, grads)?,
        attn.num_heads,
        attn.head_dim,
        layout,
    )?;
    drop(o);
    let qk_norm = attn.qk_norm.as_ref();
    let (qr, kr) = match qk_norm {
        None => (q.clone(), k.clone()),
        Some((qn, kn)) => (
            rotated(Some(qn), &q, rope, layout)?,
            rotated(Some(kn), &k, rope, layout)?,
        ),
    };
    let (dqr, dkr, dv) = attention.backward(&qr, &kr, &v, &d_o)?;
    drop((qr, kr, d_o, attention));
    let dq = rotated_backward(qk_norm.map(|n| &n.0), &q, &dqr, rope, layout)?;
    let dk = rotated_backward(qk_norm.map(|n| &n.1), &k, &dkr, rope, layout)?;
    let (dq, dk, dv) = (
        from_heads(&dq, layout)?,
        from_heads(&dk, layout)?,
        from_heads(&dv, layout)?,
    );
    drop((q, k, v, dqr, dkr));
    let n1 = || norm(&layer.input_layernorm, &x);
    let dn1 = match p.qkv.len() {
        3 => backward_all(&p.qkv, n1, &[dq, dk, dv], grads)?,
        _ => backward_all(
            &p.qkv,
            n1,
            &[Tensor::cat(&[&dq, &dk, &dv], D::Minus1)?],
            grads,
        )?,
    };
    norm_backward(&layer.input_layernorm, &x, &dn1, Some(&dh))
}
