"""The defaults study (issue 22): every adapter init at its own best learning rate, on two held-out tasks, at a
real horizon, resumable across sessions.

Protocol (the defaults of this script)::

    model       the cached SmolLM2-135M-Instruct (qolora.data.assets), 4-bit NF4 base (blocksize 64, double
                quantization), rank 16, alpha 16 (s = 1), every linear layer of the decoder
    tasks       chat:  the chatterbot conversations (qolora's default data), each distinct conversation once
                       (the file repeats many), prompt-masked, max 128 tokens, 128 fixed held-out conversations
                pydoc: plain language modelling on another domain: the Python language reference that ships
                       with CPython (``pydoc_data.topics``, what ``help("if")`` shows), its topics in a fixed
                       hashed order, EOS between topics, cut into blocks of 128 tokens; the first 128 blocks
                       are held out, every token of a block is trained on
    training    100 optimizer steps of batch 8, qolora.train's defaults otherwise (8-bit AdamW, warmup 5%,
                cosine to 0, grad clip 1.0), fp32 compute (this CPU has no fast bf16), no gradient
                checkpointing, eval loss at 0/20/40/60/80/100 on the same held-out examples
    contenders  lora (plain QLoRA), olora, olora_r2 (refine=2), pissa, loftq (PEFT's LoftQ through
                transformers + PEFT: the reference) and lora16 (LoRA on the unquantized base: the ceiling)
    rates       per contender a grid of 4 rates on the 1-3-10 series, extended beyond an edge while seed 0's
                best rate sits there (benchmarks.convergence.sweep), then seeds 1 and 2 at the best rate
                and its two neighbours ("neighbours" seed plan; the mean over seeds decides)

LoftQ: the model is loaded with transformers' ``BitsAndBytesConfig`` (NF4, double quantization, the same
compute dtype), wrapped by ``peft.get_peft_model`` (``target_modules="all-linear"``) and initialised with
``peft.replace_lora_weights_loftq`` (LoftQ's one-iteration form over the model's own quantized weights).
PEFT hard-codes a CUDA (or XPU) compute device in ``_loftq_init_new``; on a machine without CUDA that one
line is set to ``"cpu"`` while it runs (:func:`peft_loftq_on_cpu`, PEFT's own source otherwise). The factors
are then copied into a qolora ``init="lora"`` model over the same NF4 base and trained by the same loop as
every other contender (the base's dequantized weights are checked equal to PEFT's and recorded).

Order (the most useful information first): the seed-0 grids of LoRA and OLoRA on both tasks, then the
seed-0 grids of the other contenders, then the other seeds (LoRA and OLoRA first). Every finished run is
appended (and fsynced) to ``<out>_runs.jsonl`` at once, keyed by its settings (the task included); a rerun
skips finished runs, so an interrupted study loses at most the run in progress and grows across sessions.
``<out>.json``, ``<out>.md`` and ``<out>.png`` are rebuilt from whatever runs exist at the end of every
invocation (and after every phase): best rates, curves at 20/40/60/100, paired differences by seed with
their 95% interval (where the interval holds 0 the difference is inside the noise), the rate of least
mean regret over both tasks and the horizons.

``--step0`` (no training) writes ``<out>_step0.json`` / ``.md``: token-mean KL(fp32 || model) and loss on
256 held-out examples of each task for plain NF4, OLoRA, OLoRA refine 1/2/5, PiSSA and LoftQ, with each
init's weight error; the same on a copy of the model whose weights are made genuinely 16-bit (the
Q4_1 grid its GGUF weights sit on, blocks of 32 along the input dimension, is broken by adding uniform
noise within each block's half step, so the weights still round to the same Q4_1 values), and the
weight errors on a random synthetic checkpoint of the same architecture (``qolora.base.synthetic``).

Usage::

    python -m benchmarks.defaults_study --threads 1            # the study (many CPU hours; resumable)
    python -m benchmarks.defaults_study --plan                 # the remaining runs and their estimated cost
    python -m benchmarks.defaults_study --report-only          # rebuild json/md/png from the runs
    python -m benchmarks.defaults_study --step0                # the step-0 measurement and investigation

Two workers on two cores: give each its tasks and its own runs file (``--tasks chat --out A/defaults_study``,
``--tasks pydoc --out B/defaults_study``, each seeded with a copy of the committed runs file), then bring
their runs into the committed file with ``--report-only --merge-runs A/defaults_study_runs.jsonl
B/defaults_study_runs.jsonl``. One process per file: appends never interleave.
    python -m benchmarks.defaults_study --quick                # a smoke test of everything (temp folder)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import inspect
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import convergence as conv  # noqa: E402

logger = logging.getLogger("benchmarks.defaults_study")

RESULTS = REPO / "benchmarks" / "results"
PROTOCOL = "defaults_study/1"  # bump when the meaning of a run changes (it is part of the resume key)
TASKS = ("chat", "pydoc")
HORIZONS = (20, 40, 60, 100)


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    init: str  # qolora.prepare's init
    label: str
    bits: int = 4
    refine: int = 0
    peft_loftq: bool = False  # factors from PEFT's replace_lora_weights_loftq, copied into a lora-init model


CONTENDERS: dict[str, Contender] = {c.name: c for c in (
    Contender("lora", "lora", "LoRA (plain QLoRA)"),
    Contender("olora", "olora", "OLoRA"),
    Contender("olora_r2", "olora", "OLoRA refine 2", refine=2),
    Contender("pissa", "pissa", "PiSSA"),
    Contender("loftq", "lora", "LoftQ (PEFT, 1 iteration)", peft_loftq=True),
    Contender("lora16", "lora", "LoRA, 16-bit base (ceiling)", bits=16),
)}
FIRST = ("lora", "olora")  # their seed-0 grids run first
#: Starting grids: 4 rates on the 1-3-10 series around what benchmarks/convergence.py found at 16 steps
#: (best rates there: LoRA 3e-3, OLoRA 3e-4, PiSSA 1e-3) and one step lower, for the longer horizon.
GRIDS: dict[str, tuple[float, ...]] = {
    "lora": (3e-4, 1e-3, 3e-3, 1e-2),
    "olora": (3e-5, 1e-4, 3e-4, 1e-3),
    "olora_r2": (3e-5, 1e-4, 3e-4, 1e-3),
    "pissa": (1e-4, 3e-4, 1e-3, 3e-3),
    "loftq": (3e-4, 1e-3, 3e-3, 1e-2),
    "lora16": (3e-4, 1e-3, 3e-3, 1e-2),
}
QUICK_GRIDS: dict[str, tuple[float, ...]] = {"lora": (1e-3, 1e-2), "olora": (1e-4, 1e-3), "olora_r2": (1e-4, 1e-3),
                                              "pissa": (1e-4, 1e-3), "loftq": (1e-3, 1e-2), "lora16": (1e-3, 1e-2)}
PAIRS = (("olora", "lora"), ("olora_r2", "lora"), ("olora_r2", "olora"), ("pissa", "lora"), ("loftq", "lora"),
         ("olora", "loftq"), ("olora", "pissa"), ("lora16", "lora"))
COLORS = {"lora": "tab:blue", "olora": "tab:red", "olora_r2": "tab:orange", "pissa": "tab:green",
          "loftq": "tab:purple", "lora16": "black"}
#: two-sided 95% t quantiles by degrees of freedom (n - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# ------------------------------------------------------------------------------------ settings
@dataclasses.dataclass
class StudySettings(conv.Settings):
    """conv.Settings plus the task; the resume key uses the model's and data's names, not their full paths
    (a later session on another machine continues the same study), and the corpus's content hash."""

    task: str = "chat"
    corpus: str = ""
    data_sha: str = ""
    protocol: str = PROTOCOL
    dedupe: bool = True  # chat: drop repeated conversations before the split (held-out means unseen)

    def key(self) -> str:
        d = dataclasses.asdict(self)
        d["model"] = Path(self.model).name
        d["data"] = Path(self.data).name
        blob = json.dumps(d, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ the LM corpus
def pydoc_corpus() -> tuple[list[tuple[str, str]], dict]:
    """The Python language reference topics shipped with CPython, in a fixed order (sha1 of the topic name), and
    where they come from (with a content hash: another Python version may ship other text)."""
    import platform
    import pydoc_data.topics as topics

    items = sorted(topics.topics.items(), key=lambda kv: hashlib.sha1(kv[0].encode()).hexdigest())
    sha = hashlib.sha256("\x00".join(f"{k}\x01{v}" for k, v in items).encode()).hexdigest()[:16]
    return items, {"source": "pydoc_data.topics (the Python language reference shipped with CPython "
                             f"{platform.python_version()}: what help('if') shows)",
                   "file": topics.__file__, "topics": len(items), "chars": sum(len(v) for _, v in items), "sha": sha}


def lm_blocks(tokenizer, items: Sequence[tuple[str, str]], block: int, limit: int | None = None) -> list[list[int]]:
    """Every topic's tokens followed by EOS, concatenated and cut into consecutive blocks of ``block`` tokens (the
    last partial block is dropped); at most ``limit`` blocks."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    blocks: list[list[int]] = []
    for _, text in items:
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
        while len(stream) >= block:
            blocks.append(stream[:block])
            stream = stream[block:]
        if limit is not None and len(blocks) >= limit:
            return blocks[:limit]
    return blocks


def distinct_conversations(records) -> tuple[list[int], int]:
    """Indices of the first occurrence of each conversation (roles and case- and space-normalized contents), and
    the number of records."""
    keep, seen = [], set()
    for i, r in enumerate(records):
        msgs = r.get("messages") if isinstance(r, dict) else None
        key = json.dumps([(m.get("role"), " ".join(str(m.get("content", "")).lower().split())) for m in msgs]
                         if msgs else sorted((k, str(v)) for k, v in dict(r).items()))
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep, len(records)


# ------------------------------------------------------------------------------------ LoftQ through PEFT
_LOFTQ_NEEDLE = 'compute_device = "xpu" if is_xpu_available() else "cuda"'


@contextlib.contextmanager
def peft_loftq_on_cpu():
    """Run PEFT's ``_loftq_init_new`` with its compute device set to the CPU (PEFT hard-codes CUDA/XPU); a no-op
    where CUDA is there. The patched function is PEFT's own source with that one line changed; if PEFT's source
    no longer holds the line, this fails rather than guess."""
    import torch
    from peft.utils import loftq_utils

    if torch.cuda.is_available():
        yield "peft as is (cuda)"
        return
    src = textwrap.dedent(inspect.getsource(loftq_utils._loftq_init_new))
    if _LOFTQ_NEEDLE not in src:
        raise RuntimeError("peft.utils.loftq_utils._loftq_init_new no longer holds the line "
                           f"{_LOFTQ_NEEDLE!r}: adapt benchmarks.defaults_study.peft_loftq_on_cpu")
    namespace: dict[str, Any] = {}
    exec(compile(src.replace(_LOFTQ_NEEDLE, 'compute_device = "cpu"'), "<peft _loftq_init_new, cpu>", "exec"),
         loftq_utils.__dict__, namespace)
    original = loftq_utils._loftq_init_new
    loftq_utils._loftq_init_new = namespace["_loftq_init_new"]
    try:
        yield "peft's _loftq_init_new with compute_device='cpu'"
    finally:
        loftq_utils._loftq_init_new = original


def peft_loftq_model(model_dir: str | Path, *, rank: int, alpha: float, dtype: str = "fp32", quant_type: str = "nf4",
                     device: str = "cpu"):
    """transformers (bitsandbytes 4-bit) + PEFT LoRA on every linear layer, initialised by PEFT's LoftQ."""
    import torch
    from peft import LoraConfig, get_peft_model, replace_lora_weights_loftq
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qolora.base.bnb_cpu_fix import ensure_cpu_dequantize_correct

    # PEFT's LoftQ dequantizes the 4-bit base to fit its factors: on a CPU whose bitsandbytes AVX-512
    # dequantization is wrong for some shapes, the reference would fit them to a wrong base
    ensure_cpu_dequantize_correct()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch_dtype)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=bnb, dtype=torch_dtype,
                                                device_map=device)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear",
                                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    with peft_loftq_on_cpu() as how:
        replace_lora_weights_loftq(peft_model, model_path=str(model_dir))
    for module in peft_model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # as qolora's own 4-bit layers: on a CPU with AVX512-BF16, bitsandbytes would repack the weight with
            # bf16 statistics at the first eval forward, and the reference would evaluate other weights
            module.support_avx512bf16_for_cpu = False
    peft_model.eval()
    peft_model.loftq_how = how
    return peft_model


