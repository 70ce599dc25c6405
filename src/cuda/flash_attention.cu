// Flash attention for training: softmax(scale · q·kᵀ + causal mask)·v without a score matrix in
// memory, forward and backward, on tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate).
//
// Shapes: q, o, dO hold H heads of T rows of D; k, v, dK, dV hold KV heads of Tk rows, each
// key/value head serving n_rep = H / KV query heads (head h reads key/value head h / n_rep). Where
// a head's rows start and how far apart they are is given by strides (`Strides`): [B, H, T, D]
// (heads-major) or [B, T, H, D] (token-major, a projection's output viewed as heads, no copy).
// lse and Δ are [B, H, T]. With `causal`, query i sees keys j <= i + offset (offset = Tk - T:
// queries are the last T positions).
//
// Forward (one block = 64 queries of one head, 4 warps of 16 rows): for each tile of 64 keys,
// S = Q·Kᵀ into registers, an online softmax per row (running max m and sum l, in base 2), and
// O = O·α + P·V with P fed from the same registers (an accumulator tile of mma.sync has the
// layout of its A operand). Writes O and lse = m + log2(l) (base 2) per row.
//
// Backward (one block = 64 keys of one key/value head, 4 warps of 16 keys), over the n_rep query
// heads and every query tile that can see the keys: Sᵀ = K·Qᵀ, Pᵀ = exp2(scale·log2e·Sᵀ − lse),
// dPᵀ = V·dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − Δ) with Δ = rowsum(dO ⊙ O); dV += Pᵀ·dO and dK += dSᵀ·Q stay in
// registers for the whole loop; dSᵀ goes through shared memory once so that each warp can add
// its 16 queries' dQ += dS·K to an f32 buffer with atomics.
//
// Fragment layouts (PTX ISA, mma.m16n8k16): lane l holds, of A (16x16), rows l/4 and l/4+8 at
// columns 2(l%4)+{0,1} and +8; of B (16x8), rows 2(l%4)+{0,1} and +8 at column l/4; of C (16x8),
// rows l/4 and l/4+8 at columns 2(l%4)+{0,1}. Shared tiles have rows padded by 8 bf16 so that
// ldmatrix's 8 row reads fall in different banks.

#include "mma.cuh"

#define TILE 64
#define LOG2E 1.4426950408889634f
#define DS_LD (TILE + 8)  // dSᵀ rows in the backward

// Where one head's rows lie: element (b, head, row, d) is at b·batch + head·head + row·row + d.
struct Strides {
    long long batch, head, row;
    __device__ __forceinline__ size_t at(int b, int h) const { return (size_t)(b * batch + h * head); }
};

// Asynchronous copies global → shared (cp.async, sm_80+): `bytes` of `src`, or zeros where
// `valid` is false (no byte is read then). A commit closes a group of copies; wait<N> returns
// once at most N groups are still in flight (then a __syncthreads makes them visible to all).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Starts copying rows [r0, r0 + TILE) of a head (rows `ld` apart) into shared memory (row stride
// D + 8), zeros past the last row.
template <int D>
__device__ void load_tile(bf16* dst, const bf16* src, long long ld, int r0, int rows) {
    const int LD = D + 8;
    for (int i = threadIdx.x; i < TILE * D / 8; i += blockDim.x) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        const bool valid = r0 + r < rows;
        cp_async16(dst + r * LD + c, src + (valid ? (size_t)((r0 + r) * ld) + c : 0), valid);
    }
}

// Stages of the tile pipelines: while one tile is computed on, the next is copied in. The
// backward pass at D = 128 keeps one stage (two would leave room for one block a multiprocessor).
template <int D>
struct Stages {
    static constexpr int fwd = 2, bwd = D <= 64 ? 2 : 1;
};

