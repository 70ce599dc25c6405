"""Golden logits for Phi-4-mini's and Phi-3.5's RoPE: partial rotary (the first 3/4 of each head)
and LongRoPE (short factors up to original_max_position_embeddings, long factors beyond, cos/sin
scaled by sqrt(1 + ln(factor)/ln(original))), with tied embeddings, from transformers' Phi3ForCausalLM.

    $KILN_REFPY scripts/golden/make_phi4mini_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

Writes a tiny random Phi3ForCausalLM (GQA 4/2, head_dim 16 of which 12 rotate, original context
32 of 128, no window) and:
  tests/fixtures/phi4mini_tiny/               f32, with kiln's tiny tokenizer
  tests/fixtures/peft_adapter_phi4mini/       PEFT LoRA r=8 alpha=16 on qkv_proj and o_proj
  tests/fixtures/phi4mini_logits.safetensors:
    short.input_ids / short.logits   24 tokens: within the original context (short factors)
    input_ids / logits               40 tokens: past it (long factors for every position)
    cached.logits                    the 40 tokens decoded with a KV cache: 24 prefilled (short
                                     factors), then one at a time (long factors once past 32),
                                     each step's last logits [2, 16, vocab]
    adapter.logits                   the 40 tokens with the adapter
"""
import torch
from transformers import DynamicCache, Phi3Config, Phi3ForCausalLM

from family_golden import FIX, input_ids, logits_with_adapter, save_logits, save_model, scaled_init

torch.manual_seed(0)
OUT = f"{FIX}/phi4mini_tiny"
ADAPTER = f"{FIX}/peft_adapter_phi4mini"
ROT = 12  # 0.75 of head_dim 16
g = torch.Generator().manual_seed(3)
short_factor = (1.0 + 0.5 * torch.rand(ROT // 2, generator=g)).tolist()
long_factor = (1.0 + 6.0 * torch.rand(ROT // 2, generator=g)).tolist()

config = Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    original_max_position_embeddings=32, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                     "partial_rotary_factor": 0.75, "short_factor": short_factor,
                                     "long_factor": long_factor, "original_max_position_embeddings": 32},
                    sliding_window=None, tie_word_embeddings=True, bos_token_id=506, eos_token_id=507,
                    pad_token_id=511)
model = Phi3ForCausalLM(config).eval()
scaled_init(model)
with torch.no_grad():  # tied: N(0, 1) embeddings as the head give logits of 40; keep them near 4
    model.model.embed_tokens.weight.mul_(0.1)
save_model(model, OUT)
ids = input_ids()
short_ids = ids[:, :24]
base = Phi3ForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()
with torch.no_grad():
    short_logits = base(input_ids=short_ids).logits
    cache = DynamicCache(config=base.config)
    out = base(input_ids=short_ids, past_key_values=cache, use_cache=True)
    steps = []
    for t in range(24, 40):
        out = base(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits[:, -1])
    cached = torch.stack(steps, dim=1)
logits, adapter_logits = logits_with_adapter(Phi3ForCausalLM, OUT, ADAPTER, ["qkv_proj", "o_proj"], ids)
assert (cached - logits[:, 24:]).abs().max() > 1e-3  # the cache keeps the short-factor keys
save_logits(f"{FIX}/phi4mini_logits.safetensors",
            {"short.input_ids": short_ids, "short.logits": short_logits, "input_ids": ids, "logits": logits,
             "cached.logits": cached, "adapter.logits": adapter_logits})
print(open(f"{OUT}/config.json").read())
