// Row-wise and element-wise kernels of a decoder layer, in f32 arithmetic:
// - RMSNorm, y = x·r·w with r = 1/sqrt(mean(x²) + eps), and its backward pass
//   dx = r·(g⊙w) − x·r³·mean(x⊙g⊙w), optionally plus the residual branch's gradient (`_add`:
//   dx + res, the pre-norm block's input gradient in one pass): one block a row, 16-byte
//   vectors where the row allows;
// - SwiGLU, silu(gate) ⊙ up, and its backward pass: 16-byte vectors of elements a thread
//   (single elements where a pointer is not aligned), nothing stored between them but gate and
//   up;
// - the residual add a + b, in the same vectors;
// - RoPE on token-major heads [B, T, H, D], y = x·cos + rotate_half(x)·sin: a thread rotates a
//   vector of the head's first half with the matching vector of its second half.

#include "common.cuh"

#include <initializer_list>

// N consecutive elements as f32 (one 16-byte load when N fills a Pack), and back.
template <typename T, int N>
__device__ __forceinline__ void load_f32(const T *p, float (&out)[N]) {
    if constexpr (N == 1) {
        out[0] = to_f32(*p);
    } else {
        const Pack<T> v = *reinterpret_cast<const Pack<T> *>(p);
#pragma unroll
        for (int e = 0; e < N; ++e) out[e] = to_f32(v.v[e]);
    }
}

template <typename T, int N>
__device__ __forceinline__ void store_f32(T *p, const float (&in)[N]) {
    if constexpr (N == 1) {
        *p = from_f32<T>(in[0]);
    } else {
        Pack<T> v;
#pragma unroll
        for (int e = 0; e < N; ++e) v.v[e] = from_f32<T>(in[e]);
        *reinterpret_cast<Pack<T> *>(p) = v;
    }
}

// Whether a row kernel may use 16-byte vectors: the row length and every pointer allow it.
template <typename T>
__device__ __forceinline__ bool rows_vectorizable(uint32_t cols, std::initializer_list<const void *> ptrs) {
    bool ok = cols % (16 / sizeof(T)) == 0;
    for (const void *p : ptrs) ok = ok && (p == nullptr || aligned16(p));
    return ok;
}

// y = x·r·w, r = 1/sqrt(mean(x²) + eps), over a row, N elements at a time.
template <typename T, int N>
__device__ void rms_norm_row(const T *x, const T *w, T *y, uint32_t cols, float eps, float *shared) {
    float ss = 0.f;
    for (uint32_t i = threadIdx.x * N; i < cols; i += blockDim.x * N) {
        float xv[N];
        load_f32<T, N>(x + i, xv);
#pragma unroll
        for (int e = 0; e < N; ++e) ss += xv[e] * xv[e];
    }
    const float r = rsqrtf(block_reduce(ss, false, shared) / cols + eps);
    for (uint32_t i = threadIdx.x * N; i < cols; i += blockDim.x * N) {
        float xv[N], wv[N];
        load_f32<T, N>(x + i, xv);
        load_f32<T, N>(w + i, wv);
#pragma unroll
        for (int e = 0; e < N; ++e) xv[e] = xv[e] * r * wv[e];
        store_f32<T, N>(y + i, xv);
    }
}

template <typename T>
__device__ void rms_norm_fwd(const T *x, const T *w, T *y, uint32_t cols, float eps) {
    __shared__ float shared[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * cols;
    T *yr = y + row * cols;
    if (rows_vectorizable<T>(cols, {x, w, y}))
        rms_norm_row<T, 16 / sizeof(T)>(xr, w, yr, cols, eps, shared);
    else
        rms_norm_row<T, 1>(xr, w, yr, cols, eps, shared);
}

// dx = r·(g⊙w) − x·r³·mean(x⊙g⊙w) (+ res), over a row, N elements at a time.
template <typename T, bool ADD, int N>
__device__ void rms_norm_bwd_row(const T *x, const T *g, const T *w, const T *res, T *dx, uint32_t cols,
                                 float eps, float *shared) {
    float ss = 0.f, dot = 0.f;
    for (uint32_t i = threadIdx.x * N; i < cols; i += blockDim.x * N) {
        float xv[N], gv[N], wv[N];
        load_f32<T, N>(x + i, xv);
        load_f32<T, N>(g + i, gv);
        load_f32<T, N>(w + i, wv);
#pragma unroll
        for (int e = 0; e < N; ++e) {
            ss += xv[e] * xv[e];
            dot += xv[e] * gv[e] * wv[e];
        }
    }
    ss = block_reduce(ss, false, shared);
    dot = block_reduce(dot, false, shared);
    const float r = rsqrtf(ss / cols + eps);
    const float k = r * r * r * dot / cols;
    for (uint32_t i = threadIdx.x * N; i < cols; i += blockDim.x * N) {
        float xv[N], gv[N], wv[N], d[N];
        load_f32<T, N>(x + i, xv);
        load_f32<T, N>(g + i, gv);
        load_f32<T, N>(w + i, wv);
        if (ADD) load_f32<T, N>(res + i, d);
#pragma unroll
        for (int e = 0; e < N; ++e) d[e] = gv[e] * wv[e] * r - xv[e] * k + (ADD ? d[e] : 0.f);
        store_f32<T, N>(dx + i, d);
    }
}

template <typename T, bool ADD>
__device__ void rms_norm_bwd(const T *x, const T *g, const T *w, const T *res, T *dx, uint32_t cols,
                             float eps) {
    __shared__ float shared[32];
    const size_t o = blockIdx.x * (size_t)cols;
    const T *resr = ADD ? res + o : nullptr;
    if (rows_vectorizable<T>(cols, {x, g, w, res, dx}))
        rms_norm_bwd_row<T, ADD, 16 / sizeof(T)>(x + o, g + o, w, resr, dx + o, cols, eps, shared);
    else
        rms_norm_bwd_row<T, ADD, 1>(x + o, g + o, w, resr, dx + o, cols, eps, shared);
}

#define RMS_NORM_FWD(SUFFIX, T)                                                                  \
    extern "C" __global__ void rms_norm_fwd_##SUFFIX(const T *x, const T *w, T *y, uint32_t cols, \
                                                     float eps) {                                \
        rms_norm_fwd<T>(x, w, y, cols, eps);                                                     \
    }
