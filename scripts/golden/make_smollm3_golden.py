"""Golden logits for kiln's SmolLM3 forward pass, from Hugging Face transformers and PEFT.

    $KILN_REFPY scripts/golden/make_smollm3_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

SmolLM3 is Llama with no rotary embedding on some layers ("NoPE"): config.json's
`no_rope_layers` holds 1 for a layer that rotates and 0 for one that does not, every fourth
layer by default (`no_rope_layer_interval` 4). Writes a tiny random SmolLM3ForCausalLM with 8
layers (two of them NoPE: 3 and 7), GQA 4/2, tied embeddings as the released 3B has, and its
logits:
  tests/fixtures/smollm3_tiny/               f32, one file, with kiln's tiny tokenizer
  tests/fixtures/smollm3_logits.safetensors  input_ids (i64 [2,T]), logits (f32 [2,T,V]),
                                             adapter.logits (with the adapter below)
  tests/fixtures/peft_adapter_smollm3/       a PEFT LoRA (r=8, alpha=16, all seven projections)
"""
import torch
from transformers import SmolLM3Config, SmolLM3ForCausalLM

from family_golden import FIX, input_ids, logits_with_adapter, save_logits, save_model, scaled_init

torch.manual_seed(0)
OUT = f"{FIX}/smollm3_tiny"
ADAPTER = f"{FIX}/peft_adapter_smollm3"

config = SmolLM3Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-6, rope_theta=5000000.0, tie_word_embeddings=True,
                       use_sliding_window=False, attention_bias=False, no_rope_layer_interval=4,
                       bos_token_id=506, eos_token_id=507, pad_token_id=None)
assert config.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0], config.no_rope_layers
model = SmolLM3ForCausalLM(config).eval()
scaled_init(model)
save_model(model, OUT)
ids = input_ids()
logits, adapter_logits = logits_with_adapter(
    SmolLM3ForCausalLM, OUT, ADAPTER,
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ids)
# The NoPE layers matter: the same weights with every layer rotating give other logits.
all_rope = SmolLM3ForCausalLM.from_pretrained(OUT, dtype=torch.float32,
                                              no_rope_layers=[1] * 8).eval()
with torch.no_grad():
    assert (all_rope(input_ids=ids).logits - logits).abs().max() > 1e-2
save_logits(f"{FIX}/smollm3_logits.safetensors", {"input_ids": ids, "logits": logits, "adapter.logits": adapter_logits})
print(open(f"{OUT}/config.json").read())
