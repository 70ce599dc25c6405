//! Attention on cuDNN's fused flash kernels (Hopper's wgmma kernels on an H100/H200), described
//! as the operation graphs cuDNN's runtime fusion engine recognises as scaled dot-product
//! attention, forward and backward:
//!
//! ```text
//! forward:   S = Q·Kᵀ · scale, masked causally;  stats = max S + log Σ exp(S − max S)
//!            P = exp(S − max S) / Σ exp(..);     O = P·V
//! backward:  P = exp(S − stats);   Δ = rowsum(dO ⊙ O);   dV = Pᵀ·dO (summed over a group)
//!            dS = P ⊙ (dO·Vᵀ − Δ) · scale;  dQ = dS·K;  dK = dSᵀ·Q (summed over a group)
//! ```
//!
//! Grouped key/value heads are native (no expanded copies). Plans are built once per shape and
//! kept. Where cuDNN is missing, or builds no plan for a shape, kiln's own flash kernels
//! (src/cuda/flash_attention.rs) run instead: [`fused_attention_forward`] picks, and the
//! statistics it returns tell the backward which kernels to mirror.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Result, Tensor};
use half::bf16;

use super::cudnn::{
    packed_strides, Cudnn, DataType, GraphBuilder, GraphTensor, Plan, Pointwise, Reduce,
};
use super::flash_attention::{flash_attention_backward, flash_attention_forward, head_strides};
use super::{cuda_device, device_address, wrap, AttentionStats};
use crate::layout::HeadLayout;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Shape {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
    causal: bool,
    token_major: bool,
}

impl Shape {
    fn q_strides(&self) -> [i64; 4] {
        let [b, h, r] = head_strides(self.layout(), self.h, self.t, self.d);
        [b, h, r, 1]
    }

    fn k_strides(&self) -> [i64; 4] {
        let [b, h, r] = head_strides(self.layout(), self.kv, self.t, self.d);
        [b, h, r, 1]
    }

    fn layout(&self) -> HeadLayout {
        if self.token_major {
            HeadLayout::TokenMajor
        } else {
            HeadLayout::HeadsMajor
        }
    }

    fn q_dims(&self) -> [i64; 4] {
        [self.b, self.h, self.t, self.d].map(|x| x as i64)
    }

    fn k_dims(&self) -> [i64; 4] {
        [self.b, self.kv, self.t, self.d].map(|x| x as i64)
    }

    /// `[B, H, T, T]`: the scores.
    fn score_dims(&self) -> [i64; 4] {
        [self.b, self.h, self.t, self.t].map(|x| x as i64)
    }

    /// `[B, H, T, 1]`: one value a query row.
    fn row_dims(&self) -> [i64; 4] {
        [self.b, self.h, self.t, 1].map(|x| x as i64)
    }
}

/// `[b, h, r, c]` seen as `[b, h, c, r]` (strides swapped: no data moves).
fn transposed(dims: [i64; 4], strides: [i64; 4]) -> ([i64; 4], [i64; 4]) {
    (
        [dims[0], dims[1], dims[3], dims[2]],
        [strides[0], strides[1], strides[3], strides[2]],
    )
}

// Unique ids of the tensors the variant pack names.
const Q: i64 = 1;
const K: i64 = 2;
const V: i64 = 3;
const O: i64 = 4;
const STATS: i64 = 5;
const SCALE: i64 = 6;
const NEG_INF: i64 = 7;
const DO: i64 = 8;
const DQ: i64 = 9;
const DK: i64 = 10;
const DV: i64 = 11;
const ROW_DOT: i64 = 12;
const DQ_ACCUM: i64 = 13;
const ONE: i64 = 14;

