"""Golden Modelfiles for tests/modelfile.rs: kiln's Ollama TEMPLATE and SYSTEM for each real chat
template, rendered as Ollama renders them (Go's text/template, scripts/golden/ollama_render/main.go)
and compared with transformers' apply_chat_template(add_generation_prompt=True).

    cargo build --release
    $KILN_REFPY scripts/golden/make_modelfile_golden.py      (needs `go`: Debian's golang-go)

Versions: transformers 5.17.0, go 1.19 (text/template), Ollama's chat semantics at ollama/ollama
fb30760 (template.collate, the Modelfile SYSTEM put first when a conversation has none).

For each template (the tokenizer fixtures' own, and llama.cpp's copies in tests/fixtures/templates
over a tokenizer whose vocabulary fits), a one-layer random model carries it; `kiln export gguf`
writes its Modelfile; TEMPLATE and SYSTEM are read back from it. Four conversations: one user
turn; with a system message; multi-turn; multi-turn with a system message. Written to
tests/fixtures/modelfile_golden.json: per template, kiln's TEMPLATE and SYSTEM, and per
conversation the Go rendering and transformers' rendering (the test asserts kiln still writes
the verified Modelfile, and which conversations Ollama renders as the model was trained).
"""
import json
import os
import re
import shutil
import subprocess
import tempfile

from transformers import PreTrainedTokenizerFast

from tiny_carrier import tiny_carrier

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILN = os.path.join(ROOT, "target", "release", "kiln")
FIX = os.path.join(ROOT, "tests", "fixtures")

# name: (tokenizer fixture, template file or None for the tokenizer's own)
TEMPLATES = {
    "llama3-instruct": ("llama3-instruct", None),
    "qwen2.5": ("qwen2.5", None),
    "phi3": ("phi3", None),
    "qwen3": ("qwen2.5", "Qwen-Qwen3-0.6B.jinja"),
    "phi3.5": ("phi3", "microsoft-Phi-3.5-mini-instruct.jinja"),
    "gemma2": ("llama3-instruct", "google-gemma-2-2b-it.jinja"),
    "mistral-nemo": ("phi3", "mistralai-Mistral-Nemo-Instruct-2407.jinja"),
}

SPECIAL = {"mistral-nemo": {"bos_token": "<s>", "eos_token": "</s>"}}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Name a prime."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello. How can I help?"}, {"role": "user", "content": "Name a prime."}],
]


def model_with_template(work, name, tok_name, template_file):
    model, tc = tiny_carrier(KILN, work, name, tok_name)
    if template_file:
        tc["chat_template"] = open(os.path.join(FIX, "templates", template_file)).read()
    # The special tokens of the template's own model where it writes them (Phi-3's vocabulary has
    # Mistral's <s> and </s>).
    tc.update(SPECIAL.get(name, {}))
    json.dump(tc, open(os.path.join(model, "tokenizer_config.json"), "w"), ensure_ascii=False)
    return model, tc


def read_modelfile(path):
    text = open(path).read()
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S)
    return text, (template.group(1) if template else None), (system.group(1) if system else "")


def main():
    work = tempfile.mkdtemp()
    golden = {"conversations": CONVERSATIONS, "templates": {}}
    for name, (tok_name, template_file) in TEMPLATES.items():
        model, tc = model_with_template(work, name, tok_name, template_file)
        out = os.path.join(work, f"{name}-gguf", "model.gguf")
        subprocess.run([KILN, "export", "gguf", "--model", model, "-o", out, "--quant", "f16"],
                       check=True, capture_output=True)
        modelfile, template, system = read_modelfile(os.path.join(os.path.dirname(out), "Modelfile"))
        hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model, "tokenizer.json"),
                                     bos_token=tc.get("bos_token"), eos_token=tc.get("eos_token"))
        expected = []
        for conv in CONVERSATIONS:
            try:
                text = hf.apply_chat_template(conv, chat_template=tc["chat_template"], tokenize=False,
                                              add_generation_prompt=True)
            except Exception as e:  # the template refuses the conversation (e.g. no system role)
                text = f"error: {e}"
            # llama.cpp adds BOS when it tokenizes the prompt (the GGUF's add_bos_token), so
            # Ollama's template does not write it.
            bos = tc.get("bos_token")
            if isinstance(bos, str) and text.startswith(bos):
                text = text[len(bos):]
            expected.append(text)
        entry = {"tokenizer": tok_name, "template_file": template_file, "special": SPECIAL.get(name, {}),
                 "template": template, "system": system, "transformers": expected}
        if template is not None:
            req = json.dumps({"template": template, "system": system, "conversations": CONVERSATIONS})
            r = subprocess.run(["go", "run", os.path.join(ROOT, "scripts", "ollama_render", "main.go")],
                               input=req.encode(), check=True, capture_output=True)
            entry["ollama"] = json.loads(r.stdout)
            entry["equal"] = [a == b for a, b in zip(entry["ollama"], expected)]
        golden["templates"][name] = entry
        print(name, entry.get("equal"))
    with open(os.path.join(FIX, "modelfile_golden.json"), "w") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
