"""What a training run shows and leaves behind: metrics JSONL, a loss plot, sample generations.

Everything here is a side channel of :func:`qolora.training.loop.train`; nothing feeds back into training:

* :class:`MetricsLog` appends one JSON object per event (``train`` every ``log_every`` steps,
  ``eval``, ``samples``, ``checkpoint``, ``resume``, ``end``, ``error``) to ``metrics.jsonl`` and
  flushes each line, so a killed run keeps every event it logged. On resume the file is cut back to
  the events up to the checkpoint's step (:meth:`MetricsLog.truncate_after`), so it reads as if the
  run had never stopped.
* :func:`plot_losses` draws train and eval loss against the step into ``loss.png`` (matplotlib's
  Agg backend, written to a temporary name and renamed; skipped with a warning without matplotlib).
* :func:`sample_prompts` picks held-out prompts, :func:`generate` answers them greedily and
  :func:`write_samples` writes the before/after answers to ``samples.json`` and ``samples.md``.
* :func:`memory_in_use` is what the progress bar shows: CUDA max allocated, or the process RSS.

All files are written atomically (:func:`qolora.files.atomic_file`): a temporary sibling, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.records import prompt_ids
from ..data.tokens import IGNORE_INDEX
from ..files import atomic_file, atomic_write_text

__all__ = [
    "MetricsLog",
    "format_bytes",
    "generate",
    "memory_in_use",
    "plot_losses",
    "prompt_preview",
    "read_samples",
    "sample_prompts",
    "template_system_prompt",
    "write_samples",
]

logger = logging.getLogger(__name__)

class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per event, flushed line by line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, event: str, **fields: Any) -> dict:
        """Append ``{"event": event, **fields}`` and return it."""
        record = {"event": event, **fields}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        return record

    def read(self) -> list[dict]:
        """Every complete event in the file (a torn last line from a killed run is skipped)."""
        if not self.path.is_file():
            return []
        events = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping an unreadable line of %s (torn write of a killed run?)", self.path)
        return events

    def truncate_after(self, step: int) -> None:
        """Keep only events logged at or before ``step`` (rewritten atomically)."""
        kept = [e for e in self.read() if e.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(e, allow_nan=True) + "\n" for e in kept))

    def reset(self) -> None:
        """Start an empty file."""
        atomic_write_text(self.path, "")


# ----------------------------------------------------------------------------------- memory
def memory_in_use(device: torch.device) -> int:
    """Bytes in use: CUDA max allocated on a GPU, else this process's resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import psutil  # optional

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # Unix only; max RSS in KiB on Linux

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def format_bytes(n: int) -> str:
    """``1234567890`` -> ``'1.23GB'``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n}B"


# ------------------------------------------------------------------------------------- plot
def running_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of the last ``window`` values at each position (fewer at the start)."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot_losses(history: Sequence[Mapping], evals: Sequence[Mapping], path: Path) -> Path | None:
    """Draw train loss (per step, and smoothed) and eval loss against the step into ``path``.

    Returns:
        ``path``, or None when matplotlib is not installed (a warning is logged) or there is nothing
        to draw.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping %s (pip install matplotlib)", Path(path).name)
        return None
    if not history and not evals:
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    try:
        if history:
            steps = [h["step"] for h in history]
            losses = [h["loss"] for h in history]
            # One step's loss is one batch's: it swings with which examples the batch holds (batches are grouped
            # by length with group_by_length, so similar examples share a step). The running mean shows the trend.
            ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1,
                    label="train (each step one batch: swings with its examples)")
            window = min(25, len(losses) // 8)
            if window > 1:
                ax.plot(steps, running_mean(losses, window), color="tab:blue", linewidth=1.8,
                        label=f"train (mean of the last {window} steps)")
        if evals:
            ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", color="tab:orange",
                    linewidth=1.8, label="eval")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (token mean)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- samples
def sample_prompts(dataset, tokenizer, n: int, texts: Sequence[str] | None = None) -> list[dict]:
    """Up to ``n`` prompts to answer before and after training.

    With ``texts``, those (through :func:`qolora.data.records.prompt_ids`). Otherwise the first ``n`` examples of
    the held-out ``dataset`` that have a prompt: the tokens before the first labelled token are the
    prompt exactly as training rendered it (chat template included), the labelled ones the reference
    answer.

    Returns:
        ``[{"prompt": text shown, "prompt_ids": [...], "reference": text or None}]``.
    """
    injected = template_system_prompt(tokenizer)
    if texts:
        return [{"prompt": t, "prompt_ids": prompt_ids(tokenizer, t), "reference": None,
                 "system_from_template": injected} for t in texts[:n]]
    out: list[dict] = []
    if dataset is None:
        return out
    for i in range(len(dataset)):
        if len(out) >= n:
            break
        row = dataset[i]
        ids, labels = list(row["input_ids"]), list(row["labels"])
        first = next((j for j, lab in enumerate(labels) if lab != IGNORE_INDEX), None)
        if not first or ids[:first] in [p["prompt_ids"] for p in out]:  # no prompt (plain text), or a repeat
            continue
        answer = [t for t, lab in zip(ids[first:], labels[first:]) if lab != IGNORE_INDEX]
        out.append({
            "prompt": tokenizer.decode(ids[:first], skip_special_tokens=False),
            "prompt_ids": ids[:first],
            "reference": tokenizer.decode(answer, skip_special_tokens=True).strip(),
        })
        text = out[-1]["prompt"]
        # the template's default, unless the record itself carried a system message (then the default is absent)
        out[-1]["system_from_template"] = injected if injected and injected in text else None
    return out


