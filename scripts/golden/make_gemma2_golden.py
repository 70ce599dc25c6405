"""Golden logits for kiln's Gemma 2 forward pass, from transformers, with and without a PEFT
adapter.

    $KILN_REFPY scripts/golden/make_gemma2_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

A tiny random Gemma2ForCausalLM with every Gemma 2 specific in play on 40-token inputs: (1 + w)
RMSNorm and four norms per block, embeddings scaled by √hidden, GELU (tanh), query_pre_attn_scalar
24 ≠ head_dim 16, attention and final logit soft-capping at caps small enough to bite (5 and 8),
local (sliding window 8) and global layers alternating, tied embeddings. Writes:
  tests/fixtures/gemma2_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/peft_adapter_gemma2/       PEFT LoRA r=8 alpha=16 on q/k/v/o (init_lora_weights=False)
  tests/fixtures/gemma2_logits.safetensors  input_ids, logits, adapter.logits
Scaled init as scripts/golden/make_llama_golden.py; norm weights N(0, 0.2²) (Gemma multiplies by 1 + w).
"""
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from family_golden import FIX, input_ids, logits_with_adapter, save_logits, save_model, scaled_init

torch.manual_seed(0)
OUT = f"{FIX}/gemma2_tiny"
ADAPTER = f"{FIX}/peft_adapter_gemma2"

config = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                      max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=8,
                      attn_logit_softcapping=5.0, final_logit_softcapping=8.0,
                      hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                      bos_token_id=506, eos_token_id=507, pad_token_id=511)
model = Gemma2ForCausalLM(config).eval()
scaled_init(model, gemma_norms=True)
save_model(model, OUT)
ids = input_ids()
logits, adapter_logits = logits_with_adapter(Gemma2ForCausalLM, OUT, ADAPTER, ["q_proj", "k_proj", "v_proj", "o_proj"],
                                             ids, attn_implementation="eager")
save_logits(f"{FIX}/gemma2_logits.safetensors", {"input_ids": ids, "logits": logits, "adapter.logits": adapter_logits})
print(open(f"{OUT}/config.json").read())
