"""``kernels="compile"``: the decoder layers' training forward compiled with ``torch.compile``.

What the fused adapter step (:mod:`qolora.adapters.kernels`) leaves in eager mode is a chain of small
elementwise kernels per decoder layer: RMSNorm (square, mean, rsqrt, scale), RoPE (two rotations and
their sum), SwiGLU (SiLU and the product), residual additions, casts. Each reads and writes a full
``(N, hidden)`` or ``(N, intermediate)`` tensor. ``torch.compile`` (TorchInductor) fuses each chain into
one kernel, in the forward pass and in the backward pass AOTAutograd derives, C++/OpenMP on the CPU and
Triton on CUDA: the fusions Unsloth and Liger Kernel write by hand, made by a well-kept tool instead.

What is compiled, and when:

* each decoder layer's ``forward`` as its class defines it (one code object, so one compiled graph serves
  every layer: their parameters are graph inputs, not constants), **not** ``__call__``: module hooks
  (:mod:`qolora.memory.base_streaming`'s streaming, accelerate's) stay in eager mode around it. In transformers 5 that
  ``forward`` includes the layer's gradient checkpointing (``GradientCheckpointingLayer`` wraps it), and
  Dynamo traces ``torch.utils.checkpoint`` as a higher-order op: the recompute becomes part of the
  compiled backward graph, and AOTAutograd's partitioner chooses what a layer keeps for its backward
  (measured: a lower peak than eager autograd where layers are not checkpointed);
* only while autograd records (training). Evaluation and generation (no grad; a KV cache whose length
  grows every decoding step) keep the eager forward: nothing to gain there from a training graph, and
  no recompilation per length;
* bitsandbytes' 4-bit matmul and the fused adapter function are traced into the graph (bitsandbytes
  registers its ops with ``torch.library``), so a layer is one graph, without graph breaks on the CPU
  (checked by ``tests/adapters/test_compiled_layers.py``).

The first training step pays the compilation (tens of seconds on a 2-core CPU; cached on disk by
Inductor for later processes); a change of sequence length recompiles once with dynamic shapes.
Numerics: Inductor may reorder a reduction (RMSNorm's mean) or fuse a cast, so without dropout results
equal the eager path within fp32 rounding (bf16: within bf16 rounding), not bit for bit. With adapter
dropout the masks differ from eager's (Inductor draws its own random numbers), so a compiled run is a
different (equally valid) run, reproducible under ``compile``: a run resumed from a checkpoint continues
bit for bit (``tests/training/test_loop.py``, SIGKILL and resume with dropout and varying lengths).

Where compilation does not apply, the layer runs eagerly and the reason is logged once
(:func:`qolora.adapters.kernels.note_fallback`): ``torch.compile`` missing or failing (its backend cannot build,
e.g. no C++ compiler on the CPU or no Triton on CUDA, or any ``torch._dynamo`` error while it compiles
the forward; a failure compiling the backward, which AOTAutograd may do at the first ``backward()``,
is not caught), FSDP-sharded layers, and layers whose checkpoint function declares ``traceable = False``
(:mod:`qolora.memory.gradient_checkpointing`: Dynamo cannot trace under its ``saved_tensors_hooks``, so
``gradient_checkpointing="offload"`` trains eagerly).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .kernels import note_fallback

__all__ = ["compile_decoder_layers", "compiled_layer_count", "uncompile_decoder_layers"]

BACKEND = "inductor"
"""The ``torch.compile`` backend (the tests also run ``"aot_eager"``: the same graphs, no code generation)."""

_broken: list[str] = []
"""Why compilation failed in this process (once it has, every layer stays eager)."""


@functools.cache
def _compiled(forward_function):
    """One compiled function per layer class's ``forward`` (shared by every layer of that class)."""
    return torch.compile(forward_function, backend=BACKEND)


class _TrainingForward:
    """A decoder layer's ``forward``: the compiled one while autograd records, the eager one otherwise.

    The class's ``forward`` is looked up at each call, not captured: FSDP2 (``fully_shard``) swaps a
    layer's class for a subclass whose ``forward`` is the outermost checkpointing wrapper, and only that
    wrapper checkpoints (transformers' ``GradientCheckpointingLayer``). Deep copies keep working: the
    wrapper holds its layer, and ``copy.deepcopy`` rebinds it to the copy.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __call__(self, *args, **kwargs):
        layer = self.layer
        function = type(layer).forward
        if not torch.is_grad_enabled() or _broken:
            return function(layer, *args, **kwargs)
        reason = _eager_reason(layer)
        if reason is not None:
            note_fallback(f"kernels='compile': {reason}; these layers run eagerly")
            return function(layer, *args, **kwargs)
        try:
            return _compiled(function)(layer, *args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:
            # Compilation failed (the backend cannot build, or tracing hit an error): eager from now on. The
            # eager call below raises again if the error is the model's own, so nothing is hidden.
            cause = getattr(exc, "inner_exception", None) or exc
            _broken.append(f"{type(cause).__name__}: {cause}")
            note_fallback(f"kernels='compile': torch.compile failed ({_broken[0][:300]}); the decoder layers "
                          "run eagerly")
            return function(layer, *args, **kwargs)


def _is_fsdp(layer: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed: nothing can be sharded
        return False
    return isinstance(layer, FSDPModule)


def _eager_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` must train eagerly (None: it can be compiled)."""
    if _is_fsdp(layer):
        # FSDP2's hooks hand the forward unsharded tensors, so nothing else would notice; compiling
        # sharded blocks is not tested here (no multi-GPU runs), so they stay eager.
        return "FSDP-sharded layers are not compiled"
    if any(hasattr(p, "placements") for p in layer.parameters()):  # DTensor, as qolora.adapters.kernels tells it
        return "sharded (DTensor) parameters"
    if not _traceable_checkpointing(layer):
        return "torch.compile cannot trace offloaded gradient checkpointing (its saved-tensor hooks)"
    return None


def _traceable_checkpointing(layer: nn.Module) -> bool:
    """False when the layer checkpoints (training) through a function that declares ``traceable = False``."""
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training):
        return True
    function = getattr(layer, "_gradient_checkpointing_func", None)
    while isinstance(function, functools.partial):
        function = function.func
    return getattr(function, "traceable", True)


def _layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: the modules transformers can checkpoint (``GradientCheckpointingLayer``: every
    decoder block of transformers 5's causal LMs)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer's training forward (idempotent). Returns how many layers are compiled.

    The layer's ``forward`` attribute becomes a :class:`_TrainingForward`; :func:`uncompile_decoder_layers`
    removes it again.
    """
    if not hasattr(torch, "compile"):
        note_fallback("kernels='compile': this torch has no torch.compile; the decoder layers run eagerly")
        return 0
    layers = _layers(model)
    if not layers:
        note_fallback(f"kernels='compile': {type(model).__name__} has no decoder layers transformers can checkpoint "
                      "(GradientCheckpointingLayer); nothing is compiled")
    for layer in layers:
        if not _is_compiled(layer):
            layer.forward = _TrainingForward(layer)
    return len(layers)


def _is_compiled(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _TrainingForward)


def uncompile_decoder_layers(model: nn.Module) -> None:
    """Give every compiled decoder layer its eager ``forward`` back (idempotent)."""
    for module in model.modules():
        if _is_compiled(module):
            del module.forward


def compiled_layer_count(model: nn.Module) -> int:
    """How many of the model's modules have a compiled training forward."""
    return sum(1 for module in model.modules() if _is_compiled(module))
