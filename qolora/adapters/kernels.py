"""The adapter layer's training step as one autograd function: base matmul and adapter fused.

The plain path (``AdapterLinear`` running ``base_layer(x) + (lora_B(lora_A(x)) * s).to(dtype)``, as
PEFT does) records about eight autograd nodes per adapted linear layer and makes three full-size
``(N, out)`` temporaries in the forward pass alone (the adapter's output, its scaled copy, the sum),
each written and read again through memory; under bf16 autocast it also casts the layer's input to
fp32 for the adapter and back, saving another copy of it for the backward pass. On a 4-bit base,
bitsandbytes' ``MatMul4Bit`` is one more node.

:class:`_FusedAdapterLinear` computes the same thing as one node::

    forward:   y  = x @ deq(W)^T (+ b)              (N, out)   bitsandbytes' own 4-bit matmul, or F.linear
               t  = x_a @ A^T                       (N, r)     x_a: the adapter's input (dropout(x))
               y += s * t @ B^T                     in place (addmm_): no (N, out) temporaries
    saved:     x (or x and x_a when dropout makes them differ), t; the weight by reference
    backward:  u      = g @ B                                      (N, r)
               grad_x = g @ deq(W) + s * u @ A                     one addmm when x_a is x
               grad_B = s * g^T @ t      grad_A = s * u^T @ x_a    (out, r), (r, in)

so the forward pass writes one ``(N, out)`` tensor instead of four and the backward pass none beyond
the gradients it returns. The base weight is dequantized in the forward pass and again in the backward
pass, as bitsandbytes does (keeping the dense weight from forward to backward would hold a dense copy
of every layer). The rounding differs from the plain path only in the order of the adapter's
additions (fp32: ~1e-6 relative; bf16: within bf16 rounding), see ``tests/adapters/test_kernels.py``.

When the fused path does not apply, :func:`unsupported_reason` says why and the layer takes the plain
path; :func:`note_fallback` logs each such message once. The switch is ``prepare(..., kernels=...)``
(``"auto"``: fused wherever it applies, the default; ``"compile"``: fused, and the rest of each decoder
layer compiled by ``torch.compile``, see :mod:`qolora.adapters.compiled_layers`; ``"off"``: always the plain path).

Prior art (ideas, no code): Unsloth's hand-written LoRA autograd (``fast_lora.py``: one function per
block, fewer casts and temporaries, ``addmm_`` for the adapter); PEFT's ``LoraLayer.forward`` is the
plain path.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from ..base.quant import quantization_kind

__all__ = ["KERNEL_CHOICES", "check_kernels", "fused_adapter_linear", "fused_step", "note_fallback",
           "unsupported_reason"]

logger = logging.getLogger(__name__)

KERNEL_CHOICES = ("auto", "compile", "off")
"""``"auto"``: the fused adapter step wherever it applies (logged where it does not); ``"compile"``: the
same, and the decoder layers' training forward compiled with ``torch.compile``
(:mod:`qolora.adapters.compiled_layers`); ``"off"``: the plain path, eager."""

_logged: set[str] = set()


def check_kernels(kernels: str) -> str:
    """``kernels`` if it is one of :data:`KERNEL_CHOICES`, else a ValueError naming the choices."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r} is not one of {', '.join(map(repr, KERNEL_CHOICES))}")
    return kernels


def fused_step(kernels: str, bits: int) -> bool:
    """Whether a model prepared with ``kernels`` and a ``bits``-bit base trains through the fused adapter step
    (``"auto"`` and ``"compile"`` both use it; 8-bit bases take bitsandbytes' own path, see
    :func:`unsupported_reason`). The memory planner models the step this says runs."""
    return kernels != "off" and bits != 8


def note_fallback(message: str) -> None:
    """Log ``message`` (a faster path not taken, and why) once per process: the fused adapter step here,
    ``kernels="compile"`` in :mod:`qolora.adapters.compiled_layers`."""
    if message not in _logged:
        _logged.add(message)
        logger.info("%s", message)


def unsupported_reason(base_layer: nn.Module) -> str | None:
    """Why ``base_layer`` cannot run inside :func:`fused_adapter_linear`; None when it can."""
    weight = getattr(base_layer, "weight", None)
    if weight is None:
        return f"base layer {type(base_layer).__name__} has no weight"
    if base_layer._forward_hooks or base_layer._forward_pre_hooks:
        return "the base layer has forward hooks (they must see its call)"
    if "forward" in vars(base_layer) or hasattr(base_layer, "_hf_hook"):
        return "the base layer's forward is wrapped (an accelerate hook or a patch must see its call)"
    bias = getattr(base_layer, "bias", None)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "the base layer is trainable"
    kind = quantization_kind(weight)
    if kind == "8bit":
        return "8-bit base: bitsandbytes' int8 matmul with outlier handling runs its own path"
    if kind == "4bit":
        state = getattr(weight, "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False):
            return "4-bit weight without its quantization state on it (FSDP-gathered, or repacked for CPU inference)"
        return None
    if type(base_layer) is not nn.Linear:
        return f"base layer {type(base_layer).__name__} is not an nn.Linear"
    if hasattr(weight, "placements"):
        return "the base weight is a sharded DTensor"
    return None


# ------------------------------------------------------------------------------------------------ base
def _base_compute_dtype(base_layer: nn.Module, x: torch.Tensor, four_bit: bool) -> torch.dtype:
    """The dtype the base matmul runs in, as the layer's own forward would choose it."""
    if four_bit:
        return getattr(base_layer, "compute_dtype", None) or x.dtype  # Linear4bit casts x to it
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)  # F.linear under autocast
    return torch.promote_types(x.dtype, base_layer.weight.dtype)


