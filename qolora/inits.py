"""Adapter initialisations as pure tensor functions.

Every init takes a full-precision weight ``W`` (out x in, ``y = x @ W.T``), a rank ``r`` and the
adapter scale ``s`` and returns the factors ``(A, B)`` (``A``: r x in, ``B``: out x r). The base
weight then becomes the residual ``W - s * B @ A`` (see :func:`residual_`), so that at step 0 the
adapted layer computes ``W_res + s * B @ A == W``::

        x ──► [ W_res (frozen, 4/8-bit) ] ─────────────┐
        │                                              (+)──► y
        └──► [ A  (r x in) ] ──► [ B (out x r) ] ─ *s ─┘

OLoRA (arXiv 2406.01775, PEFT ``init_lora_weights="olora"``): ``W = Q R`` (reduced QR),
``B = Q[:, :r]`` (orthonormal columns), ``A = R[:r, :]``. Householder QR builds column ``j`` of ``Q``
from columns ``0..j`` of ``W`` only, so the same factors come from the thin QR of ``W[:, :r]`` and
one matmul ``A = B^T W``: O(out*in*r) instead of O(out*in*min(out, in)), identical up to fp32
rounding. Note ``B @ A = Q_r Q_r^T W`` projects W onto the span of its first r columns, and with
``s != 1`` the residual keeps ``(1 - s) * B @ A``; PEFT does exactly this and so do we.

PiSSA: top-r SVD (``torch.svd_lowrank``), ``A = sqrt(S/s) V^T``, ``B = U sqrt(S/s)``, so
``s * B @ A`` is the rank-r truncation of W. LoRA: Kaiming-uniform ``A``, zero ``B``; the base is
untouched (``needs_residual`` is False), so nothing is subtracted.

The functions are chosen by name from :data:`INITS`; all work in fp32 on whatever device the weight
is on (the GPU when there is one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["INITS", "InitFn", "Init", "olora_factors", "pissa_factors", "lora_factors", "residual_"]

# (weight (out, in) fp32, rank, scale, generator) -> (A (r, in), B (out, r))
InitFn = Callable[[torch.Tensor, int, float, "torch.Generator | None"], "tuple[torch.Tensor, torch.Tensor]"]


def olora_factors(
    weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA factors of ``weight`` via the thin QR of its first ``rank`` columns.

    Args:
        weight: fp32 weight, shape (out, in).
        rank: adapter rank r, ``1 <= r <= min(out, in)``.
        scale: adapter scale s (unused: OLoRA's factors do not depend on it; kept for the common
            signature).
        generator: unused (OLoRA is deterministic).

    Returns:
        ``(A, B)`` with A = R[:r, :] (r, in) and B = Q[:, :r] (out, r), fp32, contiguous.
    """
    del scale, generator
    q, _ = torch.linalg.qr(weight[:, :rank], mode="reduced")  # (out, r)
    a = q.T @ weight  # (r, in) == R[:r, :] of the full QR
    return a.contiguous(), q.contiguous()


def pissa_factors(
    weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator | None = None, niter: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA factors: the top-``rank`` singular triplets split evenly between A and B.

    Uses the randomised ``torch.svd_lowrank`` (as PEFT's ``pissa_niter_4``); ``generator`` seeds it.
    ``scale * B @ A`` equals the rank-r truncated SVD of ``weight``.
    """
    fork = [weight.device] if weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        if generator is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(weight, q=rank, niter=niter)  # (out, r), (r,), (in, r)
    root = torch.sqrt(s / scale)  # (r,)
    a = root[:, None] * v.T  # (r, in)
    b = u * root[None, :]  # (out, r)
    return a.contiguous(), b.contiguous()


def lora_factors(
    weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA: Kaiming-uniform A (``a=sqrt(5)``, as ``nn.Linear`` and PEFT), zero B."""
    del scale
    out_features, in_features = weight.shape
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_ with a=sqrt(5) on an (r, in) weight
    a = torch.empty(rank, in_features, dtype=torch.float32, device="cpu")
    a.uniform_(-bound, bound, generator=generator)
    b = torch.zeros(out_features, rank, dtype=torch.float32, device=weight.device)
    return a.to(weight.device), b


@dataclass(frozen=True)
class Init:
    """One initialisation: its factor function and whether the base weight becomes a residual."""

    factors: InitFn
    needs_residual: bool


INITS: dict[str, Init] = {
    "olora": Init(olora_factors, needs_residual=True),
    "pissa": Init(pissa_factors, needs_residual=True),
    "lora": Init(lora_factors, needs_residual=False),
}


def residual_(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """In place: ``weight -= scale * b @ a`` (the base weight becomes the residual). Returns ``weight``."""
    return weight.addmm_(b, a, alpha=-scale)


def adapter_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA), as PEFT."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank
