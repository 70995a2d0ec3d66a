"""Multi-process data-parallel training on ``torch.distributed``, launched by ``torchrun`` / ``accelerate``.

The launch is read from the environment the launchers set (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``): one process per device, each holding its own frozen (4-bit) base and
an identical copy of the adapters. Nothing of the base is synchronised; only the adapters' gradients are::

    global micro-batch (N * b examples of the one seeded DataOrder)  ->  rank k takes examples [k*b, (k+1)*b)
    n_labels = all_reduce(label tokens of the global accumulated batch)   (the loss is a token mean over it)
    backward on the local slice -> all_reduce(sum) of the adapter grads -> clip -> identical optimizer steps

so ``N`` processes with ``batch_size=b`` compute the update of one process with ``batch_size=N*b``
(same examples, same normalisation; the adapters end equal up to float summation order).

:func:`session` starts the process group (gloo on the CPU, NCCL on CUDA) when the environment asks
for one and ends it when it started it; :func:`world` says who this process is. Files are written by
rank 0 only: :func:`on_main` runs a step there and hands its result, or its exception, to every rank,
so a failure on rank 0 (a busy folder, a refused resume, a full disk) stops all ranks with the same
error instead of leaving them waiting in a collective.

``accelerate launch --cpu --num_processes 2`` starts a single process on accelerate 1.15 (it does not
set up the CPU workers); ``torchrun`` / ``python -m torch.distributed.run`` is the CPU launcher.
``accelerate launch`` on GPUs sets the same variables and goes through the same path.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from ..devices import World, local_device, world

__all__ = ["NullMetrics", "RankZeroError", "all_reduce_grads", "all_reduce_sum", "barrier", "broadcast",
           "gather", "main_context", "on_main", "session"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@contextlib.contextmanager
def session(device: torch.device | str = "cpu") -> Iterator[World]:
    """Start the process group the launcher's environment asks for (once) and end it on exit if
    this call started it; a world of one needs none. Ranks other than 0 log WARNING and above only.

    Args:
        device: the training device: gloo for the CPU, NCCL for CUDA (each process uses
            ``cuda:LOCAL_RANK``).
    """
    w = world()
    started = False
    log = logging.getLogger(__package__)
    level = log.level
    if w.distributed and not torch.distributed.is_initialized():
        device = local_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        extra = {"device_id": device} if device.type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, **extra)
        started = True
        w = world()
        if not w.is_main:
            log.setLevel(max(logging.WARNING, log.getEffectiveLevel()))
        logger.info("data parallel over %d processes (%s backend)", w.size, backend)
    finished = False
    try:
        yield w
        finished = True
    finally:
        if started:
            if finished:
                _every_rank_done()
            torch.distributed.destroy_process_group()
            log.setLevel(level)


#: How long a rank that finished waits at the end for the others before it tears the group down anyway.
END_BARRIER_TIMEOUT_S = 300


def _every_rank_done() -> None:
    """Wait (bounded) until every rank has finished before the group goes: a rank that destroys its gloo group
    while a peer still has work in flight with it can abort at exit ("terminate called without an active
    exception"). Not after an exception: the other ranks may never come, and the launcher stops them."""
    from datetime import timedelta

    try:
        if torch.distributed.get_backend() == "gloo":
            torch.distributed.monitored_barrier(timeout=timedelta(seconds=END_BARRIER_TIMEOUT_S))
        else:
            torch.distributed.barrier()
    except RuntimeError as exc:  # a peer died or timed out: tear down regardless
        logger.warning("not every process reached the end of training (%s); closing the process group anyway",
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


# --------------------------------------------------------------------------------- collectives
def _group_device() -> torch.device:
    """Where collective tensors live: NCCL needs them on this process's GPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float], dtype: torch.dtype = torch.float64) -> list[float]:
    """Sum numbers across ranks (a world of one returns them unchanged)."""
    if not world().distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=dtype, device=_group_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_grads(params: Sequence[torch.Tensor], bucket_bytes: int = 64 << 20) -> None:
    """Sum the gradients of ``params`` across ranks in place, in flat buckets (missing grads count as zeros)."""
    if not world().distributed:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])  # (sum of numel,)
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in same:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled; a world of one returns it)."""
    if not world().distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, device=_group_device())
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
    w = world()
    if not w.distributed:
        return [obj]
    out = [None] * w.size if w.is_main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if world().distributed:
        torch.distributed.barrier()


class RankZeroError(RuntimeError):
    """Rank 0 failed with an error that could not be sent to the other ranks as itself."""


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (so other ranks raise the same type), else a RankZeroError."""
    try:
        back = pickle.loads(pickle.dumps(exc))
        if type(back) is type(exc) and str(back) == str(exc):
            return exc
    except Exception:  # noqa: BLE001 - any pickling failure: send the text instead
        pass
    return RankZeroError(f"rank 0 failed: {type(exc).__name__}: {exc}")


def on_main(fn: Callable[[], T], *, share_result: bool = True) -> T | None:
    """Run ``fn`` on rank 0 only and hand its result (or its exception) to every rank.

    In a world of one this is ``fn()``. Otherwise rank 0 calls ``fn``; if it raises, every rank raises
    the same exception (rank 0 its original, with traceback), so no rank is left in a later collective.
    Without ``share_result`` the other ranks get None (for results that need not travel).
    """
    w = world()
    if not w.distributed:
        return fn()
    if w.is_main:
        try:
            result = fn()
        except BaseException as exc:
            broadcast(("error", _portable(exc)))
            raise
        broadcast(("ok", result if share_result else None))
        return result
    status, value = broadcast(None)
    if status == "error":
        raise value
    return value


@contextlib.contextmanager
def main_context(factory: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Enter ``factory()`` on rank 0 only (e.g. the output folder's lock), failing on every rank if
    entering fails there; the other ranks run the block without it."""
    w = world()
    if not w.distributed:
        with factory():
            yield
        return
    with contextlib.ExitStack() as stack:
        on_main(lambda: stack.enter_context(factory()), share_result=False)
        yield


class NullMetrics:
    """The metrics log of ranks other than 0: same interface as :class:`qolora.training.reporting.MetricsLog`,
    writes nothing (rank 0 writes the one ``metrics.jsonl``)."""

    def __init__(self, path):
        self.path = path

    def write(self, event: str, **fields: Any) -> dict:
        return {"event": event, **fields}

    def read(self) -> list[dict]:
        return []

    def truncate_after(self, step: int) -> None:
        pass

    def reset(self) -> None:
        pass
