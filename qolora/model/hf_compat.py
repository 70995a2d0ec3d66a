"""qolora models inside transformers' Trainer, TRL, lm-evaluation-harness and PEFT.

A prepared (or loaded) model is an ordinary ``transformers.PreTrainedModel``; :func:`attach`
(called by :func:`qolora.model.prepare.adopt`, so on every model qolora builds) adds exactly two
things to the *instance*:

``save_pretrained`` -> :func:`save_pretrained`
    What ``Trainer._save`` / ``save_model`` and TRL call. It writes the qolora adapter folder
    (:func:`qolora.model.adapter_folder.write_adapter_files`: PEFT ``adapter_model.safetensors`` +
    ``adapter_config.json``, ``qolora_init.safetensors``, ``qolora_config.json``, a guard
    ``config.json``) into the folder, as a PEFT model does, instead of transformers' full dump
    (the packed 4-bit base, its bitsandbytes quant states and a ``config.json`` without any
    quantization: 188 MB per checkpoint for SmolLM2-135M, which ``from_pretrained`` then "loaded"
    with every adapted weight randomly initialised). Each ``checkpoint-N/`` is therefore an adapter
    folder plus the trainer's files, and ``qolora.load(base, "out/checkpoint-N")`` reads it.

``quantization_method = "bitsandbytes"`` (4/8-bit bases only)
    The one quantization attribute declared, because its effects in transformers are right for a
    qolora model: ``Trainer`` does not ``.to(device)`` it (the model stays where qolora quantized
    it, as for a transformers bitsandbytes model) and ``model.to(dtype)`` is refused instead of
    casting the frozen base. Deliberately NOT declared:

    * ``is_quantized`` / ``hf_quantizer``: transformers' loader object. With ``is_quantized`` and no
      PEFT model, ``Trainer`` refuses to train ("You cannot perform fine-tuning on purely quantized
      models"); ``hf_quantizer`` would route saving and dequantizing through a bitsandbytes quantizer
      that never built this model.
    * ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``: TRL's ``SFTTrainer`` then casts every trainable
      parameter to bf16 (its QLoRA recipe), silently overriding qolora's ``adapter_dtype`` (fp32 by
      default) behind the recorded config. Their other use, Trainer skipping ``nn.DataParallel``
      when several GPUs are visible to one process, does not arise with ``torchrun`` (DDP) or one
      visible GPU, which is how to run it.

    TRL wraps a model in PEFT only when given a ``peft_config``: pass a qolora model without one.

Resuming. ``Trainer._load_from_checkpoint`` restores adapters only for ``peft.PeftModel`` instances
(``_is_peft_model`` is an ``isinstance`` check; ``load_adapter`` / ``active_adapters`` on another
class are never reached); any other model without a ``model.safetensors`` goes to
``load_sharded_checkpoint``, which fails ("Can't find a checkpoint index"). So resuming needs the
trainer's side: :class:`QoloraTrainerMixin` (or :func:`trainer_class`, or ``QoloraTrainer``)
overrides ``_load_from_checkpoint`` and ``_load_best_model`` for qolora models and adapter folders
only, restoring the adapter exactly with :func:`load_adapter_weights` (checked against the
model's layers, base fingerprints and initial factors); optimizer, scheduler, RNG and data order
are Trainer's own, so the resumed run equals the uninterrupted one bit for bit.

Mixed precision. accelerate leaves its autocast wrapper on ``model.forward`` after training; see
:mod:`qolora.model.forward_wrap` (recorded by ``save_adapter`` / ``save_pretrained``, put back by
``qolora.load``).

Several processes. ``torchrun --nproc_per_node N script.py`` with a Trainer runs DDP (gloo on the
CPU) and only rank 0 writes the adapter (``is_main_process``). ``accelerate launch --cpu
--num_processes 2`` (accelerate 1.15) starts ONE process without saying so: use ``torchrun``.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import MethodType

import torch
from torch import nn

from ..adapters.layer import adapter_layers
from ..base.quant import quant_settings
from ..errors import ConfigError
from ..files import remove_stale_temporaries, umask_permissions
from .adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    GUARD_CONFIG,
    INIT_WEIGHTS,
    QOLORA_CONFIG,
    AdapterError,
    SavedAdapter,
    adapter_from_model,
    is_guard_config,
    read_adapter,
    write_adapter_files,
)
from .record import record_of

__all__ = ["QoloraTrainerMixin", "attach", "is_adapter_folder", "load_adapter_weights", "save_pretrained",
           "trainer_class"]

logger = logging.getLogger(__name__)

#: Files that make a folder a full model for transformers' loaders and for Trainer's resume.
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
#: save_pretrained arguments that concern transformers' full-model format and mean nothing for an adapter.
_FORMAT_ARGS = {"safe_serialization", "max_shard_size", "variant", "token", "save_peft_format", "save_original_format",
                "save_function"}


def attach(model: nn.Module, bits: int) -> None:
    """Give a qolora model its ``save_pretrained`` and, for a 4/8-bit base, ``quantization_method``."""
    if bits in (4, 8):
        from transformers.utils.quantization_config import QuantizationMethod

        model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    model.save_pretrained = MethodType(save_pretrained, model)


def is_adapter_folder(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a folder qolora wrote an adapter into (a saved adapter or a trainer checkpoint)."""
    return path is not None and (Path(path) / QOLORA_CONFIG).is_file()


