"""The mixed-precision wrapper a trainer leaves on ``model.forward``: find it, record it, put it back.

``accelerate`` (and so transformers' ``Trainer`` and TRL's ``SFTTrainer``, whose ``SFTConfig``
defaults to ``bf16=True``) prepares a model for mixed precision by replacing the *instance's*
``forward``::

    model._original_forward = model.forward
    model.forward = convert_outputs_to_fp32(torch.autocast(device, dtype)(forward))

and leaves it there after ``train()``. The trained object then computes under autocast (bf16
matmuls in the 4-bit layers and the adapters), which is the function the optimizer saw; a model
rebuilt from the same weights without the wrapper computes in its configured dtypes (fp32 by
default) and its logits differ (up to 0.59 on SmolLM2-135M after 5 bf16 steps).

:func:`trainer_autocast` reads the wrapper's ``torch.autocast`` settings (None when there is none);
:func:`qolora.save_adapter` records them in ``qolora_config.json`` (``forward_autocast``) and
:func:`qolora.load` puts the same wrapper back (:func:`apply_autocast`, built the way accelerate
builds it, so ``Accelerator.unwrap_model(model, keep_fp32_wrapper=False)`` and
:func:`remove_autocast` take it off again). Both are plain instance attributes: nothing here
changes a class.
"""

from __future__ import annotations

import logging
from types import MethodType

import torch
from torch import nn

__all__ = ["apply_autocast", "remove_autocast", "trainer_autocast"]

logger = logging.getLogger(__name__)

_MAX_DEPTH = 16  # wrappers followed before giving up (accelerate stacks three)


def _autocast_in(fn) -> torch.autocast | None:
    """The ``torch.autocast`` instance a ``torch.autocast(...)(f)`` decorator closed over, if ``fn`` is one."""
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, torch.autocast):
            return value
    return None


def trainer_autocast(model: nn.Module) -> dict | None:
    """The autocast a trainer's mixed-precision wrapper applies to ``model.forward``, or None.

    Returns:
        ``{"device_type": "cpu"|"cuda"|..., "dtype": "bfloat16"|"float16"}`` when ``model.forward`` is
        accelerate's mixed-precision wrapper (``model._original_forward`` is set) around an enabled
        ``torch.autocast``; None for a plain forward.
    """
    if "_original_forward" not in model.__dict__ or "forward" not in model.__dict__:
        return None
    fn = model.__dict__["forward"]
    for _ in range(_MAX_DEPTH):
        fn = getattr(fn, "__func__", fn)
        found = _autocast_in(fn)
        if found is not None:
            if not found._enabled:
                return None
            return {"device_type": str(found.device), "dtype": str(found.fast_dtype).removeprefix("torch.")}
        fn = getattr(fn, "__wrapped__", None) or getattr(fn, "model_forward", None)
        if fn is None:
            return None
    return None


def apply_autocast(model: nn.Module, autocast: dict) -> None:
    """Wrap ``model.forward`` as accelerate's mixed precision does: autocast, outputs back to fp32.

    Args:
        model: the model (its instance ``forward`` is replaced; a wrapper already there is replaced).
        autocast: ``{"device_type", "dtype"}`` as :func:`trainer_autocast` returns it.
    """
    from accelerate.utils import convert_outputs_to_fp32

    remove_autocast(model)
    dtype = getattr(torch, autocast["dtype"])
    context = torch.autocast(device_type=autocast["device_type"], dtype=dtype)
    model._original_forward = model.forward
    model.forward = MethodType(context(model.forward.__func__), model)
    model.forward = MethodType(convert_outputs_to_fp32(model.forward.__func__), model)
    logger.info("model.forward runs under torch.autocast(%s, %s), as during training", autocast["device_type"],
                autocast["dtype"])


def remove_autocast(model: nn.Module) -> bool:
    """Take a mixed-precision wrapper off ``model.forward`` (the class's forward applies again).

    Returns whether there was one. Equivalent to ``Accelerator.unwrap_model(model,
    keep_fp32_wrapper=False)`` for a model that is not otherwise wrapped.
    """
    if "_original_forward" not in model.__dict__:
        return False
    original = model.__dict__.pop("_original_forward")
    if getattr(original, "__func__", None) is type(model).forward:
        model.__dict__.pop("forward", None)  # the class's own forward again
    else:
        model.forward = original  # a wrapper someone set before the trainer's stays
    return True
