"""qolora.data.records: a data file that cannot be read, or a record that is not a conversation, is refused
naming the file and the line or record (before the model loads)."""

from __future__ import annotations

import json

import pytest

import qolora
from qolora import finetune
from qolora.data.tokens import DataError, load_records
from tiny_runs import run_options


@pytest.mark.parametrize("name, content, message", [
    # before: UnicodeDecodeError without the file
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin1\.jsonl is not UTF-8.*line 2"),
    ("latin1.txt", b"hello\n\ncaf\xe9 au lait\n", r"latin1\.txt is not UTF-8.*line 3"),
    ("latin1.csv", b"text\nok\ncaf\xe9\n", r"latin1\.csv is not UTF-8.*line 3"),
    # before: datasets' generic "An error occurred while generating the dataset"
    ("malformed.jsonl", b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', r"malformed\.jsonl.*line 2 is not valid JSON"),
    ("list-line.jsonl", b'{"text": "a"}\n[1, 2]\n', r"list-line\.jsonl.*line 2 is a JSON list"),
])
def test_unreadable_data_files_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_utf8_check_handles_characters_across_chunks(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("é" * 5000, encoding="utf-8")
    qolora.data.records._check_utf8(path, chunk_size=1001)  # odd chunks split the 2-byte characters


@pytest.mark.parametrize("records, message", [
    # before: transformers' "Cannot apply chat template to an empty conversation"
    ([{"messages": []}], r"chat\.jsonl: record 1: the conversation is empty"),
    ([{"messages": [{"role": "wizard", "content": "x"}]}], r"chat\.jsonl: record 1: unknown message role"),
])
def test_bad_records_name_file_and_record(tiny_inputs, tmp_path, records, message, no_prepare):
    model, _ = tiny_inputs
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, *records, good, good]))
    with pytest.raises(DataError, match=message):
        finetune(model, data, **run_options(tmp_path / "o"))
