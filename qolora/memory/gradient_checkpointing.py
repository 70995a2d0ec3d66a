"""Offloaded gradient checkpointing: the checkpointed input of each decoder layer waits in host memory.

Ordinary (non-reentrant) checkpointing keeps one tensor per decoder layer for the backward pass, the layer's
input hidden states (``batch x seq x hidden``), and recomputes everything else. For ``L`` layers that is
``L * N * h * 2`` bytes on the GPU: 2.5 GiB for a 70B model (80 layers of width 8192) at 2048 tokens, the
largest activation term left. Here the checkpoint of each layer is copied to (pinned) host memory as soon as
the layer's forward pass has saved it and the device copy is released; the backward pass copies it back just
before it recomputes that layer. The GPU then holds the checkpoint of about one layer instead of ``L``.

How: :func:`torch.utils.checkpoint.checkpoint` (non-reentrant) saves the layer's tensor arguments through
the autograd saved-tensor hooks active when it is called, and nothing else (inside the checkpoint its own
hooks take over and keep no intermediate tensor). Running it inside our
:func:`torch.autograd.graph.saved_tensors_hooks` therefore moves exactly the checkpoints: ``pack`` copies a
device tensor into a pinned host buffer (non-blocking on CUDA, on the compute stream, so the device block
can be reused safely as soon as it is freed) and returns the host copy; ``unpack`` moves it back
(non-blocking from pinned memory). The layer's keyword arguments (attention mask, rotary cos/sin: shared by
all layers) are bound in transformers' ``partial`` and stay where they are. Loss and gradients are those of
ordinary checkpointing, bit for bit: the recompute sees the same values.

When the compute device *is* the host (CPU training) there is nothing to gain, and ``pack`` keeps the
tensor as it is, unless ``copy_host_tensors=True`` (used by the tests to run the copy path on the CPU).
:attr:`OffloadedCheckpointing.stashed` lists the host copies alive, so a test can check what is held where.

transformers >= 5.24 has ``activation_checkpointing_enable(offload=True)`` built on
:class:`torch.autograd.graph.save_on_cpu`; this module does the same on any transformers 5.x, skips the copy
on a CPU device, and exposes what it holds.
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["OffloadedCheckpointing", "check_checkpointed_layers", "checkpointing_mode", "enable_gradient_checkpointing",
           "find_offloaded_checkpointing", "install", "require_layer_count"]

logger = logging.getLogger(__name__)

def checkpointing_mode(value) -> bool | str | int:
    """Normalize a ``gradient_checkpointing`` option: True, False, ``"offload"`` (also ``"on"``/``"off"``),
    ``"auto"`` (chosen for the job when training starts: :func:`qolora.training.auto_choices.resolve_checkpointing`),
    or an integer ``n >= 0``: checkpoint only the first ``n`` decoder layers (``"12"`` is read as 12).

    Raises:
        ValueError: anything else, naming what is allowed.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        table = {"on": True, "true": True, "off": False, "false": False, "none": False, "offload": "offload",
                 "auto": "auto"}
        if text in table:
            return table[text]
        if text.isdigit():
            return int(text)
    elif isinstance(value, bool):
        return value
    elif isinstance(value, int) and value >= 0:
        return value
    raise ValueError(f"gradient_checkpointing={value!r} is not supported; allowed: 'auto', True, False, 'offload', or "
                     "a number of decoder layers to checkpoint (an integer >= 0)")


def check_checkpointed_layers(mode: bool | str | int, hf_config) -> None:
    """A number of checkpointed layers (a normalised ``mode``) must be at most the model's decoder layers.

    Raises:
        ConfigError: naming the number, the model's layer count and what is allowed.
    """
    if isinstance(mode, (bool, str)):
        return
    text = getattr(hf_config, "text_config", None) or hf_config
    count = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if count is not None:
        require_layer_count(mode, count)


def require_layer_count(layers: int, count: int) -> None:
    """Raise unless ``0 <= layers <= count`` (a ConfigError naming both)."""
    from ..errors import ConfigError

    if not 0 <= layers <= count:
        raise ConfigError(f"gradient_checkpointing={layers} layers, but the model has {count} decoder "
                          f"layers: use 0..{count} (or True for all)")


