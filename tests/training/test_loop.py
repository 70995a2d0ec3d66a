"""Training: loss falls, exact grad accumulation, exact resume after SIGKILL, NaN stop, fail-fast inputs.

Everything runs on a tiny random Llama that shares the tiny ChatML tokenizer's vocabulary (saved into
the model folder, so ``finetune`` loads both from it). The real SmolLM2 default job is ``slow``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

import resume_job
from qolora import ConfigError, adapter_parameters, adapter_state_dict, finetune, prepare
from qolora.data.tokens import DataError
from qolora.training.checkpoints import CheckpointError, list_checkpoints
from qolora.training.loop import DataOrder, TrainConfig, TrainingError, lr_factor, train
from tiny_chat import QA, events
from tiny_tokenizer import make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
def tiny_model(model_dir, rank=8, device="cpu", **options):
    """The CPU tests pin the CPU: exact comparisons are meant for fp32 without autocast."""
    return prepare(model_dir, 4, rank, gradient_checkpointing=True, progress=False, device=device, **options)


def quick(out, **changes) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=6, batch_size=4, lr=1e-3, eval_every=3, save_every=3, log_every=1,
                n_samples=1, max_new_tokens=4, progress=False)
    return TrainConfig(**{**base, **changes})


@pytest.fixture
def no_prepare(monkeypatch):
    """Fail the test if the model would be loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("prepare() was called: the bad input should have been caught before the model loads")

    monkeypatch.setattr(importlib.import_module("qolora.model.prepare"), "prepare", refuse)
    monkeypatch.setattr(importlib.import_module("qolora.training.finetune"), "prepare_checked", refuse)


# ------------------------------------------------------------------------------------- config
def test_config_collects_every_problem():
    with pytest.raises(ConfigError) as err:
        TrainConfig(max_steps=0, lr=-1.0, optim="sgd", mixed_precision="fp8", keep_last=0).validate()
    assert len(err.value.problems) == 5
    text = str(err.value)
    for part in ("max_steps=0", "lr=-1.0", "optim='sgd'", "mixed_precision='fp8'", "keep_last=0"):
        assert part in text
    with pytest.raises(ConfigError, match="unknown training option.*'steps'"):
        TrainConfig.from_options(steps=3)


def test_schedule_warms_up_then_decays_to_min():
    f = [lr_factor(s, warmup=4, max_steps=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert 0.1 <= f[-1] < 0.12


def test_data_order_groups_lengths_and_resumes_mid_epoch():
    lengths = [((i * 37) % 50) + 1 for i in range(100)]
    order = DataOrder(100, seed=3, lengths=lengths, batch=4)
    first = order.take(32)  # one window of 8 batches
    batches = [first[i: i + 4] for i in range(0, 32, 4)]
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))  # batches cut from one sorted window
    assert [max(lengths[i] for i in b) for b in batches] != sorted((max(lengths[i] for i in b) for b in batches),
                                                                    reverse=True)  # ... in shuffled order
    position = order.position
    rest = order.take(150)  # crosses into epoch 1
    again = DataOrder(100, seed=3, **position, lengths=lengths, batch=4)
    assert again.take(150) == rest and order.position == again.position == {"epoch": 1, "index": 82}
    assert sorted(first + rest[:68]) == list(range(100))  # epoch 0 is a permutation
    plain = DataOrder(100, seed=3).take(100)
    assert sorted(plain) == list(range(100)) and plain != first + rest[:68]


