"""Saving, reloading, exporting and merging trained adapters (qolora.model.adapter_folder, qolora.export.peft).

Tiny random checkpoints on the CPU. The adapters are trained for a few AdamW steps first, so that
B != B0 and a mix-up of trained and initial factors cannot go unnoticed.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qolora
from qolora.adapters.layer import adapter_layers
from qolora.config import parse_size
from qolora.errors import ConfigError
from qolora.export.merge import merge
from qolora.export.peft import export_lora
from qolora.model.adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INIT_WEIGHTS,
    QOLORA_CONFIG,
    AdapterError,
    BaseMismatchError,
    save_adapter,
)
from qolora.model.load import load
from tiny_models import make_tiny_llama

VOCAB = 320
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # PEFT on transformers 5


def tokens(batch=2, length=16, seed=99):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None):
    device = next(model.parameters()).device
    with torch.no_grad():
        return model((tokens() if x is None else x).to(device)).logits.float().cpu()


def original(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def train(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        x = tokens(seed=i).to(next(model.parameters()).device)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def trained(path, **options):
    """A prepared model trained 3 steps; on the CPU unless ``device`` says otherwise (GPU tests)."""
    options = {"rank": 8, "alpha": 16, "progress": False, "device": "cpu", **options}
    return train(qolora.prepare(path, **options))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and on a busy 2-core machine OpenMP
    threads spinning against other processes made them 10-50x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved4(one_thread, tiny_llama_dir, tmp_path_factory):
    """A 4-bit OLoRA model trained 3 steps, its logits, and its saved adapter folder."""
    model = trained(tiny_llama_dir, bits=4)
    out = save_adapter(model, tmp_path_factory.mktemp("saved4") / "adapter")
    return model, logits(model), out


# ------------------------------------------------------------------------------ save -> load
@pytest.mark.parametrize("bits, options", [
    (4, {}), (8, {}), (16, {}),
    (4, dict(quant_type="fp4", blocksize=128, double_quant=False, quant_storage="bf16", init="pissa")),
], ids=["4bit", "8bit", "16bit", "4bit-fp4-pissa"])
def test_save_load_reproduces_trained_logits_exactly(tiny_llama_dir, tmp_path, bits, options):
    model = trained(tiny_llama_dir, bits=bits, **options)
    layer = next(adapter for _, adapter in adapter_layers(model))
    assert not torch.equal(layer.lora_B.weight, layer.init_factors[1])  # really trained
    out = save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(out)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, INIT_WEIGHTS, QOLORA_CONFIG,
                                              "config.json"])
    assert not [p for p in tmp_path.iterdir() if p.name != "adapter"]  # no temp folder left
    reloaded = load(tiny_llama_dir, out, progress=False)
    assert torch.equal(logits(reloaded), logits(model))
    got, want = reloaded.qolora_config, model.qolora_config  # same config, dtypes pinned to what training used
    assert got.replace(dtype=None, compute_dtype=None) == want
    assert (got.torch_dtype, got.torch_compute_dtype) == (want.torch_dtype, want.torch_compute_dtype)
    assert [n for n, p in reloaded.named_parameters() if p.requires_grad] == \
           [n for n, p in model.named_parameters() if p.requires_grad]


def test_reloaded_model_keeps_its_initial_factors_through_more_training(tiny_llama_dir, tmp_path):
    model = trained(tiny_llama_dir, bits=16, init="pissa")
    first = save_adapter(model, tmp_path / "a")
    again = train(load(tiny_llama_dir, first, progress=False), steps=1)
    second = save_adapter(again, tmp_path / "b")
    from safetensors.torch import load_file

    init1, init2 = load_file(first / INIT_WEIGHTS), load_file(second / INIT_WEIGHTS)
    assert init1.keys() == init2.keys() and all(torch.equal(init1[k], init2[k]) for k in init1)
    assert torch.equal(logits(load(tiny_llama_dir, second, progress=False)), logits(again))


def test_saved_files_are_peft_lora_files(tiny_llama_dir, saved4):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    _, _, out = saved4
    config = LoraConfig.from_pretrained(out)
    assert (config.peft_type, config.task_type, config.r, config.lora_alpha) == ("LORA", "CAUSAL_LM", 8, 16)
    assert config.init_lora_weights == "olora" and config.bias == "none" and not config.use_rslora
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ref = get_peft_model_state_dict(get_peft_model(original(tiny_llama_dir), LoraConfig(
        r=8, lora_alpha=16, target_modules=list(config.target_modules))))
    ours = load_file(out / ADAPTER_WEIGHTS)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    meta = json.loads((out / QOLORA_CONFIG).read_text())
    assert meta["format_version"] == 1 and meta["qolora_version"] == qolora.__version__
    assert meta["adapter_config"]["bits"] == 4 and len(meta["layers"]) == 14
    layer = meta["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["quant"] == {"bits": 4, "quant_type": "nf4", "blocksize": 64, "double_quant": True,
                              "quant_storage": "uint8", "compute_dtype": "float32"}
    assert layer["fingerprint"] and meta["base"]["fingerprint"] and 0 < layer["quant_error"] < layer["weight_norm"]


# ------------------------------------------------------------------------------------- export
def test_export_lora_loads_in_peft_and_equals_merge_into_original(tiny_llama_dir, saved4, tmp_path, caplog):
    from peft import PeftModel
    from safetensors.torch import load_file

    model, _, adapter = saved4
    report = export_lora(adapter, tmp_path / "lora")
    assert (report["rank"], report["lora_alpha"], report["scale"]) == (16, 32.0, 2.0)
    assert 0 < report["relative_error"] < 0.5 and len(report["layers"]) == 14
    assert "drops the residual quantization error" in caplog.text
    config = json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())
    assert config["init_lora_weights"] is True and config["r"] == 16
    # the same adapter from the in-memory model
    assert export_lora(model, tmp_path / "lora2")["total_dropped_error"] == report["total_dropped_error"]
    a, b = load_file(tmp_path / "lora" / ADAPTER_WEIGHTS), load_file(tmp_path / "lora2" / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    peft_model = PeftModel.from_pretrained(original(tiny_llama_dir), tmp_path / "lora").eval()
    merge(tiny_llama_dir, adapter, tmp_path / "merged", dtype="fp32", into="original", progress=False)
    expected = logits(original(tmp_path / "merged"))
    got = logits(peft_model)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-6
    assert (got - logits(original(tiny_llama_dir))).abs().max() > 1e-3  # the adapter does something
    # The saved (not exported) folder is an OLoRA PEFT adapter too: PEFT redoes the QR on the fp32
    # base and subtracts it, which gives the same unquantized residual up to fp32 rounding.
    olora_in_peft = logits(PeftModel.from_pretrained(original(tiny_llama_dir), adapter).eval())
    assert (olora_in_peft - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("init, use_rslora, rank, alpha", [("olora", True, 16, 8 * 2 ** 0.5), ("lora", False, 8, 8)])
def test_export_keeps_the_scale(tiny_llama_dir, tmp_path, init, use_rslora, rank, alpha):
    from peft import PeftModel

    model = trained(tiny_llama_dir, bits=16, init=init, use_rslora=use_rslora, alpha=8)
    report = export_lora(model, tmp_path / "lora", base="org/base-model")
    assert json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "org/base-model"
    assert report["rank"] == rank and report["lora_alpha"] == pytest.approx(alpha, rel=1e-12)
    peft_model = PeftModel.from_pretrained(original(tiny_llama_dir), tmp_path / "lora").eval()
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == \
           pytest.approx(model.qolora_config.scale, rel=1e-12)
    expected = logits(model)  # bits=16, fp32: the trained model IS W_res + s*B@A
    assert (logits(peft_model) - expected).abs().max() <= 1e-5 * expected.abs().max()
    adapter = save_adapter(model, tmp_path / "adapter")
    merge(tiny_llama_dir, adapter, tmp_path / "merged", dtype="fp32", progress=False)
    assert (logits(original(tmp_path / "merged")) - expected).abs().max() <= 1e-5 * expected.abs().max()


# -------------------------------------------------------------------------------------- merge
def test_merge_into_trained_reproduces_the_quantized_model(tiny_llama_dir, saved4, tmp_path):
    _, ref, adapter = saved4
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (base / "tokenizer.json").write_text('{"fake": true}')

    result = merge(base, adapter, tmp_path / "fp32", dtype="fp32", max_shard_size="100KB", progress=False,
                   prompts=[[5, 6, 7, 8, 9], [10, 11]])
    assert result["merged_layers"] == 14 and result["shards"] > 1
    assert result["logit_check"]["max_abs_diff"] < 1e-5 * result["logit_check"]["max_abs_logit"] + 1e-6
    out = tmp_path / "fp32"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == result["shards"]
    assert (out / "tokenizer.json").read_text() == '{"fake": true}' and (out / "generation_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert (logits(original(out)) - ref).abs().max() < 1e-5 * ref.abs().max()

    merge(base, adapter, tmp_path / "bf16", progress=False)  # defaults: bf16, into="trained", one shard
    assert sorted(p.name for p in (tmp_path / "bf16").glob("*.safetensors")) == ["model.safetensors"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert merged.dtype == torch.bfloat16
    assert (logits(merged) - ref).abs().max() < 0.02 * ref.abs().max()  # bf16 weights: ~2^-8 relative


@pytest.mark.parametrize("bits", [8, 16])
def test_merged_weights_are_the_trained_effective_weights(tiny_llama_dir, tmp_path, bits):
    """Weight-level exactness (8-bit logits also carry LLM.int8's activation rounding)."""
    from safetensors.torch import load_file

    model = trained(tiny_llama_dir, bits=bits, init="pissa")
    adapter = save_adapter(model, tmp_path / "adapter")
    merge(tiny_llama_dir, adapter, tmp_path / "merged", dtype="fp32", progress=False)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    # A freshly loaded (bit-identical) model: after a forward pass bitsandbytes moves an 8-bit
    # weight's statistics to layer.state and qolora.base.quant.dequantize_weight cannot find them (core bug).
    for name, layer in adapter_layers(load(tiny_llama_dir, adapter, progress=False)):
        want = layer.effective_weight().detach()
        assert (merged[f"{name}.weight"] - want).abs().max() <= 1e-6 * want.abs().max(), name


def test_merge_copies_the_tokenizer_and_checks_text_prompts(tmp_path):
    tiny_tokenizer = pytest.importorskip("tiny_tokenizer")
    tokenizer = tiny_tokenizer.make_tiny_tokenizer()
    base = make_tiny_llama(tmp_path / "base", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(base)
    adapter = save_adapter(trained(base, bits=4, rank=4), tmp_path / "adapter")
    result = merge(base, adapter, tmp_path / "merged", dtype="fp32", progress=False,
                   prompts=["The quick brown fox", "hello world"])
    check = result["logit_check"]
    assert len(check["per_prompt"]) == 2 and check["max_abs_diff"] < 1e-5 * check["max_abs_logit"] + 1e-6
    from transformers import AutoTokenizer

    assert (AutoTokenizer.from_pretrained(tmp_path / "merged")("hello world").input_ids
            == tokenizer("hello world").input_ids)


def test_gpt2_conv1d_round_trip(tiny_gpt2_dir, tmp_path):
    from peft import PeftModel

    model = trained(tiny_gpt2_dir, bits=4, rank=4, alpha=None)
    ref = logits(model)
    adapter = save_adapter(model, tmp_path / "adapter")
    assert json.loads((adapter / ADAPTER_CONFIG).read_text())["fan_in_fan_out"] is True
    assert torch.equal(logits(load(tiny_gpt2_dir, adapter, progress=False)), ref)
    merge(tiny_gpt2_dir, adapter, tmp_path / "trained", dtype="fp32", progress=False)
    assert (logits(original(tmp_path / "trained")) - ref).abs().max() < 1e-5 * ref.abs().max()
    merge(tiny_gpt2_dir, adapter, tmp_path / "original", dtype="fp32", into="original", progress=False)
    export_lora(adapter, tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(original(tiny_gpt2_dir), tmp_path / "lora").eval()
    expected = logits(original(tmp_path / "original"))
    assert (logits(peft_model) - expected).abs().max() < 1e-5 * expected.abs().max()


@pytest.mark.parametrize("stored_bits", [4, 8])
def test_a_base_stored_in_bitsandbytes_format_reloads_and_merges(tiny_llama_dir, tmp_path, stored_bits):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) if stored_bits == 4 \
        else dict(load_in_8bit=True)
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=BitsAndBytesConfig(**kw),
                                         dtype=torch.float32).save_pretrained(tmp_path / "stored")
    model = trained(tmp_path / "stored", bits=4, rank=4)
    ref = logits(model)
    adapter = save_adapter(model, tmp_path / "adapter")
    assert torch.equal(logits(load(tmp_path / "stored", adapter, progress=False)), ref)
    result = merge(tmp_path / "stored", adapter, tmp_path / "merged", dtype="fp32", progress=False)
    assert result["merged_layers"] == 14
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = original(tmp_path / "merged")
    assert (logits(merged) - ref).abs().max() < 1e-5 * ref.abs().max()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if not k.endswith(".weight")]  # no absmax / quant_map / SCB parts


