"""Reading a transformers checkpoint one tensor at a time.

``qolora.prepare`` never materialises the full-precision model: it opens the checkpoint's
safetensors shards lazily (memory-mapped) and hands out one tensor at a time, so peak memory is the
quantized model plus one full-precision weight. This module finds the checkpoint (a local folder or
a hub id, resolved through ``huggingface_hub`` and its cache) and iterates its tensors; it knows
nothing about adapters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .config import ConfigError

__all__ = ["resolve_model_dir", "checkpoint_files", "iter_checkpoint", "meta_model", "checkpoint_key_map",
           "weight_fingerprint"]

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILES_FROM_HUB = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


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
        raise ConfigError(f"model path does not exist: {text!r} (expected a local checkpoint folder or a hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        return Path(snapshot_download(text, allow_patterns=_FILES_FROM_HUB))
    except Exception as exc:  # the hub raises many types: offline, not found, gated, network
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise ConfigError(
            f"model {text!r} is not a local folder and could not be fetched from the hub{hint}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in shard order (safetensors preferred)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = model_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise ConfigError(f"checkpoint {model_dir} is incomplete: shard(s) {missing} listed in {index_name} are missing")
            return [model_dir / s for s in shards]
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise ConfigError(
        f"no weights found in {model_dir}: expected model.safetensors, a sharded model.safetensors.index.json, "
        "or pytorch_model.bin"
    )


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one at a time, lazily (safetensors are memory-mapped)."""
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open  # noqa: PLC0415

            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            for key in list(state):
                yield key, state.pop(key)


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


def meta_model(model_dir: Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, str | None]:
    """The checkpoint's model on the ``meta`` device (structure only: no memory, no weight read), and
    ``"4bit"`` / ``"8bit"`` when the checkpoint is stored quantized by bitsandbytes (else None).

    Buffers (e.g. rotary frequencies, computed at construction) stay real, on the CPU.

    Raises:
        ConfigError: the checkpoint is stored quantized by a method other than bitsandbytes.
    """
    from accelerate import init_empty_weights  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    hf_config = AutoConfig.from_pretrained(model_dir)
    stored = getattr(hf_config, "quantization_config", None)
    stored_kind = None
    if stored is not None:
        stored = stored if isinstance(stored, dict) else stored.to_dict()
        if stored.get("quant_method") != "bitsandbytes":
            raise ConfigError(
                f"checkpoint {model_dir} is stored quantized with {stored.get('quant_method')!r}; qolora reads "
                "full-precision checkpoints, or bitsandbytes 4/8-bit ones (dequantized, then requantized)"
            )
        stored_kind = "4bit" if stored.get("load_in_4bit") else "8bit"
        del hf_config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, **({"dtype": dtype} if dtype is not None else {}))
    return model, stored_kind


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