def test_fp16_needs_cuda(tmp_path, chat_model_dir, tokenized):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    tok, train_ds, eval_ds = tokenized
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        train(tiny_model(chat_model_dir), tok, train_ds, eval_ds, quick(tmp_path / "o", mixed_precision="fp16"))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ training
def test_finetune_loss_falls_and_writes_everything(tmp_path, chat_model_dir, chat_jsonl):
    out = tmp_path / "run"
    result = finetune(chat_model_dir, chat_jsonl, output_dir=out, rank=8, adapter_options={"device": "cpu"},
                      max_length=64, eval_fraction=0.25,
                      max_steps=24, batch_size=4, lr=2e-3, eval_every=8, save_every=8, keep_last=2, log_every=4,
                      n_samples=2, max_new_tokens=6, progress=False)
    assert result.steps == 24 and len(result.history) == 24
    assert result.final_eval_loss < result.initial_eval_loss - 0.2
    first, last = result.history[0]["loss"], sum(h["loss"] for h in result.history[-4:]) / 4
    assert last < first - 0.3
    assert [e["step"] for e in result.evals] == [0, 8, 16, 24]

    train_events = events(out, "train")
    assert [e["step"] for e in train_events] == [1, 4, 8, 12, 16, 20, 24]
    assert all(math.isfinite(e["loss"]) and e["tokens_per_s"] > 0 and e["memory_bytes"] > 0 for e in train_events)
    assert [e["step"] for e in events(out, "eval")] == [0, 8, 16, 24]
    assert events(out, "end")[0]["final_eval_loss"] == result.final_eval_loss
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert len(samples) == 2 and all(s["before"] is not None and s["after"] is not None for s in samples)
    md = (out / "samples.md").read_text()
    assert "Before training" in md and "After training (24 steps)" in md
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [16, 24]  # keep_last=2
    assert result.last_checkpoint == out / "checkpoints" / "step-000024"
    assert result.adapter_dir == out / "adapter" and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]

    with pytest.raises(ConfigError, match="already holds a training run"):
        finetune(chat_model_dir, chat_jsonl, output_dir=out, max_steps=2, progress=False)


def test_grad_accumulation_equals_one_big_batch(tmp_path, chat_model_dir, tokenized):
    tok, train_ds, _ = tokenized
    runs = {}
    for name, (bs, ga) in {"big": (8, 1), "accum": (4, 2)}.items():
        model = tiny_model(chat_model_dir)
        cfg = quick(tmp_path / name, max_steps=3, batch_size=bs, grad_accum=ga, optim="adamw", max_grad_norm=None,
                    eval_every=0, save_every=0, n_samples=0)
        result = train(model, tok, train_ds, None, cfg)
        runs[name] = (result.history, adapter_state_dict(model))
    (h1, w1), (h2, w2) = runs["big"], runs["accum"]
    label_counts = [h["label_tokens"] for h in h1]
    assert label_counts == [h["label_tokens"] for h in h2]
    for a, b in zip(h1, h2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # catches a wrong 1/grad_accum scale
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-6)


def _log(out: Path) -> str:
    log = Path(f"{out}.log")
    return log.read_text()[-3000:] if log.exists() else f"(no {log.name})"


def _final_state(out: Path):
    from safetensors.torch import load_file

    last = out / "checkpoints" / f"step-{resume_job.MAX_STEPS:06d}"
    state = json.loads((last / "state.json").read_text())
    losses = [(e["step"], e["loss"], e["lr"], e["grad_norm"], e["tokens"]) for e in events(out, "train")]
    evals = [(e["step"], e["eval_loss"]) for e in events(out, "eval")]
    return load_file(str(last / "adapter.safetensors")), state["history"], losses, evals


