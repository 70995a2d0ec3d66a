#!/usr/bin/env python
"""Adversarial run: hundreds of bad inputs and faults against qolora, on tiny models in a temp folder.

Tried as a hostile or clumsy user would: every bad option value through the library and the command
line, every kind of broken data file, every corruption of a base checkpoint through each entry point
that reads one (prepare, finetune, load, merge, chat), tampered adapters, output folders that hold
someone else's files, a folder busy with another run (a real second process holding its lock),
hand-edited checkpoints, merges into the inputs, every writer's overwrite aimed at a user's own
folder, hostile config.json sizes through the planner and prepare, and bytes on qolora chat's
standard input that are not UTF-8 (there the right answer is to skip the line and go on).

A case *passes* when it ends in one clear qolora error (ConfigError, DataError, AdapterError,
CheckpointError, FolderBusyError; on the command line: exit code 2 and one ``qolora: error:`` line,
or argparse's one ``error:`` line naming the flag), and, for the cases that must be caught before the
model loads, without the model having been prepared. *Nothing lost* means every file that existed
before (the user's sentinel files placed in run folders, the model, the data, the adapter, and each
case's own inputs) is still there with the same sha256 afterwards.

    python scripts/adversarial.py            # prints: tried N / passed P / nothing lost: yes|no
    python scripts/adversarial.py --limit 2  # at most 2 cases per group (the fast test runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for entry in (str(REPO), str(REPO / "tests")):
    if entry not in sys.path:
        sys.path.insert(0, entry)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import qolora  # noqa: E402
import qolora.cli.chat  # noqa: E402
from qolora import AdapterError, CheckpointError, ConfigError  # noqa: E402
from qolora.cli.commands import main as cli  # noqa: E402
from qolora.data.tokens import DataError  # noqa: E402
from qolora.files import FolderBusyError, sha256_file  # noqa: E402
from tiny_models import make_tiny_llama  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

CLEAR = (ConfigError, DataError, AdapterError, CheckpointError, FolderBusyError)
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"
QA = [("What is the capital of France?", "Paris."), ("Hello, how are you today?", "I am fine, thank you."),
      ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."), ("Tell me a joke.", "Why did the chicken cross?")]


@dataclass
class Case:
    group: str
    name: str
    run: Callable[[], object]  # raises (library) or returns an exit code (CLI)
    cli: bool = False
    before_model: bool = False  # must fail before qolora.prepare runs
    workspace: Path | None = None  # files this case must leave untouched
    succeeds: bool = False  # the right answer is to go on (a CLI exit code 0, no traceback), not an error


@dataclass
class Outcome:
    case: Case
    passed: bool
    detail: str


@dataclass
class World:
    root: Path
    model: Path
    data: Path
    adapter: Path
    run: Path
    sentinels: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ setup
def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _chat_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (QA[i % len(QA)] for i in range(n))]


def _small_run(model: Path, data: Path, out: Path, **changes) -> dict:
    options = dict(output_dir=out, rank=4, max_length=64, eval_fraction=0.25, max_steps=2, batch_size=4, lr=1e-3,
                   eval_every=0, save_every=2, n_samples=0, progress=False, adapter_options={"device": "cpu"})
    options.update(changes)
    return options


def build_world(root: Path) -> World:
    model = make_tiny_llama(root / "model")
    make_tiny_tokenizer(model)
    data = _jsonl(root / "chat.jsonl", _chat_records(16))
    run = root / "run"
    qolora.finetune(model, data, **_small_run(model, data, run))
    for rel, text in {"checkpoints/model_epoch3.pt": "user checkpoint", "notes.txt": "user notes"}.items():
        (run / rel).write_text(text)
    precious = root / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not lose")
    world = World(root, model, data, run / "adapter", run)
    world.sentinels = _hashes([model, data, run, precious])
    return world


def _hashes(paths) -> dict[str, str]:
    out = {}
    for path in paths:
        files = [path] if Path(path).is_file() else sorted(p for p in Path(path).rglob("*") if p.is_file())
        for file in files:
            if file.name != ".qolora.lock":
                out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return dst


# ---------------------------------------------------------------------------------- the cases
def option_cases(w: World, work: Path) -> list[Case]:
    """Each bad option value, through the library and through the command line."""
    bad = [  # (library option, value, CLI flag, CLI text)
        ("rank", 0, "--rank", "0"), ("rank", -3, "--rank", "-3"), ("rank", "x", "--rank", "x"),
        ("bits", 3, "--bits", "3"), ("alpha", math.inf, "--alpha", "inf"), ("alpha", math.nan, "--alpha", "nan"),
        ("alpha", -1.0, "--alpha", "-1"), ("init", "magic", "--init", "magic"),
        ("dropout", -0.1, "--dropout", "-0.1"), ("dropout", 1.5, "--dropout", "1.5"),
        ("device", "tpu", "--device", "tpu"), ("device", "cuda:7", "--device", "cuda:7"),
        ("lr", -1.0, "--lr", "-1"), ("lr", math.nan, "--lr", "nan"), ("lr", math.inf, "--lr", "inf"),
        ("max_steps", 0, "--max-steps", "0"), ("max_steps", -5, "--max-steps", "-5"),
        ("batch_size", 0, "--batch-size", "0"), ("grad_accum", 0, "--grad-accum", "0"),
        ("eval_fraction", 0.0, "--eval-fraction", "0"), ("eval_fraction", 1.0, "--eval-fraction", "1"),
        ("eval_fraction", -0.2, "--eval-fraction", "-0.2"), ("max_length", 1, "--max-length", "1"),
        ("warmup_steps", 999, "--warmup-steps", "999"), ("optim", "sgd", "--optim", "sgd"),
        ("mixed_precision", "fp8", "--mixed-precision", "fp8"),
        ("mixed_precision", "fp16", "--mixed-precision", "fp16"),
        ("keep_last", 0, "--keep-last", "0"), ("log_every", 0, "--log-every", "0"),
        ("n_samples", -1, "--n-samples", "-1"), ("max_new_tokens", 0, "--max-new-tokens", "0"),
        ("format", "xml", "--format", "xml"), ("target_modules", ["nope_proj"], "--target-modules", "nope_proj"),
        ("min_lr_ratio", 2.0, "--min-lr-ratio", "2"), ("weight_decay", -1.0, "--weight-decay", "-1"),
        ("seed", "x", "--seed", "x"), ("seed", 1.5, "--seed", "1.5"), ("rank", 10**6, "--rank", "1000000"),
    ]
    adapter_keys = {"dropout", "device", "seed"}
    cases = []
    for i, (key, value, flag, text) in enumerate(bad):
        out = work / f"opt-{i}"

        def library(key=key, value=value, out=out):
            options = _small_run(w.model, w.data, out)
            if key in adapter_keys:
                options["adapter_options"] = {**options["adapter_options"], key: value}
            else:
                options[key] = value
            return qolora.finetune(w.model, w.data, **options)

        def command(flag=flag, text=text, out=out):
            return cli(["finetune", "--model", str(w.model), "--data", str(w.data), "--output-dir", str(out),
                        "--device", "cpu", "--max-steps", "2", "--no-progress", flag, text])

        # rank=10**6 and target_modules=nope are model facts: caught once the (meta) skeleton exists
        early = not (key == "rank" and value == 10**6 or key == "target_modules")
        cases += [Case("options", f"finetune {key}={value!r}", library, before_model=early),
                  Case("options", f"qolora finetune {flag} {text}", command, cli=True, before_model=early)]
    return cases


def data_cases(w: World, work: Path) -> list[Case]:
    """Broken data files, through the library and the command line."""
    files: dict[str, bytes | Callable[[Path], None]] = {
        "missing.jsonl": None,
        "empty.jsonl": b"",
        "blank.jsonl": b"\n \n\t\n",
        "latin1.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
        "latin1.txt": b"hello\n\ncaf\xe9\n",
        "latin1.csv": b"text\nok\ncaf\xe9\n",
        "malformed.jsonl": b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n',
        "list-line.jsonl": b'{"text": "a"}\n[1, 2]\n',
        "binary.jsonl": bytes(range(256)) * 4,
        "data.xml": b"<a/>",
        "noext": b'{"text": "a"}\n',
        "parquet-garbage.parquet": b"PAR1 not really",
        "wrong-columns.jsonl": b'{"question": "a", "reply": "b"}\n' * 4,
        "one-record.jsonl": json.dumps(_chat_records(1)[0]).encode() + b"\n",
        "empty-messages.jsonl": b'{"messages": []}\n' * 4,
        "unknown-role.jsonl": b'{"messages": [{"role": "wizard", "content": "x"}]}\n' * 4,
        "dict-content.jsonl": b'{"messages": [{"role": "user", "content": {"a": 1}}]}\n' * 4,
        "string-turn.jsonl": b'{"messages": ["hello"]}\n' * 4,
        "no-answer.jsonl": b'{"messages": [{"role": "user", "content": "hi"}]}\n' * 4,
        "null-messages.jsonl": b'{"messages": null}\n' * 4,
        "number-messages.jsonl": b'{"messages": 7}\n' * 4,
        "dataset-folder": lambda p: p.mkdir(),
    }
    cases = []
    for name, content in files.items():
        path = work / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif content is not None:
            path.write_bytes(content)
        out, out_cli = work / f"data-out-{name}", work / f"data-out-cli-{name}"
        cases += [
            Case("data", f"finetune data={name}",
                 lambda path=path, out=out: qolora.finetune(w.model, path, **_small_run(w.model, path, out)),
                 before_model=True, workspace=path.parent),
            Case("data", f"qolora finetune --data {name}",
                 lambda path=path, out=out_cli: cli(["finetune", "--model", str(w.model), "--data", str(path),
                                                     "--output-dir", str(out), "--device", "cpu", "--no-progress",
                                                     "--max-steps", "2", "--rank", "4", "--n-samples", "0"]),
                 cli=True, before_model=True, workspace=path.parent),
        ]
    return cases


def _rewrite(path: Path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _set(key, fn):
    return lambda t: t.__setitem__(key, fn(t[key]))


def _poke(value):
    def fn(x):
        x = x.clone()
        x.view(-1)[5] = value
        return x
    return fn


def _index(folder: Path, text: str) -> None:
    shutil.move(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(text)


def _config(folder: Path, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def base_corruptions() -> dict[str, Callable[[Path], None]]:
    st = "model.safetensors"
    return {
        "shape": lambda f: _rewrite(f / st, _set(Q_PROJ, lambda x: x[:, :32].contiguous())),
        "1d-linear": lambda f: _rewrite(f / st, _set(Q_PROJ, lambda x: x.reshape(-1).contiguous())),
        "nan-weight": lambda f: _rewrite(f / st, _set(Q_PROJ, _poke(math.nan))),
        "inf-weight": lambda f: _rewrite(f / st, _set(Q_PROJ, _poke(-math.inf))),
        "nan-embedding": lambda f: _rewrite(f / st, _set(EMBED, _poke(math.nan))),
        "nan-norm": lambda f: _rewrite(f / st, _set("model.norm.weight", _poke(math.nan))),
        "missing-tensor": lambda f: _rewrite(f / st, lambda t: t.pop(Q_PROJ)),
        "truncated": lambda f: (f / st).write_bytes((f / st).read_bytes()[:5000]),
        "header-garbage": lambda f: (f / st).write_bytes((f / st).read_bytes()[:8] + b"\xff" * 40
                                                         + (f / st).read_bytes()[48:]),
        "zero-bytes": lambda f: (f / st).write_bytes(b""),
        "index-garbage": lambda f: _index(f, "{ not json"),
        "index-list": lambda f: _index(f, "[1, 2]"),
        "index-outside": lambda f: _index(f, json.dumps({"weight_map": {EMBED: "../../x.safetensors"}})),
        "index-absolute": lambda f: _index(f, json.dumps({"weight_map": {EMBED: "/etc/passwd"}})),
        "index-missing-shard": lambda f: _index(f, json.dumps({"weight_map": {EMBED: "gone.safetensors"}})),
        "no-weights": lambda f: (f / st).unlink(),
        "no-config": lambda f: (f / "config.json").unlink(),
        "config-garbage": lambda f: (f / "config.json").write_text("{ nope"),
        "config-list": lambda f: (f / "config.json").write_text("[]"),
        "unknown-model-type": lambda f: _config(f, lambda c: c.update(model_type="qolora_unknown")),
        "remote-code": lambda f: (
            (f / "evil.py").write_text(f"open({str(f / 'RAN')!r}, 'w').write('ran')\n"),
            _config(f, lambda c: c.update(model_type="qolora_evil", auto_map={"AutoConfig": "evil.C"}))),
        "gptq": lambda f: _config(f, lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})),
        "bad-config-value": lambda f: _config(f, lambda c: c.update(num_attention_heads=7)),
    }


def base_cases(w: World, work: Path) -> list[Case]:
    """Each corruption of the base checkpoint through each entry point that reads one."""
    cases = []
    for name, corrupt in base_corruptions().items():
        folder = _copy(w.model, work / f"base-{name}")
        corrupt(folder)
        entries = {
            "prepare": lambda f=folder: qolora.prepare(f, 4, 4, device="cpu", progress=False),
            "finetune": lambda f=folder, n=name: qolora.finetune(f, w.data, **_small_run(f, w.data, work / f"ft-{n}")),
            "load": lambda f=folder: qolora.load(f, w.adapter, progress=False),
            "merge": lambda f=folder, n=name: qolora.merge(f, w.adapter, work / f"merged-{n}", progress=False),
            "qolora chat": lambda f=folder: cli(["chat", "--adapter", str(w.adapter), "--base", str(f),
                                                 "--prompt", "hi", "--max-new-tokens", "2"]),
        }
        for entry, run in entries.items():
            cases.append(Case("base", f"{entry} on a base with {name}", run, cli=entry.startswith("qolora"),
                              workspace=folder))
    return cases


def adapter_tamperings(w: World) -> dict[str, Callable[[Path], None]]:
    def meta(change):
        def apply(folder):
            path = folder / "qolora_config.json"
            m = json.loads(path.read_text())
            change(m)
            path.write_text(json.dumps(m))
        return apply

    def nan_consistent(folder):
        _rewrite(folder / "adapter_model.safetensors",
                 lambda t: t.__setitem__(sorted(t)[0], _poke(math.nan)(t[sorted(t)[0]])))
        digest = sha256_file(folder / "adapter_model.safetensors")
        meta(lambda m: m["files"].__setitem__("adapter_model.safetensors", digest))(folder)

    return {
        "no-record": lambda f: (f / "qolora_config.json").unlink(),
        "record-garbage": lambda f: (f / "qolora_config.json").write_text("{ nope"),
        "files-deleted": meta(lambda m: m.pop("files")),
        "sha-removed": meta(lambda m: m["files"].pop("adapter_model.safetensors")),
        "weights-modified": lambda f: _rewrite(f / "adapter_model.safetensors",
                                               lambda t: t.__setitem__(sorted(t)[0], t[sorted(t)[0]] * 2)),
        "nan-consistent-sha": nan_consistent,
        "weights-missing": lambda f: (f / "adapter_model.safetensors").unlink(),
        "format-version": meta(lambda m: m.__setitem__("format_version", 99)),
        "layers-removed": meta(lambda m: m.__setitem__("layers", {})),
        "rank-changed": meta(lambda m: m["adapter_config"].__setitem__("rank", 8)),
        "bits-garbage": meta(lambda m: m["adapter_config"].__setitem__("bits", "four")),
    }


def adapter_cases(w: World, work: Path) -> list[Case]:
    """Each tampering of the adapter folder through each entry point that reads one."""
    cases = []
    other_base = make_tiny_llama(work / "other-base", seed=7)  # same shapes, other weights
    make_tiny_tokenizer(other_base)
    for name, tamper in adapter_tamperings(w).items():
        folder = _copy(w.adapter, work / f"adapter-{name}")
        tamper(folder)
        entries = {
            "load": lambda a=folder: qolora.load(w.model, a, progress=False),
            "merge": lambda a=folder, n=name: qolora.merge(w.model, a, work / f"am-{n}", progress=False),
            "export_lora": lambda a=folder, n=name: qolora.export_lora(a, work / f"ae-{n}", base=w.model),
            "qolora chat": lambda a=folder: cli(["chat", "--adapter", str(a), "--prompt", "hi"]),
        }
        for entry, run in entries.items():
            cases.append(Case("adapter", f"{entry} of an adapter with {name}", run, cli=entry.startswith("qolora"),
                              workspace=folder))
    for entry, run in {
        "load": lambda: qolora.load(other_base, w.adapter, progress=False),
        "merge": lambda: qolora.merge(other_base, w.adapter, work / "mismatch-merged", progress=False),
        "qolora chat": lambda: cli(["chat", "--adapter", str(w.adapter), "--base", str(other_base), "--prompt", "hi"]),
    }.items():
        cases.append(Case("adapter", f"{entry} onto another base", run, cli=entry.startswith("qolora")))
    return cases


def merge_target_cases(w: World, work: Path) -> list[Case]:
    """Merges into the inputs, or over something that exists."""
    existing = work / "existing-out"
    existing.mkdir()
    (existing / "mine.txt").write_text("mine")
    a_file = work / "a-file"
    a_file.write_text("x")
    targets = {"inside the adapter": w.adapter / "merged", "the adapter": w.adapter, "inside the base": w.model / "m",
               "the base": w.model, "an existing folder": existing, "a file": a_file, "the parent of the adapter":
               w.adapter.parent}
    cases = []
    for what, out in targets.items():
        overwrite = what not in ("an existing folder", "a file")
        cases += [
            Case("merge-target", f"merge into {what}" + (" --overwrite" if overwrite else ""),
                 lambda out=out, o=overwrite: qolora.merge(w.model, w.adapter, out, overwrite=o, progress=False)),
            Case("merge-target", f"qolora merge into {what}",
                 lambda out=out, o=overwrite: cli(["merge", str(w.model), str(w.adapter), str(out), "--no-progress"]
                                                  + (["--overwrite"] if o else [])), cli=True),
        ]
    return cases


def folder_cases(w: World, work: Path, holder_dir: Path) -> list[Case]:
    """Output folders: earlier runs, someone else's files, a busy folder, damaged checkpoints."""
    def run_copy(name: str, change=None) -> Path:
        folder = _copy(w.run, work / f"run-{name}")
        if change:
            change(folder)
        return folder

    def edit_state(edit, fix_manifest=False):
        def change(folder):
            ck = folder / "checkpoints" / "step-000002"
            state = json.loads((ck / "state.json").read_text())
            edit(state)
            (ck / "state.json").write_text(json.dumps(state))
            if fix_manifest:
                manifest = json.loads((ck / "manifest.json").read_text())
                manifest["files"]["state.json"] = {"bytes": (ck / "state.json").stat().st_size,
                                                   "sha256": sha256_file(ck / "state.json")}
                (ck / "manifest.json").write_text(json.dumps(manifest))
        return change

    def resume_then(folder, **changes):
        return lambda: qolora.finetune(w.model, w.data, resume=True, **_small_run(w.model, w.data, folder, **changes))

    file_out = work / "out-is-a-file"
    file_out.write_text("x")
    parent_file = work / "parent-file"
    parent_file.write_text("x")
    user_adapter = run_copy("user-adapter", lambda f: (f / "adapter" / "mine.txt").write_text("mine"))
    not_qolora = run_copy("foreign-adapter", lambda f: (shutil.rmtree(f / "adapter"), (f / "adapter").mkdir(),
                                                        (f / "adapter" / "weights.bin").write_text("mine")))
    no_ckpt = run_copy("no-checkpoint", lambda f: shutil.rmtree(f / "checkpoints" / "step-000002"))
    bad_ckpt = run_copy("bad-checkpoint", lambda f: (f / "checkpoints" / "step-000002" / "adapter.safetensors")
                        .write_bytes(b"garbage"))
    cases = [
        Case("folder", "finetune into an earlier run without a flag", lambda: qolora.finetune(
            w.model, w.data, **_small_run(w.model, w.data, run_copy("again"))), before_model=True),
        Case("folder", "qolora finetune into an earlier run without a flag", lambda: cli(
            ["finetune", "--model", str(w.model), "--data", str(w.data), "--output-dir", str(run_copy("again-cli")),
             "--no-progress"]), cli=True, before_model=True),
        Case("folder", "resume with no checkpoint", resume_then(no_ckpt), before_model=True, workspace=no_ckpt),
        Case("folder", "qolora finetune --resume with no checkpoint", lambda: cli(
            ["finetune", "--model", str(w.model), "--data", str(w.data), "--output-dir", str(no_ckpt), "--resume",
             "--no-progress"]), cli=True, before_model=True, workspace=no_ckpt),
        Case("folder", "output_dir is a file", lambda: qolora.finetune(
            w.model, w.data, **_small_run(w.model, w.data, file_out)), before_model=True),
        Case("folder", "output_dir under a file", lambda: qolora.finetune(
            w.model, w.data, **_small_run(w.model, w.data, parent_file / "run")), before_model=True),
        Case("folder", "--overwrite with the user's file in OUT/adapter", lambda: qolora.finetune(
            w.model, w.data, **_small_run(w.model, w.data, user_adapter, overwrite=True)), before_model=True,
            workspace=user_adapter),
        Case("folder", "--overwrite with a foreign OUT/adapter", lambda: qolora.finetune(
            w.model, w.data, **_small_run(w.model, w.data, not_qolora, overwrite=True)), before_model=True,
            workspace=not_qolora),
        Case("folder", "resume from a corrupted only checkpoint", resume_then(bad_ckpt), before_model=True,
             workspace=bad_ckpt),
    ]
    for i, (edit, fix) in enumerate([(lambda s: s["data_position"].pop("index"), False),
                                     (lambda s: s["data_position"].pop("index"), True),
                                     (lambda s: s.pop("history"), True), (lambda s: s.__setitem__("step", -1), True),
                                     (lambda s: s.__setitem__("trajectory", None), True)]):
        folder = run_copy(f"state-{i}", edit_state(edit, fix))
        cases.append(Case("folder", f"resume from a hand-edited state.json #{i}", resume_then(folder),
                          before_model=True, workspace=folder))
    for key, value in [("batch_size", 2), ("lr", 5e-4), ("max_steps", 3), ("seed", 1), ("rank", 8)]:
        folder = run_copy(f"mismatch-{key}")
        cases.append(Case("folder", f"resume with another {key}", resume_then(folder, **{key: value}),
                          before_model=True, workspace=folder))
    busy = holder_dir
    for label, extra in [("fresh", {}), ("resume", {"resume": True}), ("overwrite", {"overwrite": True})]:
        resume = extra.pop("resume", False)
        cases.append(Case("busy", f"finetune ({label}) on a folder another run holds",
                          lambda r=resume, e=extra: qolora.finetune(w.model, w.data, resume=r,
                                                                    **_small_run(w.model, w.data, busy, **e)),
                          workspace=busy))
        argv = ["finetune", "--model", str(w.model), "--data", str(w.data), "--output-dir", str(busy), "--no-progress",
                "--max-steps", "2"] + (["--resume"] if resume else []) + (["--overwrite"] if extra else [])
        cases.append(Case("busy", f"qolora finetune ({label}) on a folder another run holds",
                          lambda argv=argv: cli(argv), cli=True, workspace=busy))
    return cases


