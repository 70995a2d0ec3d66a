"""Leaving qolora for PEFT: a plain LoRA adapter for the original full-precision base.

A trained qolora model computes ``deq(q(W_res)) + s*B@A`` with ``W_res = W - s*B0@A0``. One way out (the other is
:mod:`qolora.export.merge`):

* :func:`export_lora` writes a plain PEFT LoRA for the *original* full-precision base ``W``, rank 2r:
  ``A' = [A; A0]``, ``B' = [B, -B0]`` so that ``W + s*B'@A' = W_res + s*B@A``, with ``lora_alpha``
  chosen to keep ``s`` (``2*alpha``; ``sqrt(2)*alpha`` with rsLoRA) and ``init_lora_weights=True``
  (loading it runs no QR/SVD and touches no base weight). For ``init="lora"`` it is the adapter
  itself. Such an adapter computes with ``W_res`` where training used ``deq(q(W_res))``: the residual's
  quantization error is dropped. That gap is always reported (returned, and logged as a warning),
  per layer and summed, relative to ``||W||``; it is the number recorded when the model was built.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..base.experts import FUSED, peft_expert_factors
from ..files import FolderKind, atomic_dir, check_out_dir, write_json
from ..inits import adapter_scale
from ..model.adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    AdapterError,
    SavedAdapter,
    adapter_from_model,
    peft_adapter_config,
    read_adapter,
)

__all__ = ["export_lora"]

logger = logging.getLogger(__name__)

EXPORT_REPORT = "qolora_export.json"
#: A PEFT LoRA as :func:`export_lora` writes it (``overwrite`` replaces only such a folder).
EXPORT_FOLDER = FolderKind("export folder", EXPORT_REPORT, (ADAPTER_WEIGHTS, ADAPTER_CONFIG, EXPORT_REPORT))



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
    out = check_out_dir(out_dir, overwrite, EXPORT_FOLDER)
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
    tensors, experts = {}, {}
    for name, (a, b) in saved.weights.items():
        a, b = a.float(), b.float()
        if saved.needs_residual:
            a0, b0 = saved.init[name]
            a, b = torch.cat([a, a0.float()], 0), torch.cat([b, -b0.float()], 1)  # (2r, in), (out, 2r)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"layer {name}: the adapter has non-finite values (did training diverge?)")
        slot = saved.layers[name].expert
        if slot is not None:  # gathered per fused 3-D parameter below
            experts.setdefault(slot.fused, {})[slot.index] = (a, b, slot.count)
            continue
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    tensors.update(_expert_tensors(experts))
    report = _export_report(saved, out, rank, alpha)
    peft_config = peft_adapter_config(saved, rank=rank, alpha=alpha, init_lora_weights=True,
                                      base_name_or_path=None if base is None else str(base))
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite, EXPORT_FOLDER) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG, peft_config)
        write_json(tmp / EXPORT_REPORT, report)
    _warn_export(report)
    return report


def _expert_tensors(experts: dict[str, dict[int, tuple]]) -> dict[str, torch.Tensor]:
    """PEFT's tensors for adapted experts: per fused parameter (``...experts.gate_up_proj``), one ``lora_A`` /
    ``lora_B`` pair over all its experts (:func:`qolora.base.experts.peft_expert_factors`; an expert left unadapted
    gets zero factors). PEFT wraps the parameters of one experts module in turn, in the module's order
    (``gate_up_proj`` innermost), so the inner one's keys carry one ``base_layer.`` more per wrapper around it."""
    tensors = {}
    for fused, by_index in experts.items():
        module, _, param = fused.rpartition(".")
        count = next(iter(by_index.values()))[2]
        a0, b0 = next(iter(by_index.values()))[:2]
        a = torch.stack([by_index[e][0] if e in by_index else torch.zeros_like(a0) for e in range(count)])
        b = torch.stack([by_index[e][1] if e in by_index else torch.zeros_like(b0) for e in range(count)])
        lora_a, lora_b = peft_expert_factors(a, b)
        wrapped = [p for p in FUSED if f"{module}.{p}" in experts]
        nesting = "base_layer." * (len(wrapped) - 1 - wrapped.index(param))
        tensors[f"{PEFT_PREFIX}{module}.{nesting}lora_A.weight"] = lora_a
        tensors[f"{PEFT_PREFIX}{module}.{nesting}lora_B.weight"] = lora_b
    return tensors


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
