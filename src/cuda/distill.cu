// Distillation's loss and its gradient over one chunk of rows, in one kernel (src/ops/distill.rs
// has the math and the reference path). Per row, with z the student's logits (soft cap applied),
// y the teacher's (its own cap applied; or log-probabilities, the same distribution), T the
// temperature and the first `shared` ids both models have:
//   log q = log_softmax(z[:shared] / T), log p = log_softmax(y[:shared] / T)
//   D     = KL(p || q), KL(q || p) or Jensen-Shannon
//   CE    = logsumexp(z) - z[t]
//   dz    = w * grad * [(1 - alpha) * (softmax(z) - onehot(t)) + alpha * T^2 * dD/dz] * cap'(z)
// where dD/dz is (q - p)/T, q (log q - log p - D)/T, or q (g - <q, g>)/T with g = (log q - log m)/2
// (m = (p + q)/2). The gradient is written over the student's logits; each row's w*D and w*CE
// go to `divergence` and `cross_entropy`. Three passes over the row: the three log-sum-exps, D,
// the gradient. One block of 1024 threads a row, f32 arithmetic.
#include "common.cuh"

// An online log-sum-exp over one thread's elements, then over the block.
struct OnlineLse {
    float m = -INFINITY, s = 0.0f;
    __device__ __forceinline__ void add(float c) {
        if (c > m) {
            s = s * __expf(m - c) + 1.0f;
            m = c;
        } else {
            s += __expf(c - m);
        }
    }
    __device__ __forceinline__ float block(float *shared) const {
        const float mx = block_reduce(m, true, shared);
        const float sum = block_reduce(m == -INFINITY ? 0.0f : s * __expf(m - mx), false, shared);
        return mx + logf(sum);
    }
};

enum Divergence : uint32_t { FORWARD_KL = 0, REVERSE_KL = 1, JSD = 2 };

// log((p + q) / 2) from log p and log q: finite where both underflow.
__device__ __forceinline__ float log_mean(float lp, float lq) {
    return fmaxf(lp, lq) + log1pf(__expf(-fabsf(lp - lq))) - 0.69314718f;
}

template <typename S, typename U>
__device__ void distill_grad_inplace(S *student, const U *teacher, const uint32_t *targets,
                                     const float *weights, float *divergence, float *cross_entropy,
                                     uint32_t cols, uint32_t teacher_cols, uint32_t shared_cols,
                                     float temperature, float alpha, float grad, float cap,
                                     float teacher_cap, uint32_t kind) {
    __shared__ float shared[32];
    const uint64_t row = blockIdx.x;
    S *z = student + row * cols;
    const U *y = teacher + row * teacher_cols;
    const float w = weights[row];
    if (w == 0.0f) {
        for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) z[j] = from_f32<S>(0.0f);
        if (threadIdx.x == 0) divergence[row] = cross_entropy[row] = 0.0f;
        return;
    }
    const float inv_t = 1.0f / temperature;

    // Pass 1: the student's log-sum-exp at 1 (all ids) and at T (shared ids), the teacher's at T.
    OnlineLse all, student_t, teacher_t;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
        const float c = capped(to_f32(z[j]), cap);
        all.add(c);
        if (j < shared_cols) {
            student_t.add(c * inv_t);
            teacher_t.add(capped(to_f32(y[j]), teacher_cap) * inv_t);
        }
    }
    const float lse = all.block(shared);
    const float lse_q = student_t.block(shared);
    const float lse_p = teacher_t.block(shared);
    const auto log_q = [&](uint32_t j) { return capped(to_f32(z[j]), cap) * inv_t - lse_q; };
    const auto log_p = [&](uint32_t j) { return capped(to_f32(y[j]), teacher_cap) * inv_t - lse_p; };

    // Pass 2: D (and for Jensen-Shannon <q, g>). The target's logit is read before pass 3
    // overwrites it (the reductions below synchronize the block).
    const uint32_t t = targets[row];
    const float target_logit = capped(to_f32(z[t]), cap);
    float d = 0.0f, qg = 0.0f;
    for (uint32_t j = threadIdx.x; j < shared_cols; j += blockDim.x) {
        const float lq = log_q(j), lp = log_p(j);
        if (kind == FORWARD_KL) {
            d += __expf(lp) * (lp - lq);
        } else if (kind == REVERSE_KL) {
            d += __expf(lq) * (lq - lp);
        } else {
            const float lm = log_mean(lp, lq);
            d += 0.5f * (__expf(lp) * (lp - lm) + __expf(lq) * (lq - lm));
            qg += __expf(lq) * 0.5f * (lq - lm);
        }
    }
    d = block_reduce(d, false, shared);
    if (kind == JSD) qg = block_reduce(qg, false, shared);
    if (threadIdx.x == 0) {
        divergence[row] = w * d;
        cross_entropy[row] = w * (lse - target_logit);
    }

    // Pass 3: the gradient, over the logits.
    const float scale = w * grad, ce_part = 1.0f - alpha, d_part = alpha * temperature;  // T^2 / T
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
        const float c = capped(to_f32(z[j]), cap);
        float g = ce_part * (__expf(c - lse) - (j == t ? 1.0f : 0.0f));
        if (j < shared_cols) {
            const float lq = c * inv_t - lse_q, lp = log_p(j), q = __expf(lq);
            float dd;
            if (kind == FORWARD_KL) {
                dd = q - __expf(lp);
            } else if (kind == REVERSE_KL) {
                dd = q * (lq - lp - d);
            } else {
                dd = q * (0.5f * (lq - log_mean(lp, lq)) - qg);
            }
            g += d_part * dd;
        }
        g *= scale;
        if (cap > 0.0f) g *= 1.0f - (c / cap) * (c / cap);
        z[j] = from_f32<S>(g);
    }
}

#define DISTILL(S, U, NAME)                                                                    \
    extern "C" __global__ void NAME(S *student, const U *teacher, const uint32_t *targets,     \
                                    const float *weights, float *divergence,                   \
                                    float *cross_entropy, uint32_t cols, uint32_t teacher_cols, \
                                    uint32_t shared_cols, float temperature, float alpha,      \
                                    float grad, float cap, float teacher_cap, uint32_t kind) {  \
        distill_grad_inplace<S, U>(student, teacher, targets, weights, divergence,             \
                                   cross_entropy, cols, teacher_cols, shared_cols,             \
                                   temperature, alpha, grad, cap, teacher_cap, kind);          \
    }

// The teacher's rows in the student's dtype (live logits) or in f32 (a cache's log-probabilities).
DISTILL(float, float, distill_grad_inplace_f32_f32)
DISTILL(__nv_bfloat16, __nv_bfloat16, distill_grad_inplace_bf16_bf16)
DISTILL(__nv_bfloat16, float, distill_grad_inplace_bf16_f32)
DISTILL(__half, __half, distill_grad_inplace_f16_f16)
DISTILL(__half, float, distill_grad_inplace_f16_f32)
