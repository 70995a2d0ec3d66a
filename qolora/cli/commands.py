"""The ``qolora`` command: ``finetune``, ``merge``, ``export``, ``info``, ``chat`` and ``plan``.

``qolora finetune`` with no arguments runs the built-in job (SmolLM2-135M-Instruct, 4-bit base,
OLoRA rank 16, chatterbot English conversations) sized to finish in minutes on a 2-core CPU (the
README's Quickstart gives the measured time); every option maps to :func:`qolora.training.finetune.finetune`.
``qolora merge`` writes a merged full-precision checkpoint (:func:`qolora.export.merge.merge`), ``qolora info``
describes an adapter folder, a merged checkpoint, a run folder or a checkpoint, ``qolora chat`` talks to
the result (:mod:`qolora.cli.chat`), ``qolora export`` writes it where people run models (GGUF for llama.cpp /
Ollama, a merged checkpoint, a PEFT LoRA: :mod:`qolora.cli.export`). Option choices and defaults come from the library
(its constants and signatures), never repeated here.

An error prints one line on stderr and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..training.run_folder import RunFolder

__all__ = ["main", "build_parser"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------- parser
class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` unless the help text already explains the default, or for flags."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "auto", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _add_finetune(sub) -> None:
    from ..training.finetune import finetune
    from ..training.options import TrainConfig

    d = TrainConfig()
    f = {name: p.default for name, p in inspect.signature(finetune).parameters.items()}
    p = sub.add_parser(
        "finetune", formatter_class=_Help,
        help="fine-tune a causal LM with a quantized base and OLoRA adapters",
        description="Fine-tune a causal LM: quantize the base to 4/8 bits once, attach OLoRA (or PiSSA / LoRA) "
                    "adapters, train them, save the adapter to OUTPUT_DIR/adapter. With no arguments: the built-in "
                    "job (SmolLM2-135M-Instruct, 4-bit, OLoRA r=16, chatterbot English conversations), a few "
                    "minutes on a 2-core CPU (the README's Quickstart gives the measured time).",
    )
    _finetune_data_args(p, d, f)
    _finetune_adapter_args(p, d, f)
    _finetune_training_args(p, d, f)
    _finetune_eval_args(p, d, f)
    _finetune_run_args(p, d, f)
    p.set_defaults(func=_finetune)


def _finetune_data_args(p, d, f) -> None:
    """``qolora finetune`` options: model and data: which checkpoint, which records, how they become examples."""
    from ..data.tokens import FORMATS

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="transformers checkpoint folder or hub id (default: built-in SmolLM2-135M-Instruct)")
    g.add_argument("--data", default=None,
                   help=".jsonl/.json/.csv/.parquet/.txt file, save_to_disk folder or hub dataset "
                        "(default: built-in chatterbot English conversations)")
    g.add_argument("--format", default=None, choices=list(FORMATS),
                   help="record format (default: detected from the columns)")
    g.add_argument("--max-length", type=int, default=f["max_length"], help="tokens per example (longer: truncated)")
    g.add_argument("--packing", action="store_true", help="pack several examples into each sequence")
    g.add_argument("--no-mask-prompt", dest="mask_prompt", action="store_false",
                   help="train on the prompts too, not only the answers")
    g.add_argument("--eval-fraction", type=float, default=f["eval_fraction"], help="share of examples held out")


def _finetune_adapter_args(p, d, f) -> None:
    """``qolora finetune`` options: the adapters and the quantized base, and where the model lives."""
    from ..adapters.kernels import KERNEL_CHOICES
    from ..config import BITS
    from ..inits import INITS

    g = p.add_argument_group("adapters and quantization")
    g.add_argument("--bits", type=int, default=f["bits"], choices=list(BITS),
                   help="base weights: 4-bit NF4, 8-bit, or 16 (none)")
    g.add_argument("--rank", type=int, default=f["rank"], help="adapter rank")
    g.add_argument("--alpha", type=float, default=None, help="adapter alpha (default: = rank, scale 1)")
    g.add_argument("--init", default=f["init"], choices=sorted(INITS), help="adapter initialisation")
    g.add_argument("--refine", type=int, default=0, metavar="K",
                   help="olora/pissa: K rounds of quantization-aware refinement of the init (refit the adapter to "
                        "what quantizing the residual loses; 0: off)")
    g.add_argument("--target-modules", type=_csv, default=None,
                   help="comma-separated layer names to adapt, e.g. q_proj,v_proj (default: every linear layer but the "
                        "output head and MoE routers such as shared_expert_gate)")
    g.add_argument("--dropout", type=float, default=0.0, help="adapter dropout")
    g.add_argument("--quant-storage", default="uint8", choices=["uint8", "bf16", "fp16", "fp32"],
                   help="storage dtype of the packed 4-bit weights (--fsdp needs a float one: bf16 on GPUs, fp32 on "
                        "the CPU)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the 4-bit base over the processes with FSDP2 (needs --quant-storage "
                        "bf16/fp32 and --optim adamw; no sample answers)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--offload", default="none", choices=["none", "auto", "cpu"],
                   help="keep decoder layers' frozen 4-bit base in host memory and stream it in per layer: none, "
                        "auto (only as many layers as needed to fit the GPU), cpu (all layers)")
    g.add_argument("--gpu-memory", default=None, help="with --offload auto: GPU memory to fit, e.g. 24GiB "
                                                      "(default: the free memory)")
    g.add_argument("--offload-embedding", action="store_true",
                   help="keep the frozen input embedding in pinned host memory; only its row gather runs there "
                        "(untied embeddings only; ~2 GiB less GPU memory for a 128k-vocabulary 70B model)")
    g.add_argument("--kernels", default="auto", choices=list(KERNEL_CHOICES),
                   help="auto: the fused base + adapter training step wherever it applies (logged where not), and "
                        "the decoder layers compiled when the run is long enough to repay the compilation (decided "
                        "and logged at launch); compile: always compiled with torch.compile "
                        "(the first step pays the compilation); off: the plain PEFT-style path")


def _finetune_training_args(p, d, f) -> None:
    """``qolora finetune`` options: the optimizer, the schedule, precision and checkpointing."""
    from ..training.options import DEFAULT_LR, MIXED_PRECISION, OPTIMIZERS
    from .plan import checkpointing_arg

    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=_none_or(float), default=None,
                   help="peak learning rate (default: by init: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--warmup-steps", type=_none_or(int), default=None,
                   help="linear warmup steps (default: warmup-ratio x max-steps)")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="warmup as a fraction of max-steps")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine decays to lr x this")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=_none_or(float), default=d.max_grad_norm,
                   help="gradient clipping (none: off)")
    g.add_argument("--optim", default=d.optim, choices=list(OPTIMIZERS), help="optimizer (bitsandbytes or torch AdamW)")
    g.add_argument("--mixed-precision", default=d.mixed_precision, choices=list(MIXED_PRECISION),
                   help="auto: bf16 on GPUs with bf16, fp16 + grad scaler on older GPUs, none on the CPU")
    g.add_argument("--gradient-checkpointing", nargs="?", const=True, default=d.gradient_checkpointing,
                   type=checkpointing_arg, metavar="{auto,on,off,offload,N}",
                   help="auto (default): at launch, the fewest checkpointed decoder layers (or none) whose step fits "
                        "the device's free memory with a margin, from the memory plan for this job (offload when even "
                        "every layer does not fit; one notch more if a step runs out of memory); on: recompute "
                        "activations in the backward pass; offload: also keep each layer's "
                        "checkpoint in pinned host memory until its recompute (least GPU memory, a little slower); "
                        "N: checkpoint only the first N decoder layers (faster, more memory: see qolora plan)")
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep activations instead of recomputing them (faster, more memory)")
    g.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="plain shuffle instead of batching examples of similar length (more padding)")
    g.add_argument("--seed", type=int, default=d.seed, help="data order and RNG seed")


def _finetune_eval_args(p, d, f) -> None:
    """``qolora finetune`` options: held-out eval, sample answers, checkpoints, logging."""
    g = p.add_argument_group("eval, samples, checkpoints")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="eval loss every N steps (0: start and end)")
    g.add_argument("--max-eval-examples", type=_none_or(int), default=d.max_eval_examples,
                   help="eval on at most this many held-out examples (none: all)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: end only)")
    g.add_argument("--keep-last", type=_none_or(int), default=d.keep_last, help="checkpoints kept (none: all)")
    g.add_argument("--log-every", type=int, default=d.log_every, help="metrics.jsonl train event every N steps")
    g.add_argument("--n-samples", type=int, default=d.n_samples, help="held-out prompts answered before and after")
    g.add_argument("--sample-prompt", dest="sample_prompts", action="append", default=None, metavar="TEXT",
                   help="own prompt for the samples (repeatable; default: held-out prompts)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="sample answer length limit")


def _finetune_run_args(p, d, f) -> None:
    """``qolora finetune`` options: the run folder, resuming, threads, progress."""
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=d.output_dir,
                   help="run folder: metrics, plot, samples, checkpoints, adapter")
    g.add_argument("--resume", action="store_true", help="continue the run in OUTPUT_DIR from its newest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete an earlier run in OUTPUT_DIR and start over")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, or 1 when the CPU is already busy)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_merge(sub) -> None:
    from ..export.merge import INTO, merge

    m = {name: p.default for name, p in inspect.signature(merge).parameters.items()}
    p = sub.add_parser(
        "merge", formatter_class=_Help,
        help="merge a saved adapter into its base: a plain transformers checkpoint",
        description="Write BASE with ADAPTER merged into it as an ordinary transformers checkpoint at OUT "
                    "(streamed shard by shard, atomically).",
    )
    p.add_argument("base", help="the full-precision checkpoint the adapter was trained on (folder or hub id)")
    p.add_argument("adapter", help="adapter folder (e.g. OUTPUT_DIR/adapter of qolora finetune)")
    p.add_argument("out", help="folder to write")
    p.add_argument("--dtype", default=m["dtype"], choices=["bf16", "fp16", "fp32"], help="dtype of the written weights")
    p.add_argument("--into", default=m["into"], choices=list(INTO),
                   help="trained: exactly the function trained on the quantized base; original: the update added "
                        "to the full-precision weights")
    p.add_argument("--max-shard-size", default=m["max_shard_size"], help="largest shard")
    p.add_argument("--device", default=None, help="where layers are merged (default: as in training)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="merge even if BASE's weights differ from the base the adapter was trained on")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_merge)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe an adapter folder, a run folder or a checkpoint",
                       description="Describe PATH: an adapter folder, a qolora finetune output folder, or one "
                                   "training checkpoint (verified against its manifest).")
    p.add_argument("path", help="adapter folder, run folder or checkpoint folder")
    p.set_defaults(func=_info)


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat", formatter_class=_Help,
        help="talk to a fine-tuned model (an adapter on its base, or a merged folder)",
        description="Answer --prompt, or chat interactively (one message per line; an empty line or EOF ends), "
                    "with an adapter on its base (dequantized in memory for speed when it fits) or a merged "
                    "checkpoint. Answers are greedy and streamed token by token.",
    )
    p.add_argument("--adapter", default=None, help="adapter folder (e.g. qolora-output/adapter)")
    p.add_argument("--base", default=None, help="the adapter's base (default: the base recorded in the adapter)")
    p.add_argument("--merged", default=None, help="a merged checkpoint folder (qolora merge) instead of --adapter")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit (default: interactive)")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (deterministic); > 0: sampling")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--no-dequantize", dest="dequantize", action="store_false", default=None,
                   help="keep the 4-bit model (less memory, slower on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: as qolora finetune)")
    p.set_defaults(func=_chat)


def build_parser() -> argparse.ArgumentParser:
    """The ``qolora`` argument parser."""
    parser = argparse.ArgumentParser(prog="qolora",
                                     description="Quantized fine-tuning of causal LMs with OLoRA adapters.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_finetune(sub)
    _add_merge(sub)
    _add_info(sub)
    _add_chat(sub)
    from .export import add_export_command
    from .plan import add_parser as _add_plan

    add_export_command(sub, formatter_class=_Help)

    _add_plan(sub)
    return parser


# ----------------------------------------------------------------------------------- commands
def _finetune(args) -> int:
    from ..training.finetune import finetune
    from ..training.reporting import prompt_preview

    _set_threads(args.threads)
    adapter_options = {"dropout": args.dropout, "device": args.device, "refine": args.refine,
                       "quant_storage": args.quant_storage}
    train_options = {k: getattr(args, k) for k in (
        "max_steps", "batch_size", "grad_accum", "lr", "warmup_steps", "warmup_ratio", "min_lr_ratio", "weight_decay",
        "max_grad_norm", "optim", "mixed_precision", "gradient_checkpointing", "group_by_length", "seed", "eval_every",
        "max_eval_examples", "save_every", "keep_last", "log_every", "n_samples", "sample_prompts", "max_new_tokens",
        "fsdp", "overwrite", "progress")}
    result = finetune(
        args.model, args.data, output_dir=args.output_dir, bits=args.bits, rank=args.rank, init=args.init,
        alpha=args.alpha, target_modules=args.target_modules, format=args.format, max_length=args.max_length,
        packing=args.packing, mask_prompt=args.mask_prompt, eval_fraction=args.eval_fraction, resume=args.resume,
        offload=args.offload, gpu_memory=args.gpu_memory, kernels=args.kernels,
        offload_embedding=args.offload_embedding, adapter_options=adapter_options,
        **train_options,
    )
    from ..devices import world

    if not world().is_main:  # under torchrun: rank 0 reports
        return 0
    print()
    print(f"done: {result.summary()}")
    injected = next((s["system_from_template"] for s in result.samples if s.get("system_from_template")), None)
    if injected:
        print(f"note: the sample prompts begin with the system prompt {injected!r}: the model's chat template adds "
              "it to every conversation that has none (your data does not contain it)")
    for i, s in enumerate(result.samples, 1):
        shown = s["prompt"].replace(s["system_from_template"], "") if s.get("system_from_template") else s["prompt"]
        print(f"\nsample {i}: {prompt_preview(shown, 120)}")
        if s.get("reference"):
            print(f"  reference:       {s['reference']}")
        print(f"  before training: {s['before']}")
        print(f"  after training:  {s['after']}")
    print()
    print(f"adapter:  {result.adapter_dir}")
    print(f"metrics:  {result.metrics_path}")
    if result.plot_path:
        print(f"plot:     {result.plot_path}")
    if result.samples_path:
        print(f"samples:  {result.samples_path}")
    return 0


def _set_threads(requested: int | None) -> None:
    """``--threads``, or the library's busy-CPU policy (:mod:`qolora.devices`)."""
    from ..devices import cpu_thread_policy, set_threads

    if requested is not None:
        set_threads(requested)
    else:
        cpu_thread_policy()


