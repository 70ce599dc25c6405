// LoRA's low-rank path with its dropout, fused, for up to three adapters of rank 16 that share
// one input x [rows, K] (q, k and v; or one projection), bf16, f32 accumulation on tensor cores:
//
//   down:    h_p  = drop_p(x)·A_pᵀ                 [rows, 16]   bf16
//   grad_a:  dA_p += dh_pᵀ·drop_p(x)               [16, K]      f32 (the LoRA gradient store)
//   up_add:  dx  += Σ_p drop_p(dh_p·A_p)           [rows, K]    bf16, in place
//
// drop_p is the dropout kernel's mask for seed_p (common.cuh), with kept values rounded to bf16
// after scaling as the dropout kernel rounds them, so `down` and `grad_a` multiply exactly the
// operands of kiln's unfused path (dropout, then cuBLAS); only the summation order differs. No
// dropped copy of x is ever written to memory: x is read once for all adapters.
//
// A warp works on 16 rows of x at a time: it loads them 64 columns at a time (16-byte loads),
// writes one masked copy per adapter to its own shared tile, and feeds ldmatrix/mma from there.

#include "common.cuh"
#include "mma.cuh"

#define R 16           // the rank
#define KC 64          // columns of x a warp stages at a time
#define XLD (KC + 8)   // its shared rows, padded so ldmatrix's rows fall in different banks
#define WARPS 4

struct Adapters {
    const bf16* a[3];      // A_p [16, K]
    unsigned long long seed[3];
};

// Rows [r0, r0 + 16), columns [k0, k0 + 64) of x into `tiles` (one 16 x XLD tile an adapter),
// dropped and scaled with each adapter's mask; rows past `rows` are zeros.
__device__ __forceinline__ void stage_dropped(bf16* tiles, const bf16* __restrict__ x, int rows, int K, int r0,
                                              int k0, int n, const Adapters& ad, float p, float scale,
                                              int lane) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int idx = lane + 32 * i, r = idx / 8, c = (idx % 8) * 8;
        const int row = r0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row < rows) v = *reinterpret_cast<const uint4*>(x + (size_t)row * K + k0 + c);
        const bf16* xv = reinterpret_cast<const bf16*>(&v);
        const uint64_t group = ((uint64_t)row * K + k0 + c) / 4;
        for (int q = 0; q < n; ++q) {
            const uint64_t h0 = dropout_hash(ad.seed[q], group), h1 = dropout_hash(ad.seed[q], group + 1);
            uint4 out;
            bf16* o = reinterpret_cast<bf16*>(&out);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const bool keep = dropout_keep(e < 4 ? h0 : h1, e % 4, p);
                o[e] = __float2bfloat16_rn(keep ? __fmul_rn(__bfloat162float(xv[e]), scale) : 0.0f);
            }
            *reinterpret_cast<uint4*>(tiles + q * 16 * XLD + r * XLD + c) = out;
        }
    }
}

// down: block = WARPS warps on the same 16 rows, warp w taking the column chunks ≡ w (mod WARPS);
// their partial sums meet in shared memory.
extern "C" __global__ void __launch_bounds__(32 * WARPS) lora_down_r16(const bf16* __restrict__ x, Adapters ad,
                                                                      bf16* h0, bf16* h1, bf16* h2, int rows,
                                                                      int K, int n, float p, float scale) {
    __shared__ __align__(16) bf16 tiles[WARPS][3 * 16 * XLD];
    __shared__ float partial[WARPS][3][16][R];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = blockIdx.x * 16;
    float acc[3][R / 8][4] = {};
    bf16* mine = tiles[warp];
    for (int k0 = warp * KC; k0 < K; k0 += WARPS * KC) {
        __syncwarp();
        stage_dropped(mine, x, rows, K, r0, k0, n, ad, p, scale, lane);
        __syncwarp();
#pragma unroll
        for (int kk = 0; kk < KC / 16; ++kk) {
#pragma unroll
            for (int q = 0; q < 3; ++q) {
                if (q >= n) break;
                uint32_t af[4];
                load_a(af, mine + q * 16 * XLD + kk * 16, XLD, lane);
                // B = A_qᵀ: column j of B is row j of A_q; the lane's two k pairs of row l/4.
                const bf16* arow = ad.a[q] + (size_t)(lane / 4) * K + k0 + kk * 16 + 2 * (lane % 4);
#pragma unroll
                for (int nt = 0; nt < R / 8; ++nt) {
                    const bf16* b = arow + (size_t)nt * 8 * K;
                    mma(acc[q][nt], af, __ldg(reinterpret_cast<const uint32_t*>(b)),
                        __ldg(reinterpret_cast<const uint32_t*>(b + 8)));
                }
            }
        }
    }
#pragma unroll
    for (int q = 0; q < 3; ++q)
#pragma unroll
        for (int nt = 0; nt < R / 8; ++nt) {
            if (q >= n) break;
            const int c = nt * 8 + 2 * (lane % 4), r = lane / 4;
            partial[warp][q][r][c] = acc[q][nt][0];
            partial[warp][q][r][c + 1] = acc[q][nt][1];
            partial[warp][q][r + 8][c] = acc[q][nt][2];
            partial[warp][q][r + 8][c + 1] = acc[q][nt][3];
        }
    __syncthreads();
    bf16* outs[3] = {h0, h1, h2};
    for (int i = threadIdx.x; i < n * 16 * R; i += blockDim.x) {
        const int q = i / (16 * R), r = (i / R) % 16, c = i % R;
        if (r0 + r >= rows) continue;
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) s += partial[w][q][r][c];
        outs[q][(size_t)(r0 + r) * R + c] = __float2bfloat16_rn(s);
    }
}

