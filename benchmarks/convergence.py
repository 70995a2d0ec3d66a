"""Convergence benchmark: does OLoRA converge faster / lower than LoRA and PiSSA over a 4-bit base?

An honest reproduction of the OLoRA claim (arXiv 2406.01775) needs a learning-rate sweep per init:
OLoRA and PiSSA start from the weight's own directions (large factors), so the same learning rate
moves the function much more than LoRA's zero-initialised ``B``; comparing them at one shared rate
only measures which one that rate happens to suit. So, on the real SmolLM2-135M-Instruct::

    for init in (lora, olora, pissa):              # 4-bit NF4 base, rank 16, alpha 16, all linear layers
        for seed in seeds:                          # prepared ONCE per (init, seed)
            for lr in the init's grid:              # adapter weights restored to their init between rates
                train `steps` steps (8-bit AdamW, warmup + cosine to 0, grad clip 1.0, batch 8, prompt-masked)
                eval loss every `eval_every` steps (and at step 0) on the SAME held-out examples
        if the init's best rate (lowest final eval loss) sits at an edge of its grid, add one more rate
        beyond that edge and run it (repeat up to --max-extend times), so the final grid shows the best
        rate strictly inside it
    ceiling: plain LoRA on the full-precision (bits=16) base at LoRA's best rate.

``--seed-plan full`` runs every seed at every rate and decides on the mean over seeds (the literal design,
~3x the runs). The default ``neighbours`` lets the first seed sweep the grid (and extend it) and runs the
other seeds at its best rate and that rate's two neighbours; the mean over seeds then picks among those
(following the seeds to a new neighbour if the pick moves). On a shared 2-core CPU a run costs 2-3
minutes; far from the optimum the rates differ by far more than the seeds do, near it they do not (seeds
at one rate: ~0.003 apart at LoRA 3e-5, ~0.15 at LoRA 1e-2), which is where the extra seeds go.
Finished runs are reused when switching plans.

A run whose loss or gradient turns NaN/inf (``qolora.training.loop.TrainingError``) is recorded as
``diverged`` with the curve up to that point; it counts as infinitely bad when picking rates.

Every finished run is appended (and fsynced) to ``<out>_runs.jsonl`` at once, keyed by its settings;
a rerun with the same settings skips what is there, so an interrupted sweep loses at most the run in
progress. The summary files are rebuilt from that JSONL at the end of every invocation:

* ``<out>.json``  settings, machine, versions, grids, every run (eval curve, per-step train loss,
  grad norm, lr and wall time), the per-init summary and the threshold;
* ``<out>.png``   eval-loss curves at each init's best rate (mean over seeds, min-max band) + the
  bits=16 ceiling, and the sweep (final eval loss vs learning rate);
* ``<out>.md``    the table: best rate, final / best eval loss (mean +- std over seeds), steps to the
  threshold eval loss, seconds per step; and the whole sweep.

Usage::

    python -m benchmarks.convergence                          # the full sweep (~1 h on a shared 2-core CPU)
    python -m benchmarks.convergence --quick                  # minutes: a smoke test of everything
    python -m benchmarks.convergence --steps 40 --seeds 1 --inits lora,olora --rates-olora 1e-5,3e-5,1e-4
    python -m benchmarks.convergence --report-only            # rebuild json/png/md from the JSONL

``--model`` takes any local transformers folder (default: the cached SmolLM2-135M-Instruct) and
``--data`` any file :func:`qolora.data.tokens.load_records` reads (default: the chatterbot conversations).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/convergence.py` as well as `python -m benchmarks.convergence`
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
INITS = ("lora", "olora", "pissa")
#: Per-init starting grids. OLoRA / PiSSA useful rates can be 3-100x below LoRA's (reference stack:
#: PEFT-OLoRA best 1e-5..3e-5, LoRA ~1e-4, LoRA diverging at 3e-4); together they span 1e-6..1e-3.
DEFAULT_RATES: dict[str, tuple[float, ...]] = {
    "lora": (3e-5, 1e-4, 3e-4, 1e-3),
    "olora": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4),
    "pissa": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4),
}
QUICK_RATES: dict[str, tuple[float, ...]] = {"lora": (1e-4, 1e-3), "olora": (1e-5, 1e-4), "pissa": (1e-5, 1e-4)}
LR_BOUNDS = (1e-8, 1.0)  # never extend a grid past these

logger = logging.getLogger("benchmarks.convergence")


# ------------------------------------------------------------------------------------ settings
@dataclasses.dataclass
class Settings:
    """Everything that determines a run's numbers (hashed into the resume key), except init/lr/seed/bits."""

    model: str
    data: str
    data_bytes: int | None
    bits: int = 4
    rank: int = 16
    alpha: float = 16.0
    quant_type: str = "nf4"
    steps: int = 16
    batch_size: int = 8
    max_length: int = 128
    max_examples: int | None = None
    eval_examples: int = 48
    eval_every: int = 4
    eval_batch_size: int = 8
    split_seed: int = 0
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    optim: str = "paged_adamw_8bit"
    dtype: str = "bf16"
    mixed_precision: str = "bf16"
    device: str = "auto"

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_key(settings_key: str, init: str, bits: int, lr: float, seed: int) -> str:
    return f"{settings_key}|{init}|{bits}|{lr:.6g}|{seed}"


# ------------------------------------------------------------------------------- pure helpers
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = list(values)
    if not vals:
        return math.nan, math.nan
    if any(not math.isfinite(v) for v in vals):
        return math.inf, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def run_score(run: dict) -> float:
    """The number a rate is judged by: the final eval loss; inf for a diverged run."""
    if run.get("status") != "ok":
        return math.inf
    final = run.get("final_eval_loss")
    return final if final is not None and math.isfinite(final) else math.inf


def rate_scores(runs: Iterable[dict], init: str, seeds: Sequence[int]) -> dict[float, list[float]]:
    """``{lr: [score per seed]}`` for the 4/16-bit runs of ``init`` at the requested seeds (complete rates only)."""
    by_rate: dict[float, dict[int, float]] = {}
    for r in runs:
        if r["init"] == init and r["seed"] in seeds and not r.get("ceiling"):
            by_rate.setdefault(r["lr"], {})[r["seed"]] = run_score(r)
    return {lr: [s[x] for x in seeds] for lr, s in by_rate.items() if all(x in s for x in seeds)}


def best_rate(scores: dict[float, list[float]]) -> float | None:
    """The rate with the lowest mean score (ties: the lower rate); None when every rate diverged."""
    finite = {lr: statistics.fmean(v) for lr, v in scores.items() if v and all(math.isfinite(x) for x in v)}
    if not finite:
        return None
    return min(finite, key=lambda lr: (finite[lr], lr))


