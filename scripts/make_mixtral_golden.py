"""Golden logits for kiln's Mixtral forward pass (sparse mixture of experts), from transformers,
with and without a PEFT adapter on the attention projections.

    /tmp/refenv/bin/python scripts/make_mixtral_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

A tiny random MixtralForCausalLM (4 experts, top-2 routing, GQA 4/2) saved as transformers 5
saves it (per-expert `block_sparse_moe.experts.E.w1/w2/w3`), and:
  tests/fixtures/mixtral_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/peft_adapter_mixtral/       PEFT LoRA r=8 alpha=16 on q/k/v/o (init_lora_weights=False)
  tests/fixtures/mixtral_logits.safetensors  input_ids, logits, adapter.logits
Scaled init as scripts/make_llama_golden.py; the router N(0, 1/hidden) so routing is not uniform.
"""
import os
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

torch.manual_seed(0)
FIX = "tests/fixtures"
OUT = f"{FIX}/mixtral_tiny"
ADAPTER = f"{FIX}/peft_adapter_mixtral"

config = MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       rms_norm_eps=1e-5, rope_theta=1000000.0, num_local_experts=4, num_experts_per_tok=2,
                       sliding_window=None, tie_word_embeddings=False, bos_token_id=506, eos_token_id=507)
model = MixtralForCausalLM(config).eval()
for name, p in model.named_parameters():
    with torch.no_grad():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif "embed_tokens" in name:
            p.normal_(0.0, 1.0)
        elif p.dim() >= 2:
            gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            p.normal_(0.0, gain / p.shape[-1] ** 0.5)
shutil.rmtree(OUT, ignore_errors=True)
model.save_pretrained(OUT, safe_serialization=True)
shutil.copy("src/model/tiny_tokenizer.json", f"{OUT}/tokenizer.json")
ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(7))
base = MixtralForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()
with torch.no_grad():
    logits = base(input_ids=ids).logits
shutil.rmtree(ADAPTER, ignore_errors=True)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
get_peft_model(MixtralForCausalLM.from_pretrained(OUT, dtype=torch.float32), lora).save_pretrained(ADAPTER)
os.remove(f"{ADAPTER}/README.md")
adapted = PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(OUT, dtype=torch.float32), ADAPTER).eval()
with torch.no_grad():
    adapter_logits = adapted(input_ids=ids).logits
save_file({"input_ids": ids, "logits": logits.contiguous(), "adapter.logits": adapter_logits.contiguous()},
          f"{FIX}/mixtral_logits.safetensors",
          metadata={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__})
print(open(f"{OUT}/config.json").read())
