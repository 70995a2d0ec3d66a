"""The saved-adapter format: what a trained qolora adapter folder holds, writing and reading it.

An OLoRA/PiSSA adapter is only meaningful together with the base it was trained on: the frozen base
is not the checkpoint's ``W`` but the quantized residual ``q(W - s*B0@A0)``, where ``(A0, B0)`` are the
initial factors. So a saved adapter folder holds, next to the PEFT-compatible files::

    adapter_model.safetensors   trained A/B, PEFT key names (base_model.model.<layer>.lora_A.weight)
    adapter_config.json         a PEFT LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
    qolora_init.safetensors     the initial factors (A0, B0), same key names   [olora / pissa only]
    qolora_config.json          format version, the AdapterConfig, the dtypes it resolved to, per-layer
                                quantization settings, base-weight fingerprints (+ a combined one),
                                per-layer residual quantization error, sha256 of the weight files, the
                                trainer's autocast wrapper if the model had one (:mod:`qolora.model.forward_wrap`)
    config.json                 ``model_type: qolora_adapter``: not a model. transformers'
                                ``from_pretrained`` on the folder fails with "model type
                                `qolora_adapter`" instead of rebuilding the wrong model from
                                ``adapter_config.json`` (the unquantized base plus the LoRA, silently)

:func:`qolora.model.load.load` rebuilds the model from the base and this folder, exactly (no QR or
SVD is run). :func:`read_adapter` finds every problem with the folder (missing or corrupted file, a
sha256 that differs from the recorded one, NaN/inf weights, unknown format version, inconsistent
shapes) before any base weight is read.

Writes are atomic: the folder is built under a temporary sibling name and renamed into place, so an
interrupted save never leaves a half-written adapter at the destination (``overwrite=True`` swaps
the old folder out only once the new one is complete).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters.layer import AdapterLinear, adapter_layers
from ..base.experts import ExpertSlot, expert_slots
from ..base.quant import quant_settings, quantization_kind
from ..base.reader import GUARD_MODEL_TYPE, linear_layers
from ..config import AdapterConfig, dtype_name
from ..errors import ConfigError
from ..files import FolderKind, atomic_dir, check_out_dir, sha256_file, write_json
from ..inits import INITS
from ..version import __version__
from .forward_wrap import trainer_autocast
from .record import record_of

__all__ = [
    "AdapterError",
    "BaseMismatchError",
    "SavedAdapter",
    "LayerRecord",
    "FORMAT_VERSION",
    "save_adapter",
    "read_adapter",
    "remove_adapter_folder",
    "adapter_from_model",
    "peft_adapter_config",
    "peft_targets",
    "write_adapter_files",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "qolora-adapter"
FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
QOLORA_CONFIG = "qolora_config.json"
INIT_WEIGHTS = "qolora_init.safetensors"
GUARD_CONFIG = "config.json"  # model_type qolora_adapter: transformers' from_pretrained refuses the folder
PEFT_PREFIX = "base_model.model."


class AdapterError(ConfigError):
    """A saved adapter folder is missing, corrupted, of an unknown format, or does not fit the base."""


class BaseMismatchError(AdapterError):
    """The base checkpoint's weights are not the ones the adapter was trained on."""


# ------------------------------------------------------------------------------------- records
@dataclass
class LayerRecord:
    """What is recorded about one adapted layer.

    Attributes:
        shape: ``(out, in)`` of the weight (after un-transposing a ``Conv1D`` weight).
        fan_in_fan_out: the checkpoint stores this weight transposed (GPT-2 ``Conv1D``).
        quant: :func:`qolora.base.quant.quant_settings` of the frozen base layer.
        fingerprint: :func:`qolora.checkpoint.weight_fingerprint` of the original checkpoint weight.
        weight_norm: ``||W||`` (Frobenius), or None when unknown.
        quant_error: ``||W_res - deq(q(W_res))||``: how far the trained layer is from the same
            adapter on the full-precision residual (for LoRA: ``||W - deq(q(W))||``), or None.
        expert: for one expert's projection of a MoE block, where it sits in transformers' fused 3-D
            parameter (:class:`qolora.base.experts.ExpertSlot`; the PEFT export needs it); None otherwise.
    """

    shape: tuple[int, int]
    fan_in_fan_out: bool
    quant: dict
    fingerprint: str
    weight_norm: float | None = None
    quant_error: float | None = None
    expert: ExpertSlot | None = None

    def to_dict(self) -> dict:
        d = {"shape": list(self.shape), "fan_in_fan_out": self.fan_in_fan_out, "quant": self.quant,
             "fingerprint": self.fingerprint, "weight_norm": self.weight_norm, "quant_error": self.quant_error}
        if self.expert is not None:
            d["expert"] = self.expert.to_dict()
        return d


