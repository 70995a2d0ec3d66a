"""``qolora.planning.plan`` for Mixture-of-Experts layers against an exact allocation count (issue 23).

The same check as ``tests/planning/test_plan.py``'s step peak (two real steps of the training loop's loss
on the CPU under :class:`benchmarks.memtrack.MemTracker`, the plan's ``step_bytes`` within 10%), on small
MoE decoders whose experts and routing carry most of the layer's memory (hidden 256; 8 experts, 2 per token,
or 16, 4 per token, with or without a shared expert), so that a wrong MoE term shows: the per-routed-pair
tensors, the routing mask and the experts' dequantized weights
(:func:`qolora.planning.memory_model.moe_routing_bytes`). Measured / plan here: 0.95-0.99 (0.91-0.95 while the plan
counted the layer's own adapter gradients at the end of its recompute and in its first expert's backward, before
they exist; 1.02 under bf16 autocast before each layer's 16-bit copies of its fp32 factors, kept for the backward
pass, were counted); before the three h-wide tensors per routed pair and Qwen3's q/k norms were counted, Qwen3-MoE
under bf16 autocast was 1.13 (the plan too low). DeepSeek-V3 (multi-head latent attention, a dense first layer
before a MoE one with 16 experts and a shared one; on the CPU its SDPA runs the math kernel, the q/k and v head
dims being unequal): 0.99 (fp32) and 1.00 (bf16 autocast); planned with Llama attention and every layer MoE it was
1.16 and 1.27. DeepSeek-V2-Lite's shape (no q latent: one q_proj; a softmax router): 0.99 (fp32), 1.00 (bf16).
The full-width Mixtral-8x7B and Qwen3-30B-A3B layers are measured by ``benchmarks/scale.py``.
"""

from __future__ import annotations

import pytest

from qolora.planning.memory_model import model_dims
from step_peak import measure_step_peak

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SEQ = 256


def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=False)
    if arch == "mixtral":  # 8 wide experts, 2 per token: the experts' dequantized weights dominate
        return tf.MixtralConfig(**common, intermediate_size=896, num_local_experts=8, num_experts_per_tok=2,
                                sliding_window=None)
    if arch == "qwen3_moe":  # 16 narrow experts, 4 per token: the routed pairs dominate (and q_norm / k_norm)
        return tf.Qwen3MoeConfig(**common, intermediate_size=512, moe_intermediate_size=96, num_experts=16,
                                 num_experts_per_tok=4, head_dim=64, decoder_sparse_step=1, norm_topk_prob=True)
    if arch == "qwen2_moe":  # and a shared expert beside the routed ones
        return tf.Qwen2MoeConfig(**common, intermediate_size=512, moe_intermediate_size=96, num_experts=16,
                                 num_experts_per_tok=4, shared_expert_intermediate_size=160, decoder_sparse_step=1)
    if arch == "deepseek_v3":  # multi-head latent attention; a dense first layer, then 16 experts + a shared one
        return tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, intermediate_size=512,
                                   moe_intermediate_size=96, n_routed_experts=16, num_experts_per_tok=4,
                                   n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                   q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                                   v_head_dim=32)
    if arch == "deepseek_v2":  # V2-Lite's shape: no q latent (one q_proj), a dense first layer, 16 experts + 1 shared
        return tf.DeepseekV2Config(**{**common, "num_key_value_heads": 4}, intermediate_size=512,
                                   moe_intermediate_size=96, n_routed_experts=16, num_experts_per_tok=4,
                                   n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=64,
                                   qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
    raise ValueError(arch)


def _measure(tmp_path, arch: str, bf16: bool):
    cfg = _config(arch)
    _, predicted, peak = measure_step_peak(tmp_path, cfg, bf16=bf16, checkpointing=True, seq=SEQ)
    return cfg, predicted, peak


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_moe_step_peak_within_10_percent(tmp_path, arch, bf16):
    cfg, predicted, peak = _measure(tmp_path, arch, bf16)
    d = model_dims(cfg)
    assert d.experts_per_token and d.num_experts  # the MoE terms are in play
    assert predicted.peak_moment == "layer"  # the layer's terms decide the figure, not the loss
    assert predicted.step_bytes == pytest.approx(peak, rel=0.10), (predicted.details, peak)


def test_moe_terms_by_hand():
    """The MoE terms as the formulas say, for one config: 3 h-wide tensors per routed pair, the experts'
    adapter intermediates per pair, the router's fp32 probabilities and top-k, the q/k norms of Qwen3."""
    from qolora.planning.memory_model import llama_layer, moe_recompute_end_bytes, moe_routing_bytes

    d = model_dims(_config("qwen3_moe"))
    N, r, a = 100, 8, 4
    adapted = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}
    routed = N * 4
    assert moe_routing_bytes(d, N, r, a, 4, adapted) == (
        routed * (3 * 256 * 4 + 16 + 4) + (routed - N) * r * 4 * 2 + N * 16 * 4 + N * 4 * 12)
    assert moe_recompute_end_bytes(d, N, a) == 8 * N * 4 * 17 + 3 * N * 256 * 4 + N * 16 * 4
    # the q/k norms: Qwen3-MoE's layer is a Llama layer + 4*N*(q + kv) + 4*N*(heads + kv_heads)
    import dataclasses

    plain = dataclasses.replace(d, qk_norm=False)
    extra = llama_layer(d, 1, N, adapted, r, a, 4, False, 4, False) - llama_layer(plain, 1, N, adapted, r, a, 4,
                                                                                   False, 4, False)
    assert extra == 4 * N * (4 * 64 + 2 * 64) + 4 * N * (4 + 2)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_deepseek_v3_step_peak_within_10_percent(tmp_path, bf16):
    """DeepSeek-V3: multi-head latent attention (the compressed q and kv, their norms, q/k/v with their own head
    dims) and a dense first layer before the MoE one."""
    cfg, predicted, peak = _measure(tmp_path, "deepseek_v3", bf16)
    d = model_dims(cfg)
    assert d.experts_per_token and d.num_experts
    assert predicted.peak_moment == "layer"
    assert predicted.step_bytes == pytest.approx(peak, rel=0.10), (predicted.details, peak)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_deepseek_v2_lite_step_peak_within_10_percent(tmp_path, bf16):
    """DeepSeek-V2-Lite's shape: multi-head latent attention without the q latent (q_proj reads the hidden state),
    a softmax router, a dense first layer before the MoE one."""
    cfg, predicted, peak = _measure(tmp_path, "deepseek_v2", bf16)
    d = model_dims(cfg)
    assert d.experts_per_token == 4 and d.num_experts == 16 and d.q_lora_rank == 0 and d.kv_lora_rank == 64
    assert predicted.peak_moment == "layer"
    assert predicted.step_bytes == pytest.approx(peak, rel=0.10), (predicted.details, peak)


