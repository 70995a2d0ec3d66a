"""Shared helpers for the benchmarks: fresh-process workers, peak memory, JSON, charts, checkpoints.

Every benchmark here compares contenders *side by side in one run*: each repetition of each
contender runs in its own fresh Python process (so one contender's peak memory, allocator caches or
warm kernels cannot leak into another's), the contenders alternate (with the start rotating each
round), and the parent reports medians and ratios. Nothing here asserts a timing: the machines are
shared and noisy; a benchmark states its targets and reports whether the measured medians meet them.

Worker protocol::

    parent                                   child (python -m benchmarks.<name> --worker '<json>')
    run_worker("benchmarks.init", payload) ─►  worker_main(fn): fn(payload, probe) -> dict
                                           ◄─  one line "@@QOLORA_BENCH_RESULT@@ {json}" on stdout

Peak memory (:class:`MemoryProbe`): on the CPU the kernel's high-water mark of the process's
resident set (``VmHWM``, the number ``getrusage().ru_maxrss`` reports for the live process), which
the probe resets (``/proc/self/clear_refs`` <- 5) at the start of each measured phase, so imports
and earlier phases do not hide in it; ``ru_maxrss`` is recorded too. On CUDA,
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` per phase.

Synthetic checkpoints (:func:`synthetic_checkpoint`): N decoder layers of TinyLlama-1.1B's or
Llama-2-7B's shapes, random normal weights (std 0.02), saved in bf16 as a normal transformers folder
in a cache outside the repository (``$QOLORA_BENCH_CACHE``, default ``~/.cache/qolora-bench``) and
reused across runs.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RESULT_MARKER = "@@QOLORA_BENCH_RESULT@@"

__all__ = [
    "REPO", "RESULTS", "SIZES", "MemoryProbe", "Timer", "alternating", "bar_panels", "budgeted", "bench_cache_dir",
    "checkpoint_keys", "checkpoint_weight", "git_info", "machine_info", "real_model_dir", "release_freed_memory",
    "run_worker", "summarize", "synthetic_checkpoint", "worker_env", "worker_main", "write_json",
]


# ------------------------------------------------------------------------------------ processes
def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker process: offline hub, the repo importable, quiet tokenizers."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_worker(module: str, payload: dict, *, timeout: float = 1800, echo: bool = False) -> dict:
    """Run ``python -m module --worker <payload>`` in a fresh process and return its result dict.

    Never raises for a failed worker: the result then holds ``error`` and the end of its stderr, so
    one broken contender does not lose the others' numbers.
    """
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(payload)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or "")[-2000:] if isinstance(exc.stderr, str) else ""
        return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": tail,
                "process_s": time.perf_counter() - start}
    process_s = time.perf_counter() - start
    if echo and proc.stderr:
        sys.stderr.write(proc.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["process_s"] = process_s
            return result
    return {
        "error": f"worker exited with code {proc.returncode} and no result",
        "stderr_tail": proc.stderr[-3000:],
        "stdout_tail": proc.stdout[-1000:],
        "process_s": process_s,
    }


def worker_main(fn: Callable[[dict, MemoryProbe], dict], argv: list[str] | None = None) -> bool:
    """If ``--worker <json>`` is on the command line, run ``fn(payload, probe)``, print its result, return True.

    ``payload["threads"]`` (if set) fixes torch's intra-op threads before anything runs.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" not in argv:
        return False
    payload = json.loads(argv[argv.index("--worker") + 1])
    if payload.get("threads"):
        import torch

        torch.set_num_threads(int(payload["threads"]))
        try:  # an explicit choice: qolora's busy-CPU policy (1 thread under load) must not override it
            from qolora.devices import set_threads

            set_threads(int(payload["threads"]))
        except ImportError:
            pass
    probe = MemoryProbe(payload.get("device", "cpu"))
    try:
        result = fn(payload, probe)
    except Exception as exc:  # noqa: BLE001 - report, do not hide: the parent prints it next to the other contenders
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["memory"] = probe.phases
    try:
        import torch

        result["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    print(RESULT_MARKER + json.dumps(result, default=_json_default), flush=True)
    return True


def _json_default(value: Any):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


# -------------------------------------------------------------------------------------- memory
def release_freed_memory() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise), so a phase's resident-set peak shows
    its own allocations, not pages an earlier phase freed and the next one reuses. No-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory per phase of a worker: RSS high-water mark on the CPU, allocator peaks on CUDA.

    Call :meth:`start` when a phase begins (after imports) and :meth:`stop` with its name when it
    ends; ``phases[name]`` then holds the phase's numbers (MiB).
    """

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.phases: dict[str, dict] = {}
        self._start: dict = {}

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        hwm_reset = _reset_hwm()
        self._start = {"rss_mb": _proc_status_mb("VmRSS"), "hwm_reset": hwm_reset}
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self._start["cuda_alloc_mb"] = torch.cuda.memory_allocated() / 2**20

    def stop(self, name: str) -> dict:
        self._sync()
        peak = _proc_status_mb("VmHWM")
        row = {
            "rss_start_mb": self._start.get("rss_mb"),
            "rss_end_mb": _proc_status_mb("VmRSS"),
            "peak_rss_mb": peak,
            "peak_rss_delta_mb": (None if peak is None or self._start.get("rss_mb") is None
                                  else peak - self._start["rss_mb"]),
            "hwm_reset": self._start.get("hwm_reset"),
            "rss_anon_end_mb": _proc_status_mb("RssAnon"),  # heap / tensors
            "rss_file_end_mb": _proc_status_mb("RssFile"),  # mapped files (the checkpoint, libraries)
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        }
        if self.cuda:
            import torch

            row.update(
                cuda_start_alloc_mb=self._start.get("cuda_alloc_mb"),
                cuda_end_alloc_mb=torch.cuda.memory_allocated() / 2**20,
                cuda_peak_alloc_mb=torch.cuda.max_memory_allocated() / 2**20,
                cuda_peak_reserved_mb=torch.cuda.max_memory_reserved() / 2**20,
            )
        self.phases[name] = row
        return row


def peak_mb(result: dict, phase: str, device: str) -> float | None:
    """The headline peak of one phase: CUDA max allocated on a GPU, peak RSS on the CPU."""
    row = (result.get("memory") or {}).get(phase) or {}
    return row.get("cuda_peak_alloc_mb") if str(device).startswith("cuda") else row.get("peak_rss_mb")


class Timer:
    """``with Timer(device) as t: ...`` -> ``t.seconds`` (wall, synchronizes CUDA on both ends) and
    ``t.cpu_seconds`` (this process's CPU time, all threads: less sensitive to other processes on a
    shared CPU than wall time, a cross-check for it)."""

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.seconds = float("nan")
        self.cpu_seconds = float("nan")

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def __enter__(self):
        self._sync()
        self._c0 = time.process_time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._c0
        return False


# ------------------------------------------------------------------------------------ schedule
def alternating(names: list[str], repeats: int) -> Iterator[tuple[int, str]]:
    """``(repetition, name)`` with every contender once per round, the start rotating each round."""
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            yield rep, name


def budgeted(schedule: Iterable[tuple[int, str]], budget_s: float | None) -> Iterator[tuple[int, str]]:
    """Pass ``alternating(...)`` through, but stop at a round boundary once another round (as long as the
    longest so far) would end past ``budget_s`` seconds: for time-limited machines. Every contender
    keeps the same number of completed rounds."""
    start = round_start = time.perf_counter()
    current, longest = 0, 0.0
    for rep, name in schedule:
        if rep != current:
            now = time.perf_counter()
            longest = max(longest, now - round_start)
            round_start, current = now, rep
            if budget_s and now - start + longest > budget_s:
                print(f"  (time budget {budget_s:.0f} s: stopping after {rep} round(s))", flush=True)
                return
        yield rep, name


def summarize(values: Iterable[float | None]) -> dict:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


# --------------------------------------------------------------------------------- environment
def git_info() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):  # no git on the machine: not worth failing a benchmark over
            return None

    status = git("status", "--porcelain", "--", "qolora")
    return {"commit": git("rev-parse", "--short", "HEAD"), "qolora_dirty": bool(status) if status is not None else None}


@functools.cache
def _machine_info_cached(device: str) -> str:
    return json.dumps(_machine_info(device))


def machine_info(device: str = "cpu") -> dict:
    """Versions and hardware, recorded next to every result (collected once per process)."""
    return json.loads(_machine_info_cached(str(device)))


def _machine_info(device: str = "cpu") -> dict:
    """Versions and hardware, recorded next to every result."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "safetensors"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_name": _cpu_name(),
        "device": device,
        "versions": versions,
        "git": git_info(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        info["device_name"] = info["cpu_name"]
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path: Path, payload: dict, device: str = "cpu") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "machine": machine_info(device)}
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