@dataclass
class SavedAdapter:
    """A trained adapter with everything needed to rebuild, export or merge it (all tensors on the CPU).

    Attributes:
        config: the AdapterConfig, with ``dtype``/``compute_dtype`` pinned to what training used.
        layers: per adapted layer (model module name), its :class:`LayerRecord`, in module order.
        weights: per layer, the trained ``(A (r, in), B (out, r))``.
        init: per layer, the initial ``(A0, B0)`` subtracted from the base (None for ``init="lora"``).
        frozen_quantized: quantization settings of the base's other (non-adapted) quantized layers.
        base_name_or_path: the base the adapter was trained on, as the user named it.
        device_type: ``"cpu"`` / ``"cuda"``: where the base was quantized during training.
        path: the folder it was read from, if any.
        peft_target_modules: the ``target_modules`` written to ``adapter_config.json``.
        forward_autocast: ``{"device_type", "dtype"}`` of the mixed-precision wrapper a trainer left
            on ``model.forward`` (:func:`qolora.model.forward_wrap.trainer_autocast`), or None.
    """

    config: AdapterConfig
    layers: dict[str, LayerRecord]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    init: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    frozen_quantized: dict[str, dict] = field(default_factory=dict)
    base_name_or_path: str | None = None
    device_type: str = "cpu"
    path: Path | None = None
    peft_target_modules: list[str] | None = None
    forward_autocast: dict | None = None
    model_type: str | None = None

    @property
    def scale(self) -> float:
        return self.config.scale

    @property
    def needs_residual(self) -> bool:
        return INITS[self.config.init].needs_residual

    @property
    def fingerprint(self) -> str:
        """One fingerprint of the whole base, combined from the per-layer ones."""
        return combined_fingerprint({n: r.fingerprint for n, r in self.layers.items()})


def combined_fingerprint(per_layer: dict[str, str]) -> str:
    """A fingerprint of the base combined from ``{layer: fingerprint}`` (independent of dict order)."""
    return hashlib.sha256(json.dumps(sorted(per_layer.items())).encode()).hexdigest()[:16]



def _qolora_version() -> str:
    return __version__


# ---------------------------------------------------------------------------------- from a model
def adapter_from_model(model: nn.Module) -> SavedAdapter:
    """Snapshot the adapter of a prepared (or loaded) qolora model, tensors copied to the CPU.

    Raises:
        AdapterError: ``model`` was not built by qolora, has no adapter layers, or a layer lost the
            initial factors a residual init needs or its base fingerprint.
    """
    record = record_of(model)
    if record is None:
        raise AdapterError(
            f"{type(model).__name__} has no qolora record (model.qolora): expected a model returned by qolora.prepare "
            "or qolora.load"
        )
    if _is_sharded(model):  # its base weights are shards, no longer bitsandbytes parameters
        raise AdapterError(
            "the model is sharded by FSDP: take qolora.model.adapter_folder.adapter_from_model(model) before "
            "qolora.training.fsdp.shard_model, then write qolora.training.fsdp.with_trained_weights(that, "
            "qolora.training.fsdp.full_adapter_state(model)) with write_saved_adapter "
            "(qolora finetune --fsdp does this)"
        )
    config = record.config
    layers = list(adapter_layers(model))
    if not layers:
        raise AdapterError("the model has no qolora adapter layers (AdapterLinear) to save")
    needs_residual = INITS[config.init].needs_residual
    rows = {r.name: r for r in record.report.layers}
    slots = expert_slots(model)
    records, weights, init = {}, {}, {} if needs_residual else None
    for name, layer in layers:
        if needs_residual and layer.init_factors is None:
            raise AdapterError(f"layer {name} has no init_factors, which init={config.init!r} needs to be saved")
        if not layer.base_fingerprint:
            raise AdapterError(f"layer {name} has no base fingerprint: it was not built by qolora.prepare / "
                               "qolora.load")
        row = rows.get(name)
        records[name] = LayerRecord(
            shape=(layer.out_features, layer.in_features),
            fan_in_fan_out=bool(layer.fan_in_fan_out),
            quant=quant_settings(layer.base_layer),
            fingerprint=layer.base_fingerprint,
            weight_norm=None if row is None else float(row.weight_norm),
            quant_error=None if row is None else float(row.error),
            expert=slots.get(name),
        )
        weights[name] = (layer.lora_A.weight.detach().to("cpu", copy=True).contiguous(),
                         layer.lora_B.weight.detach().to("cpu", copy=True).contiguous())
        if needs_residual:
            a0, b0 = layer.init_factors
            init[name] = (a0.detach().to("cpu", torch.float32).contiguous(),
                          b0.detach().to("cpu", torch.float32).contiguous())
    base_layers = {id(layer.base_layer) for _, layer in layers}
    frozen = {
        name: quant_settings(module)
        for name, module in model.named_modules()
        if id(module) not in base_layers and not isinstance(module, AdapterLinear)
        and isinstance(getattr(module, "weight", None), torch.Tensor) and quantization_kind(module.weight) is not None
    }
    pinned = config.replace(dtype=dtype_name(config.torch_dtype),
                            compute_dtype=dtype_name(config.torch_compute_dtype))
    saved = SavedAdapter(
        config=pinned, layers=records, weights=weights, init=init, frozen_quantized=frozen,
        # A local base as its absolute folder (a relative path would not resolve from elsewhere); a hub id as is.
        base_name_or_path=str(record.base_dir.resolve()) if record.base_dir.is_dir() else record.base,
        device_type=layers[0][1].base_layer.weight.device.type,
        forward_autocast=trainer_autocast(model),
        model_type=getattr(getattr(model, "config", None), "model_type", None),
    )
    saved.peft_target_modules = _peft_target_modules(saved, model)
    return saved