def _user_repo(path: Path) -> Path:
    """A folder a user owns: a git repository with src/ and data/ and notes."""
    for rel, text in {".git/HEAD": "ref: refs/heads/main\n", "src/main.py": "print(1)\n", "data/a.csv": "1,2\n",
                      "notes.txt": "mine"}.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def overwrite_cases(w: World, work: Path) -> list[Case]:
    """Every writer's overwrite=True / --overwrite aimed at a folder the user owns: refused, nothing deleted."""
    from qolora.base.synthetic import SyntheticCheckpoint

    def model():
        return qolora.load(w.model, w.adapter, device="cpu", progress=False)

    def repo(name: str) -> Path:
        return _user_repo(work / f"repo-{name}")

    writers = {
        "qolora.merge": lambda out: qolora.merge(w.model, w.adapter, out, overwrite=True, progress=False),
        "qolora merge --overwrite": lambda out: cli(["merge", str(w.model), str(w.adapter), str(out), "--overwrite",
                                                     "--no-progress"]),
        "qolora.save_adapter": lambda out: qolora.save_adapter(model(), out, overwrite=True),
        "qolora.export_lora": lambda out: qolora.export_lora(w.adapter, out, overwrite=True),
        "SyntheticCheckpoint.write": lambda out: SyntheticCheckpoint(w.model / "config.json").write(out,
                                                                                                     overwrite=True),
    }
    cases = []
    for name, write in writers.items():
        out = repo(name.replace(" ", "-").replace(".", "-"))
        cases.append(Case("overwrite", f"{name} over a user's git repository", lambda write=write, out=out: write(out),
                          cli=name.startswith("qolora "), workspace=out))
        adapter_copy = _copy(w.adapter, work / f"adapter-{name.replace(' ', '-')}")
        (adapter_copy / "notes.txt").write_text("mine")
        cases.append(Case("overwrite", f"{name} over an adapter folder holding the user's notes",
                          lambda write=write, out=adapter_copy: write(out), cli=name.startswith("qolora "),
                          workspace=adapter_copy))
    return cases


