"""Prepare's memory: 4-bit quantization in slices on the CPU is byte for byte bitsandbytes' one call, and the
report's error measured slice by slice is the exact ``||W - deq(q(W))||`` (no full dequantized copy)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from qolora.base import quant
from qolora.base.quant import dequantize_weight, make_base_layer, quantization_error
from qolora.config import AdapterConfig


@pytest.mark.parametrize("shape", [(384, 256), (33, 96), (7, 10), (300, 100)])
@pytest.mark.parametrize("quant_type,double_quant,storage", [("nf4", True, "uint8"), ("fp4", False, "uint8"),
                                                             ("nf4", True, "bf16"), ("nf4", False, "fp32")])
def test_sliced_quantization_is_bitsandbytes_one_call(monkeypatch, shape, quant_type, double_quant, storage):
    if shape == (7, 10) and storage != "uint8":
        pytest.skip("70 elements do not fill a wider storage word")
    monkeypatch.setattr(quant, "QUANT_SLICE_ELEMENTS", 4096)  # several slices even on these small weights
    cfg = AdapterConfig(bits=4, quant_type=quant_type, double_quant=double_quant, quant_storage=storage, device="cpu")
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
    ref = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=cfg.blocksize, compress_statistics=double_quant,
                            quant_type=quant_type, quant_storage=cfg.torch_quant_storage)._quantize("cpu")
    layer = make_base_layer(w.clone(), None, cfg, torch.device("cpu"))
    got = layer.weight
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.bnb_quantized
    assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
    a, b = got.quant_state, ref.quant_state
    assert torch.equal(a.absmax, b.absmax) and a.shape == b.shape and a.quant_type == b.quant_type
    assert layer.quant_state is a
    if double_quant:
        assert torch.equal(a.offset, b.offset) and torch.equal(a.state2.absmax, b.state2.absmax)
    exact = float(torch.linalg.norm((w - dequantize_weight(layer)).double()))
    assert quantization_error(layer, w) == pytest.approx(exact, rel=1e-9)
    x = torch.randn(3, shape[1])
    ref_layer = make_base_layer(w.clone(), None, cfg, torch.device("cpu"))
    ref_layer.weight.data, ref_layer.weight.quant_state = ref.data, ref.quant_state
    ref_layer.quant_state = ref.quant_state
    with torch.no_grad():
        assert torch.equal(layer(x), ref_layer(x))

