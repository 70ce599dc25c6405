"""Golden logits for kiln's Phi-3 forward pass (fused qkv_proj and gate_up_proj, sliding window),
from transformers, with and without a PEFT adapter on the fused projections.

    /tmp/refenv/bin/python scripts/make_phi3_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

Writes a tiny random Phi3ForCausalLM (GQA 4/2, sliding window 16, 40-token inputs) and:
  tests/fixtures/phi3_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/peft_adapter_phi3/       PEFT LoRA r=8 alpha=16 on qkv_proj and o_proj (the usual
                                          Phi-3 recipe), init_lora_weights=False so B is not zero
  tests/fixtures/phi3_logits.safetensors  input_ids, logits, adapter.logits
Scaled init as scripts/make_llama_golden.py.
"""
import os
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import Phi3Config, Phi3ForCausalLM

torch.manual_seed(0)
FIX = "tests/fixtures"
OUT = f"{FIX}/phi3_tiny"
ADAPTER = f"{FIX}/peft_adapter_phi3"

config = Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    original_max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                    sliding_window=16, tie_word_embeddings=False, bos_token_id=506, eos_token_id=507,
                    pad_token_id=511)
model = Phi3ForCausalLM(config).eval()
for name, p in model.named_parameters():
    with torch.no_grad():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif "embed_tokens" in name:
            p.normal_(0.0, 1.0)
        elif p.dim() == 2:
            gain = 2.0 if "qkv_proj" in name else 1.0
            p.normal_(0.0, gain / p.shape[1] ** 0.5)
shutil.rmtree(OUT, ignore_errors=True)
model.save_pretrained(OUT, safe_serialization=True)
shutil.copy("src/model/tiny_tokenizer.json", f"{OUT}/tokenizer.json")
ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(7))
base = Phi3ForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()
with torch.no_grad():
    logits = base(input_ids=ids).logits
shutil.rmtree(ADAPTER, ignore_errors=True)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                  target_modules=["qkv_proj", "o_proj"])
get_peft_model(Phi3ForCausalLM.from_pretrained(OUT, dtype=torch.float32), lora).save_pretrained(ADAPTER)
os.remove(f"{ADAPTER}/README.md")
adapted = PeftModel.from_pretrained(Phi3ForCausalLM.from_pretrained(OUT, dtype=torch.float32), ADAPTER).eval()
with torch.no_grad():
    adapter_logits = adapted(input_ids=ids).logits
save_file({"input_ids": ids, "logits": logits.contiguous(), "adapter.logits": adapter_logits.contiguous()},
          f"{FIX}/phi3_logits.safetensors",
          metadata={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__})
print(open(f"{OUT}/config.json").read())