/// The scaled, causally masked scores `S` (virtual f32).
fn scores(
    g: &mut GraphBuilder,
    shape: &Shape,
    q: GraphTensor,
    kt: GraphTensor,
    scale: GraphTensor,
) -> Result<GraphTensor> {
    let dims = shape.score_dims();
    let s = g.virtual_tensor(dims, packed_strides(dims), DataType::F32)?;
    g.matmul(q, kt, s)?;
    g.pointwise(Pointwise::Mul, s, Some(scale))
}

/// The -inf a causal mask writes (a by-value scalar), in causal graphs only.
fn causal_scalar(g: &mut GraphBuilder, shape: &Shape) -> Result<Option<GraphTensor>> {
    shape.causal.then(|| g.scalar(NEG_INF)).transpose()
}

/// `s` with -inf above the diagonal (key index > query index) when causal.
fn causal_mask(
    g: &mut GraphBuilder,
    s: GraphTensor,
    neg_inf: Option<GraphTensor>,
) -> Result<GraphTensor> {
    let Some(neg_inf) = neg_inf else {
        return Ok(s);
    };
    let row = g.index(s, 2)?;
    let col = g.index(s, 3)?;
    let keep = g.virtual_tensor(s.dims, packed_strides(s.dims), DataType::Bool)?;
    g.pointwise_into(Pointwise::CmpGe, row, Some(col), None, keep, DataType::Bool)?;
    let y = g.virtual_tensor(s.dims, packed_strides(s.dims), DataType::F32)?;
    g.pointwise_into(
        Pointwise::BinarySelect,
        s,
        Some(neg_inf),
        Some(keep),
        y,
        DataType::F32,
    )?;
    Ok(y)
}

fn forward_graph(cudnn: &'static Cudnn, handle: *mut c_void, shape: &Shape) -> Result<Plan> {
    let mut g = GraphBuilder::new(cudnn);
    let (kt_dims, kt_strides) = transposed(shape.k_dims(), shape.k_strides());
    let q = g.real(Q, shape.q_dims(), shape.q_strides(), DataType::BF16)?;
    let kt = g.real(K, kt_dims, kt_strides, DataType::BF16)?;
    let v = g.real(V, shape.k_dims(), shape.k_strides(), DataType::BF16)?;
    let o = g.real(O, shape.q_dims(), shape.q_strides(), DataType::BF16)?;
    let rows = shape.row_dims();
    let stats = g.real(STATS, rows, packed_strides(rows), DataType::F32)?;
    let scale = g.scalar(SCALE)?;
    let neg_inf = causal_scalar(&mut g, shape)?;

    let s = scores(&mut g, shape, q, kt, scale)?;
    let s = causal_mask(&mut g, s, neg_inf)?;
    let max = g.virtual_tensor(rows, packed_strides(rows), DataType::F32)?;
    g.reduce(Reduce::Max, s, max)?;
    let centred = g.pointwise(Pointwise::Sub, s, Some(max))?;
    let e = g.pointwise(Pointwise::Exp, centred, None)?;
    let sum = g.virtual_tensor(rows, packed_strides(rows), DataType::F32)?;
    g.reduce(Reduce::Add, e, sum)?;
    let log_sum = g.pointwise(Pointwise::Log, sum, None)?;
    g.pointwise_into(
        Pointwise::Add,
        max,
        Some(log_sum),
        None,
        stats,
        DataType::F32,
    )?;
    let dims = shape.score_dims();
    let p = g.virtual_tensor(dims, packed_strides(dims), DataType::BF16)?;
    g.pointwise_into(Pointwise::Div, e, Some(sum), None, p, DataType::F32)?;
    g.matmul(p, v, o)?;
    g.build(handle)
}

/// A key/value head's gradient: the product for every query head, then summed over each
/// group of query heads sharing the key/value head.
fn grouped_product(
    g: &mut GraphBuilder,
    shape: &Shape,
    a: GraphTensor,
    b: GraphTensor,
    out: GraphTensor,
) -> Result<()> {
    if shape.h == shape.kv {
        return g.matmul(a, b, out);
    }
    let dims = [shape.b, shape.h, shape.t, shape.d].map(|x| x as i64);
    let full = g.virtual_tensor(dims, packed_strides(dims), DataType::BF16)?;
    g.matmul(a, b, full)?;
    g.reduce(Reduce::Add, full, out)
}