# ---------------------------------------------------------------------------------- wrong base
def test_wrong_base_is_refused_and_the_override_works(saved4, tmp_path, caplog):
    _, _, adapter = saved4
    other = make_tiny_llama(tmp_path / "other", seed=1)
    with pytest.raises(BaseMismatchError, match=r"not the model this adapter was trained on: layer model\.layers\.0\."):
        load(other, adapter, progress=False)
    with pytest.raises(BaseMismatchError, match="allow_base_mismatch=True"):
        merge(other, adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
    model = load(other, adapter, allow_base_mismatch=True, progress=False)
    assert "14 of 14 layers" in caplog.text and "NOT the trained model" in caplog.text
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden=32), r"layer model\.layers\.0\.\S+: the base's weight is \d+x\d+ "
                      r"but the adapter \(rank 8\) was trained on a \d+x\d+ weight"),
    (dict(layers=3), r"has 7 targeted layer\(s\) the adapter lacks, e\.g\. \['model\.layers\.2\."),
    (dict(layers=1), r"has no layer\(s\) \['model\.layers\.1\..*\(7 missing\)"),
])
def test_a_base_of_another_shape_is_refused_before_reading_weights(saved4, tmp_path, no_weight_reads, kwargs, message):
    other = make_tiny_llama(tmp_path / "other", **kwargs)
    with pytest.raises(AdapterError, match=message):
        load(other, saved4[2], progress=False)
    with pytest.raises(AdapterError, match=message):
        merge(other, saved4[2], tmp_path / "merged", progress=False)


