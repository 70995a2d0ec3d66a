"""Training a prepared qolora model: a small, exact, resumable loop, and the one-call ``finetune``.

:func:`train` runs AdamW (bitsandbytes' paged 8-bit by default) on the adapter weights only::

    for step in 1..max_steps:
        indices  = next batch_size * grad_accum positions of a seeded per-epoch order
                   (shuffled; batches of similar length formed inside windows of 8 batches)
        n_labels = label tokens in the whole accumulated batch
        for each micro-batch:  (sum of token cross-entropies / n_labels).backward()
        clip grad norm -> optimizer step -> LR step (linear warmup, cosine to min_lr_ratio)

Dividing every micro-batch by the label tokens of the *whole* accumulated batch makes the update the
token mean over that batch, so ``grad_accum=2, batch_size=4`` gives the update of ``batch_size=8``.

Around the loop: an eval loss at step 0, every ``eval_every`` steps and at the end; ``metrics.jsonl``,
``loss.png`` and greedy sample answers before and after training (:mod:`qolora.reporting`);
checkpoints every ``save_every`` steps (:mod:`qolora.checkpointing`). ``resume=True`` continues from
the newest complete checkpoint with the optimizer, scheduler, RNG and data position it saved, so the
resumed run computes exactly what the uninterrupted one would have. A non-finite loss stops the run
with :class:`TrainingError` before the optimizer touches the weights; the last checkpoint stays the
last good one.

:func:`finetune` is the whole job: check every option, path and the data first, then prepare the
quantized model, train, and save the adapter (:func:`qolora.adapter_io.save_adapter`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import checkpointing as ckpt
from . import reporting
from .config import ConfigError
from .data import IGNORE_INDEX, DataError, PaddingCollator
from .layer import adapter_parameters, adapter_state_dict

__all__ = ["DEFAULT_LR", "OPTIMIZERS", "TrainConfig", "TrainResult", "TrainingError", "finetune", "train"]

logger = logging.getLogger(__name__)

#: Learning rate when ``TrainConfig.lr`` is None, by adapter init. OLoRA and PiSSA start with a
#: non-zero B and a large A (the weight's own directions), so under Adam a given rate moves the model
#: much faster than LoRA's zero-initialised B. From benchmarks/convergence.py (SmolLM2-135M, 4-bit
#: NF4, r=16, chatterbot, batch 8, 16 steps; see benchmarks/results/convergence.md): the best rates
#: were 3e-4 for OLoRA, 1e-3 for PiSSA and 3e-3 for LoRA (3 seeds each; LoRA blew up at 3e-2).
#: The defaults sit one grid step below those bests, for runs longer than
#: the benchmark's. Other tasks and models move these: sweep when it matters.
DEFAULT_LR: dict[str, float] = {"olora": 1e-4, "pissa": 3e-4, "lora": 1e-3}
OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
RUN_FILES = ("metrics.jsonl", "loss.png", "samples.json", "samples.md")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the message names the step."""


