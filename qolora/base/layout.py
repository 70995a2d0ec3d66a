"""Which checkpoint tensors make which weight of the model: transformers' own rules, planned from names.

transformers 5 loads a checkpoint through the architecture's list of weight transforms
(``transformers.conversion_mapping.get_model_conversion_mapping``): a ``WeightRenaming`` rewrites a name
(GPT-NeoX's ``embed_out.`` -> ``lm_head.``, Mixtral's ``.block_sparse_moe.`` -> ``.mlp.``), a
``WeightConverter`` gathers several tensors into one through a chain of ops (the per-expert
``experts.<e>.gate_proj.weight`` and ``experts.<e>.up_proj.weight`` of a MoE block, stacked by
``MergeModulelist`` and joined by ``Concatenate`` into the fused ``experts.gate_up_proj``). Its loader
gathers every source of a converter and runs the ops, so a fused expert tensor exists whole in memory.

qolora reads the same checkpoint with the same rules (``rename_source_key`` on each key, against
transformers' own parameter names), but plans first, from the names and shapes in the headers alone,
and reads in units of one weight::

    TensorUnit(key -> name)          one tensor as stored
    ExpertUnit(layer, pieces)        one expert's (out, in) weight of a split experts module
                                     (:mod:`qolora.base.experts`): its rows from the per-expert tensors
                                     (MergeModulelist [+ Concatenate]: gate rows, then up rows) or its
                                     slice of a fused tensor stored as the model holds it; or (part
                                     "bias") its row of a fused (E, out) bias (gpt-oss)
    ConvertedUnit(keys, converter)   any other converter: its sources gathered, transformers' ops run
    PartUnit(key -> layer, part)     a part of a layer stored quantized by bitsandbytes

Before any weight is read, the plan checks the shapes in the headers and that every parameter of the
model is made by some unit (a tied parameter by its source): a weight that no rule maps is refused
naming it, with the checkpoint tensors that map to nothing. Peak memory stays one weight (for a fused
expert tensor: one expert's slices).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from .experts import FUSED, SplitExperts

__all__ = ["ConvertedUnit", "ExpertUnit", "PartUnit", "Piece", "ReadPlan", "TensorUnit", "plan_reads"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """Rows of an expert's (out, in) weight held by one checkpoint tensor.

    Attributes:
        key: the checkpoint key.
        rows: how many rows of the expert's weight (along ``out``) it holds.
        expert: the expert's index along the tensor's first dimension when the tensor holds every expert
            (the fused layout); None when it holds this expert alone.
        transposed: stored ``(in, rows)`` rather than ``(rows, in)``.
        count: with ``expert``: how many experts the tensor holds.
    """

    key: str
    rows: int
    expert: int | None = None
    transposed: bool = False
    count: int | None = None


@dataclass(frozen=True)
class TensorUnit:
    key: str
    name: str | None  # None: no weight of the model (handed out as such)


@dataclass(frozen=True)
class ExpertUnit:
    layer: str  # the expert layer, e.g. model.layers.1.mlp.experts.3.gate_up_proj
    pieces: tuple[Piece, ...]
    part: str = "weight"  # or "bias": the layer's bias, a row of a fused (E, out) tensor

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.pieces)


@dataclass(frozen=True)
class ConvertedUnit:
    keys: tuple[tuple[str, str], ...]  # (checkpoint key, matched source pattern)
    target: str  # the first target name (transformers names the results after it)
    converter: object  # transformers' WeightConverter


@dataclass(frozen=True)
class PartUnit:
    key: str
    layer: str
    part: str  # "weight", "weight.absmax", "SCB", ...


Unit = TensorUnit | ExpertUnit | ConvertedUnit | PartUnit


@dataclass
class ReadPlan:
    """The units to read, in storage order, and what is wrong before anything is read."""

    units: list[Unit]
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys no rule maps to the model
    missing: list[str] = field(default_factory=list)  # model parameters no unit makes
    renamed: int = 0  # keys whose name transformers' rules changed
    where: dict[str, Path] = field(default_factory=dict)

    def check(self, source: str, model_type: str) -> None:
        """Refuse missing weights (naming them and the unmapped tensors); warn about unused tensors.

        Raises:
            ConfigError: some parameter of the model is made by no checkpoint tensor.
        """
        unused = (f"{len(self.unexpected)} checkpoint tensor(s) map to no weight of the model by transformers' "
                  f"{model_type} rules, e.g. {self.unexpected[:5]}")
        if self.missing:
            raise ConfigError(
                f"checkpoint {source} is missing {len(self.missing)} weight(s) the {model_type} model needs, e.g. "
                f"{self.missing[:5]}" + (f"; {unused}" if self.unexpected else "") + ". The checkpoint does not "
                "belong to this config.json, or is stored in a layout transformers does not read")
        if self.unexpected:
            logger.warning("%s: %s; they are not used", source, unused)


# ---------------------------------------------------------------------------------------- plan
def plan_reads(entries: list[tuple[str, tuple[int, ...], Path]], skeleton: nn.Module, *,
               stored_part=None) -> ReadPlan:
    """Plan how to read a checkpoint into ``skeleton`` (a ``meta`` model whose experts are split).

    Args:
        entries: ``(key, shape, where)`` of every checkpoint tensor, in storage order (headers only).
        skeleton: the model (:func:`qolora.base.reader.meta_skeleton`).
        stored_part: for a checkpoint stored quantized by bitsandbytes, ``name -> (layer, part) | None``.

    Raises:
        ConfigError: a tensor whose shape is not the model's, or a fused expert tensor whose experts
            do not add up; naming the tensor and its file.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    fused = _fused(skeleton)
    names = {k: s for k, s in shapes.items() if _split_owner(k, fused) is None}
    names.update({n: f.shape for n, f in fused.items()})  # transformers' names for the whole model
    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(skeleton, "base_model_prefix", "") or None
    where = {key: file for key, _, file in entries}
    position = {key: i for i, (key, _, _) in enumerate(entries)}
    stored_shape = {key: shape for key, shape, _ in entries}

    plan = ReadPlan(units=[], where=where)
    ordered: list[tuple[int, Unit]] = []
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in sorted(where, key=dot_natural_key):  # transformers renames in this order (stateful rules)
        target, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if target not in names and key in names:
            target, pattern = rename_source_key(key, [], [], prefix, names)
        plan.renamed += target != key
        part = stored_part(target) if stored_part is not None and pattern is None else None
        if part is not None:
            ordered.append((position[key], PartUnit(key, *part)))
        elif target not in names:  # still handed out (a merge keeps it), as a tensor of no weight
            plan.unexpected.append(key)
            ordered.append((position[key], TensorUnit(key, None)))
        elif pattern is not None:
            groups[target].append((key, pattern))
        elif target in fused:
            _check(stored_shape[key], fused[target].shape, key, where)
            ordered.extend((position[key], unit) for unit in fused[target].stored_units(key))
        else:
            _check(stored_shape[key], names[target], key, where)
            ordered.append((position[key], TensorUnit(key, target)))
    for target, sources in groups.items():
        converter = next(c for c in converters if sources[0][1] in c.source_patterns)
        units = (fused[target].converted_units(sources, converter, stored_shape, where)
                 if target in fused else None)
        if units is None:
            units = [ConvertedUnit(tuple(sources), target, converter)]
        ordered.extend((min(position[k] for k in _unit_keys(u)), u) for u in units)
    plan.units = [u for _, u in sorted(ordered, key=lambda item: item[0])]
    plan.missing = _missing(skeleton, plan.units, fused)
    return plan


