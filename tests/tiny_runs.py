"""Helpers for the tests that run the whole job on the tiny chat setup (``finetune`` for 2 steps, the CLI) and
check what it leaves: the options of a quick run, a folder's file hashes, the CLI's one error line.

The matching fixtures (the tiny model and data, a finished run, a copy of it, ``no_prepare``) are in conftest.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the lock file aside), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != ".qolora.lock"}


def run_options(out: Path, **changes) -> dict:
    """``finetune`` options of a 2-step CPU run into ``out`` (one checkpoint at step 2, one sample)."""
    options = dict(output_dir=out, rank=4, max_length=64, eval_fraction=0.25, max_steps=2, batch_size=4, lr=1e-3,
                   eval_every=0, save_every=2, n_samples=1, max_new_tokens=2, progress=False,
                   adapter_options={"device": "cpu"})
    options.update(changes)
    return options


def error_line(stderr: str) -> str:
    """The CLI's ``qolora: error:`` line; asserts there is exactly one and no traceback."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("qolora: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]