def planner_cases(w: World, work: Path) -> list[Case]:
    """Hostile and mistyped config.json files through the planner (it hung on 1e9 layers) and prepare."""
    base = json.loads((w.model / "config.json").read_text())
    changes = {"num_hidden_layers 1e9": {"num_hidden_layers": 1e9}, "vocab_size 1e12": {"vocab_size": 1e12},
               "hidden_size 1e9": {"hidden_size": 1e9}, "no hidden_size": {"hidden_size": None},
               "no num_hidden_layers": {"num_hidden_layers": None}, "num_hidden_layers 0": {"num_hidden_layers": 0},
               "num_hidden_layers -3": {"num_hidden_layers": -3}, "heads 2.5": {"num_attention_heads": 2.5},
               "max_position_embeddings 1e15": {"max_position_embeddings": 1e15}}
    cases = []
    for what, change in changes.items():
        folder = work / f"config-{what.replace(' ', '-')}"
        folder.mkdir()
        config = {k: v for k, v in {**base, **change}.items() if v is not None}
        (folder / "config.json").write_text(json.dumps(config))
        cases += [Case("planner", f"qolora plan with {what}", lambda f=folder: cli(["plan", str(f)]), cli=True),
                  Case("planner", f"qolora.prepare with {what}",
                       lambda f=folder: qolora.prepare(f, bits=4, rank=4, device="cpu", progress=False))]
    return cases


