// Row-wise and element-wise kernels of a decoder layer, in f32 arithmetic:
// - RMSNorm's backward pass: dx = r·(g⊙w) − x·r³·mean(x⊙g⊙w), r = 1/sqrt(mean(x²) + eps), one
//   block a row (the forward is candle-nn's fused kernel);
// - SwiGLU, silu(gate) ⊙ up, and its backward pass: one thread an element, nothing stored
//   between them but gate and up.

#include "common.cuh"

template <typename T>
__device__ void rms_norm_bwd(const T *x, const T *g, const T *w, T *dx, uint32_t cols, float eps) {
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
    for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x)
        out[i] = from_f32<T>(to_f32(gr[i]) * to_f32(w[i]) * r - to_f32(xr[i]) * k);
}

#define RMS_NORM_BWD(NAME, T)                                                                  \
    extern "C" __global__ void NAME(const T *x, const T *g, const T *w, T *dx, uint32_t cols,  \
                                    float eps) {                                               \
        rms_norm_bwd<T>(x, g, w, dx, cols, eps);                                               \
    }
RMS_NORM_BWD(rms_norm_bwd_f32, float)
RMS_NORM_BWD(rms_norm_bwd_bf16, __nv_bfloat16)
RMS_NORM_BWD(rms_norm_bwd_f16, __half)

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

template <typename T>
__device__ void swiglu_fwd(const T *gate, const T *up, T *out, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]);
        out[i] = from_f32<T>(g * sigmoid(g) * to_f32(up[i]));
    }
}

// d gate = dy·up·σ(g)·(1 + g·(1 − σ(g))), d up = dy·g·σ(g).
template <typename T>
__device__ void swiglu_bwd(const T *gate, const T *up, const T *dy, T *dgate, T *dup, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]), u = to_f32(up[i]), d = to_f32(dy[i]);
        const float s = sigmoid(g);
        dgate[i] = from_f32<T>(d * u * s * (1.f + g * (1.f - s)));
        dup[i] = from_f32<T>(d * g * s);
    }
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
