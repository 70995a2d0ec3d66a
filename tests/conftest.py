import gc
import importlib
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_chat import make_chat_model_dir, write_chat_jsonl  # noqa: E402
from tiny_models import make_tiny_gpt2, make_tiny_llama  # noqa: E402
from tiny_runs import run_options  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

# Tiny models: one thread is fastest, and the machine is shared (2 cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_threads():
    """A test that sets torch's thread count (the benchmarks' --threads, the CLI's) leaves the next one as it was."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny random Llama checkpoint (fp32, tied embeddings)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_frozen_for = [None]


def pytest_runtest_setup(item):
    """At each test module's first test: collect the garbage (the last module's fixtures are torn
    down by now), then move every survivor (imported modules, session fixtures, caches: ~0.5-1 M
    objects that live all session) to the permanent generation. The full garbage collections inside
    the module (the interpreter's own, and the convergence benchmark's ``gc.collect()`` between
    models, ~0.2-0.3 s each on the whole heap) then walk only what the module made. The frozen
    objects are freed as usual when their references go; only a reference cycle among them would
    now wait for the end of the session (what outlives a test module here lives all session)."""
    if item.module is not _frozen_for[0]:
        _frozen_for[0] = item.module
        gc.collect()
        gc.freeze()


# ----------------------------------------------------------------------- the tiny chat setup
@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny_chat_llama"))


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl")


@pytest.fixture(scope="session")
def tokenized(chat_model_dir, chat_jsonl):
    from qolora.data.tokens import load_records, split_train_eval, tokenize_dataset

    tok = make_tiny_tokenizer()
    ds, _ = tokenize_dataset(load_records(chat_jsonl), tok, max_length=64)
    train_ds, eval_ds = split_train_eval(ds, 0.25, seed=0)
    return tok, train_ds, eval_ds


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if a checkpoint weight is read: the error must come before heavy work."""
    from qolora.base.reader import BaseCheckpoint, TensorStore

    def boom(*a, **k):
        raise AssertionError("a checkpoint weight was read before the error")

    monkeypatch.setattr(BaseCheckpoint, "tensors", boom)
    monkeypatch.setattr(TensorStore, "read", boom)
    monkeypatch.setattr(TensorStore, "read_expert", boom)


# ---------------------------------------------------------- a finished tiny run (tests copy it), no model loads
@pytest.fixture(scope="session")
def tiny_inputs(chat_model_dir, tmp_path_factory):
    """(model folder, data file) of the tiny run: the tiny chat model and 16 conversations."""
    return chat_model_dir, write_chat_jsonl(tmp_path_factory.mktemp("tiny_run") / "chat.jsonl", n=16)


@pytest.fixture(scope="session")
def finished_run(tiny_inputs, tmp_path_factory):
    """A finished tiny run folder (adapter, metrics, samples, a checkpoint) and its result; tests copy it."""
    from qolora import finetune

    model, data = tiny_inputs
    out = tmp_path_factory.mktemp("run") / "run"
    result = finetune(model, data, **run_options(out))
    return out, result


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of the finished run's folder, the test's to change."""
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    return out


@pytest.fixture
def no_prepare(monkeypatch):
    """Fail the test if ``finetune`` would load the model (tests/training/test_loop.py has a stricter one)."""
    def refuse(*args, **kwargs):
        raise AssertionError("prepare() was called: the problem should have been caught before the model loads")

    monkeypatch.setattr(importlib.import_module("qolora.training.finetune"), "prepare_checked", refuse)
