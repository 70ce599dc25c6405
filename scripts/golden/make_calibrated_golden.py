"""Golden bytes of llama-quantize --imatrix for tests/gguf.rs (calibrated export).

    cargo build --release
    $KILN_REFPY scripts/golden/make_calibrated_golden.py /path/to/llama.cpp

Reference: llama.cpp 0c1e57098bba43ac29e6e3b677cdceebdd22334f (vendored in PyPI's
llama-cpp-python 0.3.36 sdist, CPU tools built as docs/reference-tools.md says) with
its gguf-py.

For two of make_gguf_golden.py's random models (`k`: rows of 256, so Q4_K and Q6_K; `tied`: rows
of 64 and 128, so Q4_K falls back to Q5_0 and Q6_K to Q8_0), kiln measures an importance matrix
on the first 24 rows of datasets/alpaca_tiny.jsonl (`kiln eval --imatrix`; the files are kept in
tests/fixtures/gguf_calibrated/ so the test does not depend on measuring it again), kiln exports
the model as F32, and llama-quantize quantizes that file under the matrix to Q4_K_M, Q6_K and
Q2_K (Q2_K, Q3_K, Q4_K, Q6_K; on `tied`, Q4_0, Q5_0 and Q8_0).
Recorded: every tensor's type and the FNV-1a-64 of its bytes.
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
from make_gguf_golden import fnv  # noqa: E402

MODELS = {"k": ("llama_gguf_k.json", 3), "tied": ("llama_gguf_tied.json", 4)}
PRESETS = ["Q4_K_M", "Q6_K", "Q2_K"]
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "gguf_calibrated")


def run(*args, **kw):
    subprocess.run(list(args), check=True, capture_output=True, **kw)


def main():
    os.makedirs(FIXTURES, exist_ok=True)
    env = dict(os.environ, LD_LIBRARY_PATH=BIN)
    golden = {"llama_cpp_commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f",
              "calibration": "datasets/alpaca_tiny.jsonl, first 24 rows (kiln eval --imatrix)", "models": {}}
    with tempfile.TemporaryDirectory() as work:
        tiny = os.path.join(work, "tiny")
        run(KILN, "init-tiny", "-o", tiny)
        for key, (config, seed) in MODELS.items():
            model = os.path.join(work, key)
            run(KILN, "init-tiny", "--config", os.path.join(ROOT, "tests", "fixtures", "configs", config),
                "-o", model, "--seed", str(seed))
            for f in ["tokenizer.json", "tokenizer_config.json"]:
                shutil.copy(os.path.join(tiny, f), model)
            imatrix = os.path.join(FIXTURES, f"{key}.imatrix.gguf")
            run(KILN, "eval", "--model", model, "--data", os.path.join(ROOT, "datasets", "alpaca_tiny.jsonl"),
                "--limit", "24", "--imatrix", imatrix)
            f32 = os.path.join(work, f"{key}-f32.gguf")
            run(KILN, "export", "gguf", "--model", model, "-o", f32, "--quant", "f32", "--no-modelfile")
            entry = {"config": config, "seed": seed}
            for preset in PRESETS:
                out = os.path.join(work, f"{key}-{preset}.gguf")
                run(os.path.join(BIN, "llama-quantize"), "--imatrix", imatrix, f32, out, preset, env=env)
                entry[preset] = {t.name: {"type": t.tensor_type.name, "fnv": fnv(bytes(t.data.tobytes()))}
                                 for t in GGUFReader(out).tensors}
            golden["models"][key] = entry
    path = os.path.join(ROOT, "tests", "fixtures", "gguf_calibrated_golden.json")
    with open(path, "w") as f:
        json.dump(golden, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
