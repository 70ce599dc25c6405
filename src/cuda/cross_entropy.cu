// Cross-entropy over rows of logits, with the soft cap, forward, backward, and both at once in
// place; compiled to PTX by build.rs and launched from src/cuda/mod.rs.

#include "common.cuh"

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
