"""The one reader of base checkpoints: each weight read once, checked, handed out as fp32 ``(out, in)``.

``prepare``, ``load`` and ``merge`` all walk a transformers checkpoint the same way, so they share
this module rather than three loops that drift apart::

    BaseCheckpoint.open("folder-or-hub-id")      config.json checked (no remote code), shards listed
        .skeleton(dtype)                         the model on the meta device: names, shapes, no memory
        .stream(skeleton, wanted, device)        one tensor at a time, in file order:
            LinearWeight(module, key, W)         W: fp32 (out, in) on ``device`` for each wanted linear
                                                 layer (and each layer stored quantized, dequantized)
            OtherTensor(key, name, tensor)       everything else, as stored, on the CPU

What the stream takes care of, once for everyone: checkpoint key -> model name (with or without the
base-model prefix), the parts of a layer stored quantized by bitsandbytes (gathered, dequantized),
GPT-2 ``Conv1D`` weights stored ``(in, out)`` (transposed), widening to fp32 on the device (moving
the stored dtype is cheaper than converting on the host first), and the checks that make a corrupt
checkpoint fail with its tensor and file named before it can poison a model: every tensor's shape
against the skeleton, no NaN/inf in any floating tensor, unreadable shards, index files pointing
outside the folder. ``config.json`` is read with ``trust_remote_code=False``: a folder whose model
needs its own Python code is refused, never run.

Safetensors shards are memory-mapped, so peak memory is one tensor at a time, never the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError
from .config_sizes import check_sizes
from .quant import dequantize_stored, stored_group_complete, stored_part

__all__ = [
    "BaseCheckpoint",
    "LinearWeight",
    "OtherTensor",
    "checkpoint_key_map",
    "hf_config_from_dict",
    "load_hf_config",
    "meta_skeleton",
    "layer_shape",
    "linear_layers",
    "resolve_model_dir",
    "select_targets",
    "weight_fingerprint",
]

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILES_FROM_HUB = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_INDEXES = (("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"))


# --------------------------------------------------------------------------------- finding it
def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local folder holding ``config.json`` and weights, from a path or a hub id.

    Raises:
        ConfigError: the path does not exist / is not a model folder, or the id is not on the hub
            (or not cached while offline).
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {text!r} has no config.json; expected a transformers checkpoint folder")
        return path
    if path.exists():
        raise ConfigError(f"model {text!r} is a file; expected a transformers checkpoint folder or a hub id")
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):  # a path, not an 'org/name' id
        raise ConfigError(f"model path does not exist: {text!r} "
                          "(expected a local checkpoint folder or a hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=_FILES_FROM_HUB))
    except Exception as exc:  # the hub raises many types: offline, not found, gated, network
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise ConfigError(
            f"model {text!r} is not a local folder and could not be fetched from the hub{hint}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def hf_config_from_dict(raw: Mapping, source: str):
    """A transformers config from the contents of a ``config.json``, never running code from a folder.

    A known ``model_type`` gets transformers' built-in classes even when the folder also offers its
    own code (``auto_map``, ignored); an unknown one is refused.

    Raises:
        ConfigError: an unknown ``model_type`` (naming ``source``), or one only the folder's code knows.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .adapter_io import GUARD_MODEL_TYPE  # lazily: adapter_io reads checkpoints through this module

    model_type = raw.get("model_type")
    if model_type == GUARD_MODEL_TYPE:
        folder = Path(source).parent if Path(source).name == "config.json" else Path(source)
        raise ConfigError(f"{folder} is a qolora adapter folder, not a model. Use it with its base: "
                          f"`qolora chat --adapter {folder}`, `qolora merge BASE {folder} OUT`, or "
                          f"qolora.load(BASE, {str(folder)!r}); to train further, pass the base as --model")
    if model_type not in CONFIG_MAPPING:
        custom = (" and asks for remote code from the model folder (auto_map); qolora never runs code from a model "
                  "folder") if raw.get("auto_map") else ""
        raise ConfigError(f"{source}: model_type {model_type!r} is not an architecture "
                          f"this transformers knows{custom}. "
                          "Use a checkpoint of a built-in transformers architecture (llama, mistral, qwen2, gpt2, ...)")
    if raw.get("auto_map"):
        logger.info("%s: using transformers' built-in %s classes; the folder's own code (auto_map) is ignored",
                    source, model_type)
    options = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "transformers_version")}
    attribute_map = getattr(CONFIG_MAPPING[model_type], "attribute_map", {})
    check_sizes(raw, source, attribute_map=attribute_map)  # before transformers sees them
    try:
        config = AutoConfig.for_model(model_type, **options)
    except Exception as exc:  # transformers' config validation raises ValueError, TypeError, its own types...
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{source} cannot be read as a {model_type} config: {type(exc).__name__}: {detail}") from exc
    check_sizes(raw, source, config, attribute_map)  # ... and with the defaults it filled in
    return config


