"""qolora.files: every writer's ``overwrite`` replaces only a folder qolora wrote (one rule, each writer).

A folder holding anything else (a git repository, a user's notes) is refused before any work, naming
what is there, and left untouched; so are the current folder and a folder that holds it. A killed writer's
temporaries are removed by a later one once they are old (only its own, only old ones), a failed swap keeps
the old folder, and what the writers make follows the umask.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qolora
from qolora import files
from qolora.errors import ConfigError
from qolora.files import remove_stale_temporaries


def _user_folder(path: Path) -> dict[str, str]:
    """A folder a user owns: a git repository with src/ and data/ (returns its files and contents)."""
    content = {".git/HEAD": "ref: refs/heads/main\n", "src/main.py": "print('mine')\n", "data/a.csv": "1,2\n",
               "notes.txt": "keep me"}
    for name, text in content.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return content


def _unchanged(path: Path, content: dict[str, str]) -> bool:
    return all((path / name).read_text() == text for name, text in content.items())


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory):
    model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, device="cpu", progress=False)
    return qolora.save_adapter(model, tmp_path_factory.mktemp("a") / "adapter"), model


def test_merge_overwrite_refuses_a_users_folder_and_leaves_it_whole(tiny_llama_dir, adapter, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    content = _user_folder(out)
    with pytest.raises(ConfigError, match=r"\.git, data, notes\.txt, src.*no qolora_merge\.json.*nothing was changed"):
        qolora.merge(tiny_llama_dir, adapter[0], out, overwrite=True, progress=False)
    assert _unchanged(out, content)


def test_merge_cli_overwrite_refuses_a_users_folder(tiny_llama_dir, adapter, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    content = _user_folder(out)
    proc = subprocess.run([sys.executable, "-m", "qolora.cli", "merge", str(tiny_llama_dir), str(adapter[0]), str(out),
                           "--overwrite", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "no qolora_merge.json" in proc.stderr, proc.stderr[-2000:]
    assert _unchanged(out, content)


def test_save_adapter_and_export_lora_overwrite_refuse_foreign_files(adapter, tmp_path):
    folder, model = adapter
    out = qolora.save_adapter(model, tmp_path / "mine")
    (out / "notes.txt").write_text("keep me")
    (out / "sub").mkdir()
    (out / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(ConfigError, match=r"holds notes\.txt, sub: qolora's adapter folder does not write them"):
        qolora.save_adapter(model, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "sub" / "data.csv").is_file()

    exported = qolora.export_lora(folder, tmp_path / "peft")
    (tmp_path / "peft" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="notes.txt"):
        qolora.export_lora(folder, tmp_path / "peft", overwrite=True)
    assert (tmp_path / "peft" / "notes.txt").read_text() == "keep me" and exported


def test_overwrite_replaces_a_folder_qolora_wrote(tiny_llama_dir, adapter, tmp_path):
    folder, model = adapter
    out = qolora.save_adapter(model, tmp_path / "mine")
    before = (out / "adapter_model.safetensors").stat().st_mtime_ns
    qolora.save_adapter(model, out, overwrite=True)
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns >= before
    merged = tmp_path / "merged"
    qolora.merge(tiny_llama_dir, folder, merged, progress=False)
    qolora.merge(tiny_llama_dir, folder, merged, overwrite=True, progress=False)  # its own folder: replaced
    qolora.export_lora(folder, tmp_path / "peft")
    qolora.export_lora(folder, tmp_path / "peft", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_an_empty_folder_may_be_overwritten_but_not_the_current_one(adapter, tmp_path, monkeypatch):
    _, model = adapter
    (tmp_path / "empty").mkdir()
    qolora.save_adapter(model, tmp_path / "empty", overwrite=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for target in (".", ".."):
        with pytest.raises(ConfigError, match="is the current folder or holds it"):
            qolora.save_adapter(model, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "work"]


def test_a_synthetic_checkpoint_overwrites_only_its_own_folder(tmp_path):
    from qolora.base.synthetic import SyntheticCheckpoint

    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64}
    synthetic = SyntheticCheckpoint(config, dtype=torch.float32)
    out = synthetic.write(tmp_path / "synthetic")
    synthetic.write(out, overwrite=True)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="notes.txt"):
        synthetic.write(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_folder_kind_names_what_is_foreign(tmp_path):
    kind = files.FolderKind("thing", "record.json", ("record.json", "w-*.bin"))
    (tmp_path / "record.json").write_text("{}")
    (tmp_path / "w-1.bin").write_text("")
    assert kind.foreign(tmp_path) == []
    (tmp_path / "w-dir.bin").mkdir()  # a folder is never a writer's file
    (tmp_path / "other").write_text("")
    assert kind.foreign(tmp_path) == ["other", "w-dir.bin"]
    (tmp_path / "record.json").unlink()
    assert kind.foreign(tmp_path) == ["other", "w-1.bin", "w-dir.bin"]


# --------------------------------------------------------------------------------- temporaries, the swap, permissions
def test_stale_temporaries_go_only_when_old(tmp_path):
    live = tmp_path / ".step-000001.tmp-abc"
    old = tmp_path / ".step-000002.tmp-def"
    for path in (live, old):
        path.mkdir()
        (path / "state.json").write_text("{}")
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    assert remove_stale_temporaries(tmp_path, "step-*", pattern=True) == [old]
    assert (live / "state.json").is_file()


def test_stale_temporaries_of_a_name_with_glob_characters_touch_only_their_own(tmp_path):
    import os
    import time

    from qolora.files import remove_stale_temporaries

    old = time.time() - 10 * 24 * 3600
    for name in (".run1.tmp-abc", ".run[1].tmp-abc"):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (old, old))
    removed = remove_stale_temporaries(tmp_path, "run[1]")
    assert [p.name for p in removed] == [".run[1].tmp-abc"] and (tmp_path / ".run1.tmp-abc").exists()


def test_temporaries_left_by_kills_are_cleaned_by_later_runs(tiny_inputs, finished_run, tmp_path):
    # before: .merged.tmp-* and .adapter.old-* stayed forever
    model, _ = tiny_inputs
    adapter = finished_run[0] / "adapter"
    old_stamp = (time.time() - 7 * 3600,) * 2
    leftovers = [tmp_path / ".merged.tmp-k1", tmp_path / ".merged.old-k2", tmp_path / ".adapter.old-k3",
                 tmp_path / ".adapter.tmp-k4"]
    fresh = tmp_path / ".merged.tmp-live"
    for path in leftovers + [fresh]:
        path.mkdir()
        (path / "x").write_text("x")
        if path is not fresh:
            os.utime(path, old_stamp)
    qolora.merge(model, adapter, tmp_path / "merged", dtype="fp32", progress=False)
    net = qolora.load(model, adapter, progress=False)
    qolora.save_adapter(net, tmp_path / "adapter")
    assert not any(p.exists() for p in leftovers)
    assert (fresh / "x").is_file()


def test_atomic_dir_keeps_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    from qolora import files

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    kind = files.FolderKind("test folder", "old.txt", ("old.txt", "new.txt"))
    real, calls = files.os.replace, []

    def failing(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place
            raise OSError("simulated")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OSError, match="simulated"), files.atomic_dir(target, overwrite=True, kind=kind) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.setattr(files.os, "replace", real)
    assert (target / "old.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_adapter_and_merged_folders_follow_the_umask(tiny_inputs, finished_run, tmp_path, umask):
    # before: OUT/adapter and merged folders were 0700 (tempfile.mkdtemp), checkpoints followed the umask
    model, _ = tiny_inputs
    adapter = finished_run[0] / "adapter"
    previous = os.umask(umask)
    try:
        net = qolora.load(model, adapter, progress=False)
        saved = qolora.save_adapter(net, tmp_path / "adapter")
        merged = Path(qolora.merge(model, adapter, tmp_path / "merged", dtype="fp32", progress=False)["out_dir"])
    finally:
        os.umask(previous)
    for folder in (saved, merged):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
        for file in folder.iterdir():
            assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file
