"""Issue 2: OLoRA init on a 4-bit base, qolora vs transformers + PEFT, side by side in one run.

Contenders (same checkpoint, same NF4 4-bit base: blocksize 64, double quant, r=16, alpha=16,
every decoder linear layer; compute dtype = qolora's default for the device, fp32 on the CPU and
bf16 on CUDA):

* ``qolora_olora`` -- ``qolora.prepare(dir, init="olora")``: one streaming pass, thin QR of
  ``W[:, :r]``, the residual quantized once from the checkpoint's weights;
* ``qolora_lora``  -- ``qolora.prepare(dir, init="lora")``: qolora's plain 4-bit load (+ zero-B adapters);
* ``peft_olora``   -- transformers 4-bit load, then ``get_peft_model(LoraConfig(init_lora_weights="olora"))``:
  dequantize, full QR, requantize (the base quantized twice);
* ``hf_4bit``      -- the transformers 4-bit load alone (the plain QLoRA reference).

Each repetition of each contender runs in a fresh process (wall time of the load call after the
imports, peak memory of that call); contenders alternate, medians are reported. The summed weight
error ``sum ||W - (deq(base) + s*B@A)||`` over the adapted layers is measured against the
checkpoint's own weights (read independently of the code under test) for every contender, on the
synthetic checkpoint and on the real SmolLM2-135M-Instruct (all 30 layers).

    python -m benchmarks.init                      # CPU, 4 TinyLlama-sized layers + SmolLM2 errors
    python -m benchmarks.init --device cuda --size 7b --layers 4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``qolora`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

CONTENDERS = ["qolora_olora", "qolora_lora", "peft_olora", "hf_4bit"]
LABELS = {
    "qolora_olora": "qolora olora",
    "qolora_lora": "qolora 4-bit (lora)",
    "peft_olora": "transformers+PEFT olora",
    "hf_4bit": "transformers 4-bit",
}
PLAIN = "hf_4bit"  # the plain QLoRA reference for errors and the plain 4-bit load for time
TARGETS = {
    "cpu": {"time_vs_plain_max": 1.3, "speedup_vs_peft_min": 4.0, "error_vs_plain_max": 0.97},
    "cuda": {"time_vs_plain_max": 1.3, "speedup_vs_peft_min": 30.0, "error_vs_plain_max": 0.97},
}


# ------------------------------------------------------------------------------------- worker
def _dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32  # qolora's default per device


def _bnb_config(device: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_dtype(device),
    )


def _hf_load(model_dir: str, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=_bnb_config(device), dtype=_dtype(device),
        device_map={"": 0} if device.startswith("cuda") else {"": "cpu"},
    )


def _peft_wrap(model, rank: int, alpha: float):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights="olora"))


def _qolora(model_dir: str, device: str, rank: int, alpha: float, init: str):
    import qolora

    return qolora.prepare(model_dir, bits=4, rank=rank, init=init, alpha=alpha, quant_type="nf4", blocksize=64,
                          double_quant=True, device=device, progress=False)


def _checkpoint_key(model_dir: str, name: str) -> str | None:
    """The checkpoint key of a (possibly wrapped) module's weight: strip wrapper prefixes until it exists."""
    parts = name.split(".")
    for i in range(len(parts)):
        key = ".".join(parts[i:]) + ".weight"
        if key in common.checkpoint_keys(model_dir):
            return key
    return None


def _effective_weights(model, contender: str):
    """``(name, effective fp32 weight (out, in))`` of every adapted/quantized linear layer."""
    import bitsandbytes as bnb
    import torch

    from qolora.adapters.layer import AdapterLinear

    def deq(layer):
        w = layer.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)

    for name, module in model.named_modules():
        if contender.startswith("qolora"):
            if isinstance(module, AdapterLinear):
                yield name, deq(module.base_layer) + module.delta_weight()
        elif contender == "peft_olora":
            if (hasattr(module, "base_layer") and hasattr(module, "lora_A")
                    and "default" in getattr(module, "lora_A", {})):
                a = module.lora_A["default"].weight.float()
                b = module.lora_B["default"].weight.float()
                yield name, deq(module.get_base_layer()) + module.scaling["default"] * (b @ a)
        elif isinstance(module, bnb.nn.Linear4bit):
            yield name, deq(module)


