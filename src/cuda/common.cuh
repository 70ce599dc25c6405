// Helpers shared by kiln's CUDA kernel files: dtype conversions and a block-wide reduction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

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

// A final soft cap, `cap * tanh(z / cap)`, or `z` where `cap` is 0.
__device__ __forceinline__ float capped(float z, float cap) {
    return cap > 0.0f ? cap * tanhf(z / cap) : z;
}

// 16 bytes of elements, loaded and stored as one vector.
template <typename T>
struct __align__(16) Pack {
    T v[16 / sizeof(T)];
};

__device__ __forceinline__ bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The sum (or max) of `v` over the block; `shared` holds a float per warp.
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


// Dropout's mask, as the dropout kernels (kernels.cu) and the CPU (`ops::dropout_keep`) draw it:
// element i of a contiguous tensor belongs to group i / 4, whose 64-bit hash gives each of its
// four elements 16 bits of a uniform; the element is kept where that uniform is >= p.
__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

__device__ __forceinline__ uint64_t dropout_hash(uint64_t seed, uint64_t group) {
    return splitmix64(seed + (group + 1) * 0x9e3779b97f4a7c15ULL);
}

__device__ __forceinline__ bool dropout_keep(uint64_t hash, int j, float p) {
    return (float)((hash >> (16 * j)) & 0xffff) * (1.0f / 65536.0f) >= p;
}
