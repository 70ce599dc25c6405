// NF4 dequantization and quantization (bitsandbytes' kDequantizeBlockwise and
// kQuantizeBlockwise), compiled to PTX by build.rs and launched from src/cuda/mod.rs. Each kernel
// computes exactly what the CPU path in Rust computes, with the same f32 operations in the same
// order (no FMA contraction where the CPU rounds twice), so the CPU and GPU produce identical NF4
// bytes and dequantized weights.

#include "common.cuh"

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
