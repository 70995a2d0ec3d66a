"""Quantization-aware refinement (``refine=K``): the math on plain tensors, then prepare / save / load."""

import importlib
import json
from functools import partial

import pytest
import torch

import qolora
from qolora.adapters.layer import adapter_layers
from qolora.base.quant import dequantize_weight, make_base_layer, quantize_dequantize
from qolora.cli.commands import build_parser
from qolora.config import AdapterConfig
from qolora.errors import ConfigError
from qolora.inits import olora_factors, pissa_factors, refine_factors
from qolora.model.adapter_folder import QOLORA_CONFIG

CFG = AdapterConfig(bits=4, rank=8, device="cpu")


def structured_weight(out=192, inp=128, rank=12, seed=0):
    """Low-rank structure (a decaying spectrum) plus noise, like a trained weight, (out, in) fp32."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(inp, rank, generator=g))[0]
    s = torch.logspace(0, -1, rank)
    return (u * s) @ v.T + 0.01 * torch.randn(out, inp, generator=g)


def weight_error(w, a, b, scale, config=CFG):
    return float(torch.linalg.norm(w - quantize_dequantize(w - scale * b @ a, config) - scale * b @ a))


def test_quantize_dequantize_is_what_the_base_layer_computes_with():
    w = structured_weight()
    for cfg in (CFG, CFG.replace(quant_type="fp4", blocksize=128, double_quant=False), CFG.replace(bits=8)):
        got = quantize_dequantize(w, cfg)
        assert torch.equal(got, dequantize_weight(make_base_layer(w, None, cfg, w.device))), cfg
    kept = w.clone()
    quantize_dequantize(w, CFG.replace(bits=16)).add_(1)  # a 16-bit "quantization" never aliases its input
    assert torch.equal(w, kept)


@pytest.mark.parametrize("init, factors", [("olora", olora_factors), ("pissa", pissa_factors)])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_refine_lowers_the_weight_error(init, factors, scale):
    w = structured_weight()
    a, b = factors(w, 8, scale, torch.Generator().manual_seed(0))
    qd = partial(quantize_dequantize, config=CFG)
    a3, b3, errors = refine_factors(w, a, b, scale, qd, 3, init, torch.Generator().manual_seed(1))
    assert len(errors) == 3
    assert errors[0] == pytest.approx(weight_error(w, a, b, scale), rel=1e-6)  # round 0: the unrefined init
    final = weight_error(w, a3, b3, scale)
    assert errors[1] < errors[0] and final < errors[0]
    assert final < 0.95 * errors[0], (errors, final)
    assert a3.shape == a.shape and b3.shape == b.shape


def test_refined_olora_keeps_its_form():
    w = structured_weight(seed=3)
    a, b = olora_factors(w, 8, 0.5)
    a2, b2, _ = refine_factors(w, a, b, 0.5, partial(quantize_dequantize, config=CFG), 2, "olora")
    torch.testing.assert_close(b2.T @ b2, torch.eye(8), atol=1e-5, rtol=0)
    # A = B^T T / s with T = W - Q(W - s*B0@A0), the target of the (only) round
    last_target = w - quantize_dequantize(w - 0.5 * b @ a, CFG)
    a1, b1, _ = refine_factors(w, a, b, 0.5, partial(quantize_dequantize, config=CFG), 1, "olora")
    torch.testing.assert_close(0.5 * a1, b1.T @ last_target, atol=1e-5, rtol=1e-5)


def test_zero_rounds_return_the_factors_and_bad_calls_raise():
    w = structured_weight()
    a, b = olora_factors(w, 8, 1.0)
    a0, b0, errors = refine_factors(w, a, b, 1.0, partial(quantize_dequantize, config=CFG), 0, "olora")
    assert torch.equal(a0, a) and torch.equal(b0, b) and errors == []
    with pytest.raises(ValueError, match="not 'lora'"):
        refine_factors(w, a, b, 1.0, partial(quantize_dequantize, config=CFG), 1, "lora")


# ------------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("refine, message", [
    (-1, r"refine=-1 must be an integer >= 0"),
    (1.5, r"refine=1.5 must be an integer >= 0"),
    (True, r"refine=True must be an integer >= 0"),
])
def test_refine_must_be_a_count(refine, message):
    with pytest.raises(ConfigError, match=message):
        AdapterConfig(refine=refine).validate()


def test_refine_with_lora_is_refused_before_any_weight_is_read(tiny_llama_dir, monkeypatch):
    from qolora.base.reader import BaseCheckpoint

    monkeypatch.setattr(BaseCheckpoint, "tensors", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    with pytest.raises(ConfigError, match=r"refine=2 needs init='olora' or 'pissa': init='lora'"):
        qolora.prepare(tiny_llama_dir, init="lora", refine=2, progress=False)
    AdapterConfig(init="lora", refine=0).validate()
    AdapterConfig(init="pissa", refine=3).validate()


def test_cli_passes_refine_to_the_adapter_options():
    args = build_parser().parse_args(["finetune", "--refine", "3"])
    assert args.refine == 3
    assert build_parser().parse_args(["finetune"]).refine == 0


# ------------------------------------------------------------------------------ prepare, save, load
def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])


def test_refine_zero_is_todays_prepare_bitwise(tiny_llama_dir):
    default = qolora.prepare(tiny_llama_dir, rank=8, init="pissa", device="cpu", progress=False)
    zero = qolora.prepare(tiny_llama_dir, rank=8, init="pissa", device="cpu", refine=0, progress=False)
    assert torch.equal(_logits(default, IDS), _logits(zero, IDS))
    for (_, x), (_, y) in zip(adapter_layers(default), adapter_layers(zero)):
        assert torch.equal(x.lora_A.weight, y.lora_A.weight) and torch.equal(x.lora_B.weight, y.lora_B.weight)
        assert torch.equal(dequantize_weight(x.base_layer), dequantize_weight(y.base_layer))
    assert all(r.round_errors is None for r in zero.qolora.report.layers)
    assert zero.qolora.report.round_totals is None


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_prepare_reports_the_error_of_every_round(tiny_llama_dir, init):
    plain = qolora.prepare(tiny_llama_dir, rank=8, init=init, device="cpu", progress=False)
    model = qolora.prepare(tiny_llama_dir, rank=8, init=init, device="cpu", refine=2, compare_plain=True,
                           progress=False)
    report = model.qolora.report
    assert report.refine == 2
    for row, unrefined in zip(report.layers, plain.qolora.report.layers):
        assert len(row.round_errors) == 3 and row.round_errors[-1] == row.error
        assert row.round_errors[0] == pytest.approx(unrefined.error, rel=1e-5)  # round 0 is today's init
    totals = report.round_totals
    assert totals[1] < totals[0] and totals[2] < totals[0]
    assert report.total_error < plain.qolora.report.total_error
    assert "refine=2, error by round" in report.summary()
    assert report.to_dict()["round_totals"] == totals
    if init == "olora":
        for _, layer in adapter_layers(model):
            b = layer.lora_B.weight.detach()
            torch.testing.assert_close(b.T @ b, torch.eye(8), atol=1e-5, rtol=0)


def test_refined_adapter_reloads_exactly_without_refining_again(tiny_llama_dir, tmp_path, monkeypatch):
    model = qolora.prepare(tiny_llama_dir, rank=8, device="cpu", refine=2, progress=False)
    with torch.no_grad():  # "train": move the adapters off their initial values
        for _, layer in adapter_layers(model):
            layer.lora_A.weight.add_(0.01 * torch.randn_like(layer.lora_A.weight))
            layer.lora_B.weight.add_(0.01 * torch.randn_like(layer.lora_B.weight))
    want = _logits(model, IDS)
    out = qolora.save_adapter(model, tmp_path / "adapter")
    assert json.loads((out / QOLORA_CONFIG).read_text())["adapter_config"]["refine"] == 2

    prepare_module = importlib.import_module("qolora.model.prepare")  # the module (qolora.prepare is the function)

    def no_refine(*a, **k):
        raise AssertionError("load ran the refinement again")

    monkeypatch.setattr(prepare_module, "refine_factors", no_refine)
    monkeypatch.setattr(importlib.import_module("qolora.inits"), "refine_factors", no_refine)
    loaded = qolora.load(tiny_llama_dir, out, progress=False)
    assert loaded.qolora.config.refine == 2
    assert torch.equal(_logits(loaded, IDS), want)
    for (_, x), (_, y) in zip(adapter_layers(model), adapter_layers(loaded)):
        assert torch.equal(dequantize_weight(x.base_layer), dequantize_weight(y.base_layer))
