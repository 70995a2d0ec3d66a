"""Running ``qolora finetune`` (or a script) under ``torchrun`` on the CPU, for the multi-process tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

#: A short run that logs every step, evaluates and checkpoints every 2 steps; accumulation 2 and
#: grouping by length on, so both the order and the slicing of the global batch are exercised.
OPTIONS = {"max_steps": 6, "grad_accum": 2, "lr": 1e-2, "optim": "adamw", "max_length": 64, "eval_every": 2,
           "save_every": 2, "log_every": 1, "n_samples": 1, "max_new_tokens": 4, "eval_fraction": 0.25, "rank": 4}


def cli_args(model_dir: Path, data: Path, out: Path, batch_size: int, **extra) -> list[str]:
    options = {**OPTIONS, "batch_size": batch_size, **extra}
    args = ["finetune", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--device", "cpu",
            "--no-progress", "--threads", "1"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def torchrun(args: list[str], nproc: int = 2, script: Path | None = None) -> subprocess.Popen:
    """``torchrun --nproc_per_node NPROC`` of ``qolora.cli ARGS`` (or of ``script ARGS``), own process group."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *(["-m", "qolora.cli"] if script is None else [str(script)]), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: killed as a whole


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        log = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0]
        pytest.fail(f"torchrun did not finish in {timeout} s (a rank waiting in a collective?):\n{log[-3000:]}")
    return log


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


#: Two runs that differ only in how fp32 sums are ordered (one process vs two, DDP vs FSDP): after 6 AdamW steps
#: their adapters differ by ~2e-5 (relative norm) on the tiny chat data, since AdamW divides by sqrt(v), so an
#: element whose gradient is near 0 moves by an amount its rounding decides. A missed gradient sync or a
#: wrong average differs by > 1e-2.
SAME_ADAPTER_RTOL = 5e-5


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp_min(1e-30)) for k in a)
