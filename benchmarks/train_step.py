"""Issues 3 and 15: one QLoRA training step, qolora vs transformers + PEFT, side by side in one run.

Every contender trains the same 4-bit NF4 base (double quant, blocksize 64, compute dtype = qolora's
default for the device) with rank-16 adapters (alpha 16, no dropout) on every decoder linear layer,
on the same token batch, with the same optimizer step (paged 8-bit AdamW, gradient clipping at 1.0)
and non-reentrant gradient checkpointing, under autocast (bf16 on CUDA, none on the CPU):

* ``peft``            -- ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(4-bit))``,
  ``prepare_model_for_kbit_training`` (gradient checkpointing, non-reentrant), ``get_peft_model(
  LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))``; the loss from the full logits
  (``logits[:, :-1].float()`` and ``F.cross_entropy``, summed / tokens, as transformers computes it);
* ``peft_liger``      -- the same stack with Liger Kernel (``apply_liger_kernel_to_llama()`` before loading:
  Triton RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy, which computes the loss inside the
  model's forward from ``labels``, never materializing the logits). CUDA only (Triton); not in the CPU
  default, and recorded as failed where ``liger_kernel`` cannot be imported (carry its wheel, see
  ``benchmarks/README.md``);
* ``qolora_plain``    -- ``qolora.prepare(..., kernels="off")`` with the same full-logits loss: what
  qolora 0.2.0 ran (its OLoRA model, the PEFT-style adapter path);
* ``qolora_chunked``  -- the same model with the training loop's loss (``qolora.training.loop.loss_sum``: the
  chunked loss, gradients computed in its forward pass);
* ``qolora``          -- the default: ``kernels="auto"`` (the fused adapter step) + the loop's loss;
* ``qolora_compile``  -- the default with ``kernels="compile"``: each decoder layer's training forward
  compiled by ``torch.compile`` (``qolora.adapters.compiled_layers``); its first (untimed) step compiles, and
  ``first_step_s`` records what that cost (later processes reuse Inductor's on-disk cache);
* ``qolora_partial``  -- the default with ``gradient_checkpointing=N`` (``--partial-layers N``, only
  the first N decoder layers recompute), N chosen so the measured peak stays at or under PEFT's;
* ``qolora_partial_compile`` -- both;
* ``qolora_defaults`` -- every option at its default: ``qolora.prepare(dir)`` with no option at all, then what
  ``qolora.train`` does at launch with ``TrainConfig()``'s defaults for this batch shape
  (:func:`defaults_choices`: ``gradient_checkpointing="auto"`` and ``kernels="auto"`` resolved by
  :mod:`qolora.training.auto_choices` for batch x seq tokens, ``max_steps=40``, the optimizer ``paged_adamw_8bit``); the
  choices are recorded in the result (``automatic``). The README's first speed figure.

Each contender runs in fresh processes, alternating: ``--rounds`` processes per contender, each
loading the model, running ``--warmup`` untimed steps and ``--steps`` timed ones, with the same
number of torch threads (``--threads``, default: torch's for this machine). Reported: tokens/s
(median over all timed steps), peak memory of the training phase (peak RSS on the CPU, CUDA max
allocated on a GPU; reset after loading) and of the load, and every ratio to ``peft``.

    python -m benchmarks.train_step                                  # CPU, SmolLM2-135M-Instruct, 4 x 256
    python -m benchmarks.train_step --batch 1 --seq 1024 --tag _1x1024
    python -m benchmarks.train_step --device cuda --size 8b --layers 32 --seq 2048 --batch 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

CONTENDERS = ["peft", "peft_liger", "qolora_defaults", "qolora_plain", "qolora_chunked", "qolora", "qolora_compile",
              "qolora_partial", "qolora_partial_compile"]
CPU_CONTENDERS = [c for c in CONTENDERS if c != "peft_liger"]
"""The default set on the CPU (Liger's kernels are Triton, CUDA only)."""
LABELS = {"peft": "transformers+PEFT LoRA", "peft_liger": "transformers+PEFT LoRA + Liger Kernel",
          "qolora_defaults": "qolora, every option at its default",
          "qolora_plain": "qolora, plain path + full logits (0.2.0)",
          "qolora_chunked": "qolora, plain path + chunked loss", "qolora": "qolora default (fused + chunked)",
          "qolora_compile": "qolora default + kernels=compile",
          "qolora_partial": "qolora default, first N layers checkpointed",
          "qolora_partial_compile": "qolora, first N layers checkpointed + compile"}
TARGETS = {"tokens_per_s_vs_peft_min": 1.3, "peak_memory_vs_peft_max": 1.0}
"""Issue 15's CPU targets; they apply to the best qolora row that stays within PEFT's memory."""


# ------------------------------------------------------------------------------------- worker
def _dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _load_qolora(model_dir: str, device: str, rank: int, alpha: float, kernels: str = "auto",
                 gradient_checkpointing: bool | int = True):
    import qolora

    return qolora.prepare(model_dir, bits=4, rank=rank, alpha=alpha, init="olora", quant_type="nf4", blocksize=64,
                          double_quant=True, device=device, gradient_checkpointing=gradient_checkpointing,
                          kernels=kernels, progress=False)


def defaults_choices(model, device: str, batch: int, seq: int) -> list[dict]:
    """Apply what ``qolora.train`` chooses at launch under ``TrainConfig()``'s defaults for a job of ``batch``
    examples of ``seq`` tokens (every example the same length here), as ``_Run.choose_automatic`` does;
    returns the choices."""
    from qolora.adapters.compiled_layers import compile_decoder_layers
    from qolora.training.auto_choices import apply_checkpointing, resolve_checkpointing, resolve_kernels
    from qolora.training.loop import TrainConfig

    defaults = TrainConfig()
    choices = []
    if defaults.gradient_checkpointing == "auto":
        choice = resolve_checkpointing(model, seq_len=seq, batch_size=batch, optim=defaults.optim, device=device)
        apply_checkpointing(model, choice.value)
        choices.append(choice)
    choice = resolve_kernels(model, max_steps=defaults.max_steps, tokens_per_step=batch * seq * defaults.grad_accum,
                             varying_lengths=False, device=device)
    if choice.value == "compile":
        compile_decoder_layers(model)
    choices.append(choice)
    return [c.to_dict() for c in choices]


def _load_peft(model_dir: str, device: str, rank: int, alpha: float, liger: bool = False):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if liger:  # patches transformers' Llama classes in this (worker) process, before the model is built
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=_dtype(device))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb_config, dtype=_dtype(device),
        device_map={"": 0} if device.startswith("cuda") else {"": "cpu"},
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear"))
    model.config.use_cache = False
    return model


