"""``qolora chat`` (qolora.cli.chat): its answer equals the loaded trained model's, from an adapter (fast
dequantized copy, or bitsandbytes' kernels) or a merged folder, for one prompt or interactively; its usage errors
are one line."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import qolora
from qolora.cli.commands import main
from tiny_runs import error_line


@pytest.fixture(scope="module")
def trained_adapter(finished_run):
    return finished_run[0] / "adapter"


def test_chat_on_an_adapter_answers_like_the_loaded_model(tiny_inputs, trained_adapter):
    from qolora.cli.chat import load_chat_model, prompt_tensor, reply

    model, _ = tiny_inputs
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    loaded = qolora.load(model, trained_adapter, progress=False)
    tok = importlib.import_module("qolora.data.tokens").load_tokenizer(model)
    ids = prompt_tensor(tok, messages, torch.device("cpu"))
    expected = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                               do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    expected = tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()

    fast, tokenizer = load_chat_model(adapter=trained_adapter, progress=False)  # base: recorded in the adapter
    assert not any(isinstance(m, qolora.AdapterLinear) for m in fast.modules())
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, loaded(ids).logits, atol=1e-4, rtol=1e-4)
    pieces = []
    assert reply(fast, tokenizer, messages, max_new_tokens=12, stream=pieces.append) == expected
    assert "".join(pieces).strip() == expected
    slow, _ = load_chat_model(adapter=trained_adapter, base=model, dequantize=False, progress=False)
    assert reply(slow, tokenizer, messages, max_new_tokens=12) == expected


def test_cli_chat_one_prompt_interactive_and_merged(tiny_inputs, trained_adapter, tmp_path, capsys, monkeypatch):
    import io

    from qolora.cli.chat import load_chat_model, reply

    model, _ = tiny_inputs
    fast, tok = load_chat_model(adapter=trained_adapter, progress=False)
    expected = reply(fast, tok, [{"role": "user", "content": "Hello?"}], max_new_tokens=8)
    assert main(["chat", "--adapter", str(trained_adapter), "--prompt", "Hello?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected

    merged = tmp_path / "merged"
    qolora.merge(model, trained_adapter, merged, dtype="fp32", progress=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello?\nWho wrote Hamlet?\n\nignored\n"))
    assert main(["chat", "--merged", str(merged), "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].strip() == expected and len(lines) == 2  # two answers; the empty line ended the chat


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of --adapter DIR and --merged DIR"),
    (["--adapter", "A", "--merged", "M"], "exactly one of"),
    (["--adapter", "/nonexistent/adapter"], "does not exist"),
    (["--merged", "/nonexistent/merged"], "does not exist"),
    (["--adapter", "A", "--max-new-tokens", "0"], "--max-new-tokens=0"),
])
def test_cli_chat_errors_are_one_line(args, message, capsys):
    assert main(["chat", *args]) == 2
    assert message in error_line(capsys.readouterr().err)
