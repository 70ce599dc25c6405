"""Golden per-tensor types and bytes of llama-quantize's K-quant mixes at real model depths.

    cargo build --release
    python3 scripts/golden/make_gguf_depth_golden.py /path/to/llama.cpp

llama-quantize picks more bits for some `attn_v` and `ffn_down` tensors by layer (`use_more_bits`:
the first and last eighth of the blocks and every third between). Tiny test models have too few
layers for that to show, so this takes real configs at their real depths: Llama-3.2-1B (16),
TinyLlama-1.1B (22; written from its published config), gemma-2-2b-it (26), Qwen2.5-7B (28),
SmolLM2-135M-Instruct (30), Mistral-7B-v0.3 (32), phi-4 (40), gemma-2-9b (42). Each keeps its
architecture, depth, grouped-query ratio (Qwen2.5-7B's 7 becomes 4: llama-quantize reads only
whether it is >= 4), tied or untied output, and whether each kind of row
(hidden, heads x head_dim, intermediate) is a multiple of 256 (which decides the K-quant
fallbacks); the widths are narrowed so the models stay small (2 key/value heads, head_dim and
widths of 16..768, the tiny tokenizer's vocabulary of 512). The narrowed configs are written to
tests/fixtures/configs/depth/ and are what the test builds (random weights, seed 11).

For each: kiln's F32 export (byte-identical to convert_hf_to_gguf.py's, tests/gguf.rs), then
`llama-quantize` to Q4_K_M, Q6_K and Q2_K; recorded: every tensor's type and FNV-1a-64 of its bytes.

Reference: llama.cpp 0c1e57098bba43ac29e6e3b677cdceebdd22334f (PyPI llama-cpp-python 0.3.36
sdist, CPU build as docs/reference-tools.md says) with its gguf-py.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILN = os.path.join(ROOT, "target", "release", "kiln")
LLAMA = sys.argv[1] if len(sys.argv) > 1 else "/tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
sys.path.insert(0, os.path.join(LLAMA, "gguf-py"))
from gguf import GGUFReader  # noqa: E402
from make_gguf_golden import fnv  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data", "configs")
TINYLLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
             "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
             "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
             "hidden_act": "silu"}
CONFIGS = ["Llama-3.2-1B", "TinyLlama-1.1B", "gemma-2-2b-it", "Qwen2.5-7B", "SmolLM2-135M-Instruct",
           "Mistral-7B-v0.3", "phi-4", "gemma-2-9b"]
PRESETS = ["Q4_K_M", "Q6_K", "Q2_K"]
SEED = 11


def narrow_width(heads, real, minimum=8):
    """The smallest even head width w >= minimum with heads*w a multiple of 32, and a multiple of
    256 exactly when `real` is."""
    w = minimum
    while True:
        n = heads * w
        if n % 32 == 0 and (n % 256 == 0) == (real % 256 == 0):
            return w
        w += 2


def narrow(cfg):
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    gqa = heads // kv
    if gqa not in (1, 2, 3, 4, 8):
        gqa = 4 if gqa >= 4 else 2  # llama-quantize reads only whether it is >= 4 (Qwen2.5-7B: 7)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv2 = 2
    heads2 = gqa * kv2
    out = dict(cfg)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path", "transformers.js_config"):
        out.pop(k, None)
    out.update({"num_attention_heads": heads2, "num_key_value_heads": kv2, "vocab_size": 512,
                "bos_token_id": 506, "eos_token_id": 507, "torch_dtype": "float32"})
    if "head_dim" in cfg and cfg["head_dim"] is not None:
        # Gemma 2: heads x head_dim is its own row kind, apart from hidden.
        out["head_dim"] = narrow_width(heads2, heads * head_dim)
        out["hidden_size"] = 256 if cfg["hidden_size"] % 256 == 0 else 96
        if cfg.get("query_pre_attn_scalar"):
            out["query_pre_attn_scalar"] = out["head_dim"]
    else:
        out["hidden_size"] = heads2 * narrow_width(heads2, cfg["hidden_size"])
    out["intermediate_size"] = 256 if cfg["intermediate_size"] % 256 == 0 else 96
    if out["model_type"] == "phi3":
        out["original_max_position_embeddings"] = out.get("original_max_position_embeddings", 4096)
    return out


def describe(path):
    r = GGUFReader(path)
    return {t.name: f"{t.tensor_type.name}:{fnv(bytes(t.data.tobytes()))}" for t in r.tensors}


def main():
    quantize = os.path.join(LLAMA, "build", "bin", "llama-quantize")
    golden = {"llama_cpp_commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f", "seed": SEED, "models": {}}
    work = tempfile.mkdtemp()
    tiny = os.path.join(work, "tiny")
    subprocess.run([KILN, "init-tiny", "-o", tiny], check=True, capture_output=True)
    for name in CONFIGS:
        real = TINYLLAMA if name == "TinyLlama-1.1B" else json.load(open(os.path.join(SHARED, name, "config.json")))
        cfg = narrow(real)
        cfg_path = os.path.join(ROOT, "tests", "fixtures", "configs", "depth", f"{name}.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=1)
        model = os.path.join(work, name)
        subprocess.run([KILN, "init-tiny", "--config", cfg_path, "-o", model, "--seed", str(SEED)],
                       check=True, capture_output=True)
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(os.path.join(tiny, f), model)
        f32 = os.path.join(work, f"{name}-f32", "model.gguf")
        subprocess.run([KILN, "export", "gguf", "--model", model, "-o", f32, "--quant", "f32"],
                       check=True, capture_output=True)
        entry = {"layers": real["num_hidden_layers"], "quantize": {}}
        for preset in PRESETS:
            out = os.path.join(work, f"{name}-{preset}.gguf")
            subprocess.run([quantize, f32, out, preset], check=True, capture_output=True)
            entry["quantize"][preset.lower()] = describe(out)
            os.remove(out)
        golden["models"][name] = entry
        shutil.rmtree(model)
        shutil.rmtree(os.path.dirname(f32))
        print(name, real["num_hidden_layers"], "layers")
    dest = os.path.join(ROOT, "tests", "fixtures", "gguf_depth_golden.json")
    with open(dest, "w") as f:
        json.dump(golden, f, indent=0)
    shutil.rmtree(work)
    print("wrote", dest)


if __name__ == "__main__":
    main()
