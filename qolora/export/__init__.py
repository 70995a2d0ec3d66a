"""How a model leaves qolora: a merged full-precision checkpoint, a plain LoRA for PEFT, a GGUF file."""


def __getattr__(name: str):
    # qolora 0.5's ``qolora.export`` module was ``qolora.export.peft``: its names keep working for one release
    import importlib
    import warnings

    module = importlib.import_module("qolora.export.peft")
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"qolora.export.{name} moved to qolora.export.peft.{name} in qolora 0.6; the old path goes in 0.7",
                  DeprecationWarning, stacklevel=2)
    return getattr(module, name)
