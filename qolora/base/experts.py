"""Mixture-of-Experts blocks as qolora sees them: one linear layer per expert and projection.

transformers 5 holds the routed experts of a MoE block fused, as two 3-D parameters of one module
(Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, ...)::

    experts.gate_up_proj   (E, 2I, H)     gate and up projections of all E experts, concatenated
    experts.down_proj      (E, H, I)
    forward(x, top_k_index, top_k_weights): for each expert e the router picked for some tokens,
        y[tokens] += w * down_e(act(gate_e(x)) * up_e(x))

A 3-D parameter is neither a linear layer nor something bitsandbytes' ``Linear4bit`` can hold, so
qolora splits it: :func:`split_experts` replaces each such module on the ``meta`` skeleton with a
:class:`SplitExperts` whose children are one :class:`ExpertMLP` per expert, each with two ordinary
``nn.Linear`` layers named as the checkpoint names the expert's weights::

    <block>.experts.<e>.gate_up_proj     (2I, H)   rows [0, I): gate, [I, 2I): up
    <block>.experts.<e>.down_proj        (H, I)

From there every expert projection is a linear layer like any other: quantized once (4/8-bit), adapted
with factors from its own weight (OLoRA: the thin QR of that expert's ``W_e[:, :r]``), saved, reloaded,
merged and exported layer by layer; the forward pass is transformers' eager expert loop with each
``F.linear(x, W[e])`` replaced by the expert's layer. Which checkpoint tensors feed which expert is the
reader's business (:mod:`qolora.base.layout`).

A module is split when it is a transformers experts implementation (``use_experts_implementation``) with a
gate, no post-expert norm and exactly the fused parameters (plus ``gate_up_proj_bias`` / ``down_proj_bias``
with ``has_bias``: gpt-oss). The expert layers keep the fused rows' order (concatenated ``[gate; up]`` or
gpt-oss's interleaved ``[g0, u0, g1, u1, ...]``) and the biases become the layers' own; the gating runs as
transformers runs it, on the expert's whole gate_up output: the default ``act(gate) * up`` or the module's own
``_apply_gate`` (gpt-oss's clamped SwiGLU, with the module's own settings). Any other experts module stays
fused in 16 bits, unquantized and unadapted, with a warning naming it.

Routers (the linear layer that scores the experts, e.g. Qwen2-MoE's ``shared_expert_gate``) are marked
(:func:`is_router`): they stay in 16 bits and are not adapted unless named in ``target_modules``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["BIASES", "ExpertMLP", "ExpertSlot", "SplitExperts", "expert_slots", "is_router", "mark_routers",
           "peft_expert_factors", "split_experts", "unsplit_reason"]

logger = logging.getLogger(__name__)

FUSED = ("gate_up_proj", "down_proj")
BIASES = tuple(f"{p}_bias" for p in FUSED)  # transformers' names for the fused experts' biases (E, out)
ROUTER_FLAG = "qolora_router"
_ROUTER_NAME = re.compile(r"(^|_)(gate|router)$")


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(gating(gate_up_proj(x)))`` (default gating: ``act(gate) * up`` of its two halves)."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype | None = None, bias: bool = False):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias, device="meta", dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias, device="meta", dtype=dtype)


class SplitExperts(nn.Module):
    """A transformers experts module with one :class:`ExpertMLP` per expert (children ``"0"``, ``"1"``, ...).

    Same call as the module it replaces: ``forward(hidden_states (N, H), top_k_index (N, k),
    top_k_weights (N, k)) -> (N, H)``.

    Attributes:
        num_experts, hidden_dim, intermediate_dim: E, H, I.
        act_fn: the replaced module's activation (None where its own gating has none).
        transposed: the fused parameters are stored ``(E, in, out)`` (``is_transposed``) rather than
            ``(E, out, in)``; the reader and the merge use it to read and write the checkpoint's layout.
        has_bias: the experts have biases (transformers' ``has_bias``: the fused ``gate_up_proj_bias`` /
            ``down_proj_bias``).
        gating: the replaced module's class when it has its own ``_apply_gate`` (run with this module as
            ``self``: :func:`split_experts` copies the settings it reads, e.g. gpt-oss's ``alpha`` and
            ``limit``); None for transformers' default ``act(gate) * up``.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module | None, *,
                 transposed: bool = False, dtype: torch.dtype | None = None, bias: bool = False,
                 gating: type | None = None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.transposed, self.has_bias, self.gating = transposed, bias, gating
        for e in range(num_experts):
            self.add_module(str(e), ExpertMLP(hidden, intermediate, dtype, bias))
        self.act_fn = act_fn

    def expert(self, index: int) -> ExpertMLP:
        return self._modules[str(index)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (E+1, k, N)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for index in hit:
            if index == self.num_experts:  # transformers' slot for tokens routed to no local expert
                continue
            top_k_pos, token_idx = torch.where(mask[index])
            expert = self.expert(index)
            out = expert.down_proj(self.apply_gate(expert.gate_up_proj(hidden_states[token_idx])))  # (n, H)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``(n, 2I) -> (n, I)``: the replaced module's gating (transformers' ``_apply_gate``)."""
        if self.gating is not None:
            return self.gating._apply_gate(self, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"
                + (", transposed" if self.transposed else "") + (", bias" if self.has_bias else "")
                + (f", gating={self.gating.__name__}._apply_gate" if self.gating is not None else ""))


@dataclass(frozen=True)
class ExpertSlot:
    """Where an expert projection layer sits in transformers' fused parameter.

    Attributes:
        fused: the fused parameter's name in transformers' model (``model.layers.1.mlp.experts.gate_up_proj``).
        index: the expert e.
        count: the number of experts E.
        transposed: the fused parameter is ``(E, in, out)``.
    """

    fused: str
    index: int
    count: int
    transposed: bool = False

    def to_dict(self) -> dict:
        return {"fused": self.fused, "index": self.index, "count": self.count, "transposed": self.transposed}

    @classmethod
    def from_dict(cls, d: dict) -> ExpertSlot:
        return cls(str(d["fused"]), int(d["index"]), int(d["count"]), bool(d.get("transposed", False)))


# ------------------------------------------------------------------------------------ splitting
def unsplit_reason(module: nn.Module) -> str | None:
    """Why ``module`` (holding 3-D expert parameters) cannot be split, or None when it can."""
    from transformers.integrations.moe import _default_apply_gate

    params = dict(module.named_parameters(recurse=False))
    if not hasattr(module, "is_concatenated"):
        return "not a transformers experts implementation (use_experts_implementation)"
    expected = (*FUSED, *BIASES) if getattr(module, "has_bias", False) else FUSED
    if set(params) != set(expected):
        return f"parameters {sorted(params)}, not exactly {list(expected)}"
    flags = {"has_gate": True, "has_post_expert_norm": False}
    wrong = [f"{k}={getattr(module, k, v)}" for k, v in flags.items() if getattr(module, k, v) != v]
    if wrong:
        return f"layout {', '.join(wrong)}"
    default_gate = getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate
    if default_gate and not isinstance(getattr(module, "act_fn", None), nn.Module):
        return "the default gating with no act_fn"
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        return f"shapes {tuple(gate_up.shape)} / {tuple(down.shape)}"
    e, h, i2 = _dims(gate_up, module)
    expected = (e, i2 // 2, h) if getattr(module, "is_transposed", False) else (e, h, i2 // 2)
    if i2 % 2 or tuple(down.shape) != expected:
        return f"shapes {tuple(gate_up.shape)} / {tuple(down.shape)} do not pair as gate_up / down"
    biases = [tuple(params[b].shape) for b in BIASES if b in params]
    if biases and biases != [(e, i2), (e, h)]:
        return f"bias shapes {biases}, not [{(e, i2)}, {(e, h)}]"
    return None


def _dims(gate_up: torch.Tensor, module: nn.Module) -> tuple[int, int, int]:
    """``(E, H, 2I)`` of a fused gate_up parameter."""
    e, a, b = gate_up.shape
    return (e, a, b) if getattr(module, "is_transposed", False) else (e, b, a)


def split_experts(model: nn.Module) -> list[str]:
    """Replace every standard fused experts module of a ``meta`` ``model`` with :class:`SplitExperts`.

    Returns the names of the replaced modules. Others holding 3-D parameters stay as they are (warned).
    """
    from transformers.integrations.moe import _default_apply_gate

    replaced = []
    for name, module in list(model.named_modules()):
        params = dict(module.named_parameters(recurse=False))
        if not any(p.dim() == 3 for p in params.values()) or "gate_up_proj" not in params:
            continue
        reason = unsplit_reason(module)
        if reason is not None:
            logger.warning("%s (%s) stays fused in 16 bits, not quantized or adapted: %s", name,
                           type(module).__name__, reason)
            continue
        e, h, i2 = _dims(params["gate_up_proj"], module)
        gate = getattr(type(module), "_apply_gate", _default_apply_gate)
        split = SplitExperts(e, h, i2 // 2, getattr(module, "act_fn", None),
                             transposed=bool(getattr(module, "is_transposed", False)),
                             dtype=params["gate_up_proj"].dtype, bias=BIASES[0] in params,
                             gating=None if gate is _default_apply_gate else type(module))
        if split.gating is not None:  # the settings its gating reads (gpt-oss: alpha, limit)
            for key, value in vars(module).items():
                if isinstance(value, (bool, int, float)) and not key.startswith("_") and not hasattr(split, key):
                    setattr(split, key, value)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, split)
        replaced.append(name)
    return replaced


def expert_slots(model: nn.Module) -> dict[str, ExpertSlot]:
    """``{expert layer name: ExpertSlot}`` for every projection of every :class:`SplitExperts` of ``model``."""
    slots = {}
    for name, module in model.named_modules():
        if isinstance(module, SplitExperts):
            for e in range(module.num_experts):
                for proj in FUSED:
                    slots[f"{name}.{e}.{proj}"] = ExpertSlot(f"{name}.{proj}", e, module.num_experts,
                                                             module.transposed)
    return slots


def fused_parameters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{fused parameter name: shape}`` as transformers' model holds them, for each :class:`SplitExperts`."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, SplitExperts):
            e, h, i = module.num_experts, module.hidden_dim, module.intermediate_dim
            gate_up, down = ((e, h, 2 * i), (e, i, h)) if module.transposed else ((e, 2 * i, h), (e, h, i))
            shapes[f"{name}.gate_up_proj"], shapes[f"{name}.down_proj"] = gate_up, down
    return shapes


# -------------------------------------------------------------------------------------- routers
def mark_routers(model: nn.Module) -> list[str]:
    """Flag the linear layers that route tokens to experts (:func:`is_router`); returns their names.

    A router is a linear layer named ``gate`` / ``router`` / ``*_gate`` / ``*_router`` (not ``gate_proj``)
    directly inside a block that has ``experts`` (Qwen2-MoE's ``shared_expert_gate``; Mixtral's and
    DeepSeek's ``gate`` are router modules of their own, not linear layers, and are never quantized).
    """
    marked = []
    for name, module in model.named_modules():
        if not hasattr(module, "experts"):
            continue
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and _ROUTER_NAME.search(child_name):
                setattr(child, ROUTER_FLAG, True)
                marked.append(f"{name}.{child_name}" if name else child_name)
    return marked


def is_router(module: nn.Module) -> bool:
    """Whether :func:`mark_routers` flagged ``module``: kept in 16 bits, adapted only when named."""
    return bool(getattr(module, ROUTER_FLAG, False))


# ------------------------------------------------------------------------------- PEFT's layout
def peft_expert_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert factors -> PEFT's ``ParamWrapper`` weights for one fused 3-D parameter.

    Args:
        a: ``(E, r, in)`` the experts' A. b: ``(E, out, r)`` their B (``in``/``out`` of the expert's
            ``(out, in)`` weight, whichever way the fused parameter stores it).

    Returns:
        ``(lora_A (E*r, in), lora_B (out, r*E))`` such that PEFT's delta of expert e,
        ``lora_B.reshape(out, r, E)[..., e] @ lora_A.reshape(E, r, in)[e]``, is ``b[e] @ a[e]``: A stacks the
        experts (row ``e*r + k``), B interleaves them (column ``k*E + e``). PEFT orients the delta as the
        parameter is stored (``(E, out, in)``, or ``(E, in, out)`` with ``is_transposed``) from the same two.
    """
    e, r, in_features = a.shape
    lora_a = a.reshape(e * r, in_features)  # (E*r, in)
    lora_b = b.permute(1, 2, 0).reshape(b.shape[1], r * e)  # (out, r, E) -> (out, r*E)
    return lora_a.contiguous(), lora_b.contiguous()


# ------------------------------------------------------------------------------------- counting
def moe_counts(model: nn.Module, experts_per_token: int) -> dict | None:
    """What the plan says about a split-experts ``model`` (``meta`` is fine): the number of experts, how many
    a token is routed to, the MoE layers, one expert's parameters (its ``gate_up_proj`` and ``down_proj``),
    and the model's total parameters against those one token uses (``active``: every parameter outside the
    routed experts, and ``experts_per_token / num_experts`` of theirs). None for a model without experts."""
    blocks = [m for m in model.modules() if isinstance(m, SplitExperts)]
    if not blocks:
        return None
    expert_params = sum(p.numel() for b in blocks for name, p in b.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    first = blocks[0]
    per_expert = 3 * first.hidden_dim * first.intermediate_dim
    return {"num_experts": first.num_experts, "experts_per_token": experts_per_token, "moe_layers": len(blocks),
            "expert_params": per_expert, "total_params": total,
            "active_params": total - expert_params + expert_params * experts_per_token // first.num_experts}
