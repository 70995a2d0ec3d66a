"""Tests of qolora.data: loading, format detection, masking, truncation, packing, collation."""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

from qolora import finetune
from qolora.data.tokens import (
    FORMATS,
    IGNORE_INDEX,
    SUPPORTED_SUFFIXES,
    DataError,
    DataStats,
    PaddingCollator,
    detect_format,
    load_records,
    split_train_eval,
    tokenize_dataset,
)
from tiny_runs import run_options
from tiny_tokenizer import make_tiny_tokenizer

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And Germany?"},
            {"role": "assistant", "content": "Berlin is the capital."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Hello, how are you today?"},
            {"role": "assistant", "content": "I am fine, thank you."},
        ]
    },
]
ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Add the numbers.", "input": "1 2 3", "output": "6"},
]


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _label_groups(tok, row) -> list[str]:
    """Decode each contiguous run of labelled tokens."""
    groups, cur = [], []
    for label in row["labels"]:
        if label != IGNORE_INDEX:
            cur.append(label)
        elif cur:
            groups.append(tok.decode(cur))
            cur = []
    if cur:
        groups.append(tok.decode(cur))
    return groups


def _labelled_ids_match_inputs(row) -> bool:
    return all(
        lab == IGNORE_INDEX or lab == tid
        for tid, lab in zip(row["input_ids"], row["labels"], strict=True)
    )


# ------------------------------------------------------------------------------------ loading


def _write(path: Path, kind: str, rows: list[dict]) -> Path:
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_load_each_file_format(tmp_path, kind):
    path = _write(tmp_path / f"data.{kind}", kind, ROWS)
    ds = load_records(path)
    assert len(ds) == 2
    assert set(ds.column_names) == {"instruction", "input", "output"}
    assert ds[1]["output"] == "6" and ds[1]["instruction"] == "Add the numbers."
    assert detect_format(ds.column_names) == "instruction"


def test_load_json_messages_and_string_source(tmp_path):
    path = _write(tmp_path / "chat.jsonl", "jsonl", CHAT)
    ds = load_records(str(path))
    assert ds.column_names == ["messages"]
    assert ds[0]["messages"][2] == {"role": "assistant", "content": "Paris."}


def test_load_txt_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\nstill first\n\n\n  second  \n \nthird\n\n")
    ds = load_records(path)
    assert ds.column_names == ["text"]
    assert list(ds["text"]) == ["first line\nstill first", "second", "third"]


def test_load_saved_dataset_and_dict(tmp_path):
    datasets.Dataset.from_list(CHAT).save_to_disk(str(tmp_path / "single"))
    assert len(load_records(tmp_path / "single")) == 2
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(CHAT), validation=datasets.Dataset.from_list(CHAT[:1])
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_records(tmp_path / "dict")) == 2
    assert len(load_records(tmp_path / "dict", split="validation")) == 1
    with pytest.raises(DataError, match="split 'test' not found.*validation"):
        load_records(tmp_path / "dict", split="test")


@pytest.mark.parametrize("name", ["missing.jsonl", "sub/dir/missing", "./missing"])
def test_load_missing_file(tmp_path, name):
    source = str(tmp_path / name) if not name.startswith(".") else name
    with pytest.raises(DataError, match="data file not found: .*missing"):
        load_records(source)