# ------------------------------------------------------------------------------------------ save
def _check_target(folder: Path) -> None:
    """Refuse a folder holding a model or someone else's adapter: nothing there is overwritten."""
    present = [n for n in MODEL_FILES if (folder / n).exists()]
    if present:
        raise AdapterError(
            f"{folder} holds {present[0]}, a full model: a qolora model saves an adapter folder and does not mix it "
            "with a model's weights (Trainer would resume from those); use an empty or new folder"
        )
    ours = (folder / QOLORA_CONFIG).is_file()
    if not ours:
        foreign = [n for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, INIT_WEIGHTS) if (folder / n).exists()]
        if foreign:
            raise AdapterError(f"{folder} holds {foreign[0]} that qolora did not write (no {QOLORA_CONFIG}); it is "
                               "not replaced: use an empty or new folder")
    if (folder / GUARD_CONFIG).exists() and not is_guard_config(folder / GUARD_CONFIG):
        raise AdapterError(f"{folder} holds a model's {GUARD_CONFIG}; it is not replaced: use an empty or new folder")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: dict | None = None, push_to_hub: bool = False, **kwargs) -> None:
    """``model.save_pretrained`` of a qolora model: write its adapter folder into ``save_directory``.

    Called as ``model.save_pretrained(folder)`` (by ``Trainer``, TRL, or you). Writes the files of
    :func:`qolora.save_adapter` into ``folder``, which may exist and hold other files (a trainer's
    checkpoint: tokenizer, ``trainer_state.json``, ...). As with any ``save_pretrained``, an adapter
    qolora saved there before is replaced; a folder holding a model's weights or ``config.json``, or
    another adapter, is refused. The files are written under a temporary sibling folder and moved in
    with ``qolora_config.json`` last (removed first), so an interrupted save leaves a folder that
    :func:`qolora.load` reports as incomplete, never a mix that loads.

    Args:
        model: the qolora model (bound: ``model.save_pretrained``).
        save_directory: the folder.
        is_main_process: False on the other ranks of a distributed run: nothing is written.
        state_dict: the model's state dict as a trainer gathered it (DeepSpeed / FSDP); its
            ``<layer>.lora_A.weight`` / ``lora_B`` values are saved instead of the parameters'.
        push_to_hub: not supported (upload the folder with ``huggingface_hub.upload_folder``).
        **kwargs: transformers' format options (``safe_serialization``, ``max_shard_size``, ...):
            they concern a full model and are ignored; any other raises.

    Raises:
        ConfigError: ``push_to_hub`` or an unknown argument; ``save_directory`` is a file.
        AdapterError: ``save_directory`` holds a model or another adapter.
    """
    unknown = sorted(set(kwargs) - _FORMAT_ARGS)
    if push_to_hub or unknown:
        raise ConfigError(f"save_pretrained of a qolora model writes an adapter folder; it does not take "
                          f"{'push_to_hub' if push_to_hub else unknown}. Save, then upload the folder with "
                          "huggingface_hub.upload_folder")
    if not is_main_process:
        return
    folder = Path(save_directory).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"save_pretrained: {str(folder)!r} is a file; expected a folder")
    folder.mkdir(parents=True, exist_ok=True)
    _check_target(folder)
    saved = adapter_from_model(model)
    if state_dict is not None:
        _take_weights(saved, state_dict)
    remove_stale_temporaries(folder.parent, folder.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        names = write_adapter_files(saved, tmp)
        umask_permissions(tmp)
        (folder / QOLORA_CONFIG).unlink(missing_ok=True)  # incomplete from here until the record is back
        for name in names:
            os.replace(tmp / name, folder / name)
        if INIT_WEIGHTS not in names:
            (folder / INIT_WEIGHTS).unlink(missing_ok=True)  # left by an earlier OLoRA/PiSSA save
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved the qolora adapter (%d layers, rank %d) to %s", len(saved.layers), saved.config.rank, folder)


def _take_weights(saved: SavedAdapter, state_dict: dict) -> None:
    """Replace the snapshot's A/B with a trainer-gathered state dict's values.

    Raises:
        AdapterError: the state dict holds adapter weights, but not under every layer's names (another
            prefix, or only some shards): saving the model's own, possibly stale, values instead would
            be silent.
    """
    lora_keys = [k for k in state_dict if ".lora_A." in k or ".lora_B." in k]
    missing = [n for n in saved.weights
               if f"{n}.lora_A.weight" not in state_dict or f"{n}.lora_B.weight" not in state_dict]
    if lora_keys and missing:
        raise AdapterError(f"save_pretrained: state_dict holds adapter weights ({len(lora_keys)}, e.g. "
                           f"{lora_keys[0]!r}) "
                           f"but none or only some under this model's names (missing e.g. {missing[0]}.lora_A.weight); "
                           "pass the unwrapped model's state dict")
    for name, (a, b) in list(saved.weights.items()):
        sa, sb = state_dict.get(f"{name}.lora_A.weight"), state_dict.get(f"{name}.lora_B.weight")
        if sa is None or sb is None:
            continue
        if tuple(sa.shape) != tuple(a.shape) or tuple(sb.shape) != tuple(b.shape):
            raise AdapterError(f"save_pretrained: state_dict holds {name}.lora_A/B of shapes {tuple(sa.shape)}, "
                               f"{tuple(sb.shape)}; the model's are {tuple(a.shape)}, {tuple(b.shape)}")
        saved.weights[name] = (sa.detach().to("cpu", a.dtype, copy=True).contiguous(),
                               sb.detach().to("cpu", b.dtype, copy=True).contiguous())


# ------------------------------------------------------------------------------------------ load
def load_adapter_weights(model: nn.Module, folder: str | os.PathLike) -> SavedAdapter:
    """Copy a saved adapter's trained A/B into a qolora model built from the same base and init.

    Unlike :func:`qolora.load` no base is read: ``model`` must already be that base with those
    initial factors (e.g. the same ``qolora.prepare`` call that started the run being resumed),
    which is checked layer by layer (names, shapes, quantization settings, base fingerprints, and
    the initial factors bit for bit) before anything is copied.

    Raises:
        AdapterError: ``model`` is not a qolora model, or the folder does not fit it (naming the first
            layer that differs and how), or the folder is not a valid adapter.
    """
    if record_of(model) is None:
        raise AdapterError(f"{type(model).__name__} is not a qolora model (no model.qolora record)")
    saved = read_adapter(folder)
    mine = record_of(model).config.to_dict()
    theirs = saved.config.to_dict()
    placement = {"device", "dtype", "compute_dtype"}  # where and how it runs, not which adapter it is
    differ = sorted(k for k in set(mine) | set(theirs)
                    if k not in placement and mine.get(k, 0 if k == "refine" else None)
                    != theirs.get(k, 0 if k == "refine" else None))
    if differ:
        raise AdapterError(f"adapter {folder} was trained with another adapter setup: "
                           + "; ".join(f"{k}={theirs.get(k)!r} there, {mine.get(k)!r} here" for k in differ))
    layers = dict(adapter_layers(model))
    missing, extra = sorted(set(saved.layers) - set(layers)), sorted(set(layers) - set(saved.layers))
    if missing or extra:
        raise AdapterError(f"adapter {folder} does not fit the model: layers only in the adapter {missing[:3]}, "
                           f"only in the model {extra[:3]}")
    for name, rec in saved.layers.items():
        layer = layers[name]
        a, b = saved.weights[name]
        problem = None
        if tuple(layer.lora_A.weight.shape) != tuple(a.shape) or tuple(layer.lora_B.weight.shape) != tuple(b.shape):
            problem = f"rank/shape differ (adapter {tuple(a.shape)}/{tuple(b.shape)})"
        elif layer.base_fingerprint != rec.fingerprint:
            problem = "the base weight differs (another base checkpoint)"
        elif quant_settings(layer.base_layer) != rec.quant:
            problem = f"quantization differs ({quant_settings(layer.base_layer)} vs {rec.quant})"
        elif (saved.init is None) != (layer.init_factors is None) or saved.init is not None and not all(
                torch.equal(x, y) for x, y in zip(layer.init_factors, saved.init[name])):
            problem = "the initial factors differ (another init, rank, alpha or seed)"
        if problem:
            raise AdapterError(f"adapter {folder} does not fit the model at layer {name}: {problem}")
    with torch.no_grad():
        for name, (a, b) in saved.weights.items():
            layers[name].lora_A.weight.copy_(a)
            layers[name].lora_B.weight.copy_(b)
    return saved


# --------------------------------------------------------------------------------------- trainer
def _qolora_model(trainer, model: nn.Module | None) -> nn.Module | None:
    model = trainer.model if model is None else model
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    return model if record_of(model) is not None else None


class QoloraTrainerMixin:
    """Resume a transformers ``Trainer`` (or a TRL trainer) of a qolora model from its adapter checkpoints.

    ``class MyTrainer(QoloraTrainerMixin, SFTTrainer): pass``; see :func:`trainer_class`. For a
    qolora model and a checkpoint folder qolora wrote, the model's adapter is restored exactly
    (:func:`load_adapter_weights`); everything else goes to the trainer's own loading.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = _qolora_model(self, model)
        if target is not None and is_adapter_folder(resume_from_checkpoint):
            load_adapter_weights(target, resume_from_checkpoint)
            logger.info("restored the qolora adapter from %s", resume_from_checkpoint)
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        target = _qolora_model(self, None)
        if target is not None and is_adapter_folder(best):
            load_adapter_weights(target, best)
            logger.info("loaded the best qolora adapter from %s (score %s)", best, self.state.best_metric)
            return None
        return super()._load_best_model()


@functools.cache
def trainer_class(base: type) -> type:
    """``base`` (``transformers.Trainer``, ``trl.SFTTrainer``, ...) with :class:`QoloraTrainerMixin` mixed in."""
    return type(f"Qolora{base.__name__}", (QoloraTrainerMixin, base), {"__module__": __name__})


def __getattr__(name: str):
    if name == "QoloraTrainer":  # imported on first use: transformers.Trainer is slow to import
        from transformers import Trainer

        return trainer_class(Trainer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
