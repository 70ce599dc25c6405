"""Golden logits for kiln's Phi-3 forward pass (fused qkv_proj and gate_up_proj, sliding window),
from transformers, with and without a PEFT adapter on the fused projections.

    $KILN_REFPY scripts/golden/make_phi3_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

Writes a tiny random Phi3ForCausalLM (GQA 4/2, sliding window 16, 40-token inputs) and:
  tests/fixtures/phi3_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/peft_adapter_phi3/       PEFT LoRA r=8 alpha=16 on qkv_proj and o_proj (the usual
                                          Phi-3 recipe), init_lora_weights=False so B is not zero
  tests/fixtures/phi3_logits.safetensors  input_ids, logits, adapter.logits
Scaled init as scripts/make_llama_golden.py.
"""
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from family_golden import FIX, input_ids, logits_with_adapter, save_logits, save_model, scaled_init

torch.manual_seed(0)
OUT = f"{FIX}/phi3_tiny"
ADAPTER = f"{FIX}/peft_adapter_phi3"

config = Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    original_max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                    sliding_window=16, tie_word_embeddings=False, bos_token_id=506, eos_token_id=507,
                    pad_token_id=511)
model = Phi3ForCausalLM(config).eval()
scaled_init(model)
save_model(model, OUT)
ids = input_ids()
logits, adapter_logits = logits_with_adapter(Phi3ForCausalLM, OUT, ADAPTER, ["qkv_proj", "o_proj"], ids)
save_logits(f"{FIX}/phi3_logits.safetensors", {"input_ids": ids, "logits": logits, "adapter.logits": adapter_logits})
print(open(f"{OUT}/config.json").read())