# ------------------------------------------------------------------------- bad adapter folders
def _flip_byte(path, offset=-10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _set_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


CORRUPTIONS = {
    "missing folder": (lambda d: shutil.rmtree(d), r"adapter folder .* does not exist"),
    "missing weights": (lambda d: (d / ADAPTER_WEIGHTS).unlink(), r"incomplete: adapter_model\.safetensors is missing"),
    "missing init": (lambda d: (d / INIT_WEIGHTS).unlink(), r"incomplete: qolora_init\.safetensors is missing"),
    "missing qolora config": (lambda d: (d / QOLORA_CONFIG).unlink(),
                              r"no qolora_config\.json: it looks like a plain PEFT adapter"),
    "missing peft config": (lambda d: (d / ADAPTER_CONFIG).unlink(), r"has no adapter_config\.json"),
    "flipped byte": (lambda d: _flip_byte(d / ADAPTER_WEIGHTS),
                     r"adapter_model\.safetensors is corrupted or was modified"),
    "truncated init": (lambda d: (d / INIT_WEIGHTS).write_bytes((d / INIT_WEIGHTS).read_bytes()[:100]),
                       r"qolora_init\.safetensors is corrupted or was modified"),
    "bad json": (lambda d: (d / QOLORA_CONFIG).write_text('{"format": "qolora-adapter", '),
                 r"qolora_config\.json is corrupted: not valid JSON"),
    "newer format": (lambda d: _set_json(d / QOLORA_CONFIG, format_version=99),
                     r"unknown format_version 99; this qolora .* reads format_version 1 - .* newer qolora"),
    "not ours": (lambda d: _set_json(d / QOLORA_CONFIG, format="other"), r"not a qolora adapter record"),
    "bad config": (lambda d: _set_json(d / QOLORA_CONFIG, adapter_config={"bits": 5}),
                   r"invalid adapter config: bits=5"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_adapter_folder_gives_one_clear_error_before_the_base_is_touched(saved4, tmp_path, case):
    corrupt, message = CORRUPTIONS[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(saved4[2], adapter)
    corrupt(adapter)
    missing_base = tmp_path / "no-such-base"  # reading the base first would fail differently
    with pytest.raises(AdapterError, match=message):
        load(missing_base, adapter, progress=False)
    with pytest.raises(AdapterError, match=message):
        merge(missing_base, adapter, tmp_path / "merged", progress=False)
    with pytest.raises(AdapterError, match=message):
        export_lora(adapter, tmp_path / "lora")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "lora").exists()


def test_prepare_keeps_initial_factors_apart_from_trainable_weights(tiny_llama_dir, tmp_path):
    model = qolora.prepare(tiny_llama_dir, bits=16, rank=4, device="cpu", progress=False)
    before = {n: tuple(t.clone() for t in adapter.init_factors) for n, adapter in adapter_layers(model)}
    train(model, steps=1)
    for name, layer in adapter_layers(model):
        assert all(torch.equal(t, b) for t, b in zip(layer.init_factors, before[name])), name
        assert not torch.equal(layer.lora_A.weight.detach(), layer.init_factors[0]), name


def test_non_finite_adapters_are_not_exported_or_merged(tiny_llama_dir, tmp_path):
    model = trained(tiny_llama_dir, bits=16)
    with torch.no_grad():
        next(adapter for _, adapter in adapter_layers(model)).lora_B.weight[0, 0] = float("nan")
    adapter = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"layer model\.layers\.0\.self_attn\.q_proj: the adapter has non-finite"):
        export_lora(model, tmp_path / "lora")
    nan_file = r"adapter_model\.safetensors: tensor '.*layers\.0\.self_attn\.q_proj\.lora_B\.weight' holds NaN/inf"
    with pytest.raises(AdapterError, match=nan_file):
        export_lora(adapter, tmp_path / "lora")
    with pytest.raises(AdapterError, match=nan_file):
        merge(tiny_llama_dir, adapter, tmp_path / "merged", progress=False)
    with pytest.raises(AdapterError, match=nan_file):
        load(tiny_llama_dir, adapter, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_refuses_a_model_qolora_did_not_build(tiny_llama_dir, tmp_path):
    with pytest.raises(AdapterError, match=r"has no qolora record \(model\.qolora\)"):
        save_adapter(original(tiny_llama_dir), tmp_path / "a")


# ----------------------------------------------------------------------------- output folders
def test_existing_output_folders_are_refused_unless_overwrite(tiny_llama_dir, saved4, tmp_path, no_weight_reads):
    model, _, adapter = saved4
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    for call in (lambda **kw: save_adapter(model, existing, **kw), lambda **kw: export_lora(adapter, existing, **kw),
                 lambda **kw: merge(tiny_llama_dir, adapter, existing, **kw)):
        with pytest.raises(ConfigError, match=r"existing' already exists; pass overwrite=True"):
            call()
    assert (existing / "keep.txt").read_text() == "x"
    with pytest.raises(ConfigError, match="holds keep.txt: it has no qolora_config.json"):  # not qolora's to delete
        save_adapter(model, existing, overwrite=True)
    (existing / "keep.txt").unlink()
    save_adapter(model, existing, overwrite=True)  # an empty folder may be replaced
    save_adapter(model, existing, overwrite=True)  # and so may an adapter folder qolora wrote
    assert (existing / QOLORA_CONFIG).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no temp or old folder left
    with pytest.raises(ConfigError, match="is, holds or lies inside the base checkpoint"):
        merge(tiny_llama_dir, adapter, tiny_llama_dir, overwrite=True)


def test_interrupted_merge_leaves_nothing_at_out_dir(tiny_llama_dir, saved4, tmp_path, monkeypatch):
    export = importlib.import_module("qolora.export.merge")
    real, calls = export._write_shard, []

    def failing(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        real(path, tensors)

    monkeypatch.setattr(export, "_write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        merge(tiny_llama_dir, saved4[2], tmp_path / "merged", max_shard_size="100KB", progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(export, "_write_shard", real)
    merge(tiny_llama_dir, saved4[2], tmp_path / "merged", progress=False)  # an earlier merge, to be overwritten
    before = {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()}
    monkeypatch.setattr(export, "_write_shard", failing)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        merge(tiny_llama_dir, saved4[2], tmp_path / "merged", max_shard_size="100KB", overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()} == before  # the earlier merge, whole


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="int4"), r"dtype='int4' is not supported; allowed: \["),
    (dict(into="both"), r"into='both' is not supported; allowed: \['trained', 'original'\]"),
    (dict(max_shard_size="lots"), r"max_shard_size='lots' is not a size"),
    (dict(max_shard_size=0), r"max_shard_size=0 is not a size"),
])
def test_merge_rejects_bad_arguments_before_work(tiny_llama_dir, saved4, tmp_path, no_weight_reads, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        merge(tiny_llama_dir, saved4[2], tmp_path / "merged", **kwargs)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("100 kb") == 100_000 and parse_size(123) == 123 and parse_size("64") == 64
    for bad in ("", "GB", "2XB", -5, 1.5, True, "inf GB"):
        with pytest.raises(ConfigError):
            parse_size(bad)


# ------------------------------------------------------------------------------ merge memory
_MEMORY_CHILD = r"""
import json, os, sys, threading, time
import torch
torch.set_num_threads(1)
import accelerate, bitsandbytes, safetensors.torch  # noqa: F401 (warm imports)
import transformers.models.llama.modeling_llama  # noqa: F401 (warm imports)
from qolora.export.merge import merge

def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

args = sys.stdin.readline().split("\t")  # sent once the model and the adapter are written
# one unmeasured merge first: what it imports lazily and caches (1-2 MB, a fixed cost) is not what it streams
merge(args[0], args[1], args[2] + "-warm", max_shard_size=args[3].strip(), progress=False)
base, peak, stop = anon(), [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
result = merge(args[0], args[1], args[2], max_shard_size=args[3].strip(), progress=False)
stop.set(); thread.join()
print(json.dumps({"growth": max(peak[0], anon()) - base, "seconds": time.perf_counter() - start,
                  "shards": result["shards"]}))
"""


def _wide_llama(path: Path, hidden=512, intermediate=1536, layers=12) -> int:
    """A random Llama checkpoint written straight with safetensors (fast); returns its size in bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config.save_pretrained(path)
    with init_empty_weights():
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * 4 for t in tensors.values())


_MEMORY_TEST = "test_merge_streams_with_memory_well_below_the_model_size"


@pytest.fixture(scope="module", autouse=True)
def memory_child(request):
    """The merge-memory test's fresh interpreter, started with this module's first test so that its
    imports (5-10 s) run beside the other tests; it waits for its arguments before it measures
    anything. None where that test is not selected or cannot run."""
    if not os.path.exists("/proc/self/status") or not any(i.name == _MEMORY_TEST for i in request.session.items):
        yield None
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(qolora.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _MEMORY_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures RssAnon from /proc (Linux)")
def test_merge_streams_with_memory_well_below_the_model_size(tmp_path, memory_child):
    """Merge a ~38 MB fp32 (19 MB bf16) 4-bit model with 2.5 MB shards in a fresh process and
    sample its anonymous resident memory. ru_maxrss is no use here: it counts file-backed pages (the
    memory-mapped checkpoint, and ~0.7 GB of shared libraries mapped while importing), which are page
    cache, not memory the merge holds. MALLOC_MMAP_THRESHOLD_ makes glibc treat this model's 0.3-1 MB
    tensors as it treats a real model's >32 MB ones (mmapped, returned to the OS when freed), so
    RssAnon follows the live memory rather than the heap's fragmentation high-water mark. That needs a
    fresh heap, hence the subprocess (a fork of this process would reuse its freed heap chunks).
    Everything scales with the width (12 layers, 9 shards): the growth is ~15% of the model size here
    as at 4x the width; one shard for everything is ~60%. The child merges once unmeasured first: the
    modules a merge imports lazily (1-2 MB, 5% of this small model) had put the growth at the bound."""
    size = _wide_llama(tmp_path / "base", hidden=256, intermediate=768)
    model = qolora.prepare(tmp_path / "base", bits=4, rank=8, device="cpu", progress=False)
    adapter = save_adapter(model, tmp_path / "adapter")
    del model
    args = [str(tmp_path / "base"), str(adapter), str(tmp_path / "merged"), "2.5MB"]
    stdout, stderr = memory_child.communicate("\t".join(args) + "\n", timeout=300)
    assert memory_child.returncode == 0, stderr[-3000:]
    stats = json.loads(stdout.strip().splitlines()[-1])
    print(f"merge of a {size / 1e6:.0f} MB fp32 model: peak RssAnon growth {stats['growth'] / 1e6:.1f} MB, "
          f"{stats['shards']} shards, {stats['seconds']:.1f} s")
    assert stats["shards"] >= 7
    assert stats["growth"] < 0.25 * size, stats  # one 2.5 MB shard + one layer, not the 19-38 MB model


# ---------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_save_load_is_exact_and_merge_matches(tiny_llama_dir, tmp_path, caplog, bits):
    from transformers import AutoModelForCausalLM

    model = trained(tiny_llama_dir, bits=bits, device="cuda")  # bf16 base and activations by default on CUDA
    ref = logits(model)
    adapter = save_adapter(model, tmp_path / "adapter")
    meta = json.loads((adapter / QOLORA_CONFIG).read_text())
    assert meta["device_type"] == "cuda" and meta["adapter_config"]["dtype"] == "bfloat16"
    assert torch.equal(logits(load(tiny_llama_dir, adapter, progress=False)), ref)
    result = merge(tiny_llama_dir, adapter, tmp_path / "merged", progress=False, prompts=[[5, 6, 7, 8]])
    assert result["logit_check"]["max_abs_diff"] < 0.05 * result["logit_check"]["max_abs_logit"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").cuda().eval()
    assert (logits(merged) - ref).abs().max() < 0.05 * ref.abs().max()
    on_cpu = load(tiny_llama_dir, adapter, device="cpu", progress=False)  # quantized on another device type
    assert "trained with its base quantized on cuda, now quantizing on cpu" in caplog.text
    assert (logits(on_cpu) - ref).abs().max() < 0.05 * ref.abs().max()