def _merge(args) -> int:
    from ..export.merge import merge

    result = merge(args.base, args.adapter, args.out, dtype=args.dtype, into=args.into,
                   max_shard_size=args.max_shard_size, overwrite=args.overwrite, device=args.device,
                   allow_base_mismatch=args.allow_base_mismatch, progress=args.progress)
    print(f"merged {result['merged_layers']} adapted layers ({result['into']}, {result['dtype']}) into "
          f"{result['out_dir']}: {result['shards']} shard(s), {result['total_bytes'] / 1e6:.1f} MB in "
          f"{result['seconds']:.1f} s")
    return 0


def _chat(args) -> int:
    from ..errors import ConfigError
    from .chat import load_chat_model, reply

    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if not args.temperature >= 0:
        problems.append(f"--temperature={args.temperature} must be >= 0")
    if args.prompt is not None and not args.prompt.strip():
        problems.append("--prompt is empty")
    if (args.adapter is None) == (args.merged is None):
        problems.append("give exactly one of --adapter DIR and --merged DIR")
    if problems:
        raise ConfigError(problems)
    _set_threads(args.threads)
    model, tokenizer = load_chat_model(adapter=args.adapter, base=args.base, merged=args.merged, device=args.device,
                                       dequantize=args.dequantize, progress=sys.stderr.isatty())
    history = [{"role": "system", "content": args.system}] if args.system else []
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "stream": True}
    if args.prompt is not None:
        reply(model, tokenizer, [*history, {"role": "user", "content": args.prompt}], **options)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message and press Enter; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = _stdin_line()
        except UnicodeDecodeError as exc:
            print(f"chat: skipped a line that is not UTF-8 text (byte {exc.start}); type it again", file=sys.stderr)
            continue
        if not line.strip():
            return 0
        history.append({"role": "user", "content": line.rstrip("\n")})
        answer = reply(model, tokenizer, history, **options)
        history.append({"role": "assistant", "content": answer})


