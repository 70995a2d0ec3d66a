"""What a training run is asked to do and what it reports: :class:`TrainConfig`, :class:`TrainResult`.

:class:`TrainConfig` is one frozen dataclass holding every option of :func:`qolora.training.loop.train`;
:meth:`TrainConfig.problems` lists every problem at once (none needs the model or the data), so a
bad option fails before any heavy work. :data:`DEFAULT_LR` holds the measured default learning rate
of each adapter init.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError
from ..planning.memory_model import OPTIMIZERS

__all__ = ["DEFAULT_LR", "MIXED_PRECISION", "OPTIMIZERS", "TrainConfig", "TrainResult", "TrainingError", "default_lr"]

#: Learning rate when ``TrainConfig.lr`` is None, by adapter init. OLoRA and PiSSA start with a
#: non-zero B and a large A (the weight's own directions), so under Adam a given rate moves the model
#: much faster than LoRA's zero-initialised B. From benchmarks/convergence.py (SmolLM2-135M, 4-bit
#: NF4, r=16, chatterbot, batch 8, 16 steps; see benchmarks/results/convergence.md): the best rates
#: were 3e-4 for OLoRA, 1e-3 for PiSSA and 3e-3 for LoRA (3 seeds each; LoRA blew up at 3e-2).
#: The defaults sit one grid step below those bests, for runs longer than
#: the benchmark's. Other tasks and models move these: sweep when it matters.
DEFAULT_LR: dict[str, float] = {"olora": 1e-4, "pissa": 3e-4, "lora": 1e-3}
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the message names the step."""


# ------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class TrainConfig:
    """Every option of :func:`train`.

    The defaults size the built-in job (SmolLM2-135M-Instruct in 4-bit on ~1,900 short chatterbot
    conversations: 40 steps of 8 examples, evals at 0/20/40 on 32 held-out examples, 2 sample answers of
    up to 32 tokens before and after), a few minutes on a 2-core CPU (the README's Quickstart gives the
    measured time); set ``max_steps`` and the eval / save intervals for real data.

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
        gradient_checkpointing: ``"auto"`` (the default): chosen when training starts, for this job's longest
            example, batch size and optimizer, from the memory plan against the device's free memory: the fewest
            checkpointed decoder layers that fit with a margin (none when all fit; ``"offload"`` when even every
            layer does not), and one notch more (more layers, then ``"offload"``) if a step still runs out of
            memory, the step retried as it was (:mod:`qolora.training.auto_choices`); logged and in ``metrics.jsonl``.
            True: recompute activations in the backward pass (less memory); ``"offload"``: also
            keep each layer's checkpointed input in host memory until its recompute (least GPU memory; True
            keeps a model prepared with ``"offload"`` offloading); an integer ``n``: checkpoint only the first
            ``n`` decoder layers (the others keep their activations: faster, more memory).
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
        fsdp: shard the 4-bit base over the processes of a ``torchrun`` launch with FSDP2
            (:mod:`qolora.training.fsdp`; needs ``bits=4`` and a float ``quant_storage``); sample answers are
            skipped under it.
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
    gradient_checkpointing: bool | str | int = "auto"
    group_by_length: bool = True
    eval_every: int = 20
    max_eval_examples: int | None = 32
    eval_batch_size: int | None = None
    save_every: int = 20
    keep_last: int | None = 2
    log_every: int = 10
    seed: int = 0
    n_samples: int = 2
    sample_prompts: tuple[str, ...] | None = None
    max_new_tokens: int = 32
    fsdp: bool = False
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
        gc = self.gradient_checkpointing
        if not (isinstance(gc, bool) or gc in ("offload", "auto") or (type(gc) is int and gc >= 0)):
            p.append(f"gradient_checkpointing={gc!r} is not supported; allowed: 'auto', True, False, 'offload', or a "
                     "number of decoder layers to checkpoint (an integer >= 0)")
        if not isinstance(self.fsdp, bool):
            p.append(f"fsdp={self.fsdp!r} must be True or False")
        number("warmup_ratio", 0.0, 1.0)
        number("min_lr_ratio", 0.0, 1.0)
        number("weight_decay", 0.0)
        number("max_grad_norm", 0.0, low_open=True, allow_none=True)
        if self.optim not in OPTIMIZERS:
            p.append(f"optim={self.optim!r} is not supported; allowed: {list(OPTIMIZERS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            p.append(f"mixed_precision={self.mixed_precision!r} is not supported; allowed: {list(MIXED_PRECISION)}")
        if self.sample_prompts is not None and (
            isinstance(self.sample_prompts, str)
            or not all(isinstance(t, str) and t.strip() for t in self.sample_prompts)
        ):
            p.append(f"sample_prompts={self.sample_prompts!r} must be a list of non-empty strings (or None)")
        if (isinstance(self.warmup_steps, int) and isinstance(self.max_steps, int)
                and self.warmup_steps > self.max_steps):
            p.append(f"warmup_steps={self.warmup_steps} is more than max_steps={self.max_steps}")
        return p

    def validate(self) -> TrainConfig:
        """Raise one :class:`~qolora.ConfigError` listing every problem, or return self."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    @property
    def warmup(self) -> int:
        """Warmup steps actually used."""
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * self.max_steps)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["sample_prompts"] = list(self.sample_prompts) if self.sample_prompts is not None else None
        return d

    @classmethod
    def from_options(cls, **options) -> TrainConfig:
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
        log_every: the logging interval: :attr:`final_train_loss` averages the last interval, as the last
            ``train`` event of ``metrics.jsonl`` and the last log line do.
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
    log_every: int = 10

    @property
    def steps(self) -> int:
        return self.history[-1]["step"] if self.history else 0

    @property
    def initial_eval_loss(self) -> float | None:
        return self.evals[0]["eval_loss"] if self.evals and self.evals[0]["step"] == 0 else None

    @property
    def final_eval_loss(self) -> float | None:
        return self.evals[-1]["eval_loss"] if self.evals else None

    @property
    def final_train_window(self) -> list[dict]:
        """The history entries of the last logging interval (what the last ``train`` event averages)."""
        step = self.steps
        last = max(1 if step > 1 else 0, (step - 1) // max(1, self.log_every) * max(1, self.log_every))
        return [h for h in self.history if h["step"] > last]

    @property
    def final_train_loss(self) -> float | None:
        """Mean train loss over the last logging interval (None before any step)."""
        window = self.final_train_window
        return sum(h["loss"] for h in window) / len(window) if window else None

    def summary(self) -> str:
        """One line: steps, lr, the final train loss (labelled with its window), eval loss before -> after."""
        text = f"{self.steps} steps at lr {self.lr:.3g}"
        window = self.final_train_window
        if window:
            steps = (f"step {window[0]['step']}" if len(window) == 1
                     else f"steps {window[0]['step']}-{window[-1]['step']}")
            text += f", train loss {self.final_train_loss:.4f} (mean of {steps})"
        if self.initial_eval_loss is not None and self.final_eval_loss is not None:
            text += f", eval loss {self.initial_eval_loss:.4f} -> {self.final_eval_loss:.4f}"
        return text + f" ({self.seconds:.0f} s)"