// grad_a: block = one 64-column chunk of x and a share of the rows (blockIdx.y of gridDim.y);
// warp w takes the 16-row tiles ≡ w (mod WARPS) of that share. dA_q's partial [16, 64] meets in
// shared memory, then is added to the gradient store with vector atomics.
extern "C" __global__ void __launch_bounds__(32 * WARPS) lora_grad_a_r16(const bf16* __restrict__ x, Adapters ad,
                                                                        const bf16* dh0, const bf16* dh1,
                                                                        const bf16* dh2, float* da0, float* da1,
                                                                        float* da2, int rows, int K, int n,
                                                                        float p, float scale) {
    __shared__ __align__(16) bf16 tiles[WARPS][3 * 16 * XLD];
    __shared__ __align__(16) bf16 dh_s[WARPS][3][16 * (R + 8)];
    static_assert(sizeof(tiles) >= 3 * R * KC * sizeof(float), "the sums fit in the staging tiles");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, k0 = blockIdx.x * KC;
    const bf16* dhs[3] = {dh0, dh1, dh2};
    float acc[3][KC / 8][4] = {};
    const int tiles_total = (rows + 15) / 16;
    const int per_block = (tiles_total + gridDim.y - 1) / gridDim.y;
    const int t_begin = blockIdx.y * per_block, t_end = min(tiles_total, t_begin + per_block);
    bf16* mine = tiles[warp];
    for (int t = t_begin + warp; t < t_end; t += WARPS) {
        const int r0 = t * 16;
        __syncwarp();
        stage_dropped(mine, x, rows, K, r0, k0, n, ad, p, scale, lane);
        // dh_q rows [r0, r0 + 16): 16 x 16 bf16, one 16-byte piece a lane.
        for (int q = 0; q < n; ++q) {
            const int r = lane / 2, c = (lane % 2) * 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (r0 + r < rows) v = *reinterpret_cast<const uint4*>(dhs[q] + (size_t)(r0 + r) * R + c);
            *reinterpret_cast<uint4*>(&dh_s[warp][q][r * (R + 8) + c]) = v;
        }
        __syncwarp();
#pragma unroll
        for (int q = 0; q < 3; ++q) {
            if (q >= n) break;
            // A = dh_qᵀ (16 ranks x 16 rows), from dh_q stored by rows.
            uint32_t af[4];
            load_a_trans(af, dh_s[warp][q], R + 8, lane);
#pragma unroll
            for (int nt = 0; nt < KC / 16; ++nt) {
                uint32_t bf[4];
                load_b_rows_k(bf, mine + q * 16 * XLD + nt * 16, XLD, lane);
                mma(acc[q][2 * nt], af, bf[0], bf[1]);
                mma(acc[q][2 * nt + 1], af, bf[2], bf[3]);
            }
        }
    }
    // The staging tiles are free now: they hold the block's sums.
    __syncthreads();
    float (*sum)[R][KC] = reinterpret_cast<float (*)[R][KC]>(&tiles[0][0]);
    for (int i = threadIdx.x; i < 3 * R * KC; i += blockDim.x) (&sum[0][0][0])[i] = 0.f;
    __syncthreads();
#pragma unroll
    for (int q = 0; q < 3; ++q)
#pragma unroll
        for (int nt = 0; nt < KC / 8; ++nt) {
            if (q >= n) break;
            const int c = nt * 8 + 2 * (lane % 4), r = lane / 4;
            atomicAdd(&sum[q][r][c], acc[q][nt][0]);
            atomicAdd(&sum[q][r][c + 1], acc[q][nt][1]);
            atomicAdd(&sum[q][r + 8][c], acc[q][nt][2]);
            atomicAdd(&sum[q][r + 8][c + 1], acc[q][nt][3]);
        }
    __syncthreads();
    float* das[3] = {da0, da1, da2};
    for (int i = threadIdx.x; i < n * R * KC / 2; i += blockDim.x) {
        const int q = i / (R * KC / 2), r = (i / (KC / 2)) % R, c = 2 * (i % (KC / 2));
        if (k0 + c >= K) continue;
        float* dst = das[q] + (size_t)r * K + k0 + c;
#if __CUDA_ARCH__ >= 900
        atomicAdd(reinterpret_cast<float2*>(dst), make_float2(sum[q][r][c], sum[q][r][c + 1]));
#else
        atomicAdd(dst, sum[q][r][c]);
        atomicAdd(dst + 1, sum[q][r][c + 1]);
#endif
    }
}

