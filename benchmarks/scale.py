"""Issue 10, item 5 and issue 23: Llama-3-8B, Llama-3-70B, Mixtral-8x7B and Qwen3-30B-A3B shapes at full
width, prepare + a training step, measured against ``qolora.planning.plan``'s prediction for exactly the same job.

Models come from :class:`qolora.base.synthetic.SyntheticCheckpoint` (the public architecture numbers in
``qolora/configs``), streamed straight into ``qolora.prepare`` with no disk: each weight is generated
on the compute device, quantized once, and freed. Setup as the planner's defaults: 4-bit NF4 with
double quantization, OLoRA rank 16 on every linear layer of the decoder, gradient checkpointing,
``paged_adamw_8bit``, batch 1, bf16 autocast on a GPU (none on the CPU).

Per shape, in a fresh process:

* **prepare**: wall and CPU time; peak memory (CUDA ``max_memory_allocated``; on the CPU the resident
  high-water mark above the start, :class:`benchmarks.common.MemoryProbe`).
* **step**: two optimizer steps (the second holds the optimizer states: the steady state the plan
  predicts), the second timed: tokens/s, and its peak above the post-prepare memory. On CUDA that is
  ``max_memory_allocated``; on the CPU a third step runs under :class:`benchmarks.memtrack.MemTracker`
  (every torch storage counted exactly, as CUDA's allocator counts them), and the resident-set peak
  of the timed step is reported beside it (it also holds what is not a torch tensor: the allocator's
  fragmentation and bitsandbytes' CPU temporaries). The optimizer states, made by the first step and alive
  through the measured one, are counted exactly and added (the plan's ``step_bytes`` holds them).
* **plan**: ``qolora.planning.plan`` for the same truncated config, sequence and device; the measured step peak
  over the plan's ``step_bytes`` (the plan's target: within 10%), and on CUDA the measured absolute
  peak over the plan's allocated total (weights + adapters + step; the CUDA context and allocator
  margin are not in ``max_memory_allocated``).

On the CPU a full-width 8B/70B layer at sequence 2048 is minutes per step on 2 cores, so the CPU
mode runs ``--layers`` full-width decoder layers (default: 2 of the 8B, 1 of the 70B, 1 of each MoE
shape: Mixtral's 8 experts of width 14336, 2 per token; Qwen3-30B-A3B's 128 experts of width 768, 8 per
token) at ``--seq`` (default 256); everything depends only on the shapes, so the figures scale with the
plan's formulas, which the comparison checks. ``--shapes`` picks a subset. Qwen3-30B-A3B also runs at
``--qwen3-long-seq`` (1024): at 256 its one-layer step peaks at the loss (its vocabulary's logit chunk),
at 1024 in the MoE layer. ``--device cuda`` runs the 8B shape in full at 2048 and at the longest
sequence the plan says fits 24 GiB, and the 70B shape on ``--layers-70b`` layers (default 8; the rest
by the plan's arithmetic, whose per-layer terms this checks), twice: as configured, and with the layer
checkpoints and the input embedding in host memory (``gradient_checkpointing="offload"``,
``offload_embedding=True``: the configuration the plan puts under 41 GiB for the whole 70B).

    python -m benchmarks.scale                     # CPU: a few full-width layers, ~30 min on 2 cores
    python -m benchmarks.scale --shapes mixtral-8x7b,qwen3-30b-a3b   # CPU: the MoE layers only
    python -m benchmarks.scale --device cuda       # one GPU: the whole measurement in a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.common import (
    RESULTS,
    MemoryProbe,
    Timer,
    bar_panels,
    git_info,
    release_freed_memory,
    run_worker,
    worker_main,
    write_json,
)

GiB = 2**30


# ------------------------------------------------------------------------------------------ worker
def _worker(payload: dict, probe: MemoryProbe) -> dict:
    import torch

    import qolora
    from qolora.adapters.layer import adapter_parameters
    from qolora.base.synthetic import SyntheticCheckpoint
    from qolora.planning.plan import plan
    from qolora.training.loop import loss_sum
    from qolora.training.optim import make_optimizer, resolve_precision

    device, seq, batch = payload["device"], payload["seq"], payload["batch"]
    source = SyntheticCheckpoint(payload["shape"], num_layers=payload["layers"], dtype=torch.bfloat16)
    config = source.hf_config()
    release_freed_memory()
    probe.start()
    with Timer(device) as prep:
        model = qolora.prepare(source, bits=4, rank=16, device=device, progress=False,
                               gradient_checkpointing=payload.get("checkpointing", True),
                               offload_embedding=payload.get("offload_embedding", False))
    probe.stop("prepare")
    from benchmarks.memtrack import model_bytes

    stored = model_bytes(model)  # exact: parameters, buffers, quantization statistics (weights + adapters)
    model.train()
    params = [p for _, p in adapter_parameters(model)]
    optimizer = make_optimizer("paged_adamw_8bit", params, 1e-4, 0.0)
    _, autocast, _ = resolve_precision("auto", torch.device(device))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator).to(device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step() -> float:
        with autocast():
            loss = loss_sum(model, data) / ids.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    first = step()  # creates the optimizer states
    release_freed_memory()  # else the step reuses heap pages prepare freed, hidden from the RSS peak
    probe.start()
    with Timer(device) as timed:
        second = step()
    probe.stop("step")
    tracked = None
    if not device.startswith("cuda"):  # exact tensor accounting, as CUDA's allocator counts (a third step)
        from benchmarks.memtrack import MemTracker

        with MemTracker() as tracker:
            step()
        tracked = tracker.peak
    # The optimizer states exist before the measured step (made in the first), so neither the tracker nor CUDA's
    # peak above the step's start sees them; the plan's step_bytes holds them: counted exactly here.
    from benchmarks.memtrack import storage_bytes

    states = storage_bytes([v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)])
    predicted = plan(config, bits=4, rank=16, seq_len=seq, batch_size=batch, optim="paged_adamw_8bit",
                     gradient_checkpointing=payload.get("checkpointing", True),
                     offload_embedding=payload.get("offload_embedding", False),
                     compute_dtype="bf16" if device.startswith("cuda") else "fp32",
                     device="cuda" if device.startswith("cuda") else "cpu")
    return {
        "shape": payload["shape"], "layers": payload["layers"], "seq": seq, "batch": batch, "device": device,
        "gradient_checkpointing": payload.get("checkpointing", True),
        "offload_embedding": payload.get("offload_embedding", False),
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "prepare_s": prep.seconds, "prepare_cpu_s": prep.cpu_seconds,
        "step_s": timed.seconds, "step_cpu_s": timed.cpu_seconds, "tokens_per_s": ids.numel() / timed.seconds,
        "losses": [first, second], "tracked_step_peak_bytes": tracked, "model_bytes": stored,
        "optimizer_state_bytes": states,
        "plan": predicted.to_dict(),
    }


# ------------------------------------------------------------------------------------------ parent
def _family(shape: str) -> str:
    return {"llama-3-8b": "Llama-3 8B", "llama-3-70b": "Llama-3 70B", "mixtral-8x7b": "Mixtral-8x7B",
            "qwen3-30b-a3b": "Qwen3-30B-A3B"}.get(shape, shape)


def _measured(result: dict) -> dict:
    """Headline figures of one worker result, with the plan's side by side (bytes)."""
    memory, p = result.get("memory", {}), result["plan"]
    cuda = result["device"].startswith("cuda")
    prep, step = memory.get("prepare", {}), memory.get("step", {})
    states = result.get("optimizer_state_bytes", 0)  # alive through the step, made before it (see the worker)
    if cuda:
        step_peak = (step["cuda_peak_alloc_mb"] - step["cuda_start_alloc_mb"]) * 2**20 + states
        prepare_peak = prep["cuda_peak_alloc_mb"] * 2**20
        absolute = step["cuda_peak_alloc_mb"] * 2**20
        allocated_plan = p["gpu_bytes"] - p["cuda_context_bytes"] - p["margin_bytes"]
    else:  # the torch tensors' exact peak (what the plan models); the RSS peak beside it
        step_peak = result["tracked_step_peak_bytes"] + states
        prepare_peak = prep["peak_rss_delta_mb"] * 2**20
        absolute, allocated_plan = None, None
    # On CUDA the allocator sees the GPU part only: offloaded checkpoints live in pinned host memory.
    plan_step = p["step_bytes"] - (p.get("checkpoint_host_bytes", 0) if cuda else 0)
    return {
        "prepare_peak_bytes": prepare_peak, "step_peak_bytes": step_peak, "plan_step_bytes": plan_step,
        "step_peak_rss_bytes": None if cuda else step["peak_rss_delta_mb"] * 2**20,
        "step_peak_over_plan": step_peak / plan_step, "optimizer_state_bytes": states,
        "plan_optimizer_bytes": p["optimizer_bytes"], "plan_adapter_grad_bytes": p["adapter_grad_bytes"],
        "plan_activation_bytes": p["activation_bytes"], "plan_loss_bytes": p["loss_bytes"],
        "plan_peak_moment": p["peak_moment"],
        "peak_bytes": absolute, "plan_allocated_bytes": allocated_plan,
        "peak_over_plan": None if absolute is None else absolute / allocated_plan,
        "plan_weights_bytes": p["weights_bytes"],
        "prepare_peak_over_weights": prepare_peak / p["weights_bytes"],
        # the prepared model counted exactly against the plan's weights + adapters (should be 1.00)
        "model_bytes": result.get("model_bytes"),
        "model_over_plan": (result["model_bytes"] / (p["weights_bytes"] + p["adapter_bytes"])
                            if result.get("model_bytes") else None),
    }


