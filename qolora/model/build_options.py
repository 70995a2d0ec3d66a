"""How a model is built beyond its :class:`~qolora.config.AdapterConfig`: gradient checkpointing, the
base streamed from host memory, the adapters' training step, the input embedding on the host.

Checked once, where a public call begins (:func:`qolora.prepare`, :func:`qolora.load`,
:func:`qolora.finetune`): :meth:`BuildOptions.parse` lists every problem at once, and the normalised
values flow down to the build and the placement, which trust them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from ..adapters.kernels import check_kernels
from ..errors import ConfigError, Problems
from ..memory.base_streaming import check_gpu_memory, check_offload
from ..memory.gradient_checkpointing import checkpointing_mode
from ..memory.host_embedding import check_offload_embedding
from ..planning.shape import TrainingShape

__all__ = ["BuildOptions"]


@dataclass(frozen=True, eq=False)
class BuildOptions:
    """The build options of one model, normalised (see :func:`qolora.prepare` for each)."""

    gradient_checkpointing: bool | str | int = False  # True / False / "offload" / n layers
    offload: str | None = None  # None (nothing), "auto" or "cpu"
    gpu_memory: int | None = None  # bytes, for offload="auto"
    kernels: str = "auto"
    offload_embedding: bool = False
    # the training shape offload="auto" plans for (this build's checkpointing unless it names its own)
    offload_plan: TrainingShape | None = None

    @classmethod
    def parse(cls, *, gradient_checkpointing=False, offload=None, gpu_memory=None, kernels="auto",
              offload_embedding=False, offload_plan=None) -> tuple[BuildOptions | None, list[str]]:
        """``(options, [])``, or ``(None, every problem)``."""
        problems = Problems()
        check = problems.check

        checkpointing = check(checkpointing_mode, gradient_checkpointing)
        check(check_kernels, kernels)
        offload = check(check_offload, offload)
        gpu_memory = check(check_gpu_memory, gpu_memory, offload)
        check(check_offload_embedding, offload_embedding)
        shape = check(_offload_shape, offload_plan, True if checkpointing is None else checkpointing)
        if shape is not None and shape.sharded and offload is not None:
            problems.append(f"offload={offload!r} with an offload_plan of FSDP over {shape.num_gpus} GPUs: FSDP "
                            "shards the base instead of offloading it; use one of them")
        if problems:
            return None, list(problems)
        return cls(checkpointing, offload, gpu_memory, kernels, offload_embedding, shape), []

    @classmethod
    def checked(cls, **options) -> BuildOptions:
        """The options normalised.

        Raises:
            ConfigError: listing every problem.
        """
        built, problems = cls.parse(**options)
        if problems:
            raise ConfigError(problems)
        return built


def _offload_shape(offload_plan, checkpointing) -> TrainingShape | None:
    """``offload_plan`` (a dict of :class:`TrainingShape` fields, or one) as a normalised shape."""
    if offload_plan is None:
        return None
    if isinstance(offload_plan, TrainingShape):
        offload_plan = {f.name: getattr(offload_plan, f.name) for f in fields(TrainingShape)}
    if not isinstance(offload_plan, Mapping):
        raise ConfigError(f"offload_plan={offload_plan!r} must be a dict of training-shape options "
                          f"({', '.join(TrainingShape.fields())}) or a qolora.planning.shape.TrainingShape")
    unknown = sorted(set(offload_plan) - set(TrainingShape.fields()))
    if unknown:
        raise ConfigError(f"offload_plan has unknown option(s) {unknown}; allowed: {list(TrainingShape.fields())}")
    return TrainingShape.checked(**{"gradient_checkpointing": checkpointing, **offload_plan})
