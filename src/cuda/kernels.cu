// kiln's own CUDA kernels, compiled to PTX by build.rs (feature `cuda`) and loaded through
// candle's CUDA device. Each kernel computes exactly what the CPU path in Rust computes, with
// the same f32 operations in the same order (no FMA contraction where the CPU rounds twice),
// so the CPU and GPU produce identical NF4 bytes, dequantized weights and dropout masks.

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// NF4 dequantization: out[i] = code[q_i] * scale[i / blocksize], where the block scale is either
// stored (absmax_plain) or double-quantized:
//     scale[b] = nested_code[absmax_codes[b]] * nested_absmax[b / nested_blocksize] + offset.
// One thread per 8 packed bytes (16 values, the even one of a byte in its high nibble): one load
// of the bytes and 16-byte stores where the block size and pointers allow, bytes one by one at
// the end of the tensor or where they do not.

__device__ __forceinline__ float nf4_scale(uint64_t b, const float *absmax_plain,
                                           const uint8_t *absmax_codes, const float *nested_absmax,
                                           const float *nested_code, float offset,
                                           uint32_t nested_blocksize) {
    if (absmax_plain != nullptr) return absmax_plain[b];
    return __fadd_rn(__fmul_rn(nested_code[absmax_codes[b]], nested_absmax[b / nested_blocksize]), offset);
}

template <typename T>
__device__ void nf4_dequant(const uint8_t *packed, const float *absmax_plain,
                            const uint8_t *absmax_codes, const float *nested_absmax,
                            const float *nested_code, float offset, const float *code, T *out,
                            uint64_t n, uint32_t blocksize, uint32_t nested_blocksize) {
    __shared__ float code_s[16];
    if (threadIdx.x < 16) code_s[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const uint64_t g = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x, i0 = 16 * g;
    if (i0 >= n) return;
    const auto scale_of = [&](uint64_t i) {
        return nf4_scale(i / blocksize, absmax_plain, absmax_codes, nested_absmax, nested_code, offset,
                         nested_blocksize);
    };
    const bool vectors = i0 + 16 <= n && blocksize % 16 == 0 && aligned16(out) &&
                         (reinterpret_cast<uintptr_t>(packed) & 7) == 0;
    if (vectors) {
        // The 16 values share a block.
        const float scale = scale_of(i0);
        const uint2 bytes = reinterpret_cast<const uint2 *>(packed)[g];
        constexpr int V = 16 / sizeof(T);
        Pack<T> packs[16 / V];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const uint32_t p = ((k < 4 ? bytes.x : bytes.y) >> (8 * (k % 4))) & 0xff;
            packs[(2 * k) / V].v[(2 * k) % V] = from_f32<T>(__fmul_rn(code_s[p >> 4], scale));
            packs[(2 * k + 1) / V].v[(2 * k + 1) % V] = from_f32<T>(__fmul_rn(code_s[p & 15], scale));
        }
#pragma unroll
        for (int k = 0; k < 16 / V; ++k) reinterpret_cast<Pack<T> *>(out + i0)[k] = packs[k];
        return;
    }
    for (uint64_t i = i0; i < i0 + 16 && i < n; i += 2) {
        // blocksize is even, so both values of a byte share a block.
        const float scale = scale_of(i);
        const uint8_t p = packed[i / 2];
        out[i] = from_f32<T>(__fmul_rn(code_s[p >> 4], scale));
        if (i + 1 < n) out[i + 1] = from_f32<T>(__fmul_rn(code_s[p & 15], scale));
    }
}

#define NF4_DEQUANT(T, NAME)                                                                   \
    extern "C" __global__ void NAME(const uint8_t *packed, const float *absmax_plain,         \
                                    const uint8_t *absmax_codes, const float *nested_absmax,  \
                                    const float *nested_code, float offset, const float *code, \
                                    T *out, uint64_t n, uint32_t blocksize,                    \
                                    uint32_t nested_blocksize) {                               \
        nf4_dequant<T>(packed, absmax_plain, absmax_codes, nested_absmax, nested_code, offset, \
                       code, out, n, blocksize, nested_blocksize);                             \
    }

