"""qolora.training.checkpoints: a hand-edited state.json is refused before the model loads (whether or not the
manifest was edited to match), and a step folder qolora did not write is never replaced by a checkpoint."""

from __future__ import annotations

import json

import pytest

import qolora
from qolora import CheckpointError, finetune
from qolora.cli.commands import main
from tiny_runs import run_options


@pytest.mark.parametrize("edit, message", [
    # before: KeyError 'index' at resume, while `qolora info` printed "verified"
    (lambda s: s["data_position"].pop("index"), "has data_position="),
    (lambda s: s.pop("history"), "lacks the list 'history'"),
    (lambda s: s.__setitem__("step", "two"), "has step='two'"),
])
def test_hand_edited_state_json_is_refused_before_the_model(tiny_inputs, run_copy, edit, message, no_prepare, capsys):
    model, data = tiny_inputs
    ckpt = run_copy / "checkpoints" / "step-000002"
    state = json.loads((ckpt / "state.json").read_text())
    edit(state)
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="state.json"):  # size/sha256 differ from the manifest
        finetune(model, data, resume=True, **run_options(run_copy))
    manifest = json.loads((ckpt / "manifest.json").read_text())  # a consistent hand edit: manifest updated too
    manifest["files"]["state.json"] = {"bytes": (ckpt / "state.json").stat().st_size,
                                       "sha256": qolora.files.sha256_file(ckpt / "state.json")}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"state\.json {message}"):
        finetune(model, data, resume=True, **run_options(run_copy))
    assert main(["info", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert "NOT USABLE" in printed and "verified" not in printed


def test_a_foreign_step_folder_is_never_replaced_by_a_checkpoint(tmp_path, chat_model_dir, tokenized):
    """A user's folder named like a checkpoint survives --overwrite and the run that reaches its step."""
    from qolora.training.checkpoints import CheckpointError as CkptError
    from qolora.training.loop import TrainConfig, train

    tok, train_ds, eval_ds = tokenized
    out = tmp_path / "run"
    mine = out / "checkpoints" / "step-000002"
    mine.mkdir(parents=True)
    (mine / "my_notes.txt").write_text("mine")
    config = TrainConfig(output_dir=str(out), max_steps=2, batch_size=4, save_every=1, eval_every=0, n_samples=0,
                         progress=False, overwrite=True)
    model = qolora.prepare(chat_model_dir, 4, 4, device="cpu", progress=False)
    with pytest.raises(CkptError, match="qolora did not write it"):
        train(model, tok, train_ds, eval_ds, config)
    assert (mine / "my_notes.txt").read_text() == "mine"
