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
(``3*a*N*h``) and the router logits. A MoE model's first ``first_k_dense_replace`` layers (DeepSeek) are
dense, with their own MLP width (``intermediate_size``): the layers' kept bytes are summed kind by kind, and
the backward pass's peak is the larger of the two kinds' (each at its worst layer). Measured:
``tests/planning/test_plan_moe.py``, and full-width Mixtral-8x7B / Qwen3-30B-A3B layers in ``benchmarks/scale.py``.

Multi-head latent attention (DeepSeek-V2/V3; ``qr`` = q_lora_rank, ``kr`` = kv_lora_rank, per head ``qk`` =
qk_nope_head_dim + qk_rope_head_dim and ``v`` = v_head_dim; :func:`qolora.planning.memory_model.mla_attention`)
replaces the attention terms: q_a_layernorm and kv_a_layernorm keep their fp32 inputs and 1/rms,
``4*N*(qr + 1) + 4*N*(kr + 1)`` (in fp32 kv_a_layernorm's input is a view of kv_a_proj_with_mqa's output,
which it keeps whole: ``+ 4*N*qk_rope_head_dim``); the values are a view of kv_b_proj's output, kept whole,
``a*N*heads*(qk_nope_head_dim + v)``; SDPA on CUDA (its memory-efficient kernel: q/k and v head dims differ)
keeps q and k ``2*a*N*heads*qk``, its output ``a*N*heads*v`` and the logsumexp. The CPU has no fused kernel
for unequal head dims: the math kernel computes in fp32 and keeps the scaled q and k ``2*4*N*heads*qk``, the
probabilities ``4*B*heads*T*T`` and v (kv_b_proj's output in fp32, under autocast an fp32 copy of v,
``4*N*heads*v``). The adapted layers' inputs: ``h`` (q_a_proj or q_proj, kv_a_proj_with_mqa), ``qr``
(q_b_proj), ``kr`` (kv_b_proj), ``heads*v`` (o_proj). Measured on the CPU (exact, per term, on a tiny
DeepSeek-V3: ``tests/planning/test_plan_moe.py``); the CUDA kernel's terms are from what SDPA saves, not
measured.

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

