"""qolora.devices: the CPU thread policy (one thread on a busy CPU, unless someone chose) applies to Python
users of the library, not only to the command line."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from qolora import ConfigError, prepare


def test_the_thread_policy_applies_to_python_users(tiny_inputs, monkeypatch):
    threads = importlib.import_module("qolora.devices")
    model, _ = tiny_inputs
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
