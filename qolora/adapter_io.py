"""Saving a trained qolora adapter, and loading it back onto its base *exactly* as it was trained.

An OLoRA/PiSSA adapter is only meaningful together with the base it was trained on: the frozen base
is not the checkpoint's ``W`` but the quantized residual ``q(W - s*B0@A0)``, where ``(A0, B0)`` are the
initial factors. So a saved adapter folder holds, next to the PEFT-compatible files::

    adapter_model.safetensors   trained A/B, PEFT key names (base_model.model.<layer>.lora_A.weight)
    adapter_config.json         a PEFT LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
    qolora_init.safetensors     the initial factors (A0, B0), same key names   [olora / pissa only]
    qolora_config.json          format version, the AdapterConfig, the dtypes it resolved to, per-layer
                                quantization settings, base-weight fingerprints (+ a combined one),
                                per-layer residual quantization error, sha256 of the weight files

:func:`load` rebuilds the model through :func:`qolora.prepare.build_model` with the saved config and
hands it the saved ``(A0, B0)``: no QR and no SVD are run, the residual is the same fp32 computation
as during training, so (on the same kind of device) it quantizes to the identical base, and after
copying the trained A/B the logits equal the trained model's bit for bit. Every problem with the
adapter folder (missing or corrupted file, unknown format version, inconsistent shapes) is found
before the base is read; a base whose weights differ from the training base is refused on the first
differing layer (``allow_base_mismatch=True`` downgrades that to a warning).

Writes are atomic: the folder is built under a temporary sibling name and renamed into place, so an
interrupted save never leaves a half-written adapter at the destination (``overwrite=True`` swaps
the old folder out only once the new one is complete).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .checkpoint import meta_model, resolve_model_dir, weight_fingerprint
from .config import AdapterConfig, ConfigError
from .inits import INITS
from .layer import AdapterLinear, adapter_layers
from .quant import quant_settings, quantization_kind

__all__ = [
    "AdapterError",
    "BaseMismatchError",
    "SavedAdapter",
    "LayerRecord",
    "FORMAT_VERSION",
    "save_adapter",
    "load",
    "read_adapter",
    "adapter_from_model",
    "peft_adapter_config",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "qolora-adapter"
FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
QOLORA_CONFIG = "qolora_config.json"
INIT_WEIGHTS = "qolora_init.safetensors"
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
        quant: :func:`qolora.quant.quant_settings` of the frozen base layer.
        fingerprint: :func:`qolora.checkpoint.weight_fingerprint` of the original checkpoint weight.
        weight_norm: ``||W||`` (Frobenius), or None when unknown.
        quant_error: ``||W_res - deq(q(W_res))||``: how far the trained layer is from the same
            adapter on the full-precision residual (for LoRA: ``||W - deq(q(W))||``), or None.
    """

    shape: tuple[int, int]
    fan_in_fan_out: bool
    quant: dict
    fingerprint: str
    weight_norm: float | None = None
    quant_error: float | None = None

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "fan_in_fan_out": self.fan_in_fan_out, "quant": self.quant,
                "fingerprint": self.fingerprint, "weight_norm": self.weight_norm, "quant_error": self.quant_error}


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _qolora_version() -> str:
    from . import __version__  # noqa: PLC0415 - at call time: the package is fully imported by then

    return __version__


