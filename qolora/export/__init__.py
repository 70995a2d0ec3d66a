"""How a model leaves qolora: a merged full-precision checkpoint, a plain LoRA for PEFT, a GGUF file."""
