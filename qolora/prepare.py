"""``qolora.prepare``: one pass over the checkpoint that quantizes each weight once.

The reference stack loads a 4-bit model (quantize), then PEFT's OLoRA init dequantizes each weight,
runs a full QR, subtracts and quantizes again: two quantizations and O(n^3) work per weight. Here:

1. build the model's skeleton on the ``meta`` device (no memory), swap nothing yet;
2. stream the checkpoint tensor by tensor. A targeted weight ``W`` goes to the compute device in
   fp32, its factors come from :data:`qolora.inits.INITS` (OLoRA: thin QR of ``W[:, :r]``), it
   becomes the residual ``W - s*B@A`` in place, is quantized *once* into the base layer
   (:mod:`qolora.quant`) and is freed. Other linear layers are quantized as they are; everything
   else is materialised in ``dtype``;
3. tie weights, check nothing is missing, freeze all but the adapters.

Only a checkpoint that is itself stored quantized (bitsandbytes 4/8-bit) takes the dequantize ->
factor -> requantize path; its extra error against the stored weights is measured and logged.

Peak memory is the quantized model plus one full-precision weight, so a 70B model prepares on a GPU
with far less host RAM than its fp16 size. A :class:`QuantReport` records, per adapted layer,
``||W - (deq(q(W_res)) + s*B@A)||`` and (``compare_plain=True``) plain QLoRA's ``||W - deq(q(W))||``.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import (
    checkpoint_files, checkpoint_key_map, iter_checkpoint, meta_model, resolve_model_dir, weight_fingerprint,
)
from .config import AdapterConfig, ConfigError
from .inits import INITS, residual_
from .layer import AdapterLinear, mark_only_adapters_trainable
from .quant import dequantize_stored, dequantize_weight, make_base_layer, stored_group_complete, stored_part

__all__ = ["prepare", "build_model", "QuantReport", "LayerReport", "linear_layers", "select_targets"]

logger = logging.getLogger(__name__)

# (layer name, fp32 weight (out, in) on the compute device) -> initial (A, B), or None for no adapter
FactorProvider = Callable[[str, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


# --------------------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """Reconstruction error of one adapted layer (Frobenius norms, fp32)."""

    name: str
    shape: tuple[int, int]
    weight_norm: float
    error: float  # ||W - (deq(q(W_res)) + s*B@A)||
    plain_error: float | None = None  # ||W - deq(q(W))||, plain QLoRA, when compare_plain


@dataclass
class QuantReport:
    """Per-layer and summed weight error of a prepared model against its checkpoint weights."""

    init: str
    bits: int
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    requantized: str | None = None  # "4bit"/"8bit": the checkpoint was stored quantized (errors vs its weights)

    @property
    def total_error(self) -> float:
        return sum(r.error for r in self.layers)

    @property
    def total_plain_error(self) -> float | None:
        if not self.layers or any(r.plain_error is None for r in self.layers):
            return None
        return sum(r.plain_error for r in self.layers)

    @property
    def ratio_to_plain(self) -> float | None:
        plain = self.total_plain_error
        return None if not plain else self.total_error / plain

    def summary(self) -> str:
        text = f"{self.init} init, {self.bits}-bit base, {len(self.layers)} adapted layers: summed weight error {self.total_error:.4g}"
        if self.ratio_to_plain is not None:
            text += f" = {self.ratio_to_plain:.3f}x plain {self.bits}-bit quantization's {self.total_plain_error:.4g}"
        return text + f" ({self.seconds:.1f} s)"

    def to_dict(self) -> dict:
        return {
            "init": self.init, "bits": self.bits, "seconds": self.seconds,
            "total_error": self.total_error, "total_plain_error": self.total_plain_error,
            "ratio_to_plain": self.ratio_to_plain, "requantized": self.requantized,
            "layers": [{f.name: getattr(r, f.name) for f in fields(r)} for r in self.layers],
        }


# ------------------------------------------------------------------------------ model structure
def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415

    return isinstance(module, (nn.Linear, Conv1D))


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear (or GPT-2 ``Conv1D``) layer of ``model`` except its output head, by name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if _is_linear(m) and m is not head and name}


def _shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or Conv1D (which stores its weight as (in, out))."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.nf, module.nx


def select_targets(linears: dict[str, nn.Module], target_modules: tuple[str, ...] | None) -> list[str]:
    """Names of the linear layers to adapt: all, or those whose last name part or full name matches."""
    if target_modules is None:
        return list(linears)
    wanted = set(target_modules)
    chosen = [n for n in linears if n in wanted or n.rsplit(".", 1)[-1] in wanted]
    matched = {t for t in wanted if any(n == t or n.rsplit(".", 1)[-1] == t for n in chosen)}
    unmatched = sorted(wanted - matched)
    if unmatched:
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(f"target_modules {unmatched} match no linear layer of this model; available: {available}")
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _layer_generator(seed: int, name: str) -> torch.Generator:
    """A generator per layer, so random inits do not depend on the order of the checkpoint's keys."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


