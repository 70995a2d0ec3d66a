"""The byte formulas of :mod:`qolora.planning.plan`: quantized weights, optimizer states, and the activations
and working memory of one training step, per decoder-layer family. Pure arithmetic on sizes; the
planner's docstring explains each term and how it was validated.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw")
"""The optimizers a run may use (the first is the default)."""

logger = logging.getLogger(__name__)

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 optimizer states below this many elements
BNB_OPTIM_BLOCK = 256
QK_NORM = ("qwen3", "qwen3_moe")  # an RMSNorm per head on q and k before the rotary embedding (q_norm, k_norm)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma", "gemma2", "phi3", "olmo", "olmo2",
              "granite", "smollm3", "cohere", "starcoder2", "stablelm", "internlm2", "qwen2_moe", "qwen3_moe",
              "deepseek_v3", "deepseek_v2")


@dataclass(frozen=True)
class Dims:
    family: str
    L: int
    h: int
    i: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    attn_dropout: float
    resid_dropout: float
    activation: str
    experts_per_token: int = 0  # a Mixture-of-Experts model: k of ``num_experts`` routed experts per token
    num_experts: int = 0
    qk_norm: bool = False  # q_norm / k_norm on every head (Qwen3, Qwen3-MoE)
    expert_width: int = 0  # a routed expert's intermediate size I
    dense_layers: int = 0  # a MoE model's first layers with a dense MLP instead (DeepSeek's first_k_dense_replace)
    dense_width: int = 0  # their intermediate size
    # Multi-head latent attention (DeepSeek-V2/V3; kv_lora_rank 0: none): q through a q_lora_rank latent (0: one
    # q_proj), k and v from a kv_lora_rank latent, with head dims of their own (qk = nope + rope, v).
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    sdpa_math: bool = False  # MLA on the CPU: SDPA runs its math kernel (set by step_memory from the device)


def model_dims(hf_config) -> Dims:
    c = hf_config
    mt = c.model_type
    if mt == "gpt2":
        h = c.n_embd
        return Dims("gpt2", c.n_layer, h, c.n_inner or 4 * h, c.n_head, c.n_head, h // c.n_head, c.vocab_size,
                     float(c.attn_pdrop), float(c.resid_pdrop), c.activation_function)
    text = getattr(c, "text_config", None) or c
    h = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    if mt not in LLAMA_LIKE:
        logger.warning("activation estimate for model_type %r uses the Llama-style layer formula (validated for "
                       "llama, mistral, qwen2 and gpt2 only)", mt)
    return Dims("llama", text.num_hidden_layers, h, mlp_width(text), heads,
                 getattr(text, "num_key_value_heads", None) or heads, head_dim, text.vocab_size,
                 float(getattr(text, "attention_dropout", 0.0) or 0.0), 0.0, getattr(text, "hidden_act", "silu"),
                 *moe_dims(text), qk_norm=getattr(text, "model_type", mt) in QK_NORM,
                 expert_width=(getattr(text, "moe_intermediate_size", None) or text.intermediate_size)
                 if moe_dims(text)[0] else 0,
                 dense_layers=(getattr(text, "first_k_dense_replace", None) or 0) if moe_dims(text)[0] else 0,
                 dense_width=text.intermediate_size, **mla_dims(text))


def mla_dims(text) -> dict:
    """The multi-head latent attention fields of :class:`Dims` (none for other attention)."""
    if not isinstance(getattr(text, "kv_lora_rank", None), int):
        return {}
    return {"q_lora_rank": text.q_lora_rank or 0, "kv_lora_rank": text.kv_lora_rank,
            "qk_nope_head_dim": text.qk_nope_head_dim, "qk_rope_head_dim": text.qk_rope_head_dim,
            "v_head_dim": text.v_head_dim}


def mlp_width(text) -> int:
    """The MLP width a token goes through: ``intermediate_size``, or for a Mixture-of-Experts config the experts
    it is routed to (``num_experts_per_tok`` x the expert width) plus any shared expert. A MoE layer's MLP
    activations are those of a dense MLP of that width (per routed token the expert's gate/up output, SiLU
    output and down input, as in a dense MLP), plus the routing's own (:func:`moe_routing_bytes`)."""
    k = getattr(text, "num_experts_per_tok", None)
    if not k:
        return text.intermediate_size
    expert = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
    shared = (getattr(text, "shared_expert_intermediate_size", None)
              or (getattr(text, "n_shared_experts", None) or 0) * expert)
    return k * expert + shared


