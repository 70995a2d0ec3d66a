"""qolora.base.reader: a model folder is read without ever running its code, and corrupt input is refused
before any work, naming the tensor and the file.

A folder whose config or tokenizer asks for its own code (``auto_map``) is refused at every entry (prepare,
finetune, plan, load, merge, chat), or read with transformers' built-in classes when the architecture is known;
wrong shapes and NaN/inf in the weights, damaged safetensors files and bad shard indexes are named. The comments
name what happened before the fixes (issue 9).
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qolora
import qolora.cli.chat
import qolora.planning.plan
from qolora import ConfigError, finetune, prepare
from qolora.cli.commands import main
from tiny_runs import error_line, run_options

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


# ---------------------------------------------------------------------------------------- no model folder's code runs
EVIL_PY = """
import pathlib
pathlib.Path({marker!r}).write_text("the model folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "qolora_evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def make_evil_folder(tiny_model: Path, path: Path, marker: Path, model_type: str = "qolora_evil") -> Path:
    """A copy of the tiny model whose config and tokenizer ask for the folder's own code (auto_map)."""
    shutil.copytree(tiny_model, path)
    (path / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (path / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return path


@pytest.mark.parametrize("entry", ["prepare", "finetune", "plan", "cli-plan", "load", "merge", "chat"])
def test_a_folder_asking_for_its_own_code_is_refused_and_never_run(tiny_inputs, finished_run, tmp_path, capsys, entry):
    # before: no trust_remote_code=False; on a terminal transformers asked "[y/N]" and 'y' ran evil.py
    model, data = tiny_inputs
    marker = tmp_path / "RAN"
    evil = make_evil_folder(model, tmp_path / "evil", marker)
    adapter = finished_run[0] / "adapter"
    calls = {
        "prepare": lambda: prepare(evil, 4, 4, device="cpu", progress=False),
        "finetune": lambda: finetune(evil, data, **run_options(tmp_path / "out")),
        "plan": lambda: qolora.planning.plan.plan(evil),
        "load": lambda: qolora.load(evil, adapter, progress=False),
        "merge": lambda: qolora.merge(evil, adapter, tmp_path / "merged", progress=False),
        "chat": lambda: qolora.cli.chat.load_chat_model(merged=evil),
    }
    if entry == "cli-plan":
        assert main(["plan", str(evil)]) == 2
        assert "auto_map" in error_line(capsys.readouterr().err)
    else:
        with pytest.raises(ConfigError, match="qolora_evil.*auto_map.*never runs code"):
            calls[entry]()
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


def test_known_architecture_with_auto_map_uses_builtin_classes(tiny_inputs, tmp_path):
    model, data = tiny_inputs
    marker = tmp_path / "RAN"
    evil = make_evil_folder(model, tmp_path / "evil", marker, model_type="llama")
    net = prepare(evil, 4, 4, device="cpu", progress=False)
    assert type(net).__name__ == "LlamaForCausalLM"
    tokenizer = importlib.import_module("qolora.data.tokens").load_tokenizer(evil)
    assert type(tokenizer).__name__ != "EvilTokenizer"
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- corrupt base weights
def corrupted(tiny_model: Path, path: Path, change) -> Path:
    """A copy of the tiny model whose model.safetensors ``change(tensors)`` rewrote."""
    shutil.copytree(tiny_model, path)
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _nan_at(key, value=math.nan):
    def change(t):
        t[key] = t[key].clone()
        t[key].view(-1)[7] = value
    return change


CORRUPTIONS = {
    # before: a matmul error at the first forward, after the whole prepare
    "shape": (lambda t: t.__setitem__(Q_PROJ, t[Q_PROJ][:, :32].contiguous()), rf"{Q_PROJ}.*shape \(64, 32\)"),
    # before: the layer's factors silently became NaN, the report said "error nan"
    "nan-weight": (_nan_at(Q_PROJ), rf"{Q_PROJ}.*NaN/inf"),
    "inf-weight": (_nan_at(Q_PROJ, math.inf), rf"{Q_PROJ}.*NaN/inf"),
    "nan-embedding": (_nan_at(EMBED), rf"{EMBED}.*NaN/inf"),
    # before: IndexError "too many indices"
    "1d-linear": (lambda t: t.__setitem__(Q_PROJ, t[Q_PROJ].reshape(-1).contiguous()), rf"{Q_PROJ}.*shape \(4096,\)"),
    "norm-shape": (lambda t: t.__setitem__("model.norm.weight", torch.ones(3)), r"model\.norm\.weight.*shape"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_weights_are_refused_with_tensor_and_file(tiny_inputs, tmp_path, kind):
    model, _ = tiny_inputs
    change, message = CORRUPTIONS[kind]
    bad = corrupted(model, tmp_path / kind, change)
    with pytest.raises(ConfigError, match=message) as err:
        prepare(bad, 4, 4, device="cpu", progress=False)
    assert "model.safetensors" in str(err.value)


def test_corrupt_base_is_refused_by_load_and_merge(tiny_inputs, finished_run, tmp_path):
    model, _ = tiny_inputs
    bad = corrupted(model, tmp_path / "bad", _nan_at(Q_PROJ))
    adapter = finished_run[0] / "adapter"
    with pytest.raises(ConfigError, match="NaN/inf"):
        qolora.load(bad, adapter, progress=False)
    with pytest.raises(ConfigError, match="NaN/inf"):
        qolora.merge(bad, adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.*"))


# ------------------------------------------------------------------------------------------------------ damaged files
def _flip_data_to_inf(path: Path) -> None:
    """Overwrite 4 bytes of the first float32 tensor's data with +inf (bytes flipped on disk)."""
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + header])
    key = next(k for k, v in meta.items() if k != "__metadata__" and v["dtype"] == "F32")
    start = 8 + header + meta[key]["data_offsets"][0]
    raw[start:start + 4] = (0x7F800000).to_bytes(4, "little")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, message", [
    # before: "incomplete metadata" without the file's name
    ("truncate", r"weight file .*model\.safetensors is damaged"),
    ("header", r"weight file .*model\.safetensors is damaged"),
    # before: no error at all
    ("flip-to-inf", r"NaN/inf"),
])
def test_damaged_safetensors_files_are_named(tiny_inputs, tmp_path, damage, message):
    model, _ = tiny_inputs
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    file = bad / "model.safetensors"
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif damage == "header":
        raw = bytearray(file.read_bytes())
        raw[10:30] = b"\xff" * 20
        file.write_bytes(bytes(raw))
    else:
        _flip_data_to_inf(file)
    with pytest.raises(ConfigError, match=message):
        prepare(bad, 4, 4, device="cpu", progress=False)


def _sharded(tiny_model: Path, path: Path, weight_map) -> Path:
    shutil.copytree(tiny_model, path)
    shutil.move(path / "model.safetensors", path / "model-00001-of-00001.safetensors")
    text = weight_map if isinstance(weight_map, str) else json.dumps({"metadata": {}, "weight_map": weight_map})
    (path / "model.safetensors.index.json").write_text(text)
    return path


@pytest.mark.parametrize("index, message", [
    ("{ not json", "is not a valid index"),  # before: a raw JSONDecodeError
    ('{"weight_map": [1, 2]}', "is not a valid index"),
    ('["a"]', "is not a valid index"),
    ({EMBED: "../../x.safetensors"}, "points outside the model folder"),  # before: followed
    ({EMBED: "/etc/passwd"}, "points outside the model folder"),
    ({EMBED: "missing-shard.safetensors"}, "are missing"),
])
def test_bad_index_files_are_refused_before_any_weight(tiny_inputs, tmp_path, index, message):
    model, _ = tiny_inputs
    bad = _sharded(model, tmp_path / "bad", index)
    with pytest.raises(ConfigError, match=message):
        qolora.base.reader.BaseCheckpoint.open(bad)


def test_merge_progress_bar_has_a_total(tiny_inputs):
    model, _ = tiny_inputs
    checkpoint = qolora.base.reader.BaseCheckpoint.open(model)
    assert checkpoint.tensor_count() == len(load_file(str(model / "model.safetensors")))
