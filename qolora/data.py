"""Data pipeline: load records, detect their format, tokenize with prompt masking, pack, collate.

Everything goes through :mod:`datasets`, imported lazily inside the functions that need it so
that the core of ``qolora`` imports on machines without it.

Steps:

1. :func:`load_records` reads local ``.json``/``.jsonl``/``.csv``/``.parquet``/``.txt`` files, a
   folder written by ``save_to_disk``, or a hub dataset name, into a :class:`datasets.Dataset`.
   A ``.txt`` file gives one ``{"text": ...}`` record per *paragraph* (blocks separated by
   blank lines; line breaks inside a paragraph are kept), so multi-line examples such as code
   or poems stay whole.
2. :func:`detect_format` picks one of :data:`FORMATS` from the column names:
   ``messages`` (or ShareGPT-style ``conversations``), ``instruction`` (+ ``output``, optional
   ``input``), ``prompt_completion`` (``prompt`` + ``completion``) or ``text``.
3. :func:`tokenize_dataset` renders every record as a conversation and tokenizes it.

   * Rendering: with a chat template, ``instruction`` and ``prompt_completion`` records become a
     user/assistant exchange and go through ``tokenizer.apply_chat_template``. Without one, a
     plain template is used: ``"### Instruction:\\n{user}\\n\\n### Response:\\n{answer}<eos>"``
     (system messages are written as their bare text followed by a blank line; an ``input``
     field is appended to the instruction after a blank line). ``text`` records are the text
     followed by EOS, all of it trained on.
   * Masking (``mask_prompt=True``): only assistant turns are labelled. Their character spans
     are found by rendering the conversation *incrementally*: the span of assistant turn ``i``
     runs from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
     ``render(messages[:i+1])``; every rendered prefix must be a prefix of the full rendering,
     else the template is rejected with a :class:`DataError`. The span is cut just after the
     last EOS token text inside it, so the EOS closing the answer is labelled and template
     whitespace after it is not. The **full text is tokenized once** (so training sees exactly
     the tokens inference will see) and a token is labelled when its character offset starts
     inside an assistant span; tokenizers without offset mappings (slow ones) tokenize each
     segment separately and concatenate.
   * Truncation keeps the first ``max_length`` tokens. An example with no labelled token left
     is dropped. Counts come back as :class:`DataStats`.
   * Packing (``packing=True``) concatenates whole examples greedily, in order, into blocks of
     at most ``max_length`` tokens: an example that does not fit in the current block starts a
     new one, so no example is ever split. Each block gets ``position_ids`` restarting at 0 for
     every example. The label of each example's *first* token is set to -100: unpacked, that
     label is never used (nothing precedes it), packed it would train the previous example's
     last token to predict the next example, so the loss is the unpacked loss. Attention:
     transformers keeps it inside each example (block-diagonal causal mask built from the
     restarting ``position_ids``, for ``sdpa``, ``eager`` and ``flash_attention_2``) only when
     the forward call gets ``position_ids``, **no** ``attention_mask`` and ``use_cache=False``;
     the logits then equal the unpacked ones (checked in the tests). With an
     ``attention_mask`` tokens also attend to earlier examples of their block. Right padding
     is harmless without a mask: pad positions come after every real token and carry -100.
4. :func:`split_train_eval` makes a deterministic train/eval split and :class:`PaddingCollator`
   right-pads a batch into tensors.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "DataStats",
    "FORMATS",
    "FORMAT_COLUMNS",
    "SUPPORTED_SUFFIXES",
    "IGNORE_INDEX",
    "load_records",
    "detect_format",
    "tokenize_dataset",
    "split_train_eval",
    "PaddingCollator",
]

IGNORE_INDEX = -100
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


@dataclass(frozen=True)
class DataStats:
    """What :func:`tokenize_dataset` did.

    Attributes:
        n_examples: Examples kept (before packing).
        n_truncated: Examples longer than ``max_length`` that were cut (kept or dropped).
        n_dropped: Examples dropped because no labelled token was left.
        n_tokens: Tokens in the kept examples, after truncation.
    """

    n_examples: int
    n_truncated: int
    n_dropped: int
    n_tokens: int

    def as_dict(self) -> dict[str, int]:
        """Return the counts as a plain dict (for logs and JSON)."""
        return asdict(self)


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
    if suffix == ".txt":
        return datasets.Dataset.from_dict({"text": _read_paragraphs(path)})
    try:
        return datasets.load_dataset(
            _BUILDER_FOR_SUFFIX[suffix], data_files=str(path), split="train"
        )
    except Exception as exc:  # the builders raise many types; report them uniformly
        raise DataError(f"could not read {path} as {suffix[1:]}: {exc}") from exc


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


def _text(value: Any, what: str, index: int) -> str:
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
        out.append({"role": norm, "content": _text(content, "content", index)})
    return out


def _record_to_messages(record: Mapping[str, Any], fmt: str, index: int) -> list[dict[str, str]]:
    """Turn one record of a chat-like format into a list of messages."""
    if fmt == "messages":
        return _normalize_messages(record[_messages_column(record.keys())], index)
    if fmt == "instruction":
        user = _text(record["instruction"], "instruction", index)
        extra = _text(record.get("input"), "input", index)
        if extra.strip():
            user = f"{user}\n\n{extra}"
        answer = _text(record["output"], "output", index)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    # prompt_completion; conversational prompt/completion lists are accepted as well.
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, (list, tuple)):
        msgs = _normalize_messages(prompt, index)
    else:
        msgs = [{"role": "user", "content": _text(prompt, "prompt", index)}]
    if isinstance(completion, (list, tuple)):
        msgs += _normalize_messages(completion, index)
    else:
        msgs.append({"role": "assistant", "content": _text(completion, "completion", index)})
    return msgs


# --------------------------------------------------------------------------------------------
# Rendering and tokenization
# --------------------------------------------------------------------------------------------


class _Renderer:
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


def _tokenize_with_spans(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], add_special_tokens: bool
) -> tuple[list[int], list[bool]]:
    """Tokenize ``text``; return ids and, per token, whether it starts inside a span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        inside = []
        for start, end in enc["offset_mapping"]:
            # Tokens added by the post-processor have (0, 0) offsets and are never labelled.
            in_span = end > start or start > 0
            inside.append(in_span and any(s <= start < e for s, e in spans))
        return ids, inside
    # Slow tokenizers have no offsets: tokenize each segment on its own and concatenate.
    ids, inside = [], []
    if add_special_tokens:
        ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
        inside = [False] * len(ids)
    pos = 0
    bounds = sorted(spans)
    segments = []
    for s, e in bounds:
        segments += [(text[pos:s], False), (text[s:e], True)]
        pos = e
    segments.append((text[pos:], False))
    for seg, lab in segments:
        if seg:
            seg_ids = tokenizer(seg, add_special_tokens=False)["input_ids"]
            ids += seg_ids
            inside += [lab] * len(seg_ids)
    return ids, inside