def measure_errors(model, contender: str, model_dir: str) -> dict:
    """Summed (and per projection kind) ``||W - W_eff||`` against the checkpoint's weights."""
    import torch

    total, by_kind, count, norm = 0.0, {}, 0, 0.0
    for name, eff in _effective_weights(model, contender):
        key = _checkpoint_key(model_dir, name)
        if key is None:
            raise RuntimeError(f"{contender}: no checkpoint weight for layer {name}")
        w = common.checkpoint_weight(model_dir, key).to(eff.device)
        err = float(torch.linalg.norm(w - eff))
        total += err
        norm += float(torch.linalg.norm(w))
        kind = name.rsplit(".", 1)[-1]
        by_kind[kind] = by_kind.get(kind, 0.0) + err
        count += 1
        del w, eff
    return {"total_error": total, "layers": count, "total_weight_norm": norm, "by_kind": by_kind}


def worker(payload: dict, probe: common.MemoryProbe) -> dict:
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # every worker imports the same stack before timing
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import qolora  # noqa: F401

    contender, model_dir, device = payload["contender"], payload["model_dir"], payload["device"]
    rank, alpha = payload["rank"], payload["alpha"]
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # CUDA context outside the timing
    result: dict = {"contender": contender}
    probe.start()
    with common.Timer(device) as t_total:
        if contender == "qolora_olora":
            model = _qolora(model_dir, device, rank, alpha, "olora")
        elif contender == "qolora_lora":
            model = _qolora(model_dir, device, rank, alpha, "lora")
        elif contender in ("peft_olora", "hf_4bit"):
            with common.Timer(device) as t_load:
                model = _hf_load(model_dir, device)
            result["load_s"] = t_load.seconds
            if contender == "peft_olora":
                with common.Timer(device) as t_peft:
                    model = _peft_wrap(model, rank, alpha)
                result["peft_init_s"] = t_peft.seconds
                result["peft_init_cpu_s"] = t_peft.cpu_seconds
        else:
            raise ValueError(f"unknown contender {contender!r}")
    probe.stop("load")
    result["seconds"] = t_total.seconds
    result["cpu_seconds"] = t_total.cpu_seconds
    if contender.startswith("qolora"):
        result["qolora_report_error"] = model.qolora_report.total_error
    if payload.get("errors"):
        with torch.no_grad():
            result["errors"] = measure_errors(model, contender, model_dir)
    return result


# ------------------------------------------------------------------------------------- parent
def _warm_page_cache(model_dir: Path) -> None:
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def _run_series(model_dir: Path, args, contenders: list[str], repeats: int, label: str, on_update=None) -> dict:
    """Run the contenders alternating; ``on_update(summary)`` after every worker (partial results survive a kill)."""
    _warm_page_cache(model_dir)
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    for rep, contender in common.budgeted(common.alternating(contenders, repeats), args.budget_s):
        payload = {"contender": contender, "model_dir": str(model_dir), "device": args.device, "rank": args.rank,
                   "alpha": args.alpha, "errors": rep == 0, "threads": args.threads}
        res = common.run_worker("benchmarks.init", payload, timeout=args.timeout)
        runs[contender].append(res)
        if "error" in res:
            print(f"  [{label}] rep {rep} {contender}: FAILED {res['error']}\n{res.get('stderr_tail', '')[-1500:]}",
                  flush=True)
        else:
            mem = common.peak_mb(res, "load", args.device)
            err = (res.get("errors") or {}).get("total_error")
            print(f"  [{label}] rep {rep} {contender:13s} {res['seconds']:7.2f} s (cpu {res['cpu_seconds']:7.2f} s)"
                  f"  peak {mem:8.0f} MiB"
                  + (f"  error {err:.4f}" if err is not None else ""), flush=True)
        if on_update is not None:
            on_update(_summarize(runs, args.device))
    return _summarize(runs, args.device)


def _summarize(runs: dict[str, list[dict]], device: str) -> dict:
    summary = {}
    for c, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        errs = next((r["errors"] for r in ok if r.get("errors")), None)
        summary[c] = {
            "seconds": common.summarize(r["seconds"] for r in ok),
            "cpu_seconds": common.summarize(r.get("cpu_seconds") for r in ok),
            "load_s": common.summarize(r.get("load_s") for r in ok),
            "peft_init_s": common.summarize(r.get("peft_init_s") for r in ok),
            "peft_init_cpu_s": common.summarize(r.get("peft_init_cpu_s") for r in ok),
            "peak_mb": common.summarize(common.peak_mb(r, "load", device) for r in ok),
            "peak_delta_mb": common.summarize(
                (r.get("memory", {}).get("load") or {}).get("peak_rss_delta_mb") for r in ok),
            "errors": errs,
            "qolora_report_error": next((r.get("qolora_report_error") for r in ok if "qolora_report_error" in r), None),
            "failures": [{"error": r["error"], "stderr_tail": r.get("stderr_tail", "")[-1500:]}
                         for r in rs if "error" in r],
            "runs": rs,
        }
    return summary