# ------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class TrainConfig:
    """Every option of :func:`train`.

    The defaults size the built-in job (SmolLM2-135M-Instruct in 4-bit on ~1,900 short chatterbot
    conversations: 40 steps of 8 examples, evals at 0/20/40 on 64 held-out examples) to about ten
    minutes on a busy 2-core CPU (about four on an idle one); set ``max_steps`` and the eval / save
    intervals for real data.

    Attributes:
        output_dir: folder for metrics, plot, samples, checkpoints (and ``finetune``'s adapter).
        max_steps: optimizer steps.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step (effective batch ``batch_size * grad_accum``).
        lr: peak learning rate; None = :data:`DEFAULT_LR` for the model's adapter init.
        warmup_steps: linear warmup steps; None = ``round(warmup_ratio * max_steps)``.
        warmup_ratio: warmup as a fraction of ``max_steps`` (when ``warmup_steps`` is None).
        min_lr_ratio: the cosine schedule decays to ``lr * min_lr_ratio``.
        weight_decay: AdamW weight decay on the adapter weights.
        max_grad_norm: clip the gradient norm to this; None = no clipping.
        optim: ``"paged_adamw_8bit"``, ``"paged_adamw_32bit"``, ``"adamw_8bit"`` (bitsandbytes) or
            ``"adamw"`` (torch).
        mixed_precision: ``"auto"`` (bf16 autocast on a CUDA GPU with bf16, fp16 with a gradient
            scaler on older GPUs, none on the CPU), ``"bf16"``, ``"fp16"`` (CUDA only) or ``"no"``.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        group_by_length: form batches of similar length inside windows of 8 effective batches of the
            seeded shuffle (see :class:`DataOrder`): little padding, a third less compute on short
            chat data; False = a plain shuffle.
        eval_every: eval loss every N steps (also at step 0 and at the end); 0 = start and end only.
        max_eval_examples: eval on at most this many held-out examples; None = all.
        eval_batch_size: micro-batch size for eval; None = ``batch_size``.
        save_every: checkpoint every N steps (and at the end); 0 = only at the end.
        keep_last: checkpoints to keep; None = all.
        log_every: write a ``train`` event (mean loss since the last one) every N steps.
        seed: seeds data order and the python / numpy / torch RNGs.
        n_samples: held-out prompts answered before and after training; 0 = none.
        sample_prompts: own prompts for the samples instead of held-out ones.
        max_new_tokens: length limit of sample answers.
        overwrite: start over in an ``output_dir`` that holds an earlier run (it is deleted).
        progress: show a progress bar.
    """

    output_dir: str = "qolora-output"
    max_steps: int = 40
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    warmup_steps: int | None = None
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optim: str = "paged_adamw_8bit"
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = True
    group_by_length: bool = True
    eval_every: int = 20
    max_eval_examples: int | None = 64
    eval_batch_size: int | None = None
    save_every: int = 20
    keep_last: int | None = 2
    log_every: int = 10
    seed: int = 0
    n_samples: int = 3
    sample_prompts: tuple[str, ...] | None = None
    max_new_tokens: int = 40
    overwrite: bool = False
    progress: bool = True

    def problems(self) -> list[str]:
        """Every problem with these options (none needs the model or the data)."""
        p: list[str] = []

        def integer(name: str, low: int, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                p.append(f"{name}={v!r} must be an integer >= {low}" + (" (or None)" if allow_none else ""))

        def number(name: str, low: float, high: float | None = None, *, low_open: bool = False,
                   allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > low if low_open else v >= low) and (high is None or v <= high)
            if not ok:
                bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
                p.append(f"{name}={v!r} must be a number {bound}" + (" (or None)" if allow_none else ""))

        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir).strip():
            p.append(f"output_dir={self.output_dir!r} must be a folder path")
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            integer(name, 1)
        for name in ("eval_every", "save_every", "seed", "n_samples"):
            integer(name, 0)
        integer("warmup_steps", 0, allow_none=True)
        integer("max_eval_examples", 1, allow_none=True)
        integer("eval_batch_size", 1, allow_none=True)
        integer("keep_last", 1, allow_none=True)
        integer("max_new_tokens", 1)
        number("lr", 0.0, low_open=True, allow_none=True)
        number("warmup_ratio", 0.0, 1.0)
        number("min_lr_ratio", 0.0, 1.0)
        number("weight_decay", 0.0)
        number("max_grad_norm", 0.0, low_open=True, allow_none=True)
        if self.optim not in OPTIMIZERS:
            p.append(f"optim={self.optim!r} is not supported; allowed: {list(OPTIMIZERS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            p.append(f"mixed_precision={self.mixed_precision!r} is not supported; allowed: {list(MIXED_PRECISION)}")
        if self.sample_prompts is not None and (
            isinstance(self.sample_prompts, str) or not all(isinstance(t, str) and t.strip() for t in self.sample_prompts)
        ):
            p.append(f"sample_prompts={self.sample_prompts!r} must be a list of non-empty strings (or None)")
        if isinstance(self.warmup_steps, int) and isinstance(self.max_steps, int) and self.warmup_steps > self.max_steps:
            p.append(f"warmup_steps={self.warmup_steps} is more than max_steps={self.max_steps}")
        return p

    def validate(self) -> "TrainConfig":
        """Raise one :class:`~qolora.ConfigError` listing every problem, or return self."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    @property
    def warmup(self) -> int:
        """Warmup steps actually used."""
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * self.max_steps)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["sample_prompts"] = list(self.sample_prompts) if self.sample_prompts is not None else None
        return d

    @classmethod
    def from_options(cls, **options) -> "TrainConfig":
        """Build from keyword options, with one error naming unknown ones (and the allowed)."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; allowed: {sorted(allowed)}")
        if options.get("sample_prompts") is not None and not isinstance(options["sample_prompts"], str):
            options = {**options, "sample_prompts": tuple(options["sample_prompts"])}
        return cls(**options)


def default_lr(init: str | None) -> tuple[float, str]:
    """The default learning rate for an adapter init, and why."""
    if init in DEFAULT_LR:
        return DEFAULT_LR[init], f"the default for init={init!r}"
    return DEFAULT_LR["lora"], f"init {init!r} unknown to the trainer: LoRA's default"