def _validate_tokenize_args(tokenizer: Any, max_length: Any, format: str | None) -> None:
    """Check arguments before touching the data."""
    if tokenizer is None or not callable(tokenizer):
        raise DataError(f"tokenizer must be a transformers tokenizer, got {tokenizer!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; allowed: {', '.join(FORMATS)}")


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    format: str | None = None,
    max_length: int = 512,
    mask_prompt: bool = True,
    packing: bool = False,
) -> tuple[datasets.Dataset, DataStats]:
    """Render, tokenize, label, truncate and optionally pack a dataset.

    See the module docstring for the rendering, masking and packing rules.

    Args:
        dataset: Records, e.g. from :func:`load_records`.
        tokenizer: A transformers tokenizer. Its chat template is used when it has one.
        format: One of :data:`FORMATS`; detected from the columns when ``None``.
        max_length: Maximum tokens per example (and per packed block), at least 2.
        mask_prompt: Label only assistant turns (-100 elsewhere). When ``False`` every token is
            labelled. ``text`` records are always fully labelled.
        packing: Pack whole examples into blocks of up to ``max_length`` tokens.

    Returns:
        ``(tokenized, stats)``: a dataset with columns ``input_ids`` and ``labels`` (plus
        ``position_ids`` when packing), and the :class:`DataStats` (counted before packing).

    Raises:
        DataError: Bad arguments or columns (see :func:`detect_format`), malformed records,
            a template that cannot be masked, or every example dropped.
    """
    _validate_tokenize_args(tokenizer, max_length, format)
    fmt = detect_format(dataset.column_names, format)
    renderer = _Renderer(tokenizer)
    if fmt != "text" and not renderer.use_chat_template:
        logger.info(
            "Tokenizer has no chat template: using the plain ### Instruction/### Response template"
        )
    if renderer.eos is None:
        logger.warning("Tokenizer has no eos_token: answers will not end with EOS")

    all_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    n_truncated = n_dropped = n_no_answer = 0
    shortest_prompt: int | None = None
    for index, record in enumerate(dataset):
        if fmt == "text":
            text = _text(record["text"], "text", index) + (renderer.eos or "")
            spans = [(0, len(text))]
            ids, inside = _tokenize_with_spans(tokenizer, text, spans, add_special_tokens=True)
            inside = [True] * len(ids)
        else:
            messages = _record_to_messages(record, fmt, index)
            if mask_prompt:
                text, spans = renderer.render_with_spans(messages, index)
            else:
                text = renderer.render(messages, add_generation_prompt=False)
                spans = [(0, len(text))]
            add_special = not renderer.use_chat_template  # a chat template carries its own
            ids, inside = _tokenize_with_spans(
                tokenizer, text, spans, add_special_tokens=add_special
            )
            if not mask_prompt:
                inside = [True] * len(ids)
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, inside, strict=True)]
        if len(ids) > max_length:
            n_truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(lab == IGNORE_INDEX for lab in labels):
            n_dropped += 1
            if any(inside):
                first = inside.index(True)
                shortest_prompt = first if shortest_prompt is None else min(shortest_prompt, first)
            else:
                n_no_answer += 1
            continue
        all_ids.append(ids)
        all_labels.append(labels)

    stats = DataStats(
        n_examples=len(all_ids),
        n_truncated=n_truncated,
        n_dropped=n_dropped,
        n_tokens=sum(len(x) for x in all_ids),
    )
    logger.info(
        "Tokenized %d records (format=%s, max_length=%d): kept %d, truncated %d, dropped %d, "
        "%d tokens",
        len(dataset),
        fmt,
        max_length,
        stats.n_examples,
        stats.n_truncated,
        stats.n_dropped,
        stats.n_tokens,
    )
    if not all_ids:
        raise DataError(
            _all_dropped_message(len(dataset), max_length, n_no_answer, shortest_prompt)
        )

    import datasets

    if packing:
        columns = _pack(all_ids, all_labels, max_length)
        logger.info(
            "Packed %d examples into %d blocks of <= %d tokens",
            stats.n_examples,
            len(columns["input_ids"]),
            max_length,
        )
    else:
        columns = {"input_ids": all_ids, "labels": all_labels}
    return datasets.Dataset.from_dict(columns), stats


