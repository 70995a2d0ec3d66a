"""Issue 10, item 1: peak memory of one training step's loss, full logits vs chunked (qolora.memory.chunked_loss).

Model: a random Llama with hidden 256, 2 decoder layers (8 / 4 heads, intermediate 688) and Llama-3's
vocabulary, 128,256 tokens (untied head), prepared by ``qolora.prepare(dir, bits=4, rank=16,
gradient_checkpointing=True, device="cpu")``: the decoder's linear layers are bitsandbytes 4-bit NF4
with OLoRA adapters (the only trainable parameters); embeddings and the LM head stay unquantized in
the prepared dtype (fp32 on the CPU). One forward + backward of a 4 x 1024-token batch, every token
labelled (no prompt masking: the chunked path's gather saves nothing here, only chunking counts), with
each contender's loss:

* ``plain``   -- ``qolora.memory.chunked_loss.plain_causal_lm_loss_sum``: ``model(...).logits`` ``(4, 1024, 128256)``,
  upcast, ``F.cross_entropy(..., reduction="sum")`` (what ``qolora.train`` does today);
* ``chunked`` -- ``qolora.memory.chunked_loss.causal_lm_loss_sum`` with its default chunk (~128 MiB of fp32 logits);
* ``decoder`` -- a reference, not a loss: the decoder backbone alone, backpropagating
  ``mean(hidden**2)`` (no head, no logits). Its peak is what the decoder's own (checkpointed)
  activations and recomputation cost; a loss's own share is roughly its peak minus this one.

The full fp32 logits are ``4 * 1024 * 128256 * 4 B = 2.0 GiB``. Target (issue 10): the step's peak
over the post-setup memory is under half of that.

Memory measure: each contender runs in a fresh process (``benchmarks.common.run_worker``), alternating.
After the model is prepared and the batch built, freed heap is returned to the OS (``malloc_trim``)
and :class:`benchmarks.common.MemoryProbe` resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``); after the step it reads the high-water mark (``VmHWM``, what
``getrusage().ru_maxrss`` reports). Reported: **peak RSS minus the RSS at the start of the step**. On
the CPU, PyTorch allocates large tensors with plain ``malloc``, i.e. fresh ``mmap`` pages that are
returned on free, so the resident high-water mark follows the live tensors; it counts everything,
including memory the loss allocates outside PyTorch's view, and is not sampled (no missed peak).
The full-logits loss runs once, so no warm-up; times are of that single step (wall and process CPU
time), on a shared 2-core machine: indicative only. The 1-minute load average before and after the
run is recorded.

    python -m benchmarks.loss_memory                 # 2 rounds per contender, ~2.5 min on 2 cores
    python -m benchmarks.loss_memory --rounds 1 --seq 256     # smoke test
    python -m benchmarks.loss_memory --replot benchmarks/results/loss_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

logger = logging.getLogger("benchmarks.loss_memory")

CONTENDERS = ["plain", "chunked", "decoder"]
LABELS = {"plain": "full logits (today)", "chunked": "chunked (qolora.memory.chunked_loss)",
          "decoder": "decoder only (reference)"}
TARGET_PEAK_VS_LOGITS = 0.5
SIZE = "tiny-v128k"  # the "tiny" shapes with Llama-3's vocabulary; registered here, not in common.SIZES' table
common.SIZES.setdefault(SIZE, {**common.SIZES["tiny"], "vocab_size": 128256})


# ------------------------------------------------------------------------------------- worker
def worker(payload: dict, probe: common.MemoryProbe) -> dict:
    import torch

    import qolora
    from qolora.memory.chunked_loss import (
        causal_lm_loss_sum,
        default_chunk_tokens,
        plain_causal_lm_loss_sum,
    )

    def decoder_only(model, input_ids, labels):  # the reference: no head, no logits
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
        return hidden.float().square().mean() * labels[:, 1:].numel()

    contender = payload["contender"]
    loss_fn = {"plain": plain_causal_lm_loss_sum, "chunked": causal_lm_loss_sum, "decoder": decoder_only}[contender]
    torch.manual_seed(0)
    model = qolora.prepare(payload["model_dir"], bits=4, rank=16, gradient_checkpointing=True, device="cpu",
                           progress=False).train()
    params = [p for p in model.parameters() if p.requires_grad]
    head = model.get_output_embeddings()
    gen = torch.Generator().manual_seed(1234)
    vocab = model.config.vocab_size
    x = torch.randint(3, vocab, (payload["batch"], payload["seq"]), generator=gen)  # (B, T): also the labels
    n_labels = x[:, 1:].numel()
    common.release_freed_memory()
    probe.start()
    with common.Timer("cpu") as t:
        loss_sum = loss_fn(model, x, x)
        (loss_sum / n_labels).backward()
    row = probe.stop("step")
    grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    return {
        "contender": contender, "loss": float(loss_sum) / n_labels, "adapter_grad_norm": grad_norm,
        "step_s": t.seconds, "step_cpu_s": t.cpu_seconds, "peak_delta_mb": row["peak_rss_delta_mb"],
        "hwm_reset": row["hwm_reset"], "trainable_params": sum(p.numel() for p in params),
        "head": f"{type(head).__name__} {tuple(head.weight.shape)} {head.weight.dtype}",
        "base_layer": type(model.model.layers[0].self_attn.q_proj).__name__,
        "chunk_tokens": default_chunk_tokens(vocab) if contender == "chunked" else None,
    }


# ------------------------------------------------------------------------------------- parent
def _summarize(runs: dict[str, list[dict]], logits_mb: float) -> dict:
    summary = {}
    for c, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        peak = common.summarize(r["peak_delta_mb"] for r in ok)
        summary[c] = {
            "peak_delta_mb": peak,
            "peak_vs_fp32_logits": None if peak["median"] is None else peak["median"] / logits_mb,
            "step_s": common.summarize(r["step_s"] for r in ok),
            "step_cpu_s": common.summarize(r["step_cpu_s"] for r in ok),
            "loss": [r["loss"] for r in ok],
            "adapter_grad_norm": [r["adapter_grad_norm"] for r in ok],
            "failures": [{"error": r["error"], "stderr_tail": r.get("stderr_tail", "")[-1500:]}
                         for r in rs if "error" in r],
            "runs": rs,
        }
    decoder = summary.get("decoder", {}).get("peak_delta_mb", {}).get("median")
    for c in ("plain", "chunked"):  # the loss's own share: its step's peak over the decoder-only step's
        med = summary[c]["peak_delta_mb"]["median"]
        summary[c]["peak_over_decoder_mb"] = None if med is None or decoder is None else med - decoder
    return summary


def _verdicts(summary: dict) -> dict:
    value = summary["chunked"]["peak_vs_fp32_logits"]
    plain, chunked = summary["plain"], summary["chunked"]
    agree = None
    if plain["loss"] and chunked["loss"]:
        agree = {"loss_rel_diff": abs(chunked["loss"][0] - plain["loss"][0]) / abs(plain["loss"][0]),
                 "grad_norm_rel_diff": abs(chunked["adapter_grad_norm"][0] - plain["adapter_grad_norm"][0])
                 / abs(plain["adapter_grad_norm"][0])}
    return {
        "chunked_peak_vs_fp32_logits": {"value": value, "target": f"< {TARGET_PEAK_VS_LOGITS}",
                                        "met": None if value is None else value < TARGET_PEAK_VS_LOGITS},
        "plain_vs_chunked_agreement": agree,
    }


def _plot(path: Path, summary: dict, logits_mb: float, title: str) -> None:
    labels = [LABELS[c] for c in CONTENDERS]
    common.bar_panels(path, [
        {"title": "step peak RSS over post-setup (MiB)", "labels": labels, "ylabel": "MiB",
         "values": [summary[c]["peak_delta_mb"]["median"] for c in CONTENDERS],
         "lo": [summary[c]["peak_delta_mb"]["min"] for c in CONTENDERS],
         "hi": [summary[c]["peak_delta_mb"]["max"] for c in CONTENDERS],
         "ref": logits_mb * TARGET_PEAK_VS_LOGITS, "ref_label": "target for the loss steps: half the fp32 logits",
         "fmt": "{:.0f}"},
        {"title": "step wall time (s)", "labels": labels, "ylabel": "s",
         "values": [summary[c]["step_s"]["median"] for c in CONTENDERS],
         "lo": [summary[c]["step_s"]["min"] for c in CONTENDERS],
         "hi": [summary[c]["step_s"]["max"] for c in CONTENDERS], "fmt": "{:.1f}"},
        {"title": "step CPU time, all threads (s)", "labels": labels, "ylabel": "s",
         "values": [summary[c]["step_cpu_s"]["median"] for c in CONTENDERS],
         "lo": [summary[c]["step_cpu_s"]["min"] for c in CONTENDERS],
         "hi": [summary[c]["step_cpu_s"]["max"] for c in CONTENDERS], "fmt": "{:.1f}"},
    ], title=title)


def _title(cfg: dict) -> str:
    return (f"loss memory: tiny Llama (h256, 2 layers, 4-bit) with V=128256, batch {cfg['batch']} x {cfg['seq']}, "
            f"fp32 logits {cfg['logits_mb'] / 1024:.2f} GiB, CPU")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per contender, alternating")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per worker (default: torch's)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--tag", default="")
    p.add_argument("--replot", type=Path, default=None, help="only redraw the PNG of an existing result JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.replot:
        d = json.loads(args.replot.read_text())
        _plot(args.replot.with_suffix(".png"), d["summary"], d["config"]["logits_mb"], _title(d["config"]))
        return 0
    model_dir = common.synthetic_checkpoint(SIZE, 2)
    vocab = common.SIZES[SIZE]["vocab_size"]
    logits_mb = args.batch * args.seq * vocab * 4 / 2**20
    cfg = {"batch": args.batch, "seq": args.seq, "vocab": vocab, "hidden": 256, "layers": 2, "bits": 4,
           "rank": 16, "gradient_checkpointing": True, "rounds": args.rounds, "threads": args.threads,
           "logits_mb": logits_mb, "model_dir": str(model_dir)}
    stem = f"loss_memory_cpu{args.tag}"
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for rnd, c in common.alternating(CONTENDERS, args.rounds):
        payload = {"contender": c, "model_dir": str(model_dir), "batch": args.batch, "seq": args.seq,
                   "threads": args.threads}
        res = common.run_worker("benchmarks.loss_memory", payload, timeout=args.timeout)
        runs[c].append(res)
        if "error" in res:
            logger.error("round %d %s: FAILED %s\n%s", rnd, c, res["error"], res.get("stderr_tail", "")[-1500:])
        else:
            logger.info("round %d %-8s peak +%7.0f MiB (%.2f x fp32 logits)  step %5.1f s (cpu %5.1f s)  loss %.4f",
                        rnd, c, res["peak_delta_mb"], res["peak_delta_mb"] / logits_mb, res["step_s"],
                        res["step_cpu_s"], res["loss"])
    load_after = os.getloadavg()
    summary = _summarize(runs, logits_mb)
    verdicts = _verdicts(summary)
    title = _title(cfg)
    common.write_json(args.out / f"{stem}.json", {
        "benchmark": "loss_memory", "config": cfg, "summary": summary, "verdicts": verdicts,
        "load_avg_before": load_before, "load_avg_after": load_after,
        "peak_measure": "VmHWM - VmRSS at step start (HWM reset via /proc/self/clear_refs), fresh process each",
        "quantization": "decoder linears: bitsandbytes 4-bit NF4 + OLoRA r16 (qolora.prepare); embeddings/head fp32",
    })
    _plot(args.out / f"{stem}.png", summary, logits_mb, title)
    logger.info("%s", title)
    for c in CONTENDERS:
        s = summary[c]
        if s["peak_delta_mb"]["median"] is None:
            logger.info("%-24s FAILED", LABELS[c])
            continue
        over = s.get("peak_over_decoder_mb")
        logger.info("%-24s peak +%7.0f MiB (%.2f x fp32 logits %.0f MiB; %s over decoder-only)  "
                    "step %.1f s  cpu %.1f s",
                    LABELS[c], s["peak_delta_mb"]["median"], s["peak_vs_fp32_logits"], logits_mb,
                    "-" if over is None else f"{over:+.0f} MiB", s["step_s"]["median"], s["step_cpu_s"]["median"])
    v = verdicts["chunked_peak_vs_fp32_logits"]
    logger.info("target: chunked peak / fp32 logits %s -> %s", v["target"],
                "n/a" if v["met"] is None else f"{v['value']:.3f} {'MET' if v['met'] else 'MISSED'}")
    logger.info("agreement plain vs chunked: %s", verdicts["plain_vs_chunked_agreement"])
    logger.info("load average before %s, after %s", load_before, load_after)
    logger.info("wrote %s.json and .png under %s", stem, args.out)
    return 0


if __name__ == "__main__":
    if not common.worker_main(worker):
        raise SystemExit(main())
