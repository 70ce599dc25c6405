#!/usr/bin/env bash
# llama.cpp's tokenizer test set: models/ggml-vocab-*.gguf (vocabulary-only GGUF files) with their
# .inp/.out files (inputs, and the ids llama.cpp's test-tokenizer-0 must produce), as vendored by
# the llama-cpp-python 0.3.36 sdist on PyPI. The .inp/.out files are committed under
# tests/fixtures/llama_vocab/; the GGUF files (70 MB) are fetched here, checked against
# tests/fixtures/llama_vocab/SHA256SUMS, and kept out of git.
# Usage: scripts/golden/fetch_llama_vocab.sh [DIR]   (default tests/fixtures/llama_vocab)
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-tests/fixtures/llama_vocab}
SUMS=tests/fixtures/llama_vocab/SHA256SUMS
SUMS=$PWD/$SUMS
if (cd "$DIR" 2>/dev/null && sha256sum --quiet -c "$SUMS" >/dev/null 2>&1); then
    exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps --no-binary llama-cpp-python -d "$TMP" llama-cpp-python==0.3.36
tar -xzf "$TMP"/llama_cpp_python-0.3.36.tar.gz -C "$TMP" --wildcards 'llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*'
mkdir -p "$DIR"
cp "$TMP"/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-* "$DIR"/
(cd "$DIR" && sha256sum --quiet -c "$SUMS")
echo "llama.cpp vocabularies in $DIR"
