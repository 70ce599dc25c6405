"""Golden logits for kiln's Mistral forward pass (sliding-window attention), from transformers.

    $KILN_REFPY scripts/golden/make_mistral_golden.py
(venv: torch 2.11.0, transformers 5.17.0; CPU, f32)

Writes a tiny random MistralForCausalLM with a sliding window of 8 tokens, so that the 40-token
inputs exercise it, and its logits:
  tests/fixtures/mistral_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/mistral_logits.safetensors  input_ids (i64 [2,T]), logits (f32 [2,T,V]),
                                             full_logits (the same weights without the window)
Scaled init as scripts/make_llama_golden.py.
"""
import torch
from transformers import MistralConfig, MistralForCausalLM

from family_golden import FIX, input_ids, save_logits, save_model, scaled_init

torch.manual_seed(0)
OUT = f"{FIX}/mistral_tiny"

config = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=8, tie_word_embeddings=False,
                       bos_token_id=506, eos_token_id=507)
model = MistralForCausalLM(config).eval()
scaled_init(model)
save_model(model, OUT)
ids = input_ids()
windowed = MistralForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()
full = MistralForCausalLM.from_pretrained(OUT, dtype=torch.float32, sliding_window=None).eval()
with torch.no_grad():
    logits = windowed(input_ids=ids).logits
    full_logits = full(input_ids=ids).logits
assert (logits - full_logits).abs().max() > 1e-2, "the window changes nothing at this length?"
save_logits(f"{FIX}/mistral_logits.safetensors", {"input_ids": ids, "logits": logits, "full_logits": full_logits})
print(open(f"{OUT}/config.json").read())
