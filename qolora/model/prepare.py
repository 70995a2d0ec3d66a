"""``qolora.prepare``: one pass over the checkpoint that quantizes each weight once.

The reference stack loads a 4-bit model (quantize), then PEFT's OLoRA init dequantizes each weight,
runs a full QR, subtracts and quantizes again: two quantizations and O(n^3) work per weight. Here:

1. build the model's skeleton on the ``meta`` device (no memory), swap nothing yet;
2. stream the checkpoint tensor by tensor. A targeted weight ``W`` goes to the compute device in
   fp32, its factors come from :data:`qolora.inits.INITS` (OLoRA: thin QR of ``W[:, :r]``), it
   becomes the residual ``W - s*B@A`` in place, is quantized *once* into the base layer
   (:mod:`qolora.base.quant`) and is freed. Other linear layers are quantized as they are; everything
   else is materialised in ``dtype``;
3. tie weights, check nothing is missing, freeze all but the adapters.

With ``refine=K`` (olora / pissa) step 2 first runs K rounds of :func:`qolora.inits.refine_factors` on
the same in-memory weight: each round quantizes the current residual into a temporary copy and refits
the adapter to what the quantization lost. Only the final residual is kept, quantized once as above;
the refined ``(A0, B0)`` are the layer's initial factors (saved with the adapter, so a reload rebuilds
the identical base without rerunning anything).

Only a checkpoint that is itself stored quantized (bitsandbytes 4/8-bit) takes the dequantize ->
factor -> requantize path; its extra error against the stored weights is measured and logged.

Peak memory is the quantized model plus one full-precision weight, so a 70B model prepares on a GPU
with far less host RAM than its fp16 size. A :class:`QuantReport` records, per adapted layer,
``||W - (deq(q(W_res)) + s*B@A)||`` and (``compare_plain=True``) plain QLoRA's ``||W - deq(q(W))||``.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from ..adapters.layer import AdapterLinear, apply_kernels, mark_only_adapters_trainable, replace_module
from ..base.experts import is_router
from ..base.quant import make_base_layer, quantization_error, quantize_dequantize
from ..base.reader import (
    BaseCheckpoint,
    LinearWeight,
    linear_layers,
    rank_problem,
    select_targets,
    weight_fingerprint,
)
from ..config import AdapterConfig
from ..devices import cpu_thread_policy
from ..errors import ConfigError
from ..inits import INITS, refine_factors, residual_
from ..memory import host_memory
from ..memory.base_streaming import LayerOffload
from ..memory.gradient_checkpointing import check_checkpointed_layers, enable_gradient_checkpointing
from ..memory.host_embedding import HostEmbedding, host_tensor, input_embedding_name
from ..planning.placement import offload_layers_for
from ..planning.shape import TrainingShape
from .build_options import BuildOptions
from .hf_compat import attach as attach_hf_compat
from .record import LayerReport, ModelRecord, QuantReport, attach_record

__all__ = ["adopt", "build_model", "enable_gradient_checkpointing", "prepare", "prepare_checked"]

logger = logging.getLogger(__name__)

# (layer name, fp32 weight (out, in) on the compute device) -> initial (A, B)
FactorProvider = Callable[[str, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def adopt(model: nn.Module, record: ModelRecord) -> None:
    """Make a freshly built model a qolora model: its record (:func:`qolora.model.record.attach_record`)
    and what transformers' Trainer, TRL and lm-eval need to treat it as what it is
    (:func:`qolora.model.hf_compat.attach`: ``save_pretrained`` writes the adapter folder, a 4/8-bit model
    declares ``quantization_method``). :func:`prepare` and :func:`qolora.model.load.load` both end here."""
    attach_record(model, record)
    attach_hf_compat(model, record.config.bits)


def _layer_generator(seed: int, name: str) -> torch.Generator:
    """A generator per layer, so random inits do not depend on the order of the checkpoint's keys."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


