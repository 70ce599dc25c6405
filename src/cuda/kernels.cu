// kiln's own CUDA kernels, compiled to PTX by build.rs (feature `cuda`) and loaded through
// candle's CUDA device. Each kernel computes exactly what the CPU path in Rust computes, with
// the same f32 operations in the same order (no FMA contraction where the CPU rounds twice),
// so the CPU and GPU produce identical NF4 bytes, dequantized weights and dropout masks.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// ---------------------------------------------------------------------------------------------
// Conversions to and from the stored / compute dtypes.

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// ---------------------------------------------------------------------------------------------
// NF4 dequantization: out[i] = code[q_i] * scale[i / blocksize], where the block scale is either
// stored (absmax_plain) or double-quantized:
//     scale[b] = nested_code[absmax_codes[b]] * nested_absmax[b / nested_blocksize] + offset.
// One thread per packed byte (two values, the even one in the high nibble).

template <typename T>
__device__ void nf4_dequant(const uint8_t *packed, const float *absmax_plain,
                            const uint8_t *absmax_codes, const float *nested_absmax,
                            const float *nested_code, float offset, const float *code, T *out,
                            uint64_t n, uint32_t blocksize, uint32_t nested_blocksize) {
    __shared__ float code_s[16];
    if (threadIdx.x < 16) code_s[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    uint64_t byte = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint64_t i = byte * 2;
    if (i >= n) return;
    uint64_t b = i / blocksize;
    float scale;
    if (absmax_plain != nullptr) {
        scale = absmax_plain[b];
    } else {
        scale = __fadd_rn(__fmul_rn(nested_code[absmax_codes[b]], nested_absmax[b / nested_blocksize]),
                          offset);
    }
    uint8_t p = packed[byte];
    out[i] = from_f32<T>(__fmul_rn(code_s[p >> 4], scale));
    if (i + 1 < n) {
        // blocksize is even, so both values of a byte share a block.
        out[i + 1] = from_f32<T>(__fmul_rn(code_s[p & 15], scale));
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
// Dropout from a counter-based hash: element i of the stream `seed` is kept when its 24-bit
// uniform draw is at least p, and then scaled by 1/(1-p). The same function in Rust
// (`crate::ops::dropout_keep`) gives the CPU the same masks. The backward pass applies the same
// mask to the gradient, so no mask is ever stored.

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

template <typename T>
__device__ void dropout(const T *x, T *out, uint64_t n, uint64_t seed, float p, float scale) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint64_t h = splitmix64(seed + (i + 1) * 0x9e3779b97f4a7c15ULL);
    float u = (float)(h >> 40) * (1.0f / 16777216.0f);
    out[i] = (u >= p) ? from_f32<T>(__fmul_rn(to_f32(x[i]), scale)) : from_f32<T>(0.0f);
}

#define DROPOUT(T, NAME)                                                                       \
    extern "C" __global__ void NAME(const T *x, T *out, uint64_t n, uint64_t seed, float p,   \
                                    float scale) {                                             \
        dropout<T>(x, out, n, seed, p, scale);                                                 \
    }

DROPOUT(float, dropout_f32)
DROPOUT(__nv_bfloat16, dropout_bf16)
DROPOUT(__half, dropout_f16)

// ---------------------------------------------------------------------------------------------
// Attention softmax, fused: probs = softmax(scale * scores + mask) over the last dimension, in f32
// arithmetic, for scores [rows, cols] (rows = batch * heads * queries). The additive mask is
// [mask_batches, queries, cols]; row r of batch b = r / (heads * queries) uses mask row
// (b % mask_batches) * queries + r % queries. One block of 256 threads per row.

__device__ __forceinline__ float block_reduce(float v, bool is_max, float *shared) {
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x / 32;
    v = (lane < warps) ? shared[lane] : (is_max ? -INFINITY : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    __syncthreads();
    return v;
}

template <typename T>
__device__ void masked_softmax(const T *scores, const T *mask, T *probs, uint32_t cols,
                               uint32_t queries, uint32_t heads, uint32_t mask_batches,
                               float scale) {
    __shared__ float shared[32];
    uint64_t row = blockIdx.x;
    const T *x = scores + row * cols;
    T *y = probs + row * cols;
    const T *m = nullptr;
    if (mask != nullptr) {
        uint64_t b = row / ((uint64_t)heads * queries);
        uint64_t q = row % queries;
        m = mask + ((b % mask_batches) * queries + q) * cols;
    }
    float mx = -INFINITY;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
        float v = to_f32(x[j]) * scale + (m ? to_f32(m[j]) : 0.0f);
        mx = fmaxf(mx, v);
    }
    mx = block_reduce(mx, true, shared);
    float sum = 0.0f;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
        float v = to_f32(x[j]) * scale + (m ? to_f32(m[j]) : 0.0f);
        sum += (mx == -INFINITY) ? 0.0f : __expf(v - mx);
    }
    sum = block_reduce(sum, false, shared);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
        float v = to_f32(x[j]) * scale + (m ? to_f32(m[j]) : 0.0f);
        y[j] = from_f32<T>((mx == -INFINITY) ? 0.0f : __expf(v - mx) * inv);
    }
}

// The backward pass: dscores = scale * p * (dp - sum_j dp_j p_j), per row.
template <typename T>
__device__ void masked_softmax_bwd(const T *probs, const T *dprobs, T *dscores, uint32_t cols,
                                   float scale) {
    __shared__ float shared[32];
    uint64_t row = blockIdx.x;
    const T *p = probs + row * cols;
    const T *dp = dprobs + row * cols;
    T *ds = dscores + row * cols;
    float dot = 0.0f;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) dot += to_f32(p[j]) * to_f32(dp[j]);
    dot = block_reduce(dot, false, shared);
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
        ds[j] = from_f32<T>(scale * to_f32(p[j]) * (to_f32(dp[j]) - dot));
    }
}

#define MASKED_SOFTMAX(T, NAME)                                                                \
    extern "C" __global__ void NAME(const T *scores, const T *mask, T *probs, uint32_t cols,  \
                                    uint32_t queries, uint32_t heads, uint32_t mask_batches,   \
                                    float scale) {                                             \
        masked_softmax<T>(scores, mask, probs, cols, queries, heads, mask_batches, scale);      \
    }                                                                                          \
    extern "C" __global__ void NAME##_bwd(const T *probs, const T *dprobs, T *dscores,        \
                                          uint32_t cols, float scale) {                        \
        masked_softmax_bwd<T>(probs, dprobs, dscores, cols, scale);                            \
    }

MASKED_SOFTMAX(float, masked_softmax_f32)
MASKED_SOFTMAX(__nv_bfloat16, masked_softmax_bf16)
MASKED_SOFTMAX(__half, masked_softmax_f16)