def _is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have sharded it
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _peft_target_modules(saved: SavedAdapter, model: nn.Module | None) -> list[str]:
    """Short layer names (``q_proj``) when they select exactly the adapted layers, else full names.

    Experts' projections are not modules in transformers' model (PEFT adapts them as ``target_parameters``,
    :func:`peft_targets`), so they are neither listed nor counted as layers a name could catch.
    """
    plain = [n for n, r in saved.layers.items() if r.expert is None]
    short = sorted({n.rsplit(".", 1)[-1] for n in plain})
    if model is None:
        return short
    inside = {id(m.base_layer) for _, m in adapter_layers(model)}
    experts = expert_slots(model)
    others = [n for n, m in linear_layers(model).items()
              if id(m) not in inside and n not in saved.layers and n not in experts]
    if any(n.rsplit(".", 1)[-1] in short for n in others):
        return plain  # a short name would also catch a layer that was not adapted
    return short


def peft_targets(saved: SavedAdapter) -> tuple[list[str] | None, list[str]]:
    """PEFT's ``(target_modules, target_parameters)`` for this adapter.

    Experts' projections are targeted as the fused 3-D parameters they belong to (``experts.gate_up_proj``-style
    suffixes when every such parameter is adapted, i.e. the targets were chosen by short names or by default;
    full names when ``target_modules`` named layers in full). On transformers 5, PEFT rewrites the
    ``target_modules`` of Mixtral- and Qwen2-MoE-style architectures as if they came from transformers 4
    (``gate_proj`` / ``up_proj`` / ``down_proj`` become the fused experts' parameters and stop naming linear
    layers): plain layers of those names (DeepSeek's shared experts, dense MLPs) are targeted as parameters
    (``...mlp.gate_proj.weight``) instead, which PEFT leaves as they are.
    """
    plain = [n for n, r in saved.layers.items() if r.expert is None]
    modules = saved.peft_target_modules or sorted({n.rsplit(".", 1)[-1] for n in plain})
    remapped = _peft_remapped_names(saved.model_type)
    moved = [n for n in plain if n.rsplit(".", 1)[-1] in remapped]
    modules = [m for m in modules if m.rsplit(".", 1)[-1] not in remapped]
    fused = sorted({r.expert.fused for r in saved.layers.values() if r.expert is not None})
    targets = saved.config.target_modules
    if targets is None or not any("." in t for t in targets):
        fused = sorted({".".join(f.split(".")[-2:]) for f in fused})
    return modules or None, fused + [f"{n}.weight" for n in moved]