# ------------------------------------------------------------------------------------- result
@dataclass
class TrainResult:
    """What :func:`train` (and :func:`finetune`) did.

    Attributes:
        output_dir: the run's folder.
        history: one entry per optimizer step: ``step``, ``loss`` (token mean over the accumulated
            batch), ``lr``, ``grad_norm`` (before clipping), ``tokens`` (non-padding), ``label_tokens``.
        evals: ``[{"step", "eval_loss"}]`` in step order (step 0 is before training).
        lr: the peak learning rate used.
        metrics_path: ``metrics.jsonl``.
        plot_path: ``loss.png`` (None when matplotlib is missing).
        samples: ``[{"prompt", "reference", "before", "after"}]``.
        samples_path: ``samples.md`` (None without samples).
        last_checkpoint: the newest checkpoint folder.
        resumed_from: the checkpoint this run continued from, if any.
        seconds: wall time of this call.
        adapter_dir: the saved adapter (set by :func:`finetune`).
    """

    output_dir: Path
    history: list[dict]
    evals: list[dict]
    lr: float
    metrics_path: Path
    plot_path: Path | None = None
    samples: list[dict] = field(default_factory=list)
    samples_path: Path | None = None
    last_checkpoint: Path | None = None
    resumed_from: Path | None = None
    seconds: float = 0.0
    adapter_dir: Path | None = None

    @property
    def steps(self) -> int:
        return self.history[-1]["step"] if self.history else 0

    @property
    def eval_losses(self) -> dict[int, float]:
        return {e["step"]: e["eval_loss"] for e in self.evals}

    @property
    def initial_eval_loss(self) -> float | None:
        return self.evals[0]["eval_loss"] if self.evals and self.evals[0]["step"] == 0 else None

    @property
    def final_eval_loss(self) -> float | None:
        return self.evals[-1]["eval_loss"] if self.evals else None

    def summary(self) -> str:
        text = f"{self.steps} steps at lr {self.lr:.3g}"
        if self.history:
            text += f", last train loss {self.history[-1]['loss']:.4f}"
        if self.initial_eval_loss is not None and self.final_eval_loss is not None:
            text += f", eval loss {self.initial_eval_loss:.4f} -> {self.final_eval_loss:.4f}"
        return text + f" ({self.seconds:.0f} s)"


# ------------------------------------------------------------------------------ pieces of a run
def resolve_precision(mode: str, device: torch.device) -> tuple[str, Callable[[], ContextManager], Any]:
    """``(name, autocast context factory, GradScaler or None)`` for ``mixed_precision`` on ``device``.

    Raises:
        ConfigError: fp16 without CUDA, or bf16 on a GPU without bf16.
    """
    if mode == "auto":
        if device.type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mode = "no"
    if mode == "no":
        return "no", contextlib.nullcontext, None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError(f"mixed_precision='fp16' needs a CUDA device; the model is on {device.type} "
                          "(use 'no', or 'bf16' for bf16 autocast)")
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("mixed_precision='bf16': this GPU has no bf16 support; use 'fp16' or 'auto'")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    autocast = functools.partial(torch.autocast, device_type=device.type, dtype=dtype)
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    return mode, autocast, scaler


def make_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over ``params``: torch's for ``"adamw"``, else bitsandbytes' 8-bit / 32-bit one.

    Paged variants move optimizer state to CPU memory when the GPU runs short; paging exists on CUDA
    only, so on the CPU the same optimizer without paging is used (identical updates).
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb  # noqa: PLC0415

    if name.startswith("paged_") and params and params[0].device.type != "cuda":
        logger.info("%s: paging needs CUDA; on %s it is the same optimizer without paging", name, params[0].device)
        name = name.removeprefix("paged_")
    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
           "adamw_8bit": bnb.optim.AdamW8bit, "adamw_32bit": bnb.optim.AdamW32bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, *, warmup: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def iter_rows(dataset, chunk: int = 1024):
    """The rows of a ``datasets.Dataset`` (read a chunk of columns at a time) or of a list of dicts."""
    for start in range(0, len(dataset), chunk):
        part = dataset[start: start + chunk]  # a Dataset gives {column: values}, a list gives rows
        yield from ([dict(zip(part, values)) for values in zip(*part.values())] if isinstance(part, dict) else part)


def scan_dataset(dataset) -> tuple[str, list[int]]:
    """One pass over a tokenized data set: its fingerprint (size, token ids, labels, positions, in
    order; a resumed run must see the same data) and the length of each example."""
    h = hashlib.sha256(str(len(dataset)).encode())
    lengths = []
    for row in iter_rows(dataset):
        lengths.append(len(row["input_ids"]))
        for key in ("input_ids", "labels", "position_ids"):
            if key in row:
                h.update(key.encode())
                h.update(np.asarray(row[key], dtype=np.int64).tobytes())
    return h.hexdigest()[:16], lengths


