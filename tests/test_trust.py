"""Trust (issue 9): nothing a user owns is deleted, no model folder's code runs, corrupt input is caught
before work with the file / tensor / record named, two runs never share a folder; and the newcomer's path.

Every case of the adversarial report has a test here, on tiny models (seconds each). Each failed before
the fixes: the comments name what happened then.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qolora
import qolora.cli.chat
import qolora.planning.plan
from qolora import AdapterConfig, AdapterError, CheckpointError, ConfigError, finetune, prepare
from qolora.cli.main import main
from qolora.data.tokens import DataError, load_records, tokenize_dataset
from qolora.files import FolderBusyError, folder_lock, remove_stale_temporaries
from tiny_chat import make_chat_model_dir, write_chat_jsonl
from tiny_tokenizer import make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


# ------------------------------------------------------------------------------------ helpers
def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the lock file aside), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != ".qolora.lock"}


def run_options(out: Path, **changes) -> dict:
    options = dict(output_dir=out, rank=4, max_length=64, eval_fraction=0.25, max_steps=2, batch_size=4, lr=1e-3,
                   eval_every=0, save_every=2, n_samples=1, max_new_tokens=2, progress=False,
                   adapter_options={"device": "cpu"})
    options.update(changes)
    return options


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("qolora: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    return make_chat_model_dir(root / "model"), write_chat_jsonl(root / "chat.jsonl", n=16)


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    """A finished tiny run folder (adapter, metrics, samples, a checkpoint); tests copy it."""
    model, data = tiny
    out = tmp_path_factory.mktemp("run") / "run"
    result = finetune(model, data, **run_options(out))
    return out, result


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    return out


@pytest.fixture
def no_prepare(monkeypatch):
    """Fail the test if the model would be loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("prepare() was called: the problem should have been caught before the model loads")

    monkeypatch.setattr(importlib.import_module("qolora.training.finetune"), "prepare_checked", refuse)


# ======================================================================== 1-2: nothing user-owned is deleted
def test_user_file_in_checkpoints_survives_a_first_run(tiny, tmp_path):
    # before: check_output_dir saw no step-* folder, _clear_run deleted OUT/checkpoints wholesale
    model, data = tiny
    out = tmp_path / "P"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "model_epoch3.pt").write_text("x")
    finetune(model, data, **run_options(out))
    assert (out / "checkpoints" / "model_epoch3.pt").read_text() == "x"
    assert (out / "checkpoints" / "step-000002").is_dir()


def test_overwrite_deletes_only_what_qolora_wrote(tiny, run_copy):
    model, data = tiny
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


def test_a_user_file_in_the_adapter_folder_is_refused_before_work(tiny, run_copy, no_prepare):
    # before: clear_run left it, then the final save_adapter(overwrite=True) swapped the folder out and deleted it
    model, data = tiny
    (run_copy / "adapter" / "my_notes.txt").write_text("keep")
    before = tree_hashes(run_copy)
    with pytest.raises(ConfigError, match="my_notes.txt"):
        finetune(model, data, **run_options(run_copy, overwrite=True))
    assert tree_hashes(run_copy) == before