def _peft_remapped_names(model_type: str | None) -> set[str]:
    """The ``target_modules`` names PEFT (on transformers 5) moves onto fused expert parameters for ``model_type``."""
    if model_type is None:
        return set()
    try:  # PEFT's own tables where it is installed
        from peft.utils import transformers_weight_conversion as peft_conversion

        pattern, mapping = peft_conversion._MODEL_TO_CONVERSION_PATTERN, peft_conversion._MOE_TARGET_MODULE_MAPPING
    except Exception:  # noqa: BLE001 - no PEFT (or another layout of it): its 0.21 tables
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN

        pattern = {**_MODEL_TO_CONVERSION_PATTERN, "mixtral": "mixtral"}
        mapping = {"mixtral": ("gate", "w1", "w3", "w2"), "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj")}
    return set(mapping.get(pattern.get(model_type), ()))


def peft_adapter_config(
    saved: SavedAdapter,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    init_lora_weights: str | bool | None = None,
    target_modules: list[str] | None = None,
    base_name_or_path: str | None = None,
) -> dict:
    """The ``adapter_config.json`` of a PEFT ``LoraConfig`` for this adapter (overrides for exports).

    Writes the long-standing LoraConfig fields (those PEFT 0.21 writes that older versions also
    know; PEFT fills in the rest with their defaults).
    """
    cfg = saved.config
    if init_lora_weights is None:
        init_lora_weights = cfg.init if cfg.init in ("olora", "pissa") else True
    modules, parameters = peft_targets(saved)
    modules = target_modules or modules
    extra = {"target_parameters": parameters} if parameters else {}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": base_name_or_path if base_name_or_path is not None else saved.base_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.rank if rank is None else rank,
        "lora_alpha": cfg.lora_alpha if alpha is None else alpha,
        "lora_dropout": 0.0 if parameters else cfg.dropout,  # PEFT adapts 3-D parameters without dropout
        "target_modules": modules,
        **extra,
        "exclude_modules": None,
        "fan_in_fan_out": any(r.fan_in_fan_out for r in saved.layers.values()),
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "modules_to_save": None,
        "init_lora_weights": init_lora_weights,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "use_dora": False,
        "layer_replication": None,
    }


# ------------------------------------------------------------------------------------------ save
def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a trained qolora adapter so that :func:`load` rebuilds the model exactly.

    The folder is also a PEFT LoRA folder (``init_lora_weights`` = ``"olora"`` / ``"pissa"`` / true).
    ``peft.PeftModel.from_pretrained`` on the original full-precision base then recomputes the initial
    factors itself and subtracts them: for OLoRA that matches qolora's residual up to fp32 rounding
    (the trained model with an unquantized residual); for PiSSA it does NOT (PEFT runs an exact SVD,
    qolora a seeded randomized one, so the residuals differ); on a bitsandbytes base PEFT quantizes
    twice; with ``refine`` > 0 (recorded in ``qolora_config.json``) PEFT's recomputed factors are the
    unrefined ones, so it does not match either. To leave qolora, use :func:`qolora.export.peft.export_lora`
    (exact on the full-precision base, nothing recomputed) or :func:`qolora.export.merge.merge`.

    A mixed-precision wrapper that a trainer left on ``model.forward`` (accelerate's autocast, e.g.
    after ``SFTTrainer`` with ``bf16=True``) is recorded, and :func:`load` puts it back, so the
    reloaded model computes the same logits as ``model`` (see :mod:`qolora.model.forward_wrap`).

    Args:
        model: a model returned by :func:`qolora.prepare` or :func:`load` (trained or not).
        out_dir: the adapter folder to write (see the module docstring for its files).
        overwrite: replace an existing ``out_dir`` (atomically, once the new folder is complete).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: ``out_dir`` exists (and not ``overwrite``) or is a file.
        AdapterError: ``model`` is not a qolora model.
    """
    out = check_out_dir(out_dir, overwrite, ADAPTER_FOLDER)
    saved = adapter_from_model(model)
    if saved.forward_autocast is not None:
        logger.info("model.forward carries a trainer's mixed-precision wrapper (autocast %s on %s): recorded, "
                    "qolora.load puts it back", saved.forward_autocast["dtype"], saved.forward_autocast["device_type"])
    return write_saved_adapter(saved, out, overwrite=overwrite)


def write_saved_adapter(saved: SavedAdapter, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``saved`` as an adapter folder, as :func:`save_adapter` does for a model (e.g. a snapshot
    taken before FSDP sharding with the trained weights filled in, :func:`qolora.training.fsdp.with_trained_weights`).

    Raises:
        ConfigError: ``out_dir`` exists (and not ``overwrite``) or is a file.
    """
    out = check_out_dir(out_dir, overwrite, ADAPTER_FOLDER)
    with atomic_dir(out, overwrite, ADAPTER_FOLDER) as tmp:
        write_adapter_files(saved, tmp)
    logger.info("saved %d adapter layers (%s, rank %d) to %s", len(saved.layers), saved.config.init,
                saved.config.rank, out)
    return out