# ------------------------------------------------------------------------------------- building
def build_model(
    base: BaseCheckpoint,
    config: AdapterConfig,
    factors_for: FactorProvider,
    *,
    compare_plain: bool = False,
    progress: bool = True,
    placement: LayerOffload | None = None,
    host_embedding: bool = False,
) -> tuple[nn.Module, QuantReport]:
    """Stream ``base`` into a quantized model with adapters (see the module docstring).

    ``factors_for(name, W)`` returns the initial ``(A, B)`` of a targeted layer (computed from ``W``,
    or known already, as when an adapter is reloaded); the base becomes ``W - s*B@A`` when the init
    needs a residual. ``placement`` (a :class:`qolora.memory.base_streaming.LayerOffload`) is told each module or
    tensor put on the device and moves each finished decoder layer's frozen base to host memory.
    ``host_embedding``: the input embedding becomes a :class:`qolora.memory.host_embedding.HostEmbedding`, its
    weight copied from the checkpoint straight into (pinned, on CUDA) host memory, never to the device.

    Raises:
        ConfigError: before any weight is read: a rank too large for a targeted layer, or
            ``host_embedding`` on a model whose input embedding cannot be replaced (tied to the head, not
            a plain ``nn.Embedding``); after the stream: weights missing from the checkpoint.
    """
    from accelerate.utils import set_module_tensor_to_device
    from tqdm.auto import tqdm

    start = time.perf_counter()
    device, dtype = config.torch_device, config.torch_dtype
    if device.type == "cpu":
        cpu_thread_policy()
    model = base.skeleton(dtype)
    linears = linear_layers(model)
    targets = set(select_targets(linears, config.target_modules))
    rebuilt, routers = _layers_to_rebuild(linears, targets, config.bits, base.stored_kind)
    problem = rank_problem(linears, targets, config.rank)
    if problem:
        raise ConfigError(problem)
    embedding = input_embedding_name(model) if host_embedding else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if placement is not None:
        placement.begin(model, rebuilt)
    loaded = placement.loaded if placement is not None else (lambda name: None)

    needs_residual = INITS[config.init].needs_residual
    report = QuantReport(init=config.init, bits=config.bits, requantized=base.stored_kind, refine=config.refine)
    biases: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    done: set[str] = set()
    bar = tqdm(total=len(rebuilt), desc=f"{config.bits}-bit + {config.init}", unit="layer", disable=not progress)
    for item in base.stream(model, rebuilt, device):
        if isinstance(item, LinearWeight):
            if item.module in targets:
                layer, row = _adapted_layer(item.module, item.weight, factors_for, config, needs_residual,
                                            compare_plain, isinstance(linears[item.module], nn.Linear))
                report.layers.append(row)
            else:  # a router stored quantized comes back in 16 bits
                layer = make_base_layer(item.weight, None, config.replace(bits=16) if item.module in routers
                                        else config, device)
            replace_module(model, item.module, layer)
            done.add(item.module)
            loaded(item.module)
            if item.module in biases:  # its bias came first
                _attach_bias(model, item.module, biases.pop(item.module), device, dtype)
                loaded(f"{item.module}.bias")
            bar.update(1)
            del item
            if device.type == "cpu":
                host_memory.trim()  # the freed fp32 weight and its slices leave the RSS now
        elif item.name is None:
            unexpected.append(item.key)
        elif embedding is not None and item.name == f"{embedding}.weight":
            padding_idx = model.get_submodule(embedding).padding_idx
            replace_module(model, embedding, HostEmbedding(host_tensor(item.tensor, dtype, pin=device.type == "cuda"),
                                                           device, padding_idx=padding_idx))
            loaded(item.name)
        elif item.name.endswith(".bias") and item.name.rpartition(".")[0] in rebuilt:
            module_name = item.name.rpartition(".")[0]
            if module_name in done:  # attach now, so the layer is complete as soon as it can be
                _attach_bias(model, module_name, item.tensor, device, dtype)
                loaded(item.name)
            else:
                biases[module_name] = item.tensor
        else:
            set_module_tensor_to_device(model, item.name, device, value=item.tensor, dtype=dtype)
            loaded(item.name)
    bar.close()

    _finish(model, device, sorted(rebuilt - done), unexpected)
    mark_only_adapters_trainable(model)
    if placement is not None:
        placement.end(model)
    if device.type == "cuda":
        report.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    report.seconds = time.perf_counter() - start
    if base.stored_kind:
        _warn_requantized(base, report)
    return model, report


