#!/usr/bin/env bash
# The reference Python environment the golden-file and benchmark scripts run in (not CI: the
# golden files are committed). Creates it at $KILN_REFENV (default /tmp/refenv) with the versions
# docs/reference-tools.md names, and prints the line that points the scripts at it:
#   scripts/refenv.sh && export KILN_REFPY=/tmp/refenv/bin/python
#   $KILN_REFPY scripts/golden/make_llama_golden.py
set -euo pipefail
env=${KILN_REFENV:-/tmp/refenv}
if [[ ! -x $env/bin/python ]]; then
    python3 -m venv "$env"
fi
"$env/bin/pip" install -q torch==2.11.0 transformers==5.17.0 tokenizers==0.23.3 peft==0.21.0 \
    bitsandbytes==0.50.2 gguf==0.19.0 safetensors sentencepiece numpy pyarrow==26.0.1 jinja2
echo "export KILN_REFPY=$env/bin/python"