def moe_dims(text) -> tuple[int, int]:
    """``(experts per token, experts)`` of a Mixture-of-Experts config, ``(0, 0)`` for a dense one."""
    k = getattr(text, "num_experts_per_tok", None) or 0
    experts = next((getattr(text, a) for a in ("num_local_experts", "num_experts", "n_routed_experts")
                    if isinstance(getattr(text, a, None), int)), 0)
    return (k, experts) if k and experts else (0, 0)


def moe_routing_bytes(d: Dims, N: int, r: int, a: int, lora_b: int, adapted: set[str]) -> int:
    """Bytes a MoE layer keeps for the backward pass beyond its MLP-width terms (exact accounting of
    :class:`qolora.base.experts.SplitExperts` and transformers' top-k routers, tests/planning/test_plan_moe.py).

    Per routed (token, expert) pair, three tensors of width ``h``: the gathered input ``x[token_idx]`` (kept
    by the gate_up adapter's ``x @ A^T``), the expert's output (kept by its product with the routing weight,
    for the weight's gradient) and the weighted output (kept by ``index_add_``'s backward, which takes the
    source's shape from it); the expert's ``torch.where`` indices (int64, 2 per pair) and its routing weight.
    The adapters' ``x @ A^T`` of the expert layers are per routed pair, not per token (``llama_layer``
    counts one per token). The router: the fp32 softmax of its logits (N, E) and the top-k indices (int64)
    and weights (N, k).
    """
    if not d.experts_per_token:
        return 0
    k, routed = d.experts_per_token, N * d.experts_per_token
    expert_kinds = len(adapted & {"gate_up_proj", "down_proj"})
    pairs = routed * (3 * d.h * a + 2 * 8 + a) + (routed - N) * r * lora_b * expert_kinds
    return pairs + N * d.num_experts * 4 + N * k * (8 + 4)


def moe_recompute_end_bytes(d: Dims, N: int, a: int) -> int:
    """What else is alive when a checkpointed MoE layer's recompute ends (non-reentrant checkpointing stops
    right after the last expert's ``index_add_``; the forward's locals are then still held): the one-hot
    routing mask (int64, (E + 1) x k x N), the block's input (the post-attention norm's output, (N, h): a
    dense MLP keeps it for its adapters, the experts keep only their gathers of it), the output accumulator
    (N, h), the router's logits (N, E), and the gradient of the layer's output arriving (N, h)."""
    if not d.experts_per_token:
        return 0
    return 8 * N * d.experts_per_token * (d.num_experts + 1) + 3 * N * d.h * a + N * d.num_experts * a


