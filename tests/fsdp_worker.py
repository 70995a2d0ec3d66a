"""Run under torchrun (2 CPU processes, gloo) by tests/training/test_fsdp.py: one data-parallel step and one
FSDP-sharded step on the same global batch; rank 0 writes the comparison as JSON to argv[2]."""

import json
import sys

import torch

from qolora import AdapterConfig, prepare
from qolora.adapters.layer import adapter_parameters
from qolora.training import distributed as dist
from qolora.training.fsdp import fsdp_problems, full_adapter_state, shard_model
from qolora.training.loop import loss_sum

model_dir, out = sys.argv[1], sys.argv[2]
with dist.session("cpu") as world:
    config = AdapterConfig(rank=4, device="cpu", quant_storage="fp32")
    ref, net = prepare(model_dir, config=config, progress=False), prepare(model_dir, config=config, progress=False)
    uint8 = prepare(model_dir, config=AdapterConfig(rank=4, device="cpu"), progress=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2 * world.size, 12), generator=g)  # the global batch, equal on every rank
    labels = ids.clone()
    labels[:, :4] = -100
    mine = slice(2 * world.rank, 2 * world.rank + 2)
    batch = {"input_ids": ids[mine], "labels": labels[mine], "attention_mask": torch.ones_like(ids[mine])}
    n_labels = int((labels[:, 1:] != -100).sum())

    def step(model, reduce: bool):
        opt = torch.optim.AdamW([p for _, p in adapter_parameters(model)], lr=1e-2)
        loss = loss_sum(model, batch)
        (loss / n_labels).backward()
        if reduce:
            dist.all_reduce_grads([p for _, p in adapter_parameters(model)])
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in adapter_parameters(model)}
        opt.step()
        return float(loss), grads, full_adapter_state(model)

    w0 = full_adapter_state(ref)
    w0 = {k: v.clone() for k, v in w0.items()}
    loss_ref, g_ref, w_ref = step(ref, reduce=True)
    shard_model(net)
    sharded = [n for n, p in net.named_parameters() if type(p.data).__name__ == "DTensor" or hasattr(p, "placements")]
    loss_fsdp, g_fsdp, w_fsdp = step(net, reduce=False)

    def adamw_step(weights, grads):
        """`step`'s optimizer update applied to plain copies of ``weights`` with the given gradients."""
        params = {k: w.clone().requires_grad_(True) for k, w in weights.items()}
        for k, p in params.items():
            p.grad = grads[k].clone()
        torch.optim.AdamW(list(params.values()), lr=1e-2).step()
        return {k: p.detach() for k, p in params.items()}

    def unexplained_rel(w_a, w_b, g_a, g_b, lr=1e-2, eps=1e-8):
        """Weight difference beyond what the gradient difference implies through AdamW's first step.

        That step moves each weight by lr * f(g) with f(x) = x / (|x| + eps) (weight decay acts the same on
        both); |f(a) - f(b)| <= |a - b| * max f' on [a, b], f'(x) = eps / (|x| + eps)^2 (1 / eps if the sign
        differs). Gradient elements near eps amplify summation-order differences up to lr / (4 eps).
        """
        worst = 0.0
        for k in w_b:
            a, b = g_a[k].abs(), g_b[k].abs()
            slope = torch.where(g_a[k].sign() == g_b[k].sign(), eps / (torch.minimum(a, b) + eps) ** 2, 1 / eps)
            beyond = ((w_a[k] - w_b[k]).abs() - lr * (g_a[k] - g_b[k]).abs() * slope).clamp_min(0)
            worst = max(worst, float(beyond.norm() / w_b[k].norm().clamp_min(1e-30)))
        return worst

    def rel(a, b):
        return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)

    q = net.model.layers[0].self_attn.q_proj.base_layer.weight  # a packed 4-bit weight, now a DTensor shard
    full_q = ref.model.layers[0].self_attn.q_proj.base_layer.weight
    report = {"packed_local": q.to_local().numel(), "packed_full": full_q.numel(),
              "grad_norm": sum(float(v.norm()) for v in g_ref.values()),
              "moved": max(float((w_ref[k] - w0[k]).abs().max()) for k in w0),
              "loss_ref": dist.all_reduce_sum([loss_ref])[0], "loss_fsdp": dist.all_reduce_sum([loss_fsdp])[0],
              "grad_rel": rel(g_fsdp, g_ref), "weight_rel": rel(w_fsdp, w_ref),
              "weight_unexplained_rel": unexplained_rel(w_fsdp, w_ref, g_fsdp, g_ref),
              "update_rel": rel(w_fsdp, adamw_step(w0, g_fsdp)), "n_sharded": len(sharded),
              "n_params": sum(1 for _ in net.parameters()), "uint8_problems": fsdp_problems(uint8)}
    reports = dist.gather(report)
    if world.is_main:
        with open(out, "w") as f:
            json.dump(reports, f)