def extension(grid: Sequence[float], scores: dict[float, list[float]]) -> float | None:
    """The rate to add when the best rate of ``grid`` sits at one of its edges, else None.

    The new rate continues the grid's spacing at that edge (e.g. 1e-6 -> 3.16e-7 for a 3.16x grid);
    an edge whose neighbour diverged is not extended upward (a diverged neighbour proves the top).
    When every rate diverged, the grid is extended downward.
    """
    grid = sorted(grid)
    if len(grid) < 1 or any(lr not in scores for lr in grid):
        return None
    best = best_rate({lr: scores[lr] for lr in grid})
    if best is None or best == grid[0]:
        return beyond(grid, "low")
    if best == grid[-1]:
        return beyond(grid, "high")
    return None


def beyond(grid: Sequence[float], side: str) -> float | None:
    """The next rate below (``side="low"``) or above the grid, continuing its spacing at that edge."""
    grid = sorted(grid)
    if side == "low":
        new = grid[0] / (grid[1] / grid[0] if len(grid) > 1 else math.sqrt(10))
    else:
        new = grid[-1] * (grid[-1] / grid[-2] if len(grid) > 1 else math.sqrt(10))
    new = _snap(new)
    return new if LR_BOUNDS[0] <= new <= LR_BOUNDS[1] and new not in grid else None


def blown_up(run: dict) -> bool:
    """Diverged, or ended no better than it started (eval loss): more seeds there cannot make it the best."""
    initial = run.get("initial_eval_loss")
    return run_score(run) == math.inf or (initial is not None and run_score(run) >= initial)


def settled(runs: Iterable[dict], init: str, lr: float, seeds: Sequence[int]) -> bool:
    """Every seed ran ``lr``, or the first seed blew up there."""
    mine = {r["seed"]: r for r in runs if r["init"] == init and r["lr"] == lr and not r.get("ceiling")}
    return all(x in mine for x in seeds) or (seeds[0] in mine and blown_up(mine[seeds[0]]))


def _snap(x: float) -> float:
    """Round to the 1-3-10 series (3.33e-4 -> 3e-4) when within 12%, else to 3 significant digits."""
    k = math.floor(math.log10(x))
    for m in (1.0, 3.0, 10.0):
        if abs(x / (m * 10.0**k) - 1) <= 0.12:
            return float(f"{m * 10.0**k:.3g}")
    return float(f"{x:.3g}")


def steps_to_threshold(evals: Sequence[dict], threshold: float) -> int | None:
    """First eval step whose loss is <= ``threshold`` (resolution: the eval interval); None if never."""
    for e in evals:
        if e["eval_loss"] is not None and math.isfinite(e["eval_loss"]) and e["eval_loss"] <= threshold:
            return int(e["step"])
    return None


