"""The input embedding in host memory (:mod:`qolora.memory.host_embedding`): the same numbers as ``nn.Embedding``,
the same training step bit for bit, transformers' view of the model unchanged, refused where it cannot work,
and planned (on the CPU host and device are one memory, so the module runs but nothing moves)."""

from __future__ import annotations

import functools
import importlib
import json

import pytest
import torch
from torch import nn

import qolora
from qolora import ConfigError, adapter_state_dict, load, merge, save_adapter
from qolora.cli.commands import build_parser, main
from qolora.memory.host_embedding import HostEmbedding, host_embeddings, input_embedding_name
from qolora.planning.plan import plan
from tiny_models import loss_and_grads, make_tiny_llama  # loss_and_grads: loss and every trainable gradient
from tiny_tokenizer import make_tiny_tokenizer

EMBED_70B = 128256 * 8192 * 2  # vocabulary x hidden x bf16


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("untied_llama"), tie=False)
    make_tiny_tokenizer(path)
    return path


def tokens(batch=2, length=12, seed=3):
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def prepared(path, offload_embedding, **kw):
    return qolora.prepare(path, bits=4, rank=4, progress=False, device="cpu", seed=5,
                          offload_embedding=offload_embedding, **kw)


def test_the_module_computes_what_nn_embedding_computes():
    torch.manual_seed(0)
    reference = nn.Embedding(50, 8, padding_idx=0)
    module = HostEmbedding(reference.weight.detach().clone(), "cpu", padding_idx=0)
    for ids in (torch.randint(0, 50, (3, 7)), torch.randint(0, 50, (5,)), torch.tensor([[0, 49]], dtype=torch.int32)):
        assert torch.equal(module(ids), reference(ids.long()))
    assert (module.num_embeddings, module.embedding_dim, module.padding_idx) == (50, 8, 0)
    # The weight is a plain attribute: no .to(), state_dict or optimizer sees it; the anchor is all that is
    # registered (0 elements, the weight's dtype, on the compute device).
    assert [n for n, _ in module.named_parameters()] == ["anchor"]
    assert module.anchor.numel() == 0 and module.anchor.dtype == module.weight.dtype
    assert list(module.state_dict()) == ["anchor"] and not list(module.buffers())
    assert not module.weight.requires_grad
    with pytest.raises(IndexError):
        module(torch.tensor([50]))
    with pytest.raises(ValueError, match="2-D weight on the CPU"):
        HostEmbedding(torch.empty(3, 4, device="meta"), "cpu")


def test_prepared_model_trains_bit_for_bit_the_same(untied_dir):
    x = tokens()
    results, models = {}, {}
    for on in (False, True):
        model = prepared(untied_dir, on, gradient_checkpointing=True, dropout=0.1)
        torch.manual_seed(0)  # dropout: both runs draw the same masks
        results[on] = loss_and_grads(model, x)
        models[on] = model
    plain, host = models[False], models[True]
    embedding = host.get_input_embeddings()
    assert isinstance(embedding, HostEmbedding) and host_embeddings(host) == [embedding]
    assert torch.equal(embedding.weight, plain.get_input_embeddings().weight)  # read from the checkpoint
    assert "model.embed_tokens.weight" not in dict(host.named_parameters())
    assert (host.device, host.dtype) == (plain.device, plain.dtype)
    assert host.is_activation_checkpointing
    (loss_p, grads_p), (loss_h, grads_h) = results[False], results[True]
    assert loss_h == loss_p
    assert grads_h.keys() == grads_p.keys() and grads_p
    for name, g in grads_p.items():
        assert torch.equal(grads_h[name], g), name
    host.enable_input_require_grads()  # transformers' forward hook on the input embedding
    assert embedding(x).requires_grad
    host.eval()
    prompt = x[:1, :4]
    assert torch.equal(host.generate(prompt, max_new_tokens=4, do_sample=False),
                       plain.eval().generate(prompt, max_new_tokens=4, do_sample=False))


def test_works_with_every_decoder_layer_offloaded(untied_dir):
    x = tokens(seed=4)
    ref = prepared(untied_dir, False, gradient_checkpointing=True)
    both = prepared(untied_dir, True, gradient_checkpointing=True, offload="cpu")
    assert isinstance(both.get_input_embeddings(), HostEmbedding) and both.qolora.offload.offloaded == [0, 1]
    (loss_r, grads_r), (loss_b, grads_b) = loss_and_grads(ref, x), loss_and_grads(both, x)
    assert loss_b == loss_r
    for name, g in grads_r.items():
        assert torch.equal(grads_b[name], g), name


