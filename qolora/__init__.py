"""qolora: quantized, low-memory fine-tuning of causal LMs with OLoRA adapters.

    model = qolora.prepare("path-or-hub-id", bits=4, rank=16)   # 4/8-bit base + OLoRA adapters
    ...train: qolora.train / qolora.finetune, the `qolora` CLI, or transformers' Trainer...
    qolora.save_adapter(model, "adapter")                       # PEFT format + qolora metadata
    qolora.load("path-or-hub-id", "adapter")                     # exactly the trained model
    qolora.export_lora(...) / qolora.merge(...)                  # plain LoRA / merged checkpoint
"""

from . import moved_modules as _moved_modules
from .adapters.layer import AdapterLinear, adapter_parameters, adapter_state_dict
from .config import AdapterConfig
from .errors import ConfigError
from .export.merge import merge
from .export.peft import export_lora
from .inits import INITS
from .model.adapter_folder import AdapterError, BaseMismatchError, read_adapter, save_adapter
from .model.load import load
from .model.prepare import enable_gradient_checkpointing, prepare
from .model.record import ModelRecord, QuantReport
from .training.checkpoints import CheckpointError
from .training.finetune import finetune
from .training.loop import train
from .training.options import TrainConfig, TrainingError, TrainResult
from .version import __version__ as __version__

_moved_modules.install()  # the import paths of qolora 0.5 keep working for one release

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "AdapterLinear",
    "BaseMismatchError",
    "CheckpointError",
    "ConfigError",
    "INITS",
    "ModelRecord",
    "QuantReport",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "adapter_parameters",
    "adapter_state_dict",
    "enable_gradient_checkpointing",
    "export_lora",
    "finetune",
    "load",
    "merge",
    "prepare",
    "read_adapter",
    "save_adapter",
    "train",
]
