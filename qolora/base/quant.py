"""The bridge to bitsandbytes: build quantized base layers, dequantize them, detect them.

Everything backend-specific lives here so the adapter layer and the loader never branch on
bitsandbytes internals:

* :func:`make_base_layer` turns a full-precision weight (already the OLoRA residual, fp32, on the
  compute device) into the frozen base layer: ``nn.Linear`` (bits=16), ``Linear4bit`` or
  ``Linear8bitLt``, quantized once, on that device.
* On the CPU a 4-bit weight is quantized in slices of :data:`QUANT_SLICE_ELEMENTS` (whole blocks), the
  same bytes as one call: bitsandbytes' CPU kernel makes temporaries of ~2.5x its fp32 input, which
  made the quantization of the largest weight prepare's memory peak. :func:`quantization_error` measures
  ``||W - deq(q(W))||`` slice by slice for the same reason (no full dequantized copy).
* :func:`dequantize_weight` gives back the weight a base layer actually computes with, fp32.
* :func:`quantize_dequantize` is the two together on a temporary layer: what a weight would become as
  a base layer (used by the quantization-aware refinement, ``refine=K``).
* :func:`quantization_kind` detects 4/8-bit parameters by class name (``Params4bit`` /
  ``Int8Params``), never by dtype: with ``quant_storage=bf16`` a packed 4-bit weight *is* bf16.

bitsandbytes is imported lazily: a bits=16 model needs none of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import AdapterConfig
from .bnb_cpu_fix import ensure_cpu_dequantize_correct

__all__ = ["make_base_layer", "dequantize_weight", "quantization_error", "quantize_dequantize", "dequantize_stored",
           "stored_group_complete", "stored_part", "quantization_kind", "quant_settings"]


QUANT_SLICE_ELEMENTS = 1 << 20  # 4 MiB of fp32 per slice: bitsandbytes' CPU temporaries stay ~10 MiB


def _bnb():
    import bitsandbytes as bnb  # optional at import time

    ensure_cpu_dequantize_correct()  # once per process: a wrong CPU kernel is replaced before any weight is made
    return bnb


def quantization_kind(param: torch.Tensor) -> str | None:
    """``"4bit"``, ``"8bit"`` or ``None`` for a parameter, by class (robust to quant_storage)."""
    name = type(param).__name__
    if name == "Params4bit":
        return "4bit"
    if name == "Int8Params":
        return "8bit"
    return None


def make_base_layer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: AdapterConfig,
    device: torch.device,
) -> nn.Module:
    """Build the frozen base layer for ``weight`` (out, in) as ``config.bits`` asks, on ``device``.

    The weight is quantized exactly once here. ``weight`` may be consumed (freed) by the caller
    afterwards; the layer owns its quantized copy.
    """
    out_features, in_features = weight.shape
    dtype = config.torch_dtype
    bias_param = None if bias is None else nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    if config.bits == 16:
        layer = nn.Linear(in_features, out_features, bias=False, device="meta")
        layer.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    elif config.bits == 4:
        bnb = _bnb()
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False,
            compute_dtype=config.torch_compute_dtype,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            quant_storage=config.torch_quant_storage,
            device="meta",
        )
        param = bnb.nn.Params4bit(
            weight.to(device=device, dtype=torch.float32), requires_grad=False,
            blocksize=config.blocksize, compress_statistics=config.double_quant,
            quant_type=config.quant_type, quant_storage=config.torch_quant_storage, module=layer,
        )
        if torch.device(device).type == "cpu":
            param.data, param.quant_state = _quantize_4bit_sliced(param.data, config)
            layer.quant_state, param.bnb_quantized = param.quant_state, True  # as Params4bit._quantize
            layer.weight = param
        else:
            layer.weight = param._quantize(device)
        # Quantized from fp32 (no bf16 rounding first); dequantize straight into the compute dtype.
        layer.weight.quant_state.dtype = config.torch_compute_dtype
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time it
        # runs in eval mode, with bf16 statistics: eval would then compute with other weights than
        # training. Keep one numerics for train, eval, export and merge.
        layer.support_avx512bf16_for_cpu = False
    elif config.bits == 8:
        bnb = _bnb()
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=False, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        param = bnb.nn.Int8Params(weight.to(dtype=torch.float16), requires_grad=False, has_fp16_weights=False)
        layer.weight = param._quantize(device)
    else:  # pragma: no cover - validated earlier
        raise ValueError(f"bits={config.bits}")
    layer.bias = bias_param
    layer.requires_grad_(False)
    return layer


def _quantize_4bit_sliced(weight: torch.Tensor, config: AdapterConfig):
    """``bitsandbytes.functional.quantize_4bit`` of a CPU fp32 weight, slice by slice of whole blocks.

    4-bit blocks run along the flattened weight, so slices of a multiple of ``blocksize`` elements give
    the same packed bytes and absmax as one call; double quantization then runs once on the whole absmax,
    as bitsandbytes does it. Returns ``(packed (bytes, 1) in quant_storage, QuantState)``.
    """
    functional = _bnb().functional
    weight = weight.contiguous()
    n, blocksize = weight.numel(), config.blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    for rows in _row_slices(weight.shape, blocksize):
        start = rows.start * weight.shape[1]
        out, part_absmax = torch.ops.bitsandbytes.quantize_4bit.default(weight[rows], blocksize, config.quant_type,
                                                                        torch.uint8)
        packed[start // 2:start // 2 + out.numel()] = out.reshape(-1)
        absmax[start // blocksize:start // blocksize + part_absmax.numel()] = part_absmax
    storage = config.torch_quant_storage
    packed = packed[:(n + 1) // (storage.itemsize * 2) * storage.itemsize].view(storage).reshape(-1, 1)
    code = functional.get_4bit_type(config.quant_type, device=weight.device)
    common = dict(shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code, quant_type=config.quant_type)
    if config.double_quant:
        offset = absmax.mean()
        qabsmax, state2 = functional.quantize_blockwise(absmax - offset, blocksize=256)
        return packed, functional.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)
    return packed, functional.QuantState(absmax=absmax, **common)


def _row_slices(shape, blocksize: int) -> list[slice]:
    """Row ranges of about :data:`QUANT_SLICE_ELEMENTS` elements, each starting on a whole 4-bit block (and byte)."""
    out_f, in_f = shape
    unit = blocksize // math.gcd(in_f, blocksize)  # rows per whole number of blocks
    step = max(1, QUANT_SLICE_ELEMENTS // (in_f * unit)) * unit
    return [slice(r, min(r + step, out_f)) for r in range(0, out_f, step)]


def quantization_error(layer: nn.Module, weight: torch.Tensor) -> float:
    """``||weight - W_layer||`` (Frobenius), ``W_layer`` what the base layer computes with (fp32).

    A CPU 4-bit layer is dequantized slice by slice (no full fp32 copy); otherwise the whole weight
    is dequantized once.
    """
    param = layer.weight
    state = getattr(param, "quant_state", None)
    if (quantization_kind(param) != "4bit" or param.device.type != "cpu"
            or getattr(state, "packing_format_for_cpu", False)):
        restored = dequantize_weight(layer)
        if quantization_kind(param) is not None:  # a fresh tensor: subtract in place, no temporary
            return float(torch.linalg.norm(restored.sub_(weight)))
        return float(torch.linalg.norm(weight - restored))  # a 16-bit base may share its storage with ``weight``
    functional = _bnb().functional
    absmax = state.absmax
    if state.nested:
        absmax = functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float()
    packed = param.data.reshape(-1).view(torch.uint8)
    blocksize = state.blocksize
    squares = torch.zeros((), dtype=torch.float64)
    for rows in _row_slices(weight.shape, blocksize):
        part = weight[rows]  # (rows, in): the kernel reads blocks as the whole weight's only in 2-D
        start, end = rows.start * weight.shape[1], rows.stop * weight.shape[1]
        restored = torch.ops.bitsandbytes.dequantize_4bit.default(
            packed[start // 2:(end + 1) // 2].reshape(-1, 1), absmax[start // blocksize:-(-end // blocksize)],
            blocksize, state.quant_type, list(part.shape), state.dtype).to(torch.float32)  # as the layer computes
        squares += torch.linalg.vector_norm(restored.sub_(part), dtype=torch.float64).square()
    return float(squares.sqrt())


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight (out, in) that ``layer`` computes with, on the layer's device."""
    weight = layer.weight
    if weight.numel() and weight.untyped_storage().nbytes() == 0:
        raise RuntimeError("this base layer's weight is offloaded to host memory (qolora.memory.base_streaming); "
                           "read it inside model.qolora.offload.fetched()")
    kind = quantization_kind(weight)
    if kind is None:
        return weight.detach().to(torch.float32)
    bnb = _bnb()
    if kind == "4bit":
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "this 4-bit weight was repacked by bitsandbytes' CPU inference path; "
                "set layer.support_avx512bf16_for_cpu = False before running it"
            )
        return bnb.functional.dequantize_4bit(weight.data, state).to(torch.float32)
    # 8-bit row-wise: W = CB * SCB / 127. After a forward pass bitsandbytes keeps the statistics
    # on ``layer.state`` instead of the parameter.
    state = getattr(layer, "state", None)
    cb = next(t for t in (weight.CB, getattr(state, "CB", None), weight.data) if t is not None)
    scb = weight.SCB if weight.SCB is not None else state.SCB
    return cb.to(torch.float32) * (scb.to(torch.float32)[:, None] / 127.0)


