"""Where a model's parts go before it is built: which decoder layers' frozen base and whether the input
embedding wait in host memory (:mod:`qolora.memory.base_streaming`, :mod:`qolora.memory.host_embedding`).

:func:`offload_layers_for` is the one decision for :func:`qolora.prepare` and :func:`qolora.load`:
``offload="cpu"`` offloads every decoder layer, ``"auto"`` asks the memory planner
(:func:`qolora.planning.plan.plan`) for the fewest that fit, and the host's room is checked before any weight is
read. It sits above both the planner and the streaming code, so neither imports the other's caller.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from ..memory.base_streaming import LayerOffload
from ..memory.gradient_checkpointing import check_checkpointed_layers
from ..memory.host_embedding import check_untied
from ..memory.host_memory import available_host_bytes
from .plan import plan_checked
from .shape import TrainingShape

__all__ = ["offload_layers_for"]

logger = logging.getLogger(__name__)


def offload_layers_for(hf_config, config, offload: str | None, *, gpu_memory: int | None = None,
                       shape: TrainingShape | None = None, offload_embedding: bool = False) -> LayerOffload | None:
    """The placement for ``prepare`` / ``load``: which decoder layers to offload, checked against host memory.

    ``"cpu"`` offloads every decoder layer; ``"auto"`` asks :func:`qolora.planning.plan.plan` for the fewest that
    fit ``gpu_memory`` (default: the CUDA device's free memory) for the training ``shape`` (default: the
    planner's, seq 2048, batch 1); on a CPU device ``"auto"`` offloads nothing (host and device are one memory).
    ``offload_embedding``: the input embedding goes to host memory as well (the plan counts it); without
    it, ``"auto"`` on an untied model first moves the input embedding to host memory (almost free) and
    offloads decoder layers only if that is not enough. The placement's ``embedding`` says whether the
    embedding goes to host memory, asked for or chosen. Returns None when nothing is offloaded.

    ``offload``, ``gpu_memory`` (bytes) and ``shape`` come normalised
    (:class:`qolora.model.build_options.BuildOptions`).

    Raises:
        ConfigError: the host cannot hold the offloaded part, or ``offload_embedding`` on a model with tied
            embeddings (all before any weight is read).
    """
    device = config.torch_device
    if offload_embedding:
        check_untied(hf_config)
    embedding_only = LayerOffload([], device, embedding=True) if offload_embedding else None
    if offload is None:
        if offload_embedding and device.type == "cuda":  # on the CPU host and device are one memory
            _check_embedding_room(hf_config, config)
        return embedding_only
    if offload == "auto" and device.type != "cuda":
        logger.info("offload='auto' on %s: nothing to offload (host and device share one memory)", device)
        return embedding_only
    if offload == "auto" and gpu_memory is None:
        gpu_memory = torch.cuda.mem_get_info(device)[0]
    shape = (shape or TrainingShape()).replace(device=device.type, offload=offload, gpu_memory=gpu_memory,
                                               offload_embedding=offload_embedding)
    check_checkpointed_layers(shape.gradient_checkpointing, hf_config)  # the plan's own count, as prepare's
    memory_plan = plan_checked(hf_config, config, shape, search=False)
    indices = memory_plan.offloaded_layers
    if memory_plan.offload_embedding and not offload_embedding:  # chosen by the plan, not asked for
        logger.info("offload='auto': the input embedding (%.2f GiB) goes to host memory first",
                    memory_plan.embedding_host_bytes / 2**30)
    if not indices and not memory_plan.offload_embedding:
        logger.info("offload='auto': the model fits %.2f GiB without offloading", memory_plan.gpu_memory / 2**30)
        return None
    available = available_host_bytes()
    if memory_plan.host_bytes > available:
        raise ConfigError(
            f"offloading {len(indices)} of {memory_plan.num_layers} decoder layers"
            + (" and the input embedding" if memory_plan.offload_embedding else "") + " needs "
            f"{memory_plan.host_bytes / 2**30:.2f} "
            f"GiB of host memory, but only {available / 2**30:.2f} GiB is available: free host memory, offload fewer "
            "layers (offload='auto' with a larger gpu_memory), or use a larger machine")
    if memory_plan.fits is False:
        logger.warning("even with %d of %d layers offloaded the plan predicts %.2f GiB on the GPU, more than %.2f GiB",
                       len(indices), memory_plan.num_layers, memory_plan.gpu_bytes / 2**30,
                       memory_plan.gpu_memory / 2**30)
    return LayerOffload(indices, device, embedding=memory_plan.offload_embedding)


def _check_embedding_room(hf_config, config) -> None:
    """Refuse an input embedding in host memory that the host cannot hold (before any weight is read)."""
    from .memory_model import model_dims

    dims = model_dims(hf_config)
    needed = dims.vocab * dims.h * torch.empty(0, dtype=config.torch_dtype).element_size()
    available = available_host_bytes()
    if needed > available:
        raise ConfigError(f"offload_embedding=True needs {needed / 2**30:.2f} GiB of host memory for the input "
                          f"embedding ({dims.vocab} x {dims.h}), but only {available / 2**30:.2f} GiB is available "
                          "(each process of a multi-process run holds its own copy): free host memory or use "
                          "offload_embedding=False")

