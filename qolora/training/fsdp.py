"""FSDP-QLoRA building blocks: shard a prepared 4-bit model over the ranks with torch's FSDP2.

Data parallel (:mod:`qolora.training.distributed`) keeps a whole 4-bit base on every device. For a base that does
not fit one device, :func:`shard_model` shards it: each decoder layer and then the backbone become FSDP2
units (``torch.distributed.fsdp.fully_shard``), so a rank stores ``1/N`` of every weight (the packed
4-bit weights included) and all-gathers one layer at a time for its forward and backward. This is the
FSDP-QLoRA recipe of bitsandbytes and Answer.AI: the packed 4-bit weights must be stored in a float
dtype (``AdapterConfig(quant_storage="bf16")`` on GPUs, ``"fp32"`` on the CPU) so FSDP can shard
them like any other parameter; bitsandbytes keeps each layer's quantization state on the module
and re-attaches it to the gathered weight.

Gradients: FSDP reduce-scatters the adapter gradients with a *sum* (divide factor 1), matching the
loop's normalisation by the label tokens of the whole global batch, so a sharded step equals a
data-parallel step. The output head is used by the chunked loss outside the backbone's forward, so
it is left whole (replicated, frozen).

Checkpoints and the saved adapter are those of a data-parallel run: :func:`full_adapter_state` and
:func:`full_optimizer_state` gather whole tensors (the optimizer state keyed by parameter name) for
rank 0 to write, and :func:`load_full_adapter_state` / :func:`load_full_optimizer_state` scatter them
back into the shards. The final adapter is written from a :class:`~qolora.model.adapter_folder.SavedAdapter`
taken before sharding (the base layers' quantization settings are read from whole ``Params4bit``
weights) with the gathered trained factors filled in (:func:`with_trained_weights`).

Checked on the CPU with 2 gloo processes (``tests/training/test_fsdp.py``): one sharded step equals one
data-parallel step, and ``qolora.train(..., TrainConfig(fsdp=True))`` ends with the data-parallel
run's losses and adapter.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..adapters.layer import adapter_layers, adapter_parameters
from ..base.quant import quantization_kind
from ..memory.host_embedding import host_embeddings

__all__ = ["fsdp_problems", "full_adapter_state", "full_optimizer_state", "load_full_adapter_state",
           "load_full_optimizer_state", "shard_model", "with_trained_weights"]

logger = logging.getLogger(__name__)


def fsdp_problems(model: nn.Module) -> list[str]:
    """Why ``model`` cannot be sharded with FSDP (empty: it can)."""
    problems = []
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        problems.append("FSDP needs a process group: launch with torchrun (python -m torch.distributed.run)")
    if next(adapter_parameters(model), None) is None:
        problems.append(f"{type(model).__name__} has no qolora adapters (build it with qolora.prepare)")
    for name, param in model.named_parameters():
        kind = quantization_kind(param)
        if kind == "4bit" and not param.dtype.is_floating_point:
            problems.append(f"{name} stores its 4-bit weight as {param.dtype}: FSDP shards float storage only; "
                            "prepare with AdapterConfig(quant_storage='bf16') (GPU) or 'fp32' (CPU)")
            break
        if kind == "8bit":
            problems.append(f"{name} is 8-bit: FSDP-QLoRA supports 4-bit bases (bits=4) only")
            break
    if host_embeddings(model):
        problems.append("the input embedding is in host memory (offload_embedding=True): FSDP shards the base "
                        "(the embedding with it) instead; prepare without offload_embedding")
    if _blocks(model) == []:
        problems.append(f"{type(model).__name__} declares no decoder-layer class (_no_split_modules) to shard by")
    return problems


def _blocks(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def _backbone(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model_prefix", None)
    return getattr(model, base) if base and hasattr(model, base) else model


def shard_model(model: nn.Module, mesh=None) -> nn.Module:
    """Shard a prepared model in place with FSDP2: every decoder layer, then the backbone.

    Args:
        model: from :func:`qolora.prepare` with ``bits=4`` and a float ``quant_storage``, on this rank's
            device (every rank builds the same model).
        mesh: a 1-D device mesh; None = all ranks on this rank's device type.

    Returns:
        ``model`` (its parameters are now ``DTensor`` shards).

    Raises:
        ValueError: the model cannot be sharded (every problem listed).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    problems = fsdp_problems(model)
    if problems:
        raise ValueError("cannot shard the model with FSDP: " + "; ".join(problems))
    device = next(model.parameters()).device
    if mesh is None:
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    units = []
    for block in _blocks(model):
        units.append(fully_shard(block, mesh=mesh))
    units.append(fully_shard(_backbone(model), mesh=mesh))
    for unit in units:  # sum, like the data-parallel all_reduce (the loss is already a global mean)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    logger.info("FSDP: %d decoder layers sharded over %d ranks (%d adapter layers)", len(units) - 1,
                mesh.size(), sum(1 for _ in adapter_layers(model)))
    return model


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter weights by in-model name (gathered from the shards; call on every rank)."""
    out = {}
    for name, p in adapter_parameters(model):
        t = p.detach()
        out[name] = t.full_tensor() if hasattr(t, "full_tensor") else t
    return out


def load_full_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole adapter weights (by in-model name) into the model's shards (call on every rank)."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, p in adapter_parameters(model):
            full = state[name].to(device=p.device, dtype=p.dtype)
            if hasattr(p, "placements"):  # a DTensor shard: this rank's part of the whole tensor
                full = distribute_tensor(full, p.device_mesh, p.placements)
            p.copy_(full)


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state keyed by parameter name, on the CPU on rank 0 (other ranks: empty);
    call on every rank."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_state_options(cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state from :func:`full_optimizer_state` (present on every rank) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_state_options())


def with_trained_weights(template, state: dict[str, torch.Tensor]):
    """``template`` (a :class:`~qolora.model.adapter_folder.SavedAdapter` taken before sharding) with the trained
    factors of ``state`` (from :func:`full_adapter_state`) in place of the ones it was taken with."""
    import dataclasses

    weights = {name: (state[f"{name}.lora_A.weight"].detach().to("cpu", copy=True).contiguous(),
                      state[f"{name}.lora_B.weight"].detach().to("cpu", copy=True).contiguous())
               for name in template.layers}
    return dataclasses.replace(template, weights=weights)