# -------------------------------------------------------------------------------------- charts
def bar_panels(path: Path, panels: list[dict], title: str = "") -> Path:
    """Bar charts side by side in one PNG.

    Each panel: ``{"title", "labels", "values", "ylabel"}`` and optionally ``"lo"``/``"hi"``
    (min/max whiskers), ``"ref"`` (a dashed horizontal line, e.g. a target) with ``"ref_label"``,
    ``"fmt"`` (value label format, default ``"{:.3g}"``), ``"colors"``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    palette = ["#1f77b4", "#7fb3e0", "#d62728", "#f2a09f", "#2ca02c", "#9467bd"]
    for ax, panel in zip(axes[0], panels):
        labels, values = panel["labels"], [v if v is not None else 0.0 for v in panel["values"]]
        colors = panel.get("colors") or palette[: len(values)]
        yerr = None
        if panel.get("lo") is not None and panel.get("hi") is not None:
            yerr = [[max(0.0, v - (lo if lo is not None else v)) for v, lo in zip(values, panel["lo"])],
                    [max(0.0, (hi if hi is not None else v) - v) for v, hi in zip(values, panel["hi"])]]
        bars = ax.bar(range(len(values)), values, color=colors, yerr=yerr, capsize=3)
        fmt = panel.get("fmt", "{:.3g}")
        tops = [v + (yerr[1][i] if yerr else 0.0) for i, v in enumerate(values)]
        for bar, top, v, raw in zip(bars, tops, values, panel["values"]):
            ax.annotate("n/a" if raw is None else fmt.format(v), (bar.get_x() + bar.get_width() / 2, top),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        if panel.get("ref") is not None:
            ax.axhline(panel["ref"], ls="--", color="gray", lw=1, label=panel.get("ref_label"))
            if panel.get("ref_label"):
                ax.legend(fontsize=7, loc="upper left")
        ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.margins(y=0.15)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------- checkpoints
SIZES: dict[str, dict] = {
    # a few-MB model for smoke tests of the benchmark scripts themselves
    "tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4,
                 vocab_size=1024, max_position_embeddings=1024),
    # TinyLlama-1.1B's shapes
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                      vocab_size=32000, max_position_embeddings=2048),
    # Llama-2-7B's shapes
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, max_position_embeddings=4096),
    # Llama-3-8B's shapes (qolora/configs/llama-3-8b.json): GQA, 128,256-token vocabulary
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, max_position_embeddings=8192),
}


def bench_cache_dir() -> Path:
    env = os.environ.get("QOLORA_BENCH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qolora-bench"


def synthetic_checkpoint(size: str, layers: int, *, seed: int = 0, std: float = 0.02, cache: Path | None = None,
                         device: str | None = None) -> Path:
    """A Llama checkpoint folder with ``layers`` decoder layers of ``size``'s shapes (random, bf16).

    Built once (atomically) under ``cache`` and reused. ``device`` only decides where the random
    numbers are drawn (``"cuda"`` is much faster for 7B-sized layers); the saved file is on disk.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"size={size!r}; allowed: {sorted(SIZES)}")
    if layers < 1:
        raise ValueError(f"layers={layers} must be >= 1")
    cache = Path(cache) if cache is not None else bench_cache_dir()
    folder = cache / f"llama-{size}-{layers}L-seed{seed}-std{std:g}"
    if (folder / ".complete").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    dims = SIZES[size]
    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **dims)
    config.dtype = "bfloat16"
    h, i, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    gen_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            state[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.randn(shape, generator=gen, device=gen_device, dtype=torch.float32).mul_(std)
            state[key] = t.to(torch.bfloat16).cpu()
            del t
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=cache))
    try:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / ".complete").write_text(json.dumps({"size": size, "layers": layers, "seed": seed, "std": std}))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: use theirs
            if not (folder / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def real_model_dir() -> Path:
    """The real pretrained SmolLM2-135M-Instruct, converted once by :mod:`qolora.data.assets`."""
    from qolora.data.assets import default_model_dir

    return Path(default_model_dir())


def checkpoint_keys(model_dir: Path, _cache: dict = {}) -> dict[str, str]:  # noqa: B006 - per-process cache
    """``{key: shard file name}`` of a safetensors checkpoint folder."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    if model_dir not in _cache:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            _cache[model_dir] = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
                _cache[model_dir] = {k: "model.safetensors" for k in f.keys()}
    return _cache[model_dir]


def checkpoint_weight(model_dir: Path, key: str):
    """One tensor of a safetensors checkpoint folder as fp32, read independently of the code under test."""
    import torch
    from safetensors import safe_open

    shard = checkpoint_keys(model_dir).get(key)
    if shard is None:
        return None
    with safe_open(str(Path(model_dir) / shard), framework="pt") as f:
        return f.get_tensor(key).to(torch.float32)


def row_split(dataset, eval_fraction: float, seed: int = 0):
    """``(train, eval)``: a seeded permutation of the rows, ``round(n * eval_fraction)`` (1..n-1) of them held out.

    The split the benchmarks' committed results were made with (qolora's ``split_train_eval`` before it kept
    repeated rows on one side), kept here so that a rerun or a resumed study holds out the same examples.
    The defaults study de-duplicates its records before it; the convergence benchmark's data has repeats.
    """
    import numpy as np

    n = len(dataset)
    n_eval = min(max(1, int(round(n * eval_fraction))), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return dataset.select(sorted(order[n_eval:].tolist())), dataset.select(sorted(order[:n_eval].tolist()))