def test_load_unknown_suffix(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported data file suffix '\.xml'") as err:
        load_records(path)
    for suffix in SUPPORTED_SUFFIXES:
        assert suffix in str(err.value)


def test_load_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        load_records(tmp_path)


@pytest.mark.parametrize(
    "name,content", [("e.jsonl", ""), ("e.json", "  \n"), ("e.txt", "\n\n \n"), ("e.csv", "text\n")]
)
def test_load_empty(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="empty"):
        load_records(path)


def test_load_hub_name_offline_is_a_data_error(monkeypatch):
    import qolora.data.tokens as data

    def fake_load_dataset(name, split=None):
        raise ConnectionError(f"offline: {name} {split}")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(
        DataError, match="could not load dataset 'org/name'.*offline: org/name train"
    ):
        data.load_records("org/name")


def test_data_module_imports_without_datasets():
    """qolora/data/tokens.py and qolora/data/records.py must not import datasets (or torch) at module level.

    The package's ``__init__`` imports torch, so the two modules are imported under a bare package
    object that skips it.
    """
    package = str(Path(__file__).parents[2] / "qolora")
    code = (
        "import importlib, sys, types\n"
        f"pkg = types.ModuleType('qolora'); pkg.__path__ = [{package!r}]; sys.modules['qolora'] = pkg\n"
        "importlib.import_module('qolora.data.tokens')\n"
        "assert 'datasets' not in sys.modules, 'datasets imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    "columns,expected",
    [
        (["messages"], "messages"),
        (["conversations", "id"], "messages"),
        (["instruction", "output"], "instruction"),
        (["instruction", "input", "output"], "instruction"),
        (["prompt", "completion"], "prompt_completion"),
        (["text", "meta"], "text"),
        (["prompt", "completion", "text"], "prompt_completion"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_explicit_choice_and_errors():
    assert detect_format(["prompt", "completion", "text"], "text") == "text"
    assert set(FORMATS) == {"messages", "instruction", "prompt_completion", "text"}
    with pytest.raises(DataError, match=r"columns \['question', 'answer'\].*instruction \+ output"):
        detect_format(["question", "answer"])
    with pytest.raises(DataError, match=r"format 'instruction' needs column\(s\) \['output'\]"):
        detect_format(["instruction", "text"], "instruction")
    with pytest.raises(DataError, match="needs a column 'messages'"):
        detect_format(["text"], "messages")
    with pytest.raises(DataError, match="unknown data format 'chat'; allowed: messages"):
        detect_format(["text"], "chat")


def test_tokenize_explicit_format_missing_column(tok):
    ds = datasets.Dataset.from_list([{"text": "hi"}])
    with pytest.raises(DataError, match=r"\['prompt', 'completion'\]"):
        tokenize_dataset(ds, tok, format="prompt_completion")


# ------------------------------------------------------------------------------------ masking


def test_messages_masking_is_exact(tok):
    out, stats = tokenize_dataset(datasets.Dataset.from_list(CHAT), tok)
    assert stats == DataStats(n_examples=2, n_truncated=0, n_dropped=0, n_tokens=stats.n_tokens)
    assert stats.n_tokens == sum(len(r) for r in out["input_ids"])
    assert _label_groups(tok, out[0]) == ["Paris.<|im_end|>", "Berlin is the capital.<|im_end|>"]
    assert _label_groups(tok, out[1]) == ["I am fine, thank you.<|im_end|>"]
    for row, record in zip(out, CHAT, strict=True):
        assert _labelled_ids_match_inputs(row)
        # The whole conversation is tokenized once: identical to tokenizing the rendered text.
        text = tok.apply_chat_template(record["messages"], tokenize=False)
        assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert row["labels"][-1] == IGNORE_INDEX  # the template's "\n" after EOS
        assert row["labels"][-2] == tok.eos_token_id


def test_sharegpt_conversations(tok):
    ds = datasets.Dataset.from_list(
        [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]
    )
    out, _ = tokenize_dataset(ds, tok)
    assert _label_groups(tok, out[0]) == ["Hello!<|im_end|>"]
    assert tok.decode(out[0]["input_ids"]).startswith("<|im_start|>user\nHi<|im_end|>")


def test_instruction_format_with_chat_template(tok):
    out, _ = tokenize_dataset(datasets.Dataset.from_list(ROWS), tok)
    assert [_label_groups(tok, r) for r in out] == [["Hello!<|im_end|>"], ["6<|im_end|>"]]
    assert tok.decode(out[1]["input_ids"]) == (
        "<|im_start|>user\nAdd the numbers.\n\n1 2 3<|im_end|>\n"
        "<|im_start|>assistant\n6<|im_end|>\n"
    )


def test_prompt_completion_format(tok):
    ds = datasets.Dataset.from_list([{"prompt": "Tell me a joke.", "completion": "Why not?"}])
    out, _ = tokenize_dataset(ds, tok, format="prompt_completion")
    assert _label_groups(tok, out[0]) == ["Why not?<|im_end|>"]


def test_plain_template_without_chat_template(tok):
    plain = make_tiny_tokenizer()
    plain.chat_template = None
    out, _ = tokenize_dataset(datasets.Dataset.from_list(ROWS), plain)
    assert plain.decode(out[1]["input_ids"]) == (
        "### Instruction:\nAdd the numbers.\n\n1 2 3\n\n### Response:\n6<|im_end|>\n\n"
    )
    assert _label_groups(plain, out[1]) == ["6<|im_end|>"]
    out, _ = tokenize_dataset(datasets.Dataset.from_list(CHAT[:1]), plain)
    assert _label_groups(plain, out[0]) == ["Paris.<|im_end|>", "Berlin is the capital.<|im_end|>"]


def test_text_format_is_fully_labelled(tok):
    ds = datasets.Dataset.from_list([{"text": "The sea is wide and blue."}])
    out, _ = tokenize_dataset(ds, tok)
    row = out[0]
    assert row["labels"] == row["input_ids"]
    assert tok.decode(row["input_ids"]) == "The sea is wide and blue.<|im_end|>"


def test_mask_prompt_false_labels_everything(tok):
    out, _ = tokenize_dataset(datasets.Dataset.from_list(CHAT), tok, mask_prompt=False)
    for row in out:
        assert row["labels"] == row["input_ids"]


def test_messages_as_json_strings_in_csv(tmp_path, tok):
    rows = [{"messages": json.dumps(r["messages"])} for r in CHAT]
    ds = load_records(_write(tmp_path / "chat.csv", "csv", rows))
    out, _ = tokenize_dataset(ds, tok)
    assert _label_groups(tok, out[1]) == ["I am fine, thank you.<|im_end|>"]


def test_non_incremental_template_is_rejected(tok):
    odd = make_tiny_tokenizer()
    odd.chat_template = "{{ messages[-1]['content'] }}"  # renders only the last message
    ds = datasets.Dataset.from_list(CHAT)
    with pytest.raises(DataError, match="does not render conversations incrementally"):
        tokenize_dataset(ds, odd)
    out, _ = tokenize_dataset(ds, odd, mask_prompt=False)
    assert odd.decode(out[1]["input_ids"]) == "I am fine, thank you."


def test_bad_records_and_arguments(tok):
    bad_role = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "narrator", "content": "x"},
                    {"role": "assistant", "content": "y"},
                ]
            }
        ]
    )
    with pytest.raises(DataError, match="record 0: unknown message role 'narrator'"):
        tokenize_dataset(bad_role, tok)
    ds = datasets.Dataset.from_list(CHAT)
    with pytest.raises(DataError, match="max_length must be an integer >= 2, got 0"):
        tokenize_dataset(ds, tok, max_length=0)
    with pytest.raises(DataError, match="unknown data format 'alpaca'"):
        tokenize_dataset(ds, tok, format="alpaca")


