"""Streaming the frozen base from host memory: decoder layers reach the device one at a time.

The quantized base of a QLoRA model is only ever read, so it need not live on the GPU. For each
*offloaded* decoder layer, :class:`OffloadedLayers` keeps a master copy of the layer's frozen storage
(the packed 4-bit weights and their quantization statistics ``absmax`` / nested ``absmax`` / codes /
offset, 8-bit ``CB`` / ``SCB``, norms, biases, buffers) in host memory (pinned on CUDA), and gives
the device copy back whenever the layer is not computing::

    forward   pre-hook(i):   fetch i (wait for its prefetch) ; prefetch the next offloaded layer on a side stream
              post-hook(i):  release i ; if the output needs a gradient, hook it (the backward entry of i)
    backward  entry(i):      release the layers above i (their backward is done) ; fetch i ; prefetch the one below
              end of pass:   release whatever is still fetched (a callback queued on the autograd engine)

At most two offloaded layers are on the device at any time (the one computing and the one in flight).
The adapters (``lora_A`` / ``lora_B``), their gradients and optimizer states never move.

**How a layer moves.** The device tensors are never replaced: each storage is resized to zero bytes to
release it and resized back, then filled from the host master, to fetch it (what FSDP does with its
flat parameters). Every alias of the storage follows: views, the ``quant_state`` objects, and the
references bitsandbytes' ``MatMul4Bit`` keeps on its autograd context (``ctx.tensors = (None, B)``,
``ctx.state``: plain attributes, not saved tensors, so ``saved_tensors_hooks`` cannot see them). The
copy goes through a separate ``uint8`` view, so the parameters' version counters do not change and
autograd accepts the refilled weights. A storage also used outside its layer (bitsandbytes' shared
``dynamic`` code table, cross-layer ties) stays resident. Reading a released tensor is invalid (on the
CPU it may crash the process); :meth:`OffloadedLayers.fetched` makes layers resident for a moment.

**Why an output-gradient hook, not module backward hooks.** Training needs the weights during the
backward pass with or without gradient checkpointing: bitsandbytes dequantizes the weight again to
compute the input gradient, and a checkpointed layer recomputes its forward. transformers 5 checkpoints
``forward`` inside ``__call__``, so module pre-hooks do *not* run for the recompute; and
``register_full_backward_hook`` runs too early on a layer whose input needs no gradient (layer 0 of a
frozen embedding: torch calls it as soon as the output gradient exists, before the layer's backward).
A hook on the layer's output tensor runs before any node of the layer (so before its recompute), and
the backward entry of layer ``i`` proves the layers above it are done: their nodes produce the gradient
it waits for. Both training modes are therefore supported; the final release is queued on the engine.

**On the CPU** "host" and "device" are the same memory; fetch and release are still real (a storage
freed and refilled by a copy), and every counter (:class:`OffloadStats`) and the event trace are kept,
so the tests run the whole mechanism. On CUDA the prefetch copies on a side stream from pinned memory;
the device memory is allocated on the compute stream, which waits for the copy's event before use.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import parse_size
from ..errors import ConfigError

__all__ = ["OFFLOAD_CHOICES", "OffloadStats", "OffloadedLayers", "LayerOffload",
           "decoder_layers", "spread", "check_offload"]

logger = logging.getLogger(__name__)

OFFLOAD_CHOICES = ("auto", "cpu")  # and None / "none": everything resident


def check_offload(offload: str | None) -> str | None:
    """``offload`` normalised (``"none"`` -> None).

    Raises:
        ConfigError: not one of None, ``"none"``, ``"auto"``, ``"cpu"``.
    """
    if offload is None or offload == "none":
        return None
    if offload not in OFFLOAD_CHOICES:
        raise ConfigError(f"offload={offload!r} is not supported; allowed: None/'none' (all on the device), 'auto' "
                          "(only as many decoder layers as needed to fit the GPU), 'cpu' (every decoder layer)")
    return offload


def check_gpu_memory(gpu_memory: int | str | None, offload: str | None) -> int | None:
    """``gpu_memory`` in bytes (None stays None), given with a normalised ``offload``.

    Raises:
        ConfigError: not a positive size, or given without ``offload="auto"`` (the only option that uses it).
    """
    if gpu_memory is None:
        return None
    size = parse_size(gpu_memory, "gpu_memory (--gpu-memory)")
    if offload != "auto":
        raise ConfigError(f"gpu_memory={gpu_memory!r} (--gpu-memory) is used only with offload='auto' "
                          f"(--offload auto), to choose how many layers to offload; offload is {offload!r}. Add "
                          "--offload auto, or drop --gpu-memory")
    return size


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, modules)`` of the model's decoder layers: the ``nn.ModuleList`` holding the most parameters.

    Works on the ``meta`` skeleton too (counts elements, reads nothing).

    Raises:
        ConfigError: the model has no ``nn.ModuleList`` of layers.
    """
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no list of decoder layers (nn.ModuleList) to offload")
    return best


