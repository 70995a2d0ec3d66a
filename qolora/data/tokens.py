"""Data pipeline: tokenize rendered records with prompt masking, pack, split, collate.

Records are loaded and rendered by :mod:`qolora.data.records` (re-exported here: ``load_records``,
``detect_format``, ``DataError``, ``FORMATS``); this module turns them into training examples.

1. :func:`tokenize_dataset` renders every record as a conversation and tokenizes it.

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
   * Truncation keeps the first ``max_length`` tokens; a text far longer than that is cut at a
     generous character bound before tokenizing (:func:`_tokenize_prefix`), so a 10 MB record costs
     no more than a short one. An example with no labelled token left
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
2. :func:`split_train_eval` makes a deterministic train/eval split and :class:`PaddingCollator`
   right-pads a batch into tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .records import (
    FORMATS,
    SUPPORTED_SUFFIXES,
    DataError,
    Renderer,
    detect_format,
    load_records,
    record_to_messages,
    text_field,
)

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "DataStats",
    "FORMATS",
    "IGNORE_INDEX",
    "SUPPORTED_SUFFIXES",
    "load_records",
    "detect_format",
    "tokenize_dataset",
    "split_train_eval",
    "PaddingCollator",
    "model_inputs",
]

#: Label of tokens that are not trained on (prompt, padding, a packed example's first token).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DataStats:
    """What :func:`tokenize_dataset` did.

    Attributes:
        n_examples: Examples kept (before packing).
        n_truncated: Examples longer than ``max_length`` that were cut (kept or dropped).
        n_dropped: Examples dropped because no labelled token was left.
        n_tokens: Tokens in the kept examples, after truncation.
        cut_records: Indices of the records kept but cut to their first ``max_length`` tokens.
        too_long_records: Indices of the records dropped because no answer token lies within ``max_length``.
        no_answer_records: Indices of the records dropped because they have no answer to train on.
    """

    n_examples: int
    n_truncated: int
    n_dropped: int
    n_tokens: int
    cut_records: tuple[int, ...] = ()
    too_long_records: tuple[int, ...] = ()
    no_answer_records: tuple[int, ...] = ()

    def __str__(self) -> str:
        return (f"{self.n_examples} examples, {self.n_tokens} tokens, {self.n_truncated} truncated, "
                f"{self.n_dropped} dropped")


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


#: Characters per token assumed when cutting a long text before tokenizing it (generous: English BPE
#: averages ~4; a cut that turns out too short is retried with twice as many, then the whole text).
_CHARS_PER_TOKEN = 16
#: Tokens beyond ``max_length`` that must come out of a cut text, so the kept ones lie well before the cut.
_CUT_MARGIN = 16


def _tokenize_prefix(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], add_special_tokens: bool, max_length: int
) -> tuple[list[int], list[bool]]:
    """:func:`_tokenize_with_spans` of ``text``, tokenizing only the start of a text much longer than
    ``max_length`` tokens (a 10 MB record costs what ``max_length`` tokens cost, not minutes).

    The text is cut at a generous character bound; the cut is accepted only when it still yields
    ``max_length + _CUT_MARGIN`` tokens, so the first ``max_length`` tokens (and their labels, from
    character offsets) are those of the whole text. Returns more than ``max_length`` tokens exactly
    when the whole text is longer, so truncation is still counted.
    """
    bound = _CHARS_PER_TOKEN * (max_length + _CUT_MARGIN) + 256
    for _ in range(2):  # the cut, then one four times longer, then the whole text
        if bound >= len(text):
            break
        ids, inside = _tokenize_with_spans(tokenizer, text[:bound], spans, add_special_tokens)
        if len(ids) >= max_length + _CUT_MARGIN:
            return ids[: max_length + 1], inside[: max_length + 1]
        bound *= 4
    return _tokenize_with_spans(tokenizer, text, spans, add_special_tokens)


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
    renderer = Renderer(tokenizer)
    if fmt != "text" and not renderer.use_chat_template:
        logger.info(
            "Tokenizer has no chat template: using the plain ### Instruction/### Response template"
        )
    if renderer.eos is None:
        logger.warning("Tokenizer has no eos_token: answers will not end with EOS")

    all_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    cut, too_long, no_answer = [], [], []
    shortest_prompt: int | None = None
    for index, record in enumerate(dataset):
        ids, inside = _tokenize_record(record, index, fmt, renderer, tokenizer, mask_prompt, max_length)
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, inside, strict=True)]
        longer = len(ids) > max_length  # (a text cut before tokenizing comes back longer than max_length too)
        if longer:
            ids, labels = ids[:max_length], labels[:max_length]
        if all(lab == IGNORE_INDEX for lab in labels):
            if any(inside) or longer:  # the answer starts beyond max_length (or beyond the part tokenized)
                first = inside.index(True) if any(inside) else len(inside)
                shortest_prompt = first if shortest_prompt is None else min(shortest_prompt, first)
                too_long.append(index)
            else:
                no_answer.append(index)
            continue
        if longer:
            cut.append(index)
        all_ids.append(ids)
        all_labels.append(labels)

    stats = DataStats(
        n_examples=len(all_ids),
        n_truncated=len(cut) + len(too_long),
        n_dropped=len(too_long) + len(no_answer),
        n_tokens=sum(len(x) for x in all_ids),
        cut_records=tuple(cut),
        too_long_records=tuple(too_long),
        no_answer_records=tuple(no_answer),
    )
    logger.info("Tokenized %d records (format=%s, max_length=%d): kept %d, truncated %d, dropped %d, %d tokens",
                len(dataset), fmt, max_length, stats.n_examples, stats.n_truncated, stats.n_dropped, stats.n_tokens)
    if not all_ids:
        raise DataError(
            _all_dropped_message(len(dataset), max_length, len(no_answer), shortest_prompt)
        )

    import datasets

    if packing:
        columns = _pack(all_ids, all_labels, max_length)
        logger.info("Packed %d examples into %d blocks of <= %d tokens", stats.n_examples, len(columns["input_ids"]),
                    max_length)
    else:
        columns = {"input_ids": all_ids, "labels": all_labels}
    return datasets.Dataset.from_dict(columns), stats


def _tokenize_record(record, index: int, fmt: str, renderer: Renderer, tokenizer, mask_prompt: bool,
                     max_length: int) -> tuple[list[int], list[bool]]:
    """One record's token ids and, per token, whether it is trained on (an assistant answer, or every token
    of ``text`` records and without ``mask_prompt``)."""
    if fmt == "text":
        text = text_field(record["text"], "text", index) + (renderer.eos or "")
        ids, _ = _tokenize_prefix(tokenizer, text, [(0, len(text))], True, max_length)
        return ids, [True] * len(ids)
    messages = record_to_messages(record, fmt, index)
    try:
        if mask_prompt:
            text, spans = renderer.render_with_spans(messages, index)
        else:
            text = renderer.render(messages, add_generation_prompt=False)
            spans = [(0, len(text))]
    except DataError:
        raise
    except Exception as exc:  # the chat template's own errors (jinja, transformers ValueError)
        raise DataError(f"record {index}: the chat template cannot render it: {type(exc).__name__}: "
                        f"{exc}") from exc
    add_special = not renderer.use_chat_template  # a chat template carries its own
    ids, inside = _tokenize_prefix(tokenizer, text, spans, add_special, max_length)
    return ids, inside if mask_prompt else [True] * len(ids)


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
            f"(the shortest prompt takes {shortest_prompt} tokens or more); raise max_length or "
            "shorten the prompts"
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
    """Split a dataset into train and eval parts, deterministically, with no example on both sides.

    Identical rows (the same values in every column: a record repeated in the data) count as one
    example: ``round(d * eval_fraction)`` of the ``d`` distinct examples (at least 1, at most
    ``d - 1``), drawn by a shuffle with ``seed``, are held out, one copy each, and every copy of
    a held-out example is left out of training (otherwise the eval loss is partly measured on
    examples the model trains on). Training keeps the copies of its own examples, so the data's
    weighting is unchanged. Without repeats this is a plain shuffled split.

    Args:
        dataset: At least 2 distinct rows.
        eval_fraction: Fraction for eval, strictly between 0 and 1.
        seed: Shuffle seed; the same seed gives the same split.

    Returns:
        ``(train, eval)``.

    Raises:
        DataError: ``eval_fraction`` out of range or fewer than 2 distinct rows.
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

    keys = [_row_key(row) for row in dataset]
    first_copy: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        first_copy.setdefault(key, i)
    distinct = list(first_copy.values())
    d = len(distinct)
    if d < 2:
        raise DataError(
            f"cannot split a dataset of {n} identical examples into train and eval; need at least "
            "2 distinct examples"
        )
    n_eval = min(max(1, int(round(d * eval_fraction))), d - 1)
    order = np.random.default_rng(seed).permutation(d)
    eval_idx = sorted(distinct[j] for j in order[:n_eval].tolist())
    held_out = {keys[i] for i in eval_idx}
    train_idx = [i for i in range(n) if keys[i] not in held_out]
    logger.info(
        "Split %d examples (%d distinct) into %d train / %d eval (seed=%d)%s", n, d,
        len(train_idx), n_eval, seed,
        f"; {n - len(train_idx) - n_eval} repeat(s) of held-out examples left out of training"
        if d < n else "",
    )
    return dataset.select(train_idx), dataset.select(eval_idx)


