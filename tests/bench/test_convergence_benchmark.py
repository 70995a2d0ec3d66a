"""The convergence benchmark (benchmarks/convergence.py) in its smallest configuration, so it cannot rot.

A tiny random Llama with the tiny ChatML tokenizer saved next to it and a tiny chat JSONL stand in for
SmolLM2 and the chatterbot data; the sweep, the grid extension, the resume, a diverged run and the
three outputs (JSON, PNG, markdown table) are checked for shape, not for numbers.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # plain `pytest` puts only tests/ on the path; the benchmark lives beside it
    sys.path.insert(0, str(REPO))

from benchmarks import convergence as conv  # noqa: E402
from tiny_chat import make_chat_model_dir, write_chat_jsonl  # noqa: E402

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Hello, how are you today?", "I am fine, thank you."),
    ("What is your name?", "My name is Tiny, and I am a test assistant."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("How many legs does a spider have?", "A spider has eight legs."),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv_assets")
    model = make_chat_model_dir(root / "model", hidden=32, layers=1)
    data = write_chat_jsonl(root / "chat.jsonl", 40, qa=QA)
    return model, data


def smallest(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--steps", "4", "--seeds", "2",
            "--batch-size", "4", "--max-length", "48", "--eval-examples", "6", "--eval-every", "2", "--rank", "4",
            "--alpha", "4", "--threads", "1", "--max-extend", "1", "--optim", "adamw",
            "--rates-lora", "1e-3,1e-2", "--rates-olora", "1e-4,1e-3", "--rates-pissa", "1e-4,1e-3", *extra]


# ------------------------------------------------------------------------------------ pure logic
def test_extension_adds_a_rate_beyond_the_edge_only():
    grid = [1e-5, 3e-5, 1e-4]
    assert conv.extension(grid, {1e-5: [1.0], 3e-5: [0.9], 1e-4: [1.1]}) is None  # interior
    assert conv.extension(grid, {1e-5: [0.8], 3e-5: [0.9], 1e-4: [1.1]}) == pytest.approx(3e-6)
    assert conv.extension(grid, {1e-5: [1.2], 3e-5: [0.9], 1e-4: [0.8]}) == pytest.approx(3e-4)
    # the top rate diverged for one seed: it is the worst, so a best rate below it is interior
    assert conv.extension(grid, {1e-5: [1.2, 1.2], 3e-5: [0.9, 0.9], 1e-4: [0.7, math.inf]}) is None
    # every rate diverged: go lower
    assert conv.extension(grid, {x: [math.inf] for x in grid}) == pytest.approx(3e-6)
    assert conv.extension(grid, {1e-5: [1.0]}) is None  # incomplete: decide nothing yet


def test_best_rate_uses_the_mean_over_seeds_and_treats_divergence_as_worst():
    assert conv.best_rate({1e-4: [1.0, 1.4], 3e-4: [1.1, 1.1], 1e-3: [0.5, math.inf]}) == 3e-4
    assert conv.best_rate({1e-4: [math.inf]}) is None
    evals = [{"step": 0, "eval_loss": 3.0}, {"step": 2, "eval_loss": 2.5}, {"step": 4, "eval_loss": 2.0}]
    assert conv.steps_to_threshold(evals, 2.5) == 2
    assert conv.steps_to_threshold(evals, 1.0) is None
    assert conv.parse_seeds("3") == (0, 1, 2) and conv.parse_seeds("4,7") == (4, 7)
    assert conv.parse_rates("1e-4, 3e-5") == (3e-5, 1e-4)


# ------------------------------------------------------------------------------------ end to end
def test_smallest_sweep_writes_json_png_table_and_resumes(assets, tmp_path, monkeypatch):
    model, data = assets
    out = tmp_path / "res" / "convergence"
    qtrain = importlib.import_module("qolora.training.loop")  # the module (qolora.train is also the function)

    real_train = qtrain.train

    def train_or_blow_up(net, tok, train_ds, eval_ds, config, **kw):
        """pissa at 1e-3 'diverges' at step 2: one real step, then the trainer's own NaN stop."""
        if net.qolora_config.init == "pissa" and config.lr == 1e-3:
            real_train(net, tok, train_ds, eval_ds, config.replace(max_steps=1), **kw)
            raise qtrain.TrainingError("the training loss is nan at step 2")
        return real_train(net, tok, train_ds, eval_ds, config, **kw)

    monkeypatch.setattr(qtrain, "train", train_or_blow_up)
    res = conv.main(smallest(model, data, out))
    report = json.loads(res["json"].read_text())

    # settings, machine, versions
    assert report["settings"]["steps"] == 4 and report["settings"]["bits"] == 4
    assert report["machine"]["versions"]["torch"] and report["seeds"] == [0, 1] and report["seed_plan"] == "neighbours"
    # every run: eval at 0, 2, 4 on the same held-out examples; per-step wall time
    runs = report["runs"]
    main_runs = [r for r in runs if not r.get("ceiling")]
    for r in main_runs:
        assert r["status"] in ("ok", "diverged")
        if r["status"] == "ok":
            assert [e["step"] for e in r["evals"]] == [0, 2, 4]
            assert len(r["step_seconds"]) == 4 and all(s > 0 for s in r["step_seconds"])
            assert len(r["train_loss"]) == 4
    # the adapter restore between rates: one step-0 loss per (init, seed)
    assert report["summary"]["restore_check_max_step0_spread"] < 1e-5
    # the diverged run is recorded, not crashed, and never picked
    bad = [r for r in main_runs if r["init"] == "pissa" and r["lr"] == 1e-3 and r["seed"] == 0]
    assert len(bad) == 1 and bad[0]["status"] == "diverged" and bad[0]["evals"][0]["step"] == 0
    assert report["summary"]["inits"]["pissa"]["best_lr"] != 1e-3
    # grids: each has its starting rates, and an extension only ever beyond an edge
    for init, start in {"lora": [1e-3, 1e-2], "olora": [1e-4, 1e-3], "pissa": [1e-4, 1e-3]}.items():
        grid = report["grids"][init]
        assert set(start) <= set(grid) and len(grid) <= 3
        for x in report["extended"][init]:
            assert x < min(start) or x > max(start)
        e = report["summary"]["inits"][init]
        assert e["best_lr"] in grid
        # seed plan "neighbours": seed 0 sweeps the grid, seed 1 runs at the best rate and its neighbours
        assert sorted(r["lr"] for r in main_runs if r["init"] == init and r["seed"] == 0) == grid
        seed1 = {r["lr"] for r in main_runs if r["init"] == init and r["seed"] == 1}
        i = grid.index(e["best_lr"])
        assert e["best_lr"] in seed1 and seed1 <= set(grid)
        for lr in grid[max(0, i - 1): i + 2]:
            assert lr in seed1 or conv.blown_up(next(r for r in main_runs if r["init"] == init and r["lr"] == lr))
        assert e["n_ok"] == 2 and len(e["final_per_seed"]) == 2
        assert e["best_is_interior"] == (grid[0] < e["best_lr"] < grid[-1])
    # the ceiling: LoRA, 16-bit, at LoRA's best rate
    ceiling = [r for r in runs if r.get("ceiling")]
    assert len(ceiling) == 1 and ceiling[0]["bits"] == 16
    assert ceiling[0]["lr"] == report["summary"]["inits"]["lora"]["best_lr"]
    assert report["summary"]["ceiling"]["final_mean"] > 0
    assert [t["name"] for t in report["summary"]["thresholds"]] == ["near", "halfway"]
    for init in ("lora", "olora", "pissa"):
        near = report["summary"]["inits"][init]["reach"]["near"]
        assert len(near["steps"]) == 2 and all(x in (None, 0, 2, 4) for x in near["steps"])
    assert report["summary"]["sweep_wall_seconds"] > 0

    # the PNG and the markdown table
    assert res["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["png"].stat().st_size > 5000
    md = res["md"].read_text()
    assert "| init | best lr |" in md and "ceiling" in md and "steps to 'near'" in md and "Threshold 'halfway'" in md
    for init in ("lora", "olora", "pissa"):
        assert f"| {init} | " in md
    assert "diverged" in md

    # resume: the same command again runs nothing (and never loads the model)
    n_lines = len(res["runs"].read_text().splitlines())
    monkeypatch.setattr(conv.Bench, "model", lambda *a, **k: pytest.fail("a finished run was run again"))
    again = conv.main(smallest(model, data, out))
    assert again["report"]["new_runs_this_invocation"] == 0
    assert len(again["runs"].read_text().splitlines()) == n_lines
    assert again["report"]["summary"]["inits"]["lora"]["best_lr"] == report["summary"]["inits"]["lora"]["best_lr"]
