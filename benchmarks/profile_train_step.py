"""Where a training step's time goes: qolora vs transformers + PEFT, torch.profiler side by side.

A diagnostic companion to ``benchmarks/train_step.py``: each contender loads the same model exactly
as there (one fresh process each; qolora with its defaults: the fused adapter step and the chunked
loss, every layer checkpointed), runs ``--warmup`` steps, then ``--steps`` steps under
``torch.profiler`` with shapes recorded (``ops_by_shape`` in the JSON splits the matmuls); the
parent prints the operators by self CPU time (per step) and their call counts for both, side by
side, and writes them as JSON. Equal call counts with unequal times point at noise; unequal call
counts point at a real difference in the work done.

    python -m benchmarks.profile_train_step                    # SmolLM2-135M-Instruct, batch 4 x 256
    python -m benchmarks.profile_train_step --seq 64 --top 30
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402


def worker(payload: dict, probe: common.MemoryProbe) -> dict:
    import bitsandbytes as bnb
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import train_step as ts

    device, contender = payload["device"], payload["contender"]
    load = ts._load_qolora if contender == "qolora" else ts._load_peft
    model = load(payload["model_dir"], device, payload["rank"], payload["alpha"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    parts = ts._qolora_train_parts(device) if contender == "qolora" else None
    if parts is not None:
        make_optimizer, autocast, _ = parts
        opt = make_optimizer("paged_adamw_8bit", params, 2e-4, 0.0)
    else:
        opt, autocast = bnb.optim.PagedAdamW8bit(params, lr=2e-4), ts._autocast(device)
    step = ts._step(model, params, opt, autocast, chunked=contender == "qolora")  # each side's own loss
    x = torch.randint(3, model.config.vocab_size, (payload["batch"], payload["seq"]),
                      generator=torch.Generator().manual_seed(1234)).to(device)
    for _ in range(payload["warmup"]):
        step(x)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with common.Timer(device) as t, profile(activities=acts, record_shapes=True) as prof:
        for _ in range(payload["steps"]):
            step(x)
    n = payload["steps"]
    ops = []
    for e in prof.key_averages():
        ops.append({"name": e.key, "count": e.count / n, "self_cpu_ms": e.self_cpu_time_total / 1e3 / n,
                    "cpu_total_ms": e.cpu_time_total / 1e3 / n,
                    "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3 / n})
    shaped = []
    for e in prof.key_averages(group_by_input_shape=True):
        shaped.append({"name": e.key, "shapes": str(e.input_shapes)[:200], "count": e.count / n,
                       "self_cpu_ms": e.self_cpu_time_total / 1e3 / n,
                       "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3 / n})
    shaped.sort(key=lambda o: -(o["self_device_ms"] or o["self_cpu_ms"]))
    return {"contender": contender, "step_s": t.seconds / n, "ops": ops, "ops_by_shape": shaped[:60]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="smollm2", choices=["smollm2", *sorted(common.SIZES)])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="torch threads, the same for both (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write both profiles as JSON here")
    args = p.parse_args(argv)
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    model_dir = (common.real_model_dir() if args.size == "smollm2"
                 else common.synthetic_checkpoint(args.size, args.layers))
    res = {}
    for c in ("qolora", "peft"):
        payload = {"contender": c, "model_dir": str(model_dir), "device": args.device, "rank": 16, "alpha": 16.0,
                   "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
                   "threads": args.threads}
        res[c] = common.run_worker("benchmarks.profile_train_step", payload, timeout=3600)
        if "error" in res[c]:
            print(f"{c}: FAILED {res[c]['error']}\n{res[c].get('stderr_tail', '')}")
            return 1
    key = "self_device_ms" if args.device == "cuda" else "self_cpu_ms"
    by = {c: {o["name"]: o for o in r["ops"]} for c, r in res.items()}
    names = sorted(set(by["qolora"]) | set(by["peft"]),
                   key=lambda k: -max(by["qolora"].get(k, {}).get(key, 0), by["peft"].get(k, {}).get(key, 0)))
    print(f"{model_dir}, batch {args.batch} x {args.seq}: step {res['qolora']['step_s']:.2f} s (qolora) vs "
          f"{res['peft']['step_s']:.2f} s (PEFT); per step, by {key}")
    print(f"{'op':60s} {'qolora ms':>10s} {'calls':>7s} {'peft ms':>10s} {'calls':>7s}")
    for k in names[: args.top]:
        q, f = by["qolora"].get(k, {}), by["peft"].get(k, {})
        print(f"{k[:60]:60s} {q.get(key, 0):10.1f} {q.get('count', 0):7.0f} "
              f"{f.get(key, 0):10.1f} {f.get('count', 0):7.0f}")
    diff = [k for k in names
            if round(by["qolora"].get(k, {}).get("count", 0)) != round(by["peft"].get(k, {}).get("count", 0))]
    print("\nops whose call counts differ (qolora vs PEFT):")
    for k in diff[: args.top]:
        q, f = by["qolora"].get(k, {}), by["peft"].get(k, {})
        print(f"  {k[:60]:60s} {q.get('count', 0):7.0f} {f.get('count', 0):7.0f}   "
              f"({q.get(key, 0):.1f} vs {f.get(key, 0):.1f} ms)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model_dir": str(model_dir),
                                        "config": {k: str(v) for k, v in vars(args).items()},
                                        "results": res, "machine": common.machine_info(args.device)}, indent=1))
    return 0


if __name__ == "__main__":
    if not common.worker_main(worker):
        sys.exit(main())
