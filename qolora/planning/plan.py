"""``qolora plan``: does a fine-tuning job fit, and with what? Answered from ``config.json`` alone.

The model is built on the ``meta`` device (``accelerate.init_empty_weights`` +
``AutoModelForCausalLM.from_config``, no remote code), so every parameter is counted exactly and no
weight is read. The answer is a :class:`MemoryPlan` with one figure per component and the predicted
peak of one training step. Notation: ``N = batch_size * seq_len`` tokens, ``h`` hidden size, ``i``
intermediate size, ``q = heads * head_dim``, ``kv = kv_heads * head_dim``, ``V`` vocabulary, ``L``
decoder layers, ``r`` rank, ``a`` bytes of the compute dtype (2 for bf16), ``n`` a weight's numel.

Stored weights (exact; what :func:`qolora.prepare` builds):

* 4-bit linear (``nn.Linear`` / GPT-2 ``Conv1D``, not the output head): ``ceil(n/2)`` packed bytes;
  absmax per ``blocksize`` block: fp32 (``4*blocks``), or with double quantization uint8 (``blocks``)
  + fp32 per 256 blocks (``4*ceil(blocks/256)``) + the 256-entry fp32 second-level code (1024) + a
  fp32 offset (4); plus the 16-entry fp32 NF4/FP4 code (64). Every layer owns its code tables.
* 8-bit linear: ``n`` int8 + one fp32 scale per output row (``4*out``).
* everything else (embeddings, norms, the head (a tied head once), biases) in the compute dtype;
  buffers (rotary frequencies) as the skeleton holds them.
* adapters: ``r*(in+out)`` per targeted layer in the adapter dtype; their gradients the same.

Optimizer states (exact; bitsandbytes' rules): ``adamw`` (torch): 2 states in the adapter dtype + a
4-byte step per tensor. ``*_32bit``: ``2*4`` bytes per parameter. ``*_8bit``: a tensor with fewer
than 4096 elements keeps fp32 states (``2*4*n``); a larger one ``2*n`` + ``2*4*ceil(n/256)`` block
maxima; plus two shared 256-entry fp32 quantization maps. Paged variants take the same GPU memory
(paging only moves pages out under pressure).

Activations (a derived estimate, validated on the CPU against an exact allocation tracker in
``tests/planning/test_plan.py``). Per decoder layer, the tensors autograd keeps for the backward pass of a
Llama-style layer (Llama, Mistral, Qwen2, ...; no padding mask, so grouped-query attention runs in SDPA
without repeated K/V)::

    norms      2 * (4*N*h + 4*N)              RMSNorm keeps its fp32 input and 1/rms
    attention  a*N*(q + 2*kv) + a*N*q + 4*B*heads*T   rotated q, k, v; SDPA output + logsumexp
    mlp        3*a*N*i                        gate (SiLU input), SiLU output, up
    inputs     a*N*w per adapted layer's input w, once per tensor when shared (fp32 compute), or one
               16-bit copy per adapted layer under bf16/fp16 autocast (fp32 adapters cast their input)
    adapters   a*N*r per adapted layer        the ``x @ A^T`` kept for ``B``
    qk norms   4*N*(q + kv) + 4*N*(heads + kv_heads)   Qwen3's per-head q_norm / k_norm (fp32 input, 1/rms)

A Mixture-of-Experts layer (k of E experts per token, expert width I; :mod:`qolora.planning.memory_model`'s
``moe_routing_bytes``) counts its MLP terms at ``i = k*I`` (+ a shared expert) and, per routed pair,
``3*a*h`` (the gathered input, the expert's output, the weighted output that ``index_add_`` keeps), the
experts' adapter ``x @ A^T`` per pair, and the router's fp32 probabilities ``4*N*E``. In its backward
pass the experts' weights are dequantized while the block's activations live (the largest linear outside
the attention), the attention's after they are freed; the end of the layer's recompute also holds the
routing mask ``8*N*k*(E+1)``, the block's input and output accumulator and the incoming gradient
(``3*a*N*h``) and the router logits. Measured: ``tests/planning/test_plan_moe.py``, and full-width
Mixtral-8x7B / Qwen3-30B-A3B layers in ``benchmarks/scale.py``.

GPT-2 style layers (LayerNorm, fused ``c_attn``, GELU MLP) use the same terms with their own list
(see :func:`gpt2_layer`). Without gradient checkpointing all ``L`` layers are kept; with it, only
each layer's input (``a*N*h`` each) plus one recomputed layer. Offloaded checkpointing
(``gradient_checkpointing="offload"``, :mod:`qolora.memory.gradient_checkpointing`) keeps those ``L`` inputs in
pinned host memory (``checkpoint_host_bytes``); the GPU holds the first layer's input (the embedding
output, which autograd keeps as a leaf) and, in the backward pass, the one input brought back for its
layer's recompute. On a CPU device nothing moves (host and device are one memory). With
``offload_embedding`` (:mod:`qolora.memory.host_embedding`) the input embedding's bytes (``V*h*a``, exact) leave
the GPU part for pinned host memory (``embedding_host_bytes``); its gathered rows reach the GPU as the
same ``a*N*h`` embedding output as before, so no activation changes (CUDA only, like the checkpoints).
On top: the backward pass's working
gradients of one layer (``a*N*(i + h)``, doubled under autocast, where every adapted input's
gradient also passes through the fp32 <-> 16-bit casts), the rotary tables, the final norm, and one dequantized
weight (the largest, in the compute dtype: bitsandbytes dequantizes a whole weight per matmul when
training).

The loss: the plain loss computes full logits and ``cross_entropy`` in fp32: at the start of the
backward pass the log-softmax output, the gradient from NLL and the log-softmax gradient coexist,
``3*4*N*V`` bytes. The loop's loss (:func:`qolora.memory.chunked_loss.causal_lm_loss_sum`, ``chunked_loss=True``)
holds one chunk of fp32 logits at a time, turned into its gradient in place, plus the same chunk in
the matmul dtype under 16-bit autocast and the hidden states' gradient, computed in the forward pass
and held until the backward pass: ``(4 + a16)*chunk_tokens*V + a*N*h`` with
``chunk_tokens = loss_chunk_bytes / (4*V)`` (:data:`qolora.memory.chunked_loss.DEFAULT_CHUNK_BYTES`); prompt-masked
tokens never reach the head. Validated with the rest of the step in ``tests/planning/test_plan.py``.

The peak of one step is the larger of two moments: the start of the backward pass (all kept
activations + the loss) and the backward pass of the most loaded layer (kept activations, the
recomputed layer with gradient checkpointing, working gradients, one dequantized weight). Adapter
gradients and optimizer states are added to both (steady state; the first step has no states yet).
On CUDA the plan adds the CUDA context (500 MiB; it varies 300-900 MiB with the driver and kernels
loaded) and an allocator margin of ``max(256 MiB, 5%)`` of the rest for fragmentation in PyTorch's
caching allocator. On the CPU neither is added.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters.kernels import check_kernels, fused_step
from ..base.experts import is_router, moe_counts
from ..base.hf_config import builtin_configs, load_hf_config
from ..base.reader import (
    layer_shape,
    linear_layers,
    meta_skeleton,
    rank_problem,
    select_targets,
)
from ..config import DTYPES, AdapterConfig, parse_size
from ..errors import ConfigError
from ..memory.base_streaming import check_offload, decoder_layers, spread
from ..memory.chunked_loss import DEFAULT_CHUNK_BYTES
from ..memory.gradient_checkpointing import check_checkpointed_layers, checkpointing_mode
from ..memory.host_embedding import check_untied, input_embedding_name
from .memory_model import OPTIMIZERS, adapted_kinds, model_dims, optimizer_bytes, quantized_bytes, step_memory

__all__ = ["MemoryPlan", "plan", "add_parser", "run"]

logger = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2
CUDA_CONTEXT_BYTES = 500 * MiB
MARGIN_FRACTION = 0.05
MARGIN_MIN_BYTES = 256 * MiB
LOSS_CHUNK_BYTES = DEFAULT_CHUNK_BYTES  # the loop's loss (qolora.memory.chunked_loss)
_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f}"


def skeleton_for_plan(hf_config, dtype: torch.dtype) -> nn.Module:
    """:func:`qolora.base.reader.meta_skeleton` without any stored quantization, weights tied (a tied
    head is one parameter, counted once, as after loading)."""
    cfg = hf_config
    if getattr(cfg, "quantization_config", None) is not None:
        cfg = cfg.__class__.from_dict(cfg.to_dict())
        del cfg.quantization_config
    model = meta_skeleton(cfg, dtype)
    model.tie_weights()
    return model


# ---------------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """Predicted memory of fine-tuning one model (bytes). See the module docstring for the formulas.

    Attributes:
        quantized_weights_bytes: the quantized linear layers (packed weights + quantization statistics).
        other_weights_bytes: embeddings, norms, head, biases and buffers, unquantized.
        weights_bytes: all base weights as stored (the two above).
        adapter_bytes / adapter_grad_bytes: trainable adapter weights and their gradients.
        optimizer_bytes: optimizer states.
        activation_bytes: activations kept at the peak moment (incl. working gradients and one dequantized weight).
        loss_bytes: logits and loss buffers at the peak moment (0 when the peak is inside the layers).
        peak_moment: ``"loss"`` (start of the backward pass) or ``"layer"`` (backward through a layer).
        step_bytes: the peak of one training step above the prepared model (activations + loss + adapter
            gradients + optimizer states).
        cuda_context_bytes / margin_bytes: CUDA context and allocator margin (0 on the CPU).
        total_bytes: predicted peak of everything (GPU and host).
        checkpoint_host_bytes: with offloaded checkpointing, the decoder layers' checkpointed inputs held in
            pinned host memory (``activation_bytes`` is then what stays on the GPU).
        offload / offloaded_layers: the offload setting and the decoder layers whose frozen base lives in host memory.
        offloaded_bytes: those layers' frozen bytes (quantized weights, statistics, norms, biases).
        offload_embedding / embedding_host_bytes: whether the input embedding is kept in host memory (asked for,
            or chosen by ``offload="auto"`` before any layer) and its bytes there (0 on the CPU: one memory).
        in_flight_bytes: the largest two offloaded layers: on the GPU at once (computing + prefetched).
        gpu_bytes: ``total_bytes - host_bytes + in_flight_bytes``; host_bytes: ``offloaded_bytes +
            checkpoint_host_bytes + embedding_host_bytes`` (pinned).
        host_memory: host memory to check ``host_bytes`` against (None: not checked).
        fits: ``gpu_bytes <= gpu_memory`` (and ``host_bytes <= host_memory`` when given) when ``gpu_memory`` was given.
        max_seq_len / max_batch_size: the longest sequence (at ``batch_size``) and the largest batch (at
            ``seq_len``) that fit ``gpu_memory`` (None without it, 0 when nothing fits); with ``offload="auto"``
            as many layers offloaded as that takes.
        suggestions: changes that make it fit, each with its predicted total.
        fewest_checkpointed_layers: when it fits with every layer checkpointed, the fewest decoder layers
            that still need checkpointing to fit (``gradient_checkpointing=N``: the others keep their
            activations and skip the recompute, a faster step); 0 means it fits without checkpointing; None
            when every layer needs it (or without ``gpu_memory``).
    """

    model: str
    model_type: str
    num_layers: int
    settings: dict
    quantized_weights_bytes: int
    other_weights_bytes: int
    adapter_bytes: int
    adapter_grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    loss_bytes: int
    peak_moment: str
    cuda_context_bytes: int
    margin_bytes: int
    n_adapted_layers: int = 0
    trainable_params: int = 0
    details: dict = field(default_factory=dict)
    gpu_memory: int | None = None
    max_seq_len: int | None = None
    max_batch_size: int | None = None
    suggestions: list[dict] = field(default_factory=list)
    offload: str | None = None
    offloaded_layers: list[int] = field(default_factory=list)
    offloaded_bytes: int = 0
    in_flight_bytes: int = 0
    host_memory: int | None = None
    checkpoint_host_bytes: int = 0
    fewest_checkpointed_layers: int | None = None
    offload_embedding: bool = False
    embedding_host_bytes: int = 0

    @property
    def num_offloaded_layers(self) -> int:
        return len(self.offloaded_layers)

    @property
    def weights_bytes(self) -> int:
        return self.quantized_weights_bytes + self.other_weights_bytes

    @property
    def step_bytes(self) -> int:
        return (self.activation_bytes + self.checkpoint_host_bytes + self.loss_bytes + self.adapter_grad_bytes
                + self.optimizer_bytes)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.adapter_bytes + self.step_bytes + self.cuda_context_bytes + self.margin_bytes

    @property
    def gpu_bytes(self) -> int:
        return self.total_bytes - self.host_bytes + self.in_flight_bytes

    @property
    def host_bytes(self) -> int:
        return self.offloaded_bytes + self.checkpoint_host_bytes + self.embedding_host_bytes

    @property
    def host_fits(self) -> bool | None:
        return None if self.host_memory is None else self.host_bytes <= self.host_memory

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory is None:
            return None
        return self.gpu_bytes <= self.gpu_memory and self.host_fits is not False

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("weights_bytes", "step_bytes", "total_bytes", "gpu_bytes", "host_bytes", "fits", "host_fits",
                     "num_offloaded_layers"):
            d[name] = getattr(self, name)
        return d

    def format_table(self) -> str:
        """A human-readable, aligned table in GiB."""
        s = self.settings
        rows = [
            ("quantized linear weights", self.quantized_weights_bytes,
             f"{s['bits']}-bit" + (f" {s['quant_type']}, blocksize {s['blocksize']}"
                                   + (", double quant" if s["double_quant"] else "")
                                   if s["bits"] == 4 else "")
             + (f"; FSDP: 1/{s['num_gpus']} of the layers + 2 gathered" if s.get("fsdp") and s.get("num_gpus", 1) > 1
                else "")),
            ("other weights", self.other_weights_bytes, f"embeddings, norms, head in {s['compute_dtype']}"),
            ("adapters", self.adapter_bytes, f"r={s['rank']} on {self.n_adapted_layers} layers, "
                                             f"{self.trainable_params:,} params, {s['adapter_dtype']}"),
            ("adapter gradients", self.adapter_grad_bytes, ""),
            ("optimizer states", self.optimizer_bytes, s["optim"]),
            ("activations", self.activation_bytes,
             f"seq {s['seq_len']} x batch {s['batch_size']}, "
             f"checkpointing {_checkpointing_text(s['gradient_checkpointing'])}"
             + (" (on the GPU)" if self.checkpoint_host_bytes else "")),
            ("layer checkpoints (host)", self.checkpoint_host_bytes,
             f"{self.num_layers} x seq x hidden in pinned host memory" if self.checkpoint_host_bytes else ""),
            ("loss", self.loss_bytes, ("chunked" if s["chunked_loss"] else "full fp32 logits")
             + ("" if self.loss_bytes or self.peak_moment == "loss" else " (peak is inside the layers)")),
            ("CUDA context", self.cuda_context_bytes, ""),
            ("allocator margin", self.margin_bytes,
             f"max(256 MiB, {MARGIN_FRACTION:.0%})" if self.margin_bytes else ""),
        ]
        rows = [r for r in rows if r[0] != "layer checkpoints (host)" or r[1]]
        width = max(len(r[0]) for r in rows)
        gpus = s.get("num_gpus", 1)
        per_gpu = (f", per GPU of {gpus} ({'FSDP' if s.get('fsdp') else 'data parallel'}, batch per GPU)"
                   if gpus > 1 else "")
        lines = [f"{self.model} ({self.model_type}, {self.num_layers} layers) on {s['device']}{per_gpu}",
                 f"{'component':<{width}}  {'GiB':>8}  note", "-" * (width + 40)]
        lines += [f"{name:<{width}}  {_gib(b):>8}  {note}".rstrip() for name, b, note in rows]
        lines.append("-" * (width + 40))
        if moe := self.details.get("moe"):
            lines.append(f"experts: {moe['num_experts']} per layer in {moe['moe_layers']} layers, "
                         f"{moe['experts_per_token']} per token, {moe['expert_bytes'] / 2**20:.1f} MiB each "
                         f"quantized; parameters {moe['active_params'] / 1e9:.2f}B active of "
                         f"{moe['total_params'] / 1e9:.2f}B")
        lines.append(f"{'total (predicted peak)':<{width}}  {_gib(self.total_bytes):>8}  "
                     f"weights {_gib(self.weights_bytes)}, peak at the {self.peak_moment}")
        on_host = self.offload is not None or self.checkpoint_host_bytes or self.embedding_host_bytes
        if on_host:
            parts = [text for text, on in (("layer checkpoints", self.checkpoint_host_bytes),
                                           ("offloaded layers", self.offload is not None),
                                           ("input embedding", self.embedding_host_bytes)) if on]
            lines.append(f"{'host memory':<{width}}  {_gib(self.host_bytes):>8}  {' + '.join(parts)}"
                         + ("" if self.host_memory is None else
                            f"; host has {_gib(self.host_memory)} GiB" + ("" if self.host_fits else ": NOT enough")))
        if self.offload is not None:  # its share of the host memory above
            lines.append(f"{'offloaded to host':<{width}}  {_gib(self.offloaded_bytes):>8}  "
                         f"{self.num_offloaded_layers} of {self.num_layers} decoder layers in pinned host memory "
                         f"(offload={self.offload!r})")
        if self.embedding_host_bytes:  # its share of the host memory above
            lines.append(f"{'input embedding (host)':<{width}}  {_gib(self.embedding_host_bytes):>8}  "
                         "frozen, in pinned host memory: rows gathered there, copied to the GPU (offload_embedding)")
        if on_host:
            lines.append(f"{'GPU part':<{width}}  {_gib(self.gpu_bytes):>8}  total - host memory"
                         + (f" + {_gib(self.in_flight_bytes)} GiB in flight (2 layers)" if self.offload else ""))
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{'GPU memory':<{width}}  {_gib(self.gpu_memory):>8}  {verdict} "
                         f"({_gib(self.gpu_memory - self.gpu_bytes)} GiB left)")
            lines.append(f"longest seq_len at batch {s['batch_size']}: {self.max_seq_len}; "
                         f"largest batch at seq_len {s['seq_len']}: {self.max_batch_size}")
            if self.fewest_checkpointed_layers is not None:
                k = self.fewest_checkpointed_layers
                lines.append(f"faster, still fits: --gradient-checkpointing {k} (checkpoint the first {k} of "
                             f"{self.num_layers} layers; the others skip the recompute)" if k else
                             "faster, still fits: --gradient-checkpointing off (no layer needs checkpointing)")
            for sug in self.suggestions:
                lines.append(f"  suggestion: {sug['change']}: {_gib(sug.get('gpu_bytes', sug['total_bytes']))} GiB"
                             + (" (fits)" if sug["fits"] else " (still too big)"))
        return "\n".join(lines)


def plan(
    model: Any,
    *,
    bits: int = 4,
    rank: int = 16,
    alpha: float | None = None,
    target_modules: list[str] | tuple[str, ...] | None = None,
    seq_len: int = 2048,
    batch_size: int = 1,
    grad_accum: int = 1,
    optim: str = "paged_adamw_8bit",
    gradient_checkpointing: bool | str | int = True,
    gpu_memory: int | str | None = None,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: str = "bf16",
    adapter_dtype: str = "fp32",
    chunked_loss: bool = True,
    loss_chunk_bytes: int = LOSS_CHUNK_BYTES,
    kernels: str = "auto",
    device: str = "cuda",
    padded: bool | None = None,
    offload: str | None = None,
    host_memory: int | str | None = None,
    num_gpus: int = 1,
    fsdp: bool = False,
    offload_embedding: bool = False,
    _search: bool = True,
    _step_by_layers: bool = False,
) -> MemoryPlan:
    """Predict the memory of fine-tuning ``model`` with qolora, from its config alone.

    Args:
        model: a built-in name (``"llama-3-8b"``), a ``config.json`` path, a folder holding one, a hub id in
            the HF cache, a transformers config, a config dict, or a :class:`qolora.base.synthetic.SyntheticCheckpoint`.
        bits, rank, alpha, target_modules, quant_type, blocksize, double_quant, adapter_dtype: as in
            :func:`qolora.prepare` (``target_modules=None``: every linear layer but the head).
        seq_len, batch_size: tokens per example and examples per micro-batch.
        grad_accum: micro-batches per step (does not change the peak: one micro-batch lives at a time).
        optim: one of :data:`qolora.training.options.OPTIMIZERS`.
        gradient_checkpointing: recompute each layer in the backward pass; ``"offload"``: and keep the
            checkpointed layer inputs in host memory (:mod:`qolora.memory.gradient_checkpointing`; CUDA only: on
            ``device="cpu"`` it is ordinary checkpointing); an integer ``k``: only the first ``k`` decoder
            layers are checkpointed, the others keep all their activations; ``"auto"`` is planned as True (every
            layer; a training run chooses at launch from this plan's figures, see
            :mod:`qolora.training.auto_choices`, and with ``gpu_memory`` the "faster, still fits" line
            gives the fewest layers that fit).
        gpu_memory: bytes or a size (``"24GiB"``): then ``fits``, the longest ``seq_len``, the largest
            ``batch_size`` and suggestions are filled in.
        compute_dtype: dtype of the unquantized weights and of activations. 16-bit means qolora's GPU
            setting (16-bit base, 16-bit autocast, adapters in ``adapter_dtype``); ``"fp32"`` the CPU one
            (no autocast).
        chunked_loss: assume the loop's chunked loss (at most ``loss_chunk_bytes`` of fp32 logits per chunk).
        kernels: as in :func:`qolora.prepare`: ``"auto"`` (the fused adapter step on 4-bit and 16-bit
            bases) or ``"off"`` (the plain path).
        device: ``"cuda"`` adds the CUDA context and allocator margin; ``"cpu"`` does not (used to validate
            the formulas against exact CPU allocation counts). bitsandbytes keeps the same tensors on both.
        padded: whether batches carry a padding mask (then SDPA materialises repeated K/V heads);
            None = ``batch_size > 1``.
        offload: None/``"none"``, ``"cpu"`` (every decoder layer's frozen base in host memory, two layers
            on the GPU at a time) or ``"auto"`` (the fewest offloaded layers that fit ``gpu_memory``, which
            it needs), as :func:`qolora.prepare` does it.
        host_memory: bytes or a size of host memory the offloaded part must fit in (None: not checked).
        num_gpus: data-parallel processes (one per GPU; ``batch_size`` is per GPU). Without ``fsdp``
            each GPU holds the whole quantized base and the plan is that of one GPU at ``batch_size``.
        fsdp: shard the quantized decoder-layer weights over the ``num_gpus`` GPUs (FSDP-QLoRA): each
            GPU keeps ``1/num_gpus`` of them plus two whole layers (the one computing and the one
            being gathered ahead of it); embeddings, head, norms and adapters stay whole (conservative).
        offload_embedding: keep the input embedding in host memory (:mod:`qolora.memory.host_embedding`; untied
            embeddings only). With ``offload="auto"`` the plan also does this by itself, on an untied model, when
            it does not fit otherwise, before it offloads any decoder layer.

    Returns:
        A :class:`MemoryPlan`.

    Raises:
        ConfigError: bad options or a config that cannot be built (all problems at once for options).
    """
    problems = AdapterConfig(bits=bits, rank=rank, alpha=alpha, quant_type=quant_type, blocksize=blocksize,
                             double_quant=double_quant, adapter_dtype=adapter_dtype, dtype=compute_dtype,
                             target_modules=tuple(target_modules) if target_modules is not None else None,
                             device="cpu").problems()
    if optim not in OPTIMIZERS:
        problems.append(f"optim={optim!r} is not supported; allowed: {list(OPTIMIZERS)}")
    try:
        check_kernels(kernels)
    except ValueError as exc:
        problems.append(str(exc))
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name}={value!r} must be an integer >= 1")
    try:
        gradient_checkpointing = checkpointing_mode(gradient_checkpointing)
    except ValueError as exc:
        problems.append(str(exc))
    if gradient_checkpointing == "auto":  # chosen at launch from this plan's figures; planned as every layer
        gradient_checkpointing = True
    if device not in ("cuda", "cpu"):
        problems.append(f"device={device!r} is not supported; allowed: 'cuda', 'cpu'")
    try:
        offload = check_offload(offload)
    except ConfigError as exc:
        problems += exc.problems if hasattr(exc, "problems") else [str(exc)]
    if offload == "auto" and gpu_memory is None:
        problems.append("offload='auto' needs gpu_memory: the memory to fit by offloading decoder layers")
    if not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1:
        problems.append(f"num_gpus={num_gpus!r} must be an integer >= 1")
    if fsdp and offload is not None and num_gpus > 1:
        problems.append("fsdp and offload are not planned together: choose one")
    if not isinstance(offload_embedding, bool):
        problems.append(f"offload_embedding={offload_embedding!r} must be True or False")
    elif offload_embedding and fsdp and num_gpus > 1:
        problems.append("fsdp and offload_embedding are not planned together: FSDP shards the base instead; choose one")
    if problems:
        raise ConfigError(problems)
    gpu = parse_size(gpu_memory, "gpu_memory") if gpu_memory is not None else None
    host = parse_size(host_memory, "host_memory") if host_memory is not None else None

    hf_config = load_hf_config(model)
    check_checkpointed_layers(gradient_checkpointing, hf_config)  # as prepare checks it
    if offload_embedding:
        check_untied(hf_config)
    cdtype, adtype = DTYPES[compute_dtype.lower()], DTYPES[adapter_dtype.lower()]
    a, adapter_b = _DTYPE_BYTES[cdtype], _DTYPE_BYTES[adtype]
    autocast = a < 4
    skeleton = skeleton_for_plan(hf_config, cdtype)
    linears = linear_layers(skeleton)
    targets = select_targets(linears, tuple(target_modules) if target_modules is not None else None)
    if problem := rank_problem(linears, targets, rank):
        raise ConfigError(problem)

    quantized = other = 0
    linear_weights = set()
    layers_name, layer_list = decoder_layers(skeleton)
    per_layer_bytes = [0] * len(layer_list)  # frozen bytes of each decoder layer (what offloading moves)
    per_layer_quantized = [0] * len(layer_list)  # its quantized linear bytes (what FSDP shards)

    def layer_of(name: str) -> int | None:
        head, sep, rest = name.partition(layers_name + ".")
        return int(rest.split(".", 1)[0]) if sep and not head else None

    kept = set(targets)  # MoE routers not targeted stay unquantized (counted with the other weights)
    for name, mod in linears.items():
        if is_router(mod) and name not in kept:
            continue
        out_f, in_f = layer_shape(mod)
        nbytes = quantized_bytes(out_f, in_f, bits, blocksize, double_quant, a)
        quantized += nbytes
        linear_weights.add(id(mod.weight))
        if (i := layer_of(name)) is not None:
            per_layer_bytes[i] += nbytes
            per_layer_quantized[i] += nbytes
    if fsdp and num_gpus > 1 and per_layer_quantized:
        in_layers = sum(per_layer_quantized)
        quantized = quantized - in_layers + math.ceil(in_layers / num_gpus) + 2 * max(per_layer_quantized)
    for pname, p in skeleton.named_parameters():  # tied parameters once
        if id(p) not in linear_weights:
            other += p.numel() * a
            if (i := layer_of(pname)) is not None:
                per_layer_bytes[i] += p.numel() * a
    for _, b in skeleton.named_buffers():
        other += b.numel() * b.element_size()
    if offload_embedding:
        input_embedding_name(skeleton)  # the errors prepare gives: tied, or not a plain nn.Embedding
    try:
        input_embedding_name(skeleton)
        replaceable = True
    except ConfigError:
        replaceable = False
    embedding = skeleton.get_input_embeddings()
    embedding_bytes = embedding.weight.numel() * a if embedding is not None else 0
    # Whether the input embedding can live in host memory, and that takes it off a GPU.
    can_move_embedding = replaceable and device == "cuda" and not (fsdp and num_gpus > 1)
    numels = []
    for n in targets:
        out_f, in_f = layer_shape(linears[n])
        numels += [rank * in_f, out_f * rank]
    trainable = sum(numels)
    adapters = trainable * adapter_b
    states = optimizer_bytes(optim, numels, adapter_b)
    max_linear = max((math.prod(layer_shape(m)) for m in linears.values()), default=0)
    # MoE: the largest linear outside the attention, dequantized while the experts' activations are alive
    max_mlp_linear = max((math.prod(layer_shape(m)) for n, m in linears.items() if ".self_attn." not in f".{n}."),
                         default=0)
    d = model_dims(hf_config)
    adapted = adapted_kinds(targets, d.family)

    # Offloaded checkpointing copies nothing when the compute device is the host.
    checkpointing = True if gradient_checkpointing == "offload" and device != "cuda" else gradient_checkpointing

    def step(T: int, B: int, checkpointed=checkpointing):
        return step_memory(d, B, T, adapted=adapted, r=rank, a=a, adapter_b=adapter_b, autocast=autocast, bits=bits,
                     padded=(B > 1) if padded is None else padded, checkpointing=checkpointed,
                     chunked=chunked_loss, chunk_bytes=loss_chunk_bytes, max_linear=max_linear,
                     grads=adapters, states=states, fused=fused_step(kernels, bits), max_mlp_linear=max_mlp_linear)

    def overhead(rest: int) -> tuple[int, int]:
        if device != "cuda":
            return 0, 0
        return CUDA_CONTEXT_BYTES, max(MARGIN_MIN_BYTES, int(MARGIN_FRACTION * rest))

    def moved(n: int) -> tuple[list[int], int, int]:
        """(offloaded layer indices, their bytes, bytes in flight) with ``n`` layers offloaded."""
        chosen = spread(len(per_layer_bytes), n)
        sizes = sorted((per_layer_bytes[i] for i in chosen), reverse=True)
        return chosen, sum(sizes), sum(sizes[:2])

    def host_embedding(on: bool) -> int:
        """Bytes of the input embedding in host memory (none where it cannot leave a GPU)."""
        return embedding_bytes if on and device == "cuda" else 0

    def gpu_for(T: int, B: int, n: int, checkpointed=checkpointing, on_host: bool = offload_embedding) -> int:
        act, loss, _, _ = step(T, B, checkpointed)
        _, off, flight = moved(n)
        rest = quantized + other + 2 * adapters + states + act + loss - off + flight - host_embedding(on_host)
        ctx, margin = overhead(rest)
        return rest + ctx + margin

    num_layers = len(per_layer_bytes)
    most = num_layers if offload is not None else 0
    # offload="auto": the input embedding goes first (it costs almost nothing), then decoder layers.
    embedding_at_most = offload_embedding or (offload == "auto" and can_move_embedding)

    def total_for(T: int, B: int) -> int:  # the GPU part, with as much offloaded as offload allows
        return gpu_for(T, B, most, on_host=embedding_at_most)

    on_host = offload_embedding
    if offload == "auto":
        on_host = embedding_at_most and (offload_embedding or gpu_for(seq_len, batch_size, 0) > gpu)
        n_off = next((n for n in range(num_layers + 1) if gpu_for(seq_len, batch_size, n, on_host=on_host) <= gpu),
                     num_layers)
    else:
        n_off = most
    chosen, off_bytes, flight_bytes = moved(n_off)
    emb_host = host_embedding(on_host)
    act, loss, moment, details = step(seq_len, batch_size)
    ctx, margin = overhead(quantized + other + 2 * adapters + states + act + loss - off_bytes + flight_bytes
                           - emb_host)
    # for gradient_checkpointing="auto" (qolora.training.auto_choices): the step on the device by setting
    if _step_by_layers:
        def device_step(checkpointed) -> int:
            act_k, loss_k, _, _ = step(seq_len, batch_size, checkpointed)
            return act_k + loss_k + adapters + states
        details["step_bytes_by_checkpointed_layers"] = [device_step(k if k < d.L else True) for k in range(d.L + 1)]
        details["step_bytes_offloaded_checkpoints"] = device_step("offload" if device == "cuda" else True)
    details["per_layer_frozen_bytes"] = per_layer_bytes[0] if per_layer_bytes else 0
    details["input_embedding_bytes"] = embedding_bytes
    details["embedding_can_move"] = can_move_embedding
    settings = {"bits": bits, "rank": rank, "alpha": float(rank if alpha is None else alpha),
                "target_modules": list(target_modules) if target_modules is not None else None,
                "seq_len": seq_len, "batch_size": batch_size, "grad_accum": grad_accum, "optim": optim,
                "gradient_checkpointing": gradient_checkpointing, "quant_type": quant_type, "blocksize": blocksize,
                "double_quant": double_quant, "compute_dtype": compute_dtype, "adapter_dtype": adapter_dtype,
                "chunked_loss": chunked_loss, "loss_chunk_bytes": loss_chunk_bytes, "kernels": kernels,
                "device": device,
                "padded": (batch_size > 1) if padded is None else padded, "offload": offload, "num_gpus": num_gpus,
                "fsdp": fsdp, "offload_embedding": offload_embedding}
    name = model if isinstance(model, (str, os.PathLike)) else getattr(hf_config, "_name_or_path", "") or d.family
    result = MemoryPlan(
        model=str(name), model_type=hf_config.model_type, num_layers=d.L, settings=settings,
        quantized_weights_bytes=quantized, other_weights_bytes=other, adapter_bytes=adapters,
        adapter_grad_bytes=adapters, optimizer_bytes=states, activation_bytes=act, loss_bytes=loss,
        peak_moment=moment, cuda_context_bytes=ctx, margin_bytes=margin, n_adapted_layers=len(targets),
        trainable_params=trainable, details=details, gpu_memory=gpu, offload=offload, offloaded_layers=chosen,
        offloaded_bytes=off_bytes, in_flight_bytes=flight_bytes, host_memory=host,
        checkpoint_host_bytes=details["checkpoint_host_bytes"], offload_embedding=on_host,
        embedding_host_bytes=emb_host,
    )
    text_config = getattr(hf_config, "text_config", None) or hf_config
    if moe := moe_counts(skeleton, getattr(text_config, "num_experts_per_tok", 0) or 0):
        expert = next(n for n in linears if ".experts.0." in n).rsplit(".", 1)[0]
        moe["expert_bytes"] = sum(quantized_bytes(*layer_shape(linears[f"{expert}.{p}"]), bits, blocksize,
                                                  double_quant, a) for p in ("gate_up_proj", "down_proj"))
        result.details["moe"] = moe
    if gpu is not None and _search:
        limit = int(getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", 0)
                    or 131072)
        result.max_seq_len = _largest(lambda T: total_for(T, batch_size) <= gpu, limit)
        result.max_batch_size = _largest(lambda B: total_for(seq_len, B) <= gpu, 4096)
        if result.fits and gradient_checkpointing is True and device == "cuda":
            # the GPU part with only the first k layers checkpointed (k = L: every layer, as now)
            fewest = next(k for k in range(d.L + 1)
                          if gpu_for(seq_len, batch_size, n_off, k if k < d.L else True, on_host=on_host) <= gpu)
            # every layer needed (k = L) is the plan as it is: nothing faster to suggest
            result.fewest_checkpointed_layers = fewest if fewest < d.L else None
        if not result.fits:
            result.suggestions = _suggest(model, result, dict(
                bits=bits, rank=rank, alpha=alpha, target_modules=target_modules, seq_len=seq_len,
                batch_size=batch_size, grad_accum=grad_accum, optim=optim,
                gradient_checkpointing=gradient_checkpointing,
                gpu_memory=gpu, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                compute_dtype=compute_dtype, adapter_dtype=adapter_dtype, chunked_loss=chunked_loss,
                loss_chunk_bytes=loss_chunk_bytes, kernels=kernels, device=device, padded=padded, offload=offload,
                host_memory=host, num_gpus=num_gpus, fsdp=fsdp, offload_embedding=offload_embedding), hf_config)
    return result


def _largest(ok, limit: int) -> int:
    """The largest x in [1, limit] with ok(x) (ok is monotone), 0 if none."""
    if not ok(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _suggest(model, current: MemoryPlan, options: dict, hf_config) -> list[dict]:
    changes = []
    if options["bits"] != 4:
        changes.append(("bits=4", {"bits": 4}))
    if not options["gradient_checkpointing"]:
        changes.append(("gradient checkpointing on", {"gradient_checkpointing": True}))
    if options["gradient_checkpointing"] != "offload" and options["device"] == "cuda":
        changes.append(("gradient checkpointing offloaded to host memory (--gradient-checkpointing offload)",
                        {"gradient_checkpointing": "offload"}))
    if options["optim"] not in ("paged_adamw_8bit", "adamw_8bit"):
        changes.append(("optim=paged_adamw_8bit", {"optim": "paged_adamw_8bit"}))
    if not options["chunked_loss"]:
        changes.append(("chunked loss", {"chunked_loss": True}))
    if options["batch_size"] > 1 and current.max_batch_size:
        b = current.max_batch_size
        changes.append((f"batch_size={b}, grad_accum={math.ceil(options['batch_size'] * options['grad_accum'] / b)} "
                        "(same effective batch)",
                        {"batch_size": b, "grad_accum": math.ceil(options["batch_size"] * options["grad_accum"] / b)}))
    if current.max_seq_len and current.max_seq_len < options["seq_len"]:
        changes.append((f"seq_len={current.max_seq_len}", {"seq_len": current.max_seq_len}))
    if not options["offload_embedding"] and current.details["embedding_can_move"]:
        changes.append((f"input embedding in host memory (--offload-embedding: "
                        f"{_gib(current.details['input_embedding_bytes'])} GiB off the GPU, almost no cost)",
                        {"offload_embedding": True}))
    if options["offload"] is None and options["gpu_memory"] is not None:
        changes.append(("offload='auto' (stream the frozen base of some decoder layers from host memory)",
                        {"offload": "auto"}))
    combined = {k: v for _, c in changes if "seq_len" not in c and "batch_size" not in c and "offload" not in c
                for k, v in c.items()}
    if len(combined) > 1:
        changes.append((" + ".join(f"{k}={v}" for k, v in combined.items()), combined))
    out = [{"change": f"a GPU with at least {_gib(current.gpu_bytes)} GiB (or rank/targets/seq_len lower)",
            "options": {"gpu_memory": current.gpu_bytes}, "total_bytes": current.total_bytes, "fits": True}] \
        if not changes else []
    for text, change in changes:
        p = plan(hf_config, **{**options, **change}, _search=False)
        out.append({"change": text, "options": change, "total_bytes": p.total_bytes, "gpu_bytes": p.gpu_bytes,
                    "fits": bool(p.fits)})
    return out


# --------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``qolora plan`` on an argparse subparsers object; choices come from the library's constants."""

    bits_choices = [4, 8, 16]
    assert not AdapterConfig(bits=bits_choices[0]).problems()  # the same set AdapterConfig accepts
    p = subparsers.add_parser(
        "plan", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="predict the GPU memory of fine-tuning a model, from its config.json alone",
        description="Does it fit, and with what? Reads only MODEL's config.json (a file, a folder, a cached hub id or "
                    f"a built-in name: {', '.join(builtin_configs())}) and predicts the peak memory of training.",
    )
    p.add_argument("model", help="config.json file, folder holding one, hub id, or built-in name")
    p.add_argument("--bits", type=int, default=4,
                   choices=[b for b in bits_choices if not AdapterConfig(bits=b).problems()])
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


def _checkpointing_text(mode) -> str:
    if mode == "offload":
        return "offloaded to host"
    if not isinstance(mode, bool):
        return f"first {mode} layers"
    return "on" if mode else "off"


def _host_memory(value: str | None) -> int | str | None:
    if value == "available":
        from ..memory.host_memory import available_host_bytes

        return available_host_bytes()
    return value
