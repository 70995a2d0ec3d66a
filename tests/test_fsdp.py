"""FSDP-QLoRA on the CPU: 2 gloo processes shard a 4-bit (fp32-stored) tiny Llama with FSDP2's
``fully_shard``; one sharded step (forward loss, summed adapter gradients, AdamW update) must equal
the data-parallel step on the same global batch. The worker is tests/fsdp_worker.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qolora import AdapterConfig, prepare
from qolora.fsdp import fsdp_problems, shard_model
from test_distributed import _finish, _torchrun

WORKER = Path(__file__).with_name("fsdp_worker.py")


def test_fsdp_step_equals_data_parallel_step(tmp_path, chat_model_dir):  # noqa: F811
    out = tmp_path / "report.json"
    proc = _torchrun([str(chat_model_dir), str(out)], script=WORKER)
    log = _finish(proc, timeout=240)
    assert proc.returncode == 0, log[-5000:]
    reports = json.loads(out.read_text())
    assert len(reports) == 2
    for r in reports:
        assert r["packed_local"] * 2 == r["packed_full"]  # each rank stores half of the packed 4-bit weight
        assert r["n_sharded"] == r["n_params"] - 1  # all but the output head (used outside the backbone)
        assert r["loss_fsdp"] == pytest.approx(r["loss_ref"], rel=1e-6)
        assert r["grad_norm"] > 0 and r["moved"] > 1e-4
        assert r["grad_rel"] <= 1e-6 and r["weight_rel"] <= 1e-6
        assert "quant_storage='bf16'" in r["uint8_problems"][0]


def test_fsdp_refuses_without_process_group(chat_model_dir):  # noqa: F811
    net = prepare(chat_model_dir, config=AdapterConfig(rank=4, device="cpu", quant_storage="fp32"), progress=False)
    problems = fsdp_problems(net)
    assert any("launch with torchrun" in p for p in problems)
    with pytest.raises(ValueError, match="cannot shard the model with FSDP"):
        shard_model(net)
    assert not any("float storage" in p for p in problems)
    assert all(not hasattr(p, "placements") for p in net.parameters())  # nothing changed
    assert torch.is_tensor(next(net.parameters()))
