"""qolora.training.run_folder: a run folder has one owner, and nothing a user owns in it is deleted.

A first run, ``--overwrite`` and a resume touch only what qolora wrote; a user's file where qolora would write, a
resume with nothing to resume and a checkpoint of other options are refused before the model loads, with the flag
to pass; a second run on a folder in use is refused (the lock); a resumed run removes a killed run's temporaries.
The comments name what happened before the fixes (issue 9).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qolora import CheckpointError, ConfigError, finetune
from qolora.cli.commands import main
from qolora.files import FolderBusyError, folder_lock
from tiny_runs import error_line, run_options, tree_hashes

REPO = Path(__file__).resolve().parents[2]


# -------------------------------------------------------------------------------------- nothing user-owned is deleted
def test_user_file_in_checkpoints_survives_a_first_run(tiny_inputs, tmp_path):
    # before: check_output_dir saw no step-* folder, _clear_run deleted OUT/checkpoints wholesale
    model, data = tiny_inputs
    out = tmp_path / "P"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "model_epoch3.pt").write_text("x")
    finetune(model, data, **run_options(out))
    assert (out / "checkpoints" / "model_epoch3.pt").read_text() == "x"
    assert (out / "checkpoints" / "step-000002").is_dir()


def test_overwrite_deletes_only_what_qolora_wrote(tiny_inputs, run_copy):
    model, data = tiny_inputs
    mine = {run_copy / "checkpoints" / "model_epoch3.pt": "x", run_copy / "notes.txt": "n",
            run_copy / "checkpoints" / "step-000099" / "mine.bin": "m"}  # a step-like folder without a manifest
    for path, text in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert main(["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(run_copy), "--rank", "4",
                 "--max-length", "64", "--eval-fraction", "0.25", "--max-steps", "2", "--batch-size", "4",
                 "--eval-every", "0", "--save-every", "2", "--n-samples", "0", "--device", "cpu", "--no-progress",
                 "--overwrite"]) == 0
    for path, text in mine.items():
        assert path.read_text() == text, path
    assert (run_copy / "adapter" / "qolora_config.json").is_file()


def test_a_user_file_in_the_adapter_folder_is_refused_before_work(tiny_inputs, run_copy, no_prepare):
    # before: clear_run left it, then the final save_adapter(overwrite=True) swapped the folder out and deleted it
    model, data = tiny_inputs
    (run_copy / "adapter" / "my_notes.txt").write_text("keep")
    before = tree_hashes(run_copy)
    with pytest.raises(ConfigError, match="my_notes.txt"):
        finetune(model, data, **run_options(run_copy, overwrite=True))
    assert tree_hashes(run_copy) == before


def test_resume_without_a_checkpoint_refuses_and_keeps_everything(tiny_inputs, run_copy, capsys):
    # before: only a warning "starting from scratch", then OUT/adapter, metrics and samples were deleted
    model, data = tiny_inputs
    shutil.rmtree(run_copy / "checkpoints")
    before = tree_hashes(run_copy)
    assert main(["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(run_copy),
                 "--resume", "--no-progress"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "no checkpoint" in line and "--overwrite" in line and "nothing was changed" in line
    assert tree_hashes(run_copy) == before


def test_cli_errors_name_the_flags(tiny_inputs, run_copy, capsys):
    model, data = tiny_inputs
    assert main(["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(run_copy)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--resume" in line and "--overwrite" in line


def test_mismatched_checkpoint_is_refused_before_the_model(tiny_inputs, run_copy, no_prepare):
    # before: refused only after prepare (10-17 s on the default model)
    model, data = tiny_inputs
    with pytest.raises(CheckpointError, match="training options differ"):
        finetune(model, data, resume=True, **run_options(run_copy, batch_size=2))
    with pytest.raises(CheckpointError, match="another adapter setup"):
        finetune(model, data, resume=True, **run_options(run_copy, rank=8))


# -------------------------------------------------------------------------------------- two runs never share a folder
def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from qolora.files import folder_lock\n"
            f"with folder_lock({str(folder)!r}):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_busy_folder_is_refused(tiny_inputs, run_copy, capsys):
    # before: each run's stale-temporary cleanup deleted the other's live files; two resumes both trained
    model, data = tiny_inputs
    (run_copy / "checkpoints" / "step-000002").rename(run_copy / "checkpoints" / "step-000001")  # something to resume
    before = tree_hashes(run_copy)
    holder = _hold_lock(run_copy)
    try:
        with pytest.raises(FolderBusyError, match=rf"in use by another qolora run \(pid {holder.pid}\)"):
            finetune(model, data, resume=True, **run_options(run_copy))
        with pytest.raises(FolderBusyError):
            finetune(model, data, **run_options(run_copy, overwrite=True))
        assert main(["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(run_copy),
                     "--overwrite", "--no-progress"]) == 2
        assert "in use by another qolora run" in error_line(capsys.readouterr().err)
        assert tree_hashes(run_copy) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(run_copy):  # the killed holder's lock is gone with it: never stale
        pass


# ------------------------------------------------------------------------------------------- a killed run's leftovers
def test_a_resumed_run_removes_the_temporaries_a_killed_run_left(tiny_inputs, run_copy, caplog):
    left = [run_copy / "checkpoints" / ".step-000099.tmp-abc123", run_copy / ".adapter.tmp-def456"]
    for path in left:
        path.mkdir()  # fresh: younger than the 6 h after which anyone may remove them
    (left[0] / "adapter.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.INFO, logger="qolora.training.run_folder"):
        finetune(tiny_inputs[0], tiny_inputs[1], **run_options(run_copy), resume=True)
    assert not any(p.exists() for p in left)
    assert "left by an interrupted run" in caplog.text


def test_resume_of_a_folder_that_does_not_exist_says_it_starts_anew(tiny_inputs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qolora.training.run_folder"):
        finetune(tiny_inputs[0], tiny_inputs[1], **run_options(tmp_path / "new"), resume=True)
    assert "does not exist: starting a new run there" in caplog.text
