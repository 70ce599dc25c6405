"""Golden logits for kiln's Qwen 3 forward pass, from Hugging Face transformers and PEFT.

    $KILN_REFPY scripts/golden/make_qwen3_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

Writes a tiny random Qwen3ForCausalLM as transformers saves it (per-head q_norm / k_norm before
RoPE, explicit head_dim 24 != hidden 64 / 4 heads, GQA 4/2, untied embeddings, rope_theta 1e6,
no biases, no sliding window) and its logits:
  tests/fixtures/qwen3_tiny/               f32, one file, with kiln's tiny tokenizer
  tests/fixtures/qwen3_logits.safetensors  input_ids (i64 [2,T]), logits (f32 [2,T,V]),
                                           adapter.logits (with the adapter below)
  tests/fixtures/peft_adapter_qwen3/       a PEFT LoRA (r=8, alpha=16, all seven projections,
                                           init_lora_weights=False so B is not zero)
The q/k norms get 1 + N(0, 0.2²) as every norm (family_golden.scaled_init), so that dropping
them shows in the logits.
"""
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from family_golden import FIX, input_ids, logits_with_adapter, save_logits, save_model, scaled_init

torch.manual_seed(0)
OUT = f"{FIX}/qwen3_tiny"
ADAPTER = f"{FIX}/peft_adapter_qwen3"

config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                     max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     tie_word_embeddings=False, use_sliding_window=False, attention_bias=False,
                     bos_token_id=506, eos_token_id=507)
model = Qwen3ForCausalLM(config).eval()
scaled_init(model)
save_model(model, OUT)
ids = input_ids()
logits, adapter_logits = logits_with_adapter(
    Qwen3ForCausalLM, OUT, ADAPTER,
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ids)
save_logits(f"{FIX}/qwen3_logits.safetensors", {"input_ids": ids, "logits": logits, "adapter.logits": adapter_logits})
print(open(f"{OUT}/config.json").read())