def _ratios(summary: dict) -> dict:
    def med(c, what="seconds"):
        return (summary.get(c) or {}).get(what, {}).get("median") if what != "errors" else None

    def err(c):
        e = (summary.get(c) or {}).get("errors")
        return e["total_error"] if e else None

    out = {}
    for c in summary:
        out[c] = {
            "time_vs_hf_4bit": common.ratio(med(c), med("hf_4bit")),
            "time_vs_qolora_lora": common.ratio(med(c), med("qolora_lora")),
            "cpu_time_vs_hf_4bit": common.ratio(med(c, "cpu_seconds"), med("hf_4bit", "cpu_seconds")),
            "cpu_time_vs_qolora_lora": common.ratio(med(c, "cpu_seconds"), med("qolora_lora", "cpu_seconds")),
            "peak_vs_hf_4bit": common.ratio(med(c, "peak_mb"), med("hf_4bit", "peak_mb")),
            "error_vs_plain": common.ratio(err(c), err(PLAIN)),
        }
    out["speedup_qolora_olora_vs_peft_olora"] = common.ratio(med("peft_olora"), med("qolora_olora"))
    out["cpu_speedup_qolora_olora_vs_peft_olora"] = common.ratio(med("peft_olora", "cpu_seconds"),
                                                                 med("qolora_olora", "cpu_seconds"))

    # The init alone: PEFT's get_peft_model(olora) on a loaded 4-bit model vs what olora adds to qolora's
    # own plain load (difference of medians: noisy, None when not positive).
    def extra(what):
        a, b = med("qolora_olora", what), med("qolora_lora", what)
        return None if a is None or b is None or a <= b else a - b

    out["init_only_qolora_extra_s"] = extra("seconds")
    out["init_only_peft_s"] = med("peft_olora", "peft_init_s")
    out["init_only_speedup_vs_peft"] = common.ratio(med("peft_olora", "peft_init_s"), extra("seconds"))
    out["init_only_cpu_speedup_vs_peft"] = common.ratio(med("peft_olora", "peft_init_cpu_s"), extra("cpu_seconds"))
    return out


def _table(summary: dict, ratios: dict, title: str, device: str) -> str:
    unit = "CUDA MiB" if device.startswith("cuda") else "RSS MiB"
    lines = [title, f"{'contender':26s} {'time s (med)':>12s} {'min..max':>15s} {'x hf4bit':>8s} {'x q-lora':>8s}"
             f" {'cpu s':>8s} {'cpu x hf':>8s} {'peak ' + unit:>14s} {'error':>10s} {'x plain':>8s}"]
    for c, s in summary.items():
        t, p = s["seconds"], s["peak_mb"]
        e = (s.get("errors") or {}).get("total_error")
        r = ratios[c]

        def f(v, fmt):
            return format(v, fmt) if v is not None else "n/a"

        rng = f"{f(t['min'], '.2f')}..{f(t['max'], '.2f')}"
        lines.append(f"{LABELS.get(c, c):26s} {f(t['median'], '12.2f')} {rng:>15s} {f(r['time_vs_hf_4bit'], '8.2f')}"
                     f" {f(r['time_vs_qolora_lora'], '8.2f')} {f(s['cpu_seconds']['median'], '8.2f')}"
                     f" {f(r['cpu_time_vs_hf_4bit'], '8.2f')} {f(p['median'], '14.0f')} {f(e, '10.4f')}"
                     f" {f(r['error_vs_plain'], '8.3f')}")
    sp = ratios.get("speedup_qolora_olora_vs_peft_olora")
    csp = ratios.get("cpu_speedup_qolora_olora_vs_peft_olora")
    lines.append(f"qolora olora is {sp:.1f}x faster than transformers+PEFT olora (wall; {csp:.1f}x in CPU time)"
                 if sp and csp else "speedup: n/a")
    ex, pi, isp = (ratios.get(k) for k in ("init_only_qolora_extra_s", "init_only_peft_s", "init_only_speedup_vs_peft"))
    if pi is not None:
        lines.append(f"init alone: PEFT get_peft_model(olora) {pi:.2f} s vs qolora olora-minus-lora "
                     + (f"{ex:.2f} s = {isp:.0f}x" if ex else "n/a (not positive: within noise)"))
    return "\n".join(lines)


