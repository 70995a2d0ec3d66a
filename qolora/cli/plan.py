"""``qolora plan``: the memory planner (:func:`qolora.planning.plan.plan`) on the command line."""

from __future__ import annotations

import argparse
import json

from ..base.hf_config import builtin_configs
from ..config import BITS
from ..memory.gradient_checkpointing import checkpointing_mode
from ..planning.memory_model import OPTIMIZERS
from ..planning.plan import plan

__all__ = ["add_parser", "checkpointing_arg", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``qolora plan`` on an argparse subparsers object; choices come from the library's constants."""

    p = subparsers.add_parser(
        "plan", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="predict the GPU memory of fine-tuning a model, from its config.json alone",
        description="Does it fit, and with what? Reads only MODEL's config.json (a file, a folder, a cached hub id or "
                    f"a built-in name: {', '.join(builtin_configs())}) and predicts the peak memory of training.",
    )
    p.add_argument("model", help="config.json file, folder holding one, hub id, or built-in name")
    p.add_argument("--bits", type=int, default=4, choices=list(BITS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="adapter alpha (default: rank)")
    p.add_argument("--target-modules", default=None, type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                   help="comma-separated layer names (default: every linear layer but the head)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--optim", default=OPTIMIZERS[0], choices=list(OPTIMIZERS))
    p.add_argument("--gradient-checkpointing", nargs="?", const=True, default=True, type=checkpointing_arg,
                   metavar="{on,off,offload,N}",
                   help="recompute activations in the backward pass; offload: also keep the layer checkpoints in "
                        "pinned host memory; N: checkpoint only the first N decoder layers")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="assume the chunked loss (no full fp32 logits)")
    p.add_argument("--gpu-memory", default=None, help="GPU memory to fit, e.g. 24GiB, 24GB, 80G")
    p.add_argument("--offload", default="none", choices=["none", "auto", "cpu"],
                   help="keep decoder layers' frozen base in host memory: none, auto (as few layers as needed to fit "
                        "--gpu-memory), cpu (all)")
    p.add_argument("--host-memory", default=None,
                   help="host memory the offloaded part must fit, e.g. 64GiB ('available': this machine's)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="data-parallel GPUs (torchrun); --batch-size is per GPU; the plan is per GPU")
    p.add_argument("--fsdp", action="store_true", help="shard the quantized base over the GPUs (FSDP-QLoRA)")
    p.add_argument("--offload-embedding", action="store_true",
                   help="keep the frozen input embedding in pinned host memory (untied embeddings only)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Run ``qolora plan`` from parsed arguments; prints the table (or JSON); exit code 0, or 1 when it does not fit
    the GPU memory or the host memory given."""
    result = plan(args.model, bits=args.bits, rank=args.rank, alpha=args.alpha, target_modules=args.target_modules,
                  seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, optim=args.optim,
                  gradient_checkpointing=args.gradient_checkpointing, chunked_loss=args.chunked_loss,
                  gpu_memory=args.gpu_memory, offload=args.offload, host_memory=_host_memory(args.host_memory),
                  num_gpus=args.num_gpus, fsdp=args.fsdp, offload_embedding=args.offload_embedding)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format_table())
    return 1 if result.fits is False or result.host_fits is False else 0


def checkpointing_arg(text: str) -> bool | str | int:
    """argparse type of ``--gradient-checkpointing``: auto, on, off, offload, or a number of layers N."""
    try:
        return checkpointing_mode(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: choose auto, on, off, offload, or a number of layers N >= 0 "
                                         "(checkpoint the first N)") from None


def _host_memory(value: str | None) -> int | str | None:
    if value == "available":
        from ..memory.host_memory import available_host_bytes

        return available_host_bytes()
    return value
