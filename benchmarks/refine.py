"""Quantization-aware refinement (``refine=K``) against plain QLoRA, OLoRA, PiSSA and PEFT's LoftQ.

On the real SmolLM2-135M-Instruct (every q/k/v/o/gate/up/down weight, rank 16, alpha 16 so s = 1, NF4
blocksize 64 with double quantization, as qolora's defaults), for each contender::

    weight error   sum over layers of ||W - (deq(q(W_res)) + s*B@A)||, relative to plain QLoRA's
                   sum ||W - deq(q(W))|| (init="lora" leaves the base as it is, so its error IS the
                   plain NF4 error)
    step-0 loss    token-mean held-out loss (48 fixed held-out chatterbot conversations, prompt-masked,
                   max 128 tokens) of the prepared model before any training, and the share of the
                   fp32-vs-plain-NF4 gap it wins back: (loss_plain - loss) / (loss_plain - loss_fp32)
    prepare time   wall seconds of qolora.prepare (shared, busy CPU: noisy; one run each)

Contenders: fp32 (bits=16, the reference), plain QLoRA (init lora), olora, olora refine 1/2/5, pissa,
pissa refine 2, and LoftQ. PEFT's LoftQ cannot run on this machine: both ``init_lora_weights="loftq"``
(``loftq_init``) and ``replace_lora_weights_loftq`` (``_loftq_init_new``) move the weight to a
hard-coded ``"cuda"`` (or ``"xpu"``) device, so on a CPU-only torch they fail with "Torch not compiled
with CUDA enabled" (the exact message is recorded in the JSON). The LoftQ rows here run PEFT's own
algorithm on the CPU instead: PEFT's ``loftq_init`` loop line for line (NF4 via ``Params4bit`` with
``compress_statistics=False``, blocksize 64, and PEFT's ``_low_rank_decomposition``, an exact full SVD),
and evaluate the function PEFT's model computes at step 0: the returned dequantized base plus
``B @ A`` (re-quantizing that base in NF4 without double quantization when loading it in 4 bits
reproduces it). ``--loftq-iters`` picks the iteration counts (PEFT's default is 1).

Writes ``benchmarks/results/refine_cpu_smollm2.json`` and ``.png``. Usage::

    python -m benchmarks.refine                       # ~12-15 min on a shared 2-core CPU
    python -m benchmarks.refine --quick               # 2 decoder layers' worth of checks, a smoke test
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import statistics
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import RESULTS, bar_panels, git_info, row_split, write_json

logger = logging.getLogger("benchmarks.refine")

CONTENDERS = [  # (label, init, refine)
    ("plain QLoRA", "lora", 0),
    ("olora", "olora", 0),
    ("olora refine 1", "olora", 1),
    ("olora refine 2", "olora", 2),
    ("olora refine 5", "olora", 5),
    ("pissa", "pissa", 0),
    ("pissa refine 2", "pissa", 2),
]
TARGETS = {"gap_recovered": 0.5, "weight_error_ratio": 0.85, "refine5_time_ratio": 2.0}


# ------------------------------------------------------------------------------------------- data
def held_out(model_dir: Path, data: Path, n_eval: int, max_length: int, split_seed: int = 0):
    """The fixed held-out examples (as the convergence benchmark splits them) and the tokenizer."""
    from qolora.data.tokens import load_records, load_tokenizer, tokenize_dataset

    tokenizer = load_tokenizer(model_dir)
    records = load_records(data)
    tokenized, _ = tokenize_dataset(records, tokenizer, max_length=max_length, mask_prompt=True)
    _, eval_ds = row_split(tokenized, n_eval / len(tokenized), seed=split_seed)
    eval_ds = eval_ds.select(range(min(n_eval, len(eval_ds))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(eval_ds), 8):
        rows = eval_ds[start:start + 8]
        width = max(len(x) for x in rows["input_ids"])
        ids = torch.full((len(rows["input_ids"]), width), pad, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"])):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        batches.append((ids, mask, labels))
    return batches


@torch.no_grad()
def eval_loss(model, batches, reference: list | None = None) -> tuple[float, float | None, list]:
    """Token-mean cross-entropy over the held-out label tokens (prompt tokens masked), and the token-mean
    KL(fp32 || model) of the next-token distributions at those positions when ``reference`` (the fp32
    model's log-probabilities there, as this function returns them) is given."""
    model.eval()
    total, count, kl = 0.0, 0, 0.0
    logprobs = []
    for i, (ids, mask, labels) in enumerate(batches):
        target = labels[:, 1:]
        keep = target != -100  # (b, t-1)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float()  # (n, vocab)
        logp = torch.log_softmax(logits, dim=-1)
        total += float(torch.nn.functional.nll_loss(logp, target[keep], reduction="sum"))
        count += int(keep.sum())
        if reference is not None:
            ref = reference[i]
            kl += float((ref.exp() * (ref - logp)).sum())
        else:
            logprobs.append(logp)
    return total / max(count, 1), (kl / max(count, 1) if reference is not None else None), logprobs


# ------------------------------------------------------------------------------------- contenders
def run_qolora(model_dir: Path, batches, ref, init: str, refine: int, rank: int, layers: int | None) -> dict:
    import qolora

    targets = _targets(layers)
    t0 = time.perf_counter()
    model = qolora.prepare(model_dir, bits=4, rank=rank, init=init, refine=refine, device="cpu", dtype="fp32",
                           target_modules=targets, progress=False)
    seconds = time.perf_counter() - t0
    report = model.qolora.report
    out = {"init": init, "refine": refine, "prepare_seconds": seconds, "total_error": report.total_error,
           "round_totals": report.round_totals, "layers": len(report.layers)}
    out["eval_loss"], out["kl_to_fp32"], _ = eval_loss(model, batches, ref)
    del model
    gc.collect()
    return out


def _targets(layers: int | None):
    if layers is None:
        return None  # every linear layer but the head
    names = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names += [f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    return tuple(f"model.layers.{i}.{n}" for i in range(layers) for n in names)


def fp32_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _adapted_linears(model, layers: int | None):
    wanted = set(_targets(layers)) if layers is not None else None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.") and (
                wanted is None or name in wanted):
            yield name, module


@torch.no_grad()
def loftq_cpu(weight: torch.Tensor, reduced_rank: int, num_iter: int):
    """PEFT's ``loftq_init`` (peft/utils/loftq_utils.py, num_bits=4) with its device set to the CPU."""
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = weight.to(torch.float32)
    res = weight.clone()
    for i in range(num_iter):
        qweight = bnb.nn.Params4bit(res.to("cpu"), requires_grad=False, compress_statistics=False,
                                    quant_type="nf4")._quantize("cpu")
        dequantized_weight = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
        res = weight - dequantized_weight
        output = _low_rank_decomposition(res, reduced_rank=reduced_rank)
        L, R = output["L"], output["R"]
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(L, R)
    return dequantized_weight, R, L  # base, lora_A (r, in), lora_B (out, r)


def run_loftq(model_dir: Path, batches, ref, rank: int, num_iter: int, layers: int | None) -> dict:
    model = fp32_model(model_dir)
    total_error, seconds = 0.0, 0.0
    n = 0
    with torch.no_grad():
        for _, module in list(_adapted_linears(model, layers)):
            w = module.weight.detach().clone()
            t0 = time.perf_counter()
            base, a, b = loftq_cpu(w, rank, num_iter)
            seconds += time.perf_counter() - t0
            restored = base + b @ a  # s = 1 (alpha = r): LoftQ fits B@A with no scale
            total_error += float(torch.linalg.norm(w - restored))
            module.weight.copy_(restored)
            n += 1
    out = {"init": "loftq", "loftq_iter": num_iter, "init_seconds": seconds, "total_error": total_error,
           "layers": n}
    out["eval_loss"], out["kl_to_fp32"], _ = eval_loss(model, batches, ref)
    del model
    gc.collect()
    return out


def peft_loftq_on_cpu() -> dict:
    """Try PEFT's own LoftQ on this machine (a tiny model): record whether and why it fails."""
    from peft import LoftQConfig, LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    try:
        get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
            r=8, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="loftq",
            loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)))
        return {"runs": True}
    except Exception as exc:  # noqa: BLE001 - the point is to record it
        return {"runs": False, "error": f"{type(exc).__name__}: {exc}",
                "where": traceback.format_tb(exc.__traceback__)[-3:]}


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    import qolora.data.assets as assets

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--eval-examples", type=int, default=48)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--loftq-iters", default="1,5")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing-reps", type=int, default=3,
                   help="alternating prepare-only timings of olora refine 0 and refine 5 (the machine is shared)")
    p.add_argument("--quick", action="store_true", help="the first 2 decoder layers only, 16 examples")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("qolora").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    layers = 2 if args.quick else None
    n_eval = 16 if args.quick else args.eval_examples
    model_dir, data = assets.default_model_dir(), assets.default_dataset_path()
    out = Path(args.out) if args.out else RESULTS / ("refine_cpu_smollm2" + ("_quick" if args.quick else ""))
    batches = held_out(model_dir, data, n_eval, args.max_length)

    results: dict[str, dict] = {}
    model = fp32_model(model_dir)
    loss, _, ref = eval_loss(model, batches)
    results["fp32"] = {"init": None, "eval_loss": loss, "kl_to_fp32": 0.0}
    del model
    logger.info("fp32: %s", results["fp32"])
    for label, init, refine in CONTENDERS:
        results[label] = run_qolora(model_dir, batches, ref, init, refine, args.rank, layers)
        logger.info("%s: %s", label, {k: v for k, v in results[label].items() if k != "round_totals"})
    peft_status = peft_loftq_on_cpu()
    for it in [int(x) for x in args.loftq_iters.split(",") if x]:
        label = f"LoftQ iter {it} (PEFT's algorithm, CPU)"
        results[label] = run_loftq(model_dir, batches, ref, args.rank, it, layers)
        logger.info("%s: %s", label, results[label])

    del ref
    gc.collect()
    timing = prepare_timing(model_dir, args.rank, layers, args.timing_reps)
    fp32, plain = results["fp32"]["eval_loss"], results["plain QLoRA"]
    gap = plain["eval_loss"] - fp32
    for label, r in results.items():
        if label == "fp32":
            continue
        r["weight_error_ratio"] = r["total_error"] / plain["total_error"]
        r["gap_recovered"] = (plain["eval_loss"] - r["eval_loss"]) / gap if gap > 0 else math.nan
        r["kl_ratio_to_plain"] = r["kl_to_fp32"] / plain["kl_to_fp32"]
        if "prepare_seconds" in r:
            r["time_ratio_to_plain_qlora"] = r["prepare_seconds"] / plain["prepare_seconds"]
            r["time_ratio_to_unrefined"] = r["prepare_seconds"] / results[r["init"]]["prepare_seconds"] \
                if r["init"] in results else None
        if r.get("round_totals"):
            r["round_ratios"] = [e / plain["total_error"] for e in r["round_totals"]]
    best_olora = min((r for r in results.values() if r.get("init") == "olora"), key=lambda r: r["eval_loss"])
    r5 = results["olora refine 5"]
    targets = {
        "gap_recovered >= 0.5 (best refined olora)": best_olora["gap_recovered"],
        "weight_error_ratio <= 0.85 (olora refine 5)": r5["weight_error_ratio"],
        "prepare time refine 5 / refine 0 <= 2 (CPU, median of alternating reps)": timing.get("median_ratio"),
    }
    payload = {"settings": {"model": str(model_dir), "data": str(data), "rank": args.rank, "alpha": args.rank,
                            "bits": 4, "quant_type": "nf4", "blocksize": 64, "double_quant": True,
                            "eval_examples": n_eval, "max_length": args.max_length, "layers": layers or "all",
                            "threads": args.threads},
               "fp32_vs_plain_nf4_gap": gap, "results": results, "targets": targets,
               "prepare_timing": timing, "peft_loftq_on_cpu": peft_status, "git": git_info()}
    write_json(out.with_suffix(".json"), payload)
    labels = [k for k in results if k != "fp32"]
    short = [k.replace(" (PEFT's algorithm, CPU)", "").replace("refine ", "r").replace("plain QLoRA", "QLoRA")
             for k in labels]
    bar_panels(out.with_suffix(".png"), [
        {"title": "weight error / plain NF4 (lower is better)", "labels": short,
         "values": [results[k]["weight_error_ratio"] for k in labels], "ylabel": "ratio", "ref": 0.85,
         "ref_label": "target 0.85", "fmt": "{:.3f}"},
        {"title": "share of the fp32-NF4 step-0 loss gap won back", "labels": short,
         "values": [results[k]["gap_recovered"] for k in labels], "ylabel": "share", "ref": 0.5,
         "ref_label": "target 0.5", "fmt": "{:.2f}"},
        {"title": "KL(fp32 || model) at step 0 / plain NF4's", "labels": short,
         "values": [results[k]["kl_ratio_to_plain"] for k in labels], "ylabel": "ratio", "fmt": "{:.2f}"},
        {"title": "init time (s; LoftQ: its math only)", "labels": short,
         "values": [results[k].get("prepare_seconds", results[k].get("init_seconds")) for k in labels],
         "ylabel": "seconds", "fmt": "{:.0f}"},
    ], title=f"SmolLM2-135M, NF4, rank {args.rank}, step 0 (fp32 {fp32:.4f}, plain NF4 {plain['eval_loss']:.4f})")
    print(table(payload))
    return 0


