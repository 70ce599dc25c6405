"""Golden merged weights from PEFT's merge_and_unload, and a check that transformers loads a kiln
merge.

    $KILN_REFPY scripts/golden/make_merge_golden.py            # writes the golden
    $KILN_REFPY scripts/golden/make_merge_golden.py MERGED_DIR # checks a `kiln merge --into original` output
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

tests/fixtures/peft_merged_a.safetensors: the merged weights of layers 0 and 2 of
tests/fixtures/llama_tiny_a + tests/fixtures/peft_adapter_a (every adapted projection).
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

FIX = "tests/fixtures"
base = LlamaForCausalLM.from_pretrained(f"{FIX}/llama_tiny_a", dtype=torch.float32)
merged = PeftModel.from_pretrained(base, f"{FIX}/peft_adapter_a").merge_and_unload().eval()
if len(sys.argv) == 1:
    sd = merged.state_dict()
    keep = {k: v.contiguous() for k, v in sd.items()
            if (".layers.0." in k or ".layers.2." in k) and k.endswith("proj.weight")}
    save_file(keep, f"{FIX}/peft_merged_a.safetensors")
    print(len(keep), "tensors")
else:
    ours = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    ids = torch.tensor([[506, 50, 60, 70, 80, 90, 100, 110, 120, 130]])
    with torch.no_grad():
        a, b = merged(ids).logits, ours(ids).logits
    print("transformers loaded", sys.argv[1], "max |logit diff| vs PEFT merge_and_unload:", (a - b).abs().max().item())