RMS_NORM_FWD(f32, float)
RMS_NORM_FWD(bf16, __nv_bfloat16)
RMS_NORM_FWD(f16, __half)

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

// out = op(a, b) element by element, 16-byte vectors where all three pointers allow.
template <typename T, typename Op>
__device__ void map2(const T *a, const T *b, T *out, uint64_t n, Op op) {
    constexpr int V = 16 / sizeof(T);
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x, stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t nv = aligned16(a) && aligned16(b) && aligned16(out) ? n / V : 0;
    for (uint64_t j = tid; j < nv; j += stride) {
        const Pack<T> x = reinterpret_cast<const Pack<T> *>(a)[j], y = reinterpret_cast<const Pack<T> *>(b)[j];
        Pack<T> o;
#pragma unroll
        for (int e = 0; e < V; ++e) o.v[e] = op(x.v[e], y.v[e]);
        reinterpret_cast<Pack<T> *>(out)[j] = o;
    }
    for (uint64_t i = nv * V + tid; i < n; i += stride) out[i] = op(a[i], b[i]);
}

struct SiluMul {
    template <typename T>
    __device__ T operator()(T gate, T up) const { return silu_mul(gate, up); }
};

struct Add {
    template <typename T>
    __device__ T operator()(T a, T b) const { return from_f32<T>(to_f32(a) + to_f32(b)); }
};

template <typename T>
__device__ void swiglu_fwd(const T *gate, const T *up, T *out, uint64_t n) {
    map2(gate, up, out, n, SiluMul{});
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

#define ADD(SUFFIX, T)                                                                          \
    extern "C" __global__ void add_##SUFFIX(const T *a, const T *b, T *out, uint64_t n) {        \
        map2(a, b, out, n, Add{});                                                              \
    }
ADD(f32, float)
ADD(bf16, __nv_bfloat16)
ADD(f16, __half)

// RoPE on rows of `d` (heads of token-major [B, T, H, D]), N elements of each half a thread.
// cos and sin rows: position t of batch b at (b·cs_batch + t)·d/2.
template <typename T, int N>
__device__ void rope_thd_rows(const T *x, const T *cos, const T *sin, T *y, uint32_t t, uint32_t h,
                              uint32_t d, uint64_t cs_batch, uint64_t groups_total) {
    const uint32_t half = d / 2, groups = half / N;
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x, stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t g = tid; g < groups_total; g += stride) {
        const uint64_t row = g / groups, bt = row / h;
        const uint32_t j = (uint32_t)(g % groups) * N;
        const uint64_t c = (bt / t) * cs_batch + (bt % t) * half + j;
        const T *xr = x + row * d;
        T *yr = y + row * d;
        float x1[N], x2[N], cs[N], sn[N], y1[N], y2[N];
        load_f32<T, N>(xr + j, x1);
        load_f32<T, N>(xr + half + j, x2);
        load_f32<T, N>(cos + c, cs);
        load_f32<T, N>(sin + c, sn);
#pragma unroll
        for (int e = 0; e < N; ++e) {
            y1[e] = x1[e] * cs[e] - x2[e] * sn[e];
            y2[e] = x2[e] * cs[e] + x1[e] * sn[e];
        }
        store_f32<T, N>(yr + j, y1);
        store_f32<T, N>(yr + half + j, y2);
    }
}

template <typename T>
__device__ void rope_thd(const T *x, const T *cos, const T *sin, T *y, uint32_t b, uint32_t t, uint32_t h,
                         uint32_t d, uint64_t cs_batch) {
    constexpr int V = 16 / sizeof(T);
    const uint64_t rows = (uint64_t)b * t * h;
    if ((d / 2) % V == 0 && aligned16(x) && aligned16(cos) && aligned16(sin) && aligned16(y))
        rope_thd_rows<T, V>(x, cos, sin, y, t, h, d, cs_batch, rows * (d / 2 / V));
    else
        rope_thd_rows<T, 1>(x, cos, sin, y, t, h, d, cs_batch, rows * (d / 2));
}

#define ROPE(SUFFIX, T)                                                                         \
    extern "C" __global__ void rope_thd_##SUFFIX(const T *x, const T *cos, const T *sin, T *y,   \
                                                 uint32_t b, uint32_t t, uint32_t h, uint32_t d, \
                                                 uint64_t cs_batch) {                           \
        rope_thd<T>(x, cos, sin, y, b, t, h, d, cs_batch);                                      \
    }
ROPE(f32, float)
ROPE(bf16, __nv_bfloat16)
ROPE(f16, __half)
