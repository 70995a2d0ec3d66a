#!/usr/bin/env bash
# One prepared GPU check for a time-limited H100/H200 session (runs in under 9.5 minutes), the parts in
# order of value, so that a run cut short still brings back the most important JSON:
#
#   1. offload benchmark (the headline, issue 25): Llama-3-70B in 4-bit under a 24 GiB cap, the frozen base
#      streamed from host memory: prepare's peak, tokens/s at seq 2048, the offloaded/resident step ratio;
#   2. scale benchmark (issue 10): the plan's prediction vs torch.cuda.max_memory_allocated for the 8B
#      shape in full and 8 layers of the 70B shape (also with checkpoints + input embedding on the host);
#   3. train-step benchmark (issue 15), 8 Llama-3-8B-sized layers (full vocabulary), batch 1 x seq 2048,
#      PagedAdamW8bit, bf16 autocast: PEFT, PEFT + Liger Kernel (if its wheel is carried) and qolora
#      (every option at its default: the checkpointing and kernels qolora.train chooses at launch, issue 27;
#      default fused step with every layer checkpointed, + kernels=compile, half the layers checkpointed, both),
#      one process each;
#   4. the GPU tests: python -m pytest -m gpu -x -q (a 2-process NCCL step among them when 2 GPUs exist).
#   (INIT=1 adds the init benchmark of 4 Llama-2-7B-sized layers first, as measured for 0.1.0.)
#
# Every part runs under its own `timeout` and the script goes on when one fails. Results (at most 8
# files: the device tool brings back no more) go to $OUT:
#   scale_70b.json  scale.json  train_step_cuda_8b.{json,png}  gpu_check.log  pytest_gpu.log  summary.txt
#
# Usage, from the repository root on the GPU machine (bitsandbytes is not installed there; carry its
# wheel in .whl/, see benchmarks/README.md):
#   bash benchmarks/gpu_check.sh
# Environment: OUT (default ./out/gpu_check), WHEEL_DIR (default .whl), PYTHON (default python3),
#   INIT_LAYERS / TRAIN_LAYERS (default 4), INIT_REPEATS (default 2), TRAIN_ROUNDS (default 2),
#   GPU_CHECK_SMOKE=1 (tiny sizes, for a dry run of this script on a CPU machine).
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/out/gpu_check}
WHEEL_DIR=${WHEEL_DIR:-.whl}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export QOLORA_BENCH_CACHE=${QOLORA_BENCH_CACHE:-/tmp/qolora-bench}
T0=$(date +%s)

say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
part() {  # part NAME SECONDS CMD...: run under timeout (the whole process group), log, record the status
    local name=$1 limit=$2; shift 2
    say "== $name (limit ${limit}s): $*"
    local start=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - start ))
    case $rc in
        0) say "== $name: ok (${took}s)"; echo "$name: ok (${took}s)" >>"$SUMMARY" ;;
        124|137) say "== $name: TIMED OUT after ${took}s"; echo "$name: TIMED OUT (${took}s)" >>"$SUMMARY" ;;
        *) say "== $name: FAILED rc=$rc (${took}s)"; echo "$name: FAILED rc=$rc (${took}s)" >>"$SUMMARY" ;;
    esac
    return 0
}

if [ "${GPU_CHECK_SMOKE:-0}" = "1" ]; then
    DEVICE=cpu; SIZE=tiny; TRAIN_SIZE=tiny; SEQ=64; EXTRA_INIT="--skip-real"; EXTRA_TRAIN="--steps 2 --warmup 1"
    CONTENDERS=peft,qolora_defaults,qolora,qolora_compile   # (Liger is CUDA only)
    INIT_LIMIT=240; TRAIN_LIMIT=300; SCALE_LIMIT=0; TEST_LIMIT=60; OFFLOAD_LIMIT=240; OFFLOAD_ARGS="--tiny"
else
    DEVICE=cuda; SIZE=7b; TRAIN_SIZE=8b; SEQ=2048; EXTRA_INIT="--skip-real"; EXTRA_TRAIN="--steps 6 --warmup 2"
    CONTENDERS=peft,peft_liger,qolora_defaults,qolora,qolora_compile,qolora_partial,qolora_partial_compile
    INIT_LIMIT=200; TRAIN_LIMIT=150; SCALE_LIMIT=120; TEST_LIMIT=40   # + ~20 s set-up: at most ~9.5 min
    OFFLOAD_LIMIT=230; OFFLOAD_ARGS="--shape llama-3-70b --cap 24GiB"
fi

# ---------------------------------------------------------------------------------------- setup
say "setup: $(uname -m), $($PY --version 2>&1)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
if ! $PY -c "import bitsandbytes" >/dev/null 2>&1; then
    if ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
        say "installing wheels from $WHEEL_DIR: $(cd "$WHEEL_DIR" && ls *.whl | tr '\n' ' ')"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$WHEEL_DIR"/*.whl 2>&1 | tail -5 | tee -a "$LOG"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        say "bitsandbytes is missing and $WHEEL_DIR has no wheels: the benchmarks will fail"
    fi
