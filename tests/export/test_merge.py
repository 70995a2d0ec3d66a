"""qolora.export.merge: a merge never writes into its adapter or its base, and a base other than the training
one is refused naming the flag that allows it."""

from __future__ import annotations

import shutil

import pytest

import qolora
from qolora import ConfigError
from qolora.cli.commands import main
from tiny_runs import error_line, tree_hashes


@pytest.mark.parametrize("where", ["inside-adapter", "is-adapter", "inside-base"])
def test_merge_into_the_adapter_or_base_is_refused(tiny_inputs, finished_run, tmp_path, where):
    model, _ = tiny_inputs
    adapter = tmp_path / "adapter"
    base = tmp_path / "base"
    shutil.copytree(finished_run[0] / "adapter", adapter)
    shutil.copytree(model, base)
    out = {"inside-adapter": adapter / "merged", "is-adapter": adapter, "inside-base": base / "merged"}[where]
    before = tree_hashes(tmp_path)
    with pytest.raises(ConfigError, match="is, holds or lies inside"):
        qolora.merge(base, adapter, out, overwrite=True, progress=False)
    assert tree_hashes(tmp_path) == before


def test_base_mismatch_names_the_merge_flag(finished_run, tmp_path, capsys):
    from tiny_models import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", seed=7)  # the same shapes, other weights
    adapter = str(finished_run[0] / "adapter")
    assert main(["merge", str(other), adapter, str(tmp_path / "m"), "--no-progress"]) == 2
    assert "--allow-base-mismatch" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "m").exists()
    assert main(["merge", str(other), adapter, str(tmp_path / "m"), "--no-progress", "--allow-base-mismatch"]) == 0
