#!/usr/bin/env python3
"""Which kernels torch's default scaled_dot_product_attention runs (what Unsloth's `sdpa` path
calls) at the reference shapes, and at what rate: causal, bf16, 32 query / 8 key-value heads,
with K/V expanded to 32 heads (Unsloth) and with enable_gqa. On the GPU machine:
    python3 scripts/bench/sdpa_backend.py
"""
import time

import torch
import torch.nn.functional as F


def run(b, t, d, gqa):
    h, kv = 32, 8
    q = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, kv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, kv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)

    def step():
        if gqa:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            ke = k[:, :, None].expand(b, kv, h // kv, t, d).reshape(b, h, t, d)
            ve = v[:, :, None].expand(b, kv, h // kv, t, d).reshape(b, h, t, d)
            o = F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        o.backward(up)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = sorted({e.name[:70] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                    and any(s in e.name.lower() for s in ("flash", "fmha", "attn", "sdpa", "cudnn", "sm90", "mha"))})
    n = 10
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    ms = (time.time() - t0) / n * 1e3
    flops = 3.5 * 2 * b * h * t * t * d  # forward + backward, causal half
    print(f"B{b} T{t} D{d} {'enable_gqa' if gqa else 'expanded kv'}: fwd+bwd {ms:.3f} ms, "
          f"{flops / ms / 1e9:.0f} TFLOP/s; kernels: {'; '.join(names)}", flush=True)


print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(),
      "cudnn sdpa enabled", torch.backends.cuda.cudnn_sdp_enabled(), "flash", torch.backends.cuda.flash_sdp_enabled())
for b, t, d in [(4, 2048, 64), (4, 2048, 128), (1, 16384, 128)]:
    for gqa in (False, True):
        try:
            run(b, t, d, gqa)
        except Exception as e:  # a backend may refuse a shape
            print(f"B{b} T{t} D{d} gqa={gqa}: {e!r}"[:200])
