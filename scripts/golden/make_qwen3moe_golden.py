"""Golden logits for kiln's Qwen3-MoE forward pass (128-expert layouts in miniature: many
experts, top-k routing with `norm_topk_prob`, per-head q/k norms), from transformers, with and
without a PEFT adapter on the attention projections.

    $KILN_REFPY scripts/golden/make_qwen3moe_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

A tiny random Qwen3MoeForCausalLM (8 experts, top-3, experts of moe_intermediate_size 40 !=
intermediate_size, explicit head_dim 24, GQA 4/2) saved as transformers saves it (per-expert
`mlp.experts.E.{gate,up,down}_proj`), and:
  tests/fixtures/qwen3moe_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/peft_adapter_qwen3moe/       PEFT LoRA r=8 alpha=16 on q/k/v/o (init_lora_weights=False)
  tests/fixtures/qwen3moe_logits.safetensors  input_ids, logits, adapter.logits,
                                              unnormalized.logits (the same weights with
                                              norm_topk_prob = false)
Scaled init as scripts/golden/make_llama_golden.py; the router N(0, 1/hidden) so routing is not uniform.
"""
import json
import shutil

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from family_golden import FIX, input_ids, logits_with_adapter, save_logits, save_model, scaled_init

torch.manual_seed(0)
OUT = f"{FIX}/qwen3moe_tiny"
ADAPTER = f"{FIX}/peft_adapter_qwen3moe"

config = Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                        num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1,
                        mlp_only_layers=[], tie_word_embeddings=False, use_sliding_window=False,
                        attention_bias=False, bos_token_id=506, eos_token_id=507)
model = Qwen3MoeForCausalLM(config).eval()
scaled_init(model)
save_model(model, OUT)
ids = input_ids()
logits, adapter_logits = logits_with_adapter(Qwen3MoeForCausalLM, OUT, ADAPTER, ["q_proj", "k_proj", "v_proj", "o_proj"], ids)

# The same weights routed without renormalizing the top-k probabilities.
UNNORM = "/tmp/qwen3moe_unnormalized"
shutil.rmtree(UNNORM, ignore_errors=True)
shutil.copytree(OUT, UNNORM)
cfg = json.load(open(f"{UNNORM}/config.json"))
cfg["norm_topk_prob"] = False
json.dump(cfg, open(f"{UNNORM}/config.json", "w"), indent=2)
with torch.no_grad():
    unnormalized = Qwen3MoeForCausalLM.from_pretrained(UNNORM, dtype=torch.float32).eval()(input_ids=ids).logits

save_logits(f"{FIX}/qwen3moe_logits.safetensors", {"input_ids": ids, "logits": logits, "adapter.logits": adapter_logits,
                                                    "unnormalized.logits": unnormalized})
print(open(f"{OUT}/config.json").read())
