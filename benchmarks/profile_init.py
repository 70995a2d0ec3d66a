"""Where the time of a 4-bit load goes: qolora.prepare (olora, lora) vs the transformers 4-bit load.

A diagnostic companion to ``benchmarks/init.py`` (which measures; this one explains). All three
loads run in ONE process, alternating, under ``cProfile``; the cumulative time of a fixed list of
functions is read off each profile and reported per phase (median over the repetitions), with the
CPU time of each load. The phases overlap only where stated (``quantize`` contains ``bucketize``).

    python -m benchmarks.profile_init                       # 4 TinyLlama-sized layers, 3 reps
    python -m benchmarks.profile_init --real                # SmolLM2-135M-Instruct (210 small layers)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

# phase -> (file suffix, function name) whose *cumulative* time is the phase's time; first match wins
PHASES = {
    "bnb quantize_4bit (all)": [("bitsandbytes/functional.py", "quantize_4bit")],
    "  of which torch.bucketize": [("~", "<built-in method torch.bucketize>")],
    "qolora: report error (dequantize + ||W - deq||)": [("qolora/base/quant.py", "dequantize_weight"),
                                                         ("~", "<built-in method torch._C._linalg.linalg_norm>")],
    "qolora: weight fingerprint": [("qolora/checkpoint.py", "weight_fingerprint")],
    "qolora: olora factors (thin QR + Q^T W)": [("qolora/inits.py", "olora_factors")],
    "qolora: lora factors": [("qolora/inits.py", "lora_factors")],
    "qolora: residual W -= s*B@A": [("qolora/inits.py", "residual_")],
    "qolora: AdapterLinear()": [("qolora/adapters/layer.py", "__init__")],
    "qolora: meta skeleton": [("qolora/checkpoint.py", "meta_model"), ("qolora/model/prepare.py", "_skeleton")],
    "qolora: non-linear tensors (set_module_tensor_to_device)": [("accelerate/utils/modeling.py",
                                                                  "set_module_tensor_to_device")],
    "tensor .to() (reads from mmap, fp32 copies)": [("~", "<method 'to' of 'torch._C.TensorBase' objects>")],
    "transformers: materialize tensors": [("transformers/core_model_loading.py", "materialize_tensors")],
}


def _phase_times(stats: pstats.Stats) -> dict[str, float]:
    out = {}
    for phase, keys in PHASES.items():
        total = 0.0
        for suffix, func in keys:
            for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
                if name == func and (file == suffix or file.endswith(suffix)):
                    total += ct
        out[phase] = total
    return out


def _load(which: str, model_dir: str):
    from benchmarks.init import _hf_load, _qolora

    if which == "hf_4bit":
        return _hf_load(model_dir, "cpu")
    return _qolora(model_dir, "cpu", 16, 16.0, which.removeprefix("qolora_"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tinyllama", choices=sorted(common.SIZES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--real", action="store_true", help="profile SmolLM2-135M-Instruct instead")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)

    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import qolora  # noqa: F401

    model_dir = str(common.real_model_dir() if args.real else common.synthetic_checkpoint(args.size, args.layers))
    names = ["qolora_olora", "qolora_lora", "hf_4bit"]
    rows: dict[str, list[dict]] = {n: [] for n in names}
    _load("qolora_lora", model_dir)  # warm the page cache and lazy imports
    for rep, which in common.alternating(names, args.repeats):
        prof = cProfile.Profile()
        wall, cpu = time.perf_counter(), time.process_time()
        prof.enable()
        model = _load(which, model_dir)
        prof.disable()
        row = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        row.update(_phase_times(pstats.Stats(prof)))
        rows[which].append(row)
        del model
        print(f"  rep {rep} {which:13s} wall {row['wall_s']:6.2f} s  cpu {row['cpu_s']:6.2f} s", flush=True)

    keys = ["wall_s", "cpu_s", *PHASES]
    med = {n: {k: statistics.median(r[k] for r in rows[n]) for k in keys} for n in names}
    print(f"\n{model_dir}: median of {args.repeats} (seconds; phases are cProfile cumulative times)")
    print(f"{'phase':58s}" + "".join(f"{n:>14s}" for n in names))
    for k in keys:
        print(f"{k:58s}" + "".join(f"{med[n][k]:14.2f}" for n in names))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model_dir": model_dir, "median": med, "runs": rows,
                                        "machine": common.machine_info("cpu")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