def _unit_keys(unit: Unit) -> Iterable[str]:
    if isinstance(unit, ExpertUnit):
        return unit.keys
    if isinstance(unit, ConvertedUnit):
        return [k for k, _ in unit.keys]
    return [unit.key]


def _check(found: tuple[int, ...], expected: tuple[int, ...], key: str, where: dict[str, Path]) -> None:
    if tuple(found) != tuple(expected):
        raise ConfigError(f"tensor {key!r} in {where[key]} has shape {tuple(found)}, but the model's config.json "
                          f"makes it {tuple(expected)}: the weights do not belong to this config")


def _missing(skeleton: nn.Module, units: list[Unit], fused: dict) -> list[str]:
    """Parameters of ``skeleton`` that no unit makes (a tied parameter counts as made by its source)."""
    made = set()
    for unit in units:
        if isinstance(unit, TensorUnit):
            if unit.name is not None:
                made.add(unit.name)
        elif isinstance(unit, ExpertUnit):
            made.add(f"{unit.layer}.{unit.part}")
        elif isinstance(unit, PartUnit):
            made.add(f"{unit.layer}.weight")
        else:
            first = unit.converter.target_patterns[0]
            made.update(unit.target.replace(first, t) for t in unit.converter.target_patterns)
    tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    missing = []
    for name, _ in skeleton.named_parameters():
        if name in made or tied.get(name) in made:
            continue
        missing.append(name)
    return missing