def _layers_to_rebuild(linears: dict[str, nn.Module], targets: set[str], bits: int,
                       stored_kind: str | None) -> tuple[set[str], set[str]]:
    """``(layers rebuilt from their weight, untargeted MoE routers)``: all linears when quantizing (QLoRA
    quantizes every one) except the routers (kept in 16 bits), only the adapted ones at 16 bits, and every
    one whose checkpoint is stored quantized."""
    routers = {n for n, m in linears.items() if is_router(m) and n not in targets}
    rebuilt = set(linears) - routers if bits != 16 else set(targets)
    return (set(linears) if stored_kind else rebuilt), routers


def _warn_requantized(base: BaseCheckpoint, report: QuantReport) -> None:
    logger.warning(
        "%s is stored %s: its weights were dequantized, factored and quantized again (the base is quantized "
        "twice). Measured error of the adapted layers against the stored weights: %.4g summed, %.2f%% of their "
        "norm. A full-precision checkpoint avoids this.", base.dir, base.stored_kind, report.total_error,
        100 * report.total_error / max(sum(r.weight_norm for r in report.layers), 1e-12),
    )


def _attach_bias(model: nn.Module, module_name: str, bias: torch.Tensor, device, dtype) -> None:
    module = model.get_submodule(module_name)
    layer = module.base_layer if isinstance(module, AdapterLinear) else module
    layer.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)


def _adapted_layer(name, weight, factors_for, config, needs_residual, compare_plain, is_linear):
    """Factor ``weight`` (fp32 (out, in), consumed), quantize its residual once, wrap it with the adapter."""
    norm = float(torch.linalg.norm(weight))
    fingerprint = weight_fingerprint(weight)
    plain_error = None
    if compare_plain:
        plain_error = quantization_error(make_base_layer(weight, None, config, weight.device), weight)
    a, b = factors_for(name, weight)  # (r, in), (out, r)
    a, b = a.to(weight.device, torch.float32), b.to(weight.device, torch.float32)
    if needs_residual:
        residual_(weight, a, b, config.scale)  # weight := W - s*B@A, in place
    base = make_base_layer(weight, None, config, weight.device)
    # W - (deq(q(W_res)) + s*B@A) == W_res - deq(q(W_res)); for LoRA (no residual) W - deq(q(W)).
    error = quantization_error(base, weight)
    layer = AdapterLinear(
        base, a, b, config.scale, dropout=config.dropout, adapter_dtype=config.torch_adapter_dtype,
        fan_in_fan_out=not is_linear, init_factors=(a, b) if needs_residual else None, base_fingerprint=fingerprint,
    )
    return layer, LayerReport(name, tuple(weight.shape), norm, error, plain_error)


def _finish(model: nn.Module, device: torch.device, missing_layers: list[str], unexpected: list[str]) -> None:
    """Tie weights, move buffers to ``device``, and fail loudly on anything left unloaded (the reader
    refuses missing weights before reading, and has warned about ``unexpected`` tensors)."""
    del unexpected
    model.tie_weights()
    missing = missing_layers + [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ConfigError(f"checkpoint is missing {len(missing)} weight(s) the model needs, e.g. {missing[:5]}")
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)


def _adapter_config(config: AdapterConfig | None, bits: int | None, rank: int | None, options: dict) -> AdapterConfig:
    """The one AdapterConfig of a prepare call: ``config`` as given, or one made from bits/rank/options.

    Raises:
        ConfigError: ``config`` together with bits/rank/options (they would be dropped), or unknown options.
    """
    if config is None:
        return _option_config(4 if bits is None else bits, 16 if rank is None else rank, options)
    given = {**({"bits": bits} if bits is not None else {}), **({"rank": rank} if rank is not None else {}), **options}
    if given:
        raise ConfigError(f"pass either config= or bits/rank/options, not both: config already sets them (got "
                          f"{', '.join(f'{k}={v!r}' for k, v in given.items())}); use config.replace(...) to change it")
    return config