NF4_DEQUANT(float, nf4_dequant_f32)
NF4_DEQUANT(__nv_bfloat16, nf4_dequant_bf16)
NF4_DEQUANT(__half, nf4_dequant_f16)

// ---------------------------------------------------------------------------------------------
// NF4 quantization of blocks, as bitsandbytes' kQuantizeBlockwise: absmax of each block, then
// the code of each value scaled by 1/absmax: the number of NF4 midpoints it is strictly above.
// One thread per block.

__constant__ float NF4_THRESHOLDS[15] = {
    -0.8480964f,  -0.6106329f,  -0.45999527f, -0.33967943f, -0.2346074f,
    -0.13791173f, -0.045525018f, 0.03979015f, 0.12025525f,  0.20352125f,
    0.29201377f,  0.38931254f,  0.5016634f,   0.6427869f,   0.8614784f};

__device__ __forceinline__ uint8_t nf4_encode(float x) {
    uint8_t c = 0;
#pragma unroll
    for (int t = 0; t < 15; t++) c += (x > NF4_THRESHOLDS[t]) ? 1 : 0;
    return c;
}

template <typename T>
__device__ void nf4_quantize(const T *x, uint8_t *packed, float *absmax, uint64_t n,
                             uint32_t blocksize) {
    uint64_t b = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint64_t start = b * blocksize;
    if (start >= n) return;
    uint64_t end = start + blocksize < n ? start + blocksize : n;
    float amax = 0.0f;
    for (uint64_t i = start; i < end; i++) amax = fmaxf(amax, fabsf(to_f32(x[i])));
    absmax[b] = amax;
    float inv = __fdiv_rn(1.0f, amax);
    for (uint64_t i = start; i < end; i += 2) {
        uint8_t hi = nf4_encode(__fmul_rn(to_f32(x[i]), inv));
        // An odd element count pads with 0.0, which NF4 encodes as code 7.
        uint8_t lo = (i + 1 < end) ? nf4_encode(__fmul_rn(to_f32(x[i + 1]), inv)) : 7;
        packed[i / 2] = (uint8_t)((hi << 4) | lo);
    }
}

#define NF4_QUANTIZE(T, NAME)                                                                  \
    extern "C" __global__ void NAME(const T *x, uint8_t *packed, float *absmax, uint64_t n,   \
                                    uint32_t blocksize) {                                      \
        nf4_quantize<T>(x, packed, absmax, n, blocksize);                                      \
    }

NF4_QUANTIZE(float, nf4_quantize_f32)
NF4_QUANTIZE(__nv_bfloat16, nf4_quantize_bf16)
NF4_QUANTIZE(__half, nf4_quantize_f16)

// ---------------------------------------------------------------------------------------------
// Dropout from a counter-based hash: elements come in groups of 4, group g of the stream `seed`
// hashed once (splitmix64), and element 4g + j kept when bits 16j..16j+15 of the hash, as a
// uniform draw in [0, 1), are at least p; kept elements are scaled by 1/(1-p). The same function
// in Rust (`dropout_keep` in ops/dropout.rs) gives the CPU the same masks. The backward pass applies the
// same mask to the gradient, so no mask is ever stored. One thread a group.

// A group's four elements, loaded and stored as one vector.
template <typename T>
struct __align__(4 * sizeof(T)) Quad {
    T v[4];
};

