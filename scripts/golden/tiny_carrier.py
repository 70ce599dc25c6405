"""A one-layer random Llama that carries a fixture tokenizer (tests/fixtures/tokenizers/NAME),
made by `kiln init-tiny --config`: what the golden scripts export to see what kiln writes for a
real vocabulary or chat template. Shared by make_gguf_golden.py and make_modelfile_golden.py."""
import gzip
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_carrier(kiln, work, model_name, tok_name):
    """The model directory `work/model_name` (tokenizer.json unpacked, the fixture's
    tokenizer_config.json copied) and that tokenizer config, for the caller to amend."""
    src = os.path.join(ROOT, "tests", "fixtures", "tokenizers", tok_name)
    model = os.path.join(work, model_name)
    tok = json.loads(gzip.open(os.path.join(src, "tokenizer.json.gz")).read())
    n = max(max(tok["model"]["vocab"].values()), max(t["id"] for t in tok["added_tokens"])) + 1
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 4, "vocab_size": n, "max_position_embeddings": 512,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "float32"}
    cfg_path = os.path.join(work, f"{model_name}.json")
    json.dump(cfg, open(cfg_path, "w"))
    subprocess.run([kiln, "init-tiny", "--config", cfg_path, "-o", model], check=True, capture_output=True)
    with open(os.path.join(model, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    tc = json.load(open(os.path.join(src, "tokenizer_config.json")))
    json.dump(tc, open(os.path.join(model, "tokenizer_config.json"), "w"), ensure_ascii=False)
    return model, tc
