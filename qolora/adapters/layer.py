"""One adapter wrapper for every base kind (``nn.Linear``, bitsandbytes 4-bit and 8-bit).

``AdapterLinear`` keeps the frozen base as ``base_layer`` and adds ``lora_A`` / ``lora_B``, so its
parameter names are PEFT's (``...q_proj.base_layer.weight``, ``...q_proj.lora_A.weight``)::

    y = base_layer(x) + s * lora_B(lora_A(dropout(x)))        # (..., out)

The base computes with its own (possibly quantized) weight; the adapter runs in ``adapter dtype``
(fp32 by default) and its output is cast back to the base's output dtype. That is the plain path
(PEFT's); when autograd records (training), a 4-bit or 16-bit base with ``kernels="auto"`` runs the
same sum as one fused autograd node instead (:mod:`qolora.adapters.kernels`: no ``(N, out)`` temporaries, no
casts of the input), falling back to the plain path, logged once, where that does not apply. Nothing here knows about
initialisation or checkpoints: the loader builds the base (:mod:`qolora.base.quant`) and hands over the
factors.

``fan_in_fan_out`` records that the checkpoint stores this weight transposed (GPT-2's ``Conv1D``):
the base here is always (out, in); exporters transpose back when they write.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..base.quant import dequantize_weight, quantization_kind
from .kernels import check_kernels, fused_adapter_linear, note_fallback, unsupported_reason

__all__ = ["AdapterLinear", "adapter_layers", "apply_kernels", "adapter_parameters", "adapter_state_dict",
           "mark_only_adapters_trainable", "replace_module", "set_kernels"]


class AdapterLinear(nn.Module):
    """A frozen base linear layer plus a trainable low-rank update ``s * B @ A``."""

    def __init__(
        self,
        base_layer: nn.Module,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        *,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype = torch.float32,
        fan_in_fan_out: bool = False,
        init_factors: tuple[torch.Tensor, torch.Tensor] | None = None,
        base_fingerprint: str | None = None,
    ):
        """Wrap ``base_layer`` with factors ``lora_a`` (r, in) and ``lora_b`` (out, r).

        Args:
            base_layer: the frozen base (``nn.Linear``, ``Linear4bit`` or ``Linear8bitLt``), (out, in).
            lora_a, lora_b: the trainable factors' starting values (copied).
            scale: ``s`` in ``y = base(x) + s * B @ A x``.
            dropout: dropout on the adapter's input.
            adapter_dtype: dtype of the trainable factors.
            fan_in_fan_out: the checkpoint stores this weight transposed (GPT-2 ``Conv1D``).
            init_factors: ``(A0, B0)`` subtracted from the base weight (OLoRA / PiSSA residual):
                needed to save, reload exactly and export. Copied to the CPU in fp32, so they never
                alias the trainable factors. None when the base is the weight itself (LoRA).
            base_fingerprint: :func:`qolora.base.reader.weight_fingerprint` of the checkpoint weight.
        """
        super().__init__()
        rank, in_features = lora_a.shape
        out_features = lora_b.shape[0]
        if lora_b.shape[1] != rank:
            raise ValueError(f"lora_b has shape {tuple(lora_b.shape)}, expected ({out_features}, {rank})")
        self.base_layer = base_layer
        self.lora_A = nn.Linear(in_features, rank, bias=False, device="meta")
        self.lora_B = nn.Linear(rank, out_features, bias=False, device="meta")
        self.lora_A.weight = nn.Parameter(lora_a.detach().to(adapter_dtype, copy=True).contiguous())
        self.lora_B.weight = nn.Parameter(lora_b.detach().to(adapter_dtype, copy=True).contiguous())
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = float(scale)
        self.rank = rank
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in_fan_out = fan_in_fan_out
        self.init_factors = None if init_factors is None else tuple(
            t.detach().to("cpu", torch.float32, copy=True) for t in init_factors)
        self.base_fingerprint = base_fingerprint
        self.merged = False
        self.kernels = "auto"  # qolora.adapters.kernels.KERNEL_CHOICES: "auto"/"compile": the fused training step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels != "off" and not self.merged and torch.is_grad_enabled():
            reason = unsupported_reason(self.base_layer)
            if reason is None:  # one autograd node for base + adapter (qolora.adapters.kernels)
                adapter_input = None if isinstance(self.lora_dropout, nn.Identity) else self.lora_dropout(x)
                return fused_adapter_linear(self.base_layer, x, adapter_input, self.lora_A.weight,
                                            self.lora_B.weight, self.scaling)
            note_fallback(f"fused adapter step not used ({reason}): plain path for these layers")
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        # In the adapter's dtype (fp32 by default); under autocast F.linear picks the autocast dtype.
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        delta = F.linear(F.linear(h, self.lora_A.weight), self.lora_B.weight)  # (..., r) -> (..., out)
        return result + (delta * self.scaling).to(result.dtype)

    # ------------------------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` in fp32, (out, in)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def merge(self) -> None:
        """Fold the adapter into an unquantized base (idempotent). Quantized bases cannot be merged in
        place without requantizing; use :func:`qolora.merge` to write a dequantized checkpoint."""
        if self.merged:
            return
        self._require_unquantized("merge")
        w = self.base_layer.weight
        w.data = (w.data.float() + self.delta_weight()).to(w.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge` (idempotent)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.data = (w.data.float() - self.delta_weight()).to(w.dtype)
        self.merged = False

    def _require_unquantized(self, what: str) -> None:
        kind = quantization_kind(self.base_layer.weight)
        if kind is not None:
            raise RuntimeError(
                f"cannot {what} an adapter into a {kind} base in place (it would requantize the weight); "
                "use qolora.merge(...) to write a dequantized full-precision checkpoint instead"
            )

    def effective_weight(self) -> torch.Tensor:
        """The fp32 weight this layer computes with: ``deq(W_res) + s * B @ A`` (out, in)."""
        w = dequantize_weight(self.base_layer)
        return w if self.merged else w + self.delta_weight()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, fan_in_fan_out={self.fan_in_fan_out}"


def set_kernels(model: nn.Module, kernels: str) -> None:
    """Choose the training step: ``"auto"`` (every adapter layer fused where it applies), ``"compile"``
    (the same, and the decoder layers' training forward compiled: :mod:`qolora.adapters.compiled_layers`) or
    ``"off"`` (the plain path, eager).

    Raises:
        ValueError: another ``kernels``, naming the choices.
    """
    apply_kernels(model, check_kernels(kernels))


def apply_kernels(model: nn.Module, kernels: str) -> None:
    """:func:`set_kernels` for a ``kernels`` already checked (``prepare``'s build options)."""
    from .compiled_layers import compile_decoder_layers, uncompile_decoder_layers

    for _, layer in adapter_layers(model):
        layer.kernels = kernels
    if kernels == "compile":
        compile_decoder_layers(model)
    else:
        uncompile_decoder_layers(model)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """``(name, layer)`` for every adapter layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The trainable adapter parameters (``lora_A`` / ``lora_B`` weights) with their names."""
    for name, layer in adapter_layers(model):
        yield f"{name}.lora_A.weight", layer.lora_A.weight
        yield f"{name}.lora_B.weight", layer.lora_B.weight


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, detached, keyed by their in-model names (``model.layers.0...lora_A.weight``)."""
    return {name: p.detach() for name, p in adapter_parameters(model)}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (where a linear layer becomes its wrapper)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze every parameter, then unfreeze exactly the adapter factors."""
    model.requires_grad_(False)
    for _, p in adapter_parameters(model):
        p.requires_grad_(True)
