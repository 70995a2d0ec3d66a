"""The defaults study (benchmarks/defaults_study.py) on tiny random models, so it cannot rot.

Checked for shape, not numbers: the schedule's order, the LM corpus, the paired statistics, PEFT's LoftQ on
the CPU and its factors carried into a qolora model, the Q4_1 grid test, a run appended with its task and
never rerun, the plan, the report; the whole study and the step-0 mode end to end (slow).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import defaults_study as ds  # noqa: E402
from tiny_chat import make_chat_model_dir, write_chat_jsonl  # noqa: E402

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Hello, how are you today?", "I am fine, thank you."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("How many legs does a spider have?", "A spider has eight legs."),
]
CORPUS = [(f"topic{i}", " ".join(f"The statement number {i * 7 + j} is executed when the loop ends."
                                 for j in range(12))) for i in range(12)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_assets")
    model = make_chat_model_dir(root / "model", hidden=64, layers=1)
    data = write_chat_jsonl(root / "chat.jsonl", 40, qa=QA, distinct=True)
    return model, data


def smallest(model: Path, data: Path, out: Path, *extra: str, rates=("1e-3,1e-2",)) -> list[str]:
    args = ["--model", str(model), "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "4",
            "--max-length", "32", "--max-examples", "40", "--eval-examples", "6", "--eval-every", "2", "--rank", "4",
            "--alpha", "4", "--threads", "1", "--max-extend", "1", "--optim", "adamw"]
    for name in ds.CONTENDERS:
        args += [f"--rates-{name.replace('_', '-')}", rates[0]]
    return args + list(extra)


# ------------------------------------------------------------------------------------ pure pieces
def test_phases_run_the_lora_and_olora_grids_first_then_the_others_then_the_seeds():
    order = ds.phases(["chat", "pydoc"], ["lora", "olora", "pissa", "lora16"])
    assert order[:4] == [("grid", "chat", "lora"), ("grid", "chat", "olora"), ("grid", "pydoc", "lora"),
                         ("grid", "pydoc", "olora")]
    assert [p for p, *_ in order] == ["grid"] * 8 + ["seeds"] * 8
    assert order[8:10] == [("seeds", "chat", "lora"), ("seeds", "pydoc", "lora")]
    assert {(t, c) for _, t, c in order[4:8]} == {(t, c) for t in ("chat", "pydoc") for c in ("pissa", "lora16")}


def test_paired_stats_say_when_a_difference_is_inside_the_noise():
    clear = ds.paired_stats([-0.05, -0.06, -0.055])
    assert clear["n"] == 3 and clear["mean"] == pytest.approx(-0.055) and not clear["inside_noise"]
    assert clear["ci95"][1] < 0 and clear["same_sign"]
    noisy = ds.paired_stats([-0.05, 0.04, -0.01])
    assert noisy["inside_noise"] and not noisy["same_sign"]
    one = ds.paired_stats([0.1])
    assert one["n"] == 1 and one["ci95"] is None and one["inside_noise"]
    assert ds.paired_stats([])["n"] == 0
    assert ds.horizons_of(100) == [20, 40, 60, 100] and ds.horizons_of(4) == [4]


def test_the_pydoc_corpus_is_fixed_and_cut_into_full_blocks(assets):
    from qolora.data.tokens import load_tokenizer

    items, info = ds.pydoc_corpus()
    again, info2 = ds.pydoc_corpus()
    assert items == again and info["sha"] == info2["sha"] and info["topics"] == len(items) > 50
    assert "Python" in info["source"] and info["chars"] > 100_000
    tok = load_tokenizer(assets[0])
    blocks = ds.lm_blocks(tok, CORPUS, 24)
    assert len(blocks) > 10 and all(len(b) == 24 for b in blocks)
    flat = [t for b in blocks for t in b]
    assert tok.eos_token_id in flat  # topics end with EOS
    assert ds.lm_blocks(tok, CORPUS, 24, limit=5) == blocks[:5]


def test_repeated_conversations_are_dropped_before_the_split():
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("Hi", "Hello."), ("hi ", "hello."), ("Who?", "Me."), ("Hi", "Hello.")]]
    keep, n = ds.distinct_conversations(rows)
    assert keep == [0, 2] and n == 4


def test_q41_grid_fit_tells_grid_weights_from_continuous_ones():
    gen = torch.Generator().manual_seed(0)
    lo = torch.randn(8, 4, 1, generator=gen)
    d = torch.rand(8, 4, 1, generator=gen) + 0.1
    q = torch.randint(0, 16, (8, 4, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 always uses both ends
    on_grid = (lo + d * q).reshape(8, 128)
    assert ds.q41_grid_fit(on_grid) < 1e-4
    assert 0.2 < ds.q41_grid_fit(torch.randn(64, 128, generator=gen)) < 0.3


def test_peft_still_hard_codes_the_loftq_device_line_we_replace():
    import inspect

    from peft.utils import loftq_utils

    assert ds._LOFTQ_NEEDLE in inspect.getsource(loftq_utils._loftq_init_new)
    before = loftq_utils._loftq_init_new
    with ds.peft_loftq_on_cpu():
        assert torch.cuda.is_available() or loftq_utils._loftq_init_new is not before
    assert loftq_utils._loftq_init_new is before


def test_peft_loftq_runs_on_the_cpu_and_its_factors_carry_into_a_qolora_model(assets):
    import qolora

    model_dir = assets[0]
    pm = ds.peft_loftq_model(model_dir, rank=4, alpha=4)
    layers = ds.peft_lora_layers(pm)
    assert len(layers) == 7 and all(float(m.lora_B["default"].weight.abs().sum()) > 0 for m in layers.values())
    factors, info = ds.loftq_factors(str(model_dir), rank=4, alpha=4, dtype="fp32", quant_type="nf4", device="cpu")
    net = qolora.prepare(model_dir, bits=4, rank=4, alpha=4, init="lora", dtype="fp32", device="cpu", progress=False)
    check = ds.apply_loftq_factors(net, factors, info["_bases"])
    assert check["layers"] == 7 and check["base_max_abs_diff"] == 0.0 and check["scale_max_abs_diff"] == 0.0
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = pm(input_ids=ids).logits
        ours = net(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())


# ------------------------------------------------------------------------------------ end to end
def test_a_run_is_appended_with_its_task_never_rerun_and_planned(assets, tmp_path, monkeypatch):
    model, data = assets
    out = tmp_path / "res" / "study"
    args = smallest(model, data, out, "--tasks", "chat", "--contenders", "lora", "--seeds", "1", "--steps", "2",
                    "--max-extend", "0")
    monkeypatch.setattr(ds, "write_plot", lambda *a, **k: None)  # matplotlib: covered by the slow test
    res = ds.main(args)
    lines = [json.loads(x) for x in res["runs"].read_text().splitlines()]
    assert [(r["task"], r["init"], r["lr"], r["seed"]) for r in lines] == [("chat", "lora", 1e-3, 0),
                                                                          ("chat", "lora", 1e-2, 0)]
    assert all(r["status"] == "ok" and [e["step"] for e in r["evals"]] == [0, 2] for r in lines)
    md = res["md"].read_text()
    assert "## Task `chat`" in md and "| lora |" in md
    plan = ds.main(args + ["--plan"])
    assert plan["plan"]["known"] == [] and plan["plan"]["done"] == {"chat": 2}
    assert "0 known" in plan["text"]
    monkeypatch.setattr(ds.StudyBench, "model", lambda *a, **k: pytest.fail("a finished run was run again"))
    again = ds.main(args)
    assert len(again["runs"].read_text().splitlines()) == 2
    # another seed count: the plan lists the seeds' runs at the best rate and its neighbour, with a cost
    plan3 = ds.main(args[:-6] + ["--seeds", "2", "--steps", "2", "--max-extend", "0", "--plan"])
    assert {(t, c, s) for t, c, _, s in plan3["plan"]["known"]} == {("chat", "lora", 1)}
    assert math.isfinite(plan3["plan"]["known_seconds"])
    # a second worker's file: its runs come into the committed one once, its torn last line never
    theirs = tmp_path / "worker" / "study_runs.jsonl"
    theirs.parent.mkdir()
    theirs.write_text(res["runs"].read_text() + '{"key": "torn')
    committed = tmp_path / "committed" / "study"
    merge = smallest(model, data, committed, "--tasks", "chat", "--contenders", "lora", "--seeds", "1",
                     "--steps", "2", "--max-extend", "0", "--report-only", "--merge-runs", str(theirs))
    merged = ds.main(merge)["runs"]
    assert [json.loads(x) for x in merged.read_text().splitlines()] == lines
    ds.main(merge)
    assert len(merged.read_text().splitlines()) == 2


@pytest.mark.slow
def test_the_smallest_study_runs_every_contender_on_both_tasks_and_resumes(assets, tmp_path, monkeypatch):
    model, data = assets
    out = tmp_path / "res" / "study"
    args = smallest(model, data, out, "--contenders", "lora,olora,loftq,lora16", "--seeds", "2")
    monkeypatch.setattr(ds, "pydoc_corpus", lambda: (CORPUS, {"source": "test corpus", "sha": "x", "chars": 1}))
    res = ds.main(args)
    report = json.loads(res["json"].read_text())
    runs = report["runs"]
    assert {r["task"] for r in runs} == {"chat", "pydoc"}
    order = [(r["task"], r["init"], r["seed"]) for r in (json.loads(x) for x in res["runs"].read_text().splitlines())]
    first_other = next(i for i, (_, c, _) in enumerate(order) if c not in ("lora", "olora"))
    assert all(c in ("lora", "olora") and s == 0 for _, c, s in order[:first_other])
    assert {t for t, _, _ in order[:first_other]} == {"chat", "pydoc"}
    for task in ("chat", "pydoc"):
        sm = report["tasks"][task]["summary"]
        for name in ("lora", "olora", "loftq", "lora16"):
            e = sm["contenders"][name]
            assert e["best_lr"] in sm["grids"][name] and e["n_ok"] == 2
            assert [h["step"] for h in e["at_horizons"]] == [0, 4]
        assert {(p["a"], p["b"]) for p in sm["pairs"]} >= {("olora", "lora"), ("loftq", "lora"), ("lora16", "lora")}
        assert all(p["by_horizon"]["4"]["n"] == 2 for p in sm["pairs"])
    bits = {(r["init"], r["bits"]) for r in runs}
    assert ("lora16", 16) in bits and ("loftq", 4) in bits
    loftq = [r for r in runs if r["init"] == "loftq"]
    assert all(r["loftq_check"]["base_max_abs_diff"] == 0.0 for r in loftq)
    assert set(report["regret"]) == {"lora", "olora", "loftq", "lora16"}
    assert res["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = res["md"].read_text()
    assert "Paired differences by seed" in md and "least mean regret" in md and "## Task `pydoc`" in md
    n = len(res["runs"].read_text().splitlines())
    monkeypatch.setattr(ds.StudyBench, "model", lambda *a, **k: pytest.fail("a finished run was run again"))
    again = ds.main(args)
    assert len(again["runs"].read_text().splitlines()) == n
    only = ds.main(args + ["--report-only"])
    assert json.loads(only["json"].read_text())["tasks"]["chat"]["summary"]["n_runs"] == \
        report["tasks"]["chat"]["summary"]["n_runs"]


@pytest.mark.slow
def test_step0_mode_measures_every_init_on_the_model_and_its_degridded_copy(assets, tmp_path, monkeypatch):
    model, data = assets
    monkeypatch.setattr(ds, "pydoc_corpus", lambda: (CORPUS, {"source": "test corpus", "sha": "x", "chars": 1}))
    out = tmp_path / "s0" / "study"
    res = ds.main(["--model", str(model), "--data", str(data), "--out", str(out), "--step0", "--step0-examples", "8",
                   "--max-length", "32", "--rank", "4", "--alpha", "4", "--step0-cache", str(tmp_path / "cache"),
                   "--step0-tasks", "chat,pydoc"])
    payload = json.loads(res["json"].read_text())
    real, degr, syn = (payload["variants"][k] for k in ("real", "degridded", "synthetic"))
    labels = [c[0] for c in ds.STEP0_CONTENDERS]
    assert list(real["contenders"]) == labels
    for task in ("chat", "pydoc"):
        r = real["tasks"][task]["results"]
        assert set(r) == {"fp32", *labels} and r["fp32"]["kl_to_fp32"] == pytest.approx(0.0, abs=1e-5)
        assert r["plain NF4"]["kl_vs_plain"] == pytest.approx(1.0) and r["olora"]["kl_to_fp32"] > 0
    assert real["contenders"]["plain NF4"]["error_vs_plain"] == pytest.approx(1.0)
    assert set(degr["tasks"]) == {"chat"} and degr["degridded"]["weights"] == 7
    assert degr["q41_grid_fit"] > 0.15  # off the grid
    assert "loftq (PEFT)" not in syn["contenders"] and "tasks" not in syn
    assert "## Step 0" in res["md"].read_text() or "Step 0" in res["md"].read_text()


@pytest.mark.slow
def test_the_committed_report_rebuilds_from_the_committed_runs_with_the_same_data(tmp_path, monkeypatch):
    """A resumed study must hold out exactly what its committed runs held out: rebuilding the report from the
    committed runs file (the real model's tokenizer, the real data) gives the committed report's data lines."""
    committed = REPO / "benchmarks" / "results"
    runs = committed / "defaults_study_runs.jsonl"
    prefix = tmp_path / "defaults_study"
    shutil.copy(runs, prefix.with_name(prefix.name + "_runs.jsonl"))
    monkeypatch.setattr(ds, "write_plot", lambda *a, **k: None)
    res = ds.main(["--report-only", "--out", str(prefix)])
    data_lines = lambda text: [x.split(". Runs:")[0] for x in text.splitlines() if x.startswith("Model ")]  # noqa: E731
    rebuilt = data_lines(res["md"].read_text())
    assert len(rebuilt) == 2 and rebuilt == data_lines((committed / "defaults_study.md").read_text())
    assert all(b.done for b in res["benches"].values())  # the committed runs are recognised as this study's
