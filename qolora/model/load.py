"""Loading a saved adapter back onto its base, exactly as it was trained.

:func:`load` reads the adapter folder first (:func:`qolora.model.adapter_folder.read_adapter`: every problem
with it is found before the base is touched), checks the base's structure against the recorded
layers on the meta skeleton (no weight read), then streams the base through
:func:`qolora.model.prepare.build_model` handing it the saved initial factors ``(A0, B0)``: no QR or SVD
runs, each residual is the training residual and quantizes to the identical base. Each base weight's
fingerprint is compared with the recorded one as it streams (:class:`FingerprintCheck`); the first
differing layer stops the load unless ``allow_base_mismatch``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..adapters.layer import adapter_layers
from ..base.quant import quant_settings
from ..base.reader import BaseCheckpoint, layer_shape, linear_layers, select_targets, weight_fingerprint
from ..config import AdapterConfig
from ..planning.placement import offload_layers_for
from .adapter_folder import AdapterError, BaseMismatchError, SavedAdapter, read_adapter
from .build_options import BuildOptions
from .forward_wrap import apply_autocast
from .prepare import adopt, build_model
from .record import ModelRecord

__all__ = ["FingerprintCheck", "check_base_structure", "load", "resolve_device_config"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ base checks
def check_base_structure(skeleton: nn.Module, saved: SavedAdapter, base: str) -> dict[str, nn.Module]:
    """Check that the base has exactly the adapter's target layers, with the recorded shapes.

    Returns the base's linear layers by name (from :func:`qolora.base.reader.linear_layers`).

    Raises:
        AdapterError: naming the first layers that are missing, extra, or of another shape.
    """
    linears = linear_layers(skeleton)
    targets = select_targets(linears, saved.config.target_modules)
    missing = [n for n in saved.layers if n not in linears]
    if missing:
        raise AdapterError(f"base {base} has no layer(s) {missing[:3]} that the adapter was trained on "
                           f"({len(missing)} missing): a different architecture")
    extra = [n for n in targets if n not in saved.layers]
    if extra:
        raise AdapterError(f"base {base} has {len(extra)} targeted layer(s) the adapter lacks, e.g. {extra[:3]}: "
                           "a different architecture (more layers?)")
    for name, rec in saved.layers.items():
        module = linears[name]
        shape = layer_shape(module)
        if tuple(shape) != tuple(rec.shape):
            raise AdapterError(
                f"layer {name}: the base's weight is {shape[0]}x{shape[1]} but the adapter (rank {saved.config.rank}) "
                f"was trained on a {rec.shape[0]}x{rec.shape[1]} weight: a different model"
            )
    return linears


class FingerprintCheck:
    """Compares base weights with the recorded fingerprints: raise on the first mismatch, or collect."""

    def __init__(self, saved: SavedAdapter, base: str, allow_mismatch: bool):
        self.saved, self.base, self.allow = saved, base, allow_mismatch
        self.mismatched: list[str] = []

    def __call__(self, name: str, weight: torch.Tensor) -> None:
        recorded = self.saved.layers[name].fingerprint
        found = weight_fingerprint(weight)
        if found == recorded:
            return
        if not self.allow:
            raise BaseMismatchError(
                f"base {self.base} is not the model this adapter was trained on: layer {name}'s weight has "
                f"fingerprint {found}, the adapter recorded {recorded}. Use the original base, or pass "
                "allow_base_mismatch=True (qolora merge --allow-base-mismatch) to apply it anyway"
            )
        self.mismatched.append(name)

    def warn(self) -> None:
        if self.mismatched:
            logger.warning(
                "allow_base_mismatch: %d of %d layers of base %s differ from the base the adapter was trained on "
                "(e.g. %s); the result is NOT the trained model", len(self.mismatched), len(self.saved.layers),
                self.base, self.mismatched[:3],
            )


def resolve_device_config(saved: SavedAdapter, device: str | None) -> AdapterConfig:
    """The saved config on ``device`` (default: the saved one), validated; warns on a device change."""
    config = saved.config if device is None else saved.config.replace(device=str(device))
    config.validate()
    if config.bits != 16 and config.torch_device.type != saved.device_type:
        logger.warning(
            "the adapter was trained with its base quantized on %s, now quantizing on %s: bitsandbytes kernels may "
            "round differently, so results can differ slightly from the trained model", saved.device_type,
            config.torch_device.type,
        )
    return config


# ------------------------------------------------------------------------------------------ load
def load(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    *,
    device: str | None = None,
    allow_base_mismatch: bool = False,
    progress: bool = True,
    offload: str | None = None,
    gpu_memory: int | str | None = None,
    offload_plan: dict | None = None,
    offload_embedding: bool = False,
    autocast: bool = True,
):
    """Rebuild a trained model from its full-precision base and a folder written by :func:`save_adapter`.

    The base is streamed through :func:`qolora.model.prepare.build_model` with the saved configuration
    (same bits, quantization settings, dtypes) and the saved initial factors, so each residual is
    the training residual and quantizes to the same base (no QR / SVD is run); the trained A/B are
    then copied in. On the device type used for training the logits equal the trained model's.

    Args:
        base: the full-precision checkpoint the adapter was trained on (folder or hub id).
        adapter_dir: the adapter folder.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``; default: the saved setting.
        allow_base_mismatch: apply the adapter even if base weights differ from the training base
            (a warning instead of :class:`BaseMismatchError`).
        progress: show a progress bar.
        offload, gpu_memory, offload_plan: stream decoder layers' frozen base from host memory, as in
            :func:`qolora.prepare` (the loaded weights and logits are the same either way).
        offload_embedding: keep the frozen input embedding in host memory, as in :func:`qolora.prepare`
            (untied embeddings only; ``offload="auto"`` may choose it by itself).
        autocast: when the adapter was saved from a model that a trainer left under a mixed-precision
            wrapper (``forward_autocast`` in ``qolora_config.json``, e.g. TRL's default ``bf16=True``),
            wrap ``forward`` the same way, so the logits equal the trained object's; False computes in
            the configured dtypes instead.

    Returns:
        The model (as :func:`qolora.prepare` returns it, in eval mode, adapters trainable); its
        ``model.qolora`` record names the adapter folder.

    Raises:
        AdapterError: a problem with the adapter folder (before the base is read), or a base with
            other layers or shapes (before its weights are read).
        BaseMismatchError: a base weight differs from the training base (on the first such layer).
        ConfigError: a missing base, or an unusable ``device``.
    """
    # offload="auto" plans a training step with every layer checkpointed unless offload_plan says otherwise
    build = BuildOptions.checked(offload=offload, gpu_memory=gpu_memory, offload_plan=offload_plan,
                                 offload_embedding=offload_embedding, gradient_checkpointing=True)
    saved = read_adapter(adapter_dir)
    config = resolve_device_config(saved, device)
    checkpoint = BaseCheckpoint.open(base)
    check_base_structure(checkpoint.skeleton(), saved, str(base))
    placement = offload_layers_for(checkpoint.hf_config, config, build.offload, gpu_memory=build.gpu_memory,
                                   shape=build.offload_plan, offload_embedding=build.offload_embedding)
    check = FingerprintCheck(saved, str(base), allow_base_mismatch)
    seen: set[str] = set()

    def factors_for(name: str, weight: torch.Tensor):
        if name not in saved.layers:  # pragma: no cover - check_base_structure rules this out
            raise AdapterError(f"base layer {name} is targeted but the adapter has no weights for it")
        check(name, weight)
        seen.add(name)
        factors = saved.init[name] if saved.needs_residual else saved.weights[name]
        return tuple(t.clone() for t in factors)  # build_model may keep (and so train) what it gets

    model, report = build_model(checkpoint, config, factors_for, progress=progress, placement=placement,
                                host_embedding=placement is not None and placement.embedding)
    check.warn()
    unseen = [n for n in saved.layers if n not in seen]
    if unseen:  # pragma: no cover - check_base_structure rules this out
        raise AdapterError(f"base {base} never provided weights for adapted layer(s) {unseen[:3]}")
    layers = dict(adapter_layers(model))
    with torch.no_grad():
        for name, rec in saved.layers.items():
            layer = layers[name]
            settings = quant_settings(layer.base_layer)
            if settings != rec.quant:
                raise AdapterError(f"layer {name} was rebuilt with quantization {settings}, "
                                   f"but was trained with {rec.quant}")
            a, b = saved.weights[name]
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
    adopt(model, ModelRecord(config=config, base=str(base), base_dir=checkpoint.dir, report=report,
                             adapter_dir=Path(adapter_dir),
                             offload=placement.streamer if placement is not None else None))
    if autocast and saved.forward_autocast is not None:
        apply_autocast(model, {**saved.forward_autocast, "device_type": config.torch_device.type})
    model.eval()
    logger.info("loaded adapter %s (%s, rank %d, %d-bit) onto %s", adapter_dir, config.init, config.rank, config.bits,
                base)
    return model
