"""kernels="compile": decoder layers' training forward under torch.compile (qolora.adapters.compiled_layers)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import qolora
from qolora.adapters import compiled_layers
from qolora.adapters.compiled_layers import compiled_layer_count
from qolora.adapters.layer import adapter_parameters, set_kernels
from qolora.training.loop import loss_sum

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (its own counters, no graphs or fallbacks left by another test)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled_layers._compiled.cache_clear()
    compiled_layers._broken.clear()
    counters.clear()
    yield
    torch._dynamo.reset()
    compiled_layers._compiled.cache_clear()
    compiled_layers._broken.clear()


def _batch(vocab: int, length: int = 24, seed: int = 0) -> dict:
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def _step(model, batch):
    for _, p in adapter_parameters(model):
        p.grad = None
    loss = loss_sum(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for _, p in adapter_parameters(model)]


@pytest.mark.parametrize("backend, checkpointing", [
    ("aot_eager", True),  # the graphs and their autograd, without code generation (~3 s)
    pytest.param("inductor", True, marks=pytest.mark.slow),  # what users run (C++ code generation: ~20 s)
    pytest.param("inductor", False, marks=pytest.mark.slow),
])
def test_compiled_step_equals_eager(tiny_llama_dir, monkeypatch, backend, checkpointing):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiled_layers, "BACKEND", backend)
    batch = _batch(384)
    eager = qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False, kernels="auto",
                           gradient_checkpointing=checkpointing).train()
    compiled = qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False, kernels="compile",
                              gradient_checkpointing=checkpointing).train()
    assert compiled_layer_count(compiled) == len(compiled.model.layers) == 2
    assert compiled_layer_count(eager) == 0
    want, got = _step(eager, batch), _step(compiled, batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(want[1], got[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # No graph breaks: the 4-bit matmul and the fused adapter are traced in. One graph serves every
    # layer; without checkpointing layer 0's input (the frozen embedding's output) needs no gradient
    # and the others' do, which makes a second graph, not one per layer.
    assert dict(counters["graph_break"]) == {}
    graphs = 1 if checkpointing else 2
    assert counters["stats"]["unique_graphs"] == graphs
    if not checkpointing:  # (slow) a second step reuses them; new lengths recompile once (dynamic shapes)
        _step(compiled, batch)
        _step(compiled, _batch(384, length=17, seed=1))
        _step(compiled, _batch(384, length=29, seed=2))
        assert counters["stats"]["unique_graphs"] == 2 * graphs


def test_no_grad_runs_eagerly(tiny_llama_dir):
    from torch._dynamo.utils import counters

    model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False, kernels="compile").eval()
    reference = qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False, kernels="auto").eval()
    batch = _batch(384)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"]).logits
        want = reference(input_ids=batch["input_ids"]).logits
        generated = model.generate(batch["input_ids"][:1, :5], max_new_tokens=4, do_sample=False)
    assert counters["stats"]["calls_captured"] == 0  # nothing was compiled for evaluation or generation
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert generated.shape == (1, 9)


def test_switching_kernels_compiles_and_restores(tiny_llama_dir):
    model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False).train()
    layer = model.model.layers[0]
    assert "forward" not in layer.__dict__
    set_kernels(model, "compile")
    set_kernels(model, "compile")  # idempotent: one wrapper, not a wrapper of a wrapper
    assert compiled_layer_count(model) == 2 and isinstance(layer.__dict__["forward"], compiled_layers._TrainingForward)
    assert {a.kernels for _, a in qolora.adapters.layer.adapter_layers(model)} == {"compile"}
    # A deep copy (e.g. a trainer's) compiles its own layers, not the original's.
    twin = copy.deepcopy(model)
    assert twin.model.layers[0].forward.layer is twin.model.layers[0]
    set_kernels(model, "auto")
    assert compiled_layer_count(model) == 0 and "forward" not in layer.__dict__
    assert compiled_layer_count(twin) == 2


@pytest.mark.parametrize("error", [
    lambda: torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no compiler here"), None),
    lambda: torch._dynamo.exc.TorchRuntimeError("no compiler here"),  # any other Dynamo error while compiling
])
def test_backend_failure_falls_back_to_eager_and_logs_once(tiny_llama_dir, monkeypatch, caplog, error):
    """A backend that cannot build (no C++ compiler, no Triton) leaves the layers eager, said once."""
    calls = []

    def failing_compile(function):
        def run(*args, **kwargs):
            calls.append(1)
            raise error()
        return run

    monkeypatch.setattr(compiled_layers, "_compiled", failing_compile)
    monkeypatch.setattr(qolora.adapters.kernels, "_logged", set())
    batch = _batch(384)
    want = _step(qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False).train(), batch)
    model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False, kernels="compile").train()
    with caplog.at_level(logging.INFO, logger="qolora.adapters.kernels"):
        got = _step(model, batch)
        _step(model, batch)
    assert len(calls) == 1  # tried once; every later call is eager without trying again
    messages = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(messages) == 1 and "no compiler here" in messages[0]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_cli_and_finetune_accept_compile():
    from qolora.adapters.kernels import check_kernels
    from qolora.cli import commands as cli

    assert cli.build_parser().parse_args(["finetune", "--kernels", "compile"]).kernels == "compile"
    assert check_kernels("compile") == "compile"


def test_compile_composes_with_the_memory_options(tmp_path, monkeypatch):
    """Layer streaming (module hooks around the compiled forward) and the host embedding compile; offloaded
    checkpointing (saved-tensor hooks, which Dynamo cannot trace) trains eagerly, said once, same result."""
    from torch._dynamo.utils import counters

    from tiny_models import make_tiny_llama

    monkeypatch.setattr(compiled_layers, "BACKEND", "aot_eager")
    monkeypatch.setattr(qolora.adapters.kernels, "_logged", set())
    folder = make_tiny_llama(tmp_path / "m", tie=False)
    batch = _batch(384)
    for options, compiles in (({"offload": "cpu", "offload_embedding": True}, True),
                              ({"gradient_checkpointing": "offload"}, False)):
        counters.clear()
        want = _step(qolora.prepare(folder, bits=4, rank=4, progress=False, **options).train(), batch)
        model = qolora.prepare(folder, bits=4, rank=4, progress=False, kernels="compile", **options).train()
        got = _step(model, batch)
        assert compiled_layer_count(model) == 2 and not compiled_layers._broken
        assert (counters["stats"]["unique_graphs"] >= 1) == compiles, options
        assert dict(counters["graph_break"]) == {}
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(want[1], got[1]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert "kernels='compile': torch.compile cannot trace offloaded gradient checkpointing" in "".join(
        qolora.adapters.kernels._logged)


def test_fsdp_sharded_layers_stay_eager_and_keep_checkpointing(tmp_path, monkeypatch):
    """fully_shard swaps each layer's class; its (outermost) forward must still checkpoint, eagerly."""
    import torch.distributed as dist

    from qolora.config import AdapterConfig
    from qolora.training.fsdp import shard_model
    from tiny_models import make_tiny_llama

    monkeypatch.setattr(compiled_layers, "BACKEND", "aot_eager")
    monkeypatch.setattr(qolora.adapters.kernels, "_logged", set())
    folder = make_tiny_llama(tmp_path / "m", tie=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = qolora.prepare(folder, config=AdapterConfig(rank=4, device="cpu", quant_storage="fp32"),
                               progress=False, kernels="compile", gradient_checkpointing=True).train()
        shard_model(model)
        calls = []
        for layer in model.model.layers:
            inner = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
        loss_sum(model, _batch(384)).backward()
    finally:
        dist.destroy_process_group()
    from torch._dynamo.utils import counters

    assert len(calls) == 2  # both layers checkpointed
    assert counters["stats"]["unique_graphs"] == 0
    assert any("FSDP-sharded layers are not compiled" in m for m in qolora.adapters.kernels._logged)
