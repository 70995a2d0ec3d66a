"""What qolora knows about a model it built: one typed record, kept on the model as ``model.qolora``.

``prepare`` and ``load`` return an ordinary transformers model; everything qolora needs later (to
save the adapter, check a training checkpoint belongs to it, merge, report) is in a
:class:`ModelRecord` attached in one place (:func:`attach_record`) and read back in one place
(:func:`record_of`). Per-layer state (initial factors, base fingerprint) lives on each
:class:`qolora.adapters.layer.AdapterLinear`, declared in its constructor.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from ..config import AdapterConfig

__all__ = ["LayerReport", "ModelRecord", "QuantReport", "attach_record", "record_of"]


@dataclass
class LayerReport:
    """Reconstruction error of one adapted layer (Frobenius norms, fp32)."""

    name: str
    shape: tuple[int, int]
    weight_norm: float
    error: float  # ||W - (deq(q(W_res)) + s*B@A)||
    plain_error: float | None = None  # ||W - deq(q(W))||, plain QLoRA, when compare_plain
    # refine=K: the error after each round, [e_0 (the unrefined init), e_1, ..., e_K (== error)]; else None
    round_errors: list[float] | None = None


@dataclass
class QuantReport:
    """Per-layer and summed weight error of a prepared model against its checkpoint weights."""

    init: str
    bits: int
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    requantized: str | None = None  # "4bit"/"8bit": the checkpoint was stored quantized (errors vs its weights)
    peak_device_bytes: int | None = None  # peak CUDA memory allocated while building (None on the CPU)
    refine: int = 0  # quantization-aware refinement rounds (AdapterConfig.refine)

    @property
    def total_error(self) -> float:
        return sum(r.error for r in self.layers)

    @property
    def total_plain_error(self) -> float | None:
        if not self.layers or any(r.plain_error is None for r in self.layers):
            return None
        return sum(r.plain_error for r in self.layers)

    @property
    def ratio_to_plain(self) -> float | None:
        plain = self.total_plain_error
        return None if not plain else self.total_error / plain

    @property
    def round_totals(self) -> list[float] | None:
        """With ``refine=K``: the summed weight error after each round 0..K (round 0: the unrefined init)."""
        rows = [r.round_errors for r in self.layers]
        if not rows or any(r is None for r in rows):
            return None
        return [sum(col) for col in zip(*rows)]

    def suspicious_layers(self, factor: float = 20.0) -> list[str]:
        """Layers whose weights look corrupted, as messages: a non-finite norm, or an RMS more than ``factor``
        times the median of the layers of the same kind (the same last name part, e.g. ``q_proj``; 3 or more)."""
        def rms(r: LayerReport) -> float:
            return r.weight_norm / math.sqrt(max(1, r.shape[0] * r.shape[1]))

        found = [f"{r.name}: its weights hold NaN or inf" for r in self.layers if not math.isfinite(r.weight_norm)]
        kinds: dict[str, list[LayerReport]] = {}
        for r in self.layers:
            if math.isfinite(r.weight_norm):
                kinds.setdefault(r.name.rsplit(".", 1)[-1], []).append(r)
        for kind, rows in kinds.items():
            if len(rows) < 3:
                continue
            median = statistics.median(rms(r) for r in rows)
            found += [f"{r.name}: weight RMS {rms(r):.3g} is {rms(r) / median:.0f}x the median of the {len(rows)} "
                      f"{kind} layers ({median:.3g})" for r in rows if median > 0 and rms(r) > factor * median]
        return found

    def summary(self) -> str:
        text = (f"{self.init} init, {self.bits}-bit base, {len(self.layers)} adapted layers: summed weight error "
                f"{self.total_error:.4g}")
        if self.ratio_to_plain is not None:
            text += f" = {self.ratio_to_plain:.3f}x plain {self.bits}-bit quantization's {self.total_plain_error:.4g}"
        if self.round_totals is not None:
            text += f"; refine={self.refine}, error by round: " + " -> ".join(f"{e:.4g}" for e in self.round_totals)
        peak = ("" if self.peak_device_bytes is None
                else f", peak {self.peak_device_bytes / 2**30:.2f} GiB on the device")
        return text + f" ({self.seconds:.1f} s{peak})"

    def to_dict(self) -> dict:
        return {
            "init": self.init, "bits": self.bits, "seconds": self.seconds,
            "total_error": self.total_error, "total_plain_error": self.total_plain_error,
            "ratio_to_plain": self.ratio_to_plain, "requantized": self.requantized,
            "peak_device_bytes": self.peak_device_bytes, "refine": self.refine, "round_totals": self.round_totals,
            "layers": [{f.name: getattr(r, f.name) for f in fields(r)} for r in self.layers],
        }


@dataclass
class ModelRecord:
    """How a qolora model was built.

    Attributes:
        config: the adapter configuration (for a loaded adapter, with the dtypes training used).
        base: the base model as the user named it (folder or hub id).
        base_dir: the local folder it was read from.
        report: the weight-error report of the build.
        adapter_dir: the adapter folder it was loaded from (None for a fresh ``prepare``).
        offload: the :class:`qolora.memory.base_streaming.OffloadedLayers` streaming its base from host memory, or None.
    """

    config: AdapterConfig
    base: str
    base_dir: Path
    report: QuantReport
    adapter_dir: Path | None = None
    offload: Any = None


def attach_record(model: nn.Module, record: ModelRecord) -> None:
    """Keep ``record`` on ``model`` as ``model.qolora``.

    ``model.qolora_config`` and ``model.qolora_report`` name the same objects, for code written
    against qolora 0.1 (read them, never assign them: qolora reads ``model.qolora``). The builders
    (:func:`qolora.model.prepare.adopt`) also attach what Trainer and TRL need (:mod:`qolora.model.hf_compat`).
    """
    model.qolora = record
    model.qolora_config = record.config
    model.qolora_report = record.report
    model.name_or_path = record.base


def record_of(model: nn.Module) -> ModelRecord | None:
    """The :class:`ModelRecord` of a model built by qolora, or None."""
    record = getattr(model, "qolora", None)
    return record if isinstance(record, ModelRecord) else None
