"""Golden logits for kiln's Mixtral forward pass (sparse mixture of experts), from transformers,
with and without a PEFT adapter on the attention projections.

    $KILN_REFPY scripts/golden/make_mixtral_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

A tiny random MixtralForCausalLM (4 experts, top-2 routing, GQA 4/2) saved as transformers 5
saves it (per-expert `block_sparse_moe.experts.E.w1/w2/w3`), and:
  tests/fixtures/mixtral_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/peft_adapter_mixtral/       PEFT LoRA r=8 alpha=16 on q/k/v/o (init_lora_weights=False)
  tests/fixtures/mixtral_logits.safetensors  input_ids, logits, adapter.logits
Scaled init as scripts/golden/make_llama_golden.py; the router N(0, 1/hidden) so routing is not uniform.
"""
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from family_golden import FIX, input_ids, logits_with_adapter, save_logits, save_model, scaled_init

torch.manual_seed(0)
OUT = f"{FIX}/mixtral_tiny"
ADAPTER = f"{FIX}/peft_adapter_mixtral"

config = MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       rms_norm_eps=1e-5, rope_theta=1000000.0, num_local_experts=4, num_experts_per_tok=2,
                       sliding_window=None, tie_word_embeddings=False, bos_token_id=506, eos_token_id=507)
model = MixtralForCausalLM(config).eval()
scaled_init(model)
save_model(model, OUT)
ids = input_ids()
logits, adapter_logits = logits_with_adapter(MixtralForCausalLM, OUT, ADAPTER, ["q_proj", "k_proj", "v_proj", "o_proj"], ids)
save_logits(f"{FIX}/mixtral_logits.safetensors", {"input_ids": ids, "logits": logits, "adapter.logits": adapter_logits})
print(open(f"{OUT}/config.json").read())
