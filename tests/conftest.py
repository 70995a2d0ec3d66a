import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import make_tiny_gpt2, make_tiny_llama  # noqa: E402

# Tiny models: one thread is fastest, and the machine is shared (2 cores).
torch.set_num_threads(1)


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


def pytest_collection_finish(session):
    """Move what collection imported (torch, transformers, the test modules: ~0.5 M objects that live
    all session) to the permanent generation: the full garbage collections during the tests (the
    interpreter's own, and the convergence benchmark's ``gc.collect()`` between models, ~0.3 s each
    on the whole heap) then walk only what the tests create. Nothing is kept alive that would
    otherwise be freed: objects made later are collected as usual."""
    gc.freeze()