def _verdicts(speed: dict, speed_ratios: dict, real_ratios: dict | None, device: str) -> dict:
    tg = TARGETS["cuda" if device.startswith("cuda") else "cpu"]
    at_most, at_least = tg["time_vs_plain_max"], tg["speedup_vs_peft_min"]

    def verdict(value, limit, upper: bool, note: str = "") -> dict:
        target = f"{'<=' if upper else '>='} {limit}" + (f" ({note})" if note else "")
        met = None if value is None else (value <= limit if upper else value >= limit)
        return {"value": value, "target": target, "met": met}

    olora = speed_ratios["qolora_olora"]
    on_cpu = not device.startswith("cuda")  # on a GPU, CPU time measures host threads, not the work
    v = {
        "time_vs_plain_4bit_load": verdict(olora["time_vs_hf_4bit"], at_most, True),
        "time_vs_qolora_lora_load": verdict(olora["time_vs_qolora_lora"], at_most, True),
    }
    if on_cpu:
        v["cpu_time_vs_plain_4bit_load"] = verdict(olora["cpu_time_vs_hf_4bit"], at_most, True, "cross-check")
    v["speedup_vs_peft"] = verdict(speed_ratios.get("speedup_qolora_olora_vs_peft_olora"), at_least, False)
    v["init_only_speedup_vs_peft"] = verdict(speed_ratios.get("init_only_speedup_vs_peft"), at_least, False,
                                             "init alone, informative")
    if on_cpu:
        v["cpu_speedup_vs_peft"] = verdict(speed_ratios.get("cpu_speedup_qolora_olora_vs_peft_olora"), at_least,
                                           False, "cross-check")
    if real_ratios is not None:
        real = real_ratios["qolora_olora"]
        v["real_model_time_vs_plain_4bit_load"] = verdict(real["time_vs_hf_4bit"], at_most, True, "not an issue target")
        v["real_model_error_vs_plain"] = verdict(real["error_vs_plain"], tg["error_vs_plain_max"], True)
    return v


def _plot(path: Path, speed: dict, speed_ratios: dict, real: dict | None, real_ratios: dict | None, title: str,
          device: str) -> None:
    names = list(speed)
    labels = [LABELS.get(c, c).replace(" ", "\n", 1) for c in names]
    panels = [
        {"title": "prepare / load time (median, min..max)", "labels": labels,
         "values": [speed[c]["seconds"]["median"] for c in names],
         "lo": [speed[c]["seconds"]["min"] for c in names], "hi": [speed[c]["seconds"]["max"] for c in names],
         "ylabel": "seconds", "fmt": "{:.2f}"},
        {"title": "peak memory of the load", "labels": labels, "values": [speed[c]["peak_mb"]["median"] for c in names],
         "ylabel": "MiB (CUDA max allocated)" if device.startswith("cuda") else "MiB (peak RSS)", "fmt": "{:.0f}"},
    ]
    sources = [(speed, speed_ratios, "random layers")] + ([(real, real_ratios, "SmolLM2-135M-Instruct")]
                                                          if real else [])
    for src, src_ratios, where in sources:
        panels.append({"title": f"weight error / plain 4-bit ({where})",
                       "labels": [LABELS.get(c, c).replace(" ", "\n", 1) for c in src],
                       "values": [src_ratios[c]["error_vs_plain"] for c in src], "ylabel": "sum ||W - W_eff|| / plain",
                       "ref": 1.0, "ref_label": "plain QLoRA", "fmt": "{:.3f}"})
    common.bar_panels(path, panels, title)


