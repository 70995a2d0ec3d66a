"""Offloading the frozen base to host memory (qolora.memory.base_streaming), on the CPU: the whole mechanism runs.

On the CPU "host" and "device" are one memory, but fetch and release are real (each storage freed and
refilled by a copy), so outputs and gradients must be bit-identical to the resident model, and the
order and counts of the moves are observable.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import qolora
from qolora import ConfigError, adapter_parameters, adapter_state_dict, prepare
from qolora.base.reader import BaseCheckpoint
from qolora.base.synthetic import SyntheticCheckpoint
from qolora.memory.base_streaming import OffloadedLayers, decoder_layers, spread
from qolora.planning.placement import offload_layers_for
from qolora.planning.plan import plan
from qolora.training.loop import TrainConfig, train
from tiny_models import make_tiny_llama

L = 3


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A 3-layer tiny Llama with attention and MLP biases (biases move with their layer)."""
    return make_tiny_llama(tmp_path_factory.mktemp("llama3"), layers=L, bias=True)


def _build(path, offload=None, gc=True, **kw):
    return prepare(path, 4, 4, device="cpu", progress=False, gradient_checkpointing=gc, offload=offload, **kw)


def _step(model, ids):
    model.train()
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in adapter_parameters(model)}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


@pytest.mark.parametrize("gc", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_step_is_bit_identical_and_streams_in_order(llama3, gc):
    resident, offloaded = _build(llama3, gc=gc), _build(llama3, "cpu", gc=gc)
    streamer = offloaded.qolora.offload
    assert isinstance(streamer, OffloadedLayers) and streamer.offloaded == list(range(L))
    assert [e for e in streamer.trace] == [("offload", i, "build") for i in range(L)]  # as each layer was built
    assert not any(streamer.is_resident(i) for i in range(L))
    # every layer moves the same frozen bytes: 7 packed weights + statistics + biases
    assert len(set(streamer.layer_bytes.values())) == 1 and streamer.host_bytes > 7 * 64 * 64 // 2
    streamer.reset_stats()

    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    (ref_logits, ref_grads), (logits, grads) = _step(resident, ids), _step(offloaded, ids)
    assert torch.equal(ref_logits, logits)
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * 7 * L
    assert all(torch.equal(ref_grads[k], grads[k]) for k in grads)

    fetches = [(i, phase) for event, i, phase in streamer.trace if event == "fetch"]
    assert fetches == [(i, "forward") for i in range(L)] + [(i, "backward") for i in reversed(range(L))]
    prefetched = [(i, phase) for event, i, phase in streamer.trace if event == "prefetch"]
    assert prefetched == [(i, "forward") for i in range(1, L)] + [(i, "backward") for i in reversed(range(L - 1))]
    s = streamer.stats
    assert dict(s.fetch_counts) == {i: 2 for i in range(L)}  # once forward, once backward (recompute or not)
    assert s.prefetches == 2 * (L - 1) and s.releases == 2 * L and s.max_in_flight == 2
    assert s.bytes_copied == 2 * streamer.host_bytes
    assert not any(streamer.is_resident(i) for i in range(L))  # all released at the end of the backward pass

    # a second step, after an optimizer-free update of the adapters, still matches
    with torch.no_grad():
        for (_, a), (_, b) in zip(adapter_parameters(resident), adapter_parameters(offloaded)):
            a.add_(0.01)
            b.add_(0.01)
    assert torch.equal(_step(resident, ids)[0], _step(offloaded, ids)[0])


def test_inference_fetches_once_and_reads_need_fetched(llama3):
    model = _build(llama3, "cpu")
    streamer = model.qolora.offload
    streamer.reset_stats()
    ids = torch.randint(4, 300, (1, 8))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert streamer.stats.fetches == L * 4 and streamer.stats.releases == L * 4  # 1 forward + 3 generated tokens
    assert generated.shape == (1, 11) and torch.isfinite(out).all()
    layer = decoder_layers(model)[1][0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="offloaded"):
        layer.effective_weight()
    with streamer.fetched([0]):
        w = layer.effective_weight()
    resident = _build(llama3)
    assert torch.equal(w, decoder_layers(resident)[1][0].self_attn.q_proj.effective_weight())
    streamer.remove()  # everything resident again, hooks gone: same logits
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, out)


