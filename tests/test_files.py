"""qolora.files: every writer's ``overwrite`` replaces only a folder qolora wrote (one rule, each writer).

A folder holding anything else (a git repository, a user's notes) is refused before any work, naming
what is there, and left untouched; so are the current folder and a folder that holds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qolora
from qolora import files
from qolora.errors import ConfigError


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
