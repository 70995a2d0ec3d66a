"""qolora.model.adapter_folder: a tampered adapter folder is refused when read (NaN weights with consistent
checksums, the checksum list deleted)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import qolora
from qolora import AdapterError


def _rewrite_config(adapter: Path, change) -> None:
    path = adapter / "qolora_config.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_load_refuses_a_nan_adapter(tiny_inputs, finished_run, tmp_path):
    # before: merge and export refused it, qolora.load did not
    model, _ = tiny_inputs
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


def test_deleting_the_checksums_is_refused(tiny_inputs, finished_run, tmp_path):
    # before: deleting "files" switched the checksum check off
    model, _ = tiny_inputs
    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run[0] / "adapter", adapter)
    _rewrite_config(adapter, lambda m: m.pop("files"))
    with pytest.raises(AdapterError, match="files"):
        qolora.read_adapter(adapter)
    with pytest.raises(AdapterError, match="files"):
        qolora.load(model, adapter, progress=False)
