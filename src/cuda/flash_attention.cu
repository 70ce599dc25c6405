// Flash attention for training: softmax(scale · q·kᵀ + causal mask)·v without a score matrix in
// memory, forward and backward, on tensor cores (WMMA, bf16 in, f32 accumulate).
//
// Shapes: q, o, dO [B, H, T, D]; k, v, dK, dV [B, KV, Tk, D], each key/value head serving
// n_rep = H / KV query heads (head h reads key/value head h / n_rep). With `causal`, query i sees
// keys j <= i + offset (offset = Tk - T: queries are the last T positions).
//
// Forward (one block = 64 queries of one head, 4 warps of 16 rows): for each tile of 64 keys,
// S = Q·Kᵀ on tensor cores into shared memory, an online softmax per row (running max m and sum
// l, in base 2), O = O·α + P·V. Writes O and lse = m + log2(l) (base 2) per row.
//
// Backward (one block = 64 keys of one key/value head, 4 warps of 16 keys), over the n_rep query
// heads and every query tile that can see the keys: Sᵀ = K·Qᵀ, Pᵀ = exp2(scale·log2e·Sᵀ − lse),
// dPᵀ = V·dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − Δ) with Δ = rowsum(dO ⊙ O); dV += Pᵀ·dO and dK += dSᵀ·Q stay in
// registers for the whole loop; dQ += dS·K is added to an f32 buffer with atomics.
// Rows of shared tiles are padded (+8 bf16, +4 f32) against bank conflicts.

#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

using namespace nvcuda;
typedef __nv_bfloat16 bf16;

#define TILE 64
#define WARPS 4
#define LOG2E 1.4426950408889634f
#define S_LD (TILE + 4)  // f32 score rows
#define P_LD (TILE + 8)  // bf16 probability rows

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Acc;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> ARow;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> ACol;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> BRow;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> BCol;

// Rows [r0, r0 + TILE) of a [rows, D] bf16 matrix into shared memory (row stride D + 8), with
// zeros past the last row.
template <int D>
__device__ void load_tile(bf16* dst, const bf16* src, int r0, int rows) {
    const int LD = D + 8;
    for (int i = threadIdx.x; i < TILE * D / 8; i += blockDim.x) {
        int r = i / (D / 8), c = (i % (D / 8)) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < rows) v = *reinterpret_cast<const uint4*>(src + (size_t)(r0 + r) * D + c);
        *reinterpret_cast<uint4*>(dst + r * LD + c) = v;
    }
}

// out[16 x 16·nb] (f32, row stride out_ld) = A[16 x K] · B[K x 16·nb]: A row-major at `a`
// (stride a_ld), B given as Bᵀ rows (col-major) at `bt` (stride bt_ld).
template <int K>
__device__ void mm_abt(float* out, int out_ld, const bf16* a, int a_ld, const bf16* bt, int bt_ld,
                       int nb) {
    for (int n = 0; n < nb; ++n) {
        Acc acc;
        wmma::fill_fragment(acc, 0.f);
        for (int kk = 0; kk < K / 16; ++kk) {
            ARow fa;
            BCol fb;
            wmma::load_matrix_sync(fa, a + kk * 16, a_ld);
            wmma::load_matrix_sync(fb, bt + n * 16 * bt_ld + kk * 16, bt_ld);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(out + n * 16, acc, out_ld, wmma::mem_row_major);
    }
}

template <int D>
__device__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, bf16* __restrict__ o, float* __restrict__ lse,
                          int T, int Tk, int H, int n_rep, float scale, int causal, int offset) {
    const int LD = D + 8, O_LD = D + 4;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* Ks = Qs + TILE * LD;
    bf16* Vs = Ks + TILE * LD;
    bf16* Ps = Vs + TILE * LD;
    float* Ss = reinterpret_cast<float*>(Ps + TILE * P_LD);
    float* Os = Ss + TILE * S_LD;

    const int bh = blockIdx.y, b = bh / H, h = bh % H, KV = H / n_rep;
    const size_t kv_head = (size_t)b * KV + h / n_rep;
    const bf16* qp = q + (size_t)bh * T * D;
    const bf16* kp = k + kv_head * Tk * D;
    const bf16* vp = v + kv_head * Tk * D;
    const int q0 = blockIdx.x * TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // Each row of the warp's 16 is handled by two lanes, each holding every other column.
    const int row = warp * 16 + lane / 2, half = lane % 2, qi = q0 + row;

    load_tile<D>(Qs, qp, q0, T);
    for (int i = threadIdx.x; i < TILE * O_LD; i += blockDim.x) Os[i] = 0.f;
    float m = -INFINITY, l = 0.f;
    const float c = scale * LOG2E;

    int n_tiles = (Tk + TILE - 1) / TILE;
    if (causal) n_tiles = min(n_tiles, (q0 + TILE - 1 + offset) / TILE + 1);
    for (int j = 0; j < n_tiles; ++j) {
        const int k0 = j * TILE;
        __syncthreads();
        load_tile<D>(Ks, kp, k0, Tk);
        load_tile<D>(Vs, vp, k0, Tk);
        __syncthreads();
        mm_abt<D>(Ss + warp * 16 * S_LD, S_LD, Qs + warp * 16 * LD, LD, Ks, LD, TILE / 16);
        __syncwarp();

        float s[TILE / 2];
        float mx = -INFINITY;
#pragma unroll
        for (int t = 0; t < TILE / 2; ++t) {
            const int col = 2 * t + half, kj = k0 + col;
            const bool seen = kj < Tk && (!causal || kj <= qi + offset);
            s[t] = seen ? Ss[row * S_LD + col] * c : -INFINITY;
            mx = fmaxf(mx, s[t]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        const float m_new = fmaxf(m, mx);
        const float base = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m - base);
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < TILE / 2; ++t) {
            const float p = exp2f(s[t] - base);
            sum += p;
            Ps[row * P_LD + 2 * t + half] = __float2bfloat16(p);
        }
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        l = l * alpha + sum;
        m = m_new;
        for (int col = half; col < D; col += 2) Os[row * O_LD + col] *= alpha;
        __syncwarp();

        // O += P·V for the warp's rows.
        for (int n = 0; n < D / 16; ++n) {
            Acc acc;
            float* out = Os + warp * 16 * O_LD + n * 16;
            wmma::load_matrix_sync(acc, out, O_LD, wmma::mem_row_major);
            for (int kk = 0; kk < TILE / 16; ++kk) {
                ARow fa;
                BRow fb;
                wmma::load_matrix_sync(fa, Ps + warp * 16 * P_LD + kk * 16, P_LD);
                wmma::load_matrix_sync(fb, Vs + kk * 16 * LD + n * 16, LD);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(out, acc, O_LD, wmma::mem_row_major);
        }
        __syncwarp();
    }
    if (qi < T) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
        bf16* orow = o + ((size_t)bh * T + qi) * D;
        for (int col = half; col < D; col += 2) orow[col] = __float2bfloat16(Os[row * O_LD + col] * inv);
        if (half == 0) lse[(size_t)bh * T + qi] = m + log2f(l);
    }
}

