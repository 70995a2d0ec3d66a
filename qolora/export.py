"""Leaving qolora: a plain LoRA for the original base, or a merged full-precision checkpoint.

A trained qolora model computes ``deq(q(W_res)) + s*B@A`` with ``W_res = W - s*B0@A0``. Two ways out:

* :func:`export_lora` writes a plain PEFT LoRA for the *original* full-precision base ``W``, rank 2r:
  ``A' = [A; A0]``, ``B' = [B, -B0]`` so that ``W + s*B'@A' = W_res + s*B@A``, with ``lora_alpha``
  chosen to keep ``s`` (``2*alpha``; ``sqrt(2)*alpha`` with rsLoRA) and ``init_lora_weights=True``
  (loading it runs no QR/SVD and touches no base weight). For ``init="lora"`` it is the adapter
  itself. Such an adapter computes with ``W_res`` where training used ``deq(q(W_res))``: the residual's
  quantization error is dropped. That gap is always reported (returned, and logged as a warning),
  per layer and summed, relative to ``||W||``; it is the number recorded when the model was built.
* :func:`merge` writes an ordinary transformers checkpoint (sharded safetensors, config.json without
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
import math
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .adapter_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    AdapterError,
    FingerprintCheck,
    SavedAdapter,
    adapter_from_model,
    atomic_dir,
    check_base_structure,
    check_out_dir,
    peft_adapter_config,
    read_adapter,
    resolve_device_config,
)
from .checkpoint import checkpoint_files, checkpoint_key_map, iter_checkpoint, meta_model, resolve_model_dir
from .config import ConfigError, parse_dtype
from .inits import adapter_scale, residual_
from .quant import (
    dequantize_stored, dequantize_weight, make_base_layer, quant_settings, stored_group_complete, stored_part,
)

__all__ = ["export_lora", "merge", "parse_size"]

logger = logging.getLogger(__name__)

EXPORT_REPORT = "qolora_export.json"
MERGE_RECORD = "qolora_merge.json"
INTO = ("trained", "original")
# Non-weight files of a checkpoint folder that a merged folder needs (config.json is rewritten).
COPY_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                 "*.tiktoken", "chat_template.*", "generation_config.json", "preprocessor_config.json", "*.py")


# ----------------------------------------------------------------------------------- export_lora
def export_lora(
    model_or_adapter_dir: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a plain LoRA adapter for the original full-precision base (see the module docstring).

    Args:
        model_or_adapter_dir: a qolora model (from :func:`qolora.prepare` / :func:`qolora.load`) or a
            folder written by :func:`qolora.save_adapter`. No base weights are read either way.
        out_dir: the PEFT adapter folder to write (``adapter_model.safetensors``,
            ``adapter_config.json``, and ``qolora_export.json`` with the report).
        base: recorded as ``base_model_name_or_path`` (default: the base the adapter was trained on).
        overwrite: replace an existing ``out_dir`` atomically.

    Returns:
        The report: ``rank``, ``lora_alpha``, ``scale``, per-layer ``layers`` (``weight_norm``,
        ``dropped_error`` = ``||W_res - deq(q(W_res))||``, ``relative``) and the sums
        ``total_dropped_error``, ``total_weight_norm``, ``relative_error``.

    Raises:
        ConfigError: ``out_dir`` exists (and not ``overwrite``).
        AdapterError: not a qolora model, or a bad adapter folder.
    """
    out = check_out_dir(out_dir, overwrite, "export folder")
    if isinstance(model_or_adapter_dir, nn.Module):
        saved = adapter_from_model(model_or_adapter_dir)
    else:
        saved = read_adapter(model_or_adapter_dir)
    cfg = saved.config
    if saved.needs_residual:
        rank = 2 * cfg.rank
        alpha = cfg.lora_alpha * (math.sqrt(2.0) if cfg.use_rslora else 2.0)
    else:
        rank, alpha = cfg.rank, cfg.lora_alpha
    if not math.isclose(adapter_scale(alpha, rank, cfg.use_rslora), saved.scale, rel_tol=1e-12):  # pragma: no cover
        raise AssertionError("export changed the adapter scale")
    tensors = {}
    for name, (a, b) in saved.weights.items():
        a, b = a.float(), b.float()
        if saved.needs_residual:
            a0, b0 = saved.init[name]
            a, b = torch.cat([a, a0.float()], 0), torch.cat([b, -b0.float()], 1)  # (2r, in), (out, 2r)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"layer {name}: the adapter has non-finite values (did training diverge?)")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    report = _export_report(saved, out, rank, alpha)
    peft_config = peft_adapter_config(saved, rank=rank, alpha=alpha, init_lora_weights=True,
                                      base_name_or_path=None if base is None else str(base))
    from safetensors.torch import save_file  # noqa: PLC0415

    with atomic_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        (tmp / EXPORT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    _warn_export(report)
    return report


def _export_report(saved: SavedAdapter, out: Path, rank: int, alpha: float) -> dict:
    rows, known = [], True
    for name, rec in saved.layers.items():
        if rec.quant_error is None or rec.weight_norm is None:
            known = False
        rel = None if not rec.weight_norm or rec.quant_error is None else rec.quant_error / rec.weight_norm
        rows.append({"name": name, "weight_norm": rec.weight_norm, "dropped_error": rec.quant_error, "relative": rel})
    total_err = sum(r["dropped_error"] for r in rows) if known else None
    total_norm = sum(r["weight_norm"] for r in rows) if known else None
    return {
        "out_dir": str(out), "init": saved.config.init, "bits": saved.config.bits, "rank": rank, "lora_alpha": alpha,
        "scale": saved.scale, "use_rslora": saved.config.use_rslora, "layers": rows,
        "total_dropped_error": total_err, "total_weight_norm": total_norm,
        "relative_error": None if not total_norm else total_err / total_norm,
        "other_quantized_layers": len(saved.frozen_quantized),
    }


def _warn_export(report: dict) -> None:
    what = "residual" if report["init"] != "lora" else "base"
    if report["relative_error"] is None:
        logger.warning("exported plain LoRA to %s; the %s quantization error it drops is unknown (no report recorded)",
                       report["out_dir"], what)
        return
    if report["total_dropped_error"] == 0:
        logger.info("exported plain LoRA (rank %d) to %s: the trained base was not quantized, so on the original "
                    "full-precision base it computes exactly the trained function", report["rank"], report["out_dir"])
        return
    worst = max(report["layers"], key=lambda r: r["relative"] or 0.0)
    logger.warning(
        "exported plain LoRA (rank %d) to %s for the ORIGINAL full-precision base. It differs from the trained "
        "%d-bit model: it drops the %s quantization error, summed ||W_res - deq(q(W_res))|| = %.4g = %.3g%% of "
        "summed ||W|| over %d layers (worst: %s, %.3g%%)%s. For the exact trained function use qolora.load or "
        "qolora.merge(into='trained')",
        report["rank"], report["out_dir"], report["bits"], what, report["total_dropped_error"],
        100 * report["relative_error"], len(report["layers"]), worst["name"], 100 * (worst["relative"] or 0.0),
        f"; {report['other_quantized_layers']} other quantized layers also revert to full precision"
        if report["other_quantized_layers"] else "",
    )


# ------------------------------------------------------------------------------------------ merge
def parse_size(value: int | str, what: str = "max_shard_size") -> int:
    """Bytes from an int or a string like ``"2GB"``, ``"500MB"``, ``"1.5GiB"`` (GB = 10^9, GiB = 2^30).

    Raises:
        ConfigError: not a positive size.
    """
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    size = -1
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        try:
            size = int(float(number) * units[text[len(number):] or "B"])
        except (ValueError, KeyError, OverflowError):
            size = -1
    if size <= 0:
        raise ConfigError(f"{what}={value!r} is not a size; use a positive number of bytes or a string like "
                          "'2GB', '500MB', '1GiB'")
    return size


def _release_freed_memory() -> None:
    """Hand memory freed by the last shard back to the OS (glibc keeps it otherwise; no-op elsewhere)."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors shard (safetensors >= 0.6 writes straight from the tensors, no copy)."""
    from safetensors.torch import save_file  # noqa: PLC0415

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


def _same_path(a: Path, b: Path) -> bool:
    a, b = a.expanduser().resolve(), b.expanduser().resolve()
    return a == b or b.is_relative_to(a)


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
            ``out_dir`` that is (or contains) the base or the adapter; all before the base is read.
        AdapterError: a bad adapter folder, or a base with other layers or shapes.
        BaseMismatchError: a base weight differs from the training base (unless allowed).
    """
    start = time.perf_counter()
    out_dtype = parse_dtype(dtype, "dtype")
    if into not in INTO:
        raise ConfigError(f"into={into!r} is not supported; allowed: {list(INTO)}")
    max_bytes = parse_size(max_shard_size)
    out = check_out_dir(out_dir, overwrite)
    saved = read_adapter(adapter_dir)
    config = resolve_device_config(saved, device)
    model_dir = resolve_model_dir(base)
    for other, what in ((model_dir, "the base checkpoint"), (Path(adapter_dir), "the adapter folder")):
        if _same_path(out, other):
            raise ConfigError(f"out_dir {str(out)!r} is or contains {what} ({other}); write the merge somewhere else")
    files = checkpoint_files(model_dir)
    skeleton, stored_kind = meta_model(model_dir)
    linears = check_base_structure(skeleton, saved, str(base))
    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415

    transposed = {n for n, m in linears.items() if isinstance(m, Conv1D)}
    to_model = checkpoint_key_map(skeleton)
    del skeleton
    requantize = set(saved.frozen_quantized) if into == "trained" else set()
    check = FingerprintCheck(saved, str(base), allow_base_mismatch)
    train_dtype, device = config.torch_dtype, config.torch_device
    counts = {"merged": 0, "requantized": 0}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # parts of layers stored quantized, being gathered
    weight_keys: dict[str, str] = {}
    from tqdm.auto import tqdm  # noqa: PLC0415

    def write_linear(module: str, weight: torch.Tensor) -> None:
        """Write linear layer ``module`` from its fp32 (out, in) weight on ``device`` (consumed)."""
        if module in saved.layers:
            weight = _merged_weight(module, weight, saved, config, into, check)
            counts["merged"] += 1
        elif module in requantize:
            weight = _requantized_weight(module, weight, saved, config)
            counts["requantized"] += 1
        elif into == "trained":
            weight = weight.to(train_dtype)  # as the trained model held it
        writer.add(weight_keys.pop(module), _to_checkpoint(weight.to(out_dtype), module in transposed))

    with atomic_dir(out, overwrite) as tmp:
        writer = _ShardWriter(tmp, max_bytes)
        for key, tensor in tqdm(iter_checkpoint(files), desc=f"merge ({into})", unit="tensor", disable=not progress):
            name = to_model(key) or key
            module, _, leaf = name.rpartition(".")
            part = stored_part(name, linears) if stored_kind else None
            if part is not None:  # a bitsandbytes-stored layer: dequantized once all its parts are read
                if part[1] == "weight_format":  # 8-bit layout tag: nothing to dequantize with
                    continue
                group = pending.setdefault(part[0], {})
                group[part[1]] = tensor
                if part[1] == "weight":
                    weight_keys[part[0]] = key
                if stored_group_complete(group):
                    write_linear(part[0], dequantize_stored(pending.pop(part[0]), device))
                continue
            if leaf == "weight" and (module in saved.layers or module in requantize):
                weight_keys[module] = key
                write_linear(module, _weight_fp32(tensor, device, module in transposed))
                continue
            if tensor.is_floating_point():
                tensor = tensor.to(train_dtype).to(out_dtype) if into == "trained" else tensor.to(out_dtype)
            writer.add(key, tensor.contiguous())
            del tensor
        for module, group in pending.items():  # left incomplete: unquantized weights, or broken groups
            if set(group) == {"weight"} and group["weight"].is_floating_point():  # a module bnb skipped
                write_linear(module, _weight_fp32(group["weight"], device, module in transposed))
            else:
                write_linear(module, dequantize_stored(group, device))
        shards = writer.finish()
        check.warn()
        missing = len(saved.layers) - counts["merged"]
        if missing:
            raise AdapterError(f"the base checkpoint {base} lacks the weights of {missing} adapted layer(s)")
        _write_config(model_dir, tmp, out_dtype)
        _copy_side_files(model_dir, tmp)
        (tmp / MERGE_RECORD).write_text(json.dumps({
            "into": into, "dtype": str(out_dtype).removeprefix("torch."), "base": str(base),
            "adapter": str(adapter_dir), "base_fingerprint": saved.fingerprint, "init": saved.config.init,
            "bits": saved.config.bits, "rank": saved.config.rank,
        }, indent=2) + "\n")
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


def _weight_fp32(tensor: torch.Tensor, device: torch.device, transposed: bool) -> torch.Tensor:
    weight = tensor.to(device=device, dtype=torch.float32, copy=True)
    return weight.T.contiguous() if transposed else weight  # (out, in)


def _to_checkpoint(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(out, in) on any device -> the checkpoint's orientation, contiguous, on the CPU."""
    weight = weight.T if transposed else weight
    return weight.to("cpu").contiguous()


def _merged_weight(name, weight, saved: SavedAdapter, config, into, check) -> torch.Tensor:
    """The merged fp32 weight (out, in) of one adapted layer from its base weight (fp32, consumed)."""
    device, s = weight.device, saved.scale
    rec = saved.layers[name]
    if tuple(weight.shape) != tuple(rec.shape):
        raise AdapterError(f"layer {name}: the base's weight is {tuple(weight.shape)}, the adapter's {tuple(rec.shape)}")
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
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from .adapter_io import load  # noqa: PLC0415

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
