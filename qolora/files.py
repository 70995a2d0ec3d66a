"""Files qolora writes: never half-written, never someone else's, with ordinary permissions.

Every file or folder qolora produces is built under a temporary sibling name (``.NAME.tmp-XXXX``)
and renamed into place when complete, so an interrupted write leaves nothing at the final path:

* :func:`atomic_file` / :func:`atomic_write_text` for one file,
* :func:`atomic_dir` for a folder (an existing one is swapped out only once the new one is whole,
  and only when the caller passed ``overwrite``).

One rule for every writer's ``overwrite``: it replaces a folder only when qolora can prove the folder
is its own, the kind of folder that writer makes. Each writer describes its output with a
:class:`FolderKind` (the record file every such folder holds, the names it writes); an existing folder
holding anything else (a ``.git``, a ``src/``, a ``notes.txt``), or none of the record, is refused
before any work, naming what is there, and so is the current folder or one that holds it.

``tempfile`` creates private (0600 / 0700) entries; :func:`umask_permissions` gives the result the
permissions a plain ``open`` / ``mkdir`` would have, so a saved adapter, a merged checkpoint and a
training checkpoint all follow the user's umask. :func:`remove_stale_temporaries` deletes the
temporaries that a killed process left next to a path, and only those older than a grace period,
so a concurrent writer's live temporary is never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "FolderBusyError",
    "FolderKind",
    "folder_lock",
    "atomic_dir",
    "atomic_file",
    "atomic_write_text",
    "check_out_dir",
    "check_out_file",
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


@dataclasses.dataclass(frozen=True)
class FolderKind:
    """The kind of folder one of qolora's writers makes: how ``overwrite`` tells that a folder is its own.

    Attributes:
        what: the folder's name in messages (``"adapter folder"``).
        record: the file qolora writes into every such folder; without it the folder is not qolora's.
        names: ``fnmatch`` patterns of every file the writer may write there.
        accept: an extra test for an entry matching ``names`` (e.g. a ``config.json`` that is qolora's own).
    """

    what: str
    record: str
    names: tuple[str, ...]
    accept: Callable[[Path], bool] | None = None

    def foreign(self, folder: Path) -> list[str]:
        """Entries of ``folder`` this writer did not write (every entry when the record is missing)."""
        folder = Path(folder)
        if not folder.is_dir():
            return []
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
        if entries and not (folder / self.record).is_file():
            return [p.name for p in entries]

        def ours(path: Path) -> bool:
            return (path.is_file() and not path.is_symlink() and any(fnmatch.fnmatch(path.name, n) for n in self.names)
                    and (self.accept is None or self.accept(path)))

        return [p.name for p in entries if not ours(p)]


def _holds_cwd(path: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was deleted
        return False
    target = path.resolve()
    return target == cwd or target in cwd.parents


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool, kind: FolderKind) -> Path:
    """Check ``out_dir`` before any work: a new path, or (with ``overwrite``) a folder of ``kind`` that qolora wrote.

    Raises:
        ConfigError: ``out_dir`` is a file; exists without ``overwrite``; or, with ``overwrite``, is the
            current folder (or holds it) or holds anything ``kind``'s writer does not write.
    """
    what = kind.what
    path = Path(out_dir).expanduser()
    if path.is_file() or path.is_symlink() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} exists and is a file; expected a folder path")
    if not path.exists():
        return path
    if not overwrite:
        raise ConfigError(f"{what} {str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it, "
                          "or choose another path")
    if _holds_cwd(path):
        raise ConfigError(f"{what} {str(path)!r} is the current folder or holds it; overwrite replaces the whole "
                          "folder, so write to a new folder path instead")
    foreign = kind.foreign(path)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        why = (f"it has no {kind.record}, so qolora did not write it" if not (path / kind.record).is_file()
               else f"qolora's {what} does not write them")
        raise ConfigError(f"{what} {str(path)!r} holds {shown}: {why}. overwrite replaces only {what}s that "
                          "qolora wrote, so nothing was changed; move them away or choose another path")
    return path


def check_out_file(path: str | os.PathLike, overwrite: bool, what: str, ours: Callable[[Path], bool]) -> Path:
    """The file rule of ``overwrite`` (:func:`check_out_dir` for folders): an existing ``path`` is replaced only
    with ``overwrite`` and when ``ours(path)`` proves qolora wrote it (e.g. a marker in its header).

    Raises:
        ConfigError: ``path`` is a folder or not a plain file; exists without ``overwrite``; or is not qolora's.
    """
    path = Path(path).expanduser()
    if not (path.exists() or path.is_symlink()):
        return path
    if path.is_symlink() or not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} exists and is not a plain file; choose another path")
    if not overwrite:
        raise ConfigError(f"{what} {str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it, "
                          "or choose another path")
    if not ours(path):
        raise ConfigError(f"{what} {str(path)!r} exists and qolora did not write it (no qolora marker): overwrite "
                          f"replaces only a {what} that qolora wrote, so nothing was changed; move it away or "
                          "choose another path")
    return path


@contextlib.contextmanager
def atomic_dir(out_dir: Path, overwrite: bool, kind: FolderKind) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir``, on error it is deleted.

    The result gets umask permissions (:func:`umask_permissions`). An existing ``out_dir`` is moved
    aside and deleted only after the new folder is in place, and only with ``overwrite`` when it is a
    folder of ``kind`` that qolora wrote (:func:`check_out_dir`, checked again at the swap).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir.parent, out_dir.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        umask_permissions(tmp)
        check_out_dir(out_dir, overwrite, kind)  # again: something may have appeared meanwhile
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