@pytest.mark.parametrize("kernels", ["auto", pytest.param("compile", marks=pytest.mark.slow)])
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, chat_model_dir, chat_jsonl, kernels):
    """kill -9 mid-training, resume: same weights and logged losses as a run never stopped.

    The adapters have dropout, so the RNG states must be restored too; grad_accum=2 and a data position
    in the middle of an epoch exercise the sampler position. The kill comes at a fixed point, step 7,
    after the checkpoint of step 4 and the train event of step 6, so the resume must also drop that
    event. Each run is a process of its own (a fork of this one, see ``resume_job``). With
    ``kernels="compile"`` the batches' lengths vary, so the resumed process compiles its graphs in
    another order than the uninterrupted one."""
    ref, cut = tmp_path / "reference", tmp_path / "killed"
    args = (chat_model_dir, chat_jsonl)
    reference = resume_job.start(*args, ref, kernels=kernels)  # runs beside the killed one
    try:
        code = resume_job.start(*args, cut, kill_at=13, kernels=kernels)()  # 13th forward: step 7's first micro-batch
        assert code == -signal.SIGKILL, _log(cut)
        saved = [s for s, _ in list_checkpoints(cut / "checkpoints")]
        assert saved == [4] and not events(cut, "end"), "killed midway"
        assert [e["step"] for e in events(cut, "train")] == [1, 3, 6]  # logged past the checkpoint

        assert resume_job.start(*args, cut, resume=True, kernels=kernels)() == 0, _log(cut)
    finally:
        assert reference() == 0, _log(ref)

    w_ref, h_ref, l_ref, e_ref = _final_state(ref)
    w_cut, h_cut, l_cut, e_cut = _final_state(cut)
    assert h_cut == h_ref and len(h_ref) == 12  # every step's loss, lr, grad norm, token counts
    assert l_cut == l_ref and [s for s, *_ in l_ref] == [1, 3, 6, 9, 12]  # train events of metrics.jsonl
    assert e_cut == e_ref and [s for s, _ in e_ref] == [0, 4, 8, 12]  # eval events
    assert w_cut.keys() == w_ref.keys()
    assert all(torch.equal(w_cut[k], w_ref[k]) for k in w_ref)
    assert [e["step"] for e in events(cut, "resume")] == [4]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, chat_model_dir, tokenized):
    tok, train_ds, eval_ds = tokenized
    model = tiny_model(chat_model_dir)
    calls = {"n": 0}

    def poison(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] >= 5:  # step 5 (one forward per step)
                output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    model.base_model.register_forward_hook(poison)  # the decoder: the loss reads its hidden states
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"loss is nan at step 5.*step-000004"):
        train(model, tok, train_ds, eval_ds, quick(out, max_steps=10, save_every=2))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    assert events(out, "error")[0]["step"] == 5
    assert not events(out, "end")
    assert all(torch.isfinite(p).all() for p in adapter_state_dict(model).values())


# -------------------------------------------------------------------------------------- resume
def _checkpointed_run(out, chat_model_dir, tokenized, **changes):
    tok, train_ds, eval_ds = tokenized
    cfg = quick(out, max_steps=6, save_every=2, keep_last=None, **changes)
    train(tiny_model(chat_model_dir), tok, train_ds, eval_ds, cfg)
    return cfg


def test_resume_skips_a_corrupted_newest_checkpoint(tmp_path, chat_model_dir, tokenized, caplog):
    tok, train_ds, eval_ds = tokenized
    out = tmp_path / "run"
    cfg = _checkpointed_run(out, chat_model_dir, tokenized)
    newest = out / "checkpoints" / "step-000006" / "adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[:-16] + b"\0" * 16)
    result = train(tiny_model(chat_model_dir), tok, train_ds, eval_ds, cfg, resume=True)
    assert result.resumed_from == out / "checkpoints" / "step-000004"
    assert "corrupted" in caplog.text and result.steps == 6
    assert (out / "checkpoints" / "step-000006.corrupt").is_dir()