_OPTIM_NAMES = {"PagedAdamW8bit": "paged_adamw_8bit", "PagedAdamW32bit": "paged_adamw_32bit",
                "AdamW8bit": "adamw_8bit", "AdamW32bit": "adamw_32bit"}


def _qolora_train_parts(device: str):
    """``(make_optimizer, autocast factory, description)`` from ``qolora.train`` when it offers them.

    ``qolora.train`` builds its optimizer with ``make_optimizer(name, params, lr, weight_decay)`` and
    its autocast with ``resolve_precision("auto", device)``; its step (``_Run.train_step``) is tied to
    its data pipeline, so the step itself is mirrored in :func:`_step` (identical for both contenders).
    Returns None when ``qolora.train`` is missing or its API differs (then the mirror is used alone).
    """
    try:
        import importlib

        import torch

        qtrain = importlib.import_module("qolora.training.loop")  # the module (``qolora.train`` is also the function)

        make_optimizer, resolve_precision = qtrain.make_optimizer, qtrain.resolve_precision
        mode, autocast, scaler = resolve_precision("auto", torch.device(device))
    except Exception:  # noqa: BLE001 - not landed, or changed: fall back to the mirror
        return None
    if scaler is not None:  # fp16 + GradScaler (pre-bf16 GPUs): not what this benchmark compares
        return None
    return make_optimizer, autocast, f"qolora.training.loop.make_optimizer + resolve_precision({mode!r})"


