"""Offloaded gradient checkpointing: same loss and gradients as ordinary checkpointing, and the saved layer
inputs really live in host memory (the copy path forced on the CPU, where the compute device is the host)."""

from __future__ import annotations

import weakref

import pytest
import torch

import qolora
from qolora import ConfigError, adapter_state_dict
from qolora.memory.gradient_checkpointing import OffloadedCheckpointing, find_offloaded_checkpointing, install
from qolora.model.record import record_of
from qolora.planning.plan import plan
from qolora.training.loop import TrainConfig, train
from tiny_models import loss_and_grads


def tokens(batch=2, length=12, seed=3):
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def decoder_layers(model):
    return list(model.model.layers) if hasattr(model, "model") else list(model.transformer.h)


def force_host_copies(model) -> OffloadedCheckpointing:
    """What a GPU does: every checkpoint copied to a separate host tensor, the compute-device one released."""
    func = OffloadedCheckpointing(copy_host_tensors=True)
    assert install(model, func) > 0
    return func


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_offloaded_checkpointing_gives_the_same_loss_and_gradients(arch, tiny_llama_dir, tiny_gpt2_dir):
    path = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    x = tokens()
    results = {}
    for mode in (False, True, "offload", "copy"):
        model = qolora.prepare(path, bits=4, rank=4, progress=False, device="cpu", dropout=0.1, seed=5,
                               gradient_checkpointing="offload" if mode == "copy" else mode)
        if mode == "copy":
            force_host_copies(model)
        torch.manual_seed(0)  # dropout: the recompute replays the same mask
        results[mode] = loss_and_grads(model, x)
    ref_loss, ref_grads = results[True]
    for mode in ("offload", "copy"):
        loss, grads = results[mode]
        assert loss == ref_loss  # the recompute sees the very same values: bit for bit
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), name
    loss, grads = results[False]  # and checkpointing itself changes nothing beyond rounding
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-6, rtol=1e-4), name


