"""Adapters saved by earlier qolora versions keep loading exactly (on-disk format stability).

``fixtures/adapter_v1`` was written by qolora 0.1.0 (before the module restructure) with
``fixtures/make_adapter_v1.py``: a tiny bf16 base, a trained 4-bit OLoRA adapter, and the logits the
trained model gave on one prompt.
"""

import json
from pathlib import Path

import torch

import qolora

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "adapter_v1"


def test_an_adapter_saved_by_qolora_0_1_0_loads_to_the_same_logits():
    expected = json.loads((FIXTURE / "expected.json").read_text())
    model = qolora.load(FIXTURE / "base", FIXTURE / "adapter", device="cpu", progress=False)
    with torch.no_grad():
        logits = model(torch.tensor([expected["prompt"]])).logits[0]
    want = torch.tensor(expected["logits"])
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
