"""qolora: quantized, low-memory fine-tuning of causal LMs with OLoRA adapters.

    model = qolora.prepare("path-or-hub-id", bits=4, rank=16)   # 4/8-bit base + OLoRA adapters
"""

from .config import AdapterConfig, ConfigError
from .inits import INITS
from .layer import AdapterLinear, adapter_parameters, adapter_state_dict
from .prepare import QuantReport, enable_gradient_checkpointing, prepare

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterLinear",
    "ConfigError",
    "INITS",
    "QuantReport",
    "adapter_parameters",
    "adapter_state_dict",
    "enable_gradient_checkpointing",
    "prepare",
]
