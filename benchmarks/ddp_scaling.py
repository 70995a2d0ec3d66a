"""Issue 12: data-parallel scaling, tokens/s of 1 process vs N processes at the same global batch.

Runs the real command, ``qolora finetune`` on the built-in job (SmolLM2-135M-Instruct in 4-bit, the
chatterbot conversations), once as one process with ``--batch-size N*b`` and once under
``python -m torch.distributed.run --nproc_per_node N`` with ``--batch-size b`` (gloo on the CPU, NCCL
on GPUs): the same examples per step, so the same work. Throughput is read from each run's
``metrics.jsonl`` (``train`` events log every step; the first ``--warmup`` steps are left out): global
non-padding tokens per second of wall time. Scaling efficiency = (N-process tok/s) / (N x 1-process tok/s).
Both runs also end with the same adapter (checked and reported: max relative difference). On the
CPU a third run gives the one process as many threads as the N processes have together (the same
cores), the fair baseline there.

On a CPU the N processes share the machine's cores (each gets ``--threads``), so this measures the
overhead of the all-reduce and of N model copies more than any speed-up; on a machine with idle cores
per process (or one GPU per process) it measures scaling. The load average is recorded.

    python -m benchmarks.ddp_scaling                           # CPU, 2 processes, global batch 4
    python -m benchmarks.ddp_scaling --device cuda --nproc 2 --batch 8 --threads 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import bar_panels, machine_info, write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _run(nproc: int, batch: int, out: Path, args, threads: int | None = None) -> dict:
    cli = ["finetune", "--output-dir", str(out), "--batch-size", str(batch), "--max-steps", str(args.steps),
           "--max-length", str(args.max_length), "--eval-every", "0", "--save-every", "0", "--log-every", "1",
           "--n-samples", "0", "--max-eval-examples", "8", "--optim", "adamw", "--lr", "1e-4", "--device",
           args.device, "--no-progress", "--no-group-by-length"]
    threads = args.threads if threads is None else threads
    if threads:
        cli += ["--threads", str(threads)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "qolora.cli", *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "qolora.cli", *cli]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()
    tick = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train" and e["step"] > args.warmup]
    tokens = sum(e["tokens"] for e in train)
    seconds = sum(e["tokens"] / e["tokens_per_s"] for e in train if e["tokens_per_s"])
    return {"nproc": nproc, "threads_per_process": threads, "batch_per_process": batch, "global_batch": nproc * batch,
            "steps": args.steps,
            "timed_steps": len(train), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "losses": [e["loss"] for e in events if e["event"] == "train"], "wall_s": wall,
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()}


def _adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "adapter" / "adapter_model.safetensors")), load_file(str(b / "adapter" /
                                                                                       "adapter_model.safetensors"))
    return max(float((wa[k].float() - wb[k].float()).norm() / wa[k].float().norm()) for k in wa)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="global batch (split over the processes)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's choice)")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.batch % args.nproc:
        p.error(f"--batch {args.batch} must be a multiple of --nproc {args.nproc}")
    work = Path(tempfile.mkdtemp(prefix="qolora-ddp-bench-"))
    try:
        one = _run(1, args.batch, work / "one", args)
        many = _run(args.nproc, args.batch // args.nproc, work / "many", args)
        # the same cores for one process: N x the threads (on a GPU box this equals `one`)
        one_all = (_run(1, args.batch, work / "one_all", args, threads=args.nproc * args.threads)
                   if args.device == "cpu" and args.threads else None)
        diff = _adapter_diff(work / "one", work / "many")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    efficiency = many["tokens_per_s"] / (args.nproc * one["tokens_per_s"])
    tag = args.tag or args.device
    payload = {"benchmark": "ddp_scaling", "settings": vars(args), "runs": [one, many] + ([one_all] if one_all else []),
               "speedup": many["tokens_per_s"] / one["tokens_per_s"], "scaling_efficiency": efficiency,
               "speedup_vs_one_process_same_cores": many["tokens_per_s"] / one_all["tokens_per_s"] if one_all else None,
               "adapter_max_rel_diff": diff, "cpu_count": os.cpu_count(),
               "note": "N processes share the same cores on a CPU box; see the module docstring"}
    path = write_json(RESULTS / f"ddp_scaling_{tag}.json", payload, device=args.device)
    bar_panels(RESULTS / f"ddp_scaling_{tag}.png", [
        {"title": "tokens/s (global)",
         "labels": [f"1 proc x {args.threads or 'all'} thr", f"{args.nproc} proc x {args.threads or 'all'} thr"]
         + ([f"1 proc x {args.nproc * args.threads} thr"] if one_all else []),
         "values": [one["tokens_per_s"], many["tokens_per_s"]] + ([one_all["tokens_per_s"]] if one_all else []),
         "ylabel": "tokens/s"},
    ], title=f"data-parallel scaling, global batch {args.batch}, {machine_info(args.device).get('cpu', '')}")
    print(f"1 process x batch {args.batch}: {one['tokens_per_s']:.0f} tok/s; {args.nproc} processes x batch "
          f"{args.batch // args.nproc}: {many['tokens_per_s']:.0f} tok/s; speed-up {payload['speedup']:.2f}, "
          f"efficiency {efficiency:.2f}; adapters differ by {diff:.1e} (relative); load {one['load_avg_before']}")
    if one_all:
        print(f"1 process x {args.nproc * args.threads} threads (the same cores): {one_all['tokens_per_s']:.0f} tok/s")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
