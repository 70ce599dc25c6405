"""llama.cpp's greedy text with an adapter that kiln trained on a GGUF base, for tests/gguf_base.rs.

    cargo build --release
    $KILN_REFPY scripts/golden/make_gguf_base_golden.py [/path/to/llama.cpp]

The test's steps, by the kiln binary: a tiny Llama (seed 11) exported as Q8_0 GGUF, 6 steps of
tests/fixtures/gguf_base/recipe.toml.in on it (validation: the first 8 Alpaca rows), the adapter
exported against the same GGUF; then llama-completion -m base.gguf --lora adapter.gguf, greedy, 12
tokens, one thread. Writes tests/fixtures/gguf_base/golden.json (the text as hex bytes). llama.cpp
as scripts/golden/make_gguf_golden.py builds it (commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f).
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILN = os.path.join(ROOT, "target", "release", "kiln")
LLAMA = sys.argv[1] if len(sys.argv) > 1 else "/tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
PROMPT = "Give three tips for staying healthy."


def kiln(*args):
    subprocess.run([KILN, *args], check=True, capture_output=True, cwd=ROOT)


def main():
    work = tempfile.mkdtemp()
    tiny = os.path.join(work, "tiny")
    kiln("init-tiny", "-o", tiny, "--seed", "11")
    base = os.path.join(work, "base.gguf")
    kiln("export", "gguf", "--model", tiny, "-o", base, "--quant", "q8_0", "--no-modelfile")
    val = os.path.join(work, "val.jsonl")
    rows = open(os.path.join(ROOT, "datasets", "alpaca_tiny.jsonl")).read().splitlines()
    open(val, "w").write("\n".join(rows[:8]))
    recipe = os.path.join(work, "recipe.toml")
    text = open(os.path.join(ROOT, "tests", "fixtures", "gguf_base", "recipe.toml.in")).read()
    open(recipe, "w").write(text.replace("{base}", base).replace("{val}", val).replace("{steps}", "6")
                            .replace("{out}", os.path.join(work, "run")))
    kiln("train", recipe, "-q")
    lora = os.path.join(work, "lora", "adapter.gguf")
    kiln("export", "gguf-adapter", "--adapter", os.path.join(work, "run", "adapter"), "--model", base, "-o", lora)
    for _ in range(10):  # llama-completion now and then exits before flushing (make_gguf_golden.py)
        out = subprocess.run([os.path.join(LLAMA, "build", "bin", "llama-completion"), "-m", base, "--lora", lora,
                              "-p", PROMPT, "-n", "12", "--temp", "0", "-no-cnv", "--no-warmup", "-t", "1"],
                             check=True, capture_output=True)
        if out.stdout.endswith(b"\n\n"):
            break
    assert out.stdout.startswith(PROMPT.encode()), out.stderr[-2000:]
    golden = {"llama_cpp_commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f", "prompt": PROMPT,
              "llama_cpp_greedy_with_adapter": out.stdout[len(PROMPT):].hex()}
    with open(os.path.join(ROOT, "tests", "fixtures", "gguf_base", "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
    print(golden, bytes.fromhex(golden["llama_cpp_greedy_with_adapter"]))


if __name__ == "__main__":
    main()