def test_partial_offload_prefetches_across_resident_layers(tmp_path):
    path = make_tiny_llama(tmp_path / "m", layers=4)
    model = prepare(path, 4, 4, device="cpu", progress=False, gradient_checkpointing=True)
    streamer = OffloadedLayers(model, [1, 3])
    streamer.install()
    ids = torch.randint(4, 300, (1, 8))
    _step(model, ids)
    trace = [(e, i) for e, i, _ in streamer.trace if e != "offload"]
    # resident layer 0 prefetches offloaded layer 1; layer 1 prefetches 3 across resident layer 2
    assert trace[:5] == [("prefetch", 1), ("fetch", 1), ("prefetch", 3), ("release", 1), ("fetch", 3)]
    assert dict(streamer.stats.fetch_counts) == {1: 2, 3: 2}
    assert spread(80, 2) == [20, 60] and spread(4, 9) == [0, 1, 2, 3] and spread(5, 0) == []


def test_train_with_offload_equals_resident_and_resumes_exactly(tmp_path, chat_model_dir, tokenized):  # noqa: F811
    tok, train_ds, eval_ds = tokenized
    opts = dict(max_steps=4, batch_size=4, lr=1e-3, eval_every=0, save_every=2, keep_last=None, log_every=1,
                n_samples=1, max_new_tokens=2, progress=False)

    def model(offload):
        return prepare(chat_model_dir, 4, 4, gradient_checkpointing=True, progress=False, device="cpu",
                       offload=offload, dropout=0.1)  # dropout: the RNG must resume too

    resident = model(None)
    train(resident, tok, train_ds, eval_ds, TrainConfig(output_dir=str(tmp_path / "a"), **opts))
    out = tmp_path / "b"
    offloaded = model("cpu")
    first = train(offloaded, tok, train_ds, eval_ds, TrainConfig(output_dir=str(out), **opts))
    expected = adapter_state_dict(resident)
    assert all(torch.equal(expected[k], v) for k, v in adapter_state_dict(offloaded).items())
    assert offloaded.qolora.offload.stats.fetches > 0

    shutil.rmtree(out / "checkpoints" / "step-000004")  # as if stopped after step 2
    again = model("cpu")
    result = train(again, tok, train_ds, eval_ds, TrainConfig(output_dir=str(out), **opts), resume=True)
    assert result.resumed_from.name == "step-000002"
    assert all(torch.equal(expected[k], v) for k, v in adapter_state_dict(again).items())
    assert [h["loss"] for h in result.history] == [h["loss"] for h in first.history]


def test_saved_adapter_of_an_offloaded_model_reloads(tmp_path, llama3):
    model = _build(llama3, "cpu")
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.add_(0.05)
    ids = torch.randint(4, 300, (1, 10))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    qolora.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "qolora_config.json").read_text())
    assert config["layers"]["model.layers.0.self_attn.q_proj"]["quant"]["bits"] == 4
    for offload in (None, "cpu"):
        loaded = qolora.load(llama3, tmp_path / "adapter", progress=False, offload=offload)
        assert (loaded.qolora.offload is not None) == (offload == "cpu")
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_offload_choices_and_host_check(llama3, monkeypatch):
    with pytest.raises(ConfigError, match="offload='gpu' is not supported"):
        _build(llama3, "gpu")
    assert _build(llama3, "auto").qolora.offload is None  # on the CPU there is nothing to fit
    assert _build(llama3, "none").qolora.offload is None
    import qolora.planning.placement as placement

    monkeypatch.setattr(placement, "available_host_bytes", lambda: 1000)
    cfg = qolora.AdapterConfig(bits=4, rank=4, device="cpu").validate()
    with pytest.raises(ConfigError, match=r"needs 0\.\d+ GiB of host memory, but only 0\.00 GiB is available"):
        offload_layers_for(BaseCheckpoint.open(llama3).hf_config, cfg, "cpu")


