"""The ``qolora`` command: finetune, merge, export, info, chat and plan."""


def __getattr__(name: str):
    # qolora 0.5's ``qolora.cli`` module was ``qolora.cli.main``: its names keep working for one release
    import importlib
    import warnings

    module = importlib.import_module("qolora.cli.main")
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"qolora.cli.{name} moved to qolora.cli.main.{name} in qolora 0.6; the old path goes in 0.7",
                  DeprecationWarning, stacklevel=2)
    return getattr(module, name)