// Δ = rowsum(dO ⊙ O) per row of [rows, D]: one warp a row.
__device__ void row_dot(const bf16* __restrict__ a, const bf16* __restrict__ b, float* __restrict__ out,
                        int rows, int D) {
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;
    float s = 0.f;
    for (int c = lane; c < D; c += 32)
        s += __bfloat162float(a[(size_t)r * D + c]) * __bfloat162float(b[(size_t)r * D + c]);
    for (int w = 16; w > 0; w /= 2) s += __shfl_xor_sync(0xffffffff, s, w);
    if (lane == 0) out[r] = s;
}

template <int D>
__device__ void flash_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, const bf16* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta,
                          float* __restrict__ dq, bf16* __restrict__ dk, bf16* __restrict__ dv,
                          int T, int Tk, int H, int n_rep, float scale, int causal, int offset) {
    const int LD = D + 8;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + TILE * LD;
    bf16* Qs = Vs + TILE * LD;
    bf16* dOs = Qs + TILE * LD;
    bf16* PTs = dOs + TILE * LD;
    bf16* dSTs = PTs + TILE * P_LD;
    float* Ss = reinterpret_cast<float*>(dSTs + TILE * P_LD);
    float* scratch = Ss + TILE * S_LD;  // 16 x 16 per warp
    float* lse_s = scratch + WARPS * 256;
    float* delta_s = lse_s + TILE;

    const int KV = H / n_rep, bkv = blockIdx.y, b = bkv / KV, kvh = bkv % KV;
    const int k0 = blockIdx.x * TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = warp * 16 + lane / 2, half = lane % 2, key = k0 + row;
    const float c = scale * LOG2E;
    float* my_scratch = scratch + warp * 256;

    load_tile<D>(Ks, k + (size_t)bkv * Tk * D, k0, Tk);
    load_tile<D>(Vs, v + (size_t)bkv * Tk * D, k0, Tk);
    Acc dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
        wmma::fill_fragment(dk_acc[n], 0.f);
        wmma::fill_fragment(dv_acc[n], 0.f);
    }
    const int first_tile = causal ? max(0, k0 - offset) / TILE : 0;
    const int n_qtiles = (T + TILE - 1) / TILE;
    for (int r = 0; r < n_rep; ++r) {
        const size_t bh = (size_t)b * H + kvh * n_rep + r;
        const bf16* qp = q + bh * T * D;
        const bf16* dop = dout + bh * T * D;
        for (int i = first_tile; i < n_qtiles; ++i) {
            const int q0 = i * TILE;
            __syncthreads();
            load_tile<D>(Qs, qp, q0, T);
            load_tile<D>(dOs, dop, q0, T);
            for (int t = threadIdx.x; t < TILE; t += blockDim.x) {
                const bool in = q0 + t < T;
                lse_s[t] = in ? lse[bh * T + q0 + t] : INFINITY;
                delta_s[t] = in ? delta[bh * T + q0 + t] : 0.f;
            }
            __syncthreads();

            // Sᵀ = K·Qᵀ and Pᵀ for the warp's 16 keys.
            mm_abt<D>(Ss + warp * 16 * S_LD, S_LD, Ks + warp * 16 * LD, LD, Qs, LD, TILE / 16);
            __syncwarp();
            float p[TILE / 2];
#pragma unroll
            for (int t = 0; t < TILE / 2; ++t) {
                const int col = 2 * t + half, qj = q0 + col;
                const bool seen = qj < T && key < Tk && (!causal || key <= qj + offset);
                p[t] = seen ? exp2f(Ss[row * S_LD + col] * c - lse_s[col]) : 0.f;
                PTs[row * P_LD + col] = __float2bfloat16(p[t]);
            }
            __syncwarp();
            // dPᵀ = V·dOᵀ, then dSᵀ = Pᵀ ⊙ (dPᵀ − Δ).
            mm_abt<D>(Ss + warp * 16 * S_LD, S_LD, Vs + warp * 16 * LD, LD, dOs, LD, TILE / 16);
            __syncwarp();
#pragma unroll
            for (int t = 0; t < TILE / 2; ++t) {
                const int col = 2 * t + half;
                dSTs[row * P_LD + col] = __float2bfloat16(p[t] * (Ss[row * S_LD + col] - delta_s[col]));
            }
            __syncwarp();
            // dV += Pᵀ·dO and dK += dSᵀ·Q for the warp's keys.
#pragma unroll
            for (int n = 0; n < D / 16; ++n) {
                for (int kk = 0; kk < TILE / 16; ++kk) {
                    ARow fa;
                    BRow fb;
                    wmma::load_matrix_sync(fa, PTs + warp * 16 * P_LD + kk * 16, P_LD);
                    wmma::load_matrix_sync(fb, dOs + kk * 16 * LD + n * 16, LD);
                    wmma::mma_sync(dv_acc[n], fa, fb, dv_acc[n]);
                    wmma::load_matrix_sync(fa, dSTs + warp * 16 * P_LD + kk * 16, P_LD);
                    wmma::load_matrix_sync(fb, Qs + kk * 16 * LD + n * 16, LD);
                    wmma::mma_sync(dk_acc[n], fa, fb, dk_acc[n]);
                }
            }
            __syncthreads();
            // dQ (the warp's 16 queries) += dS·K over the tile's 64 keys, dS = (dSᵀ)ᵀ.
            for (int n = 0; n < D / 16; ++n) {
                Acc acc;
                wmma::fill_fragment(acc, 0.f);
                for (int kk = 0; kk < TILE / 16; ++kk) {
                    ACol fa;
                    BRow fb;
                    wmma::load_matrix_sync(fa, dSTs + kk * 16 * P_LD + warp * 16, P_LD);
                    wmma::load_matrix_sync(fb, Ks + kk * 16 * LD + n * 16, LD);
                    wmma::mma_sync(acc, fa, fb, acc);
                }
                wmma::store_matrix_sync(my_scratch, acc, 16, wmma::mem_row_major);
                __syncwarp();
                for (int e = lane; e < 256; e += 32) {
                    const int qg = q0 + warp * 16 + e / 16;
                    if (qg < T) atomicAdd(dq + (bh * T + qg) * D + n * 16 + e % 16, my_scratch[e] * scale);
                }
                __syncwarp();
            }
        }
    }
    // dK (scaled) and dV of the warp's keys.
    for (int n = 0; n < D / 16; ++n) {
        for (int which = 0; which < 2; ++which) {
            wmma::store_matrix_sync(my_scratch, which ? dv_acc[n] : dk_acc[n], 16, wmma::mem_row_major);
            __syncwarp();
            bf16* dst = which ? dv : dk;
            const float f = which ? 1.f : scale;
            for (int e = lane; e < 256; e += 32) {
                const int kg = k0 + warp * 16 + e / 16;
                if (kg < Tk) dst[((size_t)bkv * Tk + kg) * D + n * 16 + e % 16] = __float2bfloat16(my_scratch[e] * f);
            }
            __syncwarp();
        }
    }
}

#define FLASH(D)                                                                                  \
    extern "C" __global__ void flash_fwd_d##D(const bf16* q, const bf16* k, const bf16* v, bf16* o,   \
                                              float* lse, int T, int Tk, int H, int n_rep,          \
                                              float scale, int causal, int offset) {                \
        flash_fwd<D>(q, k, v, o, lse, T, Tk, H, n_rep, scale, causal, offset);                     \
    }                                                                                             \
    extern "C" __global__ void flash_bwd_d##D(const bf16* q, const bf16* k, const bf16* v,          \
                                              const bf16* dout, const float* lse,                   \
                                              const float* delta, float* dq, bf16* dk, bf16* dv,    \
                                              int T, int Tk, int H, int n_rep, float scale,         \
                                              int causal, int offset) {                             \
        flash_bwd<D>(q, k, v, dout, lse, delta, dq, dk, dv, T, Tk, H, n_rep, scale, causal, offset); \
    }

FLASH(64)
FLASH(128)

extern "C" __global__ void flash_row_dot(const bf16* a, const bf16* b, float* out, int rows, int D) {
    row_dot(a, b, out, rows, D);
}