# ------------------------------------------------------------------------------------- building
def build_model(
    model_dir: Path,
    config: AdapterConfig,
    factors_for: FactorProvider,
    *,
    compare_plain: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, QuantReport]:
    """Stream ``model_dir`` into a quantized model with adapters (see the module docstring).

    ``factors_for(name, W)`` returns the initial ``(A, B)`` of a targeted layer (computed from ``W``,
    or known already, as when an adapter is reloaded); the base becomes ``W - s*B@A`` when the init
    needs a residual.
    """
    from accelerate.utils import set_module_tensor_to_device  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415
    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415

    start = time.perf_counter()
    device, dtype = config.torch_device, config.torch_dtype
    files = checkpoint_files(model_dir)
    model, stored_kind = meta_model(model_dir, dtype)
    linears = linear_layers(model)
    targets = set(select_targets(linears, config.target_modules))
    # Layers rebuilt from their weight: all linears when quantizing (QLoRA quantizes every one),
    # only the adapted ones at 16 bits, and every one whose checkpoint is stored quantized.
    quantized = set(linears) if config.bits != 16 or stored_kind else set(targets)
    _check_rank(linears, targets, config.rank)

    needs_residual = INITS[config.init].needs_residual
    to_model = checkpoint_key_map(model)
    report = QuantReport(init=config.init, bits=config.bits)
    biases: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # stored-quantized layers being gathered
    unexpected: list[str] = []
    done: set[str] = set()
    bar = tqdm(total=len(quantized), desc=f"{config.bits}-bit + {config.init}", unit="layer", disable=not progress)

    def place(module_name: str, weight: torch.Tensor) -> None:
        """Build layer ``module_name`` from its fp32 (out, in) weight, consuming it."""
        if module_name in targets:
            layer, row = _adapted_layer(module_name, weight, factors_for, config, needs_residual, compare_plain,
                                        isinstance(linears[module_name], Conv1D))
            report.layers.append(row)
        else:
            layer = make_base_layer(weight, None, config, device)
        _set_submodule(model, module_name, layer)
        done.add(module_name)
        bar.update(1)

    def place_stored(complete_only: bool) -> None:
        for module_name in [m for m, parts in pending.items() if not complete_only or stored_group_complete(parts)]:
            place(module_name, dequantize_stored(pending.pop(module_name), device))

    for file in files:
        for key, tensor in iter_checkpoint([file]):
            name = to_model(key) or key
            module_name, _, leaf = name.rpartition(".")
            if module_name in quantized and leaf == "bias":
                biases[module_name] = tensor
            elif stored_kind and (part := stored_part(name, quantized)):
                pending.setdefault(part[0], {})[part[1]] = tensor
            elif module_name in quantized and leaf == "weight":
                # Move in the stored dtype, then widen on the device: converting on the CPU first
                # costs more than the whole transfer.
                weight = tensor.to(device).to(torch.float32, copy=True)
                place(module_name, weight.T.contiguous() if isinstance(linears[module_name], Conv1D) else weight)
                del weight
            elif to_model(key) is None:
                unexpected.append(key)
            else:
                set_module_tensor_to_device(model, name, device, value=tensor, dtype=dtype)
        place_stored(complete_only=True)  # groups are usually whole within a shard
    place_stored(complete_only=False)
    bar.close()

    for module_name, bias in biases.items():
        module = model.get_submodule(module_name)
        base = module.base_layer if isinstance(module, AdapterLinear) else module
        base.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)

    _finish(model, device, sorted(quantized - done), unexpected)
    mark_only_adapters_trainable(model)
    report.seconds = time.perf_counter() - start
    report.requantized = stored_kind
    if stored_kind:
        logger.warning(
            "%s is stored %s: its weights were dequantized, factored and quantized again (the base is quantized "
            "twice). Measured error of the adapted layers against the stored weights: %.4g summed, %.2f%% of their "
            "norm. A full-precision checkpoint avoids this.", model_dir, stored_kind, report.total_error,
            100 * report.total_error / max(sum(r.weight_norm for r in report.layers), 1e-12),
        )
    return model, report


