"""qolora.base.config_sizes: a hostile or mistyped config.json is refused at once, naming the field."""

from __future__ import annotations

import json

import pytest

import qolora
from qolora.base.config_sizes import size_problems
from qolora.errors import ConfigError
from qolora.planning.plan import plan

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384}


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": 1e9}, r"'num_hidden_layers' is 1e\+09: larger than any real model"),
    ({"vocab_size": 1e12}, r"'vocab_size' is 1e\+12: larger than any real model"),
    ({"hidden_size": 1e9}, r"'hidden_size' is 1e\+09"),
    ({"hidden_size": None}, r"'hidden_size' is missing"),
    ({"num_hidden_layers": None}, r"'num_hidden_layers' is missing"),
    ({"num_hidden_layers": 0}, r"'num_hidden_layers' is 0: it must be a whole number >= 1"),
    ({"num_hidden_layers": -3}, r"'num_hidden_layers' is -3"),
    ({"num_attention_heads": 2.5}, r"'num_attention_heads' is 2.5"),
])
def test_the_planner_refuses_implausible_sizes_at_once(tmp_path, change, message):
    config = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        plan(tmp_path)


def test_prepare_refuses_them_before_any_weight_is_read(tmp_path, no_weight_reads):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "vocab_size": 1e12}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="vocab_size"):
        qolora.prepare(tmp_path, bits=4, rank=4, device="cpu", progress=False)


def test_every_problem_is_listed_and_aliases_count():
    problems = size_problems({**LLAMA, "num_hidden_layers": 0, "vocab_size": 1e12})
    assert len(problems) == 2
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 384}
    assert size_problems(gpt2, attribute_map={"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                                              "num_attention_heads": "n_head"}) == []
    assert size_problems({"text_config": LLAMA, "model_type": "gemma3"}) == []  # multimodal: the text part


def test_a_config_object_is_checked_too():
    from transformers import LlamaConfig

    with pytest.raises(ConfigError, match="num_hidden_layers"):
        plan(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"} | {"num_hidden_layers": 5000}))


def test_an_adapter_folder_given_as_the_model_says_what_it_is(tiny_llama_dir, tmp_path):
    model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, device="cpu", progress=False)
    adapter = qolora.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"is a qolora adapter folder, not a model.*qolora chat --adapter"):
        qolora.prepare(adapter, bits=4, rank=4, device="cpu", progress=False)
