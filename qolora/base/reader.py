"""The one reader of base checkpoints: each weight read once, checked, handed out as fp32 ``(out, in)``.

``prepare``, ``load`` and ``merge`` all walk a transformers checkpoint the same way, so they share
this module rather than three loops that drift apart::

    BaseCheckpoint.open("folder-or-hub-id")      config.json checked (no remote code), shards listed
        .skeleton(dtype)                         the model on the meta device: names, shapes, no memory
                                                 (MoE experts split into one linear layer each: qolora.base.experts)
        .read_plan(skeleton)                     which tensors make which weight, from the headers alone
        .stream(skeleton, wanted, device)        one weight at a time, in storage order:
            LinearWeight(module, key, W)         W: fp32 (out, in) on ``device`` for each wanted linear
                                                 layer (and each layer stored quantized, dequantized)
            OtherTensor(key, name, tensor)       everything else, as stored, on the CPU

What the stream takes care of, once for everyone: checkpoint key -> model name by transformers' own
rules for the architecture (its renamings, e.g. GPT-NeoX's ``embed_out`` -> ``lm_head``, and its
conversions, e.g. per-expert MoE tensors -> the fused experts, read one expert's slices at a time:
:mod:`qolora.base.layout`), with or without the base-model prefix; the parts of a layer stored
quantized by bitsandbytes (gathered, dequantized); GPT-2 ``Conv1D`` weights stored ``(in, out)``
(transposed); widening to fp32 on the device (moving the stored dtype is cheaper than converting on the
host first); and the checks that make a corrupt checkpoint fail with its tensor and file named before it
can poison a model: before any weight is read, every tensor's shape against the skeleton and every
weight of the model made by some tensor (those no rule maps are named); then no NaN/inf in any floating
tensor, unreadable shards, index files pointing outside the folder. ``config.json`` is read with
``trust_remote_code=False``: a folder whose model needs its own Python code is refused, never run.

Safetensors shards are memory-mapped and read by key (a fused expert tensor by slice), so peak memory
is one weight at a time, never the model.
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

from ..errors import ConfigError
from .config_sizes import check_sizes
from .experts import is_router, mark_routers, split_experts
from .layout import ConvertedUnit, ExpertUnit, PartUnit, Piece, ReadPlan, TensorUnit, plan_reads
from .quant import dequantize_stored, stored_group_complete, stored_part

__all__ = [
    "BaseCheckpoint",
    "LinearWeight",
    "OtherTensor",
    "checkpoint_key_map",
    "hf_config_from_dict",
    "read_config_json",
    "meta_skeleton",
    "layer_shape",
    "linear_layers",
    "rank_problem",
    "resolve_model_dir",
    "select_targets",
    "short_name",
    "weight_fingerprint",
]

logger = logging.getLogger(__name__)

#: The model_type of the config.json qolora writes into an adapter folder: transformers' from_pretrained
#: refuses the folder, and qolora's reader names it (qolora.model.adapter_folder writes it).
GUARD_MODEL_TYPE = "qolora_adapter"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILES_FROM_HUB = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_INDEXES = (("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"))


# --------------------------------------------------------------------------------- finding it
def is_hub_id(text: str) -> bool:
    """Whether a name that is not an existing path reads as a hub id (``org/name`` or a bare ``name``), the
    one rule for models and their configs: not path-like (``.``, ``/``, ``~``), not a ``.json`` file."""
    return not text.startswith((".", "/", "~")) and not text.endswith(".json") and bool(_HUB_ID.match(text))


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
    if not is_hub_id(text):  # a path that does not exist
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


def read_config_json(config_json: Path):
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


def meta_skeleton(hf_config, dtype: torch.dtype | None = None, *, split: bool = True) -> nn.Module:
    """The causal LM of ``hf_config`` on the ``meta`` device: names and shapes, no memory, no weight.

    Buffers (e.g. rotary frequencies, computed at construction) stay real, on the CPU. With ``split``
    (qolora's model), fused MoE experts become one linear layer per expert and projection
    (:func:`qolora.base.experts.split_experts`) and MoE routers are marked (:func:`qolora.base.experts.mark_routers`);
    ``split=False`` is transformers' model as it is (its parameter names are a checkpoint's).

    Raises:
        ConfigError: the architecture has no causal-LM class in transformers.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False,
                                                     **({"dtype": dtype} if dtype is not None else {}))
    except ValueError as exc:
        raise ConfigError(f"model_type {hf_config.model_type!r} has no causal-LM class in transformers: {exc}") from exc
    except Exception as exc:  # a config whose numbers do not make a model (shapes that do not divide, ...)
        raise ConfigError(f"the {hf_config.model_type} config does not describe a buildable model: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    if split:
        split_experts(model)
        mark_routers(model)
    return model


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
    """Names of the linear layers to adapt: by default every one except MoE routers
    (:func:`qolora.base.experts.is_router`), or those whose last name part or full name matches."""
    if target_modules is None:
        return [n for n, m in linears.items() if not is_router(m)]
    wanted = set(target_modules)
    chosen = [n for n in linears if n in wanted or n.rsplit(".", 1)[-1] in wanted]
    matched = {t for t in wanted if any(n == t or n.rsplit(".", 1)[-1] == t for n in chosen)}
    unmatched = sorted(wanted - matched)
    if unmatched:
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(f"target_modules {unmatched} match no linear layer of this model; available: {available}")
    return chosen


def short_name(name: str) -> str:
    """What ``target_modules`` matches besides the full name: the last part (``q_proj``, ``gate_up_proj``)."""
    return name.rsplit(".", 1)[-1]


def rank_problem(linears: Mapping[str, nn.Module], targets, rank: int) -> str | None:
    """Why ``rank`` is too large for a targeted layer (naming the layer that limits it and the
    ``target_modules`` that would leave it out), or None."""
    if not targets:
        return None
    name = min(sorted(targets), key=lambda n: min(layer_shape(linears[n])))
    out, inp = layer_shape(linears[name])
    if rank <= min(out, inp):
        return None
    small = sorted({short_name(n) for n in targets if min(layer_shape(linears[n])) < rank})
    fit = sorted({short_name(n) for n in targets} - set(small))
    leave_out = (f"; or leave {', '.join(small)} out: target_modules={fit} (qolora finetune --target-modules "
                 f"{','.join(fit)})") if fit else ""
    return (f"rank={rank} is larger than a targeted weight allows: the smallest targeted layer is {name} "
            f"({out}x{inp}), so rank must be <= {min(out, inp)}{leave_out}")


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
    pieces: tuple[Piece, ...] | None = None  # an expert's weight: the checkpoint tensors holding its rows


@dataclass
class OtherTensor:
    """Any other tensor of the checkpoint, as stored, on the CPU (an expert's weight: ``(out, in)``)."""

    key: str
    name: str | None  # the model's name for it; None when the model has no such tensor
    tensor: torch.Tensor
    pieces: tuple[Piece, ...] | None = None  # an expert's weight: the checkpoint tensors holding its rows


def _stored_quantized(model_dir: Path, model_type: str, method) -> str:
    """The refusal of a checkpoint stored quantized other than by bitsandbytes (before any weight is read)."""
    hint = ""
    if method == "mxfp4":  # gpt-oss on the hub: the experts as MXFP4 blocks and scales
        hint = ("; for MXFP4 (gpt-oss's experts stored as blocks and scales), use a bf16 copy: load it with "
                "transformers' Mxfp4Config(dequantize=True) and save_pretrained it (qolora then quantizes the experts "
                "itself, one per layer)")
    return (f"checkpoint {model_dir} ({model_type}) is stored quantized with {method!r}; qolora reads "
            "full-precision (fp32/bf16/fp16) checkpoints, or bitsandbytes 4/8-bit ones (dequantized, then "
            f"requantized){hint}")


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
        :class:`qolora.base.synthetic.SyntheticCheckpoint` (a 70B model streamed into ``prepare`` with no
        disk). The tensors are generated on the compute device and checked like a file's. ``dir`` is a
        descriptive ``<name>`` path that exists nowhere (merge and load need a real folder)."""
        name = name or repr(source)
        hf_config = source.hf_config()
        if getattr(hf_config, "quantization_config", None) is not None:
            raise ConfigError(f"{name}: a source stored quantized is not supported")
        hf_config_from_dict(hf_config.to_dict(), name)  # a known architecture with plausible sizes
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
        hf_config = read_config_json(model_dir / "config.json")
        stored_kind = None
        stored = getattr(hf_config, "quantization_config", None)
        if stored is not None:
            stored = stored if isinstance(stored, dict) else stored.to_dict()
            if stored.get("quant_method") != "bitsandbytes":
                raise ConfigError(_stored_quantized(model_dir, hf_config.model_type, stored.get("quant_method")))
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

    def store(self, device: torch.device | str = "cpu") -> TensorStore:
        """Random access to this checkpoint's tensors (:class:`TensorStore`; close it, or use ``with``)."""
        return TensorStore(self.files, self.source, device, self.dir)

    def read_plan(self, skeleton: nn.Module, store: TensorStore | None = None) -> ReadPlan:
        """Which tensors make which weight of ``skeleton`` (:func:`qolora.base.layout.plan_reads`), from the
        headers alone, checked: no weight is read.

        Raises:
            ConfigError: a tensor whose shape is not the model's, or weights of the model that no
                checkpoint tensor makes by transformers' rules (naming them and the tensors that map to
                nothing).
        """
        own = store is None
        store = store or self.store()
        try:
            linears = linear_layers(skeleton)
            parts = (lambda name: stored_part(name, linears)) if self.stored_kind else None
            plan = plan_reads(store.entries(), skeleton, stored_part=parts)
        finally:
            if own:
                store.close()
        plan.check(str(self.dir), self.hf_config.model_type)
        return plan

    def stream(self, skeleton: nn.Module, wanted: set[str], device: torch.device
               ) -> Iterator[LinearWeight | OtherTensor]:
        """Every tensor of the checkpoint, checked: wanted linear weights as :class:`LinearWeight`.

        The reads are planned first (:meth:`read_plan`: nothing missing, shapes right, before any weight is
        read), then each unit is read once: a tensor, one expert's weight (from its per-expert tensors or
        its slice of a fused one), a converter's sources, or the parts of a layer stored quantized.

        Args:
            skeleton: the model from :meth:`skeleton` (names and shapes).
            wanted: module names of the linear layers to hand out as fp32 ``(out, in)`` weights;
                layers stored quantized are always handed out so (they must be dequantized).
            device: where the weights are widened and checked.

        Raises:
            ConfigError: naming the tensor and file: a shape other than the model's, a NaN/inf, a
                quantized layer whose parts are incomplete, an unreadable file, weights missing.
        """
        with self.store(device) as store:
            plan = self.read_plan(skeleton, store)
            reader = _UnitReader(self, store, plan, skeleton, wanted, device)
            for unit in plan.units:
                yield from reader.read(unit)
            reader.finish()


class TensorStore:
    """Random access to a checkpoint's tensors: the headers listed without reading a weight, then any
    tensor (or one expert's slice of a stacked tensor) read by key.

    Safetensors shards are memory-mapped and sliced (one expert of a fused tensor reads that expert's
    bytes only); ``.bin`` files are loaded memory-mapped with ``weights_only``; a generated source
    (:meth:`BaseCheckpoint.from_source`) is pulled in its own order, holding tensors asked for later.
    """

    def __init__(self, files: list[Path], source, device, where: Path):
        self.files, self.source, self.device, self.where = files, source, device, where
        self._handles: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()
        self._file_of: dict[str, Path] = {}
        self._ahead: dict[str, torch.Tensor] = {}  # a source's tensors pulled before their turn
        self._pull: Iterator | None = None
        self._held: tuple[str, torch.Tensor] | None = None  # a stacked tensor read expert by expert

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._held, self._ahead, self._pull = None, {}, None
        self._handles.clear()
        self._stack.close()

    def entries(self) -> list[tuple[str, tuple[int, ...], Path]]:
        """``(key, shape, file)`` of every tensor, in storage order (headers only)."""
        if self.source is not None:
            return [(key, tuple(shape), self.where) for key, shape, _ in self.source.tensors]
        out = []
        for file in self.files:
            with _naming_damage(file):
                handle = self._open(file)
                if file.suffix == ".safetensors":
                    listed = [(key, tuple(handle.get_slice(key).get_shape())) for key in handle.keys()]
                else:
                    listed = [(key, tuple(t.shape)) for key, t in handle.items()]
            for key, shape in listed:
                self._file_of[key] = file
                out.append((key, shape, file))
        return out

    def file_of(self, key: str) -> Path:
        return self._file_of.get(key, self.where)

    def read(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``."""
        if self.source is not None:
            return self._pulled(key)
        file = self._file_of[key]
        with _naming_damage(file):
            handle = self._open(file)
            return handle.get_tensor(key) if file.suffix == ".safetensors" else handle[key]

    def read_expert(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of the stacked tensor stored under ``key``, reading that slice only where the
        format allows (safetensors); otherwise the tensor is held until another key is read this way."""
        if self.source is None and self._file_of[key].suffix == ".safetensors":
            file = self._file_of[key]
            with _naming_damage(file):
                return self._open(file).get_slice(key)[index]
        if self._held is None or self._held[0] != key:
            self._held = None
            self._held = (key, self.read(key))
        return self._held[1][index]

    def _open(self, file: Path):
        if file not in self._handles:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            else:  # weights_only: a pickle can never run code; mmap: nothing is read until used
                self._handles[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return self._handles[file]

    def _pulled(self, key: str) -> torch.Tensor:
        if key in self._ahead:
            return self._ahead.pop(key)
        if self._pull is None:
            self._pull = iter(self.source.iter_tensors(self.device))
        for found, tensor in self._pull:
            if found == key:
                return tensor
            self._ahead[found] = tensor
        raise ConfigError(f"{self.where} lists a tensor {key!r} that it never yields")


class _UnitReader:
    """Reads the units of a :class:`ReadPlan` into :class:`LinearWeight` / :class:`OtherTensor` items."""

    def __init__(self, checkpoint: BaseCheckpoint, store: TensorStore, plan: ReadPlan, skeleton: nn.Module,
                 wanted: set[str], device: torch.device):
        self.checkpoint, self.store, self.plan, self.skeleton = checkpoint, store, plan, skeleton
        self.wanted, self.device = wanted, device
        self.linears = linear_layers(skeleton)
        self.shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # parts of layers stored quantized
        self.keys: dict[str, str] = {}

    def read(self, unit) -> Iterator[LinearWeight | OtherTensor]:
        if isinstance(unit, TensorUnit):
            yield self._tensor(unit.key, unit.name, self.store.read(unit.key))
        elif isinstance(unit, ExpertUnit):
            yield self._expert(unit)
        elif isinstance(unit, ConvertedUnit):
            yield from self._converted(unit)
        elif isinstance(unit, PartUnit):
            yield from self._part(unit)

    def _tensor(self, key: str, name: str | None, tensor: torch.Tensor) -> LinearWeight | OtherTensor:
        file = self.store.file_of(key)
        if name is None:
            return OtherTensor(key, None, tensor)
        _check_shape(tensor, self.shapes[name], key, file)
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in self.wanted:
            # Move in the stored dtype, then widen on the device: converting on the CPU first
            # costs more than the whole transfer.
            weight = tensor.to(self.device).to(torch.float32, copy=True)
            if is_transposed(self.linears[module]):
                weight = weight.T.contiguous()  # (in, out) -> (out, in)
            return LinearWeight(module, key, _checked(weight, layer_shape(self.linears[module]), key, file))
        if tensor.is_floating_point():
            _check_finite(tensor, key, file)
        return OtherTensor(key, name, tensor)

    def _expert(self, unit: ExpertUnit) -> LinearWeight | OtherTensor:
        """One expert's ``(out, in)`` weight (or ``(out,)`` bias), its rows copied in from each piece (one
        expert's slices at a time)."""
        key, file = unit.pieces[0].key, self.store.file_of(unit.pieces[0].key)
        shape = layer_shape(self.linears[unit.layer])
        shape = shape[:1] if unit.part == "bias" else shape
        adapted = unit.layer in self.wanted and unit.part == "weight"
        out, row = None, 0
        for piece in unit.pieces:
            part = (self.store.read(piece.key) if piece.expert is None
                    else self.store.read_expert(piece.key, piece.expert))
            part = part.T if piece.transposed else part  # (rows, in)
            if out is None:
                out = torch.empty(shape, dtype=torch.float32 if adapted else part.dtype,
                                  device=self.device if adapted else part.device)
            out[row: row + piece.rows].copy_(part.to(out.device))
            row += piece.rows
            del part
        if adapted:
            return LinearWeight(unit.layer, key, _checked(out, shape, key, file), pieces=unit.pieces)
        if out.is_floating_point():
            _check_finite(out, key, file)
        return OtherTensor(key, f"{unit.layer}.{unit.part}", out, pieces=unit.pieces)

    def _converted(self, unit: ConvertedUnit) -> Iterator[LinearWeight | OtherTensor]:
        """A converter other than the experts' runs whole: its sources gathered, transformers' own ops."""
        import copy

        converter = copy.deepcopy(unit.converter)
        for key, pattern in unit.keys:
            converter.add_tensor(unit.target, key, pattern, self.store.read(key))
        try:
            results = converter.convert(unit.target, model=self.skeleton, config=self.checkpoint.hf_config)
        except Exception as exc:  # transformers' ops raise many types on tensors that do not fit
            keys = [k for k, _ in unit.keys][:4]
            raise ConfigError(f"checkpoint tensors {keys} in {self.checkpoint.dir} cannot be converted to "
                              f"{unit.target} by transformers' rules: {type(exc).__name__}: {exc}") from exc
        for name, tensor in results.items():
            yield self._tensor(name, name if name in self.shapes else None,
                               tensor[0] if isinstance(tensor, list) else tensor)

    def _part(self, unit: PartUnit) -> Iterator[LinearWeight]:
        if unit.part == "weight_format":  # bitsandbytes' 8-bit layout tag: nothing to dequantize with
            return
        group = self.pending.setdefault(unit.layer, {})
        group[unit.part] = self.store.read(unit.key)
        if unit.part == "weight":
            self.keys[unit.layer] = unit.key
        if stored_group_complete(group):
            key = self.keys[unit.layer]
            weight = dequantize_stored(self.pending.pop(unit.layer), self.device)
            yield LinearWeight(unit.layer, key, _checked(weight, layer_shape(self.linears[unit.layer]), key,
                                                         self.store.file_of(key)))

    def finish(self) -> None:
        if self.pending:
            module, group = next(iter(self.pending.items()))
            raise ConfigError(f"checkpoint {self.checkpoint.dir} is incomplete: the quantized layer {module} has only "
                              f"the parts {sorted(group)} ({len(self.pending)} such layer(s)); a bitsandbytes-stored "
                              "layer needs its weight and its quantization statistics")


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