def test_checkpoints_are_host_copies_and_the_device_tensors_are_released(tiny_llama_dir):
    x = tokens(batch=2, length=10)
    model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False, device="cpu",
                           gradient_checkpointing="offload")
    model.train()
    layers = decoder_layers(model)
    inputs: list[weakref.ref] = []
    values: list[torch.Tensor] = []

    def remember(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(weakref.ref(hidden))
        values.append(hidden.detach().clone())

    handles = [layer.register_forward_pre_hook(remember, with_kwargs=True) for layer in layers]

    # On the CPU nothing is copied: the layer inputs themselves are what autograd keeps.
    plain = find_offloaded_checkpointing(model)
    assert plain is not None and not plain.copy_host_tensors
    loss = model(input_ids=x, labels=x).loss
    assert plain.stashed == [] and all(r() is not None for r in inputs)
    loss.backward()
    del loss

    # The copy path (a GPU's): one host copy per decoder layer, equal to its input, and the input released.
    inputs.clear()
    values.clear()
    func = force_host_copies(model)
    loss = model(input_ids=x, labels=x).loss
    stashed = func.stashed
    assert len(stashed) == len(layers)
    hidden = model.config.hidden_size
    for kept, value in zip(stashed, values):
        assert kept.device.type == "cpu" and kept.shape == (2, 10, hidden)
        assert torch.equal(kept, value)
    # Released, but for the first layer's: the embedding output, a leaf that requires grad (transformers'
    # enable_input_require_grads), which autograd's gradient accumulator holds in any case.
    assert inputs[0]() is not None and inputs[0]().grad_fn is None
    assert all(r() is None for r in inputs[1:]), "a layer input is still held besides its host copy"
    assert func.host_bytes == len(layers) * 2 * 10 * hidden * 4
    del stashed, kept
    loss.backward()
    assert func.stashed == []  # freed with the graph
    for h in handles:
        h.remove()


def test_training_loop_keeps_switches_and_validates_the_mode(tmp_path, chat_model_dir, tokenized):
    tok, train_ds, _ = tokenized
    cfg = dict(max_steps=2, batch_size=4, lr=1e-3, eval_every=0, save_every=0, n_samples=0, progress=False,
               optim="adamw")
    trained = {}
    for mode in (True, "offload"):
        model = qolora.prepare(chat_model_dir, 4, 4, progress=False, device="cpu", gradient_checkpointing=True)
        result = train(model, tok, train_ds, None,
                       TrainConfig(output_dir=str(tmp_path / str(mode)), gradient_checkpointing=mode, **cfg))
        assert (find_offloaded_checkpointing(model) is not None) == (mode == "offload")
        trained[mode] = (result.history, adapter_state_dict(model))
    assert [h["loss"] for h in trained[True][0]] == [h["loss"] for h in trained["offload"][0]]
    for name, w in trained[True][1].items():
        assert torch.equal(w, trained["offload"][1][name]), name

    # True keeps a model prepared with "offload" offloading; False turns checkpointing off.
    model = qolora.prepare(chat_model_dir, 4, 4, progress=False, device="cpu", gradient_checkpointing="offload")
    train(model, tok, train_ds, None, TrainConfig(output_dir=str(tmp_path / "keep"), **cfg))
    assert find_offloaded_checkpointing(model) is not None
    train(model, tok, train_ds, None,
          TrainConfig(output_dir=str(tmp_path / "off"), gradient_checkpointing=False, **cfg))
    assert find_offloaded_checkpointing(model) is None and not model.is_activation_checkpointing
    assert record_of(model) is not None

    with pytest.raises(ConfigError, match="gradient_checkpointing='sometimes'.*'offload'"):
        TrainConfig(output_dir=str(tmp_path / "bad"), gradient_checkpointing="sometimes").validate()
    with pytest.raises(ConfigError, match="gradient_checkpointing='later'"):
        qolora.prepare(chat_model_dir, 4, 4, progress=False, device="cpu", gradient_checkpointing="later")


def test_plan_moves_the_checkpoints_to_the_host():
    on = plan("llama-3-70b", gradient_checkpointing=True)
    off = plan("llama-3-70b", gradient_checkpointing="offload")
    per_layer = 2048 * 8192 * 2  # seq x hidden x bf16
    assert on.details["checkpointed_input_bytes"] == per_layer
    assert off.host_bytes == on.host_bytes + 80 * per_layer
    assert off.checkpoint_host_bytes == 80 * per_layer
    saved = on.activation_bytes - off.activation_bytes
    assert on.peak_moment == off.peak_moment == "layer"
    assert saved == 78 * per_layer  # left on the GPU: the embedding output, and the input back for its recompute
    assert on.gpu_bytes - off.gpu_bytes >= saved  # (the allocator margin shrinks with it)
    assert off.gpu_bytes == off.total_bytes - off.host_bytes + off.in_flight_bytes
    assert "layer checkpoints (host)" in off.format_table() and "layer checkpoints" not in on.format_table()
    cpu = plan("llama-3-70b", gradient_checkpointing="offload", device="cpu")  # nothing moves on the CPU
    assert cpu.checkpoint_host_bytes == 0
    assert cpu.total_bytes == plan("llama-3-70b", gradient_checkpointing=True, device="cpu").total_bytes
    tight = plan("llama-3-70b", gradient_checkpointing=True, gpu_memory=off.gpu_bytes + 2**20)
    assert not tight.fits
    offered = [s for s in tight.suggestions if s["options"] == {"gradient_checkpointing": "offload"}]
    assert offered and offered[0]["fits"] and offered[0]["gpu_bytes"] == off.gpu_bytes
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        plan("llama-3-70b", gradient_checkpointing="maybe")


def test_cli_takes_the_offload_value(capsys):
    import json

    from qolora.cli import commands as cli

    parser = cli.build_parser()
    assert parser.parse_args(["finetune"]).gradient_checkpointing == "auto"  # issue 27: chosen at launch
    assert parser.parse_args(["plan", "llama-3-8b"]).gradient_checkpointing is True
    for argv, expected in ((["--gradient-checkpointing"], True), (["--no-gradient-checkpointing"], False),
                           (["--gradient-checkpointing", "off"], False),
                           (["--gradient-checkpointing", "offload"], "offload")):
        assert parser.parse_args(["finetune", *argv]).gradient_checkpointing == expected
        assert parser.parse_args(["plan", "llama-3-8b", *argv]).gradient_checkpointing == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--gradient-checkpointing", "sometimes"])
    assert "choose auto, on, off, offload, or a number of layers" in capsys.readouterr().err
    assert cli.main(["plan", "llama-3-70b", "--gradient-checkpointing", "offload", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint_host_bytes"] == out["host_bytes"] == 80 * 2048 * 8192 * 2
    assert out["gpu_bytes"] == out["total_bytes"] - out["host_bytes"]
