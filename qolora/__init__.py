"""qolora: quantized, low-memory fine-tuning of causal LMs with OLoRA adapters.

    model = qolora.prepare("path-or-hub-id", bits=4, rank=16)   # 4/8-bit base + OLoRA adapters
    ...train: qolora.train / qolora.finetune, the `qolora` CLI, or transformers' Trainer...
    qolora.save_adapter(model, "adapter")                       # PEFT format + qolora metadata
    qolora.load("path-or-hub-id", "adapter")                     # exactly the trained model
    qolora.export_lora(...) / qolora.merge(...)                  # plain LoRA / merged checkpoint
"""

from .adapter_io import AdapterError, BaseMismatchError, read_adapter, save_adapter
from .adapter_load import load
from .config import AdapterConfig, ConfigError
from .export import export_lora
from .finetune import finetune
from .inits import INITS
from .layer import AdapterLinear, adapter_parameters, adapter_state_dict
from .merge import merge
from .model_record import ModelRecord, QuantReport
from .prepare import enable_gradient_checkpointing, prepare
from .run_checkpoints import CheckpointError
from .train import train
from .train_config import TrainConfig, TrainingError, TrainResult
from .version import __version__ as __version__

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