class OffloadedCheckpointing:
    """A ``_gradient_checkpointing_func`` for transformers' checkpointed layers that keeps their inputs on the host.

    Args:
        checkpoint_kwargs: passed to :func:`torch.utils.checkpoint.checkpoint` (``use_reentrant`` must be False:
            the reentrant variant saves its inputs itself, outside the hooks).
        copy_host_tensors: also copy tensors that already live in host memory (tests: exercises the copy path
            on a CPU-only machine).
    """

    traceable = False
    """``torch.compile`` cannot trace under its ``saved_tensors_hooks`` (Dynamo: "does not know how to enter
    a saved_tensors_hooks context manager"), so :mod:`qolora.adapters.compiled_layers` leaves such layers eager."""

    def __init__(self, checkpoint_kwargs: dict | None = None, *, copy_host_tensors: bool = False):
        self.checkpoint_kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
        if self.checkpoint_kwargs["use_reentrant"]:
            raise ValueError("offloaded checkpointing needs use_reentrant=False")
        self.copy_host_tensors = copy_host_tensors
        self._stash: list[weakref.ref] = []  # host copies made by pack, alive until autograd frees them

    def __call__(self, function, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, **self.checkpoint_kwargs, **kwargs)

    # ------------------------------------------------------------------------------- the hooks
    def _pack(self, tensor: torch.Tensor):
        if tensor.device.type == "cpu" and not self.copy_host_tensors:
            return tensor  # already in host memory
        pinned = tensor.device.type == "cuda"
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pinned)
        host.copy_(tensor, non_blocking=pinned)  # (B, T, h): on the compute stream, ordered before any reuse
        self._stash = [r for r in self._stash if r() is not None]
        self._stash.append(weakref.ref(host))
        return tensor.device, host

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=host.is_pinned())

    # ------------------------------------------------------------------------------ inspection
    @property
    def stashed(self) -> list[torch.Tensor]:
        """The host copies currently held for a backward pass (empty after it, or with nothing to copy)."""
        return [t for t in (r() for r in self._stash) if t is not None]

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory the held checkpoints take now."""
        return sum(t.numel() * t.element_size() for t in self.stashed)


def install(model: nn.Module, func) -> int:
    """Make every module that transformers checkpoints (a ``gradient_checkpointing`` attribute) use ``func``.

    Call after ``activation_checkpointing_enable``: it sets which layers checkpoint; this only swaps the
    function they checkpoint with. Returns the number of modules changed.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing") and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = func
            n += 1
    return n


def find_offloaded_checkpointing(model: nn.Module) -> OffloadedCheckpointing | None:
    """The :class:`OffloadedCheckpointing` a model's layers use, or None (off, or ordinary checkpointing)."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            func = getattr(module, "_gradient_checkpointing_func", None)
            while isinstance(func, functools.partial):
                func = func.func
            if isinstance(func, OffloadedCheckpointing):
                return func
    return None


def enable_gradient_checkpointing(model: nn.Module, offload: bool = False, layers: int | None = None) -> None:
    """Non-reentrant checkpointing: works with a frozen embedding and trainable adapters only.

    ``offload=True``: each checkpointed layer's saved input waits in host memory until its recompute
    (:class:`qolora.memory.gradient_checkpointing.OffloadedCheckpointing`); False turns that off again.
    ``layers=n``: only the first ``n`` decoder layers are checkpointed; the others keep their
    activations (no recompute). The backward pass reaches the last layers first, so theirs are the
    activations freed first. None: every layer.

    Raises:
        ConfigError: ``layers`` is more than the model has.
    """
    if layers is not None:
        from .base_streaming import decoder_layers  # the streaming module's rule for finding the decoder layers

        _, decoder = decoder_layers(model)
        require_layer_count(layers, len(decoder))
        if offload:
            from ..errors import ConfigError

            raise ConfigError("offloaded checkpointing applies to every layer; give 'offload' or a number of "
                              "layers, not both")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload:
        install(model, OffloadedCheckpointing(kwargs))
    if layers is not None:
        for index, layer in enumerate(decoder):
            if hasattr(layer, "gradient_checkpointing"):  # transformers' GradientCheckpointingLayer
                layer.gradient_checkpointing = index < layers
    if hasattr(model, "config"):
        model.config.use_cache = False
