"""A tiny chat setup shared by the training, run-folder, reader, CLI, chat, offload and distributed tests: a tiny Llama
with the tiny ChatML tokenizer saved beside it, and a small jsonl of question/answer conversations."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import make_tiny_llama
from tiny_tokenizer import make_tiny_tokenizer

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("Hello, how are you today?", "I am fine, thank you."),
    ("What is your name?", "My name is Tiny, and I am a test assistant."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side."),
    ("Which planet is the largest?", "Jupiter is the largest planet in the solar system."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
]


def make_chat_model_dir(path: Path, **model_options) -> Path:
    """A tiny Llama checkpoint folder (``make_tiny_llama`` options) with the tiny tokenizer saved next to it."""
    make_tiny_llama(path, **model_options)
    make_tiny_tokenizer(path)
    return path


def write_chat_jsonl(path: Path, n: int = 64, *, qa=QA, distinct: bool = True) -> Path:
    """``n`` conversations cycling through ``qa``, each question numbered so that no two repeat (the answers do:
    a held-out example's answer is one the model trains on; the split keeps exact repeats on one side, so
    ``distinct=False``, plain repeats, leaves only ``len(qa)`` distinct examples to split)."""
    with open(path, "w") as f:
        for i in range(n):
            q, a = qa[i % len(qa)]
            q = f"{q} (question {i})" if distinct else q
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def events(out: Path, kind: str) -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


