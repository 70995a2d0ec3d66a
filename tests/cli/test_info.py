"""``qolora info``: it recognises a merged folder, and on a run folder it marks a newest checkpoint that is not
usable and says which one ``--resume`` would continue from."""

from __future__ import annotations

import shutil

import pytest

from qolora.cli.commands import main


def test_info_understands_a_merged_folder(tiny_inputs, finished_run, tmp_path, capsys):
    model, _ = tiny_inputs
    merged = tmp_path / "merged"
    assert main(["merge", str(model), str(finished_run[0] / "adapter"), str(merged), "--dtype", "fp32",
                 "--no-progress"]) == 0
    assert main(["info", str(merged)]) == 0
    assert "merged checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated adapter", "garbage manifest"])
def test_info_on_a_run_marks_an_unusable_newest_checkpoint(run_copy, capsys, damage):
    newest = sorted((run_copy / "checkpoints").iterdir())[-1]
    broken = newest.with_name("step-000099")
    shutil.copytree(newest, broken)
    if damage == "truncated adapter":
        data = (broken / "adapter.safetensors").read_bytes()
        (broken / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (broken / "manifest.json").write_text("garbage")
    assert main(["info", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert "step-000099: NOT USABLE: checkpoint" in out and f"--resume would continue from {newest.name}" in out