CPU_SHAPES = ("llama-3-8b", "llama-3-70b", "mixtral-8x7b", "qwen3-30b-a3b")


def _shapes(text: str) -> list[str]:
    shapes = [s.strip() for s in text.split(",") if s.strip()]
    if not shapes or any(s not in CPU_SHAPES for s in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(CPU_SHAPES)}")
    return shapes


def _jobs(args) -> list[dict]:
    base = {"device": args.device, "batch": 1, "threads": args.threads,
            "checkpointing": "offload" if args.gradient_checkpointing == "offload" else True,
            "offload_embedding": args.offload_embedding}
    if args.device.startswith("cuda"):
        from qolora.planning.plan import plan

        longest = plan("llama-3-8b", seq_len=2048, gpu_memory="24GiB").max_seq_len or 2048
        return [{**base, "shape": "llama-3-8b", "layers": 32, "seq": 2048},
                {**base, "shape": "llama-3-8b", "layers": 32, "seq": min(longest, 8192)},
                {**base, "shape": "llama-3-70b", "layers": args.layers_70b, "seq": 2048},
                # the 70B configuration the plan puts under 41 GiB: checkpoints and input embedding on the host
                {**base, "shape": "llama-3-70b", "layers": args.layers_70b, "seq": 2048,
                 "checkpointing": "offload", "offload_embedding": True}]
    layers = {"llama-3-8b": args.layers_8b, "llama-3-70b": args.layers_70b, "mixtral-8x7b": args.layers_moe,
              "qwen3-30b-a3b": args.layers_moe}
    jobs = [{**base, "shape": shape, "layers": layers[shape], "seq": args.seq} for shape in args.shapes]
    if "qwen3-30b-a3b" in args.shapes and args.qwen3_long_seq:
        # At seq 256 one Qwen3-30B-A3B layer's step peaks at the loss (a 128 MiB chunk of its 151,936-token
        # vocabulary's logits), not in the MoE layer; at 1024 the layer (128 experts, 8 per token) is the peak.
        jobs.append({**base, "shape": "qwen3-30b-a3b", "layers": args.layers_moe, "seq": args.qwen3_long_seq})
    return jobs


