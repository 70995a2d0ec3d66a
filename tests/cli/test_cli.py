"""The ``qolora`` command line: help, a tiny end-to-end finetune / info / merge, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qolora.cli.commands import build_parser, main
from tiny_chat import make_chat_model_dir, write_chat_jsonl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return make_chat_model_dir(root / "model"), write_chat_jsonl(root / "chat.jsonl", n=32)


def error_line(stderr: str) -> str:
    """The error line (logs may come before it); asserts it is exactly one line and no traceback."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("qolora: error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


def tiny_args(model, data, out, *extra):
    return ["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--rank", "4",
            "--max-length", "64", "--eval-fraction", "0.25", "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3",
            "--eval-every", "2", "--save-every", "2", "--n-samples", "1", "--max-new-tokens", "4", "--threads", "1",
            "--device", "cpu", "--no-progress", *extra]


def test_help_documents_every_finetune_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    sub = build_parser()._subparsers._group_actions[0].choices["finetune"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.option_strings[-1] in text
            assert action.help, f"{action.option_strings} has no help"
    assert "(default: 128)" in text and "(default: paged_adamw_8bit)" in text and "olora 0.0001" in text


def test_console_script_help_runs():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-m", "qolora.cli", "--help"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and "finetune" in out.stdout and "merge" in out.stdout and "info" in out.stdout


def test_tiny_end_to_end_finetune_info_merge(tmp_path, tiny, capsys):
    model, data = tiny
    out = tmp_path / "run"
    assert main(tiny_args(model, data, out)) == 0
    printed = capsys.readouterr().out
    assert "eval loss" in printed and "before training:" in printed and "after training:" in printed
    assert (out / "adapter" / "qolora_config.json").is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file() and (out / "samples.md").is_file()
    ends = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"end"' in x]
    assert ends and ends[0]["step"] == 4

    assert main(["info", str(out)]) == 0
    assert "finished" in capsys.readouterr().out
    assert main(["info", str(out / "adapter")]) == 0
    assert "rank 4" in capsys.readouterr().out
    assert main(["info", str(out / "checkpoints" / "step-000004")]) == 0
    assert "step 4 of 4 (verified)" in capsys.readouterr().out

    merged = tmp_path / "merged"
    assert main(["merge", str(model), str(out / "adapter"), str(merged), "--dtype", "fp32", "--no-progress"]) == 0
    assert (merged / "config.json").is_file() and "merged" in capsys.readouterr().out

    # an existing run is refused with one line; --resume of a finished run just reports it again
    assert main(tiny_args(model, data, out)) == 2
    assert "already holds a training run" in error_line(capsys.readouterr().err)
    assert main(tiny_args(model, data, out, "--resume")) == 0


@pytest.mark.parametrize("change, message", [
    (["--data", "/nonexistent/chat.jsonl"], "data file not found"),
    (["--max-length", "4"], "longer than max_length=4"),
    (["--batch-size", "0", "--eval-fraction", "2"], "--batch-size=0 must be an integer >= 1; --eval-fraction=2.0"),
])
def test_errors_are_one_line_exit_2(tmp_path, tiny, capsys, change, message):
    model, data = tiny
    assert main(tiny_args(model, data, tmp_path / "x") + change) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_debug_shows_the_traceback(tmp_path, tiny):
    model, data = tiny
    with pytest.raises(Exception, match="data file not found"):
        main(["--debug", *tiny_args(model, data, tmp_path / "x", "--data", "/nonexistent.jsonl")])


def test_merge_error_is_one_line(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "no-base"), str(tmp_path / "no-adapter"), str(tmp_path / "out")]) == 2
    assert "does not exist" in error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def chat_adapter(tiny, tmp_path_factory):
    import qolora

    model = qolora.prepare(tiny[0], bits=4, rank=4, device="cpu", progress=False)
    return qolora.save_adapter(model, tmp_path_factory.mktemp("chat") / "adapter")


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(chat_adapter):
    proc = subprocess.run([sys.executable, "-m", "qolora.cli", "chat", "--adapter", str(chat_adapter),
                           "--max-new-tokens", "2", "--device", "cpu"], input=b"\xff\xfe caf\xe9\nhello\n\n",
                          capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, stderr[-3000:]
    assert "skipped a line that is not UTF-8 text (byte 0)" in stderr and "Traceback" not in stderr


def test_chat_merged_given_an_adapter_folder_says_to_use_adapter(chat_adapter, capsys):
    assert main(["chat", "--merged", str(chat_adapter), "--prompt", "hi", "--device", "cpu"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "is a qolora adapter folder, not a model" in line and "--adapter" in line


def test_chat_device_follows_the_one_device_rule(tmp_path):
    """chat takes devices as everything else does ('auto' by default, CUDA when there is one); a bad one is a
    ConfigError naming it, before anything is read."""
    import inspect

    import torch

    from qolora import ConfigError
    from qolora.cli.chat import load_chat_model
    from qolora.devices import resolve_device

    assert inspect.signature(load_chat_model).parameters["device"].default == "auto"
    assert build_parser().parse_args(["chat", "--merged", str(tmp_path)]).device == "auto"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device='bogus'"):
        load_chat_model(merged=tmp_path / "missing", device="bogus")
