"""The numerics of a training step: mixed precision, the optimizer, the learning-rate schedule.

* :func:`resolve_precision`: bf16 autocast on GPUs that have it, fp16 + a gradient scaler on older
  ones, none on the CPU (``"auto"``), or what was asked for, refused where it cannot run.
* :func:`make_optimizer`: AdamW over the adapter weights, torch's or bitsandbytes' 8/32-bit (paged
  on CUDA; the same update without paging elsewhere).
* :func:`lr_factor`: linear warmup, then cosine decay to a floor.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["lr_factor", "make_optimizer", "resolve_precision"]

logger = logging.getLogger(__name__)


def resolve_precision(mode: str,
                      device: torch.device) -> tuple[str, Callable[[], contextlib.AbstractContextManager], Any]:
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
    import bitsandbytes as bnb

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
