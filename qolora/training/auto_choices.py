"""``gradient_checkpointing="auto"`` and ``kernels="auto"``: what a training run chooses when it starts.

Both are decided once, at launch, where the job's shape is known (:func:`qolora.training.loop.train`, and so
:func:`qolora.training.finetune.finetune` and ``qolora finetune``): the longest example, the batch size, the
optimizer, the number of steps. :func:`qolora.prepare` alone does not know the batch, so
``prepare(gradient_checkpointing="auto")`` checkpoints nothing yet (as False did) and leaves the choice to
the training run; a loop of one's own should pass an explicit value. A model whose checkpointing was set
explicitly (``prepare(gradient_checkpointing=True / "offload" / N)``, or
:func:`qolora.memory.gradient_checkpointing.enable_gradient_checkpointing`) keeps that setting under a training run's
``"auto"`` (logged as such).

**Gradient checkpointing** (:func:`resolve_checkpointing`): the fewest checkpointed decoder layers (0: none)
whose step fits the device's free memory with a stated margin, from :func:`qolora.planning.plan.plan` for this job
(the same formulas as ``qolora plan``; its "faster, still fits" line); ``"offload"`` when even every layer
checkpointed does not fit on a GPU.

* CUDA: the step's device bytes (activations, loss, adapter gradients, optimizer states) plus the plan's
  allocator margin (``max(256 MiB, 5%)``) must fit :data:`CUDA_FREE_FRACTION` of the device's free memory
  at launch (the model is already there, so free memory is what the step can use).
* CPU: the plan counts torch tensors exactly, but a process's resident set holds more: bitsandbytes' CPU
  temporaries (dequantized weights), the allocator's slack, the libraries' working memory. Measured on
  SmolLM2-135M 4-bit, batch 4 x 256 (``benchmarks/train_step.py``: peak RSS above the loaded model against
  the plan's step bytes): 1320 MiB vs 230 MiB with every layer checkpointed, 2457 MiB vs 1334 MiB with 4, so
  about 1.1 GiB more, whatever the activations. The need is modelled as ``CPU_STEP_FACTOR x step bytes +
  max(CPU_RSS_ALLOWANCE, the base weights' bytes)`` and must fit :data:`CPU_AVAILABLE_FRACTION` of the host
  memory available at launch (a conservative share: other processes live there too). ``"offload"`` moves
  nothing on a CPU (host and device are one memory), so there every layer checkpointed is the last notch.

A wrong choice must not cost the run: :func:`next_checkpointing` gives the next notch (a quarter of the
layers more, then every layer, then ``"offload"`` on a GPU), and the training loop retries a step that ran
out of memory with it, from the same micro-batches, RNG state and untouched optimizer
(``qolora.training.loop._Run.train_step``).

**Kernels** (:func:`resolve_kernels`): ``kernels="auto"`` keeps the fused adapter step, and also compiles the
decoder layers (``kernels="compile"``, :mod:`qolora.adapters.compiled_layers`) when the run is long enough to repay
the compilation: ``(max_steps - 1) x per-step gain > compile cost`` (twice the cost when example lengths
vary: one recompilation with dynamic shapes). The per-step gain is modelled as proportional to the
elementwise work Inductor fuses (tokens x layers x (hidden + intermediate)); both constants are per device
kind in :data:`COMPILE_MODEL`, with where they were measured. Only where Inductor can build code (a C++
compiler on the CPU, Triton on CUDA) and never under FSDP; a compile failure falls back to eager as with
``kernels="compile"``.

Every choice is a :class:`Choice`: logged at launch and written to ``metrics.jsonl`` (the ``start`` or
``resume`` event's ``automatic`` list; a fallback writes a ``fallback`` event).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["CPU_AVAILABLE_FRACTION", "CPU_RSS_ALLOWANCE", "CPU_STEP_FACTOR", "COMPILE_MODEL", "CUDA_FREE_FRACTION",
           "Choice", "CompileModel", "apply_checkpointing", "checkpointing_ladder", "current_checkpointing",
           "is_out_of_memory",
           "next_checkpointing", "resolve_checkpointing", "resolve_kernels"]

logger = logging.getLogger(__name__)

GiB = 2**30
CUDA_FREE_FRACTION = 0.9
"""Share of the GPU's free memory (at launch) the step may plan to use (the rest: a margin for what the plan
leaves out, on top of the plan's own allocator margin)."""
CPU_AVAILABLE_FRACTION = 0.5
"""Share of the host memory available at launch the step may plan to use on a CPU device."""
CPU_STEP_FACTOR = 1.25
"""The plan's step bytes, scaled for the resident set on a CPU device (allocator slack on the activations)."""
CPU_RSS_ALLOWANCE = GiB
"""What a CPU process's resident set holds beyond the plan's tensors during a step (measured ~1.1 GiB on
SmolLM2-135M 4-bit: bitsandbytes' temporaries, allocator and library memory); at least the base weights' bytes."""


@dataclass
class Choice:
    """One automatic choice: the option, what was asked (``"auto"``), what was chosen, and why."""

    option: str
    asked: Any
    value: Any
    reason: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def log_line(self) -> str:
        return f"{self.option}={self.asked!r} -> {self.value!r}: {self.reason}"


# ------------------------------------------------------------------------------ checkpointing
def _layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)


def checkpointing_ladder(num_layers: int, device_type: str) -> list:
    """The notches of :func:`next_checkpointing`, least memory last: quarters of the layers, every layer
    (True), and ``"offload"`` on a GPU."""
    quarters = sorted({math.ceil(num_layers * q / 4) for q in (1, 2, 3)} - {0, num_layers})
    return [*quarters, True] + (["offload"] if device_type == "cuda" else [])


def next_checkpointing(current: bool | str | int, num_layers: int, device_type: str) -> bool | str | int | None:
    """The next notch after ``current`` (more checkpointed layers, then every layer, then ``"offload"`` on a
    GPU), or None when there is none (``current`` already takes the least memory)."""
    if current == "offload" or (current is True and device_type != "cuda"):
        return None
    if current is True:
        return "offload"
    k = 0 if current is False else int(current)
    return next((n for n in checkpointing_ladder(num_layers, device_type) if n is True or n > k), None)


def resolve_checkpointing(model: nn.Module, *, seq_len: int, batch_size: int, optim: str = "paged_adamw_8bit",
                          device: torch.device | str | None = None, free_bytes: int | None = None,
                          grad_accum: int = 1, processes: int = 1) -> Choice:
    """``gradient_checkpointing="auto"`` for a job of ``batch_size`` examples of up to ``seq_len`` tokens.

    Returns a :class:`Choice` whose value is False (no layer needs checkpointing), an integer ``k`` (checkpoint
    the first ``k`` decoder layers), True (every layer) or ``"offload"`` (CUDA: even every layer does not fit).
    ``free_bytes``: the memory to fit (default: the CUDA device's free memory, or the host memory available).
    A model without qolora's record (not from :func:`qolora.prepare`) gets True, the old default.
    """
    from ..model.record import record_of

    device = torch.device(device) if device is not None else next(model.parameters()).device
    kind = "cuda" if device.type == "cuda" else "cpu"
    record = record_of(model)
    num_layers = _layer_count(model)
    if record is None or num_layers is None:
        return Choice("gradient_checkpointing", "auto", True, "not a qolora.prepare model: no plan, every layer "
                      "checkpointed")
    try:
        need, weights = _step_needs(model, record.config, seq_len=seq_len, batch_size=batch_size, optim=optim,
                                    kind=kind, grads_persist=grad_accum > 1 or processes > 1)
    except Exception as exc:  # noqa: BLE001 - an architecture the planner cannot read: the safe setting
        return Choice("gradient_checkpointing", "auto", True, f"no plan for this model ({type(exc).__name__}: "
                      f"{exc}); every layer checkpointed")
    ladder, offloaded = need["layers"], need["offload"]
    if free_bytes is None:
        if kind == "cuda":
            free_bytes = torch.cuda.mem_get_info(device)[0]
        else:
            from ..memory.host_memory import available_host_bytes

            free_bytes = available_host_bytes()
    if kind == "cuda":
        budget = int(CUDA_FREE_FRACTION * free_bytes)
        margin = f"{CUDA_FREE_FRACTION:.0%} of the GPU's {free_bytes / GiB:.2f} GiB free"

        def needed(step: int) -> int:
            return step + max(256 * 2**20, int(0.05 * step))  # the plan's allocator margin
    else:
        budget = int(CPU_AVAILABLE_FRACTION * free_bytes)
        allowance = max(CPU_RSS_ALLOWANCE, weights)
        margin = f"{CPU_AVAILABLE_FRACTION:.0%} of the host's {free_bytes / GiB:.2f} GiB available"

        def needed(step: int) -> int:
            return int(CPU_STEP_FACTOR * step) + allowance
    details = {"seq_len": seq_len, "batch_size": batch_size, "device": kind, "free_bytes": int(free_bytes),
               "budget_bytes": budget, "num_layers": num_layers,
               "needed_bytes_by_checkpointed_layers": [needed(s) for s in ladder],
               "needed_bytes_offload": needed(offloaded)}
    k = next((k for k, step in enumerate(ladder) if needed(step) <= budget), None)
    shape = f"batch {batch_size} x {seq_len} tokens"
    if k is not None:
        value = False if k == 0 else (True if k == num_layers else k)
        what = ("no layer checkpointed" if k == 0 else f"the first {k} of {num_layers} decoder layers checkpointed")
        reason = (f"{what}: the step at {shape} needs {needed(ladder[k]) / GiB:.2f} GiB, within {margin}"
                  + ("" if k == 0 else f" (with {k - 1}: {needed(ladder[k - 1]) / GiB:.2f} GiB)"))
        return Choice("gradient_checkpointing", "auto", value, reason, details)
    if kind == "cuda":
        reason = (f"even every layer checkpointed needs {needed(ladder[-1]) / GiB:.2f} GiB at {shape}, more than "
                  f"{margin}: checkpoints offloaded to host memory ({needed(offloaded) / GiB:.2f} GiB on the GPU)")
        return Choice("gradient_checkpointing", "auto", "offload", reason, details)
    reason = (f"every layer checkpointed: even so the step at {shape} is predicted to need "
              f"{needed(ladder[-1]) / GiB:.2f} GiB, more than {margin}")
    logger.warning("gradient_checkpointing='auto': %s", reason)
    return Choice("gradient_checkpointing", "auto", True, reason, details)