def quantized_bytes(out_f: int, in_f: int, bits: int, blocksize: int, double_quant: bool, dtype_bytes: int) -> int:
    n = out_f * in_f
    if bits == 16:
        return n * dtype_bytes
    if bits == 8:
        return n + 4 * out_f
    blocks = -(-n // blocksize)
    stats = blocks + 4 * -(-blocks // 256) + 256 * 4 + 4 if double_quant else 4 * blocks
    return -(-n // 2) + stats + 16 * 4


def optimizer_bytes(optim: str, numels: list[int], adapter_bytes: int) -> int:
    if optim == "adamw":
        return sum(2 * n * adapter_bytes + 4 for n in numels)
    if optim.endswith("32bit"):
        return sum(2 * 4 * n for n in numels)
    total, any8 = 0, False
    for n in numels:
        if n < BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * n
        else:
            any8 = True
            total += 2 * n + 2 * 4 * -(-n // BNB_OPTIM_BLOCK)
    return total + (2 * 256 * 4 if any8 else 0)


def inputs_bytes(N: int, widths_consumers: list[tuple[int, list[str]]], adapted: set[str], a: int,
                  adapter_b: int, autocast: bool, bits: int, fused: bool = False) -> int:
    """Bytes kept for the inputs of a layer's linear layers: each input tensor (width w) read by consumers.

    ``fused``: the adapted layers run :mod:`qolora.adapters.kernels`' fused step, which keeps the input itself
    (one tensor however many layers read it) when the adapter computes in the activations' dtype
    (autocast, or factors in that dtype), else its own cast per layer as the plain path does.
    """
    total = 0
    for w, consumers in widths_consumers:
        shared = bits == 16  # an unquantized base keeps its input; bitsandbytes keeps only its weight
        for c in consumers:
            if c not in adapted:
                continue
            if fused and (autocast or adapter_b == a):
                shared = True
            elif autocast:
                total += N * w * a  # fp32 adapter: x -> fp32 -> autocast's own 16-bit copy, one per layer
            elif adapter_b == a:
                shared = True
            else:
                total += N * w * adapter_b
        total += N * w * a if shared else 0
    return total


def mla_attention(d: Dims, B: int, T: int, a: int, autocast: bool) -> tuple[int, list[tuple[int, list[str]]]]:
    """Multi-head latent attention (transformers' ``DeepseekV3Attention``): ``(bytes autograd keeps besides the
    adapted layers' inputs, those inputs as (width, consumers))``. Exact accounting of a tiny DeepSeek-V3 layer
    (tests/planning/test_plan_moe.py).

    q_a_layernorm and kv_a_layernorm compute in fp32 like the layer norms: each keeps its fp32 input and 1/rms.
    kv_a_layernorm's input is a view of kv_a_proj_with_mqa's output (the latent and the shared rope key): in
    fp32 it keeps that whole output, under autocast only its fp32 copy of the latent. The rope'd parts, the
    query's concatenation and the key built by copy are kept by SDPA alone. Its values are a view of kv_b_proj's
    output (heads x (nope + v)): with q/k and v head dims apart, SDPA on CUDA runs its memory-efficient kernel,
    which keeps q and k (heads x (nope + rope)), that whole output, its own output and the fp32 logsumexp (not
    measured: no GPU); the CPU has no fused kernel for unequal head dims (``sdpa_math``) and runs the math one
    in fp32 (16-bit inputs upcast), which keeps the scaled q and k, the fp32 probabilities (heads x T x T) and
    v (kv_b_proj's output in fp32, an fp32 copy of v under autocast). The rotary tables are counted once per
    model (``step_memory``'s ``rope``, of width ``head_dim`` = qk_rope_head_dim).
    """
    N = B * T
    qk, v = d.heads * (d.qk_nope_head_dim + d.qk_rope_head_dim), d.heads * d.v_head_dim
    norms = 4 * N * (d.q_lora_rank + 1 if d.q_lora_rank else 0)
    norms += 4 * N * (d.kv_lora_rank + (0 if autocast else d.qk_rope_head_dim) + 1)
    kv_b = N * (qk - d.heads * d.qk_rope_head_dim + v) * a  # kv_b_proj's output, the values' storage
    if d.sdpa_math:
        sdpa = 4 * (2 * N * qk + B * d.heads * T * T) + (4 * N * v if autocast else kv_b)
    else:
        sdpa = 2 * N * qk * a + kv_b + N * v * a + 4 * B * d.heads * T
        if d.attn_dropout > 0:  # SDPA falls back to the math kernel: probabilities and their mask
            sdpa += B * d.heads * T * T * (a + 1)
    q_readers = ["q_a_proj", "kv_a_proj_with_mqa"] if d.q_lora_rank else ["q_proj", "kv_a_proj_with_mqa"]
    inputs = [(d.h, q_readers), (d.q_lora_rank, ["q_b_proj"]), (d.kv_lora_rank, ["kv_b_proj"]), (v, ["o_proj"])]
    return norms + sdpa, inputs


def llama_layer(d: Dims, B: int, T: int, adapted: set[str], r: int, a: int, adapter_b: int, autocast: bool,
                 bits: int, padded: bool, fused: bool = False) -> int:
    N = B * T
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    norms = 2 * (4 * N * d.h + 4 * N)
    k_v = 2 * N * (q if padded and d.kv_heads != d.heads else kv) * a
    attn = N * q * a + k_v + N * q * a + 4 * B * d.heads * T
    attn_inputs = [(d.h, ["q_proj", "k_proj", "v_proj"]), (q, ["o_proj"])]
    if d.qk_norm:
        # q_norm / k_norm compute in fp32 like the layer norms: each keeps its fp32 input (the q / k projection's
        # output; under autocast its fp32 copy) and 1/rms per head and token. Llama keeps neither (its rotary
        # embedding keeps only cos / sin).
        attn += 4 * N * (q + kv) + 4 * N * (d.heads + d.kv_heads)
    if d.attn_dropout > 0:  # SDPA falls back to the math kernel: probabilities and their mask
        attn += B * d.heads * T * T * (a + 1)
    if d.kv_lora_rank:
        attn, attn_inputs = mla_attention(d, B, T, a, autocast)
    mlp = 3 * N * d.i * a
    inputs = inputs_bytes(N, [*attn_inputs, (d.h, ["gate_proj", "up_proj"]), (d.i, ["down_proj"])], adapted, a,
                          adapter_b, autocast, bits, fused)
    lora = N * r * (a if autocast else adapter_b) * len(adapted)
    moe = moe_routing_bytes(d, N, r, a, a if autocast else adapter_b, adapted)
    return norms + attn + mlp + inputs + lora + moe


def gpt2_layer(d: Dims, B: int, T: int, adapted: set[str], r: int, a: int, adapter_b: int, autocast: bool,
                bits: int, padded: bool, fused: bool = False) -> int:
    N = B * T
    ln_b = 4 if autocast else a  # LayerNorm runs in fp32 under autocast
    norms = 2 * (N * d.h * ln_b + 2 * 4 * N)  # input, mean, rstd
    attn = 3 * N * d.h * a + N * d.h * a + 4 * B * d.heads * T  # c_attn output (q, k, v views), SDPA out + lse
    if d.attn_dropout > 0:
        attn += B * d.heads * T * T * (a + 1)
    drop = 2 * N * d.h * (a + 1) if d.resid_dropout > 0 else 0  # two residual dropouts: output + bool mask
    gelu = 4 if d.activation == "gelu_new" else 1  # python tanh-GELU keeps 4 tensors of N*i, torch's GELU 1
    mlp = gelu * N * d.i * a
    inputs = inputs_bytes(N, [(d.h, ["c_attn"]), (d.h, ["c_proj"]), (d.h, ["c_fc"]), (d.i, ["mlp.c_proj"])],
                           adapted, a, adapter_b, autocast, bits, fused)
    lora = N * r * (a if autocast else adapter_b) * len(adapted)
    return norms + attn + drop + mlp + inputs + lora


def adapted_kinds(names: list[str], family: str) -> set[str]:
    kinds = set()
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        kinds.add("mlp.c_proj" if family == "gpt2" and leaf == "c_proj" and ".mlp." in f".{n}." else leaf)
    return kinds


@dataclass(frozen=True)
class StepPeak:
    """The predicted peak of one training step above the prepared model and the optimizer states: what is
    alive at its moment (``"loss"``: the start of the backward pass; ``"layer"``: the backward pass of the
    most loaded decoder layer; ``"optimizer"``: the optimizer step, only the gradients)."""

    activation_bytes: int  # on the compute device (incl. working gradients and one dequantized weight)
    loss_bytes: int
    grad_bytes: int  # the adapters' gradients alive at the moment
    moment: str
    details: dict

    @property
    def bytes(self) -> int:
        return self.activation_bytes + self.loss_bytes + self.grad_bytes


def layer_spans(d: Dims) -> list[tuple[int, int, Dims]]:
    """``(first layer, end, their dims)`` of each run of alike decoder layers: a MoE model's first ``dense_layers``
    layers have a dense MLP of width ``dense_width`` (DeepSeek's ``first_k_dense_replace``), the others its experts."""
    dense = min(d.dense_layers, d.L) if d.experts_per_token else 0
    dense_dims = dataclasses.replace(d, i=d.dense_width, experts_per_token=0, num_experts=0, expert_width=0,
                                     dense_layers=0)
    return [span for span in ((0, dense, dense_dims), (dense, d.L, d)) if span[1] > span[0]]


def step_memory(d: Dims, B: int, T: int, *, adapted: set[str], r: int, a: int, adapter_b: int, autocast: bool,
          bits: int, padded: bool, checkpointing: bool | str | int, chunked: bool, chunk_bytes: int, max_linear: int,
          grad_bytes: int, layer_grad_bytes: int, grads_persist: bool, fused: bool = False,
          max_mlp_linear: int | None = None, device: str = "cuda", factor_copy_bytes: int = 0) -> StepPeak:
    """The predicted peak of one step (:class:`StepPeak`).

    ``max_mlp_linear``: for a MoE model, the numel of the largest linear layer outside the attention in its MoE
    layers (an expert's, a shared expert's): the one dequantized while the MoE block's activations are alive
    (``max_linear``, maybe an attention projection, only after they are freed).

    Adapter gradients (``grad_bytes`` in all, ``layer_grad_bytes`` for the most adapted decoder layer): the
    loop frees them after each optimizer step (``zero_grad(set_to_none=True)``), so with one micro-batch
    per step none exist at the loss, and the backward pass makes them layer by layer from the last while it
    frees what each finished layer kept: a layer sees the gradients of every layer after it, and its own once
    its backward has begun (not at the end of a MoE layer's recompute). With ``grads_persist`` (several
    micro-batches per step, or DDP's gradient buckets) all of them live throughout.

    ``factor_copy_bytes``: what each layer keeps of its adapters' factors cast for the matmul (under 16-bit
    autocast with fp32 adapters, the 16-bit copies the backward pass needs; the most adapted layer's).

    Layers of different kinds (a MoE model's dense first layers, :func:`layer_spans`) keep their own bytes; the
    backward pass's peak is the largest over the kinds, each at its own worst layer.

    ``checkpointing="offload"``: the layer checkpoints held in host memory are ``details["checkpoint_host_bytes"]``;
    an integer ``k``: only the first ``k`` layers are checkpointed.
    ``fused``: the adapted layers run :mod:`qolora.adapters.kernels`' fused step (no fp32 <-> 16-bit casts).
    ``device``: ``"cpu"`` runs multi-head latent attention in SDPA's math kernel (:func:`mla_attention`).
    """
    N = B * T
    if d.kv_lora_rank and device == "cpu":
        d = dataclasses.replace(d, sdpa_math=True)
    layer_input = N * d.h * a
    rope = 2 * N * d.head_dim * a if d.family == "llama" else 0
    top = 4 * N * d.h + 4 * N + rope  # final norm keeps its fp32 input and 1/rms
    spans, transient_details = _spans(d, B, T, adapted=adapted, r=r, a=a, adapter_b=adapter_b, autocast=autocast,
                                      bits=bits, padded=padded, fused=fused, max_linear=max_linear,
                                      max_mlp_linear=max_mlp_linear)
    spans = [(first, end, kept + factor_copy_bytes, candidates) for first, end, kept, candidates in spans]
    per_layer = max(s[2] for s in spans)

    def kept_in(lo: int, hi: int) -> int:
        """Bytes the layers lo..hi-1 keep when none of them is checkpointed."""
        return sum(max(0, min(hi, end) - max(lo, first)) * kept for first, end, kept, _ in spans)

    def grads(own: bool, layers_after: int) -> int:
        return grad_bytes if grads_persist else min(grad_bytes, (layers_after + own) * layer_grad_bytes)

    def met(lo: int, hi: int, held: int) -> tuple[int, int]:
        """(bytes, of which adapter gradients) at the worst backward pass of an un-checkpointed layer in
        lo..hi-1, the layers after it freed, ``held`` bytes besides. Along a run of alike layers the kept
        activations fall and the gradients grow linearly, so the worst is at one end of each run: its last
        layer (the most kept) or its first (the most gradients)."""
        return max((held + kept_in(lo, e) + rope + t + grads(own, d.L - e), grads(own, d.L - e))
                   for first, end, _, candidates in spans if min(hi, end) > max(lo, first)
                   for e in {min(hi, end), max(lo, first) + 1}
                   for t, own in candidates)

    def recomputed(hi: int, held: int) -> tuple[int, int]:
        """(bytes, of which adapter gradients) at the worst recompute of a checkpointed layer in 0..hi-1 with
        ``held`` bytes held: each kind's first such layer (the most gradients after it). The recomputed layer's
        norm keeps the checkpointed input itself when it is already fp32."""
        own_input = layer_input if a == 4 and d.family == "llama" else 0
        return max((held + rope + kept - own_input + t + grads(own, d.L - 1 - first),
                    grads(own, d.L - 1 - first))
                   for first, end, kept, candidates in spans if first < hi for t, own in candidates)

    host = 0
    partial = type(checkpointing) is int and 0 < checkpointing < d.L
    # The backward pass goes from the last layer to the first, each leaving its adapters' gradients: the
    # first layer it meets holds at most its own, a recomputed layer those of every layer after it. The
    # checkpointed inputs of all layers stay alive through it (measured: tests/planning/test_plan.py).
    if partial:
        # The first k layers keep their input, the others all their activations. The backward pass meets
        # the un-checkpointed layers first (everything still held), then recomputes the checkpointed ones
        # (the others' activations freed by then): the layer peak is the larger of the two.
        k = checkpointing
        kept_at_loss = k * layer_input + kept_in(k, d.L) + top
        in_layer = max(met(k, d.L, k * layer_input), recomputed(k, k * layer_input))
    elif checkpointing:
        if checkpointing == "offload":
            # Every layer's checkpoint waits in host memory. On the device: the first layer's input (the
            # embedding output, a leaf that requires grad, held by autograd anyway) and, in the backward
            # pass, the one checkpoint brought back for its layer's recompute.
            host = d.L * layer_input
            kept_at_loss = layer_input + top
            in_layer = recomputed(d.L, 2 * layer_input)
        else:
            kept_at_loss = d.L * layer_input + top
            in_layer = recomputed(d.L, d.L * layer_input)
    else:
        kept_at_loss = kept_in(0, d.L) + top
        in_layer = met(0, d.L, 0)
    loss = loss_bytes(d, B, T, a, chunked, chunk_bytes)
    mask = B * T * T * (a + 1) if padded else 0  # a padded batch's (B, 1, T, T) mask and its bool source, all step
    kept_at_loss, in_layer = kept_at_loss + mask, (in_layer[0] + mask, in_layer[1])
    grads_at_loss = grad_bytes if grads_persist else 0
    at_loss = kept_at_loss + loss + grads_at_loss
    details = {"per_layer_activation_bytes": per_layer, "checkpointed_input_bytes": layer_input, **transient_details,
               "peak_at_loss_bytes": at_loss, "checkpoint_host_bytes": host, "adapter_grad_bytes_in_all": grad_bytes}
    return _largest_moment(kept_at_loss, loss, grads_at_loss, in_layer, grad_bytes, details)


def _largest_moment(kept_at_loss: int, loss: int, grads_at_loss: int, in_layer: tuple[int, int], grad_bytes: int,
                    details: dict) -> StepPeak:
    """The largest of the three moments: the loss, a layer's backward pass (``(bytes, of which gradients)``), the
    optimizer step (every gradient)."""
    at_loss = kept_at_loss + loss + grads_at_loss
    (layer_bytes, layer_grads), details["peak_in_layer_bytes"] = in_layer, in_layer[0]
    if at_loss >= layer_bytes and at_loss >= grad_bytes:
        return StepPeak(kept_at_loss, loss, grads_at_loss, "loss", details)
    if layer_bytes >= grad_bytes:
        return StepPeak(layer_bytes - layer_grads, 0, layer_grads, "layer", details)
    return StepPeak(0, 0, grad_bytes, "optimizer", details)


def _spans(d: Dims, B: int, T: int, *, max_linear: int, max_mlp_linear: int | None, **layer_args
           ) -> tuple[list[tuple[int, int, int, list[tuple[int, bool]]]], dict]:
    """``[(first layer, end, bytes each of them keeps, the candidate peaks of its backward pass)]`` of each run of
    alike decoder layers (:func:`layer_spans`), and the transients' parts for the plan's details (the largest)."""
    layer_fn = gpt2_layer if d.family == "gpt2" else llama_layer
    spans, details = [], {}
    for first, end, kind in layer_spans(d):
        candidates, parts = _layer_transients(kind, B, T, **layer_args, max_linear=max_linear,
                                              max_mlp_linear=max_mlp_linear)
        spans.append((first, end, layer_fn(kind, B, T, **layer_args), candidates))
        details = {k: max(v, details.get(k, 0)) for k, v in parts.items()}
    return spans, details


def _layer_transients(d: Dims, B: int, T: int, *, adapted: set[str], r: int, a: int, adapter_b: int, autocast: bool,
                      bits: int, padded: bool, fused: bool, max_linear: int, max_mlp_linear: int | None
                      ) -> tuple[list[tuple[int, bool]], dict]:
    """The candidate peaks of one layer's backward pass above what the layers keep: ``[(bytes, whether the
    layer's own adapter gradients exist by then)]``, and their parts for the plan's details."""
    N = B * T
    layer_fn = gpt2_layer if d.family == "gpt2" else llama_layer
    # Working gradients of one layer (output, MLP): under autocast each adapted input's gradient also passes
    # through the fp32 <-> 16-bit casts on the plain path, which doubles the temporaries.
    work = N * (d.i + d.h) * a * (2 if autocast and not fused else 1)
    dequant = max_linear * a
    # The fused step frees its dequantized weight before it makes the adapter's gradients, so within one
    # layer's backward pass the two peak one after the other (measured: tests/planning/test_plan.py); on the plain
    # path bitsandbytes' dequantized weight coexists with the adapter branch's temporaries.
    transient = max(work, dequant) if fused else work + dequant
    # (bytes, whether the layer's own adapter gradients exist by then) of each candidate peak within a layer
    candidates = [(transient, True)]
    if d.experts_per_token and max_mlp_linear is not None:
        # A MoE layer's backward pass (measured: tests/planning/test_plan_moe.py; at full width
        # benchmarks/scale.py) meets three candidate peaks, all over the recomputed layer:
        # * the end of the recompute (moe_recompute_end_bytes; Qwen3-30B-A3B's peak), before any of the
        #   layer's own gradients;
        # * the experts' backward, one expert at a time: the largest weight outside the attention dequantized
        #   (Mixtral's peak: the last expert's gate_up, its other activations already freed, an average
        #   expert's share of the block's), with the working gradients of one expert (its gate/up output and
        #   down input, (N*k/E) x 3I) and the block's incoming one (N, h), never the dense formula's (N, k*I)
        #   at once (the input's gradient accumulator comes with the next expert, this one's activations freed);
        # * the attention's backward, after the block's activations are freed: its own (larger) weights.
        k, E = d.experts_per_token, d.num_experts
        routed = layer_fn(d, B, T, adapted, r, a, adapter_b, autocast, bits, padded, fused) - layer_fn(
            dataclasses.replace(d, experts_per_token=0, num_experts=0, i=0), B, T, adapted, r, a, adapter_b,
            autocast, bits, padded, fused)  # what the MoE block keeps (freed before the attention's backward)
        moe_work = N * d.h * a + -(-N * k // E) * 3 * d.expert_width * a
        expert = max_mlp_linear * a + moe_work
        candidates = [(moe_recompute_end_bytes(d, N, a), False),
                      # the first expert's backward: every other expert's activations alive, no gradient of the
                      # layer's yet; the last one's: the others' activations freed, their gradients made
                      (expert - routed // E, False),
                      (expert - routed + routed // E, True),
                      (transient - routed, True)]
    return candidates, {"working_grad_bytes": work, "dequantized_weight_bytes": dequant}


def loss_bytes(d: Dims, B: int, T: int, a: int, chunked: bool, chunk_bytes: int) -> int:
    """Bytes of the loss at its peak, beside the kept activations."""
    n_loss = B * max(T - 1, 1)
    if not chunked:
        return 3 * 4 * n_loss * d.vocab  # full fp32 logits: log-softmax output, NLL's gradient, its gradient
    # One chunk's fp32 logits at a time (turned into their gradient in place), plus the chunk in the matmul
    # dtype under 16-bit autocast, plus the hidden states' gradient (n_loss, h), computed in the forward pass
    # and held until the backward pass, beside the gathered labelled hidden states it is for.
    chunk_tokens = max(1, min(n_loss, chunk_bytes // (4 * d.vocab)))
    return (4 + (a if a != 4 else 0)) * chunk_tokens * d.vocab + 2 * n_loss * d.h * a
