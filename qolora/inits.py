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

Quantization-aware refinement (``refine=K``, :func:`refine_factors`; the idea of LoftQ, Li et al. 2023,
kept in each init's form). With ``Q(X) = deq(q(X))`` the base layer's quantize-dequantize, the adapted
layer computes ``Q(W - s*B@A) + s*B@A``, and its weight error is ``e = ||W - Q(W - s*B@A) - s*B@A||``.
Starting from the init's factors ``(A_0, B_0)``, round ``k = 0..K-1``::

    D_k = Q(W - s*B_k@A_k)                 (temporary quantization of the current residual)
    T_k = W - D_k                          (what the adapter should carry: W minus what the base holds)
    e_k = ||T_k - s*B_k@A_k||              (the weight error of (A_k, B_k))
    OLoRA:  B_{k+1} = qr(T_k @ T_k^T @ B_k).Q          (out x r, orthonormal columns)
            A_{k+1} = B_{k+1}^T @ T_k / s              (the least-squares A for that B: s*B@A = B B^T T_k)
    PiSSA:  U, S, V = svd_lowrank(T_k, r)              (seeded, as pissa_factors)
            A_{k+1} = sqrt(S/s) V^T,  B_{k+1} = U sqrt(S/s)   (s*B@A = rank-r truncation of T_k)

then the residual ``W - s*B_K@A_K`` is quantized for good, once, by the caller. OLoRA's B moves by one
step of subspace iteration per round, starting from OLoRA's column-span subspace, towards the top-r
left singular subspace of ``T_k`` (the best orthonormal B for the fixed target); re-taking the thin QR
of ``T_k[:, :r]`` (OLoRA's own rule) or keeping B measured no better than keeping B on SmolLM2-135M
(0.871x plain NF4's error after 5 rounds vs 0.854x with the subspace step), because ``T_k``'s first
columns are dominated by ``s*B_k@A_k`` itself. Each round costs one quantize-dequantize of the weight
plus O(out*in*r) matmuls; nothing is kept from it but the new factors.

PEFT's LoftQ (``peft/utils/loftq_utils.py``, ``loftq_init``) runs the same alternation from the other
end: its starting residual is ``W`` itself (``A = B = 0``), its refit is an exact full SVD
(``torch.linalg.svd``) with ``B = U sqrt(S)``, ``A = sqrt(S) V^T`` fitted with no scale (correct only
for ``s = 1``), and it hands back the dequantized base in full precision (quantized again when the
model is loaded in 4 bits, with double quantization off). PEFT's ``replace_lora_weights_loftq`` is one
round on an already-quantized base: ``A, B = svd_r(W - Q(W))``. Both hard-code a CUDA/XPU device.

The functions are chosen by name from :data:`INITS`; all work in fp32 on whatever device the weight
is on (the GPU when there is one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["INITS", "InitFn", "Init", "olora_factors", "pissa_factors", "lora_factors", "residual_",
           "refine_factors"]

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


def refine_factors(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    quantize_dequantize: Callable[[torch.Tensor], torch.Tensor],
    rounds: int,
    init: str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Refit ``(a, b)`` so that ``Q(W - s*B@A) + s*B@A`` approaches ``W`` (see the module docstring).

    Args:
        weight: the full-precision weight W, fp32, shape (out, in); not modified.
        a: the init's A (r, in). b: the init's B (out, r). Both fp32 on ``weight``'s device.
        scale: adapter scale s.
        quantize_dequantize: ``Q``: quantizes a weight exactly as the base layer will and returns it
            dequantized, fp32 (e.g. :func:`qolora.base.quant.quantize_dequantize` bound to a config).
        rounds: K >= 0; 0 returns ``(a, b, [])`` untouched.
        init: ``"olora"`` (orthonormal B, ``A = B^T T / s``) or ``"pissa"`` (top-r SVD split).
        generator: seeds PiSSA's randomised SVD (one draw per round).

    Returns:
        ``(A_K, B_K, errors)``: the refined factors (fp32, contiguous) and ``errors[k] = e_k``, the weight
        error ``||W - Q(W - s*B_k@A_k) - s*B_k@A_k||`` of the factors each round started from (so
        ``errors[0]`` is the unrefined init's error; the error of ``(A_K, B_K)`` is measured when the
        caller quantizes the final residual).
    """
    if rounds < 0:
        raise ValueError(f"rounds={rounds} must be >= 0")
    if init not in ("olora", "pissa"):
        raise ValueError(f"refine works for init 'olora' or 'pissa', not {init!r}")
    errors: list[float] = []
    for _ in range(rounds):
        target = quantize_dequantize(torch.addmm(weight, b, a, alpha=-scale))  # D_k = Q(W - s*B@A), (out, in)
        target.neg_().add_(weight)  # T_k = W - D_k, in place
        errors.append(float(torch.linalg.norm(torch.addmm(target, b, a, alpha=-scale))))
        if init == "olora":
            b, _ = torch.linalg.qr(target @ (target.T @ b), mode="reduced")  # (out, r), orthonormal
            a = (b.T @ target).div_(scale)  # (r, in)
        else:
            a, b = pissa_factors(target, b.shape[1], scale, generator)
        del target
    return a.contiguous(), b.contiguous(), errors