def _autocast(device: str):
    import contextlib
    import functools

    import torch

    if device.startswith("cuda"):
        return functools.partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _step(model, params, opt, autocast, clip: float = 1.0, loss_from: str = "logits"):
    """One optimizer step as ``qolora.train`` runs it (``_Run.train_step`` with one micro-batch): the
    summed next-token cross-entropy under autocast / label tokens, backward, clip the adapters'
    gradient norm, step, ``zero_grad(set_to_none=True)``. ``loss_from``: ``"logits"``: the full fp32
    logits; ``"chunked"``: the loop's own ``qolora.training.loop.loss_sum``; ``"model"``: the model's own mean
    loss from ``labels`` (with Liger, its fused linear cross-entropy)."""
    import torch
    from torch.nn import functional as F

    if loss_from == "chunked":
        from qolora.training.loop import loss_sum

    def step(x):  # x: (B, T) token ids, also the labels
        labels = x[:, 1:]  # (B, T-1): token t predicts t+1
        with autocast():
            if loss_from == "model":
                loss = model(input_ids=x, labels=x, use_cache=False).loss  # mean over the T-1 label tokens
            elif loss_from == "chunked":
                loss = loss_sum(model, {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)})
                loss = loss / labels.numel()
            else:
                logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
        if loss_from == "logits":
            total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum")
            loss = total / labels.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def worker(payload: dict, probe: common.MemoryProbe) -> dict:
    import bitsandbytes as bnb
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import qolora  # noqa: F401

    contender, model_dir, device = payload["contender"], payload["model_dir"], payload["device"]
    if device.startswith("cuda"):
        torch.zeros(1, device=device)
    torch.manual_seed(0)
    result: dict = {"contender": contender}

    probe.start()
    with common.Timer(device) as t_load:
        if contender in ("peft", "peft_liger"):
            model = _load_peft(model_dir, device, payload["rank"], payload["alpha"], liger=contender == "peft_liger")
        elif contender == "qolora_defaults":
            import qolora

            model = qolora.prepare(model_dir, progress=False)  # no option: every default
            result["automatic"] = defaults_choices(model, device, payload["batch"], payload["seq"])
        elif contender in ("qolora_plain", "qolora_chunked"):
            model = _load_qolora(model_dir, device, payload["rank"], payload["alpha"], kernels="off")
        elif contender in ("qolora", "qolora_compile"):
            model = _load_qolora(model_dir, device, payload["rank"], payload["alpha"],
                                 kernels="compile" if contender.endswith("compile") else "auto")
        elif contender in ("qolora_partial", "qolora_partial_compile"):
            model = _load_qolora(model_dir, device, payload["rank"], payload["alpha"],
                                 kernels="compile" if contender.endswith("compile") else "auto",
                                 gradient_checkpointing=payload["partial_layers"])
        else:
            raise ValueError(f"unknown contender {contender!r}")
    probe.stop("load")
    result["load_s"] = t_load.seconds
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in params)
    result["trainable_dtypes"] = sorted({str(p.dtype) for p in params})
    active = getattr(model, "is_activation_checkpointing", None)  # transformers 5 name; PEFT wraps the model
    result["gradient_checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False) if active is None
                                            else active)

    qolora_side = contender.startswith("qolora")
    parts = _qolora_train_parts(device) if qolora_side and payload.get("use_qolora_train", True) else None
    if parts is not None:
        make_optimizer, autocast, how = parts
        opt = make_optimizer(_OPTIM_NAMES.get(payload["optimizer"], payload["optimizer"]), params, payload["lr"], 0.0)
        result["step_impl"] = how
    else:
        opt = getattr(bnb.optim, payload["optimizer"])(params, lr=payload["lr"])
        autocast = _autocast(device)
        result["step_impl"] = (f"bitsandbytes.optim.{payload['optimizer']} + "
                               f"{'bf16 autocast' if device.startswith('cuda') else 'no autocast'}")
    result["optimizer_class"] = type(opt).__name__
    step = _step(model, params, opt, autocast, loss_from={"peft": "logits", "qolora_plain": "logits",
                                                           "peft_liger": "model"}.get(contender, "chunked"))

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1234)
    x = torch.randint(3, vocab, (payload["batch"], payload["seq"]), generator=gen).to(device)
    tokens = x.numel()

    common.release_freed_memory()
    probe.start()
    losses, times, cpu_times = [], [], []
    for i in range(payload["warmup"] + payload["steps"]):
        with common.Timer(device) as t:
            loss = step(x)
        losses.append(float(loss))
        if i == 0:
            result["first_step_s"] = t.seconds  # with kernels="compile": includes the compilation
        if i >= payload["warmup"]:
            times.append(t.seconds)
            cpu_times.append(t.cpu_seconds)
    probe.stop("train")
    result.update(step_s=times, step_cpu_s=cpu_times, tokens_per_s=[tokens / s for s in times],
                  tokens_per_cpu_s=[tokens / s for s in cpu_times], losses=losses, tokens_per_step=tokens)
    return result