def peft_lora_layers(peft_model) -> dict[str, Any]:
    """``{qolora-style layer name: PEFT LoRA layer}`` (the ``base_model.model.`` prefix dropped)."""
    out = {}
    for name, module in peft_model.named_modules():
        a = getattr(module, "lora_A", None)
        if a is not None and hasattr(a, "keys") and "default" in a.keys():
            out[name.removeprefix("base_model.model.")] = module
    return out


_LOFTQ_CACHE: dict[tuple, tuple[dict, dict]] = {}


def loftq_factors(model_dir: str, *, rank: int, alpha: float, dtype: str, quant_type: str, device: str):
    """``({layer: (A, B)} on the CPU, info)`` from PEFT's LoftQ, computed once per process and settings."""
    key = (str(model_dir), rank, alpha, dtype, quant_type, device)
    if key not in _LOFTQ_CACHE:
        t0 = time.perf_counter()
        pm = peft_loftq_model(model_dir, rank=rank, alpha=alpha, dtype=dtype, quant_type=quant_type,
                              device="cpu" if device in ("auto", "cpu") else device)
        factors = {n: (m.lora_A["default"].weight.detach().cpu().clone(),
                       m.lora_B["default"].weight.detach().cpu().clone(), float(m.scaling["default"]))
                   for n, m in peft_lora_layers(pm).items()}
        info = {"how": pm.loftq_how, "seconds": time.perf_counter() - t0, "layers": len(factors)}
        # keep the PEFT model's dequantized bases for the transplant check (cheap: the model is small)
        from qolora.base.quant import dequantize_weight

        info["_bases"] = {n: dequantize_weight(m.base_layer).cpu() for n, m in peft_lora_layers(pm).items()}
        del pm
        gc.collect()
        _LOFTQ_CACHE[key] = (factors, info)
    return _LOFTQ_CACHE[key]


def apply_loftq_factors(net, factors: dict, bases: dict) -> dict:
    import torch

    from qolora.adapters.layer import adapter_layers
    from qolora.base.quant import dequantize_weight

    mine = dict(adapter_layers(net))
    if set(mine) != set(factors):
        raise RuntimeError(f"LoftQ: the adapted layers differ ({len(mine)} qolora, {len(factors)} PEFT)")
    base_diff, scale_diff = 0.0, 0.0
    with torch.no_grad():
        for name, layer in mine.items():
            a, b, s = factors[name]
            layer.lora_A.weight.copy_(a.to(layer.lora_A.weight))
            layer.lora_B.weight.copy_(b.to(layer.lora_B.weight))
            scale_diff = max(scale_diff, abs(s - layer.scaling))
            ours = dequantize_weight(layer.base_layer)
            base_diff = max(base_diff, float((ours - bases[name].to(ours)).abs().max()))
    return {"layers": len(mine), "base_max_abs_diff": base_diff, "scale_max_abs_diff": scale_diff}


