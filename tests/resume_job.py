"""The training job of ``test_train.test_resume_after_sigkill_is_bitwise_identical``, in a process of its own.

:func:`start` runs :func:`job` in a fork of the calling (test) process: it has everything imported
already, so the job costs no interpreter start-up (torch + transformers + bitsandbytes imports take
5-10 s per process on a busy 2-core machine), and it is still a process of its own: what it holds in
memory dies with it, so a job resumed after a SIGKILLed one can only use what reached the disk. Where
forking is unsafe (CUDA initialised in this process, ``kernels="compile"``, or no ``os.fork``), the job
runs in a fresh ``python resume_job.py ...`` instead. Each job logs to ``<output_dir>.log``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 12


def job(model_dir: str, data: str, out: str, resume: bool = False, kill_at: int = 0, kernels: str = "auto") -> None:
    """Train the tiny chat model (adapter dropout, grad_accum=2, several epochs, ``kernels`` as in
    ``prepare``); ``kill_at`` > 0: SIGKILL this process at the start of its ``kill_at``-th training
    forward (one per micro-batch)."""
    import torch

    from qolora import prepare
    from qolora.data.tokens import load_records, split_train_eval, tokenize_dataset
    from qolora.training.loop import TrainConfig, train
    from tiny_tokenizer import make_tiny_tokenizer

    torch.set_num_threads(1)
    tok = make_tiny_tokenizer()
    ds, _ = tokenize_dataset(load_records(data), tok, max_length=64)
    train_ds, eval_ds = split_train_eval(ds, 0.25, seed=0)
    model = prepare(model_dir, 4, 8, dropout=0.1, gradient_checkpointing=True, progress=False, device="cpu",
                    kernels=kernels)
    if kill_at:
        forwards = [0]

        def kill(module, args):
            if module.training:
                forwards[0] += 1
                if forwards[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        model.base_model.register_forward_pre_hook(kill)  # the decoder: the loss runs it, not model.forward
    cfg = TrainConfig(output_dir=out, max_steps=MAX_STEPS, batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=3,
                      eval_every=4, save_every=4, keep_last=None, log_every=3, n_samples=0, progress=False, seed=7)
    train(model, tok, train_ds, eval_ds, cfg, resume=resume)
    if kernels == "compile":  # it really ran compiled (a backend failure would have fallen back to eager)
        from torch._dynamo.utils import counters

        from qolora.adapters import compiled_layers

        assert counters["stats"]["unique_graphs"] > 0 and not compiled_layers._broken, (
            dict(counters["stats"]), compiled_layers._broken)
        print(f"compiled graphs: {counters['stats']['unique_graphs']}")


def _warm_imports() -> None:
    """Import (only import) what :func:`job` imports lazily: bitsandbytes and the Llama model code."""
    import bitsandbytes  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import qolora.data.tokens  # noqa: F401
    import qolora.training.loop  # noqa: F401
    import tiny_tokenizer  # noqa: F401


def _forked_child(args: list) -> None:
    """Run the job in this forked child with its output in the log; never returns."""
    code = 1
    try:
        log = os.open(f"{args[2]}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout = sys.stderr = open(1, "w", closefd=False, buffering=1)  # not the test runner's capture
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
        job(*args)
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the exit code and the log
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)


def start(model_dir, data, out, resume: bool = False, kill_at: int = 0, kernels: str = "auto") -> Callable[[], int]:
    """Start a job; returns a function that waits for its exit code (negative: killed by that signal)."""
    import torch

    args = [str(model_dir), str(data), str(out), resume, kill_at, kernels]
    # kernels="compile" runs in a fresh interpreter: a fork of a process whose Inductor compile workers or
    # OpenMP pools have started can block forever on a lock one of their threads held (seen: a child at 0%
    # CPU on a futex for 13 minutes in a slow-suite run).
    if hasattr(os, "fork") and not torch.cuda.is_available() and kernels != "compile":
        _warm_imports()  # once here, not in every fork
        pid = os.fork()
        if pid == 0:
            _forked_child(args)

        def wait(timeout: float = 600) -> int:
            deadline = time.monotonic() + timeout
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return os.waitstatus_to_exitcode(status)
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    raise TimeoutError(f"job {args} still running after {timeout} s")
                time.sleep(0.02)

        return wait
    path = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, json.dumps(args)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    return lambda timeout=600: proc.wait(timeout=timeout)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    job(*json.loads(sys.argv[1]))