template <int D>
__device__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, bf16* __restrict__ o, float* __restrict__ lse,
                          Strides qs, Strides ks, int T, int Tk, int H, int n_rep, float scale,
                          int causal, int offset) {
    constexpr int LD = D + 8, STAGES = Stages<D>::fwd;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    // Stage s: K at Ks + 2s·TILE·LD, V right after it.
    bf16* Ks = Qs + TILE * LD;

    // Heaviest blocks first: with causal masking a query tile's work grows with its index, so
    // the last tiles of every head are launched first and the short ones fill the tail.
    const int block = blockIdx.y * gridDim.x + blockIdx.x;
    const int bh = block % gridDim.y, b = bh / H, h = bh % H;
    const int q_tile = gridDim.x - 1 - block / gridDim.y;
    const bf16* kp = k + ks.at(b, h / n_rep);
    const bf16* vp = v + ks.at(b, h / n_rep);
    const int q0 = q_tile * TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // This lane's two rows of the warp's 16, and its column pair within each 8-wide tile.
    const int row0 = q0 + warp * 16 + lane / 4, row1 = row0 + 8, col = 2 * (lane % 4);
    const float c = scale * LOG2E;

    int n_tiles = (Tk + TILE - 1) / TILE;
    if (causal) n_tiles = min(n_tiles, (q0 + TILE - 1 + offset) / TILE + 1);
    // Copies key/value tile j into its stage.
    auto fetch = [&](int j) {
        bf16* kd = Ks + (j % STAGES) * 2 * TILE * LD;
        load_tile<D>(kd, kp, ks.row, j * TILE, Tk);
        load_tile<D>(kd + TILE * LD, vp, ks.row, j * TILE, Tk);
    };
    load_tile<D>(Qs, q + qs.at(b, h), qs.row, q0, T);
    if (STAGES == 2 && n_tiles > 0) fetch(0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a(qf[kk], Qs + warp * 16 * LD + kk * 16, LD, lane);

    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    for (int j = 0; j < n_tiles; ++j) {
        const int k0 = j * TILE;
        // Every warp is done with the stage the next copy overwrites.
        __syncthreads();
        if (STAGES == 1) {
            fetch(j);
            cp_async_commit();
            cp_async_wait<0>();
        } else {
            if (j + 1 < n_tiles) fetch(j + 1);
            cp_async_commit();
            cp_async_wait<1>();
        }
        __syncthreads();
        const bf16* Kt = Ks + (j % STAGES) * 2 * TILE * LD;
        const bf16* Vt = Kt + TILE * LD;

        float s[TILE / 8][4];
#pragma unroll
        for (int n = 0; n < TILE / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int nt = 0; nt < TILE / 16; ++nt) {
                uint32_t bf[4];
                load_b_rows_n(bf, Kt + nt * 16 * LD + kk * 16, LD, lane);
                mma(s[2 * nt], qf[kk], bf[0], bf[1]);
                mma(s[2 * nt + 1], qf[kk], bf[2], bf[3]);
            }
        }
        float mx0 = -INFINITY, mx1 = -INFINITY;
        // Only tiles that cross the diagonal or the last key need the mask.
        const bool masked = k0 + TILE > Tk || (causal && k0 + TILE - 1 > q0 + offset);
#pragma unroll
        for (int n = 0; n < TILE / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + n * 8 + col + (e & 1);
                const int row = e < 2 ? row0 : row1;
                const bool seen = !masked || (key < Tk && (!causal || key <= row + offset));
                s[n][e] = seen ? s[n][e] * c : -INFINITY;
            }
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
#pragma unroll
        for (int w = 1; w < 4; w *= 2) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, w));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, w));
        }
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float base0 = n0 == -INFINITY ? 0.f : n0, base1 = n1 == -INFINITY ? 0.f : n1;
        const float alpha0 = exp2f(m0 - base0), alpha1 = exp2f(m1 - base1);
        m0 = n0;
        m1 = n1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int n = 0; n < TILE / 8; ++n) {
            s[n][0] = exp2f(s[n][0] - base0);
            s[n][1] = exp2f(s[n][1] - base0);
            s[n][2] = exp2f(s[n][2] - base1);
            s[n][3] = exp2f(s[n][3] - base1);
            sum0 += s[n][0] + s[n][1];
            sum1 += s[n][2] + s[n][3];
        }
        // Each lane keeps its share of the row sums; the quad adds them up at the end.
        l0 = l0 * alpha0 + sum0;
        l1 = l1 * alpha1 + sum1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            acc[n][0] *= alpha0;
            acc[n][1] *= alpha0;
            acc[n][2] *= alpha1;
            acc[n][3] *= alpha1;
        }
        // O += P·V: two score tiles (16 keys) are one A operand.