def stdin_cases(w: World, work: Path) -> list[Case]:
    """Bytes on qolora chat's standard input that are not UTF-8: the line is skipped and the session goes on."""
    inputs = {"a Latin-1 line": b"caf\xe9\nhello\n\n", "a lone continuation byte": b"\x80\n\n",
              "binary noise then text": bytes(range(128, 256)) + b"\nhi\n\n"}

    def chat(data: bytes) -> int:
        stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
        with contextlib.redirect_stdout(io.StringIO()):
            real, sys.stdin = sys.stdin, stdin
            try:
                return cli(["chat", "--adapter", str(w.adapter), "--max-new-tokens", "2", "--device", "cpu"])
            finally:
                sys.stdin = real

    return [Case("chat-stdin", f"qolora chat reading {what}", lambda d=data: chat(d), cli=True, succeeds=True)
            for what, data in inputs.items()]


def chat_cases(w: World, work: Path) -> list[Case]:
    args = [[], ["--adapter", str(w.adapter), "--merged", str(w.model)], ["--adapter", str(work / "none")],
            ["--merged", str(work / "none")], ["--adapter", str(w.adapter), "--max-new-tokens", "0"],
            ["--adapter", str(w.adapter), "--prompt", "  "], ["--adapter", str(w.adapter), "--temperature", "-1"],
            ["--merged", str(w.model), "--base", str(w.model)], ["--adapter", str(w.model)],
            ["--adapter", str(w.adapter), "--threads", "0"]]
    return [Case("chat", "qolora chat " + " ".join(a), lambda a=a: cli(["chat", *a]), cli=True) for a in args]