def _row_key(row: dict) -> bytes:
    """A digest of every value of one row (tokenized rows: lists of ints), for finding repeats."""
    text = json.dumps(row, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class PaddingCollator:
    """Right-pad a list of tokenized examples into a batch of tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with -100 (a feature without
    ``labels`` is labelled with its ``input_ids``), ``position_ids`` with 0 (present when any
    feature has them; a feature without gets ``0..n-1``); ``attention_mask`` is 1 on real
    tokens, 0 on padding (an existing ``attention_mask`` feature is padded with 0).

    Run the model on :func:`model_inputs` of the batch: for packed batches it leaves out the
    ``attention_mask``, which keeps attention within examples (see the module docstring).

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


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward-call inputs for a collated batch, enforcing the packing rule.

    A packed batch (it has ``position_ids``) runs with ``input_ids`` and ``position_ids`` and **no**
    ``attention_mask``: transformers then builds a block-diagonal causal mask from the restarting
    positions, so each example attends only to itself (with the mask, every example would also
    attend to the ones before it in its block). Other batches run with their ``attention_mask``.
    Call the model with ``use_cache=False``.
    """
    keys = ("input_ids", "position_ids") if "position_ids" in batch else ("input_ids", "attention_mask")
    return {k: batch[k] for k in keys}


def _as_list(value: Any) -> list[int]:
    """Token ids from a list, tuple or tensor."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value)


def load_tokenizer(model_dir: Path):
    """The model folder's tokenizer (never running code from the folder), padding with EOS if needed.

    Raises:
        ConfigError: the folder has no usable tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError / ValueError / others for a missing tokenizer
        raise ConfigError(f"cannot load a tokenizer from {model_dir}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token: using EOS %r", tokenizer.eos_token)
    return tokenizer