def quantize_dequantize(weight: torch.Tensor, config: AdapterConfig) -> torch.Tensor:
    """``deq(q(weight))``: the fp32 weight (out, in) a base layer built from ``weight`` would compute with.

    Quantizes exactly as :func:`make_base_layer` (same settings, same device as ``weight``), so the
    result equals ``dequantize_weight(make_base_layer(weight, ...))`` bit for bit; the quantized copy
    is temporary. ``weight`` is not modified.
    """
    layer = make_base_layer(weight, None, config, weight.device)
    out = dequantize_weight(layer)
    if quantization_kind(layer.weight) is None and out.data_ptr() == weight.data_ptr():
        out = out.clone()  # a 16-bit fp32 base may share the input's storage
    return out


def quant_settings(layer: nn.Module) -> dict:
    """The quantization settings of a base layer, to record next to a saved adapter."""
    weight = layer.weight
    kind = quantization_kind(weight)
    if kind == "4bit":
        return {
            "bits": 4,
            "quant_type": weight.quant_type,
            "blocksize": weight.blocksize,
            "double_quant": bool(weight.compress_statistics),
            "quant_storage": str(weight.quant_storage).removeprefix("torch."),
            "compute_dtype": str(layer.compute_dtype).removeprefix("torch."),
        }
    if kind == "8bit":
        return {"bits": 8, "threshold": float(layer.state.threshold)}
    return {"bits": 16, "dtype": str(weight.dtype).removeprefix("torch.")}


