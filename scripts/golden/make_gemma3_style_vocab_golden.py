"""llama.cpp's token ids for a Gemma-3-style vocabulary: SentencePiece (`tokenizer.ggml.model =
"llama"`, no prefix space) whose newline and tab runs are user-defined tokens, as in Gemma 3 GGUF
files, where llama.cpp cuts them out of the raw text before the SentencePiece merges run.

The vocabulary is derived from llama.cpp's `models/ggml-vocab-gemma-4.gguf` (Gemma 3 and 4 share
their 262,144 pieces); tests/llama_vocab.rs derives the same file the same way:
  - tokens as they are; types as they are, except tokens made only of "\n" or only of "\t", which
    become user-defined (4);
  - scores: minus the rank of the first merge that makes the token, -1e9 for tokens no merge makes;
  - tokenizer.ggml.model "llama", pre "default", add_space_prefix false, add_bos_token true,
    bos 2, eos 1, unknown 3, padding 0; no merges; general.architecture "gemma3".
The texts are multi-line GSM8K rows (the first 24 test rows, question + "\n\n" + answer), the
gemma-4 `.inp` inputs and kiln's probe text (read from src/gguf/vocab_probe.rs).
Ids come from llama-tokenize (--ids --no-bos --no-escape; it parses control tokens by default, as
kiln's training tokenizes), built from
llama-cpp-python 0.3.36's sdist (llama.cpp 0c1e570) as docs/reference-tools.md says.

Usage (repo root): REFPY=python-with-numpy LLAMA=.../vendor/llama.cpp \
    $REFPY scripts/golden/make_gemma3_style_vocab_golden.py
Writes tests/fixtures/llama_vocab/gemma3_style.json.
"""

import json
import re
import os
import subprocess
import sys
import tempfile

LLAMA = os.environ.get("LLAMA", "/tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")
sys.path.insert(0, os.path.join(LLAMA, "gguf-py"))
import gguf  # noqa: E402

DIR = "tests/fixtures/llama_vocab"


def field(r, key):
    f = r.fields[key]
    return [f.parts[i] for i in f.data]


def probe_text():
    """PROBE as Rust reads the literal (line continuations skip the next line's indent), with
    `▁` as `_` (probe_text())."""
    src = open("src/gguf/vocab_probe.rs", encoding="utf-8").read()
    lit = src.split('pub const PROBE: &str = "', 1)[1].split('";\n', 1)[0]
    lit = re.sub(r"\\\n\s*", "", lit)
    out = re.sub(r'\\([ntr"\\])', lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m[1], m[1]), lit)
    return out.replace("\u2581", "_")


def main():
    probe = probe_text()
    r = gguf.GGUFReader(f"{DIR}/ggml-vocab-gemma-4.gguf")
    tokens = [bytes(p).decode("utf-8") for p in field(r, "tokenizer.ggml.tokens")]
    types = [int(p[0]) for p in field(r, "tokenizer.ggml.token_type")]
    merges = [bytes(p).decode("utf-8") for p in field(r, "tokenizer.ggml.merges")]
    rank = {}
    for i, m in enumerate(merges):
        a, b = m.split(" ", 1)
        rank.setdefault(a + b, i)
    scores = [-float(rank[t]) if t in rank else -1e9 for t in tokens]
    for i, t in enumerate(tokens):
        if t and (set(t) == {"\n"} or set(t) == {"\t"}):
            types[i] = 4
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "gemma3-style.gguf")
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_name("gemma-3-style vocab")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    rows = [json.loads(l) for l in open("../shared/data/datasets/gsm8k/test.jsonl")][:24]
    texts = [r["question"] + "\n\n" + r["answer"] for r in rows]
    inp = open(f"{DIR}/ggml-vocab-gemma-4.gguf.inp", encoding="utf-8").read()
    texts += inp.split("\n__ggml_vocab_test__\n")
    texts.append(probe)
    ids = []
    for t in texts:
        f = os.path.join(tmp, "text.txt")
        open(f, "w", encoding="utf-8", newline="").write(t)
        out = subprocess.run(
            [f"{LLAMA}/build/bin/llama-tokenize", "-m", path, "-f", f, "--ids", "--no-bos",
             "--no-escape", "--log-disable"],
            capture_output=True, text=True, check=True).stdout
        ids.append(json.loads(out.strip().splitlines()[-1]))
    json.dump({"reference": "llama-tokenize, llama.cpp 0c1e570 (llama-cpp-python 0.3.36)",
               "texts": texts, "ids": ids},
              open(f"{DIR}/gemma3_style.json", "w"), ensure_ascii=False, indent=0)
    print(f"{len(texts)} texts, {sum(map(len, ids))} tokens")


main()
