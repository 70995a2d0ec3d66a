"""One steady-state training step of a tiny prepared model, counted exactly (benchmarks.memtrack), beside the
plan's prediction for the same job: the planner tests' shared measurement."""

from __future__ import annotations

import contextlib
import functools

import torch

import qolora
from benchmarks.memtrack import MemTracker
from qolora.adapters.layer import adapter_parameters
from qolora.planning.plan import plan
from qolora.training.loop import loss_sum, make_optimizer


def measure_step_peak(folder, cfg, *, bf16: bool, checkpointing, seq: int = 256, offload_embedding: bool = False,
                      rank: int = 8, batch_size: int = 1):
    """``(model, predicted plan, measured peak bytes)`` of the second of two steps (the one that holds the
    optimizer states: the steady state the plan predicts), for a random ``cfg`` model saved to ``folder``.
    ``batch_size > 1``: the last example is padded over its last quarter (a padding mask, as a real batch has)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    model = qolora.prepare(folder, bits=4, rank=rank, gradient_checkpointing=checkpointing, progress=False,
                           offload_embedding=offload_embedding, **({"dtype": "bf16"} if bf16 else {}))
    model.train()
    params = [p for _, p in adapter_parameters(model)]
    opt = make_optimizer("adamw_8bit", params, 1e-4, 0.0)
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if batch_size > 1:
        mask[-1, seq - seq // 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def step():
        with autocast():
            loss = loss_sum(model, batch)  # the training loop's own loss
        (loss / ids.numel()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with MemTracker() as tracker:
        step()
        step()
    predicted = plan(cfg, bits=4, rank=rank, seq_len=seq, batch_size=batch_size, optim="adamw_8bit",
                     gradient_checkpointing=checkpointing, compute_dtype="bf16" if bf16 else "fp32", chunked_loss=True,
                     device="cpu", padded=batch_size > 1,
                     offload_embedding=offload_embedding)
    return model, predicted, tracker.peak
