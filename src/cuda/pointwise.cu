// Row-wise and element-wise kernels of a decoder layer, in f32 arithmetic:
// - RMSNorm's backward pass: dx = r·(g⊙w) − x·r³·mean(x⊙g⊙w), r = 1/sqrt(mean(x²) + eps), one
//   block a row (the forward is candle-nn's fused kernel), optionally plus the residual
//   branch's gradient (`_add`: dx + res, the pre-norm block's input gradient in one pass);
// - SwiGLU, silu(gate) ⊙ up, and its backward pass: 16-byte vectors of elements a thread
//   (single elements where a pointer is not aligned), nothing stored between them but gate and
//   up.

#include "common.cuh"

template <typename T, bool ADD>
__device__ void rms_norm_bwd(const T *x, const T *g, const T *w, const T *res, T *dx, uint32_t cols,
                             float eps) {
    __shared__ float shared[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * cols, *gr = g + row * cols;
    T *out = dx + row * cols;
    float ss = 0.f, dot = 0.f;
    for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) {
        const float xv = to_f32(xr[i]);
        ss += xv * xv;
        dot += xv * to_f32(gr[i]) * to_f32(w[i]);
    }
    ss = block_reduce(ss, false, shared);
    dot = block_reduce(dot, false, shared);
    const float r = rsqrtf(ss / cols + eps);
    const float k = r * r * r * dot / cols;
    for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) {
        float d = to_f32(gr[i]) * to_f32(w[i]) * r - to_f32(xr[i]) * k;
        if (ADD) d += to_f32(res[row * cols + i]);
        out[i] = from_f32<T>(d);
    }
}

#define RMS_NORM_BWD(SUFFIX, T)                                                                 \
    extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T *x, const T *g, const T *w, T *dx, \
                                                     uint32_t cols, float eps) {                \
        rms_norm_bwd<T, false>(x, g, w, nullptr, dx, cols, eps);                                \
    }                                                                                           \
    extern "C" __global__ void rms_norm_bwd_add_##SUFFIX(const T *x, const T *g, const T *w,    \
                                                         const T *res, T *dx, uint32_t cols,    \
                                                         float eps) {                           \
        rms_norm_bwd<T, true>(x, g, w, res, dx, cols, eps);                                     \
    }
RMS_NORM_BWD(f32, float)
RMS_NORM_BWD(bf16, __nv_bfloat16)
RMS_NORM_BWD(f16, __half)

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

template <typename T>
__device__ __forceinline__ T silu_mul(T gate, T up) {
    const float g = to_f32(gate);
    return from_f32<T>(g * sigmoid(g) * to_f32(up));
}

template <typename T>
__device__ void swiglu_fwd(const T *gate, const T *up, T *out, uint64_t n) {
    constexpr int V = 16 / sizeof(T);
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x, stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t nv = aligned16(gate) && aligned16(up) && aligned16(out) ? n / V : 0;
    for (uint64_t j = tid; j < nv; j += stride) {
        const Pack<T> g = reinterpret_cast<const Pack<T> *>(gate)[j], u = reinterpret_cast<const Pack<T> *>(up)[j];
        Pack<T> o;
#pragma unroll
        for (int e = 0; e < V; ++e) o.v[e] = silu_mul(g.v[e], u.v[e]);
        reinterpret_cast<Pack<T> *>(out)[j] = o;
    }
    for (uint64_t i = nv * V + tid; i < n; i += stride) out[i] = silu_mul(gate[i], up[i]);
}

// d gate = dy·up·σ(g)·(1 + g·(1 − σ(g))), d up = dy·g·σ(g).
template <typename T>
__device__ __forceinline__ void swiglu_grad(T gate, T up, T dy, T &dgate, T &dup) {
    const float g = to_f32(gate), u = to_f32(up), d = to_f32(dy);
    const float s = sigmoid(g);
    dgate = from_f32<T>(d * u * s * (1.f + g * (1.f - s)));
    dup = from_f32<T>(d * g * s);
}

template <typename T>
__device__ void swiglu_bwd(const T *gate, const T *up, const T *dy, T *dgate, T *dup, uint64_t n) {
    constexpr int V = 16 / sizeof(T);
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x, stride = (uint64_t)gridDim.x * blockDim.x;
    const bool vectors = aligned16(gate) && aligned16(up) && aligned16(dy) && aligned16(dgate) && aligned16(dup);
    const uint64_t nv = vectors ? n / V : 0;
    for (uint64_t j = tid; j < nv; j += stride) {
        const Pack<T> g = reinterpret_cast<const Pack<T> *>(gate)[j], u = reinterpret_cast<const Pack<T> *>(up)[j],
                      d = reinterpret_cast<const Pack<T> *>(dy)[j];
        Pack<T> dg, du;
#pragma unroll
        for (int e = 0; e < V; ++e) swiglu_grad(g.v[e], u.v[e], d.v[e], dg.v[e], du.v[e]);
        reinterpret_cast<Pack<T> *>(dgate)[j] = dg;
        reinterpret_cast<Pack<T> *>(dup)[j] = du;
    }
    for (uint64_t i = nv * V + tid; i < n; i += stride) swiglu_grad(gate[i], up[i], dy[i], dgate[i], dup[i]);
}

#define SWIGLU(SUFFIX, T)                                                                       \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(const T *gate, const T *up, T *out, uint64_t n) { \
        swiglu_fwd<T>(gate, up, out, n);                                                        \
    }                                                                                           \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(const T *gate, const T *up, const T *dy,      \
                                                   T *dgate, T *dup, uint64_t n) {              \
        swiglu_bwd<T>(gate, up, dy, dgate, dup, n);                                             \
    }
SWIGLU(f32, float)
SWIGLU(bf16, __nv_bfloat16)
SWIGLU(f16, __half)