#pragma unroll
        for (int kt = 0; kt < TILE / 16; ++kt) {
            const uint32_t pa[4] = {pack(s[2 * kt][0], s[2 * kt][1]), pack(s[2 * kt][2], s[2 * kt][3]),
                                    pack(s[2 * kt + 1][0], s[2 * kt + 1][1]),
                                    pack(s[2 * kt + 1][2], s[2 * kt + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                uint32_t bf[4];
                load_b_rows_k(bf, Vt + kt * 16 * LD + dn * 16, LD, lane);
                mma(acc[2 * dn], pa, bf[0], bf[1]);
                mma(acc[2 * dn + 1], pa, bf[2], bf[3]);
            }
        }
    }
#pragma unroll
    for (int w = 1; w < 4; w *= 2) {
        l0 += __shfl_xor_sync(0xffffffff, l0, w);
        l1 += __shfl_xor_sync(0xffffffff, l1, w);
    }
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    bf16* out = o + qs.at(b, h);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        if (row0 < T)
            *reinterpret_cast<uint32_t*>(out + (size_t)(row0 * qs.row) + n * 8 + col) =
                pack(acc[n][0] * inv0, acc[n][1] * inv0);
        if (row1 < T)
            *reinterpret_cast<uint32_t*>(out + (size_t)(row1 * qs.row) + n * 8 + col) =
                pack(acc[n][2] * inv1, acc[n][3] * inv1);
    }
    if (lane % 4 == 0) {
        if (row0 < T) lse[(size_t)bh * T + row0] = m0 + log2f(l0);
        if (row1 < T) lse[(size_t)bh * T + row1] = m1 + log2f(l1);
    }
}

// Δ = rowsum(dO ⊙ O) per query row, into [B, H, T]: `lanes` threads a row (D/8 rounded up to
// a power of two), eight elements a thread, one 16-byte load each where the row is aligned.
__device__ void row_dot(const bf16* __restrict__ a, const bf16* __restrict__ b, float* __restrict__ out,
                        Strides qs, int rows, int T, int H, int D, int lanes) {
    const int r = (blockIdx.x * blockDim.x + threadIdx.x) / lanes, part = threadIdx.x % lanes;
    const bool row_in = r < rows;
    float s = 0.f;
    if (row_in) {
        const size_t at = qs.at(r / (H * T), (r / T) % H) + (size_t)((r % T) * qs.row);
        const int c = part * 8;
        if (c < D) {
            const bf16 *pa = a + at + c, *pb = b + at + c;
            if ((reinterpret_cast<uintptr_t>(pa) | reinterpret_cast<uintptr_t>(pb)) % 16 == 0) {
                const uint4 va = *reinterpret_cast<const uint4*>(pa), vb = *reinterpret_cast<const uint4*>(pb);
                const __nv_bfloat162* xa = reinterpret_cast<const __nv_bfloat162*>(&va);
                const __nv_bfloat162* xb = reinterpret_cast<const __nv_bfloat162*>(&vb);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 fa = __bfloat1622float2(xa[e]), fb = __bfloat1622float2(xb[e]);
                    s += fa.x * fb.x + fa.y * fb.y;
                }
            } else {
                for (int e = 0; e < 8; ++e) s += __bfloat162float(pa[e]) * __bfloat162float(pb[e]);
            }
        }
    }
    for (int w = lanes / 2; w > 0; w /= 2) s += __shfl_xor_sync(0xffffffff, s, w);
    if (row_in && part == 0) out[r] = s;
}