def _step_needs(model: nn.Module, config, *, seq_len: int, batch_size: int, optim: str, kind: str,
                grads_persist: bool) -> tuple[dict, int]:
    """The plan's device bytes of one step for 0..L checkpointed layers and for offloaded checkpoints, and the
    base weights' bytes."""
    from ..adapters.layer import adapter_layers
    from ..planning.plan import plan_checked
    from ..planning.shape import TrainingShape

    kernels = next((layer.kernels for _, layer in adapter_layers(model)), "auto")
    # gradients that live through the step (accumulation, DDP buckets) are planned as grad_accum > 1
    shape = TrainingShape(seq_len=seq_len, batch_size=batch_size, optim=optim, kernels=kernels, device=kind,
                          grad_accum=2 if grads_persist else 1)
    p = plan_checked(model.config, config, shape, search=False, step_by_layers=True)
    return ({"layers": p.details["step_bytes_by_checkpointed_layers"],
             "offload": p.details["step_bytes_offloaded_checkpoints"]}, p.weights_bytes)


def apply_checkpointing(model: nn.Module, value: bool | str | int) -> None:
    """Set ``model``'s checkpointing to exactly ``value`` (False / 0: off; ``k``: the first ``k`` layers;
    True: every layer; ``"offload"``: every layer, checkpoints in host memory)."""
    from ..memory.gradient_checkpointing import enable_gradient_checkpointing

    if value is False or value == 0:
        active = getattr(model, "is_activation_checkpointing", None)
        active = bool(getattr(model, "is_gradient_checkpointing", False) if active is None else active)
        if active:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        return
    if value is True or value == "offload":
        enable_gradient_checkpointing(model, offload=value == "offload")  # every layer (resets a layer count)
        return
    enable_gradient_checkpointing(model, layers=int(value))


def current_checkpointing(model: nn.Module) -> bool | str | int:
    """The model's checkpointing as it is set now: False, ``k`` (the first ``k`` decoder layers), True or
    ``"offload"``."""
    from ..adapters.compiled_layers import _layers
    from ..memory.gradient_checkpointing import find_offloaded_checkpointing

    active = getattr(model, "is_activation_checkpointing", None)
    active = bool(getattr(model, "is_gradient_checkpointing", False) if active is None else active)
    if not active:
        return False
    if find_offloaded_checkpointing(model) is not None:
        return "offload"
    flags = [bool(getattr(layer, "gradient_checkpointing", False)) for layer in _layers(model)]
    return True if all(flags) else sum(flags)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA's ``OutOfMemoryError``, or the CPU allocator's)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "not enough memory" in text or isinstance(exc, MemoryError))


