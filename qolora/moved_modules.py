"""The import paths of qolora 0.5 and earlier, kept working for one release with a DeprecationWarning.

0.6 moved the flat modules into packages by role (README, Layout). ``import qolora.offload`` or
``from qolora.train_config import TrainConfig`` still work: :class:`MovedModuleFinder` hands out the
module at its new path (the same module object, so state and monkeypatching are shared) and warns
once. Four old modules share their name with the package's functions (``qolora.train``,
``qolora.prepare``, ``qolora.merge``, ``qolora.finetune``); importing one through the finder would
make the import system overwrite the function on the package with the module, so those four are
registered as aliases up front, without a warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "forward_names", "install"]

#: old module -> new module (both under ``qolora.``)
MOVED = {
    "threads": "devices",
    "layer": "adapters.layer",
    "kernels": "adapters.kernels",
    "compiled_layers": "adapters.compiled_layers",
    "base_reader": "base.reader",
    "checkpoint_layout": "base.layout",
    "config_sizes": "base.config_sizes",
    "experts": "base.experts",
    "quant": "base.quant",
    "bnb_cpu_fix": "base.bnb_cpu_fix",
    "synthetic": "base.synthetic",
    "adapter_io": "model.adapter_folder",
    "adapter_load": "model.load",
    "model_record": "model.record",
    "hf_compat": "model.hf_compat",
    "forward_wrap": "model.forward_wrap",
    "offload": "memory.base_streaming",
    "offload_checkpointing": "memory.gradient_checkpointing",
    "host_embedding": "memory.host_embedding",
    "host_memory": "memory.host_memory",
    "loss": "memory.chunked_loss",
    "plan": "planning.plan",
    "memory_model": "planning.memory_model",
    "placement": "planning.placement",
    "records": "data.records",
    "assets": "data.assets",
    "train_config": "training.options",
    "optim": "training.optim",
    "data_order": "training.data_order",
    "run_folder": "training.run_folder",
    "run_checkpoints": "training.checkpoints",
    "reporting": "training.reporting",
    "distributed": "training.distributed",
    "fsdp": "training.fsdp",
    "gguf_export": "export.gguf",
    "chat": "cli.chat",
    "export_cli": "cli.export",
    # the package's functions of the same name stay on the package: aliases, registered by install()
    "train": "training.loop",
    "prepare": "model.prepare",
    "merge": "export.merge",
    "finetune": "training.finetune",
}
_ALIASED = ("train", "prepare", "merge", "finetune")


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``qolora.<old>`` and loads it as the module at its new path, with a DeprecationWarning."""

    def find_spec(self, name, path=None, target=None):
        old = name.removeprefix("qolora.")
        if name.startswith("qolora.") and old in MOVED and old not in _ALIASED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        new = "qolora." + MOVED[spec.name.removeprefix("qolora.")]
        warnings.warn(f"{spec.name} moved to {new} in qolora 0.6; the old path goes in 0.7", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:  # the module is already executed at its new path
        pass


def forward_names(package: str, module: str):
    """A package ``__getattr__`` for 0.5's module that is a package now (``qolora.data`` was ``data.py``):
    a name of ``module`` asked of ``package`` is handed out with a DeprecationWarning."""

    def __getattr__(name: str):
        target = importlib.import_module(module)
        if name.startswith("__") or not hasattr(target, name):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        warnings.warn(f"{package}.{name} moved to {module}.{name} in qolora 0.6; the old path goes in 0.7",
                      DeprecationWarning, stacklevel=2)
        return getattr(target, name)

    return __getattr__


def install() -> None:
    """Register the finder and the four aliases (called by ``qolora/__init__`` once its functions exist)."""
    for old in _ALIASED:
        sys.modules.setdefault(f"qolora.{old}", importlib.import_module(f"qolora.{MOVED[old]}"))
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