def spread(num_layers: int, count: int) -> list[int]:
    """``count`` layer indices spread evenly over ``num_layers`` (all of them when ``count >= num_layers``).

    Spread rather than the last ``count``: each offloaded layer's copy then overlaps with the compute of
    the resident layers before it, and the copy engine is never asked for two layers back to back.
    """
    count = max(0, min(count, num_layers))
    return sorted({int((k + 0.5) * num_layers / count) for k in range(count)}) if count else []


# ------------------------------------------------------------------------------------- storage
def _frozen_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor of a layer but its adapters: parameters, buffers, and bitsandbytes' side tensors."""
    adapters = _adapter_ids(module)
    for p in module.parameters():
        if id(p) not in adapters:
            yield p
            yield from _quant_tensors(p)
    yield from module.buffers()
    for m in module.modules():
        state = getattr(m, "state", None)  # Linear8bitLt keeps CB / SCB here after a forward pass
        for attr in ("CB", "SCB"):
            t = getattr(state, attr, None)
            if isinstance(t, torch.Tensor):
                yield t
        qs = getattr(m, "quant_state", None)
        if qs is not None and not isinstance(qs, torch.Tensor):
            yield from _state_tensors(qs)


def _adapter_ids(module: nn.Module) -> set[int]:
    from ..adapters.layer import AdapterLinear

    return {id(p) for m in module.modules() if isinstance(m, AdapterLinear)
            for p in (m.lora_A.weight, m.lora_B.weight)}


def _tensor_attrs(obj, names: tuple[str, ...]) -> Iterator[torch.Tensor]:
    """The attributes ``names`` of ``obj`` that are tensors."""
    for attr in names:
        t = getattr(obj, attr, None)
        if isinstance(t, torch.Tensor):
            yield t


def _quant_tensors(p: torch.Tensor) -> Iterator[torch.Tensor]:
    """An 8-bit parameter's ``CB`` / ``SCB``, and a 4-bit one's quantization-state tensors."""
    yield from _tensor_attrs(p, ("CB", "SCB"))
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        yield from _state_tensors(qs)


def _state_tensors(qs) -> Iterator[torch.Tensor]:
    """A bitsandbytes QuantState's ``absmax`` / ``code`` / ``offset``, and its nested state's."""
    yield from _tensor_attrs(qs, ("absmax", "code", "offset"))
    state2 = getattr(qs, "state2", None)
    if state2 is not None:
        yield from _state_tensors(state2)


