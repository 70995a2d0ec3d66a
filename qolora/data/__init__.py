"""Data in: records loaded and rendered as conversations, tokenized into prompt-masked examples; the
model folder's tokenizer; the built-in offline model and data set."""

from ..moved_modules import forward_names

# qolora 0.5's qolora.data module: its names, for one release
__getattr__ = forward_names("qolora.data", "qolora.data.tokens")
