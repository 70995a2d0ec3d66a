"""Merging a saved adapter into its base: a standalone, dequantized transformers checkpoint.

qolora.merge writes an ordinary transformers checkpoint (sharded safetensors, config.json without
quantization_config, tokenizer and generation files copied). ``into="trained"`` (default) writes
``deq(q(W_res)) + s*B@A``, exactly the trained function: the residual is requantized with the saved
settings on the compute device, which reproduces the trained base bit for bit; the base's other
quantized layers are written as ``deq(q(W))`` and everything else goes through the training dtype.
``into="original"`` writes ``W + s*(B@A - B0@A0)`` (what the exported LoRA computes on ``W``).
With ``bits=8`` the merged *weights* are exact too, but bitsandbytes' LLM.int8 matmul also rounds
the activations (fp16, int8 row-wise), which no dense checkpoint reproduces: expect logits within
about 1-2% of their range of the trained 8-bit model (4-bit: fp32 rounding with ``dtype="fp32"``).

A base stored quantized by bitsandbytes (which :func:`qolora.prepare` accepts) is read as
:func:`qolora.prepare` reads it: each layer's parts are gathered and dequantized; the merged folder
holds plain weights only.

:func:`merge` streams: the base is read one tensor at a time and written shard by shard, so peak
memory is about one output shard plus one layer's fp32 working copies, never the model. Output goes
to a temporary sibling folder renamed into place at the end: an interrupted merge leaves nothing at
``out_dir`` (and an ``overwrite``-d folder intact).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..base.quant import dequantize_weight, make_base_layer, quant_settings
from ..base.reader import BaseCheckpoint, LinearWeight, OtherTensor, is_transposed
from ..config import parse_dtype, parse_size
from ..errors import ConfigError
from ..files import FolderKind, atomic_dir, check_out_dir, write_json
from ..inits import residual_
from ..model.adapter_folder import AdapterError, SavedAdapter, read_adapter
from ..model.load import FingerprintCheck, check_base_structure, load, resolve_device_config

__all__ = ["merge", "merged_stream", "compare_logits", "MERGE_RECORD"]

logger = logging.getLogger(__name__)

MERGE_RECORD = "qolora_merge.json"
INTO = ("trained", "original")
# Non-weight files of a checkpoint folder that a merged folder needs (config.json is rewritten).
# Never Python files: qolora does not carry a model folder's code along.
COPY_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                 "*.tiktoken", "chat_template.*", "generation_config.json", "preprocessor_config.json")
#: A merged checkpoint as :func:`merge` writes it (``overwrite`` replaces only such a folder).
MERGED_CHECKPOINT = FolderKind("merged checkpoint", MERGE_RECORD,
                               (MERGE_RECORD, "config.json", "model.safetensors", "model-*-of-*.safetensors",
                                "model.safetensors.index.json", *COPY_PATTERNS))


def _release_freed_memory() -> None:
    """Hand memory freed by the last shard back to the OS (glibc keeps it otherwise; no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors shard (safetensors >= 0.6 writes straight from the tensors, no copy)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


class _ShardWriter:
    """Collects tensors up to ``max_bytes`` per shard, writes each full shard, names them at the end."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[key] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.shards) + 1:05d}.safetensors"
        _write_shard(self.folder / name, self.pending)
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0
        _release_freed_memory()

    def finish(self) -> list[str]:
        """Flush, give the shards transformers' names, write the index when there are several."""
        self.flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp_name, keys), name in zip(self.shards, names):
            os.replace(self.folder / tmp_name, self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _nested(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same folder or one holds the other."""
    a, b = a.expanduser().resolve(), b.expanduser().resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def merge(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bf16",
    into: str = "trained",
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
    prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
    device: str | None = None,
    allow_base_mismatch: bool = False,
    progress: bool = True,
) -> dict:
    """Merge a saved adapter into its base and write a plain transformers checkpoint, streaming.

    Args:
        base: the full-precision checkpoint the adapter was trained on (folder or hub id).
        adapter_dir: a folder written by :func:`qolora.save_adapter`.
        out_dir: the checkpoint folder to write; ``AutoModelForCausalLM.from_pretrained`` loads it.
        dtype: dtype of the written floating-point tensors: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        into: ``"trained"``: ``deq(q(W - s*B0@A0)) + s*B@A``, the function the quantized model was
            trained as; ``"original"``: ``W + s*(B@A - B0@A0)`` on the full-precision weights.
        max_shard_size: largest shard, bytes or ``"2GB"``-style (a single larger tensor gets its own).
        overwrite: replace an existing ``out_dir`` (atomically, once the new folder is complete).
        prompts: optional texts (tokenized with the base's tokenizer) or token-id lists: the merged
            model and the reloaded trained model are run on them and the max logit difference is
            reported (loads both models fully: for checking, not for huge models).
        device: where layers are requantized / merged (default: the saved setting; use the device
            type of training for a bit-exact ``into="trained"``).
        allow_base_mismatch: merge even if base weights differ from the training base (warning).
        progress: show a progress bar.

    Returns:
        ``out_dir``, ``into``, ``dtype``, ``shards``, ``total_bytes``, ``merged_layers``,
        ``requantized_layers``, ``seconds``, and ``logit_check`` (None without ``prompts``).

    Raises:
        ConfigError: a bad ``dtype`` / ``into`` / ``max_shard_size``, an existing ``out_dir``, or an
            ``out_dir`` that is, holds or lies inside the base or the adapter; all before the base is read.
        AdapterError: a bad adapter folder, or a base with other layers or shapes.
        BaseMismatchError: a base weight differs from the training base (unless allowed).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out_dtype = parse_dtype(dtype, "dtype")
    if into not in INTO:
        raise ConfigError(f"into={into!r} is not supported; allowed: {list(INTO)}")
    max_bytes = parse_size(max_shard_size, "max_shard_size")
    saved = read_adapter(adapter_dir)
    config = resolve_device_config(saved, device)
    checkpoint = BaseCheckpoint.open(base)
    out = Path(out_dir).expanduser()
    for other, what in ((checkpoint.dir, "the base checkpoint"), (Path(adapter_dir), "the adapter folder")):
        if _nested(out, other):
            raise ConfigError(f"out_dir {str(out)!r} is, holds or lies inside {what} ({other}); write the merge "
                              "somewhere else")
    out = check_out_dir(out, overwrite, MERGED_CHECKPOINT)
    skeleton = checkpoint.skeleton()
    linears = check_base_structure(skeleton, saved, str(base))
    transposed = {n for n, m in linears.items() if is_transposed(m)}
    check = FingerprintCheck(saved, str(base), allow_base_mismatch)
    counts: dict[str, int] = {}

    with atomic_dir(out, overwrite, MERGED_CHECKPOINT) as tmp:
        writer = _ShardWriter(tmp, max_bytes)
        bar = tqdm(total=checkpoint.tensor_count(), desc=f"merge ({into})", unit="tensor", disable=not progress)
        stacks = _StackedWrites()
        for item, via in merged_stream(checkpoint, skeleton, saved, config, into, check, counts):
            if isinstance(item, LinearWeight):
                _write(writer, stacks, item.key, item.weight.to(out_dtype), item.pieces, item.module in transposed)
            else:
                tensor = item.tensor
                if tensor.is_floating_point():
                    tensor = (tensor if via is None else tensor.to(via)).to(out_dtype)
                _write(writer, stacks, item.key, tensor, item.pieces)
            del item
            bar.update(1)
        stacks.finish()
        bar.close()
        shards = writer.finish()
        _write_config(checkpoint.dir, tmp, out_dtype)
        _copy_side_files(checkpoint.dir, tmp)
        write_json(tmp / MERGE_RECORD, {
            "into": into, "dtype": str(out_dtype).removeprefix("torch."), "base": str(base),
            "adapter": str(adapter_dir), "base_fingerprint": saved.fingerprint, "init": saved.config.init,
            "bits": saved.config.bits, "rank": saved.config.rank,
        })
    result = {
        "out_dir": str(out), "into": into, "dtype": str(out_dtype).removeprefix("torch."), "shards": len(shards),
        "total_bytes": writer.total_bytes, "merged_layers": counts["merged"],
        "requantized_layers": counts["requantized"], "seconds": time.perf_counter() - start, "logit_check": None,
    }
    logger.info("merged %d adapted layers (%s) into %s: %d shard(s), %.1f MB in %.1f s", counts["merged"], into, out,
                len(shards), writer.total_bytes / 1e6, result["seconds"])
    if prompts:
        result["logit_check"] = compare_logits(base, adapter_dir, out, prompts, device=device,
                                               allow_base_mismatch=allow_base_mismatch)
    return result


def _write(writer: _ShardWriter, stacks: _StackedWrites, key: str, tensor: torch.Tensor, pieces,
           transposed: bool = False) -> None:
    """Write ``tensor`` under the checkpoint key(s) it was read from, in their layout: an expert's ``(out, in)``
    weight goes back as its pieces (:class:`qolora.base.layout.Piece`: gate and up rows to their own
    tensors, or its slice of a fused tensor), anything else as it came."""
    if pieces is None:
        writer.add(key, _to_checkpoint(tensor, transposed))
        return
    row = 0
    for piece in pieces:
        part = _to_checkpoint(tensor[row: row + piece.rows], piece.transposed)
        row += piece.rows
        if piece.expert is None:
            writer.add(piece.key, part)
        else:
            stacks.add(writer, piece, part)


class _StackedWrites:
    """Fused expert tensors ``(E, ...)`` filled expert by expert, each written once all its experts are in."""

    def __init__(self):
        self.pending: dict[str, tuple[torch.Tensor, set[int]]] = {}

    def add(self, writer: _ShardWriter, piece, part: torch.Tensor) -> None:
        if piece.key not in self.pending:
            self.pending[piece.key] = (torch.empty((piece.count, *part.shape), dtype=part.dtype), set())
        stack, filled = self.pending[piece.key]
        stack[piece.expert].copy_(part)
        filled.add(piece.expert)
        if len(filled) == piece.count:
            writer.add(piece.key, stack)
            del self.pending[piece.key]

    def finish(self) -> None:
        if self.pending:  # pragma: no cover - the read plan hands out every expert of a fused tensor
            key, (_, filled) = next(iter(self.pending.items()))
            raise AdapterError(f"fused tensor {key} was written with experts {sorted(filled)} only")


def _to_checkpoint(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(out, in) on any device -> the checkpoint's orientation, contiguous, on the CPU."""
    weight = weight.T if transposed else weight
    return weight.to("cpu").contiguous()


def merged_stream(checkpoint: BaseCheckpoint, skeleton, saved: SavedAdapter, config, into: str,
                  check: FingerprintCheck, counts: dict[str, int] | None = None
                  ) -> Iterator[tuple[LinearWeight | OtherTensor, torch.dtype | None]]:
    """The base's tensors as the merged model holds them, one at a time in checkpoint order: what
    :func:`merge` and :func:`qolora.export.gguf.export_gguf` write, before their output dtype.

    Yields ``(item, via)``: a :class:`LinearWeight` whose ``weight`` is the layer's merged fp32 ``(out, in)``
    weight (an adapted layer's ``into`` weight; a frozen layer stored quantized ``deq(q(W))`` for
    ``"trained"``; any other linear as the trained model held it), or an :class:`OtherTensor` as stored,
    with ``via`` the dtype a floating one passes through first for ``"trained"`` (the training dtype), else
    None. ``counts`` gets ``"merged"`` and ``"requantized"``. After the last item, the fingerprint
    check's warnings are logged.

    Raises:
        AdapterError: the checkpoint lacks an adapted layer's weight.
        BaseMismatchError: a base weight differs from the training base (unless allowed).
    """
    counts = {} if counts is None else counts
    counts.update(merged=0, requantized=0)
    requantize = set(saved.frozen_quantized) if into == "trained" else set()
    train_dtype = config.torch_dtype
    for item in checkpoint.stream(skeleton, set(saved.layers) | requantize, config.torch_device):
        if isinstance(item, LinearWeight):
            if item.module in saved.layers:
                counts["merged"] += 1
                item.weight = _merged_weight(item.module, item.weight, saved, config, into, check)
            elif item.module in requantize:
                counts["requantized"] += 1
                item.weight = _requantized_weight(item.module, item.weight, saved, config)
            elif into == "trained":
                item.weight = item.weight.to(train_dtype)  # as the trained model held it
            yield item, None
        else:
            yield item, train_dtype if into == "trained" and item.tensor.is_floating_point() else None
        del item
    check.warn()
    missing = len(saved.layers) - counts["merged"]
    if missing:
        raise AdapterError(f"the base checkpoint {checkpoint.dir} lacks the weights of {missing} adapted layer(s)")


def _merged_weight(name, weight, saved: SavedAdapter, config, into, check) -> torch.Tensor:
    """The merged fp32 weight (out, in) of one adapted layer from its base weight (fp32, consumed)."""
    device, s = weight.device, saved.scale
    rec = saved.layers[name]
    if tuple(weight.shape) != tuple(rec.shape):
        raise AdapterError(f"layer {name}: the base's weight is {tuple(weight.shape)}, "
                           f"the adapter's {tuple(rec.shape)}")
    check(name, weight)
    a, b = (t.to(device, torch.float32) for t in saved.weights[name])
    a0b0 = None if saved.init is None else tuple(t.to(device, torch.float32) for t in saved.init[name])
    if into == "trained":
        if a0b0 is not None:
            residual_(weight, a0b0[0], a0b0[1], s)  # the exact training residual, in place
        layer = make_base_layer(weight, None, config, device)
        settings = quant_settings(layer)
        if settings != rec.quant:
            raise AdapterError(f"layer {name} requantized with {settings}, but was trained with {rec.quant}")
        del weight
        weight = dequantize_weight(layer)
        del layer
    elif a0b0 is not None:
        weight.addmm_(a0b0[1], a0b0[0], alpha=-s)
    weight.addmm_(b, a, alpha=s)
    if not torch.isfinite(weight).all():  # as PEFT's safe_merge: never write a broken checkpoint
        raise AdapterError(f"layer {name}: the merged weight has non-finite values (did training diverge?)")
    return weight


def _requantized_weight(name, weight, saved: SavedAdapter, config) -> torch.Tensor:
    """``deq(q(W))`` (out, in) of a quantized layer without an adapter, as the trained model computed with it."""
    layer = make_base_layer(weight, None, config, weight.device)
    settings, recorded = quant_settings(layer), saved.frozen_quantized[name]
    if settings != recorded:
        raise AdapterError(f"layer {name} requantized with {settings}, but was trained with {recorded}")
    return dequantize_weight(layer)


def _write_config(model_dir: Path, folder: Path, dtype: torch.dtype) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_side_files(model_dir: Path, folder: Path) -> None:
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in COPY_PATTERNS):
            shutil.copy2(path, folder / path.name)


# ---------------------------------------------------------------------------------- logit check
def compare_logits(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    device: str | None = None,
    allow_base_mismatch: bool = False,
) -> dict:
    """Max |logit difference| between a merged checkpoint and the reloaded trained model, per prompt.

    Returns:
        ``{"max_abs_diff": float, "max_abs_logit": float, "per_prompt": [float, ...]}``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = load(base, adapter_dir, device=device, allow_base_mismatch=allow_base_mismatch, progress=False)
    run_device = next(p.device for p in trained.parameters())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).to(run_device).eval()
    tokenizer = None
    diffs, peak = [], 0.0
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
                except Exception as exc:
                    raise ConfigError(f"prompts are text but the base {base} has no usable tokenizer ({exc}); "
                                      "pass token-id lists instead") from exc
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        else:
            ids = torch.tensor([list(prompt)], dtype=torch.long)
        ids = ids.to(run_device)
        with torch.no_grad():
            ref = trained(ids).logits.float()
            got = merged(ids).logits.float()
        diffs.append(float((ref - got).abs().max()))
        peak = max(peak, float(ref.abs().max()))
    result = {"max_abs_diff": max(diffs), "max_abs_logit": peak, "per_prompt": diffs}
    logger.info("merged vs trained model on %d prompt(s): max |logit diff| %.4g (max |logit| %.4g)",
                len(diffs), result["max_abs_diff"], peak)
    return result