class DataOrder:
    """The order examples are trained in; its position ``(epoch, index)`` is saved and restored.

    Each epoch is a permutation from a generator seeded with ``(seed, epoch)``. With ``lengths``, each
    window of ``8 * batch`` consecutive positions is then sorted by length and cut into batches of
    ``batch``, whose order inside the window is shuffled again: every batch holds examples of similar
    length (little padding) and the batch lengths still come in random order.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0, *, lengths: Sequence[int] | None = None,
                 batch: int = 1):
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self.lengths, self.batch = lengths, batch
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            if self.lengths is not None and self.batch > 1:
                grouped, window = [], 8 * self.batch
                for start in range(0, self.n, window):
                    by_length = sorted(perm[start: start + window], key=lambda i: -self.lengths[i])
                    batches = [by_length[i: i + self.batch] for i in range(0, len(by_length), self.batch)]
                    grouped += [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
                perm = grouped
            self._perm = perm
        return self._perm

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index, self._perm = self.epoch + 1, 0, None
            take = min(k - len(out), self.n - self.index)
            out += self._permutation()[self.index: self.index + take]
            self.index += take
        return out

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all CUDA devices too


def _check_dataset(dataset, what: str, *, required: bool) -> None:
    if dataset is None:
        if required:
            raise DataError(f"{what} is None")
        return
    if len(dataset) == 0:
        raise DataError(f"{what} is empty")
    row = dataset[0]
    missing = [c for c in ("input_ids", "labels") if c not in row]
    if missing:
        raise DataError(f"{what} has no {missing} column(s): pass a dataset from qolora.data.tokenize_dataset "
                        f"(columns found: {sorted(row)})")


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, falling back to EOS (logged)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has neither a pad token nor an EOS token to pad with")
    logger.info("tokenizer has no pad token: padding with EOS (%r)", tokenizer.eos_token)
    return int(tokenizer.eos_token_id)


def check_output_dir(config: TrainConfig, resume: bool) -> Path:
    """Check ``output_dir`` before any heavy work: a folder (or creatable as one), writable, and not an
    earlier run's folder unless ``resume`` or ``overwrite``. Creates and deletes nothing.

    Raises:
        ConfigError: naming the folder and what to do.
    """
    out = Path(config.output_dir).expanduser()
    existing = out
    while not existing.exists() and existing != existing.parent:  # the folder that would hold it
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} cannot be created: {str(existing)!r} is not a folder")
    try:  # os.access is not enough (root, read-only mounts): really write a file
        fd, probe = tempfile.mkstemp(prefix=".qolora-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"output_dir {str(out)!r} is not writable ({str(existing)!r}: "
                          f"{exc.strerror or exc})") from exc
    if existing != out:
        return out
    earlier = [n for n in (*RUN_FILES, "adapter") if (out / n).exists()] + (
        ["checkpoints"] if ckpt.list_checkpoints(out / "checkpoints") else [])
    if earlier and not resume and not config.overwrite:
        raise ConfigError(
            f"output_dir {str(out)!r} already holds a training run ({', '.join(earlier)}); pass resume=True to "
            "continue it, overwrite=True to start over, or choose another output_dir"
        )
    return out


def _clear_run(out: Path) -> None:
    """Delete an earlier run's files from ``out`` (for ``overwrite``, or a resume with no checkpoint)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in ("checkpoints", "adapter"):
        shutil.rmtree(out / name, ignore_errors=True)


