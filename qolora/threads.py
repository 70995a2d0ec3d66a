"""How many CPU threads torch uses: one when the CPU is already busy, unless someone chose.

OpenMP threads that spin while waiting for each other on cores other processes hold make each step
many times slower (a 135M model prepared ~3x slower on a busy 2-core machine). :func:`cpu_thread_policy`
runs before CPU work in :func:`qolora.prepare` and :func:`qolora.load` (so Python users get it, not
only the command line); :func:`set_threads` is an explicit choice (``--threads``) that the policy then
leaves alone, as it leaves alone a count the program set itself with ``torch.set_num_threads``.
"""

from __future__ import annotations

import logging
import os

import torch

from .config import ConfigError

__all__ = ["cpu_thread_policy", "set_threads"]

logger = logging.getLogger(__name__)

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
