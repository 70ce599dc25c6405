"""Golden logits for kiln's Mistral forward pass (sliding-window attention), from transformers.

    /tmp/refenv/bin/python scripts/make_mistral_golden.py
(venv: torch 2.11.0, transformers 5.17.0; CPU, f32)

Writes a tiny random MistralForCausalLM with a sliding window of 8 tokens, so that the 40-token
inputs exercise it, and its logits:
  tests/fixtures/mistral_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/mistral_logits.safetensors  input_ids (i64 [2,T]), logits (f32 [2,T,V]),
                                             full_logits (the same weights without the window)
Scaled init as scripts/make_llama_golden.py.
"""
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import MistralConfig, MistralForCausalLM

torch.manual_seed(0)
FIX = "tests/fixtures"
OUT = f"{FIX}/mistral_tiny"

config = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=8, tie_word_embeddings=False,
                       bos_token_id=506, eos_token_id=507)
model = MistralForCausalLM(config).eval()
for name, p in model.named_parameters():
    with torch.no_grad():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif "embed_tokens" in name:
            p.normal_(0.0, 1.0)
        elif p.dim() == 2:
            gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            p.normal_(0.0, gain / p.shape[1] ** 0.5)
shutil.rmtree(OUT, ignore_errors=True)
model.save_pretrained(OUT, safe_serialization=True)
shutil.copy("src/model/tiny_tokenizer.json", f"{OUT}/tokenizer.json")
ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(7))
windowed = MistralForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()
full = MistralForCausalLM.from_pretrained(OUT, dtype=torch.float32, sliding_window=None).eval()
with torch.no_grad():
    logits = windowed(input_ids=ids).logits
    full_logits = full(input_ids=ids).logits
assert (logits - full_logits).abs().max() > 1e-2, "the window changes nothing at this length?"
save_file({"input_ids": ids, "logits": logits.contiguous(), "full_logits": full_logits.contiguous()},
          f"{FIX}/mistral_logits.safetensors",
          metadata={"torch": torch.__version__, "transformers": transformers.__version__})
print(open(f"{OUT}/config.json").read())