// out = drop(x), or with ADD, out += drop(x).
template <typename T, bool ADD>
__device__ void dropout(const T *x, T *out, uint64_t n, uint64_t seed, float p, float scale) {
    const uint64_t g = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x, i = 4 * g;
    if (i >= n) return;
    const uint64_t h = dropout_hash(seed, g);
    const auto dropped = [&](int j, T xv, T ov) {
        const float v = dropout_keep(h, j, p) ? __fmul_rn(to_f32(xv), scale) : 0.0f;
        return from_f32<T>(ADD ? to_f32(ov) + v : v);
    };
    const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out)) % sizeof(Quad<T>)) == 0;
    if (i + 4 <= n && aligned) {
        const Quad<T> xq = reinterpret_cast<const Quad<T> *>(x)[g];
        Quad<T> oq = ADD ? reinterpret_cast<const Quad<T> *>(out)[g] : xq;
#pragma unroll
        for (int j = 0; j < 4; ++j) oq.v[j] = dropped(j, xq.v[j], oq.v[j]);
        reinterpret_cast<Quad<T> *>(out)[g] = oq;
        return;
    }
    for (int j = 0; j < 4 && i + j < n; ++j) out[i + j] = dropped(j, x[i + j], ADD ? out[i + j] : x[i + j]);
}

#define DROPOUT(T, SUFFIX)                                                                     \
    extern "C" __global__ void dropout_##SUFFIX(const T *x, T *out, uint64_t n, uint64_t seed, \
                                                float p, float scale) {                        \
        dropout<T, false>(x, out, n, seed, p, scale);                                          \
    }                                                                                          \
    extern "C" __global__ void dropout_add_##SUFFIX(const T *x, T *out, uint64_t n,            \
                                                    uint64_t seed, float p, float scale) {     \
        dropout<T, true>(x, out, n, seed, p, scale);                                           \
    }

DROPOUT(float, f32)
DROPOUT(__nv_bfloat16, bf16)
DROPOUT(__half, f16)

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// Cross-entropy over rows of logits (one chunk of the output projection), f32 arithmetic:
//   forward:  loss[r] = w[r] * (logsumexp(z_r) - z_r[t_r])
//   backward: dz_r = (softmax(z_r) - onehot(t_r)) * w[r] * grad, times the soft cap's derivative
// where z = cap * tanh(logits / cap) when cap > 0. One block of 1024 threads per row.

template <typename T>
__device__ void row_logsumexp(const T *z, uint32_t cols, float cap, float *shared, float &mx,
                              float &lse) {
    float m = -INFINITY;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, capped(to_f32(z[j]), cap));
    m = block_reduce(m, true, shared);
    float s = 0.0f;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) s += __expf(capped(to_f32(z[j]), cap) - m);
    s = block_reduce(s, false, shared);
    mx = m;
    lse = m + logf(s);
}

template <typename T>
__device__ void cross_entropy_fwd(const T *logits, const uint32_t *targets, const float *weights,
                                  float *loss, uint32_t cols, float cap) {
    __shared__ float shared[32];
    uint64_t row = blockIdx.x;
    const T *z = logits + row * cols;
    float mx, lse;
    row_logsumexp(z, cols, cap, shared, mx, lse);
    if (threadIdx.x == 0) {
        float w = weights[row];
        loss[row] = w == 0.0f ? 0.0f : w * (lse - capped(to_f32(z[targets[row]]), cap));
    }
}

template <typename T>
__device__ void cross_entropy_bwd(const T *logits, const uint32_t *targets, const float *weights,
                                  const float *grad, T *dlogits, uint32_t cols, float cap) {
    __shared__ float shared[32];
    uint64_t row = blockIdx.x;
    const T *z = logits + row * cols;
    T *dz = dlogits + row * cols;
    float scale = weights[row] * grad[0];
    if (scale == 0.0f) {
        for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) dz[j] = from_f32<T>(0.0f);
        return;
    }
    float mx, lse;
    row_logsumexp(z, cols, cap, shared, mx, lse);
    uint32_t t = targets[row];
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
        float c = capped(to_f32(z[j]), cap);
        float d = (__expf(c - lse) - (j == t ? 1.0f : 0.0f)) * scale;
        if (cap > 0.0f) d *= 1.0f - (c / cap) * (c / cap);
        dz[j] = from_f32<T>(d);
    }
}

