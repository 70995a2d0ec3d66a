"""Issue 27: ``gradient_checkpointing="auto"`` and ``kernels="auto"`` chosen at launch
(:mod:`qolora.training.auto_choices`).

The plan's answer for given free memory, the fallback one notch lower when a step runs out of memory (the
step retried, bit for bit the run that started with the fallback setting), the log line and the
``metrics.jsonl`` records; all on the tiny random Llama of the other training tests.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from qolora import adapter_state_dict, prepare
from qolora.memory.gradient_checkpointing import checkpointing_mode
from qolora.training.auto_choices import (
    CPU_AVAILABLE_FRACTION,
    apply_checkpointing,
    checkpointing_ladder,
    next_checkpointing,
    resolve_checkpointing,
    resolve_kernels,
)
from qolora.training.loop import TrainConfig, train
from tiny_chat import events

GiB = 2**30


def _model(model_dir, **options):
    return prepare(model_dir, 4, 8, progress=False, device="cpu", **options)


def _checkpointed_layers(model) -> list[bool]:
    from qolora.adapters.compiled_layers import _layers

    active = getattr(model, "is_activation_checkpointing", None)
    active = bool(getattr(model, "is_gradient_checkpointing", False) if active is None else active)
    return [bool(active and layer.gradient_checkpointing) for layer in _layers(model)]


@pytest.fixture
def roomy_host(monkeypatch):
    """64 GiB of host memory available: the tiny model's step fits without checkpointing."""
    monkeypatch.setattr(importlib.import_module("qolora.memory.host_memory"), "available_host_bytes",
                        lambda: 64 * GiB)


# --------------------------------------------------------------------------------------- options
def test_auto_is_the_default_everywhere():
    import inspect

    from qolora.cli.commands import build_parser
    from qolora.training.finetune import finetune

    assert checkpointing_mode("auto") == "auto" and checkpointing_mode("AUTO") == "auto"
    assert TrainConfig().gradient_checkpointing == "auto" and not TrainConfig().problems()
    assert inspect.signature(prepare).parameters["gradient_checkpointing"].default == "auto"
    assert inspect.signature(finetune).parameters["kernels"].default == "auto"
    sub = build_parser()._subparsers._group_actions[0].choices["finetune"]
    assert sub.parse_args([]).gradient_checkpointing == "auto"
    assert sub.parse_args(["--gradient-checkpointing", "auto"]).gradient_checkpointing == "auto"
    assert sub.parse_args(["--gradient-checkpointing", "4"]).gradient_checkpointing == 4  # explicit: as before
    assert "'auto'" in TrainConfig(gradient_checkpointing="sometimes").problems()[0]


def test_prepare_auto_leaves_the_choice_to_training(chat_model_dir):
    model = _model(chat_model_dir)  # the default: "auto"
    assert not any(_checkpointed_layers(model))
    assert all(_checkpointed_layers(_model(chat_model_dir, gradient_checkpointing=True)))


# ------------------------------------------------------------------------------- the plan's answer
def test_the_ladder_of_notches():
    assert checkpointing_ladder(30, "cpu") == [8, 15, 23, True]
    assert checkpointing_ladder(30, "cuda") == [8, 15, 23, True, "offload"]
    assert [next_checkpointing(v, 30, "cpu") for v in (False, 0, 5, 8, 15, 23, 29, True)] == \
        [8, 8, 8, 15, 23, True, True, None]
    assert next_checkpointing(True, 30, "cuda") == "offload" and next_checkpointing("offload", 30, "cuda") is None
    assert [next_checkpointing(v, 2, "cpu") for v in (False, 1, True)] == [1, True, None]