# ------------------------------------------------------------------------------------ kernels
@dataclass(frozen=True)
class CompileModel:
    """What compiling the decoder layers costs once and saves per step, on one device kind.

    Attributes:
        compile_s: the first step's extra seconds (Inductor, cold cache).
        gain_s_per_element: seconds saved per step per element of elementwise work
            (tokens x decoder layers x (hidden + intermediate)).
        source: where the figures come from.
    """

    compile_s: float
    gain_s_per_element: float
    source: str


COMPILE_MODEL: dict[str, CompileModel] = {
    # benchmarks/results/train_step_cpu_smollm2.json (2026-11-28, 2 threads, SmolLM2-135M 4-bit, 4 x 256):
    # kernels=compile's first step with an empty Inductor cache 24.5 s vs 5.4 s eager (19 s; 3.5 s once the
    # disk cache holds the graphs), per step 0.37 s faster with every layer checkpointed, 0.215 s with 4
    # (64.9M elements per step): the cold cost and the smaller gain are used. Checked against
    # benchmarks/results/train_step_cpu_smollm2_defaults.json (2026-12-03, 1 thread, no layer checkpointed):
    # 0.5 CPU-s saved per step (9.1 vs 9.6), first step 34-91 s vs 19-43 s eager (load 4-6): compiling pays
    # after ~80-140 steps of 1,024 tokens there, ~90 by these constants; the default 40 steps do not.
    "cpu": CompileModel(19.0, 3.3e-9, "benchmarks/train_step.py, SmolLM2-135M, 2-core CPU"),
    # Not measured on a GPU yet (benchmarks/gpu_check.sh records first_step_s of the compile rows): Triton
    # compilation of a layer's forward and backward takes about a minute cold; the elementwise work it fuses
    # is memory-bound, ~20 bytes per element at ~4 TB/s.
    "cuda": CompileModel(60.0, 5e-12, "estimate (not measured on a GPU)"),
}


def _inductor_problem(kind: str) -> str | None:
    """Why Inductor cannot build code here (None: it can)."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if kind == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (Inductor's GPU code generator)"
        return None
    import os

    if not (os.environ.get("CXX") or any(shutil.which(c) for c in ("c++", "g++", "clang++"))):
        return "no C++ compiler (Inductor's CPU code generator)"
    return None


def resolve_kernels(model: nn.Module, *, max_steps: int, tokens_per_step: float, varying_lengths: bool,
                    device: torch.device | str | None = None, fsdp: bool = False) -> Choice:
    """``kernels="auto"`` for a run: ``"compile"`` when compiling the decoder layers pays for itself over
    ``max_steps`` steps of ``tokens_per_step`` tokens, else ``"auto"`` (the fused step, eager)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    kind = "cuda" if device.type == "cuda" else "cpu"
    if fsdp:
        return Choice("kernels", "auto", "auto", "FSDP-sharded layers are not compiled: fused step, eager")
    problem = _inductor_problem(kind)
    if problem:
        return Choice("kernels", "auto", "auto", f"{problem}: fused step, eager")
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    layers = _layer_count(model) or 0
    width = (getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0) or 0) + (
        getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 0)
    cost_model = COMPILE_MODEL[kind]
    elements = tokens_per_step * layers * width
    gain = cost_model.gain_s_per_element * elements * max(0, max_steps - 1)
    cost = cost_model.compile_s * (2 if varying_lengths else 1)
    details = {"device": kind, "max_steps": max_steps, "tokens_per_step": round(tokens_per_step, 1),
               "predicted_gain_s": round(gain, 2), "predicted_compile_s": cost, "model_source": cost_model.source}
    why = (f"{max_steps} steps of ~{tokens_per_step:.0f} tokens: predicted {gain:.1f} s saved against "
           f"{cost:.0f} s of compilation" + (" (lengths vary: one recompilation)" if varying_lengths else ""))
    if gain > cost:
        return Choice("kernels", "auto", "compile", f"decoder layers compiled: {why}", details)
    return Choice("kernels", "auto", "auto", f"fused step, eager (compiling does not pay: {why})", details)
