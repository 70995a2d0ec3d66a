"""The host's memory: how much is available (:func:`available_host_bytes`), and freed heap handed back to
the operating system (glibc ``malloc_trim``, :func:`trim`).

torch's CPU tensors come from the C heap. glibc serves allocations under its (dynamic, up to 32 MiB)
mmap threshold from heap arenas and keeps what is freed there for reuse, so a process that frees a
stream of large temporaries, as :func:`qolora.prepare` does (one full-precision weight and its
quantization slices per layer), carries their freed pages in its resident memory, which raised
prepare's RSS peak above transformers' own 4-bit load's (benchmarks/results/init_cpu_*_mem_*.json).
:func:`trim` returns
those pages after each layer; it touches no live tensor. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

__all__ = ["available_host_bytes", "trim"]

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Return the C heap's free pages to the OS; True if glibc did it (False: not available)."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def available_host_bytes() -> int:
    """Host memory available for new allocations (psutil, else ``MemAvailable`` of /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is installed with accelerate
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))  # pragma: no cover