# ------------------------------------------------------------------ checkpoints stored quantized
# A bitsandbytes checkpoint saved by transformers stores, per linear layer ``X``:
#   4-bit: X.weight (packed), X.weight.absmax, X.weight.quant_map, X.weight.quant_state.bitsandbytes__nf4
#          (+ X.weight.nested_absmax, X.weight.nested_quant_map with double quantization)
#   8-bit: X.weight (int8), X.SCB, X.weight_format


def stored_part(name: str, layers) -> tuple[str, str] | None:
    """``("X", "weight.absmax")`` for a stored part of linear layer ``X`` (one of ``layers``), else None."""
    head, _, leaf = name.rpartition(".")
    if leaf == "weight" and head in layers:
        return head, "weight"
    for marker in (".weight.", ".SCB", ".weight_format"):
        head, sep, tail = name.partition(marker)
        if sep and head in layers:
            return head, sep.lstrip(".") + tail
    return None


def _stored_4bit_state_key(components: dict) -> str | None:
    return next((k for k in components if k.startswith("weight.quant_state.")), None)


def _left_unquantized(components: dict[str, torch.Tensor]) -> bool:
    """A layer bitsandbytes skipped: one float (out, in) weight (a packed 4-bit one is (n, 1))."""
    weight = components["weight"]
    return len(components) == 1 and weight.is_floating_point() and weight.dim() == 2 and weight.shape[1] > 1


def stored_group_complete(components: dict[str, torch.Tensor]) -> bool:
    """Whether all stored parts of one quantized layer have been read."""
    if "weight" not in components:
        return False
    if "SCB" in components or _left_unquantized(components):
        return True
    state_key = _stored_4bit_state_key(components)
    if state_key is None:
        return False
    import json

    state = json.loads(bytes(components[state_key].tolist()).decode())
    needed = {"weight.absmax", "weight.quant_map"}
    if "nested_blocksize" in state:
        needed |= {"weight.nested_absmax", "weight.nested_quant_map"}
    return needed <= set(components)


def dequantize_stored(components: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The fp32 weight (out, in) of a layer stored quantized by bitsandbytes, on ``device``."""
    weight = components["weight"]
    if _left_unquantized(components):
        return weight.to(device, torch.float32)
    if "SCB" in components:  # 8-bit row-wise
        return weight.to(device, torch.float32) * (components["SCB"].to(device, torch.float32)[:, None] / 127.0)
    bnb = _bnb()
    stats = {k.removeprefix("weight."): v for k, v in components.items() if k.startswith("weight.")}
    state = bnb.functional.QuantState.from_dict(stats, device=device)
    return bnb.functional.dequantize_4bit(weight.to(device), state).to(torch.float32)
