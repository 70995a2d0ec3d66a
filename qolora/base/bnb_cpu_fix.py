"""A guard around bitsandbytes' CPU 4-bit dequantization, whose AVX-512 branch is wrong for some shapes.

bitsandbytes quantizes a 4-bit weight in blocks of ``blocksize`` elements over the *flattened* tensor.
Its native CPU kernel (``dequantizeBlockwise4bitCpu``, bitsandbytes 0.49-0.50 at least) has an AVX-512
branch that indexes the blocks *per row* instead (``absmax_dim_1 = n / blocksize``). Where a row's
length ``n`` is a multiple of ``blocksize`` the two agree; where it is not (a 64 x 32 weight with
blocks of 64, a 96-wide row), every element of a row is scaled by the wrong absmax. The scalar and
AVX2 paths are right, so the same code gives different models on different CPUs.

:func:`ensure_cpu_dequantize_correct` asks the installed kernel once per process, on a tiny weight
whose rows are half a block, whether it agrees with bitsandbytes' own pure-PyTorch reference. If it
does not, it registers a CPU kernel for ``bitsandbytes::dequantize_4bit`` that sends the affected
shapes (``n % blocksize != 0``) to that reference and the rest to the same native call as before,
and logs what it did once. Everything in bitsandbytes that dequantizes on the CPU (``Linear4bit``'s
forward, ``dequantize_4bit``) goes through that op, so the fix reaches every caller.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Sequence

import torch

__all__ = ["ensure_cpu_dequantize_correct", "cpu_dequantize_agrees"]

logger = logging.getLogger(__name__)

_checked: dict[str, bool] = {}  # "agrees" -> result of the probe, once per process


def _reference(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' pure-PyTorch 4-bit dequantization (blocks over the flattened tensor)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    A = A.view(torch.uint8) if A.dtype != torch.uint8 else A
    code = _get_4bit_code(quant_type, A.device)
    return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)


def _flat_blocks(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                 shape: Sequence[int]) -> torch.Tensor:
    """4-bit dequantization written out (fp32): two codes per byte, high nibble first, blocks over the
    flattened tensor. Plain tensor ops: the probe must not pay for the first call of bitsandbytes'
    ``torch.compile``-d reference."""
    from bitsandbytes.backends.utils import _get_4bit_code

    A = A.view(torch.uint8).reshape(-1)
    codes = torch.stack([(A >> 4).long(), (A & 0xF).long()], dim=-1).reshape(-1)[: math.prod(shape)]
    values = _get_4bit_code(quant_type, A.device)[codes]
    return (values * absmax.float().repeat_interleave(blocksize)[: values.numel()]).reshape(tuple(shape))


def cpu_dequantize_agrees() -> bool:
    """Whether the registered CPU ``dequantize_4bit`` equals the reference on rows shorter than a block."""
    import bitsandbytes.functional as F

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 32, generator=generator)  # rows of half a block: the shape the AVX-512 branch gets wrong
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    native = torch.ops.bitsandbytes.dequantize_4bit.default(packed, state.absmax, state.blocksize, state.quant_type,
                                                          tuple(state.shape), torch.float32)
    return torch.equal(native, _flat_blocks(packed, state.absmax, state.blocksize, state.quant_type, state.shape))


def _native_call(quant_type: str, dtype: torch.dtype):
    """The bitsandbytes native CPU entry point for this quant type and output dtype, or None."""
    from bitsandbytes.cextension import lib

    suffix = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    return None if suffix is None else getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{suffix}", None)


def _fixed_dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                           shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """CPU ``dequantize_4bit``: the reference where the native kernel is wrong, the native call elsewhere."""
    from bitsandbytes.functional import get_ptr

    n = shape[-1]
    native = _native_call(quant_type, dtype)
    if n % blocksize != 0 or n % 2 != 0 or native is None:
        return _reference(A, absmax, blocksize, quant_type, shape, dtype)
    A = A.view(torch.uint8) if A.dtype != torch.uint8 else A
    absmax = absmax.float() if absmax.dtype != torch.float32 else absmax
    m = math.prod(shape[:-1]) if len(shape) > 1 else 1
    A = A.reshape(m, n // 2).contiguous()
    out = torch.empty(tuple(shape), dtype=dtype, device=A.device)
    native(get_ptr(A), get_ptr(absmax.contiguous()), get_ptr(out), ctypes.c_longlong(blocksize),
           ctypes.c_longlong(m), ctypes.c_longlong(n))
    return out


def ensure_cpu_dequantize_correct() -> bool:
    """Probe bitsandbytes' CPU 4-bit dequantization once; register the fix if it is wrong.

    Returns:
        Whether the fix was registered (False when the installed kernel is right, or on a failed probe).
    """
    if "agrees" in _checked:
        return not _checked["agrees"]
    try:
        agrees = cpu_dequantize_agrees()
    except Exception as exc:  # noqa: BLE001 - a probe must never stop a run: bitsandbytes then decides as before
        logger.debug("could not probe bitsandbytes' CPU 4-bit dequantization: %s", exc)
        _checked["agrees"] = True
        return False
    _checked["agrees"] = agrees
    if agrees:
        return False
    import warnings

    with warnings.catch_warnings():  # torch warns that it overrides the registered kernel: that is the point
        warnings.simplefilter("ignore", UserWarning)
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", _fixed_dequantize_4bit)
    logger.warning("this CPU's bitsandbytes 4-bit dequantization (its AVX-512 branch) is wrong for weights whose "
                   "rows are not a multiple of the blocksize; qolora sends those through bitsandbytes' PyTorch "
                   "reference instead (other shapes keep the native kernel)")
    return True
