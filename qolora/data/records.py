"""Records: load a data set, detect its format, and render each record as a conversation.

The first half of the data pipeline (:mod:`qolora.data.tokens` tokenizes what this module renders).
Everything goes through :mod:`datasets`, imported lazily inside the functions that need it so
that the core of ``qolora`` imports on machines without it.

1. :func:`load_records` reads local ``.json``/``.jsonl``/``.csv``/``.parquet``/``.txt`` files, a
   folder written by ``save_to_disk``, or a hub dataset name, into a :class:`datasets.Dataset`.
   A ``.txt`` file gives one ``{"text": ...}`` record per *paragraph* (blocks separated by
   blank lines; line breaks inside a paragraph are kept), so multi-line examples such as code
   or poems stay whole.
2. :func:`detect_format` picks one of :data:`FORMATS` from the column names:
   ``messages`` (or ShareGPT-style ``conversations``), ``instruction`` (+ ``output``, optional
   ``input``), ``prompt_completion`` (``prompt`` + ``completion``) or ``text``.

3. :class:`Renderer` turns a record's conversation into text: with the tokenizer's chat template
   when it has one, else the plain template ``"### Instruction:\n{user}\n\n### Response:\n{answer}<eos>"``
   (system messages are written as their bare text followed by a blank line), and finds the
   character spans of the assistant turns (see :mod:`qolora.data.tokens` for how they become labels).
   :func:`prompt_ids` gives the tokens of a bare user prompt as training renders them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import datasets

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "FORMATS",
    "FORMAT_COLUMNS",
    "SUPPORTED_SUFFIXES",
    "Renderer",
    "load_records",
    "detect_format",
    "prompt_ids",
    "record_to_messages",
    "text_field",
]

FORMATS = ("messages", "instruction", "prompt_completion", "text")
#: Required columns of each format (``messages`` also accepts a ``conversations`` column).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
_BUILDER_FOR_SUFFIX = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Suffixes that mark a string as a file name rather than a hub dataset name.
_FILE_LIKE_SUFFIXES = frozenset(
    SUPPORTED_SUFFIXES
    + (".tsv", ".arrow", ".xml", ".yaml", ".yml", ".gz", ".zip", ".bz2", ".xz", ".zst", ".tar")
    + (".xlsx", ".xls", ".md", ".html", ".htm", ".pkl", ".pickle", ".npy", ".npz", ".pt")
)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}
_PLAIN_USER = "### Instruction:\n{content}\n\n"
_PLAIN_GENERATION_PROMPT = "### Response:\n"


class DataError(ValueError):
    """Bad data input: missing file, unsupported format, wrong columns, nothing left to train."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _looks_like_hub_name(source: str) -> bool:
    """Whether a string that is not an existing local path should be tried on the hub."""
    if source.startswith((".", "~", "/")) or "\\" in source:
        return False
    if Path(source).suffix.lower() in _FILE_LIKE_SUFFIXES:
        return False
    return bool(_HUB_NAME.match(source))


def _is_blank(path: Path, chunk_size: int = 1 << 20) -> bool:
    """Whether a file holds only whitespace (reads until the first other byte)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            if chunk.strip():
                return False
    return True


def _check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """Refuse a text file that is not UTF-8, naming the line and byte offset of the first bad byte."""
    line, offset, carry = 1, 0, b""  # carry: an incomplete character cut by the chunk boundary
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(chunk_size)
            data = carry + chunk
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as exc:
                if chunk and exc.reason == "unexpected end of data" and len(data) - exc.start < 4:
                    carry = data[exc.start:]  # completed by the next chunk
                    data = data[:exc.start]
                else:
                    line += data[:exc.start].count(b"\n")
                    raise DataError(
                        f"data file {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset "
                        f"{offset + exc.start}, line {line}; save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                    ) from None
            if not chunk:
                return
            line += data.count(b"\n")
            offset += len(data)


def _first_bad_json_line(path: Path) -> str | None:
    """Where a JSON-lines file first fails to parse: ``"line N: reason"`` (None when every line parses)."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                return f"line {number} is not valid JSON ({exc}): {line.strip()[:80]!r}"
            if not isinstance(value, dict):
                return f"line {number} is a JSON {type(value).__name__}, not an object: {line.strip()[:80]!r}"
    return None


def _read_paragraphs(path: Path) -> list[str]:
    """Split a text file into paragraphs (blocks separated by blank lines), stripped."""
    text = path.read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text) if p.strip()]


def _pick_split(dataset_dict: Any, split: str | None, where: str) -> Any:
    """Pick ``split`` (default ``"train"``) out of a DatasetDict."""
    name = split or "train"
    if name not in dataset_dict:
        raise DataError(
            f"split {name!r} not found in {where}; available splits: {sorted(dataset_dict)}"
        )
    return dataset_dict[name]


