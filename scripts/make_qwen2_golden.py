"""Golden logits for kiln's Qwen 2 forward pass, from Hugging Face transformers.

    /tmp/refenv/bin/python scripts/make_qwen2_golden.py
(venv: torch 2.11.0, transformers 5.17.0; CPU, f32)

Writes a tiny random Qwen2ForCausalLM as transformers saves it (q/k/v biases, tied embeddings,
GQA 4/2, rope_theta 1e6, no sliding window) and its logits:
  tests/fixtures/qwen2_tiny/               f32, one file, with kiln's tiny tokenizer
  tests/fixtures/qwen2_logits.safetensors  input_ids (i64 [2,T]), logits (f32 [2,T,V]),
                                           adapter.logits (with the adapter below)
  tests/fixtures/peft_adapter_qwen2/       a PEFT 0.21 LoRA (r=8, alpha=16, all seven projections,
                                           init_lora_weights=False so B is not zero)
Scaled init as scripts/make_llama_golden.py, and biases N(0, 0.5²), so that dropping the
biases shows in the logits.
"""
import os
import shutil

import torch
import transformers
from safetensors.torch import save_file
import peft
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

torch.manual_seed(0)
FIX = "tests/fixtures"
OUT = f"{FIX}/qwen2_tiny"

config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                     use_sliding_window=False, bos_token_id=506, eos_token_id=507)
model = Qwen2ForCausalLM(config).eval()
for name, p in model.named_parameters():
    with torch.no_grad():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif "embed_tokens" in name:
            p.normal_(0.0, 1.0)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.5)
        elif p.dim() == 2:
            gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            p.normal_(0.0, gain / p.shape[1] ** 0.5)
shutil.rmtree(OUT, ignore_errors=True)
model.save_pretrained(OUT, safe_serialization=True)
shutil.copy("src/model/tiny_tokenizer.json", f"{OUT}/tokenizer.json")
model = Qwen2ForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()
ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(7))
with torch.no_grad():
    logits = model(input_ids=ids).logits
ADAPTER = f"{FIX}/peft_adapter_qwen2"
shutil.rmtree(ADAPTER, ignore_errors=True)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
get_peft_model(Qwen2ForCausalLM.from_pretrained(OUT, dtype=torch.float32), lora).save_pretrained(ADAPTER)
os.remove(f"{ADAPTER}/README.md")  # PEFT's model card
adapted = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(OUT, dtype=torch.float32), ADAPTER).eval()
with torch.no_grad():
    adapter_logits = adapted(input_ids=ids).logits
save_file({"input_ids": ids, "logits": logits.contiguous(), "adapter.logits": adapter_logits.contiguous()},
          f"{FIX}/qwen2_logits.safetensors",
          metadata={"torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": peft.__version__})
print(open(f"{OUT}/config.json").read())