# ------------------------------------------------------------------------------------ the run
class _Run:
    """State and steps of one :func:`train` call (the public function only wires it up)."""

    def __init__(self, model, tokenizer, train_dataset, eval_dataset, config: TrainConfig, out: Path):
        self.model, self.tokenizer, self.config, self.out = model, tokenizer, config, out
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.device = next(model.parameters()).device
        self.precision, self.autocast, self.scaler = resolve_precision(config.mixed_precision, self.device)
        self.params = [p for _, p in adapter_parameters(model)]
        init = getattr(getattr(model, "qolora_config", None), "init", None)
        self.lr, why = (config.lr, "set in TrainConfig") if config.lr is not None else default_lr(init)
        logger.info("learning rate %.3g (%s)", self.lr, why)
        self.lr_reason = why
        self.optimizer = make_optimizer(config.optim, self.params, self.lr, config.weight_decay)
        factor = functools.partial(lr_factor, warmup=config.warmup, max_steps=config.max_steps,
                                   min_ratio=config.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.collate = PaddingCollator(pad_token_id(tokenizer))
        self.data_fp, lengths = scan_dataset(train_dataset)
        self._order_args = ({"lengths": lengths, "batch": config.batch_size * config.grad_accum}
                            if config.group_by_length else {})
        self.order = DataOrder(len(train_dataset), config.seed, **self._order_args)
        self.metrics = reporting.MetricsLog(out / "metrics.jsonl")
        self.ckpt_root = out / "checkpoints"
        self.step = 0
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.samples: list[dict] = []
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.model_fp = ckpt.model_fingerprint(model)
        self.eval_batches = self._eval_batches()
        self._window = {"tokens": 0, "seconds": 0.0}

    # ------------------------------------------------------------------------------ batches
    def _eval_batches(self) -> list[list[int]]:
        """Eval indices in length order (less padding), cut into micro-batches."""
        if self.eval_dataset is None:
            return []
        n = len(self.eval_dataset)
        if self.config.max_eval_examples is not None:
            n = min(n, self.config.max_eval_examples)
        idx = sorted(range(n), key=lambda i: len(self.eval_dataset[i]["input_ids"]))
        size = self.config.eval_batch_size or self.config.batch_size
        return [idx[i: i + size] for i in range(0, n, size)]

    def _batch(self, dataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = self.collate([dataset[i] for i in indices])
        return {k: v.to(self.device) for k, v in batch.items()}

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token cross-entropy over the batch's label tokens (fp32)."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with self.autocast():
            logits = self.model(**inputs, use_cache=False).logits  # (B, T, V)
        labels = batch["labels"][:, 1:]  # (B, T-1): token t predicts t+1
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    # --------------------------------------------------------------------------------- steps
    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its history entry."""
        cfg = self.config
        indices = self.order.take(cfg.batch_size * cfg.grad_accum)
        micro = [self._batch(self.train_dataset, indices[i: i + cfg.batch_size])
                 for i in range(0, len(indices), cfg.batch_size)]
        n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        lr = self.scheduler.get_last_lr()[0]
        total = torch.zeros((), device=self.device)
        for batch in micro:
            loss_sum = self._loss_sum(batch)
            loss = loss_sum / max(1, n_labels)  # token mean over the *accumulated* batch
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss_sum.detach()
        step = self.step + 1
        loss = float(total) / max(1, n_labels)
        if not math.isfinite(loss):
            self._fail(step, f"the training loss is {loss} at step {step}")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped (and the scale lowered) on inf/NaN gradients
            self.scaler.update()
        elif not math.isfinite(grad_norm):
            self._fail(step, f"the gradient norm is {grad_norm} at step {step} (loss {loss:.4f})")
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        entry = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                 "label_tokens": n_labels}
        self.history.append(entry)
        return entry

    def timed_step(self) -> tuple[dict, float]:
        """:meth:`train_step`, timed into the throughput window of the next ``train`` event."""
        tick = time.perf_counter()
        entry = self.train_step()
        seconds = time.perf_counter() - tick
        self._window["seconds"] += seconds
        self._window["tokens"] += entry["tokens"]
        return entry, seconds

    def _fail(self, step: int, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was saved yet")
        message = (f"{what}: stopping before the optimizer step, nothing was saved for this step; {where}. "
                   "Try a lower learning rate, max_grad_norm, or mixed_precision='no'/'bf16'")
        self.metrics.write("error", step=step, message=message)
        raise TrainingError(message)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-mean loss over the eval examples (None without eval data)."""
        if not self.eval_batches:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for indices in self.eval_batches:
                batch = self._batch(self.eval_dataset, indices)
                total += float(self._loss_sum(batch))
                count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        finally:
            self.model.train(was_training)
        loss = total / max(1, count)
        self.evals.append({"step": self.step, "eval_loss": loss})
        self.metrics.write("eval", step=self.step, eval_loss=loss)
        logger.info("step %d: eval loss %.4f", self.step, loss)
        return loss

    # ---------------------------------------------------------------------------- checkpoints
    def _trajectory(self) -> dict:
        """The options a resumed run must share with the checkpoint to continue it exactly."""
        c = self.config
        return {"lr": self.lr, "max_steps": c.max_steps, "batch_size": c.batch_size, "grad_accum": c.grad_accum,
                "warmup": c.warmup, "min_lr_ratio": c.min_lr_ratio, "weight_decay": c.weight_decay,
                "max_grad_norm": c.max_grad_norm, "optim": c.optim, "mixed_precision": self.precision,
                "seed": c.seed, "group_by_length": c.group_by_length}

    def save(self) -> Path:
        trainer = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "rng": ckpt.rng_state()}
        if self.scaler is not None:
            trainer["scaler"] = self.scaler.state_dict()
        state = {"data_position": self.order.position, "history": self.history, "evals": self.evals,
                 "trajectory": self._trajectory(), "train_config": self.config.to_dict(),
                 "model_fingerprint": self.model_fp, "data_fingerprint": self.data_fp,
                 "adapter_config": getattr(getattr(self.model, "qolora_config", None), "to_dict", dict)()}
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, adapter=adapter_state_dict(self.model),
                                    trainer=trainer, state=state)
        ckpt.prune_checkpoints(self.ckpt_root, self.config.keep_last)
        self.last_checkpoint = path
        self.metrics.write("checkpoint", step=self.step, path=str(path))
        logger.info("saved checkpoint %s", path)
        return path

    def restore(self, found: ckpt.Checkpoint) -> None:
        """Continue from ``found`` after checking it belongs to this model, data and options."""
        s = found.state
        problems = []
        if s.get("model_fingerprint") != self.model_fp:
            problems.append("it was saved for a different model or adapter setup "
                            f"(adapter config then: {s.get('adapter_config')})")
        if s.get("data_fingerprint") != self.data_fp:
            problems.append("it was trained on different training data (or another tokenization / split)")
        then, now = s.get("trajectory", {}), self._trajectory()
        changed = [f"{k}: {then.get(k)!r} then, {v!r} now" for k, v in now.items() if then.get(k) != v]
        if changed:
            problems.append("training options differ (" + "; ".join(changed) + ")")
        names = {n for n, _ in adapter_parameters(self.model)}
        if not problems and set(found.adapter) != names:
            problems.append("its adapter weights have other names than this model's adapters")
        if problems:
            raise ckpt.CheckpointError(f"cannot resume from {found.path}: " + "; ".join(problems)
                                       + ". Resume with the same model, data and options, or start over "
                                       "(overwrite=True / another output_dir)")
        with torch.no_grad():
            for name, p in adapter_parameters(self.model):
                p.copy_(found.adapter[name])
        self.optimizer.load_state_dict(found.trainer["optimizer"])
        self.scheduler.load_state_dict(found.trainer["scheduler"])
        if self.scaler is not None and "scaler" in found.trainer:
            self.scaler.load_state_dict(found.trainer["scaler"])
        ckpt.set_rng_state(found.trainer["rng"])
        pos = s["data_position"]
        self.order = DataOrder(len(self.train_dataset), self.config.seed, pos["epoch"], pos["index"],
                               **self._order_args)
        self.step, self.history, self.evals = found.step, list(s["history"]), list(s["evals"])
        self.last_checkpoint = self.resumed_from = found.path
        self.metrics.truncate_after(found.step)
        self.metrics.write("resume", step=found.step, checkpoint=str(found.path))
        self.samples = [dict(x) for x in reporting.read_samples(self.out)]
        logger.info("resuming from %s (step %d of %d)", found.path, found.step, self.config.max_steps)

    # ----------------------------------------------------------------------------- reporting
    def is_log_step(self, step: int) -> bool:
        return step == 1 or step % self.config.log_every == 0 or step == self.config.max_steps

    def log_train(self) -> None:
        """A ``train`` event with the mean loss since the last one (taken from the history, so a resumed
        run logs the same losses as an uninterrupted one)."""
        every = self.config.log_every
        last = max(1 if self.step > 1 else 0, (self.step - 1) // every * every)  # the previous log step
        window = [h for h in self.history if h["step"] > last]
        seconds = self._window["seconds"]
        tokens_per_s = self._window["tokens"] / seconds if seconds > 0 else None
        memory = reporting.memory_in_use(self.device)
        loss = sum(h["loss"] for h in window) / len(window)
        self.metrics.write("train", step=self.step, loss=loss, lr=window[-1]["lr"], grad_norm=window[-1]["grad_norm"],
                           tokens=sum(h["tokens"] for h in window), tokens_per_s=tokens_per_s, memory_bytes=memory,
                           epoch=round(self.order.epoch + self.order.index / self.order.n, 4))
        self._window = {"tokens": 0, "seconds": 0.0}
        logger.info("step %d/%d: loss %.4f, lr %.3g, %s tok/s, %s", self.step, self.config.max_steps, loss,
                    window[-1]["lr"], f"{tokens_per_s:.0f}" if tokens_per_s else "?", reporting.format_bytes(memory))

    def plot(self) -> Path | None:
        return reporting.plot_losses(self.history, self.evals, self.out / "loss.png")

    def generate_samples(self, stage: str) -> None:
        cfg = self.config
        if not self.samples:
            prompts = reporting.sample_prompts(self.eval_dataset, self.tokenizer, cfg.n_samples, cfg.sample_prompts)
            self.samples = [{"prompt": p["prompt"], "prompt_ids": p["prompt_ids"], "reference": p["reference"],
                             "before": None, "after": None} for p in prompts]
        if not self.samples:
            return
        answers = reporting.generate(self.model, self.tokenizer, self.samples, cfg.max_new_tokens, self.autocast)
        for s, a in zip(self.samples, answers):
            s[stage] = a
            logger.info("sample (%s training) %r -> %r", stage, reporting.prompt_preview(s["prompt"], 60), a)
        self.metrics.write("samples", step=self.step, stage=stage,
                           answers=[{"prompt": s["prompt"], stage: s[stage]} for s in self.samples])
        reporting.write_samples(self.out, self.samples, steps=self.step if stage == "after" else None)


def _set_gradient_checkpointing(model: nn.Module, on: bool) -> None:
    active = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    active = bool(getattr(model, "is_gradient_checkpointing", False) if active is None else active)
    if on and not active:
        if not hasattr(model, "gradient_checkpointing_enable"):
            logger.warning("%s does not support gradient checkpointing; training without it", type(model).__name__)
            return
        from .prepare import enable_gradient_checkpointing  # noqa: PLC0415

        enable_gradient_checkpointing(model)
    elif not on and active:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


# ------------------------------------------------------------------------------------- public
def train(
    model: nn.Module,
    tokenizer,
    train_dataset,
    eval_dataset=None,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
) -> TrainResult:
    """Train the adapters of a prepared model (see the module docstring for the loop).

    Args:
        model: a model from :func:`qolora.prepare` (only its adapter weights are trained).
        tokenizer: its tokenizer (padding, sample prompts and answers).
        train_dataset: tokenized examples with ``input_ids`` and ``labels`` (and optionally
            ``position_ids``), e.g. from :func:`qolora.data.tokenize_dataset`.
        eval_dataset: held-out examples of the same form, or None (no eval loss, no held-out samples).
        config: the options; None = ``TrainConfig()``.
        resume: continue from the newest complete checkpoint in ``output_dir/checkpoints`` (a
            corrupted newest one is skipped with a warning); without any checkpoint, start afresh.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: bad options, an unwritable ``output_dir`` or one holding an earlier run (without
            ``resume`` / ``overwrite``), a model without adapters; all before training starts.
        DataError: an empty dataset or one without ``input_ids`` / ``labels``.
        CheckpointError: on resume, no checkpoint verifies, or the newest one belongs to another
            model, adapter setup, data set or set of training options.
        TrainingError: a non-finite loss or gradient (the message names the step).
    """
    started = time.perf_counter()
    config = (config if config is not None else TrainConfig()).validate()
    _check_dataset(train_dataset, "train_dataset", required=True)
    _check_dataset(eval_dataset, "eval_dataset", required=False)
    if next(adapter_parameters(model), None) is None:
        raise ConfigError(f"{type(model).__name__} has no qolora adapter layers to train; build it with qolora.prepare")
    out = check_output_dir(config, resume)
    run = _Run(model, tokenizer, train_dataset, eval_dataset, config, out)  # may still refuse the precision
    out.mkdir(parents=True, exist_ok=True)
    found = ckpt.find_resumable(run.ckpt_root) if resume else None
    if resume and found is None:
        logger.warning("resume=True but %s holds no checkpoint: starting from scratch", run.ckpt_root)
    if found is not None:
        run.restore(found)
    else:
        _clear_run(out)
        _seed_everything(config.seed)
        run.metrics.reset()
        run.metrics.write(
            "start", step=0, lr=run.lr, lr_reason=run.lr_reason, mixed_precision=run.precision,
            device=str(run.device), n_train=len(train_dataset), n_eval=len(eval_dataset or ()),
            trainable_params=sum(p.numel() for p in run.params), train_config=config.to_dict(),
            adapter_config=getattr(getattr(model, "qolora_config", None), "to_dict", dict)(),
        )
    _set_gradient_checkpointing(model, config.gradient_checkpointing)
    from tqdm.auto import tqdm  # noqa: PLC0415

    bar = None
    try:
        if found is None:
            run.generate_samples("before")
            run.evaluate()
        bar = tqdm(total=config.max_steps, initial=run.step, desc="train", unit="step", disable=not config.progress,
                   dynamic_ncols=True)
        model.train()
        while run.step < config.max_steps:
            entry, seconds = run.timed_step()
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}",
                            tok_s=f"{entry['tokens'] / max(1e-9, seconds):.0f}",
                            mem=reporting.format_bytes(reporting.memory_in_use(run.device)), refresh=False)
            if run.is_log_step(run.step):
                run.log_train()
            if run.step == config.max_steps:
                break
            if config.eval_every and run.step % config.eval_every == 0:
                run.evaluate()
                run.plot()
            if config.save_every and run.step % config.save_every == 0:
                run.save()
        bar.close()  # the final eval and samples print below it
        if run.eval_batches and (not run.evals or run.evals[-1]["step"] != run.step):
            run.evaluate()
        if run.last_checkpoint is None or run.last_checkpoint.name != ckpt.checkpoint_name(run.step):
            run.save()
        run.generate_samples("after")
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    plot_path = run.plot()
    result = TrainResult(
        output_dir=out, history=run.history, evals=run.evals, lr=run.lr, metrics_path=run.metrics.path,
        plot_path=plot_path, samples=[{k: s.get(k) for k in ("prompt", "reference", "before", "after")}
                                      for s in run.samples],
        samples_path=out / "samples.md" if run.samples else None, last_checkpoint=run.last_checkpoint,
        resumed_from=run.resumed_from, seconds=time.perf_counter() - started,
    )
    run.metrics.write("end", step=run.step, final_eval_loss=result.final_eval_loss,
                      initial_eval_loss=result.initial_eval_loss, seconds=result.seconds)
    logger.info("training done: %s", result.summary())
    return result