def write_adapter_files(saved: SavedAdapter, folder: Path) -> list[str]:
    """Write the files of an adapter folder (see the module docstring) into ``folder``, record last.

    ``folder`` is a fresh temporary folder: :func:`save_adapter` renames it into place, and
    :func:`qolora.model.hf_compat.save_pretrained` moves the files into a trainer's checkpoint folder.
    Returns the file names, in the order they should be published (``qolora_config.json`` last).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    weights = {}
    for name, (a, b) in saved.weights.items():
        weights[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        weights[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    files = {ADAPTER_WEIGHTS: sha256_file(folder / ADAPTER_WEIGHTS)}
    if saved.init is not None:
        init = {}
        for name, (a0, b0) in saved.init.items():
            init[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a0
            init[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b0
        save_file(init, str(folder / INIT_WEIGHTS), metadata={"format": "pt"})
        files[INIT_WEIGHTS] = sha256_file(folder / INIT_WEIGHTS)
    write_json(folder / ADAPTER_CONFIG, peft_adapter_config(saved))
    write_json(folder / GUARD_CONFIG, guard_config(saved))
    write_json(folder / QOLORA_CONFIG, {  # written last: its presence marks a complete folder
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "qolora_version": _qolora_version(),
        "adapter_config": saved.config.to_dict(),
        "scale": saved.scale,
        "device_type": saved.device_type,
        "base": {"name_or_path": None if saved.base_name_or_path is None else str(saved.base_name_or_path),
                 "fingerprint": saved.fingerprint, "model_type": saved.model_type},
        "layers": {n: r.to_dict() for n, r in saved.layers.items()},
        "frozen_quantized_layers": saved.frozen_quantized,
        "forward_autocast": saved.forward_autocast,
        "files": files,
    })
    return [*files, ADAPTER_CONFIG, GUARD_CONFIG, QOLORA_CONFIG]


def guard_config(saved: SavedAdapter) -> dict:
    """The ``config.json`` of an adapter folder: a model type transformers does not know, and why."""
    return {
        "model_type": GUARD_MODEL_TYPE,
        "qolora_adapter": {
            "note": "a qolora adapter folder, not a model: its base layers are the quantized OLoRA/PiSSA residual, "
                    "which from_pretrained cannot rebuild. Load it with qolora.load(base, this_folder); for PEFT / "
                    "vLLM use qolora.export_lora or qolora.merge.",
            "base_model_name_or_path": None if saved.base_name_or_path is None else str(saved.base_name_or_path),
        },
    }


def is_guard_config(path: Path) -> bool:
    """Whether ``path`` is the ``config.json`` qolora writes into an adapter folder (not a model's)."""
    try:
        return json.loads(Path(path).read_text()).get("model_type") == GUARD_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


#: An adapter folder as :func:`save_adapter` writes it (``overwrite`` replaces only such a folder).
ADAPTER_FOLDER = FolderKind("adapter folder", QOLORA_CONFIG,
                            (QOLORA_CONFIG, ADAPTER_WEIGHTS, ADAPTER_CONFIG, INIT_WEIGHTS, GUARD_CONFIG),
                            accept=lambda path: path.name != GUARD_CONFIG or is_guard_config(path))


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that qolora's adapter format does not write (all of them without its record)."""
    return ADAPTER_FOLDER.foreign(folder)


def remove_adapter_folder(folder: Path) -> bool:
    """Delete an adapter folder qolora wrote (its record and files), and nothing else.

    A folder without a qolora record is not qolora's and stays; files qolora did not write keep the
    folder in place (with a warning). Returns whether the folder is gone.
    """
    folder = Path(folder)
    if not folder.exists():
        return True
    if not (folder / QOLORA_CONFIG).is_file():
        logger.warning("left %s in place: it has no %s, so qolora did not write it", folder, QOLORA_CONFIG)
        return False
    for name in (QOLORA_CONFIG, ADAPTER_WEIGHTS, ADAPTER_CONFIG, INIT_WEIGHTS):
        (folder / name).unlink(missing_ok=True)
    if is_guard_config(folder / GUARD_CONFIG):
        (folder / GUARD_CONFIG).unlink()
    try:
        folder.rmdir()
    except OSError:
        logger.warning("left %s in place: it holds files qolora did not write", folder)
        return False
    return True


# ------------------------------------------------------------------------------------------ read
def _read_json(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise AdapterError(f"adapter folder {str(folder)!r} has no {name}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is corrupted: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{path} is corrupted: expected a JSON object, got {type(data).__name__}")
    return data


def _read_tensors(folder: Path, name: str, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    path = folder / name
    if not path.is_file():
        raise AdapterError(f"adapter folder {str(folder)!r} is incomplete: {name} is missing")
    if not isinstance(expected_sha256, str):
        raise AdapterError(f"{folder / QOLORA_CONFIG} is corrupted: it records no sha256 for {name}")
    if sha256_file(path) != expected_sha256:
        raise AdapterError(
            f"{path} is corrupted or was modified after saving: its sha256 differs from the one recorded in "
            f"{QOLORA_CONFIG}"
        )
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError on bad files
        raise AdapterError(f"{path} is corrupted: cannot be read as safetensors ({type(exc).__name__}: {exc})") from exc
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise AdapterError(f"{path}: tensor {bad!r} holds NaN/inf values (did training diverge?); a usable adapter "
                           "is finite")
    return tensors


def _factor_pairs(tensors: dict, layers: dict[str, LayerRecord], rank: int, path: Path) -> dict:
    """``{layer: (A, B)}`` from PEFT-named tensors, checking keys and shapes against the records."""
    pairs, expected = {}, set()
    for name, rec in layers.items():
        ka, kb = f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"
        expected.update((ka, kb))
        if ka not in tensors or kb not in tensors:
            raise AdapterError(f"{path} is corrupted: no lora_A/lora_B weights for layer {name}")
        a, b = tensors[ka], tensors[kb]
        out_f, in_f = rec.shape
        if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
            raise AdapterError(
                f"{path}: layer {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected "
                f"({rank}, {in_f}) and ({out_f}, {rank}) for rank {rank} on a {out_f}x{in_f} weight"
            )
        pairs[name] = (a, b)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise AdapterError(f"{path} holds tensors for layers the adapter does not record, e.g. {extra[:3]}")
    return pairs


def read_adapter(adapter_dir: str | os.PathLike) -> SavedAdapter:
    """Read and validate a folder written by :func:`save_adapter` (the base is not touched).

    Raises:
        AdapterError: one clear error for a missing folder or file, invalid JSON, an unknown format
            version, a weight file whose sha256 differs from the recorded one, or tensors whose
            names or shapes do not match the recorded layers.
    """
    folder = Path(adapter_dir).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {str(folder)!r} does not exist" if not folder.exists()
                           else f"adapter path {str(folder)!r} is a file; expected a folder written by "
                                "qolora.save_adapter")
    if not (folder / QOLORA_CONFIG).is_file():
        if (folder / ADAPTER_CONFIG).is_file():
            hint = (f"it looks like a plain PEFT adapter ({ADAPTER_CONFIG} without {QOLORA_CONFIG}); load that with "
                    "peft.PeftModel.from_pretrained")
        elif (folder / "model.safetensors").is_file() and (folder / "trainer_state.json").is_file():
            hint = ("it is a transformers Trainer checkpoint holding a full model.safetensors dump, written before "
                    "qolora models saved their adapter through save_pretrained (qolora 0.1); retrain, or rebuild the "
                    "model with qolora.prepare and copy the lora_A/lora_B tensors of that file into it")
        else:
            hint = "it is not an adapter folder"
        raise AdapterError(f"adapter folder {str(folder)!r} has no {QOLORA_CONFIG}: {hint}; qolora.load needs a folder "
                           "written by qolora.save_adapter")
    meta = _read_json(folder, QOLORA_CONFIG)
    version = meta.get("format_version")
    if meta.get("format") != FORMAT_NAME or not isinstance(version, int) or isinstance(version, bool):
        raise AdapterError(f"{folder / QOLORA_CONFIG}: not a qolora adapter record (format={meta.get('format')!r}, "
                           f"format_version={version!r}); expected format {FORMAT_NAME!r}")
    if version != FORMAT_VERSION:
        newer = version > FORMAT_VERSION
        raise AdapterError(
            f"{folder / QOLORA_CONFIG}: unknown format_version {version}; this qolora "
            f"({_qolora_version()}) reads format_version {FORMAT_VERSION}"
            + (" - the adapter was written by a newer qolora, upgrade to load it" if newer else "")
        )
    missing = [k for k in ("adapter_config", "layers", "files", "base") if k not in meta]
    if missing:
        raise AdapterError(f"{folder / QOLORA_CONFIG} is corrupted: missing field(s) {missing}")
    try:
        raw = dict(meta["adapter_config"])
        if raw.get("target_modules") is not None:
            raw["target_modules"] = tuple(raw["target_modules"])
        config = AdapterConfig(**raw)
        problems = [p for p in config.problems() if not p.startswith("device=")]
        layers = {
            name: LayerRecord(shape=tuple(r["shape"]), fan_in_fan_out=bool(r["fan_in_fan_out"]), quant=dict(r["quant"]),
                              fingerprint=str(r["fingerprint"]), weight_norm=r.get("weight_norm"),
                              quant_error=r.get("quant_error"),
                              expert=ExpertSlot.from_dict(r["expert"]) if r.get("expert") is not None else None)
            for name, r in meta["layers"].items()
        }
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise AdapterError(f"{folder / QOLORA_CONFIG} is corrupted: {type(exc).__name__}: {exc}") from exc
    if problems:
        raise AdapterError([f"{folder / QOLORA_CONFIG} holds an invalid adapter config: {p}" for p in problems])
    if not layers:
        raise AdapterError(f"{folder / QOLORA_CONFIG} is corrupted: it records no adapted layers")
    recorded = meta["base"].get("fingerprint")
    if recorded != combined_fingerprint({n: r.fingerprint for n, r in layers.items()}):
        raise AdapterError(f"{folder / QOLORA_CONFIG} is corrupted: its combined base fingerprint does not match "
                           "its per-layer ones")
    peft = _read_json(folder, ADAPTER_CONFIG)
    if peft.get("peft_type") != "LORA" or peft.get("r") != config.rank:
        raise AdapterError(f"{folder / ADAPTER_CONFIG} does not match {QOLORA_CONFIG}: "
                           f"peft_type={peft.get('peft_type')!r} "
                           f"r={peft.get('r')!r}, expected 'LORA' and r={config.rank}")

    files = meta["files"]
    if not isinstance(files, dict):
        raise AdapterError(f"{folder / QOLORA_CONFIG} is corrupted: 'files' must map file names to sha256")
    weights = _factor_pairs(_read_tensors(folder, ADAPTER_WEIGHTS, files.get(ADAPTER_WEIGHTS)), layers, config.rank,
                            folder / ADAPTER_WEIGHTS)
    init = None
    if INITS[config.init].needs_residual:
        init = _factor_pairs(_read_tensors(folder, INIT_WEIGHTS, files.get(INIT_WEIGHTS)), layers, config.rank,
                             folder / INIT_WEIGHTS)
        init = {n: (a.float(), b.float()) for n, (a, b) in init.items()}
    autocast = meta.get("forward_autocast")
    if autocast is not None and not (isinstance(autocast, dict) and isinstance(autocast.get("device_type"), str)
                                     and autocast.get("dtype") in ("bfloat16", "float16")):
        raise AdapterError(f"{folder / QOLORA_CONFIG} is corrupted: forward_autocast={autocast!r}; expected null or "
                           "{'device_type': 'cpu'|'cuda'|..., 'dtype': 'bfloat16'|'float16'}")
    return SavedAdapter(
        config=config, layers=layers, weights=weights, init=init, forward_autocast=autocast,
        frozen_quantized=dict(meta.get("frozen_quantized_layers") or {}),
        base_name_or_path=meta["base"].get("name_or_path"), device_type=str(meta.get("device_type", "cpu")),
        model_type=meta["base"].get("model_type"),
        path=folder,
        peft_target_modules=peft["target_modules"] if isinstance(peft.get("target_modules"), list) else None,
    )
