"""A base's transformers config, from whatever names it: a folder, a ``config.json``, a built-in name, a
config object or dict, a cached hub id. Checked (sizes, ``model_type``, no remote code) before anything is
built from it; :mod:`qolora.base.reader` reads the file itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config_sizes import check_sizes
from .reader import hf_config_from_dict, is_hub_id, read_config_json

__all__ = ["CONFIG_DIR", "builtin_configs", "load_hf_config"]

CONFIG_DIR = Path(__file__).parents[1] / "configs"


# ----------------------------------------------------------------------------------- configs
def builtin_configs() -> dict[str, Path]:
    """Names of the configs kept in ``qolora/configs`` (e.g. ``"llama-3-8b"``) and their files."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def load_hf_config(model: Any):
    """The transformers config of ``model``: a config object, a dict, a built-in name, a ``.json`` file, a
    folder holding ``config.json``, a hub id in the local cache (or reachable), or an object with ``hf_config()``.

    Raises:
        ConfigError: no config.json, not JSON, an unknown model_type, or remote code required.
    """
    from transformers import PretrainedConfig

    if hasattr(model, "hf_config") and callable(model.hf_config):
        return model.hf_config()
    if isinstance(model, PretrainedConfig):
        if getattr(model, "auto_map", None):
            raise ConfigError(f"config of {type(model).__name__} needs remote code (auto_map); not supported")
        check_sizes(model.to_dict(), f"config of {type(model).__name__}", model, getattr(model, "attribute_map", {}))
        return model
    if isinstance(model, Mapping):
        return hf_config_from_dict(model, "config dict")
    text = os.fspath(model)
    builtin = builtin_configs()
    path = Path(text).expanduser()
    if text in builtin:
        path = builtin[text]
    elif path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: a model folder needs config.json (weights are not needed)")
    elif not path.is_file():
        if not is_hub_id(text):
            raise ConfigError(f"model {text!r} is neither a config.json file, a folder holding one, a hub id "
                              f"'org/name', nor a built-in name ({', '.join(builtin)})")
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(text, "config.json"))
        except Exception as exc:  # offline / not found / gated
            raise ConfigError(f"model {text!r} is not a local folder, a config.json file or a built-in name "
                              f"({', '.join(builtin)}), and as a hub id its config.json is not in the local cache and "
                              f"could not be fetched: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return read_config_json(path)