template <int D>
__device__ void flash_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, const bf16* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta,
                          float* __restrict__ dq, bf16* __restrict__ dk, bf16* __restrict__ dv,
                          Strides qs, Strides ks, int T, int Tk, int H, int n_rep, float scale,
                          int causal, int offset) {
    constexpr int LD = D + 8, STAGES = Stages<D>::bwd;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + TILE * LD;
    bf16* dSTs = Vs + TILE * LD;
    // Stage s: its Q and dO tiles at QdO + 2s·TILE·LD, its lse and Δ at stats + 2s·TILE.
    bf16* QdO = dSTs + TILE * DS_LD;
    float* stats = reinterpret_cast<float*>(QdO + STAGES * 2 * TILE * LD);

    // Heaviest blocks first: with causal masking a key tile's work shrinks with its index (fewer
    // query tiles see it), so the first tiles of every head are launched first.
    const int block = blockIdx.y * gridDim.x + blockIdx.x;
    const int by = block % gridDim.y, KV = H / n_rep, b = by / KV, kvh = by % KV;
    const int k0 = (block / gridDim.y) * TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // This lane's two keys of the warp's 16 (rows of Sᵀ), and its column pair in each 8-wide tile.
    const int key0 = k0 + warp * 16 + lane / 4, key1 = key0 + 8, col = 2 * (lane % 4);
    const float c = scale * LOG2E;

    const int first_tile = causal ? max(0, k0 - offset) / TILE : 0;
    const int n_qtiles = (T + TILE - 1) / TILE, per_head = max(0, n_qtiles - first_tile);
    const int n_iters = n_rep * per_head;
    // Copies the query tile of iteration `it` (query head kvh·n_rep + it / per_head, tile
    // first_tile + it % per_head): its Q and dO rows, lse and Δ.
    auto fetch = [&](int it) {
        const int h = kvh * n_rep + it / per_head, q0 = (first_tile + it % per_head) * TILE;
        const size_t bh = (size_t)b * H + h, q_head = qs.at(b, h);
        bf16* Qd = QdO + (it % STAGES) * 2 * TILE * LD;
        float* sd = stats + (it % STAGES) * 2 * TILE;
        load_tile<D>(Qd, q + q_head, qs.row, q0, T);
        load_tile<D>(Qd + TILE * LD, dout + q_head, qs.row, q0, T);
        // Rows past T copy zeros; their probabilities are masked to 0 below.
        for (int t = threadIdx.x; t < TILE; t += blockDim.x) {
            const bool in = q0 + t < T;
            cp_async4(sd + t, lse + (in ? bh * T + q0 + t : 0), in);
            cp_async4(sd + TILE + t, delta + (in ? bh * T + q0 + t : 0), in);
        }
    };
    load_tile<D>(Ks, k + ks.at(b, kvh), ks.row, k0, Tk);
    load_tile<D>(Vs, v + ks.at(b, kvh), ks.row, k0, Tk);
    if (STAGES == 2 && n_iters > 0) fetch(0);
    cp_async_commit();
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.f;

    for (int it = 0; it < n_iters; ++it) {
        const int h = kvh * n_rep + it / per_head, q0 = (first_tile + it % per_head) * TILE;
        const size_t q_head = qs.at(b, h);
        // Every warp is done with the stage the next copy overwrites (and with dSᵀ).
        __syncthreads();
        if (STAGES == 1) {
            fetch(it);
            cp_async_commit();
            cp_async_wait<0>();
        } else {
            if (it + 1 < n_iters) fetch(it + 1);
            cp_async_commit();
            cp_async_wait<1>();
        }
        __syncthreads();
        const bf16* Qs = QdO + (it % STAGES) * 2 * TILE * LD;
        const bf16* dOs = Qs + TILE * LD;
        const float* lse_s = stats + (it % STAGES) * 2 * TILE;
        const float* delta_s = lse_s + TILE;

        // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for the warp's 16 keys against the tile's 64 queries.
        float st[TILE / 8][4], dpt[TILE / 8][4];
#pragma unroll
        for (int n = 0; n < TILE / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t ka[4], va[4];
            load_a(ka, Ks + warp * 16 * LD + kk * 16, LD, lane);
            load_a(va, Vs + warp * 16 * LD + kk * 16, LD, lane);
#pragma unroll
            for (int nt = 0; nt < TILE / 16; ++nt) {
                uint32_t bf[4];
                load_b_rows_n(bf, Qs + nt * 16 * LD + kk * 16, LD, lane);
                mma(st[2 * nt], ka, bf[0], bf[1]);
                mma(st[2 * nt + 1], ka, bf[2], bf[3]);
                load_b_rows_n(bf, dOs + nt * 16 * LD + kk * 16, LD, lane);
                mma(dpt[2 * nt], va, bf[0], bf[1]);
                mma(dpt[2 * nt + 1], va, bf[2], bf[3]);
            }
        }
        // Pᵀ into st, dSᵀ = Pᵀ ⊙ (dPᵀ − Δ) into dpt. Only tiles that cross the diagonal, the
        // last query or the last key need the mask.
        const bool masked = q0 + TILE > T || k0 + TILE > Tk || (causal && k0 + TILE - 1 > q0 + offset);
#pragma unroll
        for (int n = 0; n < TILE / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int qc = n * 8 + col + (e & 1), query = q0 + qc;
                const int key = e < 2 ? key0 : key1;
                const bool seen = !masked || (query < T && key < Tk && (!causal || key <= query + offset));
                const float p = seen ? exp2f(st[n][e] * c - lse_s[qc]) : 0.f;
                st[n][e] = p;
                dpt[n][e] = p * (dpt[n][e] - delta_s[qc]);
            }
        }
        // dV += Pᵀ·dO, dK += dSᵀ·Q (16 queries a step).
#pragma unroll
        for (int kt = 0; kt < TILE / 16; ++kt) {
            const uint32_t pa[4] = {pack(st[2 * kt][0], st[2 * kt][1]), pack(st[2 * kt][2], st[2 * kt][3]),
                                    pack(st[2 * kt + 1][0], st[2 * kt + 1][1]),
                                    pack(st[2 * kt + 1][2], st[2 * kt + 1][3])};
            const uint32_t da[4] = {pack(dpt[2 * kt][0], dpt[2 * kt][1]),
                                    pack(dpt[2 * kt][2], dpt[2 * kt][3]),
                                    pack(dpt[2 * kt + 1][0], dpt[2 * kt + 1][1]),
                                    pack(dpt[2 * kt + 1][2], dpt[2 * kt + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                uint32_t bf[4];
                load_b_rows_k(bf, dOs + kt * 16 * LD + dn * 16, LD, lane);
                mma(dv_acc[2 * dn], pa, bf[0], bf[1]);
                mma(dv_acc[2 * dn + 1], pa, bf[2], bf[3]);
                load_b_rows_k(bf, Qs + kt * 16 * LD + dn * 16, LD, lane);
                mma(dk_acc[2 * dn], da, bf[0], bf[1]);
                mma(dk_acc[2 * dn + 1], da, bf[2], bf[3]);
            }
        }
        // dSᵀ of all warps into shared memory, then dQ (the warp's 16 queries) += dS·K.
#pragma unroll
        for (int n = 0; n < TILE / 8; ++n) {
            const int rl = warp * 16 + lane / 4;
            *reinterpret_cast<uint32_t*>(dSTs + rl * DS_LD + n * 8 + col) = pack(dpt[n][0], dpt[n][1]);
            *reinterpret_cast<uint32_t*>(dSTs + (rl + 8) * DS_LD + n * 8 + col) = pack(dpt[n][2], dpt[n][3]);
        }
        __syncthreads();
        uint32_t dsa[TILE / 16][4];
#pragma unroll
        for (int kt = 0; kt < TILE / 16; ++kt) load_a_trans(dsa[kt], dSTs + kt * 16 * DS_LD + warp * 16, DS_LD, lane);
        const int qrow0 = q0 + warp * 16 + lane / 4, qrow1 = qrow0 + 8;
        float* dq_head = dq + q_head;
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
            float a2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
            for (int kt = 0; kt < TILE / 16; ++kt) {
                uint32_t bf[4];
                load_b_rows_k(bf, Ks + kt * 16 * LD + dn * 16, LD, lane);
                mma(a2[0], dsa[kt], bf[0], bf[1]);
                mma(a2[1], dsa[kt], bf[2], bf[3]);
            }
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2) {
                const int cc = dn * 16 + h2 * 8 + col;
                if (qrow0 < T) add_pair(dq_head + (size_t)(qrow0 * qs.row) + cc, a2[h2][0] * scale, a2[h2][1] * scale);
                if (qrow1 < T) add_pair(dq_head + (size_t)(qrow1 * qs.row) + cc, a2[h2][2] * scale, a2[h2][3] * scale);
            }
        }
    }
    cp_async_wait<0>();
    // dK (scaled) and dV of the lane's two keys.
    bf16* dk_head = dk + ks.at(b, kvh);
    bf16* dv_head = dv + ks.at(b, kvh);
    const size_t at0 = (size_t)(key0 * ks.row) + col, at1 = (size_t)(key1 * ks.row) + col;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        if (key0 < Tk) {
            *reinterpret_cast<uint32_t*>(dk_head + at0 + n * 8) = pack(dk_acc[n][0] * scale, dk_acc[n][1] * scale);
            *reinterpret_cast<uint32_t*>(dv_head + at0 + n * 8) = pack(dv_acc[n][0], dv_acc[n][1]);
        }
        if (key1 < Tk) {
            *reinterpret_cast<uint32_t*>(dk_head + at1 + n * 8) = pack(dk_acc[n][2] * scale, dk_acc[n][3] * scale);
            *reinterpret_cast<uint32_t*>(dv_head + at1 + n * 8) = pack(dv_acc[n][2], dv_acc[n][3]);
        }
    }
}