def test_save_reload_and_merge_do_not_depend_on_it(untied_dir, tmp_path):
    model = prepared(untied_dir, True)
    with torch.no_grad():  # a "trained" adapter: B no longer what the init made it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    x = tokens(seed=7)
    with torch.no_grad():
        expected = model(input_ids=x).logits
    adapter = save_adapter(model, tmp_path / "adapter")
    reloaded = load(untied_dir, adapter, progress=False)  # an ordinary nn.Embedding on the device again
    assert isinstance(reloaded.get_input_embeddings(), nn.Embedding)
    assert adapter_state_dict(reloaded).keys() == adapter_state_dict(model).keys()
    for name, t in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(reloaded)[name], t), name
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, expected)
    on_host = load(untied_dir, adapter, progress=False, offload_embedding=True)  # reloaded with it, as trained
    assert isinstance(on_host.get_input_embeddings(), HostEmbedding)
    with torch.no_grad():
        assert torch.equal(on_host(input_ids=x).logits, expected)
    merge(untied_dir, adapter, tmp_path / "merged", dtype="fp32", progress=False)  # reads the base checkpoint
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=x).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_dequantize_model_casts_the_host_weight_too(untied_dir):
    from qolora.cli.chat import dequantize_model

    model = prepared(untied_dir, True)
    dequantize_model(model, torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16 == model.dtype
    with torch.no_grad():
        assert model(input_ids=tokens(seed=8)).logits.dtype == torch.bfloat16


def test_model_dtype_casts_reach_the_host_weight(untied_dir):
    """A module-level cast (``.half()``; transformers refuses ``model.to(dtype)`` on a bitsandbytes model) casts
    the host weight with the anchor, on the host, so the rows match the layers' dtype."""
    model = prepared(untied_dir, True)
    model.half()
    embedding = model.get_input_embeddings()
    assert embedding.weight.dtype == torch.float16 == model.dtype and embedding.weight.device.type == "cpu"
    with torch.no_grad():
        assert model.model.embed_tokens(tokens(seed=8)).dtype == torch.float16


def test_refused_before_any_weight_is_read(tiny_llama_dir, tiny_gpt2_dir, untied_dir, no_weight_reads):
    for path in (tiny_llama_dir, tiny_gpt2_dir):  # both tie their head to the input embedding
        with pytest.raises(ConfigError, match="tie_word_embeddings=True"):
            prepared(path, True)
    with pytest.raises(ConfigError, match="offload_embedding='yes' must be True or False"):
        prepared(untied_dir, "yes")
    with pytest.raises(ConfigError, match="tie_word_embeddings=True"):
        plan(tiny_llama_dir, offload_embedding=True)
    with pytest.raises(ConfigError, match="fsdp and offload_embedding"):
        plan("llama-3-70b", offload_embedding=True, fsdp=True, num_gpus=2)


def test_fsdp_refuses_a_model_with_it(untied_dir):
    from qolora.training.fsdp import fsdp_problems

    assert any("offload_embedding=True" in p for p in fsdp_problems(prepared(untied_dir, True)))
    assert not any("offload_embedding" in p for p in fsdp_problems(prepared(untied_dir, False)))


def test_an_embedding_that_is_not_plain_is_refused():
    from qolora.base.hf_config import load_hf_config
    from qolora.base.reader import meta_skeleton

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    skeleton = meta_skeleton(load_hf_config("llama-3-8b"))
    assert input_embedding_name(skeleton) == "model.embed_tokens"
    skeleton.model.embed_tokens = Scaled(8, 4, device="meta")
    with pytest.raises(ConfigError, match="plain nn.Embedding.*uses Scaled"):
        input_embedding_name(skeleton)


def test_finetune_refuses_a_tied_model_before_reading_data(chat_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="tie_word_embeddings=True"):  # not the missing data file's error
        qolora.finetune(chat_model_dir, tmp_path / "missing.jsonl", output_dir=tmp_path / "out",
                        offload_embedding=True, adapter_options={"device": "cpu"})


def test_finetune_and_the_cli_pass_it_on(untied_dir, chat_jsonl, tmp_path, monkeypatch, capsys):
    finetune_module = importlib.import_module("qolora.training.finetune")  # qolora.finetune is the function

    seen = {}

    def fake_prepare(base, config, build, **kwargs):
        seen["offload_embedding"] = build.offload_embedding
        raise ConfigError("stop here")

    monkeypatch.setattr(finetune_module, "prepare_checked", fake_prepare)
    with pytest.raises(ConfigError, match="stop here"):
        qolora.finetune(untied_dir, chat_jsonl, output_dir=tmp_path / "out", offload_embedding=True,
                        max_steps=1, adapter_options={"device": "cpu"})
    assert seen["offload_embedding"] is True

    parser = build_parser()
    assert parser.parse_args(["finetune"]).offload_embedding is False
    assert parser.parse_args(["finetune", "--offload-embedding"]).offload_embedding is True
    assert parser.parse_args(["plan", "llama-3-8b", "--offload-embedding"]).offload_embedding is True

    @functools.wraps(finetune_module.finetune)  # the parser reads finetune's signature for its defaults
    def fake_finetune(*args, **kwargs):
        seen["cli"] = kwargs["offload_embedding"]
        raise ConfigError("stop here too")

    monkeypatch.setattr(finetune_module, "finetune", fake_finetune)
    assert main(["finetune", "--offload-embedding", "--output-dir", str(tmp_path / "cli")]) != 0
    assert seen["cli"] is True and "stop here too" in capsys.readouterr().err
    assert main(["plan", "llama-3-70b", "--gradient-checkpointing", "offload", "--offload-embedding", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["embedding_host_bytes"] == EMBED_70B and out["offload_embedding"] is True
    assert out["host_bytes"] == out["checkpoint_host_bytes"] + EMBED_70B


def test_plan_moves_the_embedding_to_the_host():
    off = plan("llama-3-70b", gradient_checkpointing="offload")
    on = plan("llama-3-70b", gradient_checkpointing="offload", offload_embedding=True)
    assert on.details["input_embedding_bytes"] == EMBED_70B
    assert on.embedding_host_bytes == EMBED_70B and off.embedding_host_bytes == 0
    assert on.host_bytes - off.host_bytes == EMBED_70B
    assert on.weights_bytes == off.weights_bytes and on.activation_bytes == off.activation_bytes
    # Off the GPU: exactly the embedding, plus the 5% allocator margin it no longer needs.
    assert off.gpu_bytes - on.gpu_bytes == EMBED_70B + (off.margin_bytes - on.margin_bytes)
    assert 0 < off.margin_bytes - on.margin_bytes <= 0.05 * EMBED_70B + 1
    assert on.gpu_bytes <= 41 * 2**30 < off.gpu_bytes  # the target
    assert "input embedding (host)" in on.format_table() and "input embedding (host)" not in off.format_table()
    assert on.to_dict()["embedding_host_bytes"] == EMBED_70B
    cpu = plan("llama-3-70b", offload_embedding=True, device="cpu")  # one memory: nothing moves
    assert cpu.embedding_host_bytes == 0 and cpu.total_bytes == plan("llama-3-70b", device="cpu").total_bytes


def test_plan_offers_it_first_and_auto_uses_it_before_layers():
    on = plan("llama-3-70b", gradient_checkpointing="offload", offload_embedding=True)
    tight = plan("llama-3-70b", gradient_checkpointing="offload", gpu_memory=on.gpu_bytes + 2**20)
    assert not tight.fits
    changes = [s["options"] for s in tight.suggestions]
    first = changes.index({"offload_embedding": True})
    assert first < changes.index({"offload": "auto"})
    assert tight.suggestions[first]["fits"] and tight.suggestions[first]["gpu_bytes"] == on.gpu_bytes
    auto = plan("llama-3-70b", gradient_checkpointing="offload", offload="auto", gpu_memory="41GiB")
    assert auto.offload_embedding and auto.offloaded_layers == [] and auto.gpu_bytes == on.gpu_bytes and auto.fits
    roomy = plan("llama-3-70b", gradient_checkpointing="offload", offload="auto", gpu_memory="48GiB")
    assert not roomy.offload_embedding and roomy.embedding_host_bytes == 0  # not needed: stays on the GPU
    small = plan("llama-3-70b", gradient_checkpointing="offload", offload="auto", gpu_memory="36GiB")
    assert small.offload_embedding and small.offloaded_layers  # the embedding first, then as few layers as fit


def test_a_host_too_small_for_the_embedding_is_refused(monkeypatch):
    from qolora.base.hf_config import load_hf_config
    from qolora.config import AdapterConfig
    from qolora.planning import placement

    config = load_hf_config("llama-3-70b")
    monkeypatch.setattr(placement, "available_host_bytes", lambda: 1 << 30)
    with pytest.raises(ConfigError, match=r"needs 1\.96 GiB of host memory for the input embedding .*1\.00 GiB"):
        placement._check_embedding_room(config, AdapterConfig(dtype="bf16"))
    monkeypatch.setattr(placement, "available_host_bytes", lambda: 4 << 30)
    placement._check_embedding_room(config, AdapterConfig(dtype="bf16"))