# ------------------------------------------------------------------------------------- parent
def _model_dir(args) -> tuple[Path, str]:
    if args.size == "smollm2":
        return common.real_model_dir(), "SmolLM2-135M-Instruct (30 layers)"
    return common.synthetic_checkpoint(args.size, args.layers), f"{args.layers} {args.size}-sized layers (random)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="smollm2", choices=["smollm2", *sorted(common.SIZES)],
                   help="the real SmolLM2-135M-Instruct, or a random checkpoint of --layers layers of these shapes")
    p.add_argument("--layers", type=int, default=None, help="layers of a synthetic checkpoint (default 4)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 256 on CPU, 512 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per process (default 1 on CPU, 2 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default 4 on CPU, 10 on CUDA)")
    p.add_argument("--rounds", type=int, default=None, help="processes per contender, alternating (default 3)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--optimizer", default="PagedAdamW8bit")
    p.add_argument("--no-qolora-train", action="store_true",
                   help="build qolora's optimizer/autocast here too, not with qolora.train's helpers")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--quick", action="store_true", help="1 round, 1 warmup, 2 steps: a smoke test")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new rounds when another would end past this many seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per worker, the same for every contender (default: torch's default "
                        "here, fixed explicitly so qolora's busy-CPU policy does not change it)")
    p.add_argument("--partial-layers", type=int, default=10,
                   help="qolora_partial: decoder layers checkpointed (the rest keep their activations)")
    p.add_argument("--contenders", default=None,
                   help="comma-separated subset of " + ",".join(CONTENDERS) + " (default: all on CUDA; all but "
                        "peft_liger on the CPU)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--tag", default="")
    p.add_argument("--replot", type=Path, default=None, help="only redraw the PNG of an existing result JSON")
    args = p.parse_args(argv)
    if args.replot:
        d = json.loads(args.replot.read_text())
        _plot(args.replot.with_suffix(".png"), d["summary"], _title(d["config"], d["model_desc"]),
              d["config"]["device"])
        return 0
    cuda = args.device == "cuda"
    args.layers = args.layers or 4
    args.seq = args.seq or (512 if cuda else 256)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or not cuda else 2)
    args.steps = args.steps or (2 if args.quick else (10 if cuda else 4))
    args.rounds = args.rounds or (1 if args.quick else 3)

    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    args.contenders = args.contenders or ",".join(CONTENDERS if cuda else CPU_CONTENDERS)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or "peft" not in contenders:
        p.error(f"--contenders: {unknown or 'peft missing'}; choose from {', '.join(CONTENDERS)} (peft required)")
    model_dir, what = _model_dir(args)
    print(f"model: {model_dir} ({what}); batch {args.batch} x seq {args.seq}; {args.rounds} rounds x "
          f"({args.warmup} warmup + {args.steps} timed steps)", flush=True)
    stem = f"train_step_{args.device}_{args.size}{args.tag}"
    title = _title(vars(args), what)
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    for rnd, c in common.budgeted(common.alternating(contenders, args.rounds), args.budget_s):
        payload = {"contender": c, "model_dir": str(model_dir), "device": args.device, "rank": args.rank,
                   "alpha": args.alpha, "lr": args.lr, "optimizer": args.optimizer, "batch": args.batch,
                   "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
                   "use_qolora_train": not args.no_qolora_train, "threads": args.threads,
                   "partial_layers": args.partial_layers}
        res = common.run_worker("benchmarks.train_step", payload, timeout=args.timeout)
        runs[c].append(res)
        if "error" in res:
            print(f"  round {rnd} {c}: FAILED {res['error']}\n{res.get('stderr_tail', '')[-1500:]}", flush=True)
        else:
            tps = common.summarize(res["tokens_per_s"])["median"]
            print(f"  round {rnd} {c:7s} {tps:9.1f} tok/s  "
                  f"train peak {common.peak_mb(res, 'train', args.device):8.0f} MiB"
                  f"  load {res['load_s']:.1f} s  loss {res['losses'][0]:.3f}->{res['losses'][-1]:.3f}"
                  f"  step={res.get('step_impl')}", flush=True)
        _save(args, runs, stem, title, str(model_dir), what, final=False)  # partial results survive a kill

    summary, ratios, verdicts = _save(args, runs, stem, title, str(model_dir), what, final=True)
    unit = "CUDA MiB" if cuda else "RSS MiB"
    print(f"\n{title}")
    print(f"{'contender':46s} {'tok/s (med)':>11s} {'min..max':>17s} {'step s':>7s} {'x peft':>7s}"
          f" {'train peak ' + unit:>20s} {'x peft':>7s} {'load peak':>10s} {'1st step s':>10s}")
    for c, s in summary.items():
        t = s["tokens_per_s"]
        if t["median"] is None:
            print(f"{LABELS[c]:46s} FAILED")
            continue
        speed, mem = ratios[c]["tokens_per_s_vs_peft"], ratios[c]["peak_train_vs_peft"]
        print(f"{LABELS[c]:46s} {t['median']:11.1f} {t['min']:8.1f}..{t['max']:<8.1f} {s['step_s']['median']:7.2f}"
              f" {_fmt(speed):>7s} {s['peak_train_mb']['median']:20.0f} {_fmt(mem):>7s}"
              f" {s['peak_load_mb']['median']:10.0f} {s['first_step_s']['median'] or 0:10.1f}")
    print("targets (the fastest qolora row within PEFT's memory):")
    for k, v in verdicts.items():
        val = "n/a" if v["value"] is None else f"{v['value']:.3f}"
        print(f"  {k:30s} {val:>8s}  target {v['target']:7s} "
              f"{'MET' if v['met'] else 'MISSED' if v['met'] is False else 'n/a'}  ({v.get('contender')})")
    print(f"\nwrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _summarize(runs: dict[str, list[dict]], device: str) -> tuple[dict, dict, dict]:
    summary = {}
    for c, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        summary[c] = {
            "tokens_per_s": common.summarize(t for r in ok for t in r["tokens_per_s"]),
            "tokens_per_s_per_round": [common.summarize(r["tokens_per_s"])["median"] for r in ok],
            "step_s": common.summarize(s for r in ok for s in r["step_s"]),
            "tokens_per_cpu_s": common.summarize(t for r in ok for t in r["tokens_per_cpu_s"]),
            "peak_train_mb": common.summarize(common.peak_mb(r, "train", device) for r in ok),
            "peak_load_mb": common.summarize(common.peak_mb(r, "load", device) for r in ok),
            "load_s": common.summarize(r["load_s"] for r in ok),
            "first_step_s": common.summarize(r.get("first_step_s") for r in ok),
            "trainable_params": next((r["trainable_params"] for r in ok), None),
            "step_impl": next((r.get("step_impl") for r in ok), None),
            "torch_threads": sorted({r.get("torch_threads") for r in ok if r.get("torch_threads")}),
            "failures": [{"error": r["error"], "stderr_tail": r.get("stderr_tail", "")[-1500:]}
                         for r in rs if "error" in r],
            "runs": rs,
        }

    def med(c, k):
        return summary[c][k]["median"]

    ratios = {}
    for c in summary:
        # Rounds ran back to back (peft, qolora_plain, ..., then reversed): the ratio of same-round
        # processes cancels slow drifts of the machine's load better than the ratio of pooled medians.
        pairs = [common.ratio(a, b) for a, b in zip(summary[c]["tokens_per_s_per_round"],
                                                     summary["peft"]["tokens_per_s_per_round"])]
        ratios[c] = {
            "tokens_per_s_vs_peft": common.ratio(med(c, "tokens_per_s"), med("peft", "tokens_per_s")),
            "tokens_per_s_vs_peft_paired_rounds": common.summarize(pairs)["median"],
            "tokens_per_cpu_s_vs_peft": common.ratio(med(c, "tokens_per_cpu_s"), med("peft", "tokens_per_cpu_s")),
            "peak_train_vs_peft": common.ratio(med(c, "peak_train_mb"), med("peft", "peak_train_mb")),
            "peak_load_vs_peft": common.ratio(med(c, "peak_load_mb"), med("peft", "peak_load_mb")),
        }

    tmin, mmax = TARGETS["tokens_per_s_vs_peft_min"], TARGETS["peak_memory_vs_peft_max"]
    within = [c for c in summary if c != "peft" and ratios[c]["tokens_per_s_vs_peft"] is not None
              and ratios[c]["peak_train_vs_peft"] is not None and ratios[c]["peak_train_vs_peft"] <= mmax]
    best = max(within, key=lambda c: ratios[c]["tokens_per_s_vs_peft"], default=None)

    def verdict(key, target, ok):
        value = None if best is None else ratios[best][key]
        return {"value": value, "target": target, "met": None if value is None else ok(value), "contender": best}

    verdicts = {
        "tokens_per_s_vs_peft": verdict("tokens_per_s_vs_peft", f">= {tmin}", lambda v: v >= tmin),
        "peak_memory_vs_peft": verdict("peak_train_vs_peft", f"<= {mmax}", lambda v: v <= mmax),
    }
    if "qolora_defaults" in ratios:  # issue 27: the targets with every option at its default
        for key, ratio, target, ok in (("defaults_tokens_per_s_vs_peft", "tokens_per_s_vs_peft", f">= {tmin}",
                                        lambda v: v >= tmin),
                                       ("defaults_peak_memory_vs_peft", "peak_train_vs_peft", f"<= {mmax}",
                                        lambda v: v <= mmax)):
            value = ratios["qolora_defaults"][ratio]
            verdicts[key] = {"value": value, "target": target, "met": None if value is None else ok(value),
                             "contender": "qolora_defaults"}
    return summary, ratios, verdicts


def _title(config: dict, what: str) -> str:
    return (f"train step, {config['device']}, {what}, batch {config['batch']} x {config['seq']}, r={config['rank']}, "
            f"{config['optimizer']}")


def _plot(path: Path, summary: dict, title: str, device: str) -> None:
    names = [c for c in CONTENDERS if c in summary and summary[c]["tokens_per_s"]["median"] is not None]
    if not names:
        return
    unit = "CUDA MiB" if device == "cuda" else "RSS MiB"
    labels = [LABELS[c].replace(", ", ",\n").replace(" (", "\n(") for c in names]
    common.bar_panels(path, [
        {"title": "tokens/s (median, min..max)", "labels": labels,
         "values": [summary[c]["tokens_per_s"]["median"] for c in names],
         "lo": [summary[c]["tokens_per_s"]["min"] for c in names],
         "hi": [summary[c]["tokens_per_s"]["max"] for c in names], "ylabel": "tokens / s", "fmt": "{:.1f}"},
        {"title": "peak memory, training phase", "labels": labels,
         "values": [summary[c]["peak_train_mb"]["median"] for c in names], "ylabel": unit, "fmt": "{:.0f}"},
        {"title": "peak memory, load phase", "labels": labels,
         "values": [summary[c]["peak_load_mb"]["median"] for c in names], "ylabel": unit, "fmt": "{:.0f}"},
    ], title)


def _save(args, runs, stem: str, title: str, model_dir: str, what: str, final: bool):
    summary, ratios, verdicts = _summarize(runs, args.device)
    payload = {"benchmark": "train_step", "complete": final,
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "model": model_dir, "model_desc": what, "contenders": LABELS, "summary": summary, "ratios": ratios,
               "targets": TARGETS, "verdicts": verdicts}
    common.write_json(args.out / f"{stem}.json", payload, args.device)
    if final:
        _plot(args.out / f"{stem}.png", summary, title, args.device)
    return summary, ratios, verdicts


if __name__ == "__main__":
    if not common.worker_main(worker):
        sys.exit(main())