fn backward_graph(cudnn: &'static Cudnn, handle: *mut c_void, shape: &Shape) -> Result<Plan> {
    let mut g = GraphBuilder::new(cudnn);
    let (q_dims, q_strides) = (shape.q_dims(), shape.q_strides());
    let (k_dims, k_strides) = (shape.k_dims(), shape.k_strides());
    let (kt_dims, kt_strides) = transposed(k_dims, k_strides);
    let q = g.real(Q, q_dims, q_strides, DataType::BF16)?;
    let kt = g.real(K, kt_dims, kt_strides, DataType::BF16)?;
    let vt = g.real(V, kt_dims, kt_strides, DataType::BF16)?;
    let o = g.real(O, q_dims, q_strides, DataType::BF16)?;
    let d_o = g.real(DO, q_dims, q_strides, DataType::BF16)?;
    let rows = shape.row_dims();
    let stats = g.real(STATS, rows, packed_strides(rows), DataType::F32)?;
    let dq = g.real(DQ, q_dims, q_strides, DataType::BF16)?;
    let dk = g.real(DK, k_dims, k_strides, DataType::BF16)?;
    let dv = g.real(DV, k_dims, k_strides, DataType::BF16)?;
    let row_dot = g.real(ROW_DOT, rows, packed_strides(rows), DataType::F32)?;
    let dq_accum = g.real(DQ_ACCUM, q_dims, packed_strides(q_dims), DataType::F32)?;
    let scale = g.scalar(SCALE)?;
    let neg_inf = causal_scalar(&mut g, shape)?;
    let one = g.scalar(ONE)?;

    // Δ = rowsum(dO ⊙ O)
    let prod = g.pointwise(Pointwise::Mul, d_o, Some(o))?;
    let sum = g.virtual_tensor(rows, packed_strides(rows), DataType::F32)?;
    g.reduce(Reduce::Add, prod, sum)?;
    g.pointwise_into(Pointwise::Mul, sum, Some(one), None, row_dot, DataType::F32)?;

    // P = exp(S − stats)
    let s = scores(&mut g, shape, q, kt, scale)?;
    let s = g.pointwise(Pointwise::Sub, s, Some(stats))?;
    let s = causal_mask(&mut g, s, neg_inf)?;
    let p = g.pointwise(Pointwise::Exp, s, None)?;

    // dV = Pᵀ·dO
    let (pt_dims, pt_strides) = transposed(p.dims, packed_strides(p.dims));
    let pt = g.virtual_tensor(pt_dims, pt_strides, DataType::BF16)?;
    g.reshape(p, pt)?;
    grouped_product(&mut g, shape, pt, d_o, dv)?;

    // dS = P ⊙ (dO·Vᵀ − Δ) · scale
    let dims = shape.score_dims();
    let dp = g.virtual_tensor(dims, packed_strides(dims), DataType::F32)?;
    g.matmul(d_o, vt, dp)?;
    let ds = g.pointwise(Pointwise::Sub, dp, Some(row_dot))?;
    let ds = g.pointwise(Pointwise::Mul, ds, Some(p))?;
    let ds = g.pointwise(Pointwise::Mul, ds, Some(scale))?;

    // dK = dSᵀ·Q
    let (dst_dims, dst_strides) = transposed(ds.dims, packed_strides(ds.dims));
    let dst = g.virtual_tensor(dst_dims, dst_strides, DataType::BF16)?;
    g.reshape(ds, dst)?;
    grouped_product(&mut g, shape, dst, q, dk)?;

    // dQ = dS·K, accumulated in f32, then written as bf16
    let k = g.virtual_tensor(k_dims, k_strides, DataType::BF16)?;
    g.reshape(kt, k)?;
    g.matmul(ds, k, dq_accum)?;
    g.pointwise_into(Pointwise::Identity, dq_accum, None, None, dq, DataType::F32)?;
    g.build(handle)
}