# ---------------------------------------------------------------------------------- from a model
def adapter_from_model(model: nn.Module) -> SavedAdapter:
    """Snapshot the adapter of a prepared (or loaded) qolora model, tensors copied to the CPU.

    Raises:
        AdapterError: ``model`` was not built by qolora, has no adapter layers, or lost the initial
            factors a residual init needs.
    """
    config = getattr(model, "qolora_config", None)
    if not isinstance(config, AdapterConfig):
        raise AdapterError(
            f"{type(model).__name__} has no qolora_config: expected a model returned by qolora.prepare or qolora.load"
        )
    layers = list(adapter_layers(model))
    if not layers:
        raise AdapterError("the model has no qolora adapter layers (AdapterLinear) to save")
    needs_residual = INITS[config.init].needs_residual
    report = getattr(model, "qolora_report", None)
    rows = {r.name: r for r in getattr(report, "layers", [])}
    records, weights, init = {}, {}, {} if needs_residual else None
    for name, layer in layers:
        if needs_residual and getattr(layer, "init_factors", None) is None:
            raise AdapterError(f"layer {name} has no init_factors, which init={config.init!r} needs to be saved")
        row = rows.get(name)
        records[name] = LayerRecord(
            shape=(layer.out_features, layer.in_features),
            fan_in_fan_out=bool(layer.fan_in_fan_out),
            quant=quant_settings(layer.base_layer),
            fingerprint=str(getattr(layer, "base_fingerprint", "")),
            weight_norm=None if row is None else float(row.weight_norm),
            quant_error=None if row is None else float(row.error),
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
    pinned = config.replace(dtype=_dtype_name(config.torch_dtype), compute_dtype=_dtype_name(config.torch_compute_dtype))
    saved = SavedAdapter(
        config=pinned, layers=records, weights=weights, init=init, frozen_quantized=frozen,
        base_name_or_path=getattr(model, "name_or_path", None) or getattr(model, "qolora_base", None),
        device_type=layers[0][1].base_layer.weight.device.type,
    )
    saved.peft_target_modules = _peft_target_modules(saved, model)
    return saved


def _peft_target_modules(saved: SavedAdapter, model: nn.Module | None) -> list[str]:
    """Short layer names (``q_proj``) when they select exactly the adapted layers, else full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in saved.layers})
    if model is None:
        return short
    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = {id(m.base_layer) for _, m in adapter_layers(model)}
    others = [n for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, Conv1D)) and id(m) not in inside and m is not head and n not in saved.layers]
    if any(n.rsplit(".", 1)[-1] in short for n in others):
        return list(saved.layers)  # a short name would also catch a layer that was not adapted
    return short


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
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": base_name_or_path if base_name_or_path is not None else saved.base_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.rank if rank is None else rank,
        "lora_alpha": cfg.lora_alpha if alpha is None else alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules or saved.peft_target_modules or sorted({n.rsplit(".", 1)[-1] for n in saved.layers}),
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


# ---------------------------------------------------------------------------------- atomic folders
def check_out_dir(out_dir: str | os.PathLike, overwrite: bool, what: str = "output folder") -> Path:
    """Refuse an existing ``out_dir`` unless ``overwrite`` (and a file there always), before any work."""
    path = Path(out_dir).expanduser()
    if path.is_file() or path.is_symlink() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} exists and is a file; expected a folder path")
    if path.exists() and not overwrite:
        raise ConfigError(f"{what} {str(path)!r} already exists; pass overwrite=True to replace it, or choose another path")
    return path


@contextlib.contextmanager
def atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir``, on error it is deleted."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        check_out_dir(out_dir, overwrite)  # again: something may have appeared meanwhile
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------ save
def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a trained qolora adapter so that :func:`load` rebuilds the model exactly.

    The folder is also a PEFT LoRA folder (``init_lora_weights`` = ``"olora"`` / ``"pissa"`` / true).
    ``peft.PeftModel.from_pretrained`` on the original full-precision base then recomputes the initial
    factors itself and subtracts them: for OLoRA that matches qolora's residual up to fp32 rounding
    (the trained model with an unquantized residual); for PiSSA it does NOT (PEFT runs an exact SVD,
    qolora a seeded randomized one, so the residuals differ); on a bitsandbytes base PEFT quantizes
    twice. To leave qolora, use :func:`qolora.export.export_lora` (exact on the full-precision base,
    nothing recomputed) or :func:`qolora.export.merge`.

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
    out = check_out_dir(out_dir, overwrite, "adapter folder")
    saved = adapter_from_model(model)
    from safetensors.torch import save_file  # noqa: PLC0415

    weights = {}
    for name, (a, b) in saved.weights.items():
        weights[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        weights[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    peft_config = peft_adapter_config(saved)
    with atomic_dir(out, overwrite) as tmp:
        save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        files = {ADAPTER_WEIGHTS: sha256_file(tmp / ADAPTER_WEIGHTS)}
        if saved.init is not None:
            init = {}
            for name, (a0, b0) in saved.init.items():
                init[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a0
                init[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b0
            save_file(init, str(tmp / INIT_WEIGHTS), metadata={"format": "pt"})
            files[INIT_WEIGHTS] = sha256_file(tmp / INIT_WEIGHTS)
        _write_json(tmp / ADAPTER_CONFIG, peft_config)
        _write_json(tmp / QOLORA_CONFIG, {  # written last: its presence marks a complete folder
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "qolora_version": _qolora_version(),
            "adapter_config": saved.config.to_dict(),
            "scale": saved.scale,
            "device_type": saved.device_type,
            "base": {"name_or_path": None if saved.base_name_or_path is None else str(saved.base_name_or_path),
                     "fingerprint": saved.fingerprint},
            "layers": {n: r.to_dict() for n, r in saved.layers.items()},
            "frozen_quantized_layers": saved.frozen_quantized,
            "files": files,
        })
    logger.info("saved %d adapter layers (%s, rank %d) to %s", len(saved.layers), saved.config.init, saved.config.rank, out)
    return out


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
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise AdapterError(
            f"{path} is corrupted or was modified after saving: its sha256 differs from the one recorded in {QOLORA_CONFIG}"
        )
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError on bad files
        raise AdapterError(f"{path} is corrupted: cannot be read as safetensors ({type(exc).__name__}: {exc})") from exc


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
                           else f"adapter path {str(folder)!r} is a file; expected a folder written by qolora.save_adapter")
    if not (folder / QOLORA_CONFIG).is_file():
        hint = (f"it looks like a plain PEFT adapter ({ADAPTER_CONFIG} without {QOLORA_CONFIG}); load that with "
                "peft.PeftModel.from_pretrained" if (folder / ADAPTER_CONFIG).is_file() else "it is not an adapter folder")
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
                              quant_error=r.get("quant_error"))
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
        raise AdapterError(f"{folder / QOLORA_CONFIG} is corrupted: its combined base fingerprint does not match its per-layer ones")
    peft = _read_json(folder, ADAPTER_CONFIG)
    if peft.get("peft_type") != "LORA" or peft.get("r") != config.rank:
        raise AdapterError(f"{folder / ADAPTER_CONFIG} does not match {QOLORA_CONFIG}: peft_type={peft.get('peft_type')!r} "
                           f"r={peft.get('r')!r}, expected 'LORA' and r={config.rank}")

    files = meta["files"]
    weights = _factor_pairs(_read_tensors(folder, ADAPTER_WEIGHTS, files.get(ADAPTER_WEIGHTS)), layers, config.rank,
                            folder / ADAPTER_WEIGHTS)
    init = None
    if INITS[config.init].needs_residual:
        init = _factor_pairs(_read_tensors(folder, INIT_WEIGHTS, files.get(INIT_WEIGHTS)), layers, config.rank,
                             folder / INIT_WEIGHTS)
        init = {n: (a.float(), b.float()) for n, (a, b) in init.items()}
    return SavedAdapter(
        config=config, layers=layers, weights=weights, init=init,
        frozen_quantized=dict(meta.get("frozen_quantized_layers") or {}),
        base_name_or_path=meta["base"].get("name_or_path"), device_type=str(meta.get("device_type", "cpu")), path=folder,
        peft_target_modules=peft["target_modules"] if isinstance(peft.get("target_modules"), list) else None,
    )


# ------------------------------------------------------------------------------------ base checks
def check_base_structure(skeleton: nn.Module, saved: SavedAdapter, base: str) -> dict[str, nn.Module]:
    """Check that the base has exactly the adapter's target layers, with the recorded shapes.

    Returns the base's linear layers by name (from :func:`qolora.prepare.linear_layers`).

    Raises:
        AdapterError: naming the first layers that are missing, extra, or of another shape.
    """
    from .prepare import linear_layers, select_targets  # noqa: PLC0415

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
        shape = (module.out_features, module.in_features) if isinstance(module, nn.Linear) else (module.nf, module.nx)
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
                "allow_base_mismatch=True to apply it anyway"
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
):
    """Rebuild a trained model from its full-precision base and a folder written by :func:`save_adapter`.

    The base is streamed through :func:`qolora.prepare.build_model` with the saved configuration
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

    Returns:
        The model (as :func:`qolora.prepare` returns it, in eval mode, adapters trainable) with
        ``qolora_config``, ``qolora_base``, ``qolora_report`` and ``qolora_adapter`` set.

    Raises:
        AdapterError: a problem with the adapter folder (before the base is read), or a base with
            other layers or shapes (before its weights are read).
        BaseMismatchError: a base weight differs from the training base (on the first such layer).
        ConfigError: a missing base, or an unusable ``device``.
    """
    from .prepare import build_model  # noqa: PLC0415

    saved = read_adapter(adapter_dir)
    config = resolve_device_config(saved, device)
    model_dir = resolve_model_dir(base)
    check_base_structure(meta_model(model_dir)[0], saved, str(base))
    check = FingerprintCheck(saved, str(base), allow_base_mismatch)
    seen: set[str] = set()

    def factors_for(name: str, weight: torch.Tensor):
        if name not in saved.layers:  # pragma: no cover - check_base_structure rules this out
            raise AdapterError(f"base layer {name} is targeted but the adapter has no weights for it")
        check(name, weight)
        seen.add(name)
        factors = saved.init[name] if saved.needs_residual else saved.weights[name]
        return tuple(t.clone() for t in factors)  # build_model may keep (and so train) what it gets

    model, report = build_model(model_dir, config, factors_for, progress=progress)
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
                raise AdapterError(f"layer {name} was rebuilt with quantization {settings}, but was trained with {rec.quant}")
            a, b = saved.weights[name]
            if saved.needs_residual:  # our own copies: never tensors the optimizer will update
                layer.init_factors = tuple(t.clone() for t in saved.init[name])
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
    model.name_or_path = str(base)
    model.qolora_config = config
    model.qolora_base = str(model_dir)
    model.qolora_report = report
    model.qolora_adapter = str(adapter_dir)
    model.eval()
    logger.info("loaded adapter %s (%s, rank %d, %d-bit) onto %s", adapter_dir, config.init, config.rank, config.bits, base)
    return model
