"""How a model leaves qolora: a merged full-precision checkpoint, a plain LoRA for PEFT, a GGUF file."""

from ..moved_modules import forward_names

# qolora 0.5's qolora.export module: its names, for one release
__getattr__ = forward_names("qolora.export", "qolora.export.peft")