// Both at once, for the explicit step, over a chunk it owns: one online pass for the row's max
// and sum, then the gradient written over the logits in place, and the row's loss. Reads the row
// twice and writes it once (the pair above reads it five times and writes a copy), 16-byte
// vectors where the rows allow. One block a row.
template <typename T>
__device__ void cross_entropy_grad_inplace(T *logits, const uint32_t *targets, const float *weights,
                                           float *loss, uint32_t cols, float grad, float cap) {
    __shared__ float shared[32];
    const uint64_t row = blockIdx.x;
    T *z = logits + row * cols;
    const float w = weights[row], scale = w * grad;
    constexpr int V = 16 / sizeof(T);
    const bool vectors = cols % V == 0 && aligned16(logits);
    const uint32_t nv = vectors ? cols / V : 0;
    if (w == 0.0f) {
        for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) z[j] = from_f32<T>(0.0f);
        if (threadIdx.x == 0) loss[row] = 0.0f;
        return;
    }
    // Online max and sum of exp over this thread's elements.
    float m = -INFINITY, s = 0.0f;
    const auto add = [&](float c) {
        if (c > m) {
            s = s * __expf(m - c) + 1.0f;
            m = c;
        } else {
            s += __expf(c - m);
        }
    };
    for (uint32_t j = threadIdx.x; j < nv; j += blockDim.x) {
        const Pack<T> p = reinterpret_cast<const Pack<T> *>(z)[j];
#pragma unroll
        for (int e = 0; e < V; ++e) add(capped(to_f32(p.v[e]), cap));
    }
    for (uint32_t j = nv * V + threadIdx.x; j < cols; j += blockDim.x) add(capped(to_f32(z[j]), cap));
    const float mx = block_reduce(m, true, shared);
    const float sum = block_reduce(m == -INFINITY ? 0.0f : s * __expf(m - mx), false, shared);
    const float lse = mx + logf(sum);
    const uint32_t t = targets[row];
    if (threadIdx.x == 0) loss[row] = w * (lse - capped(to_f32(z[t]), cap));
    __syncthreads();  // z[t] is read before any thread overwrites it
    const auto grad_of = [&](uint32_t j, T x) {
        const float c = capped(to_f32(x), cap);
        float d = (__expf(c - lse) - (j == t ? 1.0f : 0.0f)) * scale;
        if (cap > 0.0f) d *= 1.0f - (c / cap) * (c / cap);
        return from_f32<T>(d);
    };
    for (uint32_t j = threadIdx.x; j < nv; j += blockDim.x) {
        Pack<T> p = reinterpret_cast<const Pack<T> *>(z)[j];
#pragma unroll
        for (int e = 0; e < V; ++e) p.v[e] = grad_of(j * V + e, p.v[e]);
        reinterpret_cast<Pack<T> *>(z)[j] = p;
    }
    for (uint32_t j = nv * V + threadIdx.x; j < cols; j += blockDim.x) z[j] = grad_of(j, z[j]);
}

#define CROSS_ENTROPY(T, NAME)                                                                 \
    extern "C" __global__ void NAME##_fwd(const T *logits, const uint32_t *targets,           \
                                          const float *weights, float *loss, uint32_t cols,    \
                                          float cap) {                                         \
        cross_entropy_fwd<T>(logits, targets, weights, loss, cols, cap);                       \
    }                                                                                          \
    extern "C" __global__ void NAME##_bwd(const T *logits, const uint32_t *targets,           \
                                          const float *weights, const float *grad, T *dlogits, \
                                          uint32_t cols, float cap) {                          \
        cross_entropy_bwd<T>(logits, targets, weights, grad, dlogits, cols, cap);              \
    }                                                                                          \
    extern "C" __global__ void NAME##_grad_inplace(T *logits, const uint32_t *targets,        \
                                                   const float *weights, float *loss,          \
                                                   uint32_t cols, float grad, float cap) {     \
        cross_entropy_grad_inplace<T>(logits, targets, weights, loss, cols, grad, cap);        \
    }

CROSS_ENTROPY(float, cross_entropy_f32)
CROSS_ENTROPY(__nv_bfloat16, cross_entropy_bf16)
CROSS_ENTROPY(__half, cross_entropy_f16)
