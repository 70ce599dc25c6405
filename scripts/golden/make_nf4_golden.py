"""Golden file for kiln's NF4 + double-quant codec: bitsandbytes' CUDA quantizer output.

Run on a CUDA machine (the bnb CPU path approximates the 8-bit nested quantizer):
    python3 scripts/golden/make_nf4_golden.py OUT_DIR
Writes OUT_DIR/nf4_bnb_golden.safetensors and OUT_DIR/linear4bit_state.safetensors.

References used for tests/fixtures/nf4_bnb_golden.safetensors (recorded in its metadata):
torch 2.11.0+cu130, bitsandbytes 0.50.2, on an NVIDIA H200.
"""
import json
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

out_dir = sys.argv[1]
gen = torch.Generator().manual_seed(1234)


def randn(shape, scale_rows=False):
    x = torch.randn(*shape, generator=gen, dtype=torch.float32)
    if scale_rows:  # rows of very different magnitude: absmax spans decades
        x = x * torch.exp(2.0 * torch.randn(shape[0], 1, generator=gen))
    return x


cases = {
    # name: (tensor, dtype)
    "odd_f32": (randn((37, 53)), torch.float32),             # odd numel, partial last block
    "zero_block_f16": (randn((64, 96)), torch.float16),      # one all-zero block (CUDA code 0)
    "nested3_bf16": (randn((300, 130)), torch.bfloat16),     # 610 blocks: 3 nested blocks
    "spread_f32": (randn((129, 67), scale_rows=True), torch.float32),
    "large_bf16": (randn((512, 520), scale_rows=True), torch.bfloat16),
}
cases["zero_block_f16"][0].view(-1)[64:128] = 0.0

tensors = {}
meta = {
    "torch": torch.__version__,
    "bitsandbytes": bnb.__version__,
    "device": torch.cuda.get_device_name(0),
    "cases": json.dumps(sorted(cases)),
}
for name, (x, dtype) in cases.items():
    x = x.to(dtype)
    packed, qs = F.quantize_4bit(x.cuda(), blocksize=64, compress_statistics=True, quant_type="nf4")
    deq = F.dequantize_4bit(packed, qs)
    tensors[f"{name}.input"] = x.contiguous()
    tensors[f"{name}.packed"] = packed.cpu().contiguous()
    tensors[f"{name}.absmax"] = qs.absmax.cpu().contiguous()                    # uint8 codes
    tensors[f"{name}.nested_absmax"] = qs.state2.absmax.cpu().contiguous()      # f32
    tensors[f"{name}.offset"] = qs.offset.reshape(1).float().cpu().contiguous()
    tensors[f"{name}.dequant"] = deq.cpu().contiguous()
    tensors["quant_map"] = qs.code.cpu().float().contiguous()
    tensors["nested_quant_map"] = qs.state2.code.cpu().float().contiguous()
save_file(tensors, f"{out_dir}/nf4_bnb_golden.safetensors", metadata=meta)

# A serialized Linear4bit, as transformers saves 4-bit checkpoints.
w = cases["odd_f32"][0].to(torch.bfloat16)
lin = bnb.nn.Linear4bit(53, 37, bias=False, compute_dtype=torch.bfloat16,
                        compress_statistics=True, quant_type="nf4")
lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                               quant_type="nf4", blocksize=64)
lin = lin.cuda()
sd = {("q_proj." + k): v.cpu().contiguous() for k, v in lin.state_dict().items()}
save_file(sd, f"{out_dir}/linear4bit_state.safetensors", metadata=meta)
for k, v in sd.items():
    print(k, v.dtype, tuple(v.shape))
print(bytes(sd["q_proj.weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
print("ok")
