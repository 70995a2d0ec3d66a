"""The training shape a memory plan is made for: everything about a job but the model and its adapters.

:func:`qolora.planning.plan.plan` takes an :class:`qolora.config.AdapterConfig` (what is built) and a
:class:`TrainingShape` (how it is trained: tokens per micro-batch, optimizer, checkpointing, placement,
the memory to fit). :meth:`TrainingShape.checked` validates and normalises the options once, listing every
problem; code inside the planner trusts a shape it is given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..adapters.kernels import check_kernels
from ..config import parse_size
from ..errors import ConfigError, Problems
from ..memory.base_streaming import check_offload
from ..memory.chunked_loss import DEFAULT_CHUNK_BYTES
from ..memory.gradient_checkpointing import checkpointing_mode
from .memory_model import OPTIMIZERS

__all__ = ["TrainingShape"]

DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class TrainingShape:
    """How a model is trained, as far as memory goes (normalised by :meth:`checked`).

    Attributes:
        seq_len, batch_size: tokens per example and examples per micro-batch (per GPU).
        grad_accum: micro-batches per optimizer step (one micro-batch lives at a time; with more than one,
            the adapters' gradients live through the whole step).
        optim: one of :data:`qolora.planning.memory_model.OPTIMIZERS`.
        gradient_checkpointing: True (every decoder layer recomputed in the backward pass), False,
            ``"offload"`` (and the checkpointed inputs kept in host memory; CUDA only: on the CPU it is
            ordinary checkpointing), an integer ``k`` (the first ``k`` layers), or ``"auto"`` (planned as
            True: a training run chooses at launch from the plan, :mod:`qolora.training.auto_choices`).
        chunked_loss, loss_chunk_bytes: the loop's chunked loss, at most ``loss_chunk_bytes`` fp32 logits a chunk.
        kernels: as in :func:`qolora.prepare` (``"auto"`` and ``"compile"`` run the fused adapter step).
        device: ``"cuda"`` (adds the CUDA context and an allocator margin) or ``"cpu"``.
        padded: whether batches carry a padding mask (SDPA then materialises repeated K/V heads);
            None = ``batch_size > 1``.
        offload: None, ``"cpu"`` (every decoder layer's frozen base in host memory) or ``"auto"`` (the
            fewest layers that fit ``gpu_memory``, which it needs).
        offload_embedding: the input embedding in host memory (untied embeddings only).
        gpu_memory, host_memory: bytes to fit (a size string such as ``"24GiB"`` is accepted by
            :meth:`checked`); None: not checked.
        num_gpus: data-parallel processes; without ``fsdp`` each holds the whole quantized base.
        fsdp: shard the quantized decoder-layer weights over the ``num_gpus`` GPUs (FSDP-QLoRA).
    """

    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 1
    optim: str = OPTIMIZERS[0]
    gradient_checkpointing: bool | str | int = True
    chunked_loss: bool = True
    loss_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    kernels: str = "auto"
    device: str = "cuda"
    padded: bool | None = None
    offload: str | None = None
    offload_embedding: bool = False
    gpu_memory: int | None = None
    host_memory: int | None = None
    num_gpus: int = 1
    fsdp: bool = False

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def checked(cls, **options) -> TrainingShape:
        """The options validated and normalised (``gradient_checkpointing="on"`` -> True, ``offload="none"`` ->
        None, sizes in bytes).

        Raises:
            ConfigError: listing every problem.
            TypeError: an option that is not a field.
        """
        unknown = sorted(set(options) - set(cls.fields()))
        if unknown:
            raise TypeError(f"unknown training-shape option(s) {unknown}; allowed: {list(cls.fields())}")
        raw = cls(**options)
        problems = Problems()
        check = problems.check

        for name in ("seq_len", "batch_size", "grad_accum", "num_gpus", "loss_chunk_bytes"):
            value = getattr(raw, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r} must be an integer >= 1")
        if raw.optim not in OPTIMIZERS:
            problems.append(f"optim={raw.optim!r} is not supported; allowed: {list(OPTIMIZERS)}")
        check(check_kernels, raw.kernels)
        checkpointing = check(checkpointing_mode, raw.gradient_checkpointing)
        if raw.device not in DEVICES:
            problems.append(f"device={raw.device!r} is not supported; allowed: {', '.join(map(repr, DEVICES))}")
        offload = check(check_offload, raw.offload)
        gpu = check(parse_size, raw.gpu_memory, "gpu_memory") if raw.gpu_memory is not None else None
        host = check(parse_size, raw.host_memory, "host_memory") if raw.host_memory is not None else None
        if offload == "auto" and raw.gpu_memory is None:
            problems.append("offload='auto' needs gpu_memory: the memory to fit by offloading decoder layers")
        multi_gpu_fsdp = raw.fsdp and isinstance(raw.num_gpus, int) and raw.num_gpus > 1
        for name in ("chunked_loss", "offload_embedding", "fsdp"):
            if not isinstance(getattr(raw, name), bool):
                problems.append(f"{name}={getattr(raw, name)!r} must be True or False")
        if raw.padded is not None and not isinstance(raw.padded, bool):
            problems.append(f"padded={raw.padded!r} must be True, False or None (None: batch_size > 1)")
        if multi_gpu_fsdp and offload is not None:
            problems.append("fsdp and offload are not planned together: choose one")
        if multi_gpu_fsdp and raw.offload_embedding is True:
            problems.append("fsdp and offload_embedding are not planned together: FSDP shards the base instead; "
                            "choose one")
        if problems:
            raise ConfigError(problems)
        return dataclasses.replace(raw, gradient_checkpointing=checkpointing, offload=offload, gpu_memory=gpu,
                                   host_memory=host)

    def replace(self, **changes) -> TrainingShape:
        """A copy with ``changes`` (already-normalised values)."""
        return dataclasses.replace(self, **changes)

    @property
    def is_padded(self) -> bool:
        return self.batch_size > 1 if self.padded is None else self.padded

    @property
    def planned_checkpointing(self) -> bool | str | int:
        """The checkpointing the plan models: ``"auto"`` as every layer; ``"offload"`` on the CPU as plain
        checkpointing (host and device are one memory, nothing moves)."""
        mode = self.gradient_checkpointing
        if mode == "auto":
            return True
        return True if mode == "offload" and self.device != "cuda" else mode

    @property
    def sharded(self) -> bool:
        """FSDP over more than one GPU."""
        return self.fsdp and self.num_gpus > 1
