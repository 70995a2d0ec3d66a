"""``finetune``: the whole job in one call, every cheap check before the expensive work.

    options (all problems at once) -> output folder (checked, then locked) -> data file, format and
    tokenization -> qolora.prepare -> qolora.training.loop.train -> save the adapter to OUTPUT_DIR/adapter

The ``qolora finetune`` command line calls this; so can a script.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..base.reader import BaseCheckpoint
from ..config import AdapterConfig
from ..data import assets
from ..data.tokens import DataError, detect_format, load_records, load_tokenizer, split_train_eval, tokenize_dataset
from ..errors import ConfigError
from ..memory.host_embedding import check_untied
from ..model.adapter_folder import SavedAdapter, adapter_from_model, save_adapter, write_saved_adapter
from ..model.build_options import BuildOptions
from ..model.prepare import prepare_checked
from . import distributed as dist
from .fsdp import full_adapter_state, with_trained_weights
from .loop import train_in
from .optim import resolve_precision
from .options import TrainConfig, TrainResult
from .run_folder import RunFolder, check_resume

__all__ = ["finetune"]

logger = logging.getLogger(__name__)


def finetune(
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    *,
    output_dir: str | os.PathLike = "qolora-output",
    bits: int = 4,
    rank: int = 16,
    init: str = "olora",
    alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
    format: str | None = None,
    max_length: int = 128,
    packing: bool = False,
    mask_prompt: bool = True,
    eval_fraction: float = 0.05,
    resume: bool = False,
    offload: str | None = None,
    gpu_memory: int | str | None = None,
    kernels: str = "auto",
    offload_embedding: bool = False,
    adapter_options: dict | None = None,
    config: TrainConfig | None = None,
    **train_options,
) -> TrainResult:
    """Fine-tune a causal LM with a quantized base and OLoRA adapters, end to end.

    Checks everything cheap first (options, output folder, data file and columns, the tokenized
    data), then prepares the model (:func:`qolora.prepare`), trains
    (:func:`train`) and saves the adapter to ``output_dir/adapter``.

    Args:
        model: a transformers checkpoint folder or hub id; None = the built-in default
            (SmolLM2-135M-Instruct, :func:`qolora.data.assets.default_model_dir`).
        data: a data file / saved dataset / hub dataset (:func:`qolora.data.tokens.load_records`); None =
            the built-in chatterbot English conversations.
        output_dir: the run's folder (``TrainConfig.output_dir``).
        bits, rank, init, alpha, target_modules: the adapter setup (:class:`qolora.AdapterConfig`).
        format: the record format (:data:`qolora.data.tokens.FORMATS`); None = detected from the columns.
        max_length: tokens per example (longer ones are truncated).
        packing: pack several examples into each sequence of ``max_length``.
        mask_prompt: train on the answers only.
        eval_fraction: share of the examples held out for eval loss and samples.
        resume: continue an interrupted run in ``output_dir``.
        offload: ``"auto"``, ``"cpu"`` or None/``"none"``: stream decoder layers' frozen base from host
            memory (:func:`qolora.prepare`); ``"auto"`` plans for this job's ``max_length``, batch size,
            optimizer and checkpointing against ``gpu_memory`` (default: the free GPU memory).
        gpu_memory: for ``offload="auto"``: the GPU memory to fit (bytes or ``"24GiB"``).
        kernels: the adapter layers' training step, as in :func:`qolora.prepare` (``"auto"`` / ``"compile"`` /
            ``"off"``); under ``"auto"`` the training run also compiles the decoder layers when the run is long
            enough to repay it (:func:`qolora.training.auto_choices.resolve_kernels`, logged).
        offload_embedding: keep the frozen input embedding in host memory (:func:`qolora.prepare`; untied
            embeddings only, not with ``fsdp``).
        adapter_options: further :class:`qolora.AdapterConfig` fields (``dropout``, ``quant_type``,
            ``device``, ``refine``, ...).
        config: a whole :class:`TrainConfig` instead of ``output_dir`` and ``**train_options``.
        **train_options: :class:`TrainConfig` fields (``max_steps``, ``lr``, ``batch_size``, ...).

    Returns:
        The :class:`TrainResult`, with ``adapter_dir`` set.

    Raises:
        ConfigError, DataError, AssetError: bad options, paths or data, all before the model is loaded.
        CheckpointError, TrainingError: see :func:`train`.
    """
    build_given = {"offload": offload, "gpu_memory": gpu_memory, "kernels": kernels,
                   "offload_embedding": offload_embedding}
    tcfg, acfg, build = _checked_configs(config, output_dir, train_options, bits, rank, init, alpha, target_modules,
                                         adapter_options, eval_fraction, max_length, build_given)
    # Under torchrun / accelerate launch every rank runs this; rank 0 alone checks, locks and writes the
    # output folder, and its errors stop every rank (qolora.training.distributed).
    folder = RunFolder.of(tcfg.output_dir)
    with dist.session(acfg.torch_device) as world:
        dist.on_main(lambda: folder.check(resume, tcfg.overwrite))
        base = BaseCheckpoint.open(assets.default_model_dir() if model is None else model)  # config + files, once
        if build.offload_embedding:
            check_untied(base.hf_config)  # before the data is read
        tokenizer = load_tokenizer(base.dir)
        train_ds, eval_ds = _tokenized_split(data, tokenizer, format=format, max_length=max_length, packing=packing,
                                             mask_prompt=mask_prompt, eval_fraction=eval_fraction, seed=tcfg.seed)
        # The heavy part; the output folder is this run's from here on (a second run is refused).
        with folder.claimed(resume, tcfg.overwrite):
            if resume:
                dist.on_main(lambda: check_resume(tcfg, train_ds, acfg, world_size=world.size))
            net = prepare_checked(base, acfg, build, progress=tcfg.progress and world.is_main)
            # FSDP: the base layers' quantization settings are read before sharding, the weights after training
            template = adapter_from_model(net) if tcfg.fsdp else None
            result = train_in(folder, net, tokenizer, train_ds, eval_ds, tcfg, resume=resume)
            if template is not None:  # gathered on every rank, written by rank 0
                saved = with_trained_weights(template, full_adapter_state(net))
                result.adapter_dir = dist.on_main(lambda: _save_final_adapter(saved, folder.adapter))
            else:
                result.adapter_dir = dist.on_main(lambda: _save_final_adapter(net, folder.adapter))
    return result


def _checked_configs(config, output_dir, train_options, bits, rank, init, alpha, target_modules, adapter_options,
                     eval_fraction, max_length, build_given) -> tuple[TrainConfig, AdapterConfig, BuildOptions]:
    """The training and adapter configs and the build options, or one ConfigError listing every problem."""
    problems: list[str] = []
    if config is not None and train_options:
        problems.append(f"pass either config or training options, not both (got {sorted(train_options)})")
    try:
        tcfg = config if config is not None else TrainConfig.from_options(output_dir=str(output_dir), **train_options)
        problems += tcfg.problems()
    except (ConfigError, TypeError) as exc:
        tcfg = None
        problems += getattr(exc, "problems", [str(exc)])
    adapter = {"alpha": alpha, "init": init, **(adapter_options or {})}
    if target_modules is not None:
        adapter["target_modules"] = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    try:
        acfg = AdapterConfig(bits=bits, rank=rank, **adapter)
        problems += acfg.problems()
    except TypeError as exc:
        acfg = None
        problems.append(f"unknown adapter option: {exc}")
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
        problems.append(f"eval_fraction={eval_fraction!r} must be a number strictly between 0 and 1")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        problems.append(f"max_length={max_length!r} must be an integer >= 2")
    if tcfg is not None and acfg is not None and tcfg.fsdp:
        problems += _fsdp_problems(tcfg, acfg)
    build, build_problems = BuildOptions.parse(
        **build_given, gradient_checkpointing=tcfg.gradient_checkpointing if tcfg is not None else False,
        offload_plan={"seq_len": max_length, "batch_size": tcfg.batch_size, "optim": tcfg.optim,
                      "grad_accum": tcfg.grad_accum, "num_gpus": dist.world().size}
        if tcfg is not None and not problems else None)  # the training values are checked above, once
    problems += build_problems
    if build is not None and tcfg is not None and tcfg.fsdp:
        if build.offload is not None:
            problems.append(f"fsdp=True and offload={build.offload!r}: FSDP shards the base instead of offloading "
                            "it; use one of them")
        if build.offload_embedding:
            problems.append("fsdp=True and offload_embedding=True: FSDP shards the base (the embedding with it) "
                            "instead of keeping it on the host; use one of them")
    if problems:
        raise ConfigError(problems)
    resolve_precision(tcfg.mixed_precision, acfg.torch_device)
    return tcfg, acfg, build


def _fsdp_problems(tcfg: TrainConfig, acfg: AdapterConfig) -> list[str]:
    """What FSDP needs that the options lack (found before the model loads)."""
    problems = []
    if not dist.world().distributed:
        problems.append("fsdp=True needs several processes: launch with torchrun --nproc_per_node N "
                        "(python -m torch.distributed.run)")
    if acfg.bits != 4:
        problems.append(f"fsdp=True with bits={acfg.bits}: FSDP-QLoRA supports 4-bit bases (bits=4) only")
    elif not acfg.torch_quant_storage.is_floating_point:
        problems.append(f"fsdp=True with quant_storage={acfg.quant_storage!r}: FSDP shards float storage only; "
                        "use quant_storage='bf16' (GPU) or 'fp32' (CPU)")
    if tcfg.optim != "adamw":
        problems.append(f"fsdp=True with optim={tcfg.optim!r}: bitsandbytes optimizers cannot step FSDP's sharded "
                        "parameters; use optim='adamw'")
    return problems


def _tokenized_split(data, tokenizer, *, format, max_length, packing, mask_prompt, eval_fraction, seed):
    """Load, check and tokenize the data, then split it into train and eval examples."""
    source = assets.default_dataset_path() if data is None else data
    records = load_records(source)
    detect_format(records.column_names, format)
    try:
        tokenized, stats = tokenize_dataset(records, tokenizer, format=format, max_length=max_length,
                                            mask_prompt=mask_prompt, packing=packing)
    except DataError as exc:  # "record N: ..." -> which file too
        if str(exc).startswith("record "):
            raise DataError(f"{source}: {exc} (records count from 0, in file order)") from exc
        raise
    _warn_about_lengths(stats, max_length, source)
    train_ds, eval_ds = split_train_eval(tokenized, eval_fraction, seed=seed)
    logger.info("data: %d train / %d eval examples (%s)", len(train_ds), len(eval_ds), stats)
    return train_ds, eval_ds


def _records(indices: tuple[int, ...], shown: int = 8) -> str:
    more = f", ... ({len(indices)} in all)" if len(indices) > shown else ""
    return "records " + ", ".join(map(str, indices[:shown])) + more


def _warn_about_lengths(stats, max_length: int, source) -> None:
    """Say which records were cut and which dropped, and why (records count from 0, in file order)."""
    seen = stats.n_examples + stats.n_dropped
    if stats.too_long_records:
        logger.warning("%s: %d of %d examples were dropped: longer than max_length=%d with no answer token within "
                       "it (%s); raise max_length to train on them", source, len(stats.too_long_records), seen,
                       max_length, _records(stats.too_long_records))
    if stats.no_answer_records:
        logger.warning("%s: %d of %d examples were dropped: no assistant answer to train on (%s)", source,
                       len(stats.no_answer_records), seen, _records(stats.no_answer_records))
    if len(stats.cut_records) > 0.05 * seen:
        logger.warning("%s: %d of %d examples are longer than max_length=%d and were kept cut to their first %d "
                       "tokens (%s); raise max_length to keep them whole", source, len(stats.cut_records), seen,
                       max_length, max_length, _records(stats.cut_records))


def _save_final_adapter(model: nn.Module | SavedAdapter, path: Path) -> Path:
    """The trained adapter in qolora's adapter format (reloadable with ``qolora.load``, mergeable)."""
    saved = (write_saved_adapter(model, path, overwrite=True) if isinstance(model, SavedAdapter)
             else save_adapter(model, path, overwrite=True))
    logger.info("saved the adapter to %s", saved)
    return Path(saved)