def _option_config(bits: int, rank: int, options: dict) -> AdapterConfig:
    allowed = {f.name for f in fields(AdapterConfig)} - {"bits", "rank", "extra"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    if options.get("target_modules") is not None and not isinstance(options["target_modules"], str):
        options = {**options, "target_modules": tuple(options["target_modules"])}
    return AdapterConfig(bits=bits, rank=rank, **options)


# ---------------------------------------------------------------------------------------- public
def prepare(
    model: str | Path | BaseCheckpoint,
    bits: int | None = None,
    rank: int | None = None,
    *,
    config: AdapterConfig | None = None,
    gradient_checkpointing: bool | str | int = "auto",
    compare_plain: bool = False,
    progress: bool = True,
    offload: str | None = None,
    gpu_memory: int | str | None = None,
    offload_plan: dict | None = None,
    kernels: str = "auto",
    offload_embedding: bool = False,
    **options,
):
    """Load a causal LM with a 4/8-bit (or 16-bit) base and OLoRA (or PiSSA / LoRA) adapters.

    Args:
        model: a local checkpoint folder or a hub id (resolved through the local cache when
            ``HF_HUB_OFFLINE=1``), or a generated checkpoint such as
            :class:`qolora.base.synthetic.SyntheticCheckpoint` (:meth:`BaseCheckpoint.of`).
        bits: 4 (NF4 by default), 8 or 16 (unquantized); default 4.
        rank: adapter rank; default 16.
        config: a full :class:`AdapterConfig` instead of ``bits``/``rank``/``options`` (giving both is refused).
        gradient_checkpointing: ``"auto"`` (the default): decided by the training run, which knows the batch
            (:func:`qolora.training.loop.train` chooses the fewest checkpointed layers that fit the device's free memory
            for its job, :mod:`qolora.training.auto_choices`); until then no layer is checkpointed (as False), and
            ``offload="auto"`` plans as if every layer were. A loop of one's own should give a value.
            True: enable non-reentrant gradient checkpointing; ``"offload"``: checkpointing whose
            saved layer inputs wait in pinned host memory (:mod:`qolora.memory.gradient_checkpointing`); an integer
            ``n``: checkpoint only the first ``n`` decoder layers and keep the activations of the others
            (faster: no recompute for them; ``qolora plan --gradient-checkpointing n`` gives the memory).
        compare_plain: also quantize each targeted weight as plain QLoRA would and report that
            error (one extra quantization per layer: slower, for measurement).
        progress: show a progress bar over layers.
        offload: keep decoder layers' frozen base in host memory and stream it in per layer
            (:mod:`qolora.memory.base_streaming`): None / ``"none"``: all on the device; ``"cpu"``: every decoder
            layer; ``"auto"``: as few layers as the memory planner says are needed to fit
            ``gpu_memory`` (none on the CPU). The model is built so: each finished layer leaves the
            device at once. Found on ``model.qolora.offload``
            (an :class:`~qolora.memory.base_streaming.OffloadedLayers`).
        gpu_memory: for ``offload="auto"``: bytes or a size (``"24GiB"``) to fit; default: the free
            memory of the CUDA device.
        offload_plan: for ``offload="auto"``: the training shape the plan assumes, any
            :class:`qolora.planning.shape.TrainingShape` field (``seq_len``, ``batch_size``, ``optim``,
            ``gradient_checkpointing``, ...; a dict or a ``TrainingShape``); default: the planner's (seq 2048,
            batch 1).
        kernels: the adapter layers' training step (:mod:`qolora.adapters.kernels`): ``"auto"``: the fused
            base + adapter step wherever it applies (4-bit and 16-bit bases; others take the plain
            path, logged once; :func:`qolora.train` also compiles the decoder layers when its run is long
            enough to repay the compilation, :mod:`qolora.training.auto_choices`); ``"compile"``: the same, and
            each decoder layer's training forward compiled with ``torch.compile``
            (:mod:`qolora.adapters.compiled_layers`: fused norms, RoPE, SwiGLU;
            the first step pays the compilation); ``"off"``: always the plain (PEFT-style) path.
        offload_embedding: keep the frozen input embedding in host memory (pinned on CUDA); only its row
            gather runs there and the gathered rows go to the device (:mod:`qolora.memory.host_embedding`). Needs
            untied input/output embeddings. ``offload="auto"`` turns it on by itself (untied models) when
            the plan needs memory, before any decoder layer is offloaded. On a CPU device the module is used
            but nothing moves. Found as ``model.get_input_embeddings()`` (a ``HostEmbedding``).
        **options: any other :class:`AdapterConfig` field (``alpha``, ``init``, ``target_modules``,
            ``use_rslora``, ``dropout``, ``quant_type``, ``blocksize``, ``double_quant``,
            ``quant_storage``, ``compute_dtype``, ``dtype``, ``adapter_dtype``, ``device``, ``seed``,
            ``refine``: K rounds of quantization-aware refinement of an olora/pissa init, 0 = off; the
            report then holds each layer's error per round).

    Returns:
        A ``transformers.PreTrainedModel`` in eval mode whose only trainable parameters are the
        adapters; ``model.qolora`` holds its :class:`~qolora.model.record.ModelRecord` (the config,
        the base, and the :class:`QuantReport`, also reachable as ``model.qolora_report``).

    Raises:
        ConfigError: bad options (all listed at once), a missing model, targets matching nothing,
            a rank too large for a targeted weight, CUDA options without CUDA, an offloaded part
            larger than the host memory available, ``offload_embedding`` not a bool or with tied
            embeddings; all before any weight is read.
    """
    cfg = _adapter_config(config, bits, rank, options).validate()
    build = BuildOptions.checked(gradient_checkpointing=gradient_checkpointing, offload=offload,
                                 gpu_memory=gpu_memory, kernels=kernels, offload_embedding=offload_embedding,
                                 offload_plan=offload_plan)
    base = BaseCheckpoint.of(model)
    name = str(model) if isinstance(model, (str, os.PathLike)) else str(base.dir)
    return prepare_checked(base, cfg, build, compare_plain=compare_plain, progress=progress, name=name)


def prepare_checked(base: BaseCheckpoint, cfg: AdapterConfig, build: BuildOptions, *, compare_plain: bool = False,
                    progress: bool = True, name: str | None = None) -> nn.Module:
    """:func:`prepare` for a caller that has validated ``cfg`` and ``build`` (:func:`qolora.finetune`):
    only what needs the base's config is checked here.

    Raises:
        ConfigError: as :func:`prepare`, for what depends on the model (layer counts, ranks, placement).
    """
    gradient_checkpointing = build.gradient_checkpointing
    check_checkpointed_layers(gradient_checkpointing, base.hf_config)
    placement = offload_layers_for(base.hf_config, cfg, build.offload, gpu_memory=build.gpu_memory,
                                   shape=build.offload_plan
                                   or TrainingShape(gradient_checkpointing=gradient_checkpointing),
                                   offload_embedding=build.offload_embedding)
    init = INITS[cfg.init]
    round_errors: dict[str, list[float]] = {}

    def quantize(weight: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(weight, cfg)

    def factors_for(name: str, weight: torch.Tensor):
        generator = _layer_generator(cfg.seed, name)
        a, b = init.factors(weight, cfg.rank, cfg.scale, generator)
        if cfg.refine:  # rounds on the compute device; the final residual is quantized once by build_model
            a, b, round_errors[name] = refine_factors(weight, a.to(weight.device, torch.float32),
                                                      b.to(weight.device, torch.float32), cfg.scale, quantize,
                                                      cfg.refine, cfg.init, generator)
        return a, b

    net, report = build_model(base, cfg, factors_for, compare_plain=compare_plain, progress=progress,
                              placement=placement, host_embedding=placement is not None and placement.embedding)
    if cfg.refine:
        for row in report.layers:  # e_0..e_{K-1} from the rounds, e_K from the final quantization
            row.round_errors = round_errors.pop(row.name) + [row.error]
    name = name if name is not None else str(base.dir)
    adopt(net, ModelRecord(config=cfg, base=name, base_dir=base.dir, report=report,
                                   offload=placement.streamer if placement is not None else None))
    apply_kernels(net, build.kernels)
    if gradient_checkpointing not in (False, "auto"):  # "auto": the training run decides (see above)
        enable_gradient_checkpointing(net, offload=gradient_checkpointing == "offload",
                                      layers=None if isinstance(gradient_checkpointing, (bool, str))
                                      else gradient_checkpointing)
    net.eval()
    logger.info("prepared %s: %s", name, report.summary())
    for problem in report.suspicious_layers():
        logger.warning("%s: is the checkpoint file damaged? %s", name, problem)
    return net