def finetune(
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    *,
    output_dir: str | os.PathLike = "qolora-output",
    bits: int = 4,
    rank: int = 16,
    init: str = "olora",
    alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
    format: str | None = None,
    max_length: int = 128,
    packing: bool = False,
    mask_prompt: bool = True,
    eval_fraction: float = 0.05,
    resume: bool = False,
    adapter_options: dict | None = None,
    config: TrainConfig | None = None,
    **train_options,
) -> TrainResult:
    """Fine-tune a causal LM with a quantized base and OLoRA adapters, end to end.

    Checks everything cheap first (options, output folder, data file and columns, the tokenized
    data), then prepares the model (:func:`qolora.prepare`, gradient checkpointing on), trains
    (:func:`train`) and saves the adapter to ``output_dir/adapter``.

    Args:
        model: a transformers checkpoint folder or hub id; None = the built-in default
            (SmolLM2-135M-Instruct, :func:`qolora.assets.default_model_dir`).
        data: a data file / saved dataset / hub dataset (:func:`qolora.data.load_records`); None =
            the built-in chatterbot English conversations.
        output_dir: the run's folder (``TrainConfig.output_dir``).
        bits, rank, init, alpha, target_modules: the adapter setup (:class:`qolora.AdapterConfig`).
        format: the record format (:data:`qolora.data.FORMATS`); None = detected from the columns.
        max_length: tokens per example (longer ones are truncated).
        packing: pack several examples into each sequence of ``max_length``.
        mask_prompt: train on the answers only.
        eval_fraction: share of the examples held out for eval loss and samples.
        resume: continue an interrupted run in ``output_dir``.
        adapter_options: further :class:`qolora.AdapterConfig` fields (``dropout``, ``quant_type``,
            ``device``, ...).
        config: a whole :class:`TrainConfig` instead of ``output_dir`` and ``**train_options``.
        **train_options: :class:`TrainConfig` fields (``max_steps``, ``lr``, ``batch_size``, ...).

    Returns:
        The :class:`TrainResult`, with ``adapter_dir`` set.

    Raises:
        ConfigError, DataError, AssetError: bad options, paths or data, all before the model is loaded.
        CheckpointError, TrainingError: see :func:`train`.
    """
    from .config import AdapterConfig  # noqa: PLC0415
    from .data import detect_format, load_records, split_train_eval, tokenize_dataset  # noqa: PLC0415

    # 1. Options: every problem at once.
    problems: list[str] = []
    if config is not None and train_options:
        problems.append(f"pass either config or training options, not both (got {sorted(train_options)})")
    try:
        tcfg = config if config is not None else TrainConfig.from_options(output_dir=str(output_dir), **train_options)
        problems += tcfg.problems()
    except (ConfigError, TypeError) as exc:
        tcfg = None
        problems += getattr(exc, "problems", [str(exc)])
    adapter = {"alpha": alpha, "init": init, **(adapter_options or {})}
    if target_modules is not None:
        adapter["target_modules"] = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    try:
        acfg = AdapterConfig(bits=bits, rank=rank, **adapter)
        problems += acfg.problems()
    except TypeError as exc:
        acfg = None
        problems.append(f"unknown adapter option: {exc}")
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
        problems.append(f"eval_fraction={eval_fraction!r} must be a number strictly between 0 and 1")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        problems.append(f"max_length={max_length!r} must be an integer >= 2")
    if problems:
        raise ConfigError(problems)
    resolve_precision(tcfg.mixed_precision, acfg.torch_device)

    # 2. Paths and data, before the model.
    out = check_output_dir(tcfg, resume)
    from . import assets  # noqa: PLC0415
    from .checkpoint import resolve_model_dir  # noqa: PLC0415

    records = load_records(assets.default_dataset_path() if data is None else data)
    detect_format(records.column_names, format)
    model_dir = assets.default_model_dir() if model is None else resolve_model_dir(model)
    tokenizer = _load_tokenizer(model_dir)
    tokenized, stats = tokenize_dataset(records, tokenizer, format=format, max_length=max_length,
                                        mask_prompt=mask_prompt, packing=packing)
    if stats.n_truncated > 0.05 * stats.n_examples:
        logger.warning("%d of %d examples are longer than max_length=%d and were cut; raise max_length to keep them",
                       stats.n_truncated, stats.n_examples, max_length)
    train_ds, eval_ds = split_train_eval(tokenized, eval_fraction, seed=tcfg.seed)
    logger.info("data: %d train / %d eval examples (%s)", len(train_ds), len(eval_ds), stats)

    # 3. The heavy part.
    from .prepare import prepare  # noqa: PLC0415

    net = prepare(model_dir, config=acfg, gradient_checkpointing=tcfg.gradient_checkpointing, progress=tcfg.progress)
    result = train(net, tokenizer, train_ds, eval_ds, tcfg, resume=resume)
    result.adapter_dir = _save_final_adapter(net, out / "adapter")
    return result


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer  # noqa: PLC0415

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises OSError / ValueError / others for a missing tokenizer
        raise ConfigError(f"cannot load a tokenizer from {model_dir}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token: using EOS %r", tokenizer.eos_token)
    return tokenizer


def _save_final_adapter(model: nn.Module, path: Path) -> Path:
    """The trained adapter in qolora's adapter format (reloadable with ``qolora.load``, mergeable)."""
    from .adapter_io import save_adapter  # noqa: PLC0415

    saved = save_adapter(model, path, overwrite=True)
    logger.info("saved the adapter to %s", saved)
    return Path(saved)