def _title(c: dict) -> str:
    return (f"init, {c['device']}, {c['layers']} {c['size']}-sized layers, NF4 r={c['rank']}, "
            f"{c['repeats']} alternating reps")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="tinyllama", choices=sorted(common.SIZES))
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the synthetic checkpoint (default 4)")
    p.add_argument("--repeats", type=int, default=None, help="alternating repetitions per contender (default 5)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--skip-peft", action="store_true", help="leave out transformers+PEFT olora (slow on big layers)")
    p.add_argument("--skip-real", action="store_true", help="leave out the error comparison on SmolLM2-135M-Instruct")
    p.add_argument("--quick", action="store_true", help="1 layer, 1 repetition, no real model: a smoke test")
    p.add_argument("--real-repeats", type=int, default=None, help="repetitions on SmolLM2-135M (default 3)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new rounds when another would end past this many seconds")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per worker (default: torch's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--replot", type=Path, default=None, help="only redraw the PNG of an existing result JSON")
    args = p.parse_args(argv)
    if args.replot:
        d = json.loads(args.replot.read_text())
        c, real = d["config"], (d.get("real_model") or {}).get("results")
        _plot(args.replot.with_suffix(".png"), d["speed"], _ratios(d["speed"]), real, _ratios(real) if real else None,
              _title(c), c["device"])
        return 0
    args.layers = args.layers or (1 if args.quick else 4)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.real_repeats = args.real_repeats or (1 if args.quick else 3)
    if args.quick:
        args.skip_real = True

    contenders = [c for c in CONTENDERS if not (args.skip_peft and c == "peft_olora")]
    model_dir = common.synthetic_checkpoint(args.size, args.layers)
    print(f"synthetic checkpoint: {model_dir} ({args.layers} {args.size}-sized layers)", flush=True)
    title = _title(vars(args))
    stem = f"init_{args.device}_{args.size}{args.tag}"
    state: dict = {"speed": None, "real": None, "real_dir": None}

    def save(final: bool = False) -> Path:
        speed, real = state["speed"] or {}, state["real"]
        speed_ratios = _ratios(speed) if speed else {}
        real_ratios = _ratios(real) if real else None
        verdicts = _verdicts(speed, speed_ratios, real_ratios, args.device) if speed_ratios else {}
        payload = {
            "benchmark": "init", "complete": final,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "quant": {"bits": 4, "quant_type": "nf4", "blocksize": 64, "double_quant": True, "rank": args.rank,
                      "alpha": args.alpha, "target_modules": "all decoder linear layers",
                      "compute_dtype": "bfloat16" if args.device == "cuda" else "float32"},
            "checkpoint": str(model_dir), "contenders": {c: LABELS[c] for c in contenders},
            "speed": speed, "speed_ratios": speed_ratios,
            "real_model": {"dir": str(state["real_dir"]), "results": real, "ratios": real_ratios} if real else None,
            "targets": TARGETS["cuda" if args.device == "cuda" else "cpu"], "verdicts": verdicts,
        }
        path = common.write_json(args.out / f"{stem}.json", payload, args.device)
        if final and speed:
            _plot(args.out / f"{stem}.png", speed, speed_ratios, real, real_ratios, title, args.device)
        return path

    def on_speed(summary):
        state["speed"] = summary
        save()

    def on_real(summary):
        state["real"] = summary
        save()

    speed = state["speed"] = _run_series(model_dir, args, contenders, args.repeats, f"{args.size} x{args.layers}",
                                         on_speed)
    speed_ratios = _ratios(speed)
    print()
    print(_table(speed, speed_ratios, title, args.device))

    real_ratios = None
    if not args.skip_real:
        try:
            state["real_dir"] = common.real_model_dir()
        except Exception as exc:  # noqa: BLE001 - the asset package is not installed (e.g. on a GPU machine)
            print(f"\nreal model unavailable, error comparison on it skipped: {type(exc).__name__}: {exc}")
        if state["real_dir"] is not None:
            print(f"\nreal model: {state['real_dir']}", flush=True)
            real = state["real"] = _run_series(state["real_dir"], args, contenders, args.real_repeats, "SmolLM2-135M",
                                               on_real)
            real_ratios = _ratios(real)
            print()
            print(_table(real, real_ratios, f"SmolLM2-135M-Instruct (all 30 layers, 210 linear layers), "
                         f"{args.real_repeats} alternating reps", args.device))

    verdicts = _verdicts(speed, speed_ratios, real_ratios, args.device)
    print("\ntargets:")
    for k, v in verdicts.items():
        val = "n/a" if v["value"] is None else f"{v['value']:.3f}"
        print(f"  {k:34s} {val:>8s}  target {v['target']:8s} "
              f"{'MET' if v['met'] else 'MISSED' if v['met'] is False else 'n/a'}")
    path = save(final=True)
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    if not common.worker_main(worker):
        sys.exit(main())