The peak of one step is the largest of three moments: the start of the backward pass (all kept
activations + the loss), the backward pass of the most loaded layer (kept activations, the
recomputed layer with gradient checkpointing, working gradients, one dequantized weight), and the
optimizer step. Optimizer states are added to each (steady state; the first step has no states yet).
Adapter gradients are counted where they exist: the loop frees them after each optimizer step, so with
one micro-batch per step there are none at the loss, a recomputed layer sees those of every layer after
it (and its own once its backward has begun: not at the end of a MoE layer's recompute), the first
layer of a backward pass without checkpointing at most its own; with gradient accumulation or DDP all
of them, throughout.
On CUDA the plan adds the CUDA context (500 MiB; it varies 300-900 MiB with the driver and kernels
loaded) and an allocator margin of ``max(256 MiB, 5%)`` of the rest for fragmentation in PyTorch's
caching allocator. On the CPU neither is added.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.kernels import fused_step
from ..base.experts import is_router, moe_counts
from ..base.hf_config import builtin_configs, load_hf_config  # noqa: F401 - builtin_configs: a 0.5 name of qolora.plan
from ..base.reader import layer_shape, linear_layers, meta_skeleton, rank_problem, select_targets
from ..config import AdapterConfig, parse_dtype
from ..errors import ConfigError, Problems
from ..memory.base_streaming import decoder_layers, spread
from ..memory.chunked_loss import DEFAULT_CHUNK_BYTES
from ..memory.gradient_checkpointing import check_checkpointed_layers
from ..memory.host_embedding import check_untied, input_embedding_name
from ..moved_modules import forward_names
from .memory_model import (
    Dims,
    StepPeak,
    adapted_kinds,
    model_dims,
    optimizer_bytes,
    quantized_bytes,
    step_memory,
)
from .memory_plan import MARGIN_FRACTION, GiB, MemoryPlan, gib  # noqa: F401 - GiB: a 0.5 name of qolora.plan
from .shape import TrainingShape

__all__ = ["MemoryPlan", "TrainingShape", "plan", "plan_checked"]

# qolora 0.5's qolora.plan also held the command's parser (add_parser, run): now qolora.cli.plan, for one release
__getattr__ = forward_names("qolora.planning.plan", "qolora.cli.plan")

logger = logging.getLogger(__name__)

MiB = 1024**2
LOSS_CHUNK_BYTES = DEFAULT_CHUNK_BYTES  # the loop's loss (qolora.memory.chunked_loss); a 0.5 name of qolora.plan
CUDA_CONTEXT_BYTES = 500 * MiB
MARGIN_MIN_BYTES = 256 * MiB
#: The keyword options of :func:`plan` that describe the adapters and the base (an :class:`AdapterConfig`'s);
#: every other keyword is a :class:`TrainingShape` field.
ADAPTER_OPTIONS = ("bits", "rank", "alpha", "target_modules", "quant_type", "blocksize", "double_quant",
                   "compute_dtype", "adapter_dtype")
_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


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


# ------------------------------------------------------------------------------- the public call
def plan(model: Any, config: AdapterConfig | None = None, shape: TrainingShape | None = None,
         **options) -> MemoryPlan:
    """Predict the memory of fine-tuning ``model`` with qolora, from its config alone.

    Args:
        model: a built-in name (``"llama-3-8b"``), a ``config.json`` path, a folder holding one, a hub id in
            the HF cache, a transformers config, a config dict, or a :class:`qolora.base.synthetic.SyntheticCheckpoint`.
        config: what :func:`qolora.prepare` builds (bits, rank, alpha, targets, quantization, dtypes). Its
            compute dtype is ``compute_dtype`` (4/8-bit) or ``dtype``, else bf16 on ``"cuda"`` and fp32 on
            ``"cpu"``; its ``device`` is not used (the shape's is).
        shape: how it is trained (:class:`TrainingShape`: sequence length, batch, optimizer, checkpointing,
            offloading, the GPU and host memory to fit, GPUs).
        **options: instead of ``config`` / ``shape``, their fields as keywords: ``bits`` (4), ``rank`` (16),
            ``alpha``, ``target_modules`` (None: every linear layer but the head and MoE routers),
            ``quant_type``, ``blocksize``, ``double_quant``, ``adapter_dtype`` ("fp32") and ``compute_dtype``
            ("bf16": the unquantized weights and the activations; "fp32" is the CPU setting), and any
            :class:`TrainingShape` field (``seq_len=2048``, ``batch_size=1``, ``gpu_memory="24GiB"``, ...).
            ``gpu_memory`` fills in ``fits``, the longest ``seq_len``, the largest ``batch_size`` and
            suggestions.

    Returns:
        A :class:`MemoryPlan`.

    Raises:
        ConfigError: bad options (all problems at once), options given both ways, or a config that cannot be
            built.
        TypeError: an option that is neither an adapter option nor a training-shape field.
    """
    config, shape = checked_options(config, shape, options)
    hf_config = load_hf_config(model)
    counted = _Model.build(hf_config, config, shape)
    problems = counted.problems(config, shape)
    if problems:
        raise ConfigError(problems)
    name = model if isinstance(model, (str, os.PathLike)) else getattr(hf_config, "_name_or_path", "") or None
    return _plan(counted, config, shape, name=name)


def checked_options(config: AdapterConfig | None, shape: TrainingShape | None,
                    options: dict) -> tuple[AdapterConfig, TrainingShape]:
    """``plan``'s options as one :class:`AdapterConfig` and one normalised :class:`TrainingShape`.

    Raises:
        ConfigError: every problem with them (an option given both in an object and as a keyword included).
        TypeError: a keyword that is not an option.
    """
    adapter_options = {k: options.pop(k) for k in ADAPTER_OPTIONS if k in options}
    unknown = sorted(set(options) - set(TrainingShape.fields()))
    if unknown:
        raise TypeError(f"plan() got unexpected keyword argument(s) {unknown}; the options are "
                        f"{list(ADAPTER_OPTIONS)} and the training shape's {list(TrainingShape.fields())}")
    problems = Problems()
    if config is not None and adapter_options:
        problems.append(f"config= and the keyword(s) {sorted(adapter_options)} both describe the adapters: give "
                        "the values in the AdapterConfig (config.replace(...)) or only as keywords")
    if shape is not None and options:
        problems.append(f"shape= and the keyword(s) {sorted(options)} both describe the training: give the values "
                        "in the TrainingShape (shape.replace(...)) or only as keywords")
    if config is None:
        targets = adapter_options.pop("target_modules", None)
        config = AdapterConfig(**{"dtype": adapter_options.pop("compute_dtype", "bf16"), **adapter_options},
                               target_modules=tuple(targets) if isinstance(targets, (list, tuple)) else targets)
    problems += config.replace(device="cpu").problems()  # the shape's device is the one planned for
    shape = problems.check(lambda: TrainingShape.checked(**(dataclasses.asdict(shape) if shape is not None
                                                            else options)))
    if problems:
        raise ConfigError(problems)
    return config, shape


def plan_checked(hf_config, config: AdapterConfig, shape: TrainingShape, *, search: bool = True,
                 step_by_layers: bool = False) -> MemoryPlan:
    """:func:`plan` for callers that hold an already validated ``config`` and normalised ``shape`` (checked
    against the model too, as :func:`qolora.prepare` does): the placement and the training loop's automatic
    choices. ``search=False`` skips the fit search (longest sequence, largest batch, suggestions);
    ``step_by_layers`` adds ``details["step_bytes_by_checkpointed_layers"]`` (the step's device bytes with
    0..L layers checkpointed) and ``details["step_bytes_offloaded_checkpoints"]``."""
    return _plan(_Model.build(hf_config, config, shape), config, shape, search=search, step_by_layers=step_by_layers)


# --------------------------------------------------------------------------------- what is counted
def compute_dtype(config: AdapterConfig, shape: TrainingShape) -> torch.dtype:
    """The dtype of the unquantized weights and of the activations the plan assumes."""
    name = config.compute_dtype if config.bits != 16 and config.compute_dtype is not None else config.dtype
    if name is None:
        return torch.bfloat16 if shape.device == "cuda" else torch.float32
    return parse_dtype(name, "dtype")


@dataclass
class _Model:
    """The meta skeleton of the model, its linear layers and the targeted ones."""

    hf_config: Any
    skeleton: nn.Module
    linears: dict
    targets: list[str]
    dims: Dims
    dtype: torch.dtype

    @classmethod
    def build(cls, hf_config, config: AdapterConfig, shape: TrainingShape) -> _Model:
        dtype = compute_dtype(config, shape)
        skeleton = skeleton_for_plan(hf_config, dtype)
        linears = linear_layers(skeleton)
        return cls(hf_config, skeleton, linears, select_targets(linears, config.target_modules),
                   model_dims(hf_config), dtype)

    def problems(self, config: AdapterConfig, shape: TrainingShape) -> list[str]:
        """What :func:`qolora.prepare` would refuse about this model with these options."""
        problems = []
        for check in (lambda: check_checkpointed_layers(shape.gradient_checkpointing, self.hf_config),
                      lambda: check_untied(self.hf_config) if shape.offload_embedding else None,
                      lambda: input_embedding_name(self.skeleton) if shape.offload_embedding else None):
            try:
                check()
            except ConfigError as exc:
                problems += [p for p in exc.problems if p not in problems]
        if problem := rank_problem(self.linears, self.targets, config.rank):
            problems.append(problem)
        return problems

    @functools.cached_property
    def layers(self) -> tuple[str, list]:
        """(the decoder layers' module name, the layers)."""
        return decoder_layers(self.skeleton)

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a parameter or module belongs to (None: outside the decoder layers)."""
        head, sep, rest = name.partition(self.layers[0] + ".")
        return int(rest.split(".", 1)[0]) if sep and not head else None


@dataclass
class _Weights:
    """Bytes of the prepared model's parts, exact (see the module docstring)."""

    quantized: int  # the quantized linear layers (FSDP: this GPU's share + two gathered layers)
    other: int  # embeddings, norms, head, biases, buffers
    per_layer: list[int]  # each decoder layer's frozen bytes (what offloading moves)
    adapters: int
    trainable: int
    optimizer: int
    layer_grads: int  # the largest decoder layer's adapter gradients
    embedding: int  # the input embedding's bytes
    embedding_replaceable: bool  # a plain, untied nn.Embedding (can live in host memory)


def _count_weights(m: _Model, config: AdapterConfig, shape: TrainingShape) -> _Weights:
    a, adapter_b = _DTYPE_BYTES[m.dtype], _DTYPE_BYTES[config.torch_adapter_dtype]
    n_layers = len(m.layers[1])
    per_layer, per_layer_quantized, per_layer_grads = [0] * n_layers, [0] * n_layers, [0] * n_layers
    quantized, linear_weights = 0, set()
    kept = set(m.targets)  # MoE routers not targeted stay unquantized (counted with the other weights)
    for name, mod in m.linears.items():
        if is_router(mod) and name not in kept:
            continue
        nbytes = quantized_bytes(*layer_shape(mod), config.bits, config.blocksize, config.double_quant, a)
        quantized += nbytes
        linear_weights.add(id(mod.weight))
        if (i := m.layer_of(name)) is not None:
            per_layer[i] += nbytes
            per_layer_quantized[i] += nbytes
    if shape.sharded and per_layer_quantized:
        in_layers = sum(per_layer_quantized)
        quantized += math.ceil(in_layers / shape.num_gpus) + 2 * max(per_layer_quantized) - in_layers
    other = 0
    for pname, p in m.skeleton.named_parameters():  # tied parameters once
        if id(p) not in linear_weights:
            other += p.numel() * a
            if (i := m.layer_of(pname)) is not None:
                per_layer[i] += p.numel() * a
    other += sum(b.numel() * b.element_size() for _, b in m.skeleton.named_buffers())
    numels = []
    for name in m.targets:
        out_f, in_f = layer_shape(m.linears[name])
        numels += [config.rank * in_f, out_f * config.rank]
        if (i := m.layer_of(name)) is not None:
            per_layer_grads[i] += config.rank * (in_f + out_f) * adapter_b
    try:
        input_embedding_name(m.skeleton)
        replaceable = True
    except ConfigError:
        replaceable = False
    embedding = m.skeleton.get_input_embeddings()
    return _Weights(quantized, other, per_layer, sum(numels) * adapter_b, sum(numels),
                    optimizer_bytes(shape.optim, numels, adapter_b), max(per_layer_grads, default=0),
                    embedding.weight.numel() * a if embedding is not None else 0, replaceable)


class _Sizer:
    """The figures of one model and adapter setup at any sequence length, batch, checkpointing and number of
    offloaded layers: what the plan and its searches evaluate."""

    def __init__(self, m: _Model, config: AdapterConfig, shape: TrainingShape):
        self.m, self.config, self.shape = m, config, shape
        self.weights = _count_weights(m, config, shape)
        self.a = _DTYPE_BYTES[m.dtype]
        self.adapter_b = _DTYPE_BYTES[config.torch_adapter_dtype]
        self.max_linear = max((math.prod(layer_shape(x)) for x in m.linears.values()), default=0)
        # MoE: the largest linear outside the attention of a MoE layer (not a dense first layer's MLP),
        # dequantized while the experts' activations are alive
        moe_layers = {m.layer_of(n) for n in m.linears if ".experts." in f".{n}."}
        in_moe = (lambda n: m.layer_of(n) in moe_layers) if moe_layers else (lambda n: True)
        self.max_mlp_linear = max((math.prod(layer_shape(x)) for n, x in m.linears.items()
                                   if ".self_attn." not in f".{n}." and in_moe(n)), default=0)
        self.adapted = adapted_kinds(m.targets, m.dims.family)
        # under 16-bit autocast each layer keeps its fp32 factors' 16-bit copies for the backward pass
        self.factor_copies = (self.weights.layer_grads // self.adapter_b * self.a
                              if self.a < 4 and self.adapter_b != self.a else 0)
        # the input embedding can live in host memory, and that takes it off a GPU
        self.embedding_can_move = (self.weights.embedding_replaceable and shape.device == "cuda"
                                   and not shape.sharded)

    def step(self, T: int, B: int, checkpointing=None) -> StepPeak:
        s, w = self.shape, self.weights
        return step_memory(
            self.m.dims, B, T, adapted=self.adapted, r=self.config.rank, a=self.a, adapter_b=self.adapter_b,
            autocast=self.a < 4, bits=self.config.bits, padded=(B > 1) if s.padded is None else s.padded,
            checkpointing=s.planned_checkpointing if checkpointing is None else checkpointing,
            chunked=s.chunked_loss, chunk_bytes=s.loss_chunk_bytes, max_linear=self.max_linear,
            grad_bytes=w.adapters, layer_grad_bytes=w.layer_grads, grads_persist=s.grad_accum > 1 or s.num_gpus > 1,
            fused=fused_step(s.kernels, self.config.bits), max_mlp_linear=self.max_mlp_linear,
            factor_copy_bytes=self.factor_copies, device=s.device)

    def overhead(self, rest: int) -> tuple[int, int]:
        """(CUDA context, allocator margin) on top of ``rest`` bytes on a GPU."""
        if self.shape.device != "cuda":
            return 0, 0
        return CUDA_CONTEXT_BYTES, max(MARGIN_MIN_BYTES, int(MARGIN_FRACTION * rest))

    def moved(self, n: int) -> tuple[list[int], int, int]:
        """(offloaded layer indices, their bytes, bytes in flight) with ``n`` layers offloaded."""
        chosen = spread(len(self.weights.per_layer), n)
        sizes = sorted((self.weights.per_layer[i] for i in chosen), reverse=True)
        return chosen, sum(sizes), sum(sizes[:2])

    def embedding_on_host(self, on: bool) -> int:
        """Bytes of the input embedding in host memory (none where it cannot leave a GPU)."""
        return self.weights.embedding if on and self.shape.device == "cuda" else 0

    def device_rest(self, peak: StepPeak, n_offloaded: int, embedding_on_host: bool) -> int:
        """Everything on the compute device but the CUDA context and the allocator margin."""
        w = self.weights
        _, off, flight = self.moved(n_offloaded)
        return (w.quantized + w.other + w.adapters + w.optimizer + peak.bytes - off + flight
                - self.embedding_on_host(embedding_on_host))

    def gpu_bytes(self, T: int, B: int, n_offloaded: int, checkpointing=None, embedding_on_host: bool = False) -> int:
        rest = self.device_rest(self.step(T, B, checkpointing), n_offloaded, embedding_on_host)
        ctx, margin = self.overhead(rest)
        return rest + ctx + margin


# --------------------------------------------------------------------------------------- the plan
def _plan(m: _Model, config: AdapterConfig, shape: TrainingShape, *, name: str | None = None, search: bool = True,
          step_by_layers: bool = False) -> MemoryPlan:
    sizer = _Sizer(m, config, shape)
    w, d = sizer.weights, m.dims
    T, B = shape.seq_len, shape.batch_size
    n_layers = len(w.per_layer)
    # offload="auto": the input embedding goes first (it costs almost nothing), then decoder layers
    on_host = shape.offload_embedding
    if shape.offload == "auto":
        on_host = shape.offload_embedding or (sizer.embedding_can_move
                                              and sizer.gpu_bytes(T, B, 0) > shape.gpu_memory)
        n_off = next((n for n in range(n_layers + 1)
                      if sizer.gpu_bytes(T, B, n, embedding_on_host=on_host) <= shape.gpu_memory), n_layers)
    else:
        n_off = n_layers if shape.offload is not None else 0
    chosen, off_bytes, flight_bytes = sizer.moved(n_off)
    peak = sizer.step(T, B)
    ctx, margin = sizer.overhead(sizer.device_rest(peak, n_off, on_host))
    details = dict(peak.details)
    if step_by_layers:  # for gradient_checkpointing="auto" (qolora.training.auto_choices)
        def device_step(checkpointing) -> int:
            return sizer.step(T, B, checkpointing).bytes + w.optimizer  # as MemoryPlan.step_bytes
        details["step_bytes_by_checkpointed_layers"] = [device_step(k if k < d.L else True) for k in range(d.L + 1)]
        details["step_bytes_offloaded_checkpoints"] = device_step("offload" if shape.device == "cuda" else True)
    details.update(per_layer_frozen_bytes=w.per_layer[0] if w.per_layer else 0, input_embedding_bytes=w.embedding,
                   embedding_can_move=sizer.embedding_can_move)
    result = MemoryPlan(
        model=str(name or getattr(m.hf_config, "_name_or_path", "") or d.family),
        model_type=m.hf_config.model_type, num_layers=d.L, settings=_settings(config, shape, m.dtype),
        quantized_weights_bytes=w.quantized, other_weights_bytes=w.other, adapter_bytes=w.adapters,
        adapter_grad_bytes=peak.grad_bytes, optimizer_bytes=w.optimizer, activation_bytes=peak.activation_bytes,
        loss_bytes=peak.loss_bytes, peak_moment=peak.moment, cuda_context_bytes=ctx, margin_bytes=margin,
        n_adapted_layers=len(m.targets), trainable_params=w.trainable, details=details,
        gpu_memory=shape.gpu_memory, offload=shape.offload, offloaded_layers=chosen, offloaded_bytes=off_bytes,
        in_flight_bytes=flight_bytes, host_memory=shape.host_memory,
        checkpoint_host_bytes=details["checkpoint_host_bytes"], offload_embedding=on_host,
        embedding_host_bytes=sizer.embedding_on_host(on_host),
    )
    if moe := _moe_details(m, config, sizer.a):
        result.details["moe"] = moe
    if shape.gpu_memory is not None and search:
        _search(result, sizer, n_off, on_host)
    return result


def _settings(config: AdapterConfig, shape: TrainingShape, dtype: torch.dtype) -> dict:
    return {"bits": config.bits, "rank": config.rank, "alpha": config.lora_alpha,
            "target_modules": list(config.target_modules) if config.target_modules is not None else None,
            "quant_type": config.quant_type, "blocksize": config.blocksize, "double_quant": config.double_quant,
            "compute_dtype": _SHORT_NAMES[dtype],
            "adapter_dtype": _SHORT_NAMES[config.torch_adapter_dtype],
            **dataclasses.asdict(shape), "padded": shape.is_padded}


def _moe_details(m: _Model, config: AdapterConfig, a: int) -> dict | None:
    text_config = getattr(m.hf_config, "text_config", None) or m.hf_config
    moe = moe_counts(m.skeleton, getattr(text_config, "num_experts_per_tok", 0) or 0)
    if not moe:
        return None
    expert = next(n for n in m.linears if ".experts.0." in n).rsplit(".", 1)[0]
    moe["expert_bytes"] = sum(quantized_bytes(*layer_shape(m.linears[f"{expert}.{p}"]), config.bits,
                                              config.blocksize, config.double_quant, a)
                              for p in ("gate_up_proj", "down_proj"))
    return moe


# ------------------------------------------------------------------------------ fitting gpu_memory
def _search(result: MemoryPlan, sizer: _Sizer, n_off: int, on_host: bool) -> None:
    """Fill in the longest sequence, the largest batch, the fewest checkpointed layers and suggestions."""
    shape, d = sizer.shape, sizer.m.dims
    gpu = shape.gpu_memory
    most = len(sizer.weights.per_layer) if shape.offload is not None else 0
    embedding_at_most = shape.offload_embedding or (shape.offload == "auto" and sizer.embedding_can_move)

    def fits(T: int, B: int) -> bool:  # the GPU part, with as much offloaded as offload allows
        return sizer.gpu_bytes(T, B, most, embedding_on_host=embedding_at_most) <= gpu

    hf_config = sizer.m.hf_config
    limit = int(getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", 0)
                or 131072)
    result.max_seq_len = _largest(lambda T: fits(T, shape.batch_size), limit)
    result.max_batch_size = _largest(lambda B: fits(shape.seq_len, B), 4096)
    every_layer = shape.gradient_checkpointing is True or shape.gradient_checkpointing == "auto"
    if result.fits and every_layer and shape.device == "cuda":
        # the GPU part with only the first k layers checkpointed (k = L: every layer, as now)
        fewest = next(k for k in range(d.L + 1)
                      if sizer.gpu_bytes(shape.seq_len, shape.batch_size, n_off, k if k < d.L else True,
                                         embedding_on_host=on_host) <= gpu)
        # every layer needed (k = L) is the plan as it is: nothing faster to suggest
        result.fewest_checkpointed_layers = fewest if fewest < d.L else None
    if not result.fits:
        result.suggestions = _suggest(result, sizer)


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


def _suggest(current: MemoryPlan, sizer: _Sizer) -> list[dict]:
    config, shape = sizer.config, sizer.shape
    changes = []
    if config.bits != 4:
        changes.append(("bits=4", {"bits": 4}))
    if not shape.gradient_checkpointing:
        changes.append(("gradient checkpointing on", {"gradient_checkpointing": True}))
    if shape.gradient_checkpointing != "offload" and shape.device == "cuda":
        changes.append(("gradient checkpointing offloaded to host memory (--gradient-checkpointing offload)",
                        {"gradient_checkpointing": "offload"}))
    if shape.optim not in ("paged_adamw_8bit", "adamw_8bit"):
        changes.append(("optim=paged_adamw_8bit", {"optim": "paged_adamw_8bit"}))
    if not shape.chunked_loss:
        changes.append(("chunked loss", {"chunked_loss": True}))
    if shape.batch_size > 1 and current.max_batch_size:
        b = current.max_batch_size
        accum = math.ceil(shape.batch_size * shape.grad_accum / b)
        changes.append((f"batch_size={b}, grad_accum={accum} (same effective batch)",
                        {"batch_size": b, "grad_accum": accum}))
    if current.max_seq_len and current.max_seq_len < shape.seq_len:
        changes.append((f"seq_len={current.max_seq_len}", {"seq_len": current.max_seq_len}))
    if not shape.offload_embedding and sizer.embedding_can_move:
        changes.append((f"input embedding in host memory (--offload-embedding: "
                        f"{gib(sizer.weights.embedding)} GiB off the GPU, almost no cost)",
                        {"offload_embedding": True}))
    if shape.offload is None and not shape.sharded:  # FSDP shards the base instead
        changes.append(("offload='auto' (stream the frozen base of some decoder layers from host memory)",
                        {"offload": "auto"}))
    combined = {k: v for _, c in changes if "seq_len" not in c and "batch_size" not in c and "offload" not in c
                for k, v in c.items()}
    if len(combined) > 1:
        changes.append((" + ".join(f"{k}={v}" for k, v in combined.items()), combined))
    out = [{"change": f"a GPU with at least {gib(current.gpu_bytes)} GiB (or rank/targets/seq_len lower)",
            "options": {"gpu_memory": current.gpu_bytes}, "total_bytes": current.total_bytes, "fits": True}] \
        if not changes else []
    for text, change in changes:
        adapter = {k: v for k, v in change.items() if k in ADAPTER_OPTIONS}
        p = plan_checked(sizer.m.hf_config, config.replace(**adapter),
                         shape.replace(**{k: v for k, v in change.items() if k not in adapter}), search=False)
        out.append({"change": text, "options": change, "total_bytes": p.total_bytes, "gpu_bytes": p.gpu_bytes,
                    "fits": bool(p.fits)})
    return out
