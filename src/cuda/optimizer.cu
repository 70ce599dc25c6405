// The optimizer step over every LoRA tensor at once (f32 master weights, gradients and
// moments), each kernel one launch for all tensors: a table of device pointers and lengths,
// blockIdx.y picks the tensor and the x blocks stride over it.
// - sum_squares: the squared L2 norm of all gradients (for clipping), summed into one double;
// - adamw: torch.optim.AdamW's update, gradients scaled first by the clipping factor.

#include "common.cuh"

// Σ g² over every tensor of the table, added to `out` (zeroed by the caller).
extern "C" __global__ void sum_squares_f32(const uint64_t *grads, const uint64_t *lens, double *out) {
    __shared__ float shared[32];
    const float *g = reinterpret_cast<const float *>(grads[blockIdx.y]);
    const uint64_t n = lens[blockIdx.y];
    float acc = 0.0f;
    for (uint64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        float v = g[i];
        acc += v * v;
    }
    acc = block_reduce(acc, false, shared);
    if (threadIdx.x == 0 && acc != 0.0f) atomicAdd(out, (double)acc);
}

// One AdamW step in place, as torch computes it (decoupled weight decay):
//   g ← s·g;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
//   p ← p·(1 − lr·wd) − (lr / bias1) · m / (√v / √bias2 + eps)
// (the constants multiplied in the order kiln's candle ops apply them on the CPU).
struct AdamWArgs {
    float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, inv_bias2_sqrt, grad_scale;
};

extern "C" __global__ void adamw_f32(const uint64_t *params, const uint64_t *grads, const uint64_t *first,
                                     const uint64_t *second, const uint64_t *lens, AdamWArgs a) {
    float *p = reinterpret_cast<float *>(params[blockIdx.y]);
    const float *g = reinterpret_cast<const float *>(grads[blockIdx.y]);
    float *m = reinterpret_cast<float *>(first[blockIdx.y]);
    float *v = reinterpret_cast<float *>(second[blockIdx.y]);
    const uint64_t n = lens[blockIdx.y];
    for (uint64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const float gi = g[i] * a.grad_scale;
        const float mi = m[i] * a.beta1 + gi * a.one_minus_beta1;
        const float vi = v[i] * a.beta2 + (gi * gi) * a.one_minus_beta2;
        const float denom = sqrtf(vi) * a.inv_bias2_sqrt + a.eps;
        p[i] = p[i] * a.decay - (mi / denom) * a.step_size;
        m[i] = mi;
        v[i] = vi;
    }
}
