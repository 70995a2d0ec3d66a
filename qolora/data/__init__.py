"""Data in: records loaded and rendered as conversations, tokenized into prompt-masked examples; the
model folder's tokenizer; the built-in offline model and data set."""


def __getattr__(name: str):
    # qolora 0.5's ``qolora.data`` module was ``qolora.data.tokens``: its names keep working for one release
    import importlib
    import warnings

    module = importlib.import_module("qolora.data.tokens")
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"qolora.data.{name} moved to qolora.data.tokens.{name} in qolora 0.6; the old path goes in 0.7",
                  DeprecationWarning, stacklevel=2)
    return getattr(module, name)
