"""Causal-LM cross-entropy that never materializes the full (fp32) logits.

The plain loss computes ``logits = lm_head(hidden)`` for every position, ``(B, T, V)``, upcasts them
to fp32 and runs ``F.cross_entropy``. Autograd then holds, at the same time, the logits in the model
dtype, their fp32 copy, the fp32 log-softmax saved for the backward pass and, during the backward
pass, the fp32 gradient of the logits. With Llama-3's vocabulary (V = 128,256) one batch of
4 x 1024 tokens has ``4 * 1024 * 128256 * 4 B = 2.0 GiB`` of fp32 logits, and the loss alone peaks at
several times that: far more than the activations of a QLoRA-adapted decoder with gradient
checkpointing.

The loss only needs two numbers per labelled token: ``logsumexp(z)`` and the target logit ``z[y]``,
and its gradient with respect to the logits is ``softmax(z) - onehot(y)``. Both can be computed one
chunk of tokens at a time, from the hidden states and the head's weight:

* **forward**: for each chunk of ``c`` tokens, ``z = h_chunk @ W^T (+ b)`` ``(c, V)``, upcast to
  fp32; keep ``logsumexp(z) - z[y]`` summed. When autograd needs gradients (training), the same
  chunk is then turned in place into ``softmax(z) - onehot(y)`` (zero on ignored rows) and
  ``grad_hidden[chunk] = g @ W`` ``(c, H)`` is computed at once, and only where the inputs need it
  (qolora freezes the head, so usually not) ``grad_W += g^T @ h_chunk`` ``(V, H)`` and
  ``grad_b += g.sum(0)``; then the chunk is dropped. Saved for backward: these gradients for a unit
  incoming gradient -- never the logits, nor the hidden states;
* **backward**: multiply the saved gradients by the incoming one (``1 / n_labels``, times a
  GradScaler's scale).

Memory: the loss holds at most one chunk of fp32 logits (plus, under bf16/fp16 autocast, the same
chunk in the matmul dtype) and the ``(N, H)`` hidden-state gradient, instead of ``N * V`` values
several times over. The default chunk is sized so one fp32 chunk is :data:`DEFAULT_CHUNK_BYTES`
(128 MiB): ``chunk_tokens = 128 MiB // (V * 4 B)``, 261 tokens for V = 128,256. That is big enough
for the head's matmul to stay efficient (a (261 x H) @ (H x 128256) GEMM keeps a GPU busy; the
Python loop over chunks is negligible next to it) and small next to the 2+ GiB it replaces. Compute:
the head's matmul runs twice in training (logits, ``grad_hidden``), as with the full logits, and once
in evaluation (under ``no_grad`` no gradient is computed). (qolora 0.2.0 recomputed the logits in the
backward pass instead: three head matmuls per step; computing the gradients in the forward pass made
the CPU step ~5% faster at the cost of holding ``(N, H)`` from forward to backward.)

:func:`causal_lm_loss_sum` applies this to a transformers causal LM: it runs the decoder backbone,
shifts, keeps only the positions that carry a label (prompt-masked and padded positions never
reach the head at all), and calls :func:`chunked_cross_entropy_sum` with the output embedding's
weight and bias. Architectures that transform the logits after the head (Gemma-2/3 soft-capping,
Cohere's ``logit_scale``, Granite's ``logits_scaling``, ...), heads that are not a plain
``nn.Linear``, and architectures not checked against their transformers ``forward`` fall back to
the plain full-logits loss (:func:`plain_causal_lm_loss_sum`), logged once at INFO.

Prior art, whose ideas this follows (re-implemented here, nothing copied):

* Liger Kernel's ``LigerFusedLinearCrossEntropyFunction`` (linkedin/Liger-Kernel,
  ``ops/fused_linear_cross_entropy.py``): chunk the tokens, never keep the ``(N, V)`` logits,
  turn each chunk's logits into their gradient in place, cast the gradient to the input dtype for
  the ``grad_input`` matmul, accumulate ``grad_weight``/``grad_bias`` only when needed, compute the
  gradients in the forward pass. Here the forward pass skips the gradients when autograd does not
  need them (evaluation), so it costs one matmul there.
* torchtune's ``CEWithChunkedOutputLoss`` (``torchtune/modules/loss``): upcast to fp32 only one
  chunk at a time; torchtune still materializes the model-dtype logits of the whole batch, which
  this module avoids by fusing the head's matmul into the loss.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from ..data.tokens import IGNORE_INDEX

__all__ = [
    "CHUNKED_MODEL_TYPES",
    "DEFAULT_CHUNK_BYTES",
    "causal_lm_loss_sum",
    "chunked_cross_entropy_sum",
    "chunked_loss_unsupported_reason",
    "default_chunk_tokens",
    "plain_causal_lm_loss_sum",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 128 * 2**20
"""fp32 bytes of one chunk of logits: ``chunk_tokens = DEFAULT_CHUNK_BYTES // (V * 4)``."""

