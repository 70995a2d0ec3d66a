"""Data-parallel training under ``torchrun --nproc_per_node 2`` on the CPU (gloo), against one process.

Two processes of batch b must consume exactly the examples of one process of batch 2b (one seeded
order, grouped by length over the global batch, each global micro-batch split between the ranks; the
loss normalised by the global label count; the adapter gradients summed): same per-step losses and
token counts, same adapter up to float summation order, and one set of output files written by rank 0.
Each torchrun process imports torch + transformers (5-8 s on a busy 2-core box), so there are few runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from qolora import finetune
from qolora.training import distributed as dist
from qolora.training.checkpoints import CheckpointError, list_checkpoints
from qolora.training.data_order import DataOrder
from tiny_chat import events
from torchrun import OPTIONS, SAME_ADAPTER_RTOL, adapter_weights, cli_args, finish, max_rel_diff, torchrun

REPO = Path(__file__).resolve().parents[2]

def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return sorted(found)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, chat_model_dir, chat_jsonl):
    """2 processes x batch 2 (torchrun, gloo), and the reference: 1 process x batch 4, in this process."""
    root = tmp_path_factory.mktemp("ddp")
    proc = torchrun(cli_args(chat_model_dir, chat_jsonl, root / "two", 2))
    one = finetune(chat_model_dir, chat_jsonl, output_dir=root / "one", batch_size=4, progress=False,
                   adapter_options={"device": "cpu", "dropout": 0.0}, **OPTIONS)
    log = finish(proc)
    assert proc.returncode == 0, log[-5000:]
    return root / "one", root / "two", one, log


# ------------------------------------------------------------------------------------ fast
def test_two_processes_equal_one_process_of_twice_the_batch(two_process_run):
    one, two, result, log = two_process_run
    # the same examples, step by step: global token counts and losses per step
    steps_one = [(e["step"], e["tokens"]) for e in events(one, "train")]
    steps_two = [(e["step"], e["tokens"]) for e in events(two, "train")]
    assert steps_two == steps_one and len(steps_one) == OPTIONS["max_steps"]
    for a, b in zip(events(one, "train"), events(two, "train")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                   rel=1e-4)
    e1, e2 = events(one, "eval"), events(two, "eval")
    assert [e["step"] for e in e2] == [e["step"] for e in e1] == [0, 2, 4, 6]
    assert [e["eval_loss"] for e in e2] == pytest.approx([e["eval_loss"] for e in e1], rel=1e-5)
    state = json.loads((two / "checkpoints" / "step-000006" / "state.json").read_text())
    assert [h["label_tokens"] for h in state["history"]] == [h["label_tokens"] for h in result.history]
    assert state["world_size"] == 2
    # the same adapter
    assert max_rel_diff(adapter_weights(one), adapter_weights(two)) <= SAME_ADAPTER_RTOL
    # one set of files, written once (rank 0): every event once, the same sequence as one process
    kinds = lambda out: [e["event"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]  # noqa
    assert kinds(two) == kinds(one)
    assert kinds(two).count("start") == 1 and kinds(two).count("end") == 1
    assert events(two, "start")[0]["world_size"] == 2
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sum(line.startswith("done: 6 steps") for line in log.splitlines()) == 1  # the report: rank 0 only


def test_resume_with_another_world_size_is_refused(two_process_run, chat_model_dir, chat_jsonl, tmp_path):
    _, two, _, _ = two_process_run
    out = tmp_path / "copy"
    shutil.copytree(two, out)
    with pytest.raises(CheckpointError,
                       match=r"saved by a run of 2 process\(es\) and this run has 1.*--nproc_per_node 2"):
        finetune(chat_model_dir, chat_jsonl, output_dir=out, resume=True, batch_size=2, progress=False,
                 adapter_options={"device": "cpu", "dropout": 0.0}, **OPTIONS)


def test_error_on_rank_zero_stops_every_rank(two_process_run, chat_model_dir, chat_jsonl):
    """An output folder holding an earlier run is refused on rank 0; the other rank stops with the same
    error instead of waiting for rank 0 in a collective."""
    _, two, _, _ = two_process_run
    before = (two / "metrics.jsonl").read_text()
    proc = torchrun(cli_args(chat_model_dir, chat_jsonl, two, 2), nproc=2)
    log = finish(proc, timeout=120)
    assert proc.returncode != 0
    assert log.count("already holds a training run") >= 2, log[-3000:]  # both ranks report it
    assert (two / "metrics.jsonl").read_text() == before


def test_group_by_length_order_is_the_global_batch_order():
    """N ranks slicing each global micro-batch of N*b see exactly the batches of one process of N*b."""
    lengths = [(7 * i) % 23 + 1 for i in range(50)]
    n, b, accum = 2, 3, 2
    one = DataOrder(50, 5, lengths=lengths, batch=n * b * accum)
    ranks = [DataOrder(50, 5, lengths=lengths, batch=n * b * accum) for _ in range(n)]
    for _ in range(10):  # across epoch boundaries
        glob = one.take(n * b * accum)
        per_rank = [r.take(n * b * accum) for r in ranks]
        assert all(p == glob for p in per_rank)
        shards = [[i for m in range(accum) for i in p[m * n * b:(m + 1) * n * b][k * b:(k + 1) * b]]
                  for k, p in enumerate(per_rank)]
        assert sorted(sum(shards, [])) == sorted(glob)


def test_world_from_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist.world() == dist.World() and not dist.world().distributed
    assert dist.all_reduce_sum([1.5, 2]) == [1.5, 2]  # a world of one: unchanged, no process group
    assert dist.on_main(lambda: 7) == 7
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    w = dist.world()
    assert (w.rank, w.size, w.local_rank, w.is_main, w.distributed) == (3, 4, 1, False, True)
    assert dist.local_device("cuda") == torch.device("cuda", 1)
    assert dist.local_device("cuda:0") == torch.device("cuda", 0) and dist.local_device("cpu").type == "cpu"
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(RuntimeError, match="RANK='x' is not an integer"):
        dist.world()


# ------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_kill_then_resume_under_two_processes(tmp_path, chat_model_dir, chat_jsonl):
    """SIGKILL one rank after the first checkpoint (torchrun then stops the other), resume under 2
    processes: the same adapter and logged losses as an uninterrupted 2-process run (adapter dropout
    on: per-rank RNG states are saved and restored)."""
    ref, cut = tmp_path / "reference", tmp_path / "killed"
    extra = {"dropout": 0.1, "max_steps": 10}
    reference = torchrun(cli_args(chat_model_dir, chat_jsonl, ref, 2, **extra))
    killed = torchrun(cli_args(chat_model_dir, chat_jsonl, cut, 2, **extra))
    deadline = time.time() + 240
    while not list_checkpoints(cut / "checkpoints") and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = _children(killed.pid)  # torchrun starts each rank in a session of its own
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies; torchrun then stops the other and fails
    log = finish(killed, timeout=120)
    assert killed.returncode != 0, log[-3000:]
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    saved = [s for s, _ in list_checkpoints(cut / "checkpoints")]
    assert saved and max(saved) < 10 and not events(cut, "end"), "killed midway"
    resumed = torchrun([*cli_args(chat_model_dir, chat_jsonl, cut, 2, **extra), "--resume"])
    for proc in (reference, resumed):
        log = finish(proc)
        assert proc.returncode == 0, log[-5000:]
    assert [e["step"] for e in events(cut, "resume")] == [max(saved)]
    strip = lambda evs: [(e["step"], e["loss"], e["lr"], e["grad_norm"], e["tokens"]) for e in evs]  # noqa: E731
    assert strip(events(cut, "train")) == strip(events(ref, "train"))
    assert [e["eval_loss"] for e in events(cut, "eval")] == [e["eval_loss"] for e in events(ref, "eval")]
    w_ref, w_cut = adapter_weights(ref), adapter_weights(cut)
    assert all(torch.equal(w_cut[k], w_ref[k]) for k in w_ref)


def test_an_explicit_gpu_index_under_a_launch_is_refused(monkeypatch):
    """--device cuda:0 under torchrun would put every rank on GPU 0: refused before any work."""
    from qolora.config import AdapterConfig
    from qolora.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"device='cuda:0' under a launch of 2 processes puts every rank on one GPU"):
        AdapterConfig(device="cuda:0").validate()
