"""Offload benchmark (issue 11): Llama-3-70B on a 24 GiB cap, the frozen 4-bit base streamed from host memory.

One process, one model::

    prepare(synthetic 70B streamed from the GPU, 4-bit NF4, rank 16 all-linear, offload="cpu")
        under torch.cuda.set_per_process_memory_fraction(cap / card)        -> prepare's own peak
    train steps at seq 2048, batch 1 and at the largest batch that fits the cap (tried downwards from
        the planner's answer): tokens/s, peak CUDA memory, bytes copied per step
    lift the cap, streamer.remove() (the same model, all resident), same adapters and optimizer start,
        the same steps at the largest batch: the overhead ratio offloaded / resident step time

The synthetic weights are generated on the device (a CUDA generator per tensor key: no checkpoint is
carried, nothing is written) and streamed into :func:`qolora.prepare` through
:meth:`qolora.base.reader.BaseCheckpoint.from_source`. Writes ``benchmarks/results/<device>/scale_70b.json``.

``--tiny`` runs the same code on the CPU with two decoder layers of the Llama-3-8B shape scaled down
(seq 64, batches 1 and 2), so the script is tested (tests/memory/test_base_streaming.py); there the "cap" is not
enforced and the figures only show that the mechanism runs. The CUDA mode has not been run in the task
that wrote it (no GPU was lent); targets: peak <= 24 GiB, offloaded step <= 1.3x the resident step.

    python -m benchmarks.offload                 # CUDA: 70B under a 24 GiB cap
    python -m benchmarks.offload --shape llama-3-8b --cap 12GiB
    python -m benchmarks.offload --tiny          # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("benchmarks.offload")


def _tiny_config() -> dict:
    raw = json.loads((REPO / "qolora" / "configs" / "llama-3-8b.json").read_text())
    raw.update(hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    return raw


def _batch(vocab: int, batch: int, seq: int, device, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(model, *, batch: int, seq: int, steps: int, device, optim: str, autocast) -> dict:
    """``steps`` optimizer steps on fixed random batches; times, losses, peak memory, streamer counters."""
    from qolora.adapters.layer import adapter_parameters
    from qolora.training.loop import loss_sum
    from qolora.training.optim import make_optimizer

    params = [p for _, p in adapter_parameters(model)]
    optimizer = make_optimizer(optim, params, 1e-4, 0.0)
    streamer = model.qolora.offload
    if streamer is not None:
        streamer.reset_stats()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    vocab = model.config.vocab_size
    times, losses = [], []
    model.train()
    for step in range(steps):
        data = _batch(vocab, batch, seq, device, step)
        _sync(device)
        tick = time.perf_counter()
        with autocast():
            loss = loss_sum(model, data) / (batch * (seq - 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - tick)
        losses.append(float(loss.detach()))
    model.eval()
    del optimizer
    timed = times[1:] if len(times) > 1 else times  # the first step warms kernels and allocator up
    step_s = statistics.median(timed)
    return {"batch_size": batch, "seq_len": seq, "steps": steps, "step_seconds": times, "median_step_seconds": step_s,
            "tokens_per_s": batch * seq / step_s, "losses": losses,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "bytes_copied_per_step": streamer.stats.bytes_copied // steps if streamer is not None else 0,
            "fetches_per_step": streamer.stats.fetches / steps if streamer is not None else 0}


def _adapters(model) -> dict:
    from qolora.adapters.layer import adapter_state_dict

    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}


def _restore(model, state: dict) -> None:
    from qolora.adapters.layer import adapter_parameters

    with torch.no_grad():
        for name, p in adapter_parameters(model):
            p.copy_(state[name])


def main(argv=None) -> Path:
    import qolora
    from qolora.base.reader import BaseCheckpoint
    from qolora.base.synthetic import SyntheticCheckpoint
    from qolora.config import parse_size
    from qolora.planning.plan import plan
    from qolora.training.optim import resolve_precision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on 2 scaled-down Llama-3-8B layers")
    p.add_argument("--shape", default="llama-3-70b", help="built-in config name")
    p.add_argument("--cap", default="24GiB", help="CUDA memory cap (set_per_process_memory_fraction)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3, help="steps per measurement (>= 2; the first is warm-up)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--optim", default="paged_adamw_8bit")
    p.add_argument("--no-resident", dest="resident", action="store_false", help="skip the all-resident comparison")
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/<device>/scale_70b.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.tiny:
        device, cap = torch.device("cpu"), None
        synthetic = SyntheticCheckpoint(_tiny_config(), dtype=torch.float32)
        source, seq, steps, batches, optim = synthetic, 64, max(2, min(args.steps, 2)), [1, 2], "adamw"
        options = {"device": "cpu"}
        device_name = "cpu (tiny: 2 scaled-down Llama-3-8B layers)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the full benchmark needs CUDA; use --tiny on the CPU")
        device = torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(device).total_memory
        cap = parse_size(args.cap, "cap")
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        synthetic = SyntheticCheckpoint(args.shape, dtype=torch.bfloat16)
        source, seq, steps, optim = synthetic, args.seq_len, max(2, args.steps), args.optim  # made on the GPU
        options = {"device": "cuda", "compute_dtype": "bf16", "dtype": "bf16"}
        device_name = f"cuda: {torch.cuda.get_device_name(device)}"
        planned = plan(args.shape, rank=args.rank, seq_len=seq, optim=optim, gpu_memory=cap, offload="cpu")
        batches = sorted({1, max(1, planned.max_batch_size or 1)})

    started = time.perf_counter()
    checkpoint = BaseCheckpoint.from_source(source, name=f"synthetic {synthetic.name}")
    model = qolora.prepare(checkpoint, 4, args.rank, gradient_checkpointing=True, progress=False, offload="cpu",
                           **options)
    prepare_s = time.perf_counter() - started
    streamer = model.qolora.offload
    _, autocast, _ = resolve_precision("auto", device)
    start_state = _adapters(model)

    runs, largest = [], None
    candidates = sorted(batches, reverse=True)  # the largest batch that fits the cap, halving on OOM; then batch 1
    while candidates:
        batch = candidates.pop(0)
        _restore(model, start_state)
        try:
            run = _train(model, batch=batch, seq=seq, steps=steps, device=device, optim=optim, autocast=autocast)
        except torch.cuda.OutOfMemoryError:
            logger.info("batch %d does not fit the cap", batch)
            streamer.release_all()
            torch.cuda.empty_cache()
            if batch > 1 and largest is None:
                candidates = sorted({batch // 2, *candidates}, reverse=True)
            continue
        runs.append({**run, "offload": True})
        if largest is None:
            largest = batch
            candidates = [1] if batch > 1 else []
    offloaded_largest = next(r for r in runs if r["batch_size"] == largest)
    offloaded_final = _adapters(model)  # after the batch-1 run (the last one)

    result = {
        "device": device_name, "shape": "tiny" if args.tiny else args.shape, "rank": args.rank, "seq_len": seq,
        "bits": 4, "optim": optim, "gpu_memory_cap_bytes": cap, "steps": steps,
        "prepare": {"seconds": prepare_s, "peak_device_bytes": model.qolora.report.peak_device_bytes},
        "num_layers": streamer.num_layers, "num_offloaded_layers": len(streamer.offloaded),
        "host_bytes": streamer.host_bytes, "runs": runs,
        "peak_cuda_bytes": max((r["peak_cuda_bytes"] or 0) for r in runs) if device.type == "cuda" else None,
        "largest_batch": largest,
        "tokens_per_s": {"batch_1": next(r for r in runs if r["batch_size"] == 1)["tokens_per_s"],
                         f"batch_{largest}": offloaded_largest["tokens_per_s"]},
        "bytes_copied_per_step": next(r for r in runs if r["batch_size"] == 1)["bytes_copied_per_step"],
    }

    if args.resident:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        streamer.remove()  # the same model, every layer resident again
        model.qolora.offload = None
        compare = []
        for batch in sorted({largest, 1}, reverse=True):
            _restore(model, start_state)
            compare.append({**_train(model, batch=batch, seq=seq, steps=steps, device=device, optim=optim,
                                     autocast=autocast), "offload": False})
        resident_final = _adapters(model)  # after batch 1, like offloaded_final
        res_largest = compare[0]
        result["resident"] = {"runs": compare, "batch_size": largest, "tokens_per_s": res_largest["tokens_per_s"],
                              "median_step_seconds": res_largest["median_step_seconds"],
                              "peak_cuda_bytes": res_largest["peak_cuda_bytes"]}
        result["overhead_ratio"] = offloaded_largest["median_step_seconds"] / res_largest["median_step_seconds"]
        diff = max(float((offloaded_final[k].float() - resident_final[k].float()).abs().max()) for k in resident_final)
        result["final_adapters_equal_resident"] = diff == 0.0
        result["max_abs_adapter_diff"] = diff
        result["same_losses"] = [r["losses"] for r in runs if r["batch_size"] == 1][0] == compare[-1]["losses"]
    else:
        result["resident"], result["overhead_ratio"] = None, None
    if cap is not None:
        result["targets"] = {"peak_le_cap": (result["peak_cuda_bytes"] or 0) <= cap,
                             "overhead_le_1.3": (result["overhead_ratio"] is not None
                                                 and result["overhead_ratio"] <= 1.3)}

    if args.out:
        out = Path(args.out)
    else:
        folder = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).split()[-1].lower()
        out = REPO / "benchmarks" / "results" / folder / ("scale_70b.json"
                                                           if args.shape == "llama-3-70b" and not args.tiny
                                                           else f"scale_{result['shape']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    logger.info("wrote %s: %s", out, {k: result[k] for k in ("peak_cuda_bytes", "tokens_per_s", "overhead_ratio")})
    return out


if __name__ == "__main__":
    main()