def load_records(source: str | Path, split: str | None = None) -> datasets.Dataset:
    """Load raw records from a local file, a saved dataset folder or the hub.

    Args:
        source: One of

            * a local file ending in one of :data:`SUPPORTED_SUFFIXES`. ``.json`` may hold a
              list of objects or JSON lines; ``.txt`` gives one ``{"text": paragraph}``
              record per paragraph (blocks separated by blank lines);
            * a folder written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``;
            * a hub dataset name such as ``"org/name"`` (only tried when ``source`` is a
              string that does not exist locally and does not look like a file path).
        split: Split to take from a DatasetDict or hub dataset; default ``"train"``. Ignored
            for single files.

    Returns:
        A non-empty :class:`datasets.Dataset`.

    Raises:
        DataError: ``"data file not found: X"`` for a missing local path, an unsupported
            suffix (the message lists the allowed ones), a folder that is not a saved dataset,
            a missing split, an empty dataset or a hub dataset that cannot be loaded.
    """
    if not isinstance(source, (str, Path)):
        raise DataError(
            f"data source must be a path or a dataset name, got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if isinstance(source, str) and not source.strip():
        raise DataError("data source is an empty string; give a file, folder or dataset name")

    if path.is_dir():
        dataset = _load_saved_folder(path, split)
    elif path.exists():
        dataset = _load_file(path)
    elif isinstance(source, str) and _looks_like_hub_name(source):
        dataset = _load_hub(source, split)
    else:
        raise DataError(f"data file not found: {source}")

    if len(dataset) == 0:
        raise DataError(f"dataset {source} is empty (0 records)")
    logger.info(
        "Loaded %d records with columns %s from %s", len(dataset), dataset.column_names, source
    )
    return dataset


def _load_saved_folder(path: Path, split: str | None) -> datasets.Dataset:
    """Load a folder written by ``save_to_disk``."""
    import datasets

    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).is_file() for m in markers):
        raise DataError(
            f"folder {path} is not a dataset saved with save_to_disk (no {' / '.join(markers)}); "
            f"pass a file ending in one of {', '.join(SUPPORTED_SUFFIXES)} instead"
        )
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, split, str(path))
    return loaded


def _load_file(path: Path) -> datasets.Dataset:
    """Load one local data file by suffix."""
    import datasets

    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"unsupported data file suffix {path.suffix or '(none)'!r} for {path}; "
            f"allowed: {', '.join(SUPPORTED_SUFFIXES)} or a save_to_disk folder"
        )
    if path.stat().st_size == 0 or (suffix != ".parquet" and _is_blank(path)):
        raise DataError(f"data file {path} is empty")
    if suffix != ".parquet":
        _check_utf8(path)
    if suffix == ".txt":
        return datasets.Dataset.from_dict({"text": _read_paragraphs(path)})
    try:
        with _quiet_builder_errors():  # datasets logs its own message (rows from 0) before raising: ours says it once
            return datasets.load_dataset(
                _BUILDER_FOR_SUFFIX[suffix], data_files=str(path), split="train"
            )
    except Exception as exc:  # the builders raise many types; report them uniformly
        where = _first_bad_json_line(path) if suffix == ".jsonl" else None
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:  # datasets wraps the real error
            cause = cause.__cause__ or cause.__context__
        detail = where or (f"{exc}" + (f" ({type(cause).__name__}: {cause})" if cause is not exc else ""))
        raise DataError(f"could not read {path} as {suffix[1:]}: {detail}") from exc