def test_chat_template_errors_name_the_record(tmp_path):
    tok = make_tiny_tokenizer()
    tok.chat_template = "{{ raise_exception('no system messages') if messages[0]['role'] == 'system' else 'x' }}"
    ds = datasets.Dataset.from_list([{"messages": [{"role": "system", "content": "s"},
                                                                 {"role": "user", "content": "u"}]}])
    with pytest.raises(DataError, match="record 0: the chat template cannot render it.*no system messages"):
        tokenize_dataset(ds, tok, max_length=32)


# ------------------------------------------------------------------------------------ truncation


def _qa(question_words: int, answer_words: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": " ".join(["question"] * question_words)},
            {"role": "assistant", "content": " ".join(["answer"] * answer_words)},
        ]
    }


def test_truncation_and_drop_counts(tok):
    short, long_answer, long_prompt = _qa(2, 2), _qa(2, 80), _qa(80, 2)
    ds = datasets.Dataset.from_list([short, long_answer, long_prompt, short])
    n_short = len(tokenize_dataset(datasets.Dataset.from_list([short]), tok)[0][0]["input_ids"])
    max_length = 40
    assert n_short < max_length
    out, stats = tokenize_dataset(ds, tok, max_length=max_length)
    assert stats.n_truncated == 2 and stats.n_dropped == 1 and stats.n_examples == 3
    assert stats.n_tokens == 2 * n_short + max_length
    lengths = [len(r) for r in out["input_ids"]]
    assert lengths == [n_short, max_length, n_short]
    truncated = out[1]
    assert _labelled_ids_match_inputs(truncated)
    assert truncated["labels"][-1] != IGNORE_INDEX  # the kept part of the answer is trained on