def load_hf_config(config_json: Path):
    """The transformers config in a ``config.json`` file (:func:`hf_config_from_dict`).

    Raises:
        ConfigError: a missing or unreadable file, not a JSON object, or a refused ``model_type``.
    """
    path = Path(config_json)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable JSON config ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return hf_config_from_dict(raw, str(path))


def meta_skeleton(hf_config, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of ``hf_config`` on the ``meta`` device: names and shapes, no memory, no weight.

    Buffers (e.g. rotary frequencies, computed at construction) stay real, on the CPU.

    Raises:
        ConfigError: the architecture has no causal-LM class in transformers.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False,
                                                    **({"dtype": dtype} if dtype is not None else {}))
    except ValueError as exc:
        raise ConfigError(f"model_type {hf_config.model_type!r} has no causal-LM class in transformers: {exc}") from exc
    except Exception as exc:  # a config whose numbers do not make a model (shapes that do not divide, ...)
        raise ConfigError(f"the {hf_config.model_type} config does not describe a buildable model: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc


# ----------------------------------------------------------------------------- model structure
def _linear_classes() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear (or GPT-2 ``Conv1D``) layer of ``model`` except its output head, by name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    classes = _linear_classes()
    return {name: m for name, m in model.named_modules() if isinstance(m, classes) and m is not head and name}


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a Linear or Conv1D (which stores its weight as ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.nf, module.nx


def is_transposed(module: nn.Module) -> bool:
    """The checkpoint stores this layer's weight ``(in, out)`` (GPT-2 ``Conv1D``)."""
    return not isinstance(module, nn.Linear)


def select_targets(linears: Mapping[str, nn.Module], target_modules: tuple[str, ...] | None) -> list[str]:
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


def checkpoint_key_map(model: nn.Module) -> Callable[[str], str | None]:
    """Checkpoint key -> the model's parameter name (handles a missing or extra base-model prefix)."""
    expected = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") + "."

    def to_model(key: str) -> str | None:
        if key in expected:
            return key
        if prefix + key in expected:
            return prefix + key
        if key.startswith(prefix) and key[len(prefix):] in expected:
            return key[len(prefix):]
        return None

    return to_model


def weight_fingerprint(weight: torch.Tensor, samples: int = 1024) -> str:
    """A cheap, device-independent fingerprint of a checkpoint weight.

    Hashes the shape and an evenly strided sample of exact values (the checkpoint's values, so the
    same on every device and every run), not a float sum whose rounding depends on the device.
    """
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    sample = flat[::step][:samples].to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(weight.shape)).encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ the stream
@dataclass
class LinearWeight:
    """A linear layer's weight, ready to factor: fp32 ``(out, in)`` on the compute device."""

    module: str  # the model's module name, e.g. "model.layers.0.self_attn.q_proj"
    key: str  # the checkpoint key of its weight (where a merge writes it back)
    weight: torch.Tensor  # (out, in) fp32


@dataclass
class OtherTensor:
    """Any other tensor of the checkpoint, as stored, on the CPU."""

    key: str
    name: str | None  # the model's name for it; None when the model has no such tensor
    tensor: torch.Tensor


class BaseCheckpoint:
    """A transformers checkpoint folder, read one tensor at a time (see the module docstring).

    Attributes:
        dir: the folder.
        hf_config: its transformers config (``quantization_config`` removed).
        stored_kind: ``"4bit"`` / ``"8bit"`` when the checkpoint is stored quantized by bitsandbytes.
        files: the weight files, in shard order.
    """

    def __init__(self, model_dir: Path, hf_config, stored_kind: str | None, files: list[Path], source=None):
        self.dir, self.hf_config, self.stored_kind, self.files = model_dir, hf_config, stored_kind, files
        self.source = source  # a generator of tensors instead of files (from_source)

    @classmethod
    def of(cls, model) -> BaseCheckpoint:
        """``model`` as a checkpoint: a BaseCheckpoint itself, a tensor source (:meth:`from_source`), or a
        folder / hub id (:meth:`open`)."""
        if isinstance(model, BaseCheckpoint):
            return model
        if hasattr(model, "iter_tensors") and hasattr(model, "hf_config"):
            return cls.from_source(model)
        return cls.open(model)

    @classmethod
    def from_source(cls, source, *, name: str | None = None) -> BaseCheckpoint:
        """A checkpoint generated rather than read: any object with ``hf_config()`` and
        ``iter_tensors(device)`` yielding ``(key, tensor)`` in checkpoint naming, such as
        :class:`qolora.synthetic.SyntheticCheckpoint` (a 70B model streamed into ``prepare`` with no
        disk). The tensors are generated on the compute device and checked like a file's. ``dir`` is a
        descriptive ``<name>`` path that exists nowhere (merge and load need a real folder)."""
        name = name or repr(source)
        hf_config = source.hf_config()
        if getattr(hf_config, "quantization_config", None) is not None:
            raise ConfigError(f"{name}: a source stored quantized is not supported")
        hf_config_from_dict({"model_type": hf_config.model_type}, name)  # a known architecture
        return cls(Path(f"<{name}>"), hf_config, None, [], source=source)

    @classmethod
    def open(cls, model: str | os.PathLike) -> BaseCheckpoint:
        """Find the checkpoint and check its config and file list; no weight is read.

        Raises:
            ConfigError: a missing folder or hub id, a config needing remote code or of an unknown
                architecture, a quantization method other than bitsandbytes, a broken or missing
                index, missing shards, or shards outside the folder.
        """
        model_dir = resolve_model_dir(model)
        hf_config = load_hf_config(model_dir / "config.json")
        stored_kind = None
        stored = getattr(hf_config, "quantization_config", None)
        if stored is not None:
            stored = stored if isinstance(stored, dict) else stored.to_dict()
            if stored.get("quant_method") != "bitsandbytes":
                raise ConfigError(
                    f"checkpoint {model_dir} is stored quantized with {stored.get('quant_method')!r}; qolora reads "
                    "full-precision checkpoints, or bitsandbytes 4/8-bit ones (dequantized, then requantized)"
                )
            stored_kind = "4bit" if stored.get("load_in_4bit") else "8bit"
            del hf_config.quantization_config
        return cls(model_dir, hf_config, stored_kind, _weight_files(model_dir))

    def skeleton(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The model on the ``meta`` device (:func:`meta_skeleton`)."""
        return meta_skeleton(self.hf_config, dtype)

    def tensors(self, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor, Path]]:
        """``(key, tensor, file)`` one at a time, lazily (safetensors are memory-mapped on the CPU; a
        generated checkpoint makes its tensors on ``device``)."""
        if self.source is not None:
            for key, tensor in self.source.iter_tensors(device):
                yield key, tensor, self.dir
            return
        for file in self.files:
            with _naming_damage(file):
                yield from _read_file(file)

    def tensor_count(self) -> int | None:
        """How many tensors the checkpoint holds, from the safetensors headers (None for ``.bin``)."""
        if self.source is not None:
            return len(self.source.tensors)
        if any(f.suffix != ".safetensors" for f in self.files):
            return None
        from safetensors import safe_open

        count = 0
        for file in self.files:
            with _naming_damage(file), safe_open(str(file), framework="pt", device="cpu") as f:
                count += len(f.keys())
        return count

    def stream(self, skeleton: nn.Module, wanted: set[str], device: torch.device
               ) -> Iterator[LinearWeight | OtherTensor]:
        """Every tensor of the checkpoint, checked: wanted linear weights as :class:`LinearWeight`.

        Args:
            skeleton: the model from :meth:`skeleton` (names and shapes).
            wanted: module names of the linear layers to hand out as fp32 ``(out, in)`` weights;
                layers stored quantized are always handed out so (they must be dequantized).
            device: where the weights are widened and checked.

        Raises:
            ConfigError: naming the tensor and file: a shape other than the model's, a NaN/inf, a
                quantized layer whose parts are incomplete, or an unreadable file.
        """
        linears = linear_layers(skeleton)
        to_model = checkpoint_key_map(skeleton)
        shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        pending: dict[str, dict[str, torch.Tensor]] = {}  # parts of layers stored quantized
        keys: dict[str, str] = {}
        where: dict[str, Path] = {}
        for key, tensor, file in self.tensors(device):
            name = to_model(key)
            part = stored_part(name or key, linears) if self.stored_kind else None
            if part is not None:
                module, leaf = part
                if leaf == "weight_format":  # bitsandbytes' 8-bit layout tag: nothing to dequantize with
                    continue
                group = pending.setdefault(module, {})
                group[leaf] = tensor
                if leaf == "weight":
                    keys[module], where[module] = key, file
                if stored_group_complete(group):
                    weight = dequantize_stored(pending.pop(module), device)
                    yield LinearWeight(module, keys[module], _checked(weight, layer_shape(linears[module]),
                                                                      keys[module], where[module]))
                continue
            if name is None:
                yield OtherTensor(key, None, tensor)
                continue
            _check_shape(tensor, shapes[name], key, file)
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in wanted:
                # Move in the stored dtype, then widen on the device: converting on the CPU first
                # costs more than the whole transfer.
                weight = tensor.to(device).to(torch.float32, copy=True)
                if is_transposed(linears[module]):
                    weight = weight.T.contiguous()  # (in, out) -> (out, in)
                yield LinearWeight(module, key, _checked(weight, layer_shape(linears[module]), key, file))
            else:
                if tensor.is_floating_point():
                    _check_finite(tensor, key, file)
                yield OtherTensor(key, name, tensor)
        if pending:
            module, group = next(iter(pending.items()))
            raise ConfigError(f"checkpoint {self.dir} is incomplete: the quantized layer {module} has only the parts "
                              f"{sorted(group)} ({len(pending)} such layer(s)); a bitsandbytes-stored layer needs its "
                              "weight and its quantization statistics")


def _weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in shard order (safetensors preferred)."""
    root = model_dir.resolve()
    for index_name, single in _INDEXES:
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
                if not all(isinstance(s, str) for s in shards):
                    raise TypeError("shard names must be strings")
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"{index} is not a valid index: expected JSON with a 'weight_map' of tensor name "
                                  f"-> shard file ({type(exc).__name__}: {exc})") from exc
            outside = [s for s in shards if not (model_dir / s).resolve().is_relative_to(root)]
            if outside:
                raise ConfigError(f"{index} points outside the model folder ({outside[:3]}); shards must be files "
                                  "inside the folder")
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise ConfigError(f"checkpoint {model_dir} is incomplete: shard(s) {missing} listed in {index_name} "
                                  "are missing")
            return [model_dir / s for s in shards]
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise ConfigError(
        f"no weights found in {model_dir}: expected model.safetensors, a sharded model.safetensors.index.json, "
        "or pytorch_model.bin"
    )


@contextlib.contextmanager
def _naming_damage(file: Path) -> Iterator[None]:
    """Turn a reader's raw error on a damaged weight file into one that names the file."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:  # safetensors / torch raise many types for a damaged file
        raise ConfigError(f"weight file {file} is damaged and cannot be read: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _read_file(file: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key), file
    else:  # weights_only: a pickle can never run code
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        for key in list(state):
            yield key, state.pop(key), file


def _check_shape(tensor: torch.Tensor, expected: tuple[int, ...], key: str, file: Path) -> None:
    if tuple(tensor.shape) != expected:
        raise ConfigError(f"tensor {key!r} in {file} has shape {tuple(tensor.shape)}, but the model's config.json "
                          f"makes it {expected}: the weights do not belong to this config")


def _check_finite(tensor: torch.Tensor, key: str, file: Path) -> None:
    # One reduction, no temporary: a NaN or inf anywhere makes the sum non-finite. Only then (or if
    # huge finite values overflowed the sum) is the exact elementwise check run.
    if bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise ConfigError(f"tensor {key!r} in {file} holds {bad} NaN/inf value(s): the checkpoint is corrupted")


def _checked(weight: torch.Tensor, shape: tuple[int, int], key: str, file: Path) -> torch.Tensor:
    """A widened (out, in) weight after its shape and finiteness checks."""
    _check_shape(weight, shape, key, file)
    _check_finite(weight, key, file)
    return weight