def test_plan_70b_on_24gib_fits_with_offload():
    none = plan("llama-3-70b", gpu_memory="24GiB")
    assert not none.fits and none.host_bytes == 0 and none.gpu_bytes == none.total_bytes
    assert any(s["options"] == {"offload": "auto"} and s["fits"] for s in none.suggestions)
    auto = plan("llama-3-70b", gpu_memory="24GiB", offload="auto")
    full = plan("llama-3-70b", gpu_memory="24GiB", offload="cpu")
    assert auto.fits and full.fits and full.num_offloaded_layers == 80 and 0 < auto.num_offloaded_layers < 80
    assert full.host_bytes > 30 * 2**30 and full.gpu_bytes < auto.gpu_bytes <= 24 * 2**30
    per_layer = full.details["per_layer_frozen_bytes"]
    assert full.in_flight_bytes == 2 * per_layer and full.host_bytes == 80 * per_layer
    # one fewer offloaded layer would not fit: auto offloads the fewest that do
    assert auto.gpu_bytes + per_layer > 24 * 2**30 - 2**28
    # auto also moves the (untied) input embedding to the host, first: its limits are those of everything moved
    assert auto.offload_embedding and not full.offload_embedding
    everything = plan("llama-3-70b", gpu_memory="24GiB", offload="cpu", offload_embedding=True)
    assert auto.max_batch_size == everything.max_batch_size > full.max_batch_size >= 1
    assert not plan("llama-3-70b", gpu_memory="24GiB", offload="cpu", host_memory="16GiB").fits
    with pytest.raises(ConfigError, match="offload='auto' needs gpu_memory"):
        plan("llama-3-70b", offload="auto")


def test_plan_cli_offload_json(capsys):
    from qolora.cli.commands import main

    assert main(["plan", "llama-3-70b", "--gpu-memory", "24GiB", "--offload", "auto", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] and result["host_bytes"] > 0 and result["gpu_bytes"] <= 24 * 2**30
    assert main(["plan", "llama-3-70b", "--gpu-memory", "24GiB"]) == 1
    assert "offload='auto'" in capsys.readouterr().out


def test_prepare_from_a_synthetic_source_equals_its_written_folder(tmp_path):
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "tie_word_embeddings": False}
    synthetic = SyntheticCheckpoint(config, dtype=torch.float32)
    folder = synthetic.write(tmp_path / "synthetic")
    from_disk = prepare(folder, 4, 4, device="cpu", progress=False)
    streamed = prepare(BaseCheckpoint.from_source(synthetic, name="tiny-synthetic"), 4, 4, device="cpu",
                       progress=False, offload="cpu")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(from_disk(input_ids=ids).logits, streamed(input_ids=ids).logits)
    assert streamed.qolora.base_dir.name == "<tiny-synthetic>"


def test_offload_benchmark_tiny_mode(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "offload.py"
    spec = importlib.util.spec_from_file_location("bench_offload", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--tiny", "--out", str(tmp_path / "scale_70b.json")])
    result = json.loads(out.read_text())
    for key in ("device", "peak_cuda_bytes", "gpu_memory_cap_bytes", "steps", "tokens_per_s", "resident",
                "bytes_copied_per_step", "overhead_ratio"):
        assert key in result
    assert result["steps"] >= 2 and result["device"].startswith("cpu")
    assert result["bytes_copied_per_step"] == 2 * result["host_bytes"]
    assert result["final_adapters_equal_resident"] is True