def prepare_timing(model_dir: Path, rank: int, layers: int | None, reps: int) -> dict:
    """Prepare-only wall times of olora refine 0 and refine 5, alternating (the start rotating each rep)."""
    import qolora

    times: dict[int, list[float]] = {0: [], 5: []}
    for rep in range(reps):
        for refine in ((0, 5) if rep % 2 == 0 else (5, 0)):
            gc.collect()
            t0 = time.perf_counter()
            model = qolora.prepare(model_dir, bits=4, rank=rank, init="olora", refine=refine, device="cpu",
                                   dtype="fp32", target_modules=_targets(layers), progress=False)
            times[refine].append(time.perf_counter() - t0)
            del model
    if not reps:
        return {}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": {str(k): v for k, v in times.items()}, "median": {str(k): v for k, v in med.items()},
            "median_ratio": med[5] / med[0], "min_ratio": min(times[5]) / min(times[0])}


def table(payload: dict) -> str:
    """The README table (markdown)."""
    res = payload["results"]
    lines = ["| init | weight error vs plain QLoRA | step-0 held-out loss | gap won back | KL to fp32 vs plain "
             "| prepare s |", "|---|---|---|---|---|---|",
             f"| fp32 (reference) | - | {res['fp32']['eval_loss']:.4f} | 100% | 0 | - |"]
    for label, r in res.items():
        if label == "fp32":
            continue
        secs = r.get("prepare_seconds")
        secs = f"{secs:.0f}" if secs is not None else f"({r['init_seconds']:.0f} init math)"
        lines.append(f"| {label} | {r['weight_error_ratio']:.3f} | {r['eval_loss']:.4f} | "
                     f"{100 * r['gap_recovered']:.0f}% | {r['kl_ratio_to_plain']:.3f} | {secs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
