"""qolora 0.5's import paths keep working for one release (issue 21), each with a DeprecationWarning, and
resolve to the very module at its new path; the package's functions stay functions."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    # a fresh interpreter: which modules are imported, and what warned, depends on the process's history
    return subprocess.run([sys.executable, "-W", "error::DeprecationWarning:__main__", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env={"HF_HUB_OFFLINE": "1",
                                                                                     "PATH": "/usr/bin:/bin"})


def test_old_module_paths_resolve_to_the_new_modules_with_a_warning():
    proc = _run("""
        import importlib, warnings
        import qolora
        from qolora.moved_modules import MOVED
        for old, new in MOVED.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = importlib.import_module("qolora." + old)
            assert module is importlib.import_module("qolora." + new), old
            if old not in ("train", "prepare", "merge", "finetune"):
                assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
        from qolora.train_config import TrainConfig
        assert TrainConfig is qolora.TrainConfig
        import qolora.train, qolora.prepare, qolora.merge, qolora.finetune
        assert callable(qolora.train) and not isinstance(qolora.train, type(qolora))  # still the functions
        assert callable(qolora.prepare) and not isinstance(qolora.prepare, type(qolora))
        from qolora.train import TrainConfig as T2, train
        assert T2 is TrainConfig and train is qolora.train
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from qolora.data import tokenize_dataset
            from qolora.export import export_lora
            from qolora.cli import build_parser, main
            from qolora.plan import add_parser
        assert len({str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)}) == 5
        assert export_lora is qolora.export_lora and callable(tokenize_dataset) and callable(build_parser)
        import qolora.cli.commands
        assert main is qolora.cli.commands.main and callable(add_parser)  # 0.5's qolora.cli.main, a function
        try:
            from qolora.data import no_such_name  # noqa: F401
        except ImportError:
            pass
        else:
            raise AssertionError("an unknown name imported")
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