def test_resume_with_only_corrupted_checkpoints_fails(tmp_path, chat_model_dir, tokenized):
    tok, train_ds, eval_ds = tokenized
    out = tmp_path / "run"
    cfg = _checkpointed_run(out, chat_model_dir, tokenized)
    for _, path in list_checkpoints(out / "checkpoints"):
        (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint.*step-000006 is incomplete"):
        train(tiny_model(chat_model_dir), tok, train_ds, eval_ds, cfg, resume=True)


def test_resume_with_another_model_or_options_fails(tmp_path, chat_model_dir, tokenized):
    tok, train_ds, eval_ds = tokenized
    out = tmp_path / "run"
    cfg = _checkpointed_run(out, chat_model_dir, tokenized)
    with pytest.raises(CheckpointError, match="different model or adapter setup"):
        train(tiny_model(chat_model_dir, rank=4), tok, train_ds, eval_ds, cfg, resume=True)
    with pytest.raises(CheckpointError, match="training options differ.*batch_size"):
        train(tiny_model(chat_model_dir), tok, train_ds, eval_ds, cfg.replace(batch_size=2), resume=True)
    with pytest.raises(CheckpointError, match="different training data"):
        train(tiny_model(chat_model_dir), tok, eval_ds, train_ds, cfg, resume=True)


# ---------------------------------------------------------------------------------- bad inputs
def _finetune_bad(tmp_path, model_dir, data, **kw):
    out = tmp_path / "never"
    options = dict(output_dir=out, max_length=64, max_steps=2, progress=False, adapter_options={"device": "cpu"})
    options.update(kw)
    return out, lambda: finetune(model_dir, data, **options)


@pytest.mark.usefixtures("no_prepare")
class TestBadInputFailsBeforeTheModel:
    def test_missing_data_file(self, tmp_path, chat_model_dir):
        out, run = _finetune_bad(tmp_path, chat_model_dir, tmp_path / "nope.jsonl")
        with pytest.raises(DataError, match="data file not found"):
            run()
        assert not out.exists()

    def test_unknown_columns(self, tmp_path, chat_model_dir):
        data = tmp_path / "odd.jsonl"
        data.write_text('{"question": "q", "reply": "a"}\n' * 3)
        out, run = _finetune_bad(tmp_path, chat_model_dir, data)
        with pytest.raises(DataError, match="cannot detect the data format.*question"):
            run()
        assert not out.exists()

    def test_unknown_format(self, tmp_path, chat_model_dir, chat_jsonl):
        out, run = _finetune_bad(tmp_path, chat_model_dir, chat_jsonl, format="alpaca")
        with pytest.raises(DataError, match="unknown data format 'alpaca'"):
            run()

    def test_empty_dataset(self, tmp_path, chat_model_dir):
        data = tmp_path / "empty.jsonl"
        data.write_text("")
        out, run = _finetune_bad(tmp_path, chat_model_dir, data)
        with pytest.raises(DataError, match="empty"):
            run()
        assert not out.exists()

    def test_every_example_too_long(self, tmp_path, chat_model_dir, chat_jsonl):
        out, run = _finetune_bad(tmp_path, chat_model_dir, chat_jsonl, max_length=4)
        with pytest.raises(DataError, match="longer than max_length=4"):
            run()
        assert not out.exists()

    def test_output_dir_not_creatable(self, tmp_path, chat_model_dir, chat_jsonl):
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        _, run = _finetune_bad(tmp_path, chat_model_dir, chat_jsonl, output_dir=blocker / "out")
        with pytest.raises(ConfigError, match="cannot be created.*not a folder"):
            run()

    @pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
    def test_output_dir_read_only(self, tmp_path, chat_model_dir, chat_jsonl):
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _, run = _finetune_bad(tmp_path, chat_model_dir, chat_jsonl, output_dir=locked / "out")
        with pytest.raises(ConfigError, match="not writable"):
            run()

    def test_options_all_reported_at_once(self, tmp_path, chat_model_dir, chat_jsonl):
        _, run = _finetune_bad(tmp_path, chat_model_dir, chat_jsonl, bits=3, batch_size=0, eval_fraction=1.5)
        with pytest.raises(ConfigError) as err:
            run()
        assert len(err.value.problems) == 3

    def test_missing_model(self, tmp_path, chat_jsonl):
        out, run = _finetune_bad(tmp_path, tmp_path / "no-model", chat_jsonl)
        with pytest.raises(ConfigError, match="model path does not exist"):
            run()
        assert not out.exists()


# ------------------------------------------------------------------------------ HF Trainer too
def test_prepared_model_trains_under_hf_trainer(tmp_path, chat_model_dir, tokenized):
    from transformers import Trainer, TrainingArguments

    from qolora.data.tokens import PaddingCollator

    tok, train_ds, _ = tokenized
    model = tiny_model(chat_model_dir)
    adapters = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4,
                             optim="paged_adamw_8bit", learning_rate=1e-3, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=PaddingCollator(tok.pad_token_id))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    after = adapter_state_dict(model)
    assert all(not torch.equal(adapters[k], after[k]) for k in adapters)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)