def test_which_records_were_cut_and_which_dropped(tok):
    short, long_answer, long_prompt = _qa(2, 2), _qa(2, 80), _qa(80, 2)
    ds = datasets.Dataset.from_list([short, long_answer, long_prompt, short, CHAT[0] | {"messages": [
        {"role": "user", "content": "only a question"}]}])
    _, stats = tokenize_dataset(ds, tok, max_length=40)
    assert stats.cut_records == (1,) and stats.too_long_records == (2,) and stats.no_answer_records == (4,)


def test_the_finetune_warning_says_what_happened_to_which_record(tok, caplog):
    from qolora.training.finetune import _warn_about_lengths

    ds = datasets.Dataset.from_list([_qa(2, 2), _qa(2, 80), _qa(80, 2)])
    _, stats = tokenize_dataset(ds, tok, max_length=40)
    with caplog.at_level("WARNING", logger="qolora.training.finetune"):
        _warn_about_lengths(stats, 40, "my.jsonl")
    text = caplog.text
    assert "1 of 3 examples were dropped: longer than max_length=40 with no answer token within it (records 2)" in text
    assert ("1 of 3 examples are longer than max_length=40 and were kept cut to their first 40 tokens (records 1)"
            in text)


def test_log_shows_data_stats_readably(tiny_inputs, tmp_path, caplog, no_prepare):
    model, data = tiny_inputs
    with caplog.at_level(logging.INFO, logger="qolora"), pytest.raises(AssertionError, match="prepare"):
        finetune(model, data, **run_options(tmp_path / "o"))
    text = caplog.text
    assert "DataStats(" not in text and "examples, " in text and " tokens, " in text


def test_a_10mb_record_is_cut_before_tokenizing(tmp_path):
    # before: tokenized in full (~90 s on the default model) and then truncated
    tok = make_tiny_tokenizer()
    answer = "The capital of France is Paris. " * 330_000  # ~10 MB
    records = [{"messages": [{"role": "user", "content": "What is the capital of France?"},
                             {"role": "assistant", "content": answer}]}]
    ds = datasets.Dataset.from_list(records)
    start = time.perf_counter()
    out, stats = tokenize_dataset(ds, tok, max_length=128)
    assert time.perf_counter() - start < 5
    assert stats.n_truncated == 1 and len(out[0]["input_ids"]) == 128
    # exactly what tokenizing the whole text and then truncating gives (checked on a 200 kB record)
    question = records[0]["messages"][0]
    small = datasets.Dataset.from_list(
        [{"messages": [question, {"role": "assistant", "content": answer[:200_000]}]}])
    cut, _ = tokenize_dataset(small, tok, max_length=128)
    data_module = importlib.import_module("qolora.data.tokens")
    saved = data_module._CHARS_PER_TOKEN
    data_module._CHARS_PER_TOKEN = 10**9  # no cut: the whole text
    try:
        whole, _ = tokenize_dataset(small, tok, max_length=128)
    finally:
        data_module._CHARS_PER_TOKEN = saved
    assert cut[0] == whole[0] == out[0]


def test_a_text_record_is_cut_too_and_short_ones_untouched(tmp_path):
    tok = make_tiny_tokenizer()
    ds = datasets.Dataset.from_list([{"text": "Hello, how are you today? " * 200_000},
                                                   {"text": "Short."}])
    out, stats = tokenize_dataset(ds, tok, max_length=64)
    assert stats.n_truncated == 1 and len(out[0]["input_ids"]) == 64
    assert out[1]["input_ids"] == tok("Short." + tok.eos_token)["input_ids"]