/// Built plans by stream and shape; `None` where cuDNN built none (the flash kernels run).
type Plans = HashMap<(usize, bool, Shape), Option<Arc<Plan>>>;

fn plan(
    cudnn: &'static Cudnn,
    handle: *mut c_void,
    backward: bool,
    shape: Shape,
) -> Option<Arc<Plan>> {
    static PLANS: OnceLock<Mutex<Plans>> = OnceLock::new();
    let mut plans = PLANS.get_or_init(Default::default).lock().unwrap();
    plans
        .entry((handle as usize, backward, shape))
        .or_insert_with(|| {
            let built = if backward {
                backward_graph(cudnn, handle, &shape)
            } else {
                forward_graph(cudnn, handle, &shape)
            };
            match built {
                Ok(plan) => Some(Arc::new(plan)),
                Err(e) => {
                    static TOLD: std::sync::Once = std::sync::Once::new();
                    TOLD.call_once(|| {
                        eprintln!(
                            "note: cuDNN {} attention is not available for {shape:?} ({e}); \
                             kiln's flash kernels run instead",
                            cudnn.version()
                        )
                    });
                    None
                }
            }
        })
        .clone()
}

/// cuDNN's handle on `q`'s stream, the plan for this shape, and the stream.
fn cudnn_plan(q: &Tensor, backward: bool, shape: Shape) -> Result<Option<(Arc<Plan>, Handle)>> {
    let Some(cudnn) = Cudnn::get() else {
        return Ok(None);
    };
    let dev = cuda_device(q)?;
    let stream = dev.cuda_stream().cu_stream() as *mut c_void;
    let handle = cudnn.handle(stream)?;
    Ok(plan(cudnn, handle, backward, shape).map(|p| (p, Handle(handle))))
}

struct Handle(*mut c_void);

/// The shape cuDNN's graphs take, where they apply: equal query and key lengths (training's
/// case; a cached decode keeps the flash kernels), contiguous bf16.
fn cudnn_shape(q: &Tensor, k: &Tensor, causal: bool, layout: HeadLayout) -> Result<Option<Shape>> {
    let (b, h, t, d) = layout.dims(q)?;
    let (_, kv, tk, _) = layout.dims(k)?;
    if tk != t || q.dtype() != DType::BF16 {
        return Ok(None);
    }
    Ok(Some(Shape {
        b,
        h,
        kv,
        t,
        d,
        causal,
        token_major: layout == HeadLayout::TokenMajor,
    }))
}

/// Runs `plan` with the tensors `uid → tensor`, and the by-value scalars its graph has: the
/// scale, -inf where causal, and 1 in the backward.
fn run(
    plan: &Plan,
    handle: &Handle,
    shape: &Shape,
    backward: bool,
    tensors: &[(i64, &Tensor)],
    scale: f32,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (neg_inf, one) = (f32::NEG_INFINITY, 1f32);
    let mut scalars = vec![(SCALE, &scale)];
    if shape.causal {
        scalars.push((NEG_INF, &neg_inf));
    }
    if backward {
        scalars.push((ONE, &one));
    }
    let mut uids = vec![];
    let mut pointers: Vec<*mut c_void> = vec![];
    for (uid, value) in scalars {
        uids.push(uid);
        pointers.push(value as *const f32 as *mut c_void);
    }
    for (uid, t) in tensors {
        uids.push(*uid);
        pointers.push(device_address(t, "cuDNN attention")? as *mut c_void);
    }
    let dev = cuda_device(tensors[0].1)?;
    let stream = dev.cuda_stream();
    // SAFETY: scratch memory the plan initializes as it needs (the test leaves NaNs in freed
    // memory to check).
    let workspace = unsafe { dev.alloc::<u8>(plan.workspace.max(16))? };
    let (address, _sync) = workspace.device_ptr(&stream);
    plan.execute(handle.0, &uids, &pointers, address as *mut c_void)
}

