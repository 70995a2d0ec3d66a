"""Plausibility of a model config's sizes, checked before anything is built from them.

A ``config.json`` decides how many layers, rows and columns qolora (and transformers) will build; a
hostile or mistyped one (``num_hidden_layers: 1e9``, ``vocab_size: 1e12``, a missing ``hidden_size``
that transformers silently fills with its Llama default) would otherwise hang a meta-device build or
ask for petabytes, far from the field that caused it. :func:`size_problems` lists every size that is
missing, not a positive integer, or beyond an upper bound far above any released model, naming the
field; :func:`check_sizes` raises them as one error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["REQUIRED", "SIZE_LIMITS", "check_sizes", "size_problems"]

#: Upper bounds per size field: each is well above the largest released causal LM's (2026).
SIZE_LIMITS: dict[str, int] = {
    "hidden_size": 1 << 17,
    "num_hidden_layers": 1 << 10,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "shared_expert_intermediate_size": 1 << 20,
    "vocab_size": 1 << 24,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 12,
    "num_local_experts": 1 << 12,
    "num_experts": 1 << 12,
    "n_routed_experts": 1 << 12,
    "num_experts_per_tok": 1 << 12,
    "max_position_embeddings": 1 << 26,
}
#: Sizes a config must state itself (transformers would fill them with its defaults otherwise).
REQUIRED = ("hidden_size", "num_hidden_layers")


def _text_part(raw: Mapping) -> Mapping:
    """The language model's part of a config dict (multimodal configs nest it under ``text_config``)."""
    text = raw.get("text_config")
    return text if isinstance(text, Mapping) else raw


def size_problems(raw: Mapping, config: Any = None, attribute_map: Mapping[str, str] | None = None) -> list[str]:
    """Every implausible size of a config, as messages naming the field.

    Args:
        raw: the config's fields as written (a ``config.json``'s contents or a config's ``to_dict()``).
        config: the built config object, whose attributes are checked as well (its defaults included).
        attribute_map: the config class's aliases (``hidden_size`` -> ``n_embd`` for GPT-2).
    """
    raw = _text_part(raw)
    aliases = dict(attribute_map or {})
    problems = []
    for name in REQUIRED:
        if name not in raw and aliases.get(name) not in raw:
            also = f" (or {aliases[name]!r})" if name in aliases else ""
            problems.append(f"{name!r}{also} is missing: a config must state it (transformers would silently use "
                            "its own default)")
    for name, limit in SIZE_LIMITS.items():
        key = name if name in raw else aliases.get(name)
        value = raw.get(key) if key in raw else None
        if value is None and config is not None:
            text_config = getattr(config, "text_config", None) or config
            value = getattr(text_config, name, None)
            key = name
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
            problems.append(f"{key!r} is {value!r}: it must be a whole number >= 1")
        elif value > limit:
            problems.append(f"{key!r} is {value:.4g}: larger than any real model (at most {limit:,} allowed)")
    return problems


def check_sizes(raw: Mapping, source: str, config: Any = None, attribute_map: Mapping[str, str] | None = None) -> None:
    """Raise :func:`size_problems` as one error naming ``source``.

    Raises:
        ConfigError: listing every implausible size.
    """
    problems = size_problems(raw, config, attribute_map)
    if problems:
        raise ConfigError(f"{source}: implausible model sizes, nothing was built: " + "; ".join(problems))