def _adapted_layer(name, weight, factors_for, config, needs_residual, compare_plain, transposed):
    """Factor ``weight`` (fp32, consumed), quantize its residual once, wrap it with the adapter."""
    norm = float(torch.linalg.norm(weight))
    fingerprint = weight_fingerprint(weight)
    plain_error = None
    if compare_plain:
        plain = make_base_layer(weight, None, config, weight.device)
        plain_error = float(torch.linalg.norm(weight - dequantize_weight(plain)))
        del plain
    a, b = factors_for(name, weight)  # (r, in), (out, r)
    a, b = a.to(weight.device, torch.float32), b.to(weight.device, torch.float32)
    if needs_residual:
        residual_(weight, a, b, config.scale)  # weight := W - s*B@A, in place
    base = make_base_layer(weight, None, config, weight.device)
    # W - (deq(q(W_res)) + s*B@A) == W_res - deq(q(W_res)); for LoRA (no residual) W - deq(q(W)).
    error = float(torch.linalg.norm(weight - dequantize_weight(base)))
    layer = AdapterLinear(
        base, a, b, config.scale, dropout=config.dropout,
        adapter_dtype=config.torch_adapter_dtype, fan_in_fan_out=transposed,
    )
    # The initial factors define the residual; kept (on the CPU) so the adapter can be saved,
    # reloaded exactly and exported against the original weights.
    # Copies: the trainable lora_A / lora_B must never alias them (on the CPU .cpu() is a no-op).
    layer.init_factors = (a.detach().cpu().clone(), b.detach().cpu().clone()) if needs_residual else None
    layer.base_fingerprint = fingerprint
    return layer, LayerReport(name, tuple(weight.shape), norm, error, plain_error)


def _check_rank(linears: dict[str, nn.Module], targets: set[str], rank: int) -> None:
    smallest = min((_shape(linears[n]) for n in targets), key=min)
    if rank > min(smallest):
        raise ConfigError(
            f"rank={rank} is larger than a targeted weight allows: the smallest targeted layer is "
            f"{smallest[0]}x{smallest[1]}, so rank must be <= {min(smallest)}"
        )


def _finish(model: nn.Module, device: torch.device, missing_layers: list[str], unexpected: list[str]) -> None:
    """Tie weights, move buffers to ``device``, and fail loudly on anything left unloaded."""
    if unexpected:
        logger.warning("%d checkpoint tensor(s) not used by the model, e.g. %s", len(unexpected), unexpected[:5])
    model.tie_weights()
    missing = missing_layers + [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ConfigError(f"checkpoint is missing {len(missing)} weight(s) the model needs, e.g. {missing[:5]}")
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)


def _option_config(bits: int, rank: int, options: dict) -> AdapterConfig:
    allowed = {f.name for f in fields(AdapterConfig)} - {"bits", "rank", "extra"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    if options.get("target_modules") is not None and not isinstance(options["target_modules"], str):
        options = {**options, "target_modules": tuple(options["target_modules"])}
    return AdapterConfig(bits=bits, rank=rank, **options)


# ---------------------------------------------------------------------------------------- public
def prepare(
    model: str | Path,
    bits: int = 4,
    rank: int = 16,
    *,
    config: AdapterConfig | None = None,
    gradient_checkpointing: bool = False,
    compare_plain: bool = False,
    progress: bool = True,
    **options,
):
    """Load a causal LM with a 4/8-bit (or 16-bit) base and OLoRA (or PiSSA / LoRA) adapters.

    Args:
        model: a local checkpoint folder or a hub id (resolved through the local cache when
            ``HF_HUB_OFFLINE=1``).
        bits: 4 (NF4 by default), 8 or 16 (unquantized).
        rank: adapter rank.
        config: a full :class:`AdapterConfig` instead of ``bits``/``rank``/``options``.
        gradient_checkpointing: enable non-reentrant gradient checkpointing.
        compare_plain: also quantize each targeted weight as plain QLoRA would and report that
            error (one extra quantization per layer: slower, for measurement).
        progress: show a progress bar over layers.
        **options: any other :class:`AdapterConfig` field (``alpha``, ``init``, ``target_modules``,
            ``use_rslora``, ``dropout``, ``quant_type``, ``blocksize``, ``double_quant``,
            ``quant_storage``, ``compute_dtype``, ``dtype``, ``adapter_dtype``, ``device``, ``seed``).

    Returns:
        A ``transformers.PreTrainedModel`` in eval mode whose only trainable parameters are the
        adapters; ``model.qolora_config`` holds the config and ``model.qolora_report`` the
        :class:`QuantReport`.

    Raises:
        ConfigError: bad options (all listed at once), a missing model, targets matching nothing,
            a rank too large for a targeted weight, or CUDA options without CUDA; all before any
            weight is read.
    """
    cfg = (config or _option_config(bits, rank, options)).validate()
    model_dir = resolve_model_dir(model)
    init = INITS[cfg.init]

    def factors_for(name: str, weight: torch.Tensor):
        return init.factors(weight, cfg.rank, cfg.scale, _layer_generator(cfg.seed, name))

    net, report = build_model(model_dir, cfg, factors_for, compare_plain=compare_plain, progress=progress)
    net.name_or_path = str(model)
    net.qolora_config = cfg
    net.qolora_base = str(model_dir)
    net.qolora_report = report
    if gradient_checkpointing:
        enable_gradient_checkpointing(net)
    net.eval()
    logger.info("prepared %s: %s", model, report.summary())
    return net


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing: works with a frozen embedding and trainable adapters only."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "config"):
        model.config.use_cache = False