def _key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage, stable while the storage is resized (the StorageImpl pointer)."""
    return t.untyped_storage()._cdata


def _global_keys() -> set[int]:
    """Storages bitsandbytes shares between layers (its cached quantization maps): never offloaded."""
    try:
        import sys

        functional = sys.modules.get("bitsandbytes.functional")
        maps = getattr(functional, "name2qmap", {}) if functional is not None else {}
        return {_key(t) for t in maps.values() if isinstance(t, torch.Tensor)}
    except Exception:  # noqa: BLE001  # pragma: no cover - defensive: an internal that moved
        return set()


@dataclass
class _Block:
    """One storage of an offloaded layer: the device storage (resized to 0 when released) and its host master."""

    storage: torch.UntypedStorage
    nbytes: int
    master: torch.Tensor  # uint8 (nbytes,) on the host

    def device_view(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8, device=self.storage.device).set_(self.storage, 0, (self.nbytes,), (1,))


@dataclass
class _Layer:
    index: int
    module: nn.Module
    blocks: list[_Block] = field(default_factory=list)
    state: str = "device"  # "device" | "host" | "in_flight"
    event: object = None  # the CUDA event of a prefetch in flight

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)


@dataclass
class OffloadStats:
    """Counters of the streamer (cumulative; :meth:`OffloadedLayers.reset_stats` zeroes them).

    Attributes:
        fetches: layers made resident for compute (a prefetch counts when it is waited for).
        prefetches: copies started ahead of use (side stream on CUDA).
        releases: device copies freed.
        bytes_copied: host -> device bytes.
        fetch_counts: per layer index, its fetches.
        max_in_flight: the most offloaded layers resident at once.
    """

    fetches: int = 0
    prefetches: int = 0
    releases: int = 0
    bytes_copied: int = 0
    fetch_counts: dict = field(default_factory=lambda: collections.Counter())
    max_in_flight: int = 0

    def to_dict(self) -> dict:
        return {"fetches": self.fetches, "prefetches": self.prefetches, "releases": self.releases,
                "bytes_copied": self.bytes_copied, "fetch_counts": dict(self.fetch_counts),
                "max_in_flight": self.max_in_flight}


# ------------------------------------------------------------------------------------ streamer
class OffloadedLayers:
    """Keeps the frozen base of some decoder layers in host memory and streams it in with hooks.

    Args:
        model: the model (its decoder layers are found by :func:`decoder_layers`).
        offloaded: indices of the layers to offload (the others stay resident but still prefetch).
        device: the compute device (default: where the model's parameters are, or will be).
        pin_memory: pin the host masters (default: when ``device`` is CUDA).
        trace_size: how many ``(event, layer, phase)`` entries :attr:`trace` keeps.

    Use :meth:`offload` per layer (``prepare`` does it as each layer finishes building), then
    :meth:`install` once; :meth:`remove` makes everything resident again and drops the hooks.
    """

    def __init__(self, model: nn.Module, offloaded: Iterable[int], device: torch.device | str | None = None, *,
                 pin_memory: bool | None = None, trace_size: int = 4096):
        self.layers_name, layers = decoder_layers(model)
        self.model = model
        self.num_layers = len(layers)
        self.offloaded = sorted(set(int(i) for i in offloaded))
        bad = [i for i in self.offloaded if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"offloaded layer indices {bad} are outside 0..{self.num_layers - 1}")
        self.device = torch.device(device) if device is not None else None
        self._pin = pin_memory
        self._layers = {i: _Layer(i, layers[i]) for i in self.offloaded}
        self._modules = list(layers)
        self._handles: list = []
        self._stream = None
        self._phase_task: int | None = None  # the autograd graph task whose backward we are streaming
        self.stats = OffloadStats()
        self.trace: collections.deque = collections.deque(maxlen=trace_size)
        self.resident_skipped_bytes = 0  # frozen bytes of offloaded layers that had to stay (shared / fixed)

    # ---------------------------------------------------------------------------- properties
    @property
    def host_bytes(self) -> int:
        """Bytes of the host masters."""
        return sum(layer.nbytes for layer in self._layers.values())

    @property
    def layer_bytes(self) -> dict[int, int]:
        """Frozen bytes streamed per offloaded layer."""
        return {i: layer.nbytes for i, layer in self._layers.items()}

    def is_resident(self, index: int) -> bool:
        """Whether layer ``index``'s base is on the device now (always True for a resident layer)."""
        layer = self._layers.get(index)
        return layer is None or layer.state != "host"

    def reset_stats(self) -> None:
        self.stats = OffloadStats()
        self.trace.clear()

    # ------------------------------------------------------------------------- moving layers
    def offload(self, index: int) -> int:
        """Copy layer ``index``'s frozen storages to host masters and free them on the device; the bytes moved.

        Storages of the adapters or known to be shared (bitsandbytes' cached code tables)
        stay; so do storages that cannot be resized (e.g. memory-mapped), counted in
        :attr:`resident_skipped_bytes`. Calling it again for the same layer does nothing.
        """
        layer = self._layers[index]
        if layer.blocks:
            return 0
        if self.device is None:
            self.device = _first_device(layer.module)
        adapters = _adapter_ids(layer.module)
        skip = {_key(p) for p in layer.module.parameters() if id(p) in adapters} | _global_keys()
        seen: set[int] = set()
        for t in _frozen_tensors(layer.module):
            if t.device.type == "meta" or t.numel() == 0:
                continue
            key = _key(t)
            if key in seen or key in skip:
                continue
            seen.add(key)
            storage = t.untyped_storage()
            if not storage.resizable():
                self.resident_skipped_bytes += storage.nbytes()
                continue
            nbytes = storage.nbytes()
            master = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pinned(storage.device))
            block = _Block(storage, nbytes, master)
            master.copy_(block.device_view())
            layer.blocks.append(block)
        if layer.state == "device":
            self._free(layer)
        self.trace.append(("offload", index, "build"))
        return layer.nbytes

    def install(self) -> OffloadedLayers:
        """Offload every chosen layer not offloaded yet, check no offloaded storage is shared, add the hooks."""
        for i in self.offloaded:
            self.offload(i)
        self._unshare()
        if self.device is not None and self.device.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        if not self._handles:
            for i, module in enumerate(self._modules):
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(i)))
                self._handles.append(module.register_forward_hook(self._make_post_hook(i)))
        logger.info("offloading %d of %d decoder layers: %.2f GiB of frozen base in %s host memory",
                    len(self.offloaded), self.num_layers, self.host_bytes / 2**30,
                    "pinned" if self._pinned(self.device) else "ordinary")
        return self

    def remove(self) -> None:
        """Make every layer resident again, drop the host masters and the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self._layers.values():
            self._fetch(layer, count=False)
            layer.blocks.clear()
        self._layers.clear()
        self.offloaded = []

    def fetch(self, index: int) -> None:
        """Make layer ``index`` resident (waiting for its prefetch, if one is in flight)."""
        layer = self._layers.get(index)
        if layer is not None:
            self._fetch(layer)

    def prefetch(self, index: int | None) -> None:
        """Start copying layer ``index`` in (asynchronously on CUDA); nothing when resident or in flight."""
        layer = self._layers.get(index) if index is not None else None
        if layer is None or layer.state != "host":
            return
        self._copy_in(layer, asynchronous=True)
        layer.state = "in_flight"
        self.stats.prefetches += 1
        self._note_in_flight()
        self.trace.append(("prefetch", index, self._phase()))

    def release(self, index: int) -> None:
        """Free layer ``index``'s device copy (its host master stays)."""
        layer = self._layers.get(index)
        if layer is None or layer.state == "host":
            return
        if layer.state == "in_flight" and layer.event is not None:
            torch.cuda.current_stream(self.device).wait_event(layer.event)
        self._free(layer)
        self.stats.releases += 1
        self.trace.append(("release", index, self._phase()))

    def release_all(self) -> None:
        for i in self.offloaded:
            self.release(i)

    @contextlib.contextmanager
    def fetched(self, indices: Iterable[int] | None = None) -> Iterator[None]:
        """Keep layers (default: all) resident inside the block, to read their weights outside a forward pass."""
        indices = list(self.offloaded if indices is None else indices)
        for i in indices:
            self.fetch(i)
        try:
            yield
        finally:
            for i in indices:
                self.release(i)

    # --------------------------------------------------------------------------------- hooks
    def _make_pre_hook(self, index: int):
        def pre_hook(module, args):
            if _in_backward():  # a recompute that runs module hooks (older checkpointing): weights are in
                self.fetch(index)
                return None
            self.fetch(index)
            self.prefetch(self._next(index, +1))
            return None

        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(module, args, output):
            if _in_backward():
                return None
            out = output if isinstance(output, torch.Tensor) else next(
                (o for o in (output if isinstance(output, (tuple, list)) else ()) if isinstance(o, torch.Tensor)), None)
            if torch.is_grad_enabled() and out is not None and out.requires_grad:
                out.register_hook(self._make_backward_entry(index))
            self.release(index)
            return None

        return post_hook

    def _make_backward_entry(self, index: int):
        def entry(grad):
            task = torch._C._current_graph_task_id()
            if self._phase_task != task:
                self._phase_task = task
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            for i in self.offloaded:  # the layers above are done: their nodes made this gradient
                if i > index:
                    self.release(i)
            self.fetch(index)
            self.prefetch(self._next(index, -1))
            return None

        return entry

    def _end_of_backward(self) -> None:
        self.release_all()
        self._phase_task = None

    def _next(self, index: int, direction: int) -> int | None:
        """The nearest offloaded layer after ``index`` in the direction of travel, if any."""
        candidates = [i for i in self.offloaded if (i - index) * direction > 0]
        if not candidates:
            return None
        return min(candidates) if direction > 0 else max(candidates)

    # ------------------------------------------------------------------------------ internals
    def _phase(self) -> str:
        return "backward" if _in_backward() else "forward"

    def _pinned(self, device) -> bool:
        if self._pin is not None:
            return self._pin
        return device is not None and torch.device(device).type == "cuda"

    def _fetch(self, layer: _Layer, count: bool = True) -> None:
        if layer.state == "device":
            return
        if layer.state == "in_flight":
            if layer.event is not None:
                torch.cuda.current_stream(self.device).wait_event(layer.event)
                layer.event = None
        else:
            self._copy_in(layer, asynchronous=False)
        layer.state = "device"
        if count:
            self.stats.fetches += 1
            self.stats.fetch_counts[layer.index] += 1
            self._note_in_flight()
            self.trace.append(("fetch", layer.index, self._phase()))

    def _copy_in(self, layer: _Layer, asynchronous: bool) -> None:
        # Allocate on the compute stream (so the memory is ordered with the kernels that used it last) ...
        for block in layer.blocks:
            block.storage.resize_(block.nbytes)
        cuda = block_device_is_cuda(layer)
        if cuda and asynchronous:
            # ... and copy on the side stream once the compute stream has reached this point.
            compute = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(compute)
            with torch.cuda.stream(self._stream):
                for block in layer.blocks:
                    block.device_view().copy_(block.master, non_blocking=True)
                layer.event = self._stream.record_event()
        else:
            for block in layer.blocks:
                block.device_view().copy_(block.master, non_blocking=cuda)
        self.stats.bytes_copied += layer.nbytes

    def _free(self, layer: _Layer) -> None:
        for block in layer.blocks:
            block.storage.resize_(0)
        layer.state = "host"
        layer.event = None

    def _note_in_flight(self) -> None:
        n = sum(1 for layer in self._layers.values() if layer.state != "host")
        self.stats.max_in_flight = max(self.stats.max_in_flight, n)

    def _unshare(self) -> None:
        """Bring back (and stop streaming) any offloaded storage that something outside its layer also uses."""
        owners: dict[int, set] = collections.defaultdict(set)
        layer_tensor_keys = {i: {_key(t) for t in _frozen_tensors(m) if t.device.type != "meta"}
                             for i, m in enumerate(self._modules)}
        for i, keys in layer_tensor_keys.items():
            for k in keys:
                owners[k].add(i)
        inside = ({id(p) for m in self._modules for p in m.parameters()}
                  | {id(b) for m in self._modules for b in m.buffers()})
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if id(t) not in inside and t.device.type != "meta":
                owners[_key(t)].add("outside")
        for i, layer in self._layers.items():
            kept = []
            for block in layer.blocks:
                if owners.get(block.storage._cdata, {i}) - {i}:
                    if layer.state == "host":
                        block.storage.resize_(block.nbytes)
                        block.device_view().copy_(block.master)
                    self.resident_skipped_bytes += block.nbytes
                else:
                    kept.append(block)
            layer.blocks = kept


