"""scripts/adversarial.py, the adversarial report's cases as a script: a subset in the fast suite, the whole
script (its own process) in the slow one; every case passes and nothing a user owns is lost."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _adversarial():
    spec = importlib.util.spec_from_file_location("qolora_adversarial", REPO / "scripts" / "adversarial.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_adversarial_subset():
    adversarial = _adversarial()
    summary = adversarial.run(limit_per_group=3, verbose=False)
    assert summary["tried"] >= 20
    assert summary["passed"] == summary["tried"], summary["failures"]
    assert summary["nothing_lost"]


@pytest.mark.slow
def test_adversarial_full():
    """The whole script, as a user runs it (its own process: no state from other tests)."""
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "adversarial.py"), "--quiet"], cwd=repo,
                          capture_output=True, text=True, timeout=900)
    summary = re.search(r"tried (\d+) / passed (\d+) / nothing lost: (\w+)", proc.stdout)
    assert summary, proc.stdout[-2000:] + proc.stderr[-2000:]
    tried, passed, nothing_lost = int(summary[1]), int(summary[2]), summary[3]
    assert tried >= 150 and passed == tried and nothing_lost == "yes", proc.stdout[-3000:]
    assert proc.returncode == 0
