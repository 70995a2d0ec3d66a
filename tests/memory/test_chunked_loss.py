"""The chunked causal-LM loss (qolora.memory.chunked_loss): the full-logits loss and gradients, less memory.

* the tensor function against ``F.cross_entropy`` on explicit logits (fp32), all chunkings;
* the model-level function against ``model(...).logits`` + CE on tiny Llama / GPT-2 / qolora 4-bit models;
* the fallback for a logit-softcapping model (tiny Gemma-2);
* memory: no single tensor of the chunked forward + backward is as large as the full fp32 logits,
  measured by recording every tensor an op allocates (deterministic: no allocator or RSS noise).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qolora import adapter_parameters, prepare
from qolora.memory import chunked_loss as qloss
from qolora.memory.chunked_loss import (
    causal_lm_loss_sum,
    chunked_cross_entropy_sum,
    chunked_loss_unsupported_reason,
    default_chunk_tokens,
    plain_causal_lm_loss_sum,
)

IGNORE = -100


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Relative closeness in the norm: ||a - b|| <= rtol * ||b|| (elementwise rtol is too strict near 0)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm()) <= rtol * max(float(b.norm()), 1e-30)


def _problem(n=37, h=16, v=50, bias=True, seed=0, ignored=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g)).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignored:
        labels[::3] = IGNORE
        labels[:2] = IGNORE
    return hidden, weight, b, labels


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


# ------------------------------------------------------------------------------- tensor function
@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 1000, None])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_matches_cross_entropy(chunk, bias):
    hidden, weight, b, labels = _problem(bias=bias)
    ref = F.cross_entropy(F.linear(hidden, weight, b).float(), labels, ignore_index=IGNORE, reduction="sum")
    got = chunked_cross_entropy_sum(hidden, weight, labels, bias=b, ignore_index=IGNORE, chunk_tokens=chunk)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert _close(got, ref)
    upstream = torch.tensor(0.37)  # a 1/n_labels-like incoming gradient, not 1
    for g_ref, g_got in zip(_grads(ref * upstream, (hidden, weight, b)), _grads(got * upstream, (hidden, weight, b))):
        assert g_got.dtype == g_ref.dtype and _close(g_got, g_ref)


def test_chunked_only_needed_grads_and_edge_cases():
    hidden, weight, b, labels = _problem()
    weight.requires_grad_(False)  # the frozen LM head: only grad_hidden is computed
    b.requires_grad_(False)
    got = chunked_cross_entropy_sum(hidden, weight, labels, bias=b, chunk_tokens=4)
    got.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(ref_hidden, weight, b), labels, reduction="sum").backward()
    assert _close(hidden.grad, ref_hidden.grad) and weight.grad is None
    # everything ignored: 0, and the backward pass still runs (zero gradient)
    hidden.grad = None
    none = chunked_cross_entropy_sum(hidden, weight, torch.full_like(labels, IGNORE), chunk_tokens=4)
    none.backward()
    assert float(none.detach()) == 0.0 and float(hidden.grad.abs().max()) == 0.0
    # no grad mode (evaluation): a plain number
    with torch.no_grad():
        assert _close(chunked_cross_entropy_sum(hidden, weight, labels, bias=b, chunk_tokens=4), got.detach())
    with pytest.raises(ValueError):
        chunked_cross_entropy_sum(hidden, weight, labels[:-1])
    with pytest.raises(ValueError):
        chunked_cross_entropy_sum(hidden, weight, labels, chunk_tokens=0)


def test_chunked_bf16_autocast_keeps_fp32_softmax():
    """Under bf16 autocast the matmul runs in bf16 as nn.Linear would; the loss is fp32 and close to it."""
    hidden, weight, b, labels = _problem(n=24, h=32, v=64, ignored=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(hidden, weight, b).float(), labels, reduction="sum")
        got = chunked_cross_entropy_sum(hidden, weight, labels, bias=b, chunk_tokens=5)
    assert got.dtype == torch.float32
    assert _close(got, ref, rtol=1e-5)  # same bf16 logits, both reduced in fp32
    g_ref, g_got = _grads(ref, (hidden,))[0], _grads(got, (hidden,))[0]
    assert g_got.dtype == torch.float32 and _close(g_got, g_ref, rtol=2e-2)  # bf16 grad matmuls, cast differently


def test_default_chunk_tokens():
    assert default_chunk_tokens(128256) == 261  # ~128 MiB of fp32 logits per chunk
    assert default_chunk_tokens(384) == (128 << 20) // (384 * 4)
    assert default_chunk_tokens(10**12) == 1


# -------------------------------------------------------------------------------- model level
def _batch(vocab, seed=0, b=3, t=12):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (b, t), generator=g)
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[1, -4:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :5] = IGNORE  # the prompt
    labels[attention_mask == 0] = IGNORE
    return input_ids, attention_mask, labels


def _compare_model(model, chunk_tokens=4, rtol=1e-5):
    """Loss and gradients of every trainable parameter: chunked vs plain, on the same batch."""
    input_ids, attention_mask, labels = _batch(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    kwargs = {"attention_mask": attention_mask}
    ref = plain_causal_lm_loss_sum(model, input_ids, labels, **kwargs)
    got = causal_lm_loss_sum(model, input_ids, labels, chunk_tokens=chunk_tokens, **kwargs)
    assert got.dtype == torch.float32 and _close(got, ref, rtol)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    for p, a, b in zip(params, g_got, g_ref):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
        else:
            assert _close(a, b, rtol), f"gradient mismatch for a {tuple(p.shape)} parameter"
    return got


def test_tiny_llama_matches_plain(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)  # tied embeddings, all params trainable
    assert chunked_loss_unsupported_reason(model) is None
    _compare_model(model.train())


def test_tiny_gpt2_matches_plain(tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    assert chunked_loss_unsupported_reason(model) is None
    _compare_model(model.eval())  # eval: GPT-2's dropout would draw different masks in the two runs


def test_qolora_4bit_model_matches_plain(tiny_llama_dir):
    """The real use: a 4-bit base with OLoRA adapters and gradient checkpointing; only adapters train."""
    model = prepare(tiny_llama_dir, 4, 8, gradient_checkpointing=True, progress=False, device="cpu")
    assert chunked_loss_unsupported_reason(model) is None
    assert not model.get_output_embeddings().weight.requires_grad
    trainable = {id(p) for _, p in adapter_parameters(model)}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    _compare_model(model.train())


def test_softcapping_model_falls_back(caplog):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0,
                          max_position_embeddings=64)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).train()
    reason = chunked_loss_unsupported_reason(model)
    assert reason is not None and "final_logit_softcapping" in reason
    qloss._logged_fallbacks.clear()
    with caplog.at_level(logging.INFO, logger="qolora.memory.chunked_loss"):
        _compare_model(model)
        _compare_model(model)
    fallbacks = [r for r in caplog.records
                 if r.name == "qolora.memory.chunked_loss" and "final_logit_softcapping" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.INFO  # logged once


def test_unsupported_reasons(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.logits_scaling = 8.0  # Granite-style scaling after the head
    assert "logits_scaling" in chunked_loss_unsupported_reason(model)
    model.config.logits_scaling = 1.0
    assert chunked_loss_unsupported_reason(model) is None

    class CustomHead(torch.nn.Linear):
        pass

    model.lm_head = CustomHead(64, model.config.vocab_size, bias=False)
    assert "CustomHead" in chunked_loss_unsupported_reason(model)
    model.config.model_type = "somethingnew"
    assert "not among" in chunked_loss_unsupported_reason(model)


# ------------------------------------------------------------------------------------- memory
class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage any op creates (outputs that are not views of an input)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_no_full_logits_allocation():
    """Forward + backward of the chunked loss never creates a tensor the size of the fp32 logits.

    The probe sees every op's outputs (autograd's CPU backward runs in this thread, through the same
    dispatcher), so it cannot miss the logits; the plain loss run through it shows it does see them.
    """
    n, h, v, chunk = 512, 32, 2048, 64
    hidden, weight, b, labels = _problem(n=n, h=h, v=v)
    weight.requires_grad_(False)
    b.requires_grad_(False)
    full_logits = n * v * 4  # 4 MiB
    with _LargestAllocation() as plain:
        F.cross_entropy(F.linear(hidden, weight, b).float(), labels, reduction="sum").backward()
    assert plain.largest >= full_logits  # the probe sees the logits when they exist
    hidden.grad = None
    with _LargestAllocation() as chunked:
        chunked_cross_entropy_sum(hidden, weight, labels, bias=b, chunk_tokens=chunk).backward()
    assert hidden.grad is not None
    # largest: one chunk of fp32 logits (chunk * v * 4 = 512 KiB), or the weight-sized grad buffers
    assert chunked.largest <= max(chunk * v * 4, v * h * 4, n * h * 4)
    assert chunked.largest * 4 <= full_logits


def test_gradients_made_in_the_forward_pass_only_when_needed(monkeypatch):
    """Training: the chunk's gradient is made while its logits exist (two head matmuls per chunk, none
    recomputed in the backward pass); evaluation (no grad) makes none."""
    import qolora.memory.chunked_loss as loss_module

    calls = []
    accumulate = loss_module._accumulate_chunk_grads
    monkeypatch.setattr(loss_module, "_accumulate_chunk_grads", lambda *a: calls.append(1) or accumulate(*a))
    hidden, weight, b, labels = _problem(n=40, h=16, v=64)
    weight.requires_grad_(False)
    b.requires_grad_(False)
    with torch.no_grad():
        chunked_cross_entropy_sum(hidden, weight, labels, bias=b, chunk_tokens=8)
    assert calls == []
    got = chunked_cross_entropy_sum(hidden, weight, labels, bias=b, chunk_tokens=8)
    assert len(calls) == 5  # one per chunk, in the forward pass
    got.backward()
    assert len(calls) == 5  # the backward pass only scales
