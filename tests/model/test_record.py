"""qolora.model.record: the quantization report flags layers whose weights look corrupted."""

from __future__ import annotations

import logging

import torch
from safetensors.torch import load_file, save_file

import qolora
from qolora.model.record import LayerReport, QuantReport
from tiny_models import make_tiny_llama


def test_a_damaged_base_weight_is_named_after_prepare(tmp_path, caplog):
    base = make_tiny_llama(tmp_path / "base", layers=4)
    tensors = load_file(base / "model.safetensors")
    key = "model.layers.2.mlp.up_proj.weight"
    garbage = tensors[key].clone()
    garbage.view(-1)[:1024] = torch.empty(1024).uniform_(-1e6, 1e6)  # 4 KiB of fp32 overwritten
    tensors[key] = garbage
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="qolora.model.prepare"):
        qolora.prepare(base, bits=4, rank=4, device="cpu", progress=False)
    flagged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(flagged) == 1 and "model.layers.2.mlp.up_proj: weight RMS" in flagged[0], flagged


def test_non_finite_weights_and_rms_outliers_are_reported():
    rows = [LayerReport(f"model.layers.{i}.q_proj", (8, 8), norm, 0.1) for i, norm in enumerate([1.0, 1.1, 0.9, 50.0])]
    rows.append(LayerReport("model.layers.0.k_proj", (8, 8), float("nan"), 0.1))
    problems = QuantReport("olora", 4, layers=rows).suspicious_layers()
    assert problems[0] == "model.layers.0.k_proj: its weights hold NaN or inf"
    assert len(problems) == 2 and problems[1].startswith("model.layers.3.q_proj: weight RMS 6.25 is 48x the median")
