"""Golden GGUF facts for tests/gguf.rs, from llama.cpp's own converter and quantizer.

    cargo build --release
    $KILN_REFPY scripts/golden/make_gguf_golden.py /path/to/llama.cpp
    ONLY=qwen3 $KILN_REFPY scripts/golden/make_gguf_golden.py   # one model's entry, the rest kept

Reference versions: llama.cpp 0c1e57098bba43ac29e6e3b677cdceebdd22334f (vendored in PyPI's
llama-cpp-python 0.3.36 sdist; CPU tools built with cmake as docs/reference-tools.md
says) with its own gguf-py; torch 2.11.0, transformers 5.17.0, numpy.

For seven random models made by `kiln init-tiny --config` (tests/fixtures/configs/llama_gguf_k.json:
rows of 256 so K-quants apply, Llama 3.1 rope scaling; llama_gguf_tied.json: tied embeddings;
qwen2_gguf.json: Qwen 2 with q/k/v biases; mistral_gguf.json: Mistral, `llama` in llama.cpp,
with GQA 8/2 so the K permutation uses the KV heads; phi3_gguf.json: Phi-3's fused qkv_proj and
gate_up_proj, whose tokenizer_config names GPT2Tokenizer so the converter reads tokenizer.json as
it does for Phi-4; gemma2_gguf.json: Gemma 2, norms stored +1, soft caps; mixtral_gguf.json: 4 experts, top-2, stacked
into ffn_*_exps; qwen3_gguf.json: Qwen 3, per-head q/k norms, head_dim 32 != 256 / 4;
gemma_gguf.json: Gemma, norms stored +1, one key/value head; gemma3_gguf.json: Gemma 3, q/k
norms, 6 layers (five local with RoPE base 10,000, window 16; one global with base 1e6 and linear
scaling 2), in the transformers 4 layout; phi4mini_gguf.json: Phi-4-mini's RoPE, 48 of 64 dims
rotated, LongRoPE factors (rope_factors_long/short tensors, attn_factor) with an original context
of 64, tied embeddings, no window; qwen3moe_gguf.json: Qwen3-MoE, 4 experts of 256, top-2,
norm_topk_prob, q/k norms, stacked into ffn_*_exps with expert_feed_forward_length),
with kiln's tiny byte-level BPE tokenizer (Llama 3's pre-tokenizer regex):
  * convert_hf_to_gguf.py --outtype f32/f16/bf16/q8_0. The tiny tokenizer's vocabulary is not
    in the converter's hash table, so `get_vocab_base_pre` is patched to return "llama-bpe",
    the name of its regex; and AutoTokenizer is made to load tokenizer.json as written
    (PreTrainedTokenizerFast), since transformers 5 otherwise rebuilds a Qwen2Tokenizer for a
    qwen2 model and adds a token (docs/reference-tools.md pitfall 6); Gemma 2's converter reads only
    tokenizer.model, so it is pointed at its tokenizer.json reader (`_set_vocab_gpt2`, Gemma's too). Nothing
    else is changed.
  * llama-quantize of the F32 file to Q8_0, Q4_0, Q4_K_M, Q6_K, Q2_K.
Recorded per file: every tensor's type, dims and FNV-1a-64 of its bytes, and the metadata (small
values as is, arrays as count + FNV of their JSON). Then kiln's own exports of the same models
are run through llama-completion (greedy, 12 tokens) and the text's bytes are recorded (hex), so the test can
check that kiln reading its GGUF back generates what llama.cpp generates from it.
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
BIN = os.path.join(LLAMA, "build", "bin")
sys.path.insert(0, os.path.join(LLAMA, "gguf-py"))
from gguf import GGUFReader  # noqa: E402

MODELS = {"k": ("llama_gguf_k.json", 3), "tied": ("llama_gguf_tied.json", 4), "qwen2": ("qwen2_gguf.json", 5),
          "mistral": ("mistral_gguf.json", 6), "phi3": ("phi3_gguf.json", 7),
          "gemma2": ("gemma2_gguf.json", 8), "mixtral": ("mixtral_gguf.json", 9),
          "qwen3": ("qwen3_gguf.json", 10), "gemma": ("gemma_gguf.json", 11),
          "gemma3": ("gemma3_gguf.json", 12), "phi4mini": ("phi4mini_gguf.json", 13),
          "qwen3moe": ("qwen3moe_gguf.json", 14)}
# llama.cpp picks Phi-3's long RoPE factors by the context size, not the sequence: keep it within
# the original context so that it computes the prompt as kiln and transformers do.
GREEDY_ARGS = {"phi4mini": ["-c", "64"]}
CONVERT_TYPES = ["f32", "f16", "bf16", "q8_0"]
QUANTIZE_TYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "Q2_K"]
KILN_PRESETS = ["f32", "f16", "q8_0", "q4_0", "q4_k_m", "q6_k", "q2_k"]
PROMPT = "Give three tips for staying healthy."


def fnv(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def describe(path):
    r = GGUFReader(path)
    meta = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        types = [t.name for t in field.types]
        value = field.contents()
        if isinstance(value, list):
            meta[name] = {"types": types, "count": len(value),
                          "fnv": fnv(json.dumps(value, ensure_ascii=False).encode())}
        else:
            meta[name] = {"types": types, "value": value}
    tensors = {}
    for t in r.tensors:
        tensors[t.name] = {"type": t.tensor_type.name, "dims": [int(d) for d in t.shape],
                           "fnv": fnv(bytes(t.data.tobytes()))}
    return {"metadata": meta, "tensors": tensors}


def convert(model_dir, outtype, out):
    code = (
        "import sys, runpy\n"
        f"sys.path.insert(0, {LLAMA!r}); sys.path.insert(0, {os.path.join(LLAMA, 'gguf-py')!r})\n"
        "import conversion.base as b\n"
        "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'llama-bpe'\n"
        "import transformers\n"
        "transformers.AutoTokenizer.from_pretrained = transformers.PreTrainedTokenizerFast.from_pretrained\n"
        "import conversion.gemma as gemma\n"
        "gemma.Gemma2Model.set_vocab = lambda self: self._set_vocab_gpt2()\n"
        "gemma.GemmaModel.set_vocab = lambda self: self._set_vocab_gpt2()\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {model_dir!r}, '--outtype', {outtype!r}, '--outfile', {out!r}]\n"
        f"runpy.run_path({os.path.join(LLAMA, 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def greedy(gguf_file, *extra):
    # llama-completion at this commit now and then exits 0 before its output is all flushed
    # (nothing, or part of it): retry until the closing blank line is there.
    for _ in range(10):
        out = subprocess.run(
            [os.path.join(BIN, "llama-completion"), "-m", gguf_file, "-p", PROMPT, "-n", "12", "--temp", "0",
             "-no-cnv", "--no-warmup", "-t", "1", *extra],
            check=True, capture_output=True)
        if out.stdout.endswith(b"\n\n"):
            break
    assert out.stdout.startswith(PROMPT.encode()), (gguf_file, out.stdout, out.stderr[-2000:])
    return out.stdout[len(PROMPT):].hex()


# The families whose adapters are compared, and whether llama.cpp computes the tiny model as kiln
# does (so that generation can be compared too).
ADAPTER_FAMILIES = [("qwen2", True), ("phi3", False), ("gemma2", False), ("mixtral", True),
                    ("qwen3", True), ("gemma", True), ("gemma3", False), ("phi4mini", False),
                    ("qwen3moe", True)]
# Not generated with phi4mini: prompt and answer (~45 tokens) cross its fixture's original context
# of 32, where transformers and kiln switch to the long factors and llama.cpp, which picks them by
# context size, does not (the GGUF fixture's generation is compared, within its context of 64).
ADAPTER_GREEDY_ARGS = {}


def adapter_golden(work, out=None, only=None):
    """tests/fixtures/peft_adapter_a on llama_tiny_a: convert_lora_to_gguf.py's file, and
    llama.cpp's greedy text with kiln's base GGUF and kiln's adapter GGUF (plain and rsLoRA)."""
    base_dir = os.path.join(ROOT, "tests", "fixtures", "llama_tiny_a")
    peft = os.path.join(ROOT, "tests", "fixtures", "peft_adapter_a")
    if only is not None:
        return family_adapters(work, out, only)
    out = {}
    for outtype in ["f32", "q8_0"]:
        ref = os.path.join(work, f"lora-{outtype}.gguf")
        subprocess.run([sys.executable, os.path.join(LLAMA, "convert_lora_to_gguf.py"), peft, "--base", base_dir,
                        "--outtype", outtype, "--outfile", ref], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": os.path.join(LLAMA, "gguf-py")})
        out[f"convert_lora_{outtype}"] = describe(ref)
    base = os.path.join(work, "base", "model.gguf")
    subprocess.run([KILN, "export", "gguf", "--model", base_dir, "-o", base, "--quant", "f32"],
                   check=True, capture_output=True)
    rslora = os.path.join(work, "peft_rslora")
    shutil.copytree(peft, rslora)
    cfg = json.load(open(os.path.join(rslora, "adapter_config.json")))
    cfg["use_rslora"] = True
    json.dump(cfg, open(os.path.join(rslora, "adapter_config.json"), "w"))
    for name, adapter in [("plain", peft), ("rslora", rslora)]:
        lora = os.path.join(work, f"kiln-lora-{name}", "adapter.gguf")
        subprocess.run([KILN, "export", "gguf-adapter", "--adapter", adapter, "--model", base_dir, "-o", lora],
                       check=True, capture_output=True)
        out[f"llama_cpp_greedy_{name}"] = greedy(base, "--lora", lora)
    out["llama_cpp_greedy_base"] = greedy(base)
    # Other families: Qwen 2 and Phi-3 / Gemma 2 (no Q/K permutation of lora_b), Mixtral (llama,
    # permuted). Generation is compared where llama.cpp computes the model as kiln does: not for
    # the Phi-3 fixture (llama.cpp drops its window of 16) nor the Gemma 2 one (its
    # query_pre_attn_scalar is not head_dim).
    return family_adapters(work, out, [f for f, _ in ADAPTER_FAMILIES])


def family_adapters(work, out, families):
    """convert_lora_to_gguf.py's file for each family's PEFT fixture, and llama.cpp's greedy text
    with kiln's base and adapter GGUFs where llama.cpp computes the model as kiln does."""
    for family, generate in [(f, g) for f, g in ADAPTER_FAMILIES if f in families]:
        fam_dir = os.path.join(ROOT, "tests", "fixtures", f"{family}_tiny")
        fam_peft = os.path.join(ROOT, "tests", "fixtures", f"peft_adapter_{family}")
        ref = os.path.join(work, f"{family}-lora-f32.gguf")
        subprocess.run([sys.executable, os.path.join(LLAMA, "convert_lora_to_gguf.py"), fam_peft, "--base", fam_dir,
                        "--outtype", "f32", "--outfile", ref], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": os.path.join(LLAMA, "gguf-py")})
        out[f"{family}_convert_lora_f32"] = describe(ref)
        if not generate:
            out.pop(f"{family}_llama_cpp_greedy", None)
            continue
        fam_base = os.path.join(work, f"{family}-base", "model.gguf")
        subprocess.run([KILN, "export", "gguf", "--model", fam_dir, "-o", fam_base, "--quant", "f32"],
                       check=True, capture_output=True)
        lora = os.path.join(work, f"kiln-{family}-lora", "adapter.gguf")
        subprocess.run([KILN, "export", "gguf-adapter", "--adapter", fam_peft, "--model", fam_dir, "-o", lora],
                       check=True, capture_output=True)
        out[f"{family}_llama_cpp_greedy"] = greedy(fam_base, "--lora", lora, *ADAPTER_GREEDY_ARGS.get(family, []))
    return out


TOKENIZER_TEXTS = [
    "Hello world! I'm here, you're there; we'll see 12345 and 3.14159.",
    "  two leading spaces\n\n\tand a tab,   three spaces  ",
    "Unicode: naïve café, 日本語のテキスト, emoji 🦙🚀 and Ελληνικά.",
    "<|user|>\nWho are you?<|end|>\n<|assistant|>\nI am Vicuna.<|end|>",
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>",
    "def f(x):\n    return x ** 2  # square\n",
]


def tokenizer_golden(work):
    """llama-tokenize's ids for TOKENIZER_TEXTS with the vocabulary kiln exports for the fixture
    tokenizers (a one-layer random model carries each)."""
    from tiny_carrier import tiny_carrier
    out = {"texts": TOKENIZER_TEXTS}
    for name in ["llama3-instruct", "qwen2.5", "phi3"]:
        model, _ = tiny_carrier(KILN, work, f"tok-{name}", name)
        gguf_file = os.path.join(work, f"tok-{name}", "vocab.gguf")
        subprocess.run([KILN, "export", "gguf", "--model", model, "-o", gguf_file, "--quant", "f16", "--name", name],
                       check=True, capture_output=True)
        ids = []
        for text in TOKENIZER_TEXTS:
            r = subprocess.run([os.path.join(BIN, "llama-tokenize"), "-m", gguf_file, "-p", text, "--ids",
                                "--log-disable", "--no-escape"],
                               check=True, capture_output=True)
            ids.append(json.loads(r.stdout.decode().strip().splitlines()[-1]))
        out[name] = ids
    return out


def main():
    dest = os.path.join(ROOT, "tests", "fixtures", "gguf_golden.json")
    # ONLY=qwen3 (comma-separated keys): regenerate those models' entries and keep the rest of
    # the existing file as it is.
    only = [k for k in os.environ.get("ONLY", "").split(",") if k]
    if only:
        golden = json.load(open(dest))
    else:
        golden = {"llama_cpp_commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f", "prompt": PROMPT, "models": {}}
    work = tempfile.mkdtemp()
    tiny = os.path.join(work, "tiny")
    subprocess.run([KILN, "init-tiny", "-o", tiny], check=True, capture_output=True)
    for key, (config, seed) in MODELS.items():
        if only and key not in only:
            continue
        model = os.path.join(work, key)
        subprocess.run([KILN, "init-tiny", "--config", os.path.join(ROOT, "tests", "fixtures", "configs", config),
                        "-o", model, "--seed", str(seed)], check=True, capture_output=True)
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(os.path.join(tiny, f), model)
        if key in ("phi3", "phi4mini"):
            tc = json.load(open(os.path.join(model, "tokenizer_config.json")))
            tc["tokenizer_class"] = "GPT2Tokenizer"
            json.dump(tc, open(os.path.join(model, "tokenizer_config.json"), "w"), indent=2)
        entry = {"config": config, "seed": seed, "convert": {}, "quantize": {}, "llama_cpp_greedy": {}}
        f32 = os.path.join(work, f"{key}-f32.gguf")
        for outtype in CONVERT_TYPES:
            out = os.path.join(work, f"{key}-{outtype}.gguf")
            convert(model, outtype, out)
            entry["convert"][outtype] = describe(out)
        for qtype in QUANTIZE_TYPES:
            out = os.path.join(work, f"{key}-{qtype}.gguf")
            subprocess.run([os.path.join(BIN, "llama-quantize"), f32, out, qtype], check=True, capture_output=True)
            entry["quantize"][qtype.lower()] = describe(out)
        for preset in KILN_PRESETS:
            out = os.path.join(work, f"{key}-kiln-{preset}", "model.gguf")
            subprocess.run([KILN, "export", "gguf", "--model", model, "-o", out, "--quant", preset],
                           check=True, capture_output=True)
            entry["llama_cpp_greedy"][preset] = greedy(out, *GREEDY_ARGS.get(key, []))
        golden["models"][key] = entry
    if not only:
        golden["adapter"] = adapter_golden(work)
        golden["tokenizers"] = tokenizer_golden(work)
    else:
        # ONLY=... also redoes those families' adapter entries, where they have one.
        adapter_golden(work, golden["adapter"], only)
    with open(dest, "w") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
    shutil.rmtree(work)
    print("wrote", dest)


if __name__ == "__main__":
    main()