# ---------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_default_job_few_steps(tmp_path):
    """The built-in job (SmolLM2-135M-Instruct, 4-bit, OLoRA, chatterbot) runs a few steps end to end."""
    from qolora.data.assets import AssetError, default_dataset_path, default_model_dir

    try:
        default_model_dir(), default_dataset_path()
    except AssetError as exc:
        pytest.skip(str(exc))
    result = finetune(output_dir=tmp_path / "default", max_steps=3, eval_every=0, save_every=0, max_eval_examples=16,
                      n_samples=1, max_new_tokens=8, max_length=128, progress=False)
    assert result.steps == 3 and all(math.isfinite(h["loss"]) for h in result.history)
    assert result.initial_eval_loss is not None and math.isfinite(result.final_eval_loss)
    assert result.samples[0]["before"] and result.samples[0]["after"] is not None
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ CUDA
def _plain_examples(tok, n: int) -> list[dict]:
    """Tokenized chat examples as a plain list (no ``datasets`` needed), every token labelled."""
    rows = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        ids = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                      tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        rows.append({"input_ids": ids, "labels": ids})
    return rows


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["auto", "fp16", "no"])
def test_cuda_mixed_precision_paged_optimizer_and_resume(tmp_path, chat_model_dir, precision):
    """bf16 autocast ('auto' on a bf16 GPU) / fp16 with a grad scaler / fp32 on CUDA: the loss falls,
    the optimizer is the paged one, checkpoints hold the CUDA RNG (and scaler) state, and a resumed
    run continues (on CUDA not necessarily bitwise: atomics in some backward kernels)."""
    tok = make_tiny_tokenizer()
    examples = _plain_examples(tok, 48)
    out = tmp_path / precision
    cfg = quick(out, max_steps=12, save_every=6, keep_last=None, eval_every=6, mixed_precision=precision)
    model = tiny_model(chat_model_dir, device="cuda")
    first = train(model, tok, examples, examples[:8], cfg)
    assert all(math.isfinite(h["loss"]) for h in first.history)
    assert first.final_eval_loss < first.initial_eval_loss
    assert events(out, "train")[-1]["memory_bytes"] > 0
    trainer_state = torch.load(out / "checkpoints" / "step-000006" / "trainer.pt", weights_only=True)
    assert "cuda" in trainer_state["rng"]
    assert ("scaler" in trainer_state) == (precision == "fp16")
    start = events(out, "start")[0]
    assert start["mixed_precision"] == {"auto": "bf16" if torch.cuda.is_bf16_supported() else "fp16"}.get(
        precision, precision)

    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000012")
    again = train(tiny_model(chat_model_dir, device="cuda"), tok, examples, examples[:8], cfg, resume=True)
    assert again.resumed_from.name == "step-000006"
    assert [h["loss"] for h in again.history[:6]] == [h["loss"] for h in first.history[:6]]
    for a, b in zip(again.history[6:], first.history[6:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)


@pytest.mark.gpu
def test_cuda_paged_optimizer_class(chat_model_dir):
    from qolora.training.loop import make_optimizer

    model = tiny_model(chat_model_dir, device="cuda")
    params = [p for _, p in adapter_parameters(model)]
    assert type(make_optimizer("paged_adamw_8bit", params, 1e-3, 0.0)).__name__ == "PagedAdamW8bit"
    assert type(make_optimizer("paged_adamw_32bit", params, 1e-3, 0.0)).__name__ == "PagedAdamW32bit"