def test_a_huge_prompt_is_reported_as_too_long_not_as_answerless(tok):
    ds = datasets.Dataset.from_list([_qa(100_000, 2)] * 2)
    with pytest.raises(DataError, match=r"every example is longer than max_length=64") as info:
        tokenize_dataset(ds, tok, max_length=64)
    assert "no assistant answer" not in str(info.value)


def test_a_malformed_jsonl_line_gets_one_message(tmp_path, caplog):
    lines = [json.dumps({"text": f"line {i}"}) for i in range(10)]
    lines[6] = '{"text": [broken'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level("DEBUG"), pytest.raises(DataError, match="line 7 is not valid JSON"):
        load_records(path)
    assert "row 6" not in caplog.text and not [r for r in caplog.records if r.levelname == "ERROR"]


def test_all_too_long_raises(tok):
    ds = datasets.Dataset.from_list([_qa(60, 2), _qa(70, 2)])
    with pytest.raises(DataError, match=r"every example is longer than max_length=16.*prompt"):
        tokenize_dataset(ds, tok, max_length=16)


def test_no_assistant_answer_dropped(tok):
    ds = datasets.Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": "only a question"}]},
            CHAT[1],
        ]
    )
    out, stats = tokenize_dataset(ds, tok)
    assert stats.n_dropped == 1 and len(out) == 1
    with pytest.raises(DataError, match="no assistant answer"):
        tokenize_dataset(ds.select([0]), tok)


# ------------------------------------------------------------------------------------ packing


def test_packing_preserves_labels(tok):
    records = [_qa(q, a) for q, a in [(2, 3), (5, 1), (1, 8), (3, 3), (7, 2), (2, 2)]]
    ds = datasets.Dataset.from_list(records)
    max_length = 64
    plain, stats = tokenize_dataset(ds, tok, max_length=max_length)
    packed, pstats = tokenize_dataset(ds, tok, max_length=max_length, packing=True)
    assert pstats == stats
    assert len(packed) < len(plain)
    assert set(packed.column_names) == {"input_ids", "labels", "position_ids"}
    # Unpack with position_ids (restart at 0 per example): the examples come back whole, in
    # order, with their labels except the first token's (never a target).
    examples = []
    for block in packed:
        assert len(block["input_ids"]) <= max_length
        for i, pos in enumerate(block["position_ids"]):
            if pos == 0:
                examples.append({"input_ids": [], "labels": []})
            examples[-1]["input_ids"].append(block["input_ids"][i])
            examples[-1]["labels"].append(block["labels"][i])
    assert len(examples) == len(plain)
    for got, want in zip(examples, plain, strict=True):
        assert got["input_ids"] == want["input_ids"]
        assert got["labels"][0] == IGNORE_INDEX
        assert got["labels"][1:] == want["labels"][1:]
    # Greedy: a block is closed only when the next example does not fit.
    lengths = [len(r) for r in plain["input_ids"]]
    blocks, cur = [], 0
    for n in lengths:
        if cur + n > max_length:
            blocks.append(cur)
            cur = 0
        cur += n
    blocks.append(cur)
    assert [len(b) for b in packed["input_ids"]] == blocks


