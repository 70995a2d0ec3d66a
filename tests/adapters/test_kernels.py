"""The fused adapter step (qolora.adapters.kernels) against the plain path, and partial gradient checkpointing."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import qolora
from qolora import ConfigError
from qolora.adapters.kernels import _FusedAdapterLinear, unsupported_reason
from qolora.adapters.layer import AdapterLinear, adapter_parameters, set_kernels
from qolora.base.quant import make_base_layer
from qolora.config import AdapterConfig
from qolora.training.loop import loss_sum


def _layer(bits: int, bias: bool = True, dropout: float = 0.0, compute_dtype: str | None = None) -> AdapterLinear:
    options = {"compute_dtype": compute_dtype} if compute_dtype else {}
    cfg = AdapterConfig(bits=bits, rank=4, **options)
    gen = torch.Generator().manual_seed(0)
    base = make_base_layer(torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen) if bias else None, cfg,
                           torch.device("cpu"))
    layer = AdapterLinear(base, 0.1 * torch.randn(4, 64, generator=gen), 0.1 * torch.randn(48, 4, generator=gen), 2.0,
                          dropout=dropout)
    return layer.train()


def _run(layer: AdapterLinear, kernels: str, autocast: bool, x_dtype=torch.float32):
    layer.kernels = kernels
    for p in layer.parameters():
        p.grad = None
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).to(x_dtype).requires_grad_(True)
    torch.manual_seed(5)  # the same dropout mask on both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() ** 2).sum().backward()
    return y, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


def _count_fused(monkeypatch) -> list[int]:
    calls = [0]
    forward = _FusedAdapterLinear.forward

    def counting(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(_FusedAdapterLinear, "forward", staticmethod(counting))
    return calls


@pytest.mark.parametrize("bits", [4, 16])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_equals_plain_fp32(monkeypatch, bits, dropout):
    layer = _layer(bits, dropout=dropout)
    plain = _run(layer, "off", autocast=False)
    calls = _count_fused(monkeypatch)
    fused = _run(layer, "auto", autocast=False)
    assert calls[0] == 1  # the fused node ran
    assert fused[0].dtype == plain[0].dtype == torch.float32
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_fused_within_bf16_tolerance_under_autocast(bits, x_dtype):
    layer = _layer(bits, compute_dtype="bf16")
    plain = _run(layer, "off", autocast=True, x_dtype=x_dtype)
    fused = _run(layer, "auto", autocast=True, x_dtype=x_dtype)
    assert fused[0].dtype == plain[0].dtype  # same output dtype as the layer's own forward
    assert fused[1].dtype == plain[1].dtype == x_dtype
    assert fused[2].dtype == plain[2].dtype == torch.float32  # fp32 masters get fp32 gradients
    for a, b in zip(plain, fused):
        scale = a.detach().float().abs().max()
        assert float((b.detach().float() - a.detach().float()).abs().max()) <= 2e-2 * float(scale)


def test_fallbacks_are_named_and_logged(caplog, monkeypatch):
    import qolora.adapters.kernels

    monkeypatch.setattr(qolora.adapters.kernels, "_logged", set())  # each reason is logged once per process
    eight = _layer(8)
    assert "8-bit" in unsupported_reason(eight.base_layer)
    hooked = _layer(4)
    hooked.base_layer.register_forward_pre_hook(lambda module, args: None)
    assert "hooks" in unsupported_reason(hooked.base_layer)
    assert unsupported_reason(_layer(4).base_layer) is None
    wrapped = _layer(4)
    wrapped.base_layer.forward = wrapped.base_layer.forward  # what accelerate's add_hook_to_module does
    assert "wrapped" in unsupported_reason(wrapped.base_layer)
    with caplog.at_level(logging.INFO, logger="qolora.adapters.kernels"):
        y, *_ = _run(eight, "auto", autocast=False)
    assert any("8-bit" in r.getMessage() for r in caplog.records)
    plain, *_ = _run(eight, "off", autocast=False)
    torch.testing.assert_close(y, plain)


def test_no_fused_node_without_autograd(monkeypatch):
    layer = _layer(4)
    calls = _count_fused(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert calls[0] == 0


def test_prepare_kernels_switch(tiny_llama_dir, monkeypatch):
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    results = {}
    for kernels in ("off", "auto"):
        model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False, kernels=kernels).train()
        assert {layer.kernels for _, layer in qolora.adapters.layer.adapter_layers(model)} == {kernels}
        calls = _count_fused(monkeypatch)
        loss = loss_sum(model, batch)
        loss.backward()
        assert (calls[0] > 0) == (kernels == "auto")
        results[kernels] = (loss.detach(), [p.grad for _, p in adapter_parameters(model)])
    torch.testing.assert_close(results["auto"][0], results["off"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results["off"][1], results["auto"][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="kernels='fast'.*'auto', 'compile', 'off'"):
        qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False, kernels="fast")
    with pytest.raises(ValueError, match="kernels"):
        set_kernels(nn.Sequential(), "on")


def test_partial_checkpointing_same_gradients(tiny_llama_dir):
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    grads = []  # (True == 1 as a dict key: a list keeps the modes apart)
    for mode, expected in ((True, [True, True]), (1, [True, False]), (False, [False, False])):
        model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False, gradient_checkpointing=mode).train()
        assert [layer.gradient_checkpointing for layer in model.model.layers] == expected
        loss_sum(model, batch).backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in adapter_parameters(model)]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[2], grads[0], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="3 layers, but the model has 2 decoder layers"):
        qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False, gradient_checkpointing=3)
    with pytest.raises(ConfigError, match="gradient_checkpointing=-1"):
        qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False, gradient_checkpointing=-1)


def test_partial_checkpointing_in_the_loop_config():
    from qolora.training.options import TrainConfig

    TrainConfig(gradient_checkpointing=12).validate()
    with pytest.raises(ConfigError, match="number of decoder layers"):
        TrainConfig(gradient_checkpointing=-2).validate()


def test_cli_kernels_and_checkpointed_layers(capsys):
    import json

    from qolora.cli import commands as cli

    parser = cli.build_parser()
    args = parser.parse_args(["finetune", "--kernels", "off", "--gradient-checkpointing", "4"])
    assert args.kernels == "off" and args.gradient_checkpointing == 4 and type(args.gradient_checkpointing) is int
    assert parser.parse_args(["finetune"]).kernels == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--kernels", "triton"])
    assert "invalid choice: 'triton'" in capsys.readouterr().err
    assert cli.main(["plan", "llama-3-8b", "--gradient-checkpointing", "20", "--json"]) == 0
    partial = json.loads(capsys.readouterr().out)
    assert cli.main(["plan", "llama-3-8b", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert partial["settings"]["gradient_checkpointing"] == 20 and partial["total_bytes"] > full["total_bytes"]


@pytest.mark.parametrize("case", ["gpt2-4bit", "llama-bias-4bit", "llama-16bit"])
def test_fused_model_matches_plain(tmp_path, case):
    """Whole models: GPT-2's Conv1D (stored transposed), biased projections, an unquantized base."""
    from tiny_models import make_tiny_gpt2, make_tiny_llama

    if case.startswith("gpt2"):
        folder, vocab = make_tiny_gpt2(tmp_path / "m"), 320
    else:
        folder, vocab = make_tiny_llama(tmp_path / "m", bias="bias" in case), 384
    bits = 16 if case.endswith("16bit") else 4
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    out = {}
    for kernels in ("off", "auto"):
        model = qolora.prepare(folder, bits=bits, rank=4, progress=False, kernels=kernels,
                               gradient_checkpointing=True).train()
        torch.manual_seed(0)  # GPT-2's dropout: the same masks on both paths
        loss = loss_sum(model, batch)
        loss.backward()
        out[kernels] = (loss.detach(), [p.grad for _, p in adapter_parameters(model)])
    torch.testing.assert_close(out["auto"][0], out["off"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out["off"][1], out["auto"][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