CHUNKED_MODEL_TYPES = frozenset({
    "gemma", "gpt2", "gpt_neox", "llama", "mistral", "mixtral", "olmo", "olmo2", "phi", "phi3", "qwen2",
    "qwen2_moe", "qwen3", "qwen3_moe", "smollm3", "stablelm", "starcoder2",
})
"""``config.model_type`` values whose ``*ForCausalLM.forward`` computes ``logits = lm_head(hidden)``
from the backbone's last hidden state and nothing else (checked against transformers 5.24's modeling
files). Other architectures take the plain loss: an unknown one could scale or cap its logits."""

# config attributes that change the logits after the head, with the value that means "no change"
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                     "output_multiplier_scale": 1.0, "lm_head_multiplier": 1.0}

_logged_fallbacks: set[tuple[str, str]] = set()


def default_chunk_tokens(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk of fp32 logits takes about ``budget_bytes``."""
    return max(1, budget_bytes // (max(1, vocab_size) * 4))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on, else the inputs' (promoted)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of one chunk: ``h @ W^T + b`` in the inputs' dtype, then upcast."""
    z = F.linear(h, weight, bias)  # (c, V), compute dtype
    return z.float()  # (c, V) fp32: no copy when already fp32


def _softmax_minus_onehot(p: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``p - onehot(y)`` in place on a chunk's softmax ``p`` (c, V), rows of ignored tokens zeroed."""
    rows = torch.arange(p.shape[0], device=p.device)
    p[rows, y] -= 1.0
    return p.mul_(valid[:, None])  # (c, V)


def _accumulate_chunk_grads(g, h, weight, start, end, grad_hidden, grad_weight, grad_bias) -> None:
    """Add one chunk's share of the gradients, from ``g = dloss/dlogits`` (c, V) fp32 and ``h`` (c, H)."""
    if grad_bias is not None:
        grad_bias += g.sum(dim=0)  # (V,)
    if grad_weight is not None:
        if g.dtype == h.dtype:
            grad_weight.addmm_(g.t(), h)  # (V, H) fp32
        else:
            grad_weight += (g.to(h.dtype).t() @ h).float()  # (V, H)
    if grad_hidden is not None:
        grad_hidden[start:end] = g.to(weight.dtype) @ weight  # (c, H)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight^T + bias`` against ``labels``, chunked over tokens.

    Inputs arrive already in the compute dtype (see :func:`chunked_cross_entropy_sum`); autocast is
    off inside, so the matmuls run in that dtype and everything after them in fp32. ``grads_now``
    says which of hidden / weight / bias get a gradient: those are computed in the forward pass for a
    unit incoming gradient, and the backward pass only scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, chunk_tokens: int, grads_now: tuple):
        n = hidden.shape[0]
        need_hidden, need_weight, need_bias = grads_now
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # training: the gradients for a unit incoming gradient, computed while each chunk's logits exist
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # (N, H)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None  # (V,)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_tokens):
                end = min(n, start + chunk_tokens)
                h = hidden[start:end]  # (c, H)
                z = _chunk_logits(h, weight, bias)  # (c, V) fp32
                y = labels[start:end]  # (c,)
                valid = y != ignore_index  # (c,)
                y0 = torch.where(valid, y, 0)  # (c,)
                target = z.gather(1, y0[:, None]).squeeze(1)  # (c,)
                # logsumexp in place on the chunk (it is dropped or turned into the gradient): max, exp, sum, log
                peak = z.amax(dim=1, keepdim=True)  # (c, 1)
                peak = torch.where(torch.isfinite(peak), peak, 0.0)
                expz = z.sub_(peak).exp_()  # (c, V) exp(z - peak)
                sums = expz.sum(dim=1)  # (c,)
                chunk_lse = sums.log().add_(peak.squeeze(1))  # (c,)
                total += torch.where(valid, chunk_lse - target, 0.0).sum()
                if grad_hidden is not None or grad_weight is not None or grad_bias is not None:
                    g = _softmax_minus_onehot(expz.div_(sums[:, None]), y0, valid)  # (c, V), in place
                    _accumulate_chunk_grads(g, h, weight, start, end, grad_hidden, grad_weight, grad_bias)
                    del g  # the same storage as z: held, it would keep this chunk alive beside the next one
                del z, expz
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)  # the backward pass only scales them
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        scale = grad_output.to(torch.float32)  # () : 1 / n_labels, times a GradScaler's scale
        grads = [None if t is None else (t.float() * scale).to(dtype)  # the unit gradients, scaled
                 for t, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                              bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                              chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed token cross-entropy of ``hidden @ weight^T + bias`` against ``labels``, chunk by chunk.

    Equal (up to float rounding) to ``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels,
    ignore_index=ignore_index, reduction="sum")``, with the same gradients for ``hidden``, ``weight``
    and ``bias``, but holding at most ``chunk_tokens`` rows of logits at a time (see the module
    docstring). Under autocast the matmuls run in autocast's dtype, as ``nn.Linear`` would; the
    softmax and logsumexp always run in fp32.

    Args:
        hidden: ``(N, H)`` hidden states, already aligned with ``labels`` (position ``i`` predicts
            ``labels[i]``).
        weight: ``(V, H)`` output head weight (may be the tied input embedding).
        labels: ``(N,)`` integer targets; entries equal to ``ignore_index`` contribute nothing.
        bias: optional ``(V,)`` head bias.
        ignore_index: the label value to skip.
        chunk_tokens: tokens per chunk; default :func:`default_chunk_tokens` (~128 MiB of fp32
            logits per chunk).

    Returns:
        A 0-dim fp32 tensor: the sum over non-ignored tokens (0 when there are none).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"expected hidden (N, H), weight (V, H), labels (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    if hidden.shape[0] != labels.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"labels {tuple(labels.shape)}")
    chunk = int(chunk_tokens) if chunk_tokens is not None else default_chunk_tokens(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    labels = labels.long()  # (N,): gather wants int64; no copy when it already is
    dtype = _compute_dtype(hidden, weight)
    # casts outside the Function, so autograd routes the gradients back to the original dtypes
    hidden, weight = hidden.to(dtype), weight.to(dtype)  # (N, H), (V, H)
    bias = bias.to(dtype) if bias is not None else None  # (V,)
    # Under autograd the gradients are computed in the forward pass, while each chunk's logits exist
    # (two head matmuls instead of three); without it (evaluation) the forward pass computes the loss only.
    grad_on = torch.is_grad_enabled()
    grads_now = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                 grad_on and bias is not None and bias.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, int(ignore_index), chunk, grads_now)