def block_device_is_cuda(layer: _Layer) -> bool:
    return bool(layer.blocks) and layer.blocks[0].storage.device.type == "cuda"


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _first_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------ build seam
class LayerOffload:
    """The device-placement policy for base layers that :func:`qolora.model.prepare.build_model` calls.

    ``build_model`` calls :meth:`begin` with the ``meta`` skeleton, :meth:`loaded` with every module or
    tensor name it materialises, and :meth:`end` with the finished model. As soon as all of a decoder
    layer's tensors are in, the layer's frozen base goes to host memory, so building a model never holds
    more than the layers still being filled (about one: checkpoints are stored layer by layer) plus the
    resident part on the device.

    Args:
        offloaded: decoder layer indices to offload (may be empty), or ``"all"``.
        device: the compute device.
        embedding: the input embedding goes to host memory (:mod:`qolora.memory.host_embedding`; ``build_model``
            reads this and places it): asked for (``offload_embedding``), or chosen by ``offload="auto"``.
    """

    def __init__(self, offloaded: Sequence[int] | str, device: torch.device | str, *, embedding: bool = False):
        self.wanted = offloaded
        self.device = torch.device(device)
        self.embedding = embedding
        self.streamer: OffloadedLayers | None = None  # None while no decoder layer is offloaded
        self._pending: dict[int, set[str]] = {}
        self._prefix = ""

    def begin(self, skeleton: nn.Module, rebuilt: set[str]) -> None:
        """Work out which names complete each offloaded layer (``rebuilt``: the linear modules built from weights)."""
        name, layers = decoder_layers(skeleton)
        indices = range(len(layers)) if self.wanted == "all" else self.wanted
        if not indices:
            return
        self.streamer = OffloadedLayers(skeleton, indices, self.device)
        self._prefix = f"{name}."
        for i in self.streamer.offloaded:
            prefix = f"{name}.{i}."
            names = set()
            for n, _ in skeleton.named_parameters(remove_duplicate=False):
                if not n.startswith(prefix):
                    continue
                module, _, leaf = n.rpartition(".")
                names.add(module if module in rebuilt and leaf == "weight" else n)
            self._pending[i] = names

    def loaded(self, name: str) -> None:
        """``name`` (a rebuilt linear module, or a parameter) is now on the device."""
        if self.streamer is None or not name.startswith(self._prefix):
            return
        index = int(name[len(self._prefix):].split(".", 1)[0])
        pending = self._pending.get(index)
        if pending is None:
            return
        pending.discard(name)
        if not pending:
            del self._pending[index]
            self.streamer.offload(index)

    def end(self, model: nn.Module) -> OffloadedLayers | None:
        """Offload what is left, install the hooks; the streamer (None: no decoder layer offloaded)."""
        if self.streamer is None:
            return None
        self.streamer.model = model
        return self.streamer.install()