def _stdin_line() -> str:
    """One line of standard input, decoded as UTF-8 whatever the locale says (UnicodeDecodeError if it is not)."""
    raw = getattr(sys.stdin, "buffer", None)
    return sys.stdin.readline() if raw is None else raw.readline().decode("utf-8")


def _info(args) -> int:
    from ..export.merge import MERGE_RECORD
    from ..model.adapter_folder import QOLORA_CONFIG
    from ..training.checkpoints import MANIFEST_FILE, STATE_FILE
    from ..training.run_folder import RunFolder

    path = Path(args.path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    if (path / QOLORA_CONFIG).is_file():
        _info_adapter(path)
    elif (path / MERGE_RECORD).is_file():
        _info_merged(path / MERGE_RECORD)
    elif (path / MANIFEST_FILE).is_file() or (path / STATE_FILE).is_file():
        _info_checkpoint(path)
    elif RunFolder(path).is_run():
        _info_run(RunFolder(path))
    else:
        raise ValueError(f"{path} is neither an adapter folder, a merged checkpoint, a qolora run folder nor a "
                         "training checkpoint")
    return 0


def _info_merged(record_path: Path) -> None:
    import json

    r = json.loads(record_path.read_text(encoding="utf-8"))
    print(f"merged checkpoint {record_path.parent}")
    print(f"  {r.get('init')} adapter {r.get('adapter')} (rank {r.get('rank')}, {r.get('bits')}-bit base) merged into "
          f"{r.get('base')} as {r.get('into')!r}, {r.get('dtype')} weights")


def _info_adapter(path: Path) -> None:
    from ..model.adapter_folder import read_adapter

    saved = read_adapter(path)
    c = saved.config
    n_params = sum(a.numel() + b.numel() for a, b in saved.weights.values())
    print(f"adapter {path}")
    print(f"  init {c.init}, rank {c.rank}, alpha {c.lora_alpha:g} (scale {saved.scale:g}), {c.bits}-bit base"
          + (f" ({c.quant_type}, blocksize {c.blocksize})" if c.bits == 4 else ""))
    print(f"  {len(saved.layers)} adapted layers ({', '.join(saved.peft_target_modules or [])}), "
          f"{n_params:,} trainable parameters")
    print(f"  base {saved.base_name_or_path} (fingerprint {saved.fingerprint}), quantized on {saved.device_type}")


def _info_checkpoint(path: Path) -> None:
    from ..training.checkpoints import CheckpointError, load_checkpoint

    try:
        found = load_checkpoint(path)
    except CheckpointError as exc:
        print(f"checkpoint {path}: NOT USABLE: {exc}")
        return
    s = found.state
    last = s["history"][-1] if s.get("history") else None
    print(f"checkpoint {path}: step {found.step} of {s['train_config']['max_steps']} (verified)")
    if last:
        print(f"  train loss {last['loss']:.4f}, lr {last['lr']:.3g}")
    if s.get("evals"):
        print(f"  eval loss {s['evals'][0]['eval_loss']:.4f} (step 0) -> {s['evals'][-1]['eval_loss']:.4f} "
              f"(step {s['evals'][-1]['step']})")
    print(f"  data position: epoch {s['data_position']['epoch']}, index {s['data_position']['index']}")


def _info_run(folder: RunFolder) -> None:
    from ..training.checkpoints import CheckpointError, list_checkpoints, verify_checkpoint
    from ..training.reporting import MetricsLog

    path = folder.root
    events = MetricsLog(folder.metrics).read()
    start = next((e for e in events if e["event"] == "start"), {})
    steps = [e["step"] for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    ended = any(e["event"] == "end" for e in events)
    errors = [e for e in events if e["event"] == "error"]
    total = start.get("train_config", {}).get("max_steps", "?")
    state = "finished" if ended else ("stopped by an error" if errors else "not finished (resume with --resume)")
    print(f"run {path}: {state}, last logged step {steps[-1] if steps else 0} of {total}")
    if start:
        print(f"  lr {start['lr']:.3g} ({start['lr_reason']}), {start['n_train']} train / {start['n_eval']} eval "
              f"examples, {start['trainable_params']:,} trainable parameters")
    if evals:
        print(f"  eval loss {evals[0]['eval_loss']:.4f} (step {evals[0]['step']}) -> {evals[-1]['eval_loss']:.4f} "
              f"(step {evals[-1]['step']})")
    if errors:
        print(f"  error: {errors[-1]['message']}")
    ckpts = list_checkpoints(folder.checkpoints)
    print(f"  checkpoints: {', '.join(p.name for _, p in ckpts) if ckpts else 'none'}")
    for _, checkpoint in reversed(ckpts):  # newest first, as --resume looks: until one verifies
        try:
            verify_checkpoint(checkpoint)
        except CheckpointError as exc:
            print(f"  {checkpoint.name}: NOT USABLE: {exc}")
            continue
        if checkpoint != ckpts[-1][1]:
            print(f"  --resume would continue from {checkpoint.name}")
        break
    if folder.adapter.is_dir():
        print(f"  adapter: {folder.adapter}")


# --------------------------------------------------------------------------------------- main
class _TqdmHandler(logging.Handler):
    """Log records written above a running progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def _cli_logging(debug: bool, quiet: bool):
    """qolora's log records above the progress bars while the command runs; the previous logging
    state is restored afterwards (``main`` may run inside another program, or a test session)."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    log, bnb_log = logging.getLogger("qolora"), logging.getLogger("bitsandbytes")
    saved = (log.handlers[:], log.level, log.propagate, bnb_log.level)
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    try:
        with warnings.catch_warnings():
            if not debug:  # known, harmless noise from the libraries underneath
                bnb_log.setLevel(logging.ERROR)
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
                warnings.filterwarnings("ignore", message=r".*[Pp]aged optimizers are not supported on CPU.*")
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            yield
    finally:
        log.handlers[:], level, log.propagate, bnb_level = saved
        log.setLevel(level)
        bnb_log.setLevel(bnb_level)


def _one_line(exc: BaseException, flags: dict[str, str] | None = None) -> str:
    """The error as one line; problems that name an option (``batch_size=0 ...``) name its flag instead
    (``--batch-size=0 ...``), as the user typed it."""
    problems = getattr(exc, "problems", None)
    if problems and flags:
        problems = [_flag_terms(p, flags) for p in problems]
    text = "; ".join(problems) if problems else str(exc)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or type(exc).__name__


def _flag_terms(problem: str, flags: dict[str, str]) -> str:
    name, sep, rest = problem.partition("=")
    return f"{flags[name]}={rest}" if sep and name in flags else problem


def _flags(parser: argparse.ArgumentParser, command: str | None) -> dict[str, str]:
    """``{"batch_size": "--batch-size", ...}`` for the options of ``command``'s subparser."""
    for action in parser._actions:  # argparse keeps subparsers here; no public accessor
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            flags: dict[str, str] = {}
            for a in action.choices[command]._actions:  # the first option of a dest: --x before its --no-x
                if a.option_strings and a.option_strings[-1].startswith("--"):
                    flags.setdefault(a.dest, a.option_strings[-1])
            return flags
    return {}


def main(argv: list[str] | None = None) -> int:
    """Run the ``qolora`` command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _cli_logging(args.debug, args.quiet):
            return args.func(args)
    except KeyboardInterrupt:
        print("qolora: interrupted" + (" (continue with --resume)" if args.command == "finetune" else ""),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI turns every error into one line
        if args.debug:
            raise
        print(f"qolora: error: {_one_line(exc, _flags(parser, args.command))}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