# ----------------------------------------------------------------------------------- model level
def _backbone(model: nn.Module) -> nn.Module | None:
    """The decoder that returns the last hidden state (``model.model``, GPT-2's ``model.transformer``)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) and base is not model else None


def chunked_loss_unsupported_reason(model: nn.Module) -> str | None:
    """Why :func:`causal_lm_loss_sum` must use the plain loss for ``model``; None when chunking is exact."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            return f"config.{name}={value!r} transforms the logits after the head"
    if model_type not in CHUNKED_MODEL_TYPES:
        return f"model type {model_type!r} is not among those checked to compute logits = lm_head(hidden)"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return "the model has no output embeddings"
    if type(head) is not nn.Linear:  # a quantized or adapted head (bitsandbytes subclasses nn.Linear)
        return f"the output head is a {type(head).__name__}, not a plain nn.Linear"
    if not head.weight.is_floating_point():
        return f"the output head's weight is {head.weight.dtype}"
    if _backbone(model) is None:
        return "no decoder backbone found (model.base_model)"
    return None


def plain_causal_lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                             attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The reference loss: full ``(B, T, V)`` logits, upcast to fp32, summed next-token cross-entropy.

    Same arguments and result as :func:`causal_lm_loss_sum`.
    """
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    logits = model(**{k: v for k, v in inputs.items() if v is not None}, use_cache=False).logits  # (B, T, V)
    shifted = labels[:, 1:]  # (B, T-1): token t predicts t+1
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=ignore_index,
                           reduction="sum")


def causal_lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                       attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                       ignore_index: int = IGNORE_INDEX, chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of a causal LM, without the full logits (fp32, 0-dim).

    Runs the decoder backbone, shifts (``hidden[:, :-1]`` predicts ``labels[:, 1:]``), keeps only
    positions with a label and calls :func:`chunked_cross_entropy_sum` with the output head's weight
    and bias. Models the chunked path cannot reproduce exactly
    (:func:`chunked_loss_unsupported_reason`) take :func:`plain_causal_lm_loss_sum`; the reason is
    logged once per model class at INFO. Call it inside the training loop's autocast context, as
    the model's forward would be.

    Args:
        model: a transformers ``*ForCausalLM`` (possibly with qolora adapters in its backbone).
        input_ids: ``(B, T)`` token ids.
        labels: ``(B, T)`` unshifted labels (``ignore_index`` on prompt and padding positions).
        attention_mask: optional ``(B, T)`` mask, passed to the model.
        position_ids: optional ``(B, T)`` positions (packed sequences), passed to the model.
        ignore_index: the label value to skip.
        chunk_tokens: tokens per chunk (default: ~128 MiB of fp32 logits per chunk).

    Returns:
        The sum of the per-token losses over ``labels[:, 1:] != ignore_index``, as ``F.cross_entropy(
        ..., reduction="sum")`` on the full logits gives it.
    """
    reason = chunked_loss_unsupported_reason(model)
    if reason is not None:
        key = (type(model).__name__, reason)
        if key not in _logged_fallbacks:
            _logged_fallbacks.add(key)
            logger.info("chunked loss not used for %s (%s): computing the loss from the full logits",
                        type(model).__name__, reason)
        return plain_causal_lm_loss_sum(model, input_ids, labels, attention_mask=attention_mask,
                                        position_ids=position_ids, ignore_index=ignore_index)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    out = _backbone(model)(**{k: v for k, v in inputs.items() if v is not None}, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, H)
    shifted = labels[:, 1:]  # (B, T-1): token t predicts t+1
    keep = shifted != ignore_index  # (B, T-1)
    head = model.get_output_embeddings()
    return chunked_cross_entropy_sum(hidden[:, :-1][keep], head.weight, shifted[keep], bias=head.bias,  # (K, H), (K,)
                                     ignore_index=ignore_index, chunk_tokens=chunk_tokens)
