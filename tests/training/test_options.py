"""Memory options are refused at the public call, before any work, naming the flag the user gave.

The cases of issue 26's "weak answers": ``--gpu-memory`` that is not a size or is given without
``--offload auto``; ``--gradient-checkpointing N`` beyond the model's layers (finetune and plan alike);
``qolora plan`` exiting 0 on a host that cannot hold the offloaded part.

And the run's result: one final train loss, labelled with the steps it averages; the default output folder
(``qolora-output``) is in .gitignore.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qolora
from qolora.cli.commands import main
from qolora.errors import ConfigError
from qolora.planning.plan import plan

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("gpu_memory, offload, message", [
    ("abc", "auto", r"gpu_memory \(--gpu-memory\)='abc' is not a size"),
    (-1, "auto", r"gpu_memory \(--gpu-memory\)=-1 is not a size"),
    ("24GiB", None, r"gpu_memory='24GiB' \(--gpu-memory\) is used only with offload='auto'"),
])
def test_prepare_refuses_a_bad_gpu_memory_before_reading(tiny_llama_dir, no_weight_reads, gpu_memory, offload,
                                                         message):
    with pytest.raises(ConfigError, match=message):
        qolora.prepare(tiny_llama_dir, bits=4, rank=4, device="cpu", offload=offload, gpu_memory=gpu_memory,
                       progress=False)


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory", "abc", "--offload", "auto"], "--gpu-memory"),
    (["--gpu-memory", "0", "--offload", "auto"], "is not a size"),
    (["--gpu-memory=-5GiB", "--offload", "auto"], "is not a size"),
    (["--gpu-memory", "24GiB"], "is used only with offload='auto'"),
    (["--gradient-checkpointing", "99"], "--gradient-checkpointing=99 layers, but the model has"),
])
def test_finetune_cli_refuses_bad_memory_options_naming_the_flag(chat_model_dir, chat_jsonl, tmp_path, capsys,
                                                                 args, message):
    code = main(["finetune", "--model", str(chat_model_dir), "--data", str(chat_jsonl), "--output-dir",
                 str(tmp_path / "run"), "--device", "cpu", "--max-steps", "1", "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "--no-gradient-checkpointing" not in err
    assert not (tmp_path / "run" / "adapter").exists()


def test_plan_refuses_more_checkpointed_layers_than_the_model_has():
    with pytest.raises(ConfigError, match="gradient_checkpointing=999 layers, but the model has 32 decoder layers"):
        plan("llama-3-8b", gradient_checkpointing=999)


def test_plan_exits_1_when_the_host_cannot_hold_the_offloaded_part(capsys):
    assert main(["plan", "llama-3-70b", "--offload", "cpu", "--host-memory", "1GiB"]) == 1
    assert "NOT enough" in capsys.readouterr().out
    assert main(["plan", "llama-3-8b", "--offload", "cpu", "--host-memory", "1TiB"]) == 0


def test_an_alpha_that_would_swamp_the_model_is_refused(tiny_llama_dir, no_weight_reads):
    with pytest.raises(ConfigError, match=r"alpha=1e\+30 gives an adapter scale of 6.25e\+28"):
        qolora.prepare(tiny_llama_dir, bits=4, rank=16, alpha=1e30, device="cpu", progress=False)


def test_plan_models_the_step_that_runs_for_each_kernels_choice():
    auto, compiled, off = (plan("llama-3-8b", kernels=k, seq_len=512) for k in ("auto", "compile", "off"))
    assert compiled.step_bytes == auto.step_bytes  # compile trains through the same fused adapter step
    assert off.step_bytes != auto.step_bytes
    eight = [plan("llama-3-8b", bits=8, kernels=k).step_bytes for k in ("compile", "off")]
    assert eight[0] == eight[1]  # 8-bit bases take bitsandbytes' own path either way
    with pytest.raises(ConfigError, match="kernels='fast' is not one of"):
        plan("llama-3-8b", kernels="fast")


def test_prepare_refuses_a_config_together_with_options(tiny_llama_dir, no_weight_reads):
    from qolora import AdapterConfig

    with pytest.raises(ConfigError, match=r"pass either config= or bits/rank/options, not both.*rank=64"):
        qolora.prepare(tiny_llama_dir, config=AdapterConfig(rank=4, device="cpu"), rank=64, progress=False)
    with pytest.raises(ConfigError, match="alpha=8"):
        qolora.prepare(tiny_llama_dir, config=AdapterConfig(rank=4, device="cpu"), alpha=8, progress=False)


# ------------------------------------------------------------------------------ the result, the default output folder
def test_one_labelled_final_loss(finished_run):
    out, result = finished_run
    trains = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert result.final_train_loss == pytest.approx(trains[-1]["loss"])
    assert f"train loss {trains[-1]['loss']:.4f} (mean of steps 2-2)" not in result.summary()  # one step: "step 2"
    assert f"train loss {trains[-1]['loss']:.4f} (mean of step 2)" in result.summary()
    assert "last train loss" not in result.summary()


def test_gitignore_lists_the_default_output_folder():
    assert "qolora-output/" in (REPO / ".gitignore").read_text().split()
