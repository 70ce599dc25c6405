"""Golden logits for kiln's Gemma 2 forward pass, from transformers, with and without a PEFT
adapter.

    /tmp/refenv/bin/python scripts/make_gemma2_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

A tiny random Gemma2ForCausalLM with every Gemma 2 specific in play on 40-token inputs: (1 + w)
RMSNorm and four norms per block, embeddings scaled by √hidden, GELU (tanh), query_pre_attn_scalar
24 ≠ head_dim 16, attention and final logit soft-capping at caps small enough to bite (5 and 8),
local (sliding window 8) and global layers alternating, tied embeddings. Writes:
  tests/fixtures/gemma2_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/peft_adapter_gemma2/       PEFT LoRA r=8 alpha=16 on q/k/v/o (init_lora_weights=False)
  tests/fixtures/gemma2_logits.safetensors  input_ids, logits, adapter.logits
Scaled init as scripts/make_llama_golden.py; norm weights N(0, 0.2²) (Gemma multiplies by 1 + w).
"""
import os
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import Gemma2Config, Gemma2ForCausalLM

torch.manual_seed(0)
FIX = "tests/fixtures"
OUT = f"{FIX}/gemma2_tiny"
ADAPTER = f"{FIX}/peft_adapter_gemma2"

config = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                      max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=8,
                      attn_logit_softcapping=5.0, final_logit_softcapping=8.0,
                      hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                      bos_token_id=506, eos_token_id=507, pad_token_id=511)
model = Gemma2ForCausalLM(config).eval()
for name, p in model.named_parameters():
    with torch.no_grad():
        if name.endswith("norm.weight"):
            p.normal_(0.0, 0.2)
        elif "embed_tokens" in name:
            p.normal_(0.0, 1.0)
        elif p.dim() == 2:
            gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            p.normal_(0.0, gain / p.shape[1] ** 0.5)
shutil.rmtree(OUT, ignore_errors=True)
model.save_pretrained(OUT, safe_serialization=True)
shutil.copy("src/model/tiny_tokenizer.json", f"{OUT}/tokenizer.json")
ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(7))
base = Gemma2ForCausalLM.from_pretrained(OUT, dtype=torch.float32, attn_implementation="eager").eval()
with torch.no_grad():
    logits = base(input_ids=ids).logits
shutil.rmtree(ADAPTER, ignore_errors=True)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
get_peft_model(Gemma2ForCausalLM.from_pretrained(OUT, dtype=torch.float32), lora).save_pretrained(ADAPTER)
os.remove(f"{ADAPTER}/README.md")
adapted = PeftModel.from_pretrained(
    Gemma2ForCausalLM.from_pretrained(OUT, dtype=torch.float32, attn_implementation="eager"), ADAPTER).eval()
with torch.no_grad():
    adapter_logits = adapted(input_ids=ids).logits
save_file({"input_ids": ids, "logits": logits.contiguous(), "adapter.logits": adapter_logits.contiguous()},
          f"{FIX}/gemma2_logits.safetensors",
          metadata={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__})
print(open(f"{OUT}/config.json").read())
