"""Full-size synthetic checkpoints: real architectures, deterministic random weights, no download.

``SyntheticCheckpoint("llama-3-70b")`` describes a checkpoint exactly as transformers would name and
shape it (keys from the ``meta`` skeleton's ``state_dict``; a tied head once), and generates any one
tensor on demand from ``(seed, key)`` alone: a ``torch.Generator`` seeded with ``seed`` and the crc32
of the key; linear and embedding weights ~ N(0, 0.02), norm weights 1, biases 0. Nothing is held:
the 70B model is produced one tensor at a time (a large tensor is filled in row blocks, so at most one
tensor in ``dtype`` plus a block in fp32 exists).

Two uses:

* ``write(folder)``: a real sharded safetensors checkpoint (``config.json``, shards, index), written
  shard by shard into a temporary folder that is renamed at the end; ``qolora.prepare(folder)`` and
  ``from_pretrained`` load it.
* streaming without disk: ``qolora.prepare(SyntheticCheckpoint("llama-3-8b"))`` reads it through
  :meth:`qolora.base.reader.BaseCheckpoint.from_source`, which consumes
  :meth:`SyntheticCheckpoint.hf_config` and :meth:`SyntheticCheckpoint.iter_tensors` (the tensors
  are made on the compute device).

``num_layers`` truncates the architecture (for measurements on a few full-width layers).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import parse_size
from ..files import FolderKind, atomic_dir, check_out_dir
from .hf_config import load_hf_config
from .reader import meta_skeleton

__all__ = ["SyntheticCheckpoint"]

logger = logging.getLogger(__name__)

_BLOCK_ELEMENTS = 1 << 24  # fp32 scratch per generated block: 64 MiB


class SyntheticCheckpoint:
    """A deterministic random checkpoint of a real architecture.

    Args:
        name_or_config: a built-in name (``"llama-3-8b"``, ``"llama-3-70b"``), a config.json path or folder,
            a cached hub id, a transformers config or a config dict (see :func:`qolora.base.hf_config.load_hf_config`).
        seed: with the key, decides every value.
        dtype: dtype of the floating-point weights.
        num_layers: keep only the first ``num_layers`` decoder layers (None = all).
    """

    def __init__(self, name_or_config: Any, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 num_layers: int | None = None):
        config = load_hf_config(name_or_config)
        config = config.__class__.from_dict(config.to_dict())  # own copy
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        if num_layers is not None:
            if num_layers < 1:
                raise ValueError(f"num_layers={num_layers} must be >= 1")
            config.num_hidden_layers = num_layers
            if isinstance(getattr(config, "layer_types", None), list):
                config.layer_types = config.layer_types[:num_layers]
        config.dtype = dtype
        self.name = str(name_or_config) if isinstance(name_or_config, (str, os.PathLike)) else config.model_type
        self.seed, self.dtype, self._config = seed, dtype, config
        skeleton = meta_skeleton(config, dtype, split=False)  # transformers' names (fused MoE experts)
        skeleton.tie_weights()
        params = {id(p): n for n, p in skeleton.named_parameters()}  # tied parameters once, first name
        state = skeleton.state_dict()
        specs = []
        for key, t in state.items():
            param_name = params.get(id(dict(skeleton.named_parameters(remove_duplicate=False)).get(key)))
            if param_name is not None and param_name != key:
                continue  # the tied copy (e.g. lm_head.weight of a tied model)
            specs.append((key, tuple(t.shape), t.dtype))
        self._specs = specs

    def __repr__(self) -> str:
        layers = f", num_layers={self._config.num_hidden_layers}"
        return f"SyntheticCheckpoint({self.name!r}, seed={self.seed}{layers})"

    def hf_config(self):
        """The transformers config (truncated to ``num_layers``). Stable interface."""
        return self._config

    @property
    def tensors(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """``(key, shape, dtype)`` of every tensor, in the skeleton's order, as a checkpoint names them."""
        return list(self._specs)

    @property
    def total_bytes(self) -> int:
        return sum(_numel(s) * _size(d) for _, s, d in self._specs)

    def tensor(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, regenerated alone from ``(seed, key)``."""
        spec = next((s for s in self._specs if s[0] == key), None)
        if spec is None:
            raise KeyError(f"{key!r} is not a tensor of this checkpoint")
        return self._make(*spec, device=torch.device(device))

    def iter_tensors(self, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` one at a time on ``device``. Stable interface."""
        device = torch.device(device)
        for key, shape, dtype in self._specs:
            yield key, self._make(key, shape, dtype, device=device)

    def _make(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        leaf = key.rsplit(".", 1)[-1]
        if not dtype.is_floating_point:
            return torch.zeros(shape, dtype=dtype, device=device)
        if leaf == "bias":
            return torch.zeros(shape, dtype=dtype, device=device)
        if len(shape) == 1:  # norm weights
            return torch.ones(shape, dtype=dtype, device=device)
        # Generated where it is used (a 70B model's 140 GB are made on the GPU in seconds, not on the host);
        # the values are a function of (seed, key, device type).
        g = torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
        out = torch.empty(shape, dtype=dtype, device=device)
        flat = out.view(-1, shape[-1])  # rows of the last dimension (a fused expert tensor: every expert's)
        rows = max(1, _BLOCK_ELEMENTS // max(1, flat.shape[1]))
        for start in range(0, flat.shape[0], rows):
            block = torch.randn(min(rows, flat.shape[0] - start), flat.shape[1], generator=g, device=device).mul_(0.02)
            flat[start: start + block.shape[0]].copy_(block)
        return out

    def write(self, folder: str | os.PathLike, max_shard_size: str | int = "2GB", *, overwrite: bool = False) -> Path:
        """Write a safetensors checkpoint (transformers' layout) to ``folder``, atomically.

        Shards are filled in key order up to ``max_shard_size`` (a tensor larger than that gets its own
        shard); one shard is ``model.safetensors``, several are ``model-0000x-of-0000y.safetensors`` with
        ``model.safetensors.index.json``. Everything goes to a temporary folder next to ``folder`` that is
        renamed at the end; at most one shard is in memory.
        """
        from safetensors.torch import save_file

        folder = check_out_dir(folder, overwrite, SYNTHETIC_CHECKPOINT)
        limit = parse_size(max_shard_size, "max_shard_size")
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for spec in self._specs:
            nbytes = _numel(spec[1]) * _size(spec[2])
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += nbytes
        with atomic_dir(folder, overwrite, SYNTHETIC_CHECKPOINT) as tmp:
            self._config.save_pretrained(tmp)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                tensors = {key: self._make(key, shape, dtype, torch.device("cpu")) for key, shape, dtype in shard}
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
                del tensors
                weight_map.update({key: name for key, _, _ in shard})
                logger.info("wrote %s (%d tensors)", name, len(shard))
            if len(shards) > 1:
                index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            (tmp / SYNTHETIC_RECORD).write_text(json.dumps({"name": self.name, "seed": self.seed}) + "\n")
        return folder


#: A synthetic checkpoint as :meth:`SyntheticCheckpoint.write` writes it (``overwrite`` replaces only such a folder).
SYNTHETIC_RECORD = "qolora_synthetic.json"
SYNTHETIC_CHECKPOINT = FolderKind("synthetic checkpoint", SYNTHETIC_RECORD,
                                  (SYNTHETIC_RECORD, "config.json", "model.safetensors", "model-*-of-*.safetensors",
                                   "model.safetensors.index.json"))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
