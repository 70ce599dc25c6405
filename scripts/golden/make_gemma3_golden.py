"""Golden logits for kiln's Gemma 3 (text) forward pass, from transformers, with and without a
PEFT adapter.

    $KILN_REFPY scripts/golden/make_gemma3_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

A tiny random Gemma3ForCausalLM (`gemma3_text`) with every Gemma 3 specific in play on 40-token
inputs: (1 + w) RMSNorm, four norms a block, and (1 + w) q/k norms per head before RoPE;
embeddings scaled by √hidden; GELU (tanh); query_pre_attn_scalar 24 ≠ head_dim 16; local layers
(sliding window 8) and global ones from `layer_types`, the local ones with their own RoPE base
(10,000) and the global ones with rope_theta 1e6 and linear scaling (factor 2); no soft caps;
tied embeddings. Writes:
  tests/fixtures/gemma3_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/peft_adapter_gemma3/       PEFT LoRA r=8 alpha=16 on q/k/v/o (init_lora_weights=False)
  tests/fixtures/gemma3_logits.safetensors  input_ids, logits, adapter.logits
Scaled init as scripts/golden/make_llama_golden.py; norm weights N(0, 0.2²) (Gemma multiplies by 1 + w).
"""
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from family_golden import FIX, input_ids, logits_with_adapter, save_logits, save_model, scaled_init

torch.manual_seed(0)
OUT = f"{FIX}/gemma3_tiny"
ADAPTER = f"{FIX}/peft_adapter_gemma3"

config = Gemma3TextConfig(
    vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=5,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
    max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=8,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                 "full_attention"],
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    bos_token_id=506, eos_token_id=507, pad_token_id=511)
model = Gemma3ForCausalLM(config).eval()
scaled_init(model, gemma_norms=True)
save_model(model, OUT)
ids = input_ids()
logits, adapter_logits = logits_with_adapter(Gemma3ForCausalLM, OUT, ADAPTER, ["q_proj", "k_proj", "v_proj", "o_proj"],
                                             ids, attn_implementation="eager")
save_logits(f"{FIX}/gemma3_logits.safetensors", {"input_ids": ids, "logits": logits, "adapter.logits": adapter_logits})
print(open(f"{OUT}/config.json").read())