def _all_dropped_message(
    n_records: int, max_length: int, n_no_answer: int, shortest_prompt: int | None
) -> str:
    """Explain why every example was dropped."""
    if n_records == 0:
        return "the dataset has no records"
    parts = []
    if shortest_prompt is not None:
        parts.append(
            f"every example is longer than max_length={max_length}: no answer token fits "
            f"(the shortest prompt is {shortest_prompt} tokens); raise max_length or shorten "
            "the prompts"
        )
    if n_no_answer:
        parts.append(
            f"{n_no_answer} example(s) have no assistant answer to train on (empty answers or "
            "no assistant turn)"
        )
    return f"all {n_records} examples were dropped: " + "; ".join(parts)


def _pack(
    all_ids: list[list[int]], all_labels: list[list[int]], max_length: int
) -> dict[str, list[list[int]]]:
    """Greedy in-order packing of whole examples into blocks of at most ``max_length``."""
    blocks: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []

    def flush() -> None:
        if cur_ids:
            blocks["input_ids"].append(list(cur_ids))
            blocks["labels"].append(list(cur_labels))
            blocks["position_ids"].append(list(cur_pos))
            cur_ids.clear(), cur_labels.clear(), cur_pos.clear()

    for ids, labels in zip(all_ids, all_labels, strict=True):
        if len(cur_ids) + len(ids) > max_length:
            flush()
        cur_ids.extend(ids)
        cur_labels.append(IGNORE_INDEX)  # the first token's label is never a valid target
        cur_labels.extend(labels[1:])
        cur_pos.extend(range(len(ids)))
    flush()
    return blocks