def test_resolve_checkpointing_takes_the_fewest_layers_that_fit(chat_model_dir, caplog):
    model = _model(chat_model_dir)
    roomy = resolve_checkpointing(model, seq_len=64, batch_size=4, device="cpu", free_bytes=64 * GiB)
    assert roomy.value is False and "no layer checkpointed" in roomy.reason
    need = roomy.details["needed_bytes_by_checkpointed_layers"]  # 0, 1, 2 (= every) layers checkpointed
    assert len(need) == 3 and need[0] > need[1] > need[2]
    assert roomy.details["budget_bytes"] == int(CPU_AVAILABLE_FRACTION * 64 * GiB)

    def chosen(free: float, device: str = "cpu"):
        return resolve_checkpointing(model, seq_len=64, batch_size=4, device=device, free_bytes=int(free)).value

    fraction = 1 / CPU_AVAILABLE_FRACTION
    assert chosen(fraction * need[0] + 8) is False
    assert chosen(fraction * need[1] + 8) == 1  # one layer must recompute
    assert chosen(fraction * need[2] + 8) is True  # both
    with caplog.at_level(logging.WARNING, logger="qolora.training.auto_choices"):
        assert chosen(fraction * need[2] / 2) is True  # nothing less on a CPU: every layer, with a warning
    assert "predicted to need" in caplog.text
    # On a GPU: the plan's device bytes + its allocator margin within 90% of the free memory, else offload.
    gpu = resolve_checkpointing(model, seq_len=64, batch_size=4, device="cuda", free_bytes=64 * GiB)
    assert gpu.value is False and gpu.details["device"] == "cuda"
    assert chosen(gpu.details["needed_bytes_by_checkpointed_layers"][-1] / 0.9 - 2**20, "cuda") == "offload"
    # Longer sequences need more: the answer follows the job's shape.
    long = resolve_checkpointing(model, seq_len=2048, batch_size=64, device="cpu", free_bytes=64 * GiB)
    assert long.details["needed_bytes_by_checkpointed_layers"][0] > need[0]


def test_apply_checkpointing_sets_exactly_the_layers(chat_model_dir):
    model = _model(chat_model_dir)
    for value, layers in ((1, [True, False]), (True, [True, True]), (False, [False, False]), ("offload", [True, True]),
                          (1, [True, False])):
        apply_checkpointing(model, value)
        assert _checkpointed_layers(model) == layers, value


# ------------------------------------------------------------------------------ the OOM fallback
def _config(out, **changes) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=4, batch_size=4, lr=1e-3, eval_every=2, save_every=0, log_every=1,
                n_samples=0, progress=False)
    return TrainConfig(**{**base, **changes})


def _oom_once(monkeypatch, at_call: int = 1):
    """The loop's loss raises an out-of-memory error in its ``at_call``-th training forward, after a backward
    (the gradients are dirty) and after drawing random numbers (the RNG has moved)."""
    train_module = importlib.import_module("qolora.training.loop")
    real = train_module.loss_sum
    calls = {"n": 0, "raised": 0}

    def flaky(model, batch):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == at_call:
                real(model, batch).backward()
                torch.rand(16)
                calls["raised"] += 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(model, batch)

    monkeypatch.setattr(train_module, "loss_sum", flaky)
    return calls


def test_out_of_memory_under_auto_falls_back_one_notch_bit_for_bit(tmp_path, chat_model_dir, tokenized, monkeypatch,
                                                                   roomy_host, caplog):
    tok, train_ds, eval_ds = tokenized
    model = _model(chat_model_dir, dropout=0.1)  # dropout: a retried step must draw the same masks
    calls = _oom_once(monkeypatch, at_call=2)  # step 1, grad_accum=2: its second micro-batch
    with caplog.at_level(logging.INFO, logger="qolora.training.loop"):  # whatever level an earlier test left
        run = train(model, tok, train_ds, eval_ds, _config(tmp_path / "auto", grad_accum=2))
    assert calls["raised"] == 1
    # The launch's choice: logged and in metrics.jsonl.
    assert "gradient_checkpointing='auto' -> False: no layer checkpointed" in caplog.text
    start = events(tmp_path / "auto", "start")[0]
    assert [(c["option"], c["value"]) for c in start["automatic"]] == [("gradient_checkpointing", False),
                                                                        ("kernels", "auto")]
    # The fallback: a warning, a record, the same step again, one notch more checkpointing from then on.
    assert "step 1 ran out of memory with gradient_checkpointing=False" in caplog.text
    assert "falling back to 1" in caplog.text
    fallback = events(tmp_path / "auto", "fallback")
    assert [(e["step"], e["before"], e["after"]) for e in fallback] == [(1, False, 1)]
    assert "OutOfMemoryError" in fallback[0]["error"]
    assert _checkpointed_layers(model) == [True, False]
    assert [h["step"] for h in run.history] == [1, 2, 3, 4]

    # The reference: a run that started with the setting the fallback reached (1 of 2 layers checkpointed).
    reference = _model(chat_model_dir, dropout=0.1)
    ref = train(reference, tok, train_ds, eval_ds, _config(tmp_path / "ref", gradient_checkpointing=1, grad_accum=2))
    assert run.history == ref.history  # every step's loss, grad norm, lr, tokens: bit for bit
    assert run.evals == ref.evals
    w_run, w_ref = adapter_state_dict(model), adapter_state_dict(reference)
    assert w_run.keys() == w_ref.keys() and all(torch.equal(w_run[k], w_ref[k]) for k in w_ref)