def test_resume_without_a_checkpoint_refuses_and_keeps_everything(tiny, run_copy, capsys):
    # before: only a warning "starting from scratch", then OUT/adapter, metrics and samples were deleted
    model, data = tiny
    shutil.rmtree(run_copy / "checkpoints")
    before = tree_hashes(run_copy)
    assert main(["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(run_copy),
                 "--resume", "--no-progress"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "no checkpoint" in line and "--overwrite" in line and "nothing was changed" in line
    assert tree_hashes(run_copy) == before


def test_cli_errors_name_the_flags(tiny, run_copy, capsys):
    model, data = tiny
    assert main(["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(run_copy)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--resume" in line and "--overwrite" in line


# ======================================================================== 3: no model folder's code runs
EVIL_PY = """
import pathlib
pathlib.Path({marker!r}).write_text("the model folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "qolora_evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def make_evil_folder(tiny_model: Path, path: Path, marker: Path, model_type: str = "qolora_evil") -> Path:
    """A copy of the tiny model whose config and tokenizer ask for the folder's own code (auto_map)."""
    shutil.copytree(tiny_model, path)
    (path / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (path / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return path


@pytest.mark.parametrize("entry", ["prepare", "finetune", "plan", "cli-plan", "load", "merge", "chat"])
def test_a_folder_asking_for_its_own_code_is_refused_and_never_run(tiny, finished_run, tmp_path, capsys, entry):
    # before: no trust_remote_code=False; on a terminal transformers asked "[y/N]" and 'y' ran evil.py
    model, data = tiny
    marker = tmp_path / "RAN"
    evil = make_evil_folder(model, tmp_path / "evil", marker)
    adapter = finished_run[0] / "adapter"
    calls = {
        "prepare": lambda: prepare(evil, 4, 4, device="cpu", progress=False),
        "finetune": lambda: finetune(evil, data, **run_options(tmp_path / "out")),
        "plan": lambda: qolora.planning.plan.plan(evil),
        "load": lambda: qolora.load(evil, adapter, progress=False),
        "merge": lambda: qolora.merge(evil, adapter, tmp_path / "merged", progress=False),
        "chat": lambda: qolora.cli.chat.load_chat_model(merged=evil),
    }
    if entry == "cli-plan":
        assert main(["plan", str(evil)]) == 2
        assert "auto_map" in error_line(capsys.readouterr().err)
    else:
        with pytest.raises(ConfigError, match="qolora_evil.*auto_map.*never runs code"):
            calls[entry]()
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


def test_known_architecture_with_auto_map_uses_builtin_classes(tiny, tmp_path):
    model, data = tiny
    marker = tmp_path / "RAN"
    evil = make_evil_folder(model, tmp_path / "evil", marker, model_type="llama")
    net = prepare(evil, 4, 4, device="cpu", progress=False)
    assert type(net).__name__ == "LlamaForCausalLM"
    tokenizer = importlib.import_module("qolora.data.tokens").load_tokenizer(evil)
    assert type(tokenizer).__name__ != "EvilTokenizer"
    assert not marker.exists()


# ======================================================================== 4: corrupt base weights
def corrupted(tiny_model: Path, path: Path, change) -> Path:
    """A copy of the tiny model whose model.safetensors ``change(tensors)`` rewrote."""
    shutil.copytree(tiny_model, path)
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _nan_at(key, value=math.nan):
    def change(t):
        t[key] = t[key].clone()
        t[key].view(-1)[7] = value
    return change


CORRUPTIONS = {
    # before: a matmul error at the first forward, after the whole prepare
    "shape": (lambda t: t.__setitem__(Q_PROJ, t[Q_PROJ][:, :32].contiguous()), rf"{Q_PROJ}.*shape \(64, 32\)"),
    # before: the layer's factors silently became NaN, the report said "error nan"
    "nan-weight": (_nan_at(Q_PROJ), rf"{Q_PROJ}.*NaN/inf"),
    "inf-weight": (_nan_at(Q_PROJ, math.inf), rf"{Q_PROJ}.*NaN/inf"),
    "nan-embedding": (_nan_at(EMBED), rf"{EMBED}.*NaN/inf"),
    # before: IndexError "too many indices"
    "1d-linear": (lambda t: t.__setitem__(Q_PROJ, t[Q_PROJ].reshape(-1).contiguous()), rf"{Q_PROJ}.*shape \(4096,\)"),
    "norm-shape": (lambda t: t.__setitem__("model.norm.weight", torch.ones(3)), r"model\.norm\.weight.*shape"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_weights_are_refused_with_tensor_and_file(tiny, tmp_path, kind):
    model, _ = tiny
    change, message = CORRUPTIONS[kind]
    bad = corrupted(model, tmp_path / kind, change)
    with pytest.raises(ConfigError, match=message) as err:
        prepare(bad, 4, 4, device="cpu", progress=False)
    assert "model.safetensors" in str(err.value)


def test_corrupt_base_is_refused_by_load_and_merge(tiny, finished_run, tmp_path):
    model, _ = tiny
    bad = corrupted(model, tmp_path / "bad", _nan_at(Q_PROJ))
    adapter = finished_run[0] / "adapter"
    with pytest.raises(ConfigError, match="NaN/inf"):
        qolora.load(bad, adapter, progress=False)
    with pytest.raises(ConfigError, match="NaN/inf"):
        qolora.merge(bad, adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.*"))


def _flip_data_to_inf(path: Path) -> None:
    """Overwrite 4 bytes of the first float32 tensor's data with +inf (bytes flipped on disk)."""
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + header])
    key = next(k for k, v in meta.items() if k != "__metadata__" and v["dtype"] == "F32")
    start = 8 + header + meta[key]["data_offsets"][0]
    raw[start:start + 4] = (0x7F800000).to_bytes(4, "little")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, message", [
    # before: "incomplete metadata" without the file's name
    ("truncate", r"weight file .*model\.safetensors is damaged"),
    ("header", r"weight file .*model\.safetensors is damaged"),
    # before: no error at all
    ("flip-to-inf", r"NaN/inf"),
])
def test_damaged_safetensors_files_are_named(tiny, tmp_path, damage, message):
    model, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    file = bad / "model.safetensors"
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif damage == "header":
        raw = bytearray(file.read_bytes())
        raw[10:30] = b"\xff" * 20
        file.write_bytes(bytes(raw))
    else:
        _flip_data_to_inf(file)
    with pytest.raises(ConfigError, match=message):
        prepare(bad, 4, 4, device="cpu", progress=False)


def _sharded(tiny_model: Path, path: Path, weight_map) -> Path:
    shutil.copytree(tiny_model, path)
    shutil.move(path / "model.safetensors", path / "model-00001-of-00001.safetensors")
    text = weight_map if isinstance(weight_map, str) else json.dumps({"metadata": {}, "weight_map": weight_map})
    (path / "model.safetensors.index.json").write_text(text)
    return path


@pytest.mark.parametrize("index, message", [
    ("{ not json", "is not a valid index"),  # before: a raw JSONDecodeError
    ('{"weight_map": [1, 2]}', "is not a valid index"),
    ('["a"]', "is not a valid index"),
    ({EMBED: "../../x.safetensors"}, "points outside the model folder"),  # before: followed
    ({EMBED: "/etc/passwd"}, "points outside the model folder"),
    ({EMBED: "missing-shard.safetensors"}, "are missing"),
])
def test_bad_index_files_are_refused_before_any_weight(tiny, tmp_path, index, message):
    model, _ = tiny
    bad = _sharded(model, tmp_path / "bad", index)
    with pytest.raises(ConfigError, match=message):
        qolora.base.reader.BaseCheckpoint.open(bad)


def test_merge_progress_bar_has_a_total(tiny):
    model, _ = tiny
    checkpoint = qolora.base.reader.BaseCheckpoint.open(model)
    assert checkpoint.tensor_count() == len(load_file(str(model / "model.safetensors")))


# ======================================================================== 5: two runs never share a folder
def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from qolora.files import folder_lock\n"
            f"with folder_lock({str(folder)!r}):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_busy_folder_is_refused(tiny, run_copy, capsys):
    # before: each run's stale-temporary cleanup deleted the other's live files; two resumes both trained
    model, data = tiny
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


def test_stale_temporaries_go_only_when_old(tmp_path):
    live = tmp_path / ".step-000001.tmp-abc"
    old = tmp_path / ".step-000002.tmp-def"
    for path in (live, old):
        path.mkdir()
        (path / "state.json").write_text("{}")
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    assert remove_stale_temporaries(tmp_path, "step-*", pattern=True) == [old]
    assert (live / "state.json").is_file()


def test_temporaries_left_by_kills_are_cleaned_by_later_runs(tiny, finished_run, tmp_path):
    # before: .merged.tmp-* and .adapter.old-* stayed forever
    model, _ = tiny
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


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_adapter_and_merged_folders_follow_the_umask(tiny, finished_run, tmp_path, umask):
    # before: OUT/adapter and merged folders were 0700 (tempfile.mkdtemp), checkpoints followed the umask
    model, _ = tiny
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


# ======================================================================== options and adapters
@pytest.mark.parametrize("options, message", [
    ({"seed": "x"}, "seed='x'"),  # before: TypeError
    ({"seed": 1.5}, "seed=1.5"),
    ({"alpha": math.inf}, "alpha=inf"),  # before: accepted
    ({"alpha": math.nan}, "alpha=nan"),
])
def test_bad_adapter_options_are_config_errors(tiny, options, message, no_prepare, tmp_path):
    model, data = tiny
    with pytest.raises(ConfigError, match=message):
        AdapterConfig(bits=4, rank=4, **options).validate()
    with pytest.raises(ConfigError, match=message):
        prepare(model, 4, 4, progress=False, **options)
    with pytest.raises(ConfigError, match=message):
        finetune(model, data, **run_options(tmp_path / "o", adapter_options={"device": "cpu", **options}))


def test_cli_alpha_inf_is_one_line(tiny, tmp_path, capsys):
    model, data = tiny
    assert main(["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "o"),
                 "--alpha", "inf"]) == 2
    assert "alpha=inf" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def _rewrite_config(adapter: Path, change) -> None:
    path = adapter / "qolora_config.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_load_refuses_a_nan_adapter(tiny, finished_run, tmp_path):
    # before: merge and export refused it, qolora.load did not
    model, _ = tiny
    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run[0] / "adapter", adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = sorted(weights)[0]
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = math.nan
    save_file(weights, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    digest = qolora.files.sha256_file(adapter / "adapter_model.safetensors")  # a consistent tamper

    _rewrite_config(adapter, lambda m: m["files"].__setitem__("adapter_model.safetensors", digest))
    with pytest.raises(AdapterError, match="NaN|inf"):
        qolora.load(model, adapter, progress=False)


def test_deleting_the_checksums_is_refused(tiny, finished_run, tmp_path):
    # before: deleting "files" switched the checksum check off
    model, _ = tiny
    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run[0] / "adapter", adapter)
    _rewrite_config(adapter, lambda m: m.pop("files"))
    with pytest.raises(AdapterError, match="files"):
        qolora.read_adapter(adapter)
    with pytest.raises(AdapterError, match="files"):
        qolora.load(model, adapter, progress=False)


@pytest.mark.parametrize("where", ["inside-adapter", "is-adapter", "inside-base"])
def test_merge_into_the_adapter_or_base_is_refused(tiny, finished_run, tmp_path, where):
    model, _ = tiny
    adapter = tmp_path / "adapter"
    base = tmp_path / "base"
    shutil.copytree(finished_run[0] / "adapter", adapter)
    shutil.copytree(model, base)
    out = {"inside-adapter": adapter / "merged", "is-adapter": adapter, "inside-base": base / "merged"}[where]
    before = tree_hashes(tmp_path)
    with pytest.raises(ConfigError, match="is, holds or lies inside"):
        qolora.merge(base, adapter, out, overwrite=True, progress=False)
    assert tree_hashes(tmp_path) == before


# ======================================================================== data
@pytest.mark.parametrize("name, content, message", [
    # before: UnicodeDecodeError without the file
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin1\.jsonl is not UTF-8.*line 2"),
    ("latin1.txt", b"hello\n\ncaf\xe9 au lait\n", r"latin1\.txt is not UTF-8.*line 3"),
    ("latin1.csv", b"text\nok\ncaf\xe9\n", r"latin1\.csv is not UTF-8.*line 3"),
    # before: datasets' generic "An error occurred while generating the dataset"
    ("malformed.jsonl", b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', r"malformed\.jsonl.*line 2 is not valid JSON"),
    ("list-line.jsonl", b'{"text": "a"}\n[1, 2]\n', r"list-line\.jsonl.*line 2 is a JSON list"),
])
def test_unreadable_data_files_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_utf8_check_handles_characters_across_chunks(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("é" * 5000, encoding="utf-8")
    qolora.data.records._check_utf8(path, chunk_size=1001)  # odd chunks split the 2-byte characters


@pytest.mark.parametrize("records, message", [
    # before: transformers' "Cannot apply chat template to an empty conversation"
    ([{"messages": []}], r"chat\.jsonl: record 1: the conversation is empty"),
    ([{"messages": [{"role": "wizard", "content": "x"}]}], r"chat\.jsonl: record 1: unknown message role"),
])
def test_bad_records_name_file_and_record(tiny, tmp_path, records, message, no_prepare):
    model, _ = tiny
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, *records, good, good]))
    with pytest.raises(DataError, match=message):
        finetune(model, data, **run_options(tmp_path / "o"))


def test_chat_template_errors_name_the_record(tmp_path):
    tok = make_tiny_tokenizer()
    tok.chat_template = "{{ raise_exception('no system messages') if messages[0]['role'] == 'system' else 'x' }}"
    ds = __import__("datasets").Dataset.from_list([{"messages": [{"role": "system", "content": "s"},
                                                                 {"role": "user", "content": "u"}]}])
    with pytest.raises(DataError, match="record 0: the chat template cannot render it.*no system messages"):
        tokenize_dataset(ds, tok, max_length=32)


@pytest.mark.parametrize("edit, message", [
    # before: KeyError 'index' at resume, while `qolora info` printed "verified"
    (lambda s: s["data_position"].pop("index"), "has data_position="),
    (lambda s: s.pop("history"), "lacks the list 'history'"),
    (lambda s: s.__setitem__("step", "two"), "has step='two'"),
])
def test_hand_edited_state_json_is_refused_before_the_model(tiny, run_copy, edit, message, no_prepare, capsys):
    model, data = tiny
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


def test_mismatched_checkpoint_is_refused_before_the_model(tiny, run_copy, no_prepare):
    # before: refused only after prepare (10-17 s on the default model)
    model, data = tiny
    with pytest.raises(CheckpointError, match="training options differ"):
        finetune(model, data, resume=True, **run_options(run_copy, batch_size=2))
    with pytest.raises(CheckpointError, match="another adapter setup"):
        finetune(model, data, resume=True, **run_options(run_copy, rank=8))


def test_a_10mb_record_is_cut_before_tokenizing(tmp_path):
    # before: tokenized in full (~90 s on the default model) and then truncated
    tok = make_tiny_tokenizer()
    answer = "The capital of France is Paris. " * 330_000  # ~10 MB
    records = [{"messages": [{"role": "user", "content": "What is the capital of France?"},
                             {"role": "assistant", "content": answer}]}]
    ds = __import__("datasets").Dataset.from_list(records)
    start = time.perf_counter()
    out, stats = tokenize_dataset(ds, tok, max_length=128)
    assert time.perf_counter() - start < 5
    assert stats.n_truncated == 1 and len(out[0]["input_ids"]) == 128
    # exactly what tokenizing the whole text and then truncating gives (checked on a 200 kB record)
    question = records[0]["messages"][0]
    small = __import__("datasets").Dataset.from_list(
        [{"messages": [question, {"role": "assistant", "content": answer[:200_000]}]}])
    cut, _ = tokenize_dataset(small, tok, max_length=128)
    data_module = importlib.import_module("qolora.data.tokens")
    saved = data_module._CHARS_PER_TOKEN
    data_module._CHARS_PER_TOKEN = 10**9  # no cut: the whole text
    try:
        whole, _ = tokenize_dataset(small, tok, max_length=128)
    finally:
        data_module._CHARS_PER_TOKEN = saved
    assert cut[0] == whole[0] == out[0]


def test_a_text_record_is_cut_too_and_short_ones_untouched(tmp_path):
    tok = make_tiny_tokenizer()
    ds = __import__("datasets").Dataset.from_list([{"text": "Hello, how are you today? " * 200_000},
                                                   {"text": "Short."}])
    out, stats = tokenize_dataset(ds, tok, max_length=64)
    assert stats.n_truncated == 1 and len(out[0]["input_ids"]) == 64
    assert out[1]["input_ids"] == tok("Short." + tok.eos_token)["input_ids"]


# ======================================================================== the newcomer's path
def test_one_labelled_final_loss(finished_run):
    out, result = finished_run
    trains = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert result.final_train_loss == pytest.approx(trains[-1]["loss"])
    assert f"train loss {trains[-1]['loss']:.4f} (mean of steps 2-2)" not in result.summary()  # one step: "step 2"
    assert f"train loss {trains[-1]['loss']:.4f} (mean of step 2)" in result.summary()
    assert "last train loss" not in result.summary()


def test_log_shows_data_stats_readably(tiny, tmp_path, caplog, no_prepare):
    model, data = tiny
    with caplog.at_level(logging.INFO, logger="qolora"), pytest.raises(AssertionError, match="prepare"):
        finetune(model, data, **run_options(tmp_path / "o"))
    text = caplog.text
    assert "DataStats(" not in text and "examples, " in text and " tokens, " in text


SMOL_LIKE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named Tiny<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_samples_say_where_a_template_system_prompt_comes_from(tmp_path):
    from qolora.training.reporting import sample_prompts, template_system_prompt, write_samples

    tok = make_tiny_tokenizer()
    assert template_system_prompt(tok) is None
    tok.chat_template = SMOL_LIKE_TEMPLATE
    assert template_system_prompt(tok) == "You are a helpful AI assistant named Tiny"
    ds = __import__("datasets").Dataset.from_list([
        {"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
                      {"role": "assistant", "content": "Because."}]}])
    tokenized, _ = tokenize_dataset(ds, tok, max_length=64)
    samples = sample_prompts(tokenized, tok, 2)
    assert samples[0]["system_from_template"] == "You are a helpful AI assistant named Tiny"
    assert samples[1]["system_from_template"] is None  # the record's own system message
    write_samples(tmp_path / "samples.json", tmp_path / "samples.md",
                  [{**s, "before": "a", "after": "b"} for s in samples])
    assert "is the chat template's default" in (tmp_path / "samples.md").read_text()


def test_the_thread_policy_applies_to_python_users(tiny, monkeypatch):
    threads = importlib.import_module("qolora.devices")
    model, _ = tiny
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    monkeypatch.setattr(threads, "_DEFAULT_THREADS", 2)
    monkeypatch.setattr(threads, "_chosen", False)
    torch.set_num_threads(2)
    try:
        prepare(model, 4, 4, device="cpu", progress=False)
        assert torch.get_num_threads() == 1  # busy CPU: one thread, without the CLI
        threads.set_threads(2)  # an explicit choice is kept
        prepare(model, 4, 4, device="cpu", progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    with pytest.raises(ConfigError, match="--threads"):
        threads.set_threads(0)


def test_info_understands_a_merged_folder(tiny, finished_run, tmp_path, capsys):
    model, _ = tiny
    merged = tmp_path / "merged"
    assert main(["merge", str(model), str(finished_run[0] / "adapter"), str(merged), "--dtype", "fp32",
                 "--no-progress"]) == 0
    assert main(["info", str(merged)]) == 0
    assert "merged checkpoint" in capsys.readouterr().out


def test_a_resumed_run_removes_the_temporaries_a_killed_run_left(tiny, run_copy, caplog):
    left = [run_copy / "checkpoints" / ".step-000099.tmp-abc123", run_copy / ".adapter.tmp-def456"]
    for path in left:
        path.mkdir()  # fresh: younger than the 6 h after which anyone may remove them
    (left[0] / "adapter.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.INFO, logger="qolora.training.run_folder"):
        finetune(tiny[0], tiny[1], **run_options(run_copy), resume=True)
    assert not any(p.exists() for p in left)
    assert "left by an interrupted run" in caplog.text


def test_resume_of_a_folder_that_does_not_exist_says_it_starts_anew(tiny, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qolora.training.run_folder"):
        finetune(tiny[0], tiny[1], **run_options(tmp_path / "new"), resume=True)
    assert "does not exist: starting a new run there" in caplog.text


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


def test_base_mismatch_names_the_merge_flag(finished_run, tmp_path, capsys):
    from tiny_models import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", seed=7)  # the same shapes, other weights
    adapter = str(finished_run[0] / "adapter")
    assert main(["merge", str(other), adapter, str(tmp_path / "m"), "--no-progress"]) == 2
    assert "--allow-base-mismatch" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "m").exists()
    assert main(["merge", str(other), adapter, str(tmp_path / "m"), "--no-progress", "--allow-base-mismatch"]) == 0


def test_gitignore_lists_the_default_output_folder():
    assert "qolora-output/" in (REPO / ".gitignore").read_text().split()


# ======================================================================== qolora chat
@pytest.fixture(scope="module")
def trained_adapter(finished_run):
    return finished_run[0] / "adapter"


def test_chat_on_an_adapter_answers_like_the_loaded_model(tiny, trained_adapter):
    from qolora.cli.chat import load_chat_model, prompt_tensor, reply

    model, _ = tiny
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    loaded = qolora.load(model, trained_adapter, progress=False)
    tok = importlib.import_module("qolora.data.tokens").load_tokenizer(model)
    ids = prompt_tensor(tok, messages, torch.device("cpu"))
    expected = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                               do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    expected = tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()

    fast, tokenizer = load_chat_model(adapter=trained_adapter, progress=False)  # base: recorded in the adapter
    assert not any(isinstance(m, qolora.AdapterLinear) for m in fast.modules())
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, loaded(ids).logits, atol=1e-4, rtol=1e-4)
    pieces = []
    assert reply(fast, tokenizer, messages, max_new_tokens=12, stream=pieces.append) == expected
    assert "".join(pieces).strip() == expected
    slow, _ = load_chat_model(adapter=trained_adapter, base=model, dequantize=False, progress=False)
    assert reply(slow, tokenizer, messages, max_new_tokens=12) == expected


def test_cli_chat_one_prompt_interactive_and_merged(tiny, trained_adapter, tmp_path, capsys, monkeypatch):
    import io

    from qolora.cli.chat import load_chat_model, reply

    model, _ = tiny
    fast, tok = load_chat_model(adapter=trained_adapter, progress=False)
    expected = reply(fast, tok, [{"role": "user", "content": "Hello?"}], max_new_tokens=8)
    assert main(["chat", "--adapter", str(trained_adapter), "--prompt", "Hello?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected

    merged = tmp_path / "merged"
    qolora.merge(model, trained_adapter, merged, dtype="fp32", progress=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello?\nWho wrote Hamlet?\n\nignored\n"))
    assert main(["chat", "--merged", str(merged), "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].strip() == expected and len(lines) == 2  # two answers; the empty line ended the chat


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of --adapter DIR and --merged DIR"),
    (["--adapter", "A", "--merged", "M"], "exactly one of"),
    (["--adapter", "/nonexistent/adapter"], "does not exist"),
    (["--merged", "/nonexistent/merged"], "does not exist"),
    (["--adapter", "A", "--max-new-tokens", "0"], "--max-new-tokens=0"),
])
def test_cli_chat_errors_are_one_line(args, message, capsys):
    assert main(["chat", *args]) == 2
    assert message in error_line(capsys.readouterr().err)


# ======================================================================== the adversarial script
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


# ------------------------------------------------------------------- found in review (0.2.0)
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


def test_resume_from_a_trainer_checkpoint_of_another_adapter_setup_is_refused(tmp_path, tiny_llama_dir):
    """hf_compat.load_adapter_weights compares the adapter setup, not only the factors (OLoRA's
    factors do not depend on alpha, so the factors alone cannot tell)."""
    from qolora.model.adapter_folder import AdapterError
    from qolora.model.hf_compat import load_adapter_weights

    first = qolora.prepare(tiny_llama_dir, bits=4, rank=4, alpha=4, device="cpu", progress=False)
    first.save_pretrained(tmp_path / "ck")
    other = qolora.prepare(tiny_llama_dir, bits=4, rank=4, alpha=16, device="cpu", progress=False)
    with pytest.raises(AdapterError, match=r"alpha=4 there, 16 here"):
        load_adapter_weights(other, tmp_path / "ck")
    load_adapter_weights(qolora.prepare(tiny_llama_dir, bits=4, rank=4, alpha=4, device="cpu", progress=False),
                         tmp_path / "ck")


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
