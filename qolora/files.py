"""Files qolora writes: never half-written, never someone else's, with ordinary permissions.

Every file or folder qolora produces is built under a temporary sibling name (``.NAME.tmp-XXXX``)
and renamed into place when complete, so an interrupted write leaves nothing at the final path:

* :func:`atomic_file` / :func:`atomic_write_text` for one file,
* :func:`atomic_dir` for a folder (an existing one is swapped out only once the new one is whole,
  and only when the caller passed ``overwrite``).

``tempfile`` creates private (0600 / 0700) entries; :func:`umask_permissions` gives the result the
permissions a plain ``open`` / ``mkdir`` would have, so a saved adapter, a merged checkpoint and a
training checkpoint all follow the user's umask. :func:`remove_stale_temporaries` deletes the
temporaries that a killed process left next to a path, and only those older than a grace period,
so a concurrent writer's live temporary is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import ConfigError

__all__ = [
    "FolderBusyError",
    "folder_lock",
    "atomic_dir",
    "atomic_file",
    "atomic_write_text",
    "check_out_dir",
    "remove_stale_temporaries",
    "sha256_file",
    "umask_permissions",
    "write_json",
]

LOCK_FILE = ".qolora.lock"

#: A temporary older than this is a leftover of a killed process (writes take seconds, not hours).
STALE_AFTER_S = 6 * 3600


def umask_permissions(path: Path) -> None:
    """Give ``path`` (and the files directly in it, for a folder) the permissions a plain ``open`` /
    ``mkdir`` would: ``tempfile`` creates them private to the owner."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~umask)
        for child in path.iterdir():
            if child.is_file():
                os.chmod(child, 0o666 & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix) to write; once written it replaces ``path``
    (``os.replace``), on an error it is deleted."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON (inside an atomic folder or file)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool, what: str = "output folder") -> Path:
    """Refuse an existing ``out_dir`` unless ``overwrite`` (and a file there always), before any work."""
    path = Path(out_dir).expanduser()
    if path.is_file() or path.is_symlink() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} exists and is a file; expected a folder path")
    if path.exists() and not overwrite:
        raise ConfigError(f"{what} {str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it, "
                          "or choose another path")
    return path


@contextlib.contextmanager
def atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir``, on error it is deleted.

    The result gets umask permissions (:func:`umask_permissions`). An existing ``out_dir`` is moved
    aside and deleted only after the new folder is in place (and only with ``overwrite``).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir.parent, out_dir.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        umask_permissions(tmp)
        check_out_dir(out_dir, overwrite)  # again: something may have appeared meanwhile
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / out_dir.name)
            try:
                os.replace(tmp, out_dir)
            except BaseException:  # never leave the user without the old folder
                os.replace(trash / out_dir.name, out_dir)
                shutil.rmtree(trash, ignore_errors=True)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: Path, name: str, older_than_s: float = STALE_AFTER_S, *,
                             pattern: bool = False) -> list[Path]:
    """Delete the ``.NAME.tmp-*`` / ``.NAME.old-*`` entries in ``folder`` that a killed process left.

    ``name`` is a file name, or a glob with ``pattern=True`` (``"step-*"``). Only entries untouched for
    ``older_than_s`` go: a live temporary of a concurrent writer is recent and stays. Returns what was
    deleted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed = []
    stem = name if pattern else glob.escape(name)
    for kind in (f".{stem}.tmp-*", f".{stem}.old-*"):
        for entry in folder.glob(kind):
            try:
                if now - entry.lstat().st_mtime < older_than_s:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
            except OSError:  # a concurrent cleaner got there first
                continue
    return removed


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FolderBusyError(ConfigError):
    """Another process is using the folder (it holds the folder's qolora lock)."""


_held: dict[Path, list] = {}  # folder -> [open lock file, depth]: re-entrant within one process


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s exclusive qolora lock (``folder/.qolora.lock``) for the ``with`` block.

    An OS file lock (``flock``): the kernel releases it when its process dies, however it dies, so
    a lock is never stale. Re-entrant within one process. The file records the holder's pid.

    Raises:
        FolderBusyError: another process holds the lock (naming its pid), at once, never waiting.
    """
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder][1] += 1
        try:
            yield
        finally:
            _held[folder][1] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise FolderBusyError(f"{folder} is in use by another qolora run (pid {holder}); wait for it to finish, or "
                              "use another output folder") from None
    except OSError as exc:  # e.g. no locks on this file system
        handle.close()
        raise ConfigError(f"cannot lock {folder} ({exc.strerror or exc}): qolora needs a folder on a file system "
                          "that supports file locks") from exc
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[folder] = [handle, 1]
    try:
        yield
    finally:
        _held[folder][1] -= 1
        if _held[folder][1] == 0:
            del _held[folder]
            handle.close()  # releases the flock

