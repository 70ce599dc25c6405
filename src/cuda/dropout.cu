// Hashed dropout, compiled to PTX by build.rs and launched from src/cuda/mod.rs; the CPU path
// (`ops/dropout.rs`) computes the same masks.

#include "common.cuh"

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