def test_out_of_memory_with_an_explicit_value_is_not_retried(tmp_path, chat_model_dir, tokenized, monkeypatch):
    tok, train_ds, _ = tokenized
    model = _model(chat_model_dir)
    _oom_once(monkeypatch)
    with pytest.raises(torch.OutOfMemoryError):
        train(model, tok, train_ds, None, _config(tmp_path / "explicit", gradient_checkpointing=True, eval_every=0))
    assert not events(tmp_path / "explicit", "fallback")


def test_out_of_memory_at_the_last_notch_is_raised(tmp_path, chat_model_dir, tokenized, monkeypatch):
    tok, train_ds, _ = tokenized
    host_memory = importlib.import_module("qolora.memory.host_memory")
    monkeypatch.setattr(host_memory, "available_host_bytes", lambda: 1)  # -> True
    model = _model(chat_model_dir)
    _oom_once(monkeypatch)
    with pytest.raises(torch.OutOfMemoryError):
        train(model, tok, train_ds, None, _config(tmp_path / "last", eval_every=0))


# ------------------------------------------------------------------------------------ kernels
def test_resolve_kernels_compiles_when_the_run_repays_it(chat_model_dir, monkeypatch):
    auto_choices = importlib.import_module("qolora.training.auto_choices")
    monkeypatch.setattr(auto_choices, "_inductor_problem", lambda kind: None)
    model = _model(chat_model_dir)
    short = resolve_kernels(model, max_steps=40, tokens_per_step=512, varying_lengths=False, device="cpu")
    assert short.value == "auto" and "does not pay" in short.reason
    cost = auto_choices.COMPILE_MODEL["cpu"]
    config = model.config
    per_step = cost.gain_s_per_element * 512 * config.num_hidden_layers * (config.hidden_size
                                                                          + config.intermediate_size)
    steps = int(cost.compile_s / per_step) + 2
    long = resolve_kernels(model, max_steps=steps, tokens_per_step=512, varying_lengths=False, device="cpu")
    assert long.value == "compile" and "decoder layers compiled" in long.reason
    assert long.details["predicted_compile_s"] == cost.compile_s
    assert resolve_kernels(model, max_steps=steps - 2, tokens_per_step=512, varying_lengths=False,
                           device="cpu").value == "auto"  # one step fewer than it takes to repay
    varying = resolve_kernels(model, max_steps=steps, tokens_per_step=512, varying_lengths=True, device="cpu")
    assert varying.value == "auto"  # a recompilation for the varying lengths doubles the cost
    assert resolve_kernels(model, max_steps=10**9, tokens_per_step=512, varying_lengths=False, device="cpu",
                           fsdp=True).value == "auto"
    monkeypatch.setattr(auto_choices, "_inductor_problem", lambda kind: "no C++ compiler (Inductor's CPU code "
                                                                        "generator)")
    none = resolve_kernels(model, max_steps=10**9, tokens_per_step=512, varying_lengths=False, device="cpu")
    assert none.value == "auto" and "no C++ compiler" in none.reason


def test_a_setting_given_to_prepare_is_kept_under_auto(tmp_path, chat_model_dir, tokenized, caplog):
    tok, train_ds, _ = tokenized
    model = _model(chat_model_dir, gradient_checkpointing=1)
    with caplog.at_level(logging.INFO, logger="qolora.training.loop"):
        train(model, tok, train_ds, None, _config(tmp_path / "kept", max_steps=1, eval_every=0))
    assert "gradient_checkpointing='auto' -> 1: the model's own setting" in caplog.text
    assert events(tmp_path / "kept", "start")[0]["automatic"][0]["value"] == 1
    assert _checkpointed_layers(model) == [True, False]