@contextlib.contextmanager
def _quiet_builder_errors():
    """Silence the ERROR line datasets' file builders log before they raise (qolora reports the error itself)."""
    quiet = [logging.getLogger(f"datasets.packaged_modules.{kind}.{kind}") for kind in ("json", "csv", "parquet")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def _load_hub(name: str, split: str | None) -> datasets.Dataset:
    """Load a dataset from the hub (or the local datasets cache when offline)."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:
        raise DataError(
            f"could not load dataset {name!r} from the hub (it is not a local path either): {exc}"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):  # pragma: no cover - split is always given
        loaded = _pick_split(loaded, split, name)
    return loaded


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def _messages_column(columns: Iterable[str]) -> str | None:
    """The column holding conversations, if any (``messages`` preferred)."""
    cols = set(columns)
    for name in ("messages", "conversations"):
        if name in cols:
            return name
    return None


def detect_format(column_names: Sequence[str], format: str | None = None) -> str:
    """Detect (or validate) the record format from the column names.

    Detection order: ``messages`` (a ``messages`` or ``conversations`` column), ``instruction``
    (``instruction`` + ``output``; ``input`` optional), ``prompt_completion`` (``prompt`` +
    ``completion``), ``text``.

    Args:
        column_names: Columns of the dataset.
        format: If given, the format to use: it must be one of :data:`FORMATS` and its columns
            must be present.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        DataError: Unknown ``format``, a column required by the explicit ``format`` missing, or
            no known column set found (the message lists the columns found and those allowed).
    """
    cols = list(column_names)
    present = set(cols)
    if format is not None:
        if format not in FORMATS:
            raise DataError(f"unknown data format {format!r}; allowed: {', '.join(FORMATS)}")
        if format == "messages":
            if _messages_column(cols) is None:
                raise DataError(
                    "format 'messages' needs a column 'messages' (or 'conversations'), "
                    f"missing; columns found: {cols}"
                )
            return format
        missing = [c for c in FORMAT_COLUMNS[format] if c not in present]
        if missing:
            raise DataError(
                f"format {format!r} needs column(s) {missing}, missing; columns found: {cols}"
            )
        return format
    if _messages_column(cols) is not None:
        return "messages"
    for name in ("instruction", "prompt_completion", "text"):
        if all(c in present for c in FORMAT_COLUMNS[name]):
            return name
    allowed = "; ".join(
        f"{name}: {' + '.join(FORMAT_COLUMNS[name])}"
        + (" (or conversations)" if name == "messages" else "")
        + (" [+ input]" if name == "instruction" else "")
        for name in FORMATS
    )
    raise DataError(
        f"cannot detect the data format from columns {cols}; allowed column sets: {allowed}"
    )


def text_field(value: Any, what: str, index: int) -> str:
    """Coerce a field to text: ``None`` becomes ``""``, numbers their ``str``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    raise DataError(f"record {index}: field {what!r} must be text, got {type(value).__name__}")


def _normalize_messages(raw: Any, index: int) -> list[dict[str, str]]:
    """Normalize one conversation to ``[{"role", "content"}]`` (ShareGPT ``from/value`` too)."""
    if isinstance(raw, str):  # e.g. a CSV column holding JSON-encoded conversations
        try:
            raw = json.loads(raw)
        except ValueError:
            pass
    if not isinstance(raw, (list, tuple)):
        raise DataError(f"record {index}: messages must be a list, got {type(raw).__name__}")
    out = []
    for turn in raw:
        if not isinstance(turn, Mapping):
            raise DataError(f"record {index}: each message must be a mapping, got {turn!r}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        norm = _ROLE_ALIASES.get(str(role).lower()) if role is not None else None
        if norm is None:
            raise DataError(
                f"record {index}: unknown message role {role!r}; "
                f"allowed: {', '.join(sorted(_ROLE_ALIASES))}"
            )
        out.append({"role": norm, "content": text_field(content, "content", index)})
    return out


def record_to_messages(record: Mapping[str, Any], fmt: str, index: int) -> list[dict[str, str]]:
    """Turn one record of a chat-like format into a list of messages."""
    if fmt == "messages":
        messages = _normalize_messages(record[_messages_column(record.keys())], index)
        if not messages:
            raise DataError(f"record {index}: the conversation is empty (messages: []); each record needs at least "
                            "a user and an assistant message")
        return messages
    if fmt == "instruction":
        user = text_field(record["instruction"], "instruction", index)
        extra = text_field(record.get("input"), "input", index)
        if extra.strip():
            user = f"{user}\n\n{extra}"
        answer = text_field(record["output"], "output", index)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    # prompt_completion; conversational prompt/completion lists are accepted as well.
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, (list, tuple)):
        msgs = _normalize_messages(prompt, index)
    else:
        msgs = [{"role": "user", "content": text_field(prompt, "prompt", index)}]
    if isinstance(completion, (list, tuple)):
        msgs += _normalize_messages(completion, index)
    else:
        msgs.append({"role": "assistant", "content": text_field(completion, "completion", index)})
    return msgs


# --------------------------------------------------------------------------------------------
# Rendering and tokenization
# --------------------------------------------------------------------------------------------


class Renderer:
    """Render conversations to text and find the character spans of assistant turns."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """Render a (partial) conversation with the chat template or the plain template."""
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        parts = []
        for msg in messages:
            if msg["role"] == "system":
                parts.append(f"{msg['content']}\n\n")
            elif msg["role"] == "user":
                parts.append(_PLAIN_USER.format(content=msg["content"]))
            else:
                parts.append(f"{_PLAIN_GENERATION_PROMPT}{msg['content']}{self.eos or ''}\n\n")
        if add_generation_prompt:
            parts.append(_PLAIN_GENERATION_PROMPT)
        return "".join(parts)

    def render_with_spans(
        self, messages: list[dict[str, str]], index: int
    ) -> tuple[str, list[tuple[int, int]]]:
        """Render a conversation; return the text and the assistant spans (char offsets)."""
        full = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            try:
                before = self.render(messages[:i], add_generation_prompt=True)
            except Exception:  # some templates reject an empty conversation
                if i:
                    raise
                before = ""
            upto = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise DataError(
                    f"record {index}: the chat template does not render conversations "
                    "incrementally (a prefix of the conversation does not render to a prefix "
                    "of the full text), so assistant turns cannot be located; use "
                    "mask_prompt=False or a tokenizer with a prefix-stable template"
                )
            start, end = len(before), len(upto)
            if self.eos:
                cut = full.rfind(self.eos, start, end)
                if cut >= 0:
                    end = cut + len(self.eos)
            if end > start:
                spans.append((start, end))
        return full, spans


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a bare user prompt as training renders it, ending with the generation prompt."""
    renderer = Renderer(tokenizer)
    rendered = renderer.render([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=not renderer.use_chat_template)["input_ids"])