def main(argv: list[str] | None = None) -> int:
    if worker_main(_worker, argv):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seq", type=int, default=256, help="sequence length on the CPU")
    parser.add_argument("--layers-8b", type=int, default=2, help="full-width 8B layers on the CPU")
    parser.add_argument("--layers-70b", type=int, default=None, help="70B layers (CPU default 1, CUDA 8)")
    parser.add_argument("--layers-moe", type=int, default=1, help="Mixtral / Qwen3-MoE layers on the CPU")
    parser.add_argument("--qwen3-long-seq", type=int, default=1024,
                        help="also Qwen3-30B-A3B at this sequence on the CPU, where its MoE layer is the step's peak "
                             "(0: not)")
    parser.add_argument("--shapes", default=",".join(CPU_SHAPES), type=_shapes,
                        help="comma-separated shapes on the CPU, of: " + ", ".join(CPU_SHAPES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers")
    parser.add_argument("--gradient-checkpointing", default="on", choices=["on", "offload"],
                        help="offload: the layer checkpoints wait in pinned host memory "
                             "(qolora.memory.gradient_checkpointing)")
    parser.add_argument("--offload-embedding", action="store_true",
                        help="the input embedding in host memory (qolora.memory.host_embedding); on CUDA a last 70B "
                             "job "
                             "always runs with it and offloaded checkpointing")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/scale.json)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.layers_70b = args.layers_70b or (8 if cuda else 1)
    load_before = os.getloadavg()[0]
    rows = []
    for job in _jobs(args):
        started = time.perf_counter()
        result = run_worker("benchmarks.scale", job, timeout=3600)
        result["wall_s"] = time.perf_counter() - started
        if "error" not in result:
            result["measured"] = _measured(result)
        rows.append(result)
        print(json.dumps({k: result.get(k) for k in ("shape", "layers", "seq", "gradient_checkpointing",
                                                     "offload_embedding", "error", "tokens_per_s", "measured")},
                         default=str), flush=True)
    names = [r["device_name"] for r in rows if "device_name" in r]
    folder = "cpu" if not cuda else (names[0].lower().replace("nvidia", "").strip().split()[0] if names else "cuda")
    out = write_json(args.out or RESULTS / folder / "scale.json", {
        "benchmark": "scale", "device": args.device, "git": git_info(), "load_avg_before": load_before,
        "load_avg_after": os.getloadavg()[0], "runs": rows,
    }, device=args.device)
    ok = [r for r in rows if "measured" in r]
    if ok:
        labels = [f"{r['shape'].removeprefix('llama-3-')} x{r['layers']} s{r['seq']}"
                  + (" +host" if r.get("offload_embedding") else "") for r in ok]
        bar_panels(out.with_suffix(".png"), [
            {"title": "step peak / plan", "labels": labels, "ref": 1.0, "ref_label": "plan",
             "values": [r["measured"]["step_peak_over_plan"] for r in ok], "fmt": "{:.2f}"},
            {"title": "tokens/s", "labels": labels, "values": [r["tokens_per_s"] for r in ok]},
            {"title": "prepare (s)", "labels": labels, "values": [r["prepare_s"] for r in ok]},
        ], title=f"qolora at full-width {', '.join(dict.fromkeys(_family(r['shape']) for r in ok))} layers "
                 f"({args.device})")
    print(f"wrote {out}")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