# ------------------------------------------------------------------------------------------ judge
def judge(case: Case, prepared: list) -> Outcome:
    before = _hashes([case.workspace]) if case.workspace else {}
    prepared.clear()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            result = case.run()
    except SystemExit as exc:  # argparse: usage + one "error:" line naming the flag
        result = exc.code
    except CLEAR as exc:
        text = str(exc)
        ok = bool(text.strip()) and not (case.before_model and prepared)
        return _checked(case, before, ok, f"{type(exc).__name__}: {text[:160]}"
                        + (" (AFTER the model loaded)" if prepared and case.before_model else ""))
    except Exception as exc:  # noqa: BLE001 - anything else is a raw error: a failure
        return _checked(case, before, False, f"raw {type(exc).__name__}: {str(exc)[:160]}")
    if case.succeeds:
        ok = result == 0 and "Traceback" not in err.getvalue()
        return _checked(case, before, ok, f"exit {result}: {err.getvalue()[-160:]!r}")
    if not case.cli:
        return _checked(case, before, False, "no error raised")
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("qolora: error: ")
             or ln.startswith("qolora ") and ": error: " in ln]
    ok = result == 2 and len(lines) == 1 and "Traceback" not in err.getvalue() and not (case.before_model and prepared)
    return _checked(case, before, ok, f"exit {result}: {lines[0][:160] if lines else err.getvalue()[-160:]!r}")