fi
$PY - <<'EOF' 2>&1 | grep -v "kernels-community" | tee -a "$LOG"
import importlib.metadata as md, torch
for p in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "datasets", "triton",
          "liger-kernel"):
    try:
        print(f"  {p} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"  {p} MISSING")
print("  cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

# ------------------------------------------------------------------------------------- benchmarks
# The checkpoint is built once (random bf16, ~2.1 GB for 4 7B-sized layers) and shared by both benchmarks.
INIT_LAYERS=${INIT_LAYERS:-4}
TRAIN_LAYERS=${TRAIN_LAYERS:-8}
if [ "${INIT:-0}" = "1" ]; then
    part "init ($INIT_LAYERS x $SIZE, $DEVICE)" "$INIT_LIMIT" \
        $PY -m benchmarks.init --device "$DEVICE" --size "$SIZE" --layers "$INIT_LAYERS" \
        --repeats "${INIT_REPEATS:-2}" --budget-s $(( INIT_LIMIT - 50 )) --timeout $(( INIT_LIMIT - 20 )) \
        $EXTRA_INIT --out "$OUT"
fi
part "offload (70B under a 24 GiB cap, $DEVICE)" "$OFFLOAD_LIMIT" \
    $PY -m benchmarks.offload $OFFLOAD_ARGS --out "$OUT/scale_70b.json"
if [ "$SCALE_LIMIT" -gt 0 ]; then
    part "scale (8B in full, 8 layers of 70B, $DEVICE)" "$SCALE_LIMIT" \
        $PY -m benchmarks.scale --device "$DEVICE" --out "$OUT/scale.json"
fi
part "train_step ($TRAIN_LAYERS x $TRAIN_SIZE, $DEVICE, 1 x $SEQ)" "$TRAIN_LIMIT" \
    $PY -m benchmarks.train_step --device "$DEVICE" --size "$TRAIN_SIZE" --layers "$TRAIN_LAYERS" --batch 1 \
    --seq "$SEQ" --rounds "${TRAIN_ROUNDS:-1}" --partial-layers $(( TRAIN_LAYERS / 2 )) \
    --contenders "${TRAIN_CONTENDERS:-$CONTENDERS}" \
    --budget-s $(( TRAIN_LIMIT - 40 )) --timeout $(( TRAIN_LIMIT - 15 )) $EXTRA_TRAIN --out "$OUT"

# ------------------------------------------------------------------------------------------ tests
# Collect everything (as CI would); if collection itself breaks on this machine (e.g. `datasets`
# missing), fall back to the GPU test file alone.
PYTEST_LOG="$OUT/pytest_gpu.log"
run_pytest() {
    $PY -m pytest -m gpu -x -q -p no:cacheprovider "$@" >"$PYTEST_LOG" 2>&1
    local rc=$?
    tail -15 "$PYTEST_LOG"
    if [ $rc -ne 0 ] && [ $rc -ne 5 ] && grep -q "ERROR collecting\|error.* during collection" "$PYTEST_LOG"; then
        # A test module does not import on this machine (e.g. `datasets` missing): run every module that
        # does, and judge by the tests alone (the collection errors stay in the log).
        echo "collection errors (rc=$rc): rerunning with --continue-on-collection-errors, without -x"
        $PY -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors "$@" >>"$PYTEST_LOG" 2>&1
        tail -15 "$PYTEST_LOG"
        local last
        last=$(tail -1 "$PYTEST_LOG")
        if echo "$last" | grep -q " failed"; then rc=1; else rc=0; echo "(tests passed; collection errors above)"; fi
    fi
    [ $rc -eq 5 ] && rc=0  # nothing selected: not a failure of this check
    return $rc
}
export -f run_pytest 2>/dev/null
export PY PYTEST_LOG
if [ "$DEVICE" = "cuda" ]; then
    part "pytest -m gpu" "$TEST_LIMIT" bash -c run_pytest
else
    part "pytest -m gpu (smoke: all skipped without CUDA)" "$TEST_LIMIT" bash -c 'run_pytest tests/test_gpu.py'
fi

# ---------------------------------------------------------------------------------------- summary
$PY - "$OUT" <<'EOF' 2>&1 | tee -a "$SUMMARY" | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def f(v, fmt=".3f"):
    return "n/a" if v is None else format(v, fmt)
for path in sorted(out.glob("init_*.json")):
    d = json.loads(path.read_text())
    print(f"\n{path.name}: {d['machine'].get('device_name')}")
    for c, s in d["speed"].items():
        e = (s.get("errors") or {}).get("total_error")
        print(f"  {c:14s} {f(s['seconds']['median'], '8.2f')} s  peak {f(s['peak_mb']['median'], '8.0f')} MiB"
              f"  error {f(e, '.3f')}  x plain {f(d['speed_ratios'][c]['error_vs_plain'])}")
    for k, v in d["verdicts"].items():
        print(f"  {k}: {f(v['value'])} (target {v['target']}) {'MET' if v['met'] else 'MISSED' if v['met'] is False else 'n/a'}")
for path in sorted(out.glob("scale_70b.json")):
    d = json.loads(path.read_text())
    print(f"\n{path.name}: {json.dumps({k: v for k, v in d.items() if not isinstance(v, (dict, list))})[:600]}")
for path in sorted(out.glob("train_step_*.json")):
    d = json.loads(path.read_text())
    print(f"\n{path.name}: {d['machine'].get('device_name')}, {d['model_desc']}")
    for c, s in d["summary"].items():
        r = d["ratios"].get(c, {})
        print(f"  {c:15s} {f(s['tokens_per_s']['median'], '9.1f')} tok/s (x{f(r.get('tokens_per_s_vs_peft'))})"
              f"  train peak {f(s['peak_train_mb']['median'], '8.0f')} MiB (x{f(r.get('peak_train_vs_peft'))})"
              f"  load peak {f(s['peak_load_mb']['median'], '8.0f')} MiB")
    for k, v in d["verdicts"].items():
        print(f"  {k}: {f(v['value'])} (target {v['target']}) {'MET' if v['met'] else 'MISSED' if v['met'] is False else 'n/a'}")
EOF
say "done in $(( $(date +%s) - T0 ))s; files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
echo "---- summary"; cat "$SUMMARY"
exit 0