# --------------------------------------------------------------------------------------------
# Split and collate
# --------------------------------------------------------------------------------------------


def split_train_eval(
    dataset: datasets.Dataset, eval_fraction: float = 0.1, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a dataset into train and eval parts, deterministically.

    The rows are shuffled with ``seed``; ``round(n * eval_fraction)`` of them (at least 1, at
    most ``n - 1``) go to eval.

    Args:
        dataset: At least 2 rows.
        eval_fraction: Fraction for eval, strictly between 0 and 1.
        seed: Shuffle seed; the same seed gives the same split.

    Returns:
        ``(train, eval)``.

    Raises:
        DataError: ``eval_fraction`` out of range or fewer than 2 rows.
    """
    if (
        isinstance(eval_fraction, bool)
        or not isinstance(eval_fraction, (int, float))
        or not (0.0 < float(eval_fraction) < 1.0)
    ):
        raise DataError(
            f"eval_fraction must be a number strictly between 0 and 1, got {eval_fraction!r}"
        )
    n = len(dataset)
    if n < 2:
        raise DataError(
            f"cannot split a dataset of {n} example(s) into train and eval; need at least 2"
        )
    import numpy as np

    n_eval = min(max(1, int(round(n * eval_fraction))), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    eval_idx = sorted(order[:n_eval].tolist())
    train_idx = sorted(order[n_eval:].tolist())
    logger.info(
        "Split %d examples into %d train / %d eval (seed=%d)", n, len(train_idx), n_eval, seed
    )
    return dataset.select(train_idx), dataset.select(eval_idx)


class PaddingCollator:
    """Right-pad a list of tokenized examples into a batch of tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with -100 (a feature without
    ``labels`` is labelled with its ``input_ids``), ``position_ids`` with 0 (present when any
    feature has them; a feature without gets ``0..n-1``); ``attention_mask`` is 1 on real
    tokens, 0 on padding (an existing ``attention_mask`` feature is padded with 0).

    For packed batches (with ``position_ids``), drop ``attention_mask`` before the forward call
    and pass ``use_cache=False`` to keep attention within examples (see the module docstring).

    Args:
        pad_token_id: Token id used for padding.
        pad_to_multiple_of: Round the padded length up to a multiple of this (e.g. 8).

    Raises:
        DataError: ``pad_token_id`` is not an int >= 0, or ``pad_to_multiple_of`` not an
            int >= 1.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise DataError(
                f"pad_token_id must be an int >= 0, got {pad_token_id!r} "
                "(set tokenizer.pad_token, e.g. to the eos token)"
            )
        if pad_to_multiple_of is not None and (
            isinstance(pad_to_multiple_of, bool)
            or not isinstance(pad_to_multiple_of, int)
            or pad_to_multiple_of < 1
        ):
            raise DataError(
                f"pad_to_multiple_of must be None or an int >= 1, got {pad_to_multiple_of!r}"
            )
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``features`` (dicts with ``input_ids`` and optional ``labels``)."""
        import torch

        if not features:
            raise DataError("cannot collate an empty list of features")
        ids = [_as_list(f["input_ids"]) for f in features]
        length = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            length = int(math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of)

        def pad(rows: list[list[int]], value: int) -> torch.Tensor:
            return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)

        batch = {"input_ids": pad(ids, self.pad_token_id)}
        batch["attention_mask"] = pad(
            [
                _as_list(f["attention_mask"]) if "attention_mask" in f else [1] * len(x)
                for f, x in zip(features, ids, strict=True)
            ],
            0,
        )
        batch["labels"] = pad(
            [
                _as_list(f["labels"]) if "labels" in f else x
                for f, x in zip(features, ids, strict=True)
            ],
            IGNORE_INDEX,
        )
        if any("position_ids" in f for f in features):
            batch["position_ids"] = pad(
                [
                    _as_list(f["position_ids"]) if "position_ids" in f else list(range(len(x)))
                    for f, x in zip(features, ids, strict=True)
                ],
                0,
            )
        return batch


def _as_list(value: Any) -> list[int]:
    """Token ids from a list, tuple or tensor."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value)