def template_system_prompt(tokenizer) -> str | None:
    """The system prompt a chat template adds to a conversation that has none (e.g. SmolLM2's "You are a
    helpful AI assistant named SmolLM, ..."), or None: the text the template renders before a lone user
    message, without its markup and role names."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "qolora-user-message-4d1c"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                             add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this has no default to report
        return None
    before = text.split(mark, 1)[0]
    lines = [ln.strip() for ln in _MARKUP.sub("\n", before).splitlines()]
    injected = "\n".join(ln for ln in lines if ln and not _ROLE_LINE.match(ln))
    return injected or None


_MARKUP = re.compile(r"<\|[^|>]*\|>|</?s>")
_ROLE_LINE = re.compile(r"^(system|user|assistant|human|gpt|###.*:)$", re.IGNORECASE)


def prompt_preview(prompt: str, width: int = 100) -> str:
    """The end of a rendered prompt without template markup and role lines: usually the last question."""
    lines = [ln.strip() for ln in _MARKUP.sub("\n", prompt).splitlines()]
    text = " / ".join(ln for ln in lines if ln and not _ROLE_LINE.match(ln))
    return text if len(text) <= width else "..." + text[-width:]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[dict], max_new_tokens: int,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             on_answer: Callable[[int, str], None] | None = None) -> list[str]:
    """Greedy answers (special tokens removed) to ``prompts`` from :func:`sample_prompts`.

    One prompt at a time (no padding), with the KV cache on, in eval mode; the model's mode is
    restored afterwards. Greedy decoding draws no random numbers, so training is unaffected.
    ``on_answer(i, answer)`` is called as each answer is ready (progress).
    """
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    answers = []
    try:
        for p in prompts:
            ids = torch.tensor([p["prompt_ids"]], device=device)  # (1, T)
            with autocast():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                     use_cache=True, temperature=None, top_p=None, top_k=None)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
            if on_answer is not None:
                on_answer(len(answers) - 1, answers[-1])
    finally:
        model.train(was_training)
    return answers


def write_samples(json_path: Path, md_path: Path, samples: Sequence[Mapping], *,
                  steps: int | None = None) -> tuple[Path, Path]:
    """Write ``samples.json`` and a readable ``samples.md`` (prompt, reference, before, after).

    Args:
        json_path, md_path: where (a run folder's ``samples.json`` and ``samples.md``).
        samples: ``[{"prompt", "reference", "before", "after", "prompt_ids"}]`` (``after`` may be None;
            the prompt ids are kept in the JSON so a resumed run answers exactly the same prompts).
        steps: the step the ``after`` answers were generated at, for the heading.
    """
    clean = [{k: s.get(k) for k in ("prompt", "reference", "before", "after", "prompt_ids", "system_from_template")}
             for s in samples]
    atomic_write_text(json_path,
                      json.dumps({"after_step": steps, "samples": clean}, indent=2, ensure_ascii=False) + "\n")
    lines = ["# Sample generations (greedy)", ""]
    for i, s in enumerate(clean, 1):
        lines += [f"## Sample {i}", "", "**Prompt**", "", "```", (s["prompt"] or "").rstrip(), "```", ""]
        if s.get("system_from_template"):
            lines += [f"(The system prompt {s['system_from_template']!r} is the chat template's default: the "
                      "tokenizer adds it to every conversation without one; it is not in the data.)", ""]
        if s["reference"]:
            lines += [f"**Reference:** {s['reference']}", ""]
        lines += [f"**Before training:** {s['before'] if s['before'] is not None else '(not generated)'}", ""]
        after = s["after"] if s["after"] is not None else "(not generated yet)"
        lines += [f"**After training{f' ({steps} steps)' if steps is not None else ''}:** {after}", ""]
    atomic_write_text(md_path, "\n".join(lines))
    return json_path, md_path


def read_samples(path: Path) -> list[dict]:
    """The samples in a run's ``samples.json`` (empty when there are none or they lack prompt ids)."""
    try:
        samples = list(json.loads(path.read_text(encoding="utf-8"))["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return samples if all(isinstance(s, dict) and s.get("prompt_ids") for s in samples) else []