def parse_rates(text: str) -> tuple[float, ...]:
    rates = tuple(sorted({float(x) for x in text.replace(" ", "").split(",") if x}))
    if not rates or any(not (0 < r < 1) for r in rates):
        raise argparse.ArgumentTypeError(f"learning rates must be numbers in (0, 1): {text!r}")
    return rates


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"3"`` = seeds 0, 1, 2; ``"0,5"`` = exactly those."""
    text = text.strip()
    if "," in text:
        return tuple(int(x) for x in text.split(",") if x.strip())
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("--seeds needs at least 1 seed")
    return tuple(range(n))


# --------------------------------------------------------------------------------- machine
def machine_info() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "bitsandbytes", "datasets", "numpy", "qolora"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        import qolora

        versions["qolora"] = versions["qolora"] or getattr(qolora, "__version__", None)
    except ImportError:
        pass
    cpu = None
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001 - no git: not worth failing over
            return None

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": versions,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_qolora_dirty": bool(git("status", "--porcelain", "--", "qolora")),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    return info


# ------------------------------------------------------------------------------------ JSONL log
def read_runs(path: Path) -> list[dict]:
    """Every complete run record (a torn last line from a killed run is ignored)."""
    if not path.is_file():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: skipping a torn line", path)
    return runs


def append_run(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def merge_runs(path: Path, sources: Sequence[Path]) -> int:
    """Append to ``path`` every complete record of ``sources`` whose key it lacks, in the sources' order.

    How the runs of parallel workers (each with its own runs file: one ``--out`` per worker, so no two
    processes ever append to one file) come together; merging twice adds nothing.
    """
    have = {r.get("key") for r in read_runs(path)}
    added = 0
    for src in sources:
        if not Path(src).is_file():
            raise SystemExit(f"--merge-runs: {src} is not a file")
        for rec in read_runs(Path(src)):
            if rec.get("key") is None or rec["key"] in have:
                continue
            append_run(path, rec)
            have.add(rec["key"])
            added += 1
    return added


# ------------------------------------------------------------------------------------ the work
class Bench:
    """Data, the currently prepared model and the run loop."""

    def __init__(self, settings: Settings, runs_path: Path, *, threads: int | None, keep_run_plots: bool = False):
        self.s = settings
        self.runs_path = runs_path
        self.skey = settings.key()
        self.keep_run_plots = keep_run_plots
        self.runs = [r for r in read_runs(runs_path) if r.get("settings_key") == self.skey]
        self.done = {r["key"] for r in self.runs if r.get("status") in ("ok", "diverged")}
        self.threads = threads
        self._data = None
        self._models: dict[tuple[str, int, int], tuple[Any, dict, float]] = {}
        self.new_runs = 0
        self.prepare_seconds: list[dict] = []

    # ---------------------------------------------------------------- lazily built pieces
    def select_records(self, records):
        """``(the records to use, what was done for the data info)``: all of them here."""
        return records, {}

    def data(self):
        if self._data is None:
            from benchmarks.common import row_split
            from qolora.data.tokens import load_records, load_tokenizer, tokenize_dataset

            t0 = time.perf_counter()
            tokenizer = load_tokenizer(Path(self.s.model))
            records, selection = self.select_records(load_records(self.s.data))
            if self.s.max_examples is not None and len(records) > self.s.max_examples:
                records = records.select(range(self.s.max_examples))
            tokenized, stats = tokenize_dataset(records, tokenizer, max_length=self.s.max_length, mask_prompt=True)
            n = len(tokenized)
            n_eval = min(self.s.eval_examples, n // 2)
            train_ds, eval_ds = row_split(tokenized, n_eval / n, seed=self.s.split_seed)
            if len(eval_ds) > n_eval:
                eval_ds = eval_ds.select(range(n_eval))
            label_tokens = sum(sum(1 for t in row if t != -100) for row in eval_ds["labels"])
            info = {**selection, "records": len(records), "examples": n, "train_examples": len(train_ds),
                    "eval_examples": len(eval_ds), "eval_label_tokens": label_tokens,
                    "tokenize_stats": _as_dict(stats), "seconds": time.perf_counter() - t0}
            logger.info("data: %s", info)
            self._data = (tokenizer, train_ds, eval_ds, info)
        return self._data

    def model(self, init: str, seed: int, bits: int):
        """The prepared model for ``(init, seed, bits)`` with its initial adapter weights restored."""
        import torch

        from qolora import adapter_parameters

        key = (init, seed, bits)
        if key not in self._models:
            for other in [k for k in self._models if k[0] != init or k[2] != bits]:  # keep one init's seeds only
                del self._models[other]
            import gc

            gc.collect()
            t0 = time.perf_counter()
            net = self.prepare_model(init, seed, bits)
            seconds = time.perf_counter() - t0
            init_state = {n: p.detach().clone() for n, p in adapter_parameters(net)}
            self._models[key] = (net, init_state, seconds)
            self.prepare_seconds.append({"init": init, "seed": seed, "bits": bits, "seconds": seconds})
            logger.info("prepared %s seed %d bits %d in %.1f s", init, seed, bits, seconds)
        net, init_state, _ = self._models[key]
        with torch.no_grad():
            for n, p in adapter_parameters(net):
                p.copy_(init_state[n])
                p.grad = None
        return net, self._models[key][2]

    def prepare_model(self, init: str, seed: int, bits: int):
        """A freshly prepared model for ``(init, seed, bits)`` (a subclass may build other contenders)."""
        from qolora import prepare

        return prepare(self.s.model, bits=bits, rank=self.s.rank, init=init, alpha=self.s.alpha, seed=seed,
                       progress=False, gradient_checkpointing=False, device=self.s.device, dtype=self.s.dtype,
                       **({"quant_type": self.s.quant_type} if bits == 4 else {}))

    def bits_for(self, init: str) -> int:
        """The base's bits of ``init``'s runs when not given: the settings' (a subclass may name 16-bit ones)."""
        return self.s.bits

    # ---------------------------------------------------------------------------- one run
    def run(self, init: str, lr: float, seed: int, *, bits: int | None = None, ceiling: bool = False) -> dict:
        bits = self.bits_for(init) if bits is None else bits
        key = run_key(self.skey, init, bits, lr, seed)
        for r in self.runs:
            if r["key"] == key and key in self.done:
                return r
        from qolora.training.loop import TrainConfig, TrainingError, train

        tokenizer, train_ds, eval_ds, _ = self.data()
        net, prep_s = self.model(init, seed, bits)
        options = dict(
            max_steps=self.s.steps, batch_size=self.s.batch_size, grad_accum=1, lr=lr, warmup_steps=None,
            warmup_ratio=self.s.warmup_ratio, min_lr_ratio=self.s.min_lr_ratio, weight_decay=self.s.weight_decay,
            max_grad_norm=self.s.max_grad_norm, optim=self.s.optim, mixed_precision=self.s.mixed_precision,
            gradient_checkpointing=False, eval_every=self.s.eval_every, max_eval_examples=None,
            eval_batch_size=self.s.eval_batch_size, save_every=0, keep_last=1, log_every=1, seed=seed,
            n_samples=0, overwrite=True, progress=False,
        )
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        dropped = sorted(set(options) - known)  # the trainer's API moved on: run with what it has
        workdir = Path(tempfile.mkdtemp(prefix=f"qolora-conv-{init}-{bits}-"))
        config = TrainConfig(output_dir=str(workdir / "run"), **{k: v for k, v in options.items() if k in known})
        status, error = "ok", None
        t0 = time.perf_counter()
        try:
            with self._no_run_plots():
                result = train(net, tokenizer, train_ds, eval_ds, config)
            del result
        except TrainingError as exc:
            status, error = "diverged", str(exc)
        except Exception as exc:  # noqa: BLE001 - record, go on with the other runs; not marked done
            status, error = "error", f"{type(exc).__name__}: {exc}"
            logger.exception("run %s failed", key)
        seconds = time.perf_counter() - t0
        record = self._record(workdir / "run" / "metrics.jsonl", key=key, init=init, bits=bits, lr=lr, seed=seed,
                              status=status, error=error, seconds=seconds, ceiling=ceiling)
        record["prepare_seconds"] = prep_s
        record["dropped_train_options"] = dropped
        shutil.rmtree(workdir, ignore_errors=True)
        if record["status"] == "ok" and not all(math.isfinite(e["eval_loss"]) for e in record["evals"]):
            record["status"] = "diverged"
            record["error"] = "non-finite eval loss"
        append_run(self.runs_path, record)
        self.runs.append(record)
        if record["status"] in ("ok", "diverged"):
            self.done.add(key)
        self.new_runs += 1
        return record

    @contextlib.contextmanager
    def _no_run_plots(self):
        """train() redraws its own loss.png at every eval; nobody reads it here (we delete the run folder),
        so skip the matplotlib work unless asked to keep it."""
        if self.keep_run_plots:
            yield
            return
        from qolora.training import reporting

        original = reporting.plot_losses
        reporting.plot_losses = lambda *a, **k: None
        try:
            yield
        finally:
            reporting.plot_losses = original

    def _record(self, metrics_path: Path, **fields) -> dict:
        events = []
        if metrics_path.is_file():
            for line in metrics_path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    events.append(json.loads(line))
        evals = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in events if e.get("event") == "eval"]
        train_ev = [e for e in events if e.get("event") == "train"]
        step_seconds = [e["tokens"] / e["tokens_per_s"] if e.get("tokens_per_s") else None for e in train_ev]
        finals = [e["eval_loss"] for e in evals]
        rec = {
            "settings_key": self.skey,
            **fields,
            "evals": evals,
            "train_steps": [e["step"] for e in train_ev],
            "train_loss": [e.get("loss") for e in train_ev],
            "grad_norm": [e.get("grad_norm") for e in train_ev],
            "lr_schedule": [e.get("lr") for e in train_ev],
            "step_seconds": step_seconds,
            "steps_done": train_ev[-1]["step"] if train_ev else 0,
            "initial_eval_loss": evals[0]["eval_loss"] if evals and evals[0]["step"] == 0 else None,
            "final_eval_loss": finals[-1] if finals and fields["status"] == "ok" else None,
            "min_eval_loss": min(finals) if finals else None,
            "error_event": next((e.get("message") for e in events if e.get("event") == "error"), None),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        good = [x for x in step_seconds if x is not None]
        rec["median_step_seconds"] = statistics.median(good) if good else None
        rec["non_step_seconds"] = fields["seconds"] - sum(good)  # evals, checkpoint at the end, set-up
        return rec


def _as_dict(stats) -> dict:
    if dataclasses.is_dataclass(stats):
        return dataclasses.asdict(stats)
    return dict(stats) if isinstance(stats, dict) else {"repr": repr(stats)}


# ------------------------------------------------------------------------------------ the sweep
SEED_PLANS = ("neighbours", "best", "full")


def sweep(bench: Bench, inits: Sequence[str], grids: dict[str, list[float]], seeds: Sequence[int], *,
          max_extend: int, ceiling: bool, ceiling_seeds: Sequence[int],
          seed_plan: str = "neighbours") -> dict[str, list[float]]:
    """Run the sweep, extend grids whose best rate is at an edge, then the ceiling.

    ``seed_plan="full"``: every seed at every rate; the best rate and the edge test use the mean over seeds.
    ``seed_plan="neighbours"``: the first seed runs the whole grid (extending it while its best rate is at
    an edge); the other seeds run at that best rate and at its two neighbours in the grid (unless the first
    seed blew up there); the best rate is then the lowest mean over seeds among those, and if that moves
    it, the seeds follow to its new neighbours (and beyond the grid's edge, if it gets there).
    ``seed_plan="best"``: like neighbours, but the other seeds run at the first seed's best rate only.
    Switching plans later reuses every finished run.

    Returns the rates each init's grid was extended by."""
    extended: dict[str, list[float]] = {init: [] for init in inits}
    per_rate = len(seeds) if seed_plan == "full" else 1
    total = sum(len(grids[i]) for i in inits) * per_rate + (0 if seed_plan == "full" else len(inits) * (len(seeds) - 1))
    started = time.perf_counter()
    count = 0

    def progress(rec: dict, what: str) -> None:
        nonlocal count
        count += 1
        el = time.perf_counter() - started
        curve = f"{rec['initial_eval_loss']:.4f} -> {rec['evals'][-1]['eval_loss']:.4f}" if rec["evals"] else "-"
        logger.info("[%d/%d] %s %s lr=%.3g seed=%d: %s, eval %s, %.0f s (%.2f s/step); %.0f s elapsed", count, total,
                    what, rec["init"], rec["lr"], rec["seed"], rec["status"], curve, rec["seconds"],
                    rec.get("median_step_seconds") or math.nan, el)

    def run_all(init: str, rates: Iterable[float], run_seeds: Sequence[int]) -> None:
        for seed in run_seeds:  # seed-major: one prepared model at a time
            for lr in rates:
                if run_key(bench.skey, init, bench.bits_for(init), lr, seed) not in bench.done:
                    progress(bench.run(init, lr, seed), "run")

    for init in inits:
        grid = sorted(grids[init])
        deciding = tuple(seeds) if seed_plan == "full" else tuple(seeds[:1])
        while True:
            run_all(init, grid, deciding)
            scores = {lr: v for lr, v in rate_scores(bench.runs, init, deciding).items() if lr in grid}
            new = extension(grid, scores) if len(extended[init]) < max_extend else None
            if new is None:
                break
            logger.info("%s: best rate %.3g is at the edge of %s; adding %.3g", init, best_rate(scores) or math.nan,
                        [f"{x:.3g}" for x in grid], new)
            extended[init].append(new)
            grid = sorted(grid + [new])
            total += len(deciding)
        best = best_rate(scores)
        others = [x for x in seeds if x not in deciding]
        if best is not None and others and seed_plan == "best":
            run_all(init, [best], others)
        while best is not None and others and seed_plan == "neighbours":
            best = choose_best(bench.runs, init, grid, seeds)[0]
            i = grid.index(best)
            need = [lr for lr in grid[max(0, i - 1): i + 2] if not settled(bench.runs, init, lr, seeds)]
            if need:
                total += len(need) * len(others)
                run_all(init, need, others)
                continue
            if best in (grid[0], grid[-1]) and len(extended[init]) < max_extend:
                new = beyond(grid, "low" if best == grid[0] else "high")
                if new is not None:  # every seed agrees the edge is best: go beyond it with every seed
                    logger.info("%s: over all seeds the best rate %.3g is at the edge of the grid; adding %.3g",
                                init, best, new)
                    extended[init].append(new)
                    grid = sorted(grid + [new])
                    total += len(seeds)
                    run_all(init, [new], seeds)
                    continue
            break
        grids[init] = grid
    if ceiling and "lora" in inits and bench.s.bits != 16:
        best = choose_best(bench.runs, "lora", grids["lora"], seeds)[0]
        if best is not None:
            total += len(ceiling_seeds)
            for seed in ceiling_seeds:
                progress(bench.run("lora", best, seed, bits=16, ceiling=True), "ceiling")
    return extended


def choose_best(runs: list[dict], init: str, grid: Sequence[float], seeds: Sequence[int]) -> tuple[float | None, str]:
    """The best rate and how it was chosen: by the mean over all seeds among the rates every seed ran (all of
    the grid with ``full``, the first seed's best and its neighbours with ``neighbours``), else by the first
    seed's sweep (``best``: the other seeds then ran at that rate only)."""
    full = {lr: v for lr, v in rate_scores(runs, init, seeds).items() if lr in grid}
    if len(full) == len(grid):
        return best_rate(full), f"lowest mean final eval loss over seeds {list(seeds)} (every seed ran every rate)"
    if len(full) >= 2 and best_rate(full) is not None:
        return best_rate(full), (f"lowest mean final eval loss over seeds {list(seeds)} among the rates every seed "
                                 f"ran: seed {seeds[0]} swept the whole grid, the other seeds ran at its best rate "
                                 f"and that rate's neighbours (not where seed {seeds[0]} blew up)")
    first = {lr: v for lr, v in rate_scores(runs, init, seeds[:1]).items() if lr in grid}
    return best_rate(first), (f"lowest final eval loss of seed {seeds[0]}'s sweep over the whole grid; the other "
                              f"seeds ran at that rate only")


# ------------------------------------------------------------------------------------ summary
def summarize(runs: list[dict], settings: Settings, inits: Sequence[str], grids: dict[str, list[float]],
              seeds: Sequence[int], threshold_frac: float, ceiling_seeds: Sequence[int]) -> dict:
    main = [r for r in runs if not r.get("ceiling") and r["bits"] == settings.bits and r["seed"] in seeds
            and r["init"] in inits and r["lr"] in grids.get(r["init"], ())]
    out: dict[str, Any] = {"inits": {}, "criterion": "lowest final eval loss (mean over the deciding seeds); "
                                                     "a diverged run counts as inf"}
    for init in inits:
        grid = sorted(grids[init])
        best, how = choose_best(main, init, grid, seeds)
        sweep_rows = []
        for lr in grid:
            rs = [r for r in main if r["init"] == init and r["lr"] == lr]
            finals = [run_score(r) for r in rs]
            m, sd = mean_std(finals) if rs else (math.nan, math.nan)
            sweep_rows.append({"lr": lr, "runs": len(rs), "diverged": sum(r["status"] != "ok" for r in rs),
                               "final_mean": m, "final_std": sd,
                               "final_min": min(finals) if finals else math.nan,
                               "final_max": max(finals) if finals else math.nan})
        ran = {r["lr"] for r in main if r["init"] == init}  # a grid still being swept: its edge so far is no interior
        interior = (best is not None and grid[0] < best < grid[-1]
                    and all(grid[grid.index(best) + d] in ran for d in (-1, 1)))
        entry: dict[str, Any] = {"grid": grid, "best_lr": best, "chosen_by": how, "sweep": sweep_rows,
                                 "best_is_interior": interior, "grid_complete": ran >= set(grid),
                                 # both neighbours of the best rate ran with every seed (or blew up for the first)
                                 "interior_with_all_seeds": interior and all(
                                     settled(main, init, grid[grid.index(best) + d], seeds) for d in (-1, 1))}
        if best is not None:
            rs = sorted([r for r in main if r["init"] == init and r["lr"] == best], key=lambda r: r["seed"])
            entry.update(_curve_stats(rs))
        all_secs = [x for r in main if r["init"] == init for x in r["step_seconds"] if x is not None]
        entry["median_step_seconds_all_rates"] = statistics.median(all_secs) if all_secs else None
        out["inits"][init] = entry
    # paired by seed (the seed fixes the data order for every init): final loss minus LoRA's, at the best rates
    lora_e = out["inits"].get("lora", {})
    for init in inits:
        e = out["inits"][init]
        if init == "lora" or e.get("best_lr") is None or lora_e.get("best_lr") is None:
            continue
        mine = dict(zip(e["seeds"], [r["final_eval_loss"] if r["status"] == "ok" else math.inf for r in
                                     sorted([r for r in main if r["init"] == init and r["lr"] == e["best_lr"]],
                                            key=lambda r: r["seed"])]))
        ref = dict(zip(lora_e["seeds"], [r["final_eval_loss"] if r["status"] == "ok" else math.inf for r in
                                         sorted([r for r in main
                                                 if r["init"] == "lora" and r["lr"] == lora_e["best_lr"]],
                                                key=lambda r: r["seed"])]))
        diffs = [mine[x] - ref[x] for x in sorted(set(mine) & set(ref))]
        m, sd = mean_std(diffs)
        e["paired_vs_lora"] = {"seeds": sorted(set(mine) & set(ref)), "diffs": diffs, "mean": m, "std": sd}
    # thresholds. "near": LoRA's best final eval loss + 5% of the drop it achieved (does an init get to LoRA's
    # end result sooner?). "halfway": half-way from LoRA's step-0 loss to the best final loss of any init.
    ref_init = "lora" if out["inits"].get("lora", {}).get("best_lr") is not None else next(
        (i for i in inits if out["inits"][i].get("best_lr") is not None), None)
    thresholds = []
    if ref_init is not None:
        ref = out["inits"][ref_init]
        start, end = ref["initial_mean"], ref["final_mean"]
        best_end = min(out["inits"][i]["final_mean"] for i in inits if out["inits"][i].get("best_lr") is not None)
        thresholds = [
            {"name": "near", "eval_loss": end + threshold_frac * (start - end), "reference_init": ref_init,
             "definition": f"{ref_init}'s mean final eval loss at its best rate + {threshold_frac:g} x (its mean "
                           f"step-0 eval loss - that final loss)"},
            {"name": "halfway", "eval_loss": (start + best_end) / 2, "reference_init": ref_init,
             "definition": f"half-way between {ref_init}'s mean step-0 eval loss and the lowest mean final eval "
                           f"loss of any init at its best rate"},
        ]
        out["thresholds"] = thresholds
        out["threshold"] = thresholds[0]

    def reach(rs: list[dict]) -> dict:
        result = {}
        for t in thresholds:
            steps = [steps_to_threshold(r["evals"], t["eval_loss"]) if r["status"] == "ok" else None for r in rs]
            hit = [x for x in steps if x is not None]
            result[t["name"]] = {"steps": steps, "mean": statistics.fmean(hit) if hit else None,
                                 "reached": f"{len(hit)}/{len(steps)}"}
        return result

    for init in inits:
        e = out["inits"][init]
        if e.get("best_lr") is not None:
            e["reach"] = reach([r for r in main if r["init"] == init and r["lr"] == e["best_lr"]])
    # ceiling
    lora_best = out["inits"].get("lora", {}).get("best_lr")
    ceil = sorted([r for r in runs if r.get("ceiling") and r["lr"] == lora_best and r["seed"] in ceiling_seeds],
                  key=lambda r: r["seed"])
    if ceil:
        out["ceiling"] = {"init": "lora", "bits": 16, "lr": lora_best, **_curve_stats(ceil), "reach": reach(ceil)}
    # restore check: every (init, seed) has one step-0 eval loss whatever the rate
    spread = {}
    for init in inits:
        for seed in seeds:
            v = [r["initial_eval_loss"] for r in main if r["init"] == init and r["seed"] == seed
                 and r["initial_eval_loss"] is not None]
            if len(v) > 1:
                spread[f"{init}/{seed}"] = max(v) - min(v)
    out["restore_check_max_step0_spread"] = max(spread.values()) if spread else None
    secs = [r["seconds"] for r in runs]
    out["total_run_seconds"] = sum(secs)
    prep = {(r["init"], r["seed"], r["bits"]): r.get("prepare_seconds") or 0.0 for r in runs}
    out["total_prepare_seconds"] = sum(prep.values())  # once per (init, seed, bits) when not interrupted
    ends = [time.mktime(time.strptime(r["finished_at"], "%Y-%m-%d %H:%M:%S")) for r in runs if r.get("finished_at")]
    starts = [e - r["seconds"] for e, r in zip(ends, runs)]
    out["sweep_wall_seconds"] = max(ends) - min(starts) if ends else None  # first run's start to last run's end
    out["steps_trained"] = sum(r.get("steps_done", 0) for r in runs)
    loads = [r["load_average"][0] for r in runs if r.get("load_average")]
    out["run_load_1min"] = ({"median": statistics.median(loads), "min": min(loads), "max": max(loads),
                             "runs": len(loads)}
                            if loads else None)
    out["n_runs"] = len(runs)
    out["n_diverged"] = sum(r["status"] == "diverged" for r in runs)
    return out


def _curve_stats(rs: list[dict]) -> dict:
    """Mean / min / max eval curve over seeds (on the common eval steps) and the final-loss stats."""
    ok = [r for r in rs if r["status"] == "ok"]
    steps = sorted(set.intersection(*[{e["step"] for e in r["evals"]} for r in ok])) if ok else []
    curve = []
    for s in steps:
        vals = [next(e["eval_loss"] for e in r["evals"] if e["step"] == s) for r in ok]
        curve.append({"step": s, "mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)})
    finals = [r["final_eval_loss"] for r in ok]
    mins = [r["min_eval_loss"] for r in ok]
    inits_ = [r["initial_eval_loss"] for r in ok if r["initial_eval_loss"] is not None]
    secs = [x for r in rs for x in r["step_seconds"] if x is not None]
    fm, fs = mean_std(finals)
    mm, ms = mean_std(mins)
    return {"seeds": [r["seed"] for r in rs], "n_ok": len(ok), "curve": curve,
            "final_mean": fm, "final_std": fs, "final_per_seed": finals,
            "min_mean": mm, "min_std": ms,
            "initial_mean": statistics.fmean(inits_) if inits_ else math.nan,
            "median_step_seconds": statistics.median(secs) if secs else None}


# ------------------------------------------------------------------------------------ outputs
def write_plot(summary: dict, path: Path, settings: Settings) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is missing: no plot")
        return None
    colors = {"lora": "tab:blue", "olora": "tab:red", "pissa": "tab:green"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    for init, e in summary["inits"].items():
        if not e.get("curve"):
            continue
        c = colors.get(init)
        st = [p["step"] for p in e["curve"]]
        ax.plot(st, [p["mean"] for p in e["curve"]], color=c, marker="o", ms=3,
                label=f"{init} {settings.bits}-bit, lr {e['best_lr']:.3g} (n={e['n_ok']})")
        ax.fill_between(st, [p["min"] for p in e["curve"]], [p["max"] for p in e["curve"]], color=c, alpha=0.2)
    ce = summary.get("ceiling")
    if ce and ce.get("curve"):
        st = [p["step"] for p in ce["curve"]]
        ax.plot(st, [p["mean"] for p in ce["curve"]], color="black", ls="--",
                label=f"ceiling: lora 16-bit base, lr {ce['lr']:.3g} (n={ce['n_ok']})")
        if ce["n_ok"] > 1:
            ax.fill_between(st, [p["min"] for p in ce["curve"]], [p["max"] for p in ce["curve"]],
                            color="gray", alpha=0.2)
    for thr, style in zip(summary.get("thresholds", []), (":", "-.")):
        ax.axhline(thr["eval_loss"], color="gray", lw=0.8, ls=style,
                   label=f"threshold '{thr['name']}' {thr['eval_loss']:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out eval loss (token mean, prompt-masked)")
    ax.set_title("eval loss at each init's best learning rate\n(mean over seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    # clip the y axis a little above the highest step-0 loss: a rate that blew up (final loss far above where it
    # started) is drawn as a triangle at the top instead of squashing the rest of the sweep
    starts = [e["initial_mean"] for e in summary["inits"].values() if math.isfinite(e.get("initial_mean", math.nan))]
    cap = max(starts) * 1.08 if starts else math.inf
    finite_all = []
    for init, e in summary["inits"].items():
        rows = [r for r in e["sweep"] if r["runs"]]
        ok = [r for r in rows if math.isfinite(r["final_mean"]) and r["final_mean"] <= cap]
        off = [r["lr"] for r in rows if math.isfinite(r["final_mean"]) and r["final_mean"] > cap]
        finite_all += [min(r["final_max"], cap) for r in ok if math.isfinite(r["final_max"])]
        if ok:
            x = [r["lr"] for r in ok]
            y = [r["final_mean"] for r in ok]
            lo = [r["final_mean"] - r["final_min"] for r in ok]
            hi = [max(0.0, min(r["final_max"], cap) - r["final_mean"]) if math.isfinite(r["final_max"]) else 0.0
                  for r in ok]
            bx.errorbar(x, y, yerr=[lo, hi], color=colors.get(init), marker="o", capsize=3, label=init)
        if off:
            bx.scatter(off, [cap] * len(off), marker="^", s=70, color=colors.get(init),
                       label=f"{init}: blew up (final loss off the scale)")
        if e.get("best_lr") is not None:
            bx.scatter([e["best_lr"]], [e["final_mean"]], s=120, facecolors="none", edgecolors=colors.get(init))
    top = max(finite_all) if finite_all else 1.0
    for init, e in summary["inits"].items():
        bad = [r["lr"] for r in e["sweep"] if r["runs"] and not math.isfinite(r["final_mean"])]
        if bad:
            bx.scatter(bad, [top * 1.02] * len(bad), marker="x", s=60, color=colors.get(init),
                       label=f"{init}: diverged (some seed)")
    if ce and math.isfinite(ce.get("final_mean", math.nan)):
        bx.axhline(ce["final_mean"], color="black", ls="--", lw=1, label="ceiling (16-bit LoRA)")
    bx.set_xscale("log")
    bx.set_xlabel("peak learning rate")
    bx.set_ylabel(f"final eval loss after {settings.steps} steps")
    bx.set_title("learning-rate sweep (mean over the seeds run at a rate,\nbars = min..max; circle = best)")
    bx.grid(alpha=0.3, which="both")
    bx.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _fmt(x: float | None, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "diverged"
    return format(x, spec)


def write_table(report: dict, path: Path) -> Path:
    s, sm, m = report["settings"], report["summary"], report["machine"]
    thrs = sm.get("thresholds", [])
    lines = [
        "# Convergence: LoRA vs OLoRA vs PiSSA over a quantized base, each at its own best learning rate",
        "",
        f"Model `{Path(s['model']).name}` {s['bits']}-bit "
        f"{s['quant_type'] if s['bits'] == 4 else ''}, rank {s['rank']}, "
        f"alpha {s['alpha']:g}, all decoder linear layers; data `{Path(s['data']).name}` "
        f"({report['data'].get('train_examples')} train / "
        f"{report['data'].get('eval_examples')} fixed held-out examples, "
        f"{report['data'].get('eval_label_tokens')} eval label tokens, prompt-masked, max_length {s['max_length']}). "
        f"{s['steps']} steps, batch {s['batch_size']}, {s['optim']}, warmup {s['warmup_ratio']:g} + cosine to "
        f"{s['min_lr_ratio']:g}, grad clip {s['max_grad_norm']:g}, eval every {s['eval_every']} steps (and at 0); "
        f"seeds {report['seeds']}.",
        "",
        f"Best rate = {next(iter(sm['inits'].values()), {}).get('chosen_by', '-')} (a diverged run counts as "
        "infinitely bad; 'interior?' = strictly inside the swept grid). "
        + " ".join(f"Threshold '{t['name']}' = eval loss {t['eval_loss']:.4f}: {t['definition']}." for t in thrs)
        + (f" Steps to a threshold = the first eval step at or below it (resolution {s['eval_every']} steps), "
           "mean over the seeds that reach it (reached/seeds in brackets)." if thrs else ""),
        "",
        "| init | best lr | interior? | final eval loss (mean ± std) | per seed | minus LoRA, paired by seed "
        "| min eval loss on curve | step-0 eval loss | "
        + "".join(f"steps to '{t['name']}' | " for t in thrs) + "s / step (median) |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(thrs) + "---|",
    ]

    def per_seed(e: dict) -> str:
        return ", ".join(_fmt(x, ".3f") for x in e.get("final_per_seed", []))

    def paired(e: dict) -> str:
        p = e.get("paired_vs_lora")
        return f"{p['mean']:+.3f} ± {_fmt(p['std'], '.3f')} (n={len(p['diffs'])})" if p and p["diffs"] else "-"


    def reached(e: dict) -> str:
        cells = []
        for t in thrs:
            x = e.get("reach", {}).get(t["name"])
            cells.append(f"{_fmt(x['mean'], '.1f')} ({x['reached']}) | " if x else "- | ")
        return "".join(cells)

    for init, e in sm["inits"].items():
        if e.get("best_lr") is None:
            state = "all rates diverged" if any(r["runs"] for r in e["sweep"]) else "not run yet"
            lines.append(f"| {init} | {state} | | | | | | | " + "| " * len(thrs) + "|")
            continue
        interior = (("yes" if e.get("interior_with_all_seeds") else "yes (first seed)") if e["best_is_interior"]
                    else "NO (edge)")
        lines.append(
            f"| {init} | {e['best_lr']:.3g} | "
            f"{interior} | "
            f"{_fmt(e['final_mean'])} ± {_fmt(e['final_std'])} | {per_seed(e)} | {paired(e)} | "
            f"{_fmt(e['min_mean'])} ± {_fmt(e['min_std'])} | "
            f"{_fmt(e['initial_mean'])} | {reached(e)}{_fmt(e.get('median_step_seconds'), '.2f')} |")
    ce = sm.get("ceiling")
    if ce:
        lines.append(
            f"| lora, 16-bit base (ceiling) | {ce['lr']:.3g} | - | {_fmt(ce['final_mean'])}"
            f"{' ± ' + _fmt(ce['final_std']) if ce['n_ok'] > 1 else ' (1 seed)'} | {per_seed(ce)} | - | "
            f"{_fmt(ce['min_mean'])} | "
            f"{_fmt(ce['initial_mean'])} | {reached(ce)}{_fmt(ce.get('median_step_seconds'), '.2f')} |")
    main_runs = [r for r in report["runs"] if not r.get("ceiling")]
    lines += ["", "## The sweep: final eval loss by learning rate (mean ± std over the seeds run there; min..max)", "",
              "| init | " + " | ".join(["lr", "runs", "final eval loss", "min..max", "diverged"]) + " |",
              "|---|---|---|---|---|---|"]
    for init, e in sm["inits"].items():
        for r in e["sweep"]:
            star = " **best**" if r["lr"] == e.get("best_lr") else ""
            ext = " (added)" if r["lr"] in report["extended"].get(init, []) else ""
            loss = (f"{_fmt(r['final_mean'])} ± {_fmt(r['final_std'])}{star}" if math.isfinite(r["final_mean"])
                    else f"diverged ({r['diverged']}/{r['runs']} seeds)" if r["runs"] else "not run yet")
            worse = sum(blown_up(x) and x["status"] == "ok"
                        for x in main_runs if x["init"] == init and x["lr"] == r["lr"])
            if worse:
                loss += f" (blew up: {worse} run(s) ended above their step-0 loss)"
            lines.append(f"| {init} | {r['lr']:.3g}{ext} | {r['runs']} | {loss} | "
                         f"{_fmt(r['final_min'])}..{_fmt(r['final_max'])} | {r['diverged']} |")
    lines += [
        "",
        f"Runs: {sm['n_runs']} ({sm['n_diverged']} diverged, {sm['steps_trained']} optimizer steps); run time "
        f"{sm['total_run_seconds'] / 60:.1f} min "
        f"(training {sum(sum(x for x in r['step_seconds'] if x) for r in report['runs']) / 60:.1f} "
        f"min, the rest evals and set-up) + {sm['total_prepare_seconds'] / 60:.1f} min preparing models; wall time "
        f"of the whole sweep {_fmt((sm['sweep_wall_seconds'] or math.nan) / 60, '.1f')} min. "
        f"Step-0 eval loss spread across the rates of one (init, seed), i.e. the check that restoring the initial "
        f"adapter weights between rates restores the model: {_fmt(sm['restore_check_max_step0_spread'], '.2e')}.",
        f"Machine: {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('torch_threads')} torch thread(s), shared with "
        + (f"other jobs: 1-min load average at the end of a run median {sm['run_load_1min']['median']:.1f}, "
           f"{sm['run_load_1min']['min']:.1f}..{sm['run_load_1min']['max']:.1f} over the {sm['run_load_1min']['runs']} "
           f"runs that recorded it" if sm.get("run_load_1min") else f"other jobs: load average {m.get('load_average')}")
        + f"), {'GPU ' + m['cuda'] if m.get('cuda') else 'no GPU'}; "
        f"torch {m['versions'].get('torch')}, transformers {m['versions'].get('transformers')}, "
        f"bitsandbytes {m['versions'].get('bitsandbytes')}; qolora commit {m.get('git_commit')}"
        f"{' (qolora/ had uncommitted changes)' if m.get('git_qolora_dirty') else ''}.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local transformers folder (default: the cached SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="records file for load_records (qolora.data; default: chatterbot conversations)")
    p.add_argument("--out", help="output prefix: <out>.json/.png/.md and <out>_runs.jsonl "
                                 "(default benchmarks/results/convergence; with --quick a temp folder)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 6 steps, 1 seed, 2 rates per init, 128 records, "
                                                        "16 eval examples, eval every 3 (each option can still be set)")
    p.add_argument("--inits", default=",".join(INITS), help="comma list from lora,olora,pissa")
    for init in INITS:
        p.add_argument(f"--rates-{init}", type=parse_rates, default=None,
                       help="comma list of peak learning rates "
                            f"(default {','.join(f'{x:g}' for x in DEFAULT_RATES[init])})")
    p.add_argument("--seeds", type=parse_seeds, default=None, help="N (seeds 0..N-1) or a comma list (default 3)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run (default 16: what fits ~1 h for 43 runs "
                        "on the shared 2-core CPU at ~3.5 s per step)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N records")
    p.add_argument("--eval-examples", type=int, default=None, help="fixed held-out examples (default 48)")
    p.add_argument("--eval-every", type=int, default=None, help="eval interval in steps (default 4)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="eval micro-batch (examples are length-sorted, "
                                                                  "so small batches waste little padding)")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8, 16))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--optim", default="paged_adamw_8bit", help="qolora.train optimizer (default: its default; "
                                                               "on the CPU the same 8-bit AdamW without paging)")
    p.add_argument("--dtype", default="bf16", help="dtype of the non-quantized parts and the 4-bit compute "
                   "(default bf16, QLoRA's compute dtype; on this AVX512-BF16 CPU also 1.6x faster than fp32)")
    p.add_argument("--mixed-precision", default="bf16", help="TrainConfig.mixed_precision (default bf16 autocast)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 1: on the shared 2-core CPU one thread ran a step 3.5x faster than "
                        "two, whose OpenMP threads spin against other jobs; give more on a machine of your own)")
    p.add_argument("--seed-plan", choices=SEED_PLANS, default="neighbours",
                   help="neighbours (default): the first seed sweeps the whole grid, the other seeds run at its best "
                        "rate and that rate's neighbours, and the mean over seeds decides; best: the other seeds at "
                        "the first seed's best rate only; full: every seed at every rate (reuses finished runs)")
    p.add_argument("--max-extend", type=int, default=None, help="rates that may be added per init (default 3)")
    p.add_argument("--threshold-frac", type=float, default=0.05,
                   help="threshold = LoRA's best final eval loss + FRAC x (its step-0 loss - that loss)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the 16-bit LoRA ceiling run")
    p.add_argument("--ceiling-seeds", type=parse_seeds, default=None, help="seeds of the ceiling (default 1 = seed 0)")
    p.add_argument("--report-only", action="store_true", help="only rebuild json/png/md from the runs JSONL")
    p.add_argument("--keep-run-plots", action="store_true", help="let train() draw its per-run loss.png (slower)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        for noisy in ("qolora", "datasets", "transformers", "bitsandbytes"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads or 1)

    q = args.quick
    inits = [x.strip() for x in args.inits.split(",") if x.strip()]
    bad = [x for x in inits if x not in INITS]
    if bad or not inits:
        raise SystemExit(f"--inits: unknown init(s) {bad}; choose from {list(INITS)}")
    grids = {}
    for init in inits:
        given = getattr(args, f"rates_{init}")
        grids[init] = list(given if given is not None else (QUICK_RATES if q else DEFAULT_RATES)[init])
    seeds = args.seeds or ((0,) if q else (0, 1, 2))
    ceiling_seeds = args.ceiling_seeds or (0,)
    max_extend = args.max_extend if args.max_extend is not None else (1 if q else 3)

    from qolora.data import assets

    model = Path(args.model).expanduser().resolve() if args.model else assets.default_model_dir()
    data = Path(args.data).expanduser().resolve() if args.data else assets.default_dataset_path()
    settings = Settings(
        model=str(model), data=str(data), data_bytes=data.stat().st_size if data.is_file() else None,
        bits=args.bits, rank=args.rank, alpha=args.alpha,
        steps=args.steps or (6 if q else 16), batch_size=args.batch_size, max_length=args.max_length,
        max_examples=args.max_examples if args.max_examples is not None else (128 if q else None),
        eval_examples=args.eval_examples or (16 if q else 48), eval_every=args.eval_every or (3 if q else 4),
        eval_batch_size=args.eval_batch_size, warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio,
        max_grad_norm=args.max_grad_norm, optim=args.optim, dtype=args.dtype, mixed_precision=args.mixed_precision,
        device=args.device,
    )
    if args.out:
        prefix = Path(args.out).expanduser()
    elif q:
        prefix = Path(tempfile.gettempdir()) / "qolora-convergence-quick" / "convergence"
    else:
        prefix = RESULTS / "convergence"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    runs_path = prefix.with_name(prefix.name + "_runs.jsonl")
    machine = machine_info()
    started = time.perf_counter()
    bench = Bench(settings, runs_path, threads=args.threads, keep_run_plots=args.keep_run_plots)
    logger.info("settings %s (key %s); %d earlier runs with these settings in %s", settings, bench.skey,
                len(bench.done), runs_path)
    extended: dict[str, list[float]] = {i: [] for i in inits}
    if not args.report_only:
        extended = sweep(bench, inits, grids, seeds, max_extend=max_extend, ceiling=not args.no_ceiling,
                         ceiling_seeds=ceiling_seeds, seed_plan=args.seed_plan)
    else:  # the grids as the runs left them (extensions included)
        for init in inits:
            have = {r["lr"] for r in bench.runs if r["init"] == init and not r.get("ceiling") and r["seed"] in seeds}
            extended[init] = sorted(have - set(grids[init]))
            grids[init] = sorted(set(grids[init]) | have)
    _, _, _, data_info = bench.data() if not args.report_only or bench.runs else (None, None, None, {})
    summary = summarize(bench.runs, settings, inits, grids, seeds, args.threshold_frac, ceiling_seeds)
    report = {
        "benchmark": "convergence",
        "description": __doc__.split("\n\n")[1],
        "settings": dataclasses.asdict(settings),
        "settings_key": bench.skey,
        "inits": inits,
        "seeds": list(seeds),
        "ceiling_seeds": list(ceiling_seeds),
        "seed_plan": args.seed_plan,
        "grids": grids,
        "extended": extended,
        "data": data_info,
        "machine": machine,
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "prepare_seconds": bench.prepare_seconds,
        "invocation_seconds": time.perf_counter() - started,
        "new_runs_this_invocation": bench.new_runs,
        "summary": summary,
        "runs": sorted([r for r in bench.runs if r["key"] in bench.done],
                       key=lambda r: (bool(r.get("ceiling")), r["init"], r["lr"], r["seed"])),
        "runs_file": str(runs_path),
    }
    json_path = prefix.with_name(prefix.name + ".json")
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(report), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    png = write_plot(summary, prefix.with_name(prefix.name + ".png"), settings)
    md = write_table(report, prefix.with_name(prefix.name + ".md"))
    logger.info("wrote %s, %s, %s (%d new runs, %.0f s)", json_path, png, md, bench.new_runs,
                report["invocation_seconds"])
    print(md.read_text(encoding="utf-8"))
    return {"json": json_path, "png": png, "md": md, "runs": runs_path, "report": report}


if __name__ == "__main__":
    main()