/// `(o, stats)`: attention on cuDNN where it applies, else on kiln's flash kernels.
pub fn fused_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    causal: bool,
    layout: HeadLayout,
) -> Result<(Tensor, AttentionStats)> {
    if let Some(shape) = cudnn_shape(q, k, causal, layout)? {
        if let Some((plan, handle)) = cudnn_plan(q, false, shape)? {
            let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
            let dev = cuda_device(&q)?;
            let Shape { b, h, t, d, .. } = shape;
            // SAFETY: the plan writes every element of both.
            let o = wrap(
                unsafe { dev.alloc::<bf16>(b * h * t * d)? },
                &dev,
                q.shape().clone(),
            );
            let stats = wrap(unsafe { dev.alloc::<f32>(b * h * t)? }, &dev, (b, h, t));
            run(
                &plan,
                &handle,
                &shape,
                false,
                &[(Q, &q), (K, &k), (V, &v), (O, &o), (STATS, &stats)],
                scale,
            )?;
            return Ok((o, AttentionStats::Cudnn(stats)));
        }
    }
    let (o, lse) = flash_attention_forward(q, k, v, scale, causal, layout)?;
    Ok((o, AttentionStats::Flash(lse)))
}

/// `(dq, dk, dv)` of [`fused_attention_forward`], on the kernels that ran it.
#[allow(clippy::too_many_arguments)]
pub fn fused_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    stats: &AttentionStats,
    grad: &Tensor,
    scale: f32,
    causal: bool,
    layout: HeadLayout,
) -> Result<(Tensor, Tensor, Tensor)> {
    let stats = match stats {
        AttentionStats::Flash(lse) => {
            return flash_attention_backward(q, k, v, o, lse, grad, scale, causal, layout)
        }
        AttentionStats::Cudnn(stats) => stats,
    };
    let shape = cudnn_shape(q, k, causal, layout)?.expect("the forward ran on cuDNN");
    let (plan, handle) = cudnn_plan(q, true, shape)?.ok_or_else(|| {
        candle_core::Error::Msg("cuDNN ran the attention forward but has no backward plan".into())
    })?;
    let dev = cuda_device(q)?;
    let Shape { b, h, kv, t, d, .. } = shape;
    let grad = grad.to_dtype(DType::BF16)?.contiguous()?;
    // SAFETY: the plan writes every element of each.
    let dq = wrap(
        unsafe { dev.alloc::<bf16>(b * h * t * d)? },
        &dev,
        q.shape().clone(),
    );
    let dk = wrap(
        unsafe { dev.alloc::<bf16>(b * kv * t * d)? },
        &dev,
        k.shape().clone(),
    );
    let dv = wrap(
        unsafe { dev.alloc::<bf16>(b * kv * t * d)? },
        &dev,
        v.shape().clone(),
    );
    let row_dot = wrap(unsafe { dev.alloc::<f32>(b * h * t)? }, &dev, (b, h, t));
    // SAFETY: cuDNN (9.6 on) clears dQ's f32 accumulator itself.
    let dq_accum = wrap(
        unsafe { dev.alloc::<f32>(b * h * t * d)? },
        &dev,
        (b, h, t, d),
    );
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    run(
        &plan,
        &handle,
        &shape,
        true,
        &[
            (Q, q),
            (K, &k),
            (V, &v),
            (O, o),
            (DO, &grad),
            (STATS, stats),
            (DQ, &dq),
            (DK, &dk),
            (DV, &dv),
            (ROW_DOT, &row_dot),
            (DQ_ACCUM, &dq_accum),
        ],
        scale,
    )?;
    Ok((dq, dk, dv))
}
