// Tensor-core helpers shared by kiln's kernels: mma.sync m16n8k16 (bf16 in, f32 accumulate),
// ldmatrix loads of its operands from shared memory, and bf16 packing.
//
// Fragment layouts (PTX ISA, mma.m16n8k16): lane l holds, of A (16x16), rows l/4 and l/4+8 at
// columns 2(l%4)+{0,1} and +8; of B (16x8), rows 2(l%4)+{0,1} and +8 at column l/4; of C (16x8),
// rows l/4 and l/4+8 at columns 2(l%4)+{0,1}.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const bf16* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const bf16* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// c (16x8, f32) += a (16x16) · b (16x8).
__device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// p[0] += a, p[1] += b atomically (p 8-byte aligned): one vector atomic on sm_90, two before.
__device__ __forceinline__ void add_pair(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// The A operand (16x16) whose rows start at `p` (row stride ld).
__device__ __forceinline__ void load_a(uint32_t* a, const bf16* p, int ld, int lane) {
    const int m = lane / 8, r = lane % 8;
    ldmatrix_x4(a, p + ((m % 2) * 8 + r) * ld + (m / 2) * 8);
}

// The A operand (16x16) of Mᵀ, with M stored from `p` (rows are A's columns).
__device__ __forceinline__ void load_a_trans(uint32_t* a, const bf16* p, int ld, int lane) {
    const int m = lane / 8, r = lane % 8;
    ldmatrix_x4_trans(a, p + ((m / 2) * 8 + r) * ld + (m % 2) * 8);
}

// B operands of two 16x8 tiles (b[0..1]: columns 0-7, b[2..3]: 8-15) of Mᵀ, with M stored from
// `p` as rows of B's columns (K and Q rows for scores).
__device__ __forceinline__ void load_b_rows_n(uint32_t* b, const bf16* p, int ld, int lane) {
    const int m = lane / 8, r = lane % 8;
    ldmatrix_x4(b, p + ((m / 2) * 8 + r) * ld + (m % 2) * 8);
}

// B operands of two 16x8 tiles of M stored from `p` as rows of B's rows (V, dO, Q, K rows).
__device__ __forceinline__ void load_b_rows_k(uint32_t* b, const bf16* p, int ld, int lane) {
    const int m = lane / 8, r = lane % 8;
    ldmatrix_x4_trans(b, p + ((m % 2) * 8 + r) * ld + (m / 2) * 8);
}

