"""Golden logits for kiln's Gemma (1) forward pass, from transformers, with and without a PEFT
adapter.

    $KILN_REFPY scripts/golden/make_gemma_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

A tiny random GemmaForCausalLM with the Gemma specifics in play: (1 + w) RMSNorm (two norms a
block, as Llama), embeddings scaled by √hidden, GELU (tanh), head_dim 32 with a hidden size of 64
and 4 heads, multi-query attention (one key/value head, as the 2B), tied embeddings. Writes:
  tests/fixtures/gemma_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/peft_adapter_gemma/       PEFT LoRA r=8 alpha=16 on all seven projections (init_lora_weights=False)
  tests/fixtures/gemma_logits.safetensors  input_ids, logits, adapter.logits
Scaled init as scripts/golden/make_llama_golden.py; norm weights N(0, 0.2²) (Gemma multiplies by 1 + w).
"""
import torch
from transformers import GemmaConfig, GemmaForCausalLM

from family_golden import FIX, input_ids, logits_with_adapter, save_logits, save_model, scaled_init

torch.manual_seed(0)
OUT = f"{FIX}/gemma_tiny"
ADAPTER = f"{FIX}/peft_adapter_gemma"

config = GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                     max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                     hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                     bos_token_id=506, eos_token_id=507, pad_token_id=511)
model = GemmaForCausalLM(config).eval()
scaled_init(model, gemma_norms=True)
save_model(model, OUT)
ids = input_ids()
logits, adapter_logits = logits_with_adapter(
    GemmaForCausalLM, OUT, ADAPTER,
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ids)
save_logits(f"{FIX}/gemma_logits.safetensors", {"input_ids": ids, "logits": logits, "adapter.logits": adapter_logits})
print(open(f"{OUT}/config.json").read())