# ------------------------------------------------------------------------------------ the bench
class StudyBench(conv.Bench):
    """conv.Bench for one task: the LM corpus as data, contender names as inits (refine, LoftQ, 16-bit)."""

    s: StudySettings

    def __init__(self, settings: StudySettings, runs_path: Path, *, threads: int | None, corpus=None,
                 git_commit: str | None = None):
        super().__init__(settings, runs_path, threads=threads)
        self.corpus = corpus
        self.git_commit = git_commit
        self.loftq_checks: list[dict] = []

    def data(self):
        if self._data is not None or self.s.task == "chat":
            return super().data()
        import datasets

        from qolora.data.tokens import load_tokenizer

        t0 = time.perf_counter()
        tokenizer = load_tokenizer(Path(self.s.model))
        items = self.corpus if self.corpus is not None else pydoc_corpus()[0]
        limit = None if self.s.max_examples is None else self.s.max_examples
        blocks = lm_blocks(tokenizer, items, self.s.max_length, limit)
        n_eval = min(self.s.eval_examples, len(blocks) // 2)
        eval_b, train_b = blocks[:n_eval], blocks[n_eval:]
        train_ds = datasets.Dataset.from_dict({"input_ids": train_b, "labels": train_b})
        eval_ds = datasets.Dataset.from_dict({"input_ids": eval_b, "labels": eval_b})
        info = {"records": len(blocks), "examples": len(blocks), "train_examples": len(train_b),
                "eval_examples": len(eval_b), "eval_label_tokens": sum(len(b) - 1 for b in eval_b),
                "block_tokens": self.s.max_length, "corpus": self.s.corpus, "seconds": time.perf_counter() - t0}
        logger.info("data (%s): %s", self.s.task, info)
        self._data = (tokenizer, train_ds, eval_ds, info)
        return self._data

    def select_records(self, records):
        """With ``dedupe``, repeated conversations dropped first (the first of each kept, in file order): the
        chatterbot records repeat many conversations, which would otherwise sit on both sides of the split."""
        if not self.s.dedupe:
            return records, {}
        keep, seen = distinct_conversations(records)
        return records.select(keep), {"records_in_file": seen, "distinct_records": len(keep)}

    def bits_for(self, init: str) -> int:
        return CONTENDERS[init].bits

    def prepare_model(self, init: str, seed: int, bits: int):
        from qolora import prepare

        c = CONTENDERS[init]
        extra: dict[str, Any] = {"quant_type": self.s.quant_type} if bits == 4 else {}
        if c.refine:
            extra["refine"] = c.refine
        net = prepare(self.s.model, bits=bits, rank=self.s.rank, init=c.init, alpha=self.s.alpha, seed=seed,
                      progress=False, gradient_checkpointing=False, device=self.s.device, dtype=self.s.dtype, **extra)
        if c.peft_loftq:
            factors, info = loftq_factors(self.s.model, rank=self.s.rank, alpha=self.s.alpha, dtype=self.s.dtype,
                                          quant_type=self.s.quant_type, device=self.s.device)
            check = apply_loftq_factors(net, factors, info["_bases"])
            check.update({k: v for k, v in info.items() if not k.startswith("_")})
            self.loftq_checks.append(check)
            logger.info("LoftQ factors from PEFT: %s", check)
        return net

    def _record(self, metrics_path: Path, **fields) -> dict:
        rec = super()._record(metrics_path, **fields)
        rec["task"] = self.s.task
        rec["contender"] = fields.get("init")
        rec["git_commit"] = self.git_commit
        if CONTENDERS.get(fields.get("init"), CONTENDERS["lora"]).peft_loftq and self.loftq_checks:
            rec["loftq_check"] = self.loftq_checks[-1]
        return rec

    def release(self) -> None:
        self._models.clear()
        gc.collect()


# ------------------------------------------------------------------------------------ the schedule
def grid_of(bench: conv.Bench, name: str, start: Sequence[float], seed0: int = 0) -> tuple[list[float], list[float]]:
    """The contender's grid as the runs left it (start + every rate seed 0 ran) and the rates added to it."""
    ran = {r["lr"] for r in bench.runs if r["init"] == name and r["seed"] == seed0 and r["key"] in bench.done}
    added = sorted(ran - set(start))
    return sorted(set(start) | ran), added


def phases(tasks: Sequence[str], contenders: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(phase, task, contender)`` in the order the study runs them."""
    first = [c for c in FIRST if c in contenders]
    rest = [c for c in contenders if c not in first]
    out = [("grid", t, c) for t in tasks for c in first]
    out += [("grid", t, c) for t in tasks for c in rest]
    out += [("seeds", t, c) for c in first for t in tasks]
    out += [("seeds", t, c) for c in rest for t in tasks]
    return out


def run_study(benches: dict[str, StudyBench], contenders: Sequence[str], grids: dict[str, Sequence[float]],
              seeds: Sequence[int], *, max_extend: int, after_phase=None) -> None:
    for phase, task, name in phases(list(benches), contenders):
        bench = benches[task]
        for other in benches.values():
            if other is not bench:
                other.release()
        if phase == "seeds" and len(seeds) < 2:
            continue
        grid, added = grid_of(bench, name, grids[name], seeds[0])
        use_seeds = tuple(seeds[:1]) if phase == "grid" else tuple(seeds)
        logger.info("== %s: %s / %s, grid %s, seeds %s", phase, task, name, [f"{x:.3g}" for x in grid],
                    list(use_seeds))
        before = bench.new_runs
        conv.sweep(bench, [name], {name: list(grid)}, use_seeds, max_extend=max(0, max_extend - len(added)),
                   ceiling=False, ceiling_seeds=(), seed_plan="neighbours")
        bench.release()
        if after_phase is not None and bench.new_runs > before:  # the report, rebuilt from what is there now
            after_phase()


# ------------------------------------------------------------------------------------ statistics
def paired_stats(diffs: Sequence[float]) -> dict:
    """Mean, sd, n and the 95% t interval of paired differences; ``inside_noise`` when it holds 0 (or n < 2)."""
    d = [x for x in diffs if x is not None and math.isfinite(x)]
    n = len(d)
    if n == 0:
        return {"n": 0, "diffs": list(diffs), "mean": None, "std": None, "ci95": None, "inside_noise": None}
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else None
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n) if sd is not None else None
    inside = True if half is None else (mean - half <= 0 <= mean + half)
    return {"n": n, "diffs": d, "mean": mean, "std": sd, "ci95": [mean - half, mean + half] if half is not None
            else None, "inside_noise": inside, "same_sign": all(x < 0 for x in d) or all(x > 0 for x in d)}


def loss_at(run: dict, step: int) -> float | None:
    if run.get("status") != "ok":
        return math.inf
    for e in run.get("evals", []):
        if e["step"] == step:
            return e["eval_loss"]
    return None


def horizons_of(steps: int) -> list[int]:
    hs = [h for h in HORIZONS if h < steps]
    return hs + [steps]


def task_summary(bench: StudyBench, contenders: Sequence[str], grids: dict[str, Sequence[float]],
                 seeds: Sequence[int]) -> dict:
    """conv.summarize for the contenders of one task (the 16-bit one on its own), curves at the horizons, pairs."""
    s = bench.s
    out: dict[str, Any] = {"contenders": {}, "grids": {}, "added": {}}
    for name in contenders:
        grid, added = grid_of(bench, name, grids[name], seeds[0])
        out["grids"][name], out["added"][name] = grid, added
    runs = [r for r in bench.runs if r["key"] in bench.done]
    for bits in sorted({CONTENDERS[c].bits for c in contenders}):
        names = [c for c in contenders if CONTENDERS[c].bits == bits]
        sm = conv.summarize(runs, dataclasses.replace(s, bits=bits), names, out["grids"], seeds, 0.05, (seeds[0],))
        for name in names:
            out["contenders"][name] = sm["inits"][name]
        if bits == s.bits:
            out["thresholds"] = sm.get("thresholds", [])
    hs = horizons_of(s.steps)
    out["horizons"] = hs
    best_runs: dict[str, dict[int, dict]] = {}
    for name in contenders:
        e = out["contenders"][name]
        best = e.get("best_lr")
        at = {r["seed"]: r for r in runs if r["init"] == name and best is not None and r["lr"] == best}
        best_runs[name] = at
        rows = []
        for h in [0, *hs]:
            vals = [loss_at(r, h) for r in at.values()]
            vals = [v for v in vals if v is not None]
            m, sd = conv.mean_std(vals) if vals else (math.nan, math.nan)
            rows.append({"step": h, "mean": m, "std": sd, "n": len(vals)})
        e["at_horizons"] = rows
        e["label"] = CONTENDERS[name].label
    pairs = []
    for a, b in PAIRS:
        if a not in best_runs or b not in best_runs or not best_runs[a] or not best_runs[b]:
            continue
        common = sorted(set(best_runs[a]) & set(best_runs[b]))
        by_h = {}
        for h in hs:
            diffs = []
            for x in common:
                la, lb = loss_at(best_runs[a][x], h), loss_at(best_runs[b][x], h)
                if la is not None and lb is not None:
                    diffs.append(la - lb)
            by_h[h] = paired_stats(diffs)
        pairs.append({"a": a, "b": b, "lr_a": out["contenders"][a]["best_lr"], "lr_b": out["contenders"][b]["best_lr"],
                      "seeds": common, "by_horizon": by_h})
    out["pairs"] = pairs
    out["n_runs"] = len(runs)
    secs = [r["seconds"] for r in runs if r.get("status") == "ok"]
    out["median_run_seconds"] = statistics.median(secs) if secs else None
    return out


def regret_table(benches: dict[str, StudyBench], summaries: dict[str, dict], contenders: Sequence[str]) -> dict:
    """Per contender: for every rate run on every task, the mean over tasks and horizons of its regret (its eval
    loss minus the best rate's at that task and horizon; each rate's loss is the mean over the seeds run there),
    and the rate with the smallest mean regret."""
    out = {}
    for name in contenders:
        per: dict[float, list[float]] = {}
        complete = True
        for task, bench in benches.items():
            hs = summaries[task]["horizons"]
            runs = [r for r in bench.runs if r["key"] in bench.done and r["init"] == name]
            rates = sorted({r["lr"] for r in runs})
            if not rates:
                complete = False
                continue
            table = {}
            for lr in rates:
                row = []
                for h in hs:
                    vals = [loss_at(r, h) for r in runs if r["lr"] == lr]
                    vals = [v for v in vals if v is not None]
                    row.append(statistics.fmean(vals) if vals and all(math.isfinite(v) for v in vals) else math.inf)
                table[lr] = row
            for j in range(len(hs)):
                best = min(table[lr][j] for lr in rates)
                for lr in rates:
                    per.setdefault(lr, []).append(table[lr][j] - best if math.isfinite(best) else math.nan)
        n_cells = sum(len(summaries[t]["horizons"]) for t in benches)
        rows = {lr: statistics.fmean(v) for lr, v in per.items() if len(v) == n_cells}
        best = min(rows, key=lambda lr: (rows[lr], lr)) if rows else None
        out[name] = {"mean_regret": rows, "best_lr": best, "complete": complete and bool(rows)}
    return out


# ------------------------------------------------------------------------------------ the plan
def plan_remaining(benches: dict[str, StudyBench], contenders: Sequence[str], grids: dict[str, Sequence[float]],
                   seeds: Sequence[int], max_extend: int) -> dict:
    """The runs still to do: those known now (missing grid rates, missing seeds at the best rate and its
    neighbours) and an expected count of those that depend on results not in yet, with seconds per run measured
    per task (the median of finished runs, plus the mean prepare time per run)."""
    known, expected = [], []
    per_task_secs = {}
    for task, bench in benches.items():
        done = [r for r in bench.runs if r["key"] in bench.done]
        secs = [r["seconds"] + (r.get("prepare_seconds") or 0) / max(1, 4) for r in done]
        per_task_secs[task] = statistics.median(secs) if secs else None
    for phase, task, name in phases(list(benches), contenders):
        bench = benches[task]
        grid, added = grid_of(bench, name, grids[name], seeds[0])
        runs = [r for r in bench.runs if r["key"] in bench.done and r["init"] == name]
        s0 = {r["lr"]: r for r in runs if r["seed"] == seeds[0]}
        if phase == "grid":
            missing = [lr for lr in grid if lr not in s0]
            known += [(task, name, lr, seeds[0]) for lr in missing]
            if not missing:
                scores = {lr: [conv.run_score(s0[lr])] for lr in grid}
                new = conv.extension(grid, scores) if len(added) < max_extend else None
                if new is not None:
                    known.append((task, name, new, seeds[0]))
            else:
                expected.append((task, name, "grid extension (if the best rate lands at an edge)", 0.5))
            continue
        others = [x for x in seeds if x != seeds[0]]
        if not others:
            continue
        if any(lr not in s0 for lr in grid):
            expected.append((task, name, "seeds at the best rate and its neighbours", 3 * len(others)))
            continue
        best = conv.choose_best(runs, name, grid, seeds)[0]
        if best is None:
            continue
        i = grid.index(best)
        for lr in grid[max(0, i - 1): i + 2]:
            if lr in s0 and conv.blown_up(s0[lr]):
                continue
            have = {r["seed"] for r in runs if r["lr"] == lr}
            known += [(task, name, lr, x) for x in others if x not in have]
    default = statistics.median([v for v in per_task_secs.values() if v]) if any(per_task_secs.values()) else None
    total_known = sum(per_task_secs.get(t) or default or math.nan for t, *_ in known)
    total_expected = sum((per_task_secs.get(t) or default or math.nan) * n for t, _, _, n in expected)
    return {"known": known, "expected": expected, "seconds_per_run": per_task_secs,
            "known_seconds": total_known, "expected_seconds": total_expected,
            "done": {t: sum(1 for r in b.runs if r["key"] in b.done) for t, b in benches.items()}}


def format_plan(plan: dict) -> str:
    lines = ["Remaining runs of the defaults study", ""]
    for t, secs in plan["seconds_per_run"].items():
        lines.append(f"  {t}: {plan['done'][t]} runs done; "
                     + (f"{secs:.0f} s per run measured (median, prepare included)" if secs else "no run measured yet"))
    lines += ["", f"Known now ({len(plan['known'])} runs):"]
    for task, name, lr, seed in plan["known"]:
        lines.append(f"  {task:6s} {name:9s} lr {lr:.3g} seed {seed}")
    lines += ["", "Depending on results not in yet (expected counts):"]
    for task, name, what, n in plan["expected"]:
        lines.append(f"  {task:6s} {name:9s} ~{n:g} runs: {what}")
    n_exp = sum(n for *_, n in plan["expected"])
    tot = plan["known_seconds"] + plan["expected_seconds"]
    lines += ["", f"Total: {len(plan['known'])} known + ~{n_exp:g} expected runs; estimated "
                  f"{plan['known_seconds'] / 3600:.1f} h + {plan['expected_seconds'] / 3600:.1f} h = "
                  f"{tot / 3600:.1f} CPU hours at the measured seconds per run."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ outputs
def _f(x, spec=".4f") -> str:
    return conv._fmt(x, spec)


def write_plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = list(report["tasks"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(13, 4.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        sm = report["tasks"][task]["summary"]
        ax, bx = axes[row]
        for name, e in sm["contenders"].items():
            c = COLORS.get(name)
            if e.get("curve"):
                st = [p["step"] for p in e["curve"]]
                ax.plot(st, [p["mean"] for p in e["curve"]], color=c, marker="o", ms=3,
                        ls="--" if CONTENDERS[name].bits == 16 else "-",
                        label=f"{name}, lr {e['best_lr']:.3g} (n={e['n_ok']})")
                ax.fill_between(st, [p["min"] for p in e["curve"]], [p["max"] for p in e["curve"]], color=c, alpha=0.15)
            rows = [r for r in e.get("sweep", []) if r["runs"] and math.isfinite(r["final_mean"])]
            if rows:
                bx.errorbar([r["lr"] for r in rows], [r["final_mean"] for r in rows],
                            yerr=[[r["final_mean"] - r["final_min"] for r in rows],
                                  [r["final_max"] - r["final_mean"] for r in rows]],
                            color=c, marker="o", capsize=3, label=name, ls="--" if CONTENDERS[name].bits == 16 else "-")
        ax.set_title(f"{task}: held-out eval loss at each contender's best rate (mean over seeds, band min..max)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        bx.set_xscale("log")
        bx.set_title(f"{task}: final eval loss by peak learning rate (bars: min..max over seeds)")
        bx.set_xlabel("peak learning rate")
        bx.grid(alpha=0.3, which="both")
        bx.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_table(report: dict, path: Path) -> Path:
    m = report["machine"]
    lines = ["# Defaults study (issue 22): each init at its own best learning rate, two held-out tasks", "",
             "Generated by `python -m benchmarks.defaults_study` from `" + Path(report["runs_file"]).name
             + "` (every finished run; rerun with `--report-only`). Protocol: see the module docstring.", ""]
    for task, t in report["tasks"].items():
        s, d, sm = t["settings"], t["data"], t["summary"]
        lines += [f"## Task `{task}`", "",
                  f"Model `{Path(s['model']).name}` {s['bits']}-bit {s['quant_type']}, rank {s['rank']}, alpha "
                  f"{s['alpha']:g}, all decoder linear layers; data: {s['corpus'] or Path(s['data']).name} "
                  f"({d.get('train_examples')} train / {d.get('eval_examples')} held-out examples, "
                  f"{d.get('eval_label_tokens')} held-out label tokens, max_length {s['max_length']}). "
                  f"{s['steps']} steps of batch {s['batch_size']}, {s['optim']}, warmup {s['warmup_ratio']:g} + "
                  f"cosine to {s['min_lr_ratio']:g}, grad clip {s['max_grad_norm']:g}, dtype {s['dtype']}, "
                  f"mixed precision {s['mixed_precision']}; eval every {s['eval_every']} steps. Runs: {sm['n_runs']}.",
                  "",
                  "| contender | best lr | interior? | grid (added) | step 0 | "
                  + " | ".join(f"step {h}" for h in sm["horizons"]) + " | final per seed |",
                  "|---|---|---|---|---|" + "---|" * len(sm["horizons"]) + "---|"]
        for name, e in sm["contenders"].items():
            grid = ", ".join(f"{x:.3g}" for x in sm["grids"][name])
            added = ", ".join(f"{x:.3g}" for x in sm["added"][name])
            if e.get("best_lr") is None:
                lines.append(f"| {name} | not run yet | | {grid} | " + "| " * (len(sm["horizons"]) + 2))
                continue
            interior = ("yes" if e.get("interior_with_all_seeds") else "yes (seed 0)") if e["best_is_interior"] \
                else "NO (edge)" if e.get("grid_complete", True) else "grid in progress"
            cells = [f"{_f(r['mean'])} ± {_f(r['std'], '.3f')} (n={r['n']})" for r in e["at_horizons"]]
            lines.append(f"| {name} | {e['best_lr']:.3g} | {interior} | {grid}{' (' + added + ')' if added else ''} | "
                         + " | ".join(cells) + " | " + ", ".join(_f(x, ".3f") for x in e.get("final_per_seed", []))
                         + " |")
        lines += ["", "Paired differences by seed (A minus B, each at its own best rate; negative = A lower). "
                      "95% t interval over the seeds; **inside the noise** when it holds 0.", "",
                  "| A - B | rates | seeds | " + " | ".join(f"step {h}" for h in sm["horizons"]) + " |",
                  "|---|---|---|" + "---|" * len(sm["horizons"])]
        for p in sm["pairs"]:
            cells = []
            for h in sm["horizons"]:
                st = p["by_horizon"].get(h) or p["by_horizon"].get(str(h))
                if not st or not st["n"]:
                    cells.append("-")
                    continue
                if st["ci95"] is None:
                    cells.append(f"{st['mean']:+.4f} (n=1)")
                    continue
                verdict = "inside the noise" if st["inside_noise"] else "outside the noise"
                cells.append(f"{st['mean']:+.4f} ± {st['std']:.4f} [{st['ci95'][0]:+.4f}, {st['ci95'][1]:+.4f}] "
                             f"{verdict}")
            lines.append(f"| {p['a']} - {p['b']} | {p['lr_a']:.3g} / {p['lr_b']:.3g} | {len(p['seeds'])} | "
                         + " | ".join(cells) + " |")
        lines += ["", "The sweep (final eval loss, mean ± sd over the seeds run at a rate):", "",
                  "| contender | " + " | ".join(["lr", "runs", "final eval loss", "min..max"]) + " |",
                  "|---|---|---|---|---|"]
        for name, e in sm["contenders"].items():
            for r in e.get("sweep", []):
                star = " **best**" if r["lr"] == e.get("best_lr") else ""
                loss = (f"{_f(r['final_mean'])} ± {_f(r['final_std'], '.4f')}{star}" if math.isfinite(r["final_mean"])
                        else (f"diverged ({r['diverged']}/{r['runs']})" if r["runs"] else "not run yet"))
                lines.append(f"| {name} | {r['lr']:.3g} | {r['runs']} | {loss} | {_f(r['final_min'])}.."
                             f"{_f(r['final_max'])} |")
        lines.append("")
    reg = report.get("regret", {})
    if reg:
        lines += ["## Learning rate of least mean regret over both tasks and the horizons "
                  f"{report['horizons']}", "",
                  "Regret of a rate at a task and horizon = its eval loss (mean over the seeds run there) minus the "
                  "lowest of that contender's rates there; only rates run on every task count.", "",
                  "| contender | rate of least mean regret | mean regret by rate |", "|---|---|---|"]
        for name, e in reg.items():
            cells = ", ".join(f"{lr:.3g}: {v:.4f}" for lr, v in sorted(e["mean_regret"].items()))
            lines.append(f"| {name} | {e['best_lr']:.3g} |" if e["best_lr"] is not None else f"| {name} | - |")
            lines[-1] += f" {cells or '-'} |"
        lines.append("")
    step0 = report.get("step0_md")
    if step0:
        lines += [step0, ""]
    lines += [f"Machine: {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('torch_threads')} torch thread(s)); "
              f"torch {m['versions'].get('torch')}, transformers {m['versions'].get('transformers')}, "
              f"bitsandbytes {m['versions'].get('bitsandbytes')}, peft {report.get('peft_version')}; code at commit "
              f"{m.get('git_commit')}.", ""]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------ step 0
STEP0_CONTENDERS = (("plain NF4", "lora", 0), ("olora", "olora", 0), ("olora refine 1", "olora", 1),
                    ("olora refine 2", "olora", 2), ("olora refine 5", "olora", 5), ("pissa", "pissa", 0),
                    ("loftq (PEFT)", "loftq", 0))


def held_out_batches(tokenizer, task: str, data_path: Path, corpus, n_eval: int, max_length: int, batch: int = 8):
    """``[(input_ids, attention_mask, labels)]`` of the task's first ``n_eval`` held-out examples (chat: the
    split of benchmarks.convergence with that many held out; pydoc: the first blocks)."""
    import torch

    if task == "chat":
        from benchmarks.common import row_split
        from qolora.data.tokens import load_records, tokenize_dataset

        records = load_records(data_path)
        tokenized, _ = tokenize_dataset(records, tokenizer, max_length=max_length, mask_prompt=True)
        n_eval = min(n_eval, len(tokenized) // 2)
        _, eval_ds = row_split(tokenized, n_eval / len(tokenized), seed=0)
        rows = list(zip(eval_ds["input_ids"], eval_ds["labels"]))[:n_eval]
    else:
        blocks = lm_blocks(tokenizer, corpus, max_length, limit=2 * n_eval)
        rows = [(b, b) for b in blocks[:n_eval]]
    rows.sort(key=lambda r: len(r[0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        width = max(len(x) for x, _ in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for j, (x, y) in enumerate(part):
            ids[j, :len(x)] = torch.tensor(x)
            labels[j, :len(y)] = torch.tensor(y)
            mask[j, :len(x)] = 1
        out.append((ids, mask, labels))
    return out, len(rows)


def eval_against_fp32(ref_model, models: dict[str, Any], batches) -> dict[str, dict]:
    """Token-mean loss of every model and token-mean KL(fp32 || model) over the label positions, one fp32 forward
    per batch shared by all models."""
    import torch

    tot = {k: {"nll": 0.0, "kl": 0.0} for k in ["fp32", *models]}
    count = 0
    with torch.no_grad():
        for ids, mask, labels in batches:
            target = labels[:, 1:]
            keep = target != -100
            ref = torch.log_softmax(ref_model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float(), -1)
            t = target[keep]
            tot["fp32"]["nll"] += float(torch.nn.functional.nll_loss(ref, t, reduction="sum"))
            p_ref = ref.exp()
            for name, m in models.items():
                logp = torch.log_softmax(m(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float(), -1)
                tot[name]["nll"] += float(torch.nn.functional.nll_loss(logp, t, reduction="sum"))
                tot[name]["kl"] += float((p_ref * (ref - logp)).sum())
            count += int(keep.sum())
    return {k: {"loss": v["nll"] / max(1, count), "kl_to_fp32": v["kl"] / max(1, count), "label_tokens": count}
            for k, v in tot.items()}


def q41_grid_fit(w, block: int = 32) -> float:
    """Mean distance (in grid steps) of the weights from the Q4_1 grid of their block (min + d * q, d =
    (max - min) / 15) along the input dimension: ~0 on dequantized Q4_1 weights, ~0.25 on continuous ones."""
    import torch

    out, inn = w.shape
    if inn % block:
        return math.nan
    b = w.reshape(out, inn // block, block).float()
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).clamp_min(1e-12)
    x = (b - lo) / d
    return float((x - torch.round(x)).abs().mean())


def degridded_checkpoint(model_dir: Path, out_dir: Path, *, seed: int = 0, block: int = 32) -> tuple[Path, dict]:
    """A copy of ``model_dir`` whose decoder linear weights get uniform noise within half a Q4_1 step of their block
    (so they still round to the same Q4_1 values but no longer sit on the grid), saved in bf16; cached."""
    import torch
    from transformers import AutoModelForCausalLM

    from qolora.data.tokens import load_tokenizer

    marker = out_dir / "degridded.json"
    if marker.is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir, json.loads(marker.read_text())
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    before, after, n = [], [], 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not (isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}"):
                continue
            w = mod.weight
            o, i = w.shape
            if i % block:
                continue
            before.append(q41_grid_fit(w, block))
            b = w.view(o, i // block, block)
            d = (b.amax(-1, keepdim=True) - b.amin(-1, keepdim=True)) / 15
            b.add_(d * (torch.rand(b.shape, generator=gen) - 0.5))
            after.append(q41_grid_fit(w.to(torch.bfloat16).float(), block))
            n += 1
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.to(torch.bfloat16).save_pretrained(tmp)
    load_tokenizer(model_dir).save_pretrained(tmp)
    info = {"source": str(model_dir), "seed": seed, "block": block, "weights": n,
            "grid_fit_before": statistics.fmean(before) if before else None,
            "grid_fit_after": statistics.fmean(after) if after else None}
    (tmp / "degridded.json").write_text(json.dumps(info, indent=1))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir, info


def _by_kind(report) -> dict:
    kinds: dict[str, list[float]] = {}
    for r in report.layers:
        k = r.name.rsplit(".", 1)[-1]
        kinds.setdefault(k, [0.0, 0.0])
        kinds[k][0] += r.error
        kinds[k][1] += r.plain_error or math.nan
    return {k: v[0] / v[1] for k, v in kinds.items()}


def step0_variant(model_dir: Path, tasks: dict[str, Any], *, rank: int, alpha: float, contenders, eval_models: bool,
                  dtype: str = "fp32") -> dict:
    """Prepare every step-0 contender on ``model_dir`` (weight errors vs plain NF4), and when ``eval_models`` the
    loss and KL to the fp32 model on each task's held-out batches."""
    import torch
    from transformers import AutoModelForCausalLM

    import qolora

    out: dict[str, Any] = {"model": str(model_dir), "contenders": {}}
    models: dict[str, Any] = {}
    plain_total = None
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    weights = {n: m.weight.detach() for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    for label, init, refine in contenders:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"init": init, "refine": refine}
        if init == "loftq":
            pm = peft_loftq_model(model_dir, rank=rank, alpha=alpha, dtype=dtype)
            err = 0.0
            from qolora.base.quant import dequantize_weight

            for name, m in peft_lora_layers(pm).items():
                w = weights[name].float()
                a, b = m.lora_A["default"].weight.float(), m.lora_B["default"].weight.float()
                restored = dequantize_weight(m.base_layer) + float(m.scaling["default"]) * (b @ a)
                err += float(torch.linalg.norm(w - restored))
            entry["total_error"] = err
            entry["how"] = pm.loftq_how
            model = pm
        else:
            model = qolora.prepare(str(model_dir), bits=4, rank=rank, init=init, alpha=alpha, refine=refine,
                                   dtype=dtype, device="cpu", compare_plain=True, progress=False)
            rep = model.qolora.report
            entry["total_error"] = rep.total_error
            entry["total_plain_error"] = rep.total_plain_error
            entry["error_vs_plain_by_kind"] = _by_kind(rep)
            entry["weight_norm"] = sum(r.weight_norm for r in rep.layers)
            if init == "lora":
                plain_total = rep.total_error
        entry["prepare_seconds"] = time.perf_counter() - t0
        out["contenders"][label] = entry
        if eval_models:
            models[label] = model.eval()
        else:
            del model
            gc.collect()
        logger.info("step 0 %s: %s", label, {k: v for k, v in entry.items() if k != "error_vs_plain_by_kind"})
    for entry in out["contenders"].values():
        entry["error_vs_plain"] = entry["total_error"] / plain_total if plain_total else None
    if plain_total is not None:
        plain = out["contenders"].get("plain NF4", {})
        out["plain_nf4_relative_error"] = plain_total / plain["weight_norm"] if plain.get("weight_norm") else None
    out["q41_grid_fit"] = statistics.fmean(q41_grid_fit(w) for n, w in weights.items() if ".layers." in f".{n}")
    if eval_models:
        out["tasks"] = {}
        for task, (batches, n) in tasks.items():
            t0 = time.perf_counter()
            res = eval_against_fp32(ref, models, batches)
            plain = res.get("plain NF4")
            for k, v in res.items():
                if plain and k != "fp32":
                    v["kl_vs_plain"] = v["kl_to_fp32"] / plain["kl_to_fp32"] if plain["kl_to_fp32"] else None
                    gap = plain["loss"] - res["fp32"]["loss"]
                    v["gap_recovered"] = (plain["loss"] - v["loss"]) / gap if gap else None
            out["tasks"][task] = {"examples": n, "results": res, "seconds": time.perf_counter() - t0}
            logger.info("step 0 on %s (%d examples): %s", task, n,
                        {k: (round(v["loss"], 4), round(v["kl_to_fp32"], 4)) for k, v in res.items()})
    del models, ref
    gc.collect()
    return out


def step0_markdown(payload: dict) -> str:
    lines = ["## Step 0: before any training (`--step0`)", "",
             f"{payload['n_eval']} held-out examples per task, fp32 compute, rank {payload['rank']}, alpha "
             f"{payload['alpha']:g}, NF4 blocksize 64 with double quantization. KL = token-mean KL(fp32 || model) "
             "over the label positions; 'gap won back' = (plain NF4 loss - loss) / (plain NF4 loss - fp32 loss); "
             "weight error = sum over the adapted layers of ||W - (deq(q(W_res)) + s B A)|| relative to plain "
             "NF4's.", ""]
    for vname, v in payload["variants"].items():
        lines += [f"### {vname}: {v.get('description', '')}", "",
                  "Mean distance of the decoder weights from their block's Q4_1 grid: "
                  f"{_f(v.get('q41_grid_fit'), '.3f')} steps (0 = on the grid, 0.25 = continuous); "
                  "plain NF4's relative weight error "
                  f"{_f(v.get('plain_nf4_relative_error'), '.4f')}.", ""]
        tasks = list(v.get("tasks", {}))
        head = "| init | weight error vs plain |" + "".join(f" {t} loss | {t} KL | {t} KL vs plain | {t} gap won back |"
                                                            for t in tasks)
        lines += [head, "|---|---|" + "---|---|---|---|" * len(tasks)]
        if tasks:
            row = "| fp32 | - |"
            for t in tasks:
                r = v["tasks"][t]["results"]["fp32"]
                row += f" {r['loss']:.4f} | 0 | - | 100% |"
            lines.append(row)
        for label, e in v["contenders"].items():
            row = f"| {label} | {_f(e.get('error_vs_plain'), '.3f')} |"
            for t in tasks:
                r = v["tasks"][t]["results"].get(label, {})
                gap = r.get("gap_recovered")
                row += (f" {_f(r.get('loss'))} | {_f(r.get('kl_to_fp32'))} | {_f(r.get('kl_vs_plain'), '.3f')} | "
                        f"{'-' if gap is None else f'{100 * gap:.0f}%'} |")
            lines.append(row)
        kinds = v["contenders"].get("olora", {}).get("error_vs_plain_by_kind")
        if kinds:
            lines += ["", "OLoRA's weight error vs plain NF4 by layer kind: "
                      + ", ".join(f"{k} {x:.3f}" for k, x in kinds.items()) + "."]
        lines.append("")
    return "\n".join(lines)


def run_step0(args, model_dir: Path, data_path: Path, prefix: Path) -> dict:
    from benchmarks.common import bench_cache_dir
    from qolora.base import synthetic
    from qolora.data.tokens import load_tokenizer

    rank, alpha = args.rank, args.alpha
    n_eval = args.step0_examples
    contenders = STEP0_CONTENDERS if not args.quick else STEP0_CONTENDERS[:3] + STEP0_CONTENDERS[-1:]
    tokenizer = load_tokenizer(model_dir)
    corpus, corpus_info = pydoc_corpus() if args.corpus is None else (args.corpus, {"source": "given"})
    tasks = [t.strip() for t in args.step0_tasks.split(",") if t.strip() in TASKS]
    degridded_tasks = [t.strip() for t in args.step0_degridded_tasks.split(",") if t.strip() in TASKS]
    batches = {t: held_out_batches(tokenizer, t, data_path, corpus, n_eval, args.max_length)
               for t in dict.fromkeys(tasks + degridded_tasks)}
    payload: dict[str, Any] = {"benchmark": "defaults_study --step0", "rank": rank, "alpha": alpha, "n_eval": n_eval,
                               "max_length": args.max_length, "corpus": corpus_info, "variants": {},
                               "machine": conv.machine_info()}
    t0 = time.perf_counter()
    payload["variants"]["real"] = step0_variant(model_dir, {t: batches[t] for t in tasks}, rank=rank, alpha=alpha,
                                                contenders=contenders, eval_models=bool(tasks))
    payload["variants"]["real"]["description"] = (f"`{model_dir.name}` as cached (its weights are dequantized "
                                                  "Q4_1 values from the GGUF, stored in bf16)")
    _write_step0(payload, prefix)
    cache = Path(args.step0_cache) if args.step0_cache else bench_cache_dir()
    degr_dir, degr_info = degridded_checkpoint(model_dir, cache / f"{model_dir.name}-degridded-seed0")
    degr_tasks = {t: batches[t] for t in degridded_tasks}
    payload["variants"]["degridded"] = step0_variant(degr_dir, degr_tasks, rank=rank, alpha=alpha,
                                                     contenders=contenders, eval_models=bool(degr_tasks))
    payload["variants"]["degridded"].update(degridded=degr_info, description=(
        "the same model with every decoder linear weight moved off the Q4_1 grid by uniform noise within half a "
        "grid step of its block of 32 (genuinely 16-bit weights that round to the same Q4_1 values), bf16"))
    _write_step0(payload, prefix)
    syn_dir = cache / f"synthetic-{model_dir.name}-seed0"
    if not (syn_dir / "config.json").is_file():
        import torch

        synthetic.SyntheticCheckpoint(str(model_dir / "config.json"), seed=0, dtype=torch.bfloat16).write(
            syn_dir, overwrite=True)
    payload["variants"]["synthetic"] = step0_variant(syn_dir, {}, rank=rank, alpha=alpha,
                                                     contenders=[c for c in contenders if c[1] != "loftq"],
                                                     eval_models=False)
    payload["variants"]["synthetic"]["description"] = (
        "a random checkpoint of the same architecture (qolora.base.synthetic, N(0, 0.02) weights, bf16): weight "
        "errors only (a random model's held-out loss means nothing)")
    payload["seconds"] = time.perf_counter() - t0
    return _write_step0(payload, prefix)


def _write_step0(payload: dict, prefix: Path) -> dict:
    path = prefix.with_name(prefix.name + "_step0.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(conv._jsonable(payload), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    md = prefix.with_name(prefix.name + "_step0.md")
    md.write_text("# " + step0_markdown(payload).lstrip("#").lstrip() + "\n", encoding="utf-8")
    return {"json": path, "md": md, "payload": payload}


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.defaults_study", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local transformers folder (default: the cached SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="chat records for load_records (qolora.data; default: chatterbot conversations)")
    p.add_argument("--out", help="output prefix (default benchmarks/results/defaults_study; --quick: a temp folder)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list from chat,pydoc")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list from {','.join(CONTENDERS)}")
    for name in CONTENDERS:
        p.add_argument(f"--rates-{name.replace('_', '-')}", dest=f"rates_{name}", type=conv.parse_rates, default=None,
                       help=f"starting grid (default {','.join(f'{x:g}' for x in GRIDS[name])})")
    p.add_argument("--seeds", type=conv.parse_seeds, default=None, help="N or a comma list (default 3: seeds 0, 1, 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 100)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="chat: truncation; pydoc: the block length")
    p.add_argument("--max-examples", type=int, default=None, help="chat: the first N records; pydoc: N blocks")
    p.add_argument("--eval-examples", type=int, default=None, help="held-out examples per task (default 128)")
    p.add_argument("--eval-every", type=int, default=None, help="default 20")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--warmup-ratio", type=float, default=0.05, help="default: qolora.train's default")
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--optim", default="paged_adamw_8bit")
    p.add_argument("--dtype", default="fp32", help="non-quantized parts and 4-bit compute (default fp32: this CPU "
                                                   "has no fast bf16)")
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--max-extend", type=int, default=None, help="rates that may be added per grid (default 3)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 6 steps, 2 rates, 1 seed, tiny data")
    p.add_argument("--plan", action="store_true", help="print the remaining runs and their estimated cost; run nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild json/md/png from the runs file; run nothing")
    p.add_argument("--merge-runs", nargs="+", metavar="RUNS_JSONL", default=None,
                   help="first append the runs of these files (other workers' <out>_runs.jsonl) that the runs "
                        "file lacks, keyed by their settings; then go on as asked (with --report-only: just merge)")
    p.add_argument("--step0", action="store_true", help="the step-0 measurement (no training): <out>_step0.json/.md")
    p.add_argument("--step0-examples", type=int, default=256)
    p.add_argument("--step0-tasks", default="chat", help="tasks evaluated on the model as it is (comma list)")
    p.add_argument("--step0-degridded-tasks", default="chat", help="tasks evaluated on the degridded model")
    p.add_argument("--step0-cache", default=None, help="where the degridded and synthetic checkpoints are kept")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def make_benches(args, model_dir: Path, data_path: Path, runs_path: Path, corpus, corpus_info) -> dict[str, StudyBench]:
    q = args.quick
    common = dict(
        model=str(model_dir), bits=4, rank=args.rank, alpha=args.alpha, quant_type="nf4",
        steps=args.steps or (6 if q else 100), batch_size=args.batch_size, max_length=args.max_length,
        max_examples=args.max_examples if args.max_examples is not None else (96 if q else None),
        eval_examples=args.eval_examples or (16 if q else 128), eval_every=args.eval_every or (3 if q else 20),
        eval_batch_size=args.eval_batch_size, split_seed=0, warmup_ratio=args.warmup_ratio,
        min_lr_ratio=args.min_lr_ratio, max_grad_norm=args.max_grad_norm, weight_decay=0.0, optim=args.optim,
        dtype=args.dtype, mixed_precision=args.mixed_precision, device=args.device,
    )
    commit = conv.machine_info().get("git_commit")
    benches = {}
    for task in args.tasks:
        if task == "chat":
            sha = hashlib.sha256(data_path.read_bytes()).hexdigest()[:16] if data_path.is_file() else ""
            s = StudySettings(data=str(data_path), data_bytes=data_path.stat().st_size if data_path.is_file() else None,
                              task="chat", corpus=f"{data_path.name} (prompt-masked conversations)", data_sha=sha,
                              **common)
            benches[task] = StudyBench(s, runs_path, threads=args.threads, git_commit=commit)
        else:
            s = StudySettings(data="pydoc_data.topics", data_bytes=corpus_info.get("chars"), task="pydoc",
                              corpus=corpus_info["source"], data_sha=corpus_info["sha"], **common)
            benches[task] = StudyBench(s, runs_path, threads=args.threads, corpus=corpus, git_commit=commit)
    return benches


def build_report(benches: dict[str, StudyBench], contenders, grids, seeds, prefix: Path, runs_path: Path,
                 machine: dict, started: float) -> dict:
    import importlib.metadata as md

    tasks = {}
    summaries = {}
    for task, bench in benches.items():
        has_runs = any(r["key"] in bench.done for r in bench.runs)
        data_info = bench.data()[3] if has_runs else {}
        sm = task_summary(bench, contenders, grids, seeds)
        summaries[task] = sm
        tasks[task] = {"settings": dataclasses.asdict(bench.s), "settings_key": bench.skey, "data": data_info,
                       "summary": sm}
    report = {
        "benchmark": "defaults_study", "protocol": PROTOCOL, "description": __doc__.split("\n\n")[1],
        "contenders": {c: dataclasses.asdict(CONTENDERS[c]) for c in contenders}, "seeds": list(seeds),
        "starting_grids": {c: list(grids[c]) for c in contenders}, "horizons": list(HORIZONS),
        "tasks": tasks, "regret": regret_table(benches, summaries, contenders), "machine": machine,
        "peft_version": _version(md, "peft"), "runs_file": str(runs_path),
        "invocation_seconds": time.perf_counter() - started,
        "runs": sorted([r for b in benches.values() for r in b.runs if r["key"] in b.done],
                       key=lambda r: (r.get("task", ""), r["init"], r["lr"], r["seed"])),
    }
    step0_json = prefix.with_name(prefix.name + "_step0.json")
    if step0_json.is_file():
        with contextlib.suppress(Exception):
            report["step0_md"] = step0_markdown(json.loads(step0_json.read_text()))
    json_path = prefix.with_name(prefix.name + ".json")
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(conv._jsonable(report), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    png = write_plot(report, prefix.with_name(prefix.name + ".png"))
    md_path = write_table(report, prefix.with_name(prefix.name + ".md"))
    return {"json": json_path, "png": png, "md": md_path, "report": report}


def _version(md, pkg):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        for noisy in ("qolora", "datasets", "transformers", "bitsandbytes", "peft", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    with contextlib.suppress(Exception):  # "Loading weights" bars in a log file
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    import qolora
    from qolora.data import assets

    logger.info("qolora from %s; torch threads %d", qolora.__file__, torch.get_num_threads())
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [t for t in args.tasks if t not in TASKS] + [c for c in contenders if c not in CONTENDERS]
    if bad or not args.tasks or not contenders:
        raise SystemExit(f"unknown task(s)/contender(s) {bad}; tasks {list(TASKS)}, contenders {list(CONTENDERS)}")
    contenders = [c for c in CONTENDERS if c in contenders]  # canonical order
    grids = {c: getattr(args, f"rates_{c}") or (QUICK_GRIDS if args.quick else GRIDS)[c] for c in contenders}
    seeds = args.seeds or ((0,) if args.quick else (0, 1, 2))
    max_extend = args.max_extend if args.max_extend is not None else (1 if args.quick else 3)
    model_dir = Path(args.model).expanduser().resolve() if args.model else assets.default_model_dir()
    data_path = Path(args.data).expanduser().resolve() if args.data else assets.default_dataset_path()
    if args.out:
        prefix = Path(args.out).expanduser()
    elif args.quick:
        prefix = Path(tempfile.gettempdir()) / "qolora-defaults-study-quick" / "defaults_study"
    else:
        prefix = RESULTS / "defaults_study"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    args.corpus = getattr(args, "corpus", None)
    if args.step0:
        res = run_step0(args, model_dir, data_path, prefix)
        logger.info("wrote %s and %s", res["json"], res["md"])
        print(res["md"].read_text(encoding="utf-8"))
        return res
    runs_path = prefix.with_name(prefix.name + "_runs.jsonl")
    if args.merge_runs:
        added = conv.merge_runs(runs_path, [Path(x).expanduser() for x in args.merge_runs])
        logger.info("merged %d run(s) from %s into %s", added, args.merge_runs, runs_path)
    corpus, corpus_info = (pydoc_corpus() if "pydoc" in args.tasks else (None, {}))
    machine = conv.machine_info()
    started = time.perf_counter()
    benches = make_benches(args, model_dir, data_path, runs_path, corpus, corpus_info)
    for task, b in benches.items():
        logger.info("%s: settings key %s, %d finished runs in %s", task, b.skey, len(b.done), runs_path)
    if args.plan:
        plan = plan_remaining(benches, contenders, grids, seeds, max_extend)
        text = format_plan(plan)
        print(text)
        return {"plan": plan, "text": text}

    def report():
        return build_report(benches, contenders, grids, seeds, prefix, runs_path, machine, started)

    if not args.report_only:
        run_study(benches, contenders, grids, seeds, max_extend=max_extend, after_phase=report)
    res = report()
    res["runs"] = runs_path
    res["benches"] = benches
    logger.info("wrote %s, %s, %s", res["json"], res["png"], res["md"])
    print(res["md"].read_text(encoding="utf-8"))
    return res


if __name__ == "__main__":
    main()