def _base_forward(base_layer: nn.Module, x: torch.Tensor, four_bit: bool) -> torch.Tensor:
    """``x @ deq(W)^T + b`` (N, out) in x's dtype; no autograd (called inside the Function)."""
    weight, bias = base_layer.weight, base_layer.bias
    if bias is not None:
        bias = bias.to(x.dtype)
    if four_bit:
        import bitsandbytes as bnb  # present whenever a 4-bit weight exists

        return bnb.matmul_4bit(x, weight, bias=bias, quant_state=weight.quant_state)  # no grad: gemm_4bit
    return F.linear(x, weight.to(x.dtype), bias)


def _base_weight(base_layer: nn.Module, dtype: torch.dtype, four_bit: bool) -> torch.Tensor:
    """The dense weight (out, in) the base computes with, in ``dtype`` (dequantized for 4-bit)."""
    weight = base_layer.weight
    if four_bit:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    return weight.detach().to(dtype)


class _FusedAdapterLinear(torch.autograd.Function):
    """``y = base(x) + s * (x_a @ A^T) @ B^T`` with its backward, as one node (see the module docstring).

    Inputs arrive in their compute dtypes (casts happen outside, so autograd routes the gradients
    back to the callers' dtypes); ``x_a`` is None when it is ``x`` itself.
    """

    @staticmethod
    def forward(ctx, x, x_a, lora_a, lora_b, scale: float, base_layer: nn.Module, four_bit: bool):
        shared = x_a is None
        a_in = x if shared else x_a  # (N, in) the adapter's input
        out = _base_forward(base_layer, x, four_bit)  # (N, out)
        t = a_in @ lora_a.t()  # (N, r)
        if out.dtype == t.dtype:
            out.addmm_(t, lora_b.t(), alpha=scale)  # (N, out) += s * t @ B^T, in place
        else:
            out += torch.mm(t, lora_b.t()).mul_(scale).to(out.dtype)
        ctx.save_for_backward(a_in, t, lora_a, lora_b)
        ctx.shared, ctx.scale, ctx.base_layer, ctx.four_bit = shared, scale, base_layer, four_bit
        return out

    @staticmethod
    def backward(ctx, g):
        a_in, t, lora_a, lora_b = ctx.saved_tensors
        need_x, need_xa, need_a, need_b = ctx.needs_input_grad[:4]
        scale = ctx.scale
        g_a = g if g.dtype == t.dtype else g.to(t.dtype)  # (N, out) in the adapter's compute dtype
        u = g_a @ lora_b  # (N, r)
        grad_b = torch.mm(g_a.t(), t).mul_(scale) if need_b else None  # (out, r)
        grad_a = torch.mm(u.t(), a_in).mul_(scale) if need_a else None  # (r, in)
        grad_x = grad_xa = None
        if need_x or (ctx.shared and need_xa):
            weight = _base_weight(ctx.base_layer, g.dtype, ctx.four_bit)  # (out, in), dequantized again
            grad_x = g @ weight  # (N, in)
            del weight
            if ctx.shared and grad_x.dtype == u.dtype:
                grad_x.addmm_(u, lora_a, alpha=scale)  # + s * u @ A
            elif ctx.shared:
                grad_x += torch.mm(u, lora_a).mul_(scale).to(grad_x.dtype)
        if not ctx.shared and need_xa:
            grad_xa = torch.mm(u, lora_a).mul_(scale)  # (N, in)
        return grad_x, grad_xa, grad_a, grad_b, None, None, None


def fused_adapter_linear(base_layer: nn.Module, x: torch.Tensor, adapter_input: torch.Tensor | None,
                         lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``base_layer(x) + scale * lora_b @ lora_a @ adapter_input`` in one autograd node.

    The same result as the plain path of :class:`qolora.adapters.layer.AdapterLinear` (up to the order of the
    adapter's additions), with the same dtypes: the base runs in its compute dtype (``Linear4bit``'s
    ``compute_dtype``, or autocast's for ``nn.Linear``), the adapter in autocast's dtype when autocast
    is on, else in the factors' dtype; the output dtype is the base layer's own (see Returns).

    Args:
        base_layer: a frozen ``nn.Linear`` or bitsandbytes ``Linear4bit`` (``unsupported_reason`` is None).
        x: ``(..., in)`` the layer's input.
        adapter_input: ``(..., in)`` the adapter's input when it differs from ``x`` (dropout), else None.
        lora_a: ``(r, in)``; lora_b: ``(out, r)``: the trainable factors.
        scale: the adapter's scaling ``s``.

    Returns:
        ``(..., out)``: in ``x``'s dtype on a 4-bit base (``Linear4bit`` casts back), in the base's
        compute dtype on an ``nn.Linear`` (as ``F.linear`` under autocast gives it).
    """
    lead = x.shape[:-1]
    device_type = x.device.type
    four_bit = quantization_kind(base_layer.weight) == "4bit"
    base_dtype = _base_compute_dtype(base_layer, x, four_bit)
    adapter_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else lora_a.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(base_dtype)  # (N, in): no copy when already flat and in dtype
    if adapter_input is None and adapter_dtype != base_dtype:
        adapter_input = x  # the adapter needs its own cast of the input
    xa2 = None if adapter_input is None else adapter_input.reshape(-1, x.shape[-1]).to(adapter_dtype)
    with torch.autocast(device_type, enabled=False):
        out = _FusedAdapterLinear.apply(x2, xa2, lora_a.to(adapter_dtype), lora_b.to(adapter_dtype), float(scale),
                                        base_layer, four_bit)  # (N, out)
    out_dtype = x.dtype if four_bit else base_dtype
    return out.reshape(*lead, out.shape[-1]).to(out_dtype)