def test_mla_terms_by_hand():
    """Multi-head latent attention as the formulas say, for the DeepSeek-V3 config: the q/kv latents' norms, the
    kv_b output the values are a view of, SDPA's q/k/v with their own head dims (the math kernel on the CPU),
    the adapted layers' inputs; the dense first layer planned with its own MLP."""
    import dataclasses

    from qolora.planning.memory_model import layer_spans, llama_layer, mla_attention

    d = model_dims(_config("deepseek_v3"))
    assert (d.q_lora_rank, d.kv_lora_rank, d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim) == (96, 64, 32, 16, 32)
    N, heads, qk, v = 100, 4, 4 * 48, 4 * 32
    kept, inputs = mla_attention(d, 1, N, 4, False)
    norms = 4 * N * (96 + 1) + 4 * N * (64 + 16 + 1)
    assert kept == norms + 2 * N * qk * 4 + N * heads * (32 + 32) * 4 + N * v * 4 + 4 * heads * N
    assert inputs == [(256, ["q_a_proj", "kv_a_proj_with_mqa"]), (96, ["q_b_proj"]), (64, ["kv_b_proj"]),
                      (v, ["o_proj"])]
    cpu = dataclasses.replace(d, sdpa_math=True)
    assert mla_attention(cpu, 1, N, 2, True)[0] == (4 * N * (96 + 1) + 4 * N * (64 + 1)
                                                    + 4 * (2 * N * qk + heads * N * N) + 4 * N * v)
    (first, dense_end, dense), (moe_first, end, moe) = layer_spans(d)
    assert (first, dense_end, moe_first, end) == (0, 1, 1, 2)
    assert (dense.i, dense.experts_per_token, moe.i) == (512, 0, 4 * 96 + 96)
    adapted = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj"}
    assert llama_layer(dense, 1, N, adapted, 8, 4, 4, False, 4, False) == (
        2 * (4 * N * 256 + 4 * N) + kept + 3 * N * 512 * 4  # layer norms, attention, MLP
        + N * (256 + 96 + 64 + v + 256 + 512) * 4 + N * 8 * 4 * len(adapted))  # inputs (shared in fp32), x @ A^T