def test_packed_block_without_attention_mask_matches_unpacked_logits(tok):
    """The recipe in the module docstring: position_ids, no attention_mask, use_cache=False."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = ["one two", "three four five six", "seven", "the sea is wide"]
    ds = datasets.Dataset.from_list([{"text": t} for t in texts])
    plain, _ = tokenize_dataset(ds, tok)
    packed, _ = tokenize_dataset(ds, tok, packing=True)
    assert len(packed) == 1
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    batch = PaddingCollator(tok.pad_token_id, pad_to_multiple_of=8)([packed[0], plain[0]])
    batch.pop("attention_mask")
    with torch.no_grad():
        ref = torch.cat(
            [
                model(input_ids=torch.tensor([r]), use_cache=False).logits[0]
                for r in plain["input_ids"]
            ]
        )
        got = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    n, n0 = ref.shape[0], len(plain[0]["input_ids"])
    torch.testing.assert_close(got[0, :n], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :n0], ref[:n0], atol=1e-5, rtol=1e-5)


def test_packing_text_keeps_every_token(tok):
    ds = datasets.Dataset.from_list([{"text": t} for t in ["one two", "three four five", "six"]])
    packed, stats = tokenize_dataset(ds, tok, max_length=512, packing=True)
    assert len(packed) == 1
    assert len(packed[0]["input_ids"]) == stats.n_tokens
    assert tok.decode(packed[0]["input_ids"]) == (
        "one two<|im_end|>three four five<|im_end|>six<|im_end|>"
    )


# ------------------------------------------------------------------------------------ split


def test_split_train_eval():
    ds = datasets.Dataset.from_dict({"x": list(range(25))})
    train, ev = split_train_eval(ds, eval_fraction=0.2, seed=3)
    assert len(ev) == 5 and len(train) == 20
    assert sorted(list(train["x"]) + list(ev["x"])) == list(range(25))
    train2, ev2 = split_train_eval(ds, eval_fraction=0.2, seed=3)
    assert list(ev2["x"]) == list(ev["x"]) and list(train2["x"]) == list(train["x"])
    assert list(split_train_eval(ds, eval_fraction=0.2, seed=4)[1]["x"]) != list(ev["x"])
    tiny_train, tiny_eval = split_train_eval(ds.select([0, 1]), eval_fraction=0.01)
    assert len(tiny_train) == 1 and len(tiny_eval) == 1
    with pytest.raises(DataError, match="dataset of 1 example"):
        split_train_eval(ds.select([0]))
    with pytest.raises(DataError, match="eval_fraction must be .* got 1.5"):
        split_train_eval(ds, eval_fraction=1.5)


def test_split_keeps_every_copy_of_a_held_out_example_out_of_training():
    # 12 distinct tokenized examples, some repeated up to 5 times (as the chatterbot records are)
    rows = [[i, i + 1] for i in range(12)]
    copies = [5, 1, 3, 1, 2, 1, 1, 4, 1, 1, 2, 1]
    ids = [r for r, c in zip(rows, copies) for _ in range(c)]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    for seed in range(6):
        train, ev = split_train_eval(ds, eval_fraction=0.25, seed=seed)
        held = [tuple(x) for x in ev["input_ids"]]
        assert len(held) == 3 and len(set(held)) == 3  # a quarter of the 12 distinct, one copy each
        assert not set(held) & {tuple(x) for x in train["input_ids"]}
        kept = sum(c for r, c in zip(rows, copies) if tuple(r) not in held)
        assert len(train) == kept  # the training side keeps its own repeats
    # a row differing in one column only is another example
    ds2 = datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 3, "labels": [[1, 2], [1, 2], [-100, 2]]})
    train, ev = split_train_eval(ds2, eval_fraction=0.5, seed=0)
    assert len(ev) == 1 and len(train) == (1 if ev["labels"][0] == [1, 2] else 2)
    with pytest.raises(DataError, match="4 identical examples .* at least 2 distinct"):
        split_train_eval(datasets.Dataset.from_dict({"x": [7, 7, 7, 7]}))


# ------------------------------------------------------------------------------------ collator


def test_padding_collator():
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = PaddingCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    batch = PaddingCollator(pad_token_id=9, pad_to_multiple_of=4)(
        [dict(f, position_ids=list(range(len(f["input_ids"])))) for f in features]
    )
    assert batch["input_ids"].shape == (2, 4)
    assert batch["input_ids"][1].tolist() == [8, 9, 9, 9]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 0, 0]]
    mixed = PaddingCollator(0)([{"input_ids": [4, 5], "position_ids": [0, 1]}, {"input_ids": [6]}])
    assert mixed["position_ids"].tolist() == [[0, 1], [0, 0]]
    assert mixed["labels"].tolist() == [[4, 5], [6, -100]]
    with pytest.raises(DataError, match="pad_token_id must be an int >= 0, got None"):
        PaddingCollator(None)


def test_collator_on_tokenized_dataset(tok):
    out, _ = tokenize_dataset(datasets.Dataset.from_list(CHAT), tok)
    batch = PaddingCollator(tok.pad_token_id)([out[0], out[1]])
    n0, n1 = len(out[0]["input_ids"]), len(out[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert int(batch["attention_mask"].sum()) == n0 + n1