// up_add: block = WARPS warps of 16 rows each, one 64-column chunk; each adapter's product
// dh_q·A_q for the warp's 16 x 64 comes out of the tensor cores, is masked and scaled, summed
// over the adapters and added to dx.
extern "C" __global__ void __launch_bounds__(32 * WARPS) lora_up_add_r16(bf16* dx, Adapters ad, const bf16* dh0,
                                                                        const bf16* dh1, const bf16* dh2,
                                                                        int rows, int K, int n, float p,
                                                                        float scale) {
    __shared__ __align__(16) bf16 a_s[3][R * XLD];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, k0 = blockIdx.x * KC;
    const int r0 = (blockIdx.y * WARPS + warp) * 16;
    const bf16* dhs[3] = {dh0, dh1, dh2};
    // A_q[:, k0:k0+64] for every adapter: 16 rows of 64, 16 bytes a thread.
    for (int i = threadIdx.x; i < n * R * KC / 8; i += blockDim.x) {
        const int q = i / (R * KC / 8), r = (i / (KC / 8)) % R, c = (i % (KC / 8)) * 8;
        *reinterpret_cast<uint4*>(&a_s[q][r * XLD + c]) =
            *reinterpret_cast<const uint4*>(ad.a[q] + (size_t)r * K + k0 + c);
    }
    __syncthreads();
    if (r0 >= rows) return;
    float acc[3][KC / 8][4] = {};
#pragma unroll
    for (int q = 0; q < 3; ++q) {
        if (q >= n) break;
        // A = dh_q rows [r0, r0 + 16) (16 x 16), the lane's pairs straight from memory.
        const int ra = r0 + lane / 4, rb = ra + 8, c = 2 * (lane % 4);
        const uint32_t* pa = reinterpret_cast<const uint32_t*>(dhs[q] + (size_t)ra * R + c);
        const uint32_t* pb = reinterpret_cast<const uint32_t*>(dhs[q] + (size_t)rb * R + c);
        const bool in_a = ra < rows, in_b = rb < rows;
        const uint32_t af[4] = {in_a ? pa[0] : 0u, in_b ? pb[0] : 0u, in_a ? pa[4] : 0u, in_b ? pb[4] : 0u};
#pragma unroll
        for (int nt = 0; nt < KC / 16; ++nt) {
            uint32_t bf[4];
            load_b_rows_k(bf, a_s[q] + nt * 16, XLD, lane);
            mma(acc[q][2 * nt], af, bf[0], bf[1]);
            mma(acc[q][2 * nt + 1], af, bf[2], bf[3]);
        }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = r0 + lane / 4 + 8 * half;
        if (row >= rows) continue;
#pragma unroll
        for (int nt = 0; nt < KC / 8; ++nt) {
            const int col = k0 + nt * 8 + 2 * (lane % 4);
            const uint64_t flat = (uint64_t)row * K + col;
            float v0 = 0.f, v1 = 0.f;
#pragma unroll
            for (int q = 0; q < 3; ++q) {
                if (q >= n) break;
                const uint64_t hsh = dropout_hash(ad.seed[q], flat / 4);
                const int j = flat % 4;
                if (dropout_keep(hsh, j, p)) v0 += acc[q][nt][2 * half] * scale;
                if (dropout_keep(hsh, j + 1, p)) v1 += acc[q][nt][2 * half + 1] * scale;
            }
            __nv_bfloat162* at = reinterpret_cast<__nv_bfloat162*>(dx + flat);
            const float2 old = __bfloat1622float2(*at);
            *at = __floats2bfloat162_rn(old.x + v0, old.y + v1);
        }
    }
}
