// The attention softmax of the reference path, fused with its mask and scale, and its backward
// pass; compiled to PTX by build.rs and launched from src/cuda/mod.rs.

#include "common.cuh"

// Attention softmax, fused: probs = softmax(scale * scores + mask) over the last dimension, in f32
// arithmetic, for scores [rows, cols] (rows = batch * heads * queries). The additive mask is
// [mask_batches, queries, cols]; row r of batch b = r / (heads * queries) uses mask row
// (b % mask_batches) * queries + r % queries. One block of 256 threads per row.

// With `causal`, query q of a row may see keys j <= q + causal_offset only: those beyond are
// neither read nor given probability (the mask is then not read at all). Rows are read 16 bytes
// a thread at a time where their length and alignment allow.
template <typename T>
__device__ __forceinline__ bool vectorizable(const void *a, const void *b, const void *c,
                                             uint32_t cols) {
    constexpr uint32_t VEC = 16 / sizeof(T);
    return cols % VEC == 0 && ((uintptr_t)a % 16 == 0) && ((uintptr_t)b % 16 == 0) &&
           ((uintptr_t)c % 16 == 0);
}

template <typename T>
__device__ void masked_softmax(const T *scores, const T *mask, T *probs, uint32_t cols,
                               uint32_t queries, uint32_t heads, uint32_t mask_batches,
                               float scale, uint32_t causal, uint32_t causal_offset) {
    constexpr uint32_t VEC = 16 / sizeof(T);
    __shared__ float shared[32];
    uint64_t row = blockIdx.x;
    uint32_t q = row % queries;
    const T *x = scores + row * cols;
    T *y = probs + row * cols;
    const T *m = nullptr;
    if (mask != nullptr && !causal) {
        uint64_t b = row / ((uint64_t)heads * queries);
        m = mask + ((b % mask_batches) * queries + q) * cols;
    }
    uint32_t limit = causal ? min(cols, q + causal_offset + 1) : cols;
    bool vec = vectorizable<T>(x, y, m ? (const void *)m : (const void *)x, cols);
    float mx = -INFINITY;
    if (vec) {
        for (uint32_t base = threadIdx.x * VEC; base < limit; base += blockDim.x * VEC) {
            T xs[VEC], ms[VEC];
            *(uint4 *)xs = *(const uint4 *)(x + base);
            if (m) *(uint4 *)ms = *(const uint4 *)(m + base);
#pragma unroll
            for (uint32_t k = 0; k < VEC; k++)
                if (base + k < limit) mx = fmaxf(mx, to_f32(xs[k]) * scale + (m ? to_f32(ms[k]) : 0.0f));
        }
    } else {
        for (uint32_t j = threadIdx.x; j < limit; j += blockDim.x)
            mx = fmaxf(mx, to_f32(x[j]) * scale + (m ? to_f32(m[j]) : 0.0f));
    }
    mx = block_reduce(mx, true, shared);
    float sum = 0.0f;
    if (mx != -INFINITY) {
        if (vec) {
            for (uint32_t base = threadIdx.x * VEC; base < limit; base += blockDim.x * VEC) {
                T xs[VEC], ms[VEC];
                *(uint4 *)xs = *(const uint4 *)(x + base);
                if (m) *(uint4 *)ms = *(const uint4 *)(m + base);
#pragma unroll
                for (uint32_t k = 0; k < VEC; k++)
                    if (base + k < limit)
                        sum += __expf(to_f32(xs[k]) * scale + (m ? to_f32(ms[k]) : 0.0f) - mx);
            }
        } else {
            for (uint32_t j = threadIdx.x; j < limit; j += blockDim.x)
                sum += __expf(to_f32(x[j]) * scale + (m ? to_f32(m[j]) : 0.0f) - mx);
        }
    }
    sum = block_reduce(sum, false, shared);
    float inv = (sum > 0.0f && mx != -INFINITY) ? 1.0f / sum : 0.0f;
    if (vec) {
        for (uint32_t base = threadIdx.x * VEC; base < cols; base += blockDim.x * VEC) {
            T xs[VEC], ms[VEC], out[VEC];
            if (base < limit) {
                *(uint4 *)xs = *(const uint4 *)(x + base);
                if (m) *(uint4 *)ms = *(const uint4 *)(m + base);
            }
#pragma unroll
            for (uint32_t k = 0; k < VEC; k++) {
                float p = 0.0f;
                if (base + k < limit && inv > 0.0f)
                    p = __expf(to_f32(xs[k]) * scale + (m ? to_f32(ms[k]) : 0.0f) - mx) * inv;
                out[k] = from_f32<T>(p);
            }
            *(uint4 *)(y + base) = *(const uint4 *)out;
        }
    } else {
        for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
            float p = 0.0f;
            if (j < limit && inv > 0.0f)
                p = __expf(to_f32(x[j]) * scale + (m ? to_f32(m[j]) : 0.0f) - mx) * inv;
            y[j] = from_f32<T>(p);
        }
    }
}