# ------------------------------------------------------------------------- fused expert tensors
@dataclass(frozen=True)
class _Fused:
    """One fused expert parameter of transformers' model, split into per-expert layers by qolora (``part``
    "bias": the fused ``<proj>_bias`` (E, out), split into the layers' biases)."""

    experts: str  # the SplitExperts module
    proj: str  # "gate_up_proj" / "down_proj"
    count: int
    out: int
    inp: int
    transposed: bool
    part: str = "weight"

    @property
    def shape(self) -> tuple[int, ...]:
        if self.part == "bias":
            return (self.count, self.out)
        return (self.count, self.inp, self.out) if self.transposed else (self.count, self.out, self.inp)

    def layer(self, index: int) -> str:
        return f"{self.experts}.{index}.{self.proj}"

    def stored_units(self, key: str) -> list[ExpertUnit]:
        """The fused tensor stored as the model holds it: one slice per expert."""
        transposed = self.transposed and self.part == "weight"
        return [ExpertUnit(self.layer(e), (Piece(key, self.out, e, transposed, self.count),), self.part)
                for e in range(self.count)]

    def converted_units(self, sources, converter, stored_shape, where) -> list[ExpertUnit] | None:
        """Per-expert units for transformers' MoE converters (MergeModulelist(0) [+ Concatenate]); None for
        any other op chain (then the converter runs whole)."""
        if self.part != "weight":
            return None
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
        join = 2 if self.transposed else 1
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", join)]):
            return None
        if len(ops) == 1 and len(converter.source_patterns) != 1:
            return None
        by_expert: dict[int, dict[str, str]] = defaultdict(dict)
        for key, pattern in sources:
            index = _expert_index(key, pattern)
            if index is None:
                return None
            by_expert[index][pattern] = key
        units = []
        for e in sorted(by_expert):
            if not 0 <= e < self.count:
                raise ConfigError(f"checkpoint tensor {by_expert[e][next(iter(by_expert[e]))]!r} is expert {e}, but "
                                  f"{self.experts} has {self.count} experts (config.json)")
            present = [p for p in converter.source_patterns if p in by_expert[e]]
            pieces = tuple(self._piece(by_expert[e][p], stored_shape, where) for p in present)
            if len(present) == len(converter.source_patterns):
                self._check_rows(pieces, where)
                units.append(ExpertUnit(self.layer(e), pieces))
        return units

    def _piece(self, key: str, stored_shape, where) -> Piece:
        shape = tuple(stored_shape[key])
        rows, cols = (shape[-1], shape[0]) if self.transposed else (shape[0], shape[-1])
        if len(shape) != 2 or cols != self.inp:
            layout = f"({self.inp}, rows)" if self.transposed else f"(rows, {self.inp})"
            raise ConfigError(f"tensor {key!r} in {where[key]} has shape {shape}, but an expert's part of "
                              f"{self.experts}.{self.proj} is {layout} by the model's config.json: the weights do "
                              "not belong to this config")
        return Piece(key, rows, None, self.transposed)

    def _check_rows(self, pieces: tuple[Piece, ...], where) -> None:
        if sum(p.rows for p in pieces) != self.out:
            listed = ", ".join(f"{p.key} ({p.rows} rows)" for p in pieces)
            rows = sum(p.rows for p in pieces)
            raise ConfigError(f"checkpoint tensors {listed} in {where[pieces[0].key]} make {rows}"
                              f" rows of {self.experts}.{self.proj}, but the model's config.json makes {self.out}: "
                              "the weights do not belong to this config")


def _expert_index(key: str, pattern: str) -> int | None:
    """The expert number that ``*`` stands for in a converter's source pattern (None if not a number)."""
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    match = re.search(regex, key)
    return int(match.group(1)) if match else None


def _fused(skeleton: nn.Module) -> dict[str, _Fused]:
    fused = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, SplitExperts):
            e, h, i = module.num_experts, module.hidden_dim, module.intermediate_dim
            for proj, (out, inp) in zip(FUSED, ((2 * i, h), (h, i))):
                fused[f"{name}.{proj}"] = _Fused(name, proj, e, out, inp, module.transposed)
                if module.has_bias:
                    fused[f"{name}.{proj}_bias"] = _Fused(name, proj, e, out, inp, module.transposed, "bias")
    return fused


_SPLIT_NAME = re.compile(r"^(.*)\.(\d+)\.(gate_up_proj|down_proj)\.(weight|bias)$")


def _split_owner(name: str, fused: dict[str, _Fused]) -> str | None:
    """The fused parameter a split expert layer's weight (or bias) belongs to, or None."""
    match = _SPLIT_NAME.match(name)
    if match is None:
        return None
    owner = f"{match.group(1)}.{match.group(3)}" + ("_bias" if match.group(4) == "bias" else "")
    return owner if owner in fused else None
