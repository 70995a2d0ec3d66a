"""The process's place on the machine: its rank and device in a launch, and its CPU threads.

:func:`world` reads the launch (``torchrun`` / ``accelerate`` set ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``); :func:`local_device` turns a bare ``cuda`` into this process's device.

How many CPU threads torch uses: one when the CPU is already busy, unless someone chose.

OpenMP threads that spin while waiting for each other on cores other processes hold make each step
many times slower (a 135M model prepared ~3x slower on a busy 2-core machine). :func:`cpu_thread_policy`
runs before CPU work in :func:`qolora.prepare` and :func:`qolora.load` (so Python users get it, not
only the command line); :func:`set_threads` is an explicit choice (``--threads``) that the policy then
leaves alone, as it leaves alone a count the program set itself with ``torch.set_num_threads``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .errors import ConfigError

__all__ = ["World", "cpu_thread_policy", "local_device", "resolve_device", "set_threads", "world"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class World:
    """Who this process is in the launch (``size == 1``: a plain single-process run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer (set by the launcher?)") from None


def world() -> World:
    """This process's place: from the live process group if there is one, else from the launcher's
    environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), else a world of one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), _env_int("LOCAL_RANK", 0))
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    return World(_env_int("RANK", 0), size, _env_int("LOCAL_RANK", 0))


def resolve_device(device: torch.device | str) -> torch.device:
    """The one device rule: ``"auto"`` is CUDA when there is one, else the CPU; a bare ``cuda`` becomes this
    process's device in a distributed launch (:func:`local_device`)."""
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return local_device(device)


def local_device(device: torch.device | str) -> torch.device:
    """``device`` for this process: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` in a distributed launch."""
    device = torch.device(device)
    w = world()
    if device.type == "cuda" and device.index is None and w.distributed:
        return torch.device("cuda", w.local_rank)
    return device


_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, as found when qolora was imported
_chosen = False


def set_threads(threads: int) -> None:
    """Use exactly ``threads`` CPU threads from now on (the busy-CPU policy no longer applies).

    Raises:
        ConfigError: ``threads`` is not an integer >= 1.
    """
    global _chosen
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads={threads!r} (--threads) must be an integer >= 1")
    torch.set_num_threads(threads)
    _chosen = True


def cpu_thread_policy() -> int:
    """Drop to one thread when the CPU is already busy (load average >= cores), unless the thread count
    was chosen (:func:`set_threads`, or ``torch.set_num_threads`` by the program). Returns the count used."""
    threads = torch.get_num_threads()
    if _chosen or threads != _DEFAULT_THREADS or threads <= 1 or not hasattr(os, "getloadavg"):
        return threads
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cores:
        torch.set_num_threads(1)
        logger.info("the CPU is busy (load %.1f on %d cores): using 1 thread (torch.set_num_threads or --threads "
                    "to choose)", load, cores)
        return 1
    return threads