def _checked(case: Case, before: dict, ok: bool, detail: str) -> Outcome:
    if case.workspace:
        after = _hashes([case.workspace])
        lost = [p for p in before if after.get(p) != before[p]]
        if lost:
            return Outcome(case, False, f"{detail}; CHANGED OR LOST: {lost[:3]}")
    return Outcome(case, ok, detail)


def run(limit_per_group: int | None = None, verbose: bool = True, keep: bool = False) -> dict:
    """Build the world, try every case, and return ``{"tried", "passed", "nothing_lost", "failures"}``."""
    log = logging.getLogger("qolora")
    level, threads = log.level, torch.get_num_threads()
    log.setLevel(logging.ERROR)  # the expected errors would flood the output; restored at the end
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="qolora-adversarial-"))
    holder = None
    try:
        w = build_world(root)
        work = root / "cases"
        work.mkdir()
        busy = _copy(w.run, work / "busy-run")
        code = ("import time; from qolora.files import folder_lock\n"
                f"with folder_lock({str(busy)!r}):\n    print('locked', flush=True)\n    time.sleep(3600)\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        if holder.stdout.readline().strip() != "locked":
            raise RuntimeError("the lock-holding process did not start")
        groups = [option_cases(w, work), data_cases(w, work), base_cases(w, work), adapter_cases(w, work),
                  merge_target_cases(w, work), folder_cases(w, work, busy), chat_cases(w, work),
                  overwrite_cases(w, work), planner_cases(w, work), stdin_cases(w, work)]
        cases = [c for g in groups for c in (g if limit_per_group is None else _spread(g, limit_per_group))]

        prepared: list = []
        finetune_module = importlib.import_module("qolora.training.finetune")
        real_prepare = finetune_module.prepare_checked

        def counting_prepare(*args, **kwargs):
            prepared.append(1)
            return real_prepare(*args, **kwargs)

        finetune_module.prepare_checked = counting_prepare
        outcomes = []
        started = time.perf_counter()
        try:
            for case in cases:
                outcome = judge(case, prepared)
                outcomes.append(outcome)
                if verbose:
                    print(f"{'PASS' if outcome.passed else 'FAIL'} [{case.group}] {case.name}: {outcome.detail}",
                          flush=True)
        finally:
            finetune_module.prepare_checked = real_prepare
        after = _hashes(w.sentinels and [Path(p) for p in w.sentinels])
        lost = [p for p in w.sentinels if after.get(p) != w.sentinels[p]]
        lost += [str(o.case.name) for o in outcomes if "CHANGED OR LOST" in o.detail]
        summary = {"tried": len(outcomes), "passed": sum(o.passed for o in outcomes), "nothing_lost": not lost,
                   "lost": lost, "seconds": time.perf_counter() - started,
                   "failures": [f"[{o.case.group}] {o.case.name}: {o.detail}" for o in outcomes if not o.passed]}
        if (root / "cases").exists() and any((root / "cases").rglob("RAN")):
            summary["failures"].append("a model folder's own code ran")
            summary["nothing_lost"] = False
        return summary
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        log.setLevel(level)
        torch.set_num_threads(threads)


def _spread(cases: list[Case], n: int) -> list[Case]:
    """At most ``n`` cases of a group, spread over it."""
    if len(cases) <= n:
        return cases
    step = len(cases) / n
    return [cases[int(i * step)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="at most this many cases per group")
    parser.add_argument("--quiet", action="store_true", help="print only the failures and the summary")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args(argv)
    summary = run(args.limit, verbose=not args.quiet, keep=args.keep)
    for failure in summary["failures"]:
        print("FAILED:", failure)
    print(f"tried {summary['tried']} / passed {summary['passed']} / nothing lost: "
          f"{'yes' if summary['nothing_lost'] else 'no'} ({summary['seconds']:.0f} s)")
    return 0 if summary["passed"] == summary["tried"] and summary["nothing_lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