// Strides arrive as three 64-bit arguments each (q-side, then k-side).
#define STRIDES(P) long long P##_batch, long long P##_head, long long P##_row
#define FLASH(D, FWD_BLOCKS, BWD_BLOCKS)                                                                                 \
    extern "C" __global__ void __launch_bounds__(128, FWD_BLOCKS) flash_fwd_d##D(const bf16* q, const bf16* k, const bf16* v, bf16* o,     \
                                              float* lse, STRIDES(qs), STRIDES(ks), int T, int Tk,    \
                                              int H, int n_rep, float scale, int causal, int offset) { \
        flash_fwd<D>(q, k, v, o, lse, Strides{qs_batch, qs_head, qs_row},                           \
                     Strides{ks_batch, ks_head, ks_row}, T, Tk, H, n_rep, scale, causal, offset);    \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(128, BWD_BLOCKS) flash_bwd_d##D(const bf16* q, const bf16* k, const bf16* v,            \
                                              const bf16* dout, const float* lse,                     \
                                              const float* delta, float* dq, bf16* dk, bf16* dv,      \
                                              STRIDES(qs), STRIDES(ks), int T, int Tk, int H,         \
                                              int n_rep, float scale, int causal, int offset) {       \
        flash_bwd<D>(q, k, v, dout, lse, delta, dq, dk, dv, Strides{qs_batch, qs_head, qs_row},     \
                     Strides{ks_batch, ks_head, ks_row}, T, Tk, H, n_rep, scale, causal, offset);    \
    }

// Blocks a multiprocessor keeps resident (the register budget each kernel is held to).
FLASH(64, 4, 3)
FLASH(96, 3, 2)
FLASH(128, 2, 2)

extern "C" __global__ void flash_row_dot(const bf16* a, const bf16* b, float* out, STRIDES(qs), int rows,
                                         int T, int H, int D, int lanes) {
    row_dot(a, b, out, Strides{qs_batch, qs_head, qs_row}, rows, T, H, D, lanes);
}
