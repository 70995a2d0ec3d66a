"""An exact, device-independent count of the bytes torch tensors hold, for validating ``qolora.planning.plan``.

:class:`MemTracker` is a ``TorchDispatchMode``: every tensor an operator returns (forward, backward and
optimizer, all on the calling thread on the CPU) is looked up by its storage; a new storage adds its
size (a storage shared with an input is a view or an in-place result, not new memory), and a ``weakref.finalize``
on the storage subtracts it when the storage dies. ``peak`` is the
largest sum seen. Views share their base's storage and are counted once. Not seen: memory a kernel
allocates internally and frees before returning (e.g. workspaces), and memory outside torch.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MemTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage._cdata
                # A view of (or an in-place op on) a tensor that existed before tracking: not new memory.
                if key not in self.live and key not in inputs:
                    self.live[key] = storage.nbytes()
                    self.current += self.live[key]
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def model_bytes(model) -> int:
    """Bytes of a prepared model as stored: its parameters and buffers plus the bitsandbytes quantization
    statistics that hang off the quantized weights (absmax, codes, offset; an 8-bit weight's scales)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            tensors += [qs.absmax, qs.code, getattr(qs, "offset", None)]
            if qs.state2 is not None:
                tensors += [qs.state2.absmax, qs.state2.code]
        if w is not None and getattr(w, "SCB", None) is not None:
            tensors += [w.SCB]
    return storage_bytes(tensors)