// The backward pass: dscores = scale * p * (dp - sum_j dp_j p_j), per row (zero where causal
// masking gave no probability).
template <typename T>
__device__ void masked_softmax_bwd(const T *probs, const T *dprobs, T *dscores, uint32_t cols,
                                   uint32_t queries, float scale, uint32_t causal,
                                   uint32_t causal_offset) {
    constexpr uint32_t VEC = 16 / sizeof(T);
    __shared__ float shared[32];
    uint64_t row = blockIdx.x;
    uint32_t q = row % queries;
    uint32_t limit = causal ? min(cols, q + causal_offset + 1) : cols;
    const T *p = probs + row * cols;
    const T *dp = dprobs + row * cols;
    T *ds = dscores + row * cols;
    bool vec = vectorizable<T>(p, dp, ds, cols);
    float dot = 0.0f;
    if (vec) {
        for (uint32_t base = threadIdx.x * VEC; base < limit; base += blockDim.x * VEC) {
            T ps[VEC], dps[VEC];
            *(uint4 *)ps = *(const uint4 *)(p + base);
            *(uint4 *)dps = *(const uint4 *)(dp + base);
#pragma unroll
            for (uint32_t k = 0; k < VEC; k++)
                if (base + k < limit) dot += to_f32(ps[k]) * to_f32(dps[k]);
        }
    } else {
        for (uint32_t j = threadIdx.x; j < limit; j += blockDim.x) dot += to_f32(p[j]) * to_f32(dp[j]);
    }
    dot = block_reduce(dot, false, shared);
    if (vec) {
        for (uint32_t base = threadIdx.x * VEC; base < cols; base += blockDim.x * VEC) {
            T ps[VEC], dps[VEC], out[VEC];
            if (base < limit) {
                *(uint4 *)ps = *(const uint4 *)(p + base);
                *(uint4 *)dps = *(const uint4 *)(dp + base);
            }
#pragma unroll
            for (uint32_t k = 0; k < VEC; k++) {
                float v = 0.0f;
                if (base + k < limit) v = scale * to_f32(ps[k]) * (to_f32(dps[k]) - dot);
                out[k] = from_f32<T>(v);
            }
            *(uint4 *)(ds + base) = *(const uint4 *)out;
        }
    } else {
        for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
            float v = 0.0f;
            if (j < limit) v = scale * to_f32(p[j]) * (to_f32(dp[j]) - dot);
            ds[j] = from_f32<T>(v);
        }
    }
}

#define MASKED_SOFTMAX(T, NAME)                                                                \
    extern "C" __global__ void NAME(const T *scores, const T *mask, T *probs, uint32_t cols,  \
                                    uint32_t queries, uint32_t heads, uint32_t mask_batches,   \
                                    float scale, uint32_t causal, uint32_t offset) {           \
        masked_softmax<T>(scores, mask, probs, cols, queries, heads, mask_batches, scale,      \
                          causal, offset);                                                     \
    }                                                                                          \
    extern "C" __global__ void NAME##_bwd(const T *probs, const T *dprobs, T *dscores,        \
                                          uint32_t cols, uint32_t queries, float scale,        \
                                          uint32_t causal, uint32_t offset) {                  \
        masked_softmax_bwd<T>(probs, dprobs, dscores, cols, queries, scale, causal, offset);   \
    }

MASKED_SOFTMAX(float, masked_softmax_f32)
MASKED_SOFTMAX(__nv_bfloat16, masked_softmax_bf16)
MASKED_SOFTMAX(__half, masked_softmax_f16)
